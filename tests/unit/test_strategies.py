"""Tests for fedcore.aggregation strategies: registry, server optimisers, robust rules, flags."""

from __future__ import annotations

import importlib.util
import math
import sys
import time
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from fedcore.aggregation import (
    STRATEGIES,
    ClientUpdate,
    FedAdam,
    FedAvgM,
    Krum,
    Median,
    MultiKrum,
    QFedAvg,
    TrimmedMean,
    fedavg,
    krum_scores,
    make_strategy,
)
from fedcore.aggregation_params import check_strategy_spec
from fedcore.tensors import IncompatibleStateDict, decode_state_dict, encode_state_dict

ROOT = Path(__file__).resolve().parents[2]
REQUIRED = {"norm_bound": {"norm_bound": 100.0}, "qfedavg": {"lipschitz": 10.0}}


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors: one intra-op thread is fastest and immune to a busy CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def spec_of(name: str, **params) -> dict:
    """A valid spec for every strategy: required parameters filled in."""
    return {"strategy": name, **REQUIRED.get(name, {}), **params}


def vec(*values: float) -> dict[str, torch.Tensor]:
    """A one-tensor state dict."""
    return {"w": torch.tensor(values, dtype=torch.float32)}


def with_loss(updates, loss: float = 0.5):
    """Wrap (state, weight) pairs as ClientUpdates carrying a loss (for q-FedAvg)."""
    return [ClientUpdate(state, weight, loss=loss) for state, weight in updates]


def random_updates(n: int, seed: int = 0, shape=(6, 4)) -> list[tuple[dict, float]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            {
                "w": torch.randn(*shape, generator=generator),
                "b": torch.randn(shape[1], generator=generator),
                "num_batches_tracked": torch.tensor(i * 3 % 7, dtype=torch.int64),
            },
            float(i + 1),
        )
        for i in range(n)
    ]


# --- registry ------------------------------------------------------------------------------------


def test_registry_names_every_strategy():
    assert set(STRATEGIES) == {
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
    }


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_spec_round_trips_with_defaults_spelled_out(name):
    strategy = make_strategy(spec_of(name))

    spec = strategy.spec()

    assert spec["strategy"] == name
    assert set(spec) == {"strategy", *type(strategy).SPEC_PARAMS}
    assert make_strategy(spec).spec() == spec


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_the_torch_free_check_gives_the_parameters_the_strategy_is_built_with(name):
    built = make_strategy(spec_of(name)).spec()

    checked = check_strategy_spec(spec_of(name))

    assert checked == (name, {key: value for key, value in built.items() if key != "strategy"})


def test_missing_strategy_name_means_fedavg():
    assert make_strategy({}).name == "fedavg"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"strategy": "fedsgd"}, "unknown strategy 'fedsgd'; allowed: fedavg, fedavgm, fedadam"),
        ({"strategy": "krum", "beta": 0.1}, "krum: unknown parameter 'beta'; allowed: f, memory"),
        ({"strategy": "median", "spill_dir": "/tmp"}, "median: unknown parameter 'spill_dir'"),
        ({"strategy": "trimmed_mean", "beta": 0.5}, r"beta must be a finite number in \[0, 0.5\)"),
        ({"strategy": "krum", "f": -1}, "krum: f must be an integer >= 0, got -1"),
        ({"strategy": "krum", "f": 1.5}, "krum: f must be an integer >= 0"),
        ({"strategy": "multi_krum", "m": 0}, "multi_krum: m must be an integer >= 1"),
        ({"strategy": "fedadam", "beta2": 1.0}, r"fedadam: beta2 must be a finite number in \[0"),
        ({"strategy": "fedyogi", "tau": 0}, "fedyogi: tau must be a finite number > 0"),
        ({"strategy": "fedavgm", "momentum": True}, "fedavgm: momentum must be a finite number"),
        (
            {"strategy": "fedavg", "norm_bound": -1},
            "fedavg: norm_bound must be a finite number > 0",
        ),
        ({"strategy": "median", "memory_budget_bytes": 0}, "memory_budget_bytes must be an int"),
        ({"strategy": "norm_bound"}, "parameter 'norm_bound' is required"),
        ({"strategy": "qfedavg"}, "parameter 'lipschitz' is required; Li et al. use L = 1 /"),
        ({"strategy": "qfedavg", "lipschitz": 10, "q": -1}, "qfedavg: q must be a finite number"),
    ],
)
def test_bad_specs_are_refused_with_clear_messages(spec, message):
    with pytest.raises(ValueError, match=message) as built:
        make_strategy(spec)
    # The plan language checks without building (no torch): the same refusal, word for word.
    with pytest.raises(ValueError) as checked:
        check_strategy_spec(spec)
    assert str(checked.value) == str(built.value)


