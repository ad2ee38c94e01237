"""The plan language: every key, default and combination of a plan spec, and its parser.

The server parses a plan at proposal (federation.services.plans) and every site agent parses it
again at every task (clientagent.trainer), with this one parser: what one side accepts, the other
does. :func:`parse_plan` returns a frozen :class:`Plan` or raises :class:`PlanError` with every
problem, keyed by its dotted path ("training.lr", "privacy.adaptive_clip.learning_rate").

The keys of each section are :class:`fedcore.plan.keys.Key` objects (type, range, default, a
sentence of documentation); the JSON Schema (:func:`fedcore.plan.json_schema`) and the key table
of docs/plan-spec.md are generated from them. The combinations no single key can express are the
``_combination_errors`` below. Model specs are validated by :mod:`fedcore.models`, dataset
schemas by :mod:`fedcore.tabular`, strategy parameters by :mod:`fedcore.aggregation` and
compression by :mod:`fedcore.compression`; this module calls them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedcore.aggregation_names import DP_WRAPPABLE, STRATEGY_NAMES
from fedcore.aggregation_params import check_strategy_spec
from fedcore.compression_spec import METHODS, CompressionSpec, CompressionSpecError
from fedcore.fairness import reported_attributes
from fedcore.fairness_mitigation import CONSTRAINTS, MULTIPLIER_SCHEDULES, OBJECTIVES
from fedcore.model_spec import SPEC_KINDS, ModelSpecError, validate_model_spec
from fedcore.plan.keys import Key, check_section, defaults, names, unknown_keys
from fedcore.privacy.accounting import PLAN_PRIVACY_DEFAULTS, PRIVACY_MODES
from fedcore.secure_update_defaults import DEFAULT_CLIP, DEFAULT_MAX_EXAMPLES
from fedcore.tabular import DatasetSchema, SchemaError
from fedcore.training_options import OPTIMIZERS, REGRESSION_LOSSES

if TYPE_CHECKING:
    from fedcore.training import Objective

FEDPROX = "fedprox"  # local proximal term at each site; the server averages (FedAvg)
QFEDAVG = "qfedavg"
# What can aggregate a mean it never sees the parts of: the (weighted) mean and the server
# optimisers. Secure aggregation hides each update; client-level DP hands the strategy only the
# noised mean of the clipped updates (fedcore.privacy.wrapper). Both need one of these.
MEAN_STRATEGIES: tuple[str, ...] = (*DP_WRAPPABLE, FEDPROX)
SECAGG_STRATEGIES = MEAN_STRATEGIES
CLIENT_DP_STRATEGIES = MEAN_STRATEGIES
AGGREGATION_STRATEGIES: tuple[str, ...] = (FEDPROX, *STRATEGY_NAMES)


class PlanError(ValueError):
    """A plan spec the language refuses; ``errors`` maps each dotted path to its problem."""

    def __init__(self, errors: Mapping[str, str]):
        """Args:
        errors: dotted path -> message (non-empty).
        """
        self.errors = dict(errors)
        super().__init__("; ".join(_sentence(path, msg) for path, msg in sorted(errors.items())))


def _sentence(path: str, message: str) -> str:
    """ "plan training.lr must be ..." (a predicate reads on from the path), else with a colon."""
    verb = message.split(" ", 1)[0]
    joint = " " if verb in ("must", "is", "are", "applies", "needs", "cannot") else ": "
    return f"plan {path}{joint}{message}"


# --- the keys ------------------------------------------------------------------------------------

# Every plan kind's wait for its sites (training, analysis, evaluation): one key, one default.
WAIT_FOR_SILOS = Key(
    "wait_for_silos_seconds",
    "number",
    "seconds a run waits for min_silos connected agents; null: max(round_deadline_seconds, 120)",
    default=None,
    minimum=0,
    exclusive_min=True,
    nullable=True,
)


def wait_for_silos_seconds(top: Mapping[str, Any], deadline: float) -> float:
    """A parsed plan's wait for its sites: its ``wait_for_silos_seconds``, or by default
    max(its deadline, 120 s)."""
    wait = top.get("wait_for_silos_seconds")
    return float(wait) if wait is not None else max(deadline, 120.0)


TOP_KEYS: tuple[Key, ...] = (
    Key(
        "name",
        "string",
        "the plan's name; part of the hashed version, so approvals bind it (the server sets it "
        "from the proposal)",
        default=None,
        nullable=True,
    ),
    Key(
        "description",
        "string",
        "the plan's description; part of the hashed version, like the name (null: none)",
        default=None,
        nullable=True,
    ),
    Key("model", "object", "the model to train: fedcore.models spec (section model)"),
    Key("schema", "object", "the dataset schema every site's data must match (fedcore.tabular)"),
    Key("training", "object", "local training at each site (section training)"),
    Key(
        "evaluation",
        "object",
        "each site's holdout split (section evaluation)",
        default={},
        nullable=True,
    ),
    Key(
        "aggregation",
        "object",
        "the server's strategy and its parameters (section aggregation)",
        default={"strategy": "fedavg"},
        nullable=True,
    ),
    Key(
        "min_silos",
        "integer",
        "silos whose updates a round needs before it aggregates",
        default=1,
        minimum=1,
    ),
    Key(
        "round_deadline_seconds",
        "number",
        "seconds a round waits for updates",
        default=300,
        minimum=0,
        exclusive_min=True,
    ),
    Key(
        "round_retries",
        "integer",
        "times a failed round is tried again",
        default=2,
        minimum=0,
    ),
    WAIT_FOR_SILOS,
    Key(
        "seed", "integer", "seed of model initialisation and local shuffling", default=0, minimum=0
    ),
    Key(
        "privacy",
        "object",
        "differential privacy (section privacy); null: none",
        default=None,
        nullable=True,
    ),
    Key(
        "secure_aggregation",
        "boolean",
        "sites mask their updates; the server learns only the sum",
        default=False,
    ),
    Key(
        "secagg",
        "object",
        "secure aggregation settings (section secagg)",
        default={},
        nullable=True,
    ),
    Key(
        "fairness",
        "object",
        "group fairness reports (section fairness); null: none",
        default=None,
        nullable=True,
    ),
    Key(
        "compression",
        "object",
        "how updates travel (section compression); null: dense",
        default=None,
        nullable=True,
    ),
)
ALLOWED_KEYS: tuple[str, ...] = names(TOP_KEYS)
# Top-level keys that hold a section, checked by their own section's keys.
_SECTIONS = ("model", "schema", "training", "evaluation", "aggregation", "privacy", "secagg")
_SECTIONS += ("fairness", "compression")

TRAINING_KEYS: tuple[Key, ...] = (
    Key("rounds", "integer", "federated rounds of the run", minimum=1),
    Key("local_epochs", "integer", "passes over the local training rows per round", minimum=1),
    Key("batch_size", "integer", "rows per optimizer step", minimum=1),
    Key(
        "lr",
        "number",
        "local learning rate",
        minimum=0,
        maximum=10,
        exclusive_min=True,
        exclusive_max=True,
    ),
    Key("optimizer", "string", "local optimizer", default="adam", choices=OPTIMIZERS),
    Key(
        "momentum",
        "number",
        "SGD momentum (optimizer 'sgd' only)",
        default=0.0,
        minimum=0,
        maximum=1,
        exclusive_max=True,
    ),
    Key("weight_decay", "number", "L2 weight decay", default=0.0, minimum=0),
    Key(
        "local_steps",
        "integer",
        "optimizer steps per round instead of local_epochs passes (not with DP)",
        default=None,
        minimum=1,
        nullable=True,
    ),
    Key(
        "loss",
        "string",
        "regression only: mse or huber; null: the task's own (binary cross-entropy, softmax "
        "cross-entropy, mse)",
        default=None,
        choices=REGRESSION_LOSSES,
        nullable=True,
    ),
    Key(
        "huber_delta",
        "number",
        "loss 'huber' only: where the loss turns from quadratic to linear (in the units the "
        "model learns: standard deviations when the target is standardised)",
        default=1.0,
        minimum=0,
        maximum=1e6,
        exclusive_min=True,
    ),
)

EVALUATION_KEYS: tuple[Key, ...] = (
    Key(
        "test_fraction",
        "number",
        "share of each site's rows held out for evaluation",
        default=0.2,
        minimum=0,
        maximum=1,
        exclusive_max=True,
    ),
    Key("seed", "integer", "seed of the holdout split", default=0, minimum=0),
    Key(
        "split_column",
        "string",
        "a data column with 'train'/'test' per row that fixes the split (then test_fraction "
        "and seed are not used)",
        default=None,
        nullable=True,
    ),
)

FEDPROX_MU = Key(
    "mu",
    "number",
    "FedProx's proximal weight (strategy fedprox only)",
    default=0.01,
    minimum=0,
    maximum=100,
)
STRATEGY_KEY = Key(
    "strategy",
    "string",
    "the server's aggregation strategy",
    default="fedavg",
    choices=AGGREGATION_STRATEGIES,
)

_PRIVACY_DOCS = {
    "mode": "none; sample (DP-SGD at each site); client (clipping and noise at aggregation)",
    "noise_multiplier": "Gaussian noise multiplier z",
    "target_epsilon": "epsilon of the whole run; the noise is calibrated to reach it",
    "clip": "L2 clip of each contribution (a sample's gradient, or a site's update)",
    "delta": "the DP delta, typically below 1 / rows",
    "adaptive_clip": "client mode only: the clip follows a quantile of the update norms",
    "statistics_epsilon": (
        "epsilon-DP (Laplace) of each site's numeric statistics before round 1; needs min/max "
        "on every numeric schema column; charged to the ledger; null: exact statistics"
    ),
}
PRIVACY_KEYS: tuple[Key, ...] = (
    Key("mode", "string", _PRIVACY_DOCS["mode"], default="none", choices=PRIVACY_MODES),
    Key(
        "noise_multiplier",
        "number",
        _PRIVACY_DOCS["noise_multiplier"],
        default=PLAN_PRIVACY_DEFAULTS["noise_multiplier"],
        minimum=0,
        exclusive_min=True,
        nullable=True,
    ),
    Key(
        "target_epsilon",
        "number",
        _PRIVACY_DOCS["target_epsilon"],
        default=PLAN_PRIVACY_DEFAULTS["target_epsilon"],
        minimum=0,
        exclusive_min=True,
        nullable=True,
    ),
    Key(
        "clip",
        "number",
        _PRIVACY_DOCS["clip"],
        default=PLAN_PRIVACY_DEFAULTS["clip"],
        minimum=0,
        exclusive_min=True,
    ),
    Key(
        "delta",
        "number",
        _PRIVACY_DOCS["delta"],
        default=PLAN_PRIVACY_DEFAULTS["delta"],
        minimum=0,
        maximum=1,
        exclusive_min=True,
        exclusive_max=True,
    ),
    Key(
        "adaptive_clip",
        "object",
        _PRIVACY_DOCS["adaptive_clip"],
        default=PLAN_PRIVACY_DEFAULTS["adaptive_clip"],
        nullable=True,
    ),
    Key(
        "statistics_epsilon",
        "number",
        _PRIVACY_DOCS["statistics_epsilon"],
        default=PLAN_PRIVACY_DEFAULTS["statistics_epsilon"],
        minimum=0,
        exclusive_min=True,
        nullable=True,
    ),
)
# fedcore.privacy.accounting keeps the defaults (it cannot import the plan language); same keys.
assert names(PRIVACY_KEYS) == tuple(PLAN_PRIVACY_DEFAULTS), "privacy keys drifted"

ADAPTIVE_CLIP_KEYS: tuple[Key, ...] = (
    Key(
        "target_quantile",
        "number",
        "fraction of the updates left unclipped",
        default=0.5,
        minimum=0,
        maximum=1,
        exclusive_min=True,
        exclusive_max=True,
    ),
    Key(
        "learning_rate",
        "number",
        "step of the clip's geometric update",
        default=0.2,
        minimum=0,
        exclusive_min=True,
    ),
    Key(
        "count_noise_std",
        "number",
        "noise on the count of unclipped updates; null: max(silos / 20, 2 z)",
        default=None,
        minimum=0,
        exclusive_min=True,
        nullable=True,
    ),
)

SECAGG_KEYS: tuple[Key, ...] = (
    Key(
        "clip",
        "number",
        "per-coordinate bound of a site's model delta, the quantiser's range",
        default=DEFAULT_CLIP,
        minimum=0,
        exclusive_min=True,
    ),
    Key(
        "threshold",
        "integer",
        "share holders needed to unmask; null: ceil(2k/3); raised to a strict majority of k",
        default=None,
        minimum=2,
        nullable=True,
    ),
    Key(
        "max_examples",
        "integer",
        "a site's weight is min(rows, max_examples) / max_examples",
        default=DEFAULT_MAX_EXAMPLES,
        minimum=1,
        maximum=2**31,
    ),
    Key(
        "degree",
        "integer",
        "neighbours per silo (SecAgg+); null: complete graph",
        default=None,
        minimum=1,
        nullable=True,
    ),
    Key(
        "stage_timeout_seconds",
        "number",
        "seconds each key-exchange and unmasking stage waits",
        default=30.0,
        minimum=0,
        exclusive_min=True,
    ),
)
SECAGG_DEFAULTS: dict[str, Any] = defaults(SECAGG_KEYS)

FAIRNESS_KEYS: tuple[Key, ...] = (
    Key("sensitive_attribute", "string", "a column of schema.sensitive to report on"),
    Key(
        "max_demographic_parity_difference",
        "number",
        "threshold the fairness report flags",
        default=None,
        minimum=0,
        maximum=1,
        nullable=True,
    ),
    Key(
        "max_equalized_odds_difference",
        "number",
        "threshold the fairness report flags",
        default=None,
        minimum=0,
        maximum=1,
        nullable=True,
    ),
    Key(
        "dp_epsilon",
        "number",
        "epsilon of each count table a site releases (discrete Laplace); null: exact counts",
        default=None,
        minimum=0,
        exclusive_min=True,
        nullable=True,
    ),
    Key(
        "groups",
        "object",
        "sensitive column (not a feature) -> list of its public group labels",
        default=None,
        nullable=True,
    ),
    Key(
        "mitigation",
        "object",
        "bias mitigation for sensitive_attribute (section fairness.mitigation); null: none",
        default=None,
        nullable=True,
    ),
)

# The rows a postprocess plan's thresholds are chosen on (fairness.mitigation.rows).
POSTPROCESS_ROWS: tuple[str, ...] = ("held_out", "training")
MITIGATION_KINDS: tuple[str, ...] = (
    "none",
    "reweighing",
    "fair_aggregation",
    "constraint",
    "postprocess",
)
# Which kinds read each parameter (a parameter given to another kind is refused).
MITIGATION_PARAMS: dict[str, tuple[str, ...]] = {
    "constraint": ("fair_aggregation", "constraint", "postprocess"),
    "bound": ("constraint",),
    "eta": ("constraint",),
    "multipliers": ("constraint",),
    "beta": ("fair_aggregation",),
    "objective": ("postprocess",),
    "score_bins": ("postprocess",),
    "rows": ("postprocess",),
}
MITIGATION_KEYS: tuple[Key, ...] = (
    Key(
        "kind",
        "string",
        "none; reweighing (Kamiran-Calders loss weights per group and label); fair_aggregation "
        "(FairFed aggregation weights); constraint (federated reductions, Agarwal et al. 2018); "
        "postprocess (group thresholds, Hardt et al. 2016)",
        default="none",
        choices=MITIGATION_KINDS,
    ),
    Key(
        "constraint",
        "string",
        "the parity to reach (constraint, postprocess) or FairFed's metric (fair_aggregation)",
        default="demographic_parity",
        choices=CONSTRAINTS,
    ),
    Key(
        "bound",
        "number",
        "constraint only: the largest gap allowed between a group's rate and the overall rate "
        "(fairlearn's eps; the multipliers' L1 norm is at most 1 / bound)",
        default=0.01,
        minimum=0,
        maximum=1,
        exclusive_min=True,
    ),
    Key(
        "eta",
        "number",
        "constraint only: learning rate of the Lagrange multipliers (fairlearn's eta0; each "
        "round's step is eta * bound, times the group's size relative to the largest group)",
        default=2.0,
        minimum=0,
        maximum=1000,
        exclusive_min=True,
    ),
    Key(
        "multipliers",
        "string",
        "constraint only: the multipliers each round trains with: 'averaged' (the mean of every "
        "round's multipliers so far, as fairlearn averages its iterates), 'decaying' (the last, "
        "stepped with eta / sqrt(round)) or 'last' (the last, constant step: fairlearn's)",
        default="averaged",
        choices=MULTIPLIER_SCHEDULES,
    ),
    Key(
        "beta",
        "number",
        "fair_aggregation only: FairFed's fairness budget (0: FedAvg's weights)",
        default=1.0,
        minimum=0,
        maximum=100,
    ),
    Key(
        "objective",
        "string",
        "postprocess only: what the thresholds maximise under the constraint",
        default="accuracy_score",
        choices=OBJECTIVES,
    ),
    Key(
        "score_bins",
        "integer",
        "postprocess only: the score grid has score_bins + 1 points on [0, 1]; scores are put "
        "on the nearest point before the thresholds apply",
        default=100,
        minimum=2,
        maximum=10000,
    ),
    Key(
        "rows",
        "string",
        "postprocess only: the rows each site's score histograms count, whose thresholds the "
        "server chooses: 'held_out' (the site's held-out split) or 'training' (its training "
        "split: more rows, thresholds that generalize better; docs/fairness.md)",
        default="held_out",
        choices=POSTPROCESS_ROWS,
    ),
)

COMPRESSION_KEYS: tuple[Key, ...] = (
    Key("method", "string", "how updates travel", default="none", choices=METHODS),
    Key(
        "ratio",
        "number",
        "topk only: the fraction of each tensor's coordinates sent",
        default=None,
        minimum=0,
        maximum=1,
        exclusive_min=True,
        nullable=True,
    ),
)

SECTION_DOCS: dict[str, str] = {
    "": "the plan spec (top level)",
    "training": "local training at each site",
    "evaluation": "each site's holdout split",
    "privacy": "differential privacy",
    "privacy.adaptive_clip": "adaptive clipping (Andrew et al. 2021), privacy mode client only",
    "secagg": "secure aggregation (read when secure_aggregation is true)",
    "fairness": "group fairness reports (docs/fairness.md)",
    "fairness.mitigation": "bias mitigation (docs/fairness.md, 'Mitigation')",
    "compression": "update compression (fedcore.compression)",
}
SECTIONS: dict[str, tuple[Key, ...]] = {
    "": TOP_KEYS,
    "training": TRAINING_KEYS,
    "evaluation": EVALUATION_KEYS,
    "privacy": PRIVACY_KEYS,
    "privacy.adaptive_clip": ADAPTIVE_CLIP_KEYS,
    "secagg": SECAGG_KEYS,
    "fairness": FAIRNESS_KEYS,
    "fairness.mitigation": MITIGATION_KEYS,
    "compression": COMPRESSION_KEYS,
}


# --- the typed plan ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Training:
    """The ``training`` section."""

    rounds: int
    local_epochs: int
    batch_size: int
    lr: float
    optimizer: str
    momentum: float
    weight_decay: float
    local_steps: int | None
    loss: str | None = None  # regression: "mse" or "huber"; None: the task's own
    huber_delta: float = 1.0


@dataclass(frozen=True)
class Evaluation:
    """The ``evaluation`` section."""

    test_fraction: float
    seed: int
    split_column: str | None


@dataclass(frozen=True)
class AdaptiveClipSettings:
    """``privacy.adaptive_clip``."""

    target_quantile: float
    learning_rate: float
    count_noise_std: float | None


@dataclass(frozen=True)
class Privacy:
    """The ``privacy`` section, defaults filled in."""

    mode: str
    noise_multiplier: float | None
    target_epsilon: float | None
    clip: float
    delta: float
    adaptive_clip: AdaptiveClipSettings | None
    statistics_epsilon: float | None = None

    @property
    def dp(self) -> bool:
        """Whether the plan uses differential privacy (mode ``sample`` or ``client``)."""
        return self.mode != "none"

    def section(self) -> dict[str, Any]:
        """The section as fedcore.privacy.accounting reads it (every key, defaults filled in)."""
        adaptive = self.adaptive_clip
        return {
            "mode": self.mode,
            "noise_multiplier": self.noise_multiplier,
            "target_epsilon": self.target_epsilon,
            "clip": self.clip,
            "delta": self.delta,
            "adaptive_clip": None if adaptive is None else dict(adaptive.__dict__),
            "statistics_epsilon": self.statistics_epsilon,
        }


@dataclass(frozen=True)
class Aggregation:
    """The ``aggregation`` section: the strategy, its parameters and FedProx's mu."""

    strategy: str
    params: dict[str, Any] = field(default_factory=dict)  # the strategy's, "mu" excluded
    prox_mu: float = 0.0  # 0.0 unless the strategy is fedprox

    def server_spec(self) -> dict[str, Any]:
        """The fedcore.aggregation spec the server builds (fedprox averages with fedavg)."""
        if self.strategy == FEDPROX:
            return {"strategy": "fedavg"}
        return {"strategy": self.strategy, **self.params}


