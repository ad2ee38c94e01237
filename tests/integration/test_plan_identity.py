"""A plan's name and description are part of its hashed version (issue 14, problem 7).

The server hashes the spec with the name and description in it, stores and sends exactly that,
and the site agent's own hash of what it receives is the same; so an approval of one plan (a
steward's signature, a site's local approval) never applies to a plan of the same content under
another name.
"""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError

from fedcore.plan import plan_hash, versioned_spec
from federation import governance, selectors
from federation.models import AuditEvent, PlanVersion, TrainingPlan
from federation.services.plans import plan_edit, plan_propose
from tests.factories import PlanFactory, approve_by_stewards, plan_spec
from tests.governance_factories import Governed, governed_consortium

pytestmark = pytest.mark.django_db


@pytest.fixture
def g() -> Governed:
    return governed_consortium(2)


def propose(g: Governed, name: str, description: str = "", **kwargs: object) -> TrainingPlan:
    return plan_propose(
        actor=g.scientists[0],
        consortium=g.consortium,
        name=name,
        description=description,
        spec=kwargs.pop("spec", plan_spec()),
        silos=[g.silos[0]],
        **kwargs,
    )


def test_the_same_spec_under_another_name_is_another_plan_hash(g: Governed) -> None:
    first = propose(g, "Readmission v1").current_version
    second = propose(g, "Readmission v2").current_version
    described = propose(g, "Readmission v1", "now with a description").current_version

    hashes = {first.spec_hash, second.spec_hash, described.spec_hash}
    assert len(hashes) == 3
    assert first.spec["name"] == "Readmission v1" and first.spec["description"] is None
    assert described.spec["description"] == "now with a description"
    # What the site receives hashes, at the site, to the hash approvals name.
    offer = selectors.plan_offer_fields(version_id=second.pk, silo_id=g.silos[0].pk)
    assert offer is not None and offer["name"] == "Readmission v2"
    assert plan_hash(offer["plan"]) == second.spec_hash
    assert second.spec_hash == plan_hash(
        versioned_spec(plan_spec(), name="Readmission v2", description="")
    )


def test_a_name_in_the_spec_must_be_the_plans(g: Governed) -> None:
    rows = (TrainingPlan.objects.count(), PlanVersion.objects.count(), AuditEvent.objects.count())

    with pytest.raises(ValidationError) as refused:
        propose(g, "Readmission", spec={**plan_spec(), "name": "Something else"})

    message = refused.value.message_dict["spec.name"][0]
    assert "'Something else'" in message and "'Readmission'" in message
    assert (
        TrainingPlan.objects.count(),
        PlanVersion.objects.count(),
        AuditEvent.objects.count(),
    ) == rows
    same = propose(g, "Readmission", spec={**plan_spec(), "name": "Readmission"})
    assert same.current_version.spec["name"] == "Readmission"


def test_a_description_only_edit_is_a_new_version_that_needs_approval_again(g: Governed) -> None:
    plan = propose(g, "Readmission", "first words")
    v1 = plan.current_version

    v2 = plan_edit(
        actor=g.scientists[0],
        plan=plan,
        spec=v1.spec,
        silos=[g.silos[0]],
        description="other words",
    )

    plan.refresh_from_db()
    assert v2.spec_hash != v1.spec_hash and plan.description == "other words"
    assert [c["path"] for c in governance.plan_diff(v1, v2)] == ["description"]
    # Without a description, the edit keeps the current one (and so the same hash as before).
    with pytest.raises(ValidationError, match="nothing to change"):
        plan_edit(actor=g.scientists[0], plan=plan, spec=plan_spec(), silos=[g.silos[0]])
    v3 = plan_edit(actor=g.scientists[0], plan=plan, spec=plan_spec(seed=4), silos=[g.silos[0]])
    assert v3.spec["description"] == "other words"


