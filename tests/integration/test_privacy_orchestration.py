"""Privacy and robustness in the round state machine: the ledger, budgets, DP, strategies."""

from __future__ import annotations

import secrets
from typing import Any

import pytest
import torch

from fedcore import tensors
from fedcore.models import build_model
from fedcore.plan import plan_errors
from fedcore.privacy import accounting
from federation import ledger, orchestrator
from federation.models import AuditEvent, PrivacyLedgerEntry, Round, Run, Silo
from federation.services.updates import Refused, update_receive
from federation.storage import blob_store, strategy_key
from tests.factories import ConsortiumFactory, PlanFactory, SiloFactory, plan_spec, start_run
from tests.integration.test_orchestrator import current_round, online, send_stats

pytestmark = pytest.mark.django_db


def make(n: int = 3, **spec: Any) -> tuple[list[Silo], Run]:
    consortium = ConsortiumFactory()
    silos = SiloFactory.create_batch(n, organization__consortium=consortium, row_count=60)
    plan = PlanFactory(consortium=consortium, spec=plan_spec(**spec), silos=silos)
    online(silos)
    run = start_run(plan)
    orchestrator.run_advance(run.pk)
    send_stats(run, silos)
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    assert run.status == Run.Status.RUNNING
    return silos, run


def submit(
    run: Run, silo: Silo, rnd: int, state: dict[str, torch.Tensor], n: int = 48, **extra: Any
):
    return update_receive(
        silo_id=silo.pk,
        fields={
            "run": run.pk,
            "round": rnd,
            "nonce": secrets.token_hex(16),
            "num_examples": n,
            "metrics": {"train_loss": 0.3},
            **extra,
        },
        payload=tensors.encode_state_dict(state),
    )


def model(seed: int) -> dict[str, torch.Tensor]:
    return build_model({"kind": "logistic_regression"}, 3, seed=seed).state_dict()


CLIENT_DP = {
    "mode": "client",
    "noise_multiplier": 1.2,
    "target_epsilon": None,
    "clip": 0.5,
    "delta": 1e-5,
}
SAMPLE_DP = {
    "mode": "sample",
    "noise_multiplier": 1.1,
    "target_epsilon": None,
    "clip": 1.0,
    "delta": 1e-5,
}


def test_client_dp_rounds_charge_every_contributor_and_compose_in_the_ledger() -> None:
    silos, run = make(3, privacy=CLIENT_DP, min_silos=2)
    for rnd in (1, 2):
        for i, silo in enumerate(silos):
            submit(run, silo, rnd, model(10 * rnd + i))
        orchestrator.run_advance(run.pk)

    one = accounting.epsilon(noise_multiplier=1.2, sample_rate=1.0, steps=1, delta=1e-5)
    two = accounting.epsilon(noise_multiplier=1.2, sample_rate=1.0, steps=2, delta=1e-5)
    for silo in silos:
        totals = list(
            PrivacyLedgerEntry.objects.filter(silo=silo).values_list("epsilon_total", flat=True)
        )
        assert totals == pytest.approx([one, two], rel=1e-9)
        assert two < 2 * one  # composed by the accountant, not summed
    assert AuditEvent.objects.filter(action="budget.spent").count() == 6


def test_client_dp_mean_is_noised_and_unweighted() -> None:
    silos, run = make(3, privacy={**CLIENT_DP, "noise_multiplier": 1e-6}, min_silos=2)
    start = tensors.decode_state_dict(blob_store().get(run.model_versions.get(number=0).blob_key))
    # Two silos move the model, with wildly different example counts; the third is absent.
    moved = {k: v + 0.01 for k, v in start.items()}
    submit(run, silos[0], 1, moved, n=1)
    submit(run, silos[1], 1, moved, n=1000)
    Round.objects.filter(run=run).update(deadline="2000-01-01T00:00:00Z")
    orchestrator.run_advance(run.pk)
    after = tensors.decode_state_dict(blob_store().get(run.model_versions.get(number=1).blob_key))
    for name in start:
        # fixed denominator: 2 contributions / 3 selected silos, whatever the example counts
        torch.testing.assert_close(
            after[name] - start[name], torch.full_like(start[name], 0.02 / 3), atol=1e-6, rtol=0
        )


def test_sample_dp_updates_report_their_mechanism_and_land_in_the_ledger() -> None:
    silos, run = make(2, privacy=SAMPLE_DP, min_silos=2)
    expected = ledger.round_mechanism(run.version.spec, silos[0], rows=48)
    assert expected is not None
    z, q, steps = expected
    with pytest.raises(Refused, match="noise multiplier"):
        submit(
            run,
            silos[0],
            1,
            model(1),
            privacy={"noise_multiplier": z / 2, "sample_rate": q, "steps": steps, "epsilon": 0.1},
        )
    with pytest.raises(Refused, match="privacy report"):
        submit(run, silos[0], 1, model(1))
    reported = accounting.epsilon(noise_multiplier=z, sample_rate=q, steps=steps, delta=1e-5)
    submit(
        run,
        silos[0],
        1,
        model(1),
        privacy={"noise_multiplier": z, "sample_rate": q, "steps": steps, "epsilon": reported},
    )

    entry = PrivacyLedgerEntry.objects.get(silo=silos[0])
    assert (entry.mechanism, entry.noise_multiplier, entry.sample_rate, entry.steps) == (
        "sample",
        z,
        q,
        steps,
    )
    assert entry.epsilon_total == pytest.approx(reported, rel=1e-9)
    assert entry.epsilon_reported == pytest.approx(reported)


