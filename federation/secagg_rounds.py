"""Secure rounds on the server: one SecAgg coordinator per round attempt, kept in the database.

A plan with ``"secure_aggregation": true`` runs every round attempt through SecAgg (SecAgg+ for
a sparse graph) so the server learns the sum of the sites' updates (and of their fairness
counts) and nothing else: no individual update is written to blob storage, to the database or
kept in memory.

Life of a secure round attempt (docs/protocol.md, "Secure aggregation", has the messages):

1. The orchestrator opens the round (``_open_round``) and calls :func:`open_round` in its
   transaction: the selected silos, sorted by silo id, get client ids 1..n; the round id bound
   into every key is ``"<run>:<round>:<attempt>"``; the threshold is
   ``fedcore.plan.secagg_threshold``; the quantiser range is the plan's ``secagg.clip`` (client-DP
   plans: ``fedcore.secure_updates.dp_quantiser_clip``); for a plan with a ``fairness`` section
   the vector ends with the count table (``fedcore.secure_updates.count_layout`` of the public
   groups). The attempt's ``SecAggAttempt`` row is written in that transaction; when it commits
   each silo gets its task (as in any round) and the advertise-keys request.
2. Agents answer each stage with a ``secagg`` control message, the masked-input stage with a
   binary ``masked_update`` (after local training), to whichever ASGI process holds their
   connection. The consumer hands them to :func:`receive` / :func:`receive_masked`, which lock
   the round's row and the attempt's row (``SELECT ... FOR UPDATE``: one message at a time,
   from any process), rebuild the ``SecAggServer`` from the row, ``collect`` the message, close
   the stage if every awaited silo answered, write the row back and, on commit, send the next
   requests through the channel layer.
3. Stage deadlines (wall clock, the same in every process): advertise-keys, share-keys and
   unmasking wait ``secagg.stage_timeout_seconds`` each; masked-input (which includes local
   training) waits ``round_deadline_seconds``. A timer (``dispatch.backend().enqueue(tick, ...,
   countdown=...)``: the orchestration thread, or the ``federation.secagg_tick`` Celery task)
   and the orchestrator's sweep (:func:`outcome`) close a stage whose deadline passed. Silos
   that did not answer in time are dropouts from then on. A silo that disconnects, reconnects,
   or reports an error about the round is a dropout at once: the stage closes as soon as
   everyone else answered. Nothing waits forever: the round ends after at most 3 stage
   timeouts + the round deadline.
4. After unmasking, the row holds the dequantised sum of the contributors' vectors; the
   orchestrator (``_close_if_due``) moves the round to aggregating when :func:`outcome` says it
   is done with at least ``min_silos`` contributors, and ``_combine`` builds the new global
   model from the sum (:func:`mean_state`), through the plan's strategy. The merged fairness
   counts become the round's fairness report. A coordinator that aborts (fewer than t silos
   left at some stage, shares that do not reconstruct) fails the round with the reason, in the
   audit log too (``secagg.aborted``); it is retried as any failed round: a new attempt, a new
   round id, fresh keys. Never a fallback to plain aggregation.

Why the database (docs/architecture.md, "Secure rounds"): in the production profile agents are
spread over several ASGI processes and orchestration runs in Celery workers; with the state in
PostgreSQL rows every process can take the next message, and a process killed with -9 loses
nothing but its uncommitted transaction (and its agents' connections, which makes them
dropouts, as for any disconnect). No owner, no lease, no forwarding. The embedded profile uses
the same code (SQLite with immediate transactions serialises the writers).

The coordinator's row handling, stage requests, stage loop and dropouts are
``federation.secagg_coordinator``'s, shared with an analysis step's secure sum
(``federation.secagg_analysis``); this module says what is a round attempt's own.

What the server keeps (the ``SecAggAttempt`` row): public parameters, public keys, share
ciphertexts sealed for their recipients (until relayed), the rosters, the revealed unmasking
shares (until used), and one P-vector: the running uint32 sum of the masked vectors (each is
added on arrival and not kept; every vector in it carries its site's self mask, whose seed is
reconstructed only after the masked-input stage closed, from shares, and only for sites whose
vector is already in the sum), then the unmasked aggregate. The row is
deleted when the round is aggregated or fails. The ``Update`` row records the example count,
metrics, nonce and the SHA-256 of the *masked* bytes with an empty blob key, and the audit log
records ``update.accepted`` with ``"masked": true``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from django.db import transaction

from fedcore import secure_updates, tabular, task_metrics
from fedcore.plan import RunSettings, secagg_settings, secagg_threshold
from fedcore.privacy.client_dp import DistributedNoise
from fedcore.secagg import SecAggConfig, Stage, effective_degree, session_id
from federation import dispatch, ledger
from federation.models import ModelVersion, Round, Run, SecAggAttempt, Silo
from federation.secagg_coordinator import (
    SecAggCoordinator,
    audit_run,
    locked,
    parse_message,
    session_config,
    start,
    stored,
)
from federation.services import fairness as fairness_service
from federation.services.updates import Refused, masked_update_receive

log = logging.getLogger("quorum.secagg")

MODE_WEIGHTED = "weighted"
MODE_CLIENT_DP = "client_dp"


@dataclass(kw_only=True)
class Coordinator(SecAggCoordinator):
    """The server side of one secure round attempt, as loaded from its ``SecAggAttempt`` row."""

    round_pk: int
    number: int
    mode: str
    max_examples: int
    selected: int
    dp_clip: float = 0.0
    noise_multiplier: float = 0.0
    delta: float = 0.0
    layout: tuple[tuple[str, str, str], ...] = ()  # the fairness counts at the vector's end
    counts: dict[str, Any] | None = None  # merged fairness counts, once unmasked

    what = "updates"
    unit = "round"

    @property
    def where(self) -> str:
        return f"run {self.run_id} round {self.number}.{self.attempt}"

    def address(self) -> dict[str, Any]:
        return {"run": self.run_id, "round": self.number, "attempt": self.attempt}

    def audit_key(self) -> dict[str, Any]:
        return {"round": self.number, "attempt": self.attempt}

    def rows(self) -> Any:
        return SecAggAttempt.objects.filter(round_id=self.round_pk)

    def saved(self) -> dict[str, Any]:
        return {"counts": self.counts}

    def arm(self, stage: Stage, countdown: float) -> None:
        """A timer that closes the stage at its deadline (``tick``)."""
        round_pk = self.round_pk
        transaction.on_commit(
            lambda: dispatch.enqueue(
                dispatch.SECAGG_TICK, round_pk, stage.value, countdown=countdown
            )
        )

    def on_done(self) -> None:
        if self.layout:
            _record_counts(self)


@dataclass(frozen=True)
class Outcome:
    """How a secure round attempt ended: ``ok`` with its contributors' silo ids, or an error."""

    ok: bool
    contributors: tuple[int, ...] = ()
    error: str = ""


