"""List endpoints cost a constant number of queries, whatever the number of rows."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from federation import models
from federation.services.audit import audit_append
from tests.api_factories import client_for, fast_password_hashing  # noqa: F401
from tests.factories import (
    ConsortiumFactory,
    OrganizationFactory,
    PlanFactory,
    SiloFactory,
    plan_spec,
    start_run,
)
from tests.governance_factories import Governed, MembershipFactory, governed_consortium

pytestmark = pytest.mark.django_db

Role = models.Role


def _plan(gov: Governed, **spec: object) -> models.TrainingPlan:
    return PlanFactory(
        consortium=gov.consortium,
        spec=plan_spec(**spec),
        silos=gov.silos,
        proposed_by=gov.scientists[0],
    )


def me(gov: Governed, n: int) -> str:
    for _ in range(n):
        MembershipFactory(user=gov.admin, organization=OrganizationFactory(), role=Role.AUDITOR)
    return "/api/v1/me/"


def consortia(gov: Governed, n: int) -> str:
    for _ in range(n):
        org = OrganizationFactory(consortium=ConsortiumFactory())
        MembershipFactory(user=gov.admin, organization=org, role=Role.AUDITOR)
    return "/api/v1/consortia/"


def organizations(gov: Governed, n: int) -> str:
    OrganizationFactory.create_batch(n, consortium=gov.consortium)
    return f"/api/v1/consortia/{gov.consortium.pk}/organizations/"


def members(gov: Governed, n: int) -> str:
    MembershipFactory.create_batch(n, organization=gov.orgs[0], role=Role.DATA_SCIENTIST)
    return f"/api/v1/consortia/{gov.consortium.pk}/members/"


def silos(gov: Governed, n: int) -> str:
    SiloFactory.create_batch(n, organization=gov.orgs[0])
    return f"/api/v1/silos/?consortium={gov.consortium.pk}"


def plans(gov: Governed, n: int) -> str:
    for i in range(n):
        _plan(gov, seed=i)
    return "/api/v1/plans/"


def versions(gov: Governed, n: int) -> str:
    plan = _plan(gov)
    for number in range(2, n + 2):
        spec = plan_spec(seed=number)
        version = models.PlanVersion.objects.create(
            plan=plan, number=number, spec=spec, spec_hash=f"{number:064x}", created_by=gov.admin
        )
        version.silos.set(gov.silos)
    return f"/api/v1/plans/{plan.pk}/versions/"


def approvals(gov: Governed, n: int) -> str:
    plan = _plan(gov)
    version = plan.current_version
    for _ in range(n):
        user = MembershipFactory(organization=gov.orgs[0], role=Role.DATA_STEWARD).user
        models.Approval.objects.create(
            version=version,
            plan_hash=version.spec_hash,
            user=user,
            organization=gov.orgs[0],
            role=Role.DATA_STEWARD,
            decision=models.Approval.Decision.APPROVE,
        )
    return f"/api/v1/plans/{plan.pk}/approvals/"


def runs(gov: Governed, n: int) -> str:
    for i in range(n):
        start_run(_plan(gov, seed=i), started_by=gov.scientists[0])
    return "/api/v1/runs/"


def rounds(gov: Governed, n: int) -> str:
    run = start_run(_plan(gov), status=models.Run.Status.RUNNING)
    for number in range(1, n + 1):
        round_ = models.Round.objects.create(
            run=run, number=number, deadline=timezone.now() + timedelta(minutes=1)
        )
        round_.selected.set(gov.silos)
        for silo in gov.silos:
            models.Update.objects.create(
                round=round_,
                silo=silo,
                num_examples=10,
                nonce=f"{number}-{silo.pk}",
                sha256="0" * 64,
                size_bytes=1,
                blob_key="k",
            )
            models.RoundMetric.objects.create(
                round=round_, silo=silo, scope="local", name="auc", value=0.5
            )
        models.RoundMetric.objects.create(
            round=round_, silo=None, scope="global", name="auc", value=0.7
        )
    return f"/api/v1/runs/{run.pk}/rounds/"


def model_versions(gov: Governed, n: int) -> str:
    run = start_run(_plan(gov), status=models.Run.Status.RUNNING)
    for number in range(n):
        round_ = None
        if number:
            round_ = models.Round.objects.create(
                run=run, number=number, deadline=timezone.now() + timedelta(minutes=1)
            )
        models.ModelVersion.objects.create(
            run=run,
            number=number,
            round=round_,
            checksum="0" * 64,
            size_bytes=10,
            blob_key=f"m{number}",
            signature={},
        )
    return f"/api/v1/runs/{run.pk}/models/"


def audit_events(gov: Governed, n: int) -> str:
    for i in range(n):
        audit_append(
            actor="system", action="test.event", consortium_id=gov.consortium.pk, data={"i": i}
        )
    return "/api/v1/audit/events/"


LISTS: dict[str, Callable[[Governed, int], str]] = {
    "me": me,
    "consortia": consortia,
    "organizations": organizations,
    "members": members,
    "silos": silos,
    "plans": plans,
    "versions": versions,
    "approvals": approvals,
    "runs": runs,
    "rounds": rounds,
    "models": model_versions,
    "audit_events": audit_events,
}


def _get(gov: Governed, url: str) -> int:
    """GET the list as the consortium admin; the number of rows it reports."""
    response = client_for(gov.admin).get(url)
    assert response.status_code == 200, response.content
    body = response.json()
    return body["count"] if "count" in body else len(body["memberships"])


@pytest.mark.parametrize("name", list(LISTS))
def test_list_costs_the_same_queries_for_2_and_20_rows(
    name: str, django_assert_num_queries
) -> None:
    gov = governed_consortium(2)
    client_for(gov.admin)  # the token exists before counting
    with transaction.atomic():
        url = LISTS[name](gov, 2)
        with CaptureQueriesContext(connection) as few:
            few_rows = _get(gov, url)
        transaction.set_rollback(True)

    url = LISTS[name](gov, 20)
    with django_assert_num_queries(len(few)):
        many_rows = _get(gov, url)

    assert many_rows - few_rows == 18
    # Token and user, the page and its count, a few prefetches: never one per row.
    assert len(few) <= 8, [q["sql"] for q in few.captured_queries]
