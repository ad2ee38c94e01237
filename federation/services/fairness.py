"""Group fairness of the global model across silos: receiving counts, charging, reporting.

For a plan with a ``fairness`` section every site sends, with its update, the per-group
confusion counts of the global model it received (version k-1 in round k) on its held-out split,
per sensitive attribute (``clientagent.trainer.fairness_counts``). The server checks them
(:func:`check_update_counts`, a refusal names the problem), keeps them on the ``Update`` and, when
the plan releases them with DP (``fairness.dp_epsilon``), charges each sender's privacy ledger at
receipt (:func:`charge_update_counts`). At aggregation :func:`record_round_report` merges the
round's counts into a ``FairnessReport``: exactly fairlearn's metrics on the pooled held-out rows
(``fedcore.fairness``), representation per silo, the silos' performance spread and the plan's
threshold flags, each flag also appended to the audit log (``fairness.flag``). docs/fairness.md.

Secure rounds: a site's counts ride at the end of its masked vector (``fedcore.secure_updates.
count_layout``), never in clear; the server only learns their sum over the contributors
(``SecAggAttempt.counts``, written when the sum is unmasked), so the report of a secure round has
the merged counts, their fairness metrics and the overall representation, but no per-silo
representation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fedcore import fairness
from fedcore.tabular import DatasetSchema
from federation import ledger
from federation.models import FairnessReport, Round, Run, SecAggAttempt, Silo
from federation.services.audit import audit_append

Counts = dict[str, dict[str, int]]

MECHANISM = "laplace"  # what the agents release with (fedcore.fairness.noisy_counts' default)


class FairnessCountsError(ValueError):
    """An update's fairness counts are refused; the message names the attribute and group."""


def fairness_section(spec: Mapping[str, Any]) -> dict[str, Any] | None:
    """The plan's fairness section, or None when it has none."""
    section = spec.get("fairness")
    return section if isinstance(section, dict) else None


def dp_epsilon(spec: Mapping[str, Any]) -> float | None:
    """The epsilon of each count table the plan's sites release, or None for exact counts."""
    section = fairness_section(spec) or {}
    value = section.get("dp_epsilon")
    return None if value is None else float(value)


def run_public_groups(run: Run) -> dict[str, list[str]]:
    """The group labels each reported sensitive attribute of the run may carry."""
    spec = run.version.spec
    section = fairness_section(spec) or {}
    schema = DatasetSchema.from_dict(spec["schema"])
    return fairness.public_groups(schema, run.preprocessing, section.get("groups"))


def _renamed(exc: ValueError, attribute: str) -> str:
    # merge_counts names the site ("site 0"); here there is one site and the field is known.
    return str(exc).replace("site 0", f"fairness.{attribute}", 1)


def check_update_counts(run: Run, fields: Mapping[str, Any]) -> dict[str, Counts] | None:
    """The update's checked fairness counts, or None when it carries none.

    Refused (FairnessCountsError): counts for a plan without a fairness section (a release the
    consortium did not approve), an attribute that is not a reported sensitive attribute, counts
    that ``fedcore.fairness.merge_counts`` refuses (not a mapping, unknown or missing cell,
    negative or non-integer count), a group outside the attribute's public list, and -- for exact
    counts -- totals that differ from the ``n`` of the update's global metrics (the same
    held-out rows are counted once per attribute).
    """
    raw = fields.get("fairness")
    if raw is None:
        return None
    section = fairness_section(run.version.spec)
    if section is None:
        raise FairnessCountsError(
            "the plan has no fairness section, so an update may not carry fairness counts"
        )
    if not isinstance(raw, Mapping):
        raise FairnessCountsError("fairness must map sensitive attributes to group counts")
    public = run_public_groups(run)
    checked: dict[str, Counts] = {}
    for attribute, counts in raw.items():
        if attribute not in public:
            expected = ", ".join(public) or "none"
            raise FairnessCountsError(
                f"fairness.{attribute}: not a reported sensitive attribute of the plan "
                f"(expected: {expected})"
            )
        try:
            merged = fairness.merge_counts([counts])
        except ValueError as exc:
            raise FairnessCountsError(_renamed(exc, attribute)) from None
        unknown = sorted(set(merged) - set(public[attribute]))
        if unknown:
            raise FairnessCountsError(
                f"fairness.{attribute}: group(s) {', '.join(map(repr, unknown))} are not in the "
                f"public group list ({', '.join(map(repr, public[attribute]))})"
            )
        checked[attribute] = merged
    if dp_epsilon(run.version.spec) is None:
        evaluated = (fields.get("metrics") or {}).get("global")
        n = evaluated.get("n") if isinstance(evaluated, Mapping) else None
        for attribute, counts in checked.items():
            total = sum(sum(cells.values()) for cells in counts.values())
            if isinstance(n, int) and not isinstance(n, bool) and total != n:
                raise FairnessCountsError(
                    f"fairness.{attribute}: the counts cover {total} records, the global model "
                    f"was evaluated on {n}"
                )
    return checked


