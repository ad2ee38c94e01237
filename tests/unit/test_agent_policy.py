"""The site's own checks: signed grants, [policy], local approval, plan offers and the sent log.

Websocket tests reuse the in-test server of test_agent_session; the rule-by-rule tests call
Agent.check_request directly (the same check every stats_request and task goes through).
"""

from __future__ import annotations

import asyncio
import copy
import getpass
import hashlib
import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection

import clientagent.connection as connection
from clientagent import cli
from clientagent.config import load_config
from clientagent.connection import EXIT_OK, EXIT_POLICY, Agent
from clientagent.records import APPROVED, REJECTED, SiteRecords
from clientagent.trainer import TaskError
from fedcore import protocol, signing, tabular
from fedcore.plan import plan_hash
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
    stats_request,
    task_frames,
    write_site,
)

pytestmark = pytest.mark.timeout(60)

NOWHERE = "ws://127.0.0.1:9/ws/agent/"  # for agents that never connect
DP_PLAN = {
    **PLAN,
    "privacy": {
        "mode": "sample",
        "noise_multiplier": 1.1,
        "target_epsilon": 2.0,
        "clip": 1.0,
        "delta": 1e-5,
    },
}


def with_privacy(**privacy: Any) -> dict[str, Any]:
    return {**PLAN, "privacy": privacy}


def welcomed_agent(tmp_path: Path, policy: str = "") -> Agent:
    """An agent (never connected) that has been welcomed as silo site-a of thyroid."""
    agent = Agent(load_config(write_site(tmp_path, NOWHERE, policy=policy)), progress_tty=False)
    agent.on_welcome({"silo": "site-a", "consortium": "thyroid"})
    return agent


WEIGHTS = b"the global weights"  # what check_request sees of a task's payload: its hash
WEIGHTS_SHA = hashlib.sha256(WEIGHTS).hexdigest()


def task_grant(plan: dict[str, Any] = PLAN, **changes: Any) -> dict[str, Any]:
    """The grant of round 1 of run 5 with WEIGHTS and no preprocessing."""
    return grant(plan, round=1, weights=WEIGHTS, preprocessing={}, **changes)


def task_fields(plan: dict[str, Any] = PLAN, **changes: Any) -> dict[str, Any]:
    """The fields of a signed task for round 1 of run 5 (what check_request sees)."""
    fields = {
        "run": 5,
        "round": 1,
        "rounds": 3,
        "plan_hash": plan_hash(plan),
        "plan": plan,
        "preprocessing": {},
        "authorization": task_grant(plan),
    }
    fields.update(changes)
    return fields


def refusal(agent: Agent, fields: dict[str, Any]) -> TaskError:
    with pytest.raises(TaskError) as info:
        check(agent, fields)
    return info.value


def check(agent: Agent, fields: dict[str, Any]) -> dict[str, Any]:
    """Agent.check_request of a task whose payload is WEIGHTS."""
    return agent.check_request(fields, weights_sha256=WEIGHTS_SHA)


def sent_lines(agent: Agent) -> list[dict[str, Any]]:
    path = agent.config.agent.state_dir / "sent.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


async def recv_text(ws: ServerConnection, server: FakeServer) -> tuple[dict[str, Any], str]:
    """The next control message other than a heartbeat or a 'ready' (which follows a local
    decision), decoded and as the raw text."""
    while True:
        message = await asyncio.wait_for(ws.recv(), WAIT)
        assert isinstance(message, str), "expected a text frame"
        fields = protocol.decode_control(message)
        if fields["type"] == "heartbeat":
            server.heartbeats += 1
            continue
        if fields["type"] == "ready":
            continue
        return fields, message


