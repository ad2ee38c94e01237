"""A data steward registers a silo of their organisation, with its dataset schema (a JSON file
the site's ``quorum-agent init --data FILE.csv`` writes, reviewed by the steward)."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied, ValidationError
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect

from dashboard import people_forms
from dashboard.views.common import page
from federation import permissions
from federation.models import Role
from federation.services import silos as silo_services


@login_required
def silo_register(request: HttpRequest, consortium_id: int) -> HttpResponse:
    """The registration form; the service refuses a bad schema with the path of the fault, and
    registers nothing then (no silo without its schema)."""
    consortium = permissions.access_consortium(user=request.user, id=consortium_id)
    permissions.require_roles(
        request.user, consortium.pk, permissions.CAN_REGISTER_SILOS, "registering a silo"
    )
    organizations = permissions.organizations_with_role(
        request.user, consortium.pk, {Role.DATA_STEWARD}
    ).order_by("name")
    form = people_forms.SiloRegisterForm(
        request.POST or None, request.FILES or None, organizations=organizations
    )
    error, status = "", 200
    if request.method == "POST" and form.is_valid():
        data = form.cleaned_data
        try:
            silo = silo_services.silo_register(
                actor=request.user,
                organization=data["organization"],
                name=data["name"],
                description=data["description"],
                schema=data["schema"],
                row_count=data["row_count"],
                location=data["location"],
            )
        except PermissionDenied as exc:
            error, status = str(exc), 403
        except ValidationError as exc:
            form.apply_service_errors(exc)
        else:
            messages.success(
                request,
                f"Silo {silo.name} is registered and waits for the consortium admin to admit it; "
                "the admin then gives you its agent token, once.",
            )
            return redirect("dashboard:silo_detail", silo_id=silo.pk)
    return page(
        request,
        "dashboard/silo_form.html",
        consortium=consortium,
        section="overview",
        status=400 if form.errors else status,
        form=form,
        error=error,
    )
