"""End to end, issue 13's bar: with the server's database edited to add a forged approval, no
site trains. Real agents pin their steward's key ([governance] steward_keys); the server's
database holds an approval per site, each forged a different way -- a row inserted directly (no
signature), a valid signature from a key the site never pinned, and the pinned steward's genuine
signature of another plan copied onto this one. The server signs its grants as usual; every agent
refuses before it reads its data, logs why, reports it, and the server audits agent.refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedcore import approvals, signing
from federation.models import Approval, AuditEvent, Update
from federation.server import free_port
from federation.services.silos import silo_issue_token
from tests.e2e import harness
from tests.e2e.test_federation import online_count, write_site_csv
from tests.factories import (
    ConsortiumFactory,
    PlanFactory,
    SiloFactory,
    approve_by_stewards,
    plan_spec,
    start_run,
)

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_forged_approvals_in_the_servers_database_make_no_site_train(tmp_path: Path) -> None:
    consortium = ConsortiumFactory()
    silos = SiloFactory.create_batch(3, organization__consortium=consortium)
    plan = PlanFactory(consortium=consortium, spec=plan_spec(min_silos=3), silos=silos)
    # The forger writes Approval rows straight into the database (tests.factories does the same).
    rows = {row.organization_id: row for row in approve_by_stewards(plan)}
    plan_hash = plan.current_version.spec_hash
    stewards = [signing.generate_private_key() for _ in silos]

    assert rows[silos[0].organization_id].signature is None  # a row and nothing else
    unpinned = rows[silos[1].organization_id]
    unpinned.signature = approvals.sign_approval(
        signing.generate_private_key(),
        consortium=consortium.name,
        organization=unpinned.organization.name,
        plan_hash=plan_hash,
    )
    replayed = rows[silos[2].organization_id]
    replayed.signature = approvals.sign_approval(
        stewards[2],
        consortium=consortium.name,
        organization=replayed.organization.name,
        plan_hash="e" * 64,  # the steward approved another plan once
    )
    for row in (unpinned, replayed):
        Approval.objects.filter(pk=row.pk).update(signature=row.signature)
    # Each grant lists every organisation's approvals; each site counts what it saw.
    expected = [
        "1 unsigned, 2 signed by other keys and 0 with a signature that does not verify",
        "1 unsigned, 2 signed by other keys and 0 with a signature that does not verify",
        "1 unsigned, 1 signed by other keys and 1 with a signature that does not verify",
    ]

    port = free_port()
    server = harness.server(tmp_path, port)
    agents = []
    for i, (silo, key) in enumerate(zip(silos, stewards, strict=True)):
        csv = write_site_csv(tmp_path / f"{silo.name}.csv", seed=i)
        pinned = f'\n[governance]\nsteward_keys = ["{signing.public_key_text(key)}"]\n'
        agents.append(
            harness.agent(
                tmp_path,
                silo.name,
                url=f"ws://127.0.0.1:{port}/ws/agent/",
                token=silo_issue_token(silo=silo),
                data_csv=csv,
                extra=pinned,
            )
        )
    procs = [server, *agents]
    try:
        server.start()
        harness.wait_until(
            lambda: harness.port_open(port), timeout=60, what="the server", procs=procs
        )
        for agent in agents:
            agent.start()
        harness.wait_until(
            lambda: online_count(silos) == len(silos),
            timeout=120,
            what="agents online",
            procs=procs,
        )
        run = start_run(plan)
        refusals = AuditEvent.objects.filter(action="agent.refused", object_id=run.pk)
        harness.wait_until(
            lambda: refusals.values("actor").distinct().count() >= len(silos),
            timeout=120,
            what="every agent to refuse the forged approval",
            procs=procs,
        )
        by_silo = {event.actor.removeprefix("silo:"): event.data for event in refusals}
        for silo, agent, seen in zip(silos, agents, expected, strict=True):
            audited = by_silo[silo.name]
            assert audited["code"] == "not_authorized", audited
            assert "signed by a steward key pinned in site.toml" in audited["reason"]
            assert seen in audited["reason"], audited
            log = agent.log.read_text()
            assert "refused before reading any local data" in log and seen in log
            assert "sent update" not in log and "sent local statistics" not in log
        assert not Update.objects.filter(round__run=run).exists()
    finally:
        harness.stop_all(procs)
