"""``quorum-agent``: run the site agent, check its configuration, review plans, show the sent log.

Commands: ``init`` (propose schema.json and site.toml from the data file), ``run``, ``check``, ``plans`` (the plans the server offered and the local decision on
each), ``approve`` / ``reject`` (the site operator's decision on a plan hash, appended to
decisions.jsonl), ``log`` (every message that left the site with something derived from its data).

Exit codes: 0 stopped cleanly (SIGINT/SIGTERM) or the command succeeded; 1 unexpected failure;
2 the configuration, the data file, a state file or a plan hash given is unusable; 3 the server
refused the site's token; 4 the server's consortium is not ``[policy] consortium``.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from clientagent import __version__, onboarding
from clientagent.config import ConfigError, DataConfig, SiteConfig, load_config, load_data_config
from clientagent.exit_codes import EXIT_CONFIG, EXIT_ERROR, EXIT_OK
from clientagent.records import (
    APPROVED,
    OPEN_OFFER_STATUSES,
    REJECTED,
    RecordsError,
    SiteRecords,
    short_hash,
)
from fedcore import approvals, schema_inference, signing
from fedcore.logsafe import EscapingFormatter

LOG_FORMAT = "%(asctime)s %(levelname)s quorum-agent[%(name)s]: %(message)s"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

logger = logging.getLogger("clientagent.cli")


class _SiteFormatter(EscapingFormatter):
    """Shows the site's name (``[agent] name``) instead of the agent's module names; a value from
    the server (a refusal's reason) cannot forge a log line (fedcore/logsafe.py)."""

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
    # The connection loop trains (torch): imported here, so the commands that train nothing
    # start without it.
    from clientagent.connection import run_agent

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
            "[server] url uses ws:// to a remote host (allow_insecure = true): the token and "
            "model weights travel unencrypted; ask the consortium admin for the wss:// address"
        )
    try:
        return asyncio.run(_serve(config))
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return EXIT_OK
    except Exception:
        logger.exception("the agent failed")
        return EXIT_ERROR


