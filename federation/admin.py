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


@admin.register(models.TrainingPlan)
class TrainingPlanAdmin(admin.ModelAdmin):
    list_display = ("name", "version", "status", "spec_hash", "consortium")
    list_filter = ("status",)


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
