"""Audit rows for what a site's agent reports (``error`` frames) or sends that the protocol
refuses (malformed frames), within a per-silo budget (federation/throttle.py).

A connected agent is authenticated but not trusted: without a budget each of its frames was one
audit row, and 2,000 of them added 7.8 MiB. Past the budget the frames are counted and one
``agent.reports_suppressed`` event per window says how many of each code were left out. The
budget lives in this process's memory (several ASGI processes each grant their own).
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.db import transaction

from federation import throttle
from federation.models import Silo
from federation.services.audit import audit_append
from federation.services.refusals import REFUSAL_CODES, silo_refusal_record

log = logging.getLogger("quorum.agent_ws")

_budget: throttle.SiloReportBudget | None = None


def report_budget() -> throttle.SiloReportBudget:
    """This process's per-silo budget of report audit rows (built from settings once)."""
    global _budget
    if _budget is None:
        _budget = throttle.SiloReportBudget(
            burst=settings.QUORUM_AGENT_REPORT_AUDIT_BURST,
            per_minute=settings.QUORUM_AGENT_REPORT_AUDIT_PER_MINUTE,
            window=settings.QUORUM_AGENT_REPORT_AUDIT_WINDOW_SECONDS,
        )
    return _budget


def reset_report_budget() -> None:
    """Forget every silo's budget (tests; settings changes)."""
    global _budget
    _budget = None


def _audit_suppressed(silo: Silo, summary: dict[str, Any]) -> None:
    log.warning(
        "silo %s: %s agent reports or refused frames not audited one by one (budget spent)",
        silo.name,
        summary["suppressed"],
    )
    audit_append(
        actor=f"silo:{silo.name}",
        action="agent.reports_suppressed",
        consortium_id=silo.consortium_id,
        object_type="silo",
        object_id=silo.pk,
        data=summary,
    )


def _within_budget(silo: Silo, code: str) -> bool:
    write, summary = report_budget().take(silo.pk, code)
    if summary is not None:
        _audit_suppressed(silo, summary)
    return write


@transaction.atomic
def agent_report(
    *, silo_id: int, code: str, reason: str, run_id: int | None, round_number: int | None
) -> None:
    """Record in the audit log what a site's agent refused or could not do, and why.

    A refusal of a run's request also takes the silo out of that run's selection
    (federation.services.refusals), whether or not the audit budget lets the row through."""
    silo = Silo.objects.get(pk=silo_id)
    if run_id is not None:
        silo_refusal_record(
            silo_id=silo.pk, run_id=run_id, round_number=round_number, code=code, reason=reason
        )
    if not _within_budget(silo, code):
        return
    audit_append(
        actor=f"silo:{silo.name}",
        action="agent.refused" if code in REFUSAL_CODES else "agent.error",
        consortium_id=silo.consortium_id,
        object_type="run" if run_id is not None else "silo",
        object_id=run_id if run_id is not None else silo.pk,
        data={"code": code[:50], "reason": reason[:2000], "round": round_number},
    )


@transaction.atomic
def agent_frame_refused(*, silo_id: int, code: str, reason: str) -> None:
    """A frame from the silo's agent broke the protocol (not JSON, a number out of range, an
    unknown field, ...): log and audit it, within the silo's budget."""
    silo = Silo.objects.get(pk=silo_id)
    log.warning("frame from silo %s refused: %s: %s", silo.name, code, reason)
    if not _within_budget(silo, code):
        return
    audit_append(
        actor=f"silo:{silo.name}",
        action="agent.frame_refused",
        consortium_id=silo.consortium_id,
        object_type="silo",
        object_id=silo.pk,
        data={"code": code[:50], "reason": reason[:2000]},
    )


@transaction.atomic
def agent_reports_flush(*, silo_id: int) -> None:
    """The silo's agent went away: write its pending "suppressed" summary, if any."""
    summary = report_budget().flush(silo_id)
    if summary is None:
        return
    silo = Silo.objects.filter(pk=silo_id).first()
    if silo is not None:
        _audit_suppressed(silo, summary)
