"""Signed, bounded rounds (issue 13 part 4): what a proxy between agent and server can no longer do.

A real agent talks to the in-test websocket server of test_agent_session, which plays the proxy:
it sends tasks signed by the server's key and then changed (weights zeroed, a preprocessing mean
moved, the round renumbered), old tasks again, expired ones, and a task beyond the plan's rounds.
Each is refused with an ``error`` frame naming why, an ERROR line in the agent's log, and no
training. The agent's own round count (rounds.json) survives a restart.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection

import clientagent.connection as connection
from clientagent.connection import EXIT_OK
from clientagent.roundlog import RoundLog, RoundReplayed
from clientagent.trainer import TaskError
from fedcore import models, protocol, signing, tabular, tensors
from fedcore.plan import plan_hash
from tests.unit.test_agent_policy import (
    WEIGHTS_SHA,
    check,
    refusal,
    task_fields,
    task_grant,
    welcomed_agent,
)
from tests.unit.test_agent_session import (
    PLAN,
    SCHEMA,
    SERVER_KEY,
    WAIT,
    FakeServer,
    fast_heartbeats_and_info_logs,  # noqa: F401 - autouse fixture, applies here too
    grant,
    hello_welcome,
    make_agent,
    send_frames,
    stats_round,
)

pytestmark = pytest.mark.timeout(90)


def signed_task(
    fitted: dict[str, Any],
    *,
    round: int = 1,
    seed: int = 3,
    sent_round: int | None = None,
    sent_weights: bytes | None = None,
    sent_preprocessing: dict[str, Any] | None = None,
    **grant_changes: Any,
) -> list[bytes]:
    """A task the server signed for ``round`` with its weights (from ``seed``) and ``fitted``;
    the ``sent_*`` arguments are what a proxy changed after signing."""
    schema = tabular.DatasetSchema.from_dict(SCHEMA)
    n_features = len(tabular.feature_names(schema, fitted))
    model = models.build_model(PLAN["model"], n_features, seed=seed)
    weights = tensors.encode_state_dict(model.state_dict())
    authorization = grant(PLAN, round=round, weights=weights, preprocessing=fitted, **grant_changes)
    fields = {
        "run": 5,
        "round": round if sent_round is None else sent_round,
        "rounds": PLAN["training"]["rounds"],
        "plan_hash": plan_hash(PLAN),
        "plan": PLAN,
        "preprocessing": fitted if sent_preprocessing is None else sent_preprocessing,
        "deadline": 4102444800.0,  # 2100: the deadline itself is the server's business
        "authorization": authorization,
    }
    payload = weights if sent_weights is None else sent_weights
    task = protocol.BinaryMessage("task", fields, payload)
    return protocol.encode_binary(task, max_frame_bytes=4096, transfer_id="cd" * 16)


def zeroed(fitted: dict[str, Any]) -> bytes:
    """The weights of the task with every value replaced by zero (the attack of the issue)."""
    schema = tabular.DatasetSchema.from_dict(SCHEMA)
    model = models.build_model(PLAN["model"], len(tabular.feature_names(schema, fitted)), seed=3)
    state = {name: value * 0 for name, value in model.state_dict().items()}
    return tensors.encode_state_dict(state)


def moved_mean(fitted: dict[str, Any]) -> dict[str, Any]:
    """The preprocessing with one numeric column's mean changed."""
    changed = copy.deepcopy(fitted)
    text = json.dumps(changed)
    assert '"mean"' in text, "the fitted preprocessing has no mean to move"

    def move(node: Any) -> bool:
        if isinstance(node, dict):
            if isinstance(node.get("mean"), int | float):
                node["mean"] = node["mean"] + 1000.0
                return True
            return any(move(value) for value in node.values())
        if isinstance(node, list):
            return any(move(value) for value in node)
        return False

    assert move(changed)
    return changed


@pytest.fixture
def trained(monkeypatch) -> list[tuple[int, int]]:
    """The (run, round) of every task that reached local training."""
    calls: list[tuple[int, int]] = []
    real = connection.handle_task

    def train(task: protocol.BinaryMessage, *args: Any, **kwargs: Any) -> Any:
        calls.append((task.fields["run"], task.fields["round"]))
        return real(task, *args, **kwargs)

    monkeypatch.setattr(connection, "handle_task", train)
    return calls


async def next_reply(ws: ServerConnection, server: FakeServer) -> dict[str, Any]:
    """The next error frame or update from the agent (heartbeats skipped)."""
    reassembler = protocol.Reassembler()
    while True:
        message = await asyncio.wait_for(ws.recv(), WAIT)
        if isinstance(message, str):
            fields = protocol.decode_control(message)
            if fields["type"] == "heartbeat":
                continue
            return fields
        update = reassembler.feed(message)
        if update is not None:
            return {"type": "update", **update.fields}


