"""Analysis plans: ``{"kind": "analysis", ...}`` in the plan language (docs/analytics.md).

An analysis plan names one federated analysis and its parameters instead of a model and its
training. It is hashed, approved and granted like a training plan (the same canonical JSON, the
same stewards); :func:`parse_analysis_plan` is the one parser server and site agent both run,
and every problem is keyed by its dotted path ("analysis.columns", "analysis.filters").

Most analyses take one request to every site; Kaplan-Meier takes two (the union of the sites'
event times, then the counts on it), quantiles a bisection step per narrowing, and the model fits
(Cox, logistic regression) a step per Newton iteration, bounded by ``max_iterations``; linear
regression takes two (X'X and X'y, then the residuals at the estimate).

With ``"secure_aggregation": true`` every step's summary is summed under SecAgg
(``fedcore.analytics.secure``; the event-time steps, a set, travel in clear); noise composes
with it (each site adds its full noise), and the plan takes no ``secagg`` section.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from fedcore.analytics.cohort import (
    QUANTILE_METHODS,
    Filter,
    check_columns,
    column_types,
    parse_filters,
)
from fedcore.analytics.noise import AnalysisNoise, parse_noise
from fedcore.analytics.regression import INTERCEPT
from fedcore.plan.evaluation_plan import evaluation_plan_errors, is_evaluation_plan
from fedcore.plan.keys import Key, check_section, defaults, names
from fedcore.plan.spec import (
    WAIT_FOR_SILOS,
    PlanError,
    errors_of,
    parse_schema,
    training_plan_errors,
    wait_for_silos_seconds,
)
from fedcore.tabular import DatasetSchema

ANALYSIS_KIND = "analysis"
# The analyses an analysis plan may request (fedcore.analytics.disclosure.ANALYSIS_KINDS is
# what a site may allow; the others there need several Newton or bisection rounds).
PLAN_ANALYSES: tuple[str, ...] = (
    "count",
    "crosstab",
    "moments",
    "histogram",
    "quantile",
    "kaplan_meier",
    "cox",
    "linear_regression",
    "logistic_regression",
)
# The analyses that fit a model (a coefficient table: forest plot, coef/se/CI/p).
MODEL_ANALYSES: tuple[str, ...] = ("cox", "linear_regression", "logistic_regression")
COX_TIES: tuple[str, ...] = ("efron", "breslow")
MAX_COVARIATES = 50
MAX_ITERATIONS = 100
DEFAULT_MAX_ITERATIONS = 50
MAX_PROBS = 20
MAX_LEVELS = 64
MAX_EDGES = 1001

ANALYSIS_TOP_KEYS: tuple[Key, ...] = (
    Key("kind", "string", "'analysis': this plan runs an analysis, not training"),
    Key("name", "string", "the plan's name (hashed)", default=None, nullable=True),
    Key("description", "string", "the plan's description (hashed)", default=None, nullable=True),
    Key("schema", "object", "the dataset schema every site's data must match (fedcore.tabular)"),
    Key("analysis", "object", "the analysis and its parameters (section analysis)"),
    Key(
        "min_silos",
        "integer",
        "sites whose answers a result needs before it is released",
        default=1,
        minimum=1,
    ),
    Key(
        "round_deadline_seconds",
        "number",
        "seconds each step of the analysis waits for the sites' answers",
        default=300,
        minimum=0,
        exclusive_min=True,
    ),
    WAIT_FOR_SILOS,
    Key(
        "secure_aggregation",
        "boolean",
        "every step's summary travels under secure aggregation (fedcore.secagg): the server "
        "learns only the sum over the sites; a step whose answer is a set (the event times of "
        "Kaplan-Meier and of an unstratified Cox model) travels in clear (docs/analytics.md)",
        default=False,
    ),
    Key(
        "privacy",
        "object",
        "noise every site adds to its count table or moment sums, charged to its privacy ledger: "
        "{mechanism: laplace|gaussian, epsilon, delta}; null: exact (docs/analytics.md)",
        default=None,
        nullable=True,
    ),
)
ANALYSIS_ALLOWED_KEYS: tuple[str, ...] = names(ANALYSIS_TOP_KEYS)


@dataclass(frozen=True)
class Analysis:
    """One requested analysis, validated against the plan's schema."""

    kind: str
    filters: tuple[Filter, ...] = ()
    rows: str | None = None  # count, crosstab
    cols: str | None = None  # crosstab
    levels: Mapping[str, tuple[str, ...]] | None = None  # count, crosstab, kaplan_meier group
    columns: tuple[str, ...] = ()  # moments
    column: str | None = None  # histogram
    edges: tuple[float, ...] = ()  # histogram
    probs: tuple[float, ...] = ()  # quantile
    method: str = "linear"
    time: str | None = None  # kaplan_meier, cox
    event: str | None = None
    group: str | None = None
    logrank: bool = False
    alpha: float = 0.05
    covariates: tuple[str, ...] = ()  # cox, linear_regression, logistic_regression
    outcome: str | None = None  # linear_regression, logistic_regression
    intercept: bool = True
    stratified: bool = False  # cox: stratified by site
    ties: str = "efron"  # cox
    max_iterations: int = DEFAULT_MAX_ITERATIONS  # cox, logistic_regression

    @property
    def policy_kinds(self) -> tuple[str, ...]:
        """The kinds a site's ``[disclosure] allowed_analyses`` must list for this analysis."""
        return (self.kind, "logrank") if self.logrank else (self.kind,)

    @property
    def coefficients(self) -> tuple[str, ...]:
        """A model fit's coefficient names, in order (a regression's intercept is 'const')."""
        if self.kind in ("linear_regression", "logistic_regression") and self.intercept:
            return (INTERCEPT, *self.covariates)
        return self.covariates

    @property
    def group_levels(self) -> tuple[str, ...]:
        """Kaplan-Meier's group levels (empty: one curve)."""
        if self.group is None or self.levels is None:
            return ()
        return self.levels[self.group]


