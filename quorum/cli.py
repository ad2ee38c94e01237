"""``quorum``: the command line of data scientists and stewards (docs/cli.md).

Every command goes through :class:`quorum.client.Client`; every failure is printed as one clear
message on stderr with exit status 1 (2 for a wrong command line), never as a traceback.
"""

from __future__ import annotations

import argparse
import csv
import getpass
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from quorum import config
from quorum.client import Client, QuorumError

# fedcore's plan language and signing load torch (about 2 s): only the commands that check a
# plan or sign an approval import them, so `quorum silos` or `quorum run watch` start at once.

EXIT_OK = 0
EXIT_ERROR = 1
FINISHED = ("completed", "failed", "stopped")
STEWARD = "data_steward"
ORG_ADMIN = "org_admin"


class CliError(QuorumError):
    """A problem found by the CLI itself (arguments, files), reported like the server's."""


def out(text: str = "") -> None:
    print(text, flush=True)


def _client(args: argparse.Namespace) -> Client:
    settings = config.load()
    url = getattr(args, "url", None) or settings.get("url")
    token = settings.get("token")
    if not url or not token:
        raise CliError(
            f"not logged in: run `quorum login URL` first (configuration: {config.config_path()})"
        )
    return Client(url, token)


def _not_offered(what: str, exc: QuorumError) -> QuorumError:
    if exc.status == 404:
        return QuorumError(f"the server does not offer {what}", status=404)
    return exc


