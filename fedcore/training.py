"""Local training and evaluation of a model for the plan's task, shared by the site agent and the
demo.

The task decides the output and the loss (:class:`Objective`): binary classification (one
logit, binary cross-entropy), multi-class classification (one logit per class, softmax
cross-entropy) or regression (one value, mean squared error or Huber loss).

Determinism without global state: mini-batch order comes from a private ``torch.Generator``
seeded with ``seed``; stochastic layers (dropout) draw from torch's global RNG, so training runs
inside ``torch.random.fork_rng`` seeded from the same seed, which restores the caller's global RNG
state afterwards. Thread counts are left to the caller (``torch.set_num_threads``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import nn

from fedcore import task_metrics
from fedcore.metrics import binary_metrics
from fedcore.training_options import OPTIMIZERS, REGRESSION_LOSSES

__all__ = [
    "BINARY",
    "OPTIMIZERS",
    "REGRESSION_LOSSES",
    "Objective",
    "TrainingError",
    "evaluate",
    "predict",
    "predict_proba",
    "train_local",
]

_PREDICT_CHUNK_ROWS = 65536


class TrainingError(ValueError):
    """Training cannot start (bad arguments) or diverged (non-finite loss)."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _features(X: ArrayLike | torch.Tensor) -> torch.Tensor:
    features = torch.as_tensor(X).detach().to(device="cpu", dtype=torch.float32)
    if features.ndim != 2:
        raise TrainingError(
            f"X must be a 2-D feature matrix (n, d), got shape {tuple(features.shape)}"
        )
    return features


@dataclass(frozen=True)
class Objective:
    """What a model's outputs mean and the loss it is trained with.

    ``task`` "binary" (``n_outputs`` 1, a logit), "multiclass" (``n_outputs`` = classes,
    logits; targets are class indices) or "regression" (``n_outputs`` 1, the value in the units
    the model learns, ``loss`` "mse" or "huber" with ``huber_delta``).
    """

    task: str = "binary"
    n_outputs: int = 1
    loss: str = "bce"
    huber_delta: float = 1.0

    def __post_init__(self) -> None:
        """Check the combination."""
        allowed = {"binary": ("bce",), "multiclass": ("cross_entropy",)}
        losses = allowed.get(self.task, REGRESSION_LOSSES)
        if self.task not in ("binary", "multiclass", "regression") or self.loss not in losses:
            raise TrainingError(f"no objective for task {self.task!r} with loss {self.loss!r}")
        outputs_ok = self.n_outputs >= 2 if self.task == "multiclass" else self.n_outputs == 1
        if not _is_int(self.n_outputs) or not outputs_ok:
            raise TrainingError(f"task {self.task!r} cannot have {self.n_outputs!r} outputs")
        if not _is_number(self.huber_delta) or self.huber_delta <= 0:
            raise TrainingError(f"huber_delta must be a number > 0, got {self.huber_delta!r}")

    @classmethod
    def for_task(
        cls, task: str, *, n_outputs: int = 1, loss: str | None = None, huber_delta: float = 1.0
    ) -> Objective:
        """The objective of a task; ``loss`` None is the task's own (regression: mse)."""
        if loss is None:
            loss = {"binary": "bce", "multiclass": "cross_entropy"}.get(task, "mse")
        return cls(task=task, n_outputs=n_outputs, loss=loss, huber_delta=huber_delta)

    def targets(self, y: ArrayLike | torch.Tensor, n: int) -> torch.Tensor:
        """The training targets as the loss takes them; TrainingError if they do not fit."""
        values = torch.as_tensor(y).detach().to(device="cpu").reshape(-1)
        if values.numel() != n:
            raise TrainingError(f"X has {n} rows but y has {values.numel()} labels")
        if self.task == "binary":
            labels = values.to(torch.float32)
            if not bool(((labels == 0) | (labels == 1)).all()):
                raise TrainingError("y must hold binary labels 0/1 (see tabular.transform)")
            return labels
        if self.task == "multiclass":
            codes = values.to(torch.float64)
            if not bool(((codes == codes.round()) & (codes >= 0) & (codes < self.n_outputs)).all()):
                raise TrainingError(
                    f"y must hold class indices 0..{self.n_outputs - 1} (see tabular.transform)"
                )
            return codes.to(torch.int64)
        targets = values.to(torch.float32)
        if not bool(torch.isfinite(targets).all()):
            raise TrainingError("y must hold finite regression targets")
        return targets

    def outputs(self, raw: torch.Tensor) -> torch.Tensor:
        """The model's raw output shaped for the loss: (n,) or (n, classes)."""
        return raw if self.task == "multiclass" else raw.reshape(-1)

    def loss_of(
        self,
        outputs: torch.Tensor,
        targets: torch.Tensor,
        *,
        weight: torch.Tensor | None = None,
        reduction: str = "mean",
    ) -> torch.Tensor:
        """The loss of a batch; with ``weight``, the mean of weight x loss over its rows."""
        per_row: torch.Tensor
        if self.task == "binary":
            per_row = nn.functional.binary_cross_entropy_with_logits(
                outputs, targets, reduction="none"
            )
        elif self.task == "multiclass":
            per_row = nn.functional.cross_entropy(outputs, targets, reduction="none")
        elif self.loss == "huber":
            per_row = nn.functional.huber_loss(
                outputs, targets, reduction="none", delta=self.huber_delta
            )
        else:
            per_row = nn.functional.mse_loss(outputs, targets, reduction="none")
        if weight is not None:
            per_row = per_row * weight
        return per_row.sum() if reduction == "sum" else per_row.mean()


