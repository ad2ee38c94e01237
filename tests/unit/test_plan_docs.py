"""docs/plan-spec.md stays true to the plan language: its key table is the generated one, its
examples are the demo's plans and parse; the JSON Schema accepts them and refuses typos."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from fedcore.plan import json_schema, key_table, parse_plan
from federation.demo import scenarios

DOC = Path(__file__).resolve().parents[2] / "docs" / "plan-spec.md"


def examples() -> dict[str, dict[str, Any]]:
    text = DOC.read_text()
    found = re.findall(r"^## Example: (\w+).*?```json\n(.*?)```", text, re.S | re.M)
    return {name: json.loads(body) for name, body in found}


def test_the_key_table_in_the_doc_is_the_generated_one() -> None:
    text = DOC.read_text()
    table = text.split("<!-- key-table:start -->\n")[1].split("<!-- key-table:end -->")[0]

    assert table == key_table(), "regenerate the table with fedcore.plan.key_table()"


def test_the_doc_has_the_healthcare_and_finance_examples_and_they_parse() -> None:
    found = examples()

    assert set(found) == {"healthcare", "finance"}
    for spec in found.values():
        parse_plan(spec)  # raises PlanError naming every problem
        Draft202012Validator(json_schema()).validate(spec)


@pytest.mark.parametrize("name", ["healthcare", "finance"])
def test_the_examples_are_the_demo_scenarios_plans(name: str) -> None:
    assert examples()[name] == getattr(scenarios, name)(0).plan


def test_the_json_schema_is_valid_and_refuses_what_the_parser_refuses_per_key() -> None:
    schema = json_schema()
    Draft202012Validator.check_schema(schema)
    validator = Draft202012Validator(schema)
    spec = examples()["finance"]

    for broken in (
        {**spec, "training": {**spec["training"], "zz": 1}},
        {**spec, "privacy": {"mode": "laplace"}},
        {**spec, "training": {**spec["training"], "momentum": 1.0}},
        {**spec, "secagg": {"threshold": 1}},
        {**spec, "typo": True},
    ):
        assert not validator.is_valid(broken)
        with pytest.raises(ValueError):  # PlanError
            parse_plan(broken)
