"""Model cards and compliance reports: one dict each, shown as a page and (cards) as JSON.

Sections whose data is missing say so explicitly (no fairness section in the plan, no round
evaluated this version yet) instead of leaving a blank a reader could mistake for zero.
"""

from __future__ import annotations

from typing import Any

from django.utils import timezone

from dashboard.charts import FAIRNESS_METRICS
from fedcore import onnx_export
from federation import governance, selectors
from federation.models import ModelVersion, Run
from federation.services.audit import audit_head, audit_verify

NOT_RECORDED = "not recorded"


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


def _privacy(run: Run) -> dict[str, Any]:
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
    base: dict[str, Any] = {"settings": settings, "run": run.pk, "report": None}
    if not settings:
        return {
            **base,
            "status": "not applicable: the plan declares no fairness section, so the silos "
            "sent no group counts",
        }
    reports = selectors.run_fairness_reports(run)
    if version is not None:
        stored = selectors.model_version_fairness(version)
        if stored is None:
            latest = reports[-1].report if reports else None
            later = (
                f"; the latest report (round {latest['round']}) is about model "
                f"v{latest['model_version']}"
                if latest
                else ""
            )
            return {
                **base,
                "status": f"not evaluated: model v{version.number} is evaluated for fairness at "
                f"the start of round {version.number + 1}, which has not completed{later}",
            }
        summary = fairness_summary(stored.report)
    elif reports:
        summary = fairness_summary(reports[-1].report)
    else:
        return {**base, "status": f"{NOT_RECORDED}: no round of this run has completed yet"}
    summary["flags_in_run"] = sum(len(r.report.get("flags") or []) for r in reports)
    summary["rounds_reported"] = len(reports)
    return {
        **base,
        "report": summary,
        "status": f"round {summary['round']} evaluated model v{summary['model_version']} on the "
        "silos' held-out splits",
    }


def _deployment(version: ModelVersion) -> dict[str, Any]:
    """What a site needs to run the model: its input columns and the fitted preprocessing."""
    names = selectors.model_version_features(version)
    return {
        "feature_names": names,
        "preprocessing": version.run.preprocessing if names else None,
        "onnx": {
            "input": {"name": onnx_export.INPUT_NAME, "shape": ["batch", len(names or ())]},
            "output": {"name": onnx_export.OUTPUT_NAME, "shape": ["batch", 1]},
            "opset": onnx_export.OPSET,
            "note": "input: rows transformed by the fitted preprocessing, columns in "
            "feature_names order (fedcore.tabular.transform); output: the logit, "
            "sigmoid(logit) is the probability of the positive class",
        },
    }


def model_card(version: ModelVersion) -> dict[str, Any]:
    """What a model is, where it came from, who allowed it, and how well it does."""
    run = version.run
    plan_version = run.version
    spec = plan_version.spec
    rows = selectors.run_metric_rows(run)
    # Model v_k is the result of round k; round k+1 evaluates it at every silo before training.
    evaluation = _summary(rows, version.number + 1, ("global",)).get("global", {})
    last = selectors.run_model_versions(run).last()
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
            "evaluation_note": (
                f"the global model evaluated on the silos' held-out splits at the start of "
                f"round {version.number + 1} (example-weighted means)"
                if evaluation
                else "not evaluated: no later round evaluated this version"
            ),
            # Round k's local models (on the same splits) and training loss; its "global" scope
            # is the incoming model v_{k-1}, so it is not this version's.
            "training_round": _summary(rows, version.number, ("local", "train")) or None,
        },
        "privacy": _privacy(run),
        "fairness": _fairness(run, version),
    }


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
        "privacy": _privacy(run),
        "fairness": _fairness(run),
        "events": selectors.run_audit_events(run),
        "head": audit_head(),
        "verification": verification,
    }