@dataclass(frozen=True)
class SecAggSettings:
    """The secure-aggregation section, defaults filled in."""

    clip: float
    threshold: int | None
    max_examples: int
    degree: int | None
    stage_timeout_seconds: float


@dataclass(frozen=True)
class Mitigation:
    """``fairness.mitigation``, defaults filled in (parameters of other kinds stay at theirs)."""

    kind: str = "none"
    constraint: str = "demographic_parity"
    bound: float = 0.01
    eta: float = 2.0
    multipliers: str = "averaged"
    beta: float = 1.0
    objective: str = "accuracy_score"
    score_bins: int = 100
    rows: str = "held_out"

    @property
    def active(self) -> bool:
        """Whether the plan mitigates at all (kind other than ``none``)."""
        return self.kind != "none"

    @property
    def trains_weighted(self) -> bool:
        """Whether sites weight their loss per (group, label): reweighing and constraint."""
        return self.kind in ("reweighing", "constraint")


NO_MITIGATION = Mitigation()


@dataclass(frozen=True)
class Fairness:
    """The ``fairness`` section."""

    sensitive_attribute: str
    max_demographic_parity_difference: float | None
    max_equalized_odds_difference: float | None
    dp_epsilon: float | None
    groups: dict[str, list[str]]
    mitigation: Mitigation = NO_MITIGATION


