"""The server's side of a run's bias mitigation (docs/fairness.md, "Mitigation").

``reweighing``: each site sends, with its statistics, the rows of its training split per
(group of the plan's sensitive attribute, label) (:func:`checked_label_counts`); when the
preprocessing is fitted, :func:`compute` sums them, maps every group outside the attribute's
public list to ``__other__``, and computes Kamiran and Calders' weights
(``fedcore.fairness_mitigation.reweighing_weights``). They are stored on the run and sent with
every task, covered by its signed grant (``example_weights_sha256``); sites weight their loss.
A mitigation that cannot be computed (a group with no row at any site, a label missing) fails
the run before round 1 with the reason, never trains as if unmitigated.

``constraint`` (federated reductions, Agarwal et al. 2018): the same (group, label) counts of
the training rows fix the cost-sensitive problem; the server keeps the Lagrange multipliers'
logits theta on the run (``Run.mitigation``), starting at 0 (round 1 trains on the plain loss).
Each round, from the contributors' per-group confusion counts of the global model they received
(the counts every update carries for the fairness report), :func:`reduction_round` computes the
constraint violations gamma, steps theta (fairlearn's ExponentiatedGradient step, each key's
scaled by its group's size: ``reduction_gains``), and replaces
the run's ``example_weights`` with the new multipliers' per-(group, label) labels and weights:
the next round's tasks carry them, under the signed grant, on the reweighing path.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedcore import fairness, fairness_mitigation, tabular
from fedcore.plan import held_out_score_histograms_sent, is_evaluation_plan, parse_plan
from federation import fairness_outcome
from federation.models import Run, SiloStatistics

REWEIGHING = "reweighing"
POSTPROCESS = "postprocess"
CONSTRAINT = "constraint"
# The kinds whose sites send (group, label) counts of their training rows with the statistics.
LABEL_COUNTED = (REWEIGHING, CONSTRAINT)


def plan_kind(spec: Mapping[str, Any]) -> str:
    """The plan's ``fairness.mitigation`` kind (``none`` without one)."""
    if is_evaluation_plan(spec):  # it trains nothing: the plan language refuses a mitigation
        return "none"
    settings = parse_plan(spec).fairness
    return settings.mitigation.kind if settings is not None else "none"


def _releasable(spec: Mapping[str, Any], stats: Mapping[str, Any]) -> set[str]:
    """The group labels a site may send for the plan's attribute: those it already released."""
    plan = parse_plan(spec)
    assert plan.fairness is not None
    attribute = plan.fairness.sensitive_attribute
    column = next((c for c in plan.schema.columns if c.name == attribute), None)
    labels = {tabular.MISSING_CATEGORY, fairness.OTHER_GROUP}
    if column is not None and column.type == "boolean":
        return labels | {"false", "true"}
    if column is not None and column.type == "categorical":
        return labels | {str(v) for v in (stats.get("categories") or {}).get(attribute) or ()}
    return labels | {str(v) for v in plan.fairness.groups.get(attribute) or ()}


def checked_label_counts(
    run: Run, raw: Any, stats: Mapping[str, Any], where: str
) -> dict[str, dict[str, int]] | None:
    """A site's label counts as stored, or ValueError naming what is wrong: counts from a plan
    that does not reweigh, none from one that does, a malformed table, a group the site did not
    release in its statistics, or more rows than the site reported."""
    kind = plan_kind(run.version.spec)
    if kind not in LABEL_COUNTED:
        if raw is not None:
            raise ValueError(
                f"{where}: label_counts sent, but the plan's fairness.mitigation kind is {kind!r}"
            )
        return None
    if raw is None:
        raise ValueError(
            f"{where}: the plan weighs the training loss (fairness.mitigation kind {kind!r}) but "
            "no label_counts came with the statistics; update the agent"
        )
    counts = fairness_mitigation.merge_label_counts([raw])
    unknown = sorted(set(counts) - _releasable(run.version.spec, stats))
    if unknown:
        raise ValueError(
            f"{where}: label_counts name group(s) {unknown[:5]} that the site's statistics did "
            "not release; only released categories, __missing__ and __other__ may be sent"
        )
    total = sum(sum(cells.values()) for cells in counts.values())
    rows = stats.get("n_rows")
    noised = parse_plan(run.version.spec).fairness.dp_epsilon is not None  # type: ignore[union-attr]
    if isinstance(rows, int) and total > rows and not noised:  # noise may add rows
        raise ValueError(f"{where}: label_counts hold {total} rows, the statistics {rows}")
    return counts


