"""The dashboard in a real browser against a real server: governance, a live run, downloads.

Scenario: a data steward signs in and gives the approval that makes a plan approved; the data
scientist starts the run; the monitor's charts gain points live (no reload) as real agents train;
the model card's fairness and privacy sections and the silo's budget render; the model downloads
and decodes. Every page is loaded with the network cut to localhost and must log no error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from django.contrib.auth.hashers import PBKDF2PasswordHasher
from django.utils.crypto import get_random_string

from fedcore import tensors
from federation.models import ModelVersion, Run, Silo
from federation.services.plans import plan_approve
from federation.services.silos import silo_issue_token
from tests.browser.conftest import Session, without_async_unsafe
from tests.dashboard_factories import build_world, propose
from tests.e2e import harness
from tests.factories import plan_spec
from tests.governance_factories import governed_consortium

pytestmark = [pytest.mark.browser, pytest.mark.django_db(transaction=True)]

PASSWORD = "browser-test-pass-1"


def with_password(user: Any) -> Any:
    """Give a user PASSWORD, hashed so the server process can check it.

    The tests' settings hash with MD5 (fast), which the server's default hashers do not read:
    encode with PBKDF2 directly, with few iterations (the hash records them).
    """
    hashed = PBKDF2PasswordHasher().encode(PASSWORD, get_random_string(12), iterations=1000)
    type(user).objects.filter(pk=user.pk).update(password=hashed)
    return user


def write_site_csv(path: Path, seed: int, n: int = 160) -> Path:
    """A small site dataset matching tests.factories.SCHEMA (x1..x3, binary y)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(loc=0.2 * seed, size=(n, 3))
    y = (x[:, 0] - 0.7 * x[:, 1] + 0.3 * rng.normal(size=n) > 0.2 * seed).astype(int)
    pd.DataFrame({"x1": x[:, 0], "x2": x[:, 1], "x3": x[:, 2], "y": y}).to_csv(path, index=False)
    return path


def chart_points(session: Session, key: str) -> int:
    """Points Plotly currently draws in a chart (read from the live plot, not the markup)."""
    return session.page.evaluate(
        """key => {
            const el = document.getElementById('chart-' + key);
            return (el && el.data || []).reduce((n, t) => n + (t.x ? t.x.length : 0), 0);
        }""",
        key,
    )


def online(silos: list[Silo]) -> int:
    return Silo.objects.filter(pk__in=[s.pk for s in silos], connection_id__isnull=False).count()


def test_steward_approves_scientist_runs_and_the_monitor_updates_live(
    chromium: Any, live_server_proc: tuple[str, int, harness.Proc], tmp_path: Path
) -> None:
    base_url, port, server = live_server_proc
    gov = governed_consortium(2, name="Regional hospitals")
    steward, scientist, auditor = (
        with_password(gov.stewards[1]),
        with_password(gov.scientists[0]),
        with_password(gov.auditors[0]),
    )
    plan = propose(
        gov,
        name="Readmission risk",
        min_silos=2,
        training={**plan_spec()["training"], "rounds": 3},
    )
    # The first organisation's steward approved already; the browser gives the last approval.
    plan_approve(actor=gov.stewards[0], plan=plan, plan_hash=plan.current_version.spec_hash)
    url = f"ws://127.0.0.1:{port}/ws/agent/"
    agents = [
        without_async_unsafe(
            harness.agent(
                tmp_path,
                silo.name,
                url=url,
                token=silo_issue_token(silo=silo),
                data_csv=write_site_csv(tmp_path / f"{silo.name}.csv", seed=i),
            )
        )
        for i, silo in enumerate(gov.silos)
    ]
    procs = [server, *agents]
    sessions: list[Session] = []
    try:
        agents[0].start()
        harness.wait_until(
            lambda: online(gov.silos) == 1, timeout=60, what="the first agent", procs=procs
        )

        # The steward signs in and gives the approval that completes the rules.
        s = Session(chromium, base_url)
        sessions.append(s)
        s.goto("/")
        assert "/login/" in s.page.url
        s.screenshot("login", docs=True)
        s.login(steward.username, PASSWORD)
        s.screenshot("overview", docs=True)
        assert "Readmission risk" in s.page.inner_text("main")  # waits for this steward
        s.goto(f"/plans/{plan.pk}/")
        s.screenshot("plan-approval", docs=True)
        with s.page.expect_navigation():
            s.page.click("#approve-form button[type=submit]")
        assert "It is now approved and can run." in s.page.inner_text(".messages")
        plan.refresh_from_db()
        assert plan.status == "approved"

        # The data scientist starts the run and watches it.
        d = Session(chromium, base_url)
        sessions.append(d)
        d.login(scientist.username, PASSWORD)
        d.goto(f"/plans/{plan.pk}/")
        with d.page.expect_navigation():
            d.page.click("#start-run")
        run = Run.objects.get(plan=plan)
        assert d.page.url.endswith(f"/runs/{run.pk}/")
        d.page.wait_for_selector("#live-state[data-state=connected]")
        d.page.evaluate("window.__sameDocument = true")
        before = chart_points(d, "auc")

        # The second site's agent comes online: the run can start; rounds complete.
        agents[1].start()
        d.page.wait_for_function(
            "n => { const el = document.getElementById('chart-auc');"
            " return el && el.data && el.data.reduce((k, t) => k + t.x.length, 0) > n; }",
            arg=before,
            timeout=90_000,
        )
        assert d.page.evaluate("window.__sameDocument") is True  # updated in place, no reload
        d.page.wait_for_selector("#monitor[data-active=false]", timeout=90_000)
        run.refresh_from_db()
        assert run.status == Run.Status.COMPLETED, run.error + "\n".join(p.tail() for p in procs)
        assert d.page.evaluate("window.__sameDocument") is True
        assert chart_points(d, "participation") == 6  # 3 rounds x (answered, dropped out)
        assert d.page.get_attribute("#monitor", "data-rounds") == "3"
        d.page.wait_for_load_state("networkidle")
        d.screenshot("run-monitor", docs=True, docs_from="main .page-head")

        # Models: the registry, the card with its privacy and fairness sections, the download.
        d.goto(f"/consortia/{gov.consortium.pk}/models/")
        d.screenshot("models", docs=True)
        final = ModelVersion.objects.filter(run=run).order_by("-number").first()
        d.goto(f"/models/{final.pk}/card/")
        assert "no fairness section" in d.page.inner_text("#fairness")
        assert "ε spent" in d.page.inner_text("#privacy")
        d.screenshot("model-card", docs=True)
        with d.page.expect_download() as info:
            d.page.click("#download-model")
        download = info.value
        assert download.suggested_filename.endswith(f"-run{run.pk}-v{final.number}.safetensors")
        data = Path(download.path()).read_bytes()
        state = tensors.decode_state_dict(data)
        assert sorted(state) == sorted(final.signature)
        assert tensors.sha256_hex(data) == final.checksum

        d.goto(f"/silos/{gov.silos[0].pk}/")
        assert "No budget set" in d.page.inner_text("#privacy-budget")
        d.screenshot("silo", docs=True)

        # The auditor reads the log and the run's compliance report.
        a = Session(chromium, base_url)
        sessions.append(a)
        a.login(auditor.username, PASSWORD)
        a.goto(f"/consortia/{gov.consortium.pk}/audit/")
        assert "Chain intact." in a.page.inner_text("#verification")
        a.screenshot("audit-log", docs=True)
        a.goto(f"/runs/{run.pk}/compliance/")
        assert run.plan_hash in a.page.inner_text("main")
        a.screenshot("compliance-report", docs=True)

        for session in sessions:
            assert session.watch.problems() == []
    finally:
        for session in sessions:
            session.close()
        harness.stop_all(procs)


