"""Run real clients and a real server in one process, and the protocol's wire cost per client."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from fedcore.secagg.client import CIPHERTEXT_BYTES, SHARE_BYTES, SecAggClient
from fedcore.secagg.errors import SecAggError
from fedcore.secagg.graph import effective_degree
from fedcore.secagg.messages import ID_BYTES, SecAggConfig, Stage, message_nbytes
from fedcore.secagg.primitives import KEY_BYTES
from fedcore.secagg.quantize import as_float_vector
from fedcore.secagg.server import SecAggServer

if TYPE_CHECKING:
    import torch

DROP_STAGES = ("advertise_keys", "share_keys", "after_masking", "unmasking")
_STAGES = (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.UNMASKING)
# The first stage at which a client dropped "at" each named point stays silent.
_SILENT_FROM = dict(zip(DROP_STAGES, range(4), strict=True))


@dataclass
class SimulationResult:
    """What an in-process round produced and cost.

    Attributes:
        total: dequantised float64 sum of the contributors' vectors.
        contributors: indices (into the input list) of the vectors in the sum.
        bytes_up: payload bytes each client sent, by index (see ``message_nbytes``).
        bytes_down: payload bytes each client received, by index.
        masked_vectors: each contributor's masked vector as it crossed the wire, by index.
        server: the server object after the round, for inspection.
    """

    total: np.ndarray
    contributors: list[int]
    bytes_up: dict[int, int] = field(default_factory=dict)
    bytes_down: dict[int, int] = field(default_factory=dict)
    masked_vectors: dict[int, np.ndarray] = field(default_factory=dict)
    server: SecAggServer | None = None


def run_simulation(
    vectors: Sequence[np.ndarray | torch.Tensor],
    threshold: int,
    dropouts: Iterable[int] = (),
    *,
    clip: float = 1.0,
    degree: int | None = None,
    drop_stage: str = "after_masking",
    round_id: str = "simulation",
    observer: Callable[[SecAggServer], None] | None = None,
) -> SimulationResult:
    """One secure-aggregation round with real client and server objects and a simulated clock.

    Client i (0-based) gets id i + 1. Dropped clients stay silent from ``drop_stage`` on, and the
    server closes that stage at its deadline.

    Args:
        vectors: one equally sized vector (array or tensor) per client.
        threshold: t, see ``SecAggConfig``.
        dropouts: indices of the clients that drop out.
        clip: c, see ``Quantizer``.
        degree: neighbours per client; None for the complete graph.
        drop_stage: when the dropouts happen: ``"advertise_keys"`` (never advertise keys),
            ``"share_keys"`` (advertise keys, then vanish), ``"after_masking"`` (share keys, so
            neighbours mask with them, but their masked vector never arrives) or ``"unmasking"``
            (their masked vector arrives, so it is in the sum, but they never help unmask).
        round_id: the round id bound into every key.
        observer: called with the server after every message it collects and every stage it
            closes (to inspect what it holds).

    Returns:
        The sum, the contributors and the per-client wire cost.

    Raises:
        NotEnoughSurvivorsError: too many dropouts for the threshold.
        ValueError: inconsistent arguments.
    """
    arrays = [as_float_vector(v) for v in vectors]
    if not arrays or any(a.size != arrays[0].size for a in arrays):
        raise ValueError("simulate needs one or more vectors of equal size")
    if drop_stage not in _SILENT_FROM:
        raise ValueError(f"drop_stage must be one of {DROP_STAGES}")
    n = len(arrays)
    dropped = set(dropouts)
    if not dropped <= set(range(n)):
        raise ValueError(f"dropouts must be indices in [0, {n})")
    ids = list(range(1, n + 1))
    config = SecAggConfig(round_id, tuple(ids), threshold, arrays[0].size, clip, degree)
    server = SecAggServer(config, stage_timeout=60.0)
    clients = {cid: SecAggClient(cid) for cid in ids}
    silent_from = _SILENT_FROM[drop_stage]
    up = dict.fromkeys(range(n), 0)
    down = dict.fromkeys(range(n), 0)
    masked: dict[int, np.ndarray] = {}
    clock = 0.0
    outbox = server.start(clock)
    for index, stage in enumerate(_STAGES):
        for cid, request in outbox.items():
            down[cid - 1] += message_nbytes(request)
            if cid - 1 in dropped and index >= silent_from:
                continue
            reply = _answer(clients[cid], stage, request, arrays[cid - 1])
            if reply is None:
                continue  # the client refused and aborted: to the server it dropped out
            up[cid - 1] += message_nbytes(reply)
            if stage is Stage.MASKED_INPUT:
                masked[cid - 1] = np.frombuffer(reply["masked_vector"], dtype="<u4").copy()
            server.collect(cid, reply, clock)
            if observer:
                observer(server)
        if not server.ready(clock):
            clock = server.deadline  # the silent ones never answer: let the stage time out
        outbox = server.advance(clock)
        if observer:
            observer(server)
    return SimulationResult(
        total=server.result,
        contributors=[cid - 1 for cid in server.contributors],
        bytes_up=up,
        bytes_down=down,
        masked_vectors={i: masked[i] for i in sorted(masked)},
        server=server,
    )


def _answer(
    client: SecAggClient, stage: Stage, request: dict[str, Any], vector: np.ndarray
) -> dict[str, Any] | None:
    try:
        if stage is Stage.ADVERTISE_KEYS:
            return client.advertise_keys(request)
        if stage is Stage.SHARE_KEYS:
            return client.share_keys(request)
        if stage is Stage.MASKED_INPUT:
            return client.masked_input(request, vector)
        return client.unmask(request)
    except SecAggError:
        return None


def simulate(
    vectors: Sequence[np.ndarray | torch.Tensor],
    threshold: int,
    dropouts: Iterable[int] = (),
    *,
    clip: float = 1.0,
    degree: int | None = None,
    drop_stage: str = "after_masking",
) -> np.ndarray:
    """Securely sum ``vectors`` in-process with real clients and server; return the sum.

    The sum is of the surviving clients' vectors (all but ``dropouts``, except with
    ``drop_stage="unmasking"``, where the dropped clients' vectors had already arrived and are
    included), within ``len(contributors) * clip / Quantizer.levels`` per coordinate of the
    clipped sum. Arguments as in ``run_simulation``, which also reports contributors and bytes.
    """
    return run_simulation(
        vectors, threshold, dropouts, clip=clip, degree=degree, drop_stage=drop_stage
    ).total


def bytes_per_client(
    n: int, degree: int | None, vector_length: int, *, round_id: str = "simulation"
) -> dict[str, int]:
    """Payload bytes one client sends and receives in a round without dropouts.

    Upload: 2 public keys, one 164-byte ciphertext per neighbour, 4 * P bytes of masked vector,
    and one 64-byte share per member of its closed neighbourhood. Download: the parameters and
    roster (4 bytes per client), the neighbours' keys, their ciphertexts and the survivor list.
    Counted as ``message_nbytes`` counts (no field names, no framing); measured equal in the tests.

    Args:
        n: clients in the round.
        degree: requested degree (None: complete graph).
        vector_length: P.
        round_id: the round id (its length is part of the first request).

    Returns:
        ``{"upload", "download", "total"}`` in bytes.
    """
    k = effective_degree(n, degree)
    tag = {stage: len(stage.value) for stage in _STAGES}
    record = ID_BYTES + CIPHERTEXT_BYTES
    upload = (
        tag[Stage.ADVERTISE_KEYS] + 2 * KEY_BYTES
        + tag[Stage.SHARE_KEYS] + k * record
        + tag[Stage.MASKED_INPUT] + 4 * vector_length
        + tag[Stage.UNMASKING] + (k + 1) * (ID_BYTES + SHARE_BYTES)
    )  # fmt: skip
    download = (
        tag[Stage.ADVERTISE_KEYS] + len(round_id.encode()) + n * ID_BYTES + 3 * ID_BYTES + 8
        + tag[Stage.SHARE_KEYS] + n * ID_BYTES + k * (ID_BYTES + 2 * KEY_BYTES)
        + tag[Stage.MASKED_INPUT] + k * record
        + tag[Stage.UNMASKING] + (k + 1) * ID_BYTES
    )  # fmt: skip
    return {"upload": upload, "download": download, "total": upload + download}