@dataclass(frozen=True)
class AnalysisPlan:
    """A parsed analysis plan."""

    schema: DatasetSchema
    analysis: Analysis
    min_silos: int
    round_deadline_seconds: float
    wait_for_silos_seconds: float
    privacy: AnalysisNoise | None = None  # None: exact, no noise
    secure_aggregation: bool = False  # summaries summed under SecAgg (fedcore.analytics.secure)

    @property
    def min_sites(self) -> int:
        """The fewest sites a step can be asked of: ``min_silos``, and 2 under secure
        aggregation (one site's sum is its own summary)."""
        return max(self.min_silos, 2) if self.secure_aggregation else self.min_silos


def is_analysis(spec: Any) -> bool:
    """Whether a spec asks for an analysis (``"kind": "analysis"``) rather than training."""
    return isinstance(spec, Mapping) and spec.get("kind") == ANALYSIS_KIND


def plan_errors(spec: Any) -> dict[str, str]:
    """Every problem of a plan spec, training, analysis or evaluation, dotted path -> message
    (empty when it is valid): the check at proposal, in the CLI and at every site."""
    if is_evaluation_plan(spec):
        return evaluation_plan_errors(spec)
    if not is_analysis(spec):
        return training_plan_errors(spec)
    return errors_of(parse_analysis_plan, spec)


def parse_analysis_plan(spec: Any) -> AnalysisPlan:
    """Parse an analysis plan spec.

    Raises:
        PlanError: every problem, keyed by dotted path.
    """
    if not isinstance(spec, Mapping):
        raise PlanError({"spec": f"a plan must be a JSON object, got {type(spec).__name__}"})
    errors: dict[str, str] = {}
    for key in sorted(str(key) for key in spec if key not in ANALYSIS_ALLOWED_KEYS):
        if key in _NOT_YET:
            errors[key] = _NOT_YET[key]
            continue
        errors[key] = (
            f"unknown key {key!r} in an analysis plan; allowed keys: "
            f"{', '.join(ANALYSIS_ALLOWED_KEYS)}"
        )
    top = check_section(
        {k: v for k, v in spec.items() if k in ANALYSIS_ALLOWED_KEYS},
        ANALYSIS_TOP_KEYS,
        "",
        errors,
        skip=("schema", "analysis", "privacy"),
    )
    schema: DatasetSchema | None = None
    try:
        schema = parse_schema(spec.get("schema"))
    except PlanError as exc:
        errors.update(exc.errors)
    analysis = None
    raw = spec.get("analysis")
    if not isinstance(raw, Mapping):
        errors["analysis"] = (
            "must be an object {kind, ...} naming the analysis; kinds: " + ", ".join(PLAN_ANALYSES)
        )
    elif schema is not None:
        analysis = _analysis(raw, column_types(schema), errors)
    noise = parse_noise(
        spec.get("privacy"), raw.get("kind") if isinstance(raw, Mapping) else None, errors
    )
    if noise is not None and analysis is not None and analysis.kind == "moments":
        assert schema is not None
        noise = _moment_bounds(noise, schema, analysis.columns, errors)
    if errors:
        raise PlanError(errors)
    assert schema is not None and analysis is not None
    deadline = float(top["round_deadline_seconds"])
    return AnalysisPlan(
        schema=schema,
        analysis=analysis,
        min_silos=int(top["min_silos"]),
        round_deadline_seconds=deadline,
        wait_for_silos_seconds=wait_for_silos_seconds(top, deadline),
        privacy=noise,
        secure_aggregation=bool(top["secure_aggregation"]),
    )