def _table(rows: list[list[Any]], header: list[str]) -> str:
    cells = [header, *[["" if cell is None else str(cell) for cell in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(line.rstrip() for line in lines)


def _json(data: Any) -> None:
    out(json.dumps(data, indent=2, sort_keys=True))


# --- login ---------------------------------------------------------------------------------------


def _read_password(args: argparse.Namespace, prompt: str) -> str:
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass(prompt)
    if not password:
        raise CliError("no password given: pipe it in with --password-stdin, or type it when asked")
    return password


def _save_login(client: Client, token: str) -> None:
    me = client.me()
    path = config.save(url=client.url, token=token)
    roles = sorted({f"{m['role']} of {m['organization_name']}" for m in me.get("memberships", [])})
    out(f"logged in to {client.url} as {me['username']}")
    for role in roles:
        out(f"  {role}")
    out(f"saved to {path} (readable by you only)")


def cmd_login(args: argparse.Namespace) -> int:
    if args.username:
        password = _read_password(args, f"password of {args.username} on {args.server}: ")
        created = Client(args.server, None).obtain_token(
            username=args.username, password=password, days=args.days
        )
        token = created["token"]
    elif args.password_stdin:
        raise CliError("--password-stdin goes with --username USER")
    elif args.token_stdin:
        token = sys.stdin.readline().strip()
    elif args.token:
        token = args.token.strip()
    else:
        token = getpass.getpass("API token (from `POST /api/v1/me/tokens/` or the dashboard): ")
        token = token.strip()
    if not token:
        raise CliError("no token given: pass --token-stdin and pipe it in, or --token TOKEN")
    _save_login(Client(args.server, token), token)
    return EXIT_OK


# --- onboarding: organisations, invitations, silos ------------------------------------------------

ROLES = ("org_admin", "data_steward", "data_scientist", "auditor", "consortium_admin")
ORG_KINDS = ("hospital", "bank", "research_lab", "other")


def note(text: str) -> None:
    """A message for the person, on stderr: stdout keeps only the value a script captures."""
    print(text, file=sys.stderr, flush=True)


def _consortium_id(client: Client, given: int | None, me: dict[str, Any] | None = None) -> int:
    if given is not None:
        return given
    mine = _my_consortia(me if me is not None else client.me())
    if len(mine) != 1:
        listed = ", ".join(f"{cid} ({cname})" for cid, cname in sorted(mine.items()))
        raise CliError(
            f"you are a member of {len(mine)} consortia ({listed or 'none'}): pass --consortium ID"
        )
    return next(iter(mine))


def _organization(client: Client, consortium: int, given: str) -> dict[str, Any]:
    """An organisation of the consortium by id or by name (any case)."""
    orgs = client.organizations(consortium)
    for org in orgs:
        if given == str(org["id"]) or given.strip().lower() == str(org["name"]).lower():
            return org
    names = ", ".join(f"{o['id']} ({o['name']})" for o in orgs) or "none"
    raise CliError(
        f"consortium {consortium} has no organisation {given!r}; its organisations: {names}"
    )


def cmd_org_list(args: argparse.Namespace) -> int:
    client = _client(args)
    consortium = _consortium_id(client, args.consortium)
    orgs = client.organizations(consortium)
    rows = [[o["id"], o["name"], o.get("kind", "")] for o in orgs]
    out(_table(rows, ["id", "name", "kind"]) if rows else "no organisations")
    return EXIT_OK


def cmd_org_create(args: argparse.Namespace) -> int:
    client = _client(args)
    consortium = _consortium_id(client, args.consortium)
    org = client.create_organization(consortium, name=args.name, kind=args.kind)
    out(
        f"organisation {org['id']} {org['name']!r} ({org.get('kind', args.kind)}) added to "
        f"consortium {consortium}"
    )
    return EXIT_OK


def cmd_invite(args: argparse.Namespace) -> int:
    client = _client(args)
    consortium = _consortium_id(client, args.consortium)
    org = _organization(client, consortium, args.org)
    sent = client.invite(
        consortium, email=args.email, organization=org["id"], role=args.role, days=args.days
    )
    mail = "e-mailed" if sent.get("email_sent") else f"NOT e-mailed ({sent.get('email_error')})"
    note(
        f"invited {sent.get('email', args.email)} as {args.role} of {org['name']}, until "
        f"{sent.get('expires_at')}; the link was {mail}; pass it on if needed (shown only now):"
    )
    out(sent["link"])
    return EXIT_OK


def _link_parts(link: str) -> tuple[str, str]:
    """The server's URL and the token of an invitation link (``.../invite/<token>/``)."""
    import urllib.parse

    parsed = urllib.parse.urlsplit(link.strip())
    path = parsed.path.rstrip("/")
    head, sep, token = path.rpartition("/invite/")
    if parsed.scheme not in ("http", "https") or not parsed.netloc or not sep or not token:
        raise CliError(
            f"{link!r} is not an invitation link: give the whole link, like "
            "https://quorum.example.org/invite/AbC.../"
        )
    return f"{parsed.scheme}://{parsed.netloc}{head}", token


def cmd_invitation_accept(args: argparse.Namespace) -> int:
    server, token = _link_parts(args.link)
    if args.username:
        password = _read_password(args, f"choose a password for {args.username}: ")
        accepted = Client(server, None).accept_invitation(
            token, username=args.username, password=password
        )
        membership = accepted["membership"]
        out(
            f"welcome, {accepted['username']}: you are {membership['role']} of "
            f"{membership['organization_name']}"
        )
        created = Client(server, None).obtain_token(username=args.username, password=password)
        _save_login(Client(server, created["token"]), created["token"])
        return EXIT_OK
    if args.password_stdin:
        raise CliError("--password-stdin goes with --username USER (a new account)")
    # No --username: someone with an account, logged in with `quorum login`, accepts as themselves.
    client = _client(args)
    if client.url.rstrip("/") != server.rstrip("/"):
        raise CliError(
            f"the link is for {server}, and you are logged in to {client.url}: log in there "
            "first, or pass --username to create a new account"
        )
    accepted = client.accept_invitation(token)
    membership = accepted["membership"]
    out(
        f"accepted: {accepted['username']} is {membership['role']} of "
        f"{membership['organization_name']}"
    )
    return EXIT_OK


def _count_rows(path: str) -> int:
    """The data rows of a CSV file (.csv or .csv.gz), counted here: nothing is sent."""
    import csv
    import gzip

    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8", newline="") as fh:  # type: ignore[operator]
            return max(sum(1 for _ in csv.reader(fh)) - 1, 0)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CliError(f"cannot count the rows of {path}: {exc}; pass --rows N instead") from None


def cmd_silo_register(args: argparse.Namespace) -> int:
    try:
        text = Path(args.schema).expanduser().read_text(encoding="utf-8")
    except OSError as exc:
        raise CliError(f"cannot read the schema {args.schema}: {exc.strerror or exc}") from None
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(
            f"{args.schema} is not valid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    if args.rows is not None:
        rows = args.rows
    elif args.data:
        rows = _count_rows(args.data)
    else:
        raise CliError("give the number of rows: --rows N, or --data FILE.csv to count them here")
    client = _client(args)
    me = client.me()
    stewarded = {
        m["organization"]: m
        for m in me.get("memberships", [])
        if m["role"] == STEWARD and (args.consortium is None or m["consortium"] == args.consortium)
    }
    if args.org is not None:
        chosen = [
            m
            for m in stewarded.values()
            if args.org in (str(m["organization"]), m["organization_name"])
        ]
    else:
        chosen = list(stewarded.values())
    if len(chosen) != 1:
        listed = ", ".join(f"{m['organization']} ({m['organization_name']})" for m in chosen)
        raise CliError(
            "you are not a data steward of any organisation: a steward registers their "
            "organisation's silo"
            if not chosen
            else f"you are a data steward of several organisations ({listed}): pass --org ID"
        )
    silo = client.register_silo(
        organization=chosen[0]["organization"],
        name=args.name,
        schema=schema,
        row_count=rows,
        description=args.description,
        location=args.location,
    )
    note(
        f"silo {silo['id']} {silo['name']!r} of {chosen[0]['organization_name']} registered "
        f"({rows} rows): pending until a consortium admin admits it (quorum silo admit "
        f"{silo['id']}). Its id:"
    )
    out(str(silo["id"]))
    return EXIT_OK


def cmd_silo_admit(args: argparse.Namespace) -> int:
    client = _client(args)
    admitted = client.admit_silo(args.silo)
    note(
        f"silo {args.silo} admitted. Its agent token, shown only now (the server keeps its "
        "SHA-256): give it to the silo's steward for the agent's token_file"
    )
    out(admitted["token"])
    return EXIT_OK


# --- silos ---------------------------------------------------------------------------------------


def _schema_lines(schema: Any) -> list[str]:
    if not isinstance(schema, dict):
        return ["    (no schema)"]
    lines = []
    for column in schema.get("columns", []):
        extra = ""
        if column.get("categories"):
            extra = f" categories={','.join(map(str, column['categories']))}"
        lines.append(
            f"    {column.get('name')}: {column.get('type')}"
            f" transform={column.get('transform', '-')} missing={column.get('missing', '-')}"
            + extra
        )
    target = schema.get("target") or {}
    if target:
        labels = (
            f"negative={target['negative']}"
            if target.get("negative")
            else f"positive={target.get('positive')}"
        )
        lines.append(f"    target: {target.get('column')} {labels}")
    if schema.get("sensitive"):
        lines.append(f"    sensitive: {', '.join(map(str, schema['sensitive']))}")
    return lines


def cmd_silos(args: argparse.Namespace) -> int:
    client = _client(args)
    silos = client.silos(consortium=args.consortium, admission=args.admission)
    details = [client.silo(silo["id"]) for silo in silos]
    if args.format == "json":
        _json(details)
        return EXIT_OK
    if not details:
        out("no silos visible to you")
        return EXIT_OK
    for silo in details:
        state = "online" if silo.get("online") else "offline"
        out(
            f"silo {silo['id']} {silo['name']} ({silo['organization_name']}, consortium "
            f"{silo['consortium']}): {silo['admission']}, {state}, {silo.get('row_count')} rows"
        )
        for line in _schema_lines(silo.get("schema")):
            out(line)
    return EXIT_OK


# --- plans ---------------------------------------------------------------------------------------


def _print_plan_errors(path: str, errors: dict[str, str]) -> None:
    print(f"quorum: {path} is not a valid plan ({len(errors)} problem(s)):", file=sys.stderr)
    for where, message in sorted(errors.items()):
        print(f"  {where}: {message}", file=sys.stderr)


def cmd_plan_validate(args: argparse.Namespace) -> int:
    from quorum.planfile import read_plan_file

    plan = read_plan_file(args.file)
    if plan.errors:
        _print_plan_errors(args.file, plan.errors)
        return EXIT_ERROR
    if plan.name:
        out(f"{args.file}: a valid plan; {plan.name!r} will have the hash {plan.hash}")
    else:
        out(
            f"{args.file}: a valid plan; its spec hash is {plan.hash} (proposed, its hash also "
            "covers the name and description)"
        )
    return EXIT_OK


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a list of silo ids: give them like 1,2,3"
        ) from None


def _my_consortia(me: dict[str, Any]) -> dict[int, str]:
    return {m["consortium"]: m["consortium_name"] for m in me.get("memberships", [])}


def cmd_plan_propose(args: argparse.Namespace) -> int:
    from quorum.planfile import read_plan_file

    plan = read_plan_file(args.file)
    if plan.errors:
        _print_plan_errors(args.file, plan.errors)
        return EXIT_ERROR
    name = args.name or plan.name
    if not name:
        raise CliError("a plan needs a name: pass --name NAME (or put 'name' in the plan file)")
    client = _client(args)
    consortium = args.consortium or plan.consortium
    if consortium is None:
        mine = _my_consortia(client.me())
        if len(mine) != 1:
            listed = ", ".join(f"{cid} ({cname})" for cid, cname in sorted(mine.items()))
            raise CliError(
                f"you are a member of {len(mine)} consortia ({listed or 'none'}): "
                "pass --consortium ID"
            )
        consortium = next(iter(mine))
    silos = args.silos if args.silos is not None else plan.silos
    if silos is None:
        silos = [s["id"] for s in client.silos(consortium=consortium, admission="admitted")]
        note(f"no --silos given: proposing to every admitted silo of the consortium: {silos}")
    created = client.propose_plan(
        consortium=consortium,
        name=name,
        description=args.description if args.description is not None else plan.description or "",
        spec=plan.spec,
        silos=silos,
        submit=not args.draft,
    )
    if args.id_only:
        note(
            f"plan {created['id']} {created['name']!r}: {created['status']}, hash "
            f"{created['plan_hash']}"
        )
        out(str(created["id"]))
        return EXIT_OK
    out(
        f"plan {created['id']} {created['name']!r}: {created['status']}, version "
        f"{created['version']}, hash {created['plan_hash']}"
    )
    _print_approval_state(created)
    return EXIT_OK


def _print_approval_state(plan: dict[str, Any]) -> None:
    state = plan.get("approval_state")
    if not state:
        return
    if state.get("satisfied"):
        out("  approvals: the rules are satisfied; the plan can run")
        return
    if state.get("stewards_missing"):
        out(f"  waiting for the stewards of the silos: {', '.join(state['stewards_missing'])}")
    approved = state.get("organizations_approved") or []
    needed = state.get("organizations_needed")
    if needed:
        # The server's progress text caps at what is needed ("met", never "5 of 3 needed").
        parts = {part.get("name"): part for part in state.get("parts") or []}
        progress = (parts.get("organizations") or {}).get("progress") or (
            "met" if len(approved) >= needed else f"{len(approved)} of {needed} needed"
        )
        out(
            f"  organisations: {progress}"
            + (f" (approved: {', '.join(approved)})" if approved else "")
        )
    if state.get("rejected_by"):
        out(f"  rejected by: {', '.join(state['rejected_by'])}")


def cmd_plan_status(args: argparse.Namespace) -> int:
    client = _client(args)
    if args.plan is None:
        plans = client.plans(consortium=args.consortium)
        if args.format == "json":
            _json(plans)
        elif not plans:
            out("no plans visible to you")
        else:
            rows = [
                [p["id"], p["name"], p["status"], p["version"], (p.get("plan_hash") or "")[:12]]
                for p in plans
            ]
            out(_table(rows, ["id", "name", "status", "version", "hash"]))
        return EXIT_OK
    plan = client.plan(args.plan)
    if args.format == "json":
        _json(plan)
        return EXIT_OK
    out(f"plan {plan['id']} {plan['name']!r} (consortium {plan['consortium']}): {plan['status']}")
    out(f"  proposed by {plan['proposed_by']}; version {plan['version']}, hash {plan['plan_hash']}")
    version = plan.get("current_version") or {}
    if version.get("silos"):
        out(f"  silos: {', '.join(map(str, version['silos']))}")
    if plan.get("rejection_reason"):
        out(f"  rejection reason: {plan['rejection_reason']}")
    _print_approval_state(plan)
    return EXIT_OK


# --- approvals -----------------------------------------------------------------------------------


def _acting_organization(
    me: dict[str, Any], consortium: int, requested: int | None
) -> tuple[int, str]:
    """The organisation a steward (or organisation admin) decides for in this consortium."""
    orgs = {
        m["organization"]: m["organization_name"]
        for m in me.get("memberships", [])
        if m["consortium"] == consortium and m["role"] in (STEWARD, ORG_ADMIN)
    }
    if requested is not None:
        if requested not in orgs:
            raise CliError(
                f"you are not a data steward or organisation admin of organisation {requested} "
                "in this plan's consortium"
            )
        return requested, orgs[requested]
    if len(orgs) == 1:
        return next(iter(orgs.items()))
    if not orgs:
        raise CliError("you are not a data steward or organisation admin in this plan's consortium")
    listed = ", ".join(f"{oid} ({name})" for oid, name in sorted(orgs.items()))
    raise CliError(f"you act for several organisations ({listed}): pass --organization ID")


def _reviewed_hash(plan: dict[str, Any], given: str | None) -> str:
    current = plan.get("plan_hash")
    if not current:
        raise CliError(f"plan {plan['id']} has no version to decide on")
    if given:
        given = given.strip().lower()
        if len(given) < 8 or not current.startswith(given):
            raise CliError(
                f"--hash {given} is not the current version's hash {current} of plan "
                f"{plan['id']}: the plan changed since you reviewed it; review it again "
                "(`quorum plan status`)"
            )
    return current


def cmd_approve(args: argparse.Namespace) -> int:
    client = _client(args)
    plan = client.plan(args.plan)
    plan_hash = _reviewed_hash(plan, args.hash)
    me = client.me()
    organization, org_name = _acting_organization(me, plan["consortium"], args.organization)
    signature = None
    if args.key:
        from fedcore import approvals

        key = _load_steward_key(args.key)
        consortium_name = (
            _my_consortia(me).get(plan["consortium"])
            or client.consortium(plan["consortium"])["name"]
        )
        signature = approvals.sign_approval(
            key, consortium=consortium_name, organization=org_name, plan_hash=plan_hash
        )
    decision = client.approve_plan(
        args.plan, plan_hash=plan_hash, organization=organization, signature=signature
    )
    signed = " (signed with your steward key)" if signature else ""
    out(
        f"approved plan {args.plan} version {decision.get('version')} (hash {plan_hash}) "
        f"for {org_name}{signed}"
    )
    _print_approval_state(client.plan(args.plan))
    return EXIT_OK


def _load_steward_key(path: str) -> Any:
    """The steward's key file as ``quorum-agent steward-key new`` writes it (PEM, Ed25519)."""
    from fedcore import signing

    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise CliError(f"cannot read the steward key {path}: {exc.strerror or exc}") from None
    try:
        return signing.private_key_from_pem(data)
    except ValueError as exc:
        raise CliError(
            f"{path} is not an Ed25519 private key in PEM ({exc}); create one with "
            "`quorum-agent steward-key new --out FILE`"
        ) from None


def cmd_reject(args: argparse.Namespace) -> int:
    client = _client(args)
    plan = client.plan(args.plan)
    plan_hash = _reviewed_hash(plan, args.hash)
    organization, org_name = _acting_organization(
        client.me(), plan["consortium"], args.organization
    )
    decision = client.reject_plan(
        args.plan, plan_hash=plan_hash, reason=args.reason, organization=organization
    )
    out(
        f"rejected plan {args.plan} version {decision.get('version')} (hash {plan_hash}) "
        f"for {org_name}"
    )
    return EXIT_OK


# --- runs ----------------------------------------------------------------------------------------


def cmd_run_start(args: argparse.Namespace) -> int:
    client = _client(args)
    run = client.start_run(args.plan)
    if args.id_only:
        note(f"run {run['id']} of plan {run['plan']}: {run['status']}, {run['rounds']} rounds")
        out(str(run["id"]))
        return EXIT_OK
    out(
        f"run {run['id']} of plan {run['plan']} {run['plan_name']!r} (version {run['version']}): "
        f"{run['status']}, {run['rounds']} rounds"
    )
    out(f"follow it with: quorum run watch {run['id']}")
    return EXIT_OK


def _latest_metrics(rounds: list[dict[str, Any]]) -> tuple[int, dict[str, float]]:
    """The last round that has metrics, and those metrics as 'scope/name' -> value."""
    for round_ in sorted(rounds, key=lambda r: (r["number"], r.get("attempt", 0)), reverse=True):
        metrics = {f"{m['scope']}/{m['name']}": m["value"] for m in round_.get("metrics") or []}
        if metrics:
            return round_["number"], metrics
    return 0, {}


def _finished_rounds(run: dict[str, Any]) -> int:
    return len(
        {r["number"] for r in run.get("round_summary", []) if r.get("status") == "completed"}
    )


def _progress_line(run: dict[str, Any], rounds: list[dict[str, Any]], width: int = 30) -> str:
    total = max(int(run.get("rounds") or 0), 1)
    done = min(_finished_rounds(run), total)
    filled = round(width * done / total)
    bar = "#" * filled + "-" * (width - filled)
    _, metrics = _latest_metrics(rounds)
    shown = " ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items())[:4])
    waiting = " waiting for silos" if run.get("waiting_since") else ""
    return (
        f"run {run['id']} [{bar}] {done}/{total} rounds {run['status']}{waiting} {shown}".rstrip()
    )


def watch(client: Client, run_id: int, *, interval: float, stream: TextIO) -> dict[str, Any]:
    """Poll the run until it finishes; a live bar on a terminal, a line per change otherwise."""
    tty = stream.isatty()
    last = ""
    while True:
        run = client.run(run_id)
        line = _progress_line(run, client.rounds(run_id))
        if tty:  # one line redrawn in place, cut to the terminal's width so it never wraps
            width = shutil.get_terminal_size().columns - 1
            stream.write("\r\x1b[2K" + line[:width])
            stream.flush()
        elif line != last:
            stream.write(line + "\n")
            stream.flush()
        last = line
        if run["status"] in FINISHED:
            if tty:
                stream.write("\n")
            return run
        time.sleep(interval)


def cmd_run_watch(args: argparse.Namespace) -> int:
    client = _client(args)
    try:
        run = watch(client, args.run, interval=args.interval, stream=sys.stdout)
    except KeyboardInterrupt:
        out("\nstopped watching (the run goes on)")
        return EXIT_OK
    if run["status"] != "completed":
        reason = f": {run['error']}" if run.get("error") else ""
        print(f"quorum: run {args.run} {run['status']}{reason}", file=sys.stderr)
        return EXIT_ERROR
    warning = run.get("fairness_warning")
    if warning:  # completed, but not cleanly: the final model exceeds a fairness limit
        print(
            f"quorum: warning: run {args.run} completed, but {warning['message']}", file=sys.stderr
        )
    out(f"run {args.run} completed; see `quorum run results {args.run}`")
    return EXIT_OK


def results(client: Client, run_id: int) -> tuple[dict[str, Any], list[str]]:
    """The run's metrics, fairness and privacy reports; and what the server does not offer."""
    run = client.run(run_id)  # a missing run is a plain 404 before any report is asked for
    rounds = client.rounds(run_id)
    number, final = _latest_metrics(rounds)
    report: dict[str, Any] = {
        "run": {
            k: run.get(k)
            for k in ("id", "plan", "plan_name", "status", "rounds", "fairness_warning")
        },
        "metrics": {"round": number, "values": final},
        # the final model's pooled evaluation (an evaluation plan's run: its only result)
        "final_evaluation": run.get("final_evaluation"),
        "rounds": [
            {
                "number": r["number"],
                "status": r["status"],
                "metrics": {
                    f"{m['scope']}/{m['name']}": m["value"] for m in r.get("metrics") or []
                },
            }
            for r in rounds
        ],
    }
    missing = []
    for key, what, fetch in (
        ("fairness", "the fairness report", client.fairness),
        ("privacy", "the privacy report", client.privacy),
    ):
        try:
            report[key] = fetch(run_id)
        except QuorumError as exc:
            if exc.status != 404:
                raise
            report[key] = None
            missing.append(f"the server does not offer {what} of run {run_id} (404)")
    return report, missing


def _flat_rows(data: Any, prefix: str = "") -> list[list[Any]]:
    if isinstance(data, dict):
        rows = []
        for key, value in data.items():
            rows += _flat_rows(value, f"{prefix}.{key}" if prefix else str(key))
        return rows
    if isinstance(data, list) and data and all(isinstance(item, dict) for item in data):
        rows = []
        for i, item in enumerate(data):
            rows += _flat_rows(item, f"{prefix}[{i}]")
        return rows
    if isinstance(data, float):
        data = f"{data:.6g}"
    return [[prefix, json.dumps(data) if isinstance(data, list) else data]]


def cmd_run_results(args: argparse.Namespace) -> int:
    client = _client(args)
    report, missing = results(client, args.run)
    for line in missing:
        print(f"quorum: {line}", file=sys.stderr)
    if args.format == "json":
        _json(report)
        return EXIT_OK
    run = report["run"]
    out(f"run {run['id']} of plan {run['plan']} {run['plan_name']!r}: {run['status']}")
    if run.get("fairness_warning"):
        out(f"warning: {run['fairness_warning']['message']}")
    out()
    metrics = report["metrics"]
    if metrics["values"]:
        out(f"metrics (round {metrics['round']})")
        rows = [[k, f"{v:.6g}"] for k, v in sorted(metrics["values"].items())]
        out(_table(rows, ["metric", "value"]))
    elif not report.get("final_evaluation"):
        out("metrics: none yet")
    _print_final_evaluation(report.get("final_evaluation"))
    for key in ("fairness", "privacy"):
        if report.get(key) is None:
            continue
        shown = report[key]
        if key == "fairness" and isinstance(shown, dict):
            # The table shows the latest report's view; every round's raw report is in JSON.
            latest = shown.get("latest") or {}
            limits = {
                f"limit: {item.get('label')}": item.get("value")
                for item in shown.get("plan_limits") or []
                if isinstance(item, dict)
            }
            shown = {"note": shown.get("note")}
            if latest:
                shown = {
                    **shown,
                    "round": latest.get("round"),
                    "model_version": latest.get("model_version"),
                    **limits,
                    **{
                        k: v
                        for k, v in report[key].items()
                        if k in ("attributes", "spread", "flags") and v
                    },
                }
        out()
        out(key)
        out(_table(_flat_rows(shown), ["field", "value"]))
    return EXIT_OK


def cmd_run_analysis(args: argparse.Namespace) -> int:
    from fedcore.analytics.tables import analysis_table

    data = _client(args).analysis(args.run)
    if args.format == "json":
        _json(data)
        return EXIT_OK
    result = data.get("result")
    if data.get("kind") is None:
        raise CliError(
            f"run {args.run} is a training run, not an analysis (see: quorum run results)"
        )
    if result is None:
        why = data.get("error") or (
            f"the sites are answering step {data['step']!r}" if data.get("step") else "not yet"
        )
        raise CliError(f"run {args.run} has released no {data['kind']} result: {why}")
    header, rows = analysis_table(result)
    if args.format == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in row] for row in rows])
        return EXIT_OK
    out(f"run {args.run}: {data['kind']} from {result.get('sites')} site(s), {data['status']}")
    shown = [
        ["suppressed" if v is None else (f"{v:.6g}" if isinstance(v, float) else v) for v in row]
        for row in rows
    ]
    out(_table(shown, [str(h) for h in header]))
    for key in ("logrank", "coarsening", "stratified_by_site", "ties", "r_squared"):
        if key in result:
            value = result[key]
            if key == "logrank":
                value = f"chi-square {value['statistic']:.6g}, p = {value['p_value']:.4g}"
            out(f"{key}: {value}")
    if result.get("noise"):
        out(f"noise: {result['noise']['note']}")
    return EXIT_OK


