"""Secure rounds on the server: one ``fedcore.secagg.SecAggServer`` coordinator per round attempt.

A plan with ``"secure_aggregation": true`` runs every round attempt through SecAgg (SecAgg+ for
a sparse graph) so the server learns the sum of the sites' updates and nothing else: no
individual update is written to blob storage, to the database or kept in memory.

Life of a secure round attempt (docs/protocol.md, "Secure aggregation", has the messages):

1. The orchestrator opens the round (``_open_round``) and calls :func:`open_round` in its
   transaction. On commit, a coordinator is created for the attempt: the selected silos, sorted
   by silo id, get client ids 1..n; the round id bound into every key is
   ``"<run>:<round>:<attempt>"``; the threshold is ``fedcore.plan.secagg_threshold``; the quantiser
   range is the plan's ``secagg.clip`` (client-DP plans: ``fedcore.secure_updates.
   dp_quantiser_clip``). Each silo gets its task (as in any round) and the advertise-keys request.
2. Agents answer each stage with a ``secagg`` control message, the masked-input stage with a
   binary ``masked_update`` (after local training). The consumer hands them to :func:`receive` /
   :func:`receive_masked`, which feed ``SecAggServer.collect`` under the coordinator's lock and,
   once every awaited silo answered, close the stage and send the next requests.
3. Stage deadlines: advertise-keys, share-keys and unmasking wait ``secagg.stage_timeout_seconds``
   each; masked-input (which includes local training) waits ``round_deadline_seconds``. A timer
   on the orchestration thread (``dispatch.backend().enqueue(tick, ..., countdown=...)``) and the
   orchestrator's sweep (:func:`outcome`) close a stage whose deadline passed. Silos that did not
   answer in time are dropouts from then on. A silo that disconnects, reconnects, or reports an
   error about the round is a dropout at once: the stage closes as soon as everyone else answered.
   Nothing waits forever: the round ends after at most 3 stage timeouts + the round deadline.
4. After unmasking, the coordinator holds the dequantised sum of the contributors' vectors; the
   orchestrator (``_close_if_due``) moves the round to aggregating when :func:`outcome` says it is
   done with at least ``min_silos`` contributors, and ``_combine`` builds the new global model
   from the sum (:func:`mean_state`), through the plan's strategy (server optimisers apply their
   step to the mean). A coordinator that aborts (fewer than t silos left at some stage, shares
   that do not reconstruct) fails the round, which is retried as any failed round.

What the server keeps: ``SecAggServer`` adds each masked vector to one running uint32 sum on
arrival (``stored_vectors()`` shows it), the ``Update`` row records the example count, metrics,
nonce and the SHA-256 of the *masked* bytes with an empty blob key, and the audit log records
``update.accepted`` with ``"masked": true``.

Where coordinators live: in the memory of the process that runs orchestration. In the embedded
profile that is the server process (orchestration thread + the consumers' threads, hence the
per-coordinator lock). Known limitation for the production profile (Celery workers and several
ASGI processes): a round's coordinator must be pinned to one process that also receives every
agent message of the round (e.g. a dedicated "secagg" worker with a channel-layer group per round,
or sticky routing). That is not built: in production this module starts no coordinator, and the
round fails with a message saying so. A server restart during a secure round likewise loses the
coordinator: the round fails and is retried (a new attempt, fresh keys).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from django.db import transaction

from fedcore import secure_updates
from fedcore.plan import RunSettings, secagg_settings, secagg_threshold
from fedcore.privacy import accounting as dp_accounting
from fedcore.privacy.client_dp import DistributedNoise
from fedcore.secagg import (
    ProtocolError,
    SecAggConfig,
    SecAggError,
    SecAggServer,
    Stage,
    StageError,
    effective_degree,
)
from fedcore.secagg import wire as secagg_wire
from federation import dispatch, ledger
from federation.services.updates import Refused, masked_update_receive

log = logging.getLogger("quorum.secagg")

MODE_WEIGHTED = "weighted"
MODE_CLIENT_DP = "client_dp"
_OPEN = (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.UNMASKING)
_TIMER_SLACK = 0.05


@dataclass
class Coordinator:
    """The server side of one secure round attempt."""

    run_id: int
    round_pk: int
    number: int
    attempt: int
    silo_of: dict[int, int]  # client id -> silo id
    server: SecAggServer
    mode: str
    max_examples: int
    selected: int
    dp_clip: float = 0.0
    noise_multiplier: float = 0.0
    delta: float = 0.0
    gone: set[int] = field(default_factory=set)  # client ids known to have dropped out
    error: str = ""
    notified: bool = False  # the orchestrator was told the outcome
    lock: threading.RLock = field(default_factory=threading.RLock)

    @property
    def client_of(self) -> dict[int, int]:
        """Silo id -> client id."""
        return {silo: cid for cid, silo in self.silo_of.items()}

    @property
    def finished(self) -> bool:
        """Whether the coordinator is done (sum ready) or aborted."""
        return self.server.stage in (Stage.DONE, Stage.ABORTED)


@dataclass(frozen=True)
class Outcome:
    """How a secure round attempt ended: ``ok`` with its contributors' silo ids, or an error."""

    ok: bool
    contributors: tuple[int, ...] = ()
    error: str = ""


