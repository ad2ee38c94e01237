"""The privacy ledger: what each silo's data has spent, composed by a real accountant.

Every DP mechanism applied to a silo's data appends a PrivacyLedgerEntry with its parameters
(noise multiplier, sample rate, steps, delta). A silo's epsilon is the RDP accountant's
composition over its whole history at the silo's ledger delta, never a sum of per-round
epsilons. Budgets are per silo, set by the consortium; a plan whose projected total exceeds a
budget cannot be approved, and a silo whose budget cannot afford the next round stops being
selected (the run goes on with the others if enough remain).

Pure epsilon-DP releases (the noisy fairness counts, mechanism "fairness") are not sampled
Gaussian mechanisms: their entries carry ``epsilon_pure`` and are added to the RDP total by basic
composition, (e1, delta) then (e2, 0) gives (e1 + e2, delta). That is valid and simple; it is
tight for a few small releases and conservative for many (docs/fairness.md). The noised
numeric statistics of the statistics pass (mechanism "statistics", ``privacy.statistics_epsilon``,
Laplace) are pure epsilon-DP too, charged once per run to every silo that sent them.
"""

from __future__ import annotations

import math
from typing import Any

from django.db import transaction

from fedcore.plan import held_out_score_histograms_sent, is_analysis, is_evaluation_plan
from fedcore.privacy import accounting
from federation.models import PlanVersion, PrivacyLedgerEntry, Run, Silo
from federation.services.audit import audit_append

ACCOUNTANT = "rdp"
DEFAULT_DELTA = 1e-5

Mechanism = tuple[float, float, int]


def ledger_delta(silo: Silo, plan_delta: float | None = None) -> float:
    """The delta a silo's epsilon is reported at: its budget's, else the plan's, else 1e-5."""
    if silo.delta_budget is not None:
        return float(silo.delta_budget)
    return float(plan_delta) if plan_delta is not None else DEFAULT_DELTA


PURE = "fairness"  # the mechanism of pure epsilon-DP entries (no RDP composition)
STATISTICS = "statistics"  # the statistics pass's noised numeric statistics, pure epsilon-DP
ANALYSIS = "analysis"  # an analysis plan's count table with discrete Laplace noise, pure
ANALYSIS_GAUSSIAN = "analysis_gaussian"  # the same with discrete Gaussian noise: RDP, q = 1
PURE_MECHANISMS = (PURE, STATISTICS, ANALYSIS)


def silo_history(silo: Silo) -> list[Mechanism]:
    """Every sampled Gaussian mechanism applied to the silo's data, oldest first."""
    return [
        (e.noise_multiplier, e.sample_rate, e.steps)
        for e in PrivacyLedgerEntry.objects.filter(silo=silo)
        .exclude(mechanism__in=PURE_MECHANISMS)
        .order_by("created_at", "pk")
    ]


def silo_pure_epsilon(silo: Silo) -> float:
    """The sum of the silo's pure epsilon-DP entries (basic composition)."""
    values = PrivacyLedgerEntry.objects.filter(
        silo=silo, mechanism__in=PURE_MECHANISMS
    ).values_list("epsilon_pure", flat=True)
    return float(sum(value or 0.0 for value in values))


def fairness_epsilon_per_round(spec: dict[str, Any]) -> float:
    """What one round of the plan's noisy fairness counts costs a silo (0.0 without DP counts).

    Each reported sensitive attribute is one count table of L1 sensitivity 1 released with
    ``fairness.dp_epsilon``; k tables of the same rows compose to k * epsilon.
    """
    from fedcore.fairness import reported_attributes
    from fedcore.tabular import DatasetSchema

    section = spec.get("fairness")
    if not isinstance(section, dict) or section.get("dp_epsilon") is None:
        return 0.0
    schema = DatasetSchema.from_dict(spec["schema"])
    tables = len(reported_attributes(schema, section.get("groups")))
    return float(section["dp_epsilon"]) * tables


def plan_fairness_epsilon(spec: dict[str, Any]) -> float:
    """What a whole run of the plan's noisy fairness counts costs a silo: every round, the
    final evaluation's tables of the last model (federation.services.evaluation), and for
    ``reweighing``/``constraint`` the (group, label) counts of the training rows sent with the
    statistics (one table); ``postprocess`` the final model's score histograms (one table, and
    one more of the held-out rows with rows "training":
    ``fedcore.plan.held_out_score_histograms_sent``)."""
    per_round = fairness_epsilon_per_round(spec)
    if not per_round:
        return 0.0
    # An evaluation plan trains nothing: its one release is the evaluation's tables.
    rounds = int((spec.get("training") or {}).get("rounds", 0))
    total = per_round * (rounds + 1)
    mitigation = (spec.get("fairness") or {}).get("mitigation") or {}
    if mitigation.get("kind") in ("reweighing", "constraint", "postprocess"):
        # + the training label counts, or the final model's score histograms: one table
        total += float(spec["fairness"]["dp_epsilon"])
    if held_out_score_histograms_sent(spec):  # + the held-out rows' histograms: one table
        total += float(spec["fairness"]["dp_epsilon"])
    return total


