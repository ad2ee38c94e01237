"""A small governed world for the REST API tests: two consortia, every role, plans in each state."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from federation import models
from federation.services import plans as plan_services
from federation.services.api_tokens import api_token_digest
from federation.services.silos import silo_issue_token
from tests.factories import SiloFactory, plan_spec, start_run
from tests.governance_factories import Governed, governed_consortium

# The columns of the authorization matrix (docs/api.md): one user per role, all of the first
# organisation of the consortium under test, plus a consortium admin of another consortium and an
# anonymous client.
ROLES = ("admin", "org_admin", "steward", "scientist", "auditor", "other", "anonymous")


@dataclass
class World:
    """The consortium under test (`gov`), a second one (`other`), and objects in known states."""

    gov: Governed
    other: Governed
    pending_silo: models.Silo
    draft: models.TrainingPlan  # proposed by the scientist, not submitted
    submitted: models.TrainingPlan  # proposed by the scientist, awaiting decisions
    approved: models.TrainingPlan  # approved by the steward, ready to run
    run: models.Run  # an active run of a plan the scientist proposed
    foreign_plan: models.TrainingPlan
    foreign_run: models.Run

    def user(self, role: str) -> Any:
        """The user in a column of the matrix (None for the anonymous client)."""
        gov = self.gov
        return {
            "admin": gov.admin,
            "org_admin": gov.org_admins[0],
            "steward": gov.stewards[0],
            "scientist": gov.scientists[0],
            "auditor": gov.auditors[0],
            "other": self.other.admin,
            "anonymous": None,
        }[role]

    def client(self, role: str) -> APIClient:
        """An API client authenticated with the role's token (none for "anonymous")."""
        return client_for(self.user(role))


@pytest.fixture(autouse=True)
def fast_password_hashing(settings: Any) -> None:
    """MD5 instead of PBKDF2 for the factories' passwords (import this fixture into a module)."""
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


_tokens: dict[int, str] = {}  # user id -> a token of theirs (checked to exist before reuse)


def _token_of(user: Any) -> str:
    """One token per user, like DRF's get_or_create. A row, not the service: no audit event of
    its own in tests that count them. Marked used, so a test's first request does not write
    last_used_at (counted queries)."""
    token = _tokens.get(user.pk)
    if (
        token is not None
        and models.ApiToken.objects.filter(user=user, digest=api_token_digest(token)).exists()
    ):
        return token
    token = secrets.token_urlsafe(24)
    models.ApiToken.objects.create(
        user=user,
        prefix=token[:12],
        digest=api_token_digest(token),
        expires_at=timezone.now() + timedelta(days=1),
        last_used_at=timezone.now(),
    )
    _tokens[user.pk] = token
    return token


def client_for(user: Any) -> APIClient:
    """An API client sending the user's token."""
    client = APIClient()
    if user is not None:
        client.credentials(HTTP_AUTHORIZATION=f"Token {_token_of(user)}")
    return client


def propose(gov: Governed, *, submit: bool = True, **spec: Any) -> models.TrainingPlan:
    """A plan proposed through the service by the first data scientist, on the first silo."""
    return plan_services.plan_propose(
        actor=gov.scientists[0],
        consortium=gov.consortium,
        name=f"plan {models.TrainingPlan.objects.count() + 1}",
        description="",
        spec=plan_spec(**spec),
        silos=[gov.silos[0]],
        submit=submit,
    )


def approved_plan(gov: Governed, **spec: Any) -> models.TrainingPlan:
    """A plan the first organisation's steward approved (enough under the default rules)."""
    plan = propose(gov, **spec)
    version = plan.current_version
    plan_services.plan_approve(actor=gov.stewards[0], plan=plan, plan_hash=version.spec_hash)
    plan.refresh_from_db()
    assert plan.status == models.TrainingPlan.Status.APPROVED
    return plan


def active_run(gov: Governed) -> models.Run:
    """A running run of an approved plan (created directly: the orchestrator is not under test)."""
    plan = approved_plan(gov, seed=7)
    models.TrainingPlan.objects.filter(pk=plan.pk).update(status=models.TrainingPlan.Status.RUNNING)
    return start_run(
        plan,
        status=models.Run.Status.RUNNING,
        preprocessing={},
        started_at=timezone.now(),
        started_by=gov.scientists[0],
    )


def build_world() -> World:
    """Two consortia of two organisations; C's first silo has an agent token."""
    gov = governed_consortium(2, name="Consortium under test")
    other = governed_consortium(1, name="Other consortium")
    silo_issue_token(silo=gov.silos[0])
    return World(
        gov=gov,
        other=other,
        pending_silo=SiloFactory(
            organization=gov.orgs[0], name="pending-silo", admission=models.Silo.Admission.PENDING
        ),
        draft=propose(gov, submit=False, seed=1),
        submitted=propose(gov, seed=2),
        approved=approved_plan(gov, seed=3),
        run=active_run(gov),
        foreign_plan=propose(other, seed=4),
        foreign_run=active_run(other),
    )
