"""Errors the services raise besides Django's ValidationError, PermissionDenied and Http404."""

from __future__ import annotations


class Conflict(Exception):
    """The object's current state forbids the action (HTTP 409): e.g. approving a stale hash."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message