async def recv_update_frames(
    ws: ServerConnection, server: FakeServer
) -> tuple[protocol.BinaryMessage, int]:
    """The next update and the total bytes of its frames."""
    reassembler = protocol.Reassembler()
    size = 0
    while True:
        message = await asyncio.wait_for(ws.recv(), WAIT)
        if isinstance(message, str):
            assert protocol.decode_control(message)["type"] == "heartbeat", message
            continue
        size += len(message)
        update = reassembler.feed(message)
        if update is not None:
            return update, size


def fitted_from(stats: dict[str, Any]) -> dict[str, Any]:
    return tabular.merge_statistics([stats["stats"]], tabular.DatasetSchema.from_dict(SCHEMA))


@pytest.fixture
def counted(monkeypatch) -> dict[str, int]:
    """Counts the calls into the code that reads local data (stats and training)."""
    calls = {"stats": 0, "train": 0}
    real_stats, real_task = connection.handle_stats_request, connection.handle_task

    def stats(*args: Any, **kwargs: Any) -> Any:
        calls["stats"] += 1
        return real_stats(*args, **kwargs)

    def train(*args: Any, **kwargs: Any) -> Any:
        calls["train"] += 1
        return real_task(*args, **kwargs)

    monkeypatch.setattr(connection, "handle_stats_request", stats)
    monkeypatch.setattr(connection, "handle_task", train)
    return calls


# -- over the websocket ------------------------------------------------------------------------


async def test_forged_requests_are_refused_unread_and_everything_sent_is_logged(
    tmp_path, caplog, capsys, counted
):
    impostor = signing.generate_private_key()
    received: dict[str, Any] = {}

    async def script(ws: ServerConnection, server: FakeServer) -> None:
        await hello_welcome(ws, server)
        await ws.send(stats_request(key=impostor))
        received["stats_refusal"] = await recv_text(ws, server)
        await ws.send(stats_request())
        received["stats"] = await recv_text(ws, server)
        fitted = fitted_from(received["stats"][0])
        forged = grant(key=impostor)
        await send_frames(ws, task_frames(fitted, authorization=forged))
        received["task_refusal"] = await recv_text(ws, server)
        await send_frames(ws, task_frames(fitted))
        received["update"] = await recv_update_frames(ws, server)
        await server.events.put(("done", None))

    server = FakeServer([script])
    await server.start()
    agent = make_agent(tmp_path, server.url)
    stop = asyncio.Event()
    runner = asyncio.create_task(agent.run(stop))
    await server.next_event("done")

    # Forged requests: an error frame, nothing computed from the data, the agent carries on.
    for key, rnd in (("stats_refusal", None), ("task_refusal", 1)):
        error, _ = received[key]
        assert error["type"] == "error" and error["code"] == "not_authorized"
        assert error["run"] == 5 and error.get("round") == rnd
        assert "signature does not verify" in error["reason"]
    assert counted == {"stats": 1, "train": 1}  # only the genuine requests
    refusals = [r for r in caplog.records if "not_authorized" in r.getMessage()]
    assert len(refusals) == 2 and all(r.levelno == logging.ERROR for r in refusals)
    assert "refused before reading any local data" in refusals[0].getMessage()

    # The sent log: one line per message that left, hashes and sizes of exactly what left.
    stats_fields, stats_text = received["stats"]
    assert stats_fields["type"] == "stats"
    update, update_bytes = received["update"]
    lines = sent_lines(agent)
    assert [line["type"] for line in lines] == ["error", "stats", "error", "update"]
    texts = [received["stats_refusal"][1], stats_text, received["task_refusal"][1]]
    for line, text in zip(lines[:3], texts, strict=True):
        assert line["sha256"] == hashlib.sha256(text.encode()).hexdigest()
        assert line["bytes"] == len(text.encode())
    assert lines[3]["sha256"] == hashlib.sha256(update.payload).hexdigest()
    assert lines[3]["bytes"] == update_bytes > len(update.payload)
    for line in lines:
        assert line["run"] == 5 and line["plan_hash"] == plan_hash(PLAN)
        assert line["epsilon"] == 0.0
        assert datetime.fromisoformat(line["time"]).utcoffset() == UTC.utcoffset(None)
    assert "round" not in lines[1] and lines[2]["round"] == lines[3]["round"] == 1

    stop.set()
    assert await asyncio.wait_for(runner, WAIT) == EXIT_OK
    await server.stop()

    # What an auditor sees.
    config = str(agent.config.path)
    assert cli.main(["log", "--config", config]) == EXIT_OK
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == [
        "TIME",
        "(UTC)",
        "TYPE",
        "RUN",
        "ROUND",
        "PLAN",
        "BYTES",
        "SHA256",
        "EPSILON",
    ]
    update_row = table.splitlines()[4].split()
    assert update_row[1:6] == ["update", "5", "1", plan_hash(PLAN)[:12], str(update_bytes)]
    assert lines[3]["sha256"].startswith(update_row[6])
    assert f"4 messages, {sum(line['bytes'] for line in lines)} bytes, epsilon spent 0" in table
    assert cli.main(["log", "--config", config, "--json"]) == EXIT_OK
    assert [json.loads(line) for line in capsys.readouterr().out.splitlines()] == lines


