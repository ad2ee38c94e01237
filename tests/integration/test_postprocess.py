"""Postprocess through the final evaluation: each site's agent sends, with its evaluation, the
final model's score histograms per group (its own code on real site files); the server sums
them, chooses the group thresholds (fairlearn's ThresholdOptimizer semantics) and keeps them
with the final model version: the run's evaluation, the model card and the API."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from clientagent.data import LocalData
from clientagent.trainer import postprocess_grid
from fedcore import fairness_mitigation, tensors, training
from fedcore.models import build_model
from fedcore.plan import parse_plan
from federation import orchestrator
from federation.models import AuditEvent, ModelVersion, Run, SiloEvaluation
from federation.reports import model_card
from federation.services.evaluation import evaluation_receive
from federation.services.updates import Refused
from federation.storage import blob_store
from tests.factories import plan_spec
from tests.integration.test_final_evaluation import (
    SENSITIVE_SCHEMA,
    evaluate_at,
    train_to_the_last_round,
)

pytestmark = pytest.mark.django_db

FAIRNESS = {
    "sensitive_attribute": "sex",
    "max_demographic_parity_difference": 0.1,
    "mitigation": {"kind": "postprocess", "score_bins": 20},
}


def pooled_histograms(
    run: Run, files: dict[int, Path], split: str = "test"
) -> dict[str, dict[str, list[int]]]:
    """The final model's histograms on the union of the held-out rows (``split`` "test") or of
    the training rows ("train"), from the raw scores."""
    final = ModelVersion.objects.filter(run=run).order_by("-number").first()
    state = tensors.decode_state_dict(blob_store().get(final.blob_key))
    plan = parse_plan(run.version.spec)
    scores, ys, groups = [], [], []
    for path in files.values():
        data = LocalData(path)
        test = getattr(data.arrays(data.split(run.version.spec), run.preprocessing), split)
        model = build_model(plan.model, int(test.X.shape[1]), seed=0)
        model.load_state_dict(state)
        scores.append(training.predict_proba(model, test.X))
        ys.append(test.y)
        groups.append(test.groups["sex"])
    return fairness_mitigation.score_histogram(
        np.concatenate(scores), np.concatenate(ys), np.concatenate(groups), postprocess_grid(20)
    )


def test_the_final_models_thresholds_are_chosen_from_the_sites_histograms(
    tmp_path: Path,
) -> None:
    run, silos, files = train_to_the_last_round(
        tmp_path, schema=SENSITIVE_SCHEMA, fairness=FAIRNESS
    )
    for silo in silos:
        report = evaluate_at(run, silo, files)
        assert set(report["score_histograms"]) >= {"f", "m"}
        evaluation_receive(silo_id=silo.pk, fields=report)
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    assert run.status == Run.Status.COMPLETED

    chosen = run.evaluation["thresholds"]
    assert run.evaluation["thresholds_note"] is None
    pooled = pooled_histograms(run, files)
    expected = fairness_mitigation.threshold_rules(pooled, postprocess_grid(20)).to_json()
    assert {k: chosen[k] for k in expected} == expected
    assert chosen["attribute"] == "sex" and set(chosen["rules"]) == {"f", "m"}
    assert chosen["rows"] == "held_out"
    card = model_card(ModelVersion.objects.get(run=run, number=2))
    assert card["deployment"]["thresholds"] == chosen
    assert card["fairness"]["mitigation"]["kind"] == "postprocess"
    assert card["fairness"]["mitigation"]["parameters"]["score_bins"] == 20
    assert (
        model_card(ModelVersion.objects.get(run=run, number=1))["deployment"]["thresholds"] is None
    )
    assert AuditEvent.objects.filter(action="mitigation.thresholds", data__chosen=True).exists()
    onnx_decisions_equal_the_servers(run, files)


def test_thresholds_chosen_on_the_training_rows(tmp_path: Path) -> None:
    """With fairness.mitigation.rows "training" each site's histograms count its training split:
    the thresholds are fairlearn's on the pooled training rows' scores, say so, and a total other
    than the training rows the site's statistics reported is refused."""
    training_rows = {**FAIRNESS, "mitigation": {**FAIRNESS["mitigation"], "rows": "training"}}
    run, silos, files = train_to_the_last_round(
        tmp_path, schema=SENSITIVE_SCHEMA, fairness=training_rows
    )
    reports = {silo.pk: evaluate_at(run, silo, files) for silo in silos}
    first = reports[silos[0].pk]
    data = LocalData(files[silos[0].pk])
    split = data.split(run.version.spec)
    total = sum(sum(sum(c) for c in cells.values()) for cells in first["score_histograms"].values())
    assert total == len(split.train) != len(split.test)
    # the held-out count (the evaluation's n) is not what training histograms must hold
    held_out = {**first, "score_histograms": pooled_one(run, files[silos[0].pk], "test")}
    with pytest.raises(Refused, match=rf"statistics reported {len(split.train)} training rows"):
        evaluation_receive(silo_id=silos[0].pk, fields=held_out)
    assert SiloEvaluation.objects.filter(run=run, report__isnull=False).count() == 0
    for silo in silos:
        evaluation_receive(silo_id=silo.pk, fields=reports[silo.pk])
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    assert run.status == Run.Status.COMPLETED

    chosen = run.evaluation["thresholds"]
    assert chosen is not None, run.evaluation["thresholds_note"]
    pooled = pooled_histograms(run, files, "train")
    held = {g: c for g, c in chosen["histograms"].items() if any(map(sum, c.values()))}
    assert held == pooled != pooled_histograms(run, files, "test")  # empty groups aside
    expected = fairness_mitigation.threshold_rules(pooled, postprocess_grid(20)).to_json()
    assert {k: chosen[k] for k in expected} == expected
    assert chosen["rows"] == "training"
    card = model_card(ModelVersion.objects.get(run=run, number=2))
    assert card["deployment"]["thresholds"]["rows"] == "training"
    assert card["fairness"]["mitigation"]["parameters"]["rows"] == "training"


