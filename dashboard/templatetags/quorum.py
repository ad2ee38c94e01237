"""Template filters of the dashboard."""

from __future__ import annotations

import json
import re
from typing import Any

from django import template

from federation import fairness_outcome
from federation.models import Role

register = template.Library()


@register.filter
def as_json(value: Any) -> str:
    """A value as compact JSON text (dicts and lists as they are stored, not Python reprs)."""
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "), default=str)


_ROLE_CODES = re.compile(r"\b(" + "|".join(re.escape(code) for code in Role.values) + r")\b")


@register.filter
def role_names(message: Any) -> str:
    """A refusal's message with role codes (``consortium_admin``) as people read them
    ("Consortium admin"), first letter capitalised: for the 403 page."""
    text = _ROLE_CODES.sub(lambda m: str(Role(m.group(1)).label), str(message)).strip()
    text = text[:1].upper() + text[1:]
    return text if not text or text[-1] in ".!?" else text + "."


@register.filter
def epsilon(value: Any) -> str:
    """A projected or spent epsilon: "no DP" where a run spends none (a plan without
    differential privacy), rather than a 0 that reads like perfect privacy."""
    if not value:
        return "no DP"
    return f"{float(value):.4f}"


@register.filter
def fairness_warning(run: Any) -> dict[str, Any] | None:
    """The warning a run ended with when its final model exceeds a fairness limit (or None):
    federation.fairness_outcome.final_fairness_warning of its final evaluation."""
    return fairness_outcome.final_fairness_warning(getattr(run, "evaluation", None))
