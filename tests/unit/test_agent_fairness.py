"""The agent's fairness counts: the received global model's confusion counts per public group."""

from __future__ import annotations

import random

import numpy as np
import pytest

from clientagent.data import LocalData
from clientagent.trainer import INVALID_TASK, TaskError, handle_task
from fedcore import fairness, models, tabular, tensors, training
from tests.unit.test_agent_trainer import PLAN, SCHEMA, make_task, write_data

FAIR_PLAN = {**PLAN, "fairness": {"sensitive_attribute": "sex"}}
SEX_GROUPS = ["F", "M", "__missing__", "__other__"]


@pytest.fixture
def data(tmp_path) -> LocalData:
    return LocalData(write_data(tmp_path / "data.csv"))


def expected_counts(data: LocalData, task, plan, attribute: str, groups: list[str]):
    """What the site should count: the task's (global) model on the test split, by hand."""
    split = data.split(plan)
    test = data.arrays(split, task.fields["preprocessing"]).test
    schema = tabular.DatasetSchema.from_dict(plan["schema"])
    n_features = len(tabular.feature_names(schema, task.fields["preprocessing"]))
    model = models.build_model(plan["model"], n_features, seed=0)
    model.load_state_dict(tensors.decode_state_dict(task.payload))
    predicted = fairness.predictions_at(training.predict_proba(model, test.X))
    labels = np.where(np.isin(test.groups[attribute], groups), test.groups[attribute], "__other__")
    return fairness.group_counts(test.y, predicted, labels, groups=groups)


def test_update_carries_the_global_models_counts_for_every_public_group(data):
    task = make_task(data, plan=FAIR_PLAN)

    update = handle_task(task, data)

    counts = update.fields["fairness"]
    assert set(counts) == {"sex"}
    assert sorted(counts["sex"]) == sorted(SEX_GROUPS)  # absent groups released as zeros
    assert counts["sex"] == expected_counts(data, task, FAIR_PLAN, "sex", SEX_GROUPS)
    assert (
        counts["sex"]["__missing__"]
        == counts["sex"]["__other__"]
        == dict.fromkeys(fairness.CELLS, 0)
    )
    # The same held-out rows as the global metrics, counted once each.
    total = sum(sum(cells.values()) for cells in counts["sex"].values())
    assert total == update.fields["metrics"]["global"]["n"]


def test_without_a_fairness_section_no_counts_leave_the_site(data):
    update = handle_task(make_task(data), data)

    assert "fairness" not in update.fields


def test_a_category_the_statistics_never_published_counts_as_other(data):
    fitted = dict(make_task(data, plan=FAIR_PLAN).fields["preprocessing"])
    fitted["categories"] = {**fitted["categories"], "sex": ["F"]}  # "M" is not public
    schema = tabular.DatasetSchema.from_dict(SCHEMA)
    n_features = len(tabular.feature_names(schema, fitted))
    state = models.build_model(PLAN["model"], n_features, seed=1).state_dict()
    task = make_task(data, plan=FAIR_PLAN, state=state)
    task.fields["preprocessing"] = fitted

    counts = handle_task(task, data).fields["fairness"]["sex"]

    assert sorted(counts) == ["F", "__missing__", "__other__"]
    assert "M" not in counts
    n_men = int(np.sum(data.arrays(data.split(FAIR_PLAN), fitted).test.groups["sex"] == "M"))
    assert sum(counts["__other__"].values()) == n_men > 0


def test_boolean_attributes_report_true_false_and_missing(data):
    schema = {**SCHEMA, "sensitive": ["sex", "smoker"]}
    plan = {**FAIR_PLAN, "schema": schema}
    task = make_task(data, plan=plan)

    counts = handle_task(task, data).fields["fairness"]

    assert list(counts) == ["sex", "smoker"]
    assert sorted(counts["smoker"]) == ["__missing__", "false", "true"]
    groups = ["__missing__", "false", "true"]
    assert counts["smoker"] == expected_counts(data, task, plan, "smoker", groups)


def test_dp_counts_are_the_exact_counts_through_noisy_counts(data):
    plan = {**FAIR_PLAN, "fairness": {"sensitive_attribute": "sex", "dp_epsilon": 0.5}}
    task = make_task(data, plan=plan)

    update = handle_task(task, data, noise_source=random.Random(11))

    exact = expected_counts(data, task, plan, "sex", SEX_GROUPS)
    noisy = fairness.noisy_counts(exact, epsilon=0.5, groups=SEX_GROUPS, source=random.Random(11))
    assert update.fields["fairness"]["sex"] == noisy["counts"]
    assert update.fields["fairness"]["sex"] != exact  # scale-2 Laplace noise on 16 cells


def test_a_bad_fairness_section_is_an_invalid_task(data):
    plan = {**FAIR_PLAN, "fairness": {"sensitive_attribute": "sex", "dp_epsilon": -1}}

    with pytest.raises(TaskError) as info:
        handle_task(make_task(data, plan=plan), data)

    assert info.value.code == INVALID_TASK and "dp_epsilon" in info.value.reason


def test_public_groups_come_only_from_published_or_declared_labels():
    schema = tabular.DatasetSchema.from_dict(
        {
            "columns": [
                {"name": "age", "type": "numeric"},
                {"name": "sex", "type": "categorical"},
                {"name": "smoker", "type": "boolean"},
            ],
            "target": {"column": "y", "positive": ["1"]},
            "sensitive": ["sex", "smoker", "ethnicity", "region"],
        }
    )
    fitted = {"categories": {"sex": ["F", "M", "__missing__"]}}

    groups = fairness.public_groups(schema, fitted, {"ethnicity": ["a", "b"]})

    assert groups == {
        "sex": ["F", "M", "__missing__", "__other__"],
        "smoker": ["__missing__", "false", "true"],
        "ethnicity": ["__missing__", "__other__", "a", "b"],
    }  # "region" is not a feature and declares no groups: not reportable
    assert fairness.reported_attributes(schema) == ["sex", "smoker"]
