"""ONNX export of a plan's model, for deployment at a site without Quorum or PyTorch.

The exported graph maps an input ``features`` of shape (batch, n_features), float32, in the order
of ``fedcore.tabular.feature_names`` and transformed by the run's fitted preprocessing
(``fedcore.tabular.transform``), to the output of the plan's task (:data:`OUTPUT_NAMES`):

* binary: ``logit``, (batch, 1); the probability of the positive class is ``sigmoid(logit)``;
* multiclass: ``logits``, (batch, classes) in the order of ``schema.target.classes``; the
  class probabilities are ``softmax(logits)``;
* regression: ``prediction``, (batch, 1), in the units the model learnt: with a standardised
  target the value is ``mean + std * prediction`` (the fitted preprocessing's ``target``).

The batch dimension is dynamic; opset 17.

A ``postprocess`` plan's final model carries its group thresholds (the model version's
``fedcore.fairness_mitigation.ThresholdRules``) in the graph: :func:`export_onnx` with
``thresholds`` adds an input ``group`` (int64, (batch,): the row's index in
:func:`threshold_groups`, the rules' group labels sorted; any other index, e.g. the list's length,
is a group without a rule) and an output ``decision_probability`` (float64, (batch,)): P(decision
= 1) of the row under its group's rule, exactly as the server applies it
(``ThresholdRules.positive_probability``: sigmoid of the logit in float64, binned to the nearest
grid point, ties up; the rule's two thresholds, their probabilities and, for equalized odds, its
mix with a constant; 0 for a group without a rule, as fairlearn). A deterministic rule gives 0 or
1; a randomised one the probability to draw the decision with. The group labels are also in the
graph's metadata (``quorum.threshold_groups``, JSON).

It uses torch.onnx's TorchScript exporter (``dynamo=False``), which needs the ``onnx`` package
(``pip install onnx``) and nothing else. The newer dynamo exporter would need ``onnxscript``
(which itself depends on ``onnx``), so ``onnx`` alone is the smaller requirement. Without it
:func:`export_onnx` raises :class:`OnnxUnavailable` naming the package.
"""

from __future__ import annotations

import importlib.util
import io
import json
import math
import warnings
from typing import Any

import torch
from torch import nn

__all__ = [
    "DECISION_NAME",
    "GROUP_INPUT_NAME",
    "INPUT_NAME",
    "OPSET",
    "OUTPUT_NAME",
    "OUTPUT_NAMES",
    "OnnxUnavailable",
    "available",
    "export_onnx",
    "threshold_groups",
]

OPSET = 17
INPUT_NAME = "features"
OUTPUT_NAME = "logit"
OUTPUT_NAMES: dict[str, str] = {
    "binary": OUTPUT_NAME,
    "multiclass": "logits",
    "regression": "prediction",
}
REQUIRED_PACKAGE = "onnx"
GROUP_INPUT_NAME = "group"
DECISION_NAME = "decision_probability"
GROUPS_METADATA = "quorum.threshold_groups"


def threshold_groups(thresholds: Any) -> list[str]:
    """The group labels of a model version's threshold rules, in the order of the ``group``
    input's indices (sorted)."""
    return sorted(str(group) for group in thresholds.rules)


