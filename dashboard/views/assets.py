"""plotly.js, served from the installed plotly package: no CDN, no copy in the repository."""

from __future__ import annotations

from functools import cache
from pathlib import Path

import plotly
from django.http import FileResponse, Http404, HttpRequest
from django.views.decorators.http import require_GET

PLOTLY_VERSION = plotly.__version__
# The URL names the package version, so a year of caching is safe: an upgrade changes the URL.
MAX_AGE = 365 * 24 * 3600


@cache
def plotly_js_path() -> Path:
    """Where the installed plotly package keeps its plotly.min.js bundle."""
    return Path(plotly.__file__).resolve().parent / "package_data" / "plotly.min.js"


@require_GET
def plotly_js(request: HttpRequest, version: str) -> FileResponse:
    """The bundled plotly.min.js with long cache headers."""
    if version != PLOTLY_VERSION:
        raise Http404("no such plotly.js version")
    path = plotly_js_path()
    response = FileResponse(path.open("rb"), content_type="text/javascript; charset=utf-8")
    response["Cache-Control"] = f"public, max-age={MAX_AGE}, immutable"
    return response
