"""The final evaluation: every site evaluates the run's final model on its held-out rows.

Round k's metrics and fairness counts are about the model the sites received (version k-1), so
without this phase the last model version is never evaluated. After the last round the state
machine (``federation.roundplan``: ``BeginEvaluation``, ``FinishEvaluation``) asks the
selectable silos (:func:`evaluation_begin`), each agent answers with an ``evaluation``
message (:func:`evaluation_receive`): a histogram of its held-out rows' predicted probabilities
by label (``fedcore.evaluation``) and, for a plan with a fairness section, its group counts.
When every asked silo answered, refused the run or the deadline passed,
:func:`evaluation_pool` sums them into the run's final figures -- AUC (with its worst-case
error bound), accuracy and log loss on the union of the held-out rows, the per-silo figures and
the final model's fairness report -- and the run completes.

What a report reveals, and why it is not charged to the privacy ledger (docs/fairness.md,
"Final evaluation"): the held-out rows are outside every DP guarantee of a plan (DP-SGD and
client-level DP protect the training rows), as are the per-round metrics every update already
carries in clear; the histogram is the finer form of the same release. Plans with
``fairness.dp_epsilon`` release the group counts with noise and are charged as a round's are.
Secure-aggregation plans send no group counts here: theirs only ever travel masked, so the
final fairness report is missing for them, and says so.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from django.db import transaction
from django.utils import timezone

from fedcore import calibration, evaluation, tabular, task_fairness, task_metrics
from fedcore.plan import RunSettings, final_counts_in_clear
from federation import dispatch
from federation.models import ModelVersion, Run, Silo, SiloEvaluation
from federation.selectors import run_refused_silo_ids
from federation.services import fairness as fairness_service
from federation.services import mitigation
from federation.services.audit import audit_append
from federation.services.updates import Refused, audit_refused

log = logging.getLogger("quorum.orchestrator")

EVALUATE_EVENT = "run.evaluate"


def final_model(run: Run) -> ModelVersion:
    """The run's last model version: the aggregate of its last round."""
    version = ModelVersion.objects.filter(run=run).order_by("-number").first()
    if version is None:
        raise ValueError(f"run {run.pk} has no model version to evaluate")
    return version


def evaluation_counts(run: Run) -> tuple[int, int, int]:
    """How many silos the phase asked, how many answered, how many of the others refused the
    run (the phase does not wait for those)."""
    rows = SiloEvaluation.objects.filter(run=run)
    asked = rows.count()
    reported = rows.filter(report__isnull=False).count()
    refused = (
        rows.filter(report__isnull=True).filter(silo_id__in=run_refused_silo_ids(run.pk)).count()
    )
    return asked, reported, refused


def evaluation_begin(run: Run, cfg: RunSettings, silos: list[Silo]) -> None:
    """Open the evaluation phase with these silos (in the orchestrator's transaction)."""
    version = final_model(run)
    now = timezone.now()
    run.status = Run.Status.EVALUATING
    run.waiting_since = None
    run.evaluation_deadline = now + timedelta(seconds=cfg.round_deadline_seconds)
    run.save(update_fields=["status", "waiting_since", "evaluation_deadline"])
    SiloEvaluation.objects.bulk_create(
        SiloEvaluation(run=run, silo=silo, model_version=version.number, asked_at=now)
        for silo in silos
    )
    for silo in silos:
        dispatch.send_to_silo(silo.pk, {"type": EVALUATE_EVENT, "run_id": run.pk})
    dispatch.enqueue_advance(run.pk, countdown=cfg.round_deadline_seconds + 0.05)
    _audit(run, "run.evaluation_started", model_version=version.number, silos=len(silos))
    dispatch.publish_live(
        {"type": "live.event", "event": "run.evaluating", "run": run.pk, "silos": len(silos)}
    )
    log.info(
        "run %s: %d silos asked to evaluate the final model v%d", run.pk, len(silos), version.number
    )


