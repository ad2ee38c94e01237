"""URL routes: dashboard, admin, REST API (docs/api.md) and its OpenAPI schema and docs."""

from django.contrib import admin
from django.contrib.staticfiles.urls import staticfiles_urlpatterns
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView

from federation.health import healthz
from federation.metrics import metrics

urlpatterns = [
    path("healthz", healthz, name="healthz"),
    path("metrics", metrics, name="metrics"),
    path("admin/", admin.site.urls),
    path("api/v1/", include("federation.api.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    # The split view serves its start-up script from a URL: no inline script (the CSP forbids it).
    path("api/docs/", SpectacularSwaggerSplitView.as_view(url_name="schema"), name="api-docs"),
    path("", include("dashboard.urls")),
]
# With DEBUG (the embedded profile's default) the server serves static files itself: the admin's
# and Swagger UI's (drf-spectacular-sidecar, no CDN). In production (DEBUG off) this adds nothing:
# `manage.py collectstatic` fills STATIC_ROOT and the reverse proxy serves it (docs/operations.md).
urlpatterns += staticfiles_urlpatterns()

# A database outage answers 503 with Retry-After (config/errors.py); anything else, Django's 500.
handler500 = "config.errors.server_error"
