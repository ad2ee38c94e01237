"""The signed-in user's own API tokens: create one (shown once), see them, revoke one."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import ValidationError
from django.http import Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect
from django.views.decorators.http import require_http_methods, require_POST

from dashboard.views.common import page
from federation import selectors
from federation.services import api_tokens, passkeys


@login_required
@require_http_methods(["GET", "POST"])
def account_tokens(request: HttpRequest) -> HttpResponse:
    """List the user's API tokens; a POST creates one and shows it on this answer only."""
    created, error, status = None, "", 200
    if request.method == "POST":
        try:
            days = int(request.POST.get("days") or 0) or None
            created = api_tokens.api_token_create(
                actor=request.user,
                user=request.user,
                name=str(request.POST.get("name", "")).strip(),
                days=days,
            )
            status = 201
        except ValueError:
            error, status = "days must be a whole number", 400
        except ValidationError as exc:
            error, status = "; ".join(exc.messages), 400
    response = page(
        request,
        "dashboard/account_tokens.html",
        tokens=list(selectors.api_token_list(user=request.user)),
        created=created,
        error=error,
        status=status,
    )
    response["Cache-Control"] = "no-store"  # the new token must not stay in any cache
    return response


@login_required
@require_POST
def account_token_revoke(request: HttpRequest, token_id: int) -> HttpResponse:
    """Revoke one of the user's own tokens."""
    token = selectors.api_token_list(user=request.user).filter(pk=token_id).first()
    if token is None:
        raise Http404("you have no API token with that id")
    api_tokens.api_token_revoke(actor=request.user, token=token)
    messages.success(request, f"Token {token.prefix}… revoked: it no longer works.")
    return redirect("dashboard:account_tokens")


@login_required
@require_http_methods(["GET", "POST"])
def account_passkeys(request: HttpRequest) -> HttpResponse:
    """List the user's passkeys with the line a site pins; a POST stores a new one's public key
    (the browser made it with navigator.credentials.create, static/js/passkeys.js)."""
    error, status = "", 200
    if request.method == "POST":
        try:
            passkeys.passkey_register(
                actor=request.user,
                credential_id=str(request.POST.get("credential_id", "")),
                algorithm=int(request.POST.get("algorithm") or 0),
                public_key_spki=str(request.POST.get("public_key", "")),
                name=str(request.POST.get("name", "")).strip(),
            )
        except ValueError:
            error, status = "algorithm must be a COSE algorithm number", 400
        except ValidationError as exc:
            error, status = "; ".join(exc.messages), 400
        else:
            messages.success(request, "Passkey registered: pin its key in your sites' site.toml.")
            return redirect("dashboard:account_passkeys")
    return page(
        request,
        "dashboard/account_passkeys.html",
        passkeys=list(selectors.passkey_list(user=request.user)),
        rp_id=request.get_host().rsplit(":", 1)[0],
        user_handle=str(request.user.pk),
        error=error,
        status=status,
    )