def test_a_version_stored_before_the_rule_keeps_its_hash_and_its_approvals(g: Governed) -> None:
    """Rows from before the name was hashed: their spec has no name, and stays consistent."""
    plan = PlanFactory(
        consortium=g.consortium, status=TrainingPlan.Status.SUBMITTED, silos=[g.silos[0]]
    )
    version = plan.current_version
    assert "name" not in version.spec and version.spec_hash == plan_hash(version.spec)
    approve_by_stewards(plan)
    assert governance.approval_state(version).satisfied
    # Its next edit binds the name.
    v2 = plan_edit(actor=g.scientists[0], plan=plan, spec=version.spec, silos=[g.silos[0]])
    assert v2.spec["name"] == plan.name and v2.spec_hash != version.spec_hash


def test_the_plan_page_shows_each_versions_own_description(g: Governed) -> None:
    from django.test import Client

    plan = propose(g, "Readmission", "first: 30-day readmission")
    plan_edit(
        actor=g.scientists[0],
        plan=plan,
        spec=plan_spec(),
        silos=[g.silos[0]],
        description="second: 90-day readmission",
    )
    client = Client()
    client.force_login(g.stewards[0])
    html = client.get(f"/plans/{plan.pk}/").content.decode()
    table = html[html.index('id="hist-h"') :]
    # Each version's row carries the description its hash covers; the page leads with the
    # current version's.
    assert "first: 30-day readmission" in table and "second: 90-day readmission" in table
    assert html.index("second: 90-day readmission") < html.index('id="hist-h"')


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        (
            {
                "model": {
                    "kind": "installed",
                    "name": "resmlp",
                    "version": "1.0",
                    "sha256": "a" * 64,
                }
            },
            "spec.model.kind",
            "no participating silo has announced the installed model kind 'resmlp'",
        ),
    ],
)
def test_what_the_rounds_do_not_run_yet_is_refused_at_proposal_and_stores_nothing(
    g: Governed, change: dict, field: str, words: str
) -> None:
    rows = (TrainingPlan.objects.count(), PlanVersion.objects.count())
    with pytest.raises(ValidationError) as refused:
        propose(g, "Not yet", spec=plan_spec(**change))
    assert words in refused.value.message_dict[field][0]
    assert (TrainingPlan.objects.count(), PlanVersion.objects.count()) == rows


@pytest.mark.parametrize(
    "target",
    [
        {"column": "y", "task": "multiclass", "classes": ["0", "1", "2"]},
        {"column": "y", "task": "regression"},
    ],
)
def test_a_multiclass_or_regression_plan_is_accepted_at_proposal(g: Governed, target: dict) -> None:
    from federation.models import Silo
    from tests.factories import SCHEMA

    schema = {**SCHEMA, "target": target}
    Silo.objects.filter(pk=g.silos[0].pk).update(schema=schema)  # the silo holds such a target
    propose(g, "Severity", spec=plan_spec(schema=schema))
    stored = TrainingPlan.objects.get(name="Severity").versions.get().spec
    assert stored["schema"]["target"] == target


def test_an_installed_kind_is_accepted_when_a_participating_silo_announced_it(g: Governed) -> None:
    from federation.models import Silo

    model = {"kind": "installed", "name": "resmlp", "version": "0.1.0", "sha256": "b" * 64}
    announced = {"name": "resmlp", "version": "0.1.0", "sha256": "b" * 64}
    Silo.objects.filter(pk=g.silos[0].pk).update(model_kinds=[{**announced, "sha256": "c" * 64}])
    with pytest.raises(ValidationError) as refused:  # another digest announced: not this kind
        propose(g, "ResMLP", spec=plan_spec(model=model))
    assert (
        "version '0.1.0' with digest bbbbbbbbbbbb"
        in refused.value.message_dict["spec.model.kind"][0]
    )

    Silo.objects.filter(pk=g.silos[0].pk).update(model_kinds=[announced])
    propose(g, "ResMLP", spec=plan_spec(model=model))
    assert TrainingPlan.objects.filter(name="ResMLP").exists()
