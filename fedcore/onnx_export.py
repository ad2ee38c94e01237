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

It uses torch.onnx's TorchScript exporter (``dynamo=False``), which needs the ``onnx`` package
(``pip install onnx``) and nothing else. The newer dynamo exporter would need ``onnxscript``
(which itself depends on ``onnx``), so ``onnx`` alone is the smaller requirement. Without it
:func:`export_onnx` raises :class:`OnnxUnavailable` naming the package.
"""

from __future__ import annotations

import importlib.util
import io
import warnings

import torch
from torch import nn

__all__ = [
    "INPUT_NAME",
    "OPSET",
    "OUTPUT_NAME",
    "OUTPUT_NAMES",
    "OnnxUnavailable",
    "available",
    "export_onnx",
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


class OnnxUnavailable(RuntimeError):
    """The Python package torch.onnx needs to serialise a model is not installed."""


def available() -> bool:
    """Whether this process can export (the ``onnx`` package is importable)."""
    return importlib.util.find_spec(REQUIRED_PACKAGE) is not None


def export_onnx(
    model: nn.Module, n_features: int, *, task: str = "binary", opset: int = OPSET
) -> bytes:
    """Serialise a model mapping (batch, n_features) features to its task's output as ONNX.

    Args:
        model: e.g. ``fedcore.models.build_model(...)`` with trained weights loaded. Exported
            in eval mode (dropout off); its mode is restored afterwards.
        n_features: width of the feature matrix.
        task: the plan's task (``schema.target.task``): names the output.
        opset: ONNX opset version.

    Returns:
        The ONNX model (protobuf bytes): input ``features`` (float32, ["batch", n_features]),
        output ``OUTPUT_NAMES[task]`` (float32, ["batch", outputs]).

    Raises:
        OnnxUnavailable: the ``onnx`` package is not installed.
    """
    if not available():
        raise OnnxUnavailable(
            "ONNX export needs the Python package 'onnx' on the server (pip install onnx): "
            "torch.onnx's TorchScript exporter serialises the graph with it"
        )
    output = OUTPUT_NAMES[task]
    example = torch.zeros(2, n_features, dtype=torch.float32)  # batch 2: no batch-1 special case
    buffer = io.BytesIO()
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            # torch >= 2.9 warns that the TorchScript exporter is the legacy one.
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (example,),
                buffer,
                dynamo=False,
                export_params=True,
                opset_version=opset,
                do_constant_folding=True,
                input_names=[INPUT_NAME],
                output_names=[output],
                dynamic_axes={INPUT_NAME: {0: "batch"}, output: {0: "batch"}},
            )
    finally:
        model.train(was_training)
    return buffer.getvalue()
