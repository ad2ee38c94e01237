"""The residual MLP kind: its options, its shapes, its residual path, and DP-SGD compatibility."""

from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator
from quorum_resmlp import KIND, ResMLP


def test_the_kind_declares_its_name_and_its_distributions_version() -> None:
    from importlib.metadata import PackageNotFoundError, version

    assert KIND.name == "resmlp"
    try:
        assert KIND.version == version("quorum-resmlp")
    except PackageNotFoundError:  # run from the source folder, not installed
        assert KIND.version == "0.1.0"


def test_defaults_fill_in_and_bad_options_are_named() -> None:
    assert KIND.validate({}) == {
        "width": 64,
        "blocks": 2,
        "activation": "relu",
        "layer_norm": True,
        "dropout": 0.0,
    }
    for options, message in (
        ({"width": 4}, "'width' must be an integer from 8 to 1024"),
        ({"blocks": True}, "'blocks' must be an integer"),
        ({"activation": "swish"}, "'activation' must be one of relu, gelu, tanh"),
        ({"dropout": 1.0}, "'dropout' must be in [0, 1)"),
        ({"depth": 3}, "unknown option(s) ['depth']"),
    ):
        with pytest.raises(ValueError) as caught:
            KIND.validate(options)
        assert message in str(caught.value)


@pytest.mark.parametrize("outputs", [1, 5])
def test_it_maps_features_to_the_requested_outputs(outputs: int) -> None:
    model = KIND.build({"width": 16, "blocks": 3}, n_features=7, n_outputs=outputs)

    assert model(torch.randn(4, 7)).shape == (4, outputs)
    assert len(model.blocks) == 3


def test_a_block_with_zero_weights_is_the_identity() -> None:
    model = ResMLP(3, 2, KIND.validate({"width": 8, "blocks": 1}))
    block = model.blocks[0]
    torch.nn.init.zeros_(block.fc2.weight)
    torch.nn.init.zeros_(block.fc2.bias)
    x = torch.randn(5, 8)

    assert torch.equal(block(x), x)


def test_opacus_can_train_it_privately() -> None:
    model = KIND.build({"width": 8, "dropout": 0.1}, n_features=4, n_outputs=3)

    assert ModuleValidator.validate(model, strict=False) == []
