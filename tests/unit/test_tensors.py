"""Tests for fedcore.tensors: the safetensors codec, checksums and compatibility checks."""

import hashlib

import pytest
import torch

from fedcore.tensors import (
    IncompatibleStateDict,
    TensorCodecError,
    check_compatible,
    decode_state_dict,
    encode_state_dict,
    first_non_finite,
    sha256_hex,
    signature,
)

ALL_DTYPES = [
    torch.float16,
    torch.bfloat16,
    torch.float32,
    torch.float64,
    torch.int64,
    torch.int32,
    torch.int8,
    torch.uint8,
    torch.bool,
]


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=generator) > 0.5
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=generator) * 100).to(dtype)
    return torch.randint(0, 100, shape, generator=generator).to(dtype)


def _assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert actual[name].shape == tensor.shape, name
        assert torch.equal(actual[name], tensor), name


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_round_trip_preserves_dtype_shape_and_values(dtype):
    state = {"w": _sample(dtype, (3, 4)), "b": _sample(dtype, (4,), seed=1)}

    decoded = decode_state_dict(encode_state_dict(state))

    _assert_same(decoded, state)


def test_round_trip_of_empty_and_zero_dim_tensors():
    state = {
        "scalar": torch.tensor(2.5, dtype=torch.bfloat16),
        "count": torch.tensor(7, dtype=torch.int64),
        "flag": torch.tensor(True),
        "empty": torch.zeros(0, 3, dtype=torch.float16),
        "empty_int": torch.zeros(0, dtype=torch.int64),
    }

    decoded = decode_state_dict(encode_state_dict(state))

    _assert_same(decoded, state)
    assert decoded["scalar"].dim() == 0


def test_decode_returns_keys_in_sorted_order():
    state = {"z": torch.zeros(1), "a": torch.zeros(2, dtype=torch.int8), "m": torch.zeros(3)}

    assert list(decode_state_dict(encode_state_dict(state))) == ["a", "m", "z"]


def test_round_trip_of_an_empty_state_dict():
    assert decode_state_dict(encode_state_dict({})) == {}


def test_model_state_dict_round_trips_and_loads_into_a_fresh_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 1)
    )
    fresh = torch.nn.Sequential(
        torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.Linear(3, 1)
    )

    fresh.load_state_dict(decode_state_dict(encode_state_dict(model.state_dict())))

    _assert_same(dict(fresh.state_dict()), dict(model.state_dict()))
    assert fresh.state_dict()["1.num_batches_tracked"].dtype == torch.int64


def test_encoding_is_deterministic_and_independent_of_key_order():
    first = {"b": _sample(torch.float32, (5,)), "a": _sample(torch.int64, (2, 2))}
    second = {"a": first["a"].clone(), "b": first["b"].clone()}

    assert encode_state_dict(first) == encode_state_dict(second)
    assert encode_state_dict(first) == encode_state_dict(first)


def test_encode_handles_grad_noncontiguous_and_shared_storage_tensors():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    weight = torch.nn.Parameter(base.clone())  # requires grad
    state = {
        "weight": weight,
        "transposed": base.t(),  # non-contiguous view of base
        "base": base,
        "alias": base,  # same storage as "base": safetensors alone would refuse this
        "row": base[1],  # a view into base's storage
    }

    decoded = decode_state_dict(encode_state_dict(state))

    assert torch.equal(decoded["weight"], base)
    assert torch.equal(decoded["transposed"], base.t())
    assert torch.equal(decoded["alias"], base)
    assert torch.equal(decoded["row"], base[1])
    assert not decoded["weight"].requires_grad


def test_encode_leaves_the_input_untouched():
    tensor = torch.ones(3)
    state = {"a": tensor, "b": tensor}

    encode_state_dict(state)

    assert state["a"] is tensor and state["b"] is tensor


def test_decoded_tensors_are_writable_and_independent():
    data = encode_state_dict({"w": torch.zeros(3)})
    first = decode_state_dict(data)

    first["w"] += 1
    second = decode_state_dict(data)

    assert torch.equal(second["w"], torch.zeros(3))


def test_encode_refuses_non_tensor_values_and_non_string_keys():
    with pytest.raises(TypeError, match="tensor 'w' is list"):
        encode_state_dict({"w": [1.0, 2.0]})
    with pytest.raises(TypeError, match="key 3 is int"):
        encode_state_dict({3: torch.zeros(1)})


def test_encode_refuses_sparse_tensors_with_a_hint():
    sparse = torch.zeros(3, 3).to_sparse()

    with pytest.raises(TensorCodecError, match="tensor 's'.*to_dense"):
        encode_state_dict({"s": sparse})


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x00" * 7,
        b"\xff" * 16,  # header length far past the end
        b"not safetensors at all",
        b"\x05\x00\x00\x00\x00\x00\x00\x00[1,2]",  # header is JSON but not an object
    ],
)
def test_decode_wraps_garbage_in_tensor_codec_error(data):
    with pytest.raises(TensorCodecError, match="not a valid safetensors state dict"):
        decode_state_dict(data)


