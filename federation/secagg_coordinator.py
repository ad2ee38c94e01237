"""One SecAgg coordinator on the server, kept in a database row, whatever it sums.

Secure aggregation (``fedcore.secagg``) runs for a training round attempt
(``federation.secagg_rounds``, a ``SecAggAttempt`` row) and for a federated-analysis step
(``federation.secagg_analysis``, an ``AnalysisSecAgg`` row). What the two share lives here, once:
the coordinator loaded from its row and written back, the stage requests sent to the silos, the
stage loop (drop the gone, advance, send, arm the deadline; on an abort record the reason and
audit ``secagg.aborted``; when finished wake the orchestrator), a silo's message collected and a
silo's dropout. A subclass says what differs: the row it lives in, the fields that name the
session on the wire and in the audit log, how its deadline is armed, and what happens when the
sum is unmasked.

Every clock read here is this module's ``time.time`` (tests move it to pass a deadline).
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from django.db import transaction

from fedcore.secagg import (
    ProtocolError,
    SecAggConfig,
    SecAggError,
    SecAggServer,
    Stage,
    StageError,
)
from fedcore.secagg import wire as secagg_wire
from federation import dispatch
from federation.models import Run
from federation.services.audit import audit_append
from federation.services.updates import Refused

log = logging.getLogger("quorum.secagg")

OPEN_STAGES = (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.UNMASKING)
_TIMER_SLACK = 0.05


def session_config(
    params: dict[str, Any], *, clip: float, degree: int | None, count_length: int
) -> SecAggConfig:
    """The session's public parameters from its row's ``params``: client ids 1..n for the
    silos in ``params["silos"]`` (sorted by silo id), the round id bound into every key, the
    threshold and the vector's length."""
    return SecAggConfig(
        round_id=params["round_id"],
        client_ids=tuple(range(1, len(params["silos"]) + 1)),
        threshold=params["threshold"],
        vector_length=params["vector_length"],
        clip=clip,
        degree=degree,
        count_length=count_length,
    )


def stored(row: Any, config: SecAggConfig, timeouts: Any) -> dict[str, Any]:
    """The fields every coordinator loads from its row (``silo_of``, ``server``, ``gone``,
    ``error``, ``notified``)."""
    return {
        "silo_of": {cid: silo for cid, silo in enumerate(row.params["silos"], start=1)},
        "server": SecAggServer.restore(
            config,
            row.state,
            None if row.vector is None else bytes(row.vector),
            stage_timeout=timeouts,
        ),
        "gone": set(row.gone),
        "error": row.error,
        "notified": row.notified,
    }


def start(config: SecAggConfig, timeouts: Any) -> tuple[dict[int, dict[str, Any]], Any, Any]:
    """A new session's advertise-keys requests and the state and vector to store in its row."""
    server = SecAggServer(config, stage_timeout=timeouts)
    requests = server.start(time.time())
    state, vector = server.snapshot()
    return requests, state, vector


def parse_message(fields: dict[str, Any]) -> dict[str, Any]:
    """A silo's ``secagg`` payload, decoded and checked against the message's stage.

    Raises:
        Refused: a malformed payload, or one for another stage (``invalid_field``).
    """
    try:
        message = secagg_wire.from_json(fields["payload"])
    except ProtocolError as exc:
        raise Refused("invalid_field", f"secagg payload: {exc}") from None
    if message.get("stage") != fields["stage"]:
        raise Refused("invalid_field", "the payload's stage differs from the message's")
    return message


def audit_run(run_id: int, action: str, data: dict[str, Any]) -> None:
    """Append a system event about a secure session to the run's consortium's audit log."""
    run = Run.objects.select_related("plan").get(pk=run_id)
    audit_append(
        actor="system",
        action=action,
        consortium_id=run.plan.consortium_id,
        object_type="run",
        object_id=run_id,
        data=data,
    )


C = TypeVar("C", bound="SecAggCoordinator")


@contextmanager
def locked(load: Callable[[], C | None]) -> Iterator[C | None]:
    """The coordinator ``load`` returns (it locks the rows, parent first), in one transaction,
    written back when the block ends; an exception in the block rolls every change back."""
    with transaction.atomic():
        coord = load()
        yield coord
        if coord is not None:
            coord.save()


