"""Weighted mitigations (``reweighing``, ``constraint``) with ``fairness.dp_epsilon``: each site's
agent releases its training rows' (group, label) counts with discrete Laplace noise, the server
accepts noised totals (no check against the statistics' row count), computes the weights from
the noised sums, and charges each silo's ledger one table of epsilon for them, on top of the
rounds' and the final evaluation's count tables: the whole run costs exactly what approval
projected (``federation.ledger.plan_fairness_epsilon``). The agent's own code at every step."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from fedcore import fairness_mitigation
from federation import ledger
from federation.models import PrivacyLedgerEntry, Run
from tests.integration.test_reweighing import final_dpd, run_with

pytestmark = pytest.mark.django_db

EPSILON = 1.0


@pytest.mark.parametrize("kind", ["reweighing", "constraint"])
def test_noised_label_counts_train_the_mitigation_and_are_charged(
    tmp_path: Path, kind: str
) -> None:
    run = run_with(tmp_path, kind, rounds=3, dp_epsilon=EPSILON)

    assert run.status == Run.Status.COMPLETED
    assert run.mitigation["kind"] == kind and run.mitigation["example_weights"]
    for silo_stats in run.silo_statistics.all():
        charged = PrivacyLedgerEntry.objects.filter(
            run=run, silo=silo_stats.silo, mechanism=ledger.PURE
        )
        # the label counts (before round 1), 3 rounds' tables and the final evaluation's
        assert sum(e.epsilon_pure for e in charged) == pytest.approx(
            ledger.plan_fairness_epsilon(run.version.spec)
        )
        assert ledger.plan_fairness_epsilon(run.version.spec) == pytest.approx(EPSILON * (3 + 2))
        assert charged.filter(round_number__isnull=True).count() == 2  # label counts, final
    print(f"{kind} with noised counts: final demographic parity difference {final_dpd(run):.4f}")


def test_noisy_label_counts_are_noised_per_cell_and_clamped_at_zero() -> None:
    exact = {"f": {"negatives": 5, "positives": 0}, "m": {"negatives": 40, "positives": 30}}
    draws = [
        fairness_mitigation.noisy_label_counts(exact, epsilon=0.5, source=random.Random(seed))
        for seed in range(200)
    ]
    assert all(set(d) == {"f", "m"} for d in draws)
    assert all(v >= 0 for d in draws for cells in d.values() for v in cells.values())
    assert any(d != exact for d in draws)
    mean = sum(d["m"]["negatives"] for d in draws) / len(draws)
    assert abs(mean - 40) < 1.5  # unbiased away from the clamp (sd of a mean of 200: ~0.2)
    with pytest.raises(ValueError, match="epsilon"):
        fairness_mitigation.noisy_label_counts(exact, epsilon=0)
