"""Evaluation plans: ``{"kind": "evaluation", ...}`` in the plan language (docs/fairness.md,
"Evaluation plans").

An evaluation plan evaluates a registered model version -- the model of a completed run of the
same consortium, named by run, version number and SHA-256 -- or a model uploaded to the
consortium in the model zoo's format (``fedcore.uploaded_model``), named by its id and SHA-256,
on every site's data: the pooled
metrics from score histograms, the calibration curve and, with a ``fairness`` section, the
fairness report. It is hashed, approved and granted like a training plan (the same canonical
JSON, the same stewards); :func:`parse_evaluation_plan` is the one parser server and site agent
both run, every problem keyed by its dotted path. No training: no ``training``, ``aggregation``,
``privacy``, ``secure_aggregation`` section, and no mitigation in ``fairness``.

Which rows (``rows``): ``"held_out"`` (default) evaluates each site's held-out split, drawn by
the plan's ``evaluation`` section exactly as a training plan draws it -- with the source run's
section (the server checks they are equal at proposal) these are the rows the model never
trained on. ``"all"`` evaluates every row: for sites and data the model has never seen. An
uploaded model's training rows are unknown to Quorum: its ``"held_out"`` rows are the plan's own
split, and nothing proves the model never saw them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fedcore.plan.keys import Key, check_section, defaults, names
from fedcore.plan.spec import (
    WAIT_FOR_SILOS,
    Evaluation,
    Fairness,
    PlanError,
    RunSettings,
    _evaluation,
    _fairness,
    _model,
    errors_of,
    parse_schema,
    wait_for_silos_seconds,
)
from fedcore.tabular import DatasetSchema

if TYPE_CHECKING:
    from fedcore.training import Objective

EVALUATION_KIND = "evaluation"
ROWS = ("held_out", "all")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")

EVALUATION_PLAN_TOP_KEYS: tuple[Key, ...] = (
    Key("kind", "string", "'evaluation': this plan evaluates a model version or uploaded model"),
    Key("name", "string", "the plan's name (hashed)", default=None, nullable=True),
    Key("description", "string", "the plan's description (hashed)", default=None, nullable=True),
    Key("schema", "object", "the dataset schema every site's data must match (fedcore.tabular)"),
    Key(
        "model",
        "object",
        "the model spec of the version (must equal the source run's or the uploaded model's)",
    ),
    Key(
        "model_version",
        "object",
        "the model to evaluate: a run's version {run, number, sha256} or an uploaded model "
        "{uploaded, sha256} (section model_version)",
    ),
    Key(
        "rows",
        "string",
        "'held_out': each site's held-out split (section evaluation); 'all': every row",
        default="held_out",
        choices=ROWS,
    ),
    Key(
        "evaluation",
        "object",
        "each site's holdout split, as in a training plan (rows 'held_out' only)",
        default={},
        nullable=True,
    ),
    Key(
        "fairness",
        "object",
        "group fairness report (section fairness, without mitigation); null: none",
        default=None,
        nullable=True,
    ),
    Key(
        "min_silos",
        "integer",
        "sites the evaluation waits for before it starts",
        default=1,
        minimum=1,
    ),
    Key(
        "round_deadline_seconds",
        "number",
        "seconds the evaluation waits for the sites' answers",
        default=300,
        minimum=0,
        exclusive_min=True,
    ),
    WAIT_FOR_SILOS,
)
EVALUATION_PLAN_ALLOWED_KEYS: tuple[str, ...] = names(EVALUATION_PLAN_TOP_KEYS)
_SECTIONS = ("schema", "model", "model_version", "evaluation", "fairness")

MODEL_VERSION_KEYS: tuple[Key, ...] = (
    Key("run", "integer", "the run whose model version is evaluated", minimum=1),
    Key("number", "integer", "the version's number in that run (0: before round 1)", minimum=0),
    Key("sha256", "string", "the version's SHA-256 (64 lowercase hex digits)"),
)
# The other form of the section: a model uploaded to the consortium (not trained by a run).
UPLOADED_MODEL_KEYS: tuple[Key, ...] = (
    Key("uploaded", "integer", "the id of a model uploaded to the consortium", minimum=1),
    Key("sha256", "string", "the uploaded weights' SHA-256 (64 lowercase hex digits)"),
)


@dataclass(frozen=True)
class ModelVersionRef:
    """The model an evaluation plan evaluates: version ``number`` of ``run``, or the uploaded
    model ``uploaded`` (then ``run`` and ``number`` are None); its weights' SHA-256 either way."""

    sha256: str
    run: int | None = None
    number: int | None = None
    uploaded: int | None = None

    @property
    def label(self) -> str:
        """What is evaluated, in words (results, audit events, errors)."""
        if self.uploaded is not None:
            return f"uploaded model {self.uploaded}"
        return f"model version {self.number} of run {self.run}"