def test_spec_must_be_a_mapping():
    with pytest.raises(ValueError, match="aggregation spec must be an object"):
        make_strategy("median")  # type: ignore[arg-type]


# --- shared behaviour ----------------------------------------------------------------------------


def test_fedavg_strategy_equals_fedavg_bit_for_bit():
    updates = random_updates(5)
    global_state = random_updates(1, seed=9)[0][0]

    result = make_strategy({"strategy": "fedavg"}).aggregate(global_state, updates, round=1)

    expected = fedavg(updates)
    assert list(result.state) == list(global_state)
    assert all(torch.equal(result.state[k], expected[k]) for k in expected)
    assert result.stats["updates"] == result.stats["aggregated"] == 5
    assert result.stats["total_weight"] == 15.0


@pytest.mark.parametrize("name", ["fedavg", "norm_bound", "median", "trimmed_mean", "multi_krum"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_identical_updates_are_returned_exactly(name, dtype):
    generator = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(5, 3, generator=generator).to(dtype), "n": torch.tensor(4)}
    global_state = {"w": torch.zeros(5, 3, dtype=dtype), "n": torch.tensor(0)}
    strategy = make_strategy(spec_of(name, **({"f": 1} if "krum" in name else {})))

    result = strategy.aggregate(global_state, [(state, w) for w in (1, 5, 17, 3, 2)], round=1)

    assert result.state["w"].dtype == dtype
    assert torch.equal(result.state["w"], state["w"])
    assert torch.equal(result.state["n"], state["n"])
    assert result.flags == []


@pytest.mark.parametrize("name", sorted(set(STRATEGIES) - {"krum", "multi_krum"}))
def test_integer_buffers_take_the_maximum_never_the_mean(name):
    # (Krum takes them from the selected updates: see test_krum_matches_a_brute_force_reference.)
    global_state = {"w": torch.zeros(2), "count": torch.tensor(0), "mask": torch.tensor([0, 0])}
    updates = [
        ({"w": torch.tensor([1.0, 1.0]), "count": torch.tensor(c), "mask": torch.tensor(m)}, 1.0)
        for c, m in [(3, [0, 1]), (9, [0, 0]), (5, [2, 0]), (4, [0, 0]), (6, [1, 1])]
    ]
    strategy = make_strategy(spec_of(name))

    result = strategy.aggregate(global_state, with_loss(updates), round=1)

    assert result.state["count"].dtype == torch.int64
    assert result.state["count"].item() == 9
    assert result.state["mask"].tolist() == [2, 1]


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_updates_are_validated_and_named_by_index(name):
    strategy = make_strategy(spec_of(name))
    global_state = vec(0.0, 0.0)
    good = ClientUpdate(vec(1.0, 2.0), 1.0, loss=0.5)

    with pytest.raises(IncompatibleStateDict, match=r"update #1 does not match the global model"):
        strategy.aggregate(global_state, [good, (vec(1.0, 2.0, 3.0), 1.0)], round=1)
    with pytest.raises(ValueError, match=r"update #1: tensor 'w' holds NaN or Inf"):
        strategy.aggregate(global_state, [good, (vec(math.nan, 0.0), 1.0)], round=2)
    with pytest.raises(ValueError, match=r"update #0 \(client 'a'\): weight 0 must be finite"):
        strategy.aggregate(global_state, [ClientUpdate(vec(1.0, 2.0), 0, client_id="a")], round=3)
    with pytest.raises(ValueError, match="needs at least one update; the iterable was empty"):
        strategy.aggregate(global_state, iter([]), round=4)
    with pytest.raises(ValueError, match="round must be an integer >= 0"):
        strategy.aggregate(global_state, [good], round=-1)
    with pytest.raises(ValueError, match="expected a .state_dict, weight. pair or a ClientUpdate"):
        strategy.aggregate(global_state, [vec(1.0, 2.0)], round=5)


class _State(dict):
    """A dict that can be weakly referenced, to watch which updates stay alive."""


def watched_updates(count: int, alive: list[int]) -> Iterator[tuple[_State, float]]:
    """Yield updates; before each, record how many earlier ones are still referenced."""
    refs: list[weakref.ref] = []
    for index in range(count):
        alive.append(sum(ref() is not None for ref in refs))
        state = _State(w=torch.full((3,), float(index)), n=torch.tensor(index))
        refs.append(weakref.ref(state))
        yield state, 1.0
        del state


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_no_strategy_keeps_earlier_updates_alive(name):
    alive: list[int] = []
    strategy = make_strategy(spec_of(name))
    updates = (ClientUpdate(s, w, loss=0.5) for s, w in watched_updates(12, alive))

    strategy.aggregate({"w": torch.zeros(3), "n": torch.tensor(0)}, updates, round=1)

    # The update being processed may still be referenced while the next one is built; never more.
    assert max(alive) <= 1


# --- robust rules -------------------------------------------------------------------------------


def test_median_by_hand_odd_and_even_counts_ignoring_weights():
    g = vec(0.0, 0.0, 0.0)
    odd = [(vec(1, 10, -5), 1), (vec(2, -20, 0), 100), (vec(300, 30, 5), 1)]
    even = [*odd, (vec(4, 40, 7), 1)]

    result_odd = Median().aggregate(g, odd, round=1)
    result_even = Median().aggregate(g, even, round=1)

    assert result_odd.state["w"].tolist() == [2.0, 10.0, 0.0]
    # sorted columns: (1, 2, 4, 300), (-20, 10, 30, 40), (-5, 0, 5, 7) -> means of the middle two
    assert result_even.state["w"].tolist() == [3.0, 20.0, 2.5]


def test_trimmed_mean_by_hand():
    g = vec(0.0, 0.0)
    updates = [(vec(v, -v), 1) for v in (1.0, 2.0, 3.0, 4.0, 100.0)]

    trimmed = TrimmedMean(beta=0.2).aggregate(g, updates, round=1)  # floor(0.2 * 5) = 1 per side
    plain = TrimmedMean(beta=0.0).aggregate(g, updates, round=1)
    little = TrimmedMean(beta=0.19).aggregate(g, updates, round=1)  # floor(0.95) = 0

    assert trimmed.state["w"].tolist() == [3.0, -3.0]  # mean of 2, 3, 4
    assert trimmed.stats["trimmed_per_side"] == 1
    assert plain.state["w"].tolist() == [22.0, -22.0]
    assert little.stats["trimmed_per_side"] == 0


def test_krum_scores_by_hand():
    # 1-D points 0, 1, 3, 10, 11 with f = 1: each sums its n - f - 2 = 2 nearest squared distances.
    points = np.array([0.0, 1.0, 3.0, 10.0, 11.0])
    distances = (points[:, None] - points[None, :]) ** 2

    scores = krum_scores(distances, f=1)

    # 0: 1 + 9; 1: 1 + 4; 3: 4 + 9; 10: 1 + 49; 11: 1 + 64
    assert scores.tolist() == [10.0, 5.0, 13.0, 50.0, 65.0]


def test_krum_matches_a_brute_force_reference():
    updates = random_updates(9, seed=3)
    global_state = random_updates(1, seed=4)[0][0]
    flat = [torch.cat([s["b"], s["w"].reshape(-1)]).double().numpy() for s, _ in updates]
    reference = []
    for i, a in enumerate(flat):
        dists = sorted(float(((a - b) ** 2).sum()) for j, b in enumerate(flat) if j != i)
        reference.append(sum(dists[: 9 - 2 - 2]))

    result = Krum(f=2).aggregate(global_state, updates, round=1)

    np.testing.assert_allclose(result.stats["krum_scores"], reference, rtol=1e-9)
    best = int(np.argmin(reference))
    assert result.stats["selected"] == [best]
    assert torch.equal(result.state["w"], updates[best][0]["w"])
    assert result.state["num_batches_tracked"] == updates[best][0]["num_batches_tracked"]


def test_krum_picks_the_honest_cluster():
    generator = torch.Generator().manual_seed(0)
    honest = [torch.ones(20) + 0.01 * torch.randn(20, generator=generator) for _ in range(7)]
    byzantine = [torch.full((20,), -10.0), torch.full((20,), -10.5), torch.full((20,), 50.0)]
    updates = [({"w": w}, 1.0) for w in honest + byzantine]
    g = {"w": torch.zeros(20)}

    krum = Krum(f=3).aggregate(g, updates, round=1)
    multi = MultiKrum(f=3).aggregate(g, updates, round=1)

    assert krum.stats["selected"][0] in range(7)
    assert multi.stats["selected"] == list(range(7))  # m = n - f = 7: exactly the honest ones
    torch.testing.assert_close(multi.state["w"], torch.stack(honest).mean(0))


def test_multi_krum_m_and_the_2f_plus_3_requirement():
    updates = [(vec(v), 1.0) for v in (0.0, 1.0, 2.0, 3.0, 40.0)]

    two = MultiKrum(f=1, m=2).aggregate(vec(0.0), updates, round=1)
    every = MultiKrum(f=0, m=99).aggregate(vec(0.0), updates, round=1)

    assert two.stats["selected"] == [1, 2] and two.state["w"].item() == 1.5
    assert every.state["w"].item() == pytest.approx(9.2)
    with pytest.raises(
        ValueError, match=r"krum with f=2 needs at least 2f \+ 3 = 7 updates, got 5"
    ):
        Krum(f=2).aggregate(vec(0.0), updates, round=1)


@pytest.mark.parametrize(
    "spec",
    [
        {"strategy": "median"},
        {"strategy": "trimmed_mean", "beta": 0.2},
        {"strategy": "krum", "f": 2},
        {"strategy": "multi_krum", "f": 2},
    ],
)
def test_memmap_spill_gives_the_in_ram_result(spec, tmp_path):
    updates = random_updates(11, seed=5, shape=(37, 5))
    global_state = random_updates(1, seed=6, shape=(37, 5))[0][0]
    in_ram = make_strategy(spec).aggregate(global_state, updates, round=1)
    # A row is 190 float32 (760 bytes): 2000 bytes keep 2 rows in RAM, the third spills them all,
    # and chunks are 2000 // (11 rows * 24 bytes) = 7 columns wide (28 chunks, the last of 1).
    tiny = make_strategy({**spec, "memory_budget_bytes": 2000}, spill_dir=tmp_path)

    spilled = tiny.aggregate(global_state, updates, round=1)

    assert in_ram.stats["spilled_to_disk"] is False
    assert spilled.stats["spilled_to_disk"] is True
    assert all(torch.equal(spilled.state[k], in_ram.state[k]) for k in in_ram.state)
    assert spilled.stats.get("selected") == in_ram.stats.get("selected")
    assert list(tmp_path.iterdir()) == []  # the spill directory is removed


ROBUST_SPECS = [
    {"strategy": "median"},
    {"strategy": "trimmed_mean", "beta": 0.2},
    {"strategy": "krum", "f": 2},
    {"strategy": "multi_krum", "f": 2},
]


# 48,000 weights: several column blocks per tensor (Gram blocks are 8192 wide, order-statistic
# blocks 35,746 for 11 rows); a row is 192 KB: a 500 KB budget keeps two rows, then spills.
BIG = (8000, 6)


@pytest.mark.parametrize("spec", ROBUST_SPECS)
@pytest.mark.parametrize("budget", [None, 500_000])
def test_rows_read_in_place_and_rows_copied_give_the_same_result(spec, budget, tmp_path):
    # Contiguous float32 tensors are read where they are (adopted); a transposed view must be
    # copied into a row. Mixing both kinds, in RAM or spilling part-way, changes nothing.
    updates = random_updates(11, seed=7, shape=BIG)
    global_state = random_updates(1, seed=8, shape=BIG)[0][0]
    mixed = [
        ({**state, "w": state["w"].T.contiguous().T} if index % 3 == 0 else state, weight)
        for index, (state, weight) in enumerate(updates)
    ]
    assert not mixed[0][0]["w"].is_contiguous() and mixed[1][0]["w"].is_contiguous()
    params = spec if budget is None else {**spec, "memory_budget_bytes": budget}

    adopted = make_strategy(params, spill_dir=tmp_path).aggregate(global_state, updates, round=1)
    both = make_strategy(params, spill_dir=tmp_path).aggregate(global_state, mixed, round=1)

    assert all(torch.equal(both.state[k], adopted.state[k]) for k in adopted.state)
    assert both.stats.get("selected") == adopted.stats.get("selected")
    assert adopted.stats["spilled_to_disk"] is (budget is not None)
    # Delta norms agree whichever pass measured them (copy, read-only pass, Gram diagonal).
    fedavg = make_strategy({"strategy": "fedavg"}).aggregate(global_state, updates, round=1)
    np.testing.assert_allclose(both.stats["delta_norms"], fedavg.stats["delta_norms"], rtol=1e-6)
    np.testing.assert_allclose(adopted.stats["delta_norms"], fedavg.stats["delta_norms"], rtol=1e-6)


@pytest.mark.parametrize("spec", ROBUST_SPECS)
@pytest.mark.parametrize("budget", [None, 500_000])
def test_a_non_finite_update_is_refused_by_name_in_ram_or_spilled(spec, budget, tmp_path):
    updates = random_updates(11, seed=9, shape=BIG)
    bad = dict(updates[1][0])
    bad["w"] = bad["w"].clone()
    bad["w"][7000, 2] = math.inf  # in the second tensor (after "b"), in a later column block
    updates[1] = (bad, 1.0)
    global_state = random_updates(1, seed=10, shape=BIG)[0][0]
    params = spec if budget is None else {**spec, "memory_budget_bytes": budget}

    with pytest.raises(ValueError, match=r"update #1: tensor 'w' holds NaN or Inf"):
        make_strategy(params, spill_dir=tmp_path).aggregate(global_state, updates, round=1)
    assert list(tmp_path.iterdir()) == []


# --- norm bound and flags -----------------------------------------------------------------------


def test_norm_bound_drops_and_flags_large_updates():
    g = vec(0.0, 0.0)
    updates = [
        ClientUpdate(vec(3.0, 4.0), 1.0, client_id="a"),  # norm 5
        ClientUpdate(vec(30.0, 40.0), 1.0, client_id="b"),  # norm 50: dropped
        ClientUpdate(vec(1.0, 0.0), 3.0, client_id="c"),  # norm 1
    ]

    result = make_strategy({"strategy": "norm_bound", "norm_bound": 10}).aggregate(
        g, updates, round=7
    )

    assert result.state["w"].tolist() == [1.5, 1.0]  # (1 * (3, 4) + 3 * (1, 0)) / 4
    assert result.stats["updates"] == 3 and result.stats["aggregated"] == 2
    assert result.stats["total_weight"] == 4.0
    # Its norm is also far from the median (z = 0.6745 * 45 / 4): both flags, sorted by kind.
    assert [(f["client"], f["kind"]) for f in result.flags] == [
        ("b", "norm_bound"),
        ("b", "norm_outlier"),
    ]
    flag = result.flags[0]
    assert flag["index"] == 1 and flag["round"] == 7
    assert flag["norm"] == 50.0 and flag["score"] == 5.0
    assert "exceeds the bound 10" in flag["reason"]


def test_norm_bound_composes_with_any_strategy_and_refuses_an_empty_round():
    updates = [(vec(v), 1.0) for v in (1.0, 2.0, 3.0, 1000.0)]

    median = make_strategy({"strategy": "median", "norm_bound": 10}).aggregate(
        vec(0.0), updates, round=1
    )

    assert median.state["w"].item() == 2.0
    with pytest.raises(ValueError, match="all 4 updates exceed the norm bound 0.5"):
        make_strategy({"strategy": "fedavg", "norm_bound": 0.5}).aggregate(
            vec(0.0), updates, round=1
        )


def test_norm_outliers_are_flagged_with_a_robust_z_score():
    norms = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02, 0.98, 10.0, 0.0]
    updates = [ClientUpdate(vec(n, 0.0), 1.0, client_id=f"silo{i}") for i, n in enumerate(norms)]

    result = make_strategy({"strategy": "median"}).aggregate(vec(0.0, 0.0), updates, round=3)

    # median 1.0; |deviations| sorted: 0, 0, .02, .02, .05, .05, .1, .1, 1, 9 -> MAD .05, which is
    # below the floor 0.1 * median: scale 0.1. z = (10 - 1) / 0.1 = 90 and (0 - 1) / 0.1 = -10.
    assert [(f["client"], f["kind"]) for f in result.flags] == [
        ("silo8", "norm_outlier"),
        ("silo9", "norm_outlier"),
    ]
    high, low = result.flags
    assert high["index"] == 8 and high["norm"] == pytest.approx(10.0)
    assert high["score"] == pytest.approx(90.0) and low["score"] == pytest.approx(-10.0)
    assert "far above the round's median 1" in high["reason"]
    assert "far below" in low["reason"]
    assert result.stats["delta_norms"] == pytest.approx(norms)
    assert result.stats["delta_norm_median"] == pytest.approx(1.0)


