"""Our pages in a real browser, checked with axe-core, at a desktop width and a phone's (390 px).

axe-core is vendored for the tests only (tests/browser/vendor/axe.min.js, MPL-2.0) and injected
into each page after it loaded, so the server never serves it and nothing comes from a CDN. A
serious or critical finding fails the test, with the rule, its help and the elements it names.
Plotly's own SVG (inside the chart containers) is excluded: its markup is the library's, and
each chart has a labelled container and the same numbers as a table.

Also checked where a person would notice: the model registry lists a run's final model first
and marks it; a plan without DP projects "no DP" rather than ε 0; the 403 page names roles as
people say them; the main navigation fits a 390 px screen with every link on screen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from federation.models import ModelVersion
from tests.browser.conftest import Session
from tests.browser.test_dashboard_browser import PASSWORD, with_password
from tests.dashboard_factories import build_world
from tests.e2e import harness
from tests.integration.test_dashboard_fairness import fairness_run
from tests.integration.test_fairness_outcome import with_final_flagged

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

AXE = Path(__file__).resolve().parent / "vendor" / "axe.min.js"
PHONE = {"width": 390, "height": 844}
BLOCKING = ("serious", "critical")


def axe_findings(session: Session) -> list[str]:
    """Serious and critical axe-core violations of the page as it is now, one line each."""
    # Evaluated through the DevTools protocol, which our Content-Security-Policy (script-src
    # 'self') rightly does not let a page's <script> do; the page itself never loads it.
    if not session.page.evaluate("typeof window.axe !== 'undefined'"):
        session.page.evaluate(AXE.read_text() + "\n;true")
    result = session.page.evaluate(
        """async () => {
            const r = await axe.run(
                { exclude: [[".chart .main-svg"], [".chart .modebar-container"]] },
                { resultTypes: ["violations"] });
            return r.violations.map(v => ({
                id: v.id, impact: v.impact, help: v.help,
                nodes: v.nodes.slice(0, 5).map(n => n.target.join(" ")),
            }));
        }"""
    )
    return [
        f"{v['impact']}: {v['id']} ({v['help']}) at {', '.join(v['nodes'])}"
        for v in result
        if v["impact"] in BLOCKING
    ]


def pages(world: Any) -> list[tuple[str, str]]:
    model = ModelVersion.objects.filter(run=world.run).order_by("-number").first()
    c = world.gov.consortium.pk
    flagged = with_final_flagged(fairness_run(world))  # a final model over a fairness limit
    return [
        ("consortium", f"/consortia/{c}/"),
        ("plans", f"/consortia/{c}/plans/"),
        ("plan detail", f"/plans/{world.submitted.pk}/"),
        ("run monitor", f"/runs/{world.run.pk}/"),
        ("model registry", f"/consortia/{c}/models/"),
        ("model card", f"/models/{model.pk}/card/"),
        ("privacy", f"/consortia/{c}/privacy/"),
        ("compliance report", f"/runs/{world.run.pk}/compliance/"),
        ("run monitor, fairness warning", f"/runs/{flagged.pk}/"),
        ("fairness report, final model over the limit", f"/runs/{flagged.pk}/fairness/"),
    ]


@pytest.mark.parametrize(
    "viewport", [{"width": 1280, "height": 800}, PHONE], ids=["desktop", "phone"]
)
def test_our_pages_have_no_serious_axe_findings(
    chromium: Any, live_server_proc: tuple[str, int, harness.Proc], viewport: dict[str, int]
) -> None:
    base_url, _, _ = live_server_proc
    world = build_world()
    auditor = with_password(world.user("auditor"))
    steward = with_password(world.user("steward"))
    findings: dict[str, list[str]] = {}

    anonymous = Session(chromium, base_url, viewport=viewport)
    a = Session(chromium, base_url, viewport=viewport)
    s = Session(chromium, base_url, viewport=viewport)
    try:
        anonymous.goto("/login/")
        findings["login"] = axe_findings(anonymous)

        a.login(auditor.username, PASSWORD)
        for name, path in pages(world):
            response = a.goto(path)
            assert response.status == 200, (name, response.status)
            if name.startswith("run monitor"):
                a.page.wait_for_selector("#live-state[data-state=finished]")
            findings[name] = axe_findings(a)
            overflow = a.page.evaluate(
                "document.documentElement.scrollWidth - document.documentElement.clientWidth"
            )
            assert overflow <= 0, f"{name} scrolls sideways by {overflow}px at {viewport}"
        # Every link of the main navigation is on screen, none hidden off to the side.
        for link in a.page.query_selector_all("nav.mainnav a"):
            box = link.bounding_box()
            assert box is not None and box["x"] >= 0
            assert box["x"] + box["width"] <= viewport["width"], (link.inner_text(), box)
        if viewport == PHONE:
            a.screenshot("phone-navigation", docs=True)

        # A steward opening the compliance report gets the 403 page: roles named properly.
        s.login(steward.username, PASSWORD)
        response = s.goto(f"/runs/{world.run.pk}/compliance/")
        assert response.status == 403
        refusal = s.page.inner_text("#refusal")
        assert refusal == (
            "Reading a compliance report needs one of the roles: Auditor, Consortium admin."
        )
        findings["403"] = axe_findings(s)
        s.watch.console_errors[:] = [e for e in s.watch.console_errors if "403" not in e]

        assert {page: f for page, f in findings.items() if f} == {}
        for session in (anonymous, a, s):
            assert session.watch.problems() == []
    finally:
        for session in (anonymous, a, s):
            session.close()


def test_registry_plan_and_privacy_pages_say_what_people_need(
    chromium: Any, live_server_proc: tuple[str, int, harness.Proc]
) -> None:
    base_url, _, _ = live_server_proc
    world = build_world()
    scientist = with_password(world.user("scientist"))
    versions = list(
        ModelVersion.objects.filter(run=world.run)
        .order_by("-number")
        .values_list("number", flat=True)
    )
    session = Session(chromium, base_url)
    try:
        session.login(scientist.username, PASSWORD)
        session.goto(f"/consortia/{world.gov.consortium.pk}/models/")
        rows = session.page.locator(f"#run-{world.run.pk} tbody tr")
        shown = [
            int(rows.nth(i).locator("td").first.inner_text().split()[0][1:])
            for i in range(rows.count())
        ]
        assert shown == versions  # newest first
        assert rows.first.locator(".badge-final").inner_text() == "final"
        assert session.page.locator(".badge-final").count() == 1
        session.screenshot("models", docs=True)

        # The submitted plan has no DP: its projection says so instead of showing ε 0.
        session.goto(f"/plans/{world.submitted.pk}/")
        assert session.page.inner_text("#projected-epsilon") == (
            "no DP: a run of this version spends no ε"
        )
        session.goto(f"/consortia/{world.gov.consortium.pk}/privacy/")
        cells = session.page.locator("#pending tbody td:nth-child(2)").all_inner_texts()
        assert cells and set(cells) == {"no DP"}
        assert session.watch.problems() == []
    finally:
        session.close()