def cmd_init(args: argparse.Namespace) -> int:
    """``quorum-agent init``: propose schema.json and site.toml from the data file."""
    confirm = None
    if sys.stdin.isatty() and sys.stdout.isatty():

        def confirm(question: str) -> bool:
            try:
                return input(question).strip().lower() in ("y", "yes")
            except EOFError:
                return False

    try:
        onboarding.init(
            data=args.data,
            target=args.target,
            sensitive=args.sensitive or (),
            out_dir=args.out,
            min_category_rows=args.min_category_rows,
            force=args.force,
            confirm=confirm,
            positive=args.positive or (),
            negative=args.negative or (),
            server_url=args.server,
            server_key=args.server_key,
            steward_keys=args.steward_key or (),
        )
    except onboarding.OnboardingError as exc:
        print(f"quorum-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"quorum-agent: cannot write the proposal: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    """``quorum-agent check``: validate site.toml, that the data loads, and the data against the
    schema ([data] schema or --schema)."""
    try:
        config = load_config(args.config)
    except ConfigError as problem:
        print(f"quorum-agent: configuration error: {problem}", file=sys.stderr)
        # The [server] part may not be filled in yet (the token comes after the silo is
        # registered with its schema): still check the data against the schema.
        try:
            data = load_data_config(args.config)
        except ConfigError as exc:
            if str(exc) != str(problem):
                print(f"quorum-agent: configuration error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        where = Path(args.config).expanduser().resolve()
        print(f"config: {where}: NOT ok (the error is on stderr); checking [data] anyway")
        _check_data(data, args.schema)
        print(f"config: {where}: fix the configuration error, then check again")
        return EXIT_CONFIG
    frame = _check_data(config.data, args.schema, summary=False)
    if frame is None:
        return EXIT_CONFIG
    print(f"config: {config.path}: ok")
    print(f"server: {config.server.url}")
    if config.agent.name:
        print(f"agent:  {config.agent.name}")
    print(f"data:   {config.data.path}: {len(frame)} rows, {len(frame.columns)} columns")
    print(f"columns: {', '.join(str(c) for c in frame.columns)}")
    schema_path = _schema_path(config.data, args.schema)
    if schema_path is None:
        print("schema: none ([data] schema or --schema): only checked that the data loads")
    else:
        try:
            if not onboarding.check_schema(
                data=config.data.path, schema_path=schema_path, frame=frame
            ):
                return EXIT_CONFIG
        except onboarding.OnboardingError as exc:
            print(f"quorum-agent: schema error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    print(f"server key: {config.server.public_key}")
    print(f"state:  {config.agent.state_dir}")
    for line in _policy_lines(config):
        print(f"policy: {line}")
    keys = config.governance.steward_keys
    if keys:
        print(f"approvals: signed by one of {len(keys)} pinned steward key(s), or approved locally")
    elif config.policy.require_local_approval:
        print("approvals: approved locally by the site operator (require_local_approval)")
    else:
        print(
            "approvals: WARNING: no [governance] steward_keys and no require_local_approval: "
            "this site trusts the server's word that its steward approved (docs/security.md)"
        )
    return EXIT_OK


def _schema_path(data: DataConfig, option: str | None) -> Path | None:
    if option is not None:
        return Path(option).expanduser().resolve()
    return data.schema


def _check_data(
    data: DataConfig, schema_option: str | None, *, summary: bool = True
) -> pd.DataFrame | None:
    """Load the data file and, when ``summary``, check it against the schema; None on error."""
    try:
        frame = onboarding.read_data(data.path)
    except onboarding.OnboardingError as exc:
        print(f"quorum-agent: data error: {exc}", file=sys.stderr)
        return None
    if not summary:
        return frame
    print(f"data:   {data.path}: {len(frame)} rows, {len(frame.columns)} columns")
    schema_path = _schema_path(data, schema_option)
    if schema_path is not None:
        try:
            onboarding.check_schema(data=data.path, schema_path=schema_path, frame=frame)
        except onboarding.OnboardingError as exc:
            print(f"quorum-agent: schema error: {exc}", file=sys.stderr)
    return frame


def _policy_lines(config: SiteConfig) -> list[str]:
    policy = config.policy
    limit = "no limit"
    per_plan = limit if policy.max_epsilon_per_plan is None else f"{policy.max_epsilon_per_plan:g}"
    total = limit if policy.max_epsilon_total is None else f"{policy.max_epsilon_total:g}"
    return [
        f"consortium {policy.consortium or 'any'}",
        f"models {', '.join(policy.allowed_models)}",
        f"epsilon per plan {per_plan}, in total {total}",
        f"require DP {_yes(policy.require_dp)}, secure aggregation "
        f"{_yes(policy.require_secure_aggregation)}, local approval "
        f"{_yes(policy.require_local_approval)}",
    ]


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Left-aligned columns separated by two spaces; numbers right-aligned."""
    cells = [[str(h) for h in headers]] + [["-" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [
        any(_is_number(r[i]) for r in rows) and all(r[i] is None or _is_number(r[i]) for r in rows)
        for i in range(len(headers))
    ]
    lines = []
    for row in cells:
        parts = [
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, right in zip(row, widths, numeric, strict=True)
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _operator() -> str:
    """The local user recorded with a decision."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no USER/LOGNAME and no passwd entry (some containers)
        return f"uid {os.getuid()}" if hasattr(os, "getuid") else "unknown"


def cmd_plans(args: argparse.Namespace) -> int:
    """``quorum-agent plans``: the plans the server offered and the local decision on each."""
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    records = SiteRecords(config.agent.state_dir)
    try:
        offers = records.offers()
        decisions = records.decisions()
    except RecordsError as exc:
        print(f"quorum-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    rows = []
    for plan_hash, offer in sorted(
        offers.items(), key=lambda item: str(item[1].get("received_at"))
    ):
        decision = decisions.get(plan_hash)
        rows.append(
            [
                short_hash(plan_hash),
                offer.get("name"),
                offer.get("version"),
                offer.get("consortium"),
                offer.get("model"),
                offer.get("privacy"),
                offer.get("status"),
                decision.decision if decision else "pending",
            ]
        )
    for plan_hash, decision in sorted(decisions.items(), key=lambda item: item[1].time):
        if plan_hash not in offers:  # decided before the server offered it (pre-approval)
            rows.append(
                [short_hash(plan_hash), "(not offered yet)", *[None] * 5, decision.decision]
            )
    if not rows:
        print(f"no plan offers received yet (state directory {config.agent.state_dir})")
        return EXIT_OK
    headers = ["HASH", "NAME", "VERSION", "CONSORTIUM", "MODEL", "PRIVACY", "SERVER", "LOCAL"]
    print(_table(headers, rows))
    if config.policy.require_local_approval:
        print(
            "\nthis site trains only on plans approved here: "
            f"quorum-agent approve <hash> --config {config.path}"
        )
    return EXIT_OK


def _decide(args: argparse.Namespace, decision: str) -> int:
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    records = SiteRecords(config.agent.state_dir)
    try:
        plan_hash = records.resolve_hash(args.plan_hash)
        offer = records.offers().get(plan_hash)
        entry = records.decide(plan_hash, decision, reason=args.reason, operator=_operator())
    except RecordsError as exc:
        print(f"quorum-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"quorum-agent: cannot record the decision: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    what = f"{offer.get('name')!r} v{offer.get('version')}" if offer else "(not offered yet)"
    print(f"{decision} plan {plan_hash} {what} as {entry.operator}")
    if offer and offer.get("status") not in OPEN_OFFER_STATUSES:
        print(
            f"note: the server says this version is {offer.get('status')}; it will not run "
            "under this hash (`quorum-agent plans` lists the current offers)"
        )
    print(
        f"recorded in {records.decisions_path}; the running agent applies it from its next request"
    )
    return EXIT_OK


def cmd_approve(args: argparse.Namespace) -> int:
    """``quorum-agent approve``: the site operator approves a plan hash."""
    return _decide(args, APPROVED)


def cmd_reject(args: argparse.Namespace) -> int:
    """``quorum-agent reject``: the site operator rejects a plan hash."""
    return _decide(args, REJECTED)


def cmd_steward_key_new(args: argparse.Namespace) -> int:
    """``quorum-agent steward-key new``: a steward's Ed25519 key file (0600); print its public key."""
    path = os.path.abspath(os.path.expanduser(args.out))
    key = signing.generate_private_key()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(
            f"quorum-agent: {path} already exists; a key file is never overwritten "
            "(choose another --out)",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    except OSError as exc:
        print(f"quorum-agent: cannot create {path}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    with os.fdopen(fd, "wb") as fh:
        fh.write(signing.private_key_to_pem(key))
    public = signing.public_key_text(key)
    if args.quiet:  # for scripts: KEY=$(quorum-agent steward-key new --out F --quiet)
        print(f"private key written to {path} (mode 0600)", file=sys.stderr)
        print(public)
        return EXIT_OK
    print(f"private key written to {path} (mode 0600; keep it with the steward only)")
    print("pin the public key in each site.toml this steward approves for:")
    print("[governance]")
    print(f'steward_keys = ["{public}"]')
    return EXIT_OK


def load_steward_key(path: str) -> signing.Ed25519PrivateKey:
    """Read a steward key file written by ``steward-key new``; AuthorizationError if unusable."""
    try:
        data = open(os.path.expanduser(path), "rb").read()  # noqa: SIM115 - small file
    except OSError as exc:
        raise signing.AuthorizationError(f"cannot read the steward key {path}: {exc}") from None
    try:
        return signing.private_key_from_pem(data)
    except ValueError as exc:
        raise signing.AuthorizationError(
            f"{path} is not an Ed25519 private key in PEM ({exc})"
        ) from None


def cmd_steward_key_sign(args: argparse.Namespace) -> int:
    """``quorum-agent steward-key sign``: print the signature approving a plan hash (JSON)."""
    plan_hash = args.plan_hash.strip().lower()
    if len(plan_hash) != 64 or any(ch not in "0123456789abcdef" for ch in plan_hash):
        print(
            f"quorum-agent: {args.plan_hash!r} is not a plan hash: give all 64 hex characters "
            "shown on the plan's page",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    try:
        key = load_steward_key(args.key)
    except signing.AuthorizationError as exc:
        print(f"quorum-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    signature = approvals.sign_approval(
        key, consortium=args.consortium, organization=args.organization, plan_hash=plan_hash
    )
    print(json.dumps(signature))
    return EXIT_OK


def cmd_log(args: argparse.Namespace) -> int:
    """``quorum-agent log``: every message that left the site carrying local-data derivatives."""
    config = _load(args.config)
    if config is None:
        return EXIT_CONFIG
    records = SiteRecords(config.agent.state_dir)
    try:
        sent = records.sent()
    except RecordsError as exc:
        print(f"quorum-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.json:
        for record in sent:
            print(json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False))
        return EXIT_OK
    if not sent:
        print(f"nothing sent yet ({records.sent_path} is empty or missing)")
        return EXIT_OK
    rows = [
        [
            r.get("time"),
            r.get("type"),
            r.get("run"),
            r.get("round"),
            short_hash(r.get("plan_hash")),
            r.get("bytes"),
            str(r.get("sha256", ""))[:16],
            r.get("epsilon"),
        ]
        for r in sent
    ]
    headers = ["TIME (UTC)", "TYPE", "RUN", "ROUND", "PLAN", "BYTES", "SHA256", "EPSILON"]
    print(_table(headers, rows))
    total_bytes = sum(r.get("bytes") or 0 for r in sent)
    total_epsilon = sum(r.get("epsilon") or 0.0 for r in sent)
    print(
        f"\n{len(sent)} messages, {total_bytes} bytes, epsilon spent {total_epsilon:g} "
        f"({records.sent_path}; --json for full hashes)"
    )
    return EXIT_OK


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``quorum-agent``."""
    parser = argparse.ArgumentParser(
        prog="quorum-agent",
        description=(
            "Quorum site agent: trains models on this site's data for the consortium server. "
            "Raw records never leave the site; only model weights and aggregate statistics do."
        ),
        epilog=(
            "exit codes: 0 ok / stopped, 1 unexpected failure, 2 configuration, data or state "
            "file error (or an unusable plan hash), 3 the server refused the site's token, "
            "4 the server's consortium is not [policy] consortium"
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

    init = commands.add_parser(
        "init",
        help="propose a dataset schema and a site.toml from the data file, for review",
        description=(
            "Read the data file on this machine (nothing is sent) and write a proposed dataset "
            "schema (schema.json: column types, target, sensitive attributes, categorical "
            "values held by at least --min-category-rows rows) and a site.toml with "
            "placeholders, for the data steward to review. Existing files are never replaced "
            "without --force. See docs/site-onboarding.md."
        ),
    )
    init.add_argument("--data", required=True, metavar="FILE", help="the .csv or .parquet file")
    init.add_argument(
        "--target", metavar="COLUMN", help="the column to predict (default: guessed, to confirm)"
    )
    init.add_argument(
        "--sensitive",
        nargs="+",
        metavar="COLUMN",
        help="sensitive attributes for fairness reports (categorical or boolean columns)",
    )
    init.add_argument(
        "--out",
        default=".",
        metavar="DIR",
        help="folder for schema.json and site.toml (default: the current folder)",
    )
    init.add_argument(
        "--min-category-rows",
        type=_positive_int,
        default=schema_inference.DEFAULT_MIN_CATEGORY_ROWS,
        metavar="N",
        help=(
            "declare a categorical value only when at least N rows hold it; rarer values "
            f"encode as 'other' (default {schema_inference.DEFAULT_MIN_CATEGORY_ROWS})"
        ),
    )
    labels = init.add_mutually_exclusive_group()
    labels.add_argument(
        "--positive",
        nargs="+",
        metavar="VALUE",
        help="the target's values that mean label 1 (instead of init's guess)",
    )
    labels.add_argument(
        "--negative",
        nargs="+",
        metavar="VALUE",
        help="the target's values that mean label 0; every other value is label 1",
    )
    init.add_argument(
        "--server", metavar="URL", help="the server's agent address (wss://.../ws/agent/)"
    )
    init.add_argument(
        "--server-key", metavar="KEY", help="the server's public key, as `manage.py server_key`"
    )
    init.add_argument(
        "--steward-key",
        action="append",
        metavar="KEY",
        help=(
            "pin a steward's public key (repeatable): a plan then trains only when one of "
            "them signed its approval, with no second, local approval"
        ),
    )
    init.add_argument("--force", action="store_true", help="replace existing output files")
    init.set_defaults(func=cmd_init)

    check = commands.add_parser(
        "check",
        help="validate the config file, the data file and the data against the schema",
        description=(
            "Check site.toml (keys, server URL, token), that the data file loads and, with "
            "[data] schema or --schema, the data against the dataset schema column by column "
            "(every column present, values parse, labels valid, missing values counted). "
            "Exit status 0 when all is well, 2 otherwise. Does not contact the server."
        ),
    )
    check.add_argument("--config", default="site.toml", metavar="PATH", help=config_help)
    check.add_argument(
        "--schema", metavar="FILE", help="a dataset schema JSON file (default: [data] schema)"
    )
    check.set_defaults(func=cmd_check)

    plans = commands.add_parser(
        "plans",
        help="list the plans the server offered this site and the local decision on each",
        description=(
            "List the plan offers stored in the state directory (offers.json): hash, name, "
            "version, consortium, model, privacy mode, the server's status and this site's "
            "decision (approved, rejected or pending). The full plans are in offers.json."
        ),
    )
    plans.add_argument("--config", required=True, metavar="PATH", help=config_help)
    plans.set_defaults(func=cmd_plans)

    hash_help = (
        "the plan hash: all 64 hex characters (also for a plan not offered yet), or a prefix "
        "of at least 8 that matches exactly one offered plan"
    )
    for name, func, verb in (("approve", cmd_approve, "approve"), ("reject", cmd_reject, "reject")):
        decide = commands.add_parser(
            name,
            help=f"{verb} a plan for this site (recorded in decisions.jsonl)",
            description=(
                f"Record that this site's operator {verb}s a plan hash. Decisions are appended "
                "to decisions.jsonl in the state directory (never rewritten); the latest one for "
                "a hash wins and the running agent applies it from its next request. A rejected "
                "plan is refused even without [policy] require_local_approval."
            ),
        )
        decide.add_argument("plan_hash", metavar="HASH", help=hash_help)
        decide.add_argument("--config", required=True, metavar="PATH", help=config_help)
        decide.add_argument(
            "--reason",
            default="",
            help="why (kept in decisions.jsonl; for a rejection also told to the server)",
        )
        decide.set_defaults(func=func)

    log = commands.add_parser(
        "log",
        help="show every message that left this site with something derived from its data",
        description=(
            "Print the sent log (sent.jsonl in the state directory): one line per stats, "
            "update and error message the agent sent, with its time, run, round, plan, size, "
            "sha256 (of the weights for updates, of the JSON text otherwise) and privacy budget "
            "spent. For an auditor."
        ),
    )
    log.add_argument("--config", required=True, metavar="PATH", help=config_help)
    log.add_argument("--json", action="store_true", help="print JSON lines instead of a table")
    log.set_defaults(func=cmd_log)

    steward = commands.add_parser(
        "steward-key",
        help="a data steward's signing key: create one, sign an approval of a plan hash",
        description=(
            "A data steward proves an approval to the sites with an Ed25519 key: `new` writes "
            "the private key (0600) and prints the public key the sites pin in site.toml "
            "([governance] steward_keys); `sign` prints the signature (JSON) to submit as "
            "`signature` with the approval (POST /api/v1/plans/<id>/approve/)."
        ),
    )
    steward_commands = steward.add_subparsers(dest="steward_command", metavar="ACTION")
    steward_commands.required = True
    new = steward_commands.add_parser(
        "new", help="write a new private key and print its public key"
    )
    new.add_argument("--out", required=True, metavar="PATH", help="the key file to create")
    new.add_argument(
        "--quiet",
        action="store_true",
        help="print only the public key on standard output (for init --steward-key)",
    )
    new.set_defaults(func=cmd_steward_key_new)
    sign = steward_commands.add_parser("sign", help="sign the approval of a plan hash")
    sign.add_argument("plan_hash", metavar="HASH", help="the plan hash (64 hex characters)")
    sign.add_argument("--key", required=True, metavar="PATH", help="the steward's key file")
    sign.add_argument("--consortium", required=True, help="the consortium's name")
    sign.add_argument(
        "--organization", required=True, help="the organisation the steward approves for"
    )
    sign.set_defaults(func=cmd_steward_key_sign)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``quorum-agent`` and ``python -m clientagent``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_CONFIG
    return int(args.func(args))
