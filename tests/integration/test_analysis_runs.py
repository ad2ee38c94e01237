"""Analysis plans end to end through the services, with the real agent code at each site (issue
16): proposed, approved by every steward and started like a training plan; each step asked with a
signed analysis_request that the agent's own check_authorization verifies; each site answered by
clientagent.analysis from its CSV under its [disclosure] policy; the released Kaplan-Meier curves
equal fedcore's pooled computation; a column not in the schema is refused at proposal; a site
refusing by policy withholds the whole result."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from django.core.exceptions import ValidationError
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from clientagent.analysis import handle_analysis_request
from clientagent.data import LocalData
from clientagent.policy import check_authorization
from clientagent.trainer import TaskError
from fedcore import protocol, tabular
from fedcore.analytics import DisclosurePolicy
from fedcore.analytics.survival import km_result, logrank_result, merge_event_times, site_km
from fedcore.analytics.tables import analysis_table
from federation import ledger, orchestrator, selectors
from federation.governance import privacy_budget_problems
from federation.models import AuditEvent, PrivacyLedgerEntry, Run, SiloAnalysis
from federation.services.analysis import analysis_receive
from federation.services.api_tokens import api_token_create
from federation.services.plans import plan_approve, plan_propose
from federation.services.runs import run_start
from federation.services.silos import agent_error
from federation.services.updates import Refused
from federation.signing import server_public_key_text
from tests.api_factories import fast_password_hashing  # noqa: F401
from tests.governance_factories import Governed, governed_consortium


def api(user) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {api_token_create(actor=user, user=user).token}")
    return client


pytestmark = pytest.mark.django_db

SCHEMA = {
    "columns": [
        {"name": "age", "type": "numeric"},
        {"name": "sex", "type": "categorical"},
        {"name": "time", "type": "numeric"},
    ],
    "target": {"column": "status", "positive": ["1"]},
    "sensitive": [],
}
KM = {
    "kind": "kaplan_meier",
    "time": "time",
    "event": "status",
    "group": "sex",
    "levels": ["1", "2"],
    "logrank": True,
}


def analysis_spec(analysis: dict, min_silos: int = 3, **top: object) -> dict:
    return {
        "kind": "analysis",
        "schema": SCHEMA,
        "analysis": analysis,
        "min_silos": min_silos,
        **top,
    }


def site_csv(tmp_path: Path, seed: int, n: int = 70) -> Path:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "age": rng.integers(40, 80, n),
            "sex": rng.choice(["1", "2"], n),
            "time": rng.integers(5, 900, n),  # ties within and across sites
            "status": rng.integers(0, 2, n),
        }
    )
    path = tmp_path / f"site{seed}.csv"
    frame.to_csv(path, index=False)
    return path


def governed_run(analysis: dict, min_silos: int = 3, **top: object) -> tuple[Governed, Run]:
    g = governed_consortium(3, schema=SCHEMA)
    for silo in g.silos:
        silo.connection_id, silo.last_heartbeat = f"conn-{silo.pk}", timezone.now()
        silo.save()
    plan = plan_propose(
        actor=g.scientists[0],
        consortium=g.consortium,
        name="survival by sex",
        description="",
        spec=analysis_spec(analysis, min_silos, **top),
        silos=g.silos,
    )
    for steward in g.stewards:
        plan_approve(actor=steward, plan=plan, plan_hash=plan.current_version.spec_hash)
    run = run_start(actor=g.scientists[0], plan=plan)
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    assert run.status == Run.Status.RUNNING
    return g, run


def answer_step(
    g: Governed, run: Run, data: list[LocalData], policies: list, answering: int = 3
) -> list:
    """The asked sites (the first ``answering``): the server's signed request, checked and
    answered by the agent code."""
    refused = []
    for silo, local, policy in list(zip(g.silos, data, policies, strict=True))[:answering]:
        fields = selectors.analysis_request_fields(run_id=run.pk, silo_id=silo.pk)
        assert fields is not None
        fields = protocol.decode_control(protocol.encode_control("analysis_request", **fields))
        check_authorization(
            fields,
            public_key=server_public_key_text(),
            silo=silo.name,
            consortium=g.consortium.name,
        )
        try:
            reply = handle_analysis_request(fields, local, policy)
        except TaskError as exc:
            agent_error(  # what the consumer does with the agent's error frame
                silo_id=silo.pk,
                code=exc.code,
                reason=exc.shared_reason,
                run_id=run.pk,
                round_number=None,
            )
            refused.append(exc)
            continue
        reply = protocol.decode_control(protocol.encode_control("analysis", **reply))
        analysis_receive(silo_id=silo.pk, fields=reply)
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    return refused


def test_kaplan_meier_and_log_rank_of_three_sites_equal_the_pooled_computation(tmp_path):
    g, run = governed_run(KM)
    paths = [site_csv(tmp_path, seed) for seed in (1, 2, 3)]
    data = [LocalData(path) for path in paths]
    policies = [DisclosurePolicy()] * 3

    assert answer_step(g, run, data, policies) == []  # step 1: event times
    assert (
        run.status == Run.Status.RUNNING
        and run.analysis["steps"][run.analysis["step"]] == "summary"
    )
    assert answer_step(g, run, data, policies) == []  # step 2: counts on the union grid

    assert run.status == Run.Status.COMPLETED, run.error
    result = run.analysis["result"]
    schema = tabular.DatasetSchema.from_dict(SCHEMA)
    pooled = pd.concat(
        [tabular.validate_frame(tabular.load_table(p), schema) for p in paths], ignore_index=True
    )
    events = pd.to_numeric(pooled["status"]) == 1
    grid = merge_event_times([np.unique(pooled.loc[events, "time"])])
    sums = site_km(pooled, "time", "status", grid, group="sex", levels=["1", "2"])
    reference = km_result(sums, grid, levels=["1", "2"])
    assert set(result["curves"]) == {"1", "2"}
    for group, curve in reference["curves"].items():
        for key in ("time", "survival", "ci_lower", "ci_upper", "at_risk", "events"):
            np.testing.assert_allclose(result["curves"][group][key], curve[key], rtol=0, atol=1e-12)
    logrank = logrank_result(sums, levels=["1", "2"])
    assert result["logrank"]["statistic"] == pytest.approx(logrank["statistic"], abs=1e-12)
    assert result["answered"] == sorted(s.name for s in g.silos) and result["missing"] == []
    assert AuditEvent.objects.filter(action="analysis.released", object_id=str(run.pk)).exists()
    assert SiloAnalysis.objects.filter(run=run, answer__isnull=False).count() == 6

    # The same result in the REST API, for whoever may read the run's reports, and no one else.
    body = api(g.auditors[1]).get(f"/api/v1/runs/{run.pk}/analysis/").json()
    assert body["status"] == "completed" and body["kind"] == "kaplan_meier"
    assert body["result"]["curves"]["2"]["survival"] == result["curves"]["2"]["survival"]
    auditor = api(g.auditors[1])
    for path in (f"runs/{run.pk}/", f"plans/{run.plan_id}/", f"runs/{run.pk}/compliance/"):
        assert auditor.get(f"/api/v1/{path}").status_code == 200, path
    outsider = governed_consortium(1).scientists[0]
    assert api(outsider).get(f"/api/v1/runs/{run.pk}/analysis/").status_code == 404
    # The dashboard: the run monitor links the result page (chart, table) and its CSV export.
    browser = Client()
    browser.force_login(g.scientists[2])
    monitor = browser.get(f"/runs/{run.pk}/")
    assert monitor.status_code == 200 and f"/runs/{run.pk}/analysis/" in monitor.text
    assert browser.get(f"/consortia/{g.consortium.pk}/runs/").status_code == 200
    page = browser.get(f"/runs/{run.pk}/analysis/")
    assert page.status_code == 200 and "Log-rank test" in page.text and "ci_lower" in page.text
    csv_rows = browser.get(f"/runs/{run.pk}/analysis.csv").content.decode().splitlines()
    assert csv_rows[0] == "group,time,survival,ci_lower,ci_upper,at_risk,events"
    assert csv_rows[1].startswith("1,0.0,1.0,1.0,1.0,")
    header, rows = analysis_table(result)
    assert header[:3] == ["group", "time", "survival"]
    assert len(rows) == sum(len(c["time"]) for c in result["curves"].values())


def test_an_analysis_plan_shows_on_the_governance_pages_of_a_silo_with_a_budget():
    g = governed_consortium(3, schema=SCHEMA)
    g.silos[0].epsilon_budget = 3.0
    g.silos[0].save()
    plan = plan_propose(
        actor=g.scientists[0],
        consortium=g.consortium,
        name="cohort",
        description="",
        spec=analysis_spec({"kind": "count", "rows": "sex", "levels": {"sex": ["1", "2"]}}),
        silos=g.silos,
    )
    browser = Client()
    browser.force_login(g.stewards[0])
    page = browser.get(f"/plans/{plan.pk}/")
    assert page.status_code == 200 and "cohort" in page.text
    assert browser.get(f"/consortia/{g.consortium.pk}/plans/").status_code == 200
    plan_approve(actor=g.stewards[0], plan=plan, plan_hash=plan.current_version.spec_hash)
    assert browser.get(f"/consortia/{g.consortium.pk}/privacy/").status_code == 200


def test_a_column_not_in_the_schema_is_refused_at_proposal_with_its_path():
    g = governed_consortium(3, schema=SCHEMA)
    with pytest.raises(ValidationError) as refused:
        plan_propose(
            actor=g.scientists[0],
            consortium=g.consortium,
            name="bad",
            description="",
            spec=analysis_spec({**KM, "time": "days"}),
            silos=g.silos,
        )
    errors = refused.value.message_dict
    assert "spec.analysis.time" in errors
    assert "'days' is not in the dataset schema" in " ".join(errors["spec.analysis.time"])


def test_a_site_refusing_by_its_disclosure_policy_withholds_everyone_s_result(tmp_path):
    g, run = governed_run(KM)
    data = [LocalData(site_csv(tmp_path, seed)) for seed in (1, 2, 3)]
    policies = [
        DisclosurePolicy(),
        DisclosurePolicy(),
        DisclosurePolicy(allowed_analyses=("count",)),
    ]

    refused = answer_step(g, run, data, policies)

    assert [exc.code for exc in refused] == ["policy_refused"]
    assert "does not run 'kaplan_meier'" in refused[0].shared_reason
    assert run.status == Run.Status.FAILED
    assert "refused the analysis" in run.error and "nothing is released" in run.error
    assert "result" not in run.analysis
    withheld = AuditEvent.objects.get(action="analysis.withheld", object_id=str(run.pk))
    assert g.silos[2].name in withheld.data["reason"]
    report = api(g.auditors[0]).get(f"/api/v1/runs/{run.pk}/compliance/").json()["analysis"]
    assert report["released"] is False and "nothing is released" in report["withheld"]
    refused_sites = [s["silo"] for s in report["sites"] if s["refused"]]
    assert refused_sites == [g.silos[2].name]


def past_deadline(run: Run) -> None:
    """The step's deadline passes (set in the stored state: no clock in the test)."""
    run.analysis = {**run.analysis, "deadline": "2000-01-01T00:00:00+00:00"}
    run.save(update_fields=["analysis"])


