"""Sample-level DP at a site: DP-SGD (Abadi et al., 2016) on Opacus's per-sample gradients.

Each step draws a Poisson sample of the rows (every row independently with probability
``sample_rate = min(1, batch_size / rows)``), clips every row's gradient to L2 norm
``max_grad_norm``, sums, adds ``N(0, (noise_multiplier * max_grad_norm)^2)`` and divides by the
expected batch size ``sample_rate * rows``. An epoch is ``ceil(rows / batch_size)`` steps, empty
batches included (skipping one would reveal that it was empty). Epsilon is computed by
:func:`fedcore.privacy.accounting.epsilon` from ``(noise_multiplier, sample_rate, steps)``: the
same function, and so the same number, the server's ledger and the plan's projection use.

Opacus's building blocks, not ``PrivacyEngine.make_private``: the model is wrapped in Opacus's
``GradSampleModule`` (per-sample gradients, after ``ModuleValidator`` checks it) and the
optimizer in a subclass of Opacus's ``DPOptimizer`` (per-sample clipping, flat). Two things
``make_private`` would do differently, both on purpose:

- Randomness. Opacus draws noise and the Poisson sample from torch's generator (Mersenne
  Twister, 64-bit seed: not cryptographic; its output can be predicted and the noise removed).
  Its ``secure_mode=True`` raises ImportError without ``torchcsprng``, whose last release
  (0.2.1, 2021) targets torch 1.8; Opacus's own secure-mode tests are skipped for that reason.
  Instead both the noise and the sampling come from
  :class:`fedcore.privacy.client_dp.NoiseSource` (ChaCha20 keyed from the OS), and the noise is
  the sum of four Gaussians halved against floating-point attacks, as Opacus's secure mode
  does. What remains outside this module: dropout masks and weight initialisation use torch's
  global generator, which does not touch the privacy guarantee.
- Sample rate. ``make_private`` derives ``1 / len(data_loader)`` (``1/16`` for 1000 rows in
  batches of 64) where the plan's projection uses ``batch_size / rows`` (``0.064``); here the
  sampler uses exactly the rate the projection and the ledger account for.

Only the model's update is protected. The training loss, the number of rows and anything else
computed from the data without noise fall outside the guarantee: do not publish them as if
they were private.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from numpy.typing import ArrayLike
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from opacus.validators.errors import UnsupportedError
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from fedcore.privacy.accounting import epsilon as accounted_epsilon
from fedcore.privacy.accounting import resolve_noise_multiplier
from fedcore.privacy.client_dp import NoiseSource
from fedcore.training import BINARY, Objective, TrainingError

__all__ = ["DP_OPTIMIZERS", "PrivateTraining", "make_private", "train_dp"]

DP_OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
# torch warns on every backward when a hooked module's inputs do not require grad (the first
# layer sees the data): harmless for per-sample gradients.
_HOOK_WARNING = "Full backward hook is firing when gradients are computed"


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _keyed_source(seed: int | None, purpose: bytes) -> NoiseSource:
    if seed is None:
        return NoiseSource()
    # Reproducible, hence not private: anyone who knows the seed can redo the noise.
    digest = hashlib.sha256(b"quorum/dpsgd/" + purpose + b"/" + str(seed).encode()).digest()
    return NoiseSource(key=digest)


class _PoissonSampler(Sampler[torch.Tensor]):
    """Yields ``steps`` index tensors; each row is in each batch with probability ``rate``."""

    def __init__(self, rows: int, rate: float, steps: int, source: NoiseSource) -> None:
        self.rows, self.rate, self.steps, self.source = rows, rate, steps, source

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[torch.Tensor]:
        for _ in range(self.steps):
            yield self._batch()

    def _batch(self) -> torch.Tensor:
        if self.rate >= 1.0:
            return torch.arange(self.rows)
        # Gaps between selected rows are geometric (Bernoulli trials until a success):
        # gap = 1 + floor(ln(u) / ln(1 - q)) with u uniform in (0, 1]. About rate * rows draws
        # per batch instead of one per row, with the same distribution as per-row coin flips.
        log_keep = math.log1p(-self.rate)
        chunks: list[torch.Tensor] = []
        position = -1
        while True:
            draws = int(self.rate * self.rows * 1.1) + 16
            u = 1.0 - self.source.uniform(draws)
            gaps = torch.floor(torch.log(u) / log_keep).to(torch.int64) + 1
            positions = position + torch.cumsum(gaps, dim=0)
            inside = positions[positions < self.rows]
            chunks.append(inside)
            if inside.numel() < positions.numel():
                return torch.cat(chunks)
            position = int(positions[-1])


class _SecureNoiseDPOptimizer(DPOptimizer):
    """Opacus's DPOptimizer with its Gaussian noise drawn from a NoiseSource."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, *, source: NoiseSource, **kwargs: Any
    ) -> None:
        super().__init__(optimizer, **kwargs)
        self.noise_source = source

    def add_noise(self) -> None:
        """Add ``N(0, (noise_multiplier * max_grad_norm)^2)`` to each summed clipped gradient."""
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            summed = p.summed_grad
            noise = self.noise_source.gaussian(tuple(summed.shape), std, dtype=summed.dtype)
            p.grad = (summed + noise.to(summed.device)).view_as(p)