def test_decode_refuses_truncated_payload():
    data = encode_state_dict({"w": torch.ones(10)})

    with pytest.raises(TensorCodecError, match="not a valid safetensors state dict"):
        decode_state_dict(data[:-1])


def test_decode_refuses_non_bytes():
    with pytest.raises(TensorCodecError, match="expected bytes, got str"):
        decode_state_dict("abc")  # type: ignore[arg-type]


def test_decode_accepts_bytearray_and_memoryview():
    data = encode_state_dict({"w": torch.ones(2)})

    assert torch.equal(decode_state_dict(bytearray(data))["w"], torch.ones(2))
    assert torch.equal(decode_state_dict(memoryview(data))["w"], torch.ones(2))


def test_sha256_hex_matches_hashlib_and_changes_with_one_byte():
    data = encode_state_dict({"w": torch.ones(4)})
    flipped = bytearray(data)
    flipped[-1] ^= 0x01

    assert sha256_hex(data) == hashlib.sha256(data).hexdigest()
    assert len(sha256_hex(data)) == 64
    assert sha256_hex(bytes(flipped)) != sha256_hex(data)
    assert sha256_hex(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_signature_lists_dtype_names_and_shapes_in_sorted_order():
    state = {"fc2.bias": torch.zeros(1), "fc1.weight": torch.zeros(4, 3, dtype=torch.bfloat16)}

    assert signature(state) == {
        "fc1.weight": ("bfloat16", (4, 3)),
        "fc2.bias": ("float32", (1,)),
    }
    assert list(signature(state)) == ["fc1.weight", "fc2.bias"]
    assert signature({"n": torch.tensor(3)}) == {"n": ("int64", ())}


def test_check_compatible_accepts_identical_layout():
    reference = {"fc1.weight": torch.zeros(4, 4), "n": torch.tensor(0)}
    update = {"fc1.weight": torch.ones(4, 4), "n": torch.tensor(5)}

    check_compatible(update, reference)
    check_compatible(update, signature(reference))


def test_check_compatible_names_tensor_with_wrong_shape():
    reference = {"fc1.weight": torch.zeros(4, 4)}
    update = {"fc1.weight": torch.zeros(3, 4)}

    with pytest.raises(IncompatibleStateDict) as info:
        check_compatible(update, reference)

    assert str(info.value) == "tensor 'fc1.weight': shape (3, 4), expected (4, 4)"


def test_check_compatible_names_tensor_with_wrong_dtype():
    reference = {"fc1.bias": torch.zeros(4)}
    update = {"fc1.bias": torch.zeros(4, dtype=torch.float64)}

    with pytest.raises(IncompatibleStateDict) as info:
        check_compatible(update, reference)

    assert str(info.value) == "tensor 'fc1.bias': dtype float64, expected float32"


def test_check_compatible_names_missing_and_unexpected_tensors():
    reference = {"a": torch.zeros(2), "b": torch.zeros(2, 2)}

    with pytest.raises(
        IncompatibleStateDict, match=r"tensor 'b': missing, expected float32 \(2, 2\)"
    ):
        check_compatible({"a": torch.zeros(2)}, reference)
    with pytest.raises(IncompatibleStateDict, match="tensor 'z': unexpected"):
        check_compatible({**reference, "z": torch.zeros(1)}, reference)


def test_check_compatible_counts_further_problems():
    reference = {"a": torch.zeros(2), "b": torch.zeros(2)}
    update = {"a": torch.zeros(3), "b": torch.zeros(2, dtype=torch.int64)}

    with pytest.raises(IncompatibleStateDict, match=r"and 1 more problems"):
        check_compatible(update, reference)


def test_incompatible_state_dict_is_a_value_error():
    with pytest.raises(ValueError):
        check_compatible({}, {"a": torch.zeros(1)})


def test_first_non_finite_finds_nan_and_inf_in_float_tensors():
    state = {
        "a": torch.zeros(3),
        "b": torch.tensor([1.0, float("nan")], dtype=torch.bfloat16),
        "c": torch.tensor([float("inf")], dtype=torch.float16),
    }

    assert first_non_finite(state) == "b"
    assert first_non_finite({"c": state["c"], "a": state["a"]}) == "c"
    assert first_non_finite({"d": torch.tensor(float("-inf"), dtype=torch.float64)}) == "d"


def test_first_non_finite_returns_none_for_finite_and_integer_tensors():
    state = {
        "w": torch.randn(5, 5),
        "n": torch.tensor(3),
        "flag": torch.tensor([True]),
        "empty": torch.zeros(0),
    }

    assert first_non_finite(state) is None


def test_first_non_finite_survives_a_round_trip():
    state = {"w": torch.tensor([0.0, float("nan")])}

    assert first_non_finite(decode_state_dict(encode_state_dict(state))) == "w"
