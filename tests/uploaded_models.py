"""A model trained outside Quorum, as a consortium member would upload it: a torch logistic
regression fitted on pooled rows in-process, its preprocessing fitted on the same rows, its
weights saved with safetensors."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save as safetensors_save

from fedcore import tabular, tensors, training
from fedcore.models import build_model

LR = {"kind": "logistic_regression"}


def fit_logistic_regression(
    frames: Sequence[pd.DataFrame], schema: dict[str, Any]
) -> tuple[dict[str, Any], bytes]:
    """The fitted preprocessing and the safetensors weights of a logistic regression fitted
    (L-BFGS on the log loss) on the union of the frames."""
    parsed = tabular.DatasetSchema.from_dict(schema)
    valid = [tabular.validate_frame(frame, parsed) for frame in frames]
    fitted = tabular.merge_statistics(
        [tabular.local_statistics(frame, parsed) for frame in valid], parsed
    )
    rows = tabular.transform(pd.concat(valid, ignore_index=True), parsed, fitted)
    model = build_model(LR, int(rows.X.shape[1]), seed=0)
    X, y = torch.from_numpy(rows.X), torch.from_numpy(rows.y.astype(np.float32))
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=200)
    loss_fn = torch.nn.BCEWithLogitsLoss()

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_fn(model(X).squeeze(1), y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return fitted, safetensors_save({k: v.contiguous() for k, v in model.state_dict().items()})


def scores(
    frames: Sequence[pd.DataFrame], schema: dict[str, Any], fitted: dict[str, Any], weights: bytes
) -> tuple[np.ndarray, np.ndarray]:
    """The labels of the union of the frames and the uploaded model's probabilities on them."""
    parsed = tabular.DatasetSchema.from_dict(schema)
    rows = tabular.transform(pd.concat(frames, ignore_index=True), parsed, fitted)
    model = build_model(LR, int(rows.X.shape[1]), seed=0)
    model.load_state_dict(tensors.decode_state_dict(weights))
    probs = training.predict_proba(model, rows.X).astype(np.float64)
    return rows.y.astype(np.float64), probs
