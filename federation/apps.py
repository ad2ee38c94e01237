"""Federation app config: fills the dispatch port's step registry at start-up."""

from django.apps import AppConfig


class FederationConfig(AppConfig):
    """The domain: consortia, silos, plans, runs, rounds and model versions."""

    default_auto_field = "django.db.models.BigAutoField"
    name = "federation"

    def ready(self) -> None:
        """Name the steps dispatch runs, and their Celery tasks (the port imports neither)."""
        from federation import dispatch, orchestrator, secagg_rounds, tasks
        from federation.services import silos

        steps = {
            dispatch.RUN_ADVANCE: orchestrator.run_advance,
            dispatch.SWEEP: orchestrator.sweep,
            dispatch.SECAGG_TICK: secagg_rounds.tick,
            dispatch.SILO_HEARTBEATS: silos.silo_heartbeats_record,
        }
        for name, fn in steps.items():
            dispatch.register_step(name, fn, task=tasks.TASKS_BY_STEP.get(name))
