"""Reads behind the API: querysets shaped so a page costs a constant number of queries.

Every list starts from a ``federation.permissions`` scope (``*_visible_to``, ``access_*``), so
what a user can list is decided in one place; this module only adds joins, prefetches, counts and
a stable order.
"""

from __future__ import annotations

from typing import Any

from django.contrib.auth import get_user_model
from django.db.models import Count, Prefetch, QuerySet
from django.http import Http404

from federation import permissions
from federation.models import (
    Approval,
    AuditEvent,
    Consortium,
    Membership,
    ModelVersion,
    Organization,
    PlanVersion,
    Round,
    RoundMetric,
    Run,
    Silo,
    TrainingPlan,
)


def me(user: Any) -> Any:
    """The user with their memberships, organisations and consortia."""
    memberships = Membership.objects.select_related("user", "organization__consortium").order_by(
        "organization__consortium__name", "organization__name", "role"
    )
    return (
        get_user_model()
        .objects.prefetch_related(Prefetch("memberships", queryset=memberships))
        .get(pk=user.pk)
    )


def user_by_username(username: str) -> Any | None:
    """The user with this username, or None."""
    return get_user_model().objects.filter(username=username).first()


def consortium_list(user: Any) -> QuerySet[Consortium]:
    """The user's consortia by name."""
    return permissions.consortia_of(user)


def organization_list(consortium: Consortium) -> QuerySet[Organization]:
    """A consortium's member organisations by name."""
    return Organization.objects.filter(consortium=consortium).order_by("name", "pk")


def membership_list(consortium: Consortium) -> QuerySet[Membership]:
    """Who holds which role in a consortium."""
    return (
        Membership.objects.filter(organization__consortium=consortium)
        .select_related("user", "organization__consortium")
        .order_by("organization__name", "user__username", "role", "pk")
    )


def silo_list(user: Any) -> QuerySet[Silo]:
    """Silos of the user's consortia."""
    return (
        permissions.silos_visible_to(user)
        .select_related("organization")
        .order_by("consortium_id", "name", "pk")
    )


def plan_list(user: Any) -> QuerySet[TrainingPlan]:
    """Plans of the user's consortia, newest first."""
    return (
        permissions.plans_visible_to(user)
        .select_related("current_version", "proposed_by")
        .order_by("-created_at", "-pk")
    )


def plan_version_list(plan: TrainingPlan) -> QuerySet[PlanVersion]:
    """A plan's versions, oldest first, with their silos."""
    return (
        PlanVersion.objects.filter(plan=plan)
        .select_related("created_by")
        .prefetch_related("silos")
        .order_by("number")
    )


def plan_version(plan: TrainingPlan, number: int) -> PlanVersion:
    """Version `number` of a plan the user may see, else 404."""
    version = plan_version_list(plan).select_related("plan__consortium").filter(number=number)
    found = version.first()
    if found is None:
        raise Http404("no such plan version")
    return found


def approval_list(plan: TrainingPlan) -> QuerySet[Approval]:
    """Every decision on every version of a plan, in the order they were made."""
    return (
        Approval.objects.filter(version__plan=plan)
        .select_related("version", "user", "organization")
        .order_by("created_at", "pk")
    )


def run_list(user: Any) -> QuerySet[Run]:
    """Runs of the user's consortia, newest first."""
    return (
        permissions.runs_visible_to(user)
        .select_related("plan", "version", "started_by")
        .order_by("-created_at", "-pk")
    )


def round_list(run: Run) -> QuerySet[Round]:
    """A run's rounds with selected and answered counts and round-level metrics."""
    return (
        Round.objects.filter(run=run)
        .annotate(
            selected_count=Count("selected", distinct=True),
            updates_count=Count("updates", distinct=True),
        )
        .prefetch_related(
            Prefetch(
                "metrics",
                queryset=RoundMetric.objects.filter(silo__isnull=True).order_by("scope", "name"),
                to_attr="summary_metrics",
            )
        )
        .order_by("number", "attempt")
    )


def model_version_list(run: Run) -> QuerySet[ModelVersion]:
    """A run's global models, oldest first."""
    return ModelVersion.objects.filter(run=run).select_related("round").order_by("number")


def audit_event_list(user: Any) -> QuerySet[AuditEvent]:
    """Events of the consortia whose log the user may read (else PermissionDenied)."""
    ids = permissions.audit_consortium_ids(user)
    return AuditEvent.objects.filter(consortium_id__in=ids).order_by("index")


def silo_budget_report(silo: Silo) -> dict[str, Any]:
    """A silo's budget, its composed spend, what remains and its ledger entries (oldest first)."""
    from federation import ledger
    from federation.models import PrivacyLedgerEntry

    spent = ledger.silo_spent_epsilon(silo)
    return {
        "epsilon_budget": silo.epsilon_budget,
        "delta_budget": silo.delta_budget,
        "epsilon_spent": spent,
        "epsilon_remaining": None
        if silo.epsilon_budget is None
        else max(0.0, silo.epsilon_budget - spent),
        "entries": list(PrivacyLedgerEntry.objects.filter(silo=silo).order_by("created_at", "pk")),
    }