@pytest.mark.parametrize(("min_silos", "released"), [(2, True), (3, False)])
def test_at_the_deadline_the_answers_in_are_released_only_if_enough_sites_answered(
    tmp_path, min_silos, released
):
    analysis = {"kind": "moments", "columns": ["age", "time"]}
    g, run = governed_run(analysis, min_silos=min_silos)
    data = [LocalData(site_csv(tmp_path, seed)) for seed in (1, 2, 3)]
    policy = DisclosurePolicy(min_sites=2)
    # Only the first two sites answer; the third stays silent.
    answer_step(g, run, data, [policy] * 3, answering=2)
    assert run.status == Run.Status.RUNNING  # waits for the third until the deadline
    past_deadline(run)
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    if released:
        assert run.status == Run.Status.COMPLETED
        result = run.analysis["result"]
        assert result["missing"] == [g.silos[2].name] and result["sites"] == 2
    else:
        assert run.status == Run.Status.FAILED and "result" not in run.analysis
        assert "2 of 3 sites answered" in run.error and "needs 3" in run.error


def test_a_small_count_is_suppressed_with_a_complement_in_the_api_page_and_csv(tmp_path):
    g, run = governed_run({"kind": "count", "rows": "sex", "levels": {"sex": ["1", "2", "3"]}})
    paths = [site_csv(tmp_path, seed) for seed in (1, 2, 3)]
    frame = pd.read_csv(paths[0], dtype=str)
    frame.loc[:2, "sex"] = "3"  # three rows of level "3" in all: below the minimum of 5
    frame.to_csv(paths[0], index=False)

    answer_step(g, run, [LocalData(p) for p in paths], [DisclosurePolicy()] * 3)

    assert run.status == Run.Status.COMPLETED, run.error
    result = run.analysis["result"]
    assert result["row_levels"] == ["1", "2", "3"] and result["total"] == 210
    assert result["cells"][2] is None and result["suppressed"] == 2  # and one complement
    assert sum(c is None for c in result["cells"]) == 2
    browser = Client()
    browser.force_login(g.auditors[0])
    assert "suppressed" in browser.get(f"/runs/{run.pk}/analysis/").text
    csv_rows = browser.get(f"/runs/{run.pk}/analysis.csv").content.decode().splitlines()
    assert csv_rows[0] == "level,count" and csv_rows[3] == "3," and csv_rows[4] == "total,210"