def compute(run: Run, fitted: Mapping[str, Any]) -> dict[str, Any] | None:
    """The run's mitigation from its silos' statistics (in the orchestrator's transaction),
    None for a plan without one this server computes before round 1.

    Raises:
        fairness_mitigation.MitigationError: the weights cannot be computed (its reason).
    """
    spec = run.version.spec
    kind = plan_kind(spec)
    if kind not in LABEL_COUNTED:
        return None
    plan = parse_plan(spec)
    assert plan.fairness is not None
    attribute = plan.fairness.sensitive_attribute
    public = set(
        fairness.public_groups(plan.schema, fitted, plan.fairness.groups).get(attribute) or ()
    )
    rows = SiloStatistics.objects.filter(run=run).order_by("silo_id")
    merged = fairness_mitigation.merge_label_counts([r.label_counts or {} for r in rows])
    keyed: dict[str, dict[str, int]] = {}
    for group, cells in merged.items():  # a category the merge did not keep counts as other
        target = group if group in public else fairness.OTHER_GROUP
        total = keyed.setdefault(target, {"negatives": 0, "positives": 0})
        for cell, value in cells.items():
            total[cell] += value
    for group in public:  # every public group listed: an empty one is the maths' to judge
        keyed.setdefault(group, {"negatives": 0, "positives": 0})
    counts = {group: keyed[group] for group in sorted(keyed)}
    if kind == CONSTRAINT:
        settings = plan.fairness.mitigation
        # theta = 0: the multipliers cancel in (+, -) pairs, the plain error rate (fairlearn's
        # first iteration); reduction_weights also checks that every listed group has rows.
        weights = fairness_mitigation.reduction_weights({}, counts, settings.constraint)
        return {
            "kind": CONSTRAINT,
            "attribute": attribute,
            "counts": counts,
            "constraint": settings.constraint,
            "bound": settings.bound,
            "eta": settings.eta,
            "multipliers": settings.multipliers,
            "theta": {},
            "lambdas": {},
            "rounds": 0,
            "max_violation": None,
            "met": None,
            "example_weights": weights.to_json(),
        }
    weights = fairness_mitigation.reweighing_weights(counts)
    return {
        "kind": REWEIGHING,
        "attribute": attribute,
        "counts": counts,
        "example_weights": weights.to_json(),
    }


def example_weights(run: Run) -> dict[str, Any] | None:
    """What a task of this run carries as ``example_weights`` (None: nothing)."""
    mitigation = run.mitigation if isinstance(run.mitigation, Mapping) else None
    return mitigation.get("example_weights") if mitigation else None


