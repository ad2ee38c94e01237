"""End to end: a plan naming a model kind the sites installed themselves (the example package
packages/quorum-resmlp, built and installed into a folder of its own) runs with real agents;
one naming another digest is refused by every site, with the reason, before any data is read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedcore import model_kinds
from federation.models import ModelVersion, Run, Silo, SiloRefusal
from federation.server import free_port
from federation.services.silos import silo_issue_token
from tests.e2e import harness
from tests.e2e.test_federation import online_count, run_to_the_end, write_site_csv
from tests.factories import (
    ConsortiumFactory,
    PlanFactory,
    SiloFactory,
    approve_by_stewards,
    plan_spec,
    start_run,
)
from tests.kind_packages import build_wheel, install

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@pytest.fixture(scope="module")
def resmlp(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """The example kind installed into its own folder, and its distribution digest."""
    out = tmp_path_factory.mktemp("resmlp")
    wheel = build_wheel(out)
    return install(wheel, out / "site-packages"), model_kinds.wheel_digest(wheel)


def start(tmp_path: Path, installed: Path, sha256: str, *, allowed: bool = True):
    consortium = ConsortiumFactory()
    silos = SiloFactory.create_batch(2, organization__consortium=consortium)
    model = {
        "kind": "installed",
        "name": "resmlp",
        "version": "0.1.0",
        "sha256": sha256,
        "options": {"width": 16, "blocks": 1},
    }
    plan = PlanFactory(consortium=consortium, spec=plan_spec(model=model, min_silos=2), silos=silos)
    approve_by_stewards(plan)
    port = free_port()
    url = f"ws://127.0.0.1:{port}/ws/agent/"
    path = os.pathsep.join(p for p in (str(installed), os.environ.get("PYTHONPATH")) if p)
    env = harness.process_env(PYTHONPATH=path)
    extra = '\n[models]\nallowed = ["resmlp"]\n' if allowed else ""
    procs = [harness.server(tmp_path, port, env=env)] + [
        harness.agent(
            tmp_path,
            silo.name,
            url=url,
            token=silo_issue_token(silo=silo),
            data_csv=write_site_csv(tmp_path / f"{silo.name}.csv", seed=i),
            extra=extra,
            env=env,
        )
        for i, silo in enumerate(silos)
    ]
    return plan, silos, procs


def test_a_plan_naming_a_site_installed_kind_runs_with_real_agents(
    tmp_path: Path, resmlp: tuple[Path, str]
) -> None:
    installed, digest = resmlp
    plan, silos, procs = start(tmp_path, installed, digest)
    try:
        run = run_to_the_end(plan, silos, procs)
    finally:
        harness.stop_all(procs)
    announced = {"name": "resmlp", "version": "0.1.0", "sha256": digest}
    assert all(Silo.objects.get(pk=s.pk).model_kinds == [announced] for s in silos)
    assert ModelVersion.objects.filter(run=run).count() == 3  # v0 and two rounds
    assert run.evaluation["metrics"]["n"] > 0 and run.evaluation["missing"] == []


@pytest.mark.parametrize(
    ("allowed", "why"),
    [(True, "digest"), (False, "installed model kind 'resmlp' is not allowed here")],
)
def test_a_wrong_digest_or_a_kind_not_allowed_is_refused_by_the_sites_with_the_reason(
    tmp_path: Path, resmlp: tuple[Path, str], allowed: bool, why: str
) -> None:
    installed, digest = resmlp
    wrong = digest if not allowed else ("0" if digest[0] != "0" else "1") + digest[1:]
    plan, silos, procs = start(tmp_path, installed, wrong, allowed=allowed)
    try:
        for proc in procs:
            proc.start()
        harness.wait_until(
            lambda: online_count(silos) == 2, timeout=60, what="2 agents online", procs=procs
        )
        run = start_run(plan)
        harness.wait_until(
            lambda: SiloRefusal.objects.filter(run=run).count() == 2,
            timeout=60,
            what="both sites to refuse the run",
            procs=procs,
        )
    finally:
        harness.stop_all(procs)
    for refusal in SiloRefusal.objects.filter(run=run):
        assert refusal.code == "policy_refused" and refusal.round_number is None
        assert why in refusal.reason, refusal.reason
    assert not ModelVersion.objects.filter(run=run).exists()  # no statistics, no model
    assert Run.objects.get(pk=run.pk).preprocessing in (None, {})
