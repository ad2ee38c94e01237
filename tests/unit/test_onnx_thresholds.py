"""The ONNX export of a model with group thresholds (``postprocess``): its ``decision_probability``
equals ``ThresholdRules.positive_probability`` of the model's scores, for demographic parity
(randomised between two thresholds) and equalized odds (mixed with a constant), rows of a group
without a rule included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedcore import fairness_mitigation, onnx_export, training
from fedcore.models import build_model

onnxruntime = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


@pytest.mark.parametrize("constraint", ["demographic_parity", "equalized_odds"])
def test_the_exported_decisions_equal_the_servers_thresholded_decisions(constraint: str) -> None:
    rng = np.random.default_rng(0)
    n = 3000
    X = rng.normal(size=(n, 4)).astype(np.float32)
    a = rng.choice(["f", "m", "__missing__"], size=n, p=[0.4, 0.55, 0.05])
    y = (X[:, 0] + 0.8 * (a == "m") + rng.normal(size=n) > 0.5).astype(int)
    model = build_model({"kind": "logistic_regression"}, 4, seed=0)
    with torch.no_grad():
        model.linear.weight[:] = torch.tensor([[1.0, 0.3, -0.2, 0.1]])
    scores = training.predict_proba(model, X)
    grid = np.linspace(0, 1, 101)
    histograms = fairness_mitigation.score_histogram(scores, y, a, grid)
    rules = fairness_mitigation.threshold_rules(histograms, grid, constraint=constraint)
    session = onnxruntime.InferenceSession(onnx_export.export_onnx(model, 4, thresholds=rules))
    groups = onnx_export.threshold_groups(rules)
    labels = np.where(np.arange(n) % 50 == 0, "unseen", a)  # a group without a rule: never
    index = np.array([groups.index(g) if g in groups else len(groups) for g in labels])
    logit, decided = session.run(None, {"features": X, "group": index.astype(np.int64)})
    expected = rules.positive_probability(scores, labels)
    np.testing.assert_array_equal(decided, expected)
    assert not np.isin(expected, [0.0, 1.0]).all()  # some rows randomised: p0/p1 in the graph
    assert (decided[labels == "unseen"] == 0).all()
    np.testing.assert_allclose(logit[:, 0], np.log(scores / (1 - scores)), atol=1e-4)
