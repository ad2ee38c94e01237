"""Web hardening: security headers on every response and rate-limited password sign-in
(docs/security.md, "Hostile input").

Sign-in failures are counted per (username, address) in Django's cache, so with the production
profile's Redis cache every server process sees the same counts. The check sits in the
authentication backend, so it covers every form that takes a password: the dashboard's sign-in
page and the admin's. A lock-out is audited once, when it starts, not once per attempt.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import logging
from collections.abc import Callable, Iterable
from typing import Any

from django.conf import settings
from django.contrib.auth.backends import ModelBackend
from django.core.cache import cache
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse

log = logging.getLogger("quorum.security")


class SecurityHeadersMiddleware:
    """Add Content-Security-Policy and Permissions-Policy to every response that lacks them.

    Django's SecurityMiddleware and XFrameOptionsMiddleware set nosniff, Referrer-Policy,
    Cross-Origin-Opener-Policy, X-Frame-Options and (over HTTPS, in production) HSTS.
    """

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        response = self.get_response(request)
        response.headers.setdefault(
            "Content-Security-Policy", settings.QUORUM_CONTENT_SECURITY_POLICY
        )
        response.headers.setdefault("Permissions-Policy", settings.QUORUM_PERMISSIONS_POLICY)
        response.headers.setdefault("Cross-Origin-Resource-Policy", "same-origin")
        return response


@functools.lru_cache(maxsize=8)
def _networks(
    proxies: tuple[str, ...],
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(proxy, strict=False) for proxy in proxies)


def _trusted(address: str, networks: Iterable[Any]) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip("[]"))
    except ValueError:
        return False
    return any(ip in network for network in networks)


def forwarded_client(peer: str, forwarded_for: list[str], proxies: Iterable[str]) -> str:
    """The client's address: ``peer`` unless it is one of ``proxies``; then the right-most address
    of X-Forwarded-For that is not a proxy itself (each proxy appends the address it saw, so
    whatever a client wrote into the header is further left and never chosen).

    Args:
        peer: the address of the TCP peer.
        forwarded_for: every X-Forwarded-For header value, in order.
        proxies: addresses or networks of the trusted reverse proxies (QUORUM_TRUSTED_PROXIES).
    """
    networks = _networks(tuple(proxies))
    if not networks or not _trusted(peer, networks):
        return peer
    hops = [hop.strip() for value in forwarded_for for hop in value.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, networks):
            return hop[:64]
    return hops[0][:64] if hops else peer


class TrustedProxyMiddleware:
    """ASGI: set ``scope["client"]`` to :func:`forwarded_client`, for HTTP and websockets alike,
    so the sign-in limiter (REMOTE_ADDR) and the agent token limiter count the same address.
    Uvicorn's own X-Forwarded-For handling is off (federation/server.py): by default it trusted
    127.0.0.1, so anyone on the server's host could choose the address they were counted under.
    """

    def __init__(self, app: Callable[..., Any]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """Rewrite the client address of an HTTP or websocket scope, then call the app."""
        client = scope.get("client")
        if scope["type"] in ("http", "websocket") and client and settings.QUORUM_TRUSTED_PROXIES:
            forwarded = [
                value.decode("latin-1")
                for name, value in scope.get("headers", [])
                if name.lower() == b"x-forwarded-for"
            ]
            address = forwarded_client(str(client[0]), forwarded, settings.QUORUM_TRUSTED_PROXIES)
            if address != client[0]:
                scope = {**scope, "client": (address, 0)}
        await self.app(scope, receive, send)


def client_ip(request: HttpRequest | None) -> str:
    """The address the request came from (X-Forwarded-For counts only from a trusted proxy:
    TrustedProxyMiddleware)."""
    if request is None:
        return "unknown"
    return str(request.META.get("REMOTE_ADDR") or "unknown")


def _key(kind: str, username: str, ip: str) -> str:
    digest = hashlib.sha256(f"{username.strip().lower()}\x00{ip}".encode()).hexdigest()
    return f"quorum:login:{kind}:{digest}"


def login_locked(*, username: str, ip: str) -> bool:
    """Whether sign-in for this username from this address is locked out right now."""
    return bool(cache.get(_key("lock", username, ip)))


def login_failed(*, username: str, ip: str) -> bool:
    """Count one failed sign-in; returns whether this failure started a lock-out."""
    count_key = _key("count", username, ip)
    cache.add(count_key, 0, timeout=settings.QUORUM_LOGIN_FAILURE_WINDOW_SECONDS)
    try:
        failures = cache.incr(count_key)
    except ValueError:  # expired between add and incr
        cache.set(count_key, 1, timeout=settings.QUORUM_LOGIN_FAILURE_WINDOW_SECONDS)
        failures = 1
    if failures < settings.QUORUM_LOGIN_FAILURE_LIMIT:
        return False
    cache.set(_key("lock", username, ip), True, timeout=settings.QUORUM_LOGIN_LOCKOUT_SECONDS)
    cache.delete(count_key)
    return True


def login_succeeded(*, username: str, ip: str) -> None:
    """Forget this pair's failures."""
    cache.delete(_key("count", username, ip))


def _audit_lockout(username: str, ip: str) -> None:
    from federation.services.audit import audit_append  # the app registry is ready by now

    audit_append(
        actor="anonymous",
        action="auth.login_locked",
        object_type="user",
        object_id=username[:100],
        data={
            "address": ip,
            "failures": settings.QUORUM_LOGIN_FAILURE_LIMIT,
            "lockout_seconds": settings.QUORUM_LOGIN_LOCKOUT_SECONDS,
        },
    )


class RateLimitedModelBackend(ModelBackend):
    """Django's model backend, refusing a locked-out (username, address) before any password
    check and counting failures towards a lock-out."""

    def authenticate(
        self,
        request: HttpRequest | None,
        username: str | None = None,
        password: str | None = None,
        **kwargs: Any,
    ) -> Any:
        """The user, or None; raises PermissionDenied while the pair is locked out."""
        if username is None:
            username = kwargs.get(self._username_field(), "")
        name, ip = str(username or ""), client_ip(request)
        if login_locked(username=name, ip=ip):
            raise PermissionDenied("too many failed sign-ins")  # ends authenticate(): no check
        user = super().authenticate(request, username=username, password=password, **kwargs)
        if user is None:
            if password is not None and login_failed(username=name, ip=ip):
                log.warning("sign-in locked out for %r from %s", name, ip)
                _audit_lockout(name, ip)
        else:
            login_succeeded(username=name, ip=ip)
        return user

    @staticmethod
    def _username_field() -> str:
        from django.contrib.auth import get_user_model

        return str(get_user_model().USERNAME_FIELD)