# case -> (what the proxy sends, given the fitted preprocessing; part of the refusal's reason)
ATTACKS: dict[str, tuple[Any, str]] = {
    "weights zeroed": (
        lambda fitted: signed_task(fitted, sent_weights=zeroed(fitted)),
        "the global weights received hash to",
    ),
    "preprocessing mean moved": (
        lambda fitted: signed_task(fitted, sent_preprocessing=moved_mean(fitted)),
        "the preprocessing received hashes to",
    ),
    "round renumbered to 99": (
        lambda fitted: signed_task(fitted, sent_round=99),
        "the task says round 99, but the authorization is for round 1",
    ),
    "signed beyond the plan's rounds": (
        lambda fitted: signed_task(fitted, round=4),
        "round 4 is beyond the plan's 3 rounds",
    ),
    "expired": (
        lambda fitted: signed_task(fitted, expires_in=-3600),
        "the authorization expired at",
    ),
    "a stats_request's grant on a task": (
        lambda fitted: signed_task(fitted, kind="stats"),
        "the authorization is for a 'stats' message, not a 'task'",
    ),
}


async def test_tampered_renumbered_expired_and_replayed_tasks_are_refused_untrained(
    tmp_path, caplog, trained
):
    replies: dict[str, dict[str, Any]] = {}

    async def script(ws: ServerConnection, server: FakeServer) -> None:
        await hello_welcome(ws, server)
        fitted = await stats_round(ws, server)
        for name, (attack, _) in ATTACKS.items():
            await send_frames(ws, attack(fitted))
            replies[name] = await next_reply(ws, server)
        # Genuine rounds 1 and 2 train; round 1 sent again (validly signed) is a replay.
        await send_frames(ws, signed_task(fitted, round=1))
        replies["round 1"] = await next_reply(ws, server)
        await send_frames(ws, signed_task(fitted, round=2, seed=4))
        replies["round 2"] = await next_reply(ws, server)
        await send_frames(ws, signed_task(fitted, round=1))
        replies["round 1 replayed"] = await next_reply(ws, server)
        await server.events.put(("done", None))

    server = FakeServer([script])
    await server.start()
    agent = make_agent(tmp_path, server.url)
    stop = asyncio.Event()
    runner = asyncio.create_task(agent.run(stop))
    await server.next_event("done")
    stop.set()
    assert await asyncio.wait_for(runner, WAIT) == EXIT_OK
    await server.stop()

    for name, (_, reason) in ATTACKS.items():
        reply = replies[name]
        assert reply["type"] == "error" and reply["code"] == "not_authorized", (name, reply)
        assert reason in reply["reason"], (name, reply["reason"])
    assert replies["round 1"]["type"] == replies["round 2"]["type"] == "update"
    replay = replies["round 1 replayed"]
    assert replay["type"] == "error" and replay["code"] == "not_authorized"
    assert "is not after round 2 (attempt 1)" in replay["reason"]
    assert "a replayed task" in replay["reason"]
    assert trained == [(5, 1), (5, 2)]  # nothing else reached the data

    logged = [r for r in caplog.records if "not_authorized" in r.getMessage()]
    assert len(logged) == len(ATTACKS) + 1
    assert all(r.levelno == logging.ERROR for r in logged)
    assert all("refused before reading any local data" in r.getMessage() for r in logged)
    sent = [
        json.loads(line)
        for line in (agent.config.agent.state_dir / "sent.jsonl").read_text().splitlines()
    ]
    assert [line["type"] for line in sent].count("error") == len(ATTACKS) + 1
    assert agent.round_log.last(5).round == 2


def test_the_round_count_survives_a_restart_and_refuses_an_old_round(tmp_path):
    agent = welcomed_agent(tmp_path)
    fields = task_fields(authorization=task_grant(attempt=1))
    agent.claim_round(fields, check(agent, fields))
    restarted = welcomed_agent(tmp_path)  # a new process on the same state folder
    with pytest.raises(TaskError) as info:
        restarted.claim_round(fields, check(restarted, fields))
    assert info.value.code == "not_authorized"
    assert "run 5 round 1 (attempt 1) is not after round 1 (attempt 1)" in info.value.reason
    # A retried attempt of the round (the server's retry after a failed attempt) is new.
    retry = task_fields(authorization=task_grant(attempt=2))
    restarted.claim_round(retry, check(restarted, retry))
    assert restarted.round_log.last(5).attempt == 2
    assert (tmp_path / ".quorum-agent" / "rounds.json").stat().st_mode & 0o777 == 0o600


def test_a_damaged_round_count_fails_closed(tmp_path):
    agent = welcomed_agent(tmp_path)
    agent.round_log.path.parent.mkdir(parents=True, exist_ok=True)
    agent.round_log.path.write_text("{not json")
    fields = task_fields()
    with pytest.raises(TaskError) as info:
        agent.claim_round(fields, check(agent, fields))
    assert info.value.code == "policy_refused"
    assert "rounds.json is damaged" in info.value.reason
    assert agent.round_log.path.read_text() == "{not json"  # left for the operator


