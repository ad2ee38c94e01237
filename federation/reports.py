"""Reports built once for the dashboard pages and the REST API: model cards, fairness reports,
compliance reports.

Sections whose data is missing say so explicitly (no fairness section in the plan, no round
evaluated this version yet) instead of leaving a blank a reader could mistake for zero.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict
from typing import Any

from django.utils import timezone
from django.utils.text import slugify

from fedcore import onnx_export, tabular
from federation import fairness_outcome, governance, selectors
from federation.models import ModelVersion, Run
from federation.services.audit import audit_head, audit_verify

NOT_RECORDED = "not recorded"
# The group differences a fairness report checks: (metric key, label, the plan's limit key).
FAIRNESS_METRICS = (
    (
        "demographic_parity_difference",
        "Demographic parity difference",
        "max_demographic_parity_difference",
    ),
    ("equalized_odds_difference", "Equalized odds difference", "max_equalized_odds_difference"),
)


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def _decisions(run: Run) -> list[dict[str, Any]]:
    return [
        {
            "organization": a.organization.name,
            "user": a.user.get_username(),
            "role": a.get_role_display(),
            "decision": a.decision,
            "reason": a.reason,
            "plan_hash": a.plan_hash,
            "at": _iso(a.created_at),
            # What the sites verify against their pinned steward keys (None: unsigned).
            "signature": a.signature,
        }
        for a in selectors.version_decisions(run.version)
    ]


def _summary(
    rows: list[dict[str, Any]], round_number: int, scopes: tuple[str, ...]
) -> dict[str, dict[str, float]]:
    """Round-level metrics of one round (its latest attempt) in the given scopes, by scope and
    name; "n" (the mean size of the evaluation splits) is left out."""
    rows = [
        r
        for r in rows
        if r["round_number"] == round_number
        and r["silo_name"] is None
        and r["metric_scope"] in scopes
        and r["metric_name"] != "n"
    ]
    if not rows:
        return {}
    latest = max(r["attempt"] for r in rows)
    out: dict[str, dict[str, float]] = {}
    for r in rows:
        if r["attempt"] == latest:
            out.setdefault(r["metric_scope"], {})[r["metric_name"]] = r["metric_value"]
    return out


def run_privacy(run: Run) -> dict[str, Any]:
    privacy = run.version.spec.get("privacy") or {}
    mode = privacy.get("mode", "none")
    if mode == "none":
        note = "not applicable: the plan uses no differential privacy, so nothing is spent"
    else:
        note = (
            "each silo's privacy ledger entries of this run, composed by the RDP accountant "
            f"at delta={privacy.get('delta', 1e-5):g}"
        )
    return {
        "mode": mode,
        "settings": privacy or None,
        "epsilon_spent": selectors.run_privacy_spent(run),
        "status": note,
    }


FAIRNESS_RATES = ("selection_rate", "tpr", "fpr", "accuracy")


def _group_row(group: str | None, rates: dict[str, Any], undefined: set[tuple[Any, str]]) -> dict:
    return {
        "group": group,
        "count": rates["count"],
        "rates": [
            {"value": rates[rate], "undefined": (group, rate) in undefined}
            for rate in FAIRNESS_RATES
        ],
    }


def _attribute_view(name: str, entry: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """One sensitive attribute of a stored report, shaped for the page's tables."""
    metrics = entry.get("report")
    primary = name == report.get("sensitive_attribute")
    thresholds = (report.get("thresholds") or {}) if primary else {}
    flagged = {flag["metric"] for flag in entry.get("flags") or []}
    view: dict[str, Any] = {
        "name": name,
        "primary": primary,
        "error": entry.get("error"),
        "rows": [],
        "overall": None,
        "differences": [],
        "undefined": [],
    }
    if metrics:
        undefined = {(u["group"], u["metric"]) for u in metrics["undefined_rates"]}
        view["rows"] = [
            _group_row(group, rates, undefined) for group, rates in metrics["by_group"].items()
        ]
        view["overall"] = _group_row(None, metrics["overall"], undefined)
        view["undefined"] = metrics["undefined_rates"]
        view["differences"] = [
            {
                "label": label,
                "value": metrics[metric],
                "limit": thresholds.get(limit_key),
                "flagged": metric in flagged,
            }
            for metric, label, limit_key in FAIRNESS_METRICS
        ]
    representation = entry.get("representation") or {}
    groups = representation.get("groups") or []

    def shares(part: dict[str, Any]) -> dict[str, Any]:
        return {"count": part["count"], "shares": [part["shares"].get(g) for g in groups]}

    view["representation"] = {
        "groups": groups,
        "rows": [
            {"silo": silo, **shares(part)}
            for silo, part in (representation.get("by_silo") or {}).items()
        ],
        "overall": shares(representation["overall"]) if representation.get("overall") else None,
    }
    return view


