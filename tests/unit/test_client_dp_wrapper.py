"""Client-level DP as a wrapper: the noised mean feeds the plan's server strategy."""

from __future__ import annotations

import pytest
import torch

from fedcore.aggregation import ClientUpdate, make_strategy
from fedcore.plan import CLIENT_DP_STRATEGIES, plan_errors
from fedcore.privacy.client_dp import DPFedAvg, NoiseSource
from fedcore.privacy.wrapper import ClientDPStrategy
from tests.factories import plan_spec

KEY = bytes(range(32))  # tests only: a known key makes the noise reproducible


def states() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    generator = torch.Generator().manual_seed(3)
    global_state = {"w": torch.randn(4, 3, generator=generator), "b": torch.zeros(3)}
    updates = [
        {
            name: value + 0.3 * torch.randn(value.shape, generator=generator)
            for name, value in global_state.items()
        }  # fmt: skip
        for _ in range(4)
    ]
    return global_state, updates


def dp_round(strategy: str, rounds: int = 2) -> dict[str, torch.Tensor]:
    """``rounds`` rounds of the strategy wrapped in client DP, noise from the test key."""
    global_state, updates = states()
    wrapped = ClientDPStrategy(
        make_strategy({"strategy": strategy}),
        clip=0.5,
        noise_multiplier=1.0,
        source=NoiseSource(KEY),
    )
    for number in range(1, rounds + 1):
        done = wrapped.aggregate(global_state, updates, round=number, num_clients_expected=5)
        global_state = done.result.state
    return global_state


def test_fedadam_with_client_dp_is_not_fedavg_with_client_dp() -> None:
    adam, avg = dp_round("fedadam"), dp_round("fedavg")

    assert not torch.allclose(adam["w"], avg["w"])


def test_fedadam_with_client_dp_is_fedadam_applied_to_the_dp_mean() -> None:
    global_state, updates = states()
    source = NoiseSource(KEY)  # the same noise the wrapper draws
    expected_state = dict(global_state)
    adam = make_strategy({"strategy": "fedadam"})
    for number in (1, 2):
        mean = DPFedAvg(clip=0.5, noise_multiplier=1.0, source=source)
        for update in updates:
            mean.add({name: update[name] - expected_state[name] for name in expected_state})
        delta = mean.result(num_clients_expected=5)
        dp_mean = {name: expected_state[name] + delta[name] for name in expected_state}
        expected_state = adam.aggregate(
            expected_state, [ClientUpdate(state=dp_mean, weight=1.0)], round=number
        ).state

    wrapped = dp_round("fedadam")

    for name in expected_state:
        assert torch.equal(wrapped[name], expected_state[name])


def test_the_wrapper_reports_what_the_ledger_records() -> None:
    global_state, updates = states()
    wrapped = ClientDPStrategy(
        make_strategy({"strategy": "fedyogi"}), clip=0.5, noise_multiplier=1.3, source=None
    )
    done = wrapped.aggregate(global_state, updates, round=1, num_clients_expected=4)

    assert done.info == {"noise_multiplier": 1.3, "clip": 0.5, "update_noise_multiplier": 1.3}


UNSOUND = {
    "median": {},
    "trimmed_mean": {},
    "krum": {},
    "multi_krum": {},
    "norm_bound": {"norm_bound": 1.0},
    "qfedavg": {"lipschitz": 10},
}


@pytest.mark.parametrize("name", UNSOUND)
def test_strategies_that_look_at_each_update_cannot_be_wrapped(name: str) -> None:
    strategy = make_strategy({"strategy": name, **UNSOUND[name]})
    with pytest.raises(ValueError, match="needs each silo's update"):
        ClientDPStrategy(strategy, clip=1.0, noise_multiplier=1.0)


CLIENT_DP = {"mode": "client", "noise_multiplier": 1.1}


@pytest.mark.parametrize("name", UNSOUND)
def test_the_plan_language_refuses_unsound_strategies_with_client_dp(name: str) -> None:
    aggregation = {"strategy": name, **UNSOUND[name]}
    errors = plan_errors(plan_spec(privacy=CLIENT_DP, aggregation=aggregation))

    assert set(errors) == {"aggregation.strategy"}
    assert (
        "client-level DP hands the strategy only the noised mean" in errors["aggregation.strategy"]
    )
    assert plan_errors(plan_spec(aggregation=aggregation)) == {}  # fine without DP


@pytest.mark.parametrize("name", CLIENT_DP_STRATEGIES)
def test_the_plan_language_accepts_mean_strategies_with_client_dp(name: str) -> None:
    assert plan_errors(plan_spec(privacy=CLIENT_DP, aggregation={"strategy": name})) == {}
