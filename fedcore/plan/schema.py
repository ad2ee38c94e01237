"""The plan language as JSON Schema and as the key table of docs/plan-spec.md, both generated
from the key definitions of :mod:`fedcore.plan.spec`."""

from __future__ import annotations

import json
from typing import Any

from fedcore.aggregation_params import STRATEGY_PARAMS
from fedcore.model_kinds import ENTRY_POINT_GROUP, NAME_PATTERN
from fedcore.model_spec import ACTIVATION_NAMES, MAX_HIDDEN_LAYERS, MAX_HIDDEN_UNITS, SPEC_KINDS
from fedcore.plan.evaluation_plan import (
    EVALUATION_PLAN_TOP_KEYS,
    MODEL_VERSION_KEYS,
    UPLOADED_MODEL_KEYS,
)
from fedcore.plan.keys import REQUIRED, Key, section_schema
from fedcore.plan.spec import (
    ADAPTIVE_CLIP_KEYS,
    COMPRESSION_KEYS,
    EVALUATION_KEYS,
    FAIRNESS_KEYS,
    FEDPROX_MU,
    MITIGATION_KEYS,
    PRIVACY_KEYS,
    SECAGG_KEYS,
    SECTION_DOCS,
    SECTIONS,
    STRATEGY_KEY,
    TOP_KEYS,
    TRAINING_KEYS,
)
from fedcore.tabular import MAX_CLASSES, TASKS

CROSS_FIELD_NOTE = (
    "JSON Schema checks each key's type, range and the allowed keys of every section. The "
    "parser (fedcore.plan.parse_plan, run at proposal and by every site agent) also checks what "
    "this schema cannot express: strategy parameters per strategy, the model spec per kind, the "
    "dataset schema, and the combinations (momentum only with sgd; local_steps not with DP; "
    "robust strategies and q-FedAvg not with client-level DP or secure aggregation; FedProx and "
    "q-FedAvg not with DP-SGD; adaptive_clip only in mode client and not with secure "
    "aggregation; compression not with secure aggregation; fairness attributes and groups "
    "against schema.sensitive; fairness.mitigation parameters per kind, and what each kind "
    "needs: public groups; no DP-SGD, and noised counts under client-level DP, for the loss "
    "weights; no secure aggregation nor client-level DP, and a weighted mean, for "
    "fair_aggregation; held-out rows for postprocess; per task (schema.target.task): the keys of "
    "the target, training.loss for regression only, huber_delta with loss huber only, no "
    "fairness thresholds, mitigation, noised group counts or fairness with secure aggregation "
    "for multiclass and regression, no statistics_epsilon with a standardised target; an "
    "installed model kind's options are checked where it is installed). See docs/plan-spec.md "
    "and docs/tasks.md."
)


def _strategy_params() -> dict[str, Any]:
    """Every strategy parameter, with the strategies that take it."""
    owners: dict[str, list[str]] = {}
    for name, spec_params in STRATEGY_PARAMS.items():
        for param in spec_params:
            owners.setdefault(param, []).append(name)
    params: dict[str, Any] = {
        param: {
            "type": ["number", "null"],
            "description": f"parameter of {', '.join(names)} (fedcore.aggregation)",
        }
        for param, names in sorted(owners.items())
    }
    params["mu"] = FEDPROX_MU.json_schema()
    return params


def _model_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "fedcore.models spec: kind, and for mlp hidden, activation, dropout; for "
        "installed name, version, sha256, options",
        "properties": {
            "kind": {
                "enum": list(SPEC_KINDS),
                "description": "the model family; installed: a kind the sites installed",
            },
            "hidden": {
                "type": "array",
                "items": {"type": "integer", "minimum": 1, "maximum": MAX_HIDDEN_UNITS},
                "minItems": 1,
                "maxItems": MAX_HIDDEN_LAYERS,
                "description": "mlp only: hidden layer widths",
            },
            "activation": {"enum": list(ACTIVATION_NAMES), "default": "relu"},
            "dropout": {"type": "number", "minimum": 0, "exclusiveMaximum": 1, "default": 0},
            "name": {
                "type": "string",
                "pattern": NAME_PATTERN.pattern,
                "description": f"installed only: the entry point's name ({ENTRY_POINT_GROUP})",
            },
            "version": {
                "type": "string",
                "minLength": 1,
                "description": "installed only: the distribution's version",
            },
            "sha256": {
                "type": "string",
                "pattern": "^[0-9a-f]{64}$",
                "description": "installed only: the distribution's digest (docs/tasks.md)",
            },
            "options": {
                "type": "object",
                "description": "installed only: the kind's declarative options (checked by the "
                "kind where it is installed)",
            },
        },
        "required": ["kind"],
        "additionalProperties": False,
    }


