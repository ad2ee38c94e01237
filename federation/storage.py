"""Blob storage for updates and model versions, behind a small interface.

The filesystem store writes atomically (temporary file, fsync, rename), so a crash or a failed
write never leaves a half-written blob under a real key.
"""

from __future__ import annotations

import functools
import mmap
import os
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Protocol

from django.conf import settings

from config.files import FOLDER_MODE, private_folder
from fedcore.protocol import spooled_file
from fedcore.tensors import writable_buffer


class BlobStoreError(OSError):
    """A blob could not be written or read."""


class BlobStore(Protocol):
    """Where update and model blobs live."""

    def put(self, key: str, data: bytes | bytearray | memoryview | mmap.mmap) -> None:
        """Store data under key, atomically."""

    def get(self, key: str) -> bytes:
        """Return the bytes stored under key."""

    def get_buffer(self, key: str) -> memoryview:
        """Return the blob in a writable buffer: ``fedcore.tensors.decode_state_dict`` makes its
        tensors on it without a second copy (``get``'s immutable bytes are copied once more)."""

    def delete(self, key: str) -> None:
        """Delete one blob (none under key: nothing to do)."""

    def delete_prefix(self, prefix: str) -> None:
        """Delete every blob under a key prefix."""


class FilesystemBlobStore:
    """Blobs as files under one root folder: files 0600 (mkstemp, O_TMPFILE), folders 0700."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        _private_root(self.root)

    def _path(self, key: str) -> Path:
        parts = key.split("/")
        if not key or any(p in {"", ".", ".."} for p in parts):
            raise BlobStoreError(f"invalid blob key {key!r}")
        return self.root.joinpath(*parts)

    def put(self, key: str, data: bytes | bytearray | memoryview | mmap.mmap) -> None:
        """Store data under key, atomically.

        A payload a Reassembler spooled into this store's filesystem (``fedcore.protocol.
        spooled_file``) is already on disk: its file is fsynced and linked into place, so the
        bytes are neither written nor copied again. Anything else is written to a temporary file,
        fsynced and renamed.
        """
        path = self._path(key)
        spooled = spooled_file(data)
        if spooled is not None and self._link(spooled[0], path):
            return
        try:
            _make_folders(path.parent)
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
            _fsync_directory(path.parent)
        except OSError as exc:
            raise BlobStoreError(f"could not write blob {key!r}: {exc}") from exc

    def _link(self, fd: int, path: Path) -> bool:
        """Give the anonymous file ``fd`` the name ``path``; False when it cannot be linked here
        (another filesystem, no /proc), so the caller writes the bytes instead."""
        try:
            _make_folders(path.parent)
            os.fsync(fd)
        except OSError as exc:
            raise BlobStoreError(f"could not write blob {path.name!r}: {exc}") from exc
        tmp = path.parent / f".tmp-{secrets.token_hex(8)}.part"
        try:
            # linkat(2) of an O_TMPFILE descriptor through /proc with AT_SYMLINK_FOLLOW (needs no
            # CAP_DAC_READ_SEARCH). A dst_dir_fd makes CPython call linkat: without one it calls
            # link(2), which would try to link the /proc symlink itself.
            parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.link(f"/proc/self/fd/{fd}", tmp.name, dst_dir_fd=parent, follow_symlinks=True)
            finally:
                os.close(parent)
        except OSError:
            return False
        try:
            os.replace(tmp, path)
            _fsync_directory(path.parent)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise BlobStoreError(f"could not write blob {path.name!r}: {exc}") from exc
        return True

    def get(self, key: str) -> bytes:
        """Return the bytes stored under key."""
        try:
            return self._path(key).read_bytes()
        except OSError as exc:
            raise BlobStoreError(f"could not read blob {key!r}: {exc}") from exc

    def get_buffer(self, key: str) -> memoryview:
        """Return the blob in a writable buffer, read straight into it (one copy, not two).

        The buffer is a :func:`fedcore.tensors.writable_buffer` (huge pages, not zero-filled
        first): reading a 200 MB blob into it costs a third of what a ``bytearray`` does.
        """
        try:
            with open(self._path(key), "rb", buffering=0) as fh:
                size = os.fstat(fh.fileno()).st_size
                buffer = writable_buffer(size)
                done = 0
                while done < size:
                    n = fh.readinto(buffer[done:])
                    if not n:
                        raise BlobStoreError(f"blob {key!r} shrank while being read")
                    done += n
                return buffer
        except BlobStoreError:
            raise
        except OSError as exc:
            raise BlobStoreError(f"could not read blob {key!r}: {exc}") from exc

    def delete(self, key: str) -> None:
        """Delete one blob (none under key: nothing to do)."""
        try:
            self._path(key).unlink(missing_ok=True)
        except OSError as exc:
            raise BlobStoreError(f"could not delete blob {key!r}: {exc}") from exc

    def delete_prefix(self, prefix: str) -> None:
        """Delete every blob under a key prefix."""
        shutil.rmtree(self._path(prefix.rstrip("/")), ignore_errors=True)


@functools.cache
def _private_root(root: Path) -> None:
    """Create the store's root 0700 (or narrow one an older version made), once per process."""
    private_folder(root)


def _make_folders(folder: Path) -> None:
    """Create ``folder`` and its missing parents, each new name made durable in its parent."""
    if folder.is_dir():
        return
    _make_folders(folder.parent)
    try:
        folder.mkdir(mode=FOLDER_MODE)
    except FileExistsError:  # a concurrent writer made it: its name may not be durable yet
        if not folder.is_dir():
            raise
    _fsync_directory(folder.parent)


def _fsync_directory(folder: Path) -> None:
    """Make a rename in ``folder`` durable: the file's data is fsynced, its new name lives in
    the directory, which a crash could otherwise lose after the update was acknowledged."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def blob_store() -> FilesystemBlobStore:
    """The configured blob store."""
    return FilesystemBlobStore(settings.QUORUM_BLOB_DIR)


def update_key(
    *, run_id: int, round_number: int, attempt: int, silo_id: int, sha256: str, receipt: str
) -> str:
    """Blob key of one update: its content's hash within the silo's round attempt, and the
    receipt's own random part, so a second, concurrent update of the same silo (two ASGI
    processes during a reconnect, a replay) can never overwrite or delete the bytes of the one
    that was accepted."""
    return (
        f"runs/{run_id}/rounds/{round_number}-{attempt}/"
        f"silo-{silo_id}-{sha256[:32]}-{receipt}.safetensors"
    )


def model_key(*, run_id: int, number: int) -> str:
    """Blob key of a global model version."""
    return f"runs/{run_id}/models/v{number}.safetensors"


def strategy_key(*, run_id: int, number: int) -> str:
    """Blob key of the aggregation strategy's state (server optimizer) after round `number`."""
    return f"runs/{run_id}/strategy/r{number}.safetensors"
