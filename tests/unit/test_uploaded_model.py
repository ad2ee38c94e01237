"""fedcore.uploaded_model: an uploaded model is checked whole, each problem named with its part;
and the evaluation plan's ``model_version`` section in its uploaded form."""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save as safetensors_save

from fedcore import tabular, tensors
from fedcore.models import build_model
from fedcore.plan import PlanError, parse_evaluation_plan
from fedcore.plan.evaluation_plan import evaluation_plan_errors
from fedcore.uploaded_model import UploadedModelError, check_uploaded_model

SCHEMA = {
    "columns": [
        {"name": "x1", "type": "numeric", "transform": "none", "missing": "impute"},
        {"name": "x2", "type": "numeric", "transform": "none", "missing": "impute"},
        {"name": "c", "type": "categorical", "categories": ["a", "b"], "missing": "error"},
    ],
    "target": {"column": "y", "positive": ["1"]},
    "sensitive": [],
}
LR = {"kind": "logistic_regression"}


def fitted() -> dict[str, Any]:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(
        {
            "x1": rng.normal(size=40),
            "x2": rng.normal(size=40),
            "c": rng.choice(["a", "b"], size=40),
            "y": rng.integers(0, 2, size=40),
        }
    )
    schema = tabular.DatasetSchema.from_dict(SCHEMA)
    return tabular.merge_statistics([tabular.local_statistics(frame, schema)], schema)


def state(spec: dict[str, Any] = LR) -> dict[str, torch.Tensor]:
    return dict(build_model(spec, 4, seed=3).state_dict())  # x1, x2, c=a, c=b


def check(weights: bytes, **overrides: Any) -> Any:
    args = {"model": LR, "schema": SCHEMA, "preprocessing": fitted(), "weights": weights}
    args.update(overrides)
    return check_uploaded_model(**args)


def refused(weights: bytes, **overrides: Any) -> dict[str, str]:
    with pytest.raises(UploadedModelError) as caught:
        check(weights, **overrides)
    return caught.value.errors


def test_a_model_saved_with_safetensors_is_accepted_with_its_hash_and_signature() -> None:
    data = safetensors_save(state())
    checked = check(data)

    assert checked.sha256 == tensors.sha256_hex(data) and checked.size_bytes == len(data)
    assert checked.n_features == 4 and checked.model == {"kind": "logistic_regression"}
    assert checked.signature == {
        "linear.bias": ["float32", [1]],
        "linear.weight": ["float32", [1, 4]],
    }


def test_a_wrong_tensor_name_is_named() -> None:
    weights = state()
    weights["linear.w"] = weights.pop("linear.weight")
    errors = refused(safetensors_save(weights))

    assert set(errors) == {"weights"}
    assert "'linear.weight': missing" in errors["weights"] and "1 more" in errors["weights"]


def test_a_wrong_shape_is_named_with_the_expected_one() -> None:
    weights = state()
    weights["linear.weight"] = torch.zeros(1, 3)
    errors = refused(safetensors_save(weights))

    assert "tensor 'linear.weight': shape (1, 3), expected (1, 4)" in errors["weights"]
    assert "on 4 input(s)" in errors["weights"]


def test_a_wrong_dtype_is_named() -> None:
    weights = state()
    weights["linear.bias"] = weights["linear.bias"].double()
    errors = refused(safetensors_save(weights))

    assert "tensor 'linear.bias': dtype float64, expected float32" in errors["weights"]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_values_are_refused(value: float) -> None:
    weights = state()
    weights["linear.weight"][0, 2] = value
    errors = refused(safetensors_save(weights))

    assert errors == {"weights": "tensor 'linear.weight' holds NaN or infinite values"}


def test_bytes_that_are_not_safetensors_are_refused_with_how_to_save() -> None:
    errors = refused(b"hello, these are not tensors at all")

    assert "not a valid safetensors state dict" in errors["weights"]
    assert "safetensors.torch.save_file" in errors["weights"]


