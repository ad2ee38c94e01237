"""The statistics pass against a fake agent (issue 13 part 6), through the services the agent
websocket calls: a poisoned report is refused on receipt, audited, and changes nothing; the run's
preprocessing and model size are those of the honest sites; noised statistics are charged."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from django.utils import timezone

from fedcore import tabular
from federation import governance, ledger, orchestrator
from federation.models import AuditEvent, PrivacyLedgerEntry, Run, SiloStatistics
from federation.services.updates import Refused, stats_receive
from tests.factories import ConsortiumFactory, PlanFactory, SiloFactory, plan_spec, start_run

pytestmark = pytest.mark.django_db

SCHEMA = {
    "columns": [
        {"name": "age", "type": "numeric", "min": 0, "max": 120},
        {"name": "sex", "type": "categorical"},
    ],
    "target": {"column": "y", "positive": ["1"]},
    "sensitive": [],
}


def site_frame(seed: int, n: int = 80) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "age": rng.uniform(20, 80, n).round(1).astype(str),
            "sex": rng.choice(["F", "M"], n),
            "y": rng.integers(0, 2, n).astype(str),
        }
    )


def stats_run(**spec: object) -> tuple[list, Run]:
    consortium = ConsortiumFactory()
    silos = SiloFactory.create_batch(3, organization__consortium=consortium, schema=SCHEMA)
    for silo in silos:
        silo.connection_id, silo.last_heartbeat = f"conn-{silo.pk}", timezone.now()
        silo.save()
    plan = PlanFactory(
        consortium=consortium, spec=plan_spec(schema=SCHEMA, min_silos=3, **spec), silos=silos
    )
    run = start_run(plan)
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    assert run.status == Run.Status.STATS
    return silos, run


def honest(seed: int, **options: object) -> dict:
    schema = tabular.DatasetSchema.from_dict(SCHEMA)
    return tabular.local_statistics(site_frame(seed), schema, **options)


def test_the_fake_agents_poisoned_categories_are_refused_and_the_run_keeps_its_model_size():
    silos, run = stats_run()
    poisoned = honest(2)
    poisoned["categories"]["sex"].update({f"v{i}": 10 for i in range(1001)})
    poisoned["categories"]["sex"]["<script>alert(1)</script>"] = 10

    with pytest.raises(Refused) as refused:
        stats_receive(silo_id=silos[2].pk, run_id=run.pk, stats=poisoned)

    reason = refused.value.reason
    assert refused.value.code == "invalid_update"
    assert (
        f"silo {silos[2].name!r}" in reason and "column 'sex'" in reason and "cap of 64" in reason
    )
    assert not SiloStatistics.objects.filter(run=run).exists()
    event = AuditEvent.objects.get(action="stats.refused", object_id=str(run.pk))
    assert event.actor == f"silo:{silos[2].name}" and "cap of 64" in event.data["reason"]

    script = honest(2)
    script["categories"]["sex"]["<script>alert(1)</script>"] = 10
    with pytest.raises(Refused, match="forbidden character"):
        stats_receive(silo_id=silos[2].pk, run_id=run.pk, stats=script)

    for seed, silo in enumerate(silos):  # the fake agent's site then sends honestly
        stats_receive(silo_id=silo.pk, run_id=run.pk, stats=honest(seed))
    orchestrator.run_advance(run.pk)
    run.refresh_from_db()
    assert run.status == Run.Status.RUNNING
    schema = tabular.DatasetSchema.from_dict(SCHEMA)
    assert tabular.feature_names(schema, run.preprocessing) == ["age", "sex=F", "sex=M"]


def test_a_rare_value_of_one_site_does_not_reach_the_preprocessing():
    silos, run = stats_run()
    rare = site_frame(0)
    rare.loc[:2, "sex"] = "rare"  # three rows at one site
    schema = tabular.DatasetSchema.from_dict(SCHEMA)
    reports = [tabular.local_statistics(rare, schema), honest(1), honest(2)]

    for silo, report in zip(silos, reports, strict=True):
        stats_receive(silo_id=silo.pk, run_id=run.pk, stats=report)
    orchestrator.run_advance(run.pk)

    run.refresh_from_db()
    assert run.preprocessing["categories"]["sex"] == ["F", "M"]
    assert all("rare" not in str(s.stats) for s in SiloStatistics.objects.filter(run=run))


def test_noised_statistics_are_charged_to_each_silos_ledger():
    silos, run = stats_run(privacy={"mode": "none", "statistics_epsilon": 0.5})
    assert governance.projected_epsilon(run.version)[silos[0].name] == pytest.approx(0.5)

    with pytest.raises(Refused, match="noised"):  # exact statistics for a noising plan
        stats_receive(silo_id=silos[0].pk, run_id=run.pk, stats=honest(0))
    for seed, silo in enumerate(silos):
        stats_receive(silo_id=silo.pk, run_id=run.pk, stats=honest(seed, epsilon=0.5))
    orchestrator.run_advance(run.pk)

    run.refresh_from_db()
    assert run.status == Run.Status.RUNNING
    assert 20.0 < run.preprocessing["numeric"]["age"]["mean"] < 80.0
    entries = PrivacyLedgerEntry.objects.filter(run=run, mechanism=ledger.STATISTICS)
    assert sorted(e.silo_id for e in entries) == sorted(s.pk for s in silos)
    assert all(e.epsilon_pure == 0.5 and e.epsilon_total == pytest.approx(0.5) for e in entries)
    assert ledger.silo_spent_epsilon(silos[0]) == pytest.approx(0.5)