def test_flag_threshold_and_small_rounds():
    updates = [(vec(n), 1.0) for n in (1.0, 1.0, 1.0, 1.0, 3.0)]

    default = make_strategy({"strategy": "fedavg"}).aggregate(vec(0.0), updates, round=1)
    lax = make_strategy({"strategy": "fedavg", "flag_threshold": 50}).aggregate(
        vec(0.0), updates, round=1
    )
    two = make_strategy({"strategy": "fedavg"}).aggregate(vec(0.0), updates[3:], round=1)

    # MAD 0 -> 1.2533 * mean absolute deviation (0.4) = 0.501; z = 2 / 0.501 = 3.99
    assert [f["index"] for f in default.flags] == [4]
    assert default.flags[0]["score"] == pytest.approx(2 / (1.253314 * 0.4), rel=1e-6)
    assert lax.flags == [] and two.flags == []


# --- server optimisers --------------------------------------------------------------------------


ROUND_UPDATES = [
    [(vec(1.0, -2.0, 0.5), 1.0), (vec(3.0, 0.0, 0.5), 3.0)],
    [(vec(0.0, 1.0, 0.75), 2.0), (vec(4.0, 1.0, 0.25), 2.0)],
]


def reddi_reference(kind: str, eta=0.1, beta1=0.9, beta2=0.99, tau=1e-3) -> list[np.ndarray]:
    """Algorithm 2 of Reddi et al. (2021) in float64 numpy, over ROUND_UPDATES from x = 0."""
    x = np.zeros(3)
    m, v = np.zeros(3), np.full(3, tau**2)
    models = []
    for updates in ROUND_UPDATES:
        weights = np.array([w for _, w in updates])
        states = np.array([s["w"].double().numpy() for s, _ in updates])
        delta = (weights[:, None] * (states - x)).sum(0) / weights.sum()
        m = beta1 * m + (1 - beta1) * delta
        if kind == "fedadagrad":
            v = v + delta**2
        elif kind == "fedyogi":
            v = v - (1 - beta2) * delta**2 * np.sign(v - delta**2)
        else:
            v = beta2 * v + (1 - beta2) * delta**2
        x = x + eta * m / (np.sqrt(v) + tau)
        models.append(x.copy())
    return models


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_server_optimisers_follow_reddi_et_al_for_two_rounds(kind):
    strategy = make_strategy({"strategy": kind, "server_lr": 0.1})
    expected = reddi_reference(kind)
    state = vec(0.0, 0.0, 0.0)

    for rnd, updates in enumerate(ROUND_UPDATES, start=1):
        state = strategy.aggregate(state, updates, round=rnd).state
        np.testing.assert_allclose(state["w"].double().numpy(), expected[rnd - 1], rtol=1e-5)


