"""The site's own checks on every ``stats_request`` and ``task``, before any local data is read.

Two layers, both fail closed:

1. :func:`check_authorization`: the request carries the server's Ed25519-signed grant
   (:mod:`fedcore.signing`) for this silo, this run, this consortium and the exact plan it
   carries, with an approval by this silo's data steward; for a task also its round (within the
   plan's rounds), the hashes of the weights and preprocessing received, and the expiry. A
   compromised relay or a forged, changed or stale task cannot make the site train. Failure:
   ``not_authorized``. (The agent's own round count, :mod:`clientagent.roundlog`, refuses a
   replayed round just before training.)
2. :func:`check_policy`: the site's ``[policy]`` (model kinds, differential privacy, secure
   aggregation, privacy budget, local approval by the site operator) allows the plan, whatever the
   consortium approved. Failure: ``policy_refused``. ``require_dp`` and the epsilon caps count
   only noise added at the site (:func:`site_adds_noise`): a plan relying on central noise is
   refused by them.

Then, for DP plans, once the local data is read and before each round trains,
:func:`check_round_budget` checks the privacy caps again with the real numbers: the mechanism for
this site's actual training rows instead of the plan's target epsilon.

The privacy budget (``max_epsilon_per_plan``, ``max_epsilon_total``) is counted from the sent log
(:mod:`clientagent.records`): each ``update`` line holds the epsilon *increment* that update
added to its run's total, so the log's epsilon summed over a run is what the run has spent at
this site (composed by the accountant across its rounds, a tight bound), and summed over the
whole log is the site's total. Across runs the total is a plain sum (basic composition: a valid
but conservative bound; each run's delta adds up too). A run's charge is its projection or what
it has already spent, whichever is larger, never both.

Both raise :class:`clientagent.trainer.TaskError` whose ``reason`` (the full explanation, with
what the operator can do) goes to the local log at ERROR level and whose ``shared_reason`` goes
to the server.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clientagent.config import ModelsConfig, PolicyConfig
from clientagent.records import APPROVED, REJECTED, Decision, short_hash
from clientagent.trainer import RoundPrivacy, TaskError
from fedcore import model_kinds
from fedcore.approvals import ApprovalSignatureError, verified_approval
from fedcore.models import INSTALLED, ModelSpecError, validate_model_spec
from fedcore.plan import plan_hash as compute_plan_hash
from fedcore.plan import run_settings
from fedcore.signing import (
    ANALYSIS_KIND,
    EVALUATE_KIND,
    STATS_KIND,
    TASK_KIND,
    AuthorizationError,
    check_request_scope,
    verify_authorization,
)

NOT_AUTHORIZED = "not_authorized"  # the signed grant is missing, forged or does not cover this
POLICY_REFUSED = "policy_refused"  # the grant is fine, the site's [policy] says no
PRIVACY_MODES = ("none", "sample", "client")
# Summing many small per-round epsilons in binary floating point must not refuse a plan that
# lands exactly on the limit.
EPSILON_TOLERANCE = 1e-9


@dataclass(frozen=True)
class PlanPrivacy:
    """The checked ``privacy`` section of a plan (docs/internals/governance.md)."""

    mode: str
    target_epsilon: float | None

    @property
    def projected_epsilon(self) -> float | None:
        """What the plan will spend: its target epsilon, 0.0 without DP, None when it says not."""
        if self.mode == "none":
            return 0.0
        return self.target_epsilon


class PlanPolicyError(ValueError):
    """The plan's privacy section is malformed, so the policy cannot be checked."""


def plan_privacy(plan: Mapping[str, Any]) -> PlanPrivacy:
    """Read ``plan["privacy"]`` (absent: mode ``none``); PlanPolicyError if it is malformed."""
    section = plan.get("privacy")
    if section is None:
        return PlanPrivacy(mode="none", target_epsilon=None)
    if not isinstance(section, Mapping):
        raise PlanPolicyError("the plan's privacy section is not an object")
    mode = section.get("mode", "none")
    if mode not in PRIVACY_MODES:
        raise PlanPolicyError(
            f"the plan's privacy.mode {mode!r} is not one this agent knows "
            f"({', '.join(PRIVACY_MODES)})"
        )
    target = section.get("target_epsilon")
    if target is not None and (
        isinstance(target, bool)
        or not isinstance(target, int | float)
        or not math.isfinite(target)
        or target <= 0
    ):
        raise PlanPolicyError(f"the plan's privacy.target_epsilon {target!r} is not a number > 0")
    return PlanPrivacy(mode=mode, target_epsilon=None if target is None else float(target))


