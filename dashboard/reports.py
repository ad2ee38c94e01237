"""Model cards and compliance reports: one dict each, shown as a page and (cards) as JSON.

Sections whose data this server does not record yet (fairness reports, the privacy ledger) say
so explicitly ("not recorded") instead of leaving a blank a reader could mistake for zero.
"""

from __future__ import annotations

from typing import Any

from django.utils import timezone

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


def _fairness(run: Run) -> dict[str, Any]:
    return {
        "settings": run.version.spec.get("fairness"),
        "report": None,
        "status": f"{NOT_RECORDED}: this server does not compute fairness reports yet",
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
        "preprocessing_fitted": run.preprocessing is not None,
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
        "fairness": _fairness(run),
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
