"""Files only the server's user may read: the SQLite database, blobs and keys (0600) in folders
only it may enter (0700).

Updates, model versions and the database (agent token hashes, approvals, the audit log) were
created with the process umask, 0644/0755 by default: readable by every local user. Pure ``os``
calls, so config/settings.py can use them before Django is set up.
"""

from __future__ import annotations

import os
from pathlib import Path

FILE_MODE = 0o600
FOLDER_MODE = 0o700


def _narrow(path: Path, mode: int) -> None:
    """chmod ``path`` to ``mode`` if it is ours and wider (someone else's file is left alone)."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return
    if info.st_uid == os.getuid() and info.st_mode & 0o777 & ~mode:
        path.chmod(mode)


def private_folder(path: Path) -> Path:
    """Create ``path`` (and missing parents) as 0700, or narrow an existing one of ours to 0700."""
    path.mkdir(mode=FOLDER_MODE, parents=True, exist_ok=True)
    _narrow(path, FOLDER_MODE)
    return path


def private_sqlite(path: Path) -> Path:
    """Make the SQLite database ``path`` 0600 before SQLite opens it (SQLite gives its -wal and
    -shm files the database's mode), narrowing files left by an older version too."""
    private_folder(path.parent)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    os.close(fd)
    for suffix in ("", "-wal", "-shm", "-journal"):
        _narrow(path.with_name(path.name + suffix), FILE_MODE)
    return path
