"""Analysis runs under secure aggregation in one process: the real orchestrator, the server's
step coordinator (federation.secagg_analysis, reached through the consumer's services) and each
site's own code (clientagent.analysis answers and masks, clientagent.secagg_session runs the
protocol). Dropouts: a site gone after its masked input is recovered by the protocol; a site
gone before it at a later step withholds the result, as a silent site does in clear. Refusals:
a clear summary under a secure plan, a masked answer under a clear one, a secagg section."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from django.core.exceptions import ValidationError
from django.test import Client
from lifelines import KaplanMeierFitter
from lifelines.statistics import logrank_test

from clientagent.analysis import handle_analysis_request, mask_reply
from clientagent.data import LocalData
from clientagent.secagg_session import SecAggSession
from fedcore import protocol
from fedcore.analytics import DisclosurePolicy
from federation import dispatch, orchestrator, secagg_coordinator, selectors
from federation.models import AnalysisSecAgg, AuditEvent, Run, SiloAnalysis
from federation.services import secagg as secagg_services
from federation.services.analysis import analysis_receive
from federation.services.plans import plan_propose
from federation.services.updates import Refused
from tests.governance_factories import governed_consortium
from tests.integration.test_analysis_runs import (
    KM,
    SCHEMA,
    analysis_spec,
    governed_run,
    site_csv,
)

pytestmark = pytest.mark.django_db

COUNT = {"kind": "count", "rows": "sex", "levels": {"sex": ["1", "2", "3"]}}
LOGISTIC = {"kind": "logistic_regression", "outcome": "status", "covariates": ["age"]}


@pytest.fixture
def outbox(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, dict[str, Any]]]:
    """What the server pushes to the silos' connections (secagg requests among them)."""
    sent: list[tuple[int, dict[str, Any]]] = []
    monkeypatch.setattr(dispatch, "send_to_silo", lambda silo, event: sent.append((silo, event)))
    return sent


class Site:
    """One site's agent code: answers a step, masks its summary, runs the SecAgg session."""

    def __init__(self, silo: Any, path: Path) -> None:
        self.silo = silo
        self.data = LocalData(path)
        self.replies: list[dict[str, Any]] = []
        self.errors: list[dict[str, Any]] = []

        async def control(kind: str, **fields: Any) -> None:
            assert kind == "secagg"
            self.replies.append(fields)

        async def error(fields: dict[str, Any], plan_hash: str | None) -> None:
            self.errors.append(fields)

        self.session = SecAggSession(send_control=control, send_error=error, send_masked=None)

    def answer(self, run: Run) -> None:
        fields = selectors.analysis_request_fields(run_id=run.pk, silo_id=self.silo.pk)
        fields = protocol.decode_control(protocol.encode_control("analysis_request", **fields))
        reply = handle_analysis_request(fields, self.data, DisclosurePolicy())
        reply, cells = mask_reply(fields, reply)
        if fields["step"] == "event_times":  # a set, not a sum: in clear
            assert cells is None and "event_times" in reply["answer"]
        else:
            assert cells and "summary" not in reply["answer"]
        if cells is not None:
            self.session.offer_analysis(run.pk, fields["step"], cells)
        reply = protocol.decode_control(protocol.encode_control("analysis", **reply))
        analysis_receive(silo_id=self.silo.pk, fields=reply)


def pump(
    sites: list[Site],
    outbox: list,
    *,
    gone: dict[int, str] | None = None,
    silent: dict[int, str] | None = None,
) -> list[tuple[int, str]]:
    """Deliver the server's secagg requests to the sites and their replies to the server (as the
    consumer does) until none is left. ``gone``: silo id -> the stage from which that site's
    connection is closed (it never sees that stage's request); ``silent``: likewise, but the
    connection stays open and the site just never answers. Returns (silo, stage) sent."""
    by_silo = {s.silo.pk: s for s in sites}
    delivered = []
    while outbox:
        silo_id, event = outbox.pop(0)
        if event.get("type") != "secagg.message":
            continue
        site = by_silo[silo_id]
        if gone and gone.get(silo_id) == event["stage"]:
            site.session.close()
            secagg_services.secagg_session_ended(silo_id=silo_id, greeted=True, replaced=False)
            gone.pop(silo_id)
            continue
        if site.session.closed or (silent and silent.get(silo_id) == event["stage"]):
            continue
        fields = {k: v for k, v in event.items() if k != "type"}
        fields = protocol.decode_control(protocol.encode_control("secagg", **fields))
        asyncio.run(site.session.on_message(fields))
        delivered.append((silo_id, event["stage"]))
        for reply in site.replies:
            reply = protocol.decode_control(protocol.encode_control("secagg", **reply))
            secagg_services.secagg_stage_receive(silo_id=silo_id, fields=reply)
        site.replies.clear()
    return delivered