def test_fedavgm_follows_heavy_ball_momentum_for_two_rounds():
    strategy = FedAvgM(server_lr=0.5, momentum=0.9)
    # round 1: Δ = (1*(1,-2,.5) + 3*(3,0,.5)) / 4 = (2.5, -.5, .5); v = Δ; x = .5 v
    first = strategy.aggregate(vec(0.0, 0.0, 0.0), ROUND_UPDATES[0], round=1).state
    # round 2 from x = (1.25, -.25, .25): mean (2, 1, .5), Δ = (.75, 1.25, .25);
    # v = .9 * (2.5, -.5, .5) + Δ = (3, .8, .7); x = x + .5 v = (2.75, .15, .6)
    second = strategy.aggregate(first, ROUND_UPDATES[1], round=2).state

    torch.testing.assert_close(first["w"], torch.tensor([1.25, -0.25, 0.25]))
    torch.testing.assert_close(second["w"], torch.tensor([2.75, 0.15, 0.6]))


def test_fedavgm_without_momentum_is_fedavg():
    updates = random_updates(4)
    global_state = random_updates(1, seed=8)[0][0]

    result = FedAvgM(server_lr=1.0, momentum=0.0).aggregate(global_state, updates, round=1)

    expected = fedavg(updates)
    for name in expected:
        torch.testing.assert_close(result.state[name], expected[name])


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_server_state_survives_export_and_import(name):
    persisted = make_strategy({"strategy": name})
    kept = make_strategy({"strategy": name})
    assert persisted.state_dict() == {}
    state = vec(0.0, 0.0, 0.0)
    first = kept.aggregate(state, ROUND_UPDATES[0], round=1).state
    persisted.aggregate(state, ROUND_UPDATES[0], round=1)
    blob = encode_state_dict(persisted.state_dict())  # what the server stores with round 1

    restored = make_strategy({"strategy": name})
    restored.load_state_dict(decode_state_dict(blob))
    second = restored.aggregate(first, ROUND_UPDATES[1], round=2).state

    assert torch.equal(second["w"], kept.aggregate(first, ROUND_UPDATES[1], round=2).state["w"])
    assert restored.state_dict()["round"].item() == 2


