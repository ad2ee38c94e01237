"""End to end: the real ASGI server and real agent processes over a real websocket."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clientagent.data import LocalData
from fedcore import metrics, tensors, training
from fedcore.models import build_model
from federation.models import ModelVersion, Round, Run, Silo, TrainingPlan, Update
from federation.server import free_port
from federation.services.silos import silo_issue_token
from federation.storage import blob_store
from tests.e2e import harness
from tests.factories import (
    ConsortiumFactory,
    PlanFactory,
    SiloFactory,
    approve_by_stewards,
    plan_spec,
    start_run,
)

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def write_site_csv(path: Path, seed: int, n: int = 150) -> Path:
    """A small site dataset: a linear rule with site-specific shift (non-IID)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(loc=0.3 * seed, size=(n, 3))
    y = (x[:, 0] - 0.7 * x[:, 1] + 0.2 * rng.normal(size=n) > 0.3 * seed).astype(int)
    frame = pd.DataFrame({"x1": x[:, 0], "x2": x[:, 1], "x3": x[:, 2], "y": y})
    frame.loc[::17, "x3"] = np.nan  # missing values the schema imputes
    frame.to_csv(path, index=False)
    return path


def federation(tmp_path: Path, n_sites: int, **spec: object):
    consortium = ConsortiumFactory()
    silos = SiloFactory.create_batch(n_sites, organization__consortium=consortium)
    plan = PlanFactory(consortium=consortium, spec=plan_spec(**spec), silos=silos)
    approve_by_stewards(plan)
    port = free_port()
    url = f"ws://127.0.0.1:{port}/ws/agent/"
    server = harness.server(tmp_path, port)
    agents = [
        harness.agent(
            tmp_path,
            silo.name,
            url=url,
            token=silo_issue_token(silo=silo),
            data_csv=write_site_csv(tmp_path / f"{silo.name}.csv", seed=i),
        )
        for i, silo in enumerate(silos)
    ]
    return plan, silos, server, agents


def assert_final_figures_are_the_final_models(run: Run, csvs: list[Path]) -> None:
    """The run's final AUC and accuracy are the last model version's on the union of the sites'
    held-out rows, recomputed here from the raw scores of the sites' files."""
    final = ModelVersion.objects.filter(run=run).order_by("-number").first()
    state = tensors.decode_state_dict(blob_store().get(final.blob_key))
    ys, ps = [], []
    for csv in csvs:
        data = LocalData(csv)
        test = data.arrays(data.split(run.version.spec), run.preprocessing).test
        model = build_model(run.version.spec["model"], int(test.X.shape[1]), seed=0)
        model.load_state_dict(state)
        ys.append(test.y)
        ps.append(training.predict_proba(model, test.X))
    y, p = np.concatenate(ys), np.concatenate(ps)
    assert run.evaluation is not None, "the run has no final evaluation"
    reported = run.evaluation["metrics"]
    assert run.evaluation["model_version"] == final.number and run.evaluation["missing"] == []
    assert reported["n"] == y.size
    # the bound may be attained: compare with float rounding allowed for
    assert abs(reported["auc"] - metrics.roc_auc(y, p)) <= reported["auc_error_bound"] + 1e-12
    assert reported["accuracy"] == float(np.mean((p >= 0.5) == (y == 1)))


def online_count(silos: list[Silo]) -> int:
    return Silo.objects.filter(pk__in=[s.pk for s in silos], connection_id__isnull=False).count()


def run_to_the_end(plan: TrainingPlan, silos: list[Silo], procs: list[harness.Proc]) -> Run:
    """Start the server and the agents (in ``procs`` order), wait until every silo is online,
    start a run of the plan and wait for its end; returns the run, checked completed."""
    for proc in procs:
        proc.start()
    harness.wait_until(
        lambda: online_count(silos) == len(silos),
        timeout=60,
        what=f"{len(silos)} agents online",
        procs=procs,
    )
    return run_plan(plan, procs)


def run_plan(plan: TrainingPlan, procs: list[harness.Proc]) -> Run:
    """Start a run of the plan on agents already online and wait for its end; returns the run,
    checked completed (``procs``: whose logs a failure shows)."""
    run = start_run(plan)
    harness.wait_until(
        lambda: not Run.objects.get(pk=run.pk).active,
        timeout=120,
        what="the run to end",
        procs=procs,
    )
    run.refresh_from_db()
    assert run.status == Run.Status.COMPLETED, run.error + "\n".join(p.tail() for p in procs)
    return run