def evaluation_receive(*, silo_id: int, fields: Mapping[str, Any]) -> None:
    """Check and keep a silo's evaluation of the final model; Refused names what is wrong.

    Refused, changing nothing (audited as ``evaluation.refused`` in its own transaction): a run
    the silo is not part of or that is not evaluating (``wrong_run``), another model version
    (``wrong_round``), a silo the phase did not ask (``not_selected``), a second report
    (``duplicate_update``), a histogram ``fedcore.evaluation.histogram_from_wire`` refuses,
    group counts the fairness checks refuse or that a secure plan must not send in clear
    (``invalid_update``).
    """
    try:
        _evaluation_receive(silo_id=silo_id, fields=fields)
    except Refused as refused:
        audit_refused(
            silo_id,
            "evaluation.refused",
            fields.get("run", ""),
            refused,
            model_version=fields.get("model_version"),
        )
        raise


def _evaluation_receive(*, silo_id: int, fields: Mapping[str, Any]) -> None:
    silo = Silo.objects.get(pk=silo_id)
    run = Run.objects.select_related("plan", "version").filter(pk=fields["run"]).first()
    if run is None or not run.version.silos.filter(pk=silo.pk).exists():
        raise Refused(
            "wrong_run", f"run {fields['run']} does not exist or this silo does not take part"
        )
    if run.status != Run.Status.EVALUATING:
        raise Refused(
            "wrong_run", f"run {run.pk} is not evaluating its final model (it is {run.status})"
        )
    where = f"evaluation of silo {silo.name!r}"
    target = plan_target(run.version.spec)
    score_histograms = held_out_histograms = None
    sums = None  # calibration sums: binary tasks only
    if target.task != "binary":
        report, n = _checked_task_report(run, target, fields, where)
        counts = None
    else:
        try:
            histogram = evaluation.histogram_from_wire(fields["evaluation"], where=where)
        except evaluation.EvaluationReportError as exc:
            raise Refused("invalid_update", str(exc)) from None
        n = histogram.n
        counts = _checked_counts(run, fields, n)
        sums = _checked_calibration(fields, n, where)
        try:  # a postprocess plan: the final model's score histograms per group
            score_histograms = mitigation.checked_score_histograms(
                run, fields.get("score_histograms"), n, where, silo_id=silo.pk
            )
            # rows "training": the held-out rows' too, for the thresholded decisions' report
            held_out_histograms = mitigation.checked_held_out_score_histograms(
                run, fields.get("held_out_score_histograms"), n, where
            )
        except ValueError as exc:
            raise Refused("invalid_update", str(exc)) from None
        report = {"histogram": histogram.to_wire(), "fairness": counts}
    with transaction.atomic():
        row = SiloEvaluation.objects.select_for_update().filter(run=run, silo=silo).first()
        if row is None:
            raise Refused("not_selected", f"this silo was not asked to evaluate run {run.pk}")
        if fields["model_version"] != row.model_version:
            raise Refused(
                "wrong_round",
                f"evaluation of model v{fields['model_version']} refused: run {run.pk} evaluates "
                f"its final model v{row.model_version}",
            )
        if row.report is not None:
            raise Refused("duplicate_update", f"this silo's evaluation of run {run.pk} is in")
        row.report = report
        if score_histograms is not None:
            row.report["score_histograms"] = score_histograms
        if held_out_histograms is not None:
            row.report["held_out_score_histograms"] = held_out_histograms
        if sums is not None:
            row.report["calibration"] = sums.to_wire()
        row.received_at = timezone.now()
        row.save(update_fields=["report", "received_at"])
        if counts:
            fairness_service.counts_charge(
                run=run, round_number=None, silo=silo, tables=len(counts)
            )
        # noised with fairness.dp_epsilon: one table charged each (federation.ledger's
        # projection counts the same: plan_fairness_epsilon)
        histogram_tables = (score_histograms is not None) + (held_out_histograms is not None)
        if histogram_tables:
            fairness_service.counts_charge(
                run=run, round_number=None, silo=silo, tables=histogram_tables
            )
        audit_append(
            actor=f"silo:{silo.name}",
            action="evaluation.received",
            consortium_id=silo.consortium_id,
            object_type="run",
            object_id=run.pk,
            data={"model_version": row.model_version, "n": n},
        )
        asked, reported, _ = evaluation_counts(run)
        if reported >= asked:  # the last answer wakes the orchestrator; the deadline the rest
            dispatch.enqueue_advance(run.pk)


