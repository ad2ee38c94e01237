"""Secure aggregation of an analysis step: one SecAgg coordinator per (run, step, attempt).

An analysis plan with ``"secure_aggregation": true`` (``fedcore.plan.analysis``) runs each step
as the clear path does (``federation.services.analysis``), except that a site's answer carries
no summary: its ``"masked"`` entry gives the summary's layout (names, shapes, kinds; fixed by
the request), and the summary rides in the count tail of a SecAgg vector
(``fedcore.analytics.secure``). When every asked site answered (or the step's deadline
passed), :func:`open_step` starts a coordinator over the sites that answered; the server then
learns the sum of their summaries and nothing else. The protocol is the one secure training
rounds run (``fedcore.secagg``), kept by the same coordinator (``federation.secagg_coordinator``,
which ``federation.secagg_rounds`` uses for a round attempt): keys advertised, shares sealed, masked inputs summed as they arrive, shares revealed
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
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedcore.analytics import secure
from fedcore.plan import AnalysisPlan, secagg_threshold
from fedcore.secagg import SecAggConfig, Stage, effective_degree, session_id
from fedcore.secure_updates import TASK_LIMBS
from federation import dispatch
from federation.models import AnalysisSecAgg, Run, SiloAnalysis
from federation.secagg_coordinator import (
    SecAggCoordinator,
    locked,
    parse_message,
    session_config,
    start,
    stored,
)
from federation.services.updates import Refused

log = logging.getLogger("quorum.secagg")

ATTEMPT = 1  # an aborted step withholds the run's result; it is not retried


@dataclass(kw_only=True)
class StepCoordinator(SecAggCoordinator):
    """The server side of one analysis step's secure aggregation, loaded from its row."""

    step: str
    layout: secure.Layout

    what = "summaries"
    unit = "step"

    @property
    def where(self) -> str:
        return f"run {self.run_id} step {self.step!r}"

    def address(self) -> dict[str, Any]:
        return {"run": self.run_id, "round": 0, "step": self.step, "attempt": self.attempt}

    def audit_key(self) -> dict[str, Any]:
        return {"step": self.step, "attempt": self.attempt}

    def rows(self) -> Any:
        return AnalysisSecAgg.objects.filter(
            run_id=self.run_id, step=self.step, attempt=self.attempt
        )

    def arm(self, stage: Stage, countdown: float) -> None:
        """Wake the orchestrator at the stage's deadline (its sweep closes the stage)."""
        dispatch.enqueue_advance(self.run_id, countdown=countdown)


@dataclass(frozen=True)
class StepOutcome:
    """How a step's secure aggregation ended: the merged summary and its contributors' silo
    ids, or an error."""

    ok: bool
    contributors: tuple[int, ...] = ()
    summed: dict[str, np.ndarray] | None = None
    error: str = ""


def _config(params: dict[str, Any]) -> SecAggConfig:
    return session_config(params, clip=1.0, degree=None, count_length=params["count_length"])


def _from_row(row: AnalysisSecAgg) -> StepCoordinator:
    params = row.params
    return StepCoordinator(
        run_id=row.run_id,
        step=row.step,
        attempt=row.attempt,
        **stored(row, _config(params), params["timeout"]),
        layout=params["layout"],
    )


def _locked(
    run_id: int, step: str, attempt: int = ATTEMPT
) -> AbstractContextManager[StepCoordinator | None]:
    """The step's coordinator, locked (the run's row, then its own), written back at the end."""

    def load() -> StepCoordinator | None:
        if not list(Run.objects.select_for_update().filter(pk=run_id).values_list("pk")):
            return None
        row = (
            AnalysisSecAgg.objects.select_for_update()
            .filter(run_id=run_id, step=step, attempt=attempt)
            .first()
        )
        return None if row is None else _from_row(row)

    return locked(load)


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
        "round_id": session_id(run.pk, 0, ATTEMPT, step),
        "silos": silo_ids,
        "threshold": secagg_threshold(effective_degree(n, None) + 1, None),
        "vector_length": vector_length,
        "count_length": count_length,
        "layout": spec,
        "timeout": plan.round_deadline_seconds,
    }
    config = _config(params)
    requests, state, vector = start(config, params["timeout"])
    row = AnalysisSecAgg.objects.create(
        run=run, step=step, attempt=ATTEMPT, params=params, state=state, vector=vector
    )
    _from_row(row).open(requests)
    log.info(
        "run %s step %r: secure aggregation of %d silos' summaries, threshold %d, %d values",
        run.pk,
        step,
        n,
        config.threshold,
        count_length // TASK_LIMBS,
    )


def receive(*, silo_id: int, fields: dict[str, Any]) -> None:
    """A ``secagg`` message of an analysis step from a silo's agent (the masked input too).

    Raises:
        Refused: no such step in progress, a silo not in it or dropped out, a message for
            another stage (``wrong_round``), a malformed payload (``invalid_field``; the silo
            is then out of the step's sum).
    """
    message = parse_message(fields)
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
        masked = fields["stage"] == Stage.MASKED_INPUT.value
        refused = coord.feed(
            cid,
            message,
            collected=(lambda: _record_digest(coord, silo_id, message)) if masked else None,
        )
    if refused is not None:
        raise refused


def _record_digest(coord: StepCoordinator, silo_id: int, message: dict[str, Any]) -> None:
    """What the server keeps of a site's masked input: that it was masked in, and the digest of
    the masked bytes (never the summary)."""
    digest = hashlib.sha256(bytes(message["masked_vector"])).hexdigest()
    row = SiloAnalysis.objects.filter(run_id=coord.run_id, silo_id=silo_id, step=coord.step).first()
    if row is not None and isinstance(row.answer, dict):
        answer = dict(row.answer)
        answer["masked"] = {**answer.get("masked", {}), "sha256": digest}
        row.answer = answer
        row.save(update_fields=["answer"])


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
            if coord is not None:
                coord.drop(silo_id)


def started(run_id: int, step: str) -> bool:
    """Whether the step's secure aggregation was opened."""
    return AnalysisSecAgg.objects.filter(run_id=run_id, step=step, attempt=ATTEMPT).exists()


def outcome(run_id: int, step: str) -> StepOutcome | None:
    """Where the step's secure aggregation stands: None while it runs, else its outcome (the
    orchestrator calls it with the run locked; a stage whose deadline passed closes first)."""
    with _locked(run_id, step) as coord:
        if coord is None:
            return StepOutcome(ok=False, error="secure aggregation has no state for this step")
        coord.advance()
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