def plan_statistics_epsilon(spec: dict[str, Any]) -> float:
    """What a run's noised statistics pass costs a silo (``privacy.statistics_epsilon``, else 0)."""
    privacy = spec.get("privacy") or {}
    value = privacy.get("statistics_epsilon")
    return float(value) if value is not None else 0.0


def plan_pure_epsilon(spec: dict[str, Any]) -> float:
    """A whole run's pure epsilon-DP releases at a silo: fairness counts and statistics, or an
    analysis plan's Laplace-noised table."""
    if is_analysis(spec):
        noise = _analysis_noise(spec)
        return noise.epsilon if noise is not None and noise.mechanism == "laplace" else 0.0
    return plan_fairness_epsilon(spec) + plan_statistics_epsilon(spec)


def _analysis_noise(spec: dict[str, Any]):
    from fedcore.plan import parse_analysis_plan

    return parse_analysis_plan(spec).privacy


def _analysis_mechanism(spec: dict[str, Any]) -> Mechanism | None:
    """An analysis plan's Gaussian-noised table as an RDP mechanism: one step, no sampling,
    noise multiplier sigma (sensitivity 1); None without Gaussian noise."""
    noise = _analysis_noise(spec)
    if noise is None or noise.mechanism != "gaussian":
        return None
    assert noise.sigma is not None
    return noise.sigma, 1.0, 1


def analysis_charge(*, run: Run, silo: Silo, noise: Any) -> PrivacyLedgerEntry:
    """Charge a silo's ledger for the noised table it released in an analysis run
    (``noise``: the plan's ``fedcore.analytics.noise.AnalysisNoise``): Laplace as a pure
    epsilon entry, Gaussian as one RDP step of noise multiplier sigma."""
    if noise.mechanism == "laplace":
        return ledger_append(
            silo=silo,
            run=run,
            round_number=None,
            mechanism=ANALYSIS,
            noise_multiplier=1.0 / noise.epsilon,  # the discrete Laplace scale of one cell
            sample_rate=1.0,
            steps=1,
            delta=DEFAULT_DELTA,
            epsilon_pure=noise.epsilon,
        )
    return ledger_append(
        silo=silo,
        run=run,
        round_number=None,
        mechanism=ANALYSIS_GAUSSIAN,
        noise_multiplier=noise.sigma,
        sample_rate=1.0,
        steps=1,
        delta=noise.delta,  # the silo's delta budget's, if it has one (ledger_delta)
        epsilon_reported=noise.epsilon,
    )


def composed_epsilon(history: list[Mechanism], delta: float) -> float:
    """Epsilon of a history of sampled Gaussian mechanisms (0.0 for an empty history)."""
    if not history:
        return 0.0
    return accounting.epsilon_of_history(history, delta=delta, accountant=ACCOUNTANT)


def silo_spent_epsilon(silo: Silo) -> float:
    """Epsilon the silo's data has spent so far (RDP composition plus pure releases)."""
    return composed_epsilon(silo_history(silo), ledger_delta(silo)) + silo_pure_epsilon(silo)


def training_rows(silo: Silo, spec: dict[str, Any]) -> int:
    """The silo's training rows as the plan will see them (registered rows minus the holdout)."""
    fraction = float(spec.get("evaluation", {}).get("test_fraction", 0.2))
    return max(1, math.ceil(silo.row_count * (1.0 - fraction)))


def plan_mechanism(
    spec: dict[str, Any], silo: Silo, *, rows: int | None = None
) -> Mechanism | None:
    """(noise multiplier, sample rate, steps) a whole run of the plan applies to a silo's data
    (for an analysis plan: its Gaussian-noised table, else None; none for an evaluation plan:
    it trains nothing; docs/analytics.md)."""
    if is_analysis(spec):
        return _analysis_mechanism(spec)
    if is_evaluation_plan(spec):  # no training: no DP-SGD noise
        return None
    privacy = spec.get("privacy") or {"mode": "none"}
    training = spec["training"]
    return accounting.plan_mechanism(
        privacy,
        rows=rows if rows is not None else training_rows(silo, spec),
        batch_size=training["batch_size"],
        local_epochs=training["local_epochs"],
        rounds=training["rounds"],
        accountant=ACCOUNTANT,
    )