def pooled_one(run: Run, path: Path, split: str) -> dict[str, dict[str, list[int]]]:
    """One site's exact histograms of the final model on its ``split`` rows."""
    return pooled_histograms(run, {0: path}, split)


def onnx_decisions_equal_the_servers(run: Run, files: dict[int, Path]) -> None:
    """The final model's ONNX export applies its thresholds: on every site's held-out rows its
    ``decision_probability`` equals the server's rules applied to the model's scores."""
    onnxruntime = pytest.importorskip("onnxruntime")
    from fedcore import onnx_export
    from federation import selectors

    final = ModelVersion.objects.get(run=run, number=2)
    rules = fairness_mitigation.ThresholdRules.from_json(run.evaluation["thresholds"])
    groups = onnx_export.threshold_groups(rules)
    card = model_card(final)["deployment"]["onnx"]
    assert card["group_input"]["groups"] == groups
    assert card["decision_output"]["name"] == "decision_probability"
    session = onnxruntime.InferenceSession(selectors.model_version_onnx(final))
    assert [i.name for i in session.get_inputs()] == ["features", "group"]
    state = tensors.decode_state_dict(blob_store().get(final.blob_key))
    plan = parse_plan(run.version.spec)
    for path in files.values():
        data = LocalData(path)
        test = data.arrays(data.split(run.version.spec), run.preprocessing).test
        model = build_model(plan.model, int(test.X.shape[1]), seed=0)
        model.load_state_dict(state)
        labels = np.asarray(test.groups["sex"]).astype(str)
        index = np.array(
            [groups.index(g) if g in groups else len(groups) for g in labels], dtype=np.int64
        )
        logit, decided = session.run(
            None, {"features": np.asarray(test.X, dtype=np.float32), "group": index}
        )
        expected = rules.positive_probability(training.predict_proba(model, test.X), labels)
        np.testing.assert_array_equal(decided, expected)
    earlier = onnxruntime.InferenceSession(
        selectors.model_version_onnx(ModelVersion.objects.get(run=run, number=1))
    )
    assert [i.name for i in earlier.get_inputs()] == ["features"]  # no thresholds there


def test_bad_or_missing_histograms_are_refused_and_nothing_is_kept(
    tmp_path: Path,
) -> None:
    run, silos, files = train_to_the_last_round(
        tmp_path, n_silos=2, schema=SENSITIVE_SCHEMA, fairness=FAIRNESS
    )
    good = evaluate_at(run, silos[0], files)
    short = {
        g: {"negatives": c["negatives"][:3], "positives": c["positives"][:3]}
        for g, c in good["score_histograms"].items()
    }
    with pytest.raises(Refused, match="must hold 21 non-negative integer counts"):
        evaluation_receive(silo_id=silos[0].pk, fields={**good, "score_histograms": short})
    without = {k: v for k, v in good.items() if k != "score_histograms"}
    with pytest.raises(Refused, match="no score_histograms came with the evaluation"):
        evaluation_receive(silo_id=silos[0].pk, fields=without)
    assert SiloEvaluation.objects.filter(run=run, report__isnull=False).count() == 0
    evaluation_receive(silo_id=silos[0].pk, fields=good)
    evaluation_receive(silo_id=silos[1].pk, fields=evaluate_at(run, silos[1], files))
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    assert run.status == Run.Status.COMPLETED and run.evaluation["thresholds"] is not None


