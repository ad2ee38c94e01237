"""Quorum's Django project.

The Celery app is loaded with Django so that ``@shared_task`` tasks (federation/tasks.py) bind to
it: a process that sends a task (an ASGI server in the production profile) then uses the
configured broker, not Celery's default one.
"""

from config.celery import app as celery_app

__all__ = ["celery_app"]