def test_server_optimiser_refuses_to_step_twice_and_failures_leave_state_alone():
    strategy = FedAdam()
    strategy.aggregate(vec(0.0, 0.0, 0.0), ROUND_UPDATES[0], round=1)
    saved = strategy.state_dict()

    with pytest.raises(ValueError, match="already aggregated round 1; to redo round 1, load"):
        strategy.aggregate(vec(0.0, 0.0, 0.0), ROUND_UPDATES[0], round=1)
    with pytest.raises(ValueError, match="holds NaN"):
        strategy.aggregate(vec(0.0, 0.0, 0.0), [(vec(math.nan, 0.0, 0.0), 1.0)], round=2)

    after = strategy.state_dict()
    assert after.keys() == saved.keys()
    assert all(torch.equal(after[k], saved[k]) for k in saved)


def test_server_state_from_another_model_or_strategy_is_refused():
    adam = FedAdam()
    adam.aggregate(vec(0.0, 0.0, 0.0), ROUND_UPDATES[0], round=1)
    momentum = FedAvgM()

    with pytest.raises(ValueError, match="unexpected optimiser state key 'm.w'"):
        momentum.load_state_dict(adam.state_dict())
    with pytest.raises(ValueError, match="fedadam keeps no state|median keeps no state"):
        Median().load_state_dict(adam.state_dict())
    fresh = FedAdam()
    fresh.load_state_dict(adam.state_dict())
    with pytest.raises(ValueError, match=r"optimiser state m.w has shape \(3,\), the model \(2,\)"):
        fresh.aggregate(vec(0.0, 0.0), [(vec(1.0, 1.0), 1.0)], round=2)