def step(run: Run, sites: list[Site], outbox: list, **gone: Any) -> None:
    """One step: every site still in answers, the server opens the step's SecAgg session, the
    protocol runs, the orchestrator merges."""
    for site in sites:
        if SiloAnalysis.objects.filter(run=run, silo=site.silo, answer__isnull=True).exists():
            site.answer(run)
    orchestrator.run_advance(run.pk)
    if run.analysis["steps"][-1] == "event_times":
        assert not AnalysisSecAgg.objects.filter(run=run).exists()
        run.refresh_from_db()
        return
    assert AnalysisSecAgg.objects.filter(run=run).exists()
    pump(sites, outbox, **gone)
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()


def test_a_site_silent_at_the_masked_input_is_out_when_the_stage_s_deadline_passes(
    tmp_path, outbox, monkeypatch
) -> None:
    g, run = governed_run(COUNT, secure_aggregation=True)
    paths = [site_csv(tmp_path, seed) for seed in (1, 2, 3)]
    sites = [Site(silo, path) for silo, path in zip(g.silos, paths, strict=True)]
    for site in sites:
        site.answer(run)
    orchestrator.run_advance(run.pk)
    pump(sites, outbox, silent={g.silos[0].pk: "masked_input"})
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    assert run.status == Run.Status.RUNNING  # the masked-input stage waits for its deadline

    class Later:  # the stage's deadline (round_deadline_seconds) has passed
        @staticmethod
        def time() -> float:
            return time.time() + 301

    monkeypatch.setattr(secagg_coordinator, "time", Later)  # the coordinator's clock
    orchestrator.run_advance(run.pk)  # the sweep closes the stage: the others unmask
    pump(sites, outbox)
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED and "result" not in run.analysis
    assert "2 site(s) are in the secure sum of step 'summary'; the plan needs 3" in run.error


def test_a_site_gone_after_its_masked_input_is_in_the_released_count(tmp_path, outbox) -> None:
    g, run = governed_run(COUNT, secure_aggregation=True)
    paths = [site_csv(tmp_path, seed) for seed in (1, 2, 3)]
    sites = [Site(silo, path) for silo, path in zip(g.silos, paths, strict=True)]
    step(run, sites, outbox, gone={g.silos[2].pk: "unmasking"})
    assert run.status == Run.Status.COMPLETED, run.error
    result = run.analysis["result"]
    pooled = pd.concat(pd.read_csv(p, dtype=str) for p in paths)
    counts = pooled["sex"].value_counts()
    assert result["total"] == 210 and result["sites"] == 3
    assert result["cells"][:2] == [int(counts["1"]), int(counts["2"])]
    assert result["answered"] == sorted(s.name for s in g.silos)
    for row in SiloAnalysis.objects.filter(run=run):
        assert set(row.answer) == {"step", "min_cell_count", "min_sites", "time_step", "masked"}
        assert set(row.answer["masked"]) == {"layout", "sha256"}
    assert not AnalysisSecAgg.objects.filter(run=run).exists()
    browser = Client()
    browser.force_login(g.auditors[0])
    assert "Secure aggregation: every site" in browser.get(f"/runs/{run.pk}/analysis/").text


def test_a_site_gone_before_its_masked_input_at_a_later_step_withholds_the_fit(
    tmp_path, outbox
) -> None:
    g, run = governed_run(LOGISTIC, secure_aggregation=True)
    paths = [site_csv(tmp_path, seed) for seed in (4, 5, 6)]
    sites = [Site(silo, path) for silo, path in zip(g.silos, paths, strict=True)]
    step(run, sites, outbox)
    assert run.status == Run.Status.RUNNING and run.analysis["steps"] == ["newton-1", "newton-2"]
    step(run, sites, outbox, gone={g.silos[1].pk: "share_keys"})
    assert run.status == Run.Status.FAILED and "result" not in run.analysis
    assert "dropped out of the secure aggregation of step 'newton-2'" in run.error
    assert g.silos[1].name in run.error
    assert AuditEvent.objects.filter(action="analysis.withheld", object_id=str(run.pk)).exists()
    assert not AnalysisSecAgg.objects.filter(run=run).exists()