def is_secure(spec: dict[str, Any]) -> bool:
    """Whether a plan runs its rounds with secure aggregation."""
    return spec.get("secure_aggregation") is True


def min_silos(cfg: RunSettings) -> int:
    """The fewest silos a secure round can start with: the plan's minimum, and at least 2."""
    return max(cfg.min_silos, 2)


# -- the row ------------------------------------------------------------------------------------


def _config(params: dict[str, Any]) -> SecAggConfig:
    return session_config(
        params,
        clip=params["clip"],
        degree=params["degree"],
        count_length=len(params.get("layout") or ()),
    )


def _from_row(row: SecAggAttempt, round_: Round) -> Coordinator:
    params = row.params
    return Coordinator(
        run_id=round_.run_id,
        round_pk=round_.pk,
        number=round_.number,
        attempt=round_.attempt,
        **stored(row, _config(params), params["timeouts"]),
        mode=params["mode"],
        max_examples=params["max_examples"],
        selected=len(params["silos"]),
        dp_clip=params.get("dp_clip", 0.0),
        noise_multiplier=params.get("noise_multiplier", 0.0),
        delta=params.get("delta", 0.0),
        layout=tuple(tuple(cell) for cell in params.get("layout") or ()),  # type: ignore[misc]
        counts=row.counts,
    )


