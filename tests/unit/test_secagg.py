"""Tests for fedcore.secagg: exact sums under dropouts, refusals, masking and encryption."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcore.secagg import (
    NotEnoughSurvivorsError,
    ProtocolError,
    Quantizer,
    ReconstructionError,
    RevealRefusedError,
    SecAggClient,
    SecAggConfig,
    SecAggServer,
    Stage,
    StageError,
    bytes_per_client,
    effective_degree,
    neighbour_graph,
    run_simulation,
    session_id,
    simulate,
)
from fedcore.secagg.graph import graph_seed
from fedcore.secagg.shamir import combine_shares, split_secret
from fedcore.secagg.simulation import DROP_STAGES

try:
    from scipy import stats
except ImportError:  # pragma: no cover - scipy is optional; fall back to a hand chi-square
    stats = None

CLIP = 1.0
P = 64


def _vectors(n: int, p: int = P, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.uniform(-CLIP, CLIP, p) for _ in range(n)]


def _tolerance(n_summed: int, n_clients: int) -> float:
    # Each coordinate is within half a quantisation step (clip / L) of its input.
    return n_summed * Quantizer(CLIP, n_clients).max_error * 1.000001 + 1e-12


def _assert_sum(result: Any, vectors: Sequence[np.ndarray], expected_contributors: list[int]):
    assert result.contributors == expected_contributors
    expected = np.sum([vectors[i] for i in expected_contributors], axis=0)
    err = np.max(np.abs(result.total - expected))
    assert err <= _tolerance(len(expected_contributors), len(vectors))


def _top_byte_uniform(words: np.ndarray) -> bool:
    """Chi-square test of the top byte of uint32 words against uniform, at alpha = 1e-6."""
    counts = np.bincount((words >> 24).astype(np.int64), minlength=256)
    expected = words.size / 256
    chi2 = float(np.sum((counts - expected) ** 2 / expected))
    if stats is not None:
        return bool(stats.chi2.sf(chi2, df=255) > 1e-6)
    return chi2 < 399.0  # chi-square quantile for 255 degrees of freedom at 1 - 1e-6


# -- exact sums: every dropout count from 0 to n - t -------------------------------------------

# (n, t): t is a strict majority of the complete graph. Every dropout count 0..n-t runs for
# n <= 20; n = 50 and 100 run a sample (0, 1, half, n - t) to keep the file fast.
ROUNDS = [(3, 2), (5, 3), (10, 6), (20, 11), (50, 26), (100, 51)]


def _dropout_counts(n: int, t: int) -> list[int]:
    if n <= 20:
        return list(range(n - t + 1))
    return sorted({0, 1, (n - t) // 2, n - t})


def _dropout_cases() -> Iterator[Any]:
    for n, t in ROUNDS:
        for d in _dropout_counts(n, t):
            yield pytest.param(n, t, d, id=f"n{n}-t{t}-drop{d}")


@pytest.mark.parametrize(("n", "t", "d"), list(_dropout_cases()))
def test_sum_is_exact_up_to_quantisation_with_dropouts_after_masking(n: int, t: int, d: int):
    vectors = _vectors(n, seed=n * 1000 + d)
    dropped = set(np.random.default_rng(d).choice(n, size=d, replace=False).tolist())

    result = run_simulation(vectors, t, dropped, clip=CLIP)

    _assert_sum(result, vectors, sorted(set(range(n)) - dropped))


@pytest.mark.parametrize(("n", "t"), ROUNDS, ids=[f"n{n}-t{t}" for n, t in ROUNDS])
def test_server_refuses_to_unmask_below_threshold(n: int, t: int):
    dropped = range(n - t + 1)

    with pytest.raises(NotEnoughSurvivorsError) as info:
        simulate(_vectors(n), t, dropped, clip=CLIP)

    assert (info.value.have, info.value.need, info.value.stage) == (t - 1, t, "masked_input")
    assert f"{t - 1} participant(s) remain, threshold needs {t}" in str(info.value)


@pytest.mark.parametrize("drop_stage", DROP_STAGES)
def test_dropouts_at_every_stage(drop_stage: str):
    n, t = 10, 6
    vectors = _vectors(n, seed=7)
    for d in range(n - t + 1):
        dropped = set(range(0, 2 * d, 2))  # 0, 2, 4, ...

        result = run_simulation(vectors, t, dropped, clip=CLIP, drop_stage=drop_stage)

        # Vectors that reached the server before their owner vanished are in the sum.
        gone = set() if drop_stage == "unmasking" else dropped
        _assert_sum(result, vectors, sorted(set(range(n)) - gone))


@pytest.mark.parametrize("drop_stage", DROP_STAGES)
def test_one_dropout_too_many_aborts_at_every_stage(drop_stage: str):
    n, t = 10, 6

    with pytest.raises(NotEnoughSurvivorsError) as info:
        simulate(_vectors(n), t, range(n - t + 1), clip=CLIP, drop_stage=drop_stage)

    assert (info.value.have, info.value.need) == (t - 1, t)


def test_vectors_outside_the_clip_range_are_clipped_and_tensors_accepted():
    vectors = [torch.tensor([0.5, 3.0, -7.0]), torch.tensor([0.25, 0.5, -0.5])]

    total = simulate(vectors, threshold=2, clip=1.0)

    np.testing.assert_allclose(total, [0.75, 1.5, -1.5], atol=_tolerance(2, 2))


# -- sparse neighbour graphs (SecAgg+) ---------------------------------------------------------


def test_graph_is_regular_symmetric_deterministic_and_complete_for_large_degree():
    seed = graph_seed("r1")
    for n, k in [(50, 8), (51, 8), (50, 7), (51, 7), (12, 11), (12, 40)]:
        graph = neighbour_graph(range(1, n + 1), k, seed)
        degree = effective_degree(n, k)
        assert degree == (n - 1 if k >= n - 1 else k + (k % 2) * (n % 2))
        assert all(len(peers) == degree and u not in peers for u, peers in graph.items())
        assert all(u in graph[v] for u, peers in graph.items() for v in peers)
        assert graph == neighbour_graph(range(n, 0, -1), k, seed)
    assert neighbour_graph(range(1, 51), 8, graph_seed("r2")) != neighbour_graph(
        range(1, 51), 8, seed
    )


def _feasible(n: int, degree: int, t: int, dropped: set[int]) -> bool:
    graph = neighbour_graph(range(1, n + 1), degree, graph_seed("simulation"))
    alive = {i + 1 for i in range(n)} - {i + 1 for i in dropped}
    for u in graph:
        if u in alive or graph[u] & alive:  # its b-seed or its s-key must be reconstructed
            if len((graph[u] | {u}) & alive) < t:
                return False
    return len(alive) >= t


@pytest.mark.parametrize(("n", "degree", "t"), [(50, 8, 5), (100, 10, 7)])
def test_sparse_graph_sums_or_refuses_exactly_when_a_neighbourhood_falls_below_t(n, degree, t):
    vectors = _vectors(n, seed=n)
    rng = np.random.default_rng(n)
    outcomes = set()
    for d in (0, 1, 3, n // 10, n // 4, n // 2):
        dropped = set(rng.choice(n, size=d, replace=False).tolist())
        if _feasible(n, degree, t, dropped):
            result = run_simulation(vectors, t, dropped, clip=CLIP, degree=degree)
            _assert_sum(result, vectors, sorted(set(range(n)) - dropped))
            outcomes.add("sum")
        else:
            with pytest.raises(NotEnoughSurvivorsError) as info:
                simulate(vectors, t, dropped, clip=CLIP, degree=degree)
            assert info.value.need == t and info.value.have < t
            outcomes.add("refused")
    assert outcomes == {"sum", "refused"}


def test_threshold_above_the_neighbourhood_is_refused():
    with pytest.raises(ValueError, match="exceeds the neighbourhood size 11"):
        SecAggConfig("r", tuple(range(1, 101)), threshold=12, vector_length=3, degree=10)


# -- what the server sees ----------------------------------------------------------------------


def _arrays_in(value: Any, size: int) -> Iterator[np.ndarray]:
    if isinstance(value, np.ndarray) and value.size == size:
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _arrays_in(item, size)
    elif isinstance(value, list | tuple | set | frozenset):
        for item in value:
            yield from _arrays_in(item, size)


def test_masked_vectors_are_uniform_even_for_constant_inputs():
    n, p = 4, 8192
    vectors = [np.full(p, 0.5)] * n  # quantised, every coordinate is the same level

    result = run_simulation(vectors, 3, clip=CLIP)

    plain = Quantizer(CLIP, n).quantize(vectors[0])
    assert not _top_byte_uniform(plain)  # the test can fail: an unmasked vector does
    for words in result.masked_vectors.values():
        assert _top_byte_uniform(words)
        if stats is not None:
            assert stats.kstest(words / 2.0**32, "uniform").pvalue > 1e-6
    np.testing.assert_allclose(result.total, np.full(p, 2.0), atol=_tolerance(n, n))


def test_server_never_stores_an_individual_unmasked_vector():
    n, t, p = 6, 4, 4096
    vectors = _vectors(n, p, seed=3)
    quantizer = Quantizer(CLIP, n)
    individual = [quantizer.quantize(v) for v in vectors]
    seen: list[tuple[Stage | None, str, np.ndarray]] = []

    def inspect(server: SecAggServer) -> None:
        stored = server.stored_vectors()
        # Every P-sized array anywhere in the server's state is one it declares.
        in_state = list(_arrays_in(vars(server), p))
        assert len(in_state) == len(stored)
        seen.extend((server.stage, name, vector) for name, vector in stored.items())

    result = run_simulation(vectors, t, {1}, clip=CLIP, observer=inspect)

    masked = [(stage, v) for stage, name, v in seen if name == "masked_sum"]
    assert masked and all(stage in (Stage.MASKED_INPUT, Stage.UNMASKING) for stage, _ in masked)
    for _, vector in masked:
        assert _top_byte_uniform(vector)
        assert not any(np.array_equal(vector, q) for q in individual)
    aggregates = [v for stage, name, v in seen if name == "aggregate"]
    assert aggregates
    assert all(stage is Stage.DONE for stage, name, _ in seen if name in ("aggregate", "result"))
    expected = np.sum([individual[i] for i in result.contributors], axis=0, dtype=np.uint32)
    assert np.array_equal(aggregates[-1], expected)


# -- clients driven by hand: refusals and encryption -------------------------------------------


class Round:
    """A round driven message by message, keeping everything that crossed the wire."""

    def __init__(self, n: int, t: int, p: int = 8, *, degree: int | None = None) -> None:
        self.vectors = _vectors(n, p, seed=11)
        self.config = SecAggConfig("hand-round", tuple(range(1, n + 1)), t, p, CLIP, degree)
        self.server = SecAggServer(self.config, stage_timeout=10.0)
        self.clients = {cid: SecAggClient(cid) for cid in self.config.client_ids}
        self.now = 0.0
        self.sent: dict[Stage, dict[int, dict[str, Any]]] = {}
        self.received: dict[Stage, dict[int, dict[str, Any]]] = {}

    def run_stage(self, stage: Stage, requests: dict[int, dict], silent: set[int] = frozenset()):
        self.received[stage] = requests
        for cid, request in requests.items():
            if cid in silent:
                continue
            client = self.clients[cid]
            if stage is Stage.ADVERTISE_KEYS:
                reply = client.advertise_keys(request)
            elif stage is Stage.SHARE_KEYS:
                reply = client.share_keys(request)
            elif stage is Stage.MASKED_INPUT:
                reply = client.masked_input(request, self.vectors[cid - 1])
            else:
                reply = client.unmask(request)
            self.sent.setdefault(stage, {})[cid] = reply
            self.server.collect(cid, reply, self.now)
        if not self.server.ready(self.now):
            self.now = self.server.deadline
        return self.server.advance(self.now)

    def to_unmasking(self, dropped: set[int] = frozenset()) -> dict[int, dict]:
        requests = self.run_stage(Stage.ADVERTISE_KEYS, self.server.start(self.now))
        requests = self.run_stage(Stage.SHARE_KEYS, requests)
        return self.run_stage(Stage.MASKED_INPUT, requests, silent=dropped)


def test_client_refuses_to_reveal_both_shares_of_one_peer():
    game = Round(5, 3)
    requests = game.to_unmasking(dropped={2})
    request = dict(requests[1])
    assert request["dropped"] == [2] and 3 in request["survivors"]

    forged = {**request, "dropped": [2, 3]}  # 3 survived: its b-share is also asked for
    with pytest.raises(RevealRefusedError, match=r"both .* client\(s\) \[3\]"):
        game.clients[1].unmask(forged)

    assert game.clients[1].stage is Stage.ABORTED
    with pytest.raises(StageError):  # no second try with a milder request
        game.clients[1].unmask(request)


def test_client_answers_unmasking_once_and_never_calls_itself_dropped():
    game = Round(5, 3)
    requests = game.to_unmasking(dropped={2})
    reply = game.clients[1].unmask(requests[1])
    assert [s["of"] for s in reply["s_shares"]] == [2]
    assert [s["of"] for s in reply["b_shares"]] == [1, 3, 4, 5]
    with pytest.raises(StageError):  # a second request (e.g. "now 3 dropped") is refused
        game.clients[1].unmask({**requests[1], "survivors": [1, 4, 5], "dropped": [2, 3]})

    self_dropped = {**requests[4], "survivors": [1, 3, 5], "dropped": [2, 4]}
    with pytest.raises(RevealRefusedError, match="alive"):
        game.clients[4].unmask(self_dropped)


def test_a_masked_vector_after_the_deadline_is_refused_and_never_summed():
    game = Round(5, 3)
    requests = game.to_unmasking(dropped={5})  # the stage timed out without client 5
    late = game.clients[5].masked_input(game.received[Stage.MASKED_INPUT][5], game.vectors[4])

    with pytest.raises(StageError):
        game.server.collect(5, late, game.now)
    game.run_stage(Stage.UNMASKING, requests)

    assert game.server.contributors == (1, 2, 3, 4)
    expected = np.sum(game.vectors[:4], axis=0)
    assert np.max(np.abs(game.server.result - expected)) <= _tolerance(4, 5)


def test_a_bad_vector_aborts_the_client_which_then_counts_as_dropped():
    game = Round(3, 2)
    requests = game.run_stage(Stage.ADVERTISE_KEYS, game.server.start(0.0))
    requests = game.run_stage(Stage.SHARE_KEYS, requests)

    with pytest.raises(ValueError, match="finite"):
        game.clients[1].masked_input(requests[1], np.array([np.nan] * 8))
    with pytest.raises(ValueError, match="expects 8"):
        game.clients[2].masked_input(requests[2], np.zeros(7))

    assert game.clients[1].stage is game.clients[2].stage is Stage.ABORTED


def test_client_refuses_to_unmask_with_fewer_than_t_survivors():
    game = Round(5, 3)
    requests = game.to_unmasking()
    shrunk = {**requests[1], "survivors": [1, 2], "dropped": [3, 4, 5]}

    with pytest.raises(NotEnoughSurvivorsError) as info:
        game.clients[1].unmask(shrunk)

    assert (info.value.have, info.value.need) == (2, 3)
    assert game.clients[1].stage is Stage.ABORTED


def test_relayed_shares_are_encrypted_and_bound_to_sender_and_receiver():
    game = Round(5, 3)
    requests = game.to_unmasking(dropped={2})
    game.run_stage(Stage.UNMASKING, requests)
    ciphertexts = [
        item["ciphertext"] for reply in game.sent[Stage.SHARE_KEYS].values()
        for item in reply["ciphertexts"]
    ]  # fmt: skip
    revealed = [
        item["share"] for reply in game.sent[Stage.UNMASKING].values()
        for kind in ("s_shares", "b_shares") for item in reply[kind]
    ]  # fmt: skip
    assert len(ciphertexts) == 20 and len(revealed) == 20  # 4 holders x 5 owners
    for share in revealed:
        windows = {share[i : i + 8] for i in range(0, len(share) - 7)}
        assert not any(w in blob for w in windows for blob in ciphertexts)

    # Relayed to the wrong client, or altered, a ciphertext fails authentication.
    other = Round(3, 2)
    req = other.run_stage(Stage.ADVERTISE_KEYS, other.server.start(0.0))
    req = other.run_stage(Stage.SHARE_KEYS, req)
    swapped = {"stage": "masked_input", "ciphertexts": [
        {"from": 2, "ciphertext": req[3]["ciphertexts"][0]["ciphertext"]}, req[1]["ciphertexts"][1]
    ]}  # fmt: skip
    with pytest.raises(ProtocolError, match="authentication"):
        other.clients[1].masked_input(swapped, other.vectors[0])
    item = req[2]["ciphertexts"][0]
    flipped = item["ciphertext"][:-1] + bytes([item["ciphertext"][-1] ^ 1])
    altered = {**req[2], "ciphertexts": [{**item, "ciphertext": flipped}, req[2]["ciphertexts"][1]]}
    with pytest.raises(ProtocolError, match="authentication"):
        other.clients[2].masked_input(altered, other.vectors[1])


def test_corrupted_s_share_aborts_instead_of_returning_garbage():
    game = Round(5, 3)
    requests = game.to_unmasking(dropped={5})
    game.now = 0.0
    for cid in (1, 2, 3, 4):
        reply = game.clients[cid].unmask(requests[cid])
        if cid == 1:  # holder 1 is among the t lowest ids used for reconstruction
            share = reply["s_shares"][0]["share"]
            reply["s_shares"][0]["share"] = share[:-1] + bytes([share[-1] ^ 1])
        game.server.collect(cid, reply, game.now)

    with pytest.raises(ReconstructionError, match="client 5"):
        game.server.advance(game.now)
    assert game.server.stage is Stage.ABORTED and game.server.stored_vectors() == {}


def test_client_checks_neighbourhood_and_distinct_keys():
    game = Round(4, 3)
    requests = game.run_stage(Stage.ADVERTISE_KEYS, game.server.start(0.0))
    keys = requests[1]["public_keys"]
    reflected = {**requests[1], "public_keys": [{**keys[0], "c_public": keys[1]["c_public"]}]
                 + keys[1:]}  # fmt: skip
    with pytest.raises(ProtocolError, match="distinct"):
        game.clients[1].share_keys(reflected)
    missing = {**requests[2], "public_keys": requests[2]["public_keys"][:-1]}
    with pytest.raises(ProtocolError, match="exactly this client's neighbours"):
        game.clients[2].share_keys(missing)


def test_site_policy_refuses_a_low_threshold():
    config = SecAggConfig("r", (1, 2, 3), threshold=2, vector_length=4)

    with pytest.raises(ProtocolError, match="below this site's minimum 3"):
        SecAggClient(1, min_threshold=3).advertise_keys(config.to_message())


# -- server deadlines --------------------------------------------------------------------------


def test_server_stages_have_deadlines_and_refuse_late_duplicate_or_foreign_messages():
    config = SecAggConfig("r", (1, 2, 3), threshold=2, vector_length=4)
    server = SecAggServer(config, stage_timeout=5.0)
    clients = {cid: SecAggClient(cid) for cid in (1, 2, 3)}
    requests = server.start(now=100.0)
    assert server.deadline == 105.0

    server.collect(1, clients[1].advertise_keys(requests[1]), now=101.0)
    assert not server.ready(104.9) and server.pending == {2, 3}
    with pytest.raises(StageError, match="waiting"):
        server.advance(104.9)
    with pytest.raises(StageError, match="already answered"):
        server.collect(1, {"stage": "advertise_keys"}, now=101.0)
    with pytest.raises(ProtocolError):  # malformed: client 2 is out of the round
        server.collect(2, {"stage": "advertise_keys", "c_public": b"x", "s_public": b"y"}, 102.0)
    with pytest.raises(StageError, match="another|during"):
        server.collect(3, {"stage": "share_keys"}, now=102.0)
    reply3 = clients[3].advertise_keys(requests[3])
    with pytest.raises(StageError, match="closed"):
        server.collect(3, reply3, now=105.0)

    with pytest.raises(NotEnoughSurvivorsError) as info:
        server.advance(now=105.0)
    assert (info.value.stage, info.value.have, info.value.need) == ("advertise_keys", 1, 2)
    assert server.stage is Stage.ABORTED


# -- building blocks ---------------------------------------------------------------------------


def test_shamir_any_t_shares_recover_the_secret_and_fewer_do_not():
    secret = bytes(range(32))
    shares = split_secret(secret, 3, [1, 2, 5, 9, 4_000_000_000])
    for subset in ([1, 2, 5], [2, 9, 4_000_000_000], [1, 5, 9, 2]):
        assert combine_shares({x: shares[x] for x in subset}, 3, 32) == secret
    with pytest.raises(ProtocolError, match="threshold needs 3"):
        combine_shares({1: shares[1], 2: shares[2]}, 3, 32)
    other = split_secret(secret, 3, [1, 2, 5])
    mixed = {1: shares[1], 2: shares[2], 5: other[5]}
    with pytest.raises(ProtocolError, match="valid secret"):  # detected, not garbage
        combine_shares(mixed, 3, 32)


def test_quantised_sums_of_n_clients_never_wrap():
    for n in (2, 3, 7, 100, 1000):
        q = Quantizer(CLIP, n)
        top = q.quantize(np.array([CLIP, 10.0 * CLIP]))
        assert top.tolist() == [q.levels, q.levels]
        assert n * q.levels <= 2**32 - 1
        total = np.sum([top] * n, axis=0, dtype=np.uint32)
        np.testing.assert_allclose(q.dequantize_sum(total, n), [n * CLIP] * 2, atol=1e-9)
        low = q.quantize(np.array([-CLIP]))
        assert low.tolist() == [0]
    with pytest.raises(ValueError, match="finite"):
        Quantizer(CLIP, 3).quantize(np.array([np.nan]))


@pytest.mark.parametrize(("n", "degree"), [(10, None), (30, 6)])
def test_bytes_per_client_matches_the_measured_wire(n: int, degree: int | None):
    p = 1000

    result = run_simulation(_vectors(n, p), 3, clip=CLIP, degree=degree)

    cost = bytes_per_client(n, degree, p)
    assert set(result.bytes_up.values()) == {cost["upload"]}
    assert set(result.bytes_down.values()) == {cost["download"]}
    assert all(len(v) == p for v in result.masked_vectors.values())
    assert 4 * p < cost["upload"] < 4 * p + 300 * (effective_degree(n, degree) + 1)


# -- property: masks cancel ----------------------------------------------------------------------


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.data(),
    n=st.integers(min_value=2, max_value=6),
    p=st.integers(min_value=1, max_value=12),
)
def test_masks_cancel_for_random_small_vectors(data: st.DataObject, n: int, p: int):
    t = data.draw(st.integers(min_value=2, max_value=n), label="threshold")
    values = st.floats(min_value=-CLIP, max_value=CLIP, allow_nan=False, width=32)
    vectors = [np.array(data.draw(st.lists(values, min_size=p, max_size=p))) for _ in range(n)]

    total = simulate(vectors, t, clip=CLIP)

    assert np.max(np.abs(total - np.sum(vectors, axis=0))) <= _tolerance(n, n)
    assert not math.isnan(float(total.sum()))


def test_stage_timeouts_can_differ_per_stage():
    config = SecAggConfig("r", (1, 2), threshold=2, vector_length=4)
    server = SecAggServer(config, stage_timeout={"masked_input": 3600.0, "share_keys": 20.0})
    clients = {cid: SecAggClient(cid) for cid in (1, 2)}
    requests = server.start(now=0.0)
    assert server.deadline == 300.0  # the default for stages not named
    for stage, now in [("advertise_keys", 1.0), ("share_keys", 2.0)]:
        for cid, request in requests.items():
            server.collect(cid, getattr(clients[cid], stage)(request), now)
        requests = server.advance(now)
        assert server.deadline == now + {"advertise_keys": 20.0, "share_keys": 3600.0}[stage]
    with pytest.raises(ValueError, match="no such stage"):
        SecAggServer(config, stage_timeout={"training": 5.0})


# -- the server's state in a database row, and integer counts under the masks -----------------


def test_a_server_restored_from_its_snapshot_after_every_message_ends_with_the_same_sum():
    # Each message handled by "another process": the server is rebuilt from its snapshot,
    # which must be plain JSON (a database row) plus the one running sum, then advanced.
    import json

    n, t, p, k = 5, 3, 16, 8
    config = SecAggConfig("row-round", tuple(range(1, n + 1)), t, p + k, CLIP, count_length=k)
    vectors = _vectors(n, p, seed=5)
    counts = [[(cid * 7 + i) % 11 for i in range(k)] for cid in range(1, n + 1)]
    clients = {cid: SecAggClient(cid) for cid in config.client_ids}
    dropped = {4}  # shares its keys, never sends a masked vector

    def reload(server: SecAggServer) -> SecAggServer:
        state, vector = server.snapshot()
        state = json.loads(json.dumps(state))
        if vector is not None:
            assert len(vector) == 4 * (p + k)  # one P-vector: the running sum, never more
        return SecAggServer.restore(config, state, vector, stage_timeout=10.0)

    server = SecAggServer(config, stage_timeout=10.0)
    now = 0.0
    requests = server.start(now)
    for stage in (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.UNMASKING):
        for cid, request in requests.items():
            client = clients[cid]
            if stage is Stage.ADVERTISE_KEYS:
                reply = client.advertise_keys(request)
            elif stage is Stage.SHARE_KEYS:
                reply = client.share_keys(request)
            elif stage is Stage.MASKED_INPUT:
                if cid in dropped:
                    continue
                reply = client.masked_input(request, vectors[cid - 1], counts[cid - 1])
            else:
                reply = client.unmask(request)
            server = reload(server)
            server.collect(cid, reply, now)
        server = reload(server)
        if not server.ready(now):
            now = server.deadline  # the dropout's deadline passes
        requests = server.advance(now)
        server = reload(server)

    assert server.stage is Stage.DONE
    contributors = [c for c in config.client_ids if c not in dropped]
    assert list(server.contributors) == contributors
    expected = np.sum([vectors[c - 1] for c in contributors], axis=0)
    assert np.max(np.abs(server.result - expected)) <= _tolerance(len(contributors), n)
    assert server.result.size == p
    exact = np.sum([counts[c - 1] for c in contributors], axis=0)
    assert server.counts.tolist() == exact.tolist()  # exact: integers in the ring


def test_counts_outside_the_ring_share_or_of_the_wrong_number_are_refused():
    n, k = 3, 2
    config = SecAggConfig("counts-round", (1, 2, 3), 2, 4 + k, CLIP, count_length=k)
    top = config.quantizer.levels
    clients = {cid: SecAggClient(cid) for cid in config.client_ids}
    server = SecAggServer(config, stage_timeout=10.0)
    requests = server.start(0.0)
    for cid, request in requests.items():
        server.collect(cid, clients[cid].advertise_keys(request), 1.0)
    requests = server.advance(1.0)
    for cid, request in requests.items():
        server.collect(cid, clients[cid].share_keys(request), 1.0)
    requests = server.advance(1.0)
    vector = np.zeros(4)
    for cid, bad in ((1, [0, top + 1]), (2, [1]), (3, [1, -1])):
        with pytest.raises(ValueError, match="count"):
            clients[cid].masked_input(requests[cid], vector, bad)
    assert SecAggConfig.from_message(config.to_message()) == config
    with pytest.raises(ValueError, match="count_length"):
        SecAggConfig("r", (1, 2), 2, 4, CLIP, count_length=4)
    assert n == len(config.client_ids)


def test_every_round_attempt_and_analysis_step_gets_its_own_session_id() -> None:
    # The id is bound into every key: two sessions sharing one could reuse each other's secrets.
    rounds = [
        session_id(run, number, attempt)
        for run in (1, 12)
        for number in (1, 2, 21)
        for attempt in (1, 2)
    ]
    steps = [
        session_id(run, 0, attempt, step)
        for run in (1, 12)
        for step in ("summary", "1", "1:2")
        for attempt in (1, 2)
    ]
    ids = rounds + steps
    assert len(set(ids)) == len(ids)
    assert session_id(3, 5, 1, "summary") == session_id(3, 0, 1, "summary")  # a step's round is 0
    longest = session_id(2**31, 0, 2**31, "x" * 20)  # AnalysisSecAgg.step holds 20 characters
    config = SecAggConfig(
        round_id=longest, client_ids=(1, 2, 3), threshold=2, vector_length=4, clip=1.0
    )
    assert config.round_id == longest