def _number(value: Any) -> str:
    return "—" if value is None else f"{value:.6g}"


def _evaluated(final: dict[str, Any]) -> str:
    """What a final evaluation is about: a run's final model, an evaluation plan's version of a
    run, or an uploaded model."""
    source = final.get("source")
    if not source:
        return f"final model v{final.get('model_version')}, pooled held-out rows"
    if source.get("uploaded") is not None:
        return (
            f"uploaded model {source['uploaded']} {source.get('name')!r} by "
            f"{source.get('uploaded_by') or '-'}, {final.get('rows_note')}"
        )
    return f"model v{source['model_version']} of run {source['run']}, {final.get('rows_note')}"


def _print_final_evaluation(final: dict[str, Any] | None) -> None:
    """The pooled evaluation's figures and its calibration curve, as tables."""
    if not final or not final.get("metrics"):
        return
    what = _evaluated(final)
    out()
    out(f"evaluation ({what})")
    keys = ("auc", "auc_error_bound", "accuracy", "loss", "n")
    out(_table([[k, _number(final["metrics"].get(k))] for k in keys], ["metric", "value"]))
    curve = final.get("calibration")
    if curve:
        out()
        ece = _number(curve.get("expected_calibration_error"))
        out(f"calibration (expected calibration error {ece})")
        rows = [
            [
                f"{row['lower']:g}-{row['upper']:g}",
                row["count"],
                row["positives"],
                _number(row["mean_predicted"]),
                _number(row["observed_rate"]),
            ]
            for row in curve["rows"]
        ]
        out(_table(rows, ["bin", "rows", "positives", "mean predicted", "observed rate"]))


