"""Secure aggregation of an analysis step: one SecAgg coordinator per (run, step, attempt).

An analysis plan with ``"secure_aggregation": true`` (``fedcore.plan.analysis``) runs each step
as the clear path does (``federation.services.analysis``), except that a site's answer carries
no summary: its ``"masked"`` entry gives the summary's layout (names, shapes, kinds; fixed by
the request), and the summary rides in the count tail of a SecAgg vector
(``fedcore.analytics.secure``). When every asked site answered (or the step's deadline
passed), :func:`open_step` starts a coordinator over the sites that answered; the server then
learns the sum of their summaries and nothing else. The protocol is the one secure training
rounds run (``fedcore.secagg``; ``federation.secagg_rounds`` keeps a round's coordinator the
same way): keys advertised, shares sealed, masked inputs summed as they arrive, shares revealed
for the survivors' self masks and the dropouts' pairwise masks. A site that drops out after its
masked input is in the sum (the protocol recovers it); a site that drops out before is not.

The ``AnalysisSecAgg`` row holds the coordinator (public parameters and keys, sealed
ciphertexts, the running masked sum, then the unmasked sum). Every message of the step locks
the run's row, then this one (the orchestrator holds the run's when it calls :func:`outcome`),
so one message is handled at a time from any process. Stage deadlines: every stage waits the
plan's ``round_deadline_seconds``; the orchestrator is woken at each deadline
(``dispatch.enqueue_advance``) and its sweep closes a stage whose deadline passed. The row is
deleted once the orchestrator took the step's merge (:func:`forget`), or with the run.

Messages: the ``secagg`` control message of secure rounds, with ``"step"`` naming the analysis
step and ``"round"`` 0; the masked input travels in it too (``secagg.masked_input``, the
vector base64 in the payload: a summary is at most ``fedcore.analytics.secure.MAX_CELLS``
values), not as a binary ``masked_update`` (there is no model update to account for).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from django.db import transaction

from fedcore.analytics import secure
from fedcore.plan import AnalysisPlan, secagg_threshold
from fedcore.secagg import (
    ProtocolError,
    SecAggConfig,
    SecAggServer,
    Stage,
    StageError,
    effective_degree,
)
from fedcore.secagg import wire as secagg_wire
from fedcore.secure_updates import TASK_LIMBS
from federation import dispatch
from federation.models import AnalysisSecAgg, Run, SiloAnalysis
from federation.secagg_rounds import close_stages
from federation.services.audit import audit_append
from federation.services.updates import Refused

log = logging.getLogger("quorum.secagg")

_OPEN = (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.UNMASKING)
_TIMER_SLACK = 0.05
ATTEMPT = 1  # an aborted step withholds the run's result; it is not retried


def round_id(run_id: int, step: str, attempt: int) -> str:
    """The id bound into every key and ciphertext of the step's SecAgg session."""
    return f"analysis:{run_id}:{step}:{attempt}"


@dataclass
class StepCoordinator:
    """The server side of one analysis step's secure aggregation, loaded from its row."""

    run_id: int
    step: str
    attempt: int
    silo_of: dict[int, int]  # client id -> silo id
    server: SecAggServer
    layout: secure.Layout
    gone: set[int] = field(default_factory=set)
    error: str = ""
    notified: bool = False

    @property
    def client_of(self) -> dict[int, int]:
        return {silo: cid for cid, silo in self.silo_of.items()}

    @property
    def finished(self) -> bool:
        return self.server.stage in (Stage.DONE, Stage.ABORTED)


@dataclass(frozen=True)
class StepOutcome:
    """How a step's secure aggregation ended: the merged summary and its contributors' silo
    ids, or an error."""

    ok: bool
    contributors: tuple[int, ...] = ()
    summed: dict[str, np.ndarray] | None = None
    error: str = ""


def _config(params: dict[str, Any]) -> SecAggConfig:
    return SecAggConfig(
        round_id=params["round_id"],
        client_ids=tuple(range(1, len(params["silos"]) + 1)),
        threshold=params["threshold"],
        vector_length=params["vector_length"],
        clip=1.0,
        degree=None,
        count_length=params["count_length"],
    )


def _from_row(row: AnalysisSecAgg) -> StepCoordinator:
    params = row.params
    server = SecAggServer.restore(
        _config(params),
        row.state,
        None if row.vector is None else bytes(row.vector),
        stage_timeout=params["timeout"],
    )
    return StepCoordinator(
        run_id=row.run_id,
        step=row.step,
        attempt=row.attempt,
        silo_of={cid: silo for cid, silo in enumerate(params["silos"], start=1)},
        server=server,
        layout=params["layout"],
        gone=set(row.gone),
        error=row.error,
        notified=row.notified,
    )


