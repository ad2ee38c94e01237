"""fedcore.compression: round trips, error feedback, and refusal of bad compressed payloads."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
import torch

from fedcore import compression as c
from fedcore import tensors
from fedcore.models import build_model

TOPK = c.CompressionSpec("topk", 0.1)
INT8 = c.CompressionSpec("int8")
FLOAT16 = c.CompressionSpec("float16")


def model_pair(seed: int = 0, step: float = 0.01) -> tuple[dict, dict]:
    """A global model with an integer buffer, and a 'trained' copy moved by a small step."""
    torch.manual_seed(seed)
    global_ = {
        "fc.weight": torch.randn(16, 8),
        "fc.bias": torch.randn(16),
        "bn.num_batches_tracked": torch.tensor(5, dtype=torch.int64),
    }
    local = {
        "fc.weight": global_["fc.weight"] + step * torch.randn(16, 8),
        "fc.bias": global_["fc.bias"] + step * torch.randn(16),
        "bn.num_batches_tracked": torch.tensor(9, dtype=torch.int64),
    }
    return global_, local


def through_the_wire(wire: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return tensors.decode_state_dict(tensors.encode_state_dict(wire))


@pytest.mark.parametrize("spec", [FLOAT16, INT8, TOPK, c.CompressionSpec("topk", 1.0)])
def test_round_trip_rebuilds_the_full_model_and_keeps_integer_buffers_exact(spec) -> None:
    global_, local = model_pair()
    built = c.compress_update(local, global_, spec, rng=np.random.default_rng(0))
    state = c.decompress_update(through_the_wire(built.tensors), spec, global_)
    assert tensors.signature(state) == tensors.signature(global_)
    assert torch.equal(state["bn.num_batches_tracked"], torch.tensor(9))
    error = max(float((state[n] - local[n]).abs().max()) for n in ("fc.weight", "fc.bias"))
    bound = {"float16": 1e-5, "int8": 0.04 / 127 * 2, "topk": 0.05}[spec.method]
    if spec.ratio == 1.0:
        bound = 1e-6
    assert error <= bound


def test_compressed_payloads_are_smaller_than_dense() -> None:
    global_ = build_model({"kind": "mlp", "hidden": [64, 32]}, 40, seed=0).state_dict()
    local = {n: t + 0.01 for n, t in global_.items()}
    dense = len(tensors.encode_state_dict(local))
    sizes = {
        spec.method + str(spec.ratio): len(
            tensors.encode_state_dict(c.compress_update(local, global_, spec).tensors)
        )
        for spec in (FLOAT16, INT8, c.CompressionSpec("topk", 0.01))
    }
    assert sizes["float16None"] < 0.6 * dense
    assert sizes["int8None"] < 0.35 * dense
    assert sizes["topk0.01"] < 0.1 * dense


def test_int8_stochastic_rounding_is_unbiased() -> None:
    value = torch.tensor([0.3, -0.7, 0.01, 1.0, 0.0])
    rng = np.random.default_rng(7)
    total = torch.zeros(5, dtype=torch.float64)
    trials = 4000
    for _ in range(trials):
        wire = c.encode_delta({"w": value}, INT8, rng=rng)
        total += wire["@q"].double() * float(wire["@scales"][0])
    scale = 1.0 / 127
    assert torch.allclose(total / trials, value.double(), atol=4 * scale / math.sqrt(trials) * 3)


def test_topk_sends_exactly_k_largest_coordinates_sorted() -> None:
    delta = torch.tensor([0.1, -5.0, 0.2, 3.0, -0.05, 0.0, 4.0, 0.3, 0.0, 0.01])
    wire = c.encode_delta({"w": delta}, c.CompressionSpec("topk", 0.3))
    assert wire["@indices"].tolist() == [1, 3, 6]
    assert wire["@values"].tolist() == [-5.0, 3.0, 4.0]
    assert c.CompressionSpec("topk", 0.1).k(30) == 3
    assert c.CompressionSpec("topk", 0.001).k(5) == 1


def test_error_feedback_loses_nothing_sent_plus_residual_equals_true_deltas() -> None:
    torch.manual_seed(3)
    global_ = {"w": torch.zeros(50), "b": torch.zeros(4)}
    spec = c.CompressionSpec("topk", 0.05)
    feedback = c.ErrorFeedback()
    sent_total = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in global_.items()}
    true_total = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in global_.items()}
    for rnd in range(1, 31):
        local = {n: t + torch.randn_like(t) * 0.1 for n, t in global_.items()}
        for n in global_:
            true_total[n] += (local[n] - global_[n]).double()
        built = c.compress_update(local, global_, spec, residual=feedback.residual_for(rnd))
        feedback.advance(rnd, built.residual)
        deltas, _ = c.decode_delta(through_the_wire(built.tensors), spec, global_)
        for n in global_:
            sent_total[n] += deltas[n].double()
    for n in global_:
        kept = feedback.after[n].double()
        assert torch.allclose(sent_total[n] + kept, true_total[n], atol=1e-4)
    # and the residual stays bounded: what is not sent now is sent later
    assert float(feedback.after["w"].abs().max()) < float(true_total["w"].abs().max()) + 1.0


def test_error_feedback_rebuild_of_the_same_round_starts_from_the_same_residual() -> None:
    feedback = c.ErrorFeedback()
    feedback.advance(1, {"w": torch.ones(3)})
    feedback.advance(2, {"w": torch.full((3,), 2.0)})
    assert torch.equal(feedback.residual_for(2)["w"], torch.ones(3))  # rebuild of round 2
    assert torch.equal(feedback.residual_for(3)["w"], torch.full((3,), 2.0))
    feedback.advance(2, {"w": torch.full((3,), 7.0)})  # round 2 rebuilt: before stays
    assert torch.equal(feedback.before["w"], torch.ones(3))
    restored, meta = c.ErrorFeedback.from_bytes(feedback.to_bytes({"plan_hash": "abc"}))
    assert restored.round == 2 and meta["plan_hash"] == "abc"
    assert torch.equal(restored.after["w"], torch.full((3,), 7.0))


def test_topk_with_a_norm_bound_sends_at_most_the_bound_and_keeps_the_rest() -> None:
    global_ = {"w": torch.zeros(100)}
    local = {"w": torch.linspace(-3, 3, 100)}
    built = c.compress_update(local, global_, c.CompressionSpec("topk", 0.2), max_norm=1.0)
    assert built.sent_norm <= 1.0
    deltas, _ = c.decode_delta(built.tensors, c.CompressionSpec("topk", 0.2), global_)
    assert torch.allclose(deltas["w"] + built.residual["w"], local["w"], atol=1e-6)


def test_float16_overflow_is_refused_at_the_site() -> None:
    with pytest.raises(c.CompressionError, match="overflows float16"):
        c.encode_delta({"w": torch.tensor([1e6])}, FLOAT16)


# ------------------------------------------------------------------------- refusals on decode


def _good(spec: c.CompressionSpec) -> tuple[dict, dict]:
    global_, local = model_pair()
    return c.compress_update(local, global_, spec).tensors, global_


def _set(key: str, value: torch.Tensor) -> Callable[[dict], dict]:
    return lambda wire: {**wire, key: value}


I32 = torch.int32
# fc.bias is 16 coordinates at flat offsets 0..15, fc.weight 128 at 16..143 (sorted names)
BAD_PAYLOADS = [
    (TOPK, lambda w: {k: v for k, v in w.items() if k != "@values"}, c.LayoutMismatch, "missing"),
    (TOPK, _set("@extra", torch.zeros(1)), c.LayoutMismatch, "unexpected"),
    (TOPK, _set("@indices", torch.tensor([0, 200], dtype=I32)), c.LayoutMismatch, "same length"),
    (TOPK, lambda w: {**w, "@indices": w["@indices"].long()}, c.LayoutMismatch, "dtype int64"),
    (
        TOPK,
        lambda w: {**w, "@indices": torch.tensor([3, 144], dtype=I32), "@values": torch.ones(2)},
        c.IndexOutOfRange,
        "index 144 outside the model's 0..143",
    ),
    (
        TOPK,
        lambda w: {**w, "@indices": torch.tensor([-1, 3], dtype=I32), "@values": torch.ones(2)},
        c.IndexOutOfRange,
        "index -1 outside",
    ),
    (
        TOPK,
        lambda w: {**w, "@indices": torch.tensor([3, 3], dtype=I32), "@values": torch.ones(2)},
        c.IndexOutOfRange,
        "strictly increasing",
    ),
    (
        TOPK,
        lambda w: {**w, "@indices": torch.arange(20, dtype=I32), "@values": torch.ones(20)},
        c.TooManyValues,
        "at most 15 of 144",
    ),
    (
        TOPK,
        lambda w: {
            **w,
            "@indices": torch.tensor([2, 40], dtype=I32),
            "@values": torch.tensor([1.0, math.inf]),
        },
        c.NonFiniteValues,
        "tensor 'fc.weight'",
    ),
    (INT8, _set("@scales", torch.tensor([0.1, math.nan])), c.BadScale, "'fc.weight': int8 scale"),
    (INT8, _set("@scales", torch.tensor([-0.5, 0.1])), c.BadScale, "'fc.bias': int8 scale"),
    (INT8, _set("@scales", torch.tensor([1.0])), c.LayoutMismatch, "shape (1,), expected (2,)"),
    (INT8, _set("@q", torch.full((144,), -128, dtype=torch.int8)), c.BadScale, "-128"),
    (INT8, _set("@q", torch.zeros(144, dtype=torch.uint8)), c.LayoutMismatch, "dtype uint8"),
    (INT8, _set("@q", torch.zeros(143, dtype=torch.int8)), c.LayoutMismatch, "shape (143,)"),
    (INT8, _set("@scales", torch.tensor([3e38, 3e38])), c.NonFiniteValues, "NaN or Inf"),
    (
        FLOAT16,
        _set("@delta", torch.full((144,), math.nan, dtype=torch.float16)),
        c.NonFiniteValues,
        "NaN or Inf",
    ),
    (FLOAT16, _set("@delta", torch.zeros(144)), c.LayoutMismatch, "dtype float32"),
    (FLOAT16, _set("bn.num_batches_tracked", torch.tensor(1.0)), c.LayoutMismatch, "dtype"),
]


@pytest.mark.parametrize(
    ("spec", "mutate", "error", "text"),
    BAD_PAYLOADS,
    ids=[
        "topk-missing",
        "topk-extra",
        "topk-lengths",
        "topk-index-dtype",
        "topk-index-high",
        "topk-index-negative",
        "topk-duplicate",
        "topk-too-many",
        "topk-inf",
        "int8-nan-scale",
        "int8-negative-scale",
        "int8-scale-shape",
        "int8-minus-128",
        "int8-dtype",
        "int8-length",
        "int8-overflow",
        "float16-nan",
        "float16-dtype",
        "buffer-dtype",
    ],
)
def test_decode_refuses_each_bad_payload_with_its_own_error(spec, mutate, error, text) -> None:
    wire, global_ = _good(spec)
    with pytest.raises(error) as caught:
        c.decompress_update(through_the_wire(mutate(wire)), spec, global_)
    assert text in str(caught.value)
    assert caught.value.code in {"invalid_update", "incompatible_update", "non_finite"}


def test_plan_section_validation_names_the_field() -> None:
    assert c.CompressionSpec.from_section(None) == c.CompressionSpec("none")
    assert c.CompressionSpec.from_section({"method": "topk", "ratio": 1}).ratio == 1.0
    for section, field, text in [
        ({"method": "zip"}, "compression.method", "unknown"),
        ({"method": "topk"}, "compression.ratio", "(0, 1]"),
        ({"method": "topk", "ratio": 0}, "compression.ratio", "(0, 1]"),
        ({"method": "topk", "ratio": 1.5}, "compression.ratio", "(0, 1]"),
        ({"method": "topk", "ratio": True}, "compression.ratio", "(0, 1]"),
        ({"method": "int8", "ratio": 0.5}, "compression.ratio", "topk only"),
        ({"method": "int8", "bits": 4}, "compression", "unknown key"),
        ("topk", "compression", "must be an object"),
    ]:
        with pytest.raises(c.CompressionSpecError) as caught:
            c.CompressionSpec.from_section(section)
        assert caught.value.field == field and text in str(caught.value)
