"""What the agent does with a server request, without any network: pure and testable.

:func:`handle_stats_request` answers a ``stats_request`` with aggregate statistics of the local
train split; :func:`handle_task` trains the global model of a ``task`` on the local data and
builds the ``update``. Both raise :class:`TaskError` (code + reason, ready for an ``error`` frame)
for anything the server or the site operator must fix. Models come only from the plan's
declarative spec (:func:`fedcore.models.build_model`); weights only from safetensors.

Differential privacy (the plan's ``privacy`` section, docs/internals/governance.md):

- ``mode = "sample"``: DP-SGD here (:func:`fedcore.privacy.dpsgd.train_dp`, Poisson sampling,
  per-sample clip ``privacy.clip``). The noise multiplier is
  :func:`fedcore.privacy.accounting.plan_noise_multiplier` for this site's real training rows,
  calibrated over the WHOLE run (all ``training.rounds``), so a ``target_epsilon`` holds at the
  end of the run, not per round. One round is the mechanism ``(z, q, steps)`` with
  ``q = min(1, batch_size / rows)`` and ``steps = local_epochs * ceil(rows / batch_size)``: what
  the server's ledger recomputes (``federation.ledger.round_mechanism``). The update carries
  ``privacy = {noise_multiplier, sample_rate, steps, epsilon}``, ``epsilon`` being what this
  run has spent at this site after this round, composed by the same "rdp" accountant.
- ``mode = "client"``: no local noise; the server clips and noises at aggregation. The agent
  still accounts the plan's per-round mechanism (``(z, 1, 1)``, every round taken part in) for
  its own budget.

Before a DP round trains, :class:`PrivacyBudget` (the agent's sent log and ``[policy]``) may
refuse it with the real numbers (:func:`clientagent.policy.check_round_budget`).

Aggregation strategies that need the agent: ``fedprox`` trains with the proximal term
``mu / 2 * ||w - w_global||^2`` (non-DP only); ``qfedavg`` needs ``F_k(w_t)``, the received
global model's loss on this site's training split, reported as ``metrics["global_train_loss"]``.
That value is computed from the training rows without noise: under DP it would be a release
outside the guarantee, so it is reported only for plans without DP (q-FedAvg is refused with
any DP by the plan language; in client mode the server's strategy gets the DP mean).

Every task's plan is parsed by :func:`fedcore.plan.parse_plan`, the parser the server ran at
proposal: what it refuses is an ``invalid_task`` naming every bad key.

Group fairness (the plan's ``fairness`` section, docs/fairness.md): the update also carries the
received global model's confusion counts per group of every sensitive attribute with a public
group list, on the test split (:func:`fairness_counts`), released with discrete Laplace noise
when the plan sets ``fairness.dp_epsilon``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import random
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from clientagent.data import DataFileError, LocalData, LocalSplit, PlanError
from clientagent.residuals import ResidualStore, matching
from fedcore import (
    calibration,
    compression,
    evaluation,
    fairness,
    model_kinds,
    models,
    protocol,
    tabular,
    task_fairness,
    task_metrics,
    tensors,
    training,
)
from fedcore.fairness_mitigation import (
    ExampleWeights,
    label_counts,
    noisy_label_counts,
    noisy_score_histogram,
    score_histogram,
)
from fedcore.plan import (
    EvaluationPlan,
    Fairness,
    Plan,
    Privacy,
    Training,
    final_counts_in_clear,
    held_out_score_histograms_sent,
    is_evaluation_plan,
    parse_evaluation_plan,
    parse_plan,
)
from fedcore.plan import PlanError as PlanRefused
from fedcore.privacy import accounting

logger = logging.getLogger(__name__)

# Error codes of the ``error`` frames the agent sends (data_invalid is in protocol.ERROR_CODES).
DATA_INVALID = "data_invalid"  # the local data does not match the plan's schema
INVALID_TASK = "invalid_task"  # plan, preprocessing or global weights unusable for this site
TRAINING_FAILED = "training_failed"  # local training diverged (NaN/Inf)
# An installed model kind this site does not have (or not that version or digest): the site
# refuses the plan as its policy would (clientagent.policy.POLICY_REFUSED), before reading data.
MODEL_UNAVAILABLE = "policy_refused"

# The server's ledger composes with this accountant (federation.ledger.ACCOUNTANT); the noise
# calibration and every epsilon the agent reports or logs use the same one.
ACCOUNTANT = "rdp"


class TaskError(Exception):
    """A request the agent refuses; ``code`` and ``reason`` go into an ``error`` frame."""

    def __init__(
        self,
        code: str,
        reason: str,
        *,
        run: int | None = None,
        round: int | None = None,
        shared_reason: str | None = None,
    ):
        """Args:
        code: machine-readable error code (``data_invalid``, ``invalid_task``, ...).
        reason: human-readable message for the site operator's log.
        run: the run the request belonged to, if known.
        round: the round the request belonged to, if known.
        shared_reason: what the server is told, when ``reason`` holds local detail (a cell
            value, a file path) that must not leave the site; defaults to ``reason``.
        """
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.shared_reason = reason if shared_reason is None else shared_reason
        self.run = run
        self.round = round

    def to_fields(self) -> dict[str, Any]:
        """The fields of the ``error`` control message for this refusal."""
        reason = self.shared_reason
        if len(reason) > protocol.MAX_ERROR_REASON_CHARS:
            reason = reason[: protocol.MAX_ERROR_REASON_CHARS - 3] + "..."
        fields: dict[str, Any] = {"code": self.code, "reason": reason}
        if self.run is not None:
            fields["run"] = self.run
        if self.round is not None:
            fields["round"] = self.round
        return fields


def _data_invalid(exc: Exception, *, run: int | None, round: int | None = None) -> TaskError:
    """A data_invalid refusal: the full message for the local log, no cell value for the server."""
    if isinstance(exc, tabular.DataValidationError):
        shared = exc.shareable
    else:
        shared = "the site's data file could not be read (details in the site agent's log)"
    return TaskError(DATA_INVALID, str(exc), run=run, round=round, shared_reason=shared)


class TrainingCancelled(Exception):
    """Local training was interrupted because the agent is shutting down."""


class TrainingObserver(Protocol):
    """Receives progress of local training (e.g. a progress bar); called from a worker thread."""

    def started(self, *, rows: int, epochs: int, steps: int) -> None:
        """Training is about to start: ``steps`` optimizer steps over ``rows`` rows."""

    def step(self, step: int, total: int) -> None:
        """Optimizer step ``step`` of ``total`` is done."""

    def finished(self, *, train_loss: float) -> None:
        """Training finished with this mean loss over the last epoch."""


def fairness_counts(
    model: nn.Module,
    data: tabular.TabularData,
    schema: tabular.DatasetSchema,
    preprocessing: Mapping[str, Any],
    settings: Fairness,
    *,
    source: random.Random | None = None,
) -> dict[str, dict[str, dict[str, int]]]:
    """Per-group confusion counts of ``model`` on ``data``, for every reportable attribute.

    Predictions are ``probability >= 0.5`` (as the accuracy of ``fedcore.metrics``). Groups are
    the public list (:func:`fedcore.fairness.public_groups`): every listed group is released,
    zero counts included, and a value outside the list counts as ``"__other__"``, so no key
    reveals a group only this site holds. With ``settings.dp_epsilon`` each attribute's table
    is released through :func:`fedcore.fairness.noisy_counts` (discrete Laplace, pure
    epsilon-DP per table, noise from ``source``, the OS by default).

    Returns:
        ``{attribute: {group: {"tp", "fp", "tn", "fn"}}}``; empty when no sensitive attribute
        has a public group list.
    """
    public = fairness.public_groups(schema, preprocessing, settings.groups)
    if not public:
        return {}
    predicted = fairness.predictions_at(training.predict_proba(model, data.X))
    released: dict[str, dict[str, dict[str, int]]] = {}
    for attribute, groups in public.items():
        labels = np.asarray(data.groups[attribute], dtype=object)
        labels = np.where(np.isin(labels, groups), labels, fairness.OTHER_GROUP)
        counts = fairness.group_counts(data.y, predicted, labels, groups=groups)
        if settings.dp_epsilon is not None:
            counts = fairness.noisy_counts(
                counts, epsilon=settings.dp_epsilon, groups=groups, source=source
            )["counts"]
        released[attribute] = counts
    return released


@functools.lru_cache(maxsize=64)
def _plan_mechanism(
    section_json: str, rows: int, batch_size: int, epochs: int, rounds: int
) -> tuple[float, float, int] | None:
    """``accounting.plan_mechanism``, remembered: calibrating noise to a target takes a dozen
    accountant runs, and every round of a run asks for the same mechanism."""
    return accounting.plan_mechanism(
        json.loads(section_json),
        rows=rows,
        batch_size=batch_size,
        local_epochs=epochs,
        rounds=rounds,
        accountant=ACCOUNTANT,
    )


@functools.lru_cache(maxsize=256)
def _composed_epsilon(
    noise_multiplier: float, sample_rate: float, steps: int, delta: float
) -> float:
    return accounting.epsilon(
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
        delta=delta,
        accountant=ACCOUNTANT,
    )


@dataclass(frozen=True)
class RoundPrivacy:
    """The DP mechanism one round of a plan applies to this site's training rows.

    Every round of a run is the same Poisson-subsampled Gaussian mechanism ``(noise_multiplier,
    sample_rate, steps)``, so ``k`` rounds compose to the mechanism with ``k * steps`` steps: the
    run's epsilon after ``k`` rounds is :meth:`cumulative_epsilon` ``(k)`` (tight composition by
    the accountant, not a sum of per-round epsilons).
    """

    mode: str  # "sample" (DP-SGD at this site) or "client" (noise added by the server)
    noise_multiplier: float
    sample_rate: float
    steps: int  # of one round: local_epochs * ceil(rows / batch_size), or 1 in client mode
    rounds: int  # the plan's training.rounds
    delta: float
    rows: int  # the site's training rows the mechanism was computed for
    rounds_released: int = 0  # DP rounds of this run already sent before this one

    def cumulative_epsilon(self, rounds: int) -> float:
        """The run's epsilon at this site after ``rounds`` rounds released (0.0 for none)."""
        if rounds <= 0:
            return 0.0
        return _composed_epsilon(
            self.noise_multiplier, self.sample_rate, self.steps * rounds, self.delta
        )

    def increment(self, released: int) -> float:
        """What one more round adds to the run's epsilon when ``released`` rounds were sent."""
        return max(0.0, self.cumulative_epsilon(released + 1) - self.cumulative_epsilon(released))

    @property
    def epsilon_before(self) -> float:
        """The run's epsilon at this site before this round."""
        return self.cumulative_epsilon(self.rounds_released)

    @property
    def epsilon_after(self) -> float:
        """The run's epsilon at this site once this round's update is sent."""
        return self.cumulative_epsilon(self.rounds_released + 1)

    @property
    def round_epsilon(self) -> float:
        """What this round adds: ``epsilon_after - epsilon_before``."""
        return self.increment(self.rounds_released)

    @property
    def projected_epsilon(self) -> float:
        """The whole run's epsilon at this site (all the plan's rounds): the plan's projection
        (``accounting.project_plan_epsilon``) for this site's real training rows."""
        return self.cumulative_epsilon(self.rounds)