_registry: dict[int, Coordinator] = {}
_registry_lock = threading.Lock()


def is_secure(spec: dict[str, Any]) -> bool:
    """Whether a plan runs its rounds with secure aggregation."""
    return spec.get("secure_aggregation") is True


def min_silos(cfg: RunSettings) -> int:
    """The fewest silos a secure round can start with: the plan's minimum, and at least 2."""
    return max(cfg.min_silos, 2)


def coordinator(round_pk: int) -> Coordinator | None:
    """The live coordinator of a round attempt (by Round primary key), if this process has it."""
    with _registry_lock:
        return _registry.get(round_pk)


def _find(run_id: int, number: int, attempt: int) -> Coordinator | None:
    with _registry_lock:
        for coord in _registry.values():
            if (coord.run_id, coord.number, coord.attempt) == (run_id, number, attempt):
                return coord
    return None


def stored_vectors(round_pk: int) -> dict[str, np.ndarray]:
    """Every P-vector the round's coordinator holds now (``SecAggServer.stored_vectors``)."""
    coord = coordinator(round_pk)
    if coord is None:
        return {}
    with coord.lock:
        return coord.server.stored_vectors()


# -- opening a round ---------------------------------------------------------------------------


def open_round(round_: Any, silos: Iterable[Any], spec: dict[str, Any], cfg: RunSettings) -> None:
    """Create the round attempt's coordinator when the orchestrator's transaction commits.

    Called from ``orchestrator._open_round`` inside its transaction, after the round and its
    selection are written. In the production profile no coordinator is started (see the module
    docstring): :func:`outcome` then fails the round with the reason.
    """
    if not dispatch.can_coordinate_in_process():
        log.error(
            "run %s round %s: secure aggregation needs the embedded profile for now",
            round_.run_id,
            round_.number,
        )
        return
    silo_ids = sorted(s.pk for s in silos)
    params = _round_params(round_, spec, cfg, len(silo_ids))
    transaction.on_commit(lambda: _start(round_, silo_ids, params))


def _vector_length(run_id: int, number: int) -> int:
    from federation.models import ModelVersion

    signature = ModelVersion.objects.get(run_id=run_id, number=number - 1).signature
    return 1 + sum(
        math.prod(shape)
        for dtype, shape in signature.values()
        if getattr(torch, dtype).is_floating_point
    )


