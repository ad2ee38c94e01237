"""The server side of secure aggregation: relays keys and encrypted shares, sums masked vectors.

The server never sees an individual unmasked vector: masked vectors are added to one running
uint32 sum as they arrive and never kept, and the masks are removed only from that sum, with
reconstructed secrets, once at least t clients have answered the unmasking request.

Time is the caller's: every stage has a deadline ``now + stage_timeout`` fixed when it opens;
``collect`` refuses messages at or after it, ``ready`` turns true when every awaited client has
answered or the deadline has passed, and ``advance`` closes the stage. Clients that did not answer
a stage in time are dropouts from then on.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fedcore.secagg import primitives as crypto
from fedcore.secagg.client import CIPHERTEXT_BYTES, SHARE_BYTES
from fedcore.secagg.errors import (
    NotEnoughSurvivorsError,
    ProtocolError,
    ReconstructionError,
    SecAggError,
    StageError,
)
from fedcore.secagg.messages import SecAggConfig, Stage, expect_stage, field, records
from fedcore.secagg.shamir import combine_shares

_COLLECTING = (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.UNMASKING)
DEFAULT_STAGE_TIMEOUT = 300.0


class SecAggServer:
    """The server's state machine for one round of secure aggregation.

    Usage: ``requests = start(now)``; deliver them; feed every reply to ``collect``; when
    ``ready(now)`` (all answered, or ``deadline`` passed) call ``advance(now)`` and deliver what it
    returns; after the unmasking stage ``result`` holds the dequantised sum of the vectors of
    ``contributors``.
    """

    def __init__(
        self,
        config: SecAggConfig,
        *,
        stage_timeout: float | Mapping[str, float] = DEFAULT_STAGE_TIMEOUT,
    ) -> None:
        """Create the server for one round.

        Args:
            config: the round's public parameters (sent to every client by ``start``).
            stage_timeout: seconds a stage waits for replies, in the caller's clock; one number
                for every stage, or a mapping from stage name (``"advertise_keys"``,
                ``"share_keys"``, ``"masked_input"``, ``"unmasking"``) to seconds, missing
                stages getting 300. Give ``"masked_input"`` room for local training if the
                sites train after sharing keys.
        """
        if isinstance(stage_timeout, Mapping):
            unknown = set(stage_timeout) - {stage.value for stage in _COLLECTING}
            if unknown:
                raise ValueError(f"no such stage: {sorted(unknown)}")
            timeouts = {
                s: float(stage_timeout.get(s.value, DEFAULT_STAGE_TIMEOUT)) for s in _COLLECTING
            }
        else:
            timeouts = dict.fromkeys(_COLLECTING, float(stage_timeout))
        if not all(t > 0 for t in timeouts.values()):
            raise ValueError("stage timeouts must be positive")
        self.config = config
        self.stage_timeouts = timeouts
        self._stage: Stage | None = None
        self._deadline = float("-inf")
        self._awaited: set[int] = set()
        self._answered: set[int] = set()
        self._c_public: dict[int, bytes] = {}
        self._s_public: dict[int, bytes] = {}
        self._graph: dict[int, frozenset[int]] = {}
        self._relay: dict[int, dict[int, bytes]] = {}  # recipient -> sender -> ciphertext
        self._shared: frozenset[int] = frozenset()  # U2: completed the share-keys stage
        self._masked_sum: np.ndarray | None = None
        self._contributors: frozenset[int] = frozenset()  # U3: masked vector arrived in time
        self._asked: dict[int, tuple[frozenset[int], frozenset[int]]] = {}
        self._s_shares: dict[int, dict[int, bytes]] = {}  # owner -> holder -> share
        self._b_shares: dict[int, dict[int, bytes]] = {}
        self._aggregate: np.ndarray | None = None
        self._result: np.ndarray | None = None

    @property
    def stage(self) -> Stage | None:
        """The stage being collected (None before ``start``), DONE or ABORTED."""
        return self._stage

    @property
    def deadline(self) -> float:
        """When the current stage closes, in the caller's clock."""
        return self._deadline

    @property
    def pending(self) -> frozenset[int]:
        """Clients the current stage still waits for."""
        return frozenset(self._awaited)

    @property
    def contributors(self) -> tuple[int, ...]:
        """Clients whose vectors are in the sum (known once the masked-input stage closes)."""
        return tuple(sorted(self._contributors))

    @property
    def counts(self) -> np.ndarray:
        """The exact sum of the contributors' K integer counts (int64), once the round is DONE."""
        if self._aggregate is None:
            raise StageError("the round has not finished unmasking")
        return self._aggregate[self.config.float_length :].astype(np.int64)

    @property
    def result(self) -> np.ndarray:
        """The dequantised float64 sum of the contributors' vectors, once the round is DONE."""
        if self._result is None:
            raise StageError("the round has not finished unmasking")
        return self._result

    def stored_vectors(self) -> dict[str, np.ndarray]:
        """Copies of every P-vector this server holds right now.

        During masked-input collection and unmasking that is the running sum of masked vectors
        (each individual vector is added on arrival and not kept); after unmasking, the aggregate
        sum of the contributors' quantised vectors and its dequantised ``result``. Nothing else
        of size P is ever stored.
        """
        held = {}
        if self._masked_sum is not None:
            held["masked_sum"] = self._masked_sum.copy()
        if self._aggregate is not None:
            held["aggregate"] = self._aggregate.copy()
        if self._result is not None:
            held["result"] = self._result.copy()
        return held

    def _set_result(self, total: np.ndarray) -> None:
        self._aggregate = total
        floats = total[: self.config.float_length]
        self._result = self.config.quantizer.dequantize_sum(floats, len(self._contributors))

    # -- persistence ---------------------------------------------------------------------------

    def snapshot(self) -> tuple[dict[str, Any], bytes | None]:
        """The server's whole state: a JSON-able dict and the one P-vector it holds, if any.

        The dict holds what the protocol made public to the server -- the stage, its deadline,
        who is awaited and who answered, the advertised public keys, the neighbour graph, the
        share ciphertexts waiting to be relayed (sealed for their recipients), the rosters of
        each stage and, during unmasking, the shares revealed so far (bytes as base64). The
        vector is the running masked sum (uint32, little-endian) while masked vectors arrive,
        the unmasked aggregate once DONE, None otherwise: never an individual vector, which is
        added to the sum on arrival and not kept. ``restore`` rebuilds an equal server, so the
        state can live in a database row that any process loads, advances and writes back.
        """

        def b64(value: bytes) -> str:
            return base64.b64encode(value).decode("ascii")

        def nested(shares: dict[int, dict[int, bytes]]) -> dict[str, dict[str, str]]:
            return {str(o): {str(h): b64(v) for h, v in held.items()} for o, held in shares.items()}

        state = {
            "stage": None if self._stage is None else self._stage.value,
            "deadline": None if self._deadline == float("-inf") else self._deadline,
            "awaited": sorted(self._awaited),
            "answered": sorted(self._answered),
            "c_public": {str(c): b64(k) for c, k in self._c_public.items()},
            "s_public": {str(c): b64(k) for c, k in self._s_public.items()},
            "graph": {str(c): sorted(n) for c, n in self._graph.items()},
            "relay": nested(self._relay),
            "shared": sorted(self._shared),
            "contributors": sorted(self._contributors),
            "asked": {str(c): [sorted(s), sorted(d)] for c, (s, d) in self._asked.items()},
            "s_shares": nested(self._s_shares),
            "b_shares": nested(self._b_shares),
        }
        held = self._aggregate if self._stage is Stage.DONE else self._masked_sum
        vector = None if held is None else held.astype("<u4").tobytes()
        return state, vector

    @classmethod
    def restore(
        cls,
        config: SecAggConfig,
        state: Mapping[str, Any],
        vector: bytes | None,
        *,
        stage_timeout: float | Mapping[str, float] = DEFAULT_STAGE_TIMEOUT,
    ) -> SecAggServer:
        """The server ``snapshot`` described (same config and stage timeouts)."""

        def raw(value: str) -> bytes:
            return base64.b64decode(value.encode("ascii"))

        def nested(shares: Mapping[str, Mapping[str, str]]) -> dict[int, dict[int, bytes]]:
            return {int(o): {int(h): raw(v) for h, v in held.items()} for o, held in shares.items()}

        server = cls(config, stage_timeout=stage_timeout)
        server._stage = None if state["stage"] is None else Stage(state["stage"])
        deadline = state["deadline"]
        server._deadline = float("-inf") if deadline is None else float(deadline)
        server._awaited = set(state["awaited"])
        server._answered = set(state["answered"])
        server._c_public = {int(c): raw(k) for c, k in state["c_public"].items()}
        server._s_public = {int(c): raw(k) for c, k in state["s_public"].items()}
        server._graph = {int(c): frozenset(n) for c, n in state["graph"].items()}
        server._relay = nested(state["relay"])
        server._shared = frozenset(state["shared"])
        server._contributors = frozenset(state["contributors"])
        server._asked = {
            int(c): (frozenset(s), frozenset(d)) for c, (s, d) in state["asked"].items()
        }
        server._s_shares = nested(state["s_shares"])
        server._b_shares = nested(state["b_shares"])
        if vector is not None:
            held = np.frombuffer(vector, dtype="<u4").astype(np.uint32)
            if held.size != config.vector_length:
                raise ValueError(
                    f"a stored sum of {held.size} values, expected {config.vector_length}"
                )
            if server._stage is Stage.DONE:
                server._set_result(held)
            else:
                server._masked_sum = held
        return server

    def start(self, now: float) -> dict[int, dict[str, Any]]:
        """Open the advertise-keys stage; return the request for each client on the roster."""
        if self._stage is not None:
            raise StageError("the round has already started")
        self._open(Stage.ADVERTISE_KEYS, set(self.config.client_ids), now)
        request = self.config.to_message()
        return {cid: dict(request) for cid in self.config.client_ids}

    def collect(self, client_id: int, message: Mapping[str, Any], now: float) -> None:
        """Accept one client's reply to the current stage.

        Args:
            client_id: the sender, as authenticated by the transport.
            message: its reply (the dict a client stage method returned, after transport).
            now: the caller's clock.

        Raises:
            StageError: no stage is collecting, the deadline has passed, the client was not asked
                or has already answered, or the message is for another stage.
            ProtocolError: the reply is malformed; the client is then excluded from the round.
        """
        stage = self._stage
        if stage is None or stage not in _COLLECTING:
            raise StageError("no stage is collecting messages")
        if now >= self._deadline:
            raise StageError(f"stage {stage} closed at {self._deadline}; message dropped")
        if client_id not in self._awaited:
            raise StageError(f"client {client_id} was not asked or has already answered")
        expect_stage(message, stage)
        handler: Callable[[int, Mapping[str, Any]], None] = {
            Stage.ADVERTISE_KEYS: self._collect_keys,
            Stage.SHARE_KEYS: self._collect_ciphertexts,
            Stage.MASKED_INPUT: self._collect_masked_vector,
            Stage.UNMASKING: self._collect_shares,
        }[stage]
        self._awaited.discard(client_id)  # one reply per client per stage, valid or not
        handler(client_id, message)
        self._answered.add(client_id)

    def drop(self, client_id: int) -> None:
        """Stop waiting for a client the transport knows is gone (its connection closed).

        It is a dropout of the current stage exactly as if the stage's deadline had passed for
        it: a later reply is refused, and it is not asked again. A client that already answered
        the current stage keeps its answer; call ``drop`` again after ``advance`` to stop waiting
        for it in the next stage.
        """
        self._awaited.discard(client_id)

    def ready(self, now: float) -> bool:
        """Whether the current stage can close: everyone answered or the deadline passed."""
        return self._stage in _COLLECTING and (not self._awaited or now >= self._deadline)

    def advance(self, now: float) -> dict[int, dict[str, Any]]:
        """Close the current stage and open the next; return the messages to send.

        Returns:
            The next stage's request by client id; empty once unmasking completes (then
            ``result`` and ``contributors`` are set).

        Raises:
            StageError: the stage is not ready (clients outstanding before the deadline).
            NotEnoughSurvivorsError: fewer than t clients answered (in the round, or holding the
                shares of one client); the round is aborted and every secret dropped.
            ReconstructionError: shares do not interpolate to a valid secret, or a reconstructed
                s-key does not match its advertised public key; the round is aborted.
        """
        stage = self._stage
        if stage is None or not self.ready(now):
            raise StageError(f"stage {stage} is not ready: waiting for {sorted(self._awaited)}")
        closing = {
            Stage.ADVERTISE_KEYS: self._close_advertise,
            Stage.SHARE_KEYS: self._close_share_keys,
            Stage.MASKED_INPUT: self._close_masked_input,
            Stage.UNMASKING: self._close_unmasking,
        }[stage]
        try:
            return closing(now)
        except SecAggError:
            self._abort()
            raise

    # -- stage plumbing ----------------------------------------------------------------------

    def _open(self, stage: Stage, awaited: set[int], now: float) -> None:
        self._stage = stage
        self._awaited = set(awaited)
        self._answered = set()
        self._deadline = now + self.stage_timeouts[stage]

    def _abort(self) -> None:
        self._stage = Stage.ABORTED
        self._awaited.clear()
        self._relay.clear()
        self._masked_sum = None
        self._s_shares.clear()
        self._b_shares.clear()

    def _require(self, stage: Stage, have: int, client: int | None = None) -> None:
        if have < self.config.threshold:
            raise NotEnoughSurvivorsError(stage.value, have, self.config.threshold, client)

    def _holders(self, owner: int) -> frozenset[int]:
        # Who holds shares of ``owner``: itself and its neighbours that received them (U2 only).
        return (self._graph[owner] | {owner}) & self._shared

    # -- stage 0: advertise keys -------------------------------------------------------------

    def _collect_keys(self, client_id: int, message: Mapping[str, Any]) -> None:
        c_public = field(message, "c_public", bytes)
        s_public = field(message, "s_public", bytes)
        crypto.load_public(c_public)
        crypto.load_public(s_public)
        seen = set(self._c_public.values()) | set(self._s_public.values())
        if c_public == s_public or c_public in seen or s_public in seen:
            raise ProtocolError(f"client {client_id} advertised a key that is already in use")
        self._c_public[client_id] = c_public
        self._s_public[client_id] = s_public

    def _close_advertise(self, now: float) -> dict[int, dict[str, Any]]:
        advertised = set(self._answered)
        self._require(Stage.ADVERTISE_KEYS, len(advertised))
        self._graph = self.config.graph(advertised)
        roster = sorted(advertised)
        out = {}
        for u in roster:
            keys = [
                {"client": v, "c_public": self._c_public[v], "s_public": self._s_public[v]}
                for v in sorted(self._graph[u])
            ]
            out[u] = {"stage": Stage.SHARE_KEYS.value, "clients": roster, "public_keys": keys}
        self._open(Stage.SHARE_KEYS, advertised, now)
        return out

    # -- stage 1: share keys -----------------------------------------------------------------

    def _collect_ciphertexts(self, client_id: int, message: Mapping[str, Any]) -> None:
        sealed = records(message, "ciphertexts", "to", "ciphertext", CIPHERTEXT_BYTES)
        if set(sealed) != self._graph[client_id]:
            # Partial sharing would leave neighbours disagreeing about who masks with whom.
            raise ProtocolError(f"client {client_id} must send shares to exactly its neighbours")
        for recipient, ciphertext in sealed.items():
            self._relay.setdefault(recipient, {})[client_id] = ciphertext

    def _close_share_keys(self, now: float) -> dict[int, dict[str, Any]]:
        self._shared = frozenset(self._answered)
        self._require(Stage.SHARE_KEYS, len(self._shared))
        out = {}
        for u in sorted(self._shared):
            inbox = self._relay.get(u, {})
            relayed = [
                {"from": v, "ciphertext": inbox[v]} for v in sorted(self._graph[u] & self._shared)
            ]
            out[u] = {"stage": Stage.MASKED_INPUT.value, "ciphertexts": relayed}
        self._relay.clear()
        self._open(Stage.MASKED_INPUT, set(self._shared), now)
        return out

    # -- stage 2: masked input ---------------------------------------------------------------

    def _collect_masked_vector(self, client_id: int, message: Mapping[str, Any]) -> None:
        payload = field(message, "masked_vector", bytes)
        if len(payload) != 4 * self.config.vector_length:
            raise ProtocolError(f"a masked vector is {4 * self.config.vector_length} bytes")
        vector = np.frombuffer(payload, dtype="<u4")
        if self._masked_sum is None:
            self._masked_sum = vector.astype(np.uint32)  # a copy: the caller's buffer is not kept
        else:
            self._masked_sum += vector  # wraps modulo 2^32

    def _close_masked_input(self, now: float) -> dict[int, dict[str, Any]]:
        self._contributors = frozenset(self._answered)
        self._require(Stage.MASKED_INPUT, len(self._contributors))
        dropped = self._shared - self._contributors
        # Fail before anyone reveals a share if some secret could not be reconstructed anyway.
        for u in sorted(self._contributors):
            self._require(Stage.MASKED_INPUT, len(self._holders(u) & self._contributors), u)
        for v in sorted(dropped):
            if self._graph[v] & self._contributors:
                self._require(Stage.MASKED_INPUT, len(self._holders(v) & self._contributors), v)
        out = {}
        for u in sorted(self._contributors):
            held = (self._graph[u] | {u}) & self._shared  # whose shares u holds
            survivors, gone = held & self._contributors, held & dropped
            self._asked[u] = (survivors, gone)
            out[u] = {
                "stage": Stage.UNMASKING.value,
                "survivors": sorted(survivors),
                "dropped": sorted(gone),
            }
        self._open(Stage.UNMASKING, set(self._contributors), now)
        return out

    # -- stage 3: unmasking ------------------------------------------------------------------

    def _collect_shares(self, client_id: int, message: Mapping[str, Any]) -> None:
        survivors, dropped = self._asked[client_id]
        s_shares = records(message, "s_shares", "of", "share", SHARE_BYTES)
        b_shares = records(message, "b_shares", "of", "share", SHARE_BYTES)
        if set(s_shares) != dropped or set(b_shares) != survivors:
            raise ProtocolError(f"client {client_id} did not answer exactly what it was asked")
        for owner, share in s_shares.items():
            self._s_shares.setdefault(owner, {})[client_id] = share
        for owner, share in b_shares.items():
            self._b_shares.setdefault(owner, {})[client_id] = share

    def _reconstruct(self, shares: dict[int, dict[int, bytes]], owner: int) -> bytes:
        held = shares.get(owner, {})
        self._require(Stage.UNMASKING, len(held), owner)
        try:
            return combine_shares(held, self.config.threshold, crypto.SEED_BYTES)
        except ProtocolError as exc:
            raise ReconstructionError(f"shares of client {owner} are inconsistent: {exc}") from exc

    def _close_unmasking(self, now: float) -> dict[int, dict[str, Any]]:
        self._require(Stage.UNMASKING, len(self._answered))
        config = self.config
        dropped = self._shared - self._contributors
        # Reconstruct and check every secret before touching the sum.
        self_seeds = {u: self._reconstruct(self._b_shares, u) for u in self._contributors}
        s_keys = {}
        for v in sorted(dropped):
            if not self._graph[v] & self._contributors:
                continue  # no survivor masked with v: nothing to remove, keep v's key secret
            key = crypto.load_private(self._reconstruct(self._s_shares, v))
            if crypto.public_bytes(key) != self._s_public[v]:
                raise ReconstructionError(
                    f"reconstructed s-key of client {v} is not the one it sent"
                )
            s_keys[v] = key
        total = self._masked_sum
        assert total is not None  # at least t >= 2 vectors arrived
        for u, seed in self_seeds.items():
            total -= crypto.expand_mask(
                crypto.self_mask_key(seed, config.round_id, u), config.vector_length
            )
        for v, key in s_keys.items():
            for u in sorted(self._graph[v] & self._contributors):
                shared = crypto.agree(key, crypto.load_public(self._s_public[u]))
                mask = crypto.expand_mask(
                    crypto.pairwise_mask_key(shared, config.round_id, u, v), config.vector_length
                )
                if u < v:
                    total -= mask  # u added +mask for the pair (u, v)
                else:
                    total += mask
        self._masked_sum = None
        self._aggregate = total
        self._set_result(total)
        self._s_shares.clear()
        self._b_shares.clear()
        self._stage = Stage.DONE
        self._awaited.clear()
        return {}