def charge_update_counts(*, run: Run, round_: Round, silo: Silo, counts: dict[str, Counts]) -> None:
    """Charge the silo's ledger for the DP release of an accepted update's counts (the update
    row keeps them: ``Update.fairness``).

    Call in the transaction that creates the update. Each attribute's table is one pure
    epsilon-DP release of the same held-out rows, so the entry's epsilon is ``len(counts)`` times
    the plan's ``dp_epsilon`` (basic composition), added to the RDP total of the ledger.
    """
    counts_charge(run=run, round_number=round_.number, silo=silo, tables=len(counts))


def counts_charge(*, run: Run, round_number: int | None, silo: Silo, tables: int) -> None:
    """Charge a silo's ledger for ``tables`` count tables it released with DP (none: no-op).

    Also for a secure round, whose tables the server only sees summed: each site added its own
    noise before masking, so its release costs what a clear one does. ``round_number`` None:
    the final evaluation's tables (federation.services.evaluation).
    """
    epsilon = dp_epsilon(run.version.spec)
    if epsilon is None or not tables:
        return
    ledger.ledger_append(
        silo=silo,
        run=run,
        round_number=round_number,
        mechanism=ledger.PURE,
        noise_multiplier=1.0 / epsilon,  # the discrete Laplace scale of one count
        sample_rate=1.0,
        steps=tables,  # count tables released
        delta=ledger.plan_delta(run.version.spec) or ledger.DEFAULT_DELTA,
        epsilon_pure=epsilon * tables,
    )


def _unit_interval(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) and 0.0 <= value <= 1.0 else None


