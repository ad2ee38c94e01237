"""Web hardening on every page: security headers, no inline script (the CSP forbids it), a CSRF
token in every POST form and 403 without it (dashboard and the session-authenticated API)."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from typing import Any

import pytest
from django.test import Client

from federation.models import Run, TrainingPlan
from tests.dashboard_factories import World, approve_all, build_world, propose
from tests.integration.test_dashboard import PAGES, POSTS, ROLES, urls

pytestmark = pytest.mark.django_db

HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
}
EXTRA_PAGES = [
    "/login/",
    "/healthz",
    "/api/v1/",
    "/api/docs/",
    "/api/docs/?script=",
    "/api/schema/",
    "/admin/login/",
    "/no-such-page/",
    "/account/tokens/",
]


@pytest.fixture
def world() -> World:
    return build_world()


def more_plans(world: World) -> dict[str, TrainingPlan]:
    """Plans in the states whose pages carry the other forms (submit, start, stop)."""
    draft = propose(world.gov, name="Draft plan", submit=False)
    approved = approve_all(world.gov, propose(world.gov, name="Approved plan"))
    return {"draft": draft, "approved": approved}


def client_for(user: Any, **kwargs: Any) -> Client:
    client = Client(**kwargs)
    client.force_login(user)
    return client


class Forms(HTMLParser):
    """The POST forms of a page (action, whether a csrfmiddlewaretoken input is inside), the
    inline scripts and the inline event handlers."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[dict[str, Any]] = []
        self.inline_scripts = 0
        self.handlers: list[str] = []
        self._open: dict[str, Any] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.handlers += [name for name, _ in attrs if name.startswith("on")]
        if tag == "script" and not a.get("src") and a.get("type") != "application/json":
            self.inline_scripts += 1
        if tag == "form" and (a.get("method") or "get").lower() == "post":
            self._open = {"action": a.get("action"), "csrf": False}
            self.forms.append(self._open)
        if tag == "input" and self._open is not None and a.get("name") == "csrfmiddlewaretoken":
            self._open["csrf"] = bool(a.get("value"))

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._open = None


def parse(html: str) -> Forms:
    forms = Forms()
    forms.feed(html)
    return forms


def all_pages(world: World, plans: dict[str, TrainingPlan]) -> list[str]:
    pages = [urls(world, template) for _, template, _ in PAGES]
    pages += [f"/plans/{plan.pk}/" for plan in plans.values()]
    running = Run.objects.filter(status=Run.Status.RUNNING).first()
    if running is not None:
        pages.append(f"/runs/{running.pk}/")
    return pages + EXTRA_PAGES


def test_every_page_has_the_security_headers_and_no_inline_script(world: World) -> None:
    plans = more_plans(world)
    checked = 0
    for role in ROLES:
        client = client_for(world.user(role))
        for url in all_pages(world, plans):
            response = client.get(url)
            for name, value in HEADERS.items():
                assert response.headers.get(name) == value, (url, name)
            csp = response.headers["Content-Security-Policy"]
            assert "frame-ancestors 'none'" in csp and "object-src 'none'" in csp, url
            script_src = re.search(r"script-src ([^;]+)", csp)
            assert script_src is not None and "unsafe" not in script_src.group(1), url
            assert "http" not in csp  # no CDN allowed anywhere
            assert "camera=()" in response.headers["Permissions-Policy"], url
            if "html" in response.headers.get("Content-Type", ""):
                page = parse(response.content.decode())
                assert page.inline_scripts == 0 and page.handlers == [], url
            checked += 1
    assert checked == len(ROLES) * len(all_pages(world, plans))
    anonymous = Client().get("/login/")
    assert "Content-Security-Policy" in anonymous.headers and "X-Frame-Options" in anonymous


def test_hsts_is_sent_over_https_in_production(settings: Any, client: Client) -> None:
    settings.SECURE_HSTS_SECONDS = 31536000
    settings.SECURE_HSTS_INCLUDE_SUBDOMAINS = True
    assert "Strict-Transport-Security" not in client.get("/login/")  # not over plain HTTP
    response = client.get("/login/", secure=True)
    assert response["Strict-Transport-Security"] == "max-age=31536000; includeSubDomains"


def test_every_post_form_carries_a_csrf_token_and_is_refused_without_it(world: World) -> None:
    plans = more_plans(world)
    run = world.run
    run.status = Run.Status.RUNNING  # so the monitor shows its stop form
    run.save(update_fields=["status"])
    posted: set[str] = set()
    for role in [*ROLES, "anonymous"]:
        if role == "anonymous":
            client, strict = Client(), Client(enforce_csrf_checks=True)
        else:
            user = world.user(role)
            client, strict = client_for(user), client_for(user, enforce_csrf_checks=True)
        for url in all_pages(world, plans):
            response = client.get(url)
            if response.status_code != 200 or "html" not in response.headers["Content-Type"]:
                continue
            for form in parse(response.content.decode()).forms:
                assert form["csrf"], (role, url, form)
                action = form["action"] or url.split("?")[0]
                refused = strict.post(action, {"plan_hash": "x", "reason": "x"})
                assert refused.status_code == 403, (role, url, action)
                assert b"CSRF" in refused.content, (role, url, action)
                posted.add(re.sub(r"/\d+/", "/{id}/", action))
    expected = {re.sub(r"\{\w+\}", "{id}", template) for template in POSTS}
    expected |= {"/login/", "/logout/", "/account/tokens/"}
    assert expected <= posted, expected - posted


def test_the_session_authenticated_api_enforces_csrf(world: World) -> None:
    admin = world.user("admin")
    silo = world.gov.silos[0]
    strict = client_for(admin, enforce_csrf_checks=True)
    url = f"/api/v1/silos/{silo.pk}/rotate-token/"
    refused = strict.post(url, {}, content_type="application/json")
    assert refused.status_code == 403 and "CSRF" in refused.json()["detail"]

    strict.get(f"/consortia/{world.gov.consortium.pk}/")  # a page with a form sets the cookie
    token = strict.cookies["csrftoken"].value
    allowed = strict.post(url, {}, content_type="application/json", HTTP_X_CSRFTOKEN=token)
    assert allowed.status_code == 200, allowed.content
