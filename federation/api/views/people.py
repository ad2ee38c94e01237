"""The current user, consortia, their organisations and memberships."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.exceptions import NotFound
from rest_framework.request import Request
from rest_framework.response import Response

from federation import permissions, selectors
from federation.api.serializers import (
    ApiTokenCreatedSerializer,
    ApiTokenCreateSerializer,
    ApiTokenSerializer,
    ConsortiumDetailSerializer,
    ConsortiumSerializer,
    InvitationCreatedSerializer,
    InvitationCreateSerializer,
    InvitationSerializer,
    MembershipAddSerializer,
    MembershipRoleSerializer,
    MembershipSerializer,
    MeSerializer,
    OrganizationCreateSerializer,
    OrganizationSerializer,
)
from federation.api.views.base import ApiListView, ApiView, NoBodySerializer, validated
from federation.models import Consortium, Invitation, Membership, Organization
from federation.services import invitations
from federation.services.api_tokens import api_token_create, api_token_revoke
from federation.services.consortia import organization_add
from federation.services.members import (
    membership_accept,
    membership_add,
    membership_change_role,
    membership_deactivate,
)


class MeView(ApiView):
    @extend_schema(responses=MeSerializer, summary="The current user and their roles")
    def get(self, request: Request) -> Response:
        return Response(MeSerializer(selectors.me(request.user)).data)


class ConsortiumListView(ApiListView):
    """The consortia the user is a member of."""

    serializer_class = ConsortiumSerializer

    def get_queryset(self):
        return selectors.consortium_list(self.request.user)


class ConsortiumDetailView(ApiView):
    @extend_schema(responses=ConsortiumDetailSerializer, summary="A consortium and its rules")
    def get(self, request: Request, pk: int) -> Response:
        consortium = permissions.access_consortium(user=request.user, id=pk)
        return Response(ConsortiumDetailSerializer(consortium).data)


class ConsortiumOrganizationListView(ApiListView):
    """A consortium's member organisations; a consortium admin adds new ones."""

    serializer_class = OrganizationSerializer

    def get_queryset(self):
        if self.schema_only:
            return Organization.objects.none()
        consortium = permissions.access_consortium(user=self.request.user, id=self.kwargs["pk"])
        return selectors.consortium_organizations(consortium)

    @extend_schema(
        request=OrganizationCreateSerializer,
        responses={201: OrganizationSerializer},
        summary="Add a member organisation (consortium admin)",
        description="A name the consortium has already is 409. Audited as organization.created "
        "(refusals as organization.refused).",
    )
    def post(self, request: Request, pk: int) -> Response:
        consortium: Consortium = permissions.access_consortium(user=request.user, id=pk)
        data = validated(OrganizationCreateSerializer, request)
        organization = organization_add(
            actor=request.user, consortium=consortium, name=data["name"], kind=data["kind"]
        )
        return Response(OrganizationSerializer(organization).data, status=status.HTTP_201_CREATED)


class ConsortiumInvitationListView(ApiListView):
    """E-mail invitations of a consortium (consortium admins see all, organisation admins their
    organisations'); consortium and organisation admins invite."""

    serializer_class = InvitationSerializer

    def get_queryset(self):
        if self.schema_only:
            return Invitation.objects.none()
        consortium = permissions.access_consortium(user=self.request.user, id=self.kwargs["pk"])
        return selectors.consortium_invitations(user=self.request.user, consortium=consortium)

    @extend_schema(
        request=InvitationCreateSerializer,
        responses={201: InvitationCreatedSerializer},
        summary="Invite someone by e-mail to a role in an organisation of the consortium",
        description=(
            "Who may invite to which role is who may grant it (see POST .../members/): approving "
            "roles only by the organisation's own org_admin, a consortium admin an organisation's "
            "first org_admin. The answer carries the link (shown only here; the server keeps its "
            "SHA-256) and whether the e-mail was sent. Refusals are 403/409 and audited."
        ),
    )
    def post(self, request: Request, pk: int) -> Response:
        consortium: Consortium = permissions.access_consortium(user=request.user, id=pk)
        data = validated(InvitationCreateSerializer, request, consortium=consortium)
        created = invitations.invitation_create(
            actor=request.user,
            organization=data["organization"],
            email=data["email"],
            role=data["role"],
            days=data.get("days"),
        )
        delivery = invitations.invitation_deliver(created=created, request=request)
        body = {**InvitationSerializer(created.invitation).data, **delivery}
        return Response(body, status=status.HTTP_201_CREATED)


class InvitationRevokeView(ApiView):
    @extend_schema(
        request=None,
        responses=InvitationSerializer,
        summary="Revoke an open invitation (its link stops working)",
    )
    def post(self, request: Request, pk: int) -> Response:
        invitation = permissions.access_email_invitation(user=request.user, id=pk)
        validated(NoBodySerializer, request)
        invitation = invitations.invitation_revoke(actor=request.user, invitation=invitation)
        return Response(InvitationSerializer(invitation).data)