AUDIT_READERS = {"admin", "auditor"}
# (name, path, roles that may open it; None: every member). Forbidden pages are not opened: a
# 403 would (rightly) log a console error.
PAGES: list[tuple[str, str, set[str] | None]] = [
    ("overview", "/consortia/{c}/", None),
    ("plans", "/consortia/{c}/plans/", None),
    ("plan", "/plans/{plan}/", None),
    ("propose", "/consortia/{c}/plans/new/", {"scientist"}),
    ("runs", "/consortia/{c}/runs/", None),
    ("monitor", "/runs/{run}/", None),
    ("models", "/consortia/{c}/models/", None),
    ("model-card", "/models/{model}/card/", None),
    ("silo", "/silos/{silo}/", None),
    ("audit", "/consortia/{c}/audit/", AUDIT_READERS),
    ("compliance", "/runs/{run}/compliance/", AUDIT_READERS),
]


@pytest.mark.parametrize(
    ("role", "viewport"),
    [
        ("admin", {"width": 1280, "height": 800}),
        ("scientist", {"width": 1280, "height": 800}),
        ("steward", {"width": 768, "height": 1024}),  # a tablet, portrait
    ],
)
def test_every_page_loads_offline_without_errors_and_fits_the_screen(
    chromium: Any,
    live_server_proc: tuple[str, int, harness.Proc],
    role: str,
    viewport: dict[str, int],
) -> None:
    base_url, _, _ = live_server_proc
    world = build_world()
    user = with_password(world.user(role))
    model = ModelVersion.objects.filter(run=world.run).order_by("-number").first()
    ids = {
        "c": world.gov.consortium.pk,
        "plan": world.submitted.pk,
        "run": world.run.pk,
        "model": model.pk,
        "silo": world.gov.silos[0].pk,
    }
    session = Session(chromium, base_url, viewport=viewport)
    try:
        session.login(user.username, PASSWORD)
        for name, template, roles in PAGES:
            if roles is not None and role not in roles:
                continue
            response = session.goto(template.format(**ids))
            assert response.status == 200, (name, response.status)
            overflow = session.page.evaluate(
                "document.documentElement.scrollWidth - document.documentElement.clientWidth"
            )
            assert overflow <= 0, f"{name} scrolls sideways by {overflow}px at {viewport}"
            if name == "monitor":
                session.page.wait_for_function(
                    "document.querySelectorAll('.chart .main-svg').length >= 5"
                )
            session.screenshot(f"{role}-{viewport['width']}-{name}")
        assert session.watch.problems() == []
    finally:
        session.close()
