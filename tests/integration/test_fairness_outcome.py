"""A run whose final model exceeds a fairness limit ends with a visible warning (run monitor, run
list, API run detail, compliance report JSON and PDF, fairness report), the fairness report
shows accuracy/AUC beside the disparity per round, the model card states the plan's mitigation,
and a mitigation this server version does not apply is refused, never run as a no-op."""

from __future__ import annotations

from pathlib import Path

import pytest
from django.test import Client

from federation import orchestrator
from federation.models import ModelVersion, PlanVersion, Run
from federation.reports import model_card, run_fairness
from federation.services.errors import Conflict
from federation.services.evaluation import evaluation_receive
from federation.services.fairness import build_report
from federation.services.runs import run_start
from tests.api_factories import fast_password_hashing  # noqa: F401
from tests.dashboard_factories import World, build_world
from tests.factories import PlanFactory, plan_spec
from tests.integration.test_api_reports import api
from tests.integration.test_dashboard_fairness import COUNTS, FAIRNESS, SCHEMA_SEX, fairness_run
from tests.integration.test_final_evaluation import (
    SENSITIVE_SCHEMA,
    evaluate_at,
    train_to_the_last_round,
)
from tests.pdf_reading import page_text, read_pdf

pytestmark = pytest.mark.django_db


def finish_with_agents(tmp_path: Path, limit: float) -> Run:
    """A run through its final evaluation, every site answering with the agent's own code."""
    run, silos, files = train_to_the_last_round(
        tmp_path,
        schema=SENSITIVE_SCHEMA,
        fairness={"sensitive_attribute": "sex", "max_demographic_parity_difference": limit},
    )
    for silo in silos:
        evaluation_receive(silo_id=silo.pk, fields=evaluate_at(run, silo, files))
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    assert run.status == Run.Status.COMPLETED
    return run


def test_a_final_model_over_the_limit_ends_the_run_with_a_warning(tmp_path: Path) -> None:
    run = finish_with_agents(tmp_path, limit=0.0)
    fairness = run_fairness(run)
    final_dpd = fairness["latest"]["attributes"]["sex"]["report"]["demographic_parity_difference"]
    assert final_dpd > 0  # random models: some disparity, above a limit of 0

    warning = fairness["final_warning"]
    assert warning["code"] == "fairness_limit_exceeded"
    assert warning["model_version"] == 2 and warning["attribute"] == "sex"
    assert warning["flags"] == [
        {
            "metric": "demographic_parity_difference",
            "label": "demographic parity difference",
            "value": final_dpd,
            "limit": 0.0,
        }
    ]
    assert "the final model v2 exceeds the plan's fairness limit for 'sex'" in warning["message"]
    # The trade-off row of the final model: its pooled accuracy/AUC beside its disparity.
    rows = fairness["trade_off"]
    assert [(r["round"], r["model_version"], r["final"]) for r in rows] == [(None, 2, True)]
    assert rows[-1]["accuracy"] == run.evaluation["metrics"]["accuracy"]
    assert rows[-1]["auc"] == run.evaluation["metrics"]["auc"]
    dpd = rows[-1]["disparities"][0]
    assert dpd == {
        "metric": "demographic_parity_difference",
        "label": "demographic parity difference",
        "value": final_dpd,
        "limit": 0.0,
        "flagged": True,
    }


def test_a_final_model_within_the_limit_has_no_warning(tmp_path: Path) -> None:
    run = finish_with_agents(tmp_path, limit=1.0)
    fairness = run_fairness(run)
    assert fairness["final_warning"] is None
    assert not any(d["flagged"] for d in fairness["trade_off"][-1]["disparities"])


def with_final_flagged(run: Run) -> Run:
    """The run's final evaluation with a final fairness report over the plan's limit (round 1's
    counts: demographic parity difference 0.40 against 0.1)."""
    report = build_report(
        run.version.spec,
        round_number=3,
        attempt=1,
        counts_by_silo=COUNTS[1],
        metrics_by_silo={"a": {"accuracy": 0.7, "auc": 0.75}},
    )
    report.update(round=None, final=True)
    run.evaluation = {
        "model_version": 2,
        "metrics": {"auc": 0.75, "auc_error_bound": 0.001, "accuracy": 0.7, "loss": 0.6, "n": 81},
        "note": "evaluated by 2 of 2 silos asked",
        "fairness": report,
        "fairness_note": None,
    }
    run.save(update_fields=["evaluation"])
    return run


