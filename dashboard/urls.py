"""Dashboard routes (docs: the reply to issue 5 lists who may open each page)."""

from django.contrib.auth import views as auth_views
from django.urls import path

from dashboard.views import (
    account,
    analysis,
    assets,
    audit,
    auth,
    consortium,
    fairness,
    members,
    models,
    plans,
    runs,
    silos,
)

app_name = "dashboard"
urlpatterns = [
    path("", consortium.home, name="home"),
    path("login/", auth.LoginView.as_view(), name="login"),
    path("logout/", auth_views.LogoutView.as_view(next_page="dashboard:login"), name="logout"),
    path(
        "invitations/<int:membership_id>/accept/",
        consortium.invitation_accept,
        name="invitation_accept",
    ),
    path("invite/<str:token>/", members.invitation_open, name="invitation_open"),
    path("account/tokens/", account.account_tokens, name="account_tokens"),
    path("account/passkeys/", account.account_passkeys, name="account_passkeys"),
    path(
        "account/tokens/<int:token_id>/revoke/",
        account.account_token_revoke,
        name="account_token_revoke",
    ),
    path("consortia/<int:consortium_id>/", consortium.overview, name="overview"),
    path("consortia/<int:consortium_id>/members/", members.member_list, name="member_list"),
    path(
        "consortia/<int:consortium_id>/organizations/new/",
        members.organization_new,
        name="organization_new",
    ),
    path(
        "consortia/<int:consortium_id>/invitations/new/",
        members.invitation_new,
        name="invitation_new",
    ),
    path(
        "invitations/<int:invitation_id>/revoke/",
        members.invitation_revoke,
        name="invitation_revoke",
    ),
    path("memberships/<int:membership_id>/role/", members.membership_role, name="membership_role"),
    path(
        "memberships/<int:membership_id>/deactivate/",
        members.membership_deactivate_view,
        name="membership_deactivate",
    ),
    path("consortia/<int:consortium_id>/silos/new/", silos.silo_register, name="silo_register"),
    path("consortia/<int:consortium_id>/plans/", plans.plan_list, name="plan_list"),
    path("consortia/<int:consortium_id>/plans/new/", plans.plan_propose, name="plan_propose"),
    path("consortia/<int:consortium_id>/runs/", runs.run_list, name="run_list"),
    path("consortia/<int:consortium_id>/models/", models.model_list, name="model_list"),
    path("consortia/<int:consortium_id>/audit/", audit.audit_log, name="audit_log"),
    path(
        "consortia/<int:consortium_id>/privacy/",
        fairness.consortium_privacy,
        name="privacy_report",
    ),
    path("silos/<int:silo_id>/", consortium.silo_detail, name="silo_detail"),
    path("plans/<int:plan_id>/", plans.plan_detail, name="plan_detail"),
    path("plans/<int:plan_id>/edit/", plans.plan_edit, name="plan_edit"),
    path("plans/<int:plan_id>/approve/", plans.plan_approve, name="plan_approve"),
    path("plans/<int:plan_id>/reject/", plans.plan_reject, name="plan_reject"),
    path("plans/<int:plan_id>/submit/", plans.plan_submit, name="plan_submit"),
    path("plans/<int:plan_id>/withdraw/", plans.plan_withdraw, name="plan_withdraw"),
    path("plans/<int:plan_id>/start/", plans.plan_start, name="plan_start"),
    path("runs/<int:run_id>/", runs.run_monitor, name="run_monitor"),
    path("runs/<int:run_id>/live.json", runs.run_live, name="run_live"),
    path("runs/<int:run_id>/stop/", runs.run_stop, name="run_stop"),
    path("runs/<int:run_id>/compliance/", audit.compliance_report, name="compliance_report"),
    path("runs/<int:run_id>/compliance.pdf", audit.compliance_report_pdf, name="compliance_pdf"),
    path("runs/<int:run_id>/fairness/", fairness.run_fairness, name="run_fairness"),
    path("runs/<int:run_id>/analysis/", analysis.run_analysis, name="run_analysis"),
    path("runs/<int:run_id>/analysis.csv", analysis.run_analysis_csv, name="run_analysis_csv"),
    path("models/<int:model_id>/download/", models.model_download, name="model_download"),
    path("models/<int:model_id>/card/", models.model_card, name="model_card"),
    path("models/<int:model_id>/card.json", models.model_card_json, name="model_card_json"),
    path("models/<int:model_id>/model.onnx", models.model_onnx, name="model_onnx"),
    path("vendor/plotly-<str:version>.min.js", assets.plotly_js, name="plotly_js"),
]
