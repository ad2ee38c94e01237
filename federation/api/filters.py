"""Query filters of the list endpoints (django-filter). A bad value is a 400 naming the filter.

Filters only narrow what the user may already see: filtering on a consortium the user is not a
member of returns an empty page, exactly like a consortium that does not exist.
"""

from __future__ import annotations

from django import forms
from django_filters import rest_framework as filters
from drf_spectacular.utils import extend_schema_field

from federation.models import AuditEvent, Run, Silo, TrainingPlan

MAX_ID = 2**63 - 1


@extend_schema_field({"type": "integer", "minimum": 0, "maximum": MAX_ID})
class IdFilter(filters.NumberFilter):
    """An integer id (django-filter's NumberFilter takes decimals)."""

    field_class = forms.IntegerField

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("min_value", 0)
        kwargs.setdefault("max_value", MAX_ID)
        super().__init__(*args, **kwargs)


class SiloFilter(filters.FilterSet):
    consortium = IdFilter(field_name="consortium_id")
    organization = IdFilter(field_name="organization_id")
    admission = filters.ChoiceFilter(choices=Silo.Admission.choices)

    class Meta:
        model = Silo
        fields = ["consortium", "organization", "admission"]


class PlanFilter(filters.FilterSet):
    consortium = IdFilter(field_name="consortium_id")
    status = filters.ChoiceFilter(choices=TrainingPlan.Status.choices)

    class Meta:
        model = TrainingPlan
        fields = ["consortium", "status"]


class RunFilter(filters.FilterSet):
    consortium = IdFilter(field_name="plan__consortium_id")
    status = filters.ChoiceFilter(choices=Run.Status.choices)
    plan = IdFilter(field_name="plan_id")

    class Meta:
        model = Run
        fields = ["consortium", "status", "plan"]


class AuditEventFilter(filters.FilterSet):
    consortium = IdFilter(field_name="consortium_id")
    action = filters.CharFilter(field_name="action", max_length=100)
    since = IdFilter(field_name="index", lookup_expr="gt", label="Only events after this index")

    class Meta:
        model = AuditEvent
        fields = ["consortium", "action", "since"]