def final_evaluation(run: Run) -> dict[str, Any] | None:
    """The run's final evaluation (``Run.evaluation``), None until its evaluation phase ended."""
    return run.evaluation if isinstance(run.evaluation, dict) else None


def _final_fairness_report(run: Run) -> dict[str, Any] | None:
    final = final_evaluation(run)
    return final.get("fairness") if final else None


# The columns of a multi-class or regression run's final-evaluation table (heading, key).
TASK_TABLE_COLUMNS: dict[str, tuple[tuple[str, str], ...]] = {
    "multiclass": (
        ("accuracy", "accuracy"),
        ("macro F1", "macro_f1"),
        ("weighted F1", "weighted_f1"),
        ("AUC (one-vs-rest)", "auc_ovr"),
        ("log loss", "loss"),
    ),
    "regression": (("RMSE", "rmse"), ("MAE", "mae"), ("R²", "r2"), ("mean error", "mean_error")),
}


def final_task_table(run: Run) -> dict[str, Any] | None:
    """A multi-class or regression run's final figures per silo and pooled, as a table: the
    columns and one row per silo then the pooled row (exact on the union of the held-out rows);
    None for a binary run or before the final evaluation."""
    final = final_evaluation(run)
    if not final or final.get("task", "binary") not in TASK_TABLE_COLUMNS:
        return None
    columns = TASK_TABLE_COLUMNS[final["task"]]

    def row(name: str, figures: dict[str, Any], pooled: bool = False) -> dict[str, Any]:
        values = [figures.get(key) for _, key in columns]
        return {"name": name, "n": figures.get("n"), "values": values, "pooled": pooled}

    rows = [row(name, figures) for name, figures in sorted(final.get("by_silo", {}).items())]
    if final.get("metrics"):
        rows.append(row("pooled (every silo's held-out rows)", final["metrics"], pooled=True))
    return {
        "task": final["task"],
        "columns": [heading for heading, _ in columns],
        "rows": rows,
        "method": final.get("method"),
    }


def task_metrics_report(run: Run) -> dict[str, Any] | None:
    """A multi-class or regression run's final figures for the compliance report: the table of
    :func:`final_task_table` and, per sensitive attribute, the largest group disparity of
    ``Run.evaluation["task_fairness"]`` (metric, class for multi-class, difference); None for a
    binary run or before the final evaluation."""
    table = final_task_table(run)
    if table is None:
        return None
    final = final_evaluation(run) or {}
    attributes = ((final.get("task_fairness") or {}).get("attributes")) or {}
    disparities = [
        {"attribute": name, **(entry.get("largest_disparity") or {})}
        for name, entry in sorted(attributes.items())
    ]
    return {
        **table,
        "model_version": final.get("model_version"),
        "largest_disparities": disparities,
        "fairness_note": final.get("fairness_note"),
    }


def _fairness_reports(run: Run) -> list[dict[str, Any]]:
    """Every fairness report of a run, oldest first: one per round (round k's about model
    v(k-1)), then the final evaluation's (about the final model)."""
    stored = [entry.report for entry in selectors.run_fairness_reports(run)]
    final = _final_fairness_report(run)
    return [*stored, final] if final else stored