# --- models --------------------------------------------------------------------------------------


def _model_version_id(client: Client, target: str) -> int:
    """``model:N`` is model version N; a plain number is a run, whose latest version is taken."""
    if target.startswith("model:"):
        try:
            return int(target.split(":", 1)[1])
        except ValueError:
            raise CliError(f"{target!r}: give a model version as model:ID, like model:12") from None
    try:
        run_id = int(target.removeprefix("run:"))
    except ValueError:
        raise CliError(
            f"{target!r} is neither a run id (5 or run:5) nor a model version (model:12)"
        ) from None
    versions = client.run_models(run_id)
    if not versions:
        raise CliError(f"run {run_id} has no model version yet")
    final = [v for v in versions if v.get("final")]
    chosen = final[-1] if final else max(versions, key=lambda v: v.get("number", 0))
    if "id" not in chosen:
        raise QuorumError(
            "the server does not offer model downloads: its model list gives no model id",
            status=404,
        )
    return int(chosen["id"])


def cmd_model_download(args: argparse.Namespace) -> int:
    client = _client(args)
    version_id = _model_version_id(client, args.target)
    try:
        info = client.model_version(version_id)
    except QuorumError as exc:
        raise _not_offered(
            f"model version {version_id} (/api/v1/models/{version_id}/)", exc
        ) from None
    if args.format == "onnx":
        path, expected = f"models/{version_id}/onnx/", info.get("onnx_checksum")
    else:
        path, expected = f"models/{version_id}/download/", info.get("checksum")
    try:
        download = client.download(path, expected_sha256=expected)
    except QuorumError as exc:
        raise _not_offered(f"the {args.format} download of model {version_id}", exc) from None
    checked = f"SHA-256 {download.sha256} verified"
    if download.expected_sha256 is None and args.format == "onnx":
        # The ONNX file is exported on request and has no stored checksum; the server names the
        # checksum of the model it exported, which must be this version's.
        source = download.headers.get("x-source-checksum-sha256", "").strip().lower()
        if not source or source != str(info.get("checksum", "")).lower():
            raise CliError(
                f"the ONNX export of model {version_id} does not name the model it was exported "
                f"from as this version (X-Source-Checksum-SHA256 {source or 'missing'}, "
                f"expected {info.get('checksum')}); nothing written"
            )
        checked = (
            f"exported from the model with SHA-256 {source} (verified); the ONNX file's "
            f"SHA-256 is {download.sha256}"
        )
    elif download.expected_sha256 is None:
        raise CliError(
            f"the server gave no SHA-256 checksum for the {args.format} file of model "
            f"{version_id}; nothing written (its SHA-256 is {download.sha256})"
        )
    elif not download.verified:
        raise CliError(
            f"the downloaded {args.format} file of model {version_id} does not match its "
            f"checksum (expected {download.expected_sha256}, got {download.sha256}); "
            "nothing written"
        )
    target = Path(args.out).expanduser()
    tmp = target.with_name(target.name + ".part")
    try:
        tmp.write_bytes(download.data)
        os.replace(tmp, target)
    except OSError as exc:
        raise CliError(f"cannot write {target}: {exc.strerror or exc}") from None
    out(
        f"model {version_id} ({args.format}, {len(download.data)} bytes) written to {target}; "
        + checked
    )
    return EXIT_OK