def _moment_bounds(
    noise: AnalysisNoise, schema: DatasetSchema, columns: Sequence[str], errors: dict[str, str]
) -> AnalysisNoise | None:
    """Noised moments clip every column to the schema's bounds (its min and max): the noise is
    calibrated to them."""
    specs = {column.name: column for column in schema.columns}
    bounds = []
    for name in columns:
        column = specs.get(name)
        if column is None or column.minimum is None or column.maximum is None:
            errors["privacy"] = (
                f"noised moments clip every column to its bounds and calibrate the noise to "
                f"them: give column {name!r} a 'min' and 'max' in the schema"
            )
            return None
        bounds.append((float(column.minimum), float(column.maximum)))
    return replace(noise, bounds=tuple(bounds))


# Keys of training plans that an analysis plan does not take, with the reason.
_NOT_YET: dict[str, str] = {
    "secagg": (
        "an analysis plan's secure aggregation takes no settings: the threshold is the "
        "default (two thirds of the sites, at least a strict majority), every stage waits "
        "round_deadline_seconds and the summary is summed exactly in fixed point, not clipped "
        "(docs/analytics.md, 'Secure aggregation of analysis sums'); remove the section"
    ),
}


_SECTION_KEYS: dict[str, frozenset[str]] = {
    "count": frozenset({"kind", "rows", "levels", "filters"}),
    "crosstab": frozenset({"kind", "rows", "cols", "levels", "filters"}),
    "moments": frozenset({"kind", "columns", "filters"}),
    "histogram": frozenset({"kind", "column", "edges", "filters"}),
    "quantile": frozenset({"kind", "column", "probs", "method", "filters"}),
    "kaplan_meier": frozenset(
        {"kind", "time", "event", "group", "levels", "logrank", "alpha", "filters"}
    ),
    "cox": frozenset(
        {
            "kind",
            "time",
            "event",
            "covariates",
            "stratified",
            "ties",
            "alpha",
            "max_iterations",
            "filters",
        }
    ),
    "linear_regression": frozenset(
        {"kind", "outcome", "covariates", "intercept", "alpha", "filters"}
    ),
    "logistic_regression": frozenset(
        {"kind", "outcome", "covariates", "intercept", "alpha", "max_iterations", "filters"}
    ),
}


