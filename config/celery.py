"""Celery application (production profile): orchestration steps, deadlines, the sweep.

    celery -A config worker -l info      # runs federation.run_advance and federation.sweep
    celery -A config beat -l info        # sends federation.sweep every QUORUM_SWEEP_SECONDS

Every task takes ids and re-reads the database, so a task may run twice, late, or on any worker.
"""

from __future__ import annotations

import os

from celery import Celery, signals

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("quorum")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["federation"])


@signals.setup_logging.connect
def _use_django_logging(**_: object) -> None:
    """Workers and beat log through settings.LOGGING, like the ASGI processes.

    Without this Celery puts its own handler on the root logger, and every `quorum.*` line (which
    also has the console handler of LOGGING) was printed twice.
    """
    from logging.config import dictConfig

    from django.conf import settings

    dictConfig(settings.LOGGING)


@app.on_after_configure.connect
def _schedule_sweep(sender: Celery, **_: object) -> None:
    """Beat sends the deadline sweep every QUORUM_SWEEP_SECONDS (read once settings are loaded)."""
    from django.conf import settings

    interval = float(settings.QUORUM_SWEEP_SECONDS)
    # A sweep that waited longer than one interval is superseded by the next one: a busy worker
    # never works through a backlog of sweeps.
    sender.add_periodic_task(
        interval,
        sender.signature("federation.sweep", options={"expires": max(1.0, interval)}),
        name="quorum-sweep",
    )