def site_adds_noise(mode: str, *, secure_aggregation: bool) -> bool:
    """Whether a plan's DP noise is added at the site, so that it holds against the server.

    Sample-level DP (``mode = "sample"``) noises every local step at the site. Client-level DP
    (``mode = "client"``) adds noise at the site only under secure aggregation (each site adds
    its share of the distributed noise before masking); without it the server adds all the
    noise to the clear updates, and a compromised server can leave it out.
    """
    return mode == "sample" or (mode == "client" and secure_aggregation)


def _without_site_noise(mode: str) -> str:
    if mode == "client":
        return (
            "relies on noise the server adds (privacy.mode 'client' without "
            "secure_aggregation), which a compromised server can leave out"
        )
    return f"adds no noise (privacy.mode {mode!r})"


def _refusal(plan_hash: str, shared: str, hint: str, *, run: int, round: int | None) -> TaskError:
    """A policy_refused error: the shared part goes to the server, the hint stays local."""
    return TaskError(
        POLICY_REFUSED,
        f"plan {short_hash(plan_hash)} refused by this site's policy: {shared}; {hint}",
        run=run,
        round=round,
        shared_reason=f"refused by the site's policy: {shared}",
    )


def check_authorization(
    fields: Mapping[str, Any],
    *,
    public_key: str,
    silo: str | None,
    consortium: str | None,
    weights_sha256: str | None = None,
    check_expiry: bool = True,
) -> dict[str, Any]:
    """Check the request's signed grant covers it; return the grant's payload.

    A task (fields with a ``round``) is checked against its grant's scope
    (:func:`fedcore.signing.check_request_scope`): its round within the plan's rounds, the
    run's total rounds, the SHA-256 of the global weights received and of the preprocessing
    received, and the expiry. An evaluate (fields with a ``model_version``) likewise, with its
    model version instead of a round. A stats_request's grant must be one for a stats_request.

    Args:
        fields: a decoded ``stats_request`` or ``task`` (``run``, ``plan_hash``, ``plan``,
            ``authorization``, for a task ``round``, ``rounds`` and ``preprocessing``).
        public_key: ``[server] public_key`` from site.toml.
        silo: this site's silo name, from the server's ``welcome``.
        consortium: the consortium named in the ``welcome``.
        weights_sha256: SHA-256 of the task's global weights payload (tasks).
        check_expiry: False only for the second check of a task accepted on arrival, just
            before its update leaves (training may outlast the expiry).

    Raises:
        TaskError: ``not_authorized``, naming what does not hold.
    """
    run, rnd = fields["run"], fields.get("round")

    def refuse(problem: str) -> TaskError:
        return TaskError(
            NOT_AUTHORIZED,
            f"refused before reading any local data: {problem}. Check that [server] public_key "
            "in site.toml is the consortium server's key; if it is, this request was not issued "
            "by that server (tell the consortium admin)",
            run=run,
            round=rnd,
            shared_reason=problem,
        )

    if silo is None:
        raise refuse("the request arrived before the server's welcome named this silo")
    plan = fields["plan"]
    try:
        actual = compute_plan_hash(plan)
    except (TypeError, ValueError):
        raise refuse("the request's plan is not canonical JSON") from None
    if fields["plan_hash"] != actual:
        raise refuse(
            f"the request says plan {short_hash(fields['plan_hash'])} but the plan it carries "
            f"hashes to {short_hash(actual)}"
        )
    authorization = fields.get("authorization")
    if not isinstance(authorization, Mapping):
        raise refuse("the request carries no authorization")
    try:
        grant = verify_authorization(
            authorization, public_key=public_key, plan=plan, silo=silo, run=run
        )
    except AuthorizationError as exc:
        raise refuse(str(exc)) from None
    if consortium is not None and grant.get("consortium") != consortium:
        raise refuse(
            f"the authorization is for consortium {grant.get('consortium')!r}, not {consortium!r}"
        )
    try:
        plan_rounds = run_settings(plan).rounds
    except (TypeError, ValueError, AttributeError):
        raise refuse("the request's plan states no valid training.rounds") from None
    if "model_version" in fields:  # the final model, to evaluate
        kind = EVALUATE_KIND
    elif "step" in fields:  # one step of an analysis plan
        kind = ANALYSIS_KIND
    else:
        kind = TASK_KIND if rnd is not None else STATS_KIND
    try:
        check_request_scope(
            grant,
            kind=kind,
            plan_rounds=plan_rounds,
            round=rnd,
            rounds=fields.get("rounds"),
            weights_sha256=weights_sha256,
            preprocessing=fields.get("preprocessing"),
            check_expiry=check_expiry,
            model_version=fields.get("model_version"),
            step=fields.get("step"),
            params=fields.get("params"),
            example_weights=fields.get("example_weights"),
        )
    except AuthorizationError as exc:
        raise refuse(str(exc)) from None
    return grant