def run_fairness(run: Run) -> dict[str, Any]:
    """A run's fairness report as the page and the API show it: the plan's settings and limits,
    every stored report (one per round; round k's is about model v(k-1), the run's final
    evaluation about the final model), the latest one shaped per attribute, the performance
    spread across silos and every threshold flag raised."""
    settings = run.version.spec.get("fairness")
    stored = _fairness_reports(run)
    latest = stored[-1] if stored else None
    rows = selectors.run_metric_rows(run) if stored else []
    round_metrics = {
        r["round"]: _summary(rows, r["round"], ("global",)).get("global", {})
        for r in stored
        if r.get("round") is not None
    }
    return {
        "settings": settings,
        "mitigation": fairness_outcome.mitigation_view(run.version.spec, run.mitigation),
        "final_warning": fairness_outcome.final_fairness_warning(run.evaluation),
        # A postprocess run whose thresholds bring the raw model within the limits (no warning).
        "final_info": fairness_outcome.final_fairness_info(run.evaluation),
        # Per report: the model's accuracy and AUC beside its disparities and the plan's limits.
        "trade_off": fairness_outcome.trade_off(stored, round_metrics, final_evaluation(run)),
        "plan_limits": [
            {"label": label, "value": (settings or {}).get(limit_key)}
            for _, label, limit_key in FAIRNESS_METRICS
        ],
        "note": _fairness(run)["status"],
        "latest": latest,
        "attributes": [
            _attribute_view(name, entry, latest) for name, entry in latest["attributes"].items()
        ]
        if latest
        else [],
        "spread": [
            {"metric": metric, "spread": latest["performance_spread"].get(metric)}
            for metric in ("accuracy", "auc")
        ]
        if latest
        else [],
        "flags": [
            {**flag, "round": r["round"], "model_version": r["model_version"]}
            for r in stored
            for flag in r.get("flags") or []
        ],
        "reports": stored,
    }


def fairness_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The headline of a stored fairness report: its plan attribute's differences vs limits."""
    attribute = report.get("sensitive_attribute")
    entry = (report.get("attributes") or {}).get(attribute) or {}
    metrics = entry.get("report") or {}
    thresholds = report.get("thresholds") or {}
    flagged = {flag["metric"] for flag in report.get("flags") or []}
    rows = [
        {
            "metric": metric,
            "label": label,
            "value": metrics.get(metric),
            "limit": thresholds.get(limit_key),
            "flagged": metric in flagged,
        }
        for metric, label, limit_key in FAIRNESS_METRICS
    ]
    return {
        "round": report.get("round"),
        "model_version": report.get("model_version"),
        "attribute": attribute,
        "groups": len(metrics.get("by_group") or {}),
        "records": (metrics.get("overall") or {}).get("count"),
        "metrics": rows,
        "undefined_rates": len(metrics.get("undefined_rates") or []),
        "flags": report.get("flags") or [],
        "silos": report.get("silos") or [],
        "dp": report.get("dp"),
        "error": entry.get("error"),
    }


def _fairness(run: Run, version: ModelVersion | None = None) -> dict[str, Any]:
    """The fairness section: for a model card the report about that version (round v+1's), for
    a compliance report the run's latest report and every flag raised."""
    settings = run.version.spec.get("fairness")
    base: dict[str, Any] = {
        "settings": settings,
        "run": run.pk,
        "report": None,
        "mitigation": fairness_outcome.mitigation_view(run.version.spec, run.mitigation),
        # The run's verdict, in a compliance report only (a card is about one version).
        "final_warning": (
            fairness_outcome.final_fairness_warning(run.evaluation) if version is None else None
        ),
        "final_info": (
            fairness_outcome.final_fairness_info(run.evaluation) if version is None else None
        ),
        "thresholded": None,
    }
    if not settings:
        return {
            **base,
            "status": "not applicable: the plan declares no fairness section, so the silos "
            "sent no group counts",
        }
    reports = _fairness_reports(run)
    final = final_evaluation(run)
    final_note = (final or {}).get("fairness_note")
    if version is None or (final and final.get("model_version") == version.number):
        # a postprocess run's deployed decisions: its thresholds on the pooled held-out rows
        base["thresholded"] = fairness_outcome.thresholded_decisions(final)
    if version is not None:
        if final and final.get("model_version") == version.number:
            stored_report = final.get("fairness")
        else:
            found = selectors.model_version_fairness(version)
            stored_report = found.report if found is not None else None
        if stored_report is None:
            if final_note and final and final.get("model_version") == version.number:
                return {**base, "status": f"not evaluated: {final_note}"}
            latest = reports[-1] if reports else None
            later = (
                f"; the latest report (round {latest['round']}) is about model "
                f"v{latest['model_version']}"
                if latest
                else ""
            )
            return {
                **base,
                "status": f"not evaluated: model v{version.number} is evaluated for fairness at "
                f"the start of round {version.number + 1} or, for the final model, at the end of "
                f"the run, which has not happened{later}",
            }
        summary = fairness_summary(stored_report)
    elif reports:
        summary = fairness_summary(reports[-1])
    else:
        return {**base, "status": f"{NOT_RECORDED}: no round of this run has completed yet"}
    summary["flags_in_run"] = sum(len(r.get("flags") or []) for r in reports)
    summary["rounds_reported"] = len(reports)
    who = (
        "the final evaluation"
        if summary["round"] is None
        else f"round {summary['round']} (before training)"
    )
    status = f"{who} evaluated model v{summary['model_version']} on the silos' held-out splits"
    if version is None and final_note:
        status += f"; {final_note}"
    return {**base, "report": summary, "status": status}