def _round_params(round_: Any, spec: dict[str, Any], cfg: RunSettings, n: int) -> dict[str, Any]:
    sa = secagg_settings(spec)
    assert sa is not None
    degree = sa.degree if sa.degree is not None and sa.degree < n - 1 else None
    threshold = secagg_threshold(effective_degree(n, degree) + 1, sa.threshold)
    params: dict[str, Any] = {
        "threshold": threshold,
        "degree": degree,
        "vector_length": _vector_length(round_.run_id, round_.number),
        "clip": sa.clip,
        "mode": MODE_WEIGHTED,
        "max_examples": sa.max_examples,
        "timeouts": {
            Stage.ADVERTISE_KEYS.value: sa.stage_timeout_seconds,
            Stage.SHARE_KEYS.value: sa.stage_timeout_seconds,
            Stage.MASKED_INPUT.value: cfg.round_deadline_seconds,
            Stage.UNMASKING.value: sa.stage_timeout_seconds,
        },
    }
    privacy = spec.get("privacy") or {}
    if privacy.get("mode", "none") == "client":
        training = spec["training"]
        z = dp_accounting.plan_noise_multiplier(
            privacy,
            rows=1,
            batch_size=training["batch_size"],
            local_epochs=training["local_epochs"],
            rounds=training["rounds"],
            accountant=ledger.ACCOUNTANT,
        )
        assert z is not None
        clip = float(privacy["clip"])
        params.update(
            mode=MODE_CLIENT_DP,
            dp_clip=clip,
            noise_multiplier=float(z),
            delta=float(privacy.get("delta", 1e-5)),
            clip=secure_updates.dp_quantiser_clip(clip, z, threshold),
        )
    return params


def _start(round_: Any, silo_ids: list[int], params: dict[str, Any]) -> None:
    config = SecAggConfig(
        round_id=f"{round_.run_id}:{round_.number}:{round_.attempt}",
        client_ids=tuple(range(1, len(silo_ids) + 1)),
        threshold=params["threshold"],
        vector_length=params["vector_length"],
        clip=params["clip"],
        degree=params["degree"],
    )
    coord = Coordinator(
        run_id=round_.run_id,
        round_pk=round_.pk,
        number=round_.number,
        attempt=round_.attempt,
        silo_of={cid: silo for cid, silo in enumerate(silo_ids, start=1)},
        server=SecAggServer(config, stage_timeout=params["timeouts"]),
        mode=params["mode"],
        max_examples=params["max_examples"],
        selected=len(silo_ids),
        dp_clip=params.get("dp_clip", 0.0),
        noise_multiplier=params.get("noise_multiplier", 0.0),
        delta=params.get("delta", 0.0),
    )
    with _registry_lock:
        _registry[round_.pk] = coord
    with coord.lock:
        requests = coord.server.start(time.monotonic())
        _send(coord, requests, with_client_id=True)
        _schedule(coord)
    log.info(
        "run %s round %s.%s: secure aggregation with %d silos, threshold %d, %d values each",
        coord.run_id,
        coord.number,
        coord.attempt,
        len(silo_ids),
        config.threshold,
        config.vector_length,
    )


def _send(
    coord: Coordinator, messages: dict[int, dict[str, Any]], *, with_client_id: bool = False
) -> None:
    for cid, message in sorted(messages.items()):
        if cid in coord.gone:
            continue
        event: dict[str, Any] = {
            "type": "secagg.message",
            "run": coord.run_id,
            "round": coord.number,
            "attempt": coord.attempt,
            "stage": message["stage"],
            "payload": secagg_wire.to_json(message),
        }
        if with_client_id:
            event["client"] = cid
        dispatch.send_to_silo(coord.silo_of[cid], event)


def _schedule(coord: Coordinator) -> None:
    """A timer that closes the current stage at its deadline (embedded profile)."""
    stage = coord.server.stage
    if stage not in _OPEN:
        return
    countdown = max(0.0, coord.server.deadline - time.monotonic()) + _TIMER_SLACK
    dispatch.enqueue(dispatch.SECAGG_TICK, coord.round_pk, stage.value, countdown=countdown)


# -- stages ------------------------------------------------------------------------------------


def tick(round_pk: int, stage: str) -> None:
    """Timer: close the round's stage if its deadline passed (a later stage ignores it)."""
    coord = coordinator(round_pk)
    if coord is None:
        return
    with coord.lock:
        if coord.server.stage is not None and coord.server.stage.value == stage:
            _advance(coord)


