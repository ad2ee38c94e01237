"""Tests for fedcore.aggregation: streaming FedAvg."""

from __future__ import annotations

import math
import tracemalloc
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from fedcore.aggregation import StreamingFedAvg, fedavg
from fedcore.tensors import IncompatibleStateDict


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors: one intra-op thread is fastest and immune to a busy CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fedavg_equals_hand_computed_weighted_mean():
    updates = [
        ({"w": torch.tensor([1.0, 2.0, 3.0]), "b": torch.tensor(0.0)}, 1),
        ({"w": torch.tensor([4.0, 5.0, 6.0]), "b": torch.tensor(8.0)}, 3),
    ]

    result = fedavg(updates)

    # (1*1 + 3*4) / 4 = 3.25, (1*2 + 3*5) / 4 = 4.25, (1*3 + 3*6) / 4 = 5.25, (0 + 24) / 4 = 6
    assert torch.equal(result["w"], torch.tensor([3.25, 4.25, 5.25]))
    assert torch.equal(result["b"], torch.tensor(6.0))


def test_fedavg_three_updates_and_weight_scale_invariance():
    a, b, c = torch.tensor([0.0, 10.0]), torch.tensor([3.0, 4.0]), torch.tensor([6.0, -2.0])

    result = fedavg([({"x": a}, 2), ({"x": b}, 1.0), ({"x": c}, 1)])
    scaled = fedavg([({"x": a}, 2000), ({"x": b}, 1000.0), ({"x": c}, 1000)])

    # (2*0 + 3 + 6) / 4 = 2.25, (2*10 + 4 - 2) / 4 = 5.5
    assert torch.allclose(result["x"], torch.tensor([2.25, 5.5]))
    assert torch.allclose(scaled["x"], result["x"])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_identical_updates_are_returned_exactly(dtype):
    generator = torch.Generator().manual_seed(0)
    state = {
        "w": torch.randn(7, 3, generator=generator).to(dtype),
        "b": torch.randn(3, generator=generator).to(dtype),
    }

    result = fedavg((state, weight) for weight in (1, 5, 17, 3))

    assert all(result[k].dtype == dtype for k in state)
    assert all(torch.equal(result[k], state[k]) for k in state)


def test_dtypes_are_preserved_and_counters_take_the_maximum():
    updates = [
        (
            {
                "half": torch.tensor([1.0, 2.0], dtype=torch.float16),
                "brain": torch.tensor([1.0, 2.0], dtype=torch.bfloat16),
                "num_batches_tracked": torch.tensor(7, dtype=torch.int64),
                "mask": torch.tensor([True, False, False]),
            },
            1,
        ),
        (
            {
                "half": torch.tensor([3.0, 4.0], dtype=torch.float16),
                "brain": torch.tensor([3.0, 6.0], dtype=torch.bfloat16),
                "num_batches_tracked": torch.tensor(12, dtype=torch.int64),
                "mask": torch.tensor([False, False, True]),
            },
            1,
        ),
        (
            {
                "half": torch.tensor([5.0, 6.0], dtype=torch.float16),
                "brain": torch.tensor([5.0, 10.0], dtype=torch.bfloat16),
                "num_batches_tracked": torch.tensor(3, dtype=torch.int64),
                "mask": torch.tensor([False, False, False]),
            },
            2,
        ),
    ]

    result = fedavg(updates)

    assert result["half"].dtype == torch.float16
    assert result["brain"].dtype == torch.bfloat16
    assert result["num_batches_tracked"].dtype == torch.int64
    assert result["mask"].dtype == torch.bool
    # (1 + 3 + 2*5) / 4 = 3.5, (2 + 4 + 2*6) / 4 = 4.5; (1 + 3 + 10) / 4 = 3.5, (2 + 6 + 20) / 4 = 7
    assert torch.equal(result["half"], torch.tensor([3.5, 4.5], dtype=torch.float16))
    assert torch.equal(result["brain"], torch.tensor([3.5, 7.0], dtype=torch.bfloat16))
    assert result["num_batches_tracked"].item() == 12
    assert result["mask"].tolist() == [True, False, True]


def test_float16_accumulates_in_float32():
    # The mean 1 + 0.75 * 2**-9 rounds to 1 + 2**-9 in float16. A float16 running mean loses the
    # 1/3 and 1/4 steps below float16's spacing (2**-10) and would stop at 1 + 2**-10.
    base = torch.full((4,), 1.0, dtype=torch.float16)
    bumped = torch.full((4,), 1.0 + 2**-9, dtype=torch.float16)
    updates = [({"x": base}, 1)] + [({"x": bumped}, 1)] * 3

    result = fedavg(updates)

    expected = (torch.tensor(1.0) + 3 * torch.tensor(1.0 + 2**-9)) / 4
    assert torch.equal(result["x"], torch.full((4,), expected.item()).to(torch.float16))