class _Thresholded(nn.Module):
    """The model and its group thresholds: (features, group) -> (logit, P(decision = 1))."""

    def __init__(self, model: nn.Module, thresholds: Any) -> None:
        super().__init__()
        self.model = model
        groups = threshold_groups(thresholds)
        self.register_buffer("points", torch.tensor(thresholds.grid, dtype=torch.float64))
        rows = []
        for group in groups:
            rule = thresholds.rules[group]
            rows.append(
                [rule.threshold0, rule.p0, rule.threshold1, rule.p1, rule.p_ignore, rule.constant]
            )
        rows.append([math.inf, 0.0, math.inf, 0.0, 0.0, 0.0])  # no rule: never positive
        self.register_buffer("rules", torch.tensor(rows, dtype=torch.float64))
        self.n_groups = len(groups)

    def forward(self, features: torch.Tensor, group: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logit = self.model(features)
        score = torch.sigmoid(logit.reshape(-1).to(torch.float64))
        points = self.points
        last = points.shape[0] - 1
        # numpy's searchsorted(points, score, "left"): how many points lie below the score
        upper = (points.unsqueeze(0) < score.unsqueeze(1)).to(torch.int64).sum(dim=1)
        upper = torch.clamp(upper, 1, last)
        lower = upper - 1
        high, low = points[upper], points[lower]
        binned = torch.where((high - score) <= (score - low), high, low)
        known = (group >= 0) & (group < self.n_groups)
        index = torch.where(known, group, torch.full_like(group, self.n_groups))
        rule = self.rules[index]
        base = rule[:, 1] * (binned > rule[:, 0]).to(torch.float64) + rule[:, 3] * (
            binned > rule[:, 2]
        ).to(torch.float64)
        decision = rule[:, 4] * rule[:, 5] + (1.0 - rule[:, 4]) * base
        return logit, decision


class OnnxUnavailable(RuntimeError):
    """The Python package torch.onnx needs to serialise a model is not installed."""


def available() -> bool:
    """Whether this process can export (the ``onnx`` package is importable)."""
    return importlib.util.find_spec(REQUIRED_PACKAGE) is not None


def export_onnx(
    model: nn.Module,
    n_features: int,
    *,
    task: str = "binary",
    opset: int = OPSET,
    thresholds: Any = None,
) -> bytes:
    """Serialise a model mapping (batch, n_features) features to its task's output as ONNX.

    Args:
        model: e.g. ``fedcore.models.build_model(...)`` with trained weights loaded. Exported
            in eval mode (dropout off); its mode is restored afterwards.
        n_features: width of the feature matrix.
        task: the plan's task (``schema.target.task``): names the output.
        opset: ONNX opset version.
        thresholds: a binary model's group thresholds (``ThresholdRules``): adds the input
            ``group`` and the output ``decision_probability`` (module docstring).

    Returns:
        The ONNX model (protobuf bytes): input ``features`` (float32, ["batch", n_features]),
        output ``OUTPUT_NAMES[task]`` (float32, ["batch", outputs]); with thresholds also
        input ``group`` (int64, ["batch"]) and output ``decision_probability`` (float64,
        ["batch"]).

    Raises:
        OnnxUnavailable: the ``onnx`` package is not installed.
    """
    if not available():
        raise OnnxUnavailable(
            "ONNX export needs the Python package 'onnx' on the server (pip install onnx): "
            "torch.onnx's TorchScript exporter serialises the graph with it"
        )
    if thresholds is not None and task != "binary":
        raise ValueError(f"group thresholds apply to a binary model, not task {task!r}")
    output = OUTPUT_NAMES[task]
    example = torch.zeros(2, n_features, dtype=torch.float32)  # batch 2: no batch-1 special case
    module: nn.Module = model
    inputs: tuple[torch.Tensor, ...] = (example,)
    input_names, output_names = [INPUT_NAME], [output]
    axes = {INPUT_NAME: {0: "batch"}, output: {0: "batch"}}
    if thresholds is not None:
        module = _Thresholded(model, thresholds)
        inputs = (example, torch.zeros(2, dtype=torch.int64))
        input_names.append(GROUP_INPUT_NAME)
        output_names.append(DECISION_NAME)
        axes.update({GROUP_INPUT_NAME: {0: "batch"}, DECISION_NAME: {0: "batch"}})
    buffer = io.BytesIO()
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            # torch >= 2.9 warns that the TorchScript exporter is the legacy one.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                module,
                inputs,
                buffer,
                dynamo=False,
                export_params=True,
                opset_version=opset,
                do_constant_folding=True,
                input_names=input_names,
                output_names=output_names,
                dynamic_axes=axes,
            )
    finally:
        model.train(was_training)
    if thresholds is None:
        return buffer.getvalue()
    import onnx  # available(): checked above

    graph = onnx.load_from_string(buffer.getvalue())
    entry = graph.metadata_props.add()
    entry.key, entry.value = GROUPS_METADATA, json.dumps(threshold_groups(thresholds))
    return graph.SerializeToString()
