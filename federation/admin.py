"""Django admin for operators."""

from django.contrib import admin

from federation import models


@admin.register(models.Consortium)
class ConsortiumAdmin(admin.ModelAdmin):
    list_display = ("name", "created_at")


@admin.register(models.Organization)
class OrganizationAdmin(admin.ModelAdmin):
    list_display = ("name", "kind", "consortium")
    list_filter = ("kind", "consortium")


@admin.register(models.Silo)
class SiloAdmin(admin.ModelAdmin):
    list_display = ("name", "organization", "admission", "connection_id", "last_heartbeat")
    list_filter = ("admission", "consortium")
    exclude = ("token_hash",)


@admin.register(models.Membership)
class MembershipAdmin(admin.ModelAdmin):
    list_display = ("user", "organization", "role")
    list_filter = ("role",)


@admin.register(models.TrainingPlan)
class TrainingPlanAdmin(admin.ModelAdmin):
    list_display = ("name", "status", "consortium", "proposed_by", "updated_at")
    list_filter = ("status",)


@admin.register(models.PlanVersion)
class PlanVersionAdmin(admin.ModelAdmin):
    list_display = ("plan", "number", "spec_hash", "created_by", "created_at")


@admin.register(models.Approval)
class ApprovalAdmin(admin.ModelAdmin):
    list_display = ("version", "user", "organization", "role", "decision", "created_at")


@admin.register(models.AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    """Read-only: the audit log is append-only, and the chain would expose any edit."""

    list_display = ("index", "created_at", "actor", "action", "object_type", "object_id")
    list_filter = ("action",)

    def has_add_permission(self, request):  # type: ignore[no-untyped-def]
        return False

    def has_change_permission(self, request, obj=None):  # type: ignore[no-untyped-def]
        return False

    def has_delete_permission(self, request, obj=None):  # type: ignore[no-untyped-def]
        return False


@admin.register(models.Run)
class RunAdmin(admin.ModelAdmin):
    list_display = ("pk", "plan", "status", "rounds", "created_at", "finished_at")
    list_filter = ("status",)


@admin.register(models.Round)
class RoundAdmin(admin.ModelAdmin):
    list_display = ("run", "number", "attempt", "status", "started_at", "finished_at")


@admin.register(models.ModelVersion)
class ModelVersionAdmin(admin.ModelAdmin):
    list_display = ("run", "number", "checksum", "size_bytes", "created_at")