def test_server_optimisers_leave_a_converged_model_alone():
    state = random_updates(1)[0][0]
    for name in ("fedavgm", "fedadam", "fedyogi", "fedadagrad"):
        result = make_strategy({"strategy": name}).aggregate(state, [(state, 2.0)] * 3, round=1)
        assert all(torch.equal(result.state[k], state[k]) for k in state)


# --- q-FedAvg -----------------------------------------------------------------------------------


def test_qfedavg_by_hand():
    # L = 10, q = 1. Client a: w = (1, 0), loss .5; client b: w = (0, 2), loss 2. Global 0.
    # Δw_a = L (0 - w_a) = (-10, 0), |Δw_a|² = 100; Δ_a = .5 (-10, 0); h_a = 100 + 10 * .5 = 105
    # Δw_b = (0, -20), |Δw_b|² = 400; Δ_b = 2 (0, -20); h_b = 400 + 10 * 2 = 420
    # weights 1 and 1: w' = -(Δ_a + Δ_b) / (h_a + h_b) = (5, 40) / 525
    updates = [
        ClientUpdate(vec(1.0, 0.0), 1.0, client_id="a", loss=0.5),
        ClientUpdate(vec(0.0, 2.0), 1.0, client_id="b", loss=2.0),
    ]

    result = QFedAvg(q=1.0, lipschitz=10.0).aggregate(vec(0.0, 0.0), updates, round=1)

    torch.testing.assert_close(result.state["w"], torch.tensor([5 / 525, 40 / 525]))
    assert result.stats["losses"] == [0.5, 2.0]


