"""Dashboard app config."""

from django.apps import AppConfig


class DashboardConfig(AppConfig):
    """Server-rendered pages for every role; reads through federation's selectors."""

    default_auto_field = "django.db.models.BigAutoField"
    name = "dashboard"
