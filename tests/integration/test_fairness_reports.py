"""Fairness end to end on the server: counts in updates, refusals, reports, flags, DP charges."""

from __future__ import annotations

import secrets
from typing import Any

import numpy as np
import pandas as pd
import pytest
from fairlearn.metrics import demographic_parity_difference, equalized_odds_difference

from fedcore import fairness, tensors
from fedcore.models import build_model
from federation import governance, ledger, orchestrator, selectors
from federation.models import (
    AuditEvent,
    FairnessReport,
    PrivacyLedgerEntry,
    Round,
    Silo,
    Update,
)
from federation.services.updates import Refused, update_receive
from tests.factories import SCHEMA, ConsortiumFactory, SiloFactory, plan_spec, running_round

pytestmark = pytest.mark.django_db

SCHEMA_SEX = {**SCHEMA, "sensitive": ["sex"]}  # "sex" is not a feature: its groups are declared
GROUPS = ["F", "M", "__missing__", "__other__"]
FAIRNESS = {
    "sensitive_attribute": "sex",
    "groups": {"sex": ["F", "M"]},
    "max_demographic_parity_difference": 0.0,  # any disparity is flagged
    "max_equalized_odds_difference": 1.0,  # never exceeded
}


def setup_round(n: int = 2, rounds: int = 1, **fairness_section: Any) -> tuple[list[Silo], Round]:
    consortium = ConsortiumFactory()
    silos = SiloFactory.create_batch(n, organization__consortium=consortium, schema=SCHEMA_SEX)
    section = {**FAIRNESS, **fairness_section}
    round_ = running_round(
        silos,
        schema=SCHEMA_SEX,
        fairness=section,
        training={**plan_spec()["training"], "rounds": rounds},
        min_silos=n,
    )
    return silos, round_


