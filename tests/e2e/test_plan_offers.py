"""End to end: a plan proposed while a site's agent is connected reaches it without a reconnect.

Real processes: the server (embedded profile) and a `quorum-agent run` process; the plan is
proposed over the REST API with a data scientist's token, as a user would; the site operator
then uses the `quorum-agent` CLI (a separate process reading the agent's state directory):
`plans` lists the offer and `approve <12-character prefix>` records the decision.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from clientagent.config import load_config
from clientagent.records import SiteRecords
from federation.models import Silo
from federation.server import free_port
from federation.services.silos import silo_issue_token
from tests.api_factories import _token_of
from tests.e2e import harness
from tests.e2e.test_federation import write_site_csv
from tests.factories import plan_spec
from tests.governance_factories import governed_consortium

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def api(port: int, token: str, method: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/v1/{path}",
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Token {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def agent_cli(config: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "clientagent", *argv, "--config", str(config)],
        capture_output=True,
        text=True,
        env=harness.process_env(),
        cwd=harness.ROOT,
        timeout=60,
    )


def test_a_connected_agent_is_offered_a_new_plan_and_approves_it_by_prefix(
    tmp_path: Path,
) -> None:
    g = governed_consortium(2)
    silo = g.silos[0]
    port = free_port()
    server = harness.server(tmp_path, port)
    agent = harness.agent(
        tmp_path,
        silo.name,
        url=f"ws://127.0.0.1:{port}/ws/agent/",
        token=silo_issue_token(silo=silo),
        data_csv=write_site_csv(tmp_path / "site.csv", seed=0),
        extra="\n[policy]\nrequire_local_approval = true\n",
    )
    config = tmp_path / silo.name / "site.toml"
    records = SiteRecords(load_config(config).agent.state_dir)

    def offered(status: str) -> bool:  # polled from the file; the CLI is checked once after
        return any(offer.get("status") == status for offer in records.offers().values())

    procs = [server, agent]
    try:
        server.start()
        harness.wait_until(
            lambda: harness.port_open(port), timeout=60, what="the server", procs=procs
        )
        agent.start()
        connected = Silo.objects.filter(pk=silo.pk, connection_id__isnull=False)
        harness.wait_until(connected.exists, timeout=60, what="the agent online", procs=procs)
        connection = connected.get().connection_id
        assert "no plan offers received yet" in agent_cli(config, "plans").stdout

        token = _token_of(g.scientists[0])
        plan = api(
            port,
            token,
            "POST",
            "plans/",
            {
                "consortium": g.consortium.pk,
                "name": "Offered live",
                "spec": plan_spec(),
                "silos": [silo.pk],
            },
        )
        harness.wait_until(
            lambda: offered("submitted"),
            timeout=60,
            what="the offer in `quorum-agent plans`",
            procs=procs,
        )
        listed = agent_cli(config, "plans").stdout
        prefix = plan["plan_hash"][:12]
        [row] = [line for line in listed.splitlines() if line.startswith(prefix)]
        assert row.split()[-2:] == ["submitted", "pending"], listed

        approved = agent_cli(config, "approve", prefix)
        assert approved.returncode == 0, approved.stderr
        assert f"approved plan {plan['plan_hash']} 'Offered live' v1" in approved.stdout
        [row] = [
            line
            for line in agent_cli(config, "plans").stdout.splitlines()
            if line.startswith(prefix)
        ]
        assert row.split()[-1] == "approved"
        unknown = agent_cli(config, "approve", "0123456789ab")
        if not plan["plan_hash"].startswith("0123456789ab"):
            assert unknown.returncode == 2
            assert plan["plan_hash"] in unknown.stderr and "'Offered live' v1" in unknown.stderr

        # Withdrawn on the server: the same connection hears of it.
        api(port, token, "POST", f"plans/{plan['id']}/withdraw/")
        harness.wait_until(
            lambda: offered("withdrawn"),
            timeout=60,
            what="the withdrawal in `quorum-agent plans`",
            procs=procs,
        )
        [row] = [
            line
            for line in agent_cli(config, "plans").stdout.splitlines()
            if line.startswith(prefix)
        ]
        assert row.split()[-2:] == ["withdrawn", "approved"]
        assert Silo.objects.get(pk=silo.pk).connection_id == connection  # never reconnected
        assert "plan offered: 'Offered live' v1" in agent.log.read_text()
    finally:
        harness.stop_all(procs)
