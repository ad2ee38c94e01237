"""Production profile: a plan offer reaches an agent connected to another process at once.

The agent holds its connection on server 1; the plan is proposed over the API on server 0, then
edited from this test process (neither holds the connection): the offers travel through the
Redis channel layer to the process that does.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from clientagent.config import load_config
from clientagent.records import SiteRecords
from federation.models import Membership, Role, Silo, TrainingPlan
from federation.services import plans as plan_services
from federation.services.api_tokens import api_token_create
from tests.factories import plan_spec
from tests.governance_factories import UserFactory
from tests.services.federations import federation, online
from tests.services.harness import Stack, wait_until
from tests.services.test_production import api_post

pytestmark = [pytest.mark.services, pytest.mark.django_db(transaction=True)]


def test_offers_reach_an_agent_on_another_server_through_redis(
    stack: Stack, tmp_path: Path
) -> None:
    fed = federation(stack, tmp_path, [1])
    [silo] = fed.silos
    [agent] = fed.agents
    scientist = UserFactory()
    Membership.objects.create(
        user=scientist, organization=silo.organization, role=Role.DATA_SCIENTIST
    )
    token = api_token_create(actor=None, user=scientist).token
    records = SiteRecords(load_config(tmp_path / silo.name / "site.toml").agent.state_dir)
    procs = [*stack.procs, agent]

    def offered(name: str, version: int, status: str) -> bool:
        return any(
            (o.get("name"), o.get("version"), o.get("status")) == (name, version, status)
            for o in records.offers().values()
        )

    try:
        agent.start()
        wait_until(lambda: online(fed.silos) == {silo.pk}, timeout=60, what="agent", procs=procs)
        connection = Silo.objects.get(pk=silo.pk).connection_id

        status, body = api_post(
            stack.http_url(0, "/api/v1/plans/"),
            token,
            {
                "consortium": silo.consortium_id,
                "name": "Offered across servers",
                "spec": plan_spec(),
                "silos": [silo.pk],
            },
        )
        assert status == 201, body
        wait_until(
            lambda: offered("Offered across servers", 1, "submitted"),
            timeout=30,
            what="the offer proposed on server 0 at the agent on server 1",
            procs=procs,
        )

        plan = TrainingPlan.objects.get(pk=body["id"])
        plan_services.plan_edit(actor=scientist, plan=plan, spec=plan_spec(seed=5), silos=[silo])
        wait_until(
            lambda: (
                offered("Offered across servers", 2, "submitted")
                and offered("Offered across servers", 1, "superseded")
            ),
            timeout=30,
            what="version 2 offered and version 1 superseded",
            procs=procs,
        )
        assert Silo.objects.get(pk=silo.pk).connection_id == connection  # no reconnect
    finally:
        agent.stop()
