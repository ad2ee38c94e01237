"""factory_boy factories for governance: users, memberships and a consortium with every role."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import factory
from django.contrib.auth import get_user_model
from django.contrib.auth.hashers import make_password

from federation import models
from tests.factories import SCHEMA, ConsortiumFactory, OrganizationFactory, SiloFactory

Role = models.Role


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()
        django_get_or_create = ("username",)

    username = factory.Sequence(lambda n: f"user{n}")
    # Unusable: hashing a real password costs ~0.3 s per user (PBKDF2), and services need none.
    password = factory.LazyFunction(lambda: make_password(None))


class MembershipFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = models.Membership

    user = factory.SubFactory(UserFactory)
    organization = factory.SubFactory(OrganizationFactory)
    role = Role.DATA_SCIENTIST


def member(organization: models.Organization, *roles: str, username: str | None = None) -> Any:
    """A new user holding the roles in the organisation."""
    user = UserFactory(**({"username": username} if username else {}))
    for role in roles:
        MembershipFactory(user=user, organization=organization, role=role)
    return user


@dataclass
class Governed:
    """A consortium with organisations, one user per role and organisation, and admitted silos."""

    consortium: models.Consortium
    orgs: list[models.Organization]
    admin: Any  # consortium admin (a member of orgs[0])
    stewards: list[Any]  # stewards[i] is the data steward of orgs[i]
    scientists: list[Any]
    auditors: list[Any]
    org_admins: list[Any]
    silos: list[models.Silo]  # silos[i] belongs to orgs[i]
    extra: dict[str, Any] = field(default_factory=dict)

    def silo_ids(self) -> list[int]:
        return [silo.pk for silo in self.silos]


def governed_consortium(
    n_orgs: int = 3, *, schema: dict[str, Any] | None = None, **consortium_fields: Any
) -> Governed:
    """Build a consortium of n organisations, each with a steward, a data scientist, an auditor,
    an organisation admin and one admitted silo; plus a consortium admin."""
    consortium = ConsortiumFactory(**consortium_fields)
    orgs = [
        OrganizationFactory(consortium=consortium, name=f"{consortium.name} org {i}")
        for i in range(n_orgs)
    ]
    tag = consortium.pk

    def people(role: str, label: str) -> list[Any]:
        return [member(org, role, username=f"c{tag}-{label}{i}") for i, org in enumerate(orgs)]

    return Governed(
        consortium=consortium,
        orgs=orgs,
        admin=member(orgs[0], Role.CONSORTIUM_ADMIN, username=f"c{tag}-admin"),
        stewards=people(Role.DATA_STEWARD, "steward"),
        scientists=people(Role.DATA_SCIENTIST, "scientist"),
        auditors=people(Role.AUDITOR, "auditor"),
        org_admins=people(Role.ORG_ADMIN, "orgadmin"),
        silos=[
            SiloFactory(organization=org, name=f"c{tag}-silo{i}", schema=schema or SCHEMA)
            for i, org in enumerate(orgs)
        ],
    )