def check_steward_signature(
    grant: Mapping[str, Any],
    plan_hash: str,
    *,
    steward_keys: tuple[str, ...],
    decision: Decision | None,
    config_path: Path,
    run: int,
    round: int | None = None,
) -> dict[str, Any] | None:
    """Check this site's own steward approved the plan hash, proven by signature.

    With ``[governance] steward_keys`` pinned, at least one approval in the grant must be signed
    by one of those keys over this exact plan hash and the grant's consortium
    (:func:`fedcore.approvals.verified_approval`); the server's word (an Approval row it lists)
    is not enough. A local approval by the site operator (``quorum-agent approve``) is the
    alternative. Without steward keys nothing is checked here (the caller warns).

    Returns:
        The verified approval, or None when nothing was checked or a local approval stood in.

    Raises:
        TaskError: ``not_authorized`` naming what was seen and what to do.
    """
    if not steward_keys:
        return None
    try:
        return verified_approval(
            grant.get("approvals") or (),
            pinned_keys=steward_keys,
            consortium=str(grant.get("consortium")),
            plan_hash=plan_hash,
        )
    except ApprovalSignatureError as exc:
        if decision is not None and decision.decision == APPROVED:
            return None  # the site operator approved this exact hash locally
        raise TaskError(
            NOT_AUTHORIZED,
            f"refused before reading any local data: {exc}. The server's list of approvals is "
            f"not proof; the steward signs with `quorum-agent steward-key sign` (or a passkey "
            f"in the dashboard) and submits the signature with the approval, or the site "
            f"operator approves locally with `quorum-agent approve {plan_hash} --config "
            f"{config_path}`",
            run=run,
            round=round,
            shared_reason=str(exc),
        ) from None


def _check_installed(
    model: Mapping[str, Any],
    models: ModelsConfig | None,
    kinds: Mapping[str, model_kinds.InstalledKind] | None,
    refuse: Callable[[str, str], TaskError],
    config_path: Path,
) -> None:
    """An installed model kind: allowed in [models], installed, the plan's version and digest."""
    name = model.get("name")
    allowed = models.allowed if models is not None else ()
    if name not in allowed:
        raise refuse(
            f"installed model kind {name!r} is not allowed here (allowed: "
            f"{', '.join(allowed) or 'none'})",
            f"to accept it, install and review it, then add {name!r} to allowed in [models] "
            f"in {config_path}",
        )
    try:
        spec = validate_model_spec(model)
    except ModelSpecError as exc:
        raise refuse(str(exc), "the consortium must fix the plan") from None
    try:
        model_kinds.resolve(spec, kinds)
    except model_kinds.KindUnavailable as exc:
        raise refuse(
            str(exc),
            "install the distribution the plan names (its version; `python -m "
            "fedcore.model_kinds` prints what is installed and its digest), or ask the "
            "consortium for a plan naming what you installed",
        ) from None