class ConsortiumMemberListView(ApiListView):
    """A consortium's memberships; consortium and organisation admins add new ones."""

    serializer_class = MembershipSerializer

    def get_queryset(self):
        if self.schema_only:
            return Membership.objects.none()
        consortium = permissions.access_consortium(user=self.request.user, id=self.kwargs["pk"])
        return selectors.consortium_memberships(consortium)

    @extend_schema(
        request=MembershipAddSerializer,
        responses={201: MembershipSerializer},
        summary="Give a user a role in an organisation of the consortium",
        description=(
            "Approving roles (data_steward, org_admin) are granted only by the organisation's own "
            "org_admin; a consortium admin may invite an organisation's first org_admin (status "
            "pending until the invitee accepts). Nobody grants a role to themselves; one person "
            "holds approving roles in at most one organisation. Refusals are 403/409 and audited."
        ),
    )
    def post(self, request: Request, pk: int) -> Response:
        consortium: Consortium = permissions.access_consortium(user=request.user, id=pk)
        data = validated(MembershipAddSerializer, request, consortium=consortium)
        membership = membership_add(
            actor=request.user,
            # An unknown username reaches the service as None: it checks roles first, so only
            # members allowed to add members learn whether a username exists.
            user=selectors.user_by_username(data["user"]),
            organization=data["organization"],
            role=data["role"],
        )
        return Response(MembershipSerializer(membership).data, status=status.HTTP_201_CREATED)


class MembershipAcceptView(ApiView):
    @extend_schema(
        request=None,
        responses=MembershipSerializer,
        summary="Accept an invitation (a pending membership addressed to you)",
    )
    def post(self, request: Request, pk: int) -> Response:
        invitation = permissions.access_invitation(user=request.user, id=pk)
        validated(NoBodySerializer, request)
        membership = membership_accept(actor=request.user, membership=invitation)
        return Response(MembershipSerializer(membership).data)


class MembershipDetailView(ApiView):
    @extend_schema(responses=MembershipSerializer, summary="A membership of your consortia")
    def get(self, request: Request, pk: int) -> Response:
        membership = permissions.access_membership(user=request.user, id=pk)
        return Response(MembershipSerializer(membership).data)

    @extend_schema(
        request=MembershipRoleSerializer,
        responses=MembershipSerializer,
        summary="Change a member's role",
        description=(
            "Under the rules of granting: authority over the old role and the new one; nobody "
            "changes their own role. The old membership is deactivated (kept for the history of "
            "approvals) and the answer is the new one. Refusals are 403/409 and audited."
        ),
    )
    def patch(self, request: Request, pk: int) -> Response:
        membership = permissions.access_membership(user=request.user, id=pk)
        data = validated(MembershipRoleSerializer, request)
        new = membership_change_role(actor=request.user, membership=membership, role=data["role"])
        return Response(MembershipSerializer(new).data)


class MembershipDeactivateView(ApiView):
    @extend_schema(
        request=None,
        responses=MembershipSerializer,
        summary="Deactivate a membership (its role counts for nothing from now on)",
        description=(
            "An approving role by an org_admin of its organisation, a consortium_admin by a "
            "consortium admin, other roles by either; anyone their own membership. The last "
            "active consortium admin is 409. Audited."
        ),
    )
    def post(self, request: Request, pk: int) -> Response:
        membership = permissions.access_membership(user=request.user, id=pk)
        validated(NoBodySerializer, request)
        membership = membership_deactivate(actor=request.user, membership=membership)
        return Response(MembershipSerializer(membership).data)


class MyTokenListView(ApiView):
    """The current user's API tokens: list them, or create one (its token is shown only once)."""

    @extend_schema(responses=ApiTokenSerializer(many=True), summary="My API tokens")
    def get(self, request: Request) -> Response:
        rows = selectors.api_token_list(user=request.user)
        return Response(ApiTokenSerializer(rows, many=True).data)

    @extend_schema(
        request=ApiTokenCreateSerializer,
        responses={201: ApiTokenCreatedSerializer},
        summary="Create an API token (shown once; the server keeps its SHA-256)",
    )
    def post(self, request: Request) -> Response:
        data = validated(ApiTokenCreateSerializer, request)
        created = api_token_create(
            actor=request.user, user=request.user, name=data["name"], days=data.get("days")
        )
        body = {**ApiTokenSerializer(created.row).data, "token": created.token}
        return Response(body, status=status.HTTP_201_CREATED)


class MyTokenDetailView(ApiView):
    @extend_schema(responses={204: None}, summary="Revoke one of my API tokens")
    def delete(self, request: Request, pk: int) -> Response:
        row = selectors.api_token_list(user=request.user).filter(pk=pk).first()
        if row is None:
            raise NotFound()  # someone else's token answers exactly like a missing one
        api_token_revoke(actor=request.user, token=row)
        return Response(status=status.HTTP_204_NO_CONTENT)