def test_a_quantile_run_asks_bisection_steps_until_exact(tmp_path):
    analysis = {"kind": "quantile", "column": "time", "probs": [0.25, 0.5, 0.75]}
    g, run = governed_run(analysis)
    paths = [site_csv(tmp_path, seed) for seed in (4, 5, 6)]
    data = [LocalData(p) for p in paths]
    for _ in range(40):  # a step per bisection; far fewer are needed
        assert answer_step(g, run, data, [DisclosurePolicy()] * 3) == []
        if run.status != Run.Status.RUNNING:
            break
    assert run.status == Run.Status.COMPLETED, run.error
    result = run.analysis["result"]
    pooled = np.concatenate([pd.read_csv(p)["time"].to_numpy(dtype=float) for p in paths])
    assert result["values"] == np.quantile(pooled, [0.25, 0.5, 0.75]).tolist()
    assert run.analysis["steps"] == [f"bisect-{i}" for i in range(1, result["rounds"] + 1)]
    browser = Client()
    browser.force_login(g.scientists[0])
    assert "Exact quantiles" in browser.get(f"/runs/{run.pk}/analysis/").text


@pytest.mark.parametrize("stratified", [True, False])
def test_a_cox_run_asks_newton_steps_until_converged_and_equals_lifelines(tmp_path, stratified):
    from lifelines import CoxPHFitter

    analysis = {
        "kind": "cox",
        "time": "time",
        "event": "status",
        "covariates": ["age"],
        "stratified": stratified,
    }
    g, run = governed_run(analysis)
    paths = [site_csv(tmp_path, seed) for seed in (7, 8, 9)]
    data = [LocalData(p) for p in paths]
    for _ in range(20):  # a signed request per step; a handful are needed
        assert answer_step(g, run, data, [DisclosurePolicy()] * 3) == []
        if run.status != Run.Status.RUNNING:
            break
    assert run.status == Run.Status.COMPLETED, run.error
    result = run.analysis["result"]
    newton = [f"newton-{i}" for i in range(1, result["newton_steps"] + 1)]
    assert run.analysis["steps"] == ([] if stratified else ["event_times"]) + newton
    pooled = pd.concat(
        [pd.read_csv(p).assign(site=i) for i, p in enumerate(paths)], ignore_index=True
    )[["time", "status", "age", "site"]]
    reference = CoxPHFitter().fit(
        pooled if stratified else pooled.drop(columns="site"),
        "time",
        "status",
        strata=["site"] if stratified else None,
        fit_options={"precision": 1e-12, "r_precision": 1e-14},
    )
    assert abs(result["coef"]["age"] - reference.params_["age"]) <= 1e-6
    assert abs(result["se"]["age"] - reference.standard_errors_["age"]) <= 1e-6
    assert result["stratified_by_site"] is stratified and result["answered"] == sorted(
        s.name for s in g.silos
    )
    browser = Client()
    browser.force_login(g.scientists[0])
    page = browser.get(f"/runs/{run.pk}/analysis/")
    assert page.status_code == 200 and "Newton steps" in page.text and "hazard_ratio" in page.text
    csv_rows = browser.get(f"/runs/{run.pk}/analysis.csv").content.decode().splitlines()
    assert csv_rows[0] == "term,coef,se,statistic,p_value,ci_lower,ci_upper,hazard_ratio"
    assert csv_rows[1].startswith("age,")
    # The compliance report records the analysis: its steps, each site's answers, the release.
    report = api(g.auditors[0]).get(f"/api/v1/runs/{run.pk}/compliance/").json()["analysis"]
    assert report["kind"] == "cox" and report["released"] is True
    assert report["steps"] == run.analysis["steps"]
    assert [s["steps_answered"] for s in report["sites"]] == [run.analysis["steps"]] * 3
    browser.force_login(g.auditors[0])
    page = browser.get(f"/runs/{run.pk}/compliance/")
    assert page.status_code == 200 and "Analysis released" in page.text
    pdf = browser.get(f"/runs/{run.pk}/compliance.pdf")
    assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF")
    actions = set(AuditEvent.objects.filter(object_id=str(run.pk)).values_list("action", flat=True))
    assert {"analysis.started", "analysis.received", "analysis.released"} <= actions