def announced_kinds(
    models: ModelsConfig, kinds: Mapping[str, model_kinds.InstalledKind] | None = None
) -> list[dict[str, str]]:
    """The installed model kinds this site offers: allowed in ``[models]`` and usable, as
    ``{"name", "version", "sha256"}`` sorted by name (what the agent announces in ``hello``).
    A kind installed but not allowed is not named: the server learns nothing it cannot use."""
    available = model_kinds.installed_kinds() if kinds is None else kinds
    return [
        available[name].announcement()
        for name in sorted(models.allowed)
        if name in available and available[name].kind is not None
    ]


def check_policy(
    plan: Mapping[str, Any],
    plan_hash: str,
    *,
    policy: PolicyConfig,
    config_path: Path,
    decision: Decision | None,
    spent_by_run: Mapping[int | None, float],
    run: int,
    round: int | None = None,
    models: ModelsConfig | None = None,
    kinds: Mapping[str, model_kinds.InstalledKind] | None = None,
) -> None:
    """Check the site's ``[policy]`` allows this plan; the checks run in the order listed below.

    Args:
        plan: the plan of the request (its hash already verified).
        plan_hash: its hash.
        policy: ``[policy]`` from site.toml.
        config_path: site.toml, named in the operator's hints.
        decision: the site operator's latest decision about this plan hash, if any.
        spent_by_run: privacy budget spent per run, from the sent log.
        run: the run of the request.
        round: the round of the request (tasks only).
        models: ``[models]`` from site.toml: the installed kinds this site allows. None: none
            (a plan with an installed kind is refused).
        kinds: the installed model kinds (``fedcore.model_kinds.installed_kinds()`` when None).

    Raises:
        TaskError: ``policy_refused`` for the first rule that does not hold: model kind (for
            an installed kind: allowed in ``[models]``, installed, the plan's version and
            distribution digest),
            require_dp, require_secure_aggregation, max_epsilon_per_plan, max_epsilon_total,
            local approval (a local rejection counts even without require_local_approval).
    """

    def refuse(shared: str, hint: str) -> TaskError:
        return _refusal(plan_hash, shared, hint, run=run, round=round)

    settings = f"[policy] in {config_path}"
    _check_model_kind(plan, policy, models, kinds, refuse, config_path)
    try:
        privacy = plan_privacy(plan)
    except PlanPolicyError as exc:
        raise refuse(str(exc), "the consortium must fix the plan") from None
    secure = plan.get("secure_aggregation") is True
    site_noise = site_adds_noise(privacy.mode, secure_aggregation=secure)
    if policy.require_dp and not site_noise:
        raise refuse(
            f"this site requires differential privacy added at the site (require_dp) and the "
            f"plan {_without_site_noise(privacy.mode)}",
            "the consortium can use privacy.mode = 'sample', or 'client' with "
            f"secure_aggregation = true; to accept it anyway, set require_dp = false in "
            f"{settings}",
        )
    if policy.require_secure_aggregation and plan.get("secure_aggregation") is not True:
        raise refuse(
            "this site requires secure aggregation (require_secure_aggregation) and the plan "
            "does not use it",
            f"to accept it, set require_secure_aggregation = false in {settings}",
        )

    limits = {
        name: value
        for name, value in (
            ("max_epsilon_per_plan", policy.max_epsilon_per_plan),
            ("max_epsilon_total", policy.max_epsilon_total),
        )
        if value is not None
    }
    if limits and not site_noise:
        raise refuse(
            f"this site caps epsilon ({' and '.join(limits)}) and counts only noise added at the "
            f"site; the plan {_without_site_noise(privacy.mode)}, so its epsilon here is "
            "unbounded",
            "the consortium can use privacy.mode = 'sample', or 'client' with "
            f"secure_aggregation = true; to accept it anyway, remove {' and '.join(limits)} "
            f"from {settings}",
        )
    if limits:
        projected = privacy.projected_epsilon
        if projected is None:
            raise refuse(
                f"the plan gives no target epsilon to check against {' and '.join(limits)} "
                f"(privacy.mode {privacy.mode!r} without privacy.target_epsilon)",
                "the consortium must state privacy.target_epsilon in the plan",
            )
        per_plan = policy.max_epsilon_per_plan
        if per_plan is not None and projected > per_plan + EPSILON_TOLERANCE:
            raise refuse(
                f"the plan's target epsilon {projected:g} is above this site's "
                f"max_epsilon_per_plan {per_plan:g}",
                f"to accept it, raise max_epsilon_per_plan in {settings}",
            )
        total = policy.max_epsilon_total
        if total is not None:
            # This run's charge is its projection, or what it has already spent if that is more:
            # its own sent-log lines must not be counted on top of its projection.
            other = sum(spent for key, spent in spent_by_run.items() if key != run)
            charge = other + max(projected, spent_by_run.get(run, 0.0))
            if charge > total + EPSILON_TOLERANCE:
                raise refuse(
                    f"the plan would bring the privacy budget spent at this site to {charge:g} "
                    f"({other:g} spent by other runs + {projected:g} for this plan), above "
                    f"max_epsilon_total {total:g}",
                    f"the sent log (`quorum-agent log`) shows what was spent; raise "
                    f"max_epsilon_total in {settings} only if the data steward agrees",
                )
    check_local_decision(
        plan_hash, policy=policy, config_path=config_path, decision=decision, run=run, round=round
    )