async def test_local_approval_refuses_until_the_operator_approves(tmp_path, capsys, counted):
    approved = asyncio.Event()
    received: dict[str, Any] = {}
    digest = plan_hash(PLAN)

    async def script(ws: ServerConnection, server: FakeServer) -> None:
        await hello_welcome(ws, server)
        await ws.send(
            protocol.encode_control(
                "plan_offer", **offer(digest, "thyroid-lr", 2, status="approved", silo="site-a")
            )
        )
        await ws.send(stats_request())
        received["refusal"], _ = await recv_text(ws, server)
        await server.events.put(("refused", None))
        await asyncio.wait_for(approved.wait(), WAIT)
        await ws.send(stats_request())
        received["stats"], _ = await recv_text(ws, server)
        await server.events.put(("done", None))

    server = FakeServer([script])
    await server.start()
    agent = make_agent(tmp_path, server.url, policy="require_local_approval = true")
    config = str(agent.config.path)
    stop = asyncio.Event()
    runner = asyncio.create_task(agent.run(stop))
    await server.next_event("refused")

    refusal = received["refusal"]
    assert refusal["code"] == "policy_refused" and refusal["run"] == 5
    assert "has not approved plan" in refusal["reason"]
    assert counted["stats"] == 0
    offers = json.loads((agent.config.agent.state_dir / "offers.json").read_text())
    assert offers[digest] | {"received_at": None, "plan": None} == {
        "name": "thyroid-lr",
        "version": 2,
        "consortium": "thyroid",
        "status": "approved",
        "model": "logistic_regression",
        "privacy": "none",
        "received_at": None,
        "plan": None,
    }
    assert offers[digest]["plan"] == PLAN
    assert cli.main(["plans", "--config", config]) == EXIT_OK
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split() == [
        "HASH",
        "NAME",
        "VERSION",
        "CONSORTIUM",
        "MODEL",
        "PRIVACY",
        "SERVER",
        "LOCAL",
    ]
    row = [digest[:12], "thyroid-lr", "2", "thyroid", "logistic_regression", "none", "approved"]
    assert listing[1].split() == [*row, "pending"]

    assert cli.main(["approve", digest[:8], "--config", config]) == EXIT_OK
    assert digest in capsys.readouterr().out
    approved.set()
    await server.next_event("done")

    assert received["stats"]["type"] == "stats"
    assert counted["stats"] == 1
    assert cli.main(["plans", "--config", config]) == EXIT_OK
    assert capsys.readouterr().out.splitlines()[1].split() == [*row, "approved"]
    stop.set()
    assert await asyncio.wait_for(runner, WAIT) == EXIT_OK
    await server.stop()