BINARY = Objective()


class _Adam:
    """Adam (Kingma & Ba, 2015) with L2 weight decay, as torch.optim.Adam computes it.

    torch.optim's optimizers import torch._dynamo on construction: about 3 s of CPU per process,
    which every site agent would pay on its first round. These few lines give the same updates
    (tests/unit/test_training.py compares them step by step).
    """

    def __init__(
        self,
        params: list[nn.Parameter],
        *,
        lr: float,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.params, self.lr, self.weight_decay = params, lr, weight_decay
        self.beta1, self.beta2, self.eps = betas[0], betas[1], eps
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the gradients of the last step."""
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One Adam update of every parameter that has a gradient."""
        self.t += 1
        correction1 = 1 - self.beta1**self.t
        correction2 = 1 - self.beta2**self.t
        step_size = self.lr / correction1
        for p, m, v in zip(self.params, self.m, self.v, strict=True):
            if p.grad is None:
                continue
            grad = p.grad if self.weight_decay == 0 else p.grad.add(p, alpha=self.weight_decay)
            m.lerp_(grad, 1 - self.beta1)
            v.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
            denom = (v.sqrt() / math.sqrt(correction2)).add_(self.eps)
            p.addcdiv_(m, denom, value=-step_size)


class _SGD:
    """SGD with momentum and L2 weight decay, as torch.optim.SGD computes it (no dampening)."""

    def __init__(
        self,
        params: list[nn.Parameter],
        *,
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        self.params, self.lr, self.momentum, self.weight_decay = params, lr, momentum, weight_decay
        self.buffers: list[torch.Tensor | None] = [None] * len(params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the gradients of the last step."""
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One SGD update of every parameter that has a gradient."""
        for i, p in enumerate(self.params):
            if p.grad is None:
                continue
            grad = p.grad if self.weight_decay == 0 else p.grad.add(p, alpha=self.weight_decay)
            if self.momentum:
                buf = self.buffers[i]
                if buf is None:
                    buf = self.buffers[i] = grad.clone()
                else:
                    buf.mul_(self.momentum).add_(grad)
                grad = buf
            p.add_(grad, alpha=-self.lr)


def train_local(
    model: nn.Module,
    X: ArrayLike | torch.Tensor,
    y: ArrayLike | torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    optimizer: str = "adam",
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    seed: int = 0,
    on_batch: Callable[[int, int], None] | None = None,
    prox_mu: float = 0.0,
    prox_reference: Mapping[str, torch.Tensor] | None = None,
    steps: int | None = None,
    sample_weight: ArrayLike | torch.Tensor | None = None,
    objective: Objective = BINARY,
) -> dict[str, Any]:
    """Train ``model`` in place with the objective's loss and mini-batch shuffling.

    A fixed number of optimizer steps instead of epochs (``steps``; FLamby's "num_updates" and
    Flower's local-steps setting): the data is reshuffled at the start of each pass and training
    stops after exactly ``steps`` mini-batches, mid-pass if need be; ``epochs`` is then ignored.

    FedProx (Li et al., 2020, "Federated Optimization in Heterogeneous Networks"): with
    ``prox_mu > 0`` every step minimises ``BCE + prox_mu / 2 * ||w - w_ref||²`` over the trainable
    parameters, which keeps a site's model near the round's global model when sites' data
    differ. The server aggregates FedProx updates with plain FedAvg.

    Args:
        model: module mapping (n, d) float32 features to (n, objective.n_outputs) outputs,
            e.g. from ``fedcore.models.build_model``. Updated in place; its train/eval mode is
            restored.
        X: feature matrix (n, d), n >= 1 (numpy array or tensor; converted to float32).
        y: n targets: 0/1 labels (binary), class indices (multiclass), values (regression).
        epochs: passes over the data, >= 1 (ignored when ``steps`` is given).
        batch_size: rows per optimizer step, >= 1; the last batch of an epoch may be smaller.
        lr: learning rate, > 0.
        optimizer: "adam" or "sgd".
        momentum: SGD momentum in [0, 1); must be 0 with "adam".
        weight_decay: L2 penalty, >= 0.
        seed: seeds batch order and dropout; the same seed and data give the same model.
        on_batch: called as ``on_batch(step, total_steps)`` after each optimizer step, with
            ``step`` counting from 1 to ``total_steps`` (for progress bars).
        prox_mu: FedProx's μ, a finite number >= 0; 0 (the default) trains without the term.
        prox_reference: FedProx's ``w_ref``, parameter name (as in ``model.named_parameters()``)
            -> tensor, one for every trainable parameter, same shape. None uses the model's
            parameters as they are when the call starts: the global weights the agent has
            just loaded. Ignored when ``prox_mu`` is 0.
        steps: None (train ``epochs`` passes) or the exact number of optimizer steps, >= 1.
        sample_weight: None (every row weighs 1: the plain loss, unchanged) or one finite
            weight >= 0 per row. Each batch's loss is then the mean of weight x BCE over its
            rows (scikit-learn's ``sample_weight`` semantics), as the fairness mitigations
            need (:class:`fedcore.fairness_mitigation.ExampleWeights`: reweighing, reductions).
        objective: the task and its loss (default: binary cross-entropy on one logit).

    Returns:
        ``{"train_loss": example-weighted mean loss over the last epoch (with ``steps``: over
        the last full pass and the partial pass after it, or all steps if there are fewer than
        a pass), "epochs": passes started, "steps": int}``. ``train_loss`` is the data loss only, without the proximal
        term, so it compares across strategies (weighted when ``sample_weight`` is given).

    Raises:
        TrainingError: an argument is invalid, or the loss became NaN/Inf (lower ``lr``).
    """
    features = _features(X)
    n = features.shape[0]
    labels = objective.targets(y, n)
    if n == 0:
        raise TrainingError("cannot train on 0 rows; check the site's data and split")
    if steps is not None and (not _is_int(steps) or steps < 1):
        raise TrainingError(f"steps must be None or an integer >= 1, got {steps!r}")
    if steps is None and (not _is_int(epochs) or epochs < 1):
        raise TrainingError(f"epochs must be an integer >= 1, got {epochs!r}")
    if not _is_int(batch_size) or batch_size < 1:
        raise TrainingError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not _is_number(lr) or lr <= 0:
        raise TrainingError(f"lr must be a finite number > 0, got {lr!r}")
    if optimizer not in OPTIMIZERS:
        raise TrainingError(f"optimizer {optimizer!r} is not supported; allowed: adam, sgd")
    if not _is_number(momentum) or not 0.0 <= momentum < 1.0:
        raise TrainingError(f"momentum must be a number in [0, 1), got {momentum!r}")
    if optimizer == "adam" and momentum != 0.0:
        raise TrainingError(
            "momentum applies to optimizer 'sgd' only; set it to 0 or use optimizer 'sgd'"
        )
    if not _is_number(weight_decay) or weight_decay < 0:
        raise TrainingError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if not _is_int(seed):
        raise TrainingError(f"seed must be an integer, got {seed!r}")
    if not _is_number(prox_mu) or prox_mu < 0:
        raise TrainingError(f"prox_mu must be a finite number >= 0, got {prox_mu!r}")

    weights = _sample_weights(sample_weight, n)

    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    anchors = _prox_anchors(named, prox_reference) if prox_mu > 0 else []
    opt: _Adam | _SGD
    if optimizer == "adam":
        opt = _Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = _SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    order = torch.Generator().manual_seed(seed)
    steps_per_epoch = math.ceil(n / batch_size)
    if steps is not None:
        epochs = math.ceil(steps / steps_per_epoch)
    total_steps = epochs * steps_per_epoch if steps is None else steps
    step = 0
    epoch_loss = 0.0
    epoch_rows = 0
    was_training = model.training
    model.train()
    try:
        with torch.random.fork_rng(devices=[]):
            # Dropout masks come from the global RNG: seed it inside the fork (restored on exit).
            torch.manual_seed(seed)
            for epoch in range(1, epochs + 1):
                permutation = torch.randperm(n, generator=order)
                if step + steps_per_epoch <= total_steps or epoch == 1:
                    # A full pass follows (or the only, partial one): the loss restarts.
                    epoch_loss, epoch_rows = 0.0, 0
                for start in range(0, n, batch_size):
                    if step == total_steps:
                        break
                    index = permutation[start : start + batch_size]
                    opt.zero_grad(set_to_none=True)
                    outputs = objective.outputs(model(features[index]))
                    loss = objective.loss_of(
                        outputs,
                        labels[index],
                        weight=None if weights is None else weights[index],
                    )
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise TrainingError(
                            f"training diverged: loss is {value} at epoch {epoch}, step "
                            f"{step + 1}; lower lr (now {lr}) or check the features for "
                            "extreme values"
                        )
                    if anchors:
                        proximal = sum(
                            (p - anchor).square().sum()
                            for p, anchor in zip(params, anchors, strict=True)
                        )
                        # FedProx: pulls w towards w_ref; train_loss stays the data loss.
                        loss = loss + 0.5 * prox_mu * proximal
                    loss.backward()
                    opt.step()
                    epoch_loss += value * index.numel()
                    epoch_rows += index.numel()
                    step += 1
                    if on_batch is not None:
                        on_batch(step, total_steps)
    finally:
        model.train(was_training)
    return {"train_loss": epoch_loss / epoch_rows, "epochs": epochs, "steps": step}


def _sample_weights(weights: ArrayLike | torch.Tensor | None, n: int) -> torch.Tensor | None:
    """Per-row loss weights as float32, or None for the plain loss."""
    if weights is None:
        return None
    values = torch.as_tensor(weights).detach().to(device="cpu", dtype=torch.float32).reshape(-1)
    if values.numel() != n:
        raise TrainingError(f"X has {n} rows but sample_weight has {values.numel()} weights")
    if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
        raise TrainingError("sample_weight must hold finite weights >= 0")
    return values


def _prox_anchors(
    named: list[tuple[str, nn.Parameter]], reference: Mapping[str, torch.Tensor] | None
) -> list[torch.Tensor]:
    """FedProx reference tensors, one per trainable parameter (detached float copies)."""
    if reference is None:
        return [p.detach().clone() for _, p in named]
    if not isinstance(reference, Mapping):
        raise TrainingError(
            "prox_reference must map parameter names to tensors (e.g. the global state dict), "
            f"got {type(reference).__name__}"
        )
    anchors = []
    for name, p in named:
        if name not in reference:
            raise TrainingError(f"prox_reference has no tensor for parameter {name!r}")
        anchor = torch.as_tensor(reference[name]).detach()
        if tuple(anchor.shape) != tuple(p.shape):
            raise TrainingError(
                f"prox_reference[{name!r}] has shape {tuple(anchor.shape)}, the parameter "
                f"{tuple(p.shape)}"
            )
        if not bool(torch.isfinite(anchor).all()):
            raise TrainingError(f"prox_reference[{name!r}] holds NaN or Inf")
        anchors.append(anchor.to(device=p.device, dtype=p.dtype, copy=True))
    return anchors


def predict(
    model: nn.Module, X: ArrayLike | torch.Tensor, objective: Objective = BINARY
) -> np.ndarray:
    """What the model predicts for every row, as the task reads it.

    Args:
        model: module mapping (n, d) features to (n, objective.n_outputs) outputs; its
            train/eval mode is restored after the call.
        X: feature matrix (n, d).
        objective: the task.

    Returns:
        float64: (n,) probabilities of label 1 (binary), (n, classes) softmax probabilities
        (multiclass) or (n,) values in the units the model learns (regression).
    """
    features = _features(X)
    link: Callable[[torch.Tensor], torch.Tensor]
    if objective.task == "binary":
        link = lambda raw: torch.sigmoid(raw.reshape(-1).double())  # noqa: E731
    elif objective.task == "multiclass":
        link = lambda raw: torch.softmax(raw.double(), dim=1)  # noqa: E731
    else:
        link = lambda raw: raw.reshape(-1).double()  # noqa: E731
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            chunks = [
                link(model(features[start : start + _PREDICT_CHUNK_ROWS]))
                for start in range(0, features.shape[0], _PREDICT_CHUNK_ROWS)
            ]
    finally:
        model.train(was_training)
    if not chunks:
        shape = (0, objective.n_outputs) if objective.task == "multiclass" else (0,)
        return np.zeros(shape, dtype=np.float64)
    return torch.cat(chunks).numpy()


def predict_proba(model: nn.Module, X: ArrayLike | torch.Tensor) -> np.ndarray:
    """Return the predicted probability of the positive class for every row (binary task).

    Args:
        model: module mapping (n, d) features to (n, 1) logits; its train/eval mode is
            restored after the call.
        X: feature matrix (n, d).

    Returns:
        float64 array of shape (n,) with values in [0, 1].
    """
    return predict(model, X, BINARY)


def evaluate(
    model: nn.Module,
    X: ArrayLike | torch.Tensor,
    y: ArrayLike | torch.Tensor,
    objective: Objective = BINARY,
    *,
    target_scale: tuple[float, float] = (0.0, 1.0),
) -> dict[str, Any]:
    """Evaluate ``model`` on (X, y) with the metrics of its task.

    Args:
        model: module mapping (n, d) features to (n, objective.n_outputs) outputs.
        X: feature matrix (n, d).
        y: n targets as ``fedcore.tabular.transform`` gives them.
        objective: the task.
        target_scale: regression: ``(mean, std)`` the model's values and ``y`` are mapped back
            with (``fedcore.tabular.target_scale``), so the metrics are in the target's units.

    Returns:
        binary: ``{"auc", "accuracy", "loss", "n"}`` (see ``binary_metrics``); multiclass and
        regression: :func:`fedcore.task_metrics.multiclass_metrics` /
        :func:`fedcore.task_metrics.regression_metrics` of this site's rows.
    """
    if objective.task == "binary":
        return binary_metrics(np.asarray(y, dtype=np.float64).reshape(-1), predict_proba(model, X))
    predicted = predict(model, X, objective)
    if objective.task == "multiclass":
        return task_metrics.multiclass_metrics(
            np.asarray(y, dtype=np.float64).reshape(-1).astype(np.int64), predicted
        )
    mean, std = target_scale
    truth = mean + std * np.asarray(y, dtype=np.float64).reshape(-1)
    return task_metrics.regression_metrics(truth, mean + std * predicted)