@pytest.fixture
def world() -> World:
    return build_world()


def test_the_warning_shows_on_the_monitor_the_api_and_the_compliance_report(world: World) -> None:
    run = with_final_flagged(fairness_run(world))
    client = Client()
    client.force_login(world.user("scientist"))
    monitor = client.get(f"/runs/{run.pk}/").content.decode()
    assert "Completed: final model over a fairness limit" in monitor
    assert 'id="fairness-warning"' in monitor
    assert "demographic parity difference 0.4" in monitor
    live = client.get(f"/runs/{run.pk}/live.json").json()
    assert "final model over a fairness limit" in live["summary"]
    runs_page = client.get(f"/consortia/{world.gov.consortium.pk}/runs/").content.decode()
    assert "final model over a fairness limit" in runs_page
    rows = run_fairness(run)["trade_off"]  # round k's: the silos' means for model v(k-1)
    assert [(r["round"], r["model_version"], r["final"]) for r in rows] == [
        (1, 0, False),
        (2, 1, False),
        (None, 2, True),
    ]
    assert (rows[0]["accuracy"], rows[0]["auc"]) == (pytest.approx(0.72), pytest.approx(0.65))
    assert (rows[2]["accuracy"], rows[2]["auc"]) == (0.7, 0.75)
    assert [d["flagged"] for d in rows[0]["disparities"]] == [True, False]
    assert rows[0]["disparities"][0]["limit"] == 0.1
    page = client.get(f"/runs/{run.pk}/fairness/").content.decode()
    assert "Accuracy and disparity by round" in page and 'id="fairness-warning"' in page

    detail = api(world.user("scientist")).get(f"/api/v1/runs/{run.pk}/").json()
    assert detail["status"] == "completed"
    assert detail["fairness_warning"]["code"] == "fairness_limit_exceeded"
    assert detail["fairness_warning"]["flags"][0]["limit"] == 0.1

    auditor = api(world.user("auditor"))
    report = auditor.get(f"/api/v1/runs/{run.pk}/compliance/").json()
    assert report["run"]["fairness_warning"]["model_version"] == 2
    assert report["fairness"]["final_warning"] == report["run"]["fairness_warning"]
    assert report["fairness"]["mitigation"]["kind"] == "none"
    pdf = auditor.get(f"/api/v1/runs/{run.pk}/compliance/?format=pdf")
    _, text_runs = read_pdf(pdf.content)
    text = " ".join(page_text(text_runs).split())
    assert "WARNING, fairness limit exceeded" in text
    assert "completed, final model over a fairness limit" in text