def test_round_log_counts_per_run(tmp_path):
    log = RoundLog(tmp_path)
    log.claim(1, 3, 1)
    log.claim(2, 1, 1)  # another run has its own count
    with pytest.raises(RoundReplayed):
        log.claim(1, 2, 5)
    log.claim(1, 4, 1)
    assert (log.last(1).round, log.last(2).round, log.last(3)) == (4, 1, None)


def test_task_grant_without_round_scope_is_refused(tmp_path):
    agent = welcomed_agent(tmp_path)
    # A grant as the server signed before rounds were signed: no kind, no hashes, no expiry.
    payload = dict(grant(PLAN)["payload"])
    for key in ("v", "kind", "expires_at", "rounds"):
        payload.pop(key)
    bare = signing.sign_authorization(SERVER_KEY, payload)
    error = refusal(agent, task_fields(authorization=bare))
    assert error.code == "not_authorized"
    assert "the authorization is for a None message, not a 'task'" in error.reason


def test_stats_request_grant_must_be_a_stats_grant(tmp_path):
    agent = welcomed_agent(tmp_path)
    stats = {"run": 5, "plan_hash": plan_hash(PLAN), "plan": PLAN}
    agent.check_request({**stats, "authorization": grant(PLAN)})
    with pytest.raises(TaskError, match="is for a 'task' message, not a 'stats'"):
        agent.check_request({**stats, "authorization": task_grant()})
    with pytest.raises(TaskError, match="expired at"):
        agent.check_request({**stats, "authorization": grant(PLAN, expires_in=-3600)})


def test_a_task_checked_again_before_its_update_leaves_ignores_the_expiry(tmp_path):
    """Training may outlast the expiry: the second check (just before sending) skips it."""
    agent = welcomed_agent(tmp_path)
    fields = task_fields(authorization=task_grant(expires_in=-3600))
    assert "expired" in refusal(agent, fields).reason
    agent.check_request(fields, weights_sha256=WEIGHTS_SHA, check_expiry=False)


def test_a_reserved_round_is_refused_again_before_its_write_and_kept_by_it(tmp_path):
    """The round's reservation counts at once (a replay racing its fsync is refused) and the
    write makes it survive a restart."""
    log = RoundLog(tmp_path)
    persist = log.reserve(7, 1, 1)
    assert not log.path.exists()  # not written yet: the round trains meanwhile
    with pytest.raises(RoundReplayed):
        log.reserve(7, 1, 1)
    assert log.last(7).round == 1
    other = log.reserve(8, 2, 1)  # another run's reservation, written first, keeps run 7's
    other()
    persist()
    restarted = RoundLog(tmp_path)
    assert (restarted.last(7).round, restarted.last(8).round) == (1, 2)
    with pytest.raises(RoundReplayed):
        restarted.reserve(7, 1, 1)


def test_a_reservation_that_cannot_be_written_is_dropped(tmp_path, monkeypatch):
    """A full disk: the write fails, nothing of the round may leave, and the same round asked
    again later is tried again (not refused as a replay)."""
    log = RoundLog(tmp_path)
    persist = log.reserve(7, 1, 1)

    def full(*_: Any, **__: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("clientagent.roundlog.os.fsync", full)
    with pytest.raises(OSError, match="No space left"):
        persist()
    monkeypatch.undo()
    assert log.last(7) is None
    log.reserve(7, 1, 1)()
    assert RoundLog(tmp_path).last(7).round == 1


async def test_a_round_count_that_cannot_be_written_refuses_the_task_and_sends_no_update(
    tmp_path,
):
    """rounds.json is written while the round trains; when that fails the update never leaves:
    the task is refused with policy_refused and only the error is in the sent log."""
    replies: dict[str, dict[str, Any]] = {}

    def fail(*_: Any, **__: Any) -> None:
        raise OSError(28, "No space left on device")

    async def script(ws: ServerConnection, server: FakeServer) -> None:
        await hello_welcome(ws, server)
        fitted = await stats_round(ws, server)
        write = RoundLog._write
        RoundLog._write = fail  # type: ignore[method-assign]
        try:
            await send_frames(ws, signed_task(fitted, round=1))
            replies["refused"] = await next_reply(ws, server)
        finally:
            RoundLog._write = write  # type: ignore[method-assign]
        await send_frames(ws, signed_task(fitted, round=1))  # the disk has room again
        replies["again"] = await next_reply(ws, server)
        await server.events.put(("done", None))

    server = FakeServer([script])
    await server.start()
    agent = make_agent(tmp_path, server.url)
    stop = asyncio.Event()
    runner = asyncio.create_task(agent.run(stop))
    await server.next_event("done")
    stop.set()
    assert await asyncio.wait_for(runner, WAIT) == EXIT_OK
    await server.stop()

    refused = replies["refused"]
    assert refused["type"] == "error" and refused["code"] == "policy_refused", refused
    assert "round count cannot be kept" in refused["reason"]
    assert replies["again"]["type"] == "update"
    sent = [
        json.loads(line)
        for line in (agent.config.agent.state_dir / "sent.jsonl").read_text().splitlines()
    ]
    assert [line["type"] for line in sent if line["type"] != "stats"] == ["error", "update"]