def _advance(coord: Coordinator) -> None:
    """Close every stage that can close now and send the next requests. Caller holds the lock.

    A stage closes when every silo it waits for answered or is known to be gone (disconnected,
    reconnected, reported an error), else at its deadline.
    """
    while coord.server.stage in _OPEN:
        for cid in coord.gone:
            coord.server.drop(cid)
        now = time.monotonic()
        if not coord.server.ready(now):
            break
        stage = coord.server.stage
        assert stage is not None
        try:
            messages = coord.server.advance(now)
        except SecAggError as exc:
            coord.error = f"secure aggregation stopped at stage {stage.value}: {exc}"
            log.warning(
                "run %s round %s.%s: %s", coord.run_id, coord.number, coord.attempt, coord.error
            )
            break
        if coord.server.stage is Stage.DONE:
            log.info(
                "run %s round %s.%s: unmasked the sum of %d silos' updates",
                coord.run_id,
                coord.number,
                coord.attempt,
                len(coord.server.contributors),
            )
            break
        _send(coord, messages)
        _schedule(coord)
    if coord.finished and not coord.notified:
        coord.notified = True
        dispatch.enqueue_advance(coord.run_id)


def _client_id(coord: Coordinator, silo_id: int) -> int:
    cid = coord.client_of.get(silo_id)
    if cid is None:
        raise Refused("not_selected", f"this silo was not selected for round {coord.number}")
    if cid in coord.gone:
        raise Refused(
            "wrong_round",
            f"this silo dropped out of round {coord.number} attempt {coord.attempt} "
            "(it reconnected, disconnected or reported an error)",
        )
    return cid


def _live(fields: dict[str, Any]) -> Coordinator:
    coord = _find(fields["run"], fields["round"], fields["attempt"])
    if coord is None or coord.finished:
        raise Refused(
            "wrong_round",
            f"round {fields['round']} attempt {fields['attempt']} of run {fields['run']} has no "
            "secure aggregation in progress",
        )
    return coord


def receive(*, silo_id: int, fields: dict[str, Any]) -> None:
    """A ``secagg`` control message from a silo's agent: feed it to the round's coordinator.

    Raises:
        Refused: no such secure round in progress, a silo not in it or dropped out, a message
            for another stage or after the deadline (``wrong_round``), a malformed payload
            (``invalid_field``; the silo is then excluded from the attempt).
    """
    coord = _live(fields)
    cid = _client_id(coord, silo_id)
    if fields["stage"] == Stage.MASKED_INPUT.value:
        raise Refused("invalid_field", "the masked input is sent as a binary masked_update")
    try:
        message = secagg_wire.from_json(fields["payload"])
    except ProtocolError as exc:
        raise Refused("invalid_field", f"secagg payload: {exc}") from None
    if message.get("stage") != fields["stage"]:
        raise Refused("invalid_field", "the payload's stage differs from the message's")
    _collect(coord, cid, message)
    with coord.lock:
        _advance(coord)


def _collect(coord: Coordinator, cid: int, message: dict[str, Any]) -> None:
    with coord.lock:
        try:
            coord.server.collect(cid, message, time.monotonic())
        except StageError as exc:
            raise Refused("wrong_round", f"secure aggregation: {exc}") from None
        except ProtocolError as exc:
            raise Refused(
                "invalid_field", f"secure aggregation: {exc}; this silo is out of the round"
            ) from None


def receive_masked(*, silo_id: int, fields: dict[str, Any], payload: bytes) -> None:
    """A ``masked_update`` from a silo's agent: account for it and add it to the masked sum.

    Raises:
        Refused: as :func:`receive`, or as ``services.updates.masked_update_receive``.
    """
    coord = _live(fields)
    cid = _client_id(coord, silo_id)
    message = {"stage": Stage.MASKED_INPUT.value, "masked_vector": bytes(payload)}
    masked_update_receive(
        silo_id=silo_id,
        fields=fields,
        payload=payload,
        collect=lambda: _collect(coord, cid, message),
    )
    with coord.lock:
        _advance(coord)


def silo_gone(silo_id: int, *, run_id: int | None = None, number: int | None = None) -> None:
    """A silo's connection ended or was replaced, or its agent reported an error about a round:
    it is a dropout of every secure round attempt in progress (of that run and round, if
    given), so stages stop waiting for it."""
    with _registry_lock:
        coords = list(_registry.values())
    for coord in coords:
        if run_id is not None and (coord.run_id, coord.number) != (run_id, number):
            continue
        with coord.lock:
            cid = coord.client_of.get(silo_id)
            if cid is None or coord.finished or cid in coord.gone:
                continue
            coord.gone.add(cid)
            log.info(
                "run %s round %s.%s: silo %s dropped out of secure aggregation at stage %s",
                coord.run_id,
                coord.number,
                coord.attempt,
                silo_id,
                coord.server.stage,
            )
            _advance(coord)


