"""The agent's websocket session with the consortium server, with reconnect.

One :class:`Agent` lives for the whole process; it opens one websocket at a time (a *session*),
says ``hello``, waits for ``welcome``, sends heartbeats and answers ``stats_request`` and ``task``
messages until the connection drops, then reconnects with exponential backoff and full jitter.
What must survive a reconnect lives on the Agent: the data caches, the training job in flight
(a worker thread cannot be interrupted mid-step, and its result is still wanted) and the last
built update, which is re-sent without retraining when the server re-sends the same task.

Every ``stats_request`` and ``task`` is checked before any local data is read
(:mod:`clientagent.policy`: the server's signed grant and its scope, then the site's ``[policy]``);
a task's round attempt is claimed in the site's own round count (:mod:`clientagent.roundlog`)
before it trains, so no round attempt trains twice. A refusal is an ERROR in the local log and an
``error`` frame (audited by the server), and the agent carries on. With ``[server] ca_file`` the
server's certificate must come from that CA. A DP round is checked once more before it trains,
with the mechanism for the real training rows and what the sent log says was spent
(:func:`clientagent.policy.check_round_budget`). Every message carrying anything derived from
local data is written to the sent log (:mod:`clientagent.records`) before it leaves; a DP update's
line holds the epsilon it added to its run. In a secure round (``secure_aggregation`` plans) the
trained update never leaves in clear: :mod:`clientagent.secagg_session` answers the server's
secure-aggregation stages and sends it masked.

Exit codes of :meth:`Agent.run` / :func:`run_agent`: :data:`EXIT_OK` (stopped by the caller,
e.g. SIGTERM), :data:`EXIT_AUTH` (the server refused the token; reconnecting cannot help) and
:data:`EXIT_POLICY` (the server is not the consortium ``[policy] consortium`` names).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import random
import secrets
import ssl
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, TextIO

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from clientagent import __version__
from clientagent.analysis import handle_analysis_request, mask_reply
from clientagent.config import SiteConfig
from clientagent.data import LocalData, canonical_sha256
from clientagent.exit_codes import EXIT_AUTH, EXIT_OK, EXIT_POLICY
from clientagent.exit_codes import EXIT_CONFIG as EXIT_CONFIG  # re-exported: run_agent's codes
from clientagent.exit_codes import EXIT_ERROR as EXIT_ERROR
from clientagent.policy import (
    NOT_AUTHORIZED,
    POLICY_REFUSED,
    announced_kinds,
    check_analysis_policy,
    check_authorization,
    check_evaluation_policy,
    check_local_decision,
    check_policy,
    check_round_budget,
    check_steward_signature,
)
from clientagent.progress import RoundProgress
from clientagent.records import (
    OPEN_OFFER_STATUSES,
    OfferRefused,
    RecordsError,
    SiteRecords,
    epsilon_by_run,
    released_updates,
    short_hash,
)
from clientagent.residuals import ResidualStore
from clientagent.roundlog import RoundLog, RoundLogError, RoundReplayed
from clientagent.secagg_session import SecAggSession
from clientagent.trainer import (
    DATA_INVALID,
    RoundPrivacy,
    TaskError,
    TrainingCancelled,
    TrainingObserver,
    handle_evaluate,
    handle_stats_request,
    handle_task,
)
from fedcore import protocol, tensors
from fedcore.plan import is_analysis, is_evaluation_plan
from fedcore.plan import plan_hash as compute_plan_hash
from fedcore.signing import AuthorizationError, verify_offer

logger = logging.getLogger(__name__)

AUTH_REFUSED_MESSAGE = (
    "the server refused this site's token; ask the consortium admin for a new token "
    "and update token in site.toml"
)
AUTH_FAILED_CODE = "auth_failed"
AUTH_CLOSE_CODES = frozenset({4401, 4403})
AUTH_HTTP_STATUSES = frozenset({401, 403})

# One websocket frame: a binary chunk of at most DEFAULT_MAX_FRAME_BYTES plus slack for the
# websocket framing; larger messages are chunked by fedcore.protocol.
MAX_WS_MESSAGE_BYTES = protocol.DEFAULT_MAX_FRAME_BYTES + (64 << 10)
PING_INTERVAL_SECONDS = 5.0
PING_TIMEOUT_SECONDS = 20.0
OPEN_TIMEOUT_SECONDS = 15.0
WELCOME_TIMEOUT_SECONDS = 30.0
MIN_HEARTBEAT_SECONDS = 1.0
CLOSE_TIMEOUT_SECONDS = 5.0


def websocket_options() -> dict[str, Any]:
    """The websockets connect() options of the agent's session (bench/serialization.py uses them).

    Compression is off: permessage-deflate on model weights (float noise to zlib) costs
    seconds per 100 MB for a few percent, and compressing what TLS then encrypts invites
    CRIME-style length leaks. Control messages are small.
    """
    return {
        "max_size": MAX_WS_MESSAGE_BYTES,
        "compression": None,
        "ping_interval": PING_INTERVAL_SECONDS,
        "ping_timeout": PING_TIMEOUT_SECONDS,
        "open_timeout": OPEN_TIMEOUT_SECONDS,
        "close_timeout": CLOSE_TIMEOUT_SECONDS,
    }


SERVER_INTERNAL = "internal"  # an error frame about the server's own failure, not our update


class AuthRefused(Exception):
    """The server refused the site's token (HTTP 401/403, ``auth_failed`` or close 4401)."""


class SessionLost(Exception):
    """The websocket closed or the server misbehaved; the agent reconnects."""


class ConsortiumRefused(Exception):
    """The server's welcome names a consortium other than ``[policy] consortium``."""


# Messages that may carry something derived from local data: sent only through the sent log.
RECORDED_TYPES = frozenset({"stats", "update", "error", "analysis"})
# Refusals the site operator must see: the server asked for something the site does not allow.
ERROR_LEVEL_CODES = frozenset({DATA_INVALID, NOT_AUTHORIZED, POLICY_REFUSED})