def _analysis(raw: Mapping[str, Any], types: Mapping[str, str], errors: dict[str, str]):
    kind = raw.get("kind")
    if kind not in PLAN_ANALYSES:
        errors["analysis.kind"] = (
            f"{kind!r} is not an analysis this plan language runs; use one of: "
            f"{', '.join(PLAN_ANALYSES)}"
        )
        return None
    allowed = _SECTION_KEYS[kind]
    for key in sorted(str(k) for k in raw if k not in allowed):
        errors[f"analysis.{key}"] = (
            f"unknown key {key!r} for a {kind!r} analysis; allowed: {', '.join(sorted(allowed))}"
        )
    before = len(errors)
    filters: tuple[Filter, ...] = ()
    raw_filters = raw.get("filters", [])
    if not isinstance(raw_filters, list):
        errors["analysis.filters"] = "must be a list of {column, op, value} objects"
    else:
        try:
            filters = parse_filters(raw_filters, types)
        except ValueError as exc:
            errors["analysis.filters"] = str(exc)

    def column(key: str, *, numeric: bool = False, required: bool = True) -> str | None:
        value = raw.get(key)
        if value is None and not required:
            return None
        if not isinstance(value, str):
            errors[f"analysis.{key}"] = "needs a column name of the schema"
            return None
        try:
            check_columns(types, [value], numeric=numeric, what=f"analysis.{key}")
        except ValueError as exc:
            errors[f"analysis.{key}"] = str(exc).split(": ", 1)[1]
            return None
        return value

    fields: dict[str, Any] = {"kind": kind, "filters": filters}
    if kind in ("count", "crosstab"):
        fields["rows"] = column("rows")
        if kind == "crosstab":
            fields["cols"] = column("cols")
        axes = [a for a in (fields.get("rows"), fields.get("cols")) if a is not None]
        fields["levels"] = _levels(raw.get("levels"), axes, errors)
    elif kind == "moments":
        value = raw.get("columns")
        if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
            errors["analysis.columns"] = "needs a non-empty list of numeric schema columns"
        elif len(set(value)) != len(value):
            errors["analysis.columns"] = "lists a column twice"
        else:
            try:
                check_columns(types, value, numeric=True, what="analysis.columns")
                fields["columns"] = tuple(value)
            except ValueError as exc:
                errors["analysis.columns"] = str(exc).split(": ", 1)[1]
    elif kind == "histogram":
        fields["column"] = column("column", numeric=True)
        edges = raw.get("edges")
        if (
            not isinstance(edges, list)
            or not 2 <= len(edges) <= MAX_EDGES
            or not all(_finite(e) for e in edges)
            or any(b <= a for a, b in zip(edges, edges[1:], strict=False))
        ):
            errors["analysis.edges"] = (
                f"needs 2 to {MAX_EDGES} increasing finite numbers (the bin edges, fixed by the "
                "plan so that every site's histogram has the same bins)"
            )
        else:
            fields["edges"] = tuple(float(e) for e in edges)
    elif kind == "quantile":
        fields["column"] = column("column", numeric=True)
        probs = raw.get("probs")
        if (
            not isinstance(probs, list)
            or not 1 <= len(probs) <= MAX_PROBS
            or not all(_finite(p) and 0 <= p <= 1 for p in probs)
        ):
            errors["analysis.probs"] = f"needs 1 to {MAX_PROBS} quantile levels in [0, 1]"
        else:
            fields["probs"] = tuple(float(p) for p in probs)
        method = raw.get("method", "linear")
        if method not in QUANTILE_METHODS:
            errors["analysis.method"] = (
                f"{method!r} is not a quantile method; use one of {', '.join(QUANTILE_METHODS)} "
                "(numpy.quantile's)"
            )
        else:
            fields["method"] = method
    elif kind in MODEL_ANALYSES:
        _model_fields(raw, kind, types, fields, errors, column)
    else:  # kaplan_meier
        fields["time"] = column("time", numeric=True)
        fields["event"] = column("event")
        fields["group"] = column("group", required=False)
        logrank = raw.get("logrank", False)
        if not isinstance(logrank, bool):
            errors["analysis.logrank"] = "must be true or false"
        fields["logrank"] = logrank is True
        alpha = raw.get("alpha", 0.05)
        if not _finite(alpha) or not 0 < alpha < 1:
            errors["analysis.alpha"] = "must be a number between 0 and 1 (0.05: 95% intervals)"
        else:
            fields["alpha"] = float(alpha)
        if fields["group"] is not None:
            fields["levels"] = _levels(raw.get("levels"), [fields["group"]], errors, flat=True)
        elif raw.get("levels") is not None:
            errors["analysis.levels"] = "applies only with a group column"
        if fields["logrank"] and fields["group"] is None and "analysis.group" not in errors:
            errors["analysis.logrank"] = "compares groups: it needs a group column and levels"
    if len(errors) > before:
        return None
    return Analysis(**fields)