def build_report(
    spec: Mapping[str, Any],
    *,
    round_number: int,
    attempt: int,
    counts_by_silo: Mapping[str, Mapping[str, Counts]],
    metrics_by_silo: Mapping[str, Mapping[str, Any]],
    merged: Mapping[str, Counts] | None = None,
) -> dict[str, Any]:
    """The fairness report of a round, from what its silos sent (no database access).

    Args:
        spec: the plan spec (its fairness section gives the primary attribute and thresholds).
        round_number: the round; the report is about model version ``round_number - 1``.
        attempt: the round's attempt.
        counts_by_silo: silo name -> its checked counts (attribute -> group counts).
        metrics_by_silo: silo name -> its ``global`` metrics (accuracy, auc) for the spread.
        merged: a secure round's counts, summed under the masks (attribute -> group counts);
            then ``counts_by_silo`` is empty and the representation has no per-silo part.

    Returns:
        A JSON-able dict: ``round``, ``attempt``, ``model_version``, ``sensitive_attribute``,
        ``thresholds``, ``dp`` (None or ``{"epsilon", "mechanism"}``), ``silos``,
        ``attributes`` (per attribute: ``counts`` merged, ``report`` = fairness_report of them or
        None with ``error``, ``representation``, ``flags``), ``performance_spread`` and
        ``flags`` (the primary attribute's threshold flags, each naming the attribute).
    """
    section = fairness_section(spec) or {}
    primary = section.get("sensitive_attribute")
    thresholds = {
        key: section[key] for key in fairness.THRESHOLD_METRICS if section.get(key) is not None
    }
    attributes: dict[str, Any] = {}
    names = sorted(
        {name for counts in counts_by_silo.values() for name in counts} | set(merged or {})
    )
    names.sort(key=lambda name: name != primary)  # the plan's attribute first
    for attribute in names:
        if merged is not None:
            pooled = fairness.merge_counts([merged[attribute]])
            representation = fairness.representation({"all": pooled})
            representation["by_silo"] = {}  # one site's share is exactly what stays masked
        else:
            by_silo = {
                silo: counts[attribute]
                for silo, counts in sorted(counts_by_silo.items())
                if attribute in counts
            }
            pooled = fairness.merge_counts(list(by_silo.values()))
            representation = fairness.representation(by_silo)
        entry: dict[str, Any] = {
            "counts": pooled,
            "report": None,
            "error": None,
            "representation": representation,
            "flags": [],
        }
        try:
            entry["report"] = fairness.fairness_report(pooled)
        except ValueError as exc:  # no record at all (empty held-out splits)
            entry["error"] = str(exc)
        if entry["report"] is not None and attribute == primary:
            entry["flags"] = [
                {**flag, "attribute": attribute}
                for flag in fairness.threshold_flags(entry["report"], thresholds)
            ]
        attributes[attribute] = entry
    spread_input = {
        silo: {metric: _unit_interval(metrics.get(metric)) for metric in fairness.SPREAD_METRICS}
        for silo, metrics in sorted(metrics_by_silo.items())
    }
    epsilon = section.get("dp_epsilon")
    return {
        "round": round_number,
        "attempt": attempt,
        "model_version": round_number - 1,
        "sensitive_attribute": primary,
        "thresholds": thresholds,
        "dp": None if epsilon is None else {"epsilon": float(epsilon), "mechanism": MECHANISM},
        "silos": sorted(counts_by_silo or metrics_by_silo),
        "secure": merged is not None,
        "attributes": attributes,
        "performance_spread": fairness.performance_spread(spread_input),
        "flags": attributes.get(primary, {}).get("flags", []) if primary else [],
    }


def record_round_report(round_: Round, run: Run) -> FairnessReport | None:
    """Merge an aggregating round's counts into its FairnessReport and audit its flags.

    Call in the aggregation's transaction. None when the plan has no fairness section or no
    contributing silo sent counts. A secure round's counts are the unmasked sum of the
    contributors' masked tables (``SecAggAttempt.counts``).
    """
    spec = run.version.spec
    if fairness_section(spec) is None:
        return None
    counts_by_silo: dict[str, dict[str, Counts]] = {}
    metrics_by_silo: dict[str, dict[str, Any]] = {}
    for update in round_.updates.select_related("silo").order_by("silo__name"):
        evaluated = (update.metrics or {}).get("global")
        if isinstance(evaluated, dict):
            metrics_by_silo[update.silo.name] = evaluated
        if update.fairness:
            counts_by_silo[update.silo.name] = update.fairness
    merged = (
        SecAggAttempt.objects.filter(round=round_).values_list("counts", flat=True).first()
        if spec.get("secure_aggregation") is True
        else None
    )
    if not counts_by_silo and not merged:
        return None
    report = build_report(
        spec,
        round_number=round_.number,
        attempt=round_.attempt,
        counts_by_silo={} if merged else counts_by_silo,
        metrics_by_silo=metrics_by_silo,
        merged=merged or None,
    )
    stored, _ = FairnessReport.objects.update_or_create(round=round_, defaults={"report": report})
    for flag in report["flags"]:
        audit_append(
            actor="system",
            action="fairness.flag",
            consortium_id=run.plan.consortium_id,
            object_type="run",
            object_id=run.pk,
            data={
                "round": round_.number,
                "model_version": round_.number - 1,
                "attribute": flag["attribute"],
                "metric": flag["metric"],
                "value": flag["value"],
                "limit": flag["limit"],
                "undefined_rates": len(flag.get("undefined_rates", [])),
            },
        )
    return stored
