"""Round configuration, stage names, message checks and the payload-size rule of the protocol.

Messages are plain dicts of str, int, float, bytes and lists of such dicts: the transport encodes
them (JSON with base64, msgpack, safetensors for the masked vector...) and the protocol never sees
a socket. Each has a ``stage`` field naming the stage it belongs to.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from fedcore.secagg.errors import ProtocolError, StageError
from fedcore.secagg.graph import effective_degree, graph_seed, neighbour_graph
from fedcore.secagg.quantize import Quantizer

MAX_CLIENT_ID = 2**32 - 1
MAX_ROUND_ID_LENGTH = 256
ID_BYTES = 4  # ids, counts and lengths are below 2^32: four bytes each on a compact wire


def session_id(run: int, round_: int, attempt: int, step: str | None = None) -> str:
    """The round id (``SecAggConfig.round_id``) of a Quorum session, which the server sets and
    every site checks: ``"<run>:<round>:<attempt>"`` for a training round attempt,
    ``"analysis:<run>:<step>:<attempt>"`` for an analysis step's (its round is 0).

    Args:
        run: the run's id.
        round_: the round's number (ignored for an analysis step).
        attempt: the attempt's number: a retried attempt gets a new id, so fresh keys.
        step: the analysis step's name, or None for a training round.
    """
    return f"{run}:{round_}:{attempt}" if step is None else f"analysis:{run}:{step}:{attempt}"


class Stage(StrEnum):
    """The stages of a round, in order, plus the two end states."""

    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    UNMASKING = "unmasking"
    DONE = "done"
    ABORTED = "aborted"


def _check_client_id(value: object, what: str = "client id") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_CLIENT_ID:
        raise ProtocolError(f"{what} must be an integer in [1, {MAX_CLIENT_ID}]")
    return value


def client_id_list(value: object, what: str) -> list[int]:
    """Validate a list of distinct client ids; ProtocolError otherwise."""
    if not isinstance(value, list | tuple):
        raise ProtocolError(f"{what} must be a list of client ids")
    ids = [_check_client_id(v, what) for v in value]
    if len(set(ids)) != len(ids):
        raise ProtocolError(f"{what} lists a client twice")
    return ids


def field(message: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    """``message[name]`` if present with the right type; ProtocolError otherwise."""
    if not isinstance(message, Mapping):
        raise ProtocolError("a secure-aggregation message is a mapping")
    value = message.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ProtocolError(f"field {name!r} is missing or of the wrong type")
    return value


def expect_stage(message: Mapping[str, Any], stage: Stage) -> None:
    """Refuse a message tagged for another stage."""
    got = field(message, "stage", str)
    if got != stage.value:
        raise StageError(f"a {got!r} message arrived during stage {stage.value!r}")


def records(
    message: Mapping[str, Any], name: str, id_key: str, payload_key: str, size: int
) -> dict[int, bytes]:
    """Parse a list of ``{id_key: id, payload_key: bytes}`` with fixed-size payloads."""
    items = field(message, name, list)
    parsed: dict[int, bytes] = {}
    for item in items:
        cid = _check_client_id(field(item, id_key, int), f"{name}.{id_key}")
        payload = field(item, payload_key, bytes)
        if len(payload) != size:
            raise ProtocolError(f"{name}.{payload_key} must be {size} bytes")
        if cid in parsed:
            raise ProtocolError(f"{name} lists client {cid} twice")
        parsed[cid] = payload
    return parsed


@dataclass(frozen=True)
class SecAggConfig:
    """Public parameters of one secure-aggregation round, sent to every client at the start.

    Attributes:
        round_id: unique id of the round (e.g. ``"<run uuid>:<round>"``); bound into every key,
            so secrets and ciphertexts of one round are useless in another. Never reuse one.
        client_ids: the roster, distinct ids in [1, 2^32); an id is also the Shamir evaluation
            point of its holder's shares.
        threshold: t, the number of share holders needed to reconstruct a secret, counted in the
            closed neighbourhood (a client and its neighbours; the whole round for the complete
            graph); 2 <= t <= degree + 1. Tolerates up to (neighbourhood size - t) dropouts; an
            adversary must corrupt t clients of a neighbourhood, with the server, to unmask one
            client. Choose t above half the neighbourhood so two disjoint groups can never both
            reach it.
        vector_length: P, values in each client's masked vector: ``P - count_length``
            quantised floats followed by ``count_length`` integer counts.
        clip: c; the float coordinates are clipped to [-c, c] (see ``Quantizer``).
        degree: neighbours per client (SecAgg+); None, or >= n - 1, for the complete graph.
        count_length: K, the trailing coordinates that carry non-negative integer counts, added
            as they are (not quantised) and summed exactly in Z_{2^32}: each is at most the
            quantiser's L, so n of them never wrap. 0: no counts.
    """

    round_id: str
    client_ids: tuple[int, ...]
    threshold: int
    vector_length: int
    clip: float = 1.0
    degree: int | None = None
    count_length: int = 0

    def __post_init__(self) -> None:
        """Normalise the roster and refuse inconsistent parameters (ValueError)."""
        if not isinstance(self.round_id, str) or not 1 <= len(self.round_id) <= MAX_ROUND_ID_LENGTH:
            raise ValueError(f"round_id must be a string of 1 to {MAX_ROUND_ID_LENGTH} characters")
        try:
            ids = tuple(sorted(client_id_list(list(self.client_ids), "client_ids")))
        except ProtocolError as exc:
            raise ValueError(str(exc)) from exc
        object.__setattr__(self, "client_ids", ids)
        n = len(ids)
        if n < 2:
            raise ValueError("secure aggregation needs at least two clients")
        if self.degree is not None and (not isinstance(self.degree, int) or self.degree < 1):
            raise ValueError("degree must be a positive integer or None")
        if not isinstance(self.threshold, int) or self.threshold < 2:
            raise ValueError("threshold must be an integer >= 2 (one share would be the secret)")
        neighbourhood = effective_degree(n, self.degree) + 1
        if self.threshold > neighbourhood:
            raise ValueError(
                f"threshold {self.threshold} exceeds the neighbourhood size {neighbourhood} "
                f"(degree {effective_degree(n, self.degree)} for {n} clients)"
            )
        if not isinstance(self.vector_length, int) or self.vector_length < 1:
            raise ValueError("vector_length must be a positive integer")
        if (
            isinstance(self.count_length, bool)
            or not isinstance(self.count_length, int)
            or not 0 <= self.count_length < self.vector_length
        ):
            raise ValueError("count_length must be an integer in [0, vector_length)")
        Quantizer(self.clip, n)  # validates clip and n

    @property
    def float_length(self) -> int:
        """The quantised float coordinates at the head of the vector: P - K."""
        return self.vector_length - self.count_length

    @property
    def n_clients(self) -> int:
        """Roster size n."""
        return len(self.client_ids)

    @property
    def quantizer(self) -> Quantizer:
        """The round's quantiser (its n is the roster size, so any subset's sum fits)."""
        return Quantizer(self.clip, self.n_clients)

    def graph(self, participants: Iterable[int]) -> dict[int, frozenset[int]]:
        """The neighbour graph over the participants who advertised keys."""
        return neighbour_graph(participants, self.degree, graph_seed(self.round_id))

    def to_message(self) -> dict[str, Any]:
        """The advertise-keys request that carries this configuration to a client."""
        message: dict[str, Any] = {
            "stage": Stage.ADVERTISE_KEYS.value,
            "round": self.round_id,
            "clients": list(self.client_ids),
            "threshold": self.threshold,
            "vector_length": self.vector_length,
            "clip": float(self.clip),
            "degree": 0 if self.degree is None else self.degree,  # 0: complete graph
        }
        if self.count_length:
            message["counts"] = self.count_length
        return message

    @classmethod
    def from_message(cls, message: Mapping[str, Any]) -> SecAggConfig:
        """Parse an advertise-keys request; ProtocolError if it is malformed."""
        expect_stage(message, Stage.ADVERTISE_KEYS)
        clip = field(message, "clip", (float, int))
        if not math.isfinite(clip):
            raise ProtocolError("clip must be finite")
        degree = field(message, "degree", int)
        counts = field(message, "counts", int) if "counts" in message else 0
        try:
            return cls(
                round_id=field(message, "round", str),
                client_ids=tuple(client_id_list(field(message, "clients", list), "clients")),
                threshold=field(message, "threshold", int),
                vector_length=field(message, "vector_length", int),
                clip=float(clip),
                degree=None if degree == 0 else degree,
                count_length=counts,
            )
        except ValueError as exc:
            if isinstance(exc, ProtocolError):
                raise
            raise ProtocolError(f"bad secure-aggregation parameters: {exc}") from exc


def message_nbytes(message: object) -> int:
    """Payload bytes of a message on a compact binary wire.

    Counts bytes at their length, str as UTF-8, int as 4 bytes, float as 8, and recurses into
    lists and dict values; dict keys (the schema) and the transport's framing are not counted.
    JSON with base64 adds about a third to the bytes fields.
    """
    if isinstance(message, bytes):
        return len(message)
    if isinstance(message, str):
        return len(message.encode("utf-8"))
    if isinstance(message, bool | int):
        return ID_BYTES
    if isinstance(message, float):
        return 8
    if isinstance(message, Mapping):
        return sum(message_nbytes(v) for v in message.values())
    if isinstance(message, list | tuple):
        return sum(message_nbytes(v) for v in message)
    raise TypeError(f"not a protocol value: {type(message).__name__}")