def _model_fields(
    raw: Mapping[str, Any],
    kind: str,
    types: Mapping[str, str],
    fields: dict[str, Any],
    errors: dict[str, str],
    column: Any,
) -> None:
    """The keys of a model fit: Cox's time and event, or a regression's outcome; covariates."""
    if kind == "cox":
        fields["time"] = column("time", numeric=True)
        fields["event"] = column("event")
        stratified = raw.get("stratified", False)
        if not isinstance(stratified, bool):
            errors["analysis.stratified"] = (
                "must be true (a baseline hazard per site, the partial likelihood summed over "
                "sites) or false (one baseline hazard over the union of event times)"
            )
        fields["stratified"] = stratified is True
        ties = raw.get("ties", "efron")
        if ties not in COX_TIES:
            errors["analysis.ties"] = (
                f"{ties!r} is not a ties method; use one of {', '.join(COX_TIES)} (efron: "
                "lifelines' and R's default)"
            )
        else:
            fields["ties"] = ties
    else:
        fields["outcome"] = column("outcome", numeric=kind == "linear_regression")
        intercept = raw.get("intercept", True)
        if not isinstance(intercept, bool):
            errors["analysis.intercept"] = "must be true (a 'const' coefficient) or false"
        fields["intercept"] = intercept is not False
    if kind != "linear_regression":
        iterations = raw.get("max_iterations", DEFAULT_MAX_ITERATIONS)
        if (
            isinstance(iterations, bool)
            or not isinstance(iterations, int)
            or not 1 <= iterations <= MAX_ITERATIONS
        ):
            errors["analysis.max_iterations"] = (
                f"must be an integer from 1 to {MAX_ITERATIONS} (Newton steps, each a request "
                "to every site)"
            )
        else:
            fields["max_iterations"] = iterations
    alpha = raw.get("alpha", 0.05)
    if not _finite(alpha) or not 0 < alpha < 1:
        errors["analysis.alpha"] = "must be a number between 0 and 1 (0.05: 95% intervals)"
    else:
        fields["alpha"] = float(alpha)
    value = raw.get("covariates")
    if (
        not isinstance(value, list)
        or not 1 <= len(value) <= MAX_COVARIATES
        or not all(isinstance(c, str) for c in value)
    ):
        errors["analysis.covariates"] = (
            f"needs a list of 1 to {MAX_COVARIATES} numeric schema columns (code a category "
            "as 0/1 columns)"
        )
        return
    if len(set(value)) != len(value):
        errors["analysis.covariates"] = "lists a column twice"
        return
    try:
        check_columns(types, value, numeric=True, what="analysis.covariates")
    except ValueError as exc:
        errors["analysis.covariates"] = str(exc).split(": ", 1)[1]
        return
    used = {fields.get("time"), fields.get("event"), fields.get("outcome")} - {None}
    if used & set(value):
        errors["analysis.covariates"] = (
            f"lists {sorted(used & set(value))}, which the model already uses as its "
            "time, event or outcome"
        )
        return
    fields["covariates"] = tuple(value)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _levels(
    raw: Any, axes: Sequence[str], errors: dict[str, str], *, flat: bool = False
) -> dict[str, tuple[str, ...]] | None:
    """The levels of each axis, fixed by the plan so every site's table has the same shape."""
    if not axes:
        return None
    if flat and isinstance(raw, list):
        raw = {axes[0]: raw}
    if not isinstance(raw, Mapping):
        shape = "a list of the group's levels" if flat else "an object column -> list of levels"
        errors["analysis.levels"] = (
            f"needs {shape} (the values to count, as text: a site's other values count under "
            "'__other__')"
        )
        return None
    out: dict[str, tuple[str, ...]] = {}
    for axis in axes:
        values = raw.get(axis)
        where = "analysis.levels" if flat else f"analysis.levels.{axis}"
        if (
            not isinstance(values, list)
            or not 1 <= len(values) <= MAX_LEVELS
            or not all(isinstance(v, str | int) and not isinstance(v, bool) for v in values)
        ):
            errors[where] = f"needs 1 to {MAX_LEVELS} levels of {axis!r} (strings or integers)"
            continue
        text = tuple(str(v) for v in values)
        if len(set(text)) != len(text):
            errors[where] = f"lists a level of {axis!r} twice"
            continue
        out[axis] = text
    extra = sorted(set(raw) - set(axes)) if not flat else []
    if extra:
        errors["analysis.levels"] = f"names column(s) {extra} that the analysis does not count by"
    return out


def analysis_run_defaults(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The top-level keys of an analysis spec with their defaults filled in."""
    return {**defaults(ANALYSIS_TOP_KEYS), **spec}