def plan_target(spec: Mapping[str, Any]) -> tabular.TargetSpec:
    """The plan's target: its task, and for a multi-class task its classes."""
    return tabular.TargetSpec.from_dict(spec["schema"]["target"])


def _checked_task_report(
    run: Run, target: tabular.TargetSpec, fields: Mapping[str, Any], where: str
) -> tuple[dict[str, Any], int]:
    """A multi-class or regression evaluation: the metrics part and the group parts checked
    (fedcore.task_metrics, fedcore.task_fairness); Refused naming the faulty field."""
    try:
        if target.task == "multiclass":
            part = task_metrics.check_multiclass_part(
                fields["evaluation"], classes=target.n_outputs, where=where
            )
            n = sum(sum(row) for row in part["confusion"])
        else:
            part = task_metrics.check_regression_part(fields["evaluation"], where=where)
            n = int(part["count"])
    except task_metrics.TaskPartError as exc:
        raise Refused("invalid_update", str(exc)) from None
    raw = fields.get("fairness")
    groups: dict[str, Any] = {}
    if raw is not None:
        public = fairness_service.run_public_groups(run)
        if not isinstance(raw, Mapping) or set(raw) != set(public):
            raise Refused(
                "invalid_update",
                f"{where}: fairness must name exactly the attributes {sorted(public)}",
            )
        try:
            for attribute, group_part in raw.items():
                at = f"{where}: fairness.{attribute}"
                groups[attribute] = (
                    task_fairness.check_multiclass_group_part(
                        group_part,
                        classes=target.n_outputs,
                        groups=public[attribute],
                        n=n,
                        where=at,
                    )
                    if target.task == "multiclass"
                    else task_fairness.check_regression_group_part(
                        group_part, groups=public[attribute], n=n, where=at
                    )
                )
        except task_fairness.GroupPartError as exc:
            raise Refused("invalid_update", str(exc)) from None
    return {"task": target.task, "part": part, "fairness": groups or None}, n


def _checked_calibration(
    fields: Mapping[str, Any], n: int, where: str
) -> calibration.CalibrationSums | None:
    raw = fields.get("calibration")
    if raw is None:
        return None
    try:
        return calibration.calibration_from_wire(raw, n=n, where=f"{where}: calibration")
    except calibration.CalibrationReportError as exc:
        raise Refused("invalid_update", str(exc)) from None


def pooled_calibration(done: list[SiloEvaluation]) -> tuple[dict[str, Any] | None, str | None]:
    """The calibration curve pooled from every report's per-bin sums, or None and why (a
    curve of some sites only would not be the pooled rows' curve)."""
    parts = [r.report.get("calibration") for r in done]
    if not parts:
        return None, None
    if any(part is None for part in parts):
        missing = [r.silo.name for r in done if r.report.get("calibration") is None]
        return None, f"no calibration curve: {', '.join(missing)} sent no calibration sums"
    merged = calibration.merge_calibration(
        calibration.calibration_from_wire(part, n=sum(part["count"])) for part in parts
    )
    return calibration.calibration_curve(merged), None


def _checked_counts(run: Run, fields: Mapping[str, Any], n: int) -> dict[str, Any] | None:
    raw = fields.get("fairness")
    if raw is None:
        return None
    if not final_counts_in_clear(run.version.spec):
        raise Refused(
            "invalid_update",
            "this plan uses secure aggregation without fairness.dp_epsilon: its group counts "
            "only travel masked, never in an evaluation message",
        )
    try:
        return fairness_service.check_update_counts(
            run, {"fairness": raw, "metrics": {"global": {"n": n}}}
        )
    except fairness_service.FairnessCountsError as exc:
        raise Refused("invalid_update", str(exc)) from None