def test_qfedavg_with_q_zero_is_the_weighted_mean():
    updates = random_updates(4)
    global_state = random_updates(1, seed=8)[0][0]

    result = QFedAvg(q=0.0, lipschitz=100.0).aggregate(
        global_state, with_loss(updates, loss=0.3), round=1
    )

    expected = fedavg(updates)
    for name in expected:
        torch.testing.assert_close(result.state[name], expected[name])


def test_qfedavg_leans_towards_the_worse_off_site_as_q_grows():
    # Site a (loss .2) pulls along x, site b (loss 1, worse off) along y. The step's components
    # are in the ratio F_b^q : F_a^q = 5^q.
    updates = [
        ClientUpdate(vec(1.0, 0.0), 1.0, loss=0.2),
        ClientUpdate(vec(0.0, 1.0), 1.0, loss=1.0),
    ]

    steps = [
        QFedAvg(q=q, lipschitz=1.0).aggregate(vec(0.0, 0.0), updates, round=1).state["w"]
        for q in (0.0, 1.0, 2.0)
    ]

    ratios = [float(step[1] / step[0]) for step in steps]
    assert ratios == pytest.approx([1.0, 5.0, 25.0], rel=1e-5)
    torch.testing.assert_close(steps[0], torch.tensor([0.5, 0.5]))  # q = 0: the mean