async def test_a_rejection_while_training_stops_the_update(tmp_path, monkeypatch, caplog):
    real_task = connection.handle_task
    records: list[SiteRecords] = []

    def train_then_reject(*args: Any, **kwargs: Any) -> Any:
        update = real_task(*args, **kwargs)
        # The operator rejects the plan while the round trains.
        records[0].decide(plan_hash(PLAN), REJECTED, reason="too many epochs", operator="ops")
        return update

    monkeypatch.setattr(connection, "handle_task", train_then_reject)
    received: dict[str, Any] = {}

    async def script(ws: ServerConnection, server: FakeServer) -> None:
        await hello_welcome(ws, server)
        await ws.send(stats_request())
        stats, _ = await recv_text(ws, server)
        await send_frames(ws, task_frames(fitted_from(stats)))
        received["reply"], _ = await recv_text(ws, server)  # an error, not binary frames
        await server.events.put(("done", None))

    server = FakeServer([script])
    await server.start()
    agent = make_agent(tmp_path, server.url)
    records.append(agent.records)
    stop = asyncio.Event()
    runner = asyncio.create_task(agent.run(stop))
    await server.next_event("done")

    reply = received["reply"]
    assert reply["code"] == "policy_refused" and reply["round"] == 1
    assert "the site operator rejected plan" in reply["reason"]
    assert "too many epochs" in reply["reason"]
    assert [line["type"] for line in sent_lines(agent)] == ["stats", "error"]
    stop.set()
    assert await asyncio.wait_for(runner, WAIT) == EXIT_OK
    await server.stop()


async def test_a_server_of_another_consortium_makes_the_agent_stop(tmp_path, caplog):
    async def script(ws: ServerConnection, server: FakeServer) -> None:
        await hello_welcome(ws, server)  # consortium "thyroid"
        error, _ = await recv_text(ws, server)
        await server.events.put(("error", error))

    server = FakeServer([script])
    await server.start()
    agent = make_agent(tmp_path, server.url, policy='consortium = "cardiology"')

    assert await asyncio.wait_for(agent.run(), WAIT) == EXIT_POLICY

    error = await server.next_event("error")
    assert error["code"] == "policy_refused" and "'cardiology' only" in error["reason"]
    logged = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert any("[policy] consortium" in r.getMessage() for r in logged)
    assert "retrying" not in caplog.text
    await server.stop()


# -- the signed grant ---------------------------------------------------------------------------

OTHER_PLAN = {**PLAN, "seed": 1}
IMPOSTOR = signing.generate_private_key()


def _tampered() -> dict[str, Any]:
    authorization = copy.deepcopy(task_grant(silo="site-b"))
    authorization["payload"]["silo"] = "site-a"  # edited after signing
    return authorization


NOT_AUTHORIZED = {
    "forged signature": ({"authorization": task_grant(key=IMPOSTOR)}, "signature does not verify"),
    "tampered payload": ({"authorization": _tampered()}, "signature does not verify"),
    "another silo": (
        {"authorization": task_grant(silo="site-b")},
        "for silo 'site-b', not 'site-a'",
    ),
    "another plan": ({"authorization": task_grant(OTHER_PLAN)}, "but the authorization is for"),
    "another run": ({"authorization": task_grant(run=6)}, "for run 6, not 5"),
    "no steward approval": (
        {"authorization": task_grant(silo_approvals=[])},
        "no data steward of silo 'site-a' approved",
    ),
    "another consortium": (
        {"authorization": task_grant(consortium="cardiology")},
        "for consortium 'cardiology', not 'thyroid'",
    ),
    "plan_hash not of the plan": (
        {"plan_hash": plan_hash(OTHER_PLAN)},
        "but the plan it carries hashes to",
    ),
    "empty authorization": ({"authorization": {}}, "no payload or signature"),
}