def _json_file(path: str, what: str) -> Any:
    try:
        return json.loads(Path(path).expanduser().read_text(encoding="utf-8"))
    except OSError as exc:
        raise CliError(f"cannot read the {what} file {path}: {exc.strerror or exc}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CliError(f"the {what} file {path} is not JSON: {exc}") from None


def cmd_model_upload(args: argparse.Namespace) -> int:
    client = _client(args)
    consortium = _consortium_id(client, args.consortium)
    model = _json_file(args.model, "model spec")
    schema = _json_file(args.schema, "schema")
    preprocessing = _json_file(args.preprocessing, "preprocessing")
    weights_path = Path(args.weights).expanduser()
    try:
        weights = weights_path.read_bytes()
    except OSError as exc:
        raise CliError(
            f"cannot read the weights file {args.weights}: {exc.strerror or exc}"
        ) from None
    uploaded = client.upload_model(
        consortium,
        name=args.name,
        description=args.description,
        model=model,
        schema=schema,
        preprocessing=preprocessing,
        weights=weights,
        filename=weights_path.name,
    )
    out(
        f"uploaded model {uploaded['id']} {uploaded['name']!r} to consortium {consortium} "
        f"({uploaded['size_bytes']} bytes, SHA-256 {uploaded['checksum']})"
    )
    note("an evaluation plan evaluates it with:")
    reference = {"uploaded": uploaded["id"], "sha256": uploaded["checksum"]}
    note(f'  "model_version": {json.dumps(reference)}')
    return EXIT_OK


def cmd_model_list(args: argparse.Namespace) -> int:
    client = _client(args)
    consortium = _consortium_id(client, args.consortium)
    models = client.uploaded_models(consortium)
    if args.json:
        _json(models)
        return EXIT_OK
    rows = [
        [m["id"], m["name"], m.get("model", {}).get("kind"), m.get("uploaded_by"), m["checksum"]]
        for m in models
    ]
    out(_table(rows, ["id", "name", "kind", "uploaded by", "sha256"]))
    return EXIT_OK


# --- the parser ----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="quorum",
        description="Quorum's client for data scientists and stewards (docs/cli.md).",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.required = True

    login = commands.add_parser("login", help="store the server URL and your API token")
    login.add_argument("server", metavar="URL", help="the server, e.g. https://quorum.example.org")
    given = login.add_mutually_exclusive_group()
    given.add_argument("--token-stdin", action="store_true", help="read the token from stdin")
    given.add_argument("--token", help="the token (visible in your shell history: prefer stdin)")
    given.add_argument(
        "--username", help="create a token with your username and password (asked, or stdin)"
    )
    login.add_argument(
        "--password-stdin",
        action="store_true",
        help="with --username: read the password from stdin",
    )
    login.add_argument(
        "--days", type=int, metavar="N", help="with --username: days until the token expires"
    )
    login.set_defaults(func=cmd_login)

    org = commands.add_parser("org", help="the consortium's member organisations")
    org_commands = org.add_subparsers(dest="org_command", metavar="ACTION")
    org_commands.required = True
    org_list = org_commands.add_parser("list", help="the organisations, with their ids")
    org_list.add_argument("--consortium", type=int, metavar="ID", help="when you are in several")
    org_list.set_defaults(func=cmd_org_list)
    org_create = org_commands.add_parser("create", help="add an organisation (consortium admin)")
    org_create.add_argument("name", metavar="NAME")
    org_create.add_argument("--kind", choices=ORG_KINDS, default="other")
    org_create.add_argument("--consortium", type=int, metavar="ID", help="when you are in several")
    org_create.set_defaults(func=cmd_org_create)

    invite = commands.add_parser(
        "invite", help="invite someone by e-mail to a role; prints the link (alone on stdout)"
    )
    invite.add_argument("email", metavar="EMAIL")
    invite.add_argument("--org", required=True, metavar="ORG", help="organisation id or name")
    invite.add_argument("--role", required=True, choices=ROLES)
    invite.add_argument("--days", type=int, metavar="N", help="days until the link expires")
    invite.add_argument("--consortium", type=int, metavar="ID", help="when you are in several")
    invite.set_defaults(func=cmd_invite)

    invitation = commands.add_parser("invitation", help="accept an invitation link")
    invitation_commands = invitation.add_subparsers(dest="invitation_command", metavar="ACTION")
    invitation_commands.required = True
    accept = invitation_commands.add_parser(
        "accept",
        help="accept a link: a new account with --username (then logged in), or as yourself",
    )
    accept.add_argument("link", metavar="LINK")
    accept.add_argument("--username", help="the username to choose (a new account)")
    accept.add_argument(
        "--password-stdin", action="store_true", help="read the new password from stdin"
    )
    accept.set_defaults(func=cmd_invitation_accept)

    silo = commands.add_parser("silo", help="register and admit silos")
    silo_commands = silo.add_subparsers(dest="silo_command", metavar="ACTION")
    silo_commands.required = True
    register = silo_commands.add_parser(
        "register", help="register your organisation's silo (steward); prints its id"
    )
    register.add_argument("--name", required=True)
    register.add_argument(
        "--schema", required=True, metavar="FILE", help="schema.json (quorum-agent init)"
    )
    rows = register.add_mutually_exclusive_group()
    rows.add_argument("--rows", type=int, metavar="N", help="the number of data rows")
    rows.add_argument("--data", metavar="FILE", help="count the rows of this CSV here")
    register.add_argument("--description", default="")
    register.add_argument("--location", default="", help="where the data lives (free text)")
    register.add_argument("--org", metavar="ORG", help="when you steward several")
    register.add_argument("--consortium", type=int, metavar="ID")
    register.set_defaults(func=cmd_silo_register)
    admit = silo_commands.add_parser(
        "admit", help="admit a pending silo (consortium admin); prints its agent token once"
    )
    admit.add_argument("silo", type=int, metavar="ID")
    admit.set_defaults(func=cmd_silo_admit)

    silos = commands.add_parser("silos", help="the silos you can see, with their schemas")
    silos.add_argument("--consortium", type=int, metavar="ID")
    silos.add_argument("--admission", choices=["pending", "admitted", "rejected"])
    silos.add_argument("--format", choices=["table", "json"], default="table")
    silos.set_defaults(func=cmd_silos)

    plan = commands.add_parser("plan", help="validate, propose and follow training plans")
    plan_commands = plan.add_subparsers(dest="plan_command", metavar="ACTION")
    plan_commands.required = True
    validate = plan_commands.add_parser("validate", help="check a plan file locally")
    validate.add_argument("file", metavar="FILE", help="the plan, YAML (.yaml/.yml) or JSON")
    validate.set_defaults(func=cmd_plan_validate)
    propose = plan_commands.add_parser("propose", help="propose a plan file to the consortium")
    propose.add_argument("file", metavar="FILE", help="the plan, YAML (.yaml/.yml) or JSON")
    propose.add_argument("--name", help="the plan's name (or 'name' in the file)")
    propose.add_argument("--description", help="what the plan is for")
    propose.add_argument(
        "--silos", type=_parse_ids, metavar="IDS", help="silo ids, e.g. 1,2,3 (default: all)"
    )
    propose.add_argument("--consortium", type=int, metavar="ID", help="when you are in several")
    propose.add_argument("--draft", action="store_true", help="do not submit it for approval")
    propose.add_argument(
        "--id-only", action="store_true", help="print only the plan's id on stdout (scripts)"
    )
    propose.set_defaults(func=cmd_plan_propose)
    status = plan_commands.add_parser("status", help="a plan's approval state, or every plan")
    status.add_argument("plan", nargs="?", type=int, metavar="ID")
    status.add_argument("--consortium", type=int, metavar="ID")
    status.add_argument("--format", choices=["table", "json"], default="table")
    status.set_defaults(func=cmd_plan_status)

    for name, func, text in (
        ("approve", cmd_approve, "approve a plan's current version for your organisation"),
        ("reject", cmd_reject, "reject a plan's current version, with a reason"),
    ):
        decide = commands.add_parser(name, help=text)
        decide.add_argument("plan", type=int, metavar="PLAN")
        decide.add_argument(
            "--hash", help="the hash you reviewed (or a prefix of 8+): refused if the plan changed"
        )
        decide.add_argument(
            "--organization", type=int, metavar="ID", help="when you act for several"
        )
        if name == "approve":
            decide.add_argument(
                "--key",
                metavar="FILE",
                help="sign with your steward key (quorum-agent steward-key new)",
            )
        else:
            decide.add_argument("--reason", required=True)
        decide.set_defaults(func=func)

    run = commands.add_parser("run", help="start, watch and read runs")
    run_commands = run.add_subparsers(dest="run_command", metavar="ACTION")
    run_commands.required = True
    start = run_commands.add_parser("start", help="start a run of an approved plan")
    start.add_argument("plan", type=int, metavar="PLAN")
    start.add_argument(
        "--id-only", action="store_true", help="print only the run's id on stdout (scripts)"
    )
    start.set_defaults(func=cmd_run_start)
    watch_parser = run_commands.add_parser("watch", help="follow a run's rounds until it ends")
    watch_parser.add_argument("run", type=int, metavar="RUN")
    watch_parser.add_argument("--interval", type=float, default=2.0, metavar="SECONDS")
    watch_parser.set_defaults(func=cmd_run_watch)
    res = run_commands.add_parser("results", help="a run's metrics, fairness and privacy")
    res.add_argument("run", type=int, metavar="RUN")
    res.add_argument("--format", choices=["table", "json"], default="table")
    res.set_defaults(func=cmd_run_results)
    analysis = run_commands.add_parser(
        "analysis", help="an analysis run's released result (table, CSV or JSON)"
    )
    analysis.add_argument("run", type=int, metavar="RUN")
    analysis.add_argument("--format", choices=["table", "csv", "json"], default="table")
    analysis.set_defaults(func=cmd_run_analysis)

    model = commands.add_parser("model", help="download trained models, upload others")
    model_commands = model.add_subparsers(dest="model_command", metavar="ACTION")
    model_commands.required = True
    download = model_commands.add_parser(
        "download", help="download a run's latest model (RUN) or one version (model:ID)"
    )
    download.add_argument("target", metavar="RUN|model:ID")
    download.add_argument("--format", choices=["safetensors", "onnx"], default="safetensors")
    download.add_argument("--out", required=True, metavar="FILE")
    download.set_defaults(func=cmd_model_download)
    upload = model_commands.add_parser(
        "upload",
        help="upload a model trained elsewhere, for evaluation plans (data scientist, admin)",
    )
    upload.add_argument("--name", required=True)
    upload.add_argument("--description", default="")
    upload.add_argument("--model", required=True, metavar="FILE", help="the model spec (JSON)")
    upload.add_argument("--schema", required=True, metavar="FILE", help="its dataset schema")
    upload.add_argument(
        "--preprocessing", required=True, metavar="FILE", help="its fitted preprocessing (JSON)"
    )
    upload.add_argument("--weights", required=True, metavar="FILE", help="a .safetensors file")
    upload.add_argument("--consortium", type=int, metavar="ID")
    upload.set_defaults(func=cmd_model_upload)
    listing = model_commands.add_parser("list", help="the consortium's uploaded models")
    listing.add_argument("--consortium", type=int, metavar="ID")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_model_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except QuorumError as exc:
        print(f"quorum: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("quorum: interrupted", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
