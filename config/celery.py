"""Celery application (production profile): orchestration steps, deadlines, the sweep."""

from __future__ import annotations

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")

app = Celery("quorum")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks(["federation"])
app.conf.beat_schedule = {
    "quorum-sweep": {"task": "federation.sweep", "schedule": 2.0},
}