def is_dropout(round_pk: int, silo_id: int) -> bool:
    """Whether the silo dropped out of the round attempt's secure aggregation (it gets no task)."""
    coord = coordinator(round_pk)
    if coord is None:
        return False
    with coord.lock:
        cid = coord.client_of.get(silo_id)
        return cid is not None and cid in coord.gone


# -- closing the round -------------------------------------------------------------------------


def outcome(round_: Any) -> Outcome | None:
    """Where a collecting secure round attempt stands: None while it runs, else its Outcome.

    Closes a stage whose deadline passed first (the sweeper calls this through the orchestrator
    every few seconds, so a lost timer only delays a stage).
    """
    coord = coordinator(round_.pk)
    if coord is None:
        where = (
            "the production profile (its coordinator must be pinned to one process; see "
            "federation/secagg_rounds.py)"
            if not dispatch.can_coordinate_in_process()
            else "this server process (it restarted during the round)"
        )
        return Outcome(ok=False, error=f"secure aggregation is not running in {where}")
    with coord.lock:
        _advance(coord)
        if coord.server.stage is Stage.DONE:
            return Outcome(
                ok=True, contributors=tuple(coord.silo_of[c] for c in coord.server.contributors)
            )
        if coord.server.stage is Stage.ABORTED:
            return Outcome(ok=False, error=coord.error or "secure aggregation aborted")
    return None


def mean_state(
    round_: Any,
    global_state: dict[str, torch.Tensor],
    updates: list[dict[str, Any]],
) -> tuple[dict[str, torch.Tensor], dict[str, float] | None]:
    """The round's mean model from the coordinator's unmasked sum, never from single updates.

    Weighted plans: the example-weighted mean of the contributors' (clipped) deltas, added to
    the global model. Client-DP plans: the sum of the clipped, noised deltas divided by the
    number of silos selected (DP-FedAvg's fixed denominator), plus what the ledger records:
    the plan's noise multiplier z, never more (contributors beyond t could collude with the
    server and subtract their own noise shares).

    Raises:
        ValueError: no finished coordinator, contributors that do not match the accepted
            masked updates, or a weight coordinate that disagrees with the example counts.
    """
    coord = coordinator(round_.pk)
    if coord is None or coord.server.stage is not Stage.DONE:
        raise ValueError("the round's secure-aggregation sum is not available in this process")
    with coord.lock:
        total = coord.server.result.copy()
        contributors = {coord.silo_of[c] for c in coord.server.contributors}
        quantizer = coord.server.config.quantizer
    accepted = {u["silo_id"]: u for u in updates}
    if set(accepted) != contributors:
        raise ValueError(
            f"the unmasked sum holds silos {sorted(contributors)}, the accepted masked updates "
            f"are from {sorted(accepted)}"
        )
    m = len(contributors)
    clip = quantizer.clip
    tolerance = 2 * m / quantizer.levels + 1e-9
    if coord.mode == MODE_CLIENT_DP:
        expected, denominator = float(m), float(coord.selected)
    else:
        expected = sum(
            secure_updates.example_weight(accepted[s]["num_examples"], coord.max_examples)
            for s in contributors
        )
        denominator = expected
    weights = total[-1] / clip
    if abs(weights - expected) > tolerance * max(1.0, expected):
        raise ValueError(
            f"the unmasked weight coordinate is {weights:.9g}, the accepted masked updates "
            f"declare {expected:.9g}"
        )
    state = secure_updates.mean_state(total, global_state, denominator=denominator)
    if coord.mode != MODE_CLIENT_DP:
        return state, None
    threshold = coord.server.config.threshold
    noise = DistributedNoise(total_std=coord.noise_multiplier * coord.dp_clip, threshold=threshold)
    effective = min(coord.noise_multiplier, noise.effective_std(m) / coord.dp_clip)
    return state, {"noise_multiplier": effective, "delta": coord.delta}


def forget(round_pk: int) -> None:
    """Drop a round attempt's coordinator and everything it holds (after the round ended)."""
    with _registry_lock:
        _registry.pop(round_pk, None)