@dataclass(frozen=True)
class RunSettings:
    """Orchestration settings of a plan."""

    rounds: int
    min_silos: int
    round_deadline_seconds: float
    round_retries: int
    wait_for_silos_seconds: float
    seed: int


@dataclass(frozen=True)
class Plan:
    """A parsed plan spec; ``secagg`` is None unless ``secure_aggregation`` is true."""

    model: dict[str, Any]
    schema: DatasetSchema
    training: Training
    evaluation: Evaluation
    aggregation: Aggregation
    privacy: Privacy
    secure_aggregation: bool
    secagg: SecAggSettings | None
    fairness: Fairness | None
    compression: CompressionSpec
    run: RunSettings
    seed: int

    @property
    def task(self) -> str:
        """The prediction task: ``schema.target.task`` (binary, multiclass or regression)."""
        return self.schema.target.task

    def objective(self) -> Objective:
        """What the model outputs and the loss every site trains it with."""
        from fedcore.training import Objective  # torch: only where a model trains or is scored

        return Objective.for_task(
            self.task,
            n_outputs=self.schema.target.n_outputs,
            loss=self.training.loss,
            huber_delta=self.training.huber_delta,
        )


# --- reading a stored (validated) spec -----------------------------------------------------------


def run_settings(spec: Mapping[str, Any]) -> RunSettings:
    """The orchestration settings of a validated plan spec, defaults filled in."""
    top = {**defaults(TOP_KEYS), **spec}
    deadline = float(top["round_deadline_seconds"])
    return RunSettings(
        rounds=int((spec.get("training") or {}).get("rounds", 1)),
        min_silos=int(top["min_silos"]),
        round_deadline_seconds=deadline,
        round_retries=int(top["round_retries"]),
        wait_for_silos_seconds=wait_for_silos_seconds(top, deadline),
        seed=int(top["seed"]),
    )


