"""Typed errors of secure aggregation: every refusal says who refused, at which stage and why."""

from __future__ import annotations


class SecAggError(Exception):
    """Base class of every secure-aggregation failure."""


class ProtocolError(SecAggError, ValueError):
    """A message is malformed, inconsistent with the round, or fails authentication."""


class StageError(SecAggError):
    """A message or call arrived at the wrong stage, twice, or after the stage's deadline."""


class RevealRefusedError(ProtocolError):
    """A client refuses an unmasking request that would expose an individual input."""


class ReconstructionError(SecAggError):
    """Reconstructed secrets do not match what their owner advertised (corrupted shares)."""


class NotEnoughSurvivorsError(SecAggError):
    """Fewer than ``need`` participants remain, so the round cannot continue safely.

    Attributes:
        stage: the stage that could not complete.
        have: how many participants (or share holders) remain.
        need: how many are required (the threshold t).
        client: the client whose secret could not be reconstructed, when the shortfall is in
            one neighbourhood of a sparse graph rather than in the whole round; else None.
    """

    def __init__(self, stage: str, have: int, need: int, client: int | None = None) -> None:
        """Record the shortfall and build the message."""
        self.stage = stage
        self.have = have
        self.need = need
        self.client = client
        where = f" holding shares of client {client}" if client is not None else ""
        super().__init__(
            f"secure aggregation stage {stage!r}: {have} participant(s){where} remain, "
            f"threshold needs {need}"
        )
