"""Several site agents in one process, for benchmarks with many sites on one machine.

    python -m bench._agents SITE_TOML [SITE_TOML ...]

Each site.toml gets its own :class:`clientagent.connection.Agent` (its own websocket, data,
records and training lock) on one event loop; local training runs in the loop's default thread
pool, as it does for a single agent. SIGTERM or SIGINT closes every websocket and exits.
Fifty agent processes would each load torch and pandas (about 250 MB apiece); fifty agents in
five processes measure the same protocol with a tenth of the memory.
"""

from __future__ import annotations

import asyncio
import signal
import sys

from clientagent.config import load_config
from clientagent.connection import run_agent


async def _serve(paths: list[str]) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    configs = [load_config(path) for path in paths]
    codes = await asyncio.gather(*(run_agent(config, stop=stop) for config in configs))
    return max(codes, default=0)


def main() -> int:
    """Run the agents named on the command line until stopped."""
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    return asyncio.run(_serve(sys.argv[1:]))


if __name__ == "__main__":
    sys.exit(main())