@contextmanager
def _locked(round_query: Any) -> Iterator[Coordinator | None]:
    """The attempt's coordinator, locked for this transaction, written back when the block ends.

    Locks the round's row, then the attempt's (everyone locks in that order: the orchestrator
    holds the run's before both), so one message of the attempt is handled at a time across
    every process and thread. (SQLite, the embedded profile, has no row locks: its transactions
    begin IMMEDIATE, which serialises every writer.) Yields None when the round has no
    secure-aggregation row; an exception in the block rolls every change back.
    """
    found = round_query.first()
    if found is None:
        yield None
        return

    def load() -> Coordinator | None:
        round_ = Round.objects.select_for_update().get(pk=found.pk)
        row = SecAggAttempt.objects.select_for_update().filter(round_id=round_.pk).first()
        return None if row is None else _from_row(row, round_)

    with locked(load) as coord:
        yield coord


def coordinator(round_pk: int) -> Coordinator | None:
    """The round attempt's coordinator as stored now (not locked), or None once it is gone."""
    row = SecAggAttempt.objects.filter(round_id=round_pk).select_related("round").first()
    return None if row is None else _from_row(row, row.round)


def stored_vectors(round_pk: int) -> dict[str, np.ndarray]:
    """Every P-vector the round's coordinator holds now (``SecAggServer.stored_vectors``)."""
    coord = coordinator(round_pk)
    return {} if coord is None else coord.server.stored_vectors()


# -- opening a round ---------------------------------------------------------------------------


def open_round(round_: Any, silos: Iterable[Any], spec: dict[str, Any], cfg: RunSettings) -> None:
    """Start the round attempt's coordinator, in the orchestrator's transaction.

    Called from ``orchestrator._open_round`` after the round and its selection are written: the
    ``SecAggAttempt`` row commits with them, and the advertise-keys requests and the stage timer
    go out when the transaction commits.
    """
    silo_ids = sorted(s.pk for s in silos)
    params = _round_params(round_, spec, cfg, silo_ids)
    config = _config(params)
    requests, state, vector = start(config, params["timeouts"])
    row = SecAggAttempt.objects.create(round=round_, params=params, state=state, vector=vector)
    coord = _from_row(row, round_)
    coord.open(requests)
    log.info(
        "run %s round %s.%s: secure aggregation with %d silos, threshold %d, %d values each "
        "(%d fairness counts)",
        coord.run_id,
        coord.number,
        coord.attempt,
        len(silo_ids),
        config.threshold,
        config.vector_length,
        config.count_length,
    )


def _float_length(run_id: int, number: int) -> int:
    signature = ModelVersion.objects.get(run_id=run_id, number=number - 1).signature
    return 1 + sum(
        math.prod(shape)
        for dtype, shape in signature.values()
        if getattr(torch, dtype).is_floating_point
    )


def _count_layout(run_id: int, spec: dict[str, Any]) -> list[list[str]]:
    """The count cells every site appends to its vector: the fairness counts (none without the
    section), then a multi-class or regression plan's task part (:func:`_task_layout`)."""
    task = [list(cell) for cell in _task_layout(spec)]
    if fairness_service.fairness_section(spec) is None:
        return task
    run = Run.objects.select_related("version").get(pk=run_id)
    public = fairness_service.run_public_groups(run)
    return [list(cell) for cell in secure_updates.count_layout(public)] + task


def _task_layout(spec: dict[str, Any]) -> tuple[tuple[str, str, str], ...]:
    """A multi-class or regression plan's task part cells (``secure_updates.task_layout``)."""
    target = tabular.DatasetSchema.from_dict(spec["schema"]).target
    bins = task_metrics.round_bins(target.n_outputs) if target.task == "multiclass" else None
    return secure_updates.task_layout(target.task, target.n_outputs, bins)


def _split_layout(
    layout: tuple[tuple[str, str, str], ...], values: list[int]
) -> tuple[
    tuple[tuple[str, str, str], ...], list[int], tuple[tuple[str, str, str], ...], list[int]
]:
    """The fairness cells and values, then the task part's (``secure_updates.TASK_ATTRIBUTE``)."""
    fair = [i for i, cell in enumerate(layout) if cell[0] != secure_updates.TASK_ATTRIBUTE]
    task = [i for i, cell in enumerate(layout) if cell[0] == secure_updates.TASK_ATTRIBUTE]
    return (
        tuple(layout[i] for i in fair),
        [values[i] for i in fair],
        tuple(layout[i] for i in task),
        [values[i] for i in task],
    )