@pytest.mark.parametrize("mechanism", ["laplace", "gaussian"])
def test_a_noised_count_charges_every_answering_site_s_ledger_and_says_so(tmp_path, mechanism):
    privacy = {"mechanism": mechanism, "epsilon": 0.5}
    if mechanism == "gaussian":
        privacy["delta"] = 1e-6
    count = {"kind": "count", "rows": "sex", "levels": {"sex": ["1", "2"]}}
    g, run = governed_run(count, privacy=privacy)
    data = [LocalData(site_csv(tmp_path, seed)) for seed in (1, 2, 3)]

    answer_step(g, run, data, [DisclosurePolicy()] * 3)

    assert run.status == Run.Status.COMPLETED, run.error
    result = run.analysis["result"]
    assert result["noise"]["mechanism"] == mechanism and result["noise"]["epsilon"] == 0.5
    assert result["total"] is None or result["total"] >= 0
    entries = PrivacyLedgerEntry.objects.filter(run=run).order_by("silo__name")
    assert [e.silo.name for e in entries] == sorted(s.name for s in g.silos)
    for entry in entries:
        if mechanism == "laplace":
            assert entry.mechanism == "analysis" and entry.epsilon_pure == 0.5
            assert entry.epsilon_total == pytest.approx(0.5)
        else:  # one unsampled Gaussian step, composed by the RDP accountant
            assert entry.mechanism == "analysis_gaussian" and entry.epsilon_pure is None
            assert entry.sample_rate == 1.0 and entry.steps == 1
            assert entry.noise_multiplier == pytest.approx(run_sigma(privacy))
            mechanism_ = (entry.noise_multiplier, 1.0, 1)
            # at the plan's delta (the silo has no delta budget of its own), within its epsilon
            assert entry.delta == 1e-6
            assert entry.epsilon_total == pytest.approx(ledger.composed_epsilon([mechanism_], 1e-6))
            assert 0.3 < entry.epsilon_total <= 0.5
    spent = AuditEvent.objects.filter(action="budget.spent", data__run=run.pk)
    assert spent.count() == 3
    report = api(g.auditors[0]).get(f"/api/v1/runs/{run.pk}/compliance/").json()["analysis"]
    assert report["release"]["noise"]["mechanism"] == mechanism
    browser = Client()
    browser.force_login(g.auditors[0])
    assert "Noised: every site added independent" in browser.get(f"/runs/{run.pk}/analysis/").text
    assert "noised: every site added" in browser.get(f"/runs/{run.pk}/compliance/").text


