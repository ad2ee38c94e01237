"""Federation app config."""

from django.apps import AppConfig


class FederationConfig(AppConfig):
    """The domain: consortia, silos, plans, runs, rounds and model versions."""

    default_auto_field = "django.db.models.BigAutoField"
    name = "federation"
