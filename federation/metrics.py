"""GET /metrics: the federation's state in the Prometheus text format (version 0.0.4).

For Prometheus, VictoriaMetrics, Grafana Agent or anything that scrapes that format. Every figure
comes from the database, so any ASGI process answers for the whole deployment (a scrape of one
process is enough; scraping several gives the same numbers). A scrape costs a fixed number of
aggregate queries, whatever the number of silos, runs or rounds.

Access: ``Authorization: Bearer <QUORUM_METRICS_TOKEN>``. With no token configured the endpoint
is off (404 saying how to turn it on): the figures name no silo, but how many sites are online
and how often updates are refused is still nobody's business but the operator's.

What is exported (docs/operations.md, "Metrics"):

- ``quorum_build_info{version, profile}`` 1
- ``quorum_silos{admission}``: registered silos by admission state
- ``quorum_silos_connected``: admitted silos with an agent connection registered
- ``quorum_silos_stale``: of those, how many sent no heartbeat for QUORUM_SILO_OFFLINE_AFTER
  seconds (the sweeper will mark them offline; a steady non-zero value means the sweeper is not
  running)
- ``quorum_runs{status}``, ``quorum_rounds{status}``
- ``quorum_round_duration_seconds``: a summary over the last 200 completed rounds (quantiles
  0.5, 0.9, 0.99) plus ``_sum`` / ``_count`` over those rounds
- ``quorum_updates_accepted_total``, ``quorum_update_bytes_total``: accepted updates and their
  stored size
- ``quorum_audit_events_total{action}`` for the actions an operator alerts on (refused updates,
  agent refusals and errors, failed rounds and runs) and ``quorum_audit_events_total`` overall
- ``quorum_privacy_ledger_entries_total``, ``quorum_model_versions_total``
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from datetime import timedelta

from django.conf import settings
from django.db.models import Count, Max, QuerySet, Sum
from django.http import HttpRequest, HttpResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from . import dispatch, models

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RECENT_ROUNDS = 200
QUANTILES = (0.5, 0.9, 0.99)
# Audit actions exported one by one: the ones an operator alerts on. The rest count in the total.
WATCHED_ACTIONS = (
    "update.accepted",
    "update.refused",
    "agent.refused",
    "agent.error",
    "round.failed",
    "round.anomaly",
    "run.finished",
    "fairness.flag",
    "membership.refused",
    "admin.write_refused",
    "stats.refused",
    "secagg.aborted",
    "silo.excluded",
)
VERSION = "0.1.0"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class Exposition:
    """Builds the text format: one HELP/TYPE block per metric family, then its samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        """Start a metric family."""
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, **labels: str) -> None:
        """One sample line."""
        label_text = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
        number = repr(float(value)) if isinstance(value, float) else str(value)
        self.lines.append(f"{name}{{{label_text}}} {number}" if labels else f"{name} {number}")

    def text(self) -> str:
        """The whole exposition, newline-terminated."""
        return "\n".join(self.lines) + "\n"