def _round_params(
    round_: Any, spec: dict[str, Any], cfg: RunSettings, silo_ids: list[int]
) -> dict[str, Any]:
    sa = secagg_settings(spec)
    assert sa is not None
    n = len(silo_ids)
    degree = sa.degree if sa.degree is not None and sa.degree < n - 1 else None
    threshold = secagg_threshold(effective_degree(n, degree) + 1, sa.threshold)
    layout = _count_layout(round_.run_id, spec)
    params: dict[str, Any] = {
        "round_id": session_id(round_.run_id, round_.number, round_.attempt),
        "silos": silo_ids,  # client id i is silos[i - 1]
        "threshold": threshold,
        "degree": degree,
        "vector_length": _float_length(round_.run_id, round_.number) + len(layout),
        "layout": layout,
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
        z = ledger.client_noise_multiplier(spec)
        clip = float(privacy["clip"])
        params.update(
            mode=MODE_CLIENT_DP,
            dp_clip=clip,
            noise_multiplier=float(z),
            delta=float(privacy.get("delta", 1e-5)),
            clip=secure_updates.dp_quantiser_clip(clip, z, threshold),
        )
    return params


# -- stages ------------------------------------------------------------------------------------


def tick(round_pk: int, stage: str) -> None:
    """Timer: close the round's stage if its deadline passed (a later stage ignores it)."""
    with _locked(Round.objects.filter(pk=round_pk, status=Round.Status.COLLECTING)) as coord:
        if coord is not None and coord.server.stage is not None:
            if coord.server.stage.value == stage:
                coord.advance()


def _record_counts(coord: Coordinator) -> None:
    """Keep the merged fairness counts and task part (under ``TASK_ATTRIBUTE``); charge each
    contributor's ledger for a DP release of fairness counts."""
    layout, values, task_cells, task_values = _split_layout(
        coord.layout, coord.server.counts.tolist()
    )
    coord.counts = secure_updates.counts_from_tail(values, layout)
    run = Run.objects.select_related("version").get(pk=coord.run_id)
    if task_cells:
        spec = run.version.spec
        schema = tabular.DatasetSchema.from_dict(spec["schema"])
        center, _ = tabular.target_scale(schema, run.preprocessing or {})
        coord.counts[secure_updates.TASK_ATTRIBUTE] = secure_updates.task_part_from_tail(
            task_values, schema.target.task, task_cells, center=center
        )
    if not layout:
        return
    round_ = Round.objects.get(pk=coord.round_pk)
    for silo in Silo.objects.filter(pk__in=[coord.silo_of[c] for c in coord.server.contributors]):
        fairness_service.counts_charge(
            run=run,
            round_number=round_.number,
            silo=silo,
            tables=len({a for a, _, _ in coord.layout}),
        )


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


def _attempt_query(fields: dict[str, Any]) -> Any:
    return Round.objects.filter(
        run_id=fields["run"],
        number=fields["round"],
        attempt=fields["attempt"],
        status=Round.Status.COLLECTING,
    )


def _not_running(fields: dict[str, Any]) -> Refused:
    return Refused(
        "wrong_round",
        f"round {fields['round']} attempt {fields['attempt']} of run {fields['run']} has no "
        "secure aggregation in progress",
    )


def receive(*, silo_id: int, fields: dict[str, Any]) -> None:
    """A ``secagg`` control message from a silo's agent: feed it to the round's coordinator.

    Raises:
        Refused: no such secure round in progress, a silo not in it or dropped out, a message
            for another stage or after the deadline (``wrong_round``), a malformed payload
            (``invalid_field``; the silo is then excluded from the attempt).
    """
    if fields["stage"] == Stage.MASKED_INPUT.value:
        raise Refused("invalid_field", "the masked input is sent as a binary masked_update")
    message = parse_message(fields)
    with _locked(_attempt_query(fields)) as coord:
        if coord is None or coord.finished:
            raise _not_running(fields)
        refused = coord.feed(_client_id(coord, silo_id), message)
    if refused is not None:
        raise refused


def receive_masked(*, silo_id: int, fields: dict[str, Any], payload: bytes) -> None:
    """A ``masked_update`` from a silo's agent: account for it and add it to the masked sum.

    The update's rows and the new running sum commit in one transaction
    (``services.updates.masked_update_receive`` calls back into the locked coordinator).

    Raises:
        Refused: as :func:`receive`, or as ``services.updates.masked_update_receive``.
    """
    message = {"stage": Stage.MASKED_INPUT.value, "masked_vector": bytes(payload)}

    def collect() -> None:
        with _locked(_attempt_query(fields)) as coord:
            if coord is None or coord.finished:
                raise _not_running(fields)
            coord.collect(_client_id(coord, silo_id), message)
            coord.advance()

    try:
        masked_update_receive(silo_id=silo_id, fields=fields, payload=payload, collect=collect)
    except Refused as exc:
        if exc.code == "invalid_field":  # a malformed vector: the silo is out of the attempt
            silo_gone(silo_id, run_id=fields["run"], number=fields["round"])
        raise


def silo_gone(silo_id: int, *, run_id: int | None = None, number: int | None = None) -> None:
    """A silo's connection ended or was replaced, or its agent reported an error about a round:
    it is a dropout of every secure round attempt in progress (of that run and round, if
    given), so stages stop waiting for it."""
    rounds = Round.objects.filter(
        status=Round.Status.COLLECTING, secagg__isnull=False, selected=silo_id
    )
    if run_id is not None:
        rounds = rounds.filter(run_id=run_id, number=number)
    for round_pk in list(rounds.values_list("pk", flat=True)):
        with _locked(Round.objects.filter(pk=round_pk)) as coord:
            if coord is not None:
                coord.drop(silo_id)


def is_dropout(round_pk: int, silo_id: int) -> bool:
    """Whether the silo dropped out of the round attempt's secure aggregation (it gets no task)."""
    row = SecAggAttempt.objects.filter(round_id=round_pk).values("params", "gone").first()
    if row is None:
        return False
    silos = row["params"]["silos"]
    return silo_id in silos and silos.index(silo_id) + 1 in row["gone"]


# -- closing the round -------------------------------------------------------------------------


def outcome(round_: Any) -> Outcome | None:
    """Where a collecting secure round attempt stands: None while it runs, else its Outcome.

    Closes a stage whose deadline passed first (the sweeper calls this through the orchestrator
    every few seconds, so a lost timer only delays a stage).
    """
    with _locked(Round.objects.filter(pk=round_.pk)) as coord:
        if coord is None:
            error = "secure aggregation has no state for this attempt (it was lost)"
            audit_run(
                round_.run_id,
                "secagg.aborted",
                {"round": round_.number, "attempt": round_.attempt, "reason": error},
            )
            return Outcome(ok=False, error=error)
        coord.advance()
        if coord.server.stage is Stage.DONE:
            return Outcome(
                ok=True, contributors=tuple(coord.silo_of[c] for c in coord.server.contributors)
            )
        if coord.server.stage is Stage.ABORTED:
            return Outcome(ok=False, error=coord.error or "secure aggregation aborted")
    return None


def merged_counts(round_pk: int) -> dict[str, Any] | None:
    """The round's fairness counts summed under the masks (None: the plan reports none)."""
    counts = (
        SecAggAttempt.objects.filter(round_id=round_pk).values_list("counts", flat=True).first()
    )
    if isinstance(counts, dict) and secure_updates.TASK_ATTRIBUTE in counts:
        counts = {k: v for k, v in counts.items() if k != secure_updates.TASK_ATTRIBUTE} or None
    return counts


def merged_task_part(round_pk: int) -> dict[str, Any] | None:
    """A multi-class or regression round's task part summed under the masks: the received global
    model's part of the pooled metrics over the contributors (None: none recorded)."""
    counts = (
        SecAggAttempt.objects.filter(round_id=round_pk).values_list("counts", flat=True).first()
    )
    return counts.get(secure_updates.TASK_ATTRIBUTE) if isinstance(counts, dict) else None


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
        raise ValueError("the round's secure-aggregation sum is not available")
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
    SecAggAttempt.objects.filter(round_id=round_pk).delete()