def _save(coord: StepCoordinator) -> None:
    state, vector = coord.server.snapshot()
    AnalysisSecAgg.objects.filter(
        run_id=coord.run_id, step=coord.step, attempt=coord.attempt
    ).update(
        state=state,
        vector=vector,
        gone=sorted(coord.gone),
        error=coord.error,
        notified=coord.notified,
    )


@contextmanager
def _locked(run_id: int, step: str, attempt: int = ATTEMPT) -> Iterator[StepCoordinator | None]:
    """The step's coordinator, locked (the run's row, then its own), written back at the end."""
    with transaction.atomic():
        if not list(Run.objects.select_for_update().filter(pk=run_id).values_list("pk")):
            yield None
            return
        row = (
            AnalysisSecAgg.objects.select_for_update()
            .filter(run_id=run_id, step=step, attempt=attempt)
            .first()
        )
        if row is None:
            yield None
            return
        coord = _from_row(row)
        yield coord
        _save(coord)


def open_step(run: Run, plan: AnalysisPlan, step: str, silo_ids: list[int], spec: Any) -> None:
    """Start the step's coordinator over the silos that answered, in the orchestrator's
    transaction (the run locked): the row commits with it, the advertise-keys requests go out
    when it commits.

    Raises:
        ValueError: fewer than two silos, or a layout that does not make a vector.
    """
    silo_ids = sorted(silo_ids)
    n = len(silo_ids)
    vector_length, count_length = secure.vector_lengths(spec)
    params: dict[str, Any] = {
        "round_id": round_id(run.pk, step, ATTEMPT),
        "silos": silo_ids,
        "threshold": secagg_threshold(effective_degree(n, None) + 1, None),
        "vector_length": vector_length,
        "count_length": count_length,
        "layout": spec,
        "timeout": plan.round_deadline_seconds,
    }
    config = _config(params)
    server = SecAggServer(config, stage_timeout=params["timeout"])
    requests = server.start(time.time())
    state, vector = server.snapshot()
    row = AnalysisSecAgg.objects.create(
        run=run, step=step, attempt=ATTEMPT, params=params, state=state, vector=vector
    )
    coord = _from_row(row)
    _send(coord, requests, with_client_id=True)
    _schedule(coord)
    log.info(
        "run %s step %r: secure aggregation of %d silos' summaries, threshold %d, %d values",
        run.pk,
        step,
        n,
        config.threshold,
        count_length // TASK_LIMBS,
    )


def _send(
    coord: StepCoordinator, messages: dict[int, dict[str, Any]], *, with_client_id: bool = False
) -> None:
    for cid, message in sorted(messages.items()):
        if cid in coord.gone:
            continue
        event: dict[str, Any] = {
            "type": "secagg.message",
            "run": coord.run_id,
            "round": 0,
            "step": coord.step,
            "attempt": coord.attempt,
            "stage": message["stage"],
            "payload": secagg_wire.to_json(message),
        }
        if with_client_id:
            event["client"] = cid
        dispatch.send_to_silo(coord.silo_of[cid], event)


def _schedule(coord: StepCoordinator) -> None:
    """Wake the orchestrator at the current stage's deadline (its sweep does too)."""
    if coord.server.stage in _OPEN:
        countdown = max(0.0, coord.server.deadline - time.time()) + _TIMER_SLACK
        dispatch.enqueue_advance(coord.run_id, countdown=countdown)


def _advance(coord: StepCoordinator) -> None:
    """Close every stage that can close now and send the next requests (row locked)."""
    close_stages(
        coord,
        where=f"run {coord.run_id} step {coord.step!r}",
        what="summaries",
        send=_send,
        schedule=_schedule,
        audit=_audit,
        clock=time.time,  # this module's clock, read now (tests move it)
    )


def _audit(coord: StepCoordinator, action: str, **data: Any) -> None:
    run = Run.objects.select_related("plan").get(pk=coord.run_id)
    audit_append(
        actor="system",
        action=action,
        consortium_id=run.plan.consortium_id,
        object_type="run",
        object_id=coord.run_id,
        data={"step": coord.step, "attempt": coord.attempt, **data},
    )


