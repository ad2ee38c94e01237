"""Postprocess through the final evaluation: each site's agent sends, with its evaluation, the
final model's score histograms per group (its own code on real site files); the server sums
them, chooses the group thresholds (fairlearn's ThresholdOptimizer semantics) and keeps them
with the final model version: the run's evaluation, the model card and the API."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

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
    # The thresholded decisions on the pooled held-out rows: the rows they were chosen on
    thresholded = run.evaluation["thresholded_fairness"]
    direct = fairness_mitigation.thresholded_disparities(
        chosen["rules"], pooled, postprocess_grid(20)
    )
    assert {k: thresholded[k] for k in direct} == pytest.approx(direct, abs=1e-12)
    assert thresholded["in_sample"] is True
    assert "expect a larger disparity on new rows" in thresholded["note"]
    assert thresholded["n"] == run.evaluation["metrics"]["n"]
    assert run.evaluation["fairness"]["final"] is True  # the raw model's report stays
    card = model_card(ModelVersion.objects.get(run=run, number=2))
    assert card["deployment"]["thresholds"] == chosen
    assert card["fairness"]["thresholded"]["in_sample"] is True
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
    informative_final_model(run, files)
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
    # The thresholded decisions are measured out of sample: on the pooled held-out rows, which
    # each site sent beside its training rows' histograms, not on the rows that chose them.
    thresholded = run.evaluation["thresholded_fairness"]
    assert thresholded is not None, run.evaluation["thresholded_fairness_note"]
    held_out = pooled_histograms(run, files, "test")
    direct = fairness_mitigation.thresholded_disparities(
        chosen["rules"], held_out, postprocess_grid(20)
    )
    assert {k: thresholded[k] for k in direct} == pytest.approx(direct, abs=1e-12)
    in_sample = fairness_mitigation.thresholded_disparities(
        chosen["rules"], pooled, postprocess_grid(20)
    )
    assert thresholded["demographic_parity_difference"] != pytest.approx(
        in_sample["demographic_parity_difference"], abs=1e-9
    )
    assert thresholded["in_sample"] is False and thresholded["note"].startswith("out of sample")
    assert thresholded["n"] == run.evaluation["metrics"]["n"]
    stored = SiloEvaluation.objects.get(run=run, silo=silos[0]).report
    assert stored["held_out_score_histograms"] == {
        g: c for g, c in first["held_out_score_histograms"].items()
    }
    card = model_card(ModelVersion.objects.get(run=run, number=2))
    assert card["deployment"]["thresholds"]["rows"] == "training"
    assert card["fairness"]["mitigation"]["parameters"]["rows"] == "training"


def informative_final_model(run: Run, files: dict[int, Path]) -> None:
    """Replace the harness's final model (random weights: its thresholds decide one constant)
    with a logistic regression fitted on the pooled training rows, so that the thresholds
    differ between the groups and their decisions' disparities between rows."""
    from sklearn.linear_model import LogisticRegression

    plan = parse_plan(run.version.spec)
    parts = []
    for path in files.values():
        data = LocalData(path)
        parts.append(data.arrays(data.split(run.version.spec), run.preprocessing).train)
    X = np.concatenate([p.X for p in parts])
    fit = LogisticRegression().fit(X, np.concatenate([p.y for p in parts]))
    model = build_model(plan.model, int(X.shape[1]), seed=0)
    state = model.state_dict()
    state["linear.weight"] = torch.tensor(fit.coef_, dtype=state["linear.weight"].dtype)
    state["linear.bias"] = torch.tensor(fit.intercept_, dtype=state["linear.bias"].dtype)
    final = ModelVersion.objects.filter(run=run).order_by("-number").first()
    data = tensors.encode_state_dict(state)
    blob_store().put(final.blob_key, data)
    ModelVersion.objects.filter(pk=final.pk).update(checksum=tensors.sha256_hex(data))


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
    # rows "held_out": the histograms are of the held-out rows already; a second table is not
    # the plan's release
    assert "held_out_score_histograms" not in good
    unasked = {**good, "held_out_score_histograms": good["score_histograms"]}
    with pytest.raises(Refused, match="held_out_score_histograms sent, but the plan chooses no"):
        evaluation_receive(silo_id=silos[0].pk, fields=unasked)
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


TRAINING_ROWS = {**FAIRNESS, "mitigation": {**FAIRNESS["mitigation"], "rows": "training"}}