def checked_score_histograms(
    run: Run, raw: Any, n: int, where: str, *, silo_id: int
) -> dict[str, dict[str, list[int]]] | None:
    """A site's per-group score histograms of the final model as stored (``postprocess``), or
    ValueError naming what is wrong: histograms from a plan that does not postprocess, none from
    one that does, a group outside the attribute's public list, a column of the wrong length or
    with a count that is not a non-negative integer, or (exact histograms only) a total other
    than the rows they count: the site's held-out rows (``n``), or with
    ``fairness.mitigation.rows`` "training" the training rows its statistics reported
    (``n_rows`` of its ``SiloStatistics``; a silo with none this run is not checked on its total,
    having reported no count to check against)."""
    spec = run.version.spec
    kind = plan_kind(spec)
    if kind != POSTPROCESS:
        if raw is not None:
            raise ValueError(
                f"{where}: score_histograms sent, but the plan's fairness.mitigation kind is "
                f"{kind!r}"
            )
        return None
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError(
            f"{where}: the plan postprocesses (fairness.mitigation kind 'postprocess') but no "
            "score_histograms came with the evaluation; update the agent"
        )
    plan = parse_plan(spec)
    assert plan.fairness is not None
    checked, total = _checked_histogram_table(run, plan, raw, where, "score_histograms")
    if plan.fairness.dp_epsilon is not None:  # noised histograms: any total
        return checked
    if plan.fairness.mitigation.rows == "training":
        stats = SiloStatistics.objects.filter(run=run, silo_id=silo_id).first()
        rows = stats.stats.get("n_rows") if stats is not None else None
        if isinstance(rows, int) and total != rows:
            raise ValueError(
                f"{where}: score_histograms hold {total} rows, the site's statistics reported "
                f"{rows} training rows (fairness.mitigation.rows 'training')"
            )
    elif total != n:
        raise ValueError(f"{where}: score_histograms hold {total} rows, the evaluation {n}")
    return checked


def checked_held_out_score_histograms(
    run: Run, raw: Any, n: int, where: str
) -> dict[str, dict[str, list[int]]] | None:
    """A site's per-group score histograms of its held-out rows as stored (``postprocess`` with
    rows "training": :func:`fedcore.plan.held_out_score_histograms_sent`), or ValueError naming
    what is wrong, by the rules of :func:`checked_score_histograms`: sent for a plan that does
    not ask for them, missing from one that does, a malformed table, or (exact histograms only)
    a total other than the evaluation's held-out rows (``n``)."""
    spec = run.version.spec
    if not held_out_score_histograms_sent(spec):
        if raw is not None:
            raise ValueError(
                f"{where}: held_out_score_histograms sent, but the plan chooses no thresholds "
                "on the training rows (they come only with fairness.mitigation kind "
                "'postprocess' and rows 'training')"
            )
        return None
    if not isinstance(raw, Mapping) or not raw:
        raise ValueError(
            f"{where}: the plan chooses its thresholds on the training rows (fairness.mitigation "
            "rows 'training') but no held_out_score_histograms came with the evaluation; "
            "update the agent"
        )
    plan = parse_plan(spec)
    assert plan.fairness is not None
    checked, total = _checked_histogram_table(run, plan, raw, where, "held_out_score_histograms")
    if plan.fairness.dp_epsilon is None and total != n:
        raise ValueError(
            f"{where}: held_out_score_histograms hold {total} rows, the evaluation {n}"
        )
    return checked


def _checked_histogram_table(
    run: Run, plan: Any, raw: Mapping[str, Any], where: str, key: str
) -> tuple[dict[str, dict[str, list[int]]], int]:
    """A score histogram table's groups and columns checked, and the rows it holds."""
    attribute = plan.fairness.sensitive_attribute
    public = fairness.public_groups(plan.schema, run.preprocessing, plan.fairness.groups)[attribute]
    size = plan.fairness.mitigation.score_bins + 1
    unknown = sorted(str(g) for g in raw if g not in public)
    if unknown:
        raise ValueError(f"{where}: {key} name group(s) {unknown[:5]} not in {public}")
    checked: dict[str, dict[str, list[int]]] = {}
    total = 0
    for group, cells in raw.items():
        if not isinstance(cells, Mapping) or set(cells) != set(fairness_mitigation.LABEL_CELLS):
            raise ValueError(f"{where}: {key}: group {group!r} must map negatives and positives")
        checked[group] = {}
        for cell in fairness_mitigation.LABEL_CELLS:
            column = cells[cell]
            if (
                not isinstance(column, list)
                or len(column) != size
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in column)
            ):
                raise ValueError(
                    f"{where}: {key}: group {group!r}: {cell} must hold {size} non-negative "
                    "integer counts (one per point of the score grid, "
                    "fairness.mitigation.score_bins + 1)"
                )
            checked[group][cell] = list(column)
            total += sum(column)
    return checked, total