def _target_schema() -> dict[str, Any]:
    labels = {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1}
    return {
        "type": "object",
        "description": "the target column and the task: binary (positive or negative), "
        "multiclass (classes), regression (standardize)",
        "properties": {
            "column": {"type": "string", "minLength": 1},
            "task": {"enum": list(TASKS), "default": "binary"},
            "positive": {**labels, "description": "binary: values that are label 1"},
            "negative": {**labels, "description": "binary: values that are label 0"},
            "classes": {
                **labels,
                "minItems": 2,
                "maxItems": MAX_CLASSES,
                "description": "multiclass: the class values, in order",
            },
            "standardize": {
                "type": "boolean",
                "default": False,
                "description": "regression: learn (y - mean) / std with the federated mean and "
                "std of the training targets",
            },
        },
        "required": ["column"],
        "additionalProperties": False,
    }


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a plan spec."""
    privacy = section_schema(PRIVACY_KEYS, SECTION_DOCS["privacy"])
    privacy["properties"]["adaptive_clip"] = {
        "anyOf": [
            section_schema(ADAPTIVE_CLIP_KEYS, SECTION_DOCS["privacy.adaptive_clip"]),
            {"type": "null"},
        ]
    }
    fairness = section_schema(FAIRNESS_KEYS, SECTION_DOCS["fairness"])
    fairness["properties"]["mitigation"] = {
        "anyOf": [
            section_schema(MITIGATION_KEYS, SECTION_DOCS["fairness.mitigation"]),
            {"type": "null"},
        ]
    }
    nested = {
        "model": _model_schema(),
        "schema": {
            "type": "object",
            "description": "dataset schema (fedcore.tabular.DatasetSchema): columns, target, "
            "sensitive",
            "required": ["columns", "target"],
            "properties": {"target": _target_schema()},
        },
        "training": section_schema(TRAINING_KEYS, SECTION_DOCS["training"]),
        "evaluation": section_schema(EVALUATION_KEYS, SECTION_DOCS["evaluation"]),
        "aggregation": {
            "type": "object",
            "description": "strategy and its parameters; which parameters each strategy takes "
            "is checked by the parser",
            "properties": {"strategy": STRATEGY_KEY.json_schema(), **_strategy_params()},
            "additionalProperties": False,
        },
        "privacy": privacy,
        "secagg": section_schema(SECAGG_KEYS, SECTION_DOCS["secagg"]),
        "fairness": fairness,
        "compression": section_schema(COMPRESSION_KEYS, SECTION_DOCS["compression"]),
    }
    top = section_schema(tuple(k for k in TOP_KEYS if k.name not in nested), CROSS_FIELD_NOTE)
    for key in TOP_KEYS:
        if key.name in nested:
            sub = nested[key.name]
            top["properties"][key.name] = (
                {"anyOf": [sub, {"type": "null"}]} if key.nullable else sub
            )
    top["properties"] = {key.name: top["properties"][key.name] for key in TOP_KEYS}
    top["required"] = [key.name for key in TOP_KEYS if key.required]
    top["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    top["title"] = "Quorum plan spec"
    return top


def evaluation_plan_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of an evaluation plan spec (``"kind": "evaluation"``).

    The parser (fedcore.plan.parse_evaluation_plan) also checks the schema, the model spec,
    the fairness section against the schema, no mitigation, no ``evaluation`` with rows
    ``all``; the server checks the version it names at proposal."""
    fairness = section_schema(
        tuple(k for k in FAIRNESS_KEYS if k.name != "mitigation"), SECTION_DOCS["fairness"]
    )
    nested = {
        "model": _model_schema(),
        "schema": {
            "type": "object",
            "description": "dataset schema (fedcore.tabular.DatasetSchema): columns, target, "
            "sensitive",
            "required": ["columns", "target"],
            "properties": {"target": _target_schema()},
        },
        "model_version": {
            "oneOf": [
                section_schema(MODEL_VERSION_KEYS, "a run's registered model version"),
                section_schema(UPLOADED_MODEL_KEYS, "a model uploaded to the consortium"),
            ]
        },
        "evaluation": section_schema(EVALUATION_KEYS, SECTION_DOCS["evaluation"]),
        "fairness": fairness,
    }
    for form in nested["model_version"]["oneOf"]:
        form["properties"]["sha256"]["pattern"] = "^[0-9a-f]{64}$"
    keys = EVALUATION_PLAN_TOP_KEYS
    top = section_schema(
        tuple(k for k in keys if k.name not in nested), "an evaluation plan (no training)"
    )
    for key in keys:
        if key.name in nested:
            sub = nested[key.name]
            top["properties"][key.name] = (
                {"anyOf": [sub, {"type": "null"}]} if key.nullable else sub
            )
    top["properties"]["kind"] = {**top["properties"]["kind"], "const": "evaluation"}
    top["properties"] = {key.name: top["properties"][key.name] for key in keys}
    top["required"] = [key.name for key in keys if key.required]
    top["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    top["title"] = "Quorum evaluation plan spec"
    return top


def evaluation_plan_key_table() -> str:
    """The markdown table of an evaluation plan's own keys (docs/plan-spec.md embeds it)."""
    lines = [
        "| key | type | default | allowed | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    sections = (
        ("", EVALUATION_PLAN_TOP_KEYS),
        ("model_version", MODEL_VERSION_KEYS),
        ("model_version", UPLOADED_MODEL_KEYS[:1]),  # its other form: {uploaded, sha256}
    )
    for section, keys in sections:
        for key in keys:
            path = f"{section}.{key.name}" if section else key.name
            default, allowed = _cell(key)
            kind = f"{key.type} or null" if key.nullable else key.type
            lines.append(f"| `{path}` | {kind} | {default} | {allowed} | {key.doc} |")
    return "\n".join(lines) + "\n"


def _cell(key: Key) -> tuple[str, str]:
    default = "required" if key.default is REQUIRED else f"`{_json(key.default)}`"
    return default, key.expectation()


def _json(value: Any) -> str:
    return json.dumps(value)


def key_table() -> str:
    """The markdown table of every key of every section (docs/plan-spec.md embeds it)."""
    lines = [
        "| key | type | default | allowed | meaning |",
        "| --- | --- | --- | --- | --- |",
    ]
    for section, keys in SECTIONS.items():
        for key in keys:
            path = f"{section}.{key.name}" if section else key.name
            default, allowed = _cell(key)
            kind = f"{key.type} or null" if key.nullable else key.type
            lines.append(f"| `{path}` | {kind} | {default} | {allowed} | {key.doc} |")
    lines.append(
        f'| `aggregation.strategy` | string | `"fedavg"` | {STRATEGY_KEY.expectation()} | '
        f"{STRATEGY_KEY.doc} |"
    )
    default, allowed = _cell(FEDPROX_MU)
    lines.append(f"| `aggregation.mu` | number | {default} | {allowed} | {FEDPROX_MU.doc} |")
    for name, spec_params in STRATEGY_PARAMS.items():
        lines.append(
            f"| `aggregation.*` ({name}) | number | strategy default | "
            f"{', '.join(spec_params)} | parameters of {name} (fedcore.aggregation) |"
        )
    return "\n".join(lines) + "\n"


def _to_openapi(node: Any) -> Any:
    """A JSON Schema 2020-12 node as OpenAPI 3.0 writes it (nullable, boolean exclusive bounds)."""
    if isinstance(node, list):
        return [_to_openapi(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {key: _to_openapi(value) for key, value in node.items() if key != "$schema"}
    if isinstance(out.get("type"), list):
        types = [t for t in out["type"] if t != "null"]
        out["type"] = types[0]
        out["nullable"] = True
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if bound in out and not isinstance(out[bound], bool):
            out[plain] = out.pop(bound)
            out[bound] = True
    if "enum" in out and None in out["enum"]:
        out["nullable"] = True
    any_of = out.get("anyOf")
    if isinstance(any_of, list) and {"type": "null"} in any_of and len(any_of) == 2:
        (inner,) = [item for item in any_of if item != {"type": "null"}]
        out = {**{k: v for k, v in out.items() if k != "anyOf"}, **inner, "nullable": True}
    return out


def openapi_schema() -> dict[str, Any]:
    """:func:`json_schema` in OpenAPI 3.0's dialect, for the API's published schema."""
    return _to_openapi(json_schema())