def test_a_silo_out_of_budget_stops_participating_and_the_run_goes_on() -> None:
    silos, run = make(3, privacy=CLIENT_DP, min_silos=2)
    one_round = accounting.epsilon(noise_multiplier=1.2, sample_rate=1.0, steps=1, delta=1e-5)
    Silo.objects.filter(pk=silos[2].pk).update(epsilon_budget=one_round * 1.01)
    for silo in silos:
        submit(run, silo, 1, model(silo.pk))
    orchestrator.run_advance(run.pk)

    round2 = current_round(run)
    assert round2.number == 2
    assert set(round2.selected.all()) == set(silos[:2])  # silo 2 cannot afford another round


def test_client_dp_feeds_the_plans_server_optimizer_not_fedavg() -> None:
    """FedAdam + client-level DP steps FedAdam with the DP mean (it once ran FedAvg silently)."""
    moved: dict[str, dict[str, torch.Tensor]] = {}
    for strategy in ("fedavg", "fedadam"):
        privacy = {**CLIENT_DP, "noise_multiplier": 1e-6}
        silos, run = make(3, privacy=privacy, aggregation={"strategy": strategy}, min_silos=3)
        start = tensors.decode_state_dict(
            blob_store().get(run.model_versions.get(number=0).blob_key)
        )
        for silo in silos:
            submit(run, silo, 1, {k: v + 0.01 for k, v in start.items()})
        orchestrator.run_advance(run.pk)
        after = tensors.decode_state_dict(
            blob_store().get(run.model_versions.get(number=1).blob_key)
        )
        moved[strategy] = {name: after[name] - start[name] for name in start}
        if strategy == "fedadam":  # the optimiser's moments are kept for round 2
            assert blob_store().get(strategy_key(run_id=run.pk, number=1))
        assert Round.objects.get(run=run, number=1).aggregation_stats["clip"] == 0.5

    for name, delta in moved["fedavg"].items():
        torch.testing.assert_close(delta, torch.full_like(delta, 0.01), atol=1e-5, rtol=0)
        assert not torch.allclose(moved["fedadam"][name], delta, atol=1e-5)


def test_server_optimizer_state_persists_between_rounds_and_outliers_are_flagged() -> None:
    silos, run = make(4, aggregation={"strategy": "fedadam", "server_lr": 0.05}, min_silos=3)
    start = tensors.decode_state_dict(blob_store().get(run.model_versions.get(number=0).blob_key))
    for i, silo in enumerate(silos):
        scale = 50.0 if i == 3 else 0.01 * (i + 1)  # silo 3 sends a huge update
        submit(run, silo, 1, {k: v + scale for k, v in start.items()})
    orchestrator.run_advance(run.pk)

    round1 = Round.objects.get(run=run, number=1)
    assert blob_store().get(strategy_key(run_id=run.pk, number=1))
    assert [f["client"] for f in round1.anomalies] == [silos[3].pk]
    assert round1.aggregation_stats["strategy"] == "fedadam"
    assert AuditEvent.objects.filter(action="round.anomaly").count() == 1


def test_an_update_over_the_norm_bound_is_refused_at_receipt_and_audited() -> None:
    silos, run = make(3, aggregation={"strategy": "fedavg", "norm_bound": 1.0}, min_silos=2)
    start = tensors.decode_state_dict(blob_store().get(run.model_versions.get(number=0).blob_key))

    with pytest.raises(Refused, match="over the plan's norm bound 1"):
        submit(run, silos[0], 1, {k: v + 10.0 for k, v in start.items()})
    submit(run, silos[0], 1, {k: v + 0.01 for k, v in start.items()})

    refused = AuditEvent.objects.get(action="update.refused")
    assert refused.data["code"] == "invalid_update" and "norm bound" in refused.data["reason"]
    assert current_round(run).updates.count() == 1


def test_adaptive_clipping_moves_the_clip_toward_the_quantile_at_no_extra_epsilon() -> None:
    adaptive = {
        **CLIENT_DP,
        "clip": 5.0,
        "adaptive_clip": {"learning_rate": 0.5, "count_noise_std": 0.7},
    }
    # Six silos and a small count noise: b = (3 + N(0, 0.7^2)) / 6 + 1/2 falls below the target
    # quantile 0.5 with probability ~1e-5, so the clip shrinks (the mechanism is random).
    silos, run = make(6, privacy=adaptive, min_silos=2)
    start = tensors.decode_state_dict(blob_store().get(run.model_versions.get(number=0).blob_key))
    # Every update's norm is far below the starting clip of 5: the clip must shrink.
    for silo in silos:
        submit(run, silo, 1, {k: v + 0.001 for k, v in start.items()})
    orchestrator.run_advance(run.pk)

    stats = Round.objects.get(run=run, number=1).aggregation_stats
    assert stats["clip"] == 5.0 and stats["next_clip"] < 5.0
    assert stats["update_noise_multiplier"] > stats["noise_multiplier"] == 1.2
    for silo in silos:  # accounted with the plan's z, as without adaptivity
        entry = PrivacyLedgerEntry.objects.get(silo=silo)
        assert entry.noise_multiplier == 1.2
    for silo in silos:
        submit(run, silo, 2, {k: v + 0.001 for k, v in start.items()})
    orchestrator.run_advance(run.pk)
    assert Round.objects.get(run=run, number=2).aggregation_stats["clip"] == stats["next_clip"]


def test_adaptive_clipping_is_refused_where_it_cannot_work() -> None:
    sample = plan_spec(privacy={**SAMPLE_DP, "adaptive_clip": {}})
    assert "privacy.adaptive_clip" in plan_errors(sample)
    secure = plan_spec(privacy={**CLIENT_DP, "adaptive_clip": {}}, secure_aggregation=True)
    assert "secure aggregation" in plan_errors(secure)["privacy.adaptive_clip"]