def summed_histograms(
    histograms: list[Mapping[str, Mapping[str, list[int]]]],
) -> dict[str, dict[str, list[int]]]:
    """The sites' per-group score histograms added cell by cell."""
    summed: dict[str, dict[str, list[int]]] = {}
    for site in histograms:
        for group, cells in site.items():
            into = summed.setdefault(
                group, {cell: [0] * len(cells[cell]) for cell in fairness_mitigation.LABEL_CELLS}
            )
            for cell in fairness_mitigation.LABEL_CELLS:
                into[cell] = [a + b for a, b in zip(into[cell], cells[cell], strict=True)]
    return summed


def thresholds(
    run: Run, histograms: list[Mapping[str, Mapping[str, list[int]]]]
) -> tuple[dict[str, Any] | None, str | None]:
    """The final model's group thresholds from the sites' summed histograms, or None and the
    reason they cannot be chosen (for the run's evaluation and model card)."""
    plan = parse_plan(run.version.spec)
    assert plan.fairness is not None
    settings = plan.fairness.mitigation
    if not histograms:
        return None, "no silo sent score histograms of the final model"
    summed = summed_histograms(histograms)
    grid = np.linspace(0.0, 1.0, settings.score_bins + 1)  # the agent's (postprocess_grid)
    try:
        rules = fairness_mitigation.threshold_rules(
            summed, grid, constraint=settings.constraint, objective=settings.objective
        )
    except fairness_mitigation.MitigationError as exc:
        return None, f"no thresholds for the final model: {exc}"
    return {
        **rules.to_json(),
        "attribute": plan.fairness.sensitive_attribute,
        "rows": settings.rows,  # which rows' histograms chose them: "held_out" or "training"
        "histograms": summed,
        "note": (
            "fairlearn ThresholdOptimizer semantics (flip=False): bin the model's probability "
            "to the nearest grid point, then P(positive) = p0 [s > threshold0] + p1 "
            "[s > threshold1], mixed as p_ignore * constant + (1 - p_ignore) * that"
        ),
    }, None


def thresholded_fairness(
    run: Run, version: int, chosen: Mapping[str, Any], done: list[Any]
) -> tuple[dict[str, Any] | None, str | None]:
    """The final model's thresholded decisions on the pooled held-out rows against the plan's
    limits (``fairness_outcome.thresholded_report``), or None and why not. The held-out rows'
    histograms: with rows "held_out" those the thresholds were chosen from (in sample), with
    rows "training" the ``held_out_score_histograms`` every site sent beside them."""
    plan = parse_plan(run.version.spec)
    assert plan.fairness is not None
    in_sample = plan.fairness.mitigation.rows != "training"
    if in_sample:
        held_out = chosen["histograms"]
    else:
        sent = [r.report.get("held_out_score_histograms") for r in done]
        missing = [r.silo.name for r in done if not r.report.get("held_out_score_histograms")]
        if missing:  # a report of some sites' rows only would not be the pooled rows'
            return None, (
                f"no report of the thresholded decisions: {', '.join(missing)} sent no "
                "held-out score histograms"
            )
        held_out = summed_histograms([s for s in sent if s])
    try:
        return fairness_outcome.thresholded_report(
            chosen,
            held_out,
            run.version.spec["fairness"],
            model_version=version,
            in_sample=in_sample,
            noised=plan.fairness.dp_epsilon,
        ), None
    except ValueError as exc:  # a held-out group without a rule (no training row of it)
        return None, f"no report of the thresholded decisions: {exc}"


FAIR_AGGREGATION = "fair_aggregation"