def test_bad_held_out_histograms_are_refused_with_the_reason_and_nothing_is_kept(
    tmp_path: Path,
) -> None:
    """With rows "training" the held-out rows' histograms are checked as held-out histograms
    are: every group public, every column on the grid, the total the evaluation's rows; a
    refusal is audited with its reason and keeps nothing."""
    run, silos, files = train_to_the_last_round(
        tmp_path, n_silos=2, schema=SENSITIVE_SCHEMA, fairness=TRAINING_ROWS
    )
    good = evaluate_at(run, silos[0], files)
    held = good["held_out_score_histograms"]
    n = sum(sum(sum(c) for c in cells.values()) for cells in held.values())
    assert n == len(LocalData(files[silos[0].pk]).split(run.version.spec).test)
    one_more = {g: {c: list(v) for c, v in cells.items()} for g, cells in held.items()}
    one_more["f"]["positives"][3] += 1
    unknown = {**held, "x": held["f"]}
    without = {k: v for k, v in good.items() if k != "held_out_score_histograms"}
    cases = [
        ({**good, "held_out_score_histograms": one_more}, f"hold {n + 1} rows, the evaluation {n}"),
        ({**good, "held_out_score_histograms": unknown}, r"name group\(s\) \['x'\] not in"),
        (without, "no held_out_score_histograms came with the evaluation; update the agent"),
    ]
    for fields, reason in cases:
        with pytest.raises(Refused, match=reason):
            evaluation_receive(silo_id=silos[0].pk, fields=fields)
    refused = AuditEvent.objects.filter(action="evaluation.refused", object_id=run.pk)
    assert [e.data["code"] for e in refused] == ["invalid_update"] * 3
    assert all("held_out_score_histograms" in e.data["reason"] for e in refused)
    assert SiloEvaluation.objects.filter(run=run, report__isnull=False).count() == 0
    evaluation_receive(silo_id=silos[0].pk, fields=good)
    evaluation_receive(silo_id=silos[1].pk, fields=evaluate_at(run, silos[1], files))
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    assert run.evaluation["thresholded_fairness"] is not None


def re_pooled(run: Run, **fairness: float) -> Run:
    """The run's final evaluation pooled again from the reports it kept, under the plan's
    fairness section with these limits (set in the stored spec, as an approved plan would
    have them)."""
    from federation.services.evaluation import evaluation_pool

    spec = {**run.version.spec, "fairness": {**run.version.spec["fairness"], **fairness}}
    type(run.version).objects.filter(pk=run.version.pk).update(spec=spec)
    run.refresh_from_db()
    run.evaluation = evaluation_pool(run)
    run.save(update_fields=["evaluation"])
    return run


def test_thresholds_that_bring_the_final_model_within_the_limit_end_the_run_without_warning(
    tmp_path: Path,
) -> None:
    """The raw model (decisions at 0.5) over the plan's limit, its thresholded decisions (what
    is deployed) within it: no warning, the views say the raw figure and that the thresholds
    bring it within. Thresholded decisions over a limit: the warning is about them."""
    from federation.fairness_outcome import final_fairness_info, final_fairness_warning
    from federation.reports import compliance_report_json, run_fairness

    run, silos, files = train_to_the_last_round(
        tmp_path, schema=SENSITIVE_SCHEMA, fairness=FAIRNESS
    )
    informative_final_model(run, files)
    for silo in silos:
        evaluation_receive(silo_id=silo.pk, fields=evaluate_at(run, silo, files))
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    raw = run.evaluation["fairness"]["attributes"]["sex"]["report"]
    raw_dpd = raw["demographic_parity_difference"]
    thresholded = run.evaluation["thresholded_fairness"]
    thresholded_dpd = thresholded["demographic_parity_difference"]
    assert raw_dpd > thresholded_dpd + 0.01, (raw_dpd, thresholded_dpd)

    run = re_pooled(run, max_demographic_parity_difference=(raw_dpd + thresholded_dpd) / 2)
    assert [f["metric"] for f in run.evaluation["fairness"]["flags"]] == [
        "demographic_parity_difference"
    ]  # the raw model is over the limit ...
    assert run.evaluation["thresholded_fairness"]["flags"] == []  # ... its decisions within
    assert final_fairness_warning(run.evaluation) is None
    info = final_fairness_info(run.evaluation)
    assert info["flags"][0]["value"] == raw_dpd
    assert info["thresholded"][0]["value"] == thresholded_dpd and info["in_sample"] is True
    fairness = run_fairness(run)
    assert fairness["final_warning"] is None and fairness["final_info"] == info
    rows = fairness["trade_off"]
    assert [(r["final"], r["thresholded"]) for r in rows][-2:] == [(True, False), (True, True)]
    assert rows[-2]["disparities"][0]["flagged"] is True
    assert rows[-1]["disparities"][0]["flagged"] is False
    compliance = compliance_report_json(run)
    assert compliance["run"]["fairness_warning"] is None
    assert compliance["run"]["fairness_info"] == info

    thresholded_eod = run.evaluation["thresholded_fairness"]["equalized_odds_difference"]
    assert thresholded_eod > 0
    run = re_pooled(run, max_equalized_odds_difference=thresholded_eod / 2)
    warning = final_fairness_warning(run.evaluation)
    assert warning["decisions"] == "thresholded"
    assert [(f["metric"], f["value"]) for f in warning["flags"]] == [
        ("equalized_odds_difference", thresholded_eod)
    ]
    assert final_fairness_info(run.evaluation) is None
    assert compliance_report_json(run)["run"]["fairness_warning"] == warning