class ModelFileMismatch(Exception):
    """The stored model file is not the one the registry (and the audit log) describe."""


def model_file(version: ModelVersion) -> bytes:
    """The model's safetensors file as stored, checked against its recorded SHA-256: a file
    that does not match is never handed out (ModelFileMismatch)."""
    data = selectors.model_version_bytes(version)
    if hashlib.sha256(data).hexdigest() != version.checksum:
        raise ModelFileMismatch(
            f"the stored file of model v{version.number} of run {version.run_id} does not "
            "match its recorded SHA-256; it was not sent"
        )
    return data


def model_file_stem(version: ModelVersion) -> str:
    """The download name of a model version, without its extension."""
    return f"{slugify(version.run.plan.name) or 'model'}-run{version.run_id}-v{version.number}"


def _deployment(version: ModelVersion) -> dict[str, Any]:
    """What a site needs to run the model: its input columns, the fitted preprocessing and, for
    the final model of a postprocess plan, its group thresholds."""
    names = selectors.model_version_features(version)
    target = tabular.DatasetSchema.from_dict(version.run.version.spec["schema"]).target
    final = final_evaluation(version.run)
    thresholds = (
        final.get("thresholds") if final and final.get("model_version") == version.number else None
    )
    onnx: dict[str, Any] = {
        "input": {"name": onnx_export.INPUT_NAME, "shape": ["batch", len(names or ())]},
        "output": {
            "name": onnx_export.OUTPUT_NAMES[target.task],
            "shape": ["batch", target.n_outputs],
        },
        "opset": onnx_export.OPSET,
        "note": "input: rows transformed by the fitted preprocessing, columns in "
        f"feature_names order (fedcore.tabular.transform); output: {ONNX_OUTPUT[target.task]}",
    }
    rules = selectors.model_version_thresholds(version) if thresholds else None
    if rules is not None:  # the graph applies them (fedcore.onnx_export)
        groups = onnx_export.threshold_groups(rules)
        onnx["group_input"] = {
            "name": onnx_export.GROUP_INPUT_NAME,
            "shape": ["batch"],
            "type": "int64",
            "groups": groups,
        }
        onnx["decision_output"] = {"name": onnx_export.DECISION_NAME, "shape": ["batch"]}
        onnx["thresholds_note"] = (
            f"input {onnx_export.GROUP_INPUT_NAME!r}: each row's index in groups (any other "
            f"index, e.g. {len(groups)}: a group without a rule, never positive); output "
            f"{onnx_export.DECISION_NAME!r}: P(decision = 1) under the row's group threshold "
            "rule, as the server applies the thresholds (0 or 1 for a deterministic rule)"
        )
    return {
        "feature_names": names,
        "preprocessing": version.run.preprocessing if names else None,
        # Decisions of a postprocess plan: its group thresholds, which the ONNX graph applies
        # too (input "group", output "decision_probability").
        "thresholds": thresholds,
        "onnx": onnx,
    }


# What the ONNX graph's output means, per task (docs/tasks.md).
ONNX_OUTPUT = {
    "binary": "the logit, sigmoid(logit) is the probability of the positive class",
    "multiclass": "one logit per class in the order of the schema's target classes, "
    "softmax(logits) the class probabilities",
    "regression": "the predicted value in the units the model learnt (a standardised target: "
    "multiply by preprocessing target.std and add target.mean)",
}

# The pooled figures a model card shows, per task (federation.services.evaluation).
CARD_FIGURES = {
    "binary": ("auc", "auc_error_bound", "accuracy", "loss", "n"),
    "multiclass": ("accuracy", "macro_f1", "weighted_f1", "auc_ovr", "loss", "n"),
    "regression": ("rmse", "mae", "r2", "mean_error", "n"),
}