@pytest.mark.parametrize("case", sorted(NOT_AUTHORIZED))
def test_requests_without_a_valid_grant_are_not_authorized(tmp_path, case):
    changes, expected = NOT_AUTHORIZED[case]
    agent = welcomed_agent(tmp_path)

    error = refusal(agent, task_fields(**changes))

    assert error.code == "not_authorized"
    fields = error.to_fields()
    assert fields["run"] == 5 and fields["round"] == 1
    assert expected in fields["reason"], fields["reason"]
    assert agent.data._split is None  # the data file was never read


def test_a_genuine_grant_passes(tmp_path):
    agent = welcomed_agent(tmp_path)

    check(agent, task_fields())
    check(agent, task_fields(DP_PLAN, authorization=task_grant(DP_PLAN)))


def test_nothing_is_authorized_before_the_welcome(tmp_path):
    agent = Agent(load_config(write_site(tmp_path, NOWHERE)), progress_tty=False)

    assert refusal(agent, task_fields()).code == "not_authorized"


# -- the site's [policy] ------------------------------------------------------------------------

SPENT_ELSEWHERE = [{"run": 3, "epsilon": 2.5}]
# Client-level DP: the server adds all the noise (central), or every site adds its share before
# masking (distributed, under secure aggregation).
CENTRAL_DP_PLAN = with_privacy(mode="client", noise_multiplier=1.1, target_epsilon=2.0, clip=1.0)
DISTRIBUTED_DP_PLAN = {**CENTRAL_DP_PLAN, "secure_aggregation": True}
# case -> ([policy] lines, plan, sent-log lines, None when accepted else part of the reason)
POLICY_CASES: dict[str, tuple[str, dict[str, Any], list[dict[str, Any]], str | None]] = {
    "model kind not allowed": ('allowed_models = ["mlp"]', PLAN, [], "model kind"),
    "model kind allowed": ('allowed_models = ["logistic_regression"]', PLAN, [], None),
    "dp required, plan without": ("require_dp = true", PLAN, [], "require_dp"),
    "dp required, plan with": ("require_dp = true", DP_PLAN, [], None),
    # Issue 13 part 5: only noise added at the site counts.
    "dp required, central noise only": (
        "require_dp = true",
        CENTRAL_DP_PLAN,
        [],
        "relies on noise the server adds (privacy.mode 'client' without secure_aggregation)",
    ),
    "dp required, client dp with distributed noise": (
        "require_dp = true",
        DISTRIBUTED_DP_PLAN,
        [],
        None,
    ),
    "per-plan cap, central noise only": (
        "max_epsilon_per_plan = 5",
        CENTRAL_DP_PLAN,
        [],
        "this site caps epsilon (max_epsilon_per_plan) and counts only noise added at the site",
    ),
    "total cap, central noise only": (
        "max_epsilon_total = 50",
        CENTRAL_DP_PLAN,
        [],
        "this site caps epsilon (max_epsilon_total) and counts only noise added at the site",
    ),
    "per-plan cap, client dp with distributed noise": (
        "max_epsilon_per_plan = 5",
        DISTRIBUTED_DP_PLAN,
        [],
        None,
    ),
    "per-plan cap, distributed noise above it": (
        "max_epsilon_per_plan = 1",
        DISTRIBUTED_DP_PLAN,
        [],
        "target epsilon 2 is above this site's max_epsilon_per_plan 1",
    ),
    "central noise without any dp policy": ("", CENTRAL_DP_PLAN, [], None),
    "secure aggregation required, plan without": (
        "require_secure_aggregation = true",
        PLAN,
        [],
        "require_secure_aggregation",
    ),
    "secure aggregation required, plan with": (
        "require_secure_aggregation = true",
        {**PLAN, "secure_aggregation": True},
        [],
        None,
    ),
    "epsilon above the per-plan limit": (
        "max_epsilon_per_plan = 1.5",
        DP_PLAN,
        [],
        "target epsilon 2 is above this site's max_epsilon_per_plan 1.5",
    ),
    "epsilon at the per-plan limit": ("max_epsilon_per_plan = 2.0", DP_PLAN, [], None),
    "no dp under an epsilon cap": (
        "max_epsilon_per_plan = 0.1",
        PLAN,
        [],
        "the plan adds no noise (privacy.mode 'none'), so its epsilon here is unbounded",
    ),
    "only a noise multiplier": (
        "max_epsilon_per_plan = 5",
        {**with_privacy(mode="client", noise_multiplier=1.1), "secure_aggregation": True},
        [],
        "the plan gives no target epsilon to check against max_epsilon_per_plan",
    ),
    "only a noise multiplier, total limit": (
        "max_epsilon_total = 5",
        with_privacy(mode="sample", noise_multiplier=1.1),
        [],
        "no target epsilon to check against max_epsilon_total",
    ),
    "only a noise multiplier, no limit": (
        "",
        with_privacy(mode="sample", noise_multiplier=1),
        [],
        None,
    ),
    "total budget exceeded": (
        "max_epsilon_total = 4.0",
        DP_PLAN,
        SPENT_ELSEWHERE,
        "bring the privacy budget spent at this site to 4.5",
    ),
    "total budget enough": ("max_epsilon_total = 4.5", DP_PLAN, SPENT_ELSEWHERE, None),
    # This run's own spending is part of its projection, not added to it.
    "own run not counted twice": (
        "max_epsilon_total = 2.0",
        DP_PLAN,
        [{"run": 5, "epsilon": 1.5}],
        None,
    ),
    "no model kind": ("", {k: v for k, v in PLAN.items() if k != "model"}, [], "no model kind"),
    "unknown privacy mode": ("", with_privacy(mode="laplace"), [], "privacy.mode 'laplace'"),
    "local approval missing": ("require_local_approval = true", PLAN, [], "has not approved"),
}


