"""Where a round's seconds go: training, transfer, aggregation and orchestration, end to end.

    .venv/bin/python bench/round_split.py            # healthcare scenario, 5 sites, 20 rounds
    .venv/bin/python bench/round_split.py --quick    # 3 rounds
    .venv/bin/python bench/round_split.py --no-flower --statements   # Quorum only, every SQL
    .venv/bin/python bench/round_split.py --sites 50 --agents-per-process 10 --rounds 5

The healthcare demo's federation (UCI thyroid, five referral sources, the MLP 32-16 plan of
``manage.py demo``) runs through a REAL federation (``bench/_federation.py``: the ASGI server in
this process, five ``quorum-agent run`` processes, real websockets). Every figure comes from
timestamps the system records on every round:

* server (``federation.models.Round``): ``started_at`` (the round opens), ``aggregation_started_at``
  (the collection closed), ``finished_at`` (the new model is stored and committed); per update
  ``Update.received_at`` (validated and stored);
* agent (the update's ``metrics.timing``, measured by ``clientagent.trainer.handle_task``):
  ``train_seconds`` (local training), ``compute_seconds`` (all of handle_task: loading the
  split, decoding the global weights, the two evaluations, training, encoding); measured by
  ``clientagent.connection``: ``download_seconds``, from the server's ``sent_at`` stamp in the
  task to the task's last frame at the agent;
* transfer of the update (``metrics.transfer.upload_seconds``, added by the server's consumer):
  from the agent's ``sent_at`` stamp in the update to its last frame at the server.

The two transfer times compare two processes' wall clocks: on one host (here) that is exact;
across machines it would include their clock offset. They are the whole hand-over, not only
bytes on the wire: framing the message, the agent's fsynced sent-log line before an upload,
and each side's event loop getting to the frames (which, on a loaded machine, dominates for a
model of a few KiB).

The split of one round follows its critical path, the silo whose update arrived last (the
round waited for it):

    training       = that silo's train_seconds
    agent other    = its compute_seconds - train_seconds (evaluation, data, weights codec)
    transfer       = its download_seconds + upload_seconds
    aggregation    = finished_at - aggregation_started_at (server: strategy, blob, commit)
    orchestration  = the rest of finished_at - started_at: dispatching the task, the agent's
                     queueing, the server's receipt (validation, blob write, commit) and
                     noticing that the round is complete

Five agents share this machine's cores, so training times include waiting for a core, as they
would on an overloaded site. Printed: the mean over rounds of each part, its share of the round,
and per round the same split.

Also printed: the same critical path cut at the server's own events (``anatomy``), the server's
work per round counted in its process (``bench/_probe.py``: SQL statements by step, commits,
connections, thread hops, channel messages, queued steps), and the steady-state per-round wall
time (round end to round end, from round 2) next to Flower 1.42's for the same plan, site files,
fitted preprocessing, initial model and rounds through its deployment engine
(``bench/_flower.py``; skipped with ``--no-flower`` or when ``.venv-bench`` lacks Flower).
``--sites N`` deals the pooled rows into N sites that train one optimizer step a round.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import Table, bar, write_results  # noqa: E402

PARTS = ("training", "agent other", "transfer", "aggregation", "orchestration")


def round_split(round_: Any) -> dict[str, Any]:
    """The split of one completed round along its critical path (the last update received)."""
    updates = list(round_.updates.select_related("silo").order_by("received_at"))
    if not updates:
        raise RuntimeError(f"round {round_.number} has no updates")
    last = updates[-1]
    timing = last.metrics.get("timing") or {}
    transfer = last.metrics.get("transfer") or {}
    missing = [
        key
        for key, source in (
            ("train_seconds", timing),
            ("compute_seconds", timing),
            ("download_seconds", timing),
            ("upload_seconds", transfer),
        )
        if source.get(key) is None
    ]
    if missing:
        raise RuntimeError(
            f"round {round_.number}: the update of {last.silo.name} lacks {missing}; the agent "
            "or the server predates the round timing fields"
        )
    total = (round_.finished_at - round_.started_at).total_seconds()
    training = float(timing["train_seconds"])
    other = float(timing["compute_seconds"]) - training
    transfer_s = float(timing["download_seconds"]) + float(transfer["upload_seconds"])
    aggregation = (round_.finished_at - round_.aggregation_started_at).total_seconds()
    orchestration = total - training - other - transfer_s - aggregation
    return {
        "round": round_.number,
        "seconds": total,
        "training": training,
        "agent other": other,
        "transfer": transfer_s,
        "aggregation": aggregation,
        "orchestration": orchestration,
        "last silo": last.silo.name,
        "mean train all silos": float(
            np.mean(
                [float((u.metrics.get("timing") or {}).get("train_seconds", 0)) for u in updates]
            )
        ),
        "updates": len(updates),
    }


SEGMENTS = (
    "task out",
    "download",
    "agent compute",
    "agent other hops",
    "upload",
    "receipt wait",
    "receipt",
    "notice",
    "aggregation",
)
ORCHESTRATION_SEGMENTS = ("task out", "agent other hops", "receipt wait", "receipt", "notice")
COUNTED = (
    ("queries", "query"),
    ("  SELECT", "query:SELECT"),
    ("  INSERT", "query:INSERT"),
    ("  UPDATE", "query:UPDATE"),
    ("  DELETE", "query:DELETE"),
    ("  other (BEGIN, SAVEPOINT, PRAGMA)", "query:other"),
    ("commits", "commit"),
    ("connections opened", "connection"),
    ("thread hops", "hop"),
    ("channel-layer messages", "channel"),
    ("steps queued now", "enqueue:now"),
    ("deadline timers queued", "enqueue:timer"),
    ("run_advance calls", "step:run_advance"),
    ("sweeps", "step:sweep"),
)


def anatomy(round_: Any, probe: Any, window_start: float) -> dict[str, Any]:
    """One round's critical path cut at the server's own events (``bench/_probe.py``).

    task out: the round opens -> the last silo's task leaves (commit, channel layer, the task's
    database read and grant); download/upload: as in round_split; agent compute: its handle_task;
    agent other hops: the rest of the agent's time with the task (policy checks, hashing, thread
    hops, the sent log); receipt wait: the update's last frame -> its database work starts;
    receipt: validation, blob, commit; notice: receipt committed -> the round closes.
    """
    updates = list(round_.updates.select_related("silo").order_by("received_at"))
    last = updates[-1]
    silo = str(last.silo_id)
    opened = round_.started_at.timestamp()
    closed = round_.aggregation_started_at.timestamp()
    ended = round_.finished_at.timestamp()
    tasks = probe.times("task", silo, opened - 1.0, ended)
    receipts = probe.times("receive", silo, opened, ended + 1.0)
    timing = last.metrics.get("timing") or {}
    upload = float((last.metrics.get("transfer") or {}).get("upload_seconds", 0.0))
    download = float(timing.get("download_seconds", 0.0))
    compute = float(timing.get("compute_seconds", 0.0))
    if not tasks or not receipts:
        return {}
    task_out_at = max(at for at, _ in tasks if at <= ended)
    received_at, receipt = receipts[0]
    frames = probe.times("frame", silo, task_out_at, received_at)
    arrived = max(at for at, _ in frames) if frames else received_at - receipt
    agent = (arrived - upload) - (task_out_at + download)
    window = probe.between(window_start, ended)
    return {
        "task out": task_out_at - opened,
        "download": download,
        "agent compute": compute,
        "agent other hops": agent - compute,
        "upload": upload,
        "receipt wait": (received_at - receipt) - arrived,
        "receipt": receipt,
        "notice": closed - received_at,
        "aggregation": ended - closed,
        "counts": window.counts,
        "query seconds": window.seconds["query"],
        "seconds": window.seconds,
    }


def compare(
    periods: list[float], flower_ends: list[dict[str, float]], sites: int, note: str
) -> Table:
    """Quorum's and Flower's steady-state per-round wall time (rounds 2..N) and their ratio."""
    times = [end["time"] for end in flower_ends]
    flower = [b - a for a, b in zip(times[1:], times[2:], strict=False)]
    table = Table(
        f"per-round wall time, {sites} sites, steady state (round end to round end, from round 2)",
        ["framework", "mean s", "median s", "rounds", "Quorum / Flower", "bar <= 1"],
    )
    q_mean, q_median = float(np.mean(periods)), float(np.median(periods))
    table.row("Quorum", q_mean, q_median, len(periods), None, None)
    if flower:
        f_mean, f_median = float(np.mean(flower)), float(np.median(flower))
        table.row("Flower 1.42 deployment engine", f_mean, f_median, len(flower), None, None)
        ratio = q_mean / f_mean
        table.row("ratio (means)", None, None, None, ratio, bar(ratio <= 1.0))
        slowest = [end.get("slowest_clientapp_seconds", 0.0) for end in flower_ends[2:]]
        table.note(
            "Flower's slowest ClientApp train() a round (the same handle_task as Quorum's agent): "
            f"{float(np.mean(slowest)):.3f} s mean; the rest is a ClientApp process started per "
            "message and the engine's polling (SuperNode pulls every 3 s when idle, the "
            "ServerApp's send_and_receive every 3 s)"
        )
    table.note(f"Flower: {note}")
    return table


def run_flower(
    run: Any, sites: dict[str, tuple[Path, Any]], folder: Path, rounds: int
) -> tuple[list[dict[str, float]], str]:
    """The same plan, data, initial model and rounds through Flower's deployment engine.

    Returns each round's end (``_flower.FlowerDeployment.run``) and a note on how it ran.
    """
    from bench import _flower
    from federation.models import ModelVersion
    from federation.storage import blob_store

    missing = _flower.available()
    if missing is not None:
        return [], f"not run: {missing}"
    initial = blob_store().get(ModelVersion.objects.get(run=run, number=0).blob_key)
    flower_dir = folder / "flower"
    _flower.write_inputs(
        flower_dir,
        site_files={site: path for site, (path, _) in sites.items()},
        plan=run.version.spec,
        plan_hash=run.plan_hash,
        preprocessing=run.preprocessing,
        initial=initial,
        rounds=rounds,
    )
    print(f"Flower 1.42: a SuperLink and {len(sites)} SuperNodes on 127.0.0.1 ...", flush=True)
    deployment = _flower.FlowerDeployment.start(flower_dir, list(sites))
    try:
        ends = deployment.run(rounds)
    finally:
        deployment.close()
    return ends, f"{len(sites)} SuperNode processes, one SuperLink, ClientApp per message"


def main() -> None:
    """Run the plan through the live federation and print the per-round split."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=20, help="rounds of the plan (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="3 rounds: a smoke run")
    parser.add_argument(
        "--sites",
        type=int,
        default=5,
        help="5 (default): the demo's five sources; more: the pooled rows dealt into that many "
        "sites, one optimizer step each per round",
    )
    parser.add_argument(
        "--agents-per-process",
        type=int,
        default=1,
        help="agents sharing one process (default 1; e.g. 10 for --sites 50)",
    )
    parser.add_argument(
        "--no-flower", action="store_true", help="skip the same rounds through Flower"
    )
    parser.add_argument(
        "--statements",
        action="store_true",
        help="also print the SQL statements of a round, by the step that ran them",
    )
    args = parser.parse_args()
    if args.quick:
        args.rounds = 3
    started = time.monotonic()
    import torch

    torch.set_num_threads(1)  # the server's aggregation: tiny tensors, a shared machine

    from bench._federation import LiveFederation, configure_django

    home = configure_django()
    from federation.demo.scenarios import SCENARIOS
    from federation.models import Round

    scenario = SCENARIOS["healthcare"](seed=args.seed)
    plan = scenario.plan
    plan["training"]["rounds"] = args.rounds
    frames = scenario.sites
    if args.sites != len(frames):
        # Many sites: the five sources' rows pooled, shuffled and dealt into equal sites, each
        # training one optimizer step a round, so that what a round costs beyond training shows.
        pooled = pd.concat(list(frames.values()), ignore_index=True)
        pooled = pooled.sample(frac=1.0, random_state=args.seed).reset_index(drop=True)
        frames = {
            f"site{i:02d}": pooled.iloc[rows].reset_index(drop=True)
            for i, rows in enumerate(np.array_split(np.arange(len(pooled)), args.sites))
        }
        plan["training"]["local_steps"] = 1
    folder = Path(tempfile.mkdtemp(prefix="round-split-", dir=home))
    sites = {}
    for site, frame in frames.items():
        path = folder / f"{site}.csv"
        frame.to_csv(path, index=False)
        sites[site] = (path, plan["schema"])
    print(
        f"round split: healthcare scenario, {len(sites)} sites "
        f"({', '.join(f'{s} {len(f)}' for s, f in list(frames.items())[:6])}"
        f"{' ...' if len(frames) > 6 else ''} rows), "
        f"{args.rounds} rounds, MLP {plan['model'].get('hidden')}",
        flush=True,
    )
    from bench._probe import OverheadProbe

    probe = OverheadProbe.install(statements=args.statements)
    fed = LiveFederation.start(sites, agents_per_process=args.agents_per_process)
    try:
        result = fed.run_plan(plan, name=f"round split seed {args.seed}")
    finally:
        fed.close()
        probe.uninstall()
    rounds = list(
        Round.objects.filter(run=result.run, status=Round.Status.COMPLETED).order_by("number")
    )
    splits = [round_split(r) for r in rounds]
    flower_ends: list[dict[str, float]] = []
    flower_note = "not run (--no-flower)"
    if not args.no_flower:
        flower_ends, flower_note = run_flower(result.run, sites, folder, args.rounds)
    ends = [r.finished_at.timestamp() for r in rounds]
    periods = [b - a for a, b in zip(ends, ends[1:], strict=False)]  # steady state: from round 2
    anatomies = [
        anatomy(r, probe, (ends[i - 1] if i else r.started_at.timestamp() - 0.5))
        for i, r in enumerate(rounds)
    ][1:]
    anatomies = [a for a in anatomies if a]

    mean_round = float(np.mean([s["seconds"] for s in splits]))
    summary = Table(
        f"mean seconds per round over {len(splits)} rounds ({len(sites)} agents, one host)",
        ["part", "seconds", "share %"],
    )
    for part in PARTS:
        value = float(np.mean([s[part] for s in splits]))
        summary.row(part, value, 100.0 * value / mean_round)
    summary.row("round (end to end)", mean_round, 100.0)
    summary.note(
        "critical path: the silo whose update arrived last; training = its local training, "
        "agent other = the rest of its task handling, transfer = task download + update upload"
    )
    summary.note(
        f"mean local training over all silos: "
        f"{float(np.mean([s['mean train all silos'] for s in splits])):.3f} s per round"
    )

    summary.note(
        f"per-round wall time, steady state (round end to round end, rounds 2-{len(rounds)}): "
        f"{float(np.mean(periods)) if periods else float('nan'):.3f} s mean, "
        f"{float(np.median(periods)) if periods else float('nan'):.3f} s median"
    )
    summary.print()
    seg = Table(
        f"the critical path cut at the server's events, mean over rounds 2-{len(rounds)}",
        ["segment", "seconds", "share %", "orchestration"],
    )
    total_seg = float(np.mean([sum(a[k] for k in SEGMENTS) for a in anatomies]))
    for key in SEGMENTS:
        value = float(np.mean([a[key] for a in anatomies]))
        seg.row(key, value, 100.0 * value / total_seg, key in ORCHESTRATION_SEGMENTS)
    orch = float(np.mean([sum(a[k] for k in ORCHESTRATION_SEGMENTS) for a in anatomies]))
    seg.row("orchestration (the yes rows)", orch, 100.0 * orch / total_seg, True)
    seg.row("round (open -> model stored)", total_seg, 100.0, "-")
    seg.print()
    counts = Table(
        f"server work per round (previous round's end -> this round's end), mean over rounds "
        f"2-{len(rounds)}, {len(sites)} sites",
        ["what", "per round"],
    )
    for label, key in COUNTED:
        counts.row(label, float(np.mean([a["counts"][key] for a in anatomies])))
    counts.row("seconds in SQL statements", float(np.mean([a["query seconds"] for a in anatomies])))
    counts.print()
    hops = Counter()
    for a in anatomies:
        hops.update(
            {k: v for k, v in a["counts"].items() if k.startswith(("hop:", "channel:", "sql in:"))}
        )
    spent: Counter[str] = Counter()
    for a in anatomies:
        spent.update(a["seconds"])
    by_name = Table(
        "thread hops (count, seconds awaited), channel messages and SQL statements (count, "
        "seconds) per round, by function",
        ["what", "per round", "seconds"],
    )
    for key, value in sorted(hops.items()):
        by_name.row(key, value / len(anatomies), spent[key] / len(anatomies))
    by_name.print()
    if args.statements:
        texts: Counter[str] = Counter()
        for a in anatomies:
            texts.update({k[10:]: v for k, v in a["counts"].items() if k.startswith("statement:")})
        sql = Table("SQL statements per round, by step (--statements)", ["statement", "per round"])
        for key, value in sorted(texts.items()):
            sql.row(key, value / len(anatomies))
        sql.print()

    versus = compare(periods, flower_ends, len(sites), flower_note)
    versus.print()

    per_round = Table("per round", ["round", "seconds", *PARTS, "last silo"])
    for s in splits:
        per_round.row(s["round"], s["seconds"], *(s[p] for p in PARTS), s["last silo"])
    per_round.print()
    total = time.monotonic() - started
    print(
        f"run {result.seconds:.1f} s (statistics pass and {len(splits)} rounds); {total:.1f} s in all"
    )
    write_results(
        "round_split",
        {
            "summary": summary,
            "per_round": per_round,
            "segments": seg,
            "versus_flower": versus,
            "flower_ends": flower_ends,
            "counts": counts,
            "hops": by_name,
            "periods": periods,
            "settings": {
                "scenario": "healthcare",
                "sites": len(sites),
                "rounds": args.rounds,
                "seed": args.seed,
                "model": plan["model"],
                "training": plan["training"],
                "quick": args.quick,
            },
            "seconds": {"run": result.seconds, "total": total},
        },
    )


if __name__ == "__main__":
    main()
