"""Tests for fedcore.aggregation._kernels and the fast paths built on them.

The kernels work chunk by chunk (CHUNK elements), so several tests use tensors longer than one
chunk and put the interesting value in a later chunk.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedcore.aggregation import StreamingFedAvg, fedavg, krum_scores, make_strategy
from fedcore.aggregation._kernels import (
    CHUNK,
    NETWORK_MAX_ROWS,
    all_finite,
    blend_,
    delta_squared_norm,
    first_non_finite,
    mean_of_rows,
    order_rows,
)

LONG = 2 * CHUNK + 123  # three chunks, the last one short


@pytest.fixture(autouse=True)
def _one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def randn(*shape: int, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


# --- finiteness ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_value_in_a_later_chunk_is_found(dtype, bad):
    tensor = randn(LONG, dtype=dtype)
    tensor[LONG - 5] = bad

    assert not all_finite(tensor)
    assert first_non_finite({"b": randn(3), "a": tensor, "c": tensor}) == "a"


def test_finite_values_whose_sum_overflows_are_finite():
    # The fast path sums; 3e38 + 3e38 overflows float32, which must not be taken for an Inf.
    tensor = torch.full((LONG,), 3e38, dtype=torch.float32)
    half = torch.full((100,), 60000.0, dtype=torch.float16)

    assert all_finite(tensor) and all_finite(half)
    assert first_non_finite({"w": tensor, "h": half, "n": torch.tensor([1, 2])}) is None


# --- delta norm ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_delta_norm_matches_a_float64_reference_across_chunks(dtype):
    update, reference = randn(LONG, seed=1, dtype=dtype), randn(LONG, seed=2, dtype=dtype)

    got = delta_squared_norm(update, reference)

    expected = float((update.double() - reference.double()).square().sum())
    assert got == pytest.approx(expected, rel=1e-6 if dtype != torch.float64 else 1e-12)


def test_delta_norm_redoes_overflowing_float32_squares_in_float64_and_reports_nan():
    update = torch.full((LONG,), 1e30, dtype=torch.float32)  # (1e30)² overflows float32
    reference = torch.zeros(LONG)

    assert delta_squared_norm(update, reference) == pytest.approx(LONG * 1e60, rel=1e-6)
    update[-1] = math.nan
    assert math.isnan(delta_squared_norm(update, reference))


# --- blend -----------------------------------------------------------------------------------


def test_blend_is_lerp_and_measures_the_delta_in_the_same_pass():
    acc, update, reference = randn(LONG, seed=1), randn(LONG, seed=2), randn(LONG, seed=3)
    expected = acc.clone().lerp_(update, 0.3)

    finite, squared = blend_(acc, update, 0.3, reference=reference)

    assert finite
    assert torch.equal(acc, expected)
    assert squared == pytest.approx(float((update.double() - reference.double()).square().sum()))


def test_blend_casts_half_updates_and_stops_at_a_non_finite_chunk():
    acc = torch.zeros(LONG)
    update = randn(LONG, seed=4, dtype=torch.float16)

    assert blend_(acc, update, 1.0) == (True, 0.0)
    assert torch.equal(acc, update.float())

    update[CHUNK + 7] = math.inf
    finite, squared = blend_(acc, update, 0.5)
    assert not finite and math.isnan(squared)


# --- fedavg and the FedAvg strategy on the fused path ---------------------------------------


def test_fedavg_refuses_a_nan_in_a_later_chunk_naming_update_and_tensor():
    good = {"a": randn(LONG, seed=1), "b": randn(4, seed=2)}
    bad = {"a": randn(LONG, seed=3), "b": randn(4, seed=4)}
    bad["a"][CHUNK + 1] = math.nan

    with pytest.raises(ValueError, match="update #1: tensor 'a' holds NaN or Inf"):
        fedavg([(good, 1), (bad, 1), (good, 1)])
    with pytest.raises(ValueError, match="update #1: tensor 'a' holds NaN or Inf"):
        make_strategy({"strategy": "fedavg"}).aggregate(good, [(good, 1), (bad, 1)], round=1)


def test_streaming_add_still_leaves_the_mean_unchanged_when_a_late_chunk_is_bad():
    aggregator = StreamingFedAvg()
    first = {"w": randn(LONG, seed=1)}
    aggregator.add(first, 1)
    bad = {"w": randn(LONG, seed=2)}
    bad["w"][-1] = math.inf

    with pytest.raises(ValueError, match="update #1: tensor 'w' holds NaN or Inf"):
        aggregator.add(bad, 1)

    assert aggregator.count == 1
    assert torch.equal(aggregator.result()["w"], first["w"])


def test_fedavg_matches_a_float64_weighted_mean_on_long_tensors():
    states = [
        {"w": randn(LONG, seed=s), "h": randn(5, seed=s, dtype=torch.float16)} for s in range(4)
    ]
    weights = [3, 1, 7, 2]

    result = fedavg(zip(states, weights, strict=True))

    expected = sum(w * s["w"].double() for s, w in zip(states, weights, strict=True)) / 13
    assert result["w"].dtype == torch.float32 and result["h"].dtype == torch.float16
    assert torch.allclose(result["w"].double(), expected, atol=1e-6)
    assert all(result["w"].data_ptr() != s["w"].data_ptr() for s in states)


@pytest.mark.parametrize("norm_bound", [None, 1e9])
def test_fedavg_strategy_norms_are_those_of_the_other_strategies(norm_bound):
    # Without a bound FedAvg measures norms while blending (deferred); with one, in screening.
    global_state = {"w": randn(LONG, seed=9), "n": torch.tensor(0)}
    updates = [({"w": randn(LONG, seed=s), "n": torch.tensor(s)}, float(s + 1)) for s in range(4)]
    spec = {"strategy": "fedavg", "norm_bound": norm_bound}

    result = make_strategy(spec).aggregate(global_state, updates, round=1)
    median = make_strategy({"strategy": "median"}).aggregate(global_state, updates, round=1)

    expected = [
        math.sqrt(float((u["w"].double() - global_state["w"].double()).square().sum()))
        for u, _ in updates
    ]
    assert result.stats["delta_norms"] == pytest.approx(expected, rel=1e-6)
    assert median.stats["delta_norms"] == pytest.approx(expected, rel=1e-6)
    assert torch.equal(result.state["w"], fedavg(updates)["w"])
    assert result.state["n"].item() == 3


# --- order statistics ------------------------------------------------------------------------


@pytest.mark.parametrize("n", [*range(1, 24), 50, 100, NETWORK_MAX_ROWS + 3])
def test_order_rows_gives_every_rank_of_every_column(n):
    rng = np.random.default_rng(n)
    block = rng.integers(-5, 5, size=(n, 300)).astype(np.float32)  # many ties
    block[:, :100] = rng.standard_normal((n, 100))
    expected = np.sort(block, axis=0)

    for low, high in [(0, n), ((n - 1) // 2, n // 2 + 1), (n // 4, n - n // 4)]:
        got = order_rows(block.copy(), low, high)
        assert np.array_equal(np.stack(got), expected[low:high]), (low, high)


def test_mean_of_rows_returns_identical_rows_exactly_and_is_correctly_rounded():
    row = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    rows = [np.random.default_rng(s).standard_normal(1000).astype(np.float32) for s in range(7)]

    assert np.array_equal(mean_of_rows([row] * 7, 7, np.dtype(np.float32)), row)
    assert np.array_equal(mean_of_rows([row.astype(np.float64)] * 3, 3, np.dtype(np.float64)), row)
    expected = (np.sum(np.stack(rows).astype(np.float64), axis=0) / 7).astype(np.float32)
    assert np.array_equal(mean_of_rows(rows, 7, np.dtype(np.float32)), expected)


@pytest.mark.parametrize("n", [4, 5, 12])
def test_median_and_trimmed_mean_match_numpy_on_several_blocks(n):
    global_state = {"w": torch.zeros(3, 20_000)}  # 60,000 columns: several cache blocks
    updates = [({"w": randn(3, 20_000, seed=s)}, 1.0) for s in range(n)]
    stacked = np.stack([u["w"].numpy().reshape(-1) for u, _ in updates]).astype(np.float64)
    k = int(np.floor(0.2 * n))

    median = make_strategy({"strategy": "median"}).aggregate(global_state, updates, round=1)
    trimmed = make_strategy({"strategy": "trimmed_mean", "beta": 0.2}).aggregate(
        global_state, updates, round=1
    )

    expected_median = np.median(stacked, axis=0).astype(np.float32)
    expected_trimmed = np.sort(stacked, axis=0)[k : n - k].mean(axis=0).astype(np.float32)
    np.testing.assert_array_equal(median.state["w"].numpy().reshape(-1), expected_median)
    np.testing.assert_allclose(
        trimmed.state["w"].numpy().reshape(-1), expected_trimmed, rtol=0, atol=1e-6
    )


def test_krum_gram_over_several_column_blocks_matches_brute_force(tmp_path):
    global_state = {"w": randn(30_000, seed=99)}  # several Gram blocks of 8192 columns
    updates = [({"w": randn(30_000, seed=s) * (1 + s / 10)}, 1.0) for s in range(7)]
    deltas = [u["w"].double() - global_state["w"].double() for u, _ in updates]
    distances = np.array([[float((a - b).square().sum()) for b in deltas] for a in deltas])

    in_ram = make_strategy({"strategy": "krum", "f": 1}).aggregate(global_state, updates, round=1)
    spilled = make_strategy(
        {"strategy": "krum", "f": 1, "memory_budget_bytes": 300_000}, spill_dir=tmp_path
    ).aggregate(global_state, updates, round=1)

    np.testing.assert_allclose(in_ram.stats["krum_scores"], krum_scores(distances, 1), rtol=1e-9)
    assert spilled.stats["spilled_to_disk"] is True
    assert spilled.stats["krum_scores"] == in_ram.stats["krum_scores"]
    assert torch.equal(spilled.state["w"], in_ram.state["w"])