class Backoff:
    """Exponential backoff with full jitter: delay = uniform(0, min(cap, base * 2**attempt)).

    ``attempt`` counts the failures since the last :meth:`reset` (a successful ``welcome``).
    """

    def __init__(self, *, base: float = 0.5, cap: float = 30.0, rng: random.Random | None = None):
        """Args:
        base: upper bound of the first delay, seconds.
        cap: largest upper bound, seconds.
        rng: random source; default random.SystemRandom() (tests inject a seeded one).
        """
        if base <= 0 or cap < base:
            raise ValueError(f"need 0 < base <= cap, got base={base}, cap={cap}")
        self.base = base
        self.cap = cap
        self.rng = rng if rng is not None else random.SystemRandom()
        self.attempt = 0

    def ceiling(self, attempt: int) -> float:
        """The upper bound of the delay before retry number ``attempt`` (0-based)."""
        # min() on the exponent first: 2**attempt would overflow float after ~1000 failures.
        return min(self.cap, self.base * 2.0 ** min(attempt, 64))

    def next_delay(self) -> float:
        """The delay before the next attempt; counts the attempt."""
        delay = self.rng.uniform(0.0, self.ceiling(self.attempt))
        self.attempt += 1
        return delay

    def reset(self) -> None:
        """Start again from the smallest delay (after a successful welcome)."""
        self.attempt = 0


@dataclass(frozen=True)
class _BuiltUpdate:
    key: tuple[Any, ...]
    message: protocol.BinaryMessage
    privacy: RoundPrivacy | None = None  # the DP round it ran, for the sent log's epsilon


def _records_unreadable(exc: RecordsError, run: int, rnd: int | None) -> TaskError:
    """Fail closed: without readable records the policy (and the budget) cannot be checked."""
    return TaskError(
        POLICY_REFUSED,
        f"the site's records cannot be read, so the policy cannot be checked: {exc}; "
        "fix or move the file aside (keep it for the audit trail)",
        run=run,
        round=rnd,
        shared_reason="the site's local records cannot be read; the site operator must fix them",
    )


class _TaskBudget:
    """The site's privacy budget as one task sees it: its sent log and its [policy] caps."""

    def __init__(self, agent: Agent, fields: Mapping[str, Any]):
        self.agent = agent
        self.run: int = fields["run"]
        self.round: int = fields["round"]
        self.plan_hash: str = fields["plan_hash"]
        self.approved: RoundPrivacy | None = None  # the round check() let through

    def released_rounds(self) -> int:
        """DP rounds of this run already sent, from the sent log (so a restart keeps them)."""
        try:
            sent = self.agent.records.sent()
        except RecordsError as exc:
            raise _records_unreadable(exc, self.run, self.round) from None
        return len(released_updates(sent, run=self.run, plan_hash=self.plan_hash))

    def check(self, privacy: RoundPrivacy) -> None:
        """The [policy] caps with the real numbers; remembers the round when it passes."""
        policy = self.agent.config.policy
        spent_total = 0.0
        if policy.max_epsilon_total is not None:
            try:
                spent_total = sum(epsilon_by_run(self.agent.records.sent()).values())
            except RecordsError as exc:
                raise _records_unreadable(exc, self.run, self.round) from None
        check_round_budget(
            privacy,
            self.plan_hash,
            policy=policy,
            config_path=self.agent.config.path,
            spent_total=spent_total,
            run=self.run,
            round=self.round,
        )
        self.approved = privacy


def _round_count_lost(exc: Exception, run: int, rnd: int) -> TaskError:
    return TaskError(
        POLICY_REFUSED,
        f"the site's round count cannot be kept, so the task cannot be checked for replay: {exc}",
        run=run,
        round=rnd,
        shared_reason="the site's local round count cannot be kept; the site operator must fix it",
    )


def _round_label(run: int, rnd: int, rounds: int | None) -> str:
    return f"round {rnd}/{rounds}" if rounds else f"run {run} round {rnd}"


def _auc(metrics: Mapping[str, Any], which: str) -> str:
    value = metrics.get(which, {}).get("auc") if isinstance(metrics.get(which), Mapping) else None
    return f"{value:.3f}" if isinstance(value, float) else "n/a"


def _describe_close(ws: ClientConnection) -> str:
    code, reason = ws.close_code, ws.close_reason
    if code is None:
        return "connection lost"
    return f"connection closed (code {code}{': ' + reason if reason else ''})"


