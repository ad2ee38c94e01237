"""Routes of the REST API, mounted at /api/v1/ (docs/api.md lists them with their roles)."""

from __future__ import annotations

from django.urls import path, re_path

from federation.api.views import (
    audit,
    people,
    plans,
    reports,
    runs,
    signup,
    silos,
    uploaded_models,
)
from federation.api.views.base import ApiNotFoundView

app_name = "api"
urlpatterns = [
    path("", reports.ApiIndexView.as_view(), name="index"),
    path("auth/token/", signup.TokenObtainView.as_view(), name="auth-token"),
    path("me/", people.MeView.as_view(), name="me"),
    path("me/tokens/", people.MyTokenListView.as_view(), name="my-tokens"),
    path("me/tokens/<int:pk>/", people.MyTokenDetailView.as_view(), name="my-token"),
    path("consortia/", people.ConsortiumListView.as_view(), name="consortium-list"),
    path("consortia/<int:pk>/", people.ConsortiumDetailView.as_view(), name="consortium-detail"),
    path(
        "consortia/<int:pk>/organizations/",
        people.ConsortiumOrganizationListView.as_view(),
        name="consortium-organizations",
    ),
    path(
        "consortia/<int:pk>/members/",
        people.ConsortiumMemberListView.as_view(),
        name="consortium-members",
    ),
    path(
        "consortia/<int:pk>/invitations/",
        people.ConsortiumInvitationListView.as_view(),
        name="consortium-invitations",
    ),
    path(
        "invitations/accept/",
        signup.InvitationAcceptView.as_view(),
        name="invitation-accept",
    ),
    path(
        "invitations/<int:pk>/revoke/",
        people.InvitationRevokeView.as_view(),
        name="invitation-revoke",
    ),
    path("memberships/<int:pk>/", people.MembershipDetailView.as_view(), name="membership-detail"),
    path(
        "memberships/<int:pk>/deactivate/",
        people.MembershipDeactivateView.as_view(),
        name="membership-deactivate",
    ),
    path(
        "memberships/<int:pk>/accept/",
        people.MembershipAcceptView.as_view(),
        name="membership-accept",
    ),
    path("silos/", silos.SiloListView.as_view(), name="silo-list"),
    path("silos/<int:pk>/", silos.SiloDetailView.as_view(), name="silo-detail"),
    path("silos/<int:pk>/admit/", silos.SiloAdmitView.as_view(), name="silo-admit"),
    path("silos/<int:pk>/reject/", silos.SiloRejectView.as_view(), name="silo-reject"),
    path(
        "silos/<int:pk>/rotate-token/",
        silos.SiloTokenRotateView.as_view(),
        name="silo-rotate-token",
    ),
    path(
        "silos/<int:pk>/revoke-token/",
        silos.SiloTokenRevokeView.as_view(),
        name="silo-revoke-token",
    ),
    path("silos/<int:pk>/budget/", silos.SiloBudgetView.as_view(), name="silo-budget"),
    path("plans/", plans.PlanListView.as_view(), name="plan-list"),
    path("plans/<int:pk>/", plans.PlanDetailView.as_view(), name="plan-detail"),
    path("plans/<int:pk>/versions/", plans.PlanVersionListView.as_view(), name="plan-versions"),
    path(
        "plans/<int:pk>/versions/<int:number>/",
        plans.PlanVersionDetailView.as_view(),
        name="plan-version",
    ),
    path("plans/<int:pk>/diff/", plans.PlanDiffView.as_view(), name="plan-diff"),
    path("plans/<int:pk>/submit/", plans.PlanSubmitView.as_view(), name="plan-submit"),
    path("plans/<int:pk>/withdraw/", plans.PlanWithdrawView.as_view(), name="plan-withdraw"),
    path("plans/<int:pk>/approve/", plans.PlanApproveView.as_view(), name="plan-approve"),
    path("plans/<int:pk>/reject/", plans.PlanRejectView.as_view(), name="plan-reject"),
    path("plans/<int:pk>/approvals/", plans.PlanApprovalListView.as_view(), name="plan-approvals"),
    path("runs/", runs.RunListView.as_view(), name="run-list"),
    path("runs/<int:pk>/", runs.RunDetailView.as_view(), name="run-detail"),
    path("runs/<int:pk>/stop/", runs.RunStopView.as_view(), name="run-stop"),
    path("runs/<int:pk>/rounds/", runs.RunRoundListView.as_view(), name="run-rounds"),
    path("runs/<int:pk>/models/", runs.RunModelListView.as_view(), name="run-models"),
    path("runs/<int:pk>/fairness/", reports.RunFairnessView.as_view(), name="run-fairness"),
    path("runs/<int:pk>/privacy/", reports.RunPrivacyView.as_view(), name="run-privacy"),
    path("runs/<int:pk>/analysis/", reports.RunAnalysisView.as_view(), name="run-analysis"),
    path("runs/<int:pk>/compliance/", reports.RunComplianceView.as_view(), name="run-compliance"),
    path(
        "runs/<int:pk>/compliance.pdf",
        reports.RunCompliancePdfView.as_view(),
        name="run-compliance-pdf",
    ),
    path(
        "consortia/<int:pk>/privacy/",
        reports.ConsortiumPrivacyView.as_view(),
        name="consortium-privacy",
    ),
    path("models/<int:pk>/", reports.ModelVersionDetailView.as_view(), name="model-detail"),
    path(
        "models/<int:pk>/download/",
        reports.ModelVersionDownloadView.as_view(),
        name="model-download",
    ),
    path("models/<int:pk>/onnx/", reports.ModelVersionOnnxView.as_view(), name="model-onnx"),
    path("models/<int:pk>/card/", reports.ModelVersionCardView.as_view(), name="model-card"),
    path(
        "consortia/<int:pk>/models/",
        uploaded_models.ConsortiumUploadedModelListView.as_view(),
        name="consortium-uploaded-models",
    ),
    path(
        "uploaded-models/<int:pk>/",
        uploaded_models.UploadedModelDetailView.as_view(),
        name="uploaded-model-detail",
    ),
    path(
        "uploaded-models/<int:pk>/download/",
        uploaded_models.UploadedModelDownloadView.as_view(),
        name="uploaded-model-download",
    ),
    path("audit/events/", audit.AuditEventListView.as_view(), name="audit-events"),
    path("audit/head/", audit.AuditHeadView.as_view(), name="audit-head"),
    path("server-key/", audit.ServerKeyView.as_view(), name="server-key"),
    # Anything else under /api/v1/ is a JSON 404, not the HTML page.
    re_path(r"^.*$", ApiNotFoundView.as_view(), name="not-found"),
]
# The index lists the routes above (filled here: the view does not import this module).
reports.ApiIndexView.patterns = urlpatterns