@dataclass(frozen=True)
class EvaluationPlan:
    """A parsed evaluation plan. ``model``, ``schema`` and ``fairness`` read as a training
    :class:`~fedcore.plan.Plan`'s do, so the site agent evaluates with the same code."""

    model: dict[str, Any]
    schema: DatasetSchema
    model_version: ModelVersionRef
    rows: str
    evaluation: Evaluation
    fairness: Fairness | None
    run: RunSettings

    @property
    def task(self) -> str:
        """The prediction task: ``schema.target.task``."""
        return self.schema.target.task

    def objective(self) -> Objective:
        """What the model outputs (the task's own loss: an evaluation trains nothing)."""
        from fedcore.training import Objective  # torch: only where a model is scored

        return Objective.for_task(self.task, n_outputs=self.schema.target.n_outputs)

    @property
    def rows_note(self) -> str:
        """Which rows every site evaluates, in words (stated in the result)."""
        if self.rows == "all":
            return "all rows of every site"
        if self.evaluation.split_column is not None:
            return f"each site's test rows by its column {self.evaluation.split_column!r}"
        return (
            f"each site's held-out split (test_fraction {self.evaluation.test_fraction:g}, "
            f"seed {self.evaluation.seed})"
        )


def is_evaluation_plan(spec: Any) -> bool:
    """Whether a spec asks to evaluate a model version (``"kind": "evaluation"``)."""
    return isinstance(spec, Mapping) and spec.get("kind") == EVALUATION_KIND


def evaluation_plan_errors(spec: Any) -> dict[str, str]:
    """Every problem of an evaluation plan spec, dotted path -> message (empty when valid)."""
    return errors_of(parse_evaluation_plan, spec)


def parse_evaluation_plan(spec: Any) -> EvaluationPlan:
    """Parse an evaluation plan spec.

    Raises:
        PlanError: every problem, keyed by dotted path.
    """
    if not isinstance(spec, Mapping):
        raise PlanError({"spec": f"a plan must be a JSON object, got {type(spec).__name__}"})
    errors: dict[str, str] = {}
    for key in sorted(str(key) for key in spec if key not in EVALUATION_PLAN_ALLOWED_KEYS):
        errors[key] = (
            f"unknown key {key!r} in an evaluation plan (it trains nothing); allowed keys: "
            f"{', '.join(EVALUATION_PLAN_ALLOWED_KEYS)}"
        )
    top = check_section(
        {k: v for k, v in spec.items() if k in EVALUATION_PLAN_ALLOWED_KEYS},
        EVALUATION_PLAN_TOP_KEYS,
        "",
        errors,
        skip=_SECTIONS,
    )
    model = _model(spec, errors)
    schema: DatasetSchema | None = None
    try:
        schema = parse_schema(spec.get("schema"))
    except PlanError as exc:
        errors.update(exc.errors)
    ref = _model_version(spec.get("model_version"), errors)
    evaluation = _evaluation(spec, errors)
    if (
        top.get("rows") == "all"
        and spec.get("evaluation") not in (None, {})
        and "evaluation" not in errors
    ):
        errors["evaluation"] = (
            "applies to rows 'held_out' only (rows is 'all': every row is evaluated); remove it"
        )
    fairness = _fairness(spec, schema, errors)
    if fairness is not None and fairness.mitigation.active:
        errors["fairness.mitigation"] = (
            "applies to training plans only (an evaluation plan trains nothing); remove it"
        )
    if errors:
        raise PlanError(errors)
    assert model is not None and schema is not None and ref is not None
    assert evaluation is not None
    deadline = float(top["round_deadline_seconds"])
    return EvaluationPlan(
        model=model,
        schema=schema,
        model_version=ref,
        rows=str(top["rows"]),
        evaluation=evaluation,
        fairness=fairness,
        run=RunSettings(
            rounds=0,
            min_silos=int(top["min_silos"]),
            round_deadline_seconds=deadline,
            round_retries=0,
            wait_for_silos_seconds=wait_for_silos_seconds(top, deadline),
            seed=0,
        ),
    )


def _model_version(raw: Any, errors: dict[str, str]) -> ModelVersionRef | None:
    if not isinstance(raw, Mapping):
        errors["model_version"] = (
            'must be an object {"run": R, "number": N, "sha256": "<64 hex digits>"} naming a '
            'registered model version, or {"uploaded": ID, "sha256": "<64 hex digits>"} naming '
            "an uploaded model"
        )
        return None
    uploaded = "uploaded" in raw
    if uploaded and ("run" in raw or "number" in raw):
        errors["model_version"] = (
            "names either a run's model version {run, number, sha256} or an uploaded model "
            "{uploaded, sha256}, not both: remove 'uploaded' or 'run' and 'number'"
        )
        return None
    before = len(errors)
    keys = UPLOADED_MODEL_KEYS if uploaded else MODEL_VERSION_KEYS
    values = check_section(raw, keys, "model_version", errors)
    sha = values.get("sha256")
    if "model_version.sha256" not in errors and not (isinstance(sha, str) and _SHA256.match(sha)):
        errors["model_version.sha256"] = (
            f"must be the weights' SHA-256 as 64 lowercase hex digits, got {str(sha)[:80]!r}"
        )
    if len(errors) > before:
        return None
    if uploaded:
        return ModelVersionRef(sha256=sha, uploaded=int(values["uploaded"]))
    return ModelVersionRef(sha256=sha, run=int(values["run"]), number=int(values["number"]))


def evaluation_plan_defaults(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The top-level keys of an evaluation plan spec with their defaults filled in."""
    return {**defaults(EVALUATION_PLAN_TOP_KEYS), **spec}
