"""The real agent over a real websocket answers an analysis_request (issue 16): the grant and the
operator's decision are checked like a task's, the answer is fedcore's site part of the rows
in its data file, and a kind its [disclosure] does not allow is refused with policy_refused."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pandas as pd
from websockets.asyncio.server import ServerConnection

from clientagent.config import load_config
from clientagent.connection import EXIT_OK, Agent
from fedcore import protocol, signing
from fedcore.plan import plan_hash
from tests.unit.test_agent_session import (  # noqa: F401 - the autouse fixture applies here too
    SERVER_KEY,
    WAIT,
    FakeServer,
    fast_heartbeats_and_info_logs,
    hello_welcome,
    write_site,
)

PLAN = {
    "kind": "analysis",
    "schema": {
        "columns": [{"name": "age", "type": "numeric"}, {"name": "sex", "type": "categorical"}],
        "target": {"column": "outcome", "positive": ["sick"]},
    },
    "analysis": {"kind": "moments", "columns": ["age"]},
    "min_silos": 1,
}


def analysis_request(
    step: str = "summary", params: dict | None = None, plan: dict | None = None
) -> str:
    params = {} if params is None else params
    plan = PLAN if plan is None else plan
    approval = {"user": "steward-a", "organization": "Hospital A", "role": "data_steward"}
    scope = signing.request_scope(
        kind=signing.ANALYSIS_KIND,
        rounds=1,
        expires_at=datetime.now(UTC) + timedelta(minutes=10),
        step=step,
        params=params,
    )
    grant = signing.sign_authorization(
        SERVER_KEY,
        {
            "run": 9,
            "silo": "site-a",
            "consortium": "thyroid",
            "plan_hash": plan_hash(plan),
            "approvals": [approval],
            "silo_approvals": [approval],
            "issued_at": datetime.now(UTC).isoformat(),
            **scope,
        },
    )
    return protocol.encode_control(
        "analysis_request",
        run=9,
        plan_hash=plan_hash(plan),
        plan=plan,
        step=step,
        params=params,
        authorization=grant,
    )


async def one_request(
    tmp_path: Path, disclosure: str = "", *, policy: str = "", plan: dict | None = None
) -> tuple[dict, Agent]:
    """Start the agent against a fake server that sends one analysis_request; its reply."""

    async def script(ws: ServerConnection, server: FakeServer) -> None:
        await hello_welcome(ws, server)
        await ws.send(analysis_request(plan=plan))
        while True:
            fields = protocol.decode_control(await asyncio.wait_for(ws.recv(), WAIT))
            if fields["type"] in ("analysis", "error"):
                await server.events.put(("reply", fields))
                return

    server = FakeServer([script])
    await server.start()
    path = write_site(tmp_path, server.url, policy=policy)
    if disclosure:
        path.write_text(path.read_text() + f"[disclosure]\n{disclosure}\n")
    agent = Agent(load_config(path), progress_tty=False)
    stop = asyncio.Event()
    runner = asyncio.create_task(agent.run(stop))
    reply = await server.next_event("reply")
    stop.set()
    assert await asyncio.wait_for(runner, WAIT) == EXIT_OK
    await server.stop()
    return reply, agent


async def test_the_agent_answers_with_the_site_part_of_its_rows(tmp_path):
    reply, agent = await one_request(tmp_path, "min_sites = 1")

    assert reply["type"] == "analysis" and reply["step"] == "summary", reply
    rows = pd.read_csv(tmp_path / "data.csv")
    answer = reply["answer"]
    assert answer["summary"]["n"] == len(rows) and answer["min_sites"] == 1
    assert abs(answer["summary"]["sum"][0] - rows["age"].sum()) < 1e-9
    sent = [line["type"] for line in agent.records.sent()]
    assert "analysis" in sent  # in the site's sent log, like every stats reply and update


async def test_a_kind_the_site_does_not_allow_is_refused_with_the_reason(tmp_path):
    reply, _ = await one_request(tmp_path, 'allowed_analyses = ["count"]')

    assert reply["type"] == "error" and reply["code"] == "policy_refused", reply
    assert "does not run 'moments'" in reply["reason"] and reply["run"] == 9


async def test_a_site_requiring_secure_aggregation_refuses_a_clear_analysis_plan(tmp_path):
    reply, _ = await one_request(
        tmp_path, "min_sites = 1", policy="require_secure_aggregation = true"
    )

    assert reply["type"] == "error" and reply["code"] == "policy_refused", reply
    assert "require_secure_aggregation" in reply["reason"] and "in clear" in reply["reason"]


async def test_under_a_secure_plan_the_answer_leaves_without_its_summary(tmp_path):
    secure = {**PLAN, "secure_aggregation": True}
    reply, agent = await one_request(
        tmp_path, "min_sites = 1", policy="require_secure_aggregation = true", plan=secure
    )

    assert reply["type"] == "analysis", reply
    answer = reply["answer"]
    assert "summary" not in answer
    assert answer["masked"]["layout"] == [
        ["cross", [1, 1], "float"],
        ["n", [], "int"],
        ["sites", [], "int"],
        ["sum", [1], "float"],
    ]
    logged = [line for line in agent.records.sent() if line["type"] == "analysis"]
    assert logged and "summary" not in str(logged[-1])
