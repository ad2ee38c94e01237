"""Blob storage for updates and model versions, behind a small interface.

The filesystem store writes atomically (temporary file, fsync, rename), so a crash or a failed
write never leaves a half-written blob under a real key.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol

from django.conf import settings


class BlobStoreError(OSError):
    """A blob could not be written or read."""


class BlobStore(Protocol):
    """Where update and model blobs live."""

    def put(self, key: str, data: bytes) -> None:
        """Store data under key, atomically."""

    def get(self, key: str) -> bytes:
        """Return the bytes stored under key."""

    def delete_prefix(self, prefix: str) -> None:
        """Delete every blob under a key prefix."""


class FilesystemBlobStore:
    """Blobs as files under one root folder."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or any(p in {"", ".", ".."} for p in parts):
            raise BlobStoreError(f"invalid blob key {key!r}")
        return self.root.joinpath(*parts)

    def put(self, key: str, data: bytes) -> None:
        """Store data under key, atomically."""
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            raise BlobStoreError(f"could not write blob {key!r}: {exc}") from exc

    def get(self, key: str) -> bytes:
        """Return the bytes stored under key."""
        try:
            return self._path(key).read_bytes()
        except OSError as exc:
            raise BlobStoreError(f"could not read blob {key!r}: {exc}") from exc

    def delete_prefix(self, prefix: str) -> None:
        """Delete every blob under a key prefix."""
        shutil.rmtree(self._path(prefix.rstrip("/")), ignore_errors=True)


def blob_store() -> FilesystemBlobStore:
    """The configured blob store."""
    return FilesystemBlobStore(settings.QUORUM_BLOB_DIR)


def update_key(*, run_id: int, round_number: int, attempt: int, silo_id: int, sha256: str) -> str:
    """Blob key of one update: content-addressed within the silo's round attempt, so a second,
    concurrent update of the same silo (two ASGI processes during a reconnect) can never
    overwrite the bytes of the one that was accepted."""
    return f"runs/{run_id}/rounds/{round_number}-{attempt}/silo-{silo_id}-{sha256[:32]}.safetensors"


def model_key(*, run_id: int, number: int) -> str:
    """Blob key of a global model version."""
    return f"runs/{run_id}/models/v{number}.safetensors"


def strategy_key(*, run_id: int, number: int) -> str:
    """Blob key of the aggregation strategy's state (server optimizer) after round `number`."""
    return f"runs/{run_id}/strategy/r{number}.safetensors"