@dataclass
class PrivateTraining:
    """A model, optimizer and data loader set up for DP-SGD, with their privacy parameters.

    Train with ``module`` (forward), a loss summed over the batch (``reduction="sum"``: the
    optimizer divides by the expected batch size), ``optimizer.zero_grad()``,
    ``loss.backward()``, ``optimizer.step()`` for every batch of ``data_loader``; then call
    :meth:`close`.
    """

    module: GradSampleModule
    optimizer: DPOptimizer
    data_loader: DataLoader[Any]
    noise_multiplier: float
    sample_rate: float
    steps_per_epoch: int
    epochs: int
    max_grad_norm: float
    delta: float
    accountant: str

    def epsilon(self, steps: int) -> float:
        """Return the epsilon spent after ``steps`` optimizer steps.

        Args:
            steps: steps taken, >= 1 (``epochs * steps_per_epoch`` for a full run).
        """
        return accounted_epsilon(
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=steps,
            delta=self.delta,
            accountant=self.accountant,
        )

    def close(self) -> None:
        """Remove Opacus's hooks and per-sample attributes; the wrapped model stays trained."""
        # Opacus 1.6 names it cleanup(); 1.5 only had the private _close().
        cleanup = getattr(self.module, "cleanup", None) or self.module._close
        cleanup()
        for p in self.module._module.parameters():
            if hasattr(p, "summed_grad"):
                del p.summed_grad