def test_noised_held_out_histograms_are_charged_as_approval_projected(tmp_path: Path) -> None:
    """Rows "training" with fairness.dp_epsilon: each site's held-out histograms are one more
    noised table, charged to its ledger; the final evaluation costs the count table and both
    histogram tables, and approval's projection counts the same."""
    from federation import ledger
    from federation.models import PrivacyLedgerEntry

    noised = {**TRAINING_ROWS, "dp_epsilon": 2.0}
    spec = plan_spec(schema=SENSITIVE_SCHEMA, fairness=noised)
    # 2 rounds, the final evaluation's counts, the training and the held-out histograms
    assert ledger.plan_fairness_epsilon(spec) == pytest.approx(2.0 * (2 + 1 + 1 + 1))
    assert ledger.plan_fairness_epsilon(
        plan_spec(schema=SENSITIVE_SCHEMA, fairness={**FAIRNESS, "dp_epsilon": 2.0})
    ) == pytest.approx(2.0 * (2 + 1 + 1))  # rows "held_out": no extra table
    run, silos, files = train_to_the_last_round(tmp_path, schema=SENSITIVE_SCHEMA, fairness=noised)
    # the budget check before the evaluation counts the three tables it will charge
    assert ledger.evaluation_epsilon(run.version.spec) == pytest.approx(3 * 2.0)
    silo = silos[0]
    spent = ledger.silo_pure_epsilon(silo)
    for budget, affords in ((spent + 3 * 2.0 - 0.5, False), (spent + 3 * 2.0, True)):
        silo.epsilon_budget = budget
        assert ledger.can_afford_evaluation(silo, run.version.spec) is affords
    for silo in silos:
        report = evaluate_at(run, silo, files)
        exact = pooled_one(run, files[silo.pk], "test")
        assert report["held_out_score_histograms"] != exact  # noised by the agent
        evaluation_receive(silo_id=silo.pk, fields=report)
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    assert run.status == Run.Status.COMPLETED
    for silo in silos:
        final = PrivacyLedgerEntry.objects.filter(
            run=run, silo=silo, mechanism=ledger.PURE, round_number__isnull=True
        )
        assert sum(e.epsilon_pure for e in final) == pytest.approx(3 * 2.0)
        rounds = PrivacyLedgerEntry.objects.filter(
            run=run, silo=silo, mechanism=ledger.PURE, round_number__isnull=False
        )
        # what the rounds charged plus the final evaluation's: the projection, once every
        # round's counts are charged (the harness's updates carry none: 2 rounds uncharged)
        charged = sum(e.epsilon_pure for e in final) + sum(e.epsilon_pure for e in rounds)
        uncharged_rounds = 2 - rounds.count()
        assert charged + 2.0 * uncharged_rounds == pytest.approx(
            ledger.plan_fairness_epsilon(run.version.spec)
        )
    if run.evaluation["thresholds"] is not None:
        thresholded = run.evaluation["thresholded_fairness"]
        assert (
            thresholded is not None
            and "noised with fairness.dp_epsilon = 2" in (thresholded["note"])
        )