def _check_model_kind(
    plan: Mapping[str, Any],
    policy: PolicyConfig,
    models: ModelsConfig | None,
    kinds: Mapping[str, model_kinds.InstalledKind] | None,
    refuse: Any,
    config_path: Path,
) -> None:
    """The plan's model kind is one ``[policy] allowed_models`` lists (an installed kind:
    allowed in ``[models]``, installed, the plan's version and digest)."""
    model = plan.get("model")
    kind = model.get("kind") if isinstance(model, Mapping) else None
    if not isinstance(kind, str):
        raise refuse("the plan names no model kind", "the consortium must fix the plan")
    if kind == INSTALLED:
        _check_installed(model, models, kinds, refuse, config_path)
    elif kind not in policy.allowed_models:
        raise refuse(
            f"model kind {kind!r} is not allowed here (allowed: {', '.join(policy.allowed_models)})",
            f"to accept it, add {kind!r} to allowed_models in [policy] in {config_path}",
        )


def check_evaluation_policy(
    plan: Mapping[str, Any],
    plan_hash: str,
    *,
    policy: PolicyConfig,
    config_path: Path,
    decision: Decision | None,
    run: int,
    models: ModelsConfig | None = None,
    kinds: Mapping[str, model_kinds.InstalledKind] | None = None,
) -> None:
    """Check the site's ``[policy]`` allows an evaluation plan (``"kind": "evaluation"``).

    The model kind must be allowed, as for training, and the operator's local decision counts
    (require_local_approval, a local rejection). The training rules do not apply: an evaluation
    trains nothing, so there is no DP-SGD, no update to aggregate securely and no training
    epsilon to cap; its only DP release, the noisy fairness counts of a plan with
    ``fairness.dp_epsilon``, is charged to the ledger as a final evaluation's are.

    Raises:
        TaskError: ``policy_refused`` for the first rule that does not hold.
    """

    def refuse(shared: str, hint: str) -> TaskError:
        return _refusal(plan_hash, shared, hint, run=run, round=None)

    _check_model_kind(plan, policy, models, kinds, refuse, config_path)
    check_local_decision(
        plan_hash, policy=policy, config_path=config_path, decision=decision, run=run, round=None
    )


def check_analysis_policy(
    plan: Mapping[str, Any], plan_hash: str, *, policy: PolicyConfig, config_path: Path, run: int
) -> None:
    """The ``[policy]`` rule that binds an analysis plan: ``require_secure_aggregation``
    refuses one whose summaries would reach the server in clear (``[disclosure]`` judges the
    rest, ``clientagent.analysis``).

    Raises:
        TaskError: ``policy_refused``.
    """
    if policy.require_secure_aggregation and plan.get("secure_aggregation") is not True:
        raise _refusal(
            plan_hash,
            "this site requires secure aggregation (require_secure_aggregation) and the "
            "analysis plan does not use it: its summaries would reach the server in clear",
            'the consortium can add "secure_aggregation": true to the plan; to accept it '
            f"anyway, set require_secure_aggregation = false in [policy] in {config_path}",
            run=run,
            round=None,
        )


