"""``celery -A config worker --pool=solo`` for the services suite, with one dormant fault hook.

While the file named by QUORUM_TEST_SLOW_AGGREGATION exists, a worker that has just written a
round's new model blob (``services.rounds.round_aggregate``: after aggregating, before the commit)
writes ``<that file>.reached`` and sleeps, so a test can kill it inside aggregation. Without the
file this is the plain worker.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any


def _install_fault_hook() -> None:
    gate = os.environ.get("QUORUM_TEST_SLOW_AGGREGATION")
    if not gate:
        return
    from federation.services import rounds

    real_blob_store = rounds.blob_store

    class SlowModelWrites:
        def __init__(self, store: Any) -> None:
            self._store = store

        def __getattr__(self, name: str) -> Any:
            return getattr(self._store, name)

        def put(self, key: str, data: bytes) -> None:
            self._store.put(key, data)
            new_model = "/models/v" in key and not key.endswith("/v0.safetensors")
            if new_model and Path(gate).exists():
                Path(f"{gate}.reached").write_text(key)
                time.sleep(120)  # killed here

    rounds.blob_store = lambda: SlowModelWrites(real_blob_store())


def main() -> None:
    """Set up Django, arm the hook, run the worker (extra arguments go to `celery worker`)."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()
    _install_fault_hook()
    from config.celery import app

    app.worker_main(["worker", "--pool=solo", "--loglevel=INFO", *sys.argv[1:]])


if __name__ == "__main__":
    main()
