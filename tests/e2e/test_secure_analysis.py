"""End to end: analysis plans under secure aggregation (issue 16, "sums can travel under secure
aggregation") between the real server and three real agent processes. A cross-tabulation with a
small cell gives the clear run's released table (suppression by the server on the masked sum),
a logistic regression (a Newton step per request, each summed under SecAgg) equals statsmodels
on the pooled rows, and no site's summary is stored: the answers hold the layout and the digest
of the masked vector, the coordinators' rows are gone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.api as sm

from federation.models import AnalysisSecAgg, AuditEvent, Run, SiloAnalysis
from federation.server import free_port
from federation.services.silos import silo_issue_token
from tests.e2e import harness
from tests.e2e.test_federation import online_count
from tests.factories import ConsortiumFactory, PlanFactory, SiloFactory, approve_by_stewards

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

SCHEMA = {
    "columns": [
        {"name": "age", "type": "numeric"},
        {"name": "sex", "type": "categorical"},
        {"name": "stage", "type": "categorical"},
    ],
    "target": {"column": "status", "positive": ["1"]},
    "sensitive": [],
}
CROSSTAB = {
    "kind": "crosstab",
    "rows": "sex",
    "cols": "stage",
    "levels": {"sex": ["1", "2"], "stage": ["a", "b", "c"]},
}
LOGISTIC = {"kind": "logistic_regression", "outcome": "status", "covariates": ["age"]}


def site_frame(seed: int, n: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    age = rng.integers(30, 90, n)
    status = rng.random(n) < 1 / (1 + np.exp(-0.05 * (age - 60)))
    stage = rng.choice(["a", "b"], n)
    if seed == 0:
        stage[:3] = "c"  # three rows of stage c in all: below the minimum cell count of 5
    return pd.DataFrame(
        {"age": age, "sex": rng.choice(["1", "2"], n), "stage": stage, "status": status.astype(int)}
    )


def analysis_run(consortium_silos, analysis: dict, secure: bool) -> Run:
    consortium, silos = consortium_silos
    spec = {
        "kind": "analysis",
        "schema": SCHEMA,
        "analysis": analysis,
        "min_silos": 3,
        "secure_aggregation": secure,
    }
    plan = PlanFactory(consortium=consortium, spec=spec, silos=silos)
    approve_by_stewards(plan)
    return Run.objects.create(
        plan=plan, version=plan.current_version, plan_hash=plan.current_version.spec_hash, rounds=1
    )


def finish(run: Run, procs: list[harness.Proc]) -> Run:
    harness.wait_until(
        lambda: not Run.objects.get(pk=run.pk).active,
        timeout=120,
        what=f"analysis run {run.pk} to end",
        procs=procs,
    )
    run.refresh_from_db()
    assert run.status == Run.Status.COMPLETED, run.error + "\n".join(p.tail() for p in procs)
    seconds = (run.finished_at - run.started_at).total_seconds()
    print(f"run {run.pk} ({run.plan.current_version.spec['analysis']['kind']}): {seconds:.2f} s")
    return run


def assert_no_clear_summary_stored(run: Run) -> None:
    rows = list(SiloAnalysis.objects.filter(run=run))
    assert rows and all(r.answer is not None for r in rows)
    for row in rows:
        assert "summary" not in row.answer, row.answer
        assert row.answer["masked"]["layout"] and len(row.answer["masked"]["sha256"]) == 64
    assert not AnalysisSecAgg.objects.filter(run=run).exists()
    received = AuditEvent.objects.filter(action="analysis.received", object_id=str(run.pk))
    assert received.count() == len(rows)
    assert all("summary" not in e.data for e in received)


def test_three_agents_answer_secure_analyses_equal_to_the_clear_run_and_statsmodels(
    tmp_path: Path,
) -> None:
    consortium = ConsortiumFactory()
    silos = SiloFactory.create_batch(3, organization__consortium=consortium, schema=SCHEMA)
    frames = [site_frame(i) for i in range(3)]
    port = free_port()
    url = f"ws://127.0.0.1:{port}/ws/agent/"
    server = harness.server(tmp_path, port)
    agents = []
    for silo, frame in zip(silos, frames, strict=True):
        path = tmp_path / f"{silo.name}.csv"
        frame.to_csv(path, index=False)
        agents.append(
            harness.agent(
                tmp_path, silo.name, url=url, token=silo_issue_token(silo=silo), data_csv=path
            )
        )
    procs = [server, *agents]
    try:
        for proc in procs:
            proc.start()
        harness.wait_until(
            lambda: online_count(silos) == 3, timeout=60, what="3 agents online", procs=procs
        )
        secure = finish(analysis_run((consortium, silos), CROSSTAB, secure=True), procs)
        clear = finish(analysis_run((consortium, silos), CROSSTAB, secure=False), procs)
        ours, theirs = secure.analysis["result"], clear.analysis["result"]
        assert ours["cells"] == theirs["cells"] and ours["total"] == theirs["total"] == 180
        assert ours["suppressed"] >= 2 and ours["min_cell_count"] == 5
        assert all(row[2] is None for row in ours["cells"])  # stage c withheld, with complements
        assert ours["secure_aggregation"]["masked_steps"] == ["summary"]
        assert ours["secure_aggregation"]["clear_steps"] == []
        assert "secure_aggregation" not in theirs
        assert_no_clear_summary_stored(secure)
        assert all(
            "summary" in r.answer for r in SiloAnalysis.objects.filter(run=clear)
        )  # the clear run's answers do carry theirs

        logistic = finish(analysis_run((consortium, silos), LOGISTIC, secure=True), procs)
        result = logistic.analysis["result"]
        pooled = pd.concat(frames)
        reference = sm.Logit(pooled["status"], sm.add_constant(pooled[["age"]])).fit(disp=0)
        for key, expected in (("coef", reference.params), ("se", reference.bse)):
            for name in ("const", "age"):
                assert abs(result[key][name] - expected[name]) <= 1e-8, (key, name)
        steps = logistic.analysis["steps"]
        assert len(steps) >= 3 and all(s.startswith("newton-") for s in steps)
        assert result["secure_aggregation"]["masked_steps"] == steps
        assert_no_clear_summary_stored(logistic)
    finally:
        for proc in reversed(procs):
            proc.stop()