@pytest.mark.parametrize("case", sorted(POLICY_CASES))
def test_policy_rules(tmp_path, case):
    policy, plan, spent, expected = POLICY_CASES[case]
    agent = welcomed_agent(tmp_path, policy)
    for line in spent:
        agent.records.record_sent(
            type="update",
            run=line["run"],
            round=1,
            plan_hash="0" * 64,
            size=1,
            sha256="0" * 64,
            epsilon=line["epsilon"],
        )
    fields = task_fields(plan, authorization=task_grant(plan))

    if expected is None:
        check(agent, fields)
        return
    error = refusal(agent, fields)
    assert error.code == "policy_refused"
    assert expected in error.reason, error.reason
    shared = error.to_fields()["reason"]
    assert shared.startswith("refused by the site's policy: ") and expected in shared
    assert str(agent.config.path) not in shared  # the operator's hints stay local
    assert agent.data._split is None


def test_a_local_rejection_counts_without_require_local_approval(tmp_path):
    agent = welcomed_agent(tmp_path)
    digest = plan_hash(PLAN)
    agent.records.decide(digest, REJECTED, reason="no MLPs on Fridays", operator="ops")

    error = refusal(agent, task_fields())

    assert error.code == "policy_refused"
    assert "rejected plan" in error.shared_reason and "no MLPs on Fridays" in error.shared_reason
    agent.records.decide(digest, APPROVED, reason="", operator="ops")  # the latest one wins
    check(agent, task_fields())


def test_unreadable_decisions_fail_closed(tmp_path):
    agent = welcomed_agent(tmp_path)
    agent.config.agent.state_dir.mkdir()
    (agent.config.agent.state_dir / "decisions.jsonl").write_text("{not json\n")

    error = refusal(agent, task_fields())

    assert error.code == "policy_refused"
    assert "decisions.jsonl: line 1" in error.reason
    assert "decisions.jsonl" not in error.shared_reason


# -- offers and the operator's CLI --------------------------------------------------------------