@dataclass(kw_only=True)
class SecAggCoordinator(ABC):
    """The server side of one SecAgg session, as loaded from its row (a subclass per row)."""

    run_id: int
    attempt: int
    silo_of: dict[int, int]  # client id -> silo id
    server: SecAggServer
    gone: set[int] = field(default_factory=set)  # client ids known to have dropped out
    error: str = ""
    notified: bool = False  # the orchestrator was told the outcome

    what: ClassVar[str]  # what the sum adds up, for the log: "updates", "summaries"
    unit: ClassVar[str]  # what a silo that sent garbage is out of: "round", "step"

    # -- what a kind of session says -------------------------------------------------------

    @property
    @abstractmethod
    def where(self) -> str:
        """The session in a log line (``run 3 round 2.1``)."""
        ...

    @abstractmethod
    def address(self) -> dict[str, Any]:
        """The fields that name the session in a ``secagg.message`` (run, round, ..., attempt)."""
        ...

    @abstractmethod
    def audit_key(self) -> dict[str, Any]:
        """The fields that name the session in an audit event."""
        ...

    @abstractmethod
    def rows(self) -> Any:
        """The query of the session's row."""
        ...

    def saved(self) -> dict[str, Any]:
        """Columns of the row a kind of session keeps beyond the shared ones."""
        return {}

    @abstractmethod
    def arm(self, stage: Stage, countdown: float) -> None:
        """Have the stage closed (or looked at) ``countdown`` seconds after the commit."""
        ...

    def on_done(self) -> None:  # noqa: B027 (an optional hook; nothing to keep by default)
        """The sum is unmasked (row locked): keep what the kind of session needs of it."""

    # -- shared ----------------------------------------------------------------------------

    @property
    def client_of(self) -> dict[int, int]:
        """Silo id -> client id."""
        return {silo: cid for cid, silo in self.silo_of.items()}

    @property
    def finished(self) -> bool:
        """Whether the coordinator is done (sum ready) or aborted."""
        return self.server.stage in (Stage.DONE, Stage.ABORTED)

    def save(self) -> None:
        """Write the coordinator back to its row (locked)."""
        state, vector = self.server.snapshot()
        self.rows().update(
            state=state,
            vector=vector,
            gone=sorted(self.gone),
            error=self.error,
            notified=self.notified,
            **self.saved(),
        )

    def send(self, messages: dict[int, dict[str, Any]], *, with_client_id: bool = False) -> None:
        """Send stage requests to their silos (not to the gone) when the transaction commits."""
        for cid, message in sorted(messages.items()):
            if cid in self.gone:
                continue
            event: dict[str, Any] = {
                "type": "secagg.message",
                **self.address(),
                "stage": message["stage"],
                "payload": secagg_wire.to_json(message),
            }
            if with_client_id:
                event["client"] = cid
            dispatch.send_to_silo(self.silo_of[cid], event)

    def schedule(self) -> None:
        """Arm the current stage's deadline when the transaction commits (the orchestrator's
        sweep closes a stage whose deadline passed too, if the timer is lost with a process)."""
        stage = self.server.stage
        if stage in OPEN_STAGES:
            self.arm(stage, max(0.0, self.server.deadline - time.time()) + _TIMER_SLACK)

    def audit(self, action: str, **data: Any) -> None:
        """Append a system event about this session to the audit log."""
        audit_run(self.run_id, action, {**self.audit_key(), **data})

    def open(self, requests: dict[int, dict[str, Any]]) -> None:
        """A new session: send the advertise-keys requests (with each silo's client id) and arm
        the first deadline, when the transaction commits."""
        self.send(requests, with_client_id=True)
        self.schedule()

    def collect(self, cid: int, message: dict[str, Any]) -> None:
        """Hand a silo's message to the server.

        Raises:
            Refused: a message for another stage or after the deadline (``wrong_round``), a
                malformed one (``invalid_field``; the server then holds the silo out).
        """
        try:
            self.server.collect(cid, message, time.time())
        except StageError as exc:
            raise Refused("wrong_round", f"secure aggregation: {exc}") from None
        except ProtocolError as exc:
            raise Refused(
                "invalid_field", f"secure aggregation: {exc}; this silo is out of the {self.unit}"
            ) from None

    def feed(
        self, cid: int, message: dict[str, Any], *, collected: Callable[[], None] | None = None
    ) -> Refused | None:
        """Collect a silo's message (then ``collected()``), and close what can close. A refusal
        is returned, to be raised once the row is written: the server's state changed (the
        silo is out) and is kept."""
        refused: Refused | None = None
        try:
            self.collect(cid, message)
        except Refused as exc:
            refused = exc
        else:
            if collected is not None:
                collected()
        self.advance()
        return refused

    def drop(self, silo_id: int) -> None:
        """The silo is a dropout from now on (disconnected, reconnected, reported an error):
        stages stop waiting for it."""
        cid = self.client_of.get(silo_id)
        if cid is None or self.finished or cid in self.gone:
            return
        self.gone.add(cid)
        log.info(
            "%s: silo %s dropped out of secure aggregation at stage %s",
            self.where,
            silo_id,
            self.server.stage,
        )
        self.advance()

    def advance(self) -> None:
        """Close every stage that can close now (row locked): drop the gone, advance, send the
        next requests and arm the deadline; on an abort record the reason and audit
        ``secagg.aborted``; when finished ask the orchestrator to look once.

        A stage closes when every silo it waits for answered or is known to be gone, else at
        its deadline.
        """
        while self.server.stage in OPEN_STAGES:
            for cid in self.gone:
                self.server.drop(cid)
            now = time.time()
            if not self.server.ready(now):
                break
            stage = self.server.stage
            assert stage is not None
            try:
                messages = self.server.advance(now)
            except SecAggError as exc:
                self.error = f"secure aggregation stopped at stage {stage.value}: {exc}"
                log.warning("%s: %s", self.where, self.error)
                self.audit("secagg.aborted", stage=stage.value, reason=self.error)
                break
            if self.server.stage is Stage.DONE:
                self.on_done()
                log.info(
                    "%s: unmasked the sum of %d silos' %s",
                    self.where,
                    len(self.server.contributors),
                    self.what,
                )
                break
            self.send(messages)
            self.schedule()
        if self.finished and not self.notified:
            self.notified = True
            dispatch.enqueue_advance(self.run_id)
