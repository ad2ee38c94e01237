"""Plan specs: validating one (field-level messages) and reading the orchestrator's settings."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fedcore.compression import CompressionSpec, CompressionSpecError
from fedcore.models import MODEL_KINDS, ModelSpecError, validate_model_spec
from fedcore.privacy.accounting import PLAN_PRIVACY_DEFAULTS
from fedcore.secure_updates import DEFAULT_CLIP, DEFAULT_MAX_EXAMPLES
from fedcore.tabular import DatasetSchema, SchemaError


@dataclass(frozen=True)
class RunSettings:
    """Orchestration settings of a plan."""

    rounds: int
    min_silos: int
    round_deadline_seconds: float
    round_retries: int
    wait_for_silos_seconds: float
    seed: int


def run_settings(spec: dict[str, Any]) -> RunSettings:
    """Extract orchestration settings from a validated plan spec."""
    training = spec.get("training", {})
    deadline = float(spec.get("round_deadline_seconds", 300))
    return RunSettings(
        rounds=int(training.get("rounds", 1)),
        min_silos=int(spec.get("min_silos", 1)),
        round_deadline_seconds=deadline,
        round_retries=int(spec.get("round_retries", 2)),
        wait_for_silos_seconds=float(spec.get("wait_for_silos_seconds", max(deadline, 120.0))),
        seed=int(spec.get("seed", 0)),
    )


# Top-level keys a plan spec may hold (docs/internals/interfaces.md and governance.md).
ALLOWED_KEYS: tuple[str, ...] = (
    "model",
    "schema",
    "training",
    "evaluation",
    "aggregation",
    "min_silos",
    "round_deadline_seconds",
    "round_retries",
    "wait_for_silos_seconds",
    "seed",
    "privacy",
    "secure_aggregation",
    "secagg",
    "fairness",
    "compression",
)
# FedProx changes only local training (a proximal term at the agent); the server averages.
FEDPROX = "fedprox"
# What can aggregate a sum it never sees the parts of: the (weighted) mean and server optimizers.
SECAGG_STRATEGIES: tuple[str, ...] = (
    "fedavg",
    FEDPROX,
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
)


def server_strategy_spec(aggregation: dict[str, Any]) -> dict[str, Any]:
    """The server-side strategy spec of a plan's aggregation section (validated).

    ``{"strategy": "fedprox", "mu": m}`` trains with a proximal term at each site and averages
    at the server; every other name is a fedcore.aggregation strategy with its parameters.
    """
    from fedcore.aggregation import make_strategy

    spec = dict(aggregation) or {"strategy": "fedavg"}
    if spec.get("strategy", "fedavg") == FEDPROX:
        mu = spec.get("mu", 0.01)
        if isinstance(mu, bool) or not isinstance(mu, int | float) or not 0 <= mu <= 100:
            raise ValueError("fedprox: mu must be a number in [0, 100]")
        extra = sorted(set(spec) - {"strategy", "mu"})
        if extra:
            raise ValueError(f"fedprox: unknown parameter(s) {', '.join(extra)}; allowed: mu")
        spec = {"strategy": "fedavg"}
    make_strategy(spec)  # raises ValueError naming the problem
    return spec


# The plan's "secagg" section (read only when secure_aggregation is true); docs/protocol.md.
SECAGG_DEFAULTS: dict[str, Any] = {
    # per-coordinate bound on a site's model delta (local - global), in parameter units; the
    # quantiser's range. Tabular models trained for a few local epochs move far less than 1.
    "clip": DEFAULT_CLIP,
    # t: share holders needed to unmask; null = ceil(2k/3) of the neighbourhood k (all selected
    # silos for the complete graph). Never below a strict majority of k, never above k.
    "threshold": None,
    # a site's example weight is min(n, max_examples) / max_examples (weighted mean)
    "max_examples": DEFAULT_MAX_EXAMPLES,
    # neighbours per silo (SecAgg+); null = complete graph
    "degree": None,
    # seconds each key-exchange and the unmasking stage wait; the masked-input stage, which
    # includes local training, waits round_deadline_seconds
    "stage_timeout_seconds": 30.0,
}


@dataclass(frozen=True)
class SecAggSettings:
    """The secure-aggregation section of a plan, defaults filled in."""

    clip: float
    threshold: int | None
    max_examples: int
    degree: int | None
    stage_timeout_seconds: float


def secagg_settings(spec: dict[str, Any]) -> SecAggSettings | None:
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


AGGREGATION_STRATEGIES: tuple[str, ...] = (
    FEDPROX,
    "fedavg",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "qfedavg",
    "norm_bound",
    "median",
    "trimmed_mean",
    "krum",
    "multi_krum",
)
PRIVACY_MODES: tuple[str, ...] = ("none", "sample", "client")
PRIVACY_DEFAULTS: dict[str, Any] = PLAN_PRIVACY_DEFAULTS  # one copy, fedcore's
FAIRNESS_KEYS: tuple[str, ...] = (
    "sensitive_attribute",
    "max_demographic_parity_difference",
    "max_equalized_odds_difference",
    # epsilon of each count table a site releases (discrete Laplace; docs/fairness.md)
    "dp_epsilon",
    # attribute -> public group labels, for sensitive columns that are not features
    "groups",
)
FAIRNESS_THRESHOLDS: tuple[str, ...] = (
    "max_demographic_parity_difference",
    "max_equalized_odds_difference",
)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _unknown_keys(section: dict[str, Any], allowed: tuple[str, ...]) -> str | None:
    unknown = sorted(str(key) for key in section if key not in allowed)
    if not unknown:
        return None
    return f"unknown key(s) {', '.join(map(repr, unknown))}; allowed keys: {', '.join(allowed)}"


def _model_errors(spec: dict[str, Any], errors: dict[str, str]) -> None:
    model = spec.get("model")
    if not isinstance(model, dict):
        errors["model"] = 'must be an object such as {"kind": "logistic_regression"}'
    elif model.get("kind") not in MODEL_KINDS:
        errors["model.kind"] = (
            f"unknown model kind {model.get('kind')!r}; allowed kinds: {', '.join(MODEL_KINDS)}"
        )
    else:
        try:
            validate_model_spec(model)
        except ModelSpecError as exc:
            errors["model"] = str(exc)


def _training_errors(spec: dict[str, Any], errors: dict[str, str]) -> None:
    training = spec.get("training")
    if not isinstance(training, dict):
        errors["training"] = "training must be an object with rounds, local_epochs, batch_size, lr"
        return
    # local_steps (optional): optimizer steps per round, replacing the local_epochs passes
    # (local_epochs stays required: the privacy ledger reads it, and local_steps refuses DP).
    steps = "local_steps" in training
    for key, low in (("rounds", 1), ("local_epochs", 1), ("batch_size", 1), ("local_steps", 1)):
        value = training.get(key)
        if key == "local_steps" and not steps:
            continue
        if not _is_int(value) or value < low:
            errors[f"training.{key}"] = f"must be an integer >= {low}"
    privacy = spec.get("privacy")
    if steps and isinstance(privacy, dict) and privacy.get("mode", "none") != "none":
        errors["training.local_steps"] = (
            "is not supported with differential privacy (its accounting counts local_epochs)"
        )
    lr = training.get("lr")
    if not _is_number(lr) or not 0 < lr < 10:
        errors["training.lr"] = "must be a number in (0, 10)"
    if training.get("optimizer", "adam") not in {"adam", "sgd"}:
        errors["training.optimizer"] = "must be 'adam' or 'sgd'"


def _scalar_errors(spec: dict[str, Any], errors: dict[str, str]) -> None:
    for key in ("round_deadline_seconds", "wait_for_silos_seconds"):
        value = spec.get(key, 1)
        if not _is_number(value) or value <= 0:
            errors[key] = "must be a positive number"
    for key, low in (("min_silos", 1), ("round_retries", 0), ("seed", 0)):
        value = spec.get(key, low)
        if not _is_int(value) or value < low:
            errors[key] = f"must be an integer >= {low}"
    if "evaluation" in spec:
        evaluation = spec["evaluation"]
        if not isinstance(evaluation, dict):
            errors["evaluation"] = "must be an object with test_fraction and seed"
        else:
            if problem := _unknown_keys(evaluation, ("test_fraction", "seed", "split_column")):
                errors["evaluation"] = problem
            # split_column: a data column with "train"/"test" per row fixes each site's split.
            column = evaluation.get("split_column")
            if column is not None and (not isinstance(column, str) or not column.strip()):
                errors["evaluation.split_column"] = "must be the name of a data column"
            fraction = evaluation.get("test_fraction", 0.2)
            if not _is_number(fraction) or not 0 <= fraction < 1:
                errors["evaluation.test_fraction"] = "must be a number in [0, 1)"
            seed = evaluation.get("seed", 0)
            if not _is_int(seed) or seed < 0:
                errors["evaluation.seed"] = "must be an integer >= 0"
    if "aggregation" in spec:
        aggregation = spec["aggregation"]
        if not isinstance(aggregation, dict):
            errors["aggregation"] = 'must be an object such as {"strategy": "fedavg"}'
        else:
            try:
                server_strategy_spec(aggregation)
            except ValueError as exc:
                errors["aggregation"] = str(exc)
            else:
                name = aggregation.get("strategy", "fedavg")
                if spec.get("secure_aggregation") is True and name not in SECAGG_STRATEGIES:
                    errors["aggregation.strategy"] = (
                        f"'{name}' needs each silo's update, which secure aggregation hides; "
                        f"with secure aggregation use one of: {', '.join(SECAGG_STRATEGIES)}"
                    )
    if "secure_aggregation" in spec and not isinstance(spec["secure_aggregation"], bool):
        errors["secure_aggregation"] = "must be true or false"


def _secagg_errors(spec: dict[str, Any], errors: dict[str, str]) -> None:
    if "secagg" not in spec:
        return
    section = spec["secagg"]
    if not isinstance(section, dict):
        errors["secagg"] = f"must be an object with keys {', '.join(SECAGG_DEFAULTS)}"
        return
    if problem := _unknown_keys(section, tuple(SECAGG_DEFAULTS)):
        errors["secagg"] = problem
    values = {**SECAGG_DEFAULTS, **section}
    clip = values["clip"]
    if not _is_number(clip) or clip <= 0:
        errors["secagg.clip"] = (
            "must be a number > 0: each coordinate of a site's model delta is clipped to "
            "[-clip, clip] before it is masked"
        )
    threshold = values["threshold"]
    if threshold is not None and (not _is_int(threshold) or threshold < 2):
        errors["secagg.threshold"] = "must be an integer >= 2 (or null for ceil(2n/3))"
    max_examples = values["max_examples"]
    if not _is_int(max_examples) or not 1 <= max_examples <= 2**31:
        errors["secagg.max_examples"] = "must be an integer in [1, 2^31]"
    degree = values["degree"]
    if degree is not None and (not _is_int(degree) or degree < 1):
        errors["secagg.degree"] = "must be an integer >= 1 (or null for the complete graph)"
    timeout = values["stage_timeout_seconds"]
    if not _is_number(timeout) or timeout <= 0:
        errors["secagg.stage_timeout_seconds"] = "must be a number > 0"


def _privacy_errors(spec: dict[str, Any], errors: dict[str, str]) -> None:
    if "privacy" not in spec:
        return
    privacy = spec["privacy"]
    if not isinstance(privacy, dict):
        errors["privacy"] = f"must be an object with keys {', '.join(PRIVACY_DEFAULTS)}"
        return
    if problem := _unknown_keys(privacy, tuple(PRIVACY_DEFAULTS)):
        errors["privacy"] = problem
    values = {**PRIVACY_DEFAULTS, **privacy}
    mode = values["mode"]
    if mode not in PRIVACY_MODES:
        errors["privacy.mode"] = f"must be one of {', '.join(PRIVACY_MODES)}; got {mode!r}"
    # noise_multiplier and target_epsilon may be null (not used); when given they must be > 0:
    # a zero or negative epsilon is no guarantee at all, and zero noise gives an infinite epsilon.
    for key in ("noise_multiplier", "target_epsilon"):
        value = values[key]
        if value is not None and (not _is_number(value) or value <= 0):
            errors[f"privacy.{key}"] = "must be a number > 0 (or null when not used)"
    clip = values["clip"]
    if not _is_number(clip) or clip <= 0:
        errors["privacy.clip"] = (
            "must be a number > 0: differential privacy bounds each contribution by clipping it"
        )
    delta = values["delta"]
    if not _is_number(delta) or not 0 < delta < 1:
        errors["privacy.delta"] = "must be a number in (0, 1), typically below 1 / rows"
    if (
        mode in ("sample", "client")
        and values["noise_multiplier"] is None
        and values["target_epsilon"] is None
    ):
        errors.setdefault(
            "privacy",
            f"mode {mode!r} needs noise_multiplier > 0 or target_epsilon > 0 to calibrate noise",
        )
    adaptive = values.get("adaptive_clip")
    if adaptive is not None:
        if mode != "client":
            errors["privacy.adaptive_clip"] = "applies to client-level DP (mode 'client') only"
        elif spec.get("secure_aggregation") is True:
            errors["privacy.adaptive_clip"] = (
                "needs each silo's update norm, which secure aggregation hides; turn one off"
            )
        elif not isinstance(adaptive, dict) or (
            set(adaptive) - {"target_quantile", "learning_rate", "count_noise_std"}
        ):
            errors["privacy.adaptive_clip"] = (
                "must be an object with target_quantile (0-1), learning_rate (> 0) and optional "
                "count_noise_std (> 0)"
            )
        else:
            quantile = adaptive.get("target_quantile", 0.5)
            rate = adaptive.get("learning_rate", 0.2)
            count_std = adaptive.get("count_noise_std")
            if not _is_number(quantile) or not 0 < quantile < 1:
                errors["privacy.adaptive_clip.target_quantile"] = "must be a number in (0, 1)"
            if not _is_number(rate) or rate <= 0:
                errors["privacy.adaptive_clip.learning_rate"] = "must be a number > 0"
            if count_std is not None and (not _is_number(count_std) or count_std <= 0):
                errors["privacy.adaptive_clip.count_noise_std"] = "must be a number > 0"


def _compression_errors(spec: dict[str, Any], errors: dict[str, str]) -> None:
    """The ``compression`` section (fedcore.compression) and what it cannot be combined with."""
    if "compression" not in spec:
        return
    try:
        compression = CompressionSpec.from_section(spec["compression"])
    except CompressionSpecError as exc:
        errors[exc.field] = str(exc)
        return
    if compression.compressed and spec.get("secure_aggregation") is True:
        # The masked vector is dense 32-bit ring elements: a sparse or narrower update would
        # have to be masked coordinate by coordinate in a layout every site agrees on.
        errors["compression"] = (
            f"{compression.method!r} cannot be combined with secure aggregation: its masked "
            "vectors are dense 32-bit; use method 'none' or turn secure_aggregation off"
        )


def _fairness_errors(
    spec: dict[str, Any], schema: DatasetSchema | None, errors: dict[str, str]
) -> None:
    if "fairness" not in spec:
        return
    fairness = spec["fairness"]
    if not isinstance(fairness, dict):
        errors["fairness"] = f"must be an object with keys {', '.join(FAIRNESS_KEYS)}"
        return
    if problem := _unknown_keys(fairness, FAIRNESS_KEYS):
        errors["fairness"] = problem
    attribute = fairness.get("sensitive_attribute")
    if not isinstance(attribute, str) or not attribute:
        errors["fairness.sensitive_attribute"] = "required: a column of schema.sensitive"
    elif schema is not None and attribute not in schema.sensitive:
        listed = ", ".join(schema.sensitive) or "none"
        errors["fairness.sensitive_attribute"] = (
            f"{attribute!r} is not a sensitive attribute of the plan's schema "
            f"(schema.sensitive lists: {listed})"
        )
    for key in FAIRNESS_THRESHOLDS:
        if key in fairness:
            value = fairness[key]
            if not _is_number(value) or not 0 <= value <= 1:
                errors[f"fairness.{key}"] = "must be a number in [0, 1]"
    _fairness_release_errors(fairness, schema, errors)


def _fairness_release_errors(
    fairness: dict[str, Any], schema: DatasetSchema | None, errors: dict[str, str]
) -> None:
    """The fairness section's release settings: DP epsilon of the counts, declared groups."""
    if "dp_epsilon" in fairness:
        epsilon = fairness["dp_epsilon"]
        if not _is_number(epsilon) or epsilon <= 0:
            errors["fairness.dp_epsilon"] = (
                "must be a number > 0: the epsilon each site spends per count table it releases"
            )
    if "groups" not in fairness:
        return
    groups = fairness["groups"]
    if not isinstance(groups, dict):
        errors["fairness.groups"] = (
            'must be an object: sensitive column -> list of its group labels, e.g. {"sex": '
            '["F", "M"]}'
        )
        return
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