def offer(
    digest: str,
    name: str,
    version: int = 1,
    *,
    plan: dict[str, Any] = PLAN,
    status: str = "submitted",
    key: Any = SERVER_KEY,
    silo: str = "site-a",
) -> dict[str, Any]:
    """A plan_offer's fields, signed by the fake server's key as the real server signs them."""
    fields = {
        "plan_hash": digest,
        "plan": plan,
        "name": name,
        "version": version,
        "consortium": "thyroid",
        "status": status,
    }
    signed = {k: v for k, v in fields.items() if k != "plan"}
    signed |= {"silo": silo, "issued_at": datetime.now(UTC).isoformat()}
    return fields | {"authorization": signing.sign_offer(key, signed)}


def test_an_offer_whose_hash_is_not_its_plan_is_ignored(tmp_path, caplog):
    agent = welcomed_agent(tmp_path)

    agent.on_plan_offer(offer("ab" * 32, "liar"))
    agent.on_plan_offer(offer(plan_hash(PLAN), "honest"))

    offers = agent.records.offers()
    assert list(offers) == [plan_hash(PLAN)] and offers[plan_hash(PLAN)]["name"] == "honest"
    assert "is not the hash of its plan" in caplog.text
    # Written atomically: no temp file left next to it.
    assert sorted(p.name for p in agent.config.agent.state_dir.iterdir()) == ["offers.json"]


def test_approve_and_reject_by_prefix(tmp_path, capsys):
    site = write_site(tmp_path, NOWHERE)
    config = str(site)
    records = SiteRecords(load_config(site).agent.state_dir)
    first, second, third = "abcdef12" + "0" * 56, "abcdef12" + "1" * 56, "12345678" + "f" * 56
    for digest, name in ((first, "one"), (second, "two"), (third, "three")):
        records.store_offer(offer(digest, name))

    def run(*argv: str) -> tuple[int, str, str]:
        code = cli.main([*argv, "--config", config])
        out, err = capsys.readouterr()
        return code, out, err

    code, _, err = run("approve", "abcdef12")
    assert code == 2 and first in err and second in err and "give more characters" in err
    assert "'one' v1, submitted" in err and "'two' v1, submitted" in err and third not in err
    code, _, err = run("approve", "abcdef1")
    assert code == 2 and "at least 8 characters" in err
    assert first in err and second in err and third not in err  # what the prefix starts
    code, _, err = run("approve", "not-a-hash")
    assert code == 2 and "not a plan hash" in err
    code, _, err = run("approve", "99999999")
    assert code == 2 and "no offered plan" in err and "full 64-character hash" in err
    # An unknown prefix lists every offered plan the operator may have meant.
    assert all(digest in err for digest in (first, second, third)) and "'three' v1" in err
    assert not records.decisions_path.exists()  # nothing recorded by the failures

    code, out, _ = run("approve", "ABCDEF121")  # case does not matter
    assert code == 0 and f"approved plan {second} 'two' v1" in out
    code, out, _ = run("reject", "12345678", "--reason", "uses the postcode column")
    assert code == 0 and f"rejected plan {third}" in out
    unknown = "7" * 64  # pre-approval of a plan not offered yet
    code, out, _ = run("approve", unknown)
    assert code == 0 and "(not offered yet)" in out
    code, _, _ = run("approve", third)  # the latest decision wins

    lines = [json.loads(line) for line in records.decisions_path.read_text().splitlines()]
    assert [(d["plan_hash"], d["decision"]) for d in lines] == [
        (second, "approved"),
        (third, "rejected"),
        (unknown, "approved"),
        (third, "approved"),
    ]
    assert lines[1]["reason"] == "uses the postcode column"
    assert {d["operator"] for d in lines} == {getpass.getuser()}
    assert all(datetime.fromisoformat(d["time"]).tzinfo is not None for d in lines)
    assert records.decisions()[third].decision == APPROVED

    code, out, _ = run("plans")
    rows = {line.split()[1]: line.split() for line in out.splitlines()[1:] if line.strip()}
    assert rows["one"][-1] == "pending" and rows["one"][0] == first[:12]
    assert rows["two"][-1] == "approved" and rows["three"][-1] == "approved"
    assert rows["(not"][0] == unknown[:12] and rows["(not"][-1] == "approved"