def site_rows(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A site's held-out rows: labels, the global model's predictions and the sex column."""
    rng = np.random.default_rng(seed)
    n = int(rng.integers(30, 60))
    sex = rng.choice(["F", "M"], size=n, p=[0.3 + 0.3 * seed, 0.7 - 0.3 * seed])
    y = (rng.random(n) < np.where(sex == "F", 0.6, 0.3)).astype(int)
    y_pred = (rng.random(n) < 0.3 + 0.4 * y).astype(int)
    return y, y_pred, sex


def metrics_for(y: np.ndarray, y_pred: np.ndarray, auc: float) -> dict[str, Any]:
    accuracy = float(np.mean(y == y_pred))
    return {"global": {"n": len(y), "accuracy": accuracy, "auc": auc, "loss": 0.6}}


def submit(round_: Round, silo: Silo, *, counts: Any, metrics: dict[str, Any]) -> Round:
    state = build_model({"kind": "logistic_regression"}, 3, seed=silo.pk).state_dict()
    return update_receive(
        silo_id=silo.pk,
        fields={
            "run": round_.run_id,
            "round": round_.number,
            "nonce": secrets.token_hex(16),
            "num_examples": 48,
            "metrics": metrics,
            "fairness": counts,
        },
        payload=tensors.encode_state_dict(state),
    )


def test_the_rounds_report_is_fairlearn_on_the_pooled_held_out_rows_and_flags_are_audited():
    silos, round_ = setup_round()
    rows = [site_rows(i) for i in range(2)]
    sent = []
    for i, (silo, (y, y_pred, sex)) in enumerate(zip(silos, rows, strict=True)):
        counts = {"sex": fairness.group_counts(y, y_pred, sex, groups=GROUPS)}
        sent.append(counts)
        submit(round_, silo, counts=counts, metrics=metrics_for(y, y_pred, auc=0.7 + 0.1 * i))
    assert Update.objects.get(silo=silos[0]).fairness == sent[0]

    orchestrator.run_advance(round_.run_id)

    round_.refresh_from_db()
    assert round_.status == "completed"  # the run goes on to its final evaluation
    report = FairnessReport.objects.get(round=round_).report
    merged = fairness.merge_counts([counts["sex"] for counts in sent])
    entry = report["attributes"]["sex"]
    assert entry["counts"] == merged
    assert entry["report"] == fairness.fairness_report(merged)
    y, y_pred, sex = (np.concatenate(parts) for parts in zip(*rows, strict=True))
    pooled = pd.Series(sex)
    assert entry["report"]["demographic_parity_difference"] == pytest.approx(
        demographic_parity_difference(y, y_pred, sensitive_features=pooled), abs=1e-12
    )
    assert entry["report"]["equalized_odds_difference"] == pytest.approx(
        equalized_odds_difference(y, y_pred, sensitive_features=pooled), abs=1e-12
    )
    assert sorted(entry["report"]["by_group"]) == ["F", "M"]  # zero-count groups drop out
    names = [silo.name for silo in silos]
    assert entry["representation"] == fairness.representation(
        {name: counts["sex"] for name, counts in zip(names, sent, strict=True)}
    )
    assert report["round"] == 1 and report["model_version"] == 0
    assert report["silos"] == sorted(names)
    spread = report["performance_spread"]
    assert spread["auc"]["worst"] == {"silo": names[0], "value": pytest.approx(0.7)}
    assert spread["auc"]["best"] == {"silo": names[1], "value": pytest.approx(0.8)}

    assert [flag["metric"] for flag in report["flags"]] == ["demographic_parity_difference"]
    assert report["flags"][0]["attribute"] == "sex" and report["flags"][0]["limit"] == 0.0
    event = AuditEvent.objects.get(action="fairness.flag")
    assert event.object_id == str(round_.run_id)
    assert event.data["round"] == 1 and event.data["model_version"] == 0
    assert event.data["value"] == pytest.approx(entry["report"]["demographic_parity_difference"])


def good_counts() -> dict[str, Any]:
    return {"sex": {g: {"tp": 1, "fp": 1, "tn": 1, "fn": 1} for g in ("F", "M")}}


@pytest.mark.parametrize(
    ("counts", "message"),
    [
        ({"sex": {"F": {"tp": -1, "fp": 0, "tn": 0, "fn": 0}}}, "fairness.sex, group 'F': tp"),
        ({"sex": {"F": {"tp": 1, "fp": 0, "tn": 0}}}, "missing key(s) fn"),
        ({"sex": {"F": {"tp": 1.5, "fp": 0, "tn": 0, "fn": 0}}}, "is not an integer count"),
        ({"sex": {"X": {"tp": 1, "fp": 0, "tn": 0, "fn": 0}}}, "group(s) 'X' are not in the"),
        ({"age": {}}, "fairness.age: not a reported sensitive attribute"),
        ({"sex": []}, "counts must be a mapping"),
        (good_counts(), "the counts cover 8 records, the global model was evaluated on 9"),
    ],
)
def test_bad_counts_refuse_the_update_naming_the_problem(counts, message):
    silos, round_ = setup_round()

    with pytest.raises(Refused) as info:
        submit(round_, silos[0], counts=counts, metrics={"global": {"n": 9}})

    assert info.value.code == "invalid_update"
    assert message in info.value.reason
    assert not Update.objects.filter(round=round_).exists()
    refused = AuditEvent.objects.get(action="update.refused")
    assert refused.data["code"] == "invalid_update" and message in refused.data["reason"]


def test_counts_for_a_plan_without_a_fairness_section_are_refused():
    silo = SiloFactory()
    round_ = running_round([silo])

    with pytest.raises(Refused, match="no fairness section"):
        submit(round_, silo, counts=good_counts(), metrics={})


def test_noisy_counts_charge_each_sender_a_pure_epsilon_on_top_of_the_ledger():
    silos, round_ = setup_round(rounds=2, dp_epsilon=0.5)
    version = round_.run.version
    # 2 rounds and the final evaluation, one table each at 0.5
    assert governance.projected_epsilon(version) == {s.name: pytest.approx(1.5) for s in silos}
    # Noisy totals need not add up to the evaluated n: that check is for exact counts only.
    for silo in silos:
        submit(round_, silo, counts=good_counts(), metrics={"global": {"n": 9}})

    entries = PrivacyLedgerEntry.objects.filter(run=round_.run).order_by("silo_id")
    assert [(e.mechanism, e.epsilon_pure, e.steps) for e in entries] == [("fairness", 0.5, 1)] * 2
    assert entries[0].noise_multiplier == pytest.approx(2.0)  # discrete Laplace scale 1/epsilon
    assert entries[0].epsilon_total == pytest.approx(0.5)
    assert ledger.silo_spent_epsilon(silos[0]) == pytest.approx(0.5)
    assert ledger.silo_history(silos[0]) == []  # not a sampled Gaussian mechanism
    assert selectors.run_privacy_spent(round_.run) == {s.name: pytest.approx(0.5) for s in silos}
    spent = AuditEvent.objects.filter(action="budget.spent").first()
    assert spent.data["mechanism"] == "fairness" and spent.data["epsilon_pure"] == 0.5

    # A budget that cannot afford another round of counts stops the silo being selected.
    Silo.objects.filter(pk=silos[0].pk).update(epsilon_budget=0.9)
    silos[0].refresh_from_db()
    assert not ledger.can_afford_round(silos[0], version.spec)
    Silo.objects.filter(pk=silos[0].pk).update(epsilon_budget=1.0)
    silos[0].refresh_from_db()
    assert ledger.can_afford_round(silos[0], version.spec)


def test_pure_entries_add_to_the_rdp_composition_of_the_other_mechanisms():
    silo = SiloFactory()
    ledger.ledger_append(
        silo=silo,
        run=None,
        round_number=1,
        mechanism="client",
        noise_multiplier=1.2,
        sample_rate=1.0,
        steps=1,
        delta=1e-5,
    )
    entry = ledger.ledger_append(
        silo=silo,
        run=None,
        round_number=1,
        mechanism="fairness",
        noise_multiplier=1 / 0.3,
        sample_rate=1.0,
        steps=1,
        delta=1e-5,
        epsilon_pure=0.3,
    )
    gaussian = ledger.composed_epsilon([(1.2, 1.0, 1)], 1e-5)
    assert entry.epsilon_total == pytest.approx(gaussian + 0.3)
    assert ledger.silo_spent_epsilon(silo) == pytest.approx(gaussian + 0.3)
    with pytest.raises(ValueError, match="epsilon_pure"):
        ledger.ledger_append(
            silo=silo,
            run=None,
            round_number=1,
            mechanism="client",
            noise_multiplier=1.2,
            sample_rate=1.0,
            steps=1,
            delta=1e-5,
            epsilon_pure=0.3,
        )


def test_a_round_without_any_record_stores_the_reason_instead_of_metrics():
    report = fairness_report_of({"a": {"sex": {"F": dict.fromkeys(fairness.CELLS, 0)}}})
    assert report["attributes"]["sex"]["report"] is None
    assert "no record" in report["attributes"]["sex"]["error"]
    assert report["flags"] == []


def fairness_report_of(counts_by_silo: dict[str, Any]) -> dict[str, Any]:
    from federation.services.fairness import build_report

    spec = plan_spec(schema=SCHEMA_SEX, fairness=FAIRNESS)
    return build_report(
        spec,
        round_number=3,
        attempt=1,
        counts_by_silo=counts_by_silo,
        metrics_by_silo={"a": {"accuracy": 7.0, "auc": None}},  # out of range: ignored
    )