def test_three_agents_train_two_rounds_through_the_real_server(tmp_path: Path) -> None:
    plan, silos, server, agents = federation(tmp_path, 3, min_silos=3)
    procs = [server, *agents]
    try:
        run = run_to_the_end(plan, silos, procs)
        assert run.preprocessing, "the federated statistics pass fitted no preprocessing"
        rounds = Round.objects.filter(run=run).order_by("number")
        assert [r.number for r in rounds] == [1, 2]
        assert all(r.status == Round.Status.COMPLETED for r in rounds)
        for r in rounds:
            updates = Update.objects.filter(round=r)
            assert updates.count() == 3
            assert {u.num_examples for u in updates} == {120}
        versions = ModelVersion.objects.filter(run=run).order_by("number")
        assert [v.number for v in versions] == [0, 1, 2]
        first, last = (
            tensors.decode_state_dict(blob_store().get(v.blob_key))
            for v in (versions[0], versions[2])
        )
        assert any(not (first[k] == last[k]).all() for k in first), "training changed nothing"
        assert tensors.sha256_hex(blob_store().get(versions[2].blob_key)) == versions[2].checksum
        assert_final_figures_are_the_final_models(
            run, [tmp_path / f"{silo.name}.csv" for silo in silos]
        )
    finally:
        harness.stop_all(procs)


def test_agent_reconnects_after_the_server_restarts_and_trains(tmp_path: Path) -> None:
    plan, silos, server, agents = federation(tmp_path, 1, min_silos=1)
    procs = [server, *agents]
    try:
        server.start()
        agents[0].start()
        harness.wait_until(
            lambda: online_count(silos) == 1, timeout=60, what="agent online", procs=procs
        )
        first_connection = Silo.objects.get(pk=silos[0].pk).connection_id
        server.stop()
        harness.wait_until(
            lambda: online_count(silos) == 0, timeout=30, what="server gone", procs=procs
        )
        assert agents[0].popen is not None and agents[0].popen.poll() is None, (
            "the agent must keep trying"
        )
        server.start()
        harness.wait_until(
            lambda: online_count(silos) == 1, timeout=60, what="agent reconnected", procs=procs
        )
        assert Silo.objects.get(pk=silos[0].pk).connection_id != first_connection
        run = start_run(plan)
        harness.wait_until(
            lambda: not Run.objects.get(pk=run.pk).active,
            timeout=90,
            what="the run to end",
            procs=procs,
        )
        run.refresh_from_db()
        assert run.status == Run.Status.COMPLETED, run.error
        assert "retrying in" in agents[0].log.read_text()
    finally:
        harness.stop_all(procs)


def test_a_topk_compressed_run_completes_and_the_server_stores_full_models(
    tmp_path: Path,
) -> None:
    # An MLP of about 2,400 parameters: big enough that 5 % of it beats the headers.
    plan, silos, server, agents = federation(
        tmp_path,
        2,
        min_silos=2,
        model={"kind": "mlp", "hidden": [64, 32]},
        compression={"method": "topk", "ratio": 0.05},
    )
    procs = [server, *agents]
    try:
        run = run_to_the_end(plan, silos, procs)
        signature = ModelVersion.objects.get(run=run, number=0).signature
        updates = Update.objects.filter(round__run=run)
        assert updates.count() == 4  # 2 rounds x 2 sites
        for update in updates:
            assert update.compression == "topk"
            stored = tensors.decode_state_dict(blob_store().get(update.blob_key))
            got = {n: [d, list(s)] for n, (d, s) in tensors.signature(stored).items()}
            assert got == signature  # decoded to the full model before storage
            assert update.wire_bytes < update.size_bytes / 3, (update.wire_bytes, update.size_bytes)
        # error feedback: each site kept its residual of the run on disk until the run ended
        for silo, agent in zip(silos, agents, strict=True):
            residual = (
                tmp_path / silo.name / ".quorum-agent" / "residuals" / f"run-{run.pk}.safetensors"
            )
            harness.wait_until(
                lambda agent=agent: f"run {run.pk}: its top-k residual" in agent.tail(100_000),
                timeout=30,
                what=f"{silo.name} to delete its residual",
                procs=procs,
            )
            assert not residual.exists()
    finally:
        harness.stop_all(procs)