def test_plans_and_log_with_nothing_yet(tmp_path, capsys):
    config = str(write_site(tmp_path, NOWHERE))

    assert cli.main(["plans", "--config", config]) == 0
    assert "no plan offers received yet" in capsys.readouterr().out
    assert cli.main(["log", "--config", config]) == 0
    assert "nothing sent yet" in capsys.readouterr().out
    assert cli.main(["log", "--config", config, "--json"]) == 0
    assert capsys.readouterr().out == ""


def test_an_offer_whose_signature_does_not_verify_is_refused_and_not_stored(tmp_path, caplog):
    agent = welcomed_agent(tmp_path)
    digest = plan_hash(PLAN)
    unsigned = {k: v for k, v in offer(digest, "x").items() if k != "authorization"}
    forged = offer(digest, "forged", key=signing.generate_private_key())
    renamed = offer(digest, "honest") | {"name": "renamed in transit"}
    elsewhere = offer(digest, "for another silo", silo="site-b")
    grant_as_offer = offer(digest, "a grant") | {"authorization": grant()}

    agent.on_plan_offer(unsigned | {"authorization": {}})
    for fields in (forged, renamed, elsewhere, grant_as_offer):
        agent.on_plan_offer(fields)

    assert agent.records.offers() == {}
    text = caplog.text
    assert text.count("refusing the offer") == 5 and "it is not stored" in text
    assert "does not verify with the server key pinned" in text
    assert "name is not the one the server signed" in text and "not 'site-a'" in text


def test_an_offer_must_carry_the_name_its_hashed_plan_carries(tmp_path, caplog):
    agent = welcomed_agent(tmp_path)
    named = dict(PLAN, name="Readmission", description=None)
    digest = plan_hash(named)

    agent.on_plan_offer(offer(digest, "Something nicer", plan=named))  # signed, but misnamed
    assert agent.records.offers() == {}
    assert "named 'Something nicer' but its plan is named 'Readmission'" in caplog.text
    agent.on_plan_offer(offer(digest, "Readmission", plan=named))
    assert agent.records.offers()[digest]["name"] == "Readmission"


def test_offers_are_bounded_in_count_and_size_oldest_evicted(tmp_path, caplog):
    agent = welcomed_agent(tmp_path)
    agent.records.max_offers = 3
    plans = [dict(PLAN, rounds=i + 1) for i in range(5)]
    for i, plan in enumerate(plans):
        agent.on_plan_offer(offer(plan_hash(plan), f"plan {i}", plan=plan))

    names = sorted(o["name"] for o in agent.records.offers().values())
    assert names == ["plan 2", "plan 3", "plan 4"]
    assert caplog.text.count("forgot the oldest stored offer") == 2
    assert "'plan 0'" in caplog.text and "at most 3 offers are kept" in caplog.text

    huge = dict(PLAN, description="x" * agent.records.max_offer_bytes)
    agent.on_plan_offer(offer(plan_hash(huge), "huge", plan=huge))
    assert "huge" not in [o["name"] for o in agent.records.offers().values()]
    assert "offers above 262144 bytes are not stored" in caplog.text


def test_a_signed_offer_is_never_accepted_as_a_grant_to_train() -> None:
    signed = offer(plan_hash(PLAN), "x")["authorization"]
    with pytest.raises(signing.AuthorizationError, match="not a grant to train"):
        signing.verify_authorization(
            signed,
            public_key=signing.public_key_text(SERVER_KEY),
            plan=PLAN,
            silo="site-a",
            run=5,
        )