def test_a_torch_save_file_is_never_unpickled() -> None:
    buffer = io.BytesIO()
    torch.save(state(), buffer)
    errors = refused(buffer.getvalue())

    assert "ZIP archive (torch.save" in errors["weights"] and "never unpickles" in errors["weights"]


# What pickle.dumps([]) writes with protocols 2, 4 and 5 (the pickle module is banned here).
PICKLED_EMPTY_LISTS = [b"\x80\x02]q\x00.", b"\x80\x04]\x94.", b"\x80\x05]\x94."]


@pytest.mark.parametrize("data", PICKLED_EMPTY_LISTS)
def test_a_pickle_file_is_never_unpickled(data: bytes) -> None:
    errors = refused(data)

    assert "is a pickle file" in errors["weights"] and "never unpickles" in errors["weights"]


def test_a_file_above_the_limit_is_refused_before_it_is_parsed() -> None:
    data = safetensors_save(state())
    errors = refused(data, max_bytes=len(data) - 1)

    assert "above this server's limit" in errors["weights"]
    assert check(data, max_bytes=len(data)).size_bytes == len(data)


def test_an_invalid_spec_schema_or_preprocessing_is_named_with_every_problem() -> None:
    data = safetensors_save(state())

    assert "unknown model kind 'forest'" in refused(data, model={"kind": "forest"})["model.kind"]
    assert "hidden" in refused(data, model={"kind": "mlp", "hidden": [0]})["model"]
    errors = refused(data, schema={"columns": []}, model={"kind": "forest"})
    assert set(errors) == {"schema", "model.kind"}
    assert "fitted preprocessing" in refused(data, preprocessing={"version": 1})["preprocessing"]


def test_weights_of_another_model_kind_name_the_difference() -> None:
    mlp = {"kind": "mlp", "hidden": [8], "activation": "relu"}
    errors = refused(safetensors_save(state()), model=mlp)

    assert "do not fit the model 'mlp'" in errors["weights"] and "missing" in errors["weights"]
    assert check(safetensors_save(state(mlp)), model=mlp).n_features == 4


# --- the plan language: model_version's uploaded form -------------------------------------------


def plan(**model_version: Any) -> dict[str, Any]:
    return {
        "kind": "evaluation",
        "schema": SCHEMA,
        "model": LR,
        "model_version": model_version,
        "rows": "all",
    }


def test_an_evaluation_plan_names_an_uploaded_model_by_id_and_hash() -> None:
    parsed = parse_evaluation_plan(plan(uploaded=4, sha256="ab" * 32))

    ref = parsed.model_version
    assert (ref.uploaded, ref.run, ref.number, ref.sha256) == (4, None, None, "ab" * 32)
    assert ref.label == "uploaded model 4"
    assert json.loads(json.dumps(plan(uploaded=4, sha256="ab" * 32)))  # plain JSON


@pytest.mark.parametrize(
    ("model_version", "path", "words"),
    [
        ({"uploaded": 4, "run": 1, "number": 0, "sha256": "ab" * 32}, "model_version", "not both"),
        ({"uploaded": 0, "sha256": "ab" * 32}, "model_version.uploaded", ">= 1"),
        ({"uploaded": 4}, "model_version.sha256", "required"),
        ({"uploaded": 4, "sha256": "xyz"}, "model_version.sha256", "64 lowercase hex"),
        ({"uploaded": 4, "sha256": "ab" * 32, "number": 1}, "model_version", "not both"),
    ],
)
def test_a_bad_uploaded_form_is_refused_at_its_key(
    model_version: dict[str, Any], path: str, words: str
) -> None:
    errors = evaluation_plan_errors(plan(**model_version))

    assert path in errors and words in errors[path], errors
    with pytest.raises(PlanError):
        parse_evaluation_plan(plan(**model_version))
