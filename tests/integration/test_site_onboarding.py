"""The schema ``quorum-agent init`` proposes for a demo site is accepted by the server: the silo
registers with it and a plan on that silo with the same schema passes the plan validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clientagent import cli
from fedcore.tabular import DatasetSchema, schema_hash
from federation.demo import scenarios
from federation.models import AuditEvent, Silo
from federation.services.plans import plan_propose
from federation.services.silos import silo_admit, silo_register
from tests.factories import plan_spec
from tests.governance_factories import Governed, governed_consortium

pytestmark = pytest.mark.django_db


@pytest.fixture
def g() -> Governed:
    return governed_consortium(2)


def proposed_schema(tmp_path: Path, site: str) -> dict:
    csv = tmp_path / f"{site}.csv"
    scenarios.finance().sites[site].to_csv(csv, index=False)
    out = tmp_path / site
    argv = ["init", "--data", str(csv), "--out", str(out), "--target", "risk", "--sensitive", "sex"]
    assert cli.main(argv) == 0
    return json.loads((out / "schema.json").read_text())


def test_the_proposed_schema_registers_a_silo_and_a_plan_on_it_validates(
    g: Governed, tmp_path: Path
) -> None:
    schema = proposed_schema(tmp_path, "meridian")

    silo = silo_register(
        actor=g.stewards[0],
        organization=g.orgs[0],
        name="meridian-loans",
        description="business, education and vacation loans",
        schema=schema,
        row_count=168,
        location="on-prem",
    )
    silo_admit(actor=g.admin, silo=silo)

    silo.refresh_from_db()
    assert silo.admission == Silo.Admission.ADMITTED
    assert schema_hash(DatasetSchema.from_dict(silo.schema)) == schema_hash(
        DatasetSchema.from_dict(schema)
    )
    assert AuditEvent.objects.filter(action="silo.registered", object_id=str(silo.pk)).exists()
    plan = plan_propose(
        actor=g.scientists[0],
        consortium=g.consortium,
        name="Default risk",
        description="logistic regression on the onboarded schema",
        spec=plan_spec(schema=schema, fairness={"sensitive_attribute": "sex"}),
        silos=[silo],
    )
    assert plan.current_version.spec["schema"]["target"] == {"column": "risk", "positive": ["1"]}