def evaluation_pool(run: Run) -> dict[str, Any]:
    """The run's final figures from the reports received (in the orchestrator's transaction);
    audits the final fairness report's flags. Stored as ``Run.evaluation``."""
    rows = list(
        SiloEvaluation.objects.filter(run=run).select_related("silo").order_by("silo__name")
    )
    version = rows[0].model_version if rows else final_model(run).number
    done = [r for r in rows if r.report is not None]
    missing = [r.silo.name for r in rows if r.report is None]
    target = plan_target(run.version.spec)
    if target.task != "binary":
        return _task_pool(run, target, version, rows, done, missing)
    histograms = {r.silo.name: evaluation.histogram_from_wire(r.report["histogram"]) for r in done}
    by_silo = {name: _silo_figures(h) for name, h in histograms.items()}
    result: dict[str, Any] = {
        "model_version": version,
        "asked": [r.silo.name for r in rows],
        "evaluated": [r.silo.name for r in done],
        "missing": missing,
        "metrics": (
            evaluation.pooled_metrics(evaluation.merge_histograms(histograms.values()))
            if histograms
            else None
        ),
        "by_silo": by_silo,
        "method": (
            f"pooled from per-site histograms of the predicted probability, {evaluation.SCORE_BINS} "
            f"bins on {evaluation.GRID} (the logit): accuracy at 0.5 and log loss exact, AUC "
            "within auc_error_bound of the exact AUC on the union of the held-out rows"
        ),
        "note": _note(rows, done, missing),
        "fairness": None,
        "fairness_note": None,
        "finished_at": timezone.now().isoformat(),
    }
    result["calibration"], result["calibration_note"] = pooled_calibration(done)
    if fairness_service.fairness_section(run.version.spec) is not None:
        result["fairness"], result["fairness_note"] = _final_fairness(run, version, done, by_silo)
    if mitigation.plan_kind(run.version.spec) == mitigation.POSTPROCESS:
        # The group thresholds become part of the final model version (its model card, the API).
        result["thresholds"], result["thresholds_note"] = mitigation.thresholds(
            run, [r.report["score_histograms"] for r in done if r.report.get("score_histograms")]
        )
        # What is deployed: the thresholded decisions on the pooled held-out rows (beside the
        # raw model's report at 0.5 in "fairness"); the final fairness warning reads this.
        result["thresholded_fairness"], result["thresholded_fairness_note"] = (
            mitigation.thresholded_fairness(run, version, result["thresholds"], done)
            if result["thresholds"] is not None
            else (None, "no thresholds were chosen: the raw model's decisions are what is left")
        )
        thresholded = result["thresholded_fairness"] or {}
        _audit(
            run,
            "mitigation.thresholds",
            model_version=version,
            chosen=result["thresholds"] is not None,
            note=result["thresholds_note"],
            in_sample=thresholded.get("in_sample"),
            thresholded_flags=[
                {"metric": f["metric"], "value": f["value"], "limit": f["limit"]}
                for f in thresholded.get("flags") or []
            ],
        )
    return result


def _task_pool(
    run: Run,
    target: tabular.TargetSpec,
    version: int,
    rows: list[SiloEvaluation],
    done: list[SiloEvaluation],
    missing: list[str],
) -> dict[str, Any]:
    """A multi-class or regression run's final figures: the sites' sums added, so every metric
    is that of the union of the held-out rows (docs/tasks.md, 'Pooled metrics, exact')."""
    parts = {r.silo.name: r.report["part"] for r in done}
    if target.task == "multiclass":
        names = list(target.classes or ())
        merge, report = task_metrics.merge_multiclass, task_metrics.multiclass_report
        method = (
            "pooled from per-site confusion matrices (accuracy, per-class and macro/weighted F1 "
            f"and log loss exact) and one-vs-rest histograms of p_k, {task_metrics.SCORE_BINS} "
            "bins in the logit (each class's AUC within auc_error_bound)"
        )
    else:
        names = []
        merge, report = task_metrics.merge_regression, task_metrics.regression_report
        method = (
            "pooled from per-site counts and sums (target moments merged with Chan et al.): "
            "RMSE, MAE, R2 and mean error exact on the union of the held-out rows"
        )

    def figures(part: Mapping[str, Any]) -> dict[str, Any]:
        result = report(part)
        if names:
            result["classes"] = names
        return result

    result: dict[str, Any] = {
        "task": target.task,
        "model_version": version,
        "asked": [r.silo.name for r in rows],
        "evaluated": [r.silo.name for r in done],
        "missing": missing,
        "metrics": figures(merge(parts.values())) if parts else None,
        "by_silo": {name: figures(part) for name, part in parts.items()},
        "method": method,
        "note": _note(rows, done, missing),
        "fairness": None,
        "fairness_note": None,
        "finished_at": timezone.now().isoformat(),
    }
    if fairness_service.fairness_section(run.version.spec) is not None:
        # Under its own key: "fairness" holds the binary report's shape (rates of a positive
        # class, the plan's limits), which the fairness pages and warnings read.
        result["task_fairness"], result["fairness_note"] = _task_fairness(target, version, done)
    return result