def quantile(sorted_values: list[float], q: float) -> float:
    """The q-quantile of an ascending list by the nearest-rank method (NaN when empty)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), int(-(-q * len(sorted_values) // 1))))
    return sorted_values[rank - 1]


def _counts(queryset: QuerySet, field: str, choices: Iterable[str]) -> dict[str, int]:
    """Rows of ``queryset`` per value of ``field``, every choice present (0 when none): one
    GROUP BY query."""
    counts = dict.fromkeys(choices, 0)
    for row in queryset.values(field).annotate(n=Count("id")).order_by():
        counts[row[field]] = row["n"]
    return counts


def _by_label(
    out: Exposition, name: str, kind: str, help_text: str, label: str, counts: dict[str, int]
) -> None:
    """One family with a sample per label value."""
    out.family(name, kind, help_text)
    for value, n in counts.items():
        out.sample(name, n, **{label: value})


def render() -> str:
    """The exposition text for the current state of the database."""
    out = Exposition()
    out.family("quorum_build_info", "gauge", "Version and profile of the serving process.")
    out.sample("quorum_build_info", 1, version=VERSION, profile=dispatch.profile())

    _by_label(
        out,
        "quorum_silos",
        "gauge",
        "Registered silos by admission state.",
        "admission",
        _counts(models.Silo.objects, "admission", models.Silo.Admission.values),
    )

    connected = models.Silo.objects.filter(
        admission=models.Silo.Admission.ADMITTED, connection_id__isnull=False
    )
    stale_before = timezone.now() - timedelta(seconds=settings.QUORUM_SILO_OFFLINE_AFTER)
    out.family("quorum_silos_connected", "gauge", "Admitted silos with a connected agent.")
    out.sample("quorum_silos_connected", connected.count())
    out.family(
        "quorum_silos_stale",
        "gauge",
        "Connected silos without a heartbeat for QUORUM_SILO_OFFLINE_AFTER seconds.",
    )
    out.sample("quorum_silos_stale", connected.filter(last_heartbeat__lt=stale_before).count())

    runs = _counts(models.Run.objects, "status", models.Run.Status.values)
    _by_label(out, "quorum_runs", "gauge", "Runs by status.", "status", runs)
    rounds = _counts(models.Round.objects, "status", models.Round.Status.values)
    _by_label(out, "quorum_rounds", "gauge", "Round attempts by status.", "status", rounds)

    recent = list(
        models.Round.objects.filter(status=models.Round.Status.COMPLETED, finished_at__isnull=False)
        .order_by("-finished_at")
        .values_list("started_at", "finished_at")[:RECENT_ROUNDS]
    )
    durations = sorted((end - start).total_seconds() for start, end in recent)
    out.family(
        "quorum_round_duration_seconds",
        "summary",
        f"Wall time of the last {RECENT_ROUNDS} completed rounds, opening to new model version.",
    )
    for q in QUANTILES:
        out.sample("quorum_round_duration_seconds", quantile(durations, q), quantile=str(q))
    out.sample("quorum_round_duration_seconds_sum", float(sum(durations)))
    out.sample("quorum_round_duration_seconds_count", len(durations))

    updates = models.Update.objects.aggregate(n=Count("id"), size=Sum("size_bytes"))
    out.family("quorum_updates_accepted_total", "counter", "Accepted model updates.")
    out.sample("quorum_updates_accepted_total", updates["n"] or 0)
    out.family("quorum_update_bytes_total", "counter", "Stored bytes of accepted updates.")
    out.sample("quorum_update_bytes_total", updates["size"] or 0)

    audit = _counts(
        models.AuditEvent.objects.filter(action__in=WATCHED_ACTIONS), "action", WATCHED_ACTIONS
    )
    last_index = models.AuditEvent.objects.aggregate(last=Max("index"))["last"]
    out.family(
        "quorum_audit_events_total",
        "counter",
        "Audit events: all of them (no label) and the watched actions by name.",
    )
    out.sample("quorum_audit_events_total", last_index or 0)  # indexes count from 1
    for action, n in audit.items():
        out.sample("quorum_audit_events_total", n, action=action)

    out.family("quorum_privacy_ledger_entries_total", "counter", "Privacy ledger entries.")
    out.sample("quorum_privacy_ledger_entries_total", models.PrivacyLedgerEntry.objects.count())
    out.family("quorum_model_versions_total", "counter", "Global model versions stored.")
    out.sample("quorum_model_versions_total", models.ModelVersion.objects.count())
    return out.text()


def _authorized(request: HttpRequest, token: str) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and secrets.compare_digest(
        given.strip().encode(), token.encode()
    )


@never_cache
@require_GET
def metrics(request: HttpRequest) -> HttpResponse:
    """The Prometheus exposition; bearer token from QUORUM_METRICS_TOKEN."""
    token = settings.QUORUM_METRICS_TOKEN
    if not token:
        return HttpResponse(
            "metrics are off: set QUORUM_METRICS_TOKEN and scrape with "
            "'Authorization: Bearer <token>' (docs/operations.md, Metrics)\n",
            status=404,
            content_type="text/plain; charset=utf-8",
        )
    if not _authorized(request, token):
        response = HttpResponse(
            "metrics need 'Authorization: Bearer <QUORUM_METRICS_TOKEN>'\n",
            status=401,
            content_type="text/plain; charset=utf-8",
        )
        response["WWW-Authenticate"] = 'Bearer realm="quorum-metrics"'
        return response
    return HttpResponse(render(), content_type=CONTENT_TYPE)