def model_card(version: ModelVersion) -> dict[str, Any]:
    """What a model is, where it came from, who allowed it, and how well it does."""
    run = version.run
    plan_version = run.version
    spec = plan_version.spec
    rows = selectors.run_metric_rows(run)
    evaluation, evaluation_note = _version_evaluation(run, version, rows)
    last = selectors.run_model_versions(run).last()
    evaluated = selectors.evaluation_plan_of(run)
    return {
        "model": {
            "id": version.pk,
            "run": run.pk,
            "version": version.number,
            "final": last is not None and last.pk == version.pk and not run.active,
            "round": version.round.number if version.round else None,
            "checksum_sha256": version.checksum,
            "size_bytes": version.size_bytes,
            "format": "safetensors",
            "created_at": _iso(version.created_at),
            "tensors": version.signature,
            "architecture": spec.get("model"),
            # An evaluation plan's run: the model it evaluates, copied as this version (a
            # run's version, or an uploaded model with its name and uploader); else null.
            "source": evaluated["source"] if evaluated else None,
        },
        "plan": {
            "id": run.plan_id,
            "name": run.plan.name,
            "version": plan_version.number,
            "plan_hash": run.plan_hash,
            "training": spec.get("training"),
            "aggregation": spec.get("aggregation"),
            "secure_aggregation": bool(spec.get("secure_aggregation", False)),
        },
        "approvals": _decisions(run),
        "data_schema": spec.get("schema"),
        "preprocessing_fitted": bool(run.preprocessing),
        "deployment": _deployment(version),
        "silos": [
            {
                "name": c["silo"].name,
                "organization": c["silo"].organization.name,
                "rows": c["row_count"],
                "updates_sent": c["updates_sent"],
                "examples_trained": c["examples_sent"],
            }
            for c in selectors.run_contributions(run)
        ],
        "metrics": {
            "evaluation": evaluation or None,
            "evaluation_note": evaluation_note,
            # Round k's local models (on the same splits) and training loss; its "global" scope
            # is the incoming model v_{k-1}, so it is not this version's.
            "training_round": _summary(rows, version.number, ("local", "train")) or None,
        },
        "privacy": run_privacy(run),
        "fairness": _fairness(run, version),
    }


def _version_evaluation(
    run: Run, version: ModelVersion, rows: list[dict[str, Any]]
) -> tuple[dict[str, Any], str]:
    """A model version's evaluation and what it is: the final evaluation's pooled figures for
    the final model, else the start of round v+1's means over the silos."""
    final = final_evaluation(run)
    if final and final.get("model_version") == version.number:
        pooled = final.get("metrics")
        if not pooled:
            return {}, f"not evaluated: {final.get('note')}"
        task = final.get("task", "binary")
        figures = {key: pooled[key] for key in CARD_FIGURES[task]}
        what = (  # an evaluation plan's run says which rows it evaluated
            f"the version evaluated by an evaluation plan, pooled over {final['rows_note']}"
            if final.get("rows_note")
            else "the final model evaluated at the end of the run on the union of the silos' "
            "held-out rows"
        )
        if task != "binary":
            return figures, (
                f"{what} ({pooled['n']} rows; {final.get('note')}): {final.get('method')}"
            )
        return figures, (
            f"{what} ({pooled['n']} rows; {final.get('note')}): accuracy and loss exact, "
            f"AUC from {pooled['bins']}-bin score histograms, within auc_error_bound of the "
            "exact value"
        )
    # Model v_k is the result of round k; round k+1 evaluates it at every silo before training.
    means = _summary(rows, version.number + 1, ("global",)).get("global", {})
    if not means:
        return {}, "not evaluated: no later round evaluated this version"
    return means, (
        f"the global model evaluated on the silos' held-out splits at the start of round "
        f"{version.number + 1}: means of the silos' figures weighted by their held-out rows (a "
        "mean of per-silo AUCs is not the AUC on the pooled rows)"
    )