def run_sigma(privacy: dict) -> float:
    from fedcore.analytics.noise import AnalysisNoise

    return AnalysisNoise(privacy["mechanism"], privacy["epsilon"], privacy["delta"]).sigma


def test_an_answer_without_the_plan_s_noise_is_refused_and_charges_nothing(tmp_path):
    count = {"kind": "count", "rows": "sex", "levels": {"sex": ["1", "2"]}}
    g, run = governed_run(count, privacy={"mechanism": "laplace", "epsilon": 1.0})
    silo = g.silos[0]
    fields = selectors.analysis_request_fields(run_id=run.pk, silo_id=silo.pk)
    exact = {**fields, "plan": {k: v for k, v in fields["plan"].items() if k != "privacy"}}
    reply = handle_analysis_request(exact, LocalData(site_csv(tmp_path, 1)), DisclosurePolicy())
    with pytest.raises(Refused) as refused:
        analysis_receive(silo_id=silo.pk, fields=reply)
    assert refused.value.code == "invalid_update" and "does not say it did" in str(refused.value)
    assert not PrivacyLedgerEntry.objects.filter(run=run).exists()
    assert SiloAnalysis.objects.get(run=run, silo=silo).answer is None


def test_a_noised_plan_over_a_silo_s_budget_cannot_be_approved():
    g = governed_consortium(3, schema=SCHEMA)
    g.silos[0].epsilon_budget = 0.4
    g.silos[0].save()
    count = {"kind": "count", "rows": "sex", "levels": {"sex": ["1", "2"]}}
    plan = plan_propose(
        actor=g.scientists[0],
        consortium=g.consortium,
        name="cohort",
        description="",
        spec=analysis_spec(count, privacy={"mechanism": "laplace", "epsilon": 0.5}),
        silos=g.silos,
    )
    problems = privacy_budget_problems(plan.current_version)
    assert len(problems) == 1 and g.silos[0].name in problems[0]
    assert "epsilon=0.5" in problems[0]
    # and a silo that could not afford it is not asked (selection), the others are
    spec = plan.current_version.spec
    assert not ledger.can_afford_round(g.silos[0], spec)
    assert ledger.can_afford_round(g.silos[1], spec)