def fairfed_weights(
    round_: Any, spec: Mapping[str, Any], updates: list[Mapping[str, Any]]
) -> tuple[dict[Any, float], dict[str, Any]]:
    """A ``fair_aggregation`` round's aggregation weights (FairFed, Ezzeldin et al. 2023) from
    the contributors' group counts of the global model they received, and the state carried to
    the next round (kept in the round's ``aggregation_stats["fairfed"]``).

    omega-bar of round k-1 comes from the last completed round before this one; a silo that did
    not take part there starts from its share of this round's examples (the paper's n_k / n).

    Raises:
        fairness_mitigation.MitigationError / ValueError: a contributor without group counts,
            or weights FairFed cannot compute (the reason, for the round's failure).
    """
    from federation.models import Round, Update

    plan = parse_plan(spec)
    assert plan.fairness is not None
    attribute = plan.fairness.sensitive_attribute
    settings = plan.fairness.mitigation
    sent = {
        u.silo_id: u.fairness
        for u in Update.objects.filter(round=round_, silo_id__in=[x["silo_id"] for x in updates])
    }
    counts: dict[str, Any] = {}
    for u in updates:
        table = (sent.get(u["silo_id"]) or {}).get(attribute)
        if not table:
            raise fairness_mitigation.MitigationError(
                f"FairFed needs every contributor's group counts of {attribute!r}; silo "
                f"{u['silo_id']} sent none"
            )
        counts[str(u["silo_id"])] = table
    before = (
        Round.objects.filter(
            run_id=round_.run_id, number__lt=round_.number, status=Round.Status.COMPLETED
        )
        .order_by("-number", "-attempt")
        .first()
    )
    carried = ((before.aggregation_stats or {}).get("fairfed") or {}) if before else {}
    carried_raw = carried.get("omega_bar") or {}
    total = sum(float(u["num_examples"]) for u in updates) or 1.0
    previous = {
        str(u["silo_id"]): float(carried_raw.get(str(u["silo_id"]), u["num_examples"] / total))
        for u in updates
    }
    step = fairness_mitigation.fairfed_step(
        counts, previous, beta=settings.beta, metric=settings.constraint
    )
    weights = {u["silo_id"]: step.weights[str(u["silo_id"])] for u in updates}
    state = {
        "omega_bar": step.raw,
        "weights": step.weights,
        "deltas": step.deltas,
        "global_value": step.global_value,
        "local_values": step.local_values,
        "fallback": step.fallback,
        "beta": settings.beta,
        "metric": settings.constraint,
    }
    return weights, state


def _key_text(key: fairness_mitigation.Key) -> str:
    """A multiplier's key (sign, event, group) as JSON can keep it: ``"+|all|f"``."""
    return "|".join(key)


def _key_from_text(text: str) -> fairness_mitigation.Key:
    sign, event, group = text.split("|", 2)
    return (sign, event, group)