def test_noised_histograms_choose_thresholds_and_are_charged(tmp_path: Path) -> None:
    """With fairness.dp_epsilon each site's histograms are noised (discrete Laplace per cell):
    the server accepts totals other than the held-out rows, chooses thresholds from the noised
    sums (or states why none) and charges each silo one table of epsilon for them (approval's
    projection, federation.ledger.plan_fairness_epsilon, includes it)."""
    from federation import ledger
    from federation.models import PrivacyLedgerEntry

    noised = {**FAIRNESS, "dp_epsilon": 2.0}
    assert ledger.plan_fairness_epsilon(plan_spec(schema=SENSITIVE_SCHEMA, fairness=noised)) == (
        pytest.approx(2.0 * (2 + 1 + 1))  # 2 rounds, the final evaluation, the histograms
    )
    run, silos, files = train_to_the_last_round(tmp_path, schema=SENSITIVE_SCHEMA, fairness=noised)
    for silo in silos:
        report = evaluate_at(run, silo, files)
        evaluation_receive(silo_id=silo.pk, fields=report)
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    assert run.status == Run.Status.COMPLETED
    assert run.evaluation["thresholds"] is not None or run.evaluation["thresholds_note"]
    if run.evaluation["thresholds"] is not None:  # the noised sums, not the exact ones
        assert run.evaluation["thresholds"]["histograms"] != pooled_histograms(run, files)
    for silo in silos:
        histogram_charges = PrivacyLedgerEntry.objects.filter(
            run=run, silo=silo, mechanism=ledger.PURE, round_number__isnull=True
        )
        # the final evaluation's count table and the histograms, epsilon each
        assert sum(e.epsilon_pure for e in histogram_charges) == pytest.approx(2 * 2.0)


def test_a_secure_plan_sends_its_final_counts_and_histograms_noised_or_not_at_all(
    tmp_path: Path,
) -> None:
    """Secure aggregation masks the rounds; the final evaluation has no masked vector. With
    fairness.dp_epsilon each site's agent sends its final counts and score histograms noised
    (fedcore.plan.final_counts_in_clear): the server chooses the thresholds and gives the final
    model its fairness report from them, and charges both tables. The same reports for a secure
    plan without noise (one approved before the plan language refused it) are refused."""
    from federation import ledger
    from federation.models import PrivacyLedgerEntry

    noised = {**FAIRNESS, "dp_epsilon": 2.0}
    run, silos, files = train_to_the_last_round(tmp_path, schema=SENSITIVE_SCHEMA, fairness=noised)
    # The rounds above ran in clear (the harness's updates); the evaluation path reads the spec.
    spec = {**run.version.spec, "secure_aggregation": True}
    type(run.version).objects.filter(pk=run.version.pk).update(spec=spec)
    run.refresh_from_db()
    reports = {silo.pk: evaluate_at(run, silo, files) for silo in silos}
    assert all(r["fairness"] and r["score_histograms"] for r in reports.values())

    exact = {**spec, "fairness": FAIRNESS}  # a secure plan without noise
    type(run.version).objects.filter(pk=run.version.pk).update(spec=exact)
    with pytest.raises(Refused, match="without fairness.dp_epsilon: its group counts only"):
        evaluation_receive(silo_id=silos[0].pk, fields=reports[silos[0].pk])
    without_counts = {k: v for k, v in reports[silos[0].pk].items() if k != "fairness"}
    # the plan language's own reason (plan_kind parses the plan)
    with pytest.raises(Refused, match="outside the masked vector of the rounds"):
        evaluation_receive(silo_id=silos[0].pk, fields=without_counts)
    assert SiloEvaluation.objects.filter(run=run, report__isnull=False).count() == 0

    type(run.version).objects.filter(pk=run.version.pk).update(spec=spec)
    for silo in silos:
        evaluation_receive(silo_id=silo.pk, fields=reports[silo.pk])
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    assert run.status == Run.Status.COMPLETED
    assert run.evaluation["fairness"] is not None, run.evaluation["fairness_note"]
    assert run.evaluation["thresholds"] is not None or run.evaluation["thresholds_note"]
    for silo in silos:
        charges = PrivacyLedgerEntry.objects.filter(
            run=run, silo=silo, mechanism=ledger.PURE, round_number__isnull=True
        )
        assert sum(e.epsilon_pure for e in charges) == pytest.approx(2 * 2.0)
