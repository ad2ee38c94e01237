"""WSGI entry point: plain HTTP only (the REST API and admin; websockets need config.asgi).

Used by in-process API tests (schemathesis) and by WSGI servers that front the HTTP API.
"""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
application = get_wsgi_application()
