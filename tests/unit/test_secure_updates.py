"""The secure-aggregation vector layout (fedcore.secure_updates), its JSON transport
(fedcore.secagg.wire) and the plan's secagg section (fedcore.plan)."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch

from fedcore import secure_updates
from fedcore.plan import (
    SECAGG_DEFAULTS,
    plan_errors,
    secagg_settings,
    secagg_threshold,
)
from fedcore.secagg import ProtocolError
from fedcore.secagg import wire as secagg_wire
from tests.factories import plan_spec


def state(shift: float = 0.0) -> dict[str, torch.Tensor]:
    return {
        "b.weight": torch.arange(6, dtype=torch.float32).reshape(2, 3) / 10 + shift,
        "a.bias": torch.tensor([0.5, -0.5], dtype=torch.float64) + shift,
        "n": torch.tensor(3),
    }


def test_the_vector_is_the_sorted_floating_delta_then_the_weight() -> None:
    encoded = secure_updates.weighted_vector(
        state(0.25), state(), num_examples=500, clip=1.0, max_examples=1000
    )

    assert secure_updates.vector_length(state()) == 2 + 6 + 1
    assert encoded.vector.tolist() == pytest.approx([0.125] * 8 + [0.5])  # w = 0.5
    assert encoded.clipped == 0 and encoded.norm is None


def test_coordinates_are_clipped_and_counted_and_weights_capped() -> None:
    encoded = secure_updates.weighted_vector(
        state(3.0), state(), num_examples=5000, clip=2.0, max_examples=1000
    )

    assert encoded.clipped == 8
    assert encoded.vector.tolist() == pytest.approx([2.0] * 8 + [2.0])  # w capped at 1


def test_mean_state_inverts_the_encoding_and_keeps_integer_buffers() -> None:
    a = secure_updates.weighted_vector(
        state(0.3), state(), num_examples=100, clip=1.0, max_examples=1000
    )
    b = secure_updates.weighted_vector(
        state(-0.1), state(), num_examples=300, clip=1.0, max_examples=1000
    )
    total = a.vector + b.vector

    mean = secure_updates.mean_state(total, state(), denominator=0.4)

    expected = state((0.3 * 100 - 0.1 * 300) / 400)
    for name in ("a.bias", "b.weight"):
        assert mean[name].dtype == state()[name].dtype
        assert torch.allclose(mean[name].double(), expected[name].double(), atol=1e-7)
    assert mean["n"] == 3 and list(mean) == list(state())


def test_mean_state_refuses_a_sum_of_the_wrong_length_or_no_weight() -> None:
    with pytest.raises(ValueError, match="9"):
        secure_updates.mean_state(np.zeros(5), state(), denominator=1.0)
    with pytest.raises(ValueError, match="denominator"):
        secure_updates.mean_state(np.zeros(9), state(), denominator=0.0)


def test_models_that_differ_are_refused() -> None:
    other = {**state(), "b.weight": torch.zeros(3, 2)}
    with pytest.raises(ValueError, match="shape"):
        secure_updates.weighted_vector(other, state(), num_examples=1, clip=1, max_examples=1)
    with pytest.raises(ValueError, match="NaN"):
        secure_updates.weighted_vector(
            state(float("nan")), state(), num_examples=1, clip=1, max_examples=1
        )


def test_the_client_dp_encoding_clips_the_norm_and_counts_the_site() -> None:
    from fedcore.privacy.client_dp import NoiseSource

    encoded = secure_updates.dp_vector(
        state(1.0),
        state(),
        clip=0.5,
        noise_multiplier=1e-9,  # practically no noise: the clipped delta shows
        threshold=2,
        source=NoiseSource(b"k" * 32),
    )

    assert encoded.norm == pytest.approx(np.sqrt(8))
    assert np.linalg.norm(encoded.vector[:-1]) == pytest.approx(0.5, rel=1e-6)
    assert encoded.vector[-1] == secure_updates.dp_quantiser_clip(0.5, 1e-9, 2)
    assert secure_updates.dp_quantiser_clip(1.0, 2.0, 4) == pytest.approx(11.0)


def test_wire_carries_bytes_as_base64_and_refuses_anything_else() -> None:
    message = {
        "stage": "share_keys",
        "ciphertexts": [{"to": 2, "ciphertext": b"\x00\xffabc"}],
        "c_public": b"k" * 32,
    }
    encoded = secagg_wire.to_json(message)

    assert encoded["ciphertexts"][0]["ciphertext"] == "AP9hYmM="
    assert secagg_wire.from_json(encoded) == message
    for bad in ("AP9hYmM", "AP9h YmM=", "AP9hYmN="):  # unpadded, space, non-canonical
        with pytest.raises(ProtocolError, match="base64"):
            secagg_wire.from_json({"ciphertexts": [{"ciphertext": bad}]})
    with pytest.raises(ProtocolError, match="base64 string"):
        secagg_wire.from_json({"share": 12})
    with pytest.raises(ProtocolError, match="object"):
        secagg_wire.from_json(["stage"])
    with pytest.raises(ProtocolError, match="deep"):
        secagg_wire.from_json({"a": {"b": {"c": {"d": {"e": {}}}}}})


def secure_spec(**secagg: Any) -> dict[str, Any]:
    spec = copy.deepcopy(plan_spec(secure_aggregation=True))
    if secagg:
        spec["secagg"] = secagg
    return spec


def test_the_secagg_section_is_optional_and_has_defaults() -> None:
    assert plan_errors(secure_spec()) == {}
    settings = secagg_settings(secure_spec())
    assert settings is not None
    assert settings.clip == SECAGG_DEFAULTS["clip"] == secure_updates.DEFAULT_CLIP
    assert settings.max_examples == secure_updates.DEFAULT_MAX_EXAMPLES
    assert settings.threshold is None and settings.degree is None
    assert secagg_settings(plan_spec()) is None  # not a secure plan


def test_the_secagg_section_is_validated_field_by_field() -> None:
    errors = plan_errors(
        secure_spec(
            clip=0,
            threshold=1,
            max_examples=0,
            degree=0,
            stage_timeout_seconds=-1,
            extra=True,
        )
    )

    assert set(errors) == {
        "secagg",
        "secagg.clip",
        "secagg.threshold",
        "secagg.max_examples",
        "secagg.degree",
        "secagg.stage_timeout_seconds",
    }
    assert "unknown key(s) 'extra'" in errors["secagg"]
    assert plan_errors({**secure_spec(), "secagg": [1]}) == {
        "secagg": "must be an object with keys "
        "clip, threshold, max_examples, degree, stage_timeout_seconds"
    }


def test_strategies_that_need_each_update_are_refused_with_secure_aggregation() -> None:
    spec = {**secure_spec(), "aggregation": {"strategy": "median"}}

    assert "secure aggregation" in plan_errors(spec)["aggregation.strategy"]
    assert plan_errors({**spec, "aggregation": {"strategy": "fedadam"}}) == {}


@pytest.mark.parametrize(
    ("k", "requested", "expected"),
    [
        (2, None, 2),
        (3, None, 2),
        (4, None, 3),
        (10, None, 7),
        (10, 2, 6),  # raised to a strict majority
        (10, 8, 8),
        (4, 9, 4),  # capped at the neighbourhood
    ],
)
def test_the_threshold_is_a_majority_of_the_neighbourhood(k, requested, expected) -> None:
    assert secagg_threshold(k, requested) == expected


def test_a_client_the_transport_saw_go_is_not_waited_for() -> None:
    from fedcore.secagg import SecAggClient, SecAggConfig, SecAggServer, Stage

    config = SecAggConfig("drop", (1, 2, 3), 2, 4, 1.0)
    server = SecAggServer(config, stage_timeout=60)
    clients = {cid: SecAggClient(cid) for cid in (1, 2, 3)}
    requests = server.start(0.0)
    for cid in (1, 2, 3):
        server.collect(cid, clients[cid].advertise_keys(requests[cid]), 0.0)
    requests = server.advance(0.0)
    for cid in (1, 2):
        server.collect(cid, clients[cid].share_keys(requests[cid]), 0.0)
    assert not server.ready(0.0)

    server.drop(3)  # its connection closed: no need to wait 60 s

    assert server.ready(0.0)
    requests = server.advance(0.0)
    assert set(requests) == {1, 2} and server.stage is Stage.MASKED_INPUT
    assert server.deadline == 60.0  # the next stage's deadline runs from now, not from 60 s


def test_fairness_counts_ride_in_one_layout_both_sides_derive_and_come_back_merged():
    from fedcore.secure_updates import count_layout, counts_from_tail, counts_to_tail

    cells = {"tp": 1, "fp": 2, "tn": 3, "fn": 4}
    site = {"sex": {"M": dict(cells), "F": dict(cells)}, "age": {"old": dict(cells)}}
    layout = count_layout({"sex": ["M", "F"], "age": ["old"]})
    assert layout[:4] == tuple(("age", "old", c) for c in ("tp", "fp", "tn", "fn"))
    assert [cell[:2] for cell in layout[4::4]] == [("sex", "F"), ("sex", "M")]
    tail = counts_to_tail(site, layout)
    assert counts_from_tail([2 * v for v in tail], layout)["sex"]["M"] == {
        "tp": 2,
        "fp": 4,
        "tn": 6,
        "fn": 8,
    }
    with pytest.raises(ValueError, match="count layout"):  # a site with another group list
        counts_to_tail({**site, "sex": {"M": dict(cells)}}, layout)
    with pytest.raises(ValueError, match="invalid"):
        counts_to_tail({**site, "age": {"old": {**cells, "tp": -1}}}, layout)
