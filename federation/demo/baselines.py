"""Baselines for the demo: the federated model against centralised and local-only training.

The demo computes these comparisons itself; they are not part of the federation. They
reproduce exactly what the federation does with the data:

- each site's rows are validated (``validate_frame``) and then split 80/20 with
  ``split_holdout``, using the plan's ``evaluation`` settings, as the site agent does;
- the preprocessing is fitted the federated way, by ``merge_statistics`` over every site's
  ``local_statistics`` of its train split, in the scenario's site order;
- every model is evaluated on the union of the sites' held-out splits.

Training budget of the baselines: the centralised model (trained on the pooled train rows of
all sites) and each local-only model (trained on one site's train rows) get
``rounds * local_epochs`` epochs in one ``train_local`` call, with the plan's batch size,
optimizer, learning rate, momentum and weight decay. That is as many passes over the data as
every site makes during the federation. Their initial weights come from
``build_model(seed=seed)`` and their batch order from ``train_local(seed=seed)``. Given the same
``seed``, every result is deterministic.

No Django import here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from fedcore import tabular, tensors, training
from fedcore.models import build_model
from fedcore.plan import parse_plan
from federation.demo.scenarios import Scenario

__all__ = [
    "Prepared",
    "evaluate_comparison",
    "federated_preprocessing",
    "held_out_union",
    "prepare",
    "site_splits",
    "train_baseline",
]


def _schema(plan: Mapping[str, Any]) -> tabular.DatasetSchema:
    """Parse the plan's dataset schema."""
    return tabular.DatasetSchema.from_dict(plan["schema"])


def site_splits(scenario: Scenario) -> dict[str, tuple[pd.DataFrame, pd.DataFrame]]:
    """Validate and split every site's rows as its agent does: site -> (train, test)."""
    schema = _schema(scenario.plan)
    evaluation = scenario.plan.get("evaluation", {})
    fraction = float(evaluation.get("test_fraction", 0.2))
    seed = int(evaluation.get("seed", 0))
    splits = {}
    for site, frame in scenario.sites.items():
        typed = tabular.validate_frame(frame, schema)
        splits[site] = tabular.split_holdout(typed, schema, test_fraction=fraction, seed=seed)
    return splits


def held_out_union(
    scenario: Scenario, splits: Mapping[str, tuple[pd.DataFrame, pd.DataFrame]] | None = None
) -> pd.DataFrame:
    """Concatenate every site's held-out split (validated rows), in site order."""
    splits = site_splits(scenario) if splits is None else splits
    return pd.concat([test for _, test in splits.values()], ignore_index=True)


def federated_preprocessing(
    scenario: Scenario, splits: Mapping[str, tuple[pd.DataFrame, pd.DataFrame]] | None = None
) -> dict[str, Any]:
    """Fit the preprocessing as the federation does: merged statistics of the train splits."""
    schema = _schema(scenario.plan)
    splits = site_splits(scenario) if splits is None else splits
    stats = [tabular.local_statistics(train, schema) for train, _ in splits.values()]
    return tabular.merge_statistics(stats, schema)


@dataclass
class Prepared:
    """A scenario's arrays: per-site train data and the held-out union, one preprocessing."""

    fitted: dict[str, Any]
    train: dict[str, tabular.TabularData]
    test: tabular.TabularData

    @property
    def n_features(self) -> int:
        """Width of the feature matrices."""
        return int(self.test.X.shape[1])

    def pooled_train(self) -> tuple[np.ndarray, np.ndarray]:
        """Every site's train rows stacked in site order: (X, y)."""
        X = np.concatenate([data.X for data in self.train.values()])
        y = np.concatenate([data.y for data in self.train.values()])
        return X, y


def prepare(scenario: Scenario, fitted_preprocessing: Mapping[str, Any] | None = None) -> Prepared:
    """Split, fit (unless given) and transform a scenario's data."""
    schema = _schema(scenario.plan)
    splits = site_splits(scenario)
    fitted = (
        federated_preprocessing(scenario, splits)
        if fitted_preprocessing is None
        else dict(fitted_preprocessing)
    )
    train = {site: tabular.transform(tr, schema, fitted) for site, (tr, _) in splits.items()}
    test = tabular.transform(held_out_union(scenario, splits), schema, fitted)
    return Prepared(fitted=fitted, train=train, test=test)


def objective(plan: Mapping[str, Any]) -> training.Objective:
    """The plan's task and loss (``fedcore.plan``: what the agents train with)."""
    return parse_plan(dict(plan)).objective()


