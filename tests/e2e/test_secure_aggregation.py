"""End to end: secure aggregation between the real server and real agent processes.

What the server stored is inspected from outside: blob storage (no update blob), the database
(Update rows without blob keys, masked audit events). The coordinator's memory is checked by
tests/integration/test_secagg_rounds.py, which runs it in-process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fedcore import tensors
from federation.models import AuditEvent, ModelVersion, Round, Run, Update
from federation.storage import blob_store
from tests.e2e import harness
from tests.e2e.test_federation import (
    assert_final_figures_are_the_final_models,
    federation,
    online_count,
    write_site_csv,
)
from tests.factories import start_run

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
ROOT = Path(__file__).resolve().parents[2]


def stored_blobs() -> list[str]:
    root = blob_store().root
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def assert_nothing_individual_stored(run: Run, rounds: int) -> None:
    assert stored_blobs() == [f"runs/{run.pk}/models/v{n}.safetensors" for n in range(rounds + 1)]
    updates = Update.objects.filter(round__run=run)
    assert updates.exists() and all(u.blob_key == "" for u in updates)
    accepted = AuditEvent.objects.filter(action="update.accepted", object_id=str(run.pk))
    assert accepted.count() == updates.count()
    assert all(e.data["masked"] is True and e.data["sha256"] for e in accepted)


def test_three_agents_train_two_secure_rounds(tmp_path: Path) -> None:
    plan, silos, server, agents = federation(
        tmp_path, 3, min_silos=3, secure_aggregation=True, round_retries=0
    )
    procs = [server, *agents]
    try:
        server.start()
        for a in agents:
            a.start()
        harness.wait_until(
            lambda: online_count(silos) == 3, timeout=60, what="3 agents online", procs=procs
        )
        run = start_run(plan)
        harness.wait_until(
            lambda: not Run.objects.get(pk=run.pk).active,
            timeout=60,
            what="the run to end",
            procs=procs,
        )
        run.refresh_from_db()
        assert run.status == Run.Status.COMPLETED, run.error + "\n".join(p.tail() for p in procs)
        rounds = Round.objects.filter(run=run).order_by("number")
        assert [(r.number, r.attempt, r.status) for r in rounds] == [
            (1, 1, "completed"),
            (2, 1, "completed"),
        ]
        for r in rounds:
            assert Update.objects.filter(round=r).count() == 3
        versions = ModelVersion.objects.filter(run=run).order_by("number")
        states = [tensors.decode_state_dict(blob_store().get(v.blob_key)) for v in versions]
        assert [v.number for v in versions] == [0, 1, 2]
        for before, after in zip(states, states[1:], strict=False):
            assert any(not (before[k] == after[k]).all() for k in before), "the model never moved"
        assert_nothing_individual_stored(run, rounds=2)
        for a in agents:
            log = a.log.read_text()
            assert log.count("sent the masked update") == 2
            assert "sent update" not in log  # never the weights in clear
        assert "secure aggregation with 3 silos, threshold 2" in server.log.read_text()
        assert_final_figures_are_the_final_models(
            run, [tmp_path / f"{silo.name}.csv" for silo in silos]
        )
        assert run.evaluation["fairness"] is None  # no fairness section; never counts in clear
    finally:
        harness.stop_all(procs)


def test_a_site_killed_after_sharing_its_keys_drops_out_and_the_round_completes(
    tmp_path: Path,
) -> None:
    # Four sites, threshold 3. The fourth has far more rows, so it is still training when the
    # others are done: it is killed (SIGKILL) once it has shared its keys, so the others mask
    # with it and the server must reconstruct its key from their shares.
    plan, silos, server, agents = federation(
        tmp_path, 4, min_silos=3, secure_aggregation=True, round_retries=0
    )
    big = agents[3]
    write_site_csv(tmp_path / f"{silos[3].name}.csv", seed=3, n=100_000)
    procs = [server, *agents]
    try:
        server.start()
        for a in agents:
            a.start()
        harness.wait_until(
            lambda: online_count(silos) == 4, timeout=60, what="4 agents online", procs=procs
        )
        run = start_run(plan)
        harness.wait_until(
            lambda: "round 1 attempt 1: secure-aggregation keys shared" in big.log.read_text(),
            timeout=60,
            what="the big site to share its keys",
            procs=procs,
        )
        assert big.popen is not None
        big.popen.kill()
        big.popen.wait()
        harness.wait_until(
            lambda: not Run.objects.get(pk=run.pk).active,
            timeout=60,
            what="the run to end",
            procs=procs,
        )
        run.refresh_from_db()
        assert run.status == Run.Status.COMPLETED, run.error + "\n".join(p.tail() for p in procs)
        first = Round.objects.get(run=run, number=1)
        assert first.attempt == 1 and first.selected.count() == 4
        contributors = set(Update.objects.filter(round=first).values_list("silo", flat=True))
        assert contributors == {s.pk for s in silos[:3]}, "the big site sent before it was killed"
        assert "sent the masked update" not in big.log.read_text()
        second = Round.objects.get(run=run, number=2)
        assert second.selected.count() == 3 and second.updates.count() == 3
        assert_nothing_individual_stored(run, rounds=2)
        log = server.log.read_text()
        assert "secure aggregation with 4 silos, threshold 3" in log
        assert "dropped out of secure aggregation at stage masked_input" in log
        assert "unmasked the sum of 3 silos' updates" in log
    finally:
        harness.stop_all(procs)


def test_the_demo_runs_with_secure_aggregation(tmp_path: Path) -> None:
    """The healthcare demo with secure rounds and postprocess thresholds: the rounds' updates
    only travel masked; the final evaluation's group counts and score histograms travel noised
    (fairness.dp_epsilon), so the final model gets its fairness report and its thresholds."""
    env = {**os.environ, "QUORUM_HOME": str(tmp_path)}
    env.pop("DATABASE_URL", None)
    args = ["--rounds", "2", "--sites", "3", "--max-rows", "400", "--secagg", "--json"]
    args += ["--fairness-mitigation", "postprocess", "--fairness-epsilon", "2"]
    proc = subprocess.run(
        [sys.executable, "manage.py", "demo", "--no-serve", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["secure_aggregation"] is True and len(result["round_seconds"]) == 2
    assert 0.5 <= result["federated"]["auc"] <= 1.0
    fairness = result["fairness"]
    assert fairness["decisions"] == "the final model's group thresholds (postprocess)"
    assert fairness["demographic_parity_difference"] <= fairness["limit"]
    # the final model's own report, from the sites' noised counts (none without dp_epsilon)
    assert fairness["unthresholded"]["demographic_parity_difference"] is not None
    sites = tmp_path / "demo" / "healthcare" / "sites"
    for log in sites.glob("*/agent.log"):
        assert log.read_text().count("sent the masked update") == 2
