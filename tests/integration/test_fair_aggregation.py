"""FairFed aggregation through the round path: each update's group counts of the global model
it received set the silos' aggregation weights (fedcore.fairness_mitigation.fairfed_step),
carried from round to round in the round's aggregation_stats."""

from __future__ import annotations

import secrets
from typing import Any

import pytest
import torch
from django.utils import timezone

from clientagent.data import LocalData
from fedcore import fairness_mitigation, tabular, tensors
from fedcore.models import build_model
from federation import orchestrator
from federation.models import ModelVersion, Round, Run, Silo
from federation.services.updates import stats_receive, update_receive
from federation.storage import blob_store
from tests.factories import ConsortiumFactory, PlanFactory, SiloFactory, plan_spec, start_run
from tests.integration.test_final_evaluation import SENSITIVE_SCHEMA, site_frame

pytestmark = pytest.mark.django_db


def cells(tp: int, fp: int, tn: int, fn: int) -> dict[str, int]:
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn}


# Silo 0's local parity gap (-0.667) is far from the global one (-0.278), silo 1's (-0.083)
# closer: FairFed moves weight to silo 1.
COUNTS = [
    {"f": cells(2, 0, 8, 2), "m": cells(8, 2, 2, 0)},
    {"f": cells(8, 4, 10, 2), "m": cells(10, 4, 8, 2)},
]


def fairfed_run(tmp_path: Any, beta: float) -> tuple[Run, list[Silo], list[dict[str, Any]]]:
    """A fair_aggregation run of 2 silos and 2 rounds whose updates carry COUNTS."""
    consortium = ConsortiumFactory()
    silos = SiloFactory.create_batch(
        2, organization__consortium=consortium, schema=SENSITIVE_SCHEMA
    )
    fairness = {
        "sensitive_attribute": "sex",
        "mitigation": {"kind": "fair_aggregation", "beta": beta},
    }
    plan = PlanFactory(
        consortium=consortium,
        spec=plan_spec(schema=SENSITIVE_SCHEMA, fairness=fairness),
        silos=silos,
    )
    for s in silos:
        Silo.objects.filter(pk=s.pk).update(connection_id=f"c{s.pk}", last_heartbeat=timezone.now())
    run = start_run(plan)
    orchestrator.run_advance(run.pk)
    schema = tabular.DatasetSchema.from_dict(SENSITIVE_SCHEMA)
    for i, silo in enumerate(silos):
        path = tmp_path / f"s{i}.csv"
        site_frame(i).to_csv(path, index=False)
        split = LocalData(path).split(run.version.spec)
        stats = tabular.local_statistics(split.train, schema)
        stats_receive(silo_id=silo.pk, run_id=run.pk, stats=stats)
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    n_features = len(tabular.feature_names(schema, run.preprocessing))
    examples = [30, 90]
    states = []
    for rnd in (1, 2):
        states = []
        for i, silo in enumerate(silos):
            state = build_model({"kind": "logistic_regression"}, n_features, seed=10 * rnd + i)
            states.append(state.state_dict())
            n = sum(sum(c.values()) for c in COUNTS[i].values())
            update_receive(
                silo_id=silo.pk,
                fields={
                    "run": run.pk,
                    "round": rnd,
                    "nonce": secrets.token_hex(16),
                    "num_examples": examples[i],
                    "metrics": {"global": {"auc": 0.7, "accuracy": 0.6, "n": n}},
                    "fairness": {"sex": COUNTS[i]},
                },
                payload=tensors.encode_state_dict(state.state_dict()),
            )
        orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    return run, silos, states


def test_fairfed_weights_replace_fedavgs_and_carry_over(tmp_path: Any) -> None:
    run, silos, states = fairfed_run(tmp_path, beta=1.0)
    examples = [30, 90]
    assert run.status == Run.Status.EVALUATING, run.error

    keyed = {str(s.pk): COUNTS[i] for i, s in enumerate(silos)}
    first = fairness_mitigation.fairfed_step(
        keyed, {str(s.pk): examples[i] / 120 for i, s in enumerate(silos)}, beta=1.0
    )
    second = fairness_mitigation.fairfed_step(keyed, first.raw, beta=1.0)
    stats1 = Round.objects.get(run=run, number=1).aggregation_stats["fairfed"]
    stats2 = Round.objects.get(run=run, number=2).aggregation_stats["fairfed"]
    assert stats1["weights"] == first.weights and stats2["weights"] == second.weights
    assert stats2["omega_bar"] == second.raw
    fedavg = [n / 120 for n in examples]
    assert first.weights[str(silos[1].pk)] > fedavg[1]  # the fairer-gapped silo gains weight
    model = tensors.decode_state_dict(
        blob_store().get(ModelVersion.objects.get(run=run, number=2).blob_key)
    )
    for name, tensor in model.items():
        expected = sum(
            second.weights[str(s.pk)] * states[i][name].double() for i, s in enumerate(silos)
        )
        assert torch.allclose(tensor.double(), expected, atol=1e-6), name


def test_a_silo_fairfed_weighs_0_is_left_out_of_the_mean(tmp_path: Any) -> None:
    # beta 5: silo 0's gap from the global parity drives its weight to 0 (fairfed_step's
    # safeguard); the round aggregates silo 1 alone instead of failing on a weight of 0.
    run, silos, states = fairfed_run(tmp_path, beta=5.0)
    assert run.status == Run.Status.EVALUATING, run.error
    stats = Round.objects.get(run=run, number=2).aggregation_stats["fairfed"]
    assert stats["weights"][str(silos[0].pk)] == 0.0
    model = tensors.decode_state_dict(
        blob_store().get(ModelVersion.objects.get(run=run, number=2).blob_key)
    )
    for name, tensor in model.items():
        assert torch.allclose(tensor.double(), states[1][name].double(), atol=1e-6), name
