"""The server-error view: a database outage is 503 with Retry-After, not a 500 after 30 s.

Django calls ``handler500`` for any exception a view or a middleware did not handle (DRF passes
the ones it does not know on). When the exception is the database's (unreachable, the pool timed
out, the connection dropped), the answer says so and when to try again: load balancers and the
``quorum`` client retry a 503 and never a 500. How fast it comes is set by the production
profile's connect and pool timeouts (QUORUM_DB_CONNECT_TIMEOUT, QUORUM_DB_POOL_TIMEOUT).
"""

from __future__ import annotations

import sys

from django.db import InterfaceError, OperationalError
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.views import defaults

RETRY_AFTER_SECONDS = 10
DATABASE_UNAVAILABLE = (
    "The database is unreachable right now; nothing was changed. Try again in "
    f"{RETRY_AFTER_SECONDS} s (GET /healthz shows when it is back)."
)


def server_error(request: HttpRequest) -> HttpResponse:
    """503 naming the database for a database outage; Django's own 500 page otherwise."""
    exc = sys.exc_info()[1]
    if not isinstance(exc, OperationalError | InterfaceError):
        return defaults.server_error(request)
    response: HttpResponse
    if request.path.startswith("/api/"):
        response = JsonResponse(
            {"detail": DATABASE_UNAVAILABLE, "code": "database_unavailable"}, status=503
        )
    else:  # no template: rendering one may need the database (context processors)
        response = HttpResponse(
            f"<!doctype html><title>Quorum: try again shortly</title><p>{DATABASE_UNAVAILABLE}</p>",
            status=503,
        )
    response["Retry-After"] = str(RETRY_AFTER_SECONDS)
    response["Cache-Control"] = "no-store"
    return response