def test_qfedavg_needs_each_sites_loss():
    with pytest.raises(ValueError, match=r"update #1 \(client 1\): qfedavg needs the site's loss"):
        QFedAvg(lipschitz=10.0).aggregate(
            vec(0.0), [ClientUpdate(vec(1.0), 1.0, loss=0.1), (vec(2.0), 1.0)], round=1
        )


# --- the bar: poisoning ---------------------------------------------------------------------------


def load_bench():
    spec = importlib.util.spec_from_file_location("poisoning", ROOT / "bench" / "poisoning.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def test_the_poisoning_bench_without_attack_is_the_fedavg_simulation():
    bench = load_bench()
    spec = importlib.util.spec_from_file_location("fedavg_sim", ROOT / "bench" / "fedavg_sim.py")
    fedavg_sim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fedavg_sim)
    scenario = bench.SCENARIOS["healthcare"](0)
    plan = {**scenario.plan, "training": {**scenario.plan["training"], "rounds": 2}}
    prepared = bench.iid_silos(bench.baselines.prepare(scenario), 10, seed=0)

    ours, flags = bench.simulate(plan, prepared, {"strategy": "fedavg"}, scale=None)
    reference, _, _ = fedavg_sim.simulate(plan, prepared)

    assert [len(data.y) for data in prepared.train.values()] == [734] * 4 + [733] * 6
    assert all(torch.equal(ours[k], reference[k]) for k in reference)
    assert flags == [[], []]


def test_robust_rules_resist_two_poisoned_silos_of_ten_and_fedavg_does_not():
    bench = load_bench()
    start = time.perf_counter()

    outcomes = bench.run(
        scenario="healthcare",
        seed=0,
        rounds=10,
        local_epochs=1,
        strategies=["fedavg", "median", "trimmed_mean", "krum"],
        attacks=["none", "scaled", "sign-flip"],
    )

    clean = bench.clean_accuracy(outcomes, seed=0)
    by_key = {(o.strategy, o.attack): o for o in outcomes}
    assert clean > 0.85  # the clean federation learns (26% positives: 0.74 is the trivial rate)
    for name in ("median", "trimmed_mean", "krum"):
        for attack in ("scaled", "sign-flip"):
            assert clean - by_key[name, attack].accuracy <= 0.02, (name, attack)
    assert clean - by_key["fedavg", "scaled"].accuracy > 0.2
    # The scaled attackers' updates are flagged every round, and no honest one ever is.
    assert by_key["median", "scaled"].flagged_attackers == 20
    assert sum(o.flagged_honest for o in outcomes) == 0
    assert time.perf_counter() - start < 60