def make_private(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    X: ArrayLike | torch.Tensor,
    y: ArrayLike | torch.Tensor,
    *,
    batch_size: int,
    max_grad_norm: float,
    epochs: int,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    delta: float = 1e-5,
    seed: int | None = None,
    accountant: str = "rdp",
) -> PrivateTraining:
    """Wrap a model and optimizer for DP-SGD over (X, y) with Poisson sampling.

    Args:
        model: the module to train (in place); must pass Opacus's ``ModuleValidator`` (no
            BatchNorm). Left in training mode.
        optimizer: a ``torch.optim`` optimizer over ``model``'s parameters.
        X: features, n rows (converted to float32).
        y: targets, n rows (kept in their dtype).
        batch_size: expected rows per step, >= 1; ``sample_rate = min(1, batch_size / n)``.
        max_grad_norm: per-sample gradient clip ``C``, > 0.
        epochs: planned epochs of ``ceil(n / batch_size)`` steps, >= 1; with
            ``target_epsilon`` the noise is calibrated over them.
        noise_multiplier: fixed noise multiplier ``z`` > 0, or None.
        target_epsilon: epsilon the planned steps may spend, or None. With both, the larger
            noise wins (see ``accounting.resolve_noise_multiplier``).
        delta: the delta of the guarantee, in (0, 1).
        seed: None (production): noise and sampling keyed from the OS. An integer makes both
            reproducible for tests, and then anyone who knows it can remove the noise: never
            pass a plan's or a shared seed.
        accountant: "rdp" or "prv".

    Returns:
        the :class:`PrivateTraining` bundle.

    Raises:
        ValueError: an argument is invalid, the target epsilon is unreachable, or the model
            has a module Opacus cannot train privately.
    """
    features = torch.as_tensor(X).detach().to(device="cpu", dtype=torch.float32)
    targets = torch.as_tensor(y).detach().to(device="cpu")
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"X must be a non-empty (n, d) matrix, got shape {tuple(features.shape)}")
    rows = features.shape[0]
    if targets.shape[0:1] != (rows,):
        raise ValueError(f"X has {rows} rows but y has shape {tuple(targets.shape)}")
    if not _is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not _is_int(epochs) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if not _is_number(max_grad_norm) or max_grad_norm <= 0:
        raise ValueError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm!r}")
    if seed is not None and not _is_int(seed):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")
    own = {id(p) for p in model.parameters()}
    if any(id(p) not in own for group in optimizer.param_groups for p in group["params"]):
        raise ValueError("the optimizer holds parameters that are not the model's")

    sample_rate = min(1.0, batch_size / rows)
    steps_per_epoch = math.ceil(rows / batch_size)
    noise = resolve_noise_multiplier(
        noise_multiplier=noise_multiplier,
        target_epsilon=target_epsilon,
        sample_rate=sample_rate,
        steps=epochs * steps_per_epoch,
        delta=delta,
        accountant=accountant,
    )
    model.train()
    try:
        ModuleValidator.validate(model, strict=True)
    except UnsupportedError as exc:
        raise ValueError(f"the model cannot be trained with DP-SGD: {exc}") from exc

    sampler = _PoissonSampler(rows, sample_rate, steps_per_epoch, _keyed_source(seed, b"sample"))
    # batch_size=None: the sampler yields whole index tensors and TensorDataset indexes with
    # them, so an empty batch is simply a (0, d) tensor.
    loader: DataLoader[Any] = DataLoader(
        TensorDataset(features, targets), sampler=sampler, batch_size=None
    )
    module = GradSampleModule(model, batch_first=True, loss_reduction="sum", strict=True)
    module.forbid_grad_accumulation()
    dp_optimizer = _SecureNoiseDPOptimizer(
        optimizer,
        source=_keyed_source(seed, b"noise"),
        noise_multiplier=noise,
        max_grad_norm=float(max_grad_norm),
        expected_batch_size=sample_rate * rows,
        loss_reduction="mean",
    )
    return PrivateTraining(
        module=module,
        optimizer=dp_optimizer,
        data_loader=loader,
        noise_multiplier=noise,
        sample_rate=sample_rate,
        steps_per_epoch=steps_per_epoch,
        epochs=epochs,
        max_grad_norm=float(max_grad_norm),
        delta=float(delta),
        accountant=accountant,
    )


