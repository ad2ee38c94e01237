"""Forms of the dashboard: proposing and editing plans, approving and rejecting them.

The forms only parse what the browser sends (JSON text, checkboxes, hidden hashes). The rules
live in ``federation.services.plans``; a ``ValidationError`` it raises (a dict of field paths to
messages) is put back on the form field by field with ``apply_service_errors``.
"""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.core.exceptions import ValidationError
from django.db.models import QuerySet

from federation.models import Organization, Silo


def starter_spec(schema: dict[str, Any] | None) -> dict[str, Any]:
    """A plan spec to start from: a small model over a silo's schema, sensible training."""
    return {
        "model": {"kind": "logistic_regression"},
        "schema": schema or {"columns": [], "target": {"column": "", "positive": []}},
        "training": {
            "rounds": 5,
            "local_epochs": 1,
            "batch_size": 32,
            "optimizer": "adam",
            "lr": 0.01,
        },
        "evaluation": {"test_fraction": 0.2, "seed": 0},
        "aggregation": {"strategy": "fedavg"},
        "min_silos": 2,
        "round_deadline_seconds": 120,
        "seed": 0,
    }


class SpecField(forms.CharField):
    """A plan spec typed as JSON text; cleans to a dict, with the parser's line and column."""

    widget = forms.Textarea(attrs={"rows": 22, "spellcheck": "false", "class": "code"})

    def to_python(self, value: Any) -> Any:
        text = super().to_python(value)
        if not text:
            return text
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValidationError(
                f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
                code="invalid_json",
            ) from exc
        if not isinstance(spec, dict):
            raise ValidationError(
                'the spec must be a JSON object: {"model": ..., "schema": ..., ...}',
                code="not_object",
            )
        return spec

    def prepare_value(self, value: Any) -> Any:
        if isinstance(value, dict):
            return json.dumps(value, indent=2, sort_keys=False)
        return value


class SiloChoiceField(forms.ModelMultipleChoiceField):
    """Participating silos as checkboxes, labelled with their organisation."""

    widget = forms.CheckboxSelectMultiple

    def label_from_instance(self, obj: Silo) -> str:
        return f"{obj.name} · {obj.organization.name} · {obj.row_count} rows"


class ServiceErrorsMixin:
    """Show a service's ValidationError on the form, each message under its field."""

    # Fields of the service's error dict that are not fields of the form, but belong to one.
    error_fields: dict[str, str] = {}

    def apply_service_errors(self, error: ValidationError) -> None:
        """Put the messages of a service's ValidationError on the matching fields."""
        form: forms.Form = self  # type: ignore[assignment]
        if not hasattr(error, "error_dict"):
            form.add_error(None, error)
            return
        for key, messages in error.message_dict.items():
            field = self.error_fields.get(key, key)
            prefix = ""
            if key.startswith("spec."):
                field, prefix = "spec", f"{key.removeprefix('spec.')}: "
            if field not in form.fields:
                field, prefix = None, f"{key}: "
            for message in messages:
                form.add_error(field, f"{prefix}{message}")


class PlanProposeForm(ServiceErrorsMixin, forms.Form):
    """A data scientist's new plan: name, description, spec (JSON) and participating silos."""

    name = forms.CharField(max_length=200, strip=True)
    description = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 3}))
    spec = SpecField(
        help_text="The plan's JSON: model, schema, training, evaluation, aggregation, min_silos, "
        "round_deadline_seconds, seed, and optionally privacy, secure_aggregation, fairness."
    )
    # Not required here: the service says "choose at least one silo" with the other problems.
    silos = SiloChoiceField(queryset=None, required=False)
    submit = forms.BooleanField(
        required=False, initial=True, label="Submit for approval now (else save as a draft)"
    )

    def __init__(self, *args: Any, silos: QuerySet[Silo], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["silos"].queryset = silos


class PlanEditForm(ServiceErrorsMixin, forms.Form):
    """A new version of a plan: its spec (JSON), silos and description."""

    description = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 3}))
    spec = SpecField()
    silos = SiloChoiceField(queryset=None, required=False)

    def __init__(self, *args: Any, silos: QuerySet[Silo], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["silos"].queryset = silos


class _DecisionForm(ServiceErrorsMixin, forms.Form):
    """Common fields of approve and reject: the reviewed hash and the organisation acted for."""

    plan_hash = forms.CharField(widget=forms.HiddenInput, max_length=64)
    organization = forms.ModelChoiceField(
        queryset=None,
        required=False,
        empty_label=None,
        help_text="The organisation you decide for.",
    )

    def __init__(self, *args: Any, organizations: QuerySet[Organization], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["organization"]
        field.queryset = organizations
        if len(organizations) <= 1:
            field.widget = forms.HiddenInput()
            field.initial = organizations[0].pk if organizations else None


class PlanApproveForm(_DecisionForm):
    """Approve the version whose hash the reviewer saw."""


class PlanRejectForm(_DecisionForm):
    """Reject the version whose hash the reviewer saw, with a reason."""

    reason = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 3}),
        max_length=2000,
        help_text="Why: the proposer and the audit log will read it.",
    )


class JsonObjectText(forms.CharField):
    """A JSON object typed or pasted as text; cleans to a dict, with the parser's line and
    column."""

    widget = forms.Textarea(attrs={"rows": 6, "spellcheck": "false", "class": "code"})

    def to_python(self, value: Any) -> Any:
        text = super().to_python(value)
        if not text:
            return text
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValidationError(
                f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})",
                code="invalid_json",
            ) from exc
        if not isinstance(data, dict):
            raise ValidationError("must be a JSON object {...}", code="not_object")
        return data


class ModelUploadForm(ServiceErrorsMixin, forms.Form):
    """A model trained elsewhere, uploaded for evaluation plans: the rules (spec, schema,
    preprocessing, weights) live in ``federation.services.uploaded_models``."""

    name = forms.CharField(max_length=200, strip=True)
    description = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 2}))
    model = JsonObjectText(
        label="Model spec",
        initial='{"kind": "logistic_regression"}',
        help_text="A plan's model section (docs/plan-spec.md).",
    )
    schema = JsonObjectText(
        label="Dataset schema", help_text="The columns, target and sensitive attributes it reads."
    )
    preprocessing = JsonObjectText(
        label="Fitted preprocessing",
        help_text="Its numeric means and standard deviations and category lists "
        "(fedcore.tabular.merge_statistics' form).",
    )
    weights = forms.FileField(
        label="Weights (.safetensors)",
        help_text="Saved with safetensors.torch.save_file(model.state_dict(), path); a pickle or "
        "torch.save file is refused.",
    )
    error_fields = {"model.kind": "model"}