def test_kaplan_meier_with_its_event_times_in_clear_and_counts_masked_equals_lifelines(
    tmp_path, outbox
) -> None:
    g, run = governed_run(KM, secure_aggregation=True)
    paths = [site_csv(tmp_path, seed) for seed in (7, 8, 9)]
    sites = [Site(silo, path) for silo, path in zip(g.silos, paths, strict=True)]
    step(run, sites, outbox)  # event times: answered in clear, merged without a session
    assert run.analysis["steps"] == ["event_times", "summary"]
    step(run, sites, outbox)
    assert run.status == Run.Status.COMPLETED, run.error
    result = run.analysis["result"]
    assert result["secure_aggregation"]["clear_steps"] == ["event_times"]
    assert result["secure_aggregation"]["masked_steps"] == ["summary"]
    pooled = pd.concat(pd.read_csv(p, dtype={"sex": str}) for p in paths)
    for level in ("1", "2"):
        rows = pooled[pooled["sex"] == level]
        fitter = KaplanMeierFitter().fit(rows["time"], rows["status"])
        curve = result["curves"][level]
        expected = fitter.survival_function_.loc[curve["time"]].iloc[:, 0].to_numpy()
        np.testing.assert_allclose(curve["survival"], expected, rtol=0, atol=1e-9)
    men, women = pooled[pooled["sex"] == "1"], pooled[pooled["sex"] == "2"]
    test = logrank_test(men["time"], women["time"], men["status"], women["status"])
    assert abs(result["logrank"]["statistic"] - test.test_statistic) <= 1e-9
    summaries = SiloAnalysis.objects.filter(run=run, step="summary")
    assert summaries.count() == 3 and all("summary" not in r.answer for r in summaries)


def test_a_clear_summary_under_a_secure_plan_is_refused_and_not_stored(tmp_path) -> None:
    g, run = governed_run(COUNT, secure_aggregation=True)
    silo = g.silos[0]
    fields = selectors.analysis_request_fields(run_id=run.pk, silo_id=silo.pk)
    reply = handle_analysis_request(fields, LocalData(site_csv(tmp_path, 1)), DisclosurePolicy())
    with pytest.raises(Refused, match="must not reach the server in clear"):
        analysis_receive(silo_id=silo.pk, fields=reply)
    assert SiloAnalysis.objects.get(run=run, silo=silo).answer is None
    refused = AuditEvent.objects.get(action="analysis.refused", object_id=str(run.pk))
    assert set(refused.data) == {"code", "reason"} and refused.data["code"] == "invalid_update"


def test_a_masked_answer_under_a_clear_plan_is_refused(tmp_path) -> None:
    g, run = governed_run(COUNT)
    silo = g.silos[0]
    fields = selectors.analysis_request_fields(run_id=run.pk, silo_id=silo.pk)
    reply = handle_analysis_request(fields, LocalData(site_csv(tmp_path, 1)), DisclosurePolicy())
    answer = {k: v for k, v in reply["answer"].items() if k != "summary"}
    answer["masked"] = {"layout": [["counts", [4], "int"]]}
    with pytest.raises(Refused, match="does not run under secure aggregation"):
        analysis_receive(silo_id=silo.pk, fields={**reply, "answer": answer})


def test_secagg_settings_in_an_analysis_plan_are_refused_at_proposal() -> None:
    g = governed_consortium(3, schema=SCHEMA)
    with pytest.raises(ValidationError) as refused:
        plan_propose(
            actor=g.scientists[0],
            consortium=g.consortium,
            name="cohort",
            description="",
            spec=analysis_spec(COUNT, secure_aggregation=True, secagg={"threshold": 2}),
            silos=g.silos,
        )
    assert "takes no settings" in str(refused.value.message_dict)


def test_the_first_step_needs_two_sites_in_the_sum(tmp_path, outbox) -> None:
    g, run = governed_run(COUNT, min_silos=1, secure_aggregation=True)
    paths = [site_csv(tmp_path, seed) for seed in (1, 2, 3)]
    sites = [Site(silo, path) for silo, path in zip(g.silos, paths, strict=True)]
    # two of three gone before their masked input: one site's sum would be its own table
    step(run, sites, outbox, gone={g.silos[0].pk: "share_keys", g.silos[1].pk: "share_keys"})
    assert run.status == Run.Status.FAILED, run.analysis
    assert "secure aggregation of step 'summary' failed" in run.error, run.error
    assert "nothing is released" in run.error