def test_inputs_are_not_modified_and_result_is_not_aliased():
    first = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(1)}
    second = {"w": torch.tensor([3.0, 4.0]), "n": torch.tensor(5)}
    copies = [{k: v.clone() for k, v in s.items()} for s in (first, second)]

    result = fedavg([(first, 1), (second, 1)])
    result["w"].add_(100)

    for state, copy in zip((first, second), copies, strict=True):
        assert all(torch.equal(state[k], copy[k]) for k in state)


def test_streaming_class_matches_function_and_counts():
    generator = torch.Generator().manual_seed(1)
    states = [{"w": torch.randn(5, generator=generator)} for _ in range(4)]
    weights = [3, 1, 4, 1]

    aggregator = StreamingFedAvg()
    for state, weight in zip(states, weights, strict=True):
        aggregator.add(state, weight)

    expected = sum(w * s["w"] for s, w in zip(states, weights, strict=True)) / sum(weights)
    assert aggregator.count == 4
    assert aggregator.total_weight == 9.0
    assert torch.allclose(aggregator.result()["w"], expected, atol=1e-6)
    assert torch.equal(aggregator.result()["w"], fedavg(zip(states, weights, strict=True))["w"])


def test_empty_updates_are_refused():
    with pytest.raises(ValueError, match="needs at least one update"):
        fedavg([])
    with pytest.raises(ValueError, match="needs at least one update"):
        StreamingFedAvg().result()


@pytest.mark.parametrize("weight", [0, -1.0, math.nan, math.inf, True, "3"])
def test_bad_weights_are_refused_naming_the_update(weight):
    updates = [({"w": torch.ones(2)}, 1), ({"w": torch.ones(2)}, weight)]

    with pytest.raises(ValueError, match="update #1: weight"):
        fedavg(updates)


@pytest.mark.parametrize(
    ("second", "message"),
    [
        ({"w": torch.ones(2, 3)}, "tensor 'b': missing"),
        (
            {"w": torch.ones(2, 3), "b": torch.ones(3), "extra": torch.ones(1)},
            "'extra': unexpected",
        ),
        ({"w": torch.ones(3, 2), "b": torch.ones(3)}, "'w': shape (3, 2), expected (2, 3)"),
        (
            {"w": torch.ones(2, 3, dtype=torch.float64), "b": torch.ones(3)},
            "'w': dtype float64, expected float32",
        ),
    ],
)
def test_mismatching_updates_are_refused_naming_index_and_tensor(second, message):
    first = {"w": torch.ones(2, 3), "b": torch.ones(3)}

    with pytest.raises(IncompatibleStateDict) as excinfo:
        fedavg([(first, 1), (first, 1), (second, 1)])

    assert "update #2 does not match update #0" in str(excinfo.value)
    assert message in str(excinfo.value)


def test_non_finite_update_is_refused_and_leaves_the_mean_unchanged():
    aggregator = StreamingFedAvg()
    aggregator.add({"w": torch.tensor([1.0, 2.0])}, 1)

    with pytest.raises(ValueError, match="update #1: tensor 'w' holds NaN or Inf"):
        aggregator.add({"w": torch.tensor([1.0, math.nan])}, 1)
    with pytest.raises(IncompatibleStateDict):
        aggregator.add({"w": torch.ones(3)}, 1)
    aggregator.add({"w": torch.tensor([3.0, 4.0])}, 1)

    assert aggregator.count == 2
    assert torch.equal(aggregator.result()["w"], torch.tensor([2.0, 3.0]))


def test_item_must_be_a_pair():
    with pytest.raises(ValueError, match="update #0: expected a \\(state_dict, weight\\) pair"):
        fedavg([{"w": torch.ones(1)}])


# ------------------------------------------------------------------------------------------
# Memory: the number of updates must not matter.

ROWS, COLS = 512, 1024  # float32: 2 MiB per update for "w"
MODEL_BYTES = ROWS * COLS * 4 + COLS * 4 + 8


def lazy_updates(count: int) -> Iterator[tuple[dict[str, torch.Tensor], int]]:
    """Yield updates whose tensors view numpy arrays, so tracemalloc sees every live update."""
    rng = np.random.default_rng(0)
    for index in range(count):
        state = {
            "w": torch.from_numpy(rng.standard_normal((ROWS, COLS), dtype=np.float32)),
            "b": torch.from_numpy(rng.standard_normal(COLS, dtype=np.float32)),
            "num_batches_tracked": torch.from_numpy(np.array(index, dtype=np.int64)),
        }
        yield state, index + 1


def peak_traced_bytes(count: int) -> int:
    tracemalloc.start()
    try:
        result = fedavg(lazy_updates(count))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result["num_batches_tracked"].item() == count - 1
    return peak


def test_memory_is_flat_in_the_number_of_updates():
    peak_5 = peak_traced_bytes(5)
    peak_50 = peak_traced_bytes(50)

    # Sanity: the traced peak does see at least one live update.
    assert peak_5 >= MODEL_BYTES
    # Keeping the 45 extra updates alive would add ~45 model sizes; streaming adds none.
    assert peak_50 - peak_5 < 1.5 * MODEL_BYTES