def reduction_round(
    mitigation: Mapping[str, Any],
    attribute: str,
    contributed: list[Mapping[str, Any] | None],
) -> dict[str, Any]:
    """A ``constraint`` run's mitigation after one round: the multipliers stepped with the
    violations of the round's incoming global model, and the next round's example weights.

    Args:
        mitigation: the run's ``Run.mitigation`` (from :func:`compute` or an earlier round).
        attribute: the plan's sensitive attribute.
        contributed: each contributor's ``Update.fairness`` (per-group confusion counts of the
            global model it received, on its held-out rows), in any order.

    Returns:
        The new ``Run.mitigation`` (the same keys; ``theta``, ``lambdas``, ``example_weights``,
        ``gamma``, ``max_violation``, ``met`` and ``rounds`` updated).

    Raises:
        fairness_mitigation.MitigationError: a contributor sent no counts for the attribute,
            fewer than two groups have rows, or the weights cannot be computed (the reason).
    """
    tables = []
    for sent in contributed:
        table = (sent or {}).get(attribute)
        if not table:
            raise fairness_mitigation.MitigationError(
                f"the constraint needs every contributor's group counts of {attribute!r} for the "
                "model it received (in a secure round: their masked sum); an update came without "
                "them"
            )
        tables.append(table)
    merged = {
        group: cells
        for group, cells in fairness.merge_counts(tables).items()
        if sum(cells.values()) > 0  # a group with no held-out row this round tells nothing
    }
    if len(merged) < 2:
        raise fairness_mitigation.MitigationError(
            f"the contributors' held-out rows hold {len(merged)} group(s) of {attribute!r}: a "
            "parity constraint needs rows of at least two groups to measure a gap"
        )
    constraint = mitigation["constraint"]
    bound = float(mitigation["bound"])
    counts = mitigation["counts"]
    known = set(fairness_mitigation.reduction_index(counts, constraint))
    gamma = {
        key: value
        for key, value in fairness_mitigation.reduction_gamma(merged, constraint).items()
        if key in known  # a pair without training rows has no multiplier to move
    }
    theta = {_key_from_text(k): float(v) for k, v in (mitigation.get("theta") or {}).items()}
    # Older state (before the key): fairlearn's constant step on the last multipliers.
    schedule = str(mitigation.get("multipliers") or "last")
    t = int(mitigation.get("rounds") or 0) + 1  # this multiplier update's number
    eta = float(mitigation["eta"])
    if schedule == "decaying":  # stochastic approximation: gamma is measured on samples
        eta = eta / math.sqrt(t)
    stepped = fairness_mitigation.reduction_step(
        theta,
        gamma,
        bound=bound,
        eta=eta,
        gains=fairness_mitigation.reduction_gains(counts, constraint),
    )
    theta = {**theta, **stepped}
    lambdas = fairness_mitigation.multipliers(theta, bound)
    summed = {_key_from_text(k): float(v) for k, v in (mitigation.get("lambda_sum") or {}).items()}
    for key, value in lambdas.items():
        summed[key] = summed.get(key, 0.0) + value
    used = lambdas
    if schedule == "averaged":  # the mean of every update's multipliers, 1..t
        used = {key: value / t for key, value in summed.items()}
    weights = fairness_mitigation.reduction_weights(used, counts, constraint)
    violation = max(gamma.values(), default=0.0)
    return {
        **mitigation,
        "theta": {_key_text(k): v for k, v in sorted(theta.items())},
        "lambdas": {_key_text(k): v for k, v in sorted(lambdas.items())},
        "lambda_sum": {_key_text(k): v for k, v in sorted(summed.items())},
        "trained_lambdas": {_key_text(k): v for k, v in sorted(used.items())},
        "gamma": {_key_text(k): v for k, v in sorted(gamma.items())},
        "rounds": int(mitigation.get("rounds") or 0) + 1,
        "max_violation": violation,
        "met": violation <= bound,
        "example_weights": weights.to_json(),
    }


def constraint_round(
    round_: Any, spec: Mapping[str, Any], updates: list[Mapping[str, Any]]
) -> dict[str, Any] | None:
    """:func:`reduction_round` of a ``constraint`` run's round (None for another plan): the
    new ``Run.mitigation``, stored with the round's completion (federation.services.rounds)."""
    from federation.models import Update

    if plan_kind(spec) != CONSTRAINT:
        return None
    run = Run.objects.only("mitigation").get(pk=round_.run_id)
    if not isinstance(run.mitigation, Mapping) or run.mitigation.get("kind") != CONSTRAINT:
        raise fairness_mitigation.MitigationError(
            "the run has no constraint state: its statistics pass did not compute one"
        )
    plan = parse_plan(spec)
    assert plan.fairness is not None
    if plan.secure_aggregation:  # the contributors' tables summed under the masks, only that
        from federation.models import SecAggAttempt

        merged = SecAggAttempt.objects.filter(round=round_).values_list("counts", flat=True).first()
        sent = [merged]
    else:
        sent = list(
            Update.objects.filter(
                round=round_, silo_id__in=[u["silo_id"] for u in updates]
            ).values_list("fairness", flat=True)
        )
    return reduction_round(run.mitigation, plan.fairness.sensitive_attribute, sent)