def _task_fairness(
    target: tabular.TargetSpec, version: int, done: list[SiloEvaluation]
) -> tuple[dict[str, Any] | None, str | None]:
    """Per sensitive attribute, the group fairness of the union of the held-out rows."""
    sent = [r.report["fairness"] for r in done if r.report.get("fairness")]
    if not sent:
        return None, f"the final model v{version} has no fairness report: no silo sent group sums"
    attributes = sorted({a for parts in sent for a in parts})
    report: dict[str, Any] = {"task": target.task, "final": True, "attributes": {}}
    for attribute in attributes:
        pieces = [parts[attribute] for parts in sent if attribute in parts]
        if target.task == "multiclass":
            merged = task_fairness.merge_multiclass_groups(pieces)
            report["attributes"][attribute] = task_fairness.multiclass_group_report(
                merged, list(target.classes or ())
            )
        else:
            merged_sums = task_fairness.merge_regression_groups(pieces)
            report["attributes"][attribute] = task_fairness.regression_group_report(merged_sums)
    return report, None


def _silo_figures(h: evaluation.ScoreHistogram) -> dict[str, Any]:
    figures = evaluation.pooled_metrics(h)
    return {key: figures[key] for key in ("auc", "auc_error_bound", "accuracy", "loss", "n")}


def _note(rows: list[SiloEvaluation], done: list[SiloEvaluation], missing: list[str]) -> str:
    if not rows:
        return "the final model was not evaluated: no silo could be asked"
    text = f"evaluated by {len(done)} of {len(rows)} silos asked"
    if missing:
        text += f"; no evaluation from {', '.join(missing)} (gone, refused or too late)"
    return text


def _final_fairness(
    run: Run, version: int, done: list[SiloEvaluation], by_silo: dict[str, Any]
) -> tuple[dict[str, Any] | None, str | None]:
    counts = {r.silo.name: r.report["fairness"] for r in done if r.report.get("fairness")}
    if not counts:
        why = (
            "the plan uses secure aggregation without fairness.dp_epsilon: its group counts "
            "only travel masked, and the final evaluation has no masked vector"
            if not final_counts_in_clear(run.version.spec)
            else "no silo sent group counts with its evaluation"
        )
        return None, f"the final model v{version} has no fairness report: {why}"
    report = fairness_service.build_report(
        run.version.spec,
        round_number=version + 1,
        attempt=1,
        counts_by_silo=counts,
        metrics_by_silo=by_silo,
    )
    report.update(round=None, final=True)
    for flag in report["flags"]:
        _audit(
            run,
            "fairness.flag",
            round=None,
            model_version=version,
            attribute=flag["attribute"],
            metric=flag["metric"],
            value=flag["value"],
            limit=flag["limit"],
            undefined_rates=len(flag.get("undefined_rates", [])),
        )
    return report, None


def _audit(run: Run, action: str, **data: Any) -> None:
    audit_append(
        actor="system",
        action=action,
        consortium_id=run.plan.consortium_id,
        object_type="run",
        object_id=run.pk,
        data=data,
    )
