"""The site agent's side of the statistics pass: site.toml's min_category_count, values withheld
below it, undeclared values reported as 'other' in the log, noised numeric statistics."""

from __future__ import annotations

import logging

import pytest

from clientagent.config import ConfigError, load_config
from clientagent.data import LocalData
from clientagent.trainer import handle_stats_request
from tests.unit.test_agent_config import GOOD, write_site

SCHEMA = {
    "columns": [
        {"name": "age", "type": "numeric", "min": 0, "max": 120},
        {"name": "sex", "type": "categorical"},
    ],
    "target": {"column": "outcome", "positive": ["sick"]},
}
PLAN = {
    "model": {"kind": "logistic_regression"},
    "schema": SCHEMA,
    "training": {"rounds": 2, "local_epochs": 1, "batch_size": 16, "lr": 0.05},
    "evaluation": {"test_fraction": 0.25, "seed": 0},
}


def data_with(tmp_path, values: dict[str, int]) -> LocalData:
    rows = [
        f"{40 + i % 30},{value},{'sick' if i % 2 else 'healthy'}"
        for value, n in values.items()
        for i in range(n)
    ]
    path = tmp_path / "data.csv"
    path.write_text("age,sex,outcome\n" + "\n".join(rows) + "\n")
    return LocalData(path)


def request(plan=PLAN) -> dict:
    return {"run": 4, "plan_hash": "h", "plan": plan}


def test_site_toml_min_category_count_defaults_to_5_and_is_checked(tmp_path):
    assert load_config(write_site(tmp_path, GOOD)).policy.min_category_count == 5
    path = write_site(tmp_path, GOOD + "\n[policy]\nmin_category_count = 20\n")
    assert load_config(path).policy.min_category_count == 20

    with pytest.raises(ConfigError, match=r"\[policy\] min_category_count.*integer >= 1"):
        load_config(write_site(tmp_path, GOOD + "\n[policy]\nmin_category_count = 0\n"))


def test_values_below_the_sites_minimum_are_withheld_and_logged(tmp_path, caplog):
    data = data_with(tmp_path, {"F": 60, "M": 60, "rare": 12})

    with caplog.at_level(logging.INFO, logger="clientagent.trainer"):
        strict = handle_stats_request(request(), data, min_category_count=20)["stats"]
    lenient = handle_stats_request(request(), data, min_category_count=2)["stats"]

    assert set(strict["categories"]["sex"]) == {"F", "M"}
    assert "rare" in lenient["categories"]["sex"]
    assert "column 'sex': 1 of 3 values withheld" in caplog.text
    assert "rare" not in caplog.text  # the log names no withheld value either


def test_undeclared_values_are_not_sent_and_the_operator_is_told(tmp_path, caplog):
    declared = {
        **SCHEMA,
        "columns": [SCHEMA["columns"][0], {**SCHEMA["columns"][1], "categories": ["F", "M"]}],
    }
    data = data_with(tmp_path, {"F": 30, "M": 30, "X": 20})

    with caplog.at_level(logging.WARNING, logger="clientagent.trainer"):
        stats = handle_stats_request(request({**PLAN, "schema": declared}), data)["stats"]

    assert set(stats["categories"]["sex"]) == {"F", "M"}
    assert "of 'sex' that the schema's categories do not declare" in caplog.text


def test_a_plan_with_statistics_epsilon_gets_noised_numeric_statistics(tmp_path):
    data = data_with(tmp_path, {"F": 60, "M": 60})
    plan = {**PLAN, "privacy": {"statistics_epsilon": 1.0}}

    stats = handle_stats_request(request(plan), data)["stats"]

    assert set(stats["numeric"]["age"]) == {"count", "sum", "sum_sq"}
    assert stats["numeric"]["age"]["count"] != int(stats["numeric"]["age"]["count"])  # noised