def train_baseline(
    plan: Mapping[str, Any], X: np.ndarray, y: np.ndarray, *, seed: int
) -> torch.nn.Module:
    """Train the plan's model on (X, y) for rounds * local_epochs epochs in one go."""
    settings = plan["training"]
    task = objective(plan)
    model = build_model(plan["model"], int(X.shape[1]), n_outputs=task.n_outputs, seed=seed)
    training.train_local(
        model,
        X,
        y,
        epochs=int(settings["rounds"]) * int(settings["local_epochs"]),
        batch_size=int(settings["batch_size"]),
        lr=float(settings["lr"]),
        optimizer=settings.get("optimizer", "adam"),
        momentum=float(settings.get("momentum", 0.0)),
        weight_decay=float(settings.get("weight_decay", 0.0)),
        seed=seed,
        objective=task,
    )
    return model


# The figures the comparison reports per task (docs/tasks.md).
TASK_SCORES: dict[str, tuple[str, ...]] = {
    "binary": ("auc", "accuracy"),
    "multiclass": ("accuracy", "macro_f1"),
    "regression": ("rmse", "mae", "r2"),
}


def _scores(
    model: torch.nn.Module,
    data: tabular.TabularData,
    plan: Mapping[str, Any] | None = None,
    fitted: Mapping[str, Any] | None = None,
) -> dict[str, float]:
    """The task's figures of a model on a data set: AUC and accuracy (at 0.5) for a binary
    plan, accuracy and macro F1 for a multi-class one, RMSE, MAE and R2 (in the target's
    units) for a regression one."""
    task = training.BINARY if plan is None else objective(plan)
    scale = (0.0, 1.0)
    if task.task == "regression" and plan is not None:
        scale = tabular.target_scale(_schema(plan), fitted or {})
    metrics = training.evaluate(model, data.X, data.y, task, target_scale=scale)
    return {key: float(metrics[key]) for key in TASK_SCORES[task.task]}


def load_state(
    plan: Mapping[str, Any], state: Mapping[str, torch.Tensor], n_features: int
) -> torch.nn.Module:
    """Build the plan's model and load a state dict into it (strict keys, shapes and dtypes)."""
    model = build_model(plan["model"], n_features, n_outputs=objective(plan).n_outputs, seed=0)
    tensors.check_compatible(state, model.state_dict())
    model.load_state_dict(dict(state), strict=True)
    return model


def compare(
    plan: Mapping[str, Any],
    prepared: Prepared,
    federated_state: Mapping[str, torch.Tensor],
    *,
    seed: int,
) -> dict[str, Any]:
    """Score the federated model and train and score the baselines on prepared arrays."""
    federated = load_state(plan, federated_state, prepared.n_features)
    X, y = prepared.pooled_train()
    centralized = train_baseline(plan, X, y, seed=seed)
    fitted = prepared.fitted
    local_only = {
        site: _scores(train_baseline(plan, data.X, data.y, seed=seed), prepared.test, plan, fitted)
        for site, data in prepared.train.items()
    }
    return {
        "task": objective(plan).task,
        "federated": _scores(federated, prepared.test, plan, fitted),
        "centralized": _scores(centralized, prepared.test, plan, fitted),
        "local_only": local_only,
    }


def evaluate_comparison(
    scenario: Scenario,
    fitted_preprocessing: Mapping[str, Any],
    federated_state_dict: Mapping[str, torch.Tensor],
    *,
    seed: int,
    threads: int | None = 1,
) -> dict[str, Any]:
    """Federated vs centralised vs local-only AUC and accuracy on the union of held-out splits.

    Args:
        scenario: the demo scenario (its sites' rows and its plan).
        fitted_preprocessing: the preprocessing the federation used (the run's merged
            statistics; ``federated_preprocessing(scenario)`` computes the same).
        federated_state_dict: the final global model's weights.
        seed: seeds the baselines' initial weights and batch order.
        threads: torch intra-op threads while training the baselines (restored afterwards);
            None leaves the setting alone. One thread is the fastest for these small models,
            about 4x faster than two on a 2-core machine, and it makes the results independent
            of the machine's core count.

    Returns:
        ``{"task", "federated": {...}, "centralized": {...}, "local_only": {site: {...}}}``
        with the task's figures (:data:`TASK_SCORES`: binary ``auc``, ``accuracy``;
        multiclass ``accuracy``, ``macro_f1``; regression ``rmse``, ``mae``, ``r2``), all
        measured on the union of the sites'
        held-out splits. The centralised model trains on the pooled train rows of all sites,
        each local-only model on one site's train rows. Both train for
        ``rounds * local_epochs`` epochs with the plan's optimizer settings.
    """
    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        prepared = prepare(scenario, fitted_preprocessing)
        return compare(scenario.plan, prepared, federated_state_dict, seed=seed)
    finally:
        torch.set_num_threads(previous)