def secagg_settings(spec: Mapping[str, Any]) -> SecAggSettings | None:
    """A validated plan's secure-aggregation settings; None unless secure_aggregation is true."""
    if spec.get("secure_aggregation") is not True:
        return None
    values = {**SECAGG_DEFAULTS, **(spec.get("secagg") or {})}
    return SecAggSettings(
        clip=float(values["clip"]),
        threshold=values["threshold"],
        max_examples=int(values["max_examples"]),
        degree=values["degree"],
        stage_timeout_seconds=float(values["stage_timeout_seconds"]),
    )


def secagg_threshold(neighbourhood: int, requested: int | None) -> int:
    """The threshold t of a round whose closed neighbourhoods have ``neighbourhood`` silos.

    Default ``ceil(2k/3)``; a requested t is raised to a strict majority of k (two disjoint
    groups of silos must never both be able to unmask) and capped at k. Never below 2.
    """
    k = neighbourhood
    t = math.ceil(2 * k / 3) if requested is None else max(requested, k // 2 + 1)
    return max(2, min(t, k))


def server_strategy_spec(aggregation: Mapping[str, Any]) -> dict[str, Any]:
    """The fedcore.aggregation spec of a plan's aggregation section (ValueError if invalid)."""
    errors: dict[str, str] = {}
    parsed = _aggregation({} if aggregation is None else aggregation, errors)
    if parsed is None:
        raise ValueError("; ".join(f"{path}: {msg}" for path, msg in sorted(errors.items())))
    return parsed.server_spec()


# --- the parser ------------------------------------------------------------------------------


def _section(
    spec: Mapping[str, Any], key: str, allowed: tuple[str, ...], errors: dict[str, str]
) -> Mapping[str, Any] | None:
    """``spec[key]`` when it is an object, {} when absent or null; None (and an error) else."""
    value = spec.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        errors[key] = f"must be an object with keys {', '.join(allowed)}"
        return None
    return value


def _model(spec: Mapping[str, Any], errors: dict[str, str]) -> dict[str, Any] | None:
    model = spec.get("model")
    if not isinstance(model, Mapping):
        errors["model"] = 'must be an object such as {"kind": "logistic_regression"}'
        return None
    if model.get("kind") not in SPEC_KINDS:
        errors["model.kind"] = (
            f"unknown model kind {model.get('kind')!r}; allowed kinds: {', '.join(SPEC_KINDS)}"
        )
        return None
    try:
        return validate_model_spec(model)
    except ModelSpecError as exc:
        errors["model"] = str(exc)
        return None


def parse_schema(raw: Any) -> DatasetSchema:
    """A plan's dataset schema; PlanError (path "schema") when it is missing or invalid."""
    if not isinstance(raw, Mapping):
        raise PlanError({"schema": "must be an object with columns, target and sensitive"})
    try:
        return DatasetSchema.from_dict(raw)
    except (SchemaError, TypeError, KeyError, AttributeError, ValueError) as exc:
        raise PlanError({"schema": str(exc)}) from None


def _training(spec: Mapping[str, Any], errors: dict[str, str]) -> Training | None:
    section = spec.get("training")
    if not isinstance(section, Mapping):
        errors["training"] = (
            f"must be an object with keys {', '.join(names(TRAINING_KEYS))} "
            "(rounds, local_epochs, batch_size and lr required)"
        )
        return None
    before = len(errors)
    v = check_section(section, TRAINING_KEYS, "training", errors)
    if "training.momentum" not in errors and "training.optimizer" not in errors:
        if v["momentum"] and v["optimizer"] != "sgd":
            errors["training.momentum"] = (
                f"applies to optimizer 'sgd' only (optimizer is {v['optimizer']!r}); "
                "set momentum 0 or optimizer 'sgd'"
            )
    if "huber_delta" in section and "training.loss" not in errors and v["loss"] != "huber":
        errors.setdefault(
            "training.huber_delta",
            f"applies to loss 'huber' only (loss is {v['loss']!r}); remove it or set loss 'huber'",
        )
    if len(errors) > before:
        return None
    return Training(
        rounds=v["rounds"],
        local_epochs=v["local_epochs"],
        batch_size=v["batch_size"],
        lr=float(v["lr"]),
        optimizer=v["optimizer"],
        momentum=float(v["momentum"]),
        weight_decay=float(v["weight_decay"]),
        local_steps=v["local_steps"],
        loss=v["loss"],
        huber_delta=float(v["huber_delta"]),
    )


def parse_evaluation(raw: Any) -> Evaluation:
    """A plan's ``evaluation`` section (absent or null: the defaults); PlanError if invalid."""
    errors: dict[str, str] = {}
    evaluation = _evaluation({"evaluation": raw}, errors)
    if evaluation is None:
        raise PlanError(errors)
    return evaluation


def _evaluation(spec: Mapping[str, Any], errors: dict[str, str]) -> Evaluation | None:
    section = _section(spec, "evaluation", names(EVALUATION_KEYS), errors)
    if section is None:
        return None
    before = len(errors)
    v = check_section(section, EVALUATION_KEYS, "evaluation", errors)
    if len(errors) > before:
        return None
    return Evaluation(float(v["test_fraction"]), v["seed"], v["split_column"])


def _aggregation(section: Any, errors: dict[str, str]) -> Aggregation | None:
    if not isinstance(section, Mapping):
        errors["aggregation"] = 'must be an object such as {"strategy": "fedavg"}'
        return None
    name = section.get("strategy", "fedavg")
    if problem := STRATEGY_KEY.problem(name):
        errors["aggregation.strategy"] = problem
        return None
    params = {str(k): v for k, v in section.items() if k != "strategy"}
    if name == FEDPROX:
        if problem := unknown_keys(params, ("mu",)):
            errors["aggregation"] = f"fedprox: {problem}"
            return None
        mu = params.get("mu", FEDPROX_MU.default)
        if problem := FEDPROX_MU.problem(mu):
            errors["aggregation.mu"] = problem
            return None
        return Aggregation(strategy=name, params={}, prox_mu=float(mu))
    try:
        # The rule each strategy's constructor checks its parameters with, without torch.
        check_strategy_spec({"strategy": name, **params})
    except ValueError as exc:
        errors["aggregation"] = str(exc)
        return None
    return Aggregation(strategy=name, params=params)


def _adaptive(raw: Any, errors: dict[str, str]) -> AdaptiveClipSettings | None:
    where = "privacy.adaptive_clip"
    if not isinstance(raw, Mapping):
        errors[where] = f"must be an object with keys {', '.join(names(ADAPTIVE_CLIP_KEYS))}"
        return None
    before = len(errors)
    v = check_section(raw, ADAPTIVE_CLIP_KEYS, where, errors)
    if len(errors) > before:
        return None
    count = v["count_noise_std"]
    return AdaptiveClipSettings(
        float(v["target_quantile"]),
        float(v["learning_rate"]),
        None if count is None else float(count),
    )


def _privacy(spec: Mapping[str, Any], errors: dict[str, str]) -> Privacy | None:
    section = _section(spec, "privacy", names(PRIVACY_KEYS), errors)
    if section is None:
        return None
    before = len(errors)
    v = check_section(section, PRIVACY_KEYS, "privacy", errors)
    if (
        v["mode"] in ("sample", "client")
        and v["noise_multiplier"] is None
        and v["target_epsilon"] is None
    ):
        errors.setdefault(
            "privacy",
            f"mode {v['mode']!r} needs noise_multiplier > 0 or target_epsilon > 0 to calibrate "
            "noise",
        )
    adaptive = None
    if v["adaptive_clip"] is not None and "privacy.adaptive_clip" not in errors:
        if v["mode"] != "client":
            errors["privacy.adaptive_clip"] = "applies to client-level DP (mode 'client') only"
        elif spec.get("secure_aggregation") is True:
            errors["privacy.adaptive_clip"] = (
                "needs each silo's update norm, which secure aggregation hides; turn one off"
            )
        else:
            adaptive = _adaptive(v["adaptive_clip"], errors)
    if v["statistics_epsilon"] is not None and "privacy.statistics_epsilon" not in errors:
        _statistics_bounds(spec, errors)
    if len(errors) > before:
        return None

    def number(value: Any) -> float | None:
        return None if value is None else float(value)

    return Privacy(
        mode=v["mode"],
        noise_multiplier=number(v["noise_multiplier"]),
        target_epsilon=number(v["target_epsilon"]),
        clip=float(v["clip"]),
        delta=float(v["delta"]),
        adaptive_clip=adaptive,
        statistics_epsilon=number(v["statistics_epsilon"]),
    )


def _statistics_bounds(spec: Mapping[str, Any], errors: dict[str, str]) -> None:
    """Noised statistics need every numeric column's clipping bounds (their sensitivity)."""
    try:
        schema = DatasetSchema.from_dict(spec.get("schema"))
    except (SchemaError, AttributeError, TypeError):
        return  # the schema's own errors are reported under "schema"
    unbounded = [c.name for c in schema.columns if c.type == "numeric" and c.bounds() is None]
    if unbounded:
        errors["privacy.statistics_epsilon"] = (
            f"needs the clipping bounds of every numeric column (their sensitivity); declare "
            f"'min' and 'max' in the schema for {', '.join(map(repr, unbounded))}"
        )


def _secagg(spec: Mapping[str, Any], errors: dict[str, str]) -> SecAggSettings | None:
    section = _section(spec, "secagg", names(SECAGG_KEYS), errors)
    if section is None:
        return None
    before = len(errors)
    v = check_section(section, SECAGG_KEYS, "secagg", errors)
    if len(errors) > before:
        return None
    return SecAggSettings(
        clip=float(v["clip"]),
        threshold=v["threshold"],
        max_examples=v["max_examples"],
        degree=v["degree"],
        stage_timeout_seconds=float(v["stage_timeout_seconds"]),
    )


def _groups_errors(groups: Mapping[str, Any], schema: DatasetSchema | None) -> dict[str, str]:
    errors: dict[str, str] = {}
    for attribute, labels in groups.items():
        where = f"fairness.groups.{attribute}"
        if schema is not None and attribute not in schema.sensitive:
            errors[where] = f"{attribute!r} is not in schema.sensitive"
        elif schema is not None and attribute in {column.name for column in schema.columns}:
            errors[where] = (
                f"{attribute!r} is a feature column: its groups are the categories the federated "
                "statistics publish, so do not declare them"
            )
        elif (
            not isinstance(labels, list)
            or not labels
            or not all(isinstance(label, str) and label.strip() == label != "" for label in labels)
            or len(set(labels)) != len(labels)
        ):
            errors[where] = "must be a non-empty list of distinct labels (strings, no padding)"
    return errors


def _fairness(
    spec: Mapping[str, Any], schema: DatasetSchema | None, errors: dict[str, str]
) -> Fairness | None:
    if spec.get("fairness") is None:
        return None
    section = _section(spec, "fairness", names(FAIRNESS_KEYS), errors)
    if section is None:
        return None
    v = check_section(section, FAIRNESS_KEYS, "fairness", errors)
    attribute = v.get("sensitive_attribute")
    if (
        "fairness.sensitive_attribute" not in errors
        and schema is not None
        and attribute not in schema.sensitive
    ):
        listed = ", ".join(schema.sensitive) or "none"
        errors["fairness.sensitive_attribute"] = (
            f"{attribute!r} is not a sensitive attribute of the plan's schema "
            f"(schema.sensitive lists: {listed})"
        )
    groups = v["groups"] or {}
    if "fairness.groups" not in errors:
        if not isinstance(groups, Mapping):
            errors["fairness.groups"] = (
                'must be an object: sensitive column -> list of its group labels, e.g. {"sex": '
                '["F", "M"]}'
            )
        else:
            errors.update(_groups_errors(groups, schema))
    mitigation = NO_MITIGATION
    if v["mitigation"] is not None and "fairness.mitigation" not in errors:
        mitigation = _mitigation(v["mitigation"], errors) or NO_MITIGATION
    if any(path == "fairness" or path.startswith("fairness.") for path in errors):
        return None

    def number(value: Any) -> float | None:
        return None if value is None else float(value)

    return Fairness(
        sensitive_attribute=attribute,
        max_demographic_parity_difference=number(v["max_demographic_parity_difference"]),
        max_equalized_odds_difference=number(v["max_equalized_odds_difference"]),
        dp_epsilon=number(v["dp_epsilon"]),
        groups={str(name): list(labels) for name, labels in groups.items()},
        mitigation=mitigation,
    )


def _mitigation(raw: Any, errors: dict[str, str]) -> Mitigation | None:
    where = "fairness.mitigation"
    if not isinstance(raw, Mapping):
        errors[where] = f"must be an object with keys {', '.join(names(MITIGATION_KEYS))}"
        return None
    before = len(errors)
    v = check_section(raw, MITIGATION_KEYS, where, errors)
    kind = v["kind"]
    if f"{where}.kind" not in errors:
        for param, kinds in MITIGATION_PARAMS.items():
            if param in raw and kind not in kinds and f"{where}.{param}" not in errors:
                errors[f"{where}.{param}"] = (
                    f"applies to kind {' or '.join(map(repr, kinds))} only (kind is {kind!r}); "
                    "remove it"
                )
    if len(errors) > before:
        return None
    return Mitigation(
        kind=kind,
        constraint=v["constraint"],
        bound=float(v["bound"]),
        eta=float(v["eta"]),
        multipliers=v["multipliers"],
        beta=float(v["beta"]),
        objective=v["objective"],
        score_bins=int(v["score_bins"]),
        rows=v["rows"],
    )


def _mitigation_errors(
    spec: Mapping[str, Any],
    schema: DatasetSchema | None,
    fairness: Fairness | None,
    aggregation: Aggregation | None,
    privacy: Privacy | None,
    evaluation: Evaluation | None,
    errors: dict[str, str],
) -> None:
    """What a mitigation needs from the rest of the plan (docs/fairness.md, 'Mitigation')."""
    if fairness is None or not fairness.mitigation.active:
        return
    where = "fairness.mitigation.kind"
    kind = fairness.mitigation.kind
    secure = spec.get("secure_aggregation") is True
    mode = privacy.mode if privacy is not None else None
    attribute = fairness.sensitive_attribute
    if schema is not None and attribute not in reported_attributes(schema, fairness.groups):
        # Counts, weights and thresholds are keyed by group: only public labels may travel.
        errors[where] = (
            f"{kind!r} needs the groups of {attribute!r} to be public labels: make it a "
            "categorical or boolean column of schema.columns, or declare its labels in "
            "fairness.groups"
        )
    elif kind in ("reweighing", "constraint") and mode == "sample":
        errors[where] = (
            f"{kind!r} weights each example's loss, which DP-SGD (privacy mode 'sample') does "
            "not support here; use privacy mode 'client', or kind 'postprocess'"
        )
    elif kind in ("reweighing", "constraint") and mode == "client" and fairness.dp_epsilon is None:
        errors[where] = (
            f"{kind!r} releases counts of the training rows, outside client-level DP's "
            "guarantee; set fairness.dp_epsilon so that they are noised and charged to the "
            "ledger"
        )
    elif (
        kind in ("reweighing", "constraint")
        and fairness.dp_epsilon is None
        and (secure or (privacy is not None and privacy.statistics_epsilon is not None))
    ):
        covered = "secure_aggregation" if secure else "privacy.statistics_epsilon"
        errors[where] = (
            f"{kind!r} sends each site's (group, label) counts of its training rows with the "
            f"statistics, which {covered} does not cover (secure aggregation masks the rounds' "
            "updates and group counts; statistics_epsilon noises the statistics only); set "
            "fairness.dp_epsilon so that they are released noised and charged to the ledger"
        )
    elif kind == "fair_aggregation" and secure:
        errors[where] = (
            "'fair_aggregation' weighs each silo by its own counts, which secure aggregation "
            "hides (the server learns only their sum); turn secure_aggregation off or use "
            "kind 'reweighing', 'constraint' or 'postprocess'"
        )
    elif kind == "fair_aggregation" and mode == "client":
        errors[where] = (
            "'fair_aggregation' with client-level DP is not supported: the noise is calibrated "
            "to the fixed weights of clipped updates, and FairFed's weights depend on the data"
        )
    elif (
        kind == "fair_aggregation"
        and aggregation is not None
        and aggregation.strategy not in MEAN_STRATEGIES
    ):
        errors[where] = (
            f"'fair_aggregation' reweighs a weighted mean; strategy {aggregation.strategy!r} is "
            f"not one; use one of: {', '.join(MEAN_STRATEGIES)}"
        )
    elif kind == "postprocess" and secure and fairness.dp_epsilon is None:
        errors[where] = (
            "'postprocess' chooses its thresholds from each site's per-group score histograms "
            "of the final model, which travel with the final evaluation, outside the masked "
            "vector of the rounds (secure aggregation masks the rounds only); set "
            "fairness.dp_epsilon so that they are released noised and charged to the ledger"
        )
    elif (
        kind == "postprocess"
        and fairness.mitigation.rows == "training"
        and fairness.dp_epsilon is None
        and (
            mode in ("sample", "client")
            or (privacy is not None and privacy.statistics_epsilon is not None)
        )
    ):
        covered = (
            f"privacy mode {mode!r}"
            if mode in ("sample", "client")
            else "privacy.statistics_epsilon"
        )
        errors[where] = (
            "'postprocess' with rows 'training' releases each site's per-group score histograms "
            f"of its training rows, outside the guarantee of {covered} (which covers the rounds' "
            "updates or the statistics only); set fairness.dp_epsilon so that they are noised "
            "and charged to the ledger, or choose the thresholds on rows 'held_out'"
        )
    elif (
        kind == "postprocess"
        and evaluation is not None
        and evaluation.test_fraction == 0
        and evaluation.split_column is None
    ):
        rows_note = (
            " (with rows 'training' the histograms count the training rows, but a site without "
            "held-out rows has no final evaluation to send them with)"
            if fairness.mitigation.rows == "training"
            else " (rows 'held_out': the histograms count them)"
        )
        errors[where] = (
            f"'postprocess' chooses its thresholds from histograms that travel with each "
            f"site's final evaluation, which scores the held-out rows{rows_note}; set "
            "evaluation.test_fraction > 0 or evaluation.split_column"
        )


def _compression(spec: Mapping[str, Any], errors: dict[str, str]) -> CompressionSpec | None:
    try:
        return CompressionSpec.from_section(spec.get("compression"))
    except CompressionSpecError as exc:
        errors[exc.field] = str(exc)
        return None


def _combination_errors(
    spec: Mapping[str, Any],
    training: Training | None,
    aggregation: Aggregation | None,
    privacy: Privacy | None,
    compression: CompressionSpec | None,
    errors: dict[str, str],
) -> None:
    """The rules across sections: what no site would run faithfully."""
    secure = spec.get("secure_aggregation") is True
    mode = privacy.mode if privacy is not None else None
    if training is not None and training.local_steps is not None and privacy and privacy.dp:
        errors["training.local_steps"] = (
            "is not supported with differential privacy (its accounting counts local_epochs); "
            "use local_epochs"
        )
    if aggregation is not None:
        name = aggregation.strategy
        if secure and name not in SECAGG_STRATEGIES:
            errors["aggregation.strategy"] = (
                f"'{name}' needs each silo's update, which secure aggregation hides; "
                f"with secure aggregation use one of: {', '.join(SECAGG_STRATEGIES)}"
            )
        elif mode == "client" and name not in CLIENT_DP_STRATEGIES:
            errors["aggregation.strategy"] = (
                f"'{name}' needs each silo's update, but client-level DP hands the strategy only "
                "the noised mean of the clipped updates (a robust or loss-weighted rule over "
                "noised data protects nothing); with privacy mode 'client' use one of: "
                f"{', '.join(CLIENT_DP_STRATEGIES)}"
            )
        elif mode == "sample" and name == FEDPROX:
            # The proximal term would have to be added to the noised gradient inside the DP
            # optimizer: not implemented.
            errors["aggregation.strategy"] = (
                "FedProx with DP-SGD is not supported (privacy mode 'sample'); use fedavg, or "
                "client-level DP"
            )
        elif mode == "sample" and name == QFEDAVG:
            errors["aggregation.strategy"] = (
                "q-FedAvg with DP-SGD is not supported: it needs each site's un-noised training "
                "loss of the global model, a release outside the DP guarantee"
            )
    if compression is not None and compression.compressed and secure:
        # The masked vector is dense 32-bit ring elements: a sparse or narrower update would
        # have to be masked coordinate by coordinate in a layout every site agrees on.
        errors["compression"] = (
            f"{compression.method!r} cannot be combined with secure aggregation: its masked "
            "vectors are dense 32-bit; use method 'none' or turn secure_aggregation off"
        )


def _task_errors(
    spec: Mapping[str, Any],
    schema: DatasetSchema | None,
    training: Training | None,
    fairness: Fairness | None,
    privacy: Privacy | None,
    errors: dict[str, str],
) -> None:
    """What each prediction task (schema.target.task) rules out (docs/tasks.md)."""
    if schema is None:
        return
    task = schema.target.task
    if training is not None and training.loss is not None and task != "regression":
        errors["training.loss"] = (
            f"applies to task 'regression' only (schema.target.task is {task!r}); a "
            f"{task} model trains with {'softmax ' if task == 'multiclass' else 'binary '}"
            "cross-entropy: remove it"
        )
    if privacy is not None and privacy.statistics_epsilon is not None and schema.target.standardize:
        errors["privacy.statistics_epsilon"] = (
            "cannot be combined with a standardised regression target: the target's statistics "
            "are released exact only; set schema.target.standardize false or "
            "statistics_epsilon null"
        )
    if fairness is None or task == "binary":
        return
    # The binary report (selection rate at 0.5, TPR/FPR), its thresholds, its noised counts and
    # every mitigation are defined on a positive label; the other tasks have their own report
    # (fedcore.task_fairness), released exact and outside secure aggregation for now.
    for key in THRESHOLD_KEYS:
        if getattr(fairness, key) is not None:
            errors[f"fairness.{key}"] = (
                f"is defined for task 'binary' (a positive label); task {task!r} reports "
                "per-group disparities of its own (docs/tasks.md): remove it"
            )
    if fairness.mitigation.active:
        errors["fairness.mitigation.kind"] = (
            f"{fairness.mitigation.kind!r} is defined for task 'binary' (label and threshold "
            f"of a positive class); task {task!r} has no mitigation yet: use kind 'none'"
        )
    if fairness.dp_epsilon is not None:
        errors["fairness.dp_epsilon"] = (
            f"noised group statistics are implemented for task 'binary' only (its counts have "
            f"sensitivity 1); for task {task!r} set it to null"
        )
    if spec.get("secure_aggregation") is True:
        errors["fairness"] = (
            f"task {task!r} with a fairness section cannot use secure aggregation yet: its "
            "group statistics do not travel in the masked vector; turn one off"
        )


THRESHOLD_KEYS = ("max_demographic_parity_difference", "max_equalized_odds_difference")


def final_counts_in_clear(spec: Mapping[str, Any]) -> bool:
    """Whether a site sends its final evaluation's group counts (and a ``postprocess`` plan's
    score histograms) with its evaluation message, outside any mask.

    The final evaluation has no masked vector: under secure aggregation a site sends them only
    noised (``fairness.dp_epsilon``: pure epsilon-DP per table, charged to its ledger), as the
    label counts of ``reweighing`` travel; without noise the final model gets no fairness report
    (and the plan language refuses ``postprocess``). The site's agent and the server both ask
    this, so neither sends nor accepts what the other would not.
    """
    fairness = spec.get("fairness")
    if not isinstance(fairness, Mapping):
        return False
    return spec.get("secure_aggregation") is not True or fairness.get("dp_epsilon") is not None


def held_out_score_histograms_sent(spec: Mapping[str, Any]) -> bool:
    """Whether a site also sends, with its final evaluation, per-group score histograms of its
    held-out rows (``held_out_score_histograms``), beside the ``score_histograms`` the
    thresholds are chosen from.

    Only for ``postprocess`` with ``fairness.mitigation.rows`` "training": the server reports
    the thresholded decisions on the pooled held-out rows, out of sample (with rows "held_out"
    the histograms the thresholds come from are those rows already). Sent when the final
    evaluation's tables travel at all (:func:`final_counts_in_clear`); with
    ``fairness.dp_epsilon`` noised, one more table charged to each silo's ledger. No new
    release without noise: the held-out rows are outside every DP guarantee of a plan, as
    with rows "held_out". The site's agent, the server and the ledger's projection ask this.
    """
    fairness = spec.get("fairness")
    if not isinstance(fairness, Mapping) or not final_counts_in_clear(spec):
        return False
    mitigation = fairness.get("mitigation")
    if not isinstance(mitigation, Mapping) or mitigation.get("kind") != "postprocess":
        return False
    return mitigation.get("rows", "held_out") == "training"


def errors_of(parse: Callable[[Any], object], spec: Any) -> dict[str, str]:
    """Every problem ``parse`` finds in a spec, dotted path -> message (empty when valid)."""
    try:
        parse(spec)
    except PlanError as exc:
        return exc.errors
    return {}


def training_plan_errors(spec: Any) -> dict[str, str]:
    """Every problem of a training plan spec, dotted path -> message (empty when it is valid).

    ``fedcore.plan.plan_errors`` checks any plan, training or analysis."""
    return errors_of(parse_plan, spec)


def parse_plan(spec: Any) -> Plan:
    """Parse a plan spec (JSON data) into a :class:`Plan`.

    Raises:
        PlanError: with every problem found, keyed by dotted path.
    """
    if not isinstance(spec, Mapping):
        raise PlanError({"spec": f"a plan must be a JSON object, got {type(spec).__name__}"})
    errors: dict[str, str] = {}
    for key in sorted(str(key) for key in spec if key not in ALLOWED_KEYS):
        errors[key] = f"unknown key {key!r}; allowed keys: {', '.join(ALLOWED_KEYS)}"
    top = check_section(
        {k: v for k, v in spec.items() if k in ALLOWED_KEYS}, TOP_KEYS, "", errors, skip=_SECTIONS
    )
    model = _model(spec, errors)
    schema: DatasetSchema | None = None
    try:
        schema = parse_schema(spec.get("schema"))
    except PlanError as exc:
        errors.update(exc.errors)
    training = _training(spec, errors)
    evaluation = _evaluation(spec, errors)
    raw_aggregation = spec.get("aggregation")
    aggregation = _aggregation({} if raw_aggregation is None else raw_aggregation, errors)
    privacy = _privacy(spec, errors)
    secagg = _secagg(spec, errors)
    fairness = _fairness(spec, schema, errors)
    compression = _compression(spec, errors)
    _combination_errors(spec, training, aggregation, privacy, compression, errors)
    _mitigation_errors(spec, schema, fairness, aggregation, privacy, evaluation, errors)
    _task_errors(spec, schema, training, fairness, privacy, errors)
    if errors:
        raise PlanError(errors)
    assert model is not None and schema is not None and training is not None
    assert evaluation is not None and aggregation is not None and privacy is not None
    assert secagg is not None and compression is not None
    secure = bool(top["secure_aggregation"])
    return Plan(
        model=model,
        schema=schema,
        training=training,
        evaluation=evaluation,
        aggregation=aggregation,
        privacy=privacy,
        secure_aggregation=secure,
        secagg=secagg if secure else None,
        fairness=fairness,
        compression=compression,
        run=run_settings(spec),
        seed=top["seed"],
    )
