"""Dashboard pages for every role: who gets 200, 403 or 404, and what each page shows.

Permission matrix (docs in the issue 5 reply): every member of a consortium reads its overview,
silos, plans, runs and models; proposing and editing plans needs a data scientist; the audit log
and compliance reports need an auditor or a consortium admin; anyone outside the consortium gets
404 on every page (never 403: no existence leak); anonymous visitors are sent to the login page.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from federation.models import ModelVersion, Silo
from tests.dashboard_factories import World, add_round, build_world, finished_run
from tests.governance_factories import governed_consortium

pytestmark = pytest.mark.django_db

ROLES = ["admin", "steward", "scientist", "auditor", "org_admin"]
EVERYONE = dict.fromkeys(ROLES, 200)
SCIENTISTS = {**dict.fromkeys(ROLES, 403), "scientist": 200}
AUDIT_READERS = {**dict.fromkeys(ROLES, 403), "admin": 200, "auditor": 200}

# (name, url template, expected status per role); the outsider always gets 404.
PAGES: list[tuple[str, str, dict[str, int]]] = [
    ("overview", "/consortia/{c}/", EVERYONE),
    ("plan list", "/consortia/{c}/plans/", EVERYONE),
    ("propose", "/consortia/{c}/plans/new/", SCIENTISTS),
    ("run list", "/consortia/{c}/runs/", EVERYONE),
    ("model registry", "/consortia/{c}/models/", EVERYONE),
    ("audit log", "/consortia/{c}/audit/", AUDIT_READERS),
    ("silo", "/silos/{silo}/", EVERYONE),
    ("plan", "/plans/{plan}/", EVERYONE),
    ("plan diff", "/plans/{plan}/?from=1&to=1", EVERYONE),
    ("edit plan", "/plans/{plan}/edit/", SCIENTISTS),
    ("run monitor", "/runs/{run}/", EVERYONE),
    ("run live data", "/runs/{run}/live.json", EVERYONE),
    ("compliance report", "/runs/{run}/compliance/", AUDIT_READERS),
    ("model card", "/models/{model}/card/", EVERYONE),
    ("model card JSON", "/models/{model}/card.json", EVERYONE),
    ("model download", "/models/{model}/download/", EVERYONE),
]
POSTS = [
    "/consortia/{c}/plans/new/",
    "/plans/{plan}/edit/",
    "/plans/{plan}/approve/",
    "/plans/{plan}/reject/",
    "/plans/{plan}/submit/",
    "/plans/{plan}/withdraw/",
    "/plans/{plan}/start/",
    "/runs/{run}/stop/",
]


@pytest.fixture
def world() -> World:
    return build_world()


def urls(world: World, template: str) -> str:
    model = ModelVersion.objects.filter(run=world.run).order_by("-number").first()
    return template.format(
        c=world.gov.consortium.pk,
        silo=world.gov.silos[0].pk,
        plan=world.submitted.pk,
        run=world.run.pk,
        model=model.pk,
    )


def client_for(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


@pytest.mark.parametrize("role", ROLES)
def test_every_page_answers_each_role_as_documented(world: World, role: str) -> None:
    client = client_for(world.user(role))
    got = {name: client.get(urls(world, url)).status_code for name, url, _ in PAGES}
    assert got == {name: expected[role] for name, _, expected in PAGES}


def test_a_steward_of_another_consortium_gets_404_on_every_page(world: World) -> None:
    client = client_for(world.user("outsider"))
    for name, url, _ in PAGES:
        response = client.get(urls(world, url))
        assert response.status_code == 404, name
        assert world.gov.consortium.name not in response.content.decode(), name
    for url in POSTS:
        assert client.post(urls(world, url), {"plan_hash": "x"}).status_code == 404, url


def test_anonymous_visitors_are_sent_to_the_login_page(world: World, client: Client) -> None:
    for name, url, _ in PAGES:
        response = client.get(urls(world, url))
        assert response.status_code == 302, name
        assert response["Location"].startswith("/login/?next="), name
    assert client.get("/").headers["Location"] == "/login/?next=/"


def test_login_then_home_leads_to_the_only_consortium(world: World) -> None:
    user = world.user("steward")
    user.set_password("s3cret-pass")
    user.save()
    client = Client()
    page = client.get("/login/")
    assert page.status_code == 200 and 'name="password"' in page.content.decode()
    bad = client.post("/login/", {"username": user.username, "password": "wrong"})
    assert bad.status_code == 200 and "correct username and password" in bad.content.decode()
    response = client.post("/login/", {"username": user.username, "password": "s3cret-pass"})
    assert response.headers["Location"] == "/"
    assert client.get("/").headers["Location"] == f"/consortia/{world.gov.consortium.pk}/"
    out = client.post("/logout/")
    assert out.headers["Location"] == "/login/"
    assert client.get("/").status_code == 302


def test_home_lists_several_consortia_and_says_when_there_are_none(world: World) -> None:
    user = world.user("scientist")
    other = world.other
    from tests.governance_factories import MembershipFactory

    MembershipFactory(user=user, organization=other.orgs[0], role="auditor")
    html = client_for(user).get("/").content.decode()
    assert world.gov.consortium.name in html and other.consortium.name in html

    from tests.governance_factories import UserFactory

    html = client_for(UserFactory()).get("/").content.decode()
    assert "not a member of any consortium" in html


def test_navigation_follows_the_roles(world: World) -> None:
    c = world.gov.consortium.pk
    audit_link, propose_link = f"/consortia/{c}/audit/", f"/consortia/{c}/plans/new/"
    for role, audit, propose in [
        ("admin", True, False),
        ("auditor", True, False),
        ("scientist", False, True),
        ("steward", False, False),
    ]:
        html = client_for(world.user(role)).get(f"/consortia/{c}/").content.decode()
        assert (audit_link in html) is audit, role
        assert (propose_link in html) is propose, role


def test_overview_shows_members_silos_with_agent_state_runs_and_my_pending_plans(
    world: World,
) -> None:
    silo = world.gov.silos[1]
    Silo.objects.filter(pk=silo.pk).update(
        connection_id="specific.abc", last_heartbeat=timezone.now()
    )
    url = f"/consortia/{world.gov.consortium.pk}/"
    html = client_for(world.user("steward")).get(url).content.decode()
    assert "Plans waiting for your decision" in html
    assert "Sepsis early warning" in html  # submitted, not decided by this steward
    assert f'href="/silos/{silo.pk}/"' in html
    assert html.count("online") >= 1 and "offline" in html
    for org in world.gov.orgs:
        assert org.name in html
    assert world.gov.scientists[0].username in html  # members and roles
    assert "Recently finished" in html and f"Run {world.run.pk}" in html

    # The proposer's plan never waits for the proposer; a steward who decided sees it no more.
    html = client_for(world.user("scientist")).get(url).content.decode()
    assert "your roles do not" in html
    client = client_for(world.user("steward"))
    client.post(
        f"/plans/{world.submitted.pk}/approve/",
        {"plan_hash": world.submitted.current_version.spec_hash},
    )
    assert "Nothing waits for you." in client.get(url).content.decode()


def test_empty_states_of_a_new_consortium() -> None:
    gov = governed_consortium(1)
    Silo.objects.filter(consortium=gov.consortium).delete()
    client = client_for(gov.scientists[0])
    c = gov.consortium.pk
    assert "No silo is registered yet" in client.get(f"/consortia/{c}/").content.decode()
    assert "Propose the first one" in client.get(f"/consortia/{c}/plans/").content.decode()
    assert "No run is active." in client.get(f"/consortia/{c}/runs/").content.decode()
    assert "No model yet" in client.get(f"/consortia/{c}/models/").content.decode()
    assert "No admitted silo yet" in client.get(f"/consortia/{c}/plans/new/").content.decode()


def test_silo_page_shows_schema_admission_participation_and_no_budget(world: World) -> None:
    silo = world.gov.silos[0]
    html = client_for(world.user("auditor")).get(f"/silos/{silo.pk}/").content.decode()
    for column in ("x1", "x2", "x3"):
        assert f"<code>{column}</code>" in html
    assert "Admitted" in html
    assert "No budget set" in html
    assert f'href="/runs/{world.run.pk}/"' in html
    # Two rounds selected, two updates sent, 80 examples each.
    assert '<td class="num">2</td><td class="num">2</td><td class="num">160</td>' in html


def test_plan_page_shows_versions_hash_approval_state_and_decision_forms(world: World) -> None:
    plan = world.submitted
    version = plan.current_version
    steward_html = client_for(world.user("steward")).get(f"/plans/{plan.pk}/").content.decode()
    assert version.spec_hash in steward_html
    assert 'id="approve-form"' in steward_html and 'id="reject-form"' in steward_html
    assert f'value="{version.spec_hash}"' in steward_html  # the hash the decision names
    assert "Stewards of every silo" in steward_html and "stewards missing: " in steward_html
    assert "A version is approved when nobody rejected it" in steward_html  # the rule, whole
    scientist_html = client_for(world.user("scientist")).get(f"/plans/{plan.pk}/").content.decode()
    assert 'id="approve-form"' not in scientist_html  # nobody decides on their own plan
    assert "Edit (new version)" in scientist_html and "Withdraw" in scientist_html


def test_run_monitor_has_a_chart_and_a_table_for_every_series(world: World) -> None:
    html = client_for(world.user("org_admin")).get(f"/runs/{world.run.pk}/").content.decode()
    for key in ("loss", "accuracy", "auc", "participation", "duration", "traffic"):
        assert f'id="chart-{key}"' in html and f'id="table-{key}"' in html
    assert html.count('<details class="chart-table">') == 6
    assert 'id="run-figures" type="application/json"' in html
    assert "/vendor/plotly-" in html and "cdn" not in html.lower()
    assert "Compliance report" not in html  # org admins do not read audit reports


def test_run_monitor_costs_the_same_queries_whatever_the_number_of_rounds() -> None:
    gov = governed_consortium(2)
    short, long = finished_run(gov, rounds=1), None
    client = client_for(gov.auditors[0])

    def queries(run_id: int) -> int:
        with CaptureQueriesContext(connection) as ctx:
            assert client.get(f"/runs/{run_id}/").status_code == 200
        return len(ctx.captured_queries)

    few = queries(short.pk)
    long = finished_run(gov, rounds=5)
    assert queries(long.pk) == few


def test_live_data_grows_with_each_round(world: World) -> None:
    client = client_for(world.user("steward"))
    before = client.get(f"/runs/{world.run.pk}/live.json").json()
    assert before["rounds_completed"] == 2 and before["status"] == "completed"
    assert set(before["figures"]) == {
        "loss",
        "accuracy",
        "auc",
        "participation",
        "duration",
        "traffic",
    }
    assert before["figures"]["auc"]["data"][0]["x"] == [1, 2]
    add_round(world.run, 3)
    after = client.get(f"/runs/{world.run.pk}/live.json").json()
    assert after["rounds_completed"] == 3
    assert after["points"]["auc"] > before["points"]["auc"]
    assert after["figures"]["auc"]["data"][0]["x"] == [1, 2, 3]
    assert "<table>" in after["tables"]["auc"]
    assert 'id="rounds-completed">3<' in after["summary"]


def test_participation_counts_dropouts(world: World) -> None:
    add_round(world.run, 3, answered=1)
    data = client_for(world.user("steward")).get(f"/runs/{world.run.pk}/live.json").json()
    answered, dropped = data["figures"]["participation"]["data"]
    assert answered["y"] == [3, 3, 1] and dropped["y"] == [0, 0, 2]


def test_traffic_shows_wire_bytes_next_to_stored_bytes(world: World) -> None:
    round_ = add_round(world.run, 3, answered=2)
    round_.updates.update(wire_bytes=25, compression="topk")
    data = client_for(world.user("steward")).get(f"/runs/{world.run.pk}/live.json").json()
    received, stored = data["figures"]["traffic"]["data"]
    # rounds 1 and 2: dense updates without a recorded wire size count their stored 100 bytes
    assert received["x"] == ["1", "2", "3"]
    per_round = [u * 100 / 1024 for u in (3, 3)] + [50 / 1024]
    assert received["y"] == [round(v, 1) for v in per_round]
    assert stored["y"] == [round(v, 1) for v in (300 / 1024, 300 / 1024, 200 / 1024)]
    assert (
        '<td class="num">50</td><td class="num">200</td><td class="num">0.250</td>'
        in (data["tables"]["traffic"])
    )


def test_plotly_js_comes_from_the_installed_package_with_long_caching(client: Client) -> None:
    import plotly

    response = client.get(f"/vendor/plotly-{plotly.__version__}.min.js")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/javascript")
    assert (
        "immutable" in response["Cache-Control"] and "max-age=31536000" in response["Cache-Control"]
    )
    assert b"plotly.js" in b"".join(response.streaming_content)[:500]
    assert client.get("/vendor/plotly-0.0.1.min.js").status_code == 404


def test_error_pages_explain_themselves(world: World) -> None:
    client = client_for(world.user("steward"))
    denied = client.get(f"/consortia/{world.gov.consortium.pk}/audit/")
    assert denied.status_code == 403
    # The roles that would do, as people name them (not the API's codes).
    assert (
        "Reading the audit log needs one of the roles: Auditor, Consortium admin."
        in denied.content.decode()
    )
    missing = client.get("/runs/999999/")
    assert missing.status_code == 404 and "Nothing here" in missing.content.decode()


def test_the_server_error_page_renders_without_any_context() -> None:
    """Django renders 500.html with no request and no context: it must not need either."""
    from django.template import loader

    html = loader.get_template("500.html").render()
    assert "Something went wrong on the server" in html and "Sign out" not in html


def test_dashboard_code_reads_through_selectors_only() -> None:
    """House rule: the dashboard owns no models and runs no ORM query of its own."""
    root = Path(__file__).resolve().parents[2] / "dashboard"
    offenders = []
    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr in {"objects", "_default_manager"}:
                offenders.append(f"{path.name}:{node.lineno}")
            if isinstance(node, ast.ClassDef) and any(
                isinstance(b, ast.Attribute) and b.attr == "Model" for b in node.bases
            ):
                offenders.append(f"{path.name}:{node.lineno} defines a model")
    assert offenders == []


def test_run_monitor_says_what_a_waiting_run_really_waits_for() -> None:
    # Issue 12 part 6: the page said "waiting for enough silos' agents" while listing them all
    # online. The notice now counts the silos the state machine would select.
    gov = governed_consortium(2)
    run = finished_run(gov, rounds=2, min_silos=2)
    failed = run.round_set.get(number=2)
    failed.status = "failed"
    failed.save()
    Run = type(run)
    Run.objects.filter(pk=run.pk).update(
        status=Run.Status.RUNNING, finished_at=None, waiting_since=timezone.now()
    )
    client = client_for(gov.auditors[0])
    Silo.objects.filter(pk__in=[s.pk for s in gov.silos]).update(connection_id=None)
    html = client.get(f"/runs/{run.pk}/").content.decode()
    assert "0 of the 2 needed for round 2 attempt 2 (a retry) can take part" in html
    Silo.objects.filter(pk__in=[s.pk for s in gov.silos]).update(
        connection_id="c", last_heartbeat=timezone.now()
    )
    html = client.get(f"/runs/{run.pk}/").content.decode()
    assert "2 silos can take part (2 needed): round 2 attempt 2 (a retry) opens" in html
    assert "Waiting" not in html
