"""The ``constraint`` mitigation (federated reductions) through a whole run: the agent's own
code sends its training rows' (group, label) counts with the statistics, trains every round on
the example weights the server's multipliers imply (carried by the task under its signed grant,
on the reweighing path), and reports the group counts of the model it received; the server steps
the multipliers from those counts after each round. On the skewed fixture the final model's
demographic parity difference drops against the same run without mitigation."""

from __future__ import annotations

from pathlib import Path

import pytest

from clientagent.data import LocalData
from clientagent.trainer import handle_stats_request
from fedcore import fairness_mitigation
from federation import orchestrator, selectors
from federation.models import AuditEvent, ModelVersion, Round, Run
from federation.reports import model_card
from federation.services.mitigation import reduction_round
from federation.services.updates import stats_receive
from tests.factories import ConsortiumFactory, PlanFactory, SiloFactory, plan_spec, start_run
from tests.integration.test_reweighing import (
    SKEWED_SCHEMA,
    final_dpd,
    online,
    run_with,
    skewed_site,
)

pytestmark = pytest.mark.django_db

ROUNDS = 6
MITIGATION = {"constraint": "demographic_parity", "bound": 0.02}  # eta: its default, 2.0


def test_constraint_steps_the_multipliers_each_round_and_lowers_the_disparity(
    tmp_path: Path,
) -> None:
    plain = run_with(tmp_path, "none", rounds=ROUNDS)
    mitigated = run_with(tmp_path, "constraint", MITIGATION, rounds=ROUNDS)

    state = mitigated.mitigation
    assert state["kind"] == "constraint" and state["rounds"] == ROUNDS
    assert sum(sum(c.values()) for c in state["counts"].values()) == sum(
        s.stats["n_rows"] for s in mitigated.silo_statistics.all()
    )
    # Replay the server's updates from what the rounds stored: the same multipliers and weights.
    replay = {**state, "theta": {}, "lambdas": {}, "lambda_sum": {}, "rounds": 0}
    for number in range(1, ROUNDS + 1):
        round_ = Round.objects.get(run=mitigated, number=number, status=Round.Status.COMPLETED)
        sent = [u.fairness for u in round_.updates.order_by("silo_id")]
        replay = reduction_round(replay, "sex", sent)
        assert round_.aggregation_stats["reduction"]["theta"] == pytest.approx(replay["theta"])
    assert replay["example_weights"] == state["example_weights"]
    weights = fairness_mitigation.ExampleWeights.from_json(state["example_weights"])
    # the model favoured men: women's positives now weigh more than men's
    assert weights.cells["f"][1][1] > weights.cells["m"][1][1]
    assert (
        AuditEvent.objects.filter(action="mitigation.updated", object_id=str(mitigated.pk)).count()
        == ROUNDS
    )

    card = model_card(ModelVersion.objects.get(run=mitigated, number=ROUNDS))
    shown = card["fairness"]["mitigation"]
    assert shown["kind"] == "constraint" and shown["applied"] is True
    assert shown["parameters"]["bound"] == 0.02 and shown["parameters"]["eta"] == 2.0
    assert "after 6 multiplier update(s)" in shown["note"]
    before, after = final_dpd(plain), final_dpd(mitigated)
    print(f"final demographic parity difference: none {before:.4f}, constraint {after:.4f}")
    assert after < before - 0.05


def test_a_group_with_no_training_rows_ends_the_run_before_round_1_with_the_reason(
    tmp_path: Path,
) -> None:
    consortium = ConsortiumFactory()
    silo = SiloFactory(organization__consortium=consortium, schema=SKEWED_SCHEMA)
    fairness = {"sensitive_attribute": "sex", "mitigation": {"kind": "constraint"}}
    plan = PlanFactory(
        consortium=consortium, spec=plan_spec(schema=SKEWED_SCHEMA, fairness=fairness), silos=[silo]
    )
    online([silo])
    run = start_run(plan)
    orchestrator.run_advance(run.pk)
    path = tmp_path / "site.csv"
    skewed_site(0).to_csv(path, index=False)
    fields = selectors.stats_request_fields(run_id=run.pk, silo_id=silo.pk)
    reply = handle_stats_request(fields, LocalData(path))
    assert set(reply["label_counts"]) >= {"f", "m"}
    only_f = {"f": {"negatives": reply["stats"]["n_rows"], "positives": 0}}
    stats_receive(silo_id=silo.pk, run_id=run.pk, stats=reply["stats"], label_counts=only_f)
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    assert run.status == Run.Status.FAILED
    assert run.error.startswith("the plan's bias mitigation could not be computed: ")
    assert "'m'" in run.error
    assert not Round.objects.filter(run=run).exists()