def round_privacy(
    privacy: Privacy, settings: Training, *, rows: int, rounds_released: int = 0
) -> RoundPrivacy | None:
    """The mechanism of one round of a DP plan at a site with ``rows`` training rows.

    The noise multiplier is ``accounting.plan_mechanism``'s for the whole run (as the server's
    ledger computes it), split evenly over the rounds; None without DP.

    Raises:
        PlanError: the plan's privacy section cannot be satisfied for these rows (e.g. a
            target epsilon that needs a noise multiplier above 1e4).
    """
    if not privacy.dp:
        return None
    try:
        mechanism = _plan_mechanism(
            json.dumps(privacy.section(), sort_keys=True),
            rows,
            settings.batch_size,
            settings.local_epochs,
            settings.rounds,
        )
    except ValueError as exc:
        raise PlanError(f"plan privacy: {exc}") from None
    assert mechanism is not None
    noise, sample_rate, steps = mechanism
    return RoundPrivacy(
        mode=privacy.mode,
        noise_multiplier=noise,
        sample_rate=sample_rate,
        steps=max(1, steps // settings.rounds),
        rounds=settings.rounds,
        delta=privacy.delta,
        rows=rows,
        rounds_released=rounds_released,
    )


class PrivacyBudget(Protocol):
    """What the site has spent, as one task sees it (the agent reads its sent log)."""

    def released_rounds(self) -> int:
        """DP rounds of this task's run whose update already left the site."""

    def check(self, privacy: RoundPrivacy) -> None:
        """Raise TaskError (``policy_refused``) unless the site's caps allow this round."""


def _run_and_round(fields: Mapping[str, Any]) -> tuple[int | None, int | None]:
    run, rnd = fields.get("run"), fields.get("round")
    return (run if isinstance(run, int) else None, rnd if isinstance(rnd, int) else None)


def _json_metrics(value: Any) -> Any:
    """Metrics as strict JSON: numpy scalars to Python, NaN/Inf to None."""
    if isinstance(value, Mapping):
        return {str(k): _json_metrics(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_metrics(v) for v in value]
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    return value


def _prepare(
    plan: Mapping[str, Any], data: LocalData, run: int | None, rnd: int | None
) -> LocalSplit:
    try:
        return data.split(plan)
    except (tabular.DataValidationError, DataFileError) as exc:
        raise _data_invalid(exc, run=run, round=rnd) from None


def handle_stats_request(
    fields: Mapping[str, Any],
    data: LocalData,
    *,
    min_category_count: int = 5,
    kinds: Mapping[str, model_kinds.InstalledKind] | None = None,
) -> dict[str, Any]:
    """Answer a ``stats_request``: statistics of the local TRAIN split for the plan's schema.

    A category held fewer than ``min_category_count`` times here, or whose name fails
    ``fedcore.tabular.category_value_problem``, is not sent; values a declared vocabulary does
    not list are not sent either and encode as "other" (an all-zero one-hot block). Both are
    logged for the operator. With ``privacy.statistics_epsilon`` the numeric statistics are
    sent with Laplace noise.

    Args:
        fields: the decoded ``stats_request`` (``run``, ``plan_hash``, ``plan``).
        data: the site's data.
        min_category_count: the site policy's minimum (site.toml [policy]).
        kinds: the installed model kinds (``fedcore.model_kinds.installed_kinds()`` when None).

    Returns:
        The fields of the ``stats`` reply: ``{"run", "stats"}``.

    Raises:
        TaskError: ``data_invalid`` (the local data does not match the schema; the reason names
            the column and row), ``invalid_task`` (the plan's schema is unusable) or
            ``policy_refused`` (its installed model kind is not here: :func:`check_model_available`).
    """
    run, _ = _run_and_round(fields)
    plan = fields.get("plan")
    if not isinstance(plan, Mapping):
        raise TaskError(INVALID_TASK, "stats_request has no plan object", run=run)
    check_model_available(check_plan(plan, run), run, kinds=kinds)
    try:
        split = _prepare(plan, data, run, None)
    except PlanError as exc:
        raise TaskError(INVALID_TASK, str(exc), run=run) from None
    # Only the train split: the preprocessing fitted from these statistics must not have seen
    # the rows each site later evaluates on.
    privacy = plan.get("privacy") or {}
    epsilon = privacy.get("statistics_epsilon") if isinstance(privacy, Mapping) else None
    try:
        stats = tabular.local_statistics(
            split.train,
            split.schema,
            min_category_count=min_category_count,
            epsilon=None if epsilon is None else float(epsilon),
        )
        undeclared = tabular.undeclared_categories(split.train, split.schema)
    except tabular.DataValidationError as exc:
        raise _data_invalid(exc, run=run) from None
    except (tabular.SchemaError, TypeError, ValueError) as exc:
        raise TaskError(INVALID_TASK, f"statistics: {exc}", run=run) from None
    for column, rows in undeclared.items():
        logger.warning(
            "run %d: %d training rows have a value of %r that the schema's categories do not "
            "declare; they encode as 'other' (all-zero) and are not reported",
            run,
            rows,
            column,
        )
    for column in split.schema.columns:
        if column.type == "categorical" and column.categories is None:
            held = split.train[column.name].nunique()
            sent = len(stats["categories"][column.name])
            if held > sent:
                logger.info(
                    "run %d: column %r: %d of %d values withheld (held fewer than %d times here, "
                    "a name not allowed, or over the cap of %d)",
                    run,
                    column.name,
                    held - sent,
                    held,
                    min_category_count,
                    split.schema.max_categories,
                )
    reply: dict[str, Any] = {"run": run, "stats": stats}
    parsed = parse_plan(plan)
    if parsed.fairness is not None and parsed.fairness.mitigation.trains_weighted:
        counts = training_label_counts(parsed, split, stats, run)
        if parsed.fairness.dp_epsilon is not None:  # one pure-DP release, charged by the server
            counts = noisy_label_counts(counts, epsilon=parsed.fairness.dp_epsilon)
        reply["label_counts"] = counts
    return reply


def _weighs_loss(plan: Plan, kind: str) -> bool:
    return plan.fairness is not None and plan.fairness.mitigation.kind == kind


def training_label_counts(
    plan: Plan, split: LocalSplit, stats: Mapping[str, Any], run: int
) -> dict[str, dict[str, int]]:
    """Rows of the TRAIN split per (group of the plan's sensitive attribute, label), for the
    server's reweighing or reduction weights (``fedcore.fairness_mitigation.label_counts``).

    Only labels this site already releases are keys: the attribute's categories sent in
    ``stats`` (or declared in ``fairness.groups``, or ``false``/``true`` for a boolean), and
    ``__missing__``; every other value is counted under ``__other__``.
    """
    assert plan.fairness is not None
    attribute = plan.fairness.sensitive_attribute
    try:
        y, groups = tabular.transform_labels(split.train, split.schema)
    except tabular.DataValidationError as exc:
        raise _data_invalid(exc, run=run) from None
    column = next((c for c in split.schema.columns if c.name == attribute), None)
    if column is not None and column.type == "boolean":
        public = ["false", "true", tabular.MISSING_CATEGORY]
    elif column is not None and column.type == "categorical":
        sent = (stats.get("categories") or {}).get(attribute) or []
        public = [str(v) for v in sent] + [tabular.MISSING_CATEGORY, fairness.OTHER_GROUP]
    else:
        declared = plan.fairness.groups.get(attribute) or []
        public = [str(v) for v in declared] + [tabular.MISSING_CATEGORY, fairness.OTHER_GROUP]
    labels = np.asarray(groups[attribute], dtype=object)
    labels = np.where(np.isin(labels, public), labels, fairness.OTHER_GROUP)
    return label_counts(y, labels.astype(str), groups=sorted(set(public)))


def check_model_available(
    plan: Plan,
    run: int | None = None,
    rnd: int | None = None,
    *,
    kinds: Mapping[str, model_kinds.InstalledKind] | None = None,
) -> None:
    """Refuse (``policy_refused``) a plan whose installed model kind is not installed here, or
    not in the plan's version or digest; nothing for the zoo's kinds. Runs before any data is
    read. (Whether site.toml allows the kind is :func:`clientagent.policy.check_policy`'s.)"""
    if plan.model["kind"] != models.INSTALLED:
        return
    try:
        model_kinds.resolve(plan.model, kinds)
    except model_kinds.KindUnavailable as exc:
        raise TaskError(MODEL_UNAVAILABLE, str(exc), run=run, round=rnd) from None


def _load_global(
    payload: bytes,
    plan: Plan,
    n_features: int,
    run: int,
    rnd: int | None,
    kinds: Mapping[str, model_kinds.InstalledKind] | None = None,
) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The plan's model with the task's global weights loaded, and those weights."""
    try:
        model = models.build_model(
            plan.model,
            n_features,
            n_outputs=plan.schema.target.n_outputs,
            seed=0,
            kinds=kinds,
        )
    except models.ModelSpecError as exc:
        raise TaskError(INVALID_TASK, f"model spec: {exc}", run=run, round=rnd) from None
    try:
        state = tensors.decode_state_dict(payload)
    except tensors.TensorCodecError as exc:
        raise TaskError(INVALID_TASK, f"global model: {exc}", run=run, round=rnd) from None
    try:
        # load_state_dict would silently cast dtypes: check them first, with a clear message.
        tensors.check_compatible(state, model.state_dict())
        model.load_state_dict(state, strict=True)
    except (tensors.IncompatibleStateDict, RuntimeError) as exc:
        raise TaskError(
            INVALID_TASK,
            f"the global model does not fit the plan's model spec with {n_features} features: "
            f"{exc}",
            run=run,
            round=rnd,
        ) from None
    bad = tensors.first_non_finite(state)
    if bad is not None:
        raise TaskError(
            INVALID_TASK, f"global model tensor {bad!r} holds NaN or Inf", run=run, round=rnd
        )
    return model, state


def check_plan(plan: Any, run: int | None = None, rnd: int | None = None) -> Plan:
    """The agent's acceptance of a plan: parsed by the plan language (fedcore.plan), the rules
    the server applied at proposal; a plan it refuses is an ``invalid_task`` naming every bad
    key (the ``error`` frame the server records for the round)."""
    try:
        return parse_plan(plan)
    except PlanRefused as exc:
        raise TaskError(INVALID_TASK, str(exc), run=run, round=rnd) from None


def check_evaluation_plan(plan: Any, run: int | None = None) -> EvaluationPlan:
    """The agent's acceptance of an evaluation plan (fedcore.plan.parse_evaluation_plan, the
    parser the server ran at proposal); ``invalid_task`` naming every bad key otherwise."""
    try:
        return parse_evaluation_plan(plan)
    except PlanRefused as exc:
        raise TaskError(INVALID_TASK, str(exc), run=run) from None


def _check_dp_model(model: nn.Module, run: int, rnd: int) -> None:
    """Opacus' validator on the model (e.g. no BatchNorm): invalid_task when it objects."""
    from opacus.validators import ModuleValidator  # Opacus loads only for DP-SGD

    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        problems = "; ".join(str(error) for error in errors)
        raise TaskError(
            INVALID_TASK, f"the model cannot be trained with DP-SGD: {problems}", run=run, round=rnd
        )


def handle_task(
    task: protocol.BinaryMessage,
    data: LocalData,
    *,
    silo: str | None = None,
    observer: TrainingObserver | None = None,
    cancel: threading.Event | None = None,
    nonce: Callable[[], str] = lambda: secrets.token_hex(16),
    budget: PrivacyBudget | None = None,
    noise_source: random.Random | None = None,
    residuals: ResidualStore | None = None,
    example_weights: ExampleWeights | None = None,
    kinds: Mapping[str, model_kinds.InstalledKind] | None = None,
) -> protocol.BinaryMessage:
    """Train the task's global model on the local data and build the ``update`` message.

    Steps: check the plan's training, privacy and aggregation sections, split the local data
    (cached), transform it with the task's fitted preprocessing; for a DP plan compute the
    round's mechanism for the real training rows and let ``budget`` refuse it; build the model
    from the plan's spec and load the global weights (strict: same keys, shapes and dtypes),
    evaluate it on the local test split (``metrics["global"]``) and, without DP, its loss on the
    train split (``metrics["global_train_loss"]``, q-FedAvg's ``F_k(w_t)``); train on the train
    split with ``plan["training"]`` (DP-SGD in privacy mode ``sample``, the FedProx term for
    strategy ``fedprox``) and seed ``plan["seed"] * 1000 + round`` (not for DP-SGD: its noise
    and sampling come from the OS), evaluate again (``metrics["local"]``).

    Args:
        task: a reassembled ``task`` message (fields validated by fedcore.protocol).
        data: the site's data.
        silo: the silo name from the server's ``welcome``, echoed in the update.
        observer: receives training progress (called from the calling thread).
        cancel: when set, training stops at the next optimizer step (TrainingCancelled).
        nonce: source of the update's nonce (tests inject a fixed one).
        budget: the site's privacy budget for DP plans: how many rounds of this run were
            already sent (the update's cumulative epsilon counts them) and the caps check run
            before training. None: no round sent yet and no cap.
        noise_source: random source of the fairness counts' DP noise (tests inject a seeded
            one); None: the OS (``random.SystemRandom``).
        residuals: where a ``topk`` plan's error-feedback residual of the run is kept across
            rounds and restarts (written before this returns); None: none is kept (each round
            starts from a zero residual).
        example_weights: for a plan whose ``fairness.mitigation`` kind is ``reweighing`` or
            ``constraint``: the round's label and loss weight per (group of the plan's
            sensitive attribute, true label), computed by the server from the summed counts
            (:mod:`fedcore.fairness_mitigation`); the training rows are relabeled and weighted
            with it (:func:`mitigation_targets`). None: the plain loss, unchanged.
        kinds: the installed model kinds an installed plan model is taken from
            (``fedcore.model_kinds.installed_kinds()`` when None); checked before any data is
            read (:func:`check_model_available`).

    The plan's task (``schema.target.task``) decides the model's outputs, the loss
    (``Plan.objective``) and the metrics: binary ``auc``, ``accuracy``, ``loss``; multiclass
    ``accuracy``, ``macro_f1``, ``weighted_f1``, ``loss``; regression ``rmse``, ``mae``, ``r2``,
    ``mean_error``, ``loss`` (in the target's units, a standardised target mapped back).

    Returns:
        The ``update`` BinaryMessage: fields ``run``, ``round``, ``nonce``, ``num_examples``
        (train rows), ``metrics`` (``global``, ``local``, ``train_loss``, and without DP
        ``global_train_loss`` and ``timing``: ``train_seconds``, ``compute_seconds``),
        ``silo``, in privacy mode ``sample`` ``privacy`` (``noise_multiplier``, ``sample_rate``, ``steps`` of this round, ``epsilon`` spent by
        the run at this site after this round), and for a plan with a fairness section
        ``fairness`` (:func:`fairness_counts` of the received global model on the test split);
        a multi-class or regression plan (not a secure one) ``task_part``, the received global
        model's part of the round's pooled metrics (:func:`task_parts`, no histograms);
        payload the trained weights as safetensors, or for a plan with ``compression`` the
        change from the global weights encoded by :mod:`fedcore.compression` and the field
        ``compression`` naming the method.

    Raises:
        TaskError: ``invalid_task`` (the plan, preprocessing or global weights are unusable),
            ``data_invalid`` (the local data does not fit), ``training_failed`` (diverged) or
            whatever ``budget.check`` raises (``policy_refused``).
        TrainingCancelled: ``cancel`` was set.
    """
    started = time.perf_counter()
    fields = task.fields
    run, rnd = fields["run"], fields["round"]
    plan = fields["plan"]
    parsed = check_plan(plan, run, rnd)
    check_model_available(parsed, run, rnd, kinds=kinds)
    if example_weights is None and fields.get("example_weights") is not None:
        try:  # the server's weights, covered by the task's signed grant (clientagent.policy)
            example_weights = ExampleWeights.from_json(fields["example_weights"])
        except ValueError as exc:
            raise TaskError(INVALID_TASK, str(exc), run=run, round=rnd) from None
    elif (
        example_weights is None
        and parsed.fairness is not None
        and parsed.fairness.mitigation.trains_weighted
    ):
        raise TaskError(
            INVALID_TASK,
            f"the plan's fairness.mitigation kind is {parsed.fairness.mitigation.kind!r} but the "
            "task carries no example weights",
            run=run,
            round=rnd,
        )
    objective = parsed.objective()
    seed = parsed.seed
    settings, privacy, aggregation = parsed.training, parsed.privacy, parsed.aggregation
    fairness_settings = parsed.fairness
    packing = parsed.compression
    try:
        split = _prepare(plan, data, run, rnd)
        arrays = data.arrays(split, fields["preprocessing"])
    except PlanError as exc:
        raise TaskError(INVALID_TASK, str(exc), run=run, round=rnd) from None
    except tabular.DataValidationError as exc:
        raise _data_invalid(exc, run=run, round=rnd) from None
    train, test = arrays.train, arrays.test
    n_train = int(train.X.shape[0])
    if n_train == 0:
        raise TaskError(
            DATA_INVALID,
            "no training rows left after validation and the holdout split",
            run=run,
            round=rnd,
        )

    dp_round: RoundPrivacy | None = None
    if privacy.dp:
        released = budget.released_rounds() if budget is not None else 0
        try:
            dp_round = round_privacy(privacy, settings, rows=n_train, rounds_released=released)
        except PlanError as exc:
            raise TaskError(INVALID_TASK, str(exc), run=run, round=rnd) from None
        if budget is not None:
            budget.check(dp_round)  # the site's caps, with the real numbers, before training

    model, global_state = _load_global(task.payload, parsed, int(train.X.shape[1]), run, rnd, kinds)
    if privacy.mode == "sample":
        _check_dp_model(model, run, rnd)
    try:
        scale = tabular.target_scale(split.schema, fields["preprocessing"])
    except tabular.SchemaError as exc:
        raise TaskError(INVALID_TASK, str(exc), run=run, round=rnd) from None

    def evaluate(on: tabular.TabularData) -> dict[str, Any]:
        return training.evaluate(model, on.X, on.y, objective, target_scale=scale)

    global_metrics = evaluate(test)
    global_part = None
    if parsed.task != "binary":
        # The received model's part of the round's pooled metrics (the server adds the parts:
        # exact figures on the union of the held-out rows; no histograms, no AUC per round).
        # A secure round sends it only inside the masked vector (clientagent.secagg_session).
        global_part = task_parts(
            model,
            test,
            parsed,
            fields["preprocessing"],
            bins=task_metrics.round_bins(parsed.schema.target.n_outputs),
            with_fairness=False,
        )["metrics"]
    group_counts = None
    if fairness_settings is not None and parsed.task == "binary":
        # The received global model, before any local training. The other tasks' group
        # statistics (task_parts) are not sent in the update yet (docs/tasks.md).
        group_counts = fairness_counts(
            model,
            test,
            split.schema,
            fields["preprocessing"],
            fairness_settings,
            source=noise_source,
        )
    extra_metrics: dict[str, Any] = {}
    if not privacy.dp:
        # q-FedAvg's F_k(w_t). Not under DP: computed from the training rows without noise.
        extra_metrics["global_train_loss"] = evaluate(train)["loss"]

    def on_batch(step: int, total: int) -> None:
        if cancel is not None and cancel.is_set():
            raise TrainingCancelled(f"round {rnd}: training cancelled at step {step}/{total}")
        if observer is not None:
            observer.step(step, total)

    targets, sample_weight = train.y, None
    if example_weights is not None:
        targets, sample_weight = mitigation_targets(parsed, train, example_weights, run, rnd)

    if observer is not None:
        if settings.local_steps is not None:
            steps = settings.local_steps
            epochs = math.ceil(steps / math.ceil(n_train / settings.batch_size))
        else:
            epochs = settings.local_epochs
            steps = epochs * math.ceil(n_train / settings.batch_size)
        observer.started(rows=n_train, epochs=epochs, steps=steps)
    train_started = time.perf_counter()
    try:
        if privacy.mode == "sample":
            assert dp_round is not None
            result = _train_dp(model, train, settings, privacy, dp_round, on_batch, objective)
        else:
            result = training.train_local(
                model,
                train.X,
                targets,
                epochs=settings.local_epochs,
                batch_size=settings.batch_size,
                lr=settings.lr,
                optimizer=settings.optimizer,
                momentum=settings.momentum,
                weight_decay=settings.weight_decay,
                seed=seed * 1000 + rnd,
                on_batch=on_batch,
                prox_mu=aggregation.prox_mu,
                prox_reference=global_state if aggregation.prox_mu > 0 else None,
                steps=settings.local_steps,
                sample_weight=sample_weight,
                objective=objective,
            )
    except training.TrainingError as exc:
        raise TaskError(TRAINING_FAILED, str(exc), run=run, round=rnd) from None
    train_seconds = time.perf_counter() - train_started
    if observer is not None:
        observer.finished(train_loss=float(result["train_loss"]))

    state = model.state_dict()
    bad = tensors.first_non_finite(state)
    if bad is not None:
        raise TaskError(
            TRAINING_FAILED,
            f"tensor {bad!r} holds NaN or Inf after local training; lower lr",
            run=run,
            round=rnd,
        )
    metrics = _json_metrics(
        {
            "global": global_metrics,
            "local": evaluate(test),
            "train_loss": result["train_loss"],
            **extra_metrics,
        }
    )
    if not privacy.dp:
        # Where the round's time went at this site (bench/round_split.py): local training, and
        # all of this function (data, evaluations, training) up to here. Not under DP: the
        # release there is exactly what the privacy analysis covers.
        metrics["timing"] = {
            "train_seconds": train_seconds,
            "compute_seconds": time.perf_counter() - started,
        }
    update_fields: dict[str, Any] = {
        "run": run,
        "round": rnd,
        "nonce": nonce(),
        "num_examples": n_train,
        "metrics": metrics,
    }
    if silo is not None:
        update_fields["silo"] = silo
    if group_counts:
        update_fields["fairness"] = group_counts
    if global_part is not None:
        update_fields["task_part"] = _json_metrics(global_part)
    if privacy.mode == "sample":
        assert dp_round is not None
        update_fields["privacy"] = {
            "noise_multiplier": dp_round.noise_multiplier,
            "sample_rate": dp_round.sample_rate,
            "steps": int(result["steps"]),
            "epsilon": dp_round.epsilon_after,
        }
    if not packing.compressed:
        return protocol.BinaryMessage(
            type="update", fields=update_fields, payload=tensors.encode_state_dict(state)
        )
    update_fields["compression"] = packing.method
    wire = _compressed(state, global_state, packing, parsed, task, residuals)
    return protocol.BinaryMessage(
        type="update", fields=update_fields, payload=tensors.encode_state_dict(wire)
    )


def task_parts(
    model: nn.Module,
    data: tabular.TabularData,
    plan: Plan,
    preprocessing: Mapping[str, Any],
    *,
    bins: int | None = task_metrics.SCORE_BINS,
    with_fairness: bool = True,
) -> dict[str, Any]:
    """This site's parts of the pooled metrics and group fairness of a multi-class or
    regression model on ``data`` (its held-out rows), for the server to add up
    (``with_fairness`` False: the metrics part only).

    Returns:
        ``{"metrics": fedcore.task_metrics part, "fairness": {attribute: fedcore.task_fairness
        part}}`` (fairness only for a plan with a fairness section, for its public groups; a
        value outside the list counts as ``"__other__"``). Regression parts are in the target's
        units.

    Raises:
        ValueError: the plan's task is binary (its parts are ``fedcore.evaluation``'s and
            :func:`fairness_counts`).
    """
    objective = plan.objective()
    if objective.task == "binary":
        raise ValueError("a binary plan's parts are the score histogram and fairness_counts")
    predicted = training.predict(model, data.X, objective)
    if objective.task == "multiclass":
        part = task_metrics.multiclass_part(data.y.astype(np.int64), predicted, bins=bins)
        choice = np.argmax(predicted, axis=1)
    else:
        mean, std = tabular.target_scale(plan.schema, preprocessing)
        truth, predicted = mean + std * data.y, mean + std * predicted
        part = task_metrics.regression_part(truth, predicted)
    parts: dict[str, Any] = {"metrics": part, "fairness": {}}
    if plan.fairness is None or not with_fairness:
        return parts
    public = fairness.public_groups(plan.schema, preprocessing, plan.fairness.groups)
    for attribute, groups in public.items():
        labels = np.asarray(data.groups[attribute], dtype=object)
        labels = np.where(np.isin(labels, groups), labels, fairness.OTHER_GROUP)
        if objective.task == "multiclass":
            parts["fairness"][attribute] = task_fairness.multiclass_group_part(
                data.y, choice, labels, classes=objective.n_outputs
            )
        else:
            parts["fairness"][attribute] = task_fairness.regression_group_part(
                truth, predicted, labels
            )
    return parts


def mitigation_targets(
    plan: Plan,
    train: tabular.TabularData,
    weights: ExampleWeights,
    run: int | None = None,
    rnd: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The labels and per-row loss weights a weighted mitigation trains this site's rows on.

    The rows' groups are those of the plan's ``fairness.sensitive_attribute``; a value outside
    the table's groups is looked up as ``"__other__"`` (as the fairness counts label it).

    Raises:
        TaskError: ``invalid_task`` when the plan's mitigation does not weigh the loss, or the
            table lacks a (group, label) cell that a training row has.
    """
    settings = plan.fairness
    if settings is None or not settings.mitigation.trains_weighted:
        kind = "none" if settings is None else settings.mitigation.kind
        raise TaskError(
            INVALID_TASK,
            f"the task carries example weights but the plan's fairness.mitigation kind is "
            f"{kind!r}; only 'reweighing' and 'constraint' train on weighted examples",
            run=run,
            round=rnd,
        )
    groups = train.groups.get(settings.sensitive_attribute)
    if groups is None:
        raise TaskError(
            INVALID_TASK,
            f"the training rows carry no sensitive column {settings.sensitive_attribute!r}",
            run=run,
            round=rnd,
        )
    try:
        return weights.apply(train.y, groups)
    except ValueError as exc:
        raise TaskError(
            INVALID_TASK,
            f"example weights: {exc}",
            run=run,
            round=rnd,
            # the row count is this site's; the server learns which cell is missing only
            shared_reason="the example weights lack a (group, label) cell of this site's rows",
        ) from None


def handle_evaluate(
    message: protocol.BinaryMessage,
    data: LocalData,
    *,
    noise_source: random.Random | None = None,
) -> dict[str, Any]:
    """Evaluate the run's final model on the local held-out split; build the ``evaluation``.

    No training: the plan is parsed as for a task, the data split the same way (so the held-out
    rows are the ones every round evaluated on), the model built from the plan's spec with the
    message's weights (strict). A multi-class or regression plan sends its task's sums instead
    (:func:`task_parts`: ``evaluation`` the metrics part, ``fairness`` the group parts). For a
    binary plan what leaves is the histogram of the held-out rows' predicted
    probabilities by label on ``fedcore.evaluation``'s fixed grid and their summed log loss, and
    for a plan with a fairness section (not a secure-aggregation plan, whose group counts only
    travel masked) :func:`fairness_counts` of the final model, with the plan's DP noise.

    Args:
        message: a reassembled ``evaluate`` message (fields validated by fedcore.protocol).
        data: the site's data.
        noise_source: random source of the fairness counts' DP noise (tests); None: the OS.

    Returns:
        The fields of the ``evaluation`` reply: ``run``, ``model_version``, ``evaluation``
        (the histogram's wire form) and, with group counts, ``fairness``.

    Raises:
        TaskError: ``invalid_task`` (plan, preprocessing or weights unusable) or
            ``data_invalid`` (the local data does not fit, or no held-out row is left).
    """
    fields = message.fields
    run = fields["run"]
    plan = fields["plan"]
    every_row = False
    if is_evaluation_plan(plan):  # an evaluation plan: its rows, "held_out" or "all"
        parsed: Any = check_evaluation_plan(plan, run)
        every_row = parsed.rows == "all"
        # The stewards approved these exact weights (their SHA-256 is in the hashed plan): a
        # server that sends others is refused before any row is read.
        if tensors.sha256_hex(message.payload) != parsed.model_version.sha256:
            raise TaskError(
                INVALID_TASK,
                f"the weights sent are not the model version the plan names (SHA-256 "
                f"{parsed.model_version.sha256}); nothing was evaluated",
                run=run,
            )
    else:
        parsed = check_plan(plan, run)
    try:
        # rows "all": a split that holds out nothing, its training part is every row
        split_plan = {"schema": plan["schema"], "evaluation": {"test_fraction": 0.0}}
        split = _prepare(split_plan if every_row else plan, data, run, None)
        arrays = data.arrays(split, fields["preprocessing"])
    except PlanError as exc:
        raise TaskError(INVALID_TASK, str(exc), run=run) from None
    except tabular.DataValidationError as exc:
        raise _data_invalid(exc, run=run) from None
    test = arrays.train if every_row else arrays.test
    if int(test.X.shape[0]) == 0:
        raise TaskError(DATA_INVALID, "no held-out rows to evaluate the final model on", run=run)
    model, _ = _load_global(message.payload, parsed, int(test.X.shape[1]), run, None)
    if parsed.task != "binary":
        # The task's sums (fedcore.task_metrics, fedcore.task_fairness): the server adds them
        # into the metrics and group fairness of the union of the held-out rows.
        try:
            parts = task_parts(model, test, parsed, fields["preprocessing"])
        except (ValueError, tabular.SchemaError) as exc:
            raise TaskError(INVALID_TASK, str(exc), run=run) from None
        reply = {
            "run": run,
            "model_version": fields["model_version"],
            "evaluation": parts["metrics"],
        }
        if parts["fairness"] and plan.get("secure_aggregation") is not True:
            reply["fairness"] = parts["fairness"]
        return _json_metrics(reply)  # type: ignore[no-any-return]
    probs = training.predict_proba(model, test.X)
    reply: dict[str, Any] = {
        "run": run,
        "model_version": fields["model_version"],
        "evaluation": evaluation.site_histogram(test.y, probs).to_wire(),
    }
    if parsed.task == "binary":  # the calibration curve's sums (fedcore.calibration)
        reply["calibration"] = calibration.site_calibration(test.y, probs).to_wire()
    if parsed.fairness is not None and final_counts_in_clear(plan):
        counts = fairness_counts(
            model, test, split.schema, fields["preprocessing"], parsed.fairness, source=noise_source
        )
        if counts:
            reply["fairness"] = counts
    if _weighs_loss(parsed, "postprocess"):
        assert parsed.fairness is not None
        rows, scores = test, probs
        if parsed.fairness.mitigation.rows == "training":  # the thresholds' rows: training split
            rows = arrays.train
            scores = training.predict_proba(model, rows.X) if rows.X.shape[0] else probs[:0]
        histograms = postprocess_histograms(parsed, rows, scores, fields["preprocessing"])
        if parsed.fairness.dp_epsilon is not None:  # one pure-DP release, charged by the server
            histograms = noisy_score_histogram(histograms, epsilon=parsed.fairness.dp_epsilon)
        reply["score_histograms"] = histograms
        if held_out_score_histograms_sent(plan):
            # thresholds chosen on the training rows: the held-out rows' histograms let the
            # server report the thresholded decisions out of sample (one more table)
            held_out = postprocess_histograms(parsed, test, probs, fields["preprocessing"])
            if parsed.fairness.dp_epsilon is not None:
                held_out = noisy_score_histogram(held_out, epsilon=parsed.fairness.dp_epsilon)
            reply["held_out_score_histograms"] = held_out
    return reply


def postprocess_grid(score_bins: int) -> np.ndarray:
    """The score grid of a ``postprocess`` plan: ``score_bins`` + 1 points on [0, 1]."""
    return np.linspace(0.0, 1.0, score_bins + 1)


def postprocess_histograms(
    plan: Plan, test: tabular.TabularData, probs: np.ndarray, preprocessing: Mapping[str, Any]
) -> dict[str, dict[str, list[int]]]:
    """Per public group of the plan's sensitive attribute, the counts of each label per point
    of the score grid (``fedcore.fairness_mitigation.score_histogram``) among ``test``'s rows:
    the held-out split, or the training split with ``fairness.mitigation.rows`` "training".
    What the server chooses the group thresholds from. A value outside the public list counts as
    ``__other__``, as in the fairness counts."""
    assert plan.fairness is not None
    attribute = plan.fairness.sensitive_attribute
    public = fairness.public_groups(plan.schema, preprocessing, plan.fairness.groups)[attribute]
    labels = np.asarray(test.groups[attribute], dtype=object)
    labels = np.where(np.isin(labels, public), labels, fairness.OTHER_GROUP).astype(str)
    grid = postprocess_grid(plan.fairness.mitigation.score_bins)
    return score_histogram(np.asarray(probs, dtype=np.float64), test.y, labels, grid, groups=public)


def _compressed(
    state: Mapping[str, torch.Tensor],
    global_state: Mapping[str, torch.Tensor],
    spec: compression.CompressionSpec,
    plan: Plan,
    task: protocol.BinaryMessage,
    residuals: ResidualStore | None,
) -> dict[str, torch.Tensor]:
    """The wire tensors of the update; for top-k, the run's residual is updated and saved first.

    Top-k adds the residual the round starts from (``ErrorFeedback.residual_for``: a rebuild of
    the same round starts from the same one) and, with ``aggregation.norm_bound``, scales what
    it sends to just under the bound (the rest stays in the residual).
    """
    run, rnd, plan_hash = task.fields["run"], task.fields["round"], task.fields["plan_hash"]
    feedback = compression.ErrorFeedback()
    if spec.method == "topk" and residuals is not None:
        feedback = residuals.load(run, plan_hash=plan_hash)
    floating = {name: t for name, t in global_state.items() if t.is_floating_point()}
    residual = matching(feedback.residual_for(rnd), floating)
    bound = plan.aggregation.params.get("norm_bound")
    max_norm = float(bound) if isinstance(bound, int | float) and bound > 0 else None
    try:
        built = compression.compress_update(
            state, global_state, spec, residual=residual, max_norm=max_norm
        )
    except compression.CompressionError as exc:
        raise TaskError(TRAINING_FAILED, str(exc), run=run, round=rnd) from None
    if spec.method == "topk" and residuals is not None:
        # before: what this round really started from (a rebuild starts from it again)
        feedback = compression.ErrorFeedback(round=rnd, before=residual, after=built.residual)
        try:
            residuals.save(run, feedback, plan_hash=plan_hash)
        except OSError as exc:
            raise TaskError(
                "internal",
                f"cannot save the top-k residual under {residuals.folder}: {exc}",
                run=run,
                round=rnd,
                shared_reason="the site could not save its compression state",
            ) from None
    return built.tensors


def _train_dp(
    model: nn.Module,
    train: tabular.TabularData,
    settings: Training,
    privacy: Privacy,
    dp_round: RoundPrivacy,
    on_batch: Callable[[int, int], None],
    objective: training.Objective = training.BINARY,
) -> dict[str, Any]:
    """One round of DP-SGD with the round's mechanism; TrainingError if it diverges."""
    from fedcore.privacy import dpsgd  # loads Opacus: only sites training with DP-SGD pay it

    result = dpsgd.train_dp(
        model,
        train.X,
        train.y,
        epochs=settings.local_epochs,
        batch_size=settings.batch_size,
        lr=settings.lr,
        clip=privacy.clip,
        delta=privacy.delta,
        noise_multiplier=dp_round.noise_multiplier,
        seed=None,  # noise and Poisson sampling keyed from the OS: a known seed voids DP
        optimizer=settings.optimizer,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
        accountant=ACCOUNTANT,
        on_batch=on_batch,
        objective=objective,
    )
    # train_dp derives the same mechanism from the same settings; a mismatch is a bug, and the
    # update would then report something other than what was run.
    ran = (result["noise_multiplier"], result["sample_rate"], result["steps"])
    planned = (dp_round.noise_multiplier, dp_round.sample_rate, dp_round.steps)
    if ran != planned:
        raise training.TrainingError(
            f"DP-SGD ran the mechanism {ran} instead of the plan's {planned}"
        )
    return result
