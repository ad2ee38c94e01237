"""Django admin for operators: a read-only window on governance (docs/security.md).

Every governance model is read-only here, for superusers too: no add, no change, no delete, no
bulk action. Governance writes go through ``federation.services`` (and so through their checks and
the audit log), never around them. What stays writable is listed in ``WRITABLE`` with the reason,
and ``tests/integration/test_admin_readonly.py`` walks the whole registry to hold this true.
"""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin
from django.db import transaction
from django.db.models import Q

from federation import models
from federation.services.api_tokens import api_token_revoke
from federation.services.audit import actor_label, audit_append
from federation.services.consortia import (
    consortium_create,
    organization_create,
    quorum_rule_errors,
)

# Models an operator may still write in /admin/, and why that cannot bypass governance.
WRITABLE = {
    "auth.group": (
        "Django groups only grant admin-site permissions; roles in Quorum are Memberships, which "
        "are read-only here, and every governance model refuses writes whatever the permissions."
    ),
    "auth.user": (
        "accounts are created and edited here, but an account holds no role (roles are "
        "Memberships, granted only through federation.services.members); the account of anyone "
        "holding a membership or having decided on a plan cannot be changed or deleted here "
        "(a password reset would let the operator sign in as a steward; a delete would cascade "
        "to their approvals), except their own"
    ),
    "federation.apitoken": (
        "delete only, which revokes a user's API token through services.api_tokens (audited); a "
        "token can never be created or changed here (that would let the operator act in a "
        "steward's name), and only its SHA-256 is stored"
    ),
    "federation.consortium": (
        "add only, through services.consortia.consortium_create (audited): an operator sets up a "
        "consortium; its approval rules can never be changed here"
    ),
    "federation.organization": (
        "add only, through services.consortia.organization_create (audited); never changed or "
        "deleted here (the member count is part of the quorum rule)"
    ),
}


class ReadOnlyAdmin(admin.ModelAdmin):
    """A governance model: viewable, never written through the admin, by anyone.

    A refused write (a POST to the add, change or delete page) is audited as
    ``admin.write_refused`` before Django answers 403: someone tried to write around governance.
    """

    actions = None  # no bulk actions (not even "delete selected")

    def _audit_refused(self, request: Any, view: str, object_id: Any) -> None:
        with transaction.atomic():
            audit_append(
                actor=actor_label(request.user),
                action="admin.write_refused",
                consortium_id=None,
                object_type=self.model._meta.label_lower,
                object_id=str(object_id or ""),
                data={"view": view, "model": self.model._meta.label_lower},
            )

    def changeform_view(
        self, request: Any, object_id: Any = None, form_url: str = "", extra_context: Any = None
    ) -> Any:
        if request.method == "POST":
            adding = object_id is None
            allowed = (
                self.has_add_permission(request)
                if adding
                else self.has_change_permission(request, None)
            )
            if not allowed:
                self._audit_refused(request, "add" if adding else "change", object_id)
        return super().changeform_view(request, object_id, form_url, extra_context)

    def delete_view(self, request: Any, object_id: Any, extra_context: Any = None) -> Any:
        if request.method == "POST" and not self.has_delete_permission(request, None):
            self._audit_refused(request, "delete", object_id)
        return super().delete_view(request, object_id, extra_context)

    def has_add_permission(self, request: Any) -> bool:
        return False

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return False


class AddThroughServiceAdmin(ReadOnlyAdmin):
    """Add allowed, and only through an audited service (``create``); no change, no delete."""

    def has_add_permission(self, request: Any) -> bool:
        return bool(request.user.is_active and request.user.is_superuser)

    def save_model(self, request: Any, obj: Any, form: Any, change: bool) -> None:
        # Only adds reach here (change is refused); the service writes the row and the audit.
        created = self.create(request.user, form.cleaned_data)
        obj.pk = created.pk

    def create(self, actor: Any, data: dict[str, Any]) -> Any:
        raise NotImplementedError


class ConsortiumAddForm(forms.ModelForm):
    """The add form checks the quorum rule as the service will (bad input: a form error)."""

    class Meta:
        model = models.Consortium
        fields = (
            "name",
            "description",
            "require_steward_unanimity",
            "org_quorum_mode",
            "org_quorum_value",
        )

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        errors = quorum_rule_errors(data.get("org_quorum_mode"), data.get("org_quorum_value"))
        for field, message in errors.items():
            self.add_error(field, message)
        return data


@admin.register(models.Consortium)
class ConsortiumAdmin(AddThroughServiceAdmin):
    form = ConsortiumAddForm
    list_display = ("name", "created_at")
    fields = (
        "name",
        "description",
        "require_steward_unanimity",
        "org_quorum_mode",
        "org_quorum_value",
    )

    def create(self, actor: Any, data: dict[str, Any]) -> Any:
        return consortium_create(actor=actor, **{k: data[k] for k in self.fields})


