"""The agent's side of secure aggregation: one ``SecAggClient`` per secure round attempt.

A plan with ``"secure_aggregation": true`` never lets the site's weights leave in clear. The
agent trains as for any round, then hands the result to :class:`SecAggSession` instead of
sending an ``update``; the session answers the server's four stage requests (``secagg`` control
messages, docs/protocol.md "Secure aggregation"):

- ``advertise_keys`` (carries the site's client id in the attempt's roster): checked (the site is
  on the roster, the threshold is a strict majority of its neighbourhood and at least
  ``min_threshold``), answered with two fresh public keys;
- ``share_keys``: answered with the encrypted Shamir shares of the site's secrets;
- ``masked_input``: kept until local training has finished, then answered with a binary
  ``masked_update`` whose payload is the masked vector (``fedcore.secure_updates``: the
  example-weighted, per-coordinate clipped change of the floating weights plus the weight
  coordinate; for client-level DP the L2-clipped change plus this site's share of the Gaussian
  noise), followed, for a plan with a ``fairness`` section, by the site's per-group confusion
  counts (``fedcore.secure_updates.count_layout``), summed under the same masks. Metrics and
  the example count travel in clear in its header, as in an ``update``; the fairness counts
  never do. It goes through the sent log like an update (a DP round's line holds its epsilon);
- ``unmasking``: answered with the shares that remove the survivors' self masks and the dropped
  sites' pairwise masks, never both for one site (``SecAggClient.unmask`` refuses).

An analysis plan under secure aggregation runs the same stages per analysis step (messages with
``"step"``, round 0): the agent answers the step's request without its summary and keeps the
summary's cells (``fedcore.analytics.secure``, :meth:`SecAggSession.offer_analysis`), which
leave only masked, in the masked-input reply of the step's session. Both kinds of session run
one code path; only the masked input (a trained update, or a summary's cells) and the names on
the wire (a round number, or a step with round 0) differ.

Any refusal or error aborts the round's client (its secrets are dropped) and is reported with an
``error`` ``secagg_aborted``; the site is then a dropout of the attempt. A session holds its
clients only while its websocket is open: when it closes, every client is aborted, so a
reconnect makes the site a dropout of the attempts in progress (the server treats it so too);
a retried attempt (new attempt number, fresh keys) starts over with the update already trained.
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fedcore import protocol, secure_updates, tabular, task_metrics, tensors
from fedcore.plan import parse_plan
from fedcore.secagg import (
    ProtocolError,
    SecAggClient,
    SecAggConfig,
    SecAggError,
    Stage,
    effective_degree,
    session_id,
)
from fedcore.secagg import wire as secagg_wire

logger = logging.getLogger(__name__)

SECAGG_ABORTED = "secagg_aborted"

SendControl = Callable[..., Awaitable[None]]
SendError = Callable[[dict[str, Any], str | None], Awaitable[None]]
SendMasked = Callable[[protocol.BinaryMessage, str, Any], Awaitable[None]]
# A session's key: (run, round number) for a round attempt, (run, step name) for an analysis
# step (round 0); a number never equals a name, so both kinds share one table.
_Key = tuple[int, int | str]


@dataclass
class _Offer:
    """A trained update waiting for the masked-input request of its round."""

    task: protocol.BinaryMessage
    update: protocol.BinaryMessage
    privacy: Any  # clientagent.trainer.RoundPrivacy for a DP plan, else None

    @property
    def plan_hash(self) -> str:
        return str(self.task.fields["plan_hash"])


@dataclass
class _Attempt:
    """One round attempt's (or analysis step's) client and what it waits for."""

    run: int
    round: int
    attempt: int
    client: SecAggClient
    masked_request: dict[str, Any] | None = None
    masked_sent: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    step: str | None = None  # an analysis step's session (round 0)

    @property
    def key(self) -> _Key:
        return _key(self.run, self.round, self.step)

    @property
    def where(self) -> str:
        return _where(self.run, self.round, self.step)


def _key(run: int, rnd: int, step: str | None) -> _Key:
    return (run, rnd) if step is None else (run, step)


def _where(run: int, rnd: int, step: str | None) -> str:
    """The session in a log line: ``run 3 round 2``, ``run 3 step 'summary'``."""
    return f"run {run} round {rnd}" if step is None else f"run {run} step {step!r}"


class SecAggSession:
    """The secure-aggregation clients of one websocket session, by (run, round) for a round
    attempt and by (run, step) for an analysis step: one code path answers both."""

    def __init__(
        self,
        *,
        send_control: SendControl,
        send_error: SendError,
        send_masked: SendMasked,
        min_threshold: int = 2,
    ) -> None:
        """Args:
        send_control: ``await send_control("secagg", **fields)`` sends a control message.
        send_error: ``await send_error(fields, plan_hash)`` sends an ``error`` (sent log).
        send_masked: ``await send_masked(message, plan_hash, privacy)`` sends a binary message
            through the sent log (``_Session.send_update``).
        min_threshold: the smallest threshold the site accepts.
        """
        self._send_control = send_control
        self._send_error = send_error
        self._send_masked = send_masked
        self.min_threshold = min_threshold
        self._attempts: dict[_Key, _Attempt] = {}
        self._offers: dict[_Key, _Offer] = {}  # a round's trained update, until it leaves masked
        # An analysis step's summary cells (fedcore.analytics.secure), until they leave masked.
        self._cells: dict[_Key, list[int]] = {}
        self.closed = False

    # -- the agent's side --------------------------------------------------------------------

    async def offer(
        self, task: protocol.BinaryMessage, update: protocol.BinaryMessage, *, privacy: Any
    ) -> None:
        """The trained update of a secure round: sent masked once the server asks for it."""
        if self.closed:
            return  # the session is gone: this site is a dropout of the attempt
        key = (task.fields["run"], task.fields["round"])
        self._drop_earlier(*key)
        self._offers[key] = _Offer(task=task, update=update, privacy=privacy)
        logger.info(
            "run %d round %d: update ready; it leaves only masked, when the server asks for it",
            *key,
        )
        attempt = self._attempts.get(key)
        if attempt is not None:
            async with attempt.lock:
                await self._try_mask(attempt)

    def abort(self, run: int | None, rnd: int | None) -> None:
        """Drop the round's client and update (the task was refused, or the round is over)."""
        if run is None or rnd is None:
            return
        self._drop((run, rnd))

    def forget_run(self, run: int) -> None:
        """Drop everything kept for a run (it finished)."""
        for key in [k for k in self._kept() if k[0] == run]:
            self._drop(key)

    def close(self) -> None:
        """The websocket closed: abort every client (their secrets go with the session)."""
        self.closed = True
        for key in self._kept():
            self._drop(key)

    def _kept(self) -> list[_Key]:
        return list({*self._attempts, *self._offers, *self._cells})

    def _drop_earlier(self, run: int, rnd: int) -> None:
        """A later round of the run started: what is kept for its earlier rounds is stale."""
        for key in self._kept():
            if key[0] == run and isinstance(key[1], int) and key[1] < rnd:
                self._drop(key)

    def _drop(self, key: _Key) -> None:
        attempt = self._attempts.pop(key, None)
        if attempt is not None and attempt.client.stage not in (Stage.DONE, Stage.ABORTED):
            attempt.client.abort()  # drops the keys and every share it holds
        self._offers.pop(key, None)
        self._cells.pop(key, None)

    @property
    def active(self) -> list[tuple[int, int, int]]:
        """(run, round, attempt) of the round attempts' clients in progress (logs and tests)."""
        return sorted(
            (a.run, a.round, a.attempt) for a in self._attempts.values() if a.step is None
        )

    # -- the server's requests -----------------------------------------------------------------

    async def on_message(self, fields: Mapping[str, Any]) -> None:
        """Handle one ``secagg`` control message from the server."""
        if self.closed:
            return
        run, rnd, number = fields["run"], fields["round"], fields["attempt"]
        step = fields.get("step")  # an analysis step's session (round 0), else a round's
        stage = fields["stage"]
        key = _key(run, rnd, step)
        try:
            request = secagg_wire.from_json(fields["payload"])
            if request.get("stage") != stage:
                raise ProtocolError("the payload's stage differs from the message's")
            if stage == Stage.ADVERTISE_KEYS.value:
                attempt = self._new_attempt(fields, request)
            else:
                attempt = self._attempts.get(key)
                if attempt is None or attempt.attempt != number:
                    what = f"round {rnd}" if step is None else f"analysis step {step!r}"
                    raise ProtocolError(
                        f"a {stage!r} request for {what} attempt {number}, for which this site "
                        "advertised no keys"
                    )
        except SecAggError as exc:
            self._drop(key)
            await self._aborted(run, rnd, step, exc)
            return
        async with attempt.lock:
            if self._attempts.get(key) is not attempt:
                return  # replaced or dropped meanwhile
            try:
                await self._answer(attempt, stage, request)
            except (SecAggError, ValueError) as exc:
                self._drop(key)
                await self._aborted(run, rnd, step, exc)

    def _new_attempt(self, fields: Mapping[str, Any], request: dict[str, Any]) -> _Attempt:
        run, rnd, number = fields["run"], fields["round"], fields["attempt"]
        step = fields.get("step")
        client_id = fields.get("client")
        if not isinstance(client_id, int):
            raise ProtocolError("advertise_keys must name this site's client id")
        config = SecAggConfig.from_message(request)
        expected = session_id(run, rnd, number, step)
        if config.round_id != expected:
            raise ProtocolError(f"round id {config.round_id!r} is not {expected!r}")
        _check_threshold(config)
        key = _key(run, rnd, step)
        if step is None:
            self._drop_earlier(run, rnd)
        else:
            cells = self._cells.get(key)
            if cells is None:
                raise ProtocolError(f"this site holds no answer to analysis step {step!r}")
            if config.float_length != 1 or config.count_length != len(cells):
                raise ProtocolError(
                    f"the session expects {config.count_length} cells, this site's summary "
                    f"has {len(cells)}"
                )
        old = self._attempts.get(key)
        if old is not None:
            if old.attempt >= number:
                what = f"round {rnd}" if step is None else f"step {step!r}"
                raise ProtocolError(f"{what} attempt {number} was already started")
            self._attempts.pop(key)
            if old.client.stage not in (Stage.DONE, Stage.ABORTED):
                old.client.abort()
        attempt = _Attempt(
            run=run,
            round=rnd if step is None else 0,
            attempt=number,
            client=SecAggClient(client_id, min_threshold=self.min_threshold),
            step=step,
        )
        self._attempts[key] = attempt
        return attempt

    async def _answer(self, attempt: _Attempt, stage: str, request: dict[str, Any]) -> None:
        client = attempt.client
        if stage == Stage.ADVERTISE_KEYS.value:
            reply = await asyncio.to_thread(client.advertise_keys, request)
        elif stage == Stage.SHARE_KEYS.value:
            reply = await asyncio.to_thread(client.share_keys, request)
        elif stage == Stage.MASKED_INPUT.value and attempt.step is not None:
            reply = await self._mask_summary(attempt, request)
        elif stage == Stage.MASKED_INPUT.value:
            if attempt.masked_request is not None or client.stage is not Stage.MASKED_INPUT:
                raise ProtocolError("a second masked-input request, or one out of order")
            attempt.masked_request = request
            await self._try_mask(attempt)  # sends a masked_update once the update is trained
            return
        elif stage == Stage.UNMASKING.value:
            reply = await asyncio.to_thread(client.unmask, request)
            self._attempts.pop(attempt.key, None)
            self._offers.pop(attempt.key, None)
        else:
            raise ProtocolError(f"unknown secure-aggregation stage {stage!r}")
        await self._reply(attempt, reply)
        if stage == Stage.SHARE_KEYS.value:
            logger.info(
                "%s attempt %d: secure-aggregation keys shared with %d neighbours",
                attempt.where,
                attempt.attempt,
                len(reply["ciphertexts"]),
            )
        elif stage == Stage.MASKED_INPUT.value:
            logger.info("%s: sent the masked summary", attempt.where)
        elif stage == Stage.UNMASKING.value:
            logger.info(
                "%s: revealed the unmasking shares; secure aggregation done here", attempt.where
            )

    async def _mask_summary(self, attempt: _Attempt, request: dict[str, Any]) -> dict[str, Any]:
        """An analysis step's masked input: its summary's cells, masked at once (the answer was
        computed when the step was asked)."""
        cells = self._cells.pop(attempt.key, None)
        if cells is None:
            raise ProtocolError(f"no summary of step {attempt.step!r} is waiting here")
        # The one float coordinate is 1.0: its sum counts the contributors.
        return await asyncio.to_thread(attempt.client.masked_input, request, [1.0], cells)

    async def _reply(self, attempt: _Attempt, reply: dict[str, Any]) -> None:
        name: dict[str, Any] = {"run": attempt.run, "round": attempt.round}
        if attempt.step is not None:
            name["step"] = attempt.step
        await self._send_control(
            "secagg",
            **name,
            attempt=attempt.attempt,
            stage=reply["stage"],
            payload=secagg_wire.to_json(reply),
        )

    async def _try_mask(self, attempt: _Attempt) -> None:
        """Send the masked vector once both the request and the trained update are here."""
        key = (attempt.run, attempt.round)
        offer = self._offers.get(key)
        if attempt.masked_request is None or offer is None or attempt.masked_sent:
            return
        try:
            vector, clipped = await asyncio.to_thread(self._vector, attempt, offer)
            counts = self._counts(attempt, offer)
            reply = await asyncio.to_thread(
                attempt.client.masked_input, attempt.masked_request, vector, counts
            )
        except (SecAggError, ValueError) as exc:
            self._drop(key)
            await self._aborted(attempt.run, attempt.round, None, exc, plan_hash=offer.plan_hash)
            return
        attempt.masked_request = None
        attempt.masked_sent = True
        if clipped:
            logger.warning(
                "run %d round %d: %d coordinates of the update were clipped to the plan's "
                "secure-aggregation range; a larger secagg.clip would keep them",
                attempt.run,
                attempt.round,
                clipped,
            )
        fields: dict[str, Any] = {
            "run": attempt.run,
            "round": attempt.round,
            "attempt": attempt.attempt,
            "nonce": secrets.token_hex(16),
            "num_examples": offer.update.fields["num_examples"],
            "metrics": offer.update.fields["metrics"],
        }
        for optional in ("silo", "privacy"):
            if optional in offer.update.fields:
                fields[optional] = offer.update.fields[optional]
        message = protocol.BinaryMessage("masked_update", fields, reply["masked_vector"])
        self._offers.pop(key, None)  # the weights in clear are no longer needed
        await self._send_masked(message, offer.plan_hash, offer.privacy)
        logger.info(
            "run %d round %d: sent the masked update (%d examples, %.1f KiB)",
            attempt.run,
            attempt.round,
            fields["num_examples"],
            len(message.payload) / 1024,
        )

    @staticmethod
    def _counts(attempt: _Attempt, offer: _Offer) -> list[int]:
        """The round's fairness counts, in the layout both sides derive from the public groups.

        The trained update's ``fairness`` tables (``clientagent.trainer.fairness_counts``) never
        leave in clear in a secure round: they ride at the end of the masked vector, so the
        server only ever sees their sum over the contributors.
        """
        expected = attempt.client.config.count_length
        task = SecAggSession._task_tail(offer)
        expected -= len(task)
        tables = offer.update.fields.get("fairness")
        if not expected:
            return task
        if not isinstance(tables, Mapping):
            raise ProtocolError(
                f"the round expects {expected} fairness counts and this site computed none"
            )
        public = {attribute: list(groups) for attribute, groups in tables.items()}
        layout = secure_updates.count_layout(public)
        if len(layout) != expected:
            raise ProtocolError(
                f"the round expects {expected} fairness counts, this site's public groups give "
                f"{len(layout)}"
            )
        return secure_updates.counts_to_tail(tables, layout) + task

    @staticmethod
    def _task_tail(offer: _Offer) -> list[int]:
        """A multi-class or regression round's task part (the received global model's part of
        the pooled metrics, ``task_part`` of the trained update) as the tail after the fairness
        counts (``fedcore.secure_updates.task_layout``): it never leaves in clear."""
        plan = offer.task.fields["plan"]
        parsed = parse_plan(plan)
        target = parsed.schema.target
        bins = task_metrics.round_bins(target.n_outputs) if target.task == "multiclass" else None
        layout = secure_updates.task_layout(target.task, target.n_outputs, bins)
        if not layout:
            return []
        part = offer.update.fields.get("task_part")
        if not isinstance(part, Mapping):
            raise ProtocolError("the round expects this site's task part and it computed none")
        center, _ = tabular.target_scale(
            parsed.schema, offer.task.fields.get("preprocessing") or {}
        )
        return secure_updates.task_part_to_tail(part, target.task, layout, center=center)

    @staticmethod
    def _vector(attempt: _Attempt, offer: _Offer) -> tuple[Any, int]:
        """The round's vector from the trained and the global weights (worker thread)."""
        config = attempt.client.config
        plan = offer.task.fields["plan"]
        global_state = tensors.decode_state_dict(offer.task.payload)
        local = tensors.decode_state_dict(offer.update.payload)
        parsed = parse_plan(plan)  # accepted by handle_task already: the same plan language
        if parsed.privacy.mode == "client":
            if offer.privacy is None:
                raise ValueError("a client-DP round without its privacy mechanism")
            clip = parsed.privacy.clip
            z = float(offer.privacy.noise_multiplier)
            needed = secure_updates.dp_quantiser_clip(clip, z, config.threshold)
            if config.clip < needed * (1 - 1e-9):
                raise ProtocolError(
                    f"the round's range {config.clip:.6g} would clip this site's noise "
                    f"(it needs {needed:.6g})"
                )
            encoded = secure_updates.dp_vector(
                local, global_state, clip=clip, noise_multiplier=z, threshold=config.threshold
            )
        else:
            settings = parsed.secagg
            if settings is None:
                raise ProtocolError("a secure round of a plan without secure_aggregation")
            max_examples = settings.max_examples
            if not (math.isfinite(config.clip) and config.clip > 0):
                raise ProtocolError("the round's clip must be a positive number")
            encoded = secure_updates.weighted_vector(
                local,
                global_state,
                num_examples=int(offer.update.fields["num_examples"]),
                clip=config.clip,
                max_examples=max_examples,
            )
        if encoded.vector.size != config.float_length:
            raise ProtocolError(
                f"the round expects {config.float_length} values, this model has "
                f"{encoded.vector.size}"
            )
        return encoded.vector, encoded.clipped

    # -- analysis steps ---------------------------------------------------------------------

    def offer_analysis(self, run: int, step: str, cells: list[int]) -> None:
        """An analysis step's summary (its SecAgg cells): sent masked once the server asks."""
        if self.closed:
            return
        self._drop((run, step))
        self._cells[(run, step)] = cells

    async def _aborted(
        self,
        run: int,
        rnd: int,
        step: str | None,
        exc: Exception,
        *,
        plan_hash: str | None = None,
    ) -> None:
        logger.error("%s: secure aggregation aborted here: %s", _where(run, rnd, step), exc)
        if plan_hash is None and (offer := self._offers.get(_key(run, rnd, step))) is not None:
            plan_hash = offer.plan_hash
        of = "" if step is None else f" of analysis step {step!r}"
        reason = f"secure aggregation{of} aborted at this site: {exc}"
        if len(reason) > protocol.MAX_ERROR_REASON_CHARS:
            reason = reason[: protocol.MAX_ERROR_REASON_CHARS - 3] + "..."
        error: dict[str, Any] = {"code": SECAGG_ABORTED, "reason": reason, "run": run}
        if step is None:  # an analysis step's error names only the run
            error["round"] = rnd
        await self._send_error(error, plan_hash)


def _check_threshold(config: SecAggConfig) -> None:
    """The threshold must be a strict majority of a neighbourhood (ProtocolError)."""
    neighbourhood = effective_degree(config.n_clients, config.degree) + 1
    if 2 * config.threshold <= neighbourhood:
        raise ProtocolError(
            f"threshold {config.threshold} is not a strict majority of the "
            f"{neighbourhood} sites of a neighbourhood: a minority could unmask a site"
        )
