"""The two API endpoints that need no API token: a token for a username and password
(``quorum login --username``), and accepting an invitation link (``quorum invitation accept``).

Both are what the sign-in page and the invitation page do, for a command line: the password
check goes through the same rate-limited backend as the sign-in page (config/security.py), and
the invitation through the same service with the same checks (federation/services/invitations).
"""

from __future__ import annotations

from django.conf import settings
from django.contrib.auth import authenticate
from drf_spectacular.utils import extend_schema
from rest_framework import status
from rest_framework.permissions import AllowAny
from rest_framework.request import Request
from rest_framework.response import Response

from config.security import client_ip, login_locked
from federation.api.serializers import (
    ApiTokenCreatedSerializer,
    ApiTokenSerializer,
    InvitationAcceptedSerializer,
    InvitationAcceptSerializer,
    MembershipSerializer,
    TokenObtainSerializer,
)
from federation.api.views.base import ApiView, validated
from federation.services import invitations
from federation.services.api_tokens import api_token_create


def _locked_out() -> Response:
    minutes = max(1, round(settings.QUORUM_LOGIN_LOCKOUT_SECONDS / 60))
    response = Response(
        {
            "detail": f"too many failed sign-ins for this username from your address: try again "
            f"in {minutes} minute(s)"
        },
        status=status.HTTP_429_TOO_MANY_REQUESTS,
    )
    response["Retry-After"] = str(settings.QUORUM_LOGIN_LOCKOUT_SECONDS)
    return response


class TokenObtainView(ApiView):
    # No authentication at all: a session cookie must not turn this into a CSRF target.
    authentication_classes: list[type] = []
    permission_classes = [AllowAny]

    @extend_schema(
        request=TokenObtainSerializer,
        responses={201: ApiTokenCreatedSerializer},
        summary="Create an API token with your username and password (shown once)",
        description=(
            "For `quorum login URL --username U`. Failures count towards the sign-in page's "
            "lock-out (QUORUM_LOGIN_FAILURE_LIMIT per username and address): then 429 with "
            "Retry-After. A wrong username or password is 401, saying no more. The token is "
            "audited as api_token.created."
        ),
    )
    def post(self, request: Request) -> Response:
        data = validated(TokenObtainSerializer, request)
        username = data["username"]
        if login_locked(username=username, ip=client_ip(request._request)):
            return _locked_out()
        user = authenticate(request._request, username=username, password=data["password"])
        if user is None:
            if login_locked(username=username, ip=client_ip(request._request)):
                return _locked_out()
            return Response(
                {"detail": "wrong username or password (or the account is deactivated)"},
                status=status.HTTP_401_UNAUTHORIZED,
            )
        created = api_token_create(actor=user, user=user, name=data["name"], days=data.get("days"))
        body = {**ApiTokenSerializer(created.row).data, "token": created.token}
        return Response(body, status=status.HTTP_201_CREATED)


class InvitationAcceptView(ApiView):
    # Anyone holding the link; a signed-in caller (API token) accepts as themselves, exactly as
    # on the invitation page.
    permission_classes = [AllowAny]

    @extend_schema(
        request=InvitationAcceptSerializer,
        responses={201: InvitationAcceptedSerializer},
        summary="Accept an invitation link: choose a username and password, or accept as yourself",
        description=(
            "The invitation page's checks: an unknown link is 404; a used, revoked or expired "
            "one, an address that has an account already (authenticate and accept as it), or a "
            "grant the inviter could not make now is 409/403 and audited, and nothing is "
            "created; a taken username or a weak password is 400 naming the field."
        ),
    )
    def post(self, request: Request) -> Response:
        data = validated(InvitationAcceptSerializer, request)
        signed_in = request.user if request.user.is_authenticated else None
        membership, account = invitations.invitation_accept(
            token=data["token"],
            user=signed_in,
            username="" if signed_in else data["username"],
            password="" if signed_in else data["password"],
        )
        body = {
            "username": account.get_username(),
            "membership": MembershipSerializer(membership).data,
        }
        return Response(body, status=status.HTTP_201_CREATED)