def test_thresholds_within_the_limit_show_as_information_not_a_warning(world: World) -> None:
    """A postprocess run's raw model over the limit, its deployed thresholded decisions within:
    the run reads completed everywhere, and every view says the raw figure and that the
    thresholds bring it within."""
    from fedcore import fairness_mitigation
    from federation.fairness_outcome import thresholded_report

    run = with_final_flagged(fairness_run(world))
    held_out = {
        "F": {"negatives": [5, 3, 0], "positives": [1, 2, 1]},
        "M": {"negatives": [4, 3, 0], "positives": [1, 2, 2]},
    }
    rules = fairness_mitigation.threshold_rules(held_out, [0.0, 0.5, 1.0]).to_json()
    chosen = {**rules, "attribute": "sex", "rows": "training", "histograms": held_out}
    report = thresholded_report(
        chosen, held_out, run.version.spec["fairness"], model_version=2, in_sample=False
    )
    assert report["flags"] == [] and report["demographic_parity_difference"] < 0.1
    run.evaluation = {
        **run.evaluation,
        "metrics": {**run.evaluation["metrics"], "bins": 2000},  # what a model card reads
        "thresholds": chosen,
        "thresholded_fairness": report,
    }
    run.save(update_fields=["evaluation"])

    client = Client()
    client.force_login(world.user("scientist"))
    monitor = client.get(f"/runs/{run.pk}/").content.decode()
    assert "over a fairness limit" not in monitor and 'id="fairness-warning"' not in monitor
    assert 'id="fairness-info"' in monitor and "demographic parity difference 0.4" in monitor
    assert "bring its decisions within" in monitor
    page = client.get(f"/runs/{run.pk}/fairness/").content.decode()
    assert 'id="fairness-info"' in page and "final, thresholded (deployed)" in page
    assert 'id="fairness-warning"' not in page and "out of sample" in page

    detail = api(world.user("scientist")).get(f"/api/v1/runs/{run.pk}/").json()
    assert detail["fairness_warning"] is None
    assert detail["fairness_info"]["code"] == "fairness_limit_met_by_thresholds"
    assert detail["fairness_info"]["thresholded"][0]["value"] == pytest.approx(
        report["demographic_parity_difference"]
    )
    assert detail["final_evaluation"]["thresholded_fairness"]["in_sample"] is False
    auditor = api(world.user("auditor"))
    compliance = auditor.get(f"/api/v1/runs/{run.pk}/compliance/").json()
    assert compliance["run"]["fairness_warning"] is None
    assert compliance["fairness"]["final_info"] == compliance["run"]["fairness_info"]
    assert compliance["fairness"]["thresholded"]["n"] == 24
    final = ModelVersion.objects.get(run=run, number=2)
    card_page = client.get(f"/models/{final.pk}/card/").content.decode()
    assert 'id="fairness-thresholded"' in card_page and "out of sample" in card_page
    pdf = auditor.get(f"/api/v1/runs/{run.pk}/compliance/?format=pdf")
    _, text_runs = read_pdf(pdf.content)
    text = " ".join(page_text(text_runs).split())
    assert "WARNING" not in text and "within the fairness limits after thresholds" in text
    assert "thresholded decisions" in text
    card = model_card(final)
    assert card["fairness"]["thresholded"]["disparities"][0]["flagged"] is False


def test_a_run_without_a_final_flag_reads_completed(world: World) -> None:
    run = fairness_run(world)  # per-round flags only: they are about earlier models
    detail = api(world.user("scientist")).get(f"/api/v1/runs/{run.pk}/").json()
    assert detail["fairness_warning"] is None
    client = Client()
    client.force_login(world.user("scientist"))
    monitor = client.get(f"/runs/{run.pk}/").content.decode()
    assert "over a fairness limit" not in monitor and 'id="fairness-warning"' not in monitor


def test_the_model_card_states_the_mitigation_and_its_parameters(world: World) -> None:
    run = fairness_run(world)
    card = model_card(ModelVersion.objects.get(run=run, number=2))
    assert card["fairness"]["mitigation"] == {
        "kind": "none",
        "parameters": {},
        "applied": False,
        "note": "none: the plan reports fairness but does not mitigate bias",
    }
    # A version with a mitigation states its kind and parameters; a constraint run that has
    # measured nothing yet says so.
    spec = plan_spec(
        schema=SCHEMA_SEX,
        fairness={**FAIRNESS, "mitigation": {"kind": "constraint", "bound": 0.02}},
    )
    PlanVersion.objects.filter(pk=run.version_id).update(spec=spec)
    card = model_card(ModelVersion.objects.get(run=run, number=2))
    mitigation = card["fairness"]["mitigation"]
    assert mitigation["kind"] == "constraint"
    assert mitigation["parameters"] == {
        "constraint": "demographic_parity",
        "bound": 0.02,
        "eta": 2.0,
        "multipliers": "averaged",
    }
    assert mitigation["applied"] is True and mitigation["computed"] is None


def test_a_plan_this_servers_plan_language_refuses_cannot_start_a_run(world: World) -> None:
    """Approved elsewhere (another server version) but refused by this plan language: the run
    is refused at start with the plan language's reason, never run for the sites to refuse."""
    kind = "postprocess"
    spec = plan_spec(
        schema=SCHEMA_SEX,
        fairness={**FAIRNESS, "mitigation": {"kind": kind}},
        secure_aggregation=True,
    )
    plan = PlanFactory(consortium=world.gov.consortium, spec=spec, silos=world.gov.silos[:2])
    with pytest.raises(Conflict, match="refused by this server version's plan language: spec"):
        run_start(actor=world.gov.admin, plan=plan)
    assert not Run.objects.filter(plan=plan).exists()