def test_a_site_silent_after_an_earlier_step_withholds_the_others_result(tmp_path):
    # Kaplan-Meier: every site sends its event times (the grid), then one is silent at the
    # counts step. The grid holds its event times: the others' curves alone are not released.
    g, run = governed_run(KM, min_silos=2)
    data = [LocalData(site_csv(tmp_path, seed)) for seed in (1, 2, 3)]
    policy = DisclosurePolicy(min_sites=2)
    answer_step(g, run, data, [policy] * 3)
    assert run.analysis["steps"] == ["event_times", "summary"]
    answer_step(g, run, data, [policy] * 3, answering=2)
    assert run.status == Run.Status.RUNNING
    past_deadline(run)
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED and "result" not in run.analysis
    assert g.silos[2].name in run.error and "answered the earlier steps" in run.error
    withheld = AuditEvent.objects.get(action="analysis.withheld", object_id=str(run.pk))
    assert "nothing is released" in withheld.data["reason"]


def test_a_filter_leaving_a_site_below_its_minimum_is_refused_there_and_withholds_all(tmp_path):
    # The filter is valid for the schema (accepted at proposal); at the third site it leaves 3
    # rows, which that site's agent refuses with the reason; nothing is released.
    count = {
        "kind": "count",
        "rows": "sex",
        "levels": {"sex": ["1", "2"]},
        "filters": [{"column": "age", "op": "ge", "value": 75}],
    }
    g, run = governed_run(count)
    paths = [site_csv(tmp_path, seed) for seed in (1, 2, 3)]
    frame = pd.read_csv(paths[2])
    frame["age"] = [76] * 3 + [50] * (len(frame) - 3)
    frame.to_csv(paths[2], index=False)
    refused = answer_step(g, run, [LocalData(p) for p in paths], [DisclosurePolicy()] * 3)
    assert [exc.code for exc in refused] == ["policy_refused"]
    assert "fewer than 5 rows" in str(refused[0])
    assert run.status == Run.Status.FAILED and "result" not in run.analysis
    assert g.silos[2].name in run.error and "nothing is released" in run.error


def test_noised_moments_run_through_the_server_and_charge_the_ledger(tmp_path):
    bounded = {
        **SCHEMA,
        "columns": [
            {"name": "age", "type": "numeric", "min": 40, "max": 80},
            {"name": "sex", "type": "categorical"},
            {"name": "time", "type": "numeric", "min": 0, "max": 900},
        ],
    }
    moments = {"kind": "moments", "columns": ["age"]}
    g, run = governed_run(moments, schema=bounded, privacy={"mechanism": "laplace", "epsilon": 2})
    data = [LocalData(site_csv(tmp_path, seed)) for seed in (1, 2, 3)]

    answer_step(g, run, data, [DisclosurePolicy()] * 3)

    assert run.status == Run.Status.COMPLETED, run.error
    result = run.analysis["result"]
    assert result["noise"]["clip"] == [[40.0, 80.0]] and 40 <= result["mean"][0] <= 80
    entries = PrivacyLedgerEntry.objects.filter(run=run, mechanism="analysis")
    assert sorted(e.epsilon_pure for e in entries) == [2.0, 2.0, 2.0]
