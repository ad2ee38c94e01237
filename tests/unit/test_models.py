"""Tests for fedcore.models: the declarative model zoo."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fedcore.models import ModelSpecError, build_model, validate_model_spec

SPECS = [
    {"kind": "logistic_regression"},
    {"kind": "mlp", "hidden": [8]},
    {"kind": "mlp", "hidden": [16, 8], "activation": "tanh", "dropout": 0.2},
    {"kind": "mlp", "hidden": [4, 4, 4], "activation": "gelu"},
    {"kind": "mlp", "hidden": [5], "activation": "sigmoid"},
    {"kind": "mlp", "hidden": [5], "activation": "leaky_relu"},
]


@pytest.mark.parametrize("spec", SPECS)
def test_every_kind_maps_features_to_one_logit(spec):
    model = build_model(spec, 7, seed=0)
    X = torch.randn(11, 7, generator=torch.Generator().manual_seed(1))

    logits = model(X)

    assert logits.shape == (11, 1)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_logistic_regression_is_one_linear_layer():
    model = build_model({"kind": "logistic_regression"}, 5, seed=0)

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]

    assert [(m.in_features, m.out_features) for m in linears] == [(5, 1)]
    assert list(model.state_dict()) == ["linear.weight", "linear.bias"]


def test_mlp_layers_follow_the_spec():
    model = build_model(
        {"kind": "mlp", "hidden": [16, 8], "activation": "tanh", "dropout": 0.25}, 3, seed=0
    )

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]

    assert [(m.in_features, m.out_features) for m in linears] == [(3, 16), (16, 8), (8, 1)]
    assert sum(isinstance(m, nn.Tanh) for m in model.modules()) == 2
    assert [m.p for m in dropouts] == [0.25, 0.25]
    assert list(model.state_dict()) == [
        "fc1.weight",
        "fc1.bias",
        "fc2.weight",
        "fc2.bias",
        "out.weight",
        "out.bias",
    ]


def test_no_dropout_layer_when_dropout_is_zero():
    model = build_model({"kind": "mlp", "hidden": [4]}, 3, seed=0)

    assert not any(isinstance(m, nn.Dropout) for m in model.modules())


@pytest.mark.parametrize("spec", SPECS[:3])
def test_same_seed_same_weights_and_global_rng_untouched(spec):
    before = torch.get_rng_state()

    first = build_model(spec, 6, seed=42).state_dict()
    second = build_model(spec, 6, seed=42).state_dict()
    other = build_model(spec, 6, seed=43).state_dict()

    assert torch.equal(torch.get_rng_state(), before)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_init_follows_pytorch_default_bounds():
    model = build_model({"kind": "mlp", "hidden": [64]}, 100, seed=0)

    bound = 1 / 100**0.5
    weight = model.fc1.weight

    assert weight.abs().max() <= bound
    assert weight.abs().max() > 0.9 * bound  # drawn from the whole range, not zeros
    assert model.fc1.bias.abs().max() <= bound


def test_validate_fills_defaults_and_copies():
    spec = {"kind": "mlp", "hidden": (32, 16)}

    normalised = validate_model_spec(spec)

    assert normalised == {"kind": "mlp", "hidden": [32, 16], "activation": "relu", "dropout": 0.0}
    assert spec == {"kind": "mlp", "hidden": (32, 16)}
    assert validate_model_spec({"kind": "logistic_regression"}) == {"kind": "logistic_regression"}


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"kind": "cnn"},
            "'kind': 'cnn' is not a known model kind; allowed: logistic_regression, mlp",
        ),
        ({}, "'kind': None is not a known model kind"),
        ({"kind": "logistic_regression", "hidden": [3]}, "unknown key(s) 'hidden'"),
        ({"kind": "mlp", "hidden": [8], "layers": 2}, "unknown key(s) 'layers'"),
        ({"kind": "mlp"}, "key 'hidden' is required"),
        ({"kind": "mlp", "hidden": []}, "must be a list of 1 to 8"),
        ({"kind": "mlp", "hidden": [4] * 9}, "must be a list of 1 to 8"),
        ({"kind": "mlp", "hidden": 8}, "must be a list of 1 to 8"),
        ({"kind": "mlp", "hidden": [8, 2.5]}, "entry 1 is 2.5"),
        ({"kind": "mlp", "hidden": [True]}, "entry 0 is True"),
        ({"kind": "mlp", "hidden": [0]}, "entry 0 is 0"),
        ({"kind": "mlp", "hidden": [4097]}, "from 1 to 4096"),
        ({"kind": "mlp", "hidden": [4], "activation": "swish"}, "allowed: relu, tanh, gelu"),
        ({"kind": "mlp", "hidden": [4], "dropout": 1.0}, "'dropout': 1.0 must be"),
        ({"kind": "mlp", "hidden": [4], "dropout": -0.1}, "'dropout': -0.1 must be"),
        ({"kind": "mlp", "hidden": [4], "dropout": True}, "'dropout': True must be"),
        ({"kind": "mlp", "hidden": [4], "dropout": float("nan")}, "'dropout': nan must be"),
    ],
)
def test_invalid_specs_are_refused_with_the_key_named(spec, message):
    with pytest.raises(ModelSpecError) as excinfo:
        build_model(spec, 3)

    assert message in str(excinfo.value)


def test_spec_must_be_a_mapping():
    with pytest.raises(ModelSpecError, match="must be a JSON object"):
        validate_model_spec(["mlp"])


@pytest.mark.parametrize("n_features", [0, -1, True, 2.0])
def test_n_features_must_be_a_positive_int(n_features):
    with pytest.raises(ModelSpecError, match="n_features must be a positive integer"):
        build_model({"kind": "logistic_regression"}, n_features)
