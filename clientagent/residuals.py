"""The site's top-k error-feedback residuals, one file per run, kept across agent restarts.

Top-k compression (``fedcore.compression``) sends only the largest coordinates of a round's
change and keeps the rest to add to the next round's. That residual must outlive the process:
an agent restarted between rounds would otherwise silently drop what it had not sent yet. It is
written under ``<state_dir>/residuals/run-<id>.safetensors`` (safetensors: loading it never runs
code), atomically (temporary file, fsync, rename), before the update that depends on it leaves.

What the file holds is derived only from the site's past updates (the change each round's
training made, minus what was sent): no row of data. Under sample-level DP every update is a DP
release, so the residual is post-processing of releases already accounted for. A file of another
plan (same run id, other plan hash) or of another model layout is ignored and replaced.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from fedcore.compression import CompressionError, ErrorFeedback

__all__ = ["ResidualStore"]

logger = logging.getLogger("quorum.agent")


class ResidualStore:
    """Error-feedback state per run, in a folder of the agent's state directory."""

    def __init__(self, folder: Path) -> None:
        """Args:
        folder: where the files live (created on the first write).
        """
        self.folder = Path(folder)

    def path(self, run: int) -> Path:
        """The file of one run."""
        return self.folder / f"run-{int(run)}.safetensors"

    def load(self, run: int, *, plan_hash: str) -> ErrorFeedback:
        """The run's state; a fresh one when there is none, or it is unreadable or another plan's."""
        path = self.path(run)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return ErrorFeedback()
        except OSError as exc:
            logger.warning(
                "run %d: cannot read the top-k residual %s (%s); starting afresh", run, path, exc
            )
            return ErrorFeedback()
        try:
            state, meta = ErrorFeedback.from_bytes(data)
        except CompressionError as exc:
            logger.warning(
                "run %d: the top-k residual %s is unreadable (%s); starting afresh", run, path, exc
            )
            return ErrorFeedback()
        if meta.get("plan_hash") != plan_hash:
            logger.warning(
                "run %d: the top-k residual %s is of another plan; starting afresh", run, path
            )
            return ErrorFeedback()
        return state

    def save(self, run: int, state: ErrorFeedback, *, plan_hash: str) -> None:
        """Write the run's state atomically and durably.

        Raises:
            OSError: it cannot be written (the update is then not sent).
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path(run)
        tmp = path.with_suffix(".tmp")
        data = state.to_bytes({"run": str(run), "plan_hash": plan_hash})
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    def forget(self, run: int) -> bool:
        """Delete a run's file (its run is over); True if there was one.

        Raises:
            OSError: it exists but cannot be deleted.
        """
        try:
            self.path(run).unlink()
        except FileNotFoundError:
            return False
        return True


def matching(
    residual: dict[str, torch.Tensor], delta_like: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The residual when it has exactly the floating tensors of the model, else empty."""
    if set(residual) != set(delta_like):
        return {}
    if any(residual[n].shape != delta_like[n].shape for n in residual):
        return {}
    return residual
