"""``python -m clientagent`` that trains slowly: the fault tests need an agent still training.

QUORUM_TEST_TRAIN_DELAY: seconds added to every task ("3"), or per round number ("1=30,2=3.5":
rounds not named are not delayed). QUORUM_TEST_TRAIN_GATE: a file; once it exists the delays end
(a test opens the gate when what it waits for has happened, so no margin of seconds decides). QUORUM_TEST_BACKOFF_CAP: the longest reconnect delay, seconds
(default the agent's 30 s), for tests that need agents back as soon as a server is.
"""

from __future__ import annotations

import os
import time
from typing import Any

from clientagent import cli, connection


def _delays(text: str) -> tuple[float, dict[int, float]]:
    if "=" not in text:
        return float(text or 0), {}
    pairs = (item.split("=") for item in text.split(",") if item.strip())
    return 0.0, {int(k): float(v) for k, v in pairs}


DEFAULT, BY_ROUND = _delays(os.environ.get("QUORUM_TEST_TRAIN_DELAY", "0"))
_train = connection.handle_task  # what Agent.train calls, on a worker thread


GATE = os.environ.get("QUORUM_TEST_TRAIN_GATE")


def _slow_handle_task(task: Any, *args: Any, **kwargs: Any) -> Any:
    until = time.monotonic() + BY_ROUND.get(int(task.fields.get("round") or 0), DEFAULT)
    while time.monotonic() < until and not (GATE and os.path.exists(GATE)):
        time.sleep(min(0.05, max(0.0, until - time.monotonic())))
    return _train(task, *args, **kwargs)


connection.handle_task = _slow_handle_task

_CAP = os.environ.get("QUORUM_TEST_BACKOFF_CAP")
if _CAP:
    _backoff_init = connection.Backoff.__init__

    def _capped_backoff_init(self: Any, *, base: float = 0.5, cap: float = 30.0, rng: Any = None):
        _backoff_init(self, base=min(base, float(_CAP)), cap=min(cap, float(_CAP)), rng=rng)

    connection.Backoff.__init__ = _capped_backoff_init  # type: ignore[method-assign]

if __name__ == "__main__":
    raise SystemExit(cli.main())
