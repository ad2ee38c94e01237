"""Training plans: versions, diffs, and the approval workflow."""

from __future__ import annotations

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import status
from rest_framework.request import Request
from rest_framework.response import Response

from federation import governance, permissions, selectors
from federation.api.filters import PlanFilter
from federation.api.serializers import (
    ApprovalSerializer,
    PlanApprovalSerializer,
    PlanDetailSerializer,
    PlanDiffQuerySerializer,
    PlanDiffSerializer,
    PlanEditSerializer,
    PlanProposeSerializer,
    PlanRejectionSerializer,
    PlanSerializer,
    PlanVersionDetailSerializer,
    PlanVersionSerializer,
)
from federation.api.views.base import ApiListView, ApiView, NoBodySerializer, validated
from federation.models import Approval, PlanVersion
from federation.services import plans as services


def plan_detail(request: Request, pk: int) -> Response:
    """The plan as its detail endpoint shows it (re-read after a write)."""
    plan = permissions.access_plan(user=request.user, id=pk)
    return Response(PlanDetailSerializer(plan).data)


class PlanListView(ApiListView):
    """Plans of the user's consortia; a data scientist proposes a new one."""

    serializer_class = PlanSerializer
    filterset_class = PlanFilter

    def get_queryset(self):
        return selectors.plan_list(self.request.user)

    @extend_schema(
        request=PlanProposeSerializer,
        responses={201: PlanDetailSerializer},
        summary="Propose a plan (version 1), submitted for approval unless submit is false",
    )
    def post(self, request: Request) -> Response:
        data = validated(PlanProposeSerializer, request)
        plan = services.plan_propose(actor=request.user, **data)
        response = plan_detail(request, plan.pk)
        response.status_code = status.HTTP_201_CREATED
        return response


class PlanDetailView(ApiView):
    @extend_schema(
        responses=PlanDetailSerializer,
        summary="A plan: current version (spec, hash, silos) and its approval state",
    )
    def get(self, request: Request, pk: int) -> Response:
        return plan_detail(request, pk)

    @extend_schema(
        request=PlanEditSerializer,
        responses=PlanDetailSerializer,
        summary="Edit a plan: a new version, whose approvals start afresh",
    )
    def put(self, request: Request, pk: int) -> Response:
        plan = permissions.access_plan(user=request.user, id=pk)
        data = validated(PlanEditSerializer, request)
        services.plan_edit(actor=request.user, plan=plan, **data)
        return plan_detail(request, pk)


class PlanVersionListView(ApiListView):
    """A plan's versions (without their specs)."""

    serializer_class = PlanVersionSerializer

    def get_queryset(self):
        if self.schema_only:
            return PlanVersion.objects.none()
        plan = permissions.access_plan(user=self.request.user, id=self.kwargs["pk"])
        return selectors.plan_versions(plan)


class PlanVersionDetailView(ApiView):
    @extend_schema(responses=PlanVersionDetailSerializer, summary="One version of a plan")
    def get(self, request: Request, pk: int, number: int) -> Response:
        plan = permissions.access_plan(user=request.user, id=pk)
        version = selectors.plan_version(plan, number)
        return Response(PlanVersionDetailSerializer(version).data)


class PlanDiffView(ApiView):
    @extend_schema(
        parameters=[
            OpenApiParameter("from", int, required=True, description="Version number"),
            OpenApiParameter("to", int, required=True, description="Version number"),
        ],
        responses=PlanDiffSerializer,
        summary="What changed between two versions of a plan",
    )
    def get(self, request: Request, pk: int) -> Response:
        plan = permissions.access_plan(user=request.user, id=pk)
        query = PlanDiffQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        old = selectors.plan_version(plan, query.validated_data["from"])
        new = selectors.plan_version(plan, query.validated_data["to"])
        diff = {
            "from_version": old.number,
            "to_version": new.number,
            "from_hash": old.spec_hash,
            "to_hash": new.spec_hash,
            "changes": governance.plan_diff(old, new),
        }
        return Response(PlanDiffSerializer(diff).data)


class PlanSubmitView(ApiView):
    @extend_schema(request=None, responses=PlanDetailSerializer, summary="Submit a draft")
    def post(self, request: Request, pk: int) -> Response:
        plan = permissions.access_plan(user=request.user, id=pk)
        validated(NoBodySerializer, request)
        services.plan_submit(actor=request.user, plan=plan)
        return plan_detail(request, pk)


class PlanWithdrawView(ApiView):
    @extend_schema(request=None, responses=PlanDetailSerializer, summary="Withdraw a plan")
    def post(self, request: Request, pk: int) -> Response:
        plan = permissions.access_plan(user=request.user, id=pk)
        validated(NoBodySerializer, request)
        services.plan_withdraw(actor=request.user, plan=plan)
        return plan_detail(request, pk)


class PlanApproveView(ApiView):
    @extend_schema(
        request=PlanApprovalSerializer,
        responses={201: ApprovalSerializer},
        summary="Approve the current version, named by its hash, for your organisation",
    )
    def post(self, request: Request, pk: int) -> Response:
        plan = permissions.access_plan(user=request.user, id=pk)
        data = validated(PlanApprovalSerializer, request)
        approval = services.plan_approve(actor=request.user, plan=plan, **data)
        return Response(ApprovalSerializer(approval).data, status=status.HTTP_201_CREATED)


class PlanRejectView(ApiView):
    @extend_schema(
        request=PlanRejectionSerializer,
        responses={201: ApprovalSerializer},
        summary="Reject the current version, named by its hash, with a reason",
    )
    def post(self, request: Request, pk: int) -> Response:
        plan = permissions.access_plan(user=request.user, id=pk)
        data = validated(PlanRejectionSerializer, request)
        rejection = services.plan_reject(actor=request.user, plan=plan, **data)
        return Response(ApprovalSerializer(rejection).data, status=status.HTTP_201_CREATED)


class PlanApprovalListView(ApiListView):
    """Every decision on every version of a plan."""

    serializer_class = ApprovalSerializer

    def get_queryset(self):
        if self.schema_only:
            return Approval.objects.none()
        plan = permissions.access_plan(user=self.request.user, id=self.kwargs["pk"])
        return selectors.plan_decisions(plan)