class Agent:
    """A site agent: the reconnect loop plus the state that outlives one websocket session."""

    def __init__(
        self,
        config: SiteConfig,
        *,
        backoff: Backoff | None = None,
        progress_stream: TextIO | None = None,
        progress_tty: bool | None = None,
        connect_options: Mapping[str, Any] | None = None,
    ):
        """Args:
        config: the parsed site.toml.
        backoff: reconnect delays (default: base 0.5 s, cap 30 s, SystemRandom jitter).
        progress_stream: where the training bar is drawn (default sys.stderr).
        progress_tty: draw a bar (default: whether progress_stream is a terminal).
        connect_options: extra keyword arguments for websockets' connect() (tests, proxies).
        """
        self.config = config
        self.backoff = backoff if backoff is not None else Backoff()
        self.data = LocalData(config.data.path)
        self.progress_stream = progress_stream if progress_stream is not None else sys.stderr
        self.progress_tty = progress_tty
        self.connect_options = dict(connect_options or {})
        self.records = SiteRecords(config.agent.state_dir)
        self.round_log = RoundLog(config.agent.state_dir)
        self.silo: str | None = None
        self.consortium: str | None = None
        self.state = "idle"
        self.sessions = 0  # successful welcomes, for logs and tests
        self._cancel = threading.Event()
        self._train_lock = asyncio.Lock()
        self._jobs: dict[tuple[Any, ...], asyncio.Future[_BuiltUpdate]] = {}
        # (run, round) -> seconds the task took from the server's sent_at to its last frame
        self._download_seconds: dict[tuple[int, int], float] = {}
        self._last_update: _BuiltUpdate | None = None
        self._rounds: dict[int, int] = {}
        self._decisions_size: int | None = None  # decisions.jsonl's size when last looked at

    async def run(self, stop: asyncio.Event | None = None) -> int:
        """Connect, serve and reconnect until ``stop`` is set or the token is refused.

        Returns:
            EXIT_OK when ``stop`` was set, EXIT_AUTH when the server refused the token,
            EXIT_POLICY when the server is not the consortium ``[policy] consortium`` names.
        """
        stop = stop if stop is not None else asyncio.Event()
        try:
            while not stop.is_set():
                try:
                    await self.session(stop)
                    reason = "connection closed"
                except AuthRefused as exc:
                    logger.error("%s (%s)", AUTH_REFUSED_MESSAGE, exc)
                    return EXIT_AUTH
                except ConsortiumRefused as exc:
                    logger.error("%s", exc)
                    return EXIT_POLICY
                except InvalidStatus as exc:
                    reason = (
                        f"HTTP {exc.response.status_code} instead of a websocket; "
                        f"check [server] url in {self.config.path}"
                    )
                except ssl.SSLCertVerificationError as exc:
                    reason = self._certificate_refused(exc)
                except (OSError, TimeoutError, InvalidHandshake, SessionLost) as exc:
                    reason = str(exc) or type(exc).__name__
                except Exception as exc:
                    # A bug or a server we do not understand: keep the site online, with backoff.
                    logger.exception("unexpected error in the session")
                    reason = f"unexpected {type(exc).__name__}"
                if stop.is_set():
                    break
                delay = self.backoff.next_delay()
                logger.warning(
                    "server unreachable, retrying in %.1f s (attempt %d): %s",
                    delay,
                    self.backoff.attempt,
                    reason,
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
            logger.info("stopped")
            return EXIT_OK
        finally:
            # Interrupt local training at its next step; wait for the worker thread to notice.
            self._cancel.set()
            jobs = list(self._jobs.values())
            if jobs:
                await asyncio.gather(*jobs, return_exceptions=True)

    def _certificate_refused(self, exc: ssl.SSLCertVerificationError) -> str:
        """Why the server's TLS certificate was refused, and what the operator can check."""
        ca_file = self.config.server.ca_file
        if ca_file is not None:
            trust = f"is not from the CA in [server] ca_file ({ca_file})"
        else:
            trust = "is not trusted by this machine (set [server] ca_file to the consortium's CA)"
        logger.error("the server's TLS certificate %s: %s", trust, exc.verify_message or exc)
        return f"certificate verify failed: the server's certificate {trust}"

    async def session(self, stop: asyncio.Event) -> None:
        """One websocket session: connect, hello/welcome, serve until it closes or ``stop``.

        Raises:
            AuthRefused: the token was refused; do not reconnect.
            ConsortiumRefused: the server serves another consortium; do not reconnect.
            SessionLost, OSError, TimeoutError, InvalidHandshake: reconnect.
        """
        opening = asyncio.ensure_future(self._connect())
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait({opening, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
        if not opening.done():
            opening.cancel()
            with contextlib.suppress(BaseException):
                await opening
            return
        ws = opening.result()
        async with ws:
            await _Session(self, ws, stop).serve()

    async def _connect(self) -> ClientConnection:
        options: dict[str, Any] = {
            **websocket_options(),
            "additional_headers": {"Authorization": f"Bearer {self.config.server.token}"},
            "user_agent_header": f"quorum-agent/{__version__}",
        }
        if self.config.server.ca_file is not None:
            # Only the consortium's CA: a certificate from any other CA is refused.
            options["ssl"] = ssl.create_default_context(cafile=str(self.config.server.ca_file))
        options.update(self.connect_options)
        logger.debug("connecting to %s", self.config.server.url)
        try:
            return await connect(self.config.server.url, **options)
        except InvalidStatus as exc:
            if exc.response.status_code in AUTH_HTTP_STATUSES:
                raise AuthRefused(f"HTTP {exc.response.status_code}") from None
            raise

    # -- requests ---------------------------------------------------------------------------

    def check_request(
        self,
        fields: Mapping[str, Any],
        *,
        weights_sha256: str | None = None,
        check_expiry: bool = True,
    ) -> dict[str, Any]:
        """Raise TaskError unless the request's grant and the site's policy allow it; return
        the grant's payload.

        Reads decisions.jsonl and sent.jsonl again every time: a decision the operator just
        made with ``quorum-agent approve`` / ``reject`` counts from the next request on.

        Args:
            fields: the stats_request's or task's fields.
            weights_sha256: SHA-256 of a task's global weights payload, checked against the
                grant.
            check_expiry: False for the check just before an accepted task's update leaves.
        """
        run, rnd = fields["run"], fields.get("round")
        grant = check_authorization(
            fields,
            public_key=self.config.server.public_key,
            silo=self.silo,
            consortium=self.consortium,
            weights_sha256=weights_sha256,
            check_expiry=check_expiry,
        )
        policy = self.config.policy
        try:
            decision = self.records.decisions().get(fields["plan_hash"])
            # Only read the whole sent log when the budget needs it.
            spent = (
                epsilon_by_run(self.records.sent()) if policy.max_epsilon_total is not None else {}
            )
        except RecordsError as exc:
            raise _records_unreadable(exc, run, rnd) from None
        check_steward_signature(
            grant,
            fields["plan_hash"],
            steward_keys=self.config.governance.steward_keys,
            decision=decision,
            config_path=self.config.path,
            run=run,
            round=rnd,
        )
        if not self.config.approvals_verified:
            logger.warning(
                "run %s: trusting the server's word that a steward approved plan %s: %s pins "
                "no [governance] steward_keys and does not require local approval, so a "
                "compromised server could make this site train (docs/security.md)",
                run,
                short_hash(fields["plan_hash"]),
                self.config.path,
            )
        if is_analysis(fields["plan"]):
            # No model, no training, no privacy budget: [disclosure] judges what the site
            # releases (clientagent.analysis); require_secure_aggregation and the operator's
            # own decision still count.
            check_analysis_policy(
                fields["plan"],
                fields["plan_hash"],
                policy=policy,
                config_path=self.config.path,
                run=run,
            )
            check_local_decision(
                fields["plan_hash"],
                policy=policy,
                config_path=self.config.path,
                decision=decision,
                run=run,
            )
            return grant
        if is_evaluation_plan(fields["plan"]):
            # No training: the model kind and the operator's decision (clientagent.policy).
            check_evaluation_policy(
                fields["plan"],
                fields["plan_hash"],
                policy=policy,
                config_path=self.config.path,
                decision=decision,
                run=run,
            )
            return grant
        check_policy(
            fields["plan"],
            fields["plan_hash"],
            policy=policy,
            config_path=self.config.path,
            decision=decision,
            spent_by_run=spent,
            run=run,
            round=rnd,
            models=self.config.models,
        )
        return grant

    def _check_task(self, task: protocol.BinaryMessage) -> tuple[str, dict[str, Any]]:
        """The task's weights' SHA-256 and its checked grant (:meth:`check_request`)."""
        payload_sha = tensors.sha256_hex(task.payload)
        return payload_sha, self.check_request(task.fields, weights_sha256=payload_sha)

    def claim_round(self, fields: Mapping[str, Any], grant: Mapping[str, Any]) -> None:
        """Record in rounds.json that this task's round attempt trains now (fsynced).

        Raises:
            TaskError: ``not_authorized`` when this site already trained this round attempt or
                a later one of the run (a replay); ``policy_refused`` when rounds.json is
                damaged or cannot be written.
        """
        self.reserve_round(fields, grant)()

    def reserve_round(
        self, fields: Mapping[str, Any], grant: Mapping[str, Any]
    ) -> Callable[[], None]:
        """Check and reserve this task's round attempt (:meth:`RoundLog.reserve`); return what
        makes the reservation durable, raising TaskError (``policy_refused``) if it cannot.

        Raises:
            TaskError: as :meth:`claim_round`, for a replay or a damaged rounds.json.
        """
        run, rnd = fields["run"], fields["round"]
        try:
            persist = self.round_log.reserve(run, rnd, grant["attempt"])
        except RoundReplayed as exc:
            raise TaskError(
                NOT_AUTHORIZED,
                f"refused before reading any local data: {exc} (sent again by a proxy or by "
                "the server; tell the consortium admin)",
                run=run,
                round=rnd,
                shared_reason=str(exc),
            ) from None
        except (RoundLogError, OSError) as exc:
            raise _round_count_lost(exc, run, rnd) from None

        def durable() -> None:
            try:
                persist()
            except (RoundLogError, OSError) as exc:
                raise _round_count_lost(exc, run, rnd) from None

        return durable

    async def handle_stats_request(self, fields: dict[str, Any], session: _Session) -> None:
        """Check the request, compute the local statistics in a worker thread, reply ``stats``."""
        run = fields["run"]
        label = f"run {run}"
        try:
            await asyncio.to_thread(self.check_request, fields)
        except TaskError as exc:
            await self._refuse(exc, label, session, plan_hash=fields["plan_hash"])
            return
        self.state = "stats"
        try:
            reply = await asyncio.to_thread(
                handle_stats_request,
                fields,
                self.data,
                min_category_count=self.config.policy.min_category_count,
            )
        except TaskError as exc:
            await self._refuse(exc, label, session, plan_hash=fields["plan_hash"])
            return
        finally:
            self.state = "idle"
        await session.send_recorded("stats", reply, plan_hash=fields["plan_hash"])
        logger.info("run %d: sent local statistics of the training split", run)

    async def handle_analysis_request(self, fields: dict[str, Any], session: _Session) -> None:
        """Check the request, answer the analysis step in a worker thread, reply ``analysis``."""
        run = fields["run"]
        label = f"run {run} (analysis step {fields['step']!r})"
        if not is_analysis(fields["plan"]):
            exc = TaskError(
                "invalid_task", "an analysis_request must carry an analysis plan", run=run
            )
            await self._refuse(exc, label, session, plan_hash=fields["plan_hash"])
            return
        try:
            await asyncio.to_thread(self.check_request, fields)
            self.state = "analysis"
            reply = await asyncio.to_thread(
                handle_analysis_request, fields, self.data, self.config.disclosure
            )
            reply, cells = await asyncio.to_thread(mask_reply, fields, reply)
        except TaskError as exc:
            await self._refuse(exc, label, session, plan_hash=fields["plan_hash"])
            return
        finally:
            self.state = "idle"
        if cells is not None:  # the summary leaves only masked, when the server asks for it
            session.secagg.offer_analysis(run, fields["step"], cells)
        await session.send_recorded("analysis", reply, plan_hash=fields["plan_hash"])
        logger.info("%s: answered", label)

    async def handle_task(self, task: protocol.BinaryMessage, session: _Session) -> None:
        """Train (or reuse the update already built for this task) and send the ``update``."""
        fields = task.fields
        run, rnd = fields["run"], fields["round"]
        label = _round_label(run, rnd, fields["rounds"])
        try:
            # The grant covers this round and these exact weights and preprocessing.
            payload_sha, grant = await asyncio.to_thread(self._check_task, task)
        except TaskError as exc:
            await self._refuse(exc, label, session, plan_hash=fields["plan_hash"])
            return
        self._rounds[run] = fields["rounds"]
        # What the update depends on: the same key means the same weights would come out.
        key = (
            run,
            rnd,
            fields["plan_hash"],
            payload_sha,
            canonical_sha256(fields["preprocessing"]),
        )

        built = self._last_update
        if built is not None and built.key == key:
            logger.info("%s: re-sending the update already built for this task", label)
            # A fresh nonce: the server may have recorded the first one before the link dropped.
            update = replace(built.message, fields={**built.message.fields, "nonce": _nonce()})
        else:
            job = self._jobs.get(key)
            if job is None:
                try:
                    # A new training: never twice for a round attempt (rounds.json). Written
                    # while the round trains; the update waits for it (_train).
                    durable = await asyncio.to_thread(self.reserve_round, fields, grant)
                except TaskError as exc:
                    await self._refuse(exc, label, session, plan_hash=fields["plan_hash"])
                    return
                late = time.time() - float(fields["deadline"])
                if late > 0:
                    logger.warning(
                        "%s: the deadline passed %.0f s ago by this machine's clock; training "
                        "anyway (the server may refuse the update; check the clock)",
                        label,
                        late,
                    )
                job = asyncio.ensure_future(self._train(task, label, key, durable))
                self._jobs[key] = job
                job.add_done_callback(lambda done: self._job_done(key, done))
            try:
                # shield: if this session dies, the job (and its thread) carries on and the
                # next session's copy of the task picks up its result.
                built = await asyncio.shield(job)
                update = built.message
            except TaskError as exc:
                await self._refuse(exc, label, session, plan_hash=fields["plan_hash"])
                return
            except TrainingCancelled:
                return

        # Again just before the weights leave: the operator may have rejected the plan while
        # it trained (the latest decision wins). The expiry was checked on arrival.
        recheck = functools.partial(
            self.check_request, fields, weights_sha256=payload_sha, check_expiry=False
        )
        try:
            if fields["plan"].get("secure_aggregation") is True:
                await asyncio.to_thread(recheck)
                # Never in clear: the secure-aggregation session masks it when the server asks.
                await session.secagg.offer(task, update, privacy=built.privacy)
                return
            # The check, the framing and the sent log's line in one worker-thread hop.
            await session.send_update(
                update, plan_hash=fields["plan_hash"], privacy=built.privacy, check=recheck
            )
        except TaskError as exc:
            await self._refuse(exc, label, session, plan_hash=fields["plan_hash"])
            return
        metrics = update.fields["metrics"]
        logger.info(
            "%s: sent update (%d examples, %.1f KiB) global auc %s -> local auc %s",
            label,
            update.fields["num_examples"],
            len(update.payload) / 1024,
            _auc(metrics, "global"),
            _auc(metrics, "local"),
        )

    async def handle_evaluate(self, message: protocol.BinaryMessage, session: _Session) -> None:
        """Check the request (grant, steward approval, policy) like a task's, evaluate the final
        model on the held-out split in a worker thread, reply ``evaluation``. No training."""
        fields = message.fields
        run, version = fields["run"], fields["model_version"]
        label = f"run {run} final model v{version}"
        payload_sha = await asyncio.to_thread(tensors.sha256_hex, message.payload)
        try:
            await asyncio.to_thread(self.check_request, fields, weights_sha256=payload_sha)
            reply = await asyncio.to_thread(handle_evaluate, message, self.data)
        except TaskError as exc:
            await self._refuse(exc, label, session, plan_hash=fields["plan_hash"])
            return
        await session.send_recorded("evaluation", reply, plan_hash=fields["plan_hash"])
        logger.info("%s: sent its evaluation on %d held-out rows", label, _rows(reply))

    def train(
        self, task: protocol.BinaryMessage, *, observer: TrainingObserver | None = None
    ) -> tuple[protocol.BinaryMessage, RoundPrivacy | None]:
        """Train a task with the site's privacy budget; blocking (run it in a worker thread).

        Returns:
            The update, and for a DP plan the round's mechanism (what
            :meth:`record_sent` needs to log the epsilon the update adds).

        Raises:
            TaskError, TrainingCancelled: as :func:`clientagent.trainer.handle_task`.
        """
        budget = _TaskBudget(self, task.fields)
        update = handle_task(
            task,
            self.data,
            silo=self.silo,
            observer=observer,
            cancel=self._cancel,
            budget=budget,
            residuals=ResidualStore(self.config.agent.state_dir / "residuals"),
        )
        download = self._download_seconds.pop((task.fields["run"], task.fields["round"]), None)
        if download is not None:  # what the task's transfer took (bench/round_split.py)
            update.fields["metrics"].setdefault("timing", {})["download_seconds"] = download
        return update, budget.approved

    def task_arrived(self, fields: Mapping[str, Any]) -> None:
        """Note a task's transfer time: its last frame is in; ``sent_at`` is when it left."""
        sent_at = fields.get("sent_at")
        if sent_at is not None:
            self._download_seconds[(fields["run"], fields["round"])] = max(
                0.0, time.time() - float(sent_at)
            )

    async def _train(
        self,
        task: protocol.BinaryMessage,
        label: str,
        key: tuple[Any, ...],
        durable: Callable[[], None],
    ) -> _BuiltUpdate:
        # The round's reservation is written (two fsyncs) while it trains; no update of the
        # round is kept or sent before it is durable (a TaskError from it refuses the task).
        written = asyncio.ensure_future(asyncio.to_thread(durable))
        written.add_done_callback(_retrieved)
        async with self._train_lock:  # one training at a time: the CPU is the bottleneck
            if self._cancel.is_set():
                raise TrainingCancelled(label)
            progress = RoundProgress(label, stream=self.progress_stream, tty=self.progress_tty)
            self.state = "training"
            try:
                update, privacy = await asyncio.to_thread(self.train, task, observer=progress)
            finally:
                progress.close()
                self.state = "idle"
        await written
        # Kept here, not by the session that asked: that session may be gone by now, and the
        # server re-sends the same task after the reconnect.
        self._last_update = _BuiltUpdate(key=key, message=update, privacy=privacy)
        return self._last_update

    def _job_done(self, key: tuple[Any, ...], job: asyncio.Future[Any]) -> None:
        if self._jobs.get(key) is job:
            del self._jobs[key]
        if not job.cancelled():
            job.exception()  # retrieved here: no "exception never retrieved" if nobody waits

    async def _refuse(
        self, exc: TaskError, label: str, session: _Session, *, plan_hash: str | None
    ) -> None:
        # The site operator must see which column and row is wrong, and what the server asked
        # for that the site does not allow: those are ERRORs.
        level = logging.ERROR if exc.code in ERROR_LEVEL_CODES else logging.WARNING
        logger.log(level, "%s: %s: %s", label, exc.code, exc.reason)
        session.secagg.abort(exc.run, exc.round)  # a refused secure round gets no masked input
        await session.send_recorded("error", exc.to_fields(), plan_hash=plan_hash)

    def record_sent(
        self,
        msg_type: str,
        fields: Mapping[str, Any],
        *,
        plan_hash: str | None,
        size: int,
        sha: str,
        privacy: RoundPrivacy | None = None,
    ) -> dict[str, Any]:
        """Append a sent-log line for a message about to leave and return it.

        An update of a DP round (``privacy``) is logged with the epsilon it adds to its run:
        :meth:`RoundPrivacy.increment` for the run's updates already in the log, 0.0 when the
        same payload was logged before (a re-send).

        Raises:
            OSError: the log cannot be written; RecordsError: it cannot be read (DP updates).
        """
        rnd = fields.get("round")
        if msg_type == "update" and privacy is not None and plan_hash is not None:
            return self.records.record_update(
                run=fields["run"],
                round=fields["round"],
                plan_hash=plan_hash,
                size=size,
                sha256=sha,
                spend=privacy.increment,
            )
        return self.records.record_sent(
            type=msg_type,
            run=fields.get("run"),
            round=rnd if isinstance(rnd, int) else None,
            plan_hash=plan_hash,
            size=size,
            sha256=sha,
        )

    # -- server notices ---------------------------------------------------------------------

    def on_welcome(self, fields: Mapping[str, Any]) -> None:
        """Take the silo and consortium names from a ``welcome``; check ``[policy] consortium``.

        Raises:
            ConsortiumRefused: the server serves another consortium than the site agreed to.
        """
        expected = self.config.policy.consortium
        if expected is not None and fields["consortium"] != expected:
            raise ConsortiumRefused(
                f"the server {self.config.server.url} says this site is silo {fields['silo']!r} "
                f"of consortium {fields['consortium']!r}, but [policy] consortium in "
                f"{self.config.path} is {expected!r}: this agent works for {expected!r} only and "
                "stops. Check [server] url and the token with the consortium admin"
            )
        self.silo = fields["silo"]
        self.consortium = fields["consortium"]

    def on_plan_offer(self, fields: Mapping[str, Any]) -> None:
        """Store a ``plan_offer`` in offers.json for the operator's review (``quorum-agent plans``)."""
        try:
            actual = compute_plan_hash(fields["plan"])
        except (TypeError, ValueError):
            actual = None
        if actual != fields["plan_hash"]:
            logger.warning(
                "ignoring the offer of plan %r v%d: its plan_hash %s is not the hash of its plan",
                fields["name"],
                fields["version"],
                short_hash(fields["plan_hash"]),
            )
            return
        try:
            verify_offer(
                fields["authorization"],
                public_key=self.config.server.public_key,
                offer=fields,
                silo=self.silo or None,
            )
        except AuthorizationError as exc:
            logger.warning(
                "refusing the offer of plan %r v%d (hash %s): %s; it is not stored",
                fields["name"],
                fields["version"],
                short_hash(fields["plan_hash"]),
                exc,
            )
            return
        try:
            entry, evicted = self.records.store_offer(fields)
        except OfferRefused as exc:
            logger.warning("refusing the offer of plan %r: %s", fields["name"], exc)
            return
        for old_hash, old_offer in evicted:
            logger.info(
                "forgot the oldest stored offer %r v%s (hash %s): at most %d offers are kept",
                old_offer.get("name"),
                old_offer.get("version"),
                short_hash(old_hash),
                self.records.max_offers,
            )
        if fields["status"] not in OPEN_OFFER_STATUSES:
            # An update of an offer: the plan was withdrawn or rejected, or this version was
            # superseded by an edit; it will not run under this hash.
            logger.info(
                "plan %r v%d (hash %s) is now %s on the server; it will not run as offered",
                fields["name"],
                fields["version"],
                short_hash(fields["plan_hash"]),
                fields["status"],
            )
            return
        hint = ""
        if self.config.policy.require_local_approval:
            try:
                decision = self.records.decisions().get(fields["plan_hash"])
            except RecordsError:
                decision = None  # the check of the next request reports the damaged file
            if decision is None:
                hint = (
                    f"; this site trains only on plans approved locally: review it and run "
                    f"`quorum-agent approve {short_hash(fields['plan_hash'])} "
                    f"--config {self.config.path}`"
                )
        logger.info(
            "plan offered: %r v%d of consortium %r (%s, model %s, privacy %s), hash %s%s",
            fields["name"],
            fields["version"],
            fields["consortium"],
            fields["status"],
            entry["model"],
            entry["privacy"],
            short_hash(fields["plan_hash"]),
            hint,
        )

    def on_update_ack(self, fields: Mapping[str, Any]) -> None:
        """Log the server's verdict on our update and forget the kept copy."""
        run, rnd, status = fields["run"], fields["round"], fields["status"]
        label = _round_label(run, rnd, self._rounds.get(run))
        level = logging.INFO if status in ("accepted", "ok") else logging.WARNING
        logger.log(level, "%s %s", label, status)
        self._forget_update(run, rnd)

    def on_error(self, fields: Mapping[str, Any]) -> None:
        """Log an ``error`` from the server; drop our update if it was about it."""
        code, reason = fields["code"], fields["reason"]
        if code == AUTH_FAILED_CODE:
            raise AuthRefused(f"{code}: {reason}")
        run, rnd = fields.get("run"), fields.get("round")
        where = ""
        if run is not None and rnd is not None:
            where = _round_label(run, rnd, self._rounds.get(run)) + ": "
        elif run is not None:
            where = f"run {run}: "
        logger.warning("%sserver error %s: %s", where, code, reason)
        if run is not None and rnd is not None and code != SERVER_INTERNAL:
            # An "internal" error is the server's (its blob store could not write the update):
            # it sends the task again, and the same update goes back without training again.
            self._forget_update(run, rnd)

    def decisions_changed(self) -> bool:
        """Whether the operator recorded a decision (``quorum-agent approve`` / ``reject``) since
        the last call: decisions.jsonl is append-only, so a new decision makes it grow."""
        try:
            size = self.records.decisions_path.stat().st_size
        except OSError:
            size = 0
        changed = self._decisions_size is not None and size != self._decisions_size
        self._decisions_size = size
        return changed

    def on_run_finished(self, fields: Mapping[str, Any]) -> None:
        """Log the end of a run and free what was kept for it."""
        run = fields["run"]
        logger.info("run %d finished: %s", run, fields["status"])
        self._rounds.pop(run, None)
        if self._last_update is not None and self._last_update.key[0] == run:
            self._last_update = None
        self.data.clear()
        store = ResidualStore(self.config.agent.state_dir / "residuals")
        try:
            if store.forget(run):
                logger.info("run %d: its top-k residual %s is deleted", run, store.path(run))
        except OSError as exc:
            logger.warning(
                "run %d: cannot delete the top-k residual %s (%s); delete it by hand",
                run,
                store.path(run),
                exc,
            )

    def _forget_update(self, run: int, rnd: int) -> None:
        if self._last_update is not None and self._last_update.key[:2] == (run, rnd):
            self._last_update = None


def _retrieved(future: asyncio.Future[Any]) -> None:
    """Mark a background future's exception as seen (the awaiting code may be gone)."""
    if not future.cancelled():
        future.exception()


def _nonce() -> str:
    return secrets.token_hex(16)


def _rows(reply: Mapping[str, Any]) -> int:
    """The held-out rows an evaluation reply is about, whatever the plan's task."""
    part = reply["evaluation"]
    if "confusion" in part:  # multi-class (fedcore.task_metrics)
        return int(sum(sum(row) for row in part["confusion"]))
    if "count" in part:  # regression
        return int(part["count"])
    return int(sum(part["positives"]) + sum(part["negatives"]))


class _Session:
    """One open websocket: handshake, heartbeats, dispatch. Discarded when it closes."""

    def __init__(self, agent: Agent, ws: ClientConnection, stop: asyncio.Event):
        self.agent = agent
        self.ws = ws
        self.stop = stop
        self.reassembler = protocol.Reassembler()
        self.heartbeat_seconds = 30.0
        self._binary_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self.secagg = SecAggSession(
            send_control=self.send_control,
            send_error=lambda fields, plan_hash: self.send_recorded(
                "error", fields, plan_hash=plan_hash
            ),
            send_masked=lambda message, plan_hash, privacy: self.send_update(
                message, plan_hash=plan_hash, privacy=privacy
            ),
        )

    async def serve(self) -> None:
        watcher = asyncio.create_task(self._close_on_stop())
        heartbeat: asyncio.Task[None] | None = None
        try:
            await self._handshake()
            heartbeat = asyncio.create_task(self._heartbeat())
            async for message in self.ws:
                await self._dispatch(message)
        except ConnectionClosed:
            pass
        finally:
            self.secagg.close()  # a reconnect makes this site a dropout of secure rounds
            for task in [watcher, heartbeat, *self._tasks]:
                if task is not None:
                    task.cancel()
            await asyncio.gather(
                *(t for t in [watcher, heartbeat, *self._tasks] if t is not None),
                return_exceptions=True,
            )
        if self.ws.close_code in AUTH_CLOSE_CODES:
            raise AuthRefused(f"connection closed with code {self.ws.close_code}")
        if not self.stop.is_set():
            raise SessionLost(_describe_close(self.ws))

    async def _close_on_stop(self) -> None:
        await self.stop.wait()
        logger.info("closing the connection")
        await self.ws.close(1000, "site agent stopping")

    async def _handshake(self) -> None:
        hello: dict[str, Any] = {"agent_version": __version__}
        if self.agent.config.agent.name:
            hello["site"] = self.agent.config.agent.name
        # The installed model kinds this site allows and has (name, version, digest): the
        # server refuses at proposal a plan naming a kind no participating site announced.
        kinds = await asyncio.to_thread(announced_kinds, self.agent.config.models)
        hello["capabilities"] = {"models": kinds}
        await self.send_control("hello", **hello)
        try:
            fields = await asyncio.wait_for(self._await_welcome(), WELCOME_TIMEOUT_SECONDS)
        except TimeoutError:
            raise SessionLost(
                f"no welcome from the server within {WELCOME_TIMEOUT_SECONDS:.0f} s"
            ) from None
        await self._check_welcome(fields)
        self.heartbeat_seconds = max(MIN_HEARTBEAT_SECONDS, float(fields["heartbeat_seconds"]))
        self.agent.backoff.reset()
        self.agent.sessions += 1
        logger.info(
            "connected to %s as silo %r of consortium %r",
            self.agent.config.server.url,
            fields["silo"],
            fields["consortium"],
        )

    async def _check_welcome(self, fields: Mapping[str, Any]) -> None:
        try:
            self.agent.on_welcome(fields)
        except ConsortiumRefused:
            # Tell the server why this site goes away, then stop (no reconnect).
            with contextlib.suppress(ConnectionClosed, OSError):
                await self.send_recorded(
                    "error",
                    {
                        "code": POLICY_REFUSED,
                        "reason": f"this site serves consortium "
                        f"{self.agent.config.policy.consortium!r} only",
                    },
                    plan_hash=None,
                )
            raise

    async def _await_welcome(self) -> dict[str, Any]:
        while True:
            message = await self.ws.recv()
            if not isinstance(message, str):
                logger.warning("ignoring a binary frame received before welcome")
                continue
            try:
                fields = protocol.decode_control(message)
            except protocol.ProtocolError as exc:
                raise SessionLost(f"bad message instead of welcome: {exc}") from None
            if fields["type"] == "welcome":
                return fields
            if fields["type"] == "error":
                self.agent.on_error(fields)  # raises AuthRefused on auth_failed
                raise SessionLost(f"server error before welcome: {fields['code']}")
            logger.warning("ignoring %r received before welcome", fields["type"])

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            await self.send_control("heartbeat", ts=time.time(), state=self.agent.state)
            if self.agent.decisions_changed():
                # The server stops selecting a site for a run it refused; a new local decision
                # may change the answer, so say so (federation.services.refusals).
                await self.send_control("ready")

    async def _dispatch(self, message: str | bytes) -> None:
        if isinstance(message, str):
            try:
                fields = protocol.decode_control(message)
            except protocol.ProtocolError as exc:
                await self._reject_frame(exc)
                return
            await self._on_control(fields)
            return
        try:
            binary = self.reassembler.feed(message)
        except protocol.ProtocolError as exc:
            await self._reject_frame(exc)
            return
        if binary is None:
            return
        if binary.type == "task":
            self.agent.task_arrived(binary.fields)
            self._spawn(self.agent.handle_task(binary, self), binary.fields)
        elif binary.type == "evaluate":
            self._spawn(self.agent.handle_evaluate(binary, self), binary.fields)
        else:
            logger.warning("ignoring a %r binary message (not for agents)", binary.type)

    async def _on_control(self, fields: dict[str, Any]) -> None:
        kind = fields["type"]
        if kind == "stats_request":
            self._spawn(self.agent.handle_stats_request(fields, self), fields)
        elif kind == "analysis_request":
            self._spawn(self.agent.handle_analysis_request(fields, self), fields)
        elif kind == "update_ack":
            self.agent.on_update_ack(fields)
        elif kind == "error":
            self.secagg.abort(fields.get("run"), fields.get("round"))
            self.agent.on_error(fields)
        elif kind == "run_finished":
            self.secagg.forget_run(fields["run"])
            self.agent.on_run_finished(fields)
        elif kind == "secagg":
            self._spawn(self.secagg.on_message(fields), fields)
        elif kind == "heartbeat_ack":
            logger.debug("heartbeat acknowledged")
        elif kind == "welcome":
            await self._check_welcome(fields)
        elif kind == "plan_offer":
            try:
                await asyncio.to_thread(self.agent.on_plan_offer, fields)
            except (OSError, RecordsError) as exc:
                logger.error(
                    "cannot store the plan offer in %s: %s", self.agent.records.state_dir, exc
                )
        else:
            logger.warning("ignoring a %r message (not for agents)", kind)

    async def _reject_frame(self, exc: protocol.ProtocolError) -> None:
        logger.warning("refused a frame from the server: %s: %s", exc.code, exc)
        reason = str(exc)
        if len(reason) > protocol.MAX_ERROR_REASON_CHARS:
            reason = reason[: protocol.MAX_ERROR_REASON_CHARS - 3] + "..."
        await self.send_recorded("error", {"code": exc.code, "reason": reason}, plan_hash=None)

    def _spawn(self, work: Awaitable[None], fields: Mapping[str, Any]) -> None:
        task = asyncio.ensure_future(self._guard(work, fields))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _guard(self, work: Awaitable[None], fields: Mapping[str, Any]) -> None:
        try:
            await work
        except ConnectionClosed:
            logger.debug("connection closed while handling a request")
        except Exception:
            # A bug, not a refusal: details stay in the local log (they may quote local data).
            logger.exception("failed to handle a %s message", fields.get("type", "task"))
            error: dict[str, Any] = {
                "code": "internal",
                "reason": "the site agent failed to handle the request; see the site's agent log",
            }
            for key in ("run", "round"):
                if isinstance(fields.get(key), int):
                    error[key] = fields[key]
            plan_hash = fields.get("plan_hash")
            # OSError: the sent log cannot be written, so nothing is sent (logged above).
            with contextlib.suppress(ConnectionClosed, OSError):
                await self.send_recorded(
                    "error", error, plan_hash=plan_hash if isinstance(plan_hash, str) else None
                )

    async def send_control(self, msg_type: str, **fields: Any) -> None:
        """Send one JSON control message that carries nothing derived from local data."""
        if msg_type in RECORDED_TYPES:
            raise ValueError(f"{msg_type!r} messages are sent with send_recorded (the sent log)")
        await self.ws.send(protocol.encode_control(msg_type, **fields))

    async def send_recorded(
        self, msg_type: str, fields: Mapping[str, Any], *, plan_hash: str | None
    ) -> None:
        """Write a control message to the sent log (fsynced), then send it.

        Raises:
            OSError: the sent log cannot be written; nothing was sent.
        """
        text = protocol.encode_control(msg_type, **fields)
        data = text.encode("utf-8")
        await asyncio.to_thread(
            self.agent.record_sent,
            msg_type,
            fields,
            plan_hash=plan_hash,
            size=len(data),
            sha=hashlib.sha256(data).hexdigest(),
        )
        await self.ws.send(text)

    async def send_update(
        self,
        update: protocol.BinaryMessage,
        *,
        plan_hash: str,
        privacy: RoundPrivacy | None = None,
        check: Callable[[], Any] | None = None,
    ) -> None:
        """Write the update to the sent log (fsynced), then send its frames.

        The log line holds the payload's sha256 (the one the frame headers declare to the
        server), the bytes of all frames and, for a DP round (``privacy``), the epsilon the
        update adds to its run. ``check`` runs first, in the same worker thread: what it raises
        (the task's last ``check_request``) stops the update before anything is logged or sent.
        """
        # When the upload starts, by this machine's clock (the server measures the transfer).
        if update.type == "update":
            update = replace(update, fields={**update.fields, "sent_at": time.time()})

        # Hashes the payload once (off the event loop); the frames themselves are built one at a
        # time as they are sent, so a 100 MB update is not held twice.
        def prepare() -> protocol.BinaryFrames:
            if check is not None:
                check()
            frames = protocol.binary_frames(
                update, max_frame_bytes=protocol.DEFAULT_MAX_FRAME_BYTES
            )
            self.agent.record_sent(
                "update",
                update.fields,
                plan_hash=plan_hash,
                size=frames.nbytes,
                sha=frames.sha256,
                privacy=privacy,
            )
            return frames

        await self.send_frames(await asyncio.to_thread(prepare))

    async def send_frames(self, frames: Iterable[bytes]) -> None:
        """Send the frames of one binary message, never interleaved with another transfer.

        Each send waits for the socket to drain below websockets' write limit, so at most a
        frame or two sits in memory beyond the payload.
        """
        async with self._binary_lock:
            for frame in frames:
                await self.ws.send(frame)


async def run_agent(
    config: SiteConfig, *, stop: asyncio.Event | None = None, **options: Any
) -> int:
    """Run the site agent until ``stop`` is set or the server refuses the token.

    Args:
        config: the parsed site.toml (see :func:`clientagent.config.load_config`).
        stop: set it to close the websocket cleanly and return EXIT_OK (the CLI sets it on
            SIGINT/SIGTERM).
        **options: keyword arguments for :class:`Agent` (backoff, progress_stream, ...).

    Returns:
        EXIT_OK (0) after ``stop``; EXIT_AUTH (3) when the token was refused; EXIT_POLICY (4)
        when the server's consortium is not ``[policy] consortium``.
    """
    if not config.approvals_verified:
        logger.warning(
            "%s pins no [governance] steward_keys and does not set require_local_approval: "
            "this site will train on the server's word that its steward approved a plan, which "
            "a compromised server or database can forge. Add the steward's key "
            "(`quorum-agent steward-key new`) to [governance] steward_keys (docs/security.md)",
            config.path,
        )
    return await Agent(config, **options).run(stop)