def compliance_report(run: Run) -> dict[str, Any]:
    """For an auditor: the plan version and hash, who approved it, the data used, privacy
    spent, and the run's audit trail with the chain head."""
    version = run.version
    verification = audit_verify()
    return {
        "generated_at": timezone.now(),
        "run": run,
        "plan": run.plan,
        "version": version,
        "state": governance.approval_state(version),
        "decisions": selectors.version_decisions(version),
        "contributions": selectors.run_contributions(run),
        "privacy": run_privacy(run),
        "fairness": _fairness(run),
        "task_metrics": task_metrics_report(run),
        "analysis": _analysis_record(run),
        "evaluated": selectors.evaluation_plan_of(run),
        "events": selectors.run_audit_events(run),
        "head": audit_head(),
        "verification": verification,
    }


def compliance_report_json(run: Run) -> dict[str, Any]:
    """The compliance report with plain values instead of model objects, for the API."""
    report = compliance_report(run)
    version = report["version"]
    head = report["head"]
    return {
        "generated_at": _iso(report["generated_at"]),
        "run": {
            "id": run.pk,
            "status": run.status,
            # Not null: the run ended, but its final model exceeds a fairness limit of the plan.
            "fairness_warning": fairness_outcome.final_fairness_warning(run.evaluation),
            # Not null: the raw model exceeds a limit, its deployed thresholds bring it within.
            "fairness_info": fairness_outcome.final_fairness_info(run.evaluation),
            "started_at": _iso(run.started_at),
            "finished_at": _iso(run.finished_at),
            "plan_hash": run.plan_hash,
        },
        "plan": {
            "id": run.plan_id,
            "name": run.plan.name,
            "consortium": run.plan.consortium_id,
            "version": version.number,
            "spec": version.spec,
        },
        "approval_state": asdict(report["state"]),
        "decisions": _decisions(run),
        "data_used": [
            {
                "silo": c["silo"].name,
                "organization": c["silo"].organization.name,
                "rows": c["row_count"],
                "updates_sent": c["updates_sent"],
                "examples_trained": c["examples_sent"],
            }
            for c in report["contributions"]
        ],
        "privacy": report["privacy"],
        "fairness": report["fairness"],
        "final_evaluation": final_evaluation(run),
        # An evaluation plan's run: what it evaluates (a run's version or an uploaded model).
        "evaluated": report["evaluated"],
        "task_metrics": report["task_metrics"],
        "analysis": _analysis_json(report["analysis"]),
        "audit_events": [
            {
                "index": e.index,
                "at": _iso(e.created_at),
                "actor": e.actor,
                "action": e.action,
                "object_type": e.object_type,
                "object_id": e.object_id,
                "data": e.data,
                "hash": e.hash,
            }
            for e in report["events"]
        ],
        "audit_head": head,
        "audit_verification": asdict(report["verification"]),
    }


def _analysis_record(run: Run) -> dict[str, Any] | None:
    """An analysis run's part of the compliance report (None for training): the analysis, its
    steps, what each site was asked and answered (or refused), and what was released under
    which disclosure settings, or why nothing was."""
    analysis = run_analysis(run)
    if analysis["kind"] is None:
        return None
    result = analysis["result"] or {}
    released = {
        key: result[key]
        for key in (
            "sites",
            "min_cell_count",
            "suppressed",
            "coarsening",
            "noise",
            "answered",
            "missing",
        )
        if key in result
    }
    return {
        "kind": analysis["kind"],
        "spec": run.version.spec["analysis"],
        "steps": analysis["steps"],
        "released": bool(analysis["result"]),
        "release": released,
        "withheld": "" if analysis["result"] else run.error,
        "sites": selectors.run_analysis_contributions(run),
    }


def _analysis_json(record: dict[str, Any] | None) -> dict[str, Any] | None:
    if record is None:
        return None
    sites = [{**site, "silo": site["silo"].name} for site in record["sites"]]
    return {**record, "sites": sites}


def run_analysis(run: Run) -> dict[str, Any]:
    """An analysis run's state and released result (``kind`` None for a training run)."""
    from fedcore.plan import is_analysis

    spec = run.version.spec
    if not is_analysis(spec):
        return {
            "run": run.pk,
            "status": run.status,
            "kind": None,
            "steps": [],
            "step": None,
            "result": None,
            "error": "",
        }
    state = run.analysis or {}
    steps = list(state.get("steps", []))
    asking = run.active and "step" in state and "result" not in state
    return {
        "run": run.pk,
        "status": run.status,
        "kind": spec["analysis"]["kind"],
        "steps": steps,
        "step": steps[state["step"]] if asking else None,
        "result": state.get("result"),
        "error": run.error,
    }