def receive(*, silo_id: int, fields: dict[str, Any]) -> None:
    """A ``secagg`` message of an analysis step from a silo's agent (the masked input too).

    Raises:
        Refused: no such step in progress, a silo not in it or dropped out, a message for
            another stage (``wrong_round``), a malformed payload (``invalid_field``; the silo
            is then out of the step's sum).
    """
    try:
        message = secagg_wire.from_json(fields["payload"])
    except ProtocolError as exc:
        raise Refused("invalid_field", f"secagg payload: {exc}") from None
    if message.get("stage") != fields["stage"]:
        raise Refused("invalid_field", "the payload's stage differs from the message's")
    refused: Refused | None = None
    digest = None
    with _locked(fields["run"], fields["step"], fields["attempt"]) as coord:
        if coord is None or coord.finished:
            raise Refused(
                "wrong_round",
                f"step {fields['step']!r} of run {fields['run']} has no secure aggregation in "
                "progress",
            )
        cid = coord.client_of.get(silo_id)
        if cid is None or cid in coord.gone:
            raise Refused(
                "not_selected",
                f"this silo is not (or no longer) in the secure aggregation of step "
                f"{fields['step']!r}",
            )
        try:
            coord.server.collect(cid, message, time.time())
            if fields["stage"] == Stage.MASKED_INPUT.value:
                digest = hashlib.sha256(bytes(message["masked_vector"])).hexdigest()
        except StageError as exc:
            refused = Refused("wrong_round", f"secure aggregation: {exc}")
        except ProtocolError as exc:
            refused = Refused(
                "invalid_field", f"secure aggregation: {exc}; this silo is out of the step"
            )
        if digest is not None:
            # What the server keeps of the site's part: that it was masked in, and the digest
            # of the masked bytes (never the summary).
            row = SiloAnalysis.objects.filter(
                run_id=coord.run_id, silo_id=silo_id, step=coord.step
            ).first()
            if row is not None and isinstance(row.answer, dict):
                answer = dict(row.answer)
                answer["masked"] = {**answer.get("masked", {}), "sha256": digest}
                row.answer = answer
                row.save(update_fields=["answer"])
        _advance(coord)
    if refused is not None:
        raise refused


def silo_gone(silo_id: int, *, run_id: int | None = None) -> None:
    """A silo's connection ended or was replaced, or its agent reported an error about a run:
    a dropout of every analysis step's secure aggregation in progress (of that run, if given)."""
    rows = AnalysisSecAgg.objects.filter(run__status=Run.Status.RUNNING)
    if run_id is not None:
        rows = rows.filter(run_id=run_id)
    for run, step, attempt, params in rows.values_list("run_id", "step", "attempt", "params"):
        if silo_id not in params["silos"]:
            continue
        with _locked(run, step, attempt) as coord:
            if coord is None:
                continue
            cid = coord.client_of.get(silo_id)
            if cid is None or coord.finished or cid in coord.gone:
                continue
            coord.gone.add(cid)
            log.info(
                "run %s step %r: silo %s dropped out of secure aggregation at stage %s",
                run,
                step,
                silo_id,
                coord.server.stage,
            )
            _advance(coord)


def started(run_id: int, step: str) -> bool:
    """Whether the step's secure aggregation was opened."""
    return AnalysisSecAgg.objects.filter(run_id=run_id, step=step, attempt=ATTEMPT).exists()


def outcome(run_id: int, step: str) -> StepOutcome | None:
    """Where the step's secure aggregation stands: None while it runs, else its outcome (the
    orchestrator calls it with the run locked; a stage whose deadline passed closes first)."""
    with _locked(run_id, step) as coord:
        if coord is None:
            return StepOutcome(ok=False, error="secure aggregation has no state for this step")
        _advance(coord)
        if coord.server.stage is Stage.ABORTED:
            return StepOutcome(ok=False, error=coord.error or "secure aggregation aborted")
        if coord.server.stage is not Stage.DONE:
            return None
        contributors = coord.server.contributors
        check = float(coord.server.result[0])  # every site's float coordinate is 1.0
        if abs(check - len(contributors)) > 0.5:
            return StepOutcome(
                ok=False,
                error=f"the unmasked sum counts {check:.3f} sites, the roster {len(contributors)}",
            )
        summed = secure.from_cells(coord.server.counts.tolist(), coord.layout)
        return StepOutcome(
            ok=True,
            contributors=tuple(coord.silo_of[c] for c in contributors),
            summed=summed,
        )


def forget(run_id: int, step: str | None = None) -> None:
    """Drop a step's coordinator (every step's, by default) and what it holds."""
    rows = AnalysisSecAgg.objects.filter(run_id=run_id)
    if step is not None:
        rows = rows.filter(step=step)
    rows.delete()