def check_local_decision(
    plan_hash: str,
    *,
    policy: PolicyConfig,
    config_path: Path,
    decision: Decision | None,
    run: int,
    round: int | None = None,
) -> None:
    """Refuse a plan the site operator rejected, or has not approved under
    require_local_approval (training and analysis plans alike).

    Raises:
        TaskError: ``policy_refused``.
    """

    def refuse(shared: str, hint: str) -> TaskError:
        return _refusal(plan_hash, shared, hint, run=run, round=round)

    approve = f"`quorum-agent approve {plan_hash} --config {config_path}`"
    if decision is not None and decision.decision == REJECTED:
        because = f" ({decision.reason})" if decision.reason else ""
        raise refuse(
            f"the site operator rejected plan {short_hash(plan_hash)}{because}",
            f"{decision.operator} rejected it at {decision.time}; to train on it, review it and "
            f"run {approve}",
        )
    if policy.require_local_approval and decision is None:
        raise refuse(
            f"the site operator has not approved plan {short_hash(plan_hash)} "
            "(require_local_approval)",
            f"review it (`quorum-agent plans --config {config_path}`) and run {approve}",
        )


def check_round_budget(
    privacy: RoundPrivacy,
    plan_hash: str,
    *,
    policy: PolicyConfig,
    config_path: Path,
    spent_total: float,
    run: int,
    round: int,
) -> None:
    """Check the site's privacy caps before a DP round trains, with the real numbers.

    :func:`check_policy` judges a plan by its target epsilon before any data is read; this
    runs once the site's training rows are known and the round's mechanism is computed for them
    (the one the round will run and the update will report):

    - ``max_epsilon_per_plan``: the whole run's epsilon at this site
      (``accounting.project_plan_epsilon`` with the real rows), or what the run will have spent
      after this round if that is more (rounds retried beyond the plan's), must not exceed it.
    - ``max_epsilon_total``: everything spent so far (the sent log, all runs, this run's earlier
      rounds included) plus this round's increment must not exceed it.

    Args:
        privacy: the round's mechanism and how many rounds of the run were already sent.
        plan_hash: the plan's hash, for the messages.
        policy: ``[policy]`` from site.toml.
        config_path: site.toml, named in the operator's hints.
        spent_total: the epsilon of the whole sent log (0.0 when max_epsilon_total is unset).
        run: the run of the task.
        round: the round of the task.

    Raises:
        TaskError: ``policy_refused`` naming the numbers.
    """
    settings = f"[policy] in {config_path}"
    mechanism = (
        f"privacy.mode {privacy.mode!r}, noise multiplier {privacy.noise_multiplier:.4g}, "
        f"sample rate {privacy.sample_rate:.4g}, {privacy.steps} steps a round, "
        f"delta {privacy.delta:g}"
    )
    per_plan = policy.max_epsilon_per_plan
    if per_plan is not None:
        run_epsilon = max(privacy.projected_epsilon, privacy.epsilon_after)
        if run_epsilon > per_plan + EPSILON_TOLERANCE:
            rounds = max(privacy.rounds, privacy.rounds_released + 1)
            raise _refusal(
                plan_hash,
                f"at this site the run would spend epsilon {run_epsilon:.4g} over {rounds} "
                f"rounds ({mechanism}), above max_epsilon_per_plan {per_plan:g}",
                f"computed for the {privacy.rows} local training rows; to accept it, raise "
                f"max_epsilon_per_plan in {settings}",
                run=run,
                round=round,
            )
    total = policy.max_epsilon_total
    if total is not None:
        increment = privacy.round_epsilon
        charge = spent_total + increment
        if charge > total + EPSILON_TOLERANCE:
            raise _refusal(
                plan_hash,
                f"round {round} would bring the privacy budget spent at this site to "
                f"{charge:.4g} ({spent_total:.4g} spent so far + {increment:.4g} for this round, "
                f"{mechanism}), above max_epsilon_total {total:g}",
                f"the sent log (`quorum-agent log`) shows what was spent; raise "
                f"max_epsilon_total in {settings} only if the data steward agrees",
                run=run,
                round=round,
            )
