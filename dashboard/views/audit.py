"""The audit log viewer and the per-run compliance report (auditors and consortium admins)."""

from __future__ import annotations

from typing import Any

from django.contrib.auth.decorators import login_required
from django.core.paginator import Paginator
from django.http import HttpRequest, HttpResponse

from dashboard.views.common import page
from federation import compliance_pdf, permissions, reports, selectors
from federation.services.audit import audit_head, audit_verify

PAGE_SIZE = 50


@login_required
def audit_log(request: HttpRequest, consortium_id: int) -> HttpResponse:
    """The consortium's audit events, newest first, with the whole chain's verification."""
    consortium = permissions.access_consortium(user=request.user, id=consortium_id)
    permissions.require_roles(
        request.user, consortium.pk, permissions.CAN_READ_AUDIT, "reading the audit log"
    )
    action = request.GET.get("action", "")[:100]
    object_type = request.GET.get("object_type", "")[:50]
    object_id = request.GET.get("object_id", "")[:100]
    events = selectors.audit_events(
        consortium, action=action, object_type=object_type, object_id=object_id
    )
    paginator = Paginator(events, PAGE_SIZE)
    events_page = paginator.get_page(request.GET.get("page"))
    query = request.GET.copy()
    query.pop("page", None)
    return page(
        request,
        "dashboard/audit_log.html",
        consortium=consortium,
        section="audit",
        events=events_page,
        actions=selectors.audit_actions(consortium),
        action=action,
        object_type=object_type,
        object_id=object_id,
        query=query.urlencode(),
        verification=audit_verify(),
        head=audit_head(),
    )


def _compliance_run(request: HttpRequest, run_id: int) -> Any:
    run = permissions.access_run(user=request.user, id=run_id)
    permissions.require_roles(
        request.user,
        run.plan.consortium_id,
        permissions.CAN_READ_AUDIT,
        "reading a compliance report",
    )
    return run


@login_required
def compliance_report_pdf(request: HttpRequest, run_id: int) -> HttpResponse:
    """The compliance report as a PDF download (the same facts as the API's JSON)."""
    run = _compliance_run(request, run_id)
    response = HttpResponse(
        compliance_pdf.compliance_report_pdf(run), content_type="application/pdf"
    )
    response["Content-Disposition"] = f'attachment; filename="{compliance_pdf.filename(run)}"'
    response["Cache-Control"] = "no-store"
    return response


@login_required
def compliance_report(request: HttpRequest, run_id: int) -> HttpResponse:
    """A printable record of one run: plan, approvals, data used, privacy, audit trail."""
    run = _compliance_run(request, run_id)
    return page(
        request,
        "dashboard/compliance.html",
        consortium=run.plan.consortium,
        section="runs",
        report=reports.compliance_report(run),
    )