def train_dp(
    model: nn.Module,
    X: ArrayLike | torch.Tensor,
    y: ArrayLike | torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    clip: float,
    delta: float,
    noise_multiplier: float | None = None,
    target_epsilon: float | None = None,
    seed: int | None = None,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    accountant: str = "rdp",
    on_batch: Callable[[int, int], None] | None = None,
    objective: Objective = BINARY,
) -> dict[str, Any]:
    """Train a model in place with DP-SGD for the objective's task and return what it spent.

    In a federated plan pass the noise multiplier from
    ``accounting.plan_noise_multiplier`` (calibrated over all rounds) rather than the plan's
    ``target_epsilon``: a target given here is spent by this call alone.

    Args:
        model: module mapping (n, d) float32 features to (n, objective.n_outputs) outputs,
            e.g. from ``fedcore.models.build_model``; no BatchNorm. Its train/eval mode is
            restored.
        X: feature matrix (n, d), n >= 1.
        y: n targets as ``objective.targets`` takes them (0/1, class indices, values).
        epochs: passes of ``ceil(n / batch_size)`` steps, >= 1.
        batch_size: expected rows per step, >= 1 (Poisson sampling: batches vary in size).
        lr: learning rate, > 0.
        clip: per-sample gradient L2 bound, > 0.
        delta: the delta of the guarantee, in (0, 1).
        noise_multiplier: fixed noise multiplier > 0, or None.
        target_epsilon: epsilon this call may spend, > 0, or None (give at least one).
        seed: None in production; an integer only for reproducible tests (see
            :func:`make_private`: a known seed voids the guarantee).
        optimizer: "sgd" or "adam" (torch.optim's).
        momentum: SGD momentum in [0, 1); must be 0 with "adam".
        weight_decay: L2 penalty, >= 0.
        accountant: "rdp" or "prv"; use the ledger's.
        on_batch: called as ``on_batch(step, total_steps)`` after each step.
        objective: the task and its loss (summed over each batch; the clipped per-sample
            gradient of a row is the gradient of its own loss, whatever the task).

    Returns:
        ``{"train_loss": mean loss over the rows sampled in the last epoch (NaN if none; not
        private), "epsilon": spent by this call at delta, "steps": int, "sample_rate": float,
        "noise_multiplier": float, "delta": float, "accountant": str}``; append
        ``(noise_multiplier, sample_rate, steps)`` to the silo's history.

    Raises:
        TrainingError: an argument is invalid, the model is not supported, the target is
            unreachable, or the loss became NaN/Inf.
    """
    if not _is_number(lr) or lr <= 0:
        raise TrainingError(f"lr must be a finite number > 0, got {lr!r}")
    if optimizer not in DP_OPTIMIZERS:
        raise TrainingError(f"optimizer {optimizer!r} is not supported; allowed: sgd, adam")
    if not _is_number(momentum) or not 0.0 <= momentum < 1.0:
        raise TrainingError(f"momentum must be a number in [0, 1), got {momentum!r}")
    if optimizer == "adam" and momentum != 0.0:
        raise TrainingError("momentum applies to optimizer 'sgd' only; set it to 0")
    if not _is_number(weight_decay) or weight_decay < 0:
        raise TrainingError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    rows = torch.as_tensor(X).shape[0] if torch.as_tensor(X).ndim else 0
    labels = objective.targets(y, rows)

    params = [p for p in model.parameters() if p.requires_grad]
    opt: torch.optim.Optimizer
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    was_training = model.training
    try:
        private = make_private(
            model,
            opt,
            X,
            labels,
            batch_size=batch_size,
            max_grad_norm=clip,
            epochs=epochs,
            noise_multiplier=noise_multiplier,
            target_epsilon=target_epsilon,
            delta=delta,
            seed=seed,
            accountant=accountant,
        )
    except ValueError as exc:
        model.train(was_training)
        raise TrainingError(str(exc)) from exc

    total_steps = epochs * private.steps_per_epoch
    step = 0
    loss_sum, seen = 0.0, 0
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_HOOK_WARNING)
            # Dropout masks draw from the global RNG: seed it inside the fork (restored on exit).
            torch.manual_seed(seed if seed is not None else secrets.randbits(63))
            for epoch in range(1, epochs + 1):
                loss_sum, seen = 0.0, 0
                for features, targets in private.data_loader:
                    private.optimizer.zero_grad(set_to_none=True)
                    outputs = objective.outputs(private.module(features))
                    loss = objective.loss_of(outputs, targets, reduction="sum")
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise TrainingError(
                            f"training diverged: loss is {value} at epoch {epoch}, step "
                            f"{step + 1}; lower lr (now {lr}) or check the features"
                        )
                    loss.backward()
                    private.optimizer.step()
                    loss_sum += value
                    seen += targets.shape[0]
                    step += 1
                    if on_batch is not None:
                        on_batch(step, total_steps)
    finally:
        private.close()
        model.train(was_training)
    return {
        "train_loss": loss_sum / seen if seen else float("nan"),
        "epsilon": private.epsilon(step),
        "steps": step,
        "sample_rate": private.sample_rate,
        "noise_multiplier": private.noise_multiplier,
        "delta": private.delta,
        "accountant": private.accountant,
    }