@admin.register(models.Organization)
class OrganizationAdmin(AddThroughServiceAdmin):
    list_display = ("name", "kind", "consortium")
    list_filter = ("kind", "consortium")
    fields = ("consortium", "name", "kind")

    def create(self, actor: Any, data: dict[str, Any]) -> Any:
        return organization_create(
            actor=actor, consortium=data["consortium"], name=data["name"], kind=data["kind"]
        )


@admin.register(models.Silo)
class SiloAdmin(ReadOnlyAdmin):
    list_display = ("name", "organization", "admission", "connection_id", "last_heartbeat")
    list_filter = ("admission", "consortium")
    exclude = ("token_hash",)


@admin.register(models.Membership)
class MembershipAdmin(ReadOnlyAdmin):
    list_display = ("user", "organization", "role", "status", "granted_by", "created_at")
    list_filter = ("role", "status")


@admin.register(models.Invitation)
class InvitationAdmin(ReadOnlyAdmin):
    list_display = ("email", "organization", "role", "invited_by", "expires_at", "accepted_at")
    exclude = ("token_hash",)


@admin.register(models.TrainingPlan)
class TrainingPlanAdmin(ReadOnlyAdmin):
    list_display = ("name", "status", "consortium", "proposed_by", "updated_at")
    list_filter = ("status",)


@admin.register(models.PlanVersion)
class PlanVersionAdmin(ReadOnlyAdmin):
    list_display = ("plan", "number", "spec_hash", "created_by", "created_at")


@admin.register(models.Approval)
class ApprovalAdmin(ReadOnlyAdmin):
    list_display = ("version", "user", "organization", "role", "decision", "created_at")


@admin.register(models.StewardPasskey)
class StewardPasskeyAdmin(ReadOnlyAdmin):
    # Read-only: a passkey added here would be a key the operator could claim is a steward's.
    list_display = ("user", "name", "created_at")


@admin.register(models.AuditEvent)
class AuditEventAdmin(ReadOnlyAdmin):
    """The audit log is append-only, and the chain would expose any edit."""

    list_display = ("index", "created_at", "actor", "action", "object_type", "object_id")
    list_filter = ("action",)


@admin.register(models.Run)
class RunAdmin(ReadOnlyAdmin):
    list_display = ("pk", "plan", "status", "rounds", "created_at", "finished_at")
    list_filter = ("status",)


@admin.register(models.Round)
class RoundAdmin(ReadOnlyAdmin):
    list_display = ("run", "number", "attempt", "status", "started_at", "finished_at")


@admin.register(models.ModelVersion)
class ModelVersionAdmin(ReadOnlyAdmin):
    list_display = ("run", "number", "checksum", "size_bytes", "created_at")


@admin.register(models.Update)
class UpdateAdmin(ReadOnlyAdmin):
    list_display = ("round", "silo", "num_examples", "sha256", "size_bytes", "received_at")


@admin.register(models.SiloStatistics)
class SiloStatisticsAdmin(ReadOnlyAdmin):
    list_display = ("run", "silo", "received_at")


@admin.register(models.RoundMetric)
class RoundMetricAdmin(ReadOnlyAdmin):
    list_display = ("round", "silo", "scope", "name", "value")


@admin.register(models.PrivacyLedgerEntry)
class PrivacyLedgerEntryAdmin(ReadOnlyAdmin):
    list_display = ("silo", "run", "round_number", "mechanism", "epsilon_total", "created_at")
    list_filter = ("mechanism",)


@admin.register(models.FairnessReport)
class FairnessReportAdmin(ReadOnlyAdmin):
    list_display = ("round", "created_at")


# API tokens: creating one for a steward would let the operator act as that steward; deleting
# one only revokes it, through the audited service.
@admin.register(models.ApiToken)
class RevokeOnlyTokenAdmin(ReadOnlyAdmin):
    list_display = ("prefix", "user", "name", "created_at", "expires_at", "last_used_at")
    exclude = ("digest",)

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        return bool(request.user.is_active and request.user.is_superuser)

    def delete_model(self, request: Any, obj: Any) -> None:
        api_token_revoke(actor=request.user, token=obj)


def _holds_governance(user: Any) -> bool:
    """Whether the account holds a membership or has decided on a plan."""
    return (
        models.Membership.objects.filter(user=user).exists()
        or models.Approval.objects.filter(Q(user=user)).exists()
    )


User = get_user_model()
admin.site.unregister(User)


@admin.register(User)
class GovernedUserAdmin(UserAdmin):
    """Accounts: writable, except those of people in governance (see ``WRITABLE``)."""

    actions = None

    def has_change_permission(self, request: Any, obj: Any = None) -> bool:
        if obj is not None and obj.pk != request.user.pk and _holds_governance(obj):
            return False
        return super().has_change_permission(request, obj)

    def has_delete_permission(self, request: Any, obj: Any = None) -> bool:
        if obj is not None and (obj.pk == request.user.pk or _holds_governance(obj)):
            return False
        return super().has_delete_permission(request, obj)