def _silo_schema_problems(schema: DatasetSchema, silo: Any) -> list[str]:
    """Columns the plan's schema uses that a silo's registered schema lacks or types otherwise."""
    name = getattr(silo, "name", str(silo))
    try:
        local = DatasetSchema.from_dict(silo.schema)
    except (SchemaError, TypeError, KeyError, AttributeError):
        return [f"silo '{name}' has no valid registered schema"]
    types = {column.name: column.type for column in local.columns}
    known = {*types, local.target.column, *local.sensitive}
    problems = []
    for column in schema.columns:
        if column.name not in types:
            problems.append(f"silo '{name}' has no column '{column.name}' ({column.type})")
        elif types[column.name] != column.type:
            problems.append(
                f"silo '{name}': column '{column.name}' is {types[column.name]}, "
                f"the plan needs {column.type}"
            )
    if schema.target.column not in known:
        problems.append(f"silo '{name}' has no target column '{schema.target.column}'")
    for attribute in schema.sensitive:
        if attribute not in known:
            problems.append(f"silo '{name}' has no sensitive column '{attribute}'")
    return problems


def plan_spec_errors(spec: dict[str, Any], *, silos: Iterable[Any] | None = None) -> dict[str, str]:
    """Field-level problems of a plan spec (empty when it is valid).

    Keys are dotted paths into the spec ("training.lr", "privacy.delta"); problems with the
    participating silos (too few for min_silos, a column a silo lacks) are under "silos" and only
    checked when ``silos`` is given.
    """
    if not isinstance(spec, dict):
        return {"spec": f"a plan must be a JSON object, got {type(spec).__name__}"}
    errors: dict[str, str] = {}
    for key in sorted(str(key) for key in spec if key not in ALLOWED_KEYS):
        errors[key] = f"unknown key {key!r}; allowed keys: {', '.join(ALLOWED_KEYS)}"
    _model_errors(spec, errors)
    schema: DatasetSchema | None = None
    try:
        schema = DatasetSchema.from_dict(spec.get("schema"))  # type: ignore[arg-type]
    except (SchemaError, TypeError, KeyError, AttributeError) as exc:
        errors["schema"] = str(exc)
    _training_errors(spec, errors)
    _scalar_errors(spec, errors)
    _privacy_errors(spec, errors)
    _secagg_errors(spec, errors)
    _compression_errors(spec, errors)
    _fairness_errors(spec, schema, errors)
    if silos is not None:
        silos = list(silos)
        problems = []
        min_silos = spec.get("min_silos", 1)
        if _is_int(min_silos) and len(silos) < min_silos:
            problems.append(
                f"{len(silos)} silo(s) take part; the plan needs at least {min_silos} (min_silos)"
            )
        if schema is not None:
            for silo in silos:
                problems.extend(_silo_schema_problems(schema, silo))
        if problems:
            errors["silos"] = "; ".join(problems)
    return errors