def round_mechanism(
    spec: dict[str, Any], silo: Silo, *, rows: int | None = None
) -> Mechanism | None:
    """The mechanism of one round of the plan at a silo (the run's steps split over rounds; an
    analysis plan's run is its one round)."""
    whole = plan_mechanism(spec, silo, rows=rows)
    if is_analysis(spec):
        return whole
    if whole is None:
        return None
    noise, sample_rate, steps = whole
    return noise, sample_rate, max(1, steps // spec["training"]["rounds"])


def client_noise_multiplier(spec: dict[str, Any]) -> float:
    """The noise multiplier z of a client-level DP plan (noise std z * clip on the sum of the
    clipped updates): one "row" per silo, calibrated to the plan's target over its rounds."""
    training = spec["training"]
    z = accounting.plan_noise_multiplier(
        spec["privacy"],
        rows=1,
        batch_size=training["batch_size"],
        local_epochs=training["local_epochs"],
        rounds=training["rounds"],
        accountant=ACCOUNTANT,
    )
    if z is None:
        raise ValueError(
            "the plan's client-level DP has neither noise_multiplier nor target_epsilon"
        )
    return z


def plan_delta(spec: dict[str, Any]) -> float | None:
    """The plan's delta, when it uses DP (an analysis plan's: its Gaussian noise's)."""
    if is_analysis(spec):
        noise = _analysis_noise(spec)
        return noise.delta if noise is not None else None
    privacy = spec.get("privacy") or {}
    if privacy.get("mode", "none") == "none":
        return None
    return float(privacy.get("delta", DEFAULT_DELTA))


def projected_total(silo: Silo, version: PlanVersion) -> float:
    """The silo's epsilon after a whole run of this version, composed with its history."""
    mechanism = plan_mechanism(version.spec, silo)
    history = silo_history(silo) + ([mechanism] if mechanism else [])
    pure = silo_pure_epsilon(silo) + plan_pure_epsilon(version.spec)
    return composed_epsilon(history, ledger_delta(silo, plan_delta(version.spec))) + pure


def can_afford_round(silo: Silo, spec: dict[str, Any]) -> bool:
    """Whether one more round of the plan fits the silo's budget (always, without a budget)."""
    if silo.epsilon_budget is None:
        return True
    mechanism = round_mechanism(spec, silo)
    fairness = plan_pure_epsilon(spec) if is_analysis(spec) else fairness_epsilon_per_round(spec)
    if mechanism is None and not fairness:
        return True
    history = silo_history(silo) + ([mechanism] if mechanism else [])
    pure = silo_pure_epsilon(silo) + fairness
    total = composed_epsilon(history, ledger_delta(silo, plan_delta(spec))) + pure
    return total <= silo.epsilon_budget


def evaluation_epsilon(spec: dict[str, Any]) -> float:
    """What the final evaluation's noisy tables cost a silo: its group count tables and a
    ``postprocess`` plan's score histograms (one table; two with rows "training")."""
    per_round = fairness_epsilon_per_round(spec)
    if not per_round:
        return 0.0
    mitigation = (spec.get("fairness") or {}).get("mitigation") or {}
    tables = int(mitigation.get("kind") == "postprocess") + int(
        held_out_score_histograms_sent(spec)
    )
    return per_round + float(spec["fairness"]["dp_epsilon"]) * tables


def can_afford_evaluation(silo: Silo, spec: dict[str, Any]) -> bool:
    """Whether the final evaluation's noisy fairness tables fit the silo's budget (no training
    happens then: only those tables are released under DP)."""
    fairness = evaluation_epsilon(spec)
    if silo.epsilon_budget is None or not fairness:
        return True
    history = silo_history(silo)
    pure = silo_pure_epsilon(silo) + fairness
    total = composed_epsilon(history, ledger_delta(silo, plan_delta(spec))) + pure
    return total <= silo.epsilon_budget


@transaction.atomic
def ledger_append(
    *,
    silo: Silo,
    run: Run | None,
    round_number: int | None,
    mechanism: str,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    epsilon_reported: float | None = None,
    epsilon_pure: float | None = None,
) -> PrivacyLedgerEntry:
    """Record a mechanism applied to a silo's data, its composed total and an audit event.

    ``epsilon_pure`` is required for (and only for) the pure epsilon-DP mechanisms "fairness"
    and "statistics": the entry then stays out of the RDP composition and adds its epsilon to
    the total.
    """
    if (mechanism in PURE_MECHANISMS) != (epsilon_pure is not None):
        raise ValueError(f"epsilon_pure goes with mechanisms {PURE_MECHANISMS} and only with them")
    Silo.objects.select_for_update().filter(pk=silo.pk).first()  # one writer per silo ledger
    history = silo_history(silo)
    if epsilon_pure is None:
        history.append((noise_multiplier, sample_rate, steps))
    pure = silo_pure_epsilon(silo) + (epsilon_pure or 0.0)
    total = composed_epsilon(history, ledger_delta(silo, delta)) + pure
    entry = PrivacyLedgerEntry.objects.create(
        silo=silo,
        run=run,
        round_number=round_number,
        mechanism=mechanism,
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
        delta=ledger_delta(silo, delta),
        epsilon_reported=epsilon_reported,
        epsilon_pure=epsilon_pure,
        epsilon_total=total,
    )
    audit_append(
        actor="system",
        action="budget.spent",
        consortium_id=silo.consortium_id,
        object_type="silo",
        object_id=silo.pk,
        data={
            "run": run.pk if run else None,
            "round": round_number,
            "mechanism": mechanism,
            "noise_multiplier": noise_multiplier,
            "sample_rate": sample_rate,
            "steps": steps,
            **({"epsilon_pure": epsilon_pure} if epsilon_pure is not None else {}),
            "epsilon_total": total,
            "epsilon_budget": silo.epsilon_budget,
        },
    )
    return entry
