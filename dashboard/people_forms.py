"""Forms of onboarding: organisations, invitations, role changes, accepting an invitation, and a
steward's silo registration with its schema file.

They parse what the browser sends; the rules live in the services (``federation.services``),
whose ValidationError is put back on the fields with ``ServiceErrorsMixin.apply_service_errors``.
"""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.core.exceptions import ValidationError
from django.db.models import QuerySet

from dashboard.forms import ServiceErrorsMixin
from federation.models import Organization, Role

# A dataset schema is a few kilobytes; a file much larger than this is not one.
MAX_SCHEMA_BYTES = 256 * 1024


class OrganizationAddForm(ServiceErrorsMixin, forms.Form):
    """A consortium admin adds a member organisation."""

    name = forms.CharField(max_length=200, strip=True, label="Organisation name")
    kind = forms.ChoiceField(
        choices=Organization.Kind.choices, initial=Organization.Kind.OTHER, required=False
    )


class InvitationForm(ServiceErrorsMixin, forms.Form):
    """Invite someone by e-mail to a role in one of the consortium's organisations."""

    email = forms.CharField(max_length=254, strip=True, label="E-mail address")
    organization = forms.ModelChoiceField(queryset=None, empty_label=None)
    role = forms.ChoiceField(choices=Role.choices, initial=Role.DATA_SCIENTIST)
    days = forms.IntegerField(
        required=False,
        min_value=1,
        label="Days until the link expires",
        help_text="Empty: the server's default (QUORUM_INVITATION_DAYS, 7).",
    )

    def __init__(self, *args: Any, organizations: QuerySet[Organization], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["organization"].queryset = organizations


class RoleChangeForm(forms.Form):
    """A member's new role."""

    role = forms.ChoiceField(choices=Role.choices)


class AcceptForm(forms.Form):
    """A newcomer's username and password (``ask_username`` False: the password only)."""

    username = forms.CharField(max_length=150, strip=True, required=False)
    password1 = forms.CharField(
        label="Password",
        strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
    )
    password2 = forms.CharField(
        label="Password again",
        strip=False,
        widget=forms.PasswordInput(attrs={"autocomplete": "new-password"}),
    )
    error_fields = {"password": "password1"}

    def __init__(self, *args: Any, ask_username: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if ask_username:
            self.fields["username"].required = True
            self.fields["username"].widget.attrs["autocomplete"] = "username"
        else:
            del self.fields["username"]

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if data.get("password1") and data.get("password1") != data.get("password2"):
            self.add_error("password2", "the two passwords differ")
        return data

    def apply_service_errors(self, error: ValidationError) -> None:
        """Put the service's messages (username, password) on the fields."""
        for key, messages in error.message_dict.items():
            field = self.error_fields.get(key, key)
            for message in messages:
                self.add_error(field if field in self.fields else None, message)


class SchemaUploadField(forms.FileField):
    """A dataset schema as a JSON file; cleans to a dict, with the parser's line and column."""

    def to_python(self, data: Any) -> Any:
        upload = super().to_python(data)
        if upload is None:
            return None
        if upload.size > MAX_SCHEMA_BYTES:
            raise ValidationError(
                f"the file is {upload.size} bytes; a dataset schema is at most "
                f"{MAX_SCHEMA_BYTES} bytes (is it the data instead of its schema?)"
            )
        return parse_schema_json(upload.read(), "the file")


def parse_schema_json(raw: bytes | str, what: str) -> dict[str, Any]:
    """A schema's JSON text as a dict (ValidationError saying where the JSON breaks)."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        schema = json.loads(text)
    except UnicodeDecodeError:
        raise ValidationError(f"{what} is not UTF-8 text; upload the schema's JSON file") from None
    except json.JSONDecodeError as exc:
        raise ValidationError(
            f"{what} is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    if not isinstance(schema, dict):
        raise ValidationError(
            f'{what} must hold a JSON object: {{"columns": [...], "target": {{...}}, '
            '"sensitive": [...]}'
        )
    return schema


class SiloRegisterForm(ServiceErrorsMixin, forms.Form):
    """A data steward registers a silo of their organisation with its dataset schema."""

    organization = forms.ModelChoiceField(queryset=None, empty_label=None)
    name = forms.CharField(max_length=100, strip=True, label="Silo name")
    description = forms.CharField(required=False, widget=forms.Textarea(attrs={"rows": 2}))
    schema_file = SchemaUploadField(
        required=False,
        label="Dataset schema (JSON file)",
        help_text="schema.json as written by `quorum-agent init --data FILE.csv` at the site, "
        "after you reviewed it.",
    )
    schema_text = forms.CharField(
        required=False,
        label="…or paste the schema's JSON",
        widget=forms.Textarea(attrs={"rows": 8, "spellcheck": "false", "class": "code"}),
    )
    row_count = forms.IntegerField(min_value=0, max_value=2**31 - 1, label="Rows")
    location = forms.CharField(
        max_length=500, required=False, help_text="Where the data lives (free text)."
    )
    # The service names the schema problem "schema": it belongs under the upload.
    error_fields = {"schema": "schema_file"}

    def __init__(self, *args: Any, organizations: QuerySet[Organization], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        field = self.fields["organization"]
        field.queryset = organizations
        if len(organizations) == 1:
            field.initial = organizations[0].pk

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if self.errors.get("schema_file"):
            return data
        uploaded, pasted = data.get("schema_file"), (data.get("schema_text") or "").strip()
        if uploaded is not None and pasted:
            self.add_error("schema_text", "upload a file or paste the JSON, not both")
        elif uploaded is not None:
            data["schema"] = uploaded
        elif pasted:
            try:
                data["schema"] = parse_schema_json(pasted, "the pasted text")
            except ValidationError as exc:
                self.add_error("schema_text", exc)
        else:
            self.add_error(
                "schema_file",
                "a silo is registered with its dataset schema: upload the schema.json that "
                "`quorum-agent init --data FILE.csv` wrote, or paste it below",
            )
        return data
