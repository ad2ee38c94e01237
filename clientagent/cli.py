"""``quorum-agent``: run the site agent, or check a site's configuration and data file.

Exit codes: 0 stopped cleanly (SIGINT/SIGTERM) or check passed; 1 unexpected failure; 2 the
configuration or the data file is unusable; 3 the server refused the site's token.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence

from clientagent import __version__
from clientagent.config import ConfigError, SiteConfig, load_config
from clientagent.connection import EXIT_CONFIG, EXIT_ERROR, EXIT_OK, run_agent
from clientagent.data import DataFileError, LocalData

LOG_FORMAT = "%(asctime)s %(levelname)s quorum-agent[%(name)s]: %(message)s"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

logger = logging.getLogger("clientagent.cli")


class _SiteFormatter(logging.Formatter):
    """Shows the site's name (``[agent] name``) instead of the agent's module names."""

    def __init__(self, site: str):
        super().__init__(LOG_FORMAT)
        self.site = site

    def format(self, record: logging.LogRecord) -> str:
        if record.name == "clientagent" or record.name.startswith("clientagent."):
            record = logging.makeLogRecord({**record.__dict__, "name": self.site})
        return super().format(record)


def configure_logging(level: str, site: str = "agent") -> None:
    """Log to stderr in the agent's format, replacing any handler installed before."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_SiteFormatter(site))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def _load(path: str) -> SiteConfig | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"quorum-agent: configuration error: {exc}", file=sys.stderr)
        return None


async def _serve(config: SiteConfig) -> int:
    """Run the agent with SIGINT/SIGTERM wired to a clean stop."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def request_stop(signum: int) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            # A second signal: do not wait for a worker thread (e.g. reading a huge file).
            logger.warning("received %s again, exiting now", name)
            logging.shutdown()
            os._exit(EXIT_ERROR)
        logger.info("received %s, stopping", name)
        stop.set()

    installed: list[int] = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, request_stop, signum)
            installed.append(signum)
        except (NotImplementedError, RuntimeError):  # Windows: no loop signal handlers
            signal.signal(signum, lambda s, _frame: loop.call_soon_threadsafe(request_stop, s))
    try:
        return await run_agent(config, stop=stop)
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)


def cmd_run(args: argparse.Namespace) -> int:
    """``quorum-agent run``: connect to the server and serve until stopped."""
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    configure_logging(args.log_level, config.display_name)
    logger.info(
        "quorum-agent %s starting: server %s, data %s",
        __version__,
        config.server.url,
        config.data.path,
    )
    if not config.server.is_encrypted and not config.server.is_loopback:
        logger.warning(
            "[server] url uses ws:// to a remote host: the token and model weights travel "
            "unencrypted; ask the consortium admin for the wss:// address"
        )
    try:
        return asyncio.run(_serve(config))
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return EXIT_OK
    except Exception:
        logger.exception("the agent failed")
        return EXIT_ERROR


def cmd_check(args: argparse.Namespace) -> int:
    """``quorum-agent check``: validate site.toml and that the data file loads."""
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    try:
        frame = LocalData(config.data.path).load()
    except (DataFileError, ValueError) as exc:
        print(f"quorum-agent: data error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"config: {config.path}: ok")
    print(f"server: {config.server.url}")
    if config.agent.name:
        print(f"agent:  {config.agent.name}")
    print(f"data:   {config.data.path}: {len(frame)} rows, {len(frame.columns)} columns")
    print(f"columns: {', '.join(str(c) for c in frame.columns)}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``quorum-agent``."""
    parser = argparse.ArgumentParser(
        prog="quorum-agent",
        description=(
            "Quorum site agent: trains models on this site's data for the consortium server. "
            "Raw records never leave the site; only model weights and aggregate statistics do."
        ),
        epilog=(
            "exit codes: 0 ok / stopped, 1 unexpected failure, 2 configuration or data error, "
            "3 the server refused the site's token"
        ),
    )
    parser.add_argument("--version", action="version", version=f"quorum-agent {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    config_help = (
        "the site's config file (site.toml); relative paths in it resolve against its folder"
    )
    run = commands.add_parser(
        "run",
        help="connect to the server and train when asked (until Ctrl-C or SIGTERM)",
        description=(
            "Connect to the consortium server, answer its requests (statistics, training "
            "rounds) and reconnect with backoff when the connection drops. Stops cleanly on "
            "SIGINT/SIGTERM."
        ),
    )
    run.add_argument("--config", required=True, metavar="PATH", help=config_help)
    run.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=LOG_LEVELS,
        help="how much to log to stderr (default: INFO)",
    )
    run.set_defaults(func=cmd_run)

    check = commands.add_parser(
        "check",
        help="validate the config file and that the data file loads",
        description=(
            "Check site.toml (keys, server URL, token) and that the data file loads; print "
            "its row and column counts. Does not contact the server."
        ),
    )
    check.add_argument("--config", required=True, metavar="PATH", help=config_help)
    check.set_defaults(func=cmd_check)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``quorum-agent`` and ``python -m clientagent``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_CONFIG
    return int(args.func(args))
