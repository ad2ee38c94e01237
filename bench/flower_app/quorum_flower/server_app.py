"""The ServerApp: Flower's FedAvg over every site, from the initial model Quorum's run used.

No client-side evaluation round (Quorum's agents evaluate inside the training task, and so does
the ClientApp). Each round's end is stamped in ``rounds.jsonl`` of the bench folder by the
centralised-evaluation hook, which Flower calls once before round 1 and after every round: the
per-round wall time is the gap between consecutive stamps, as for Quorum.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from flwr.app import ArrayRecord, Context, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from fedcore import tensors

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the plan's rounds with FedAvg, stamping each round's end."""
    folder = Path(str(context.run_config["bench-dir"]))
    rounds = int(context.run_config["num-server-rounds"])
    nodes = int(context.run_config["min-nodes"])
    initial = tensors.decode_state_dict((folder / "initial.safetensors").read_bytes())
    stamps = folder / "rounds.jsonl"
    latest: dict[str, float] = {}

    def train_metrics(replies: list[RecordDict], weighting: str) -> MetricRecord:
        # The slowest ClientApp's train() (handle_task and the record conversions) this round.
        seconds = [float(r["metrics"]["clientapp-seconds"]) for r in replies]
        latest["slowest_clientapp_seconds"] = max(seconds, default=0.0)
        return aggregate_metricrecords(replies, weighting)

    def stamp(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        line = {"round": server_round, "time": time.time(), **latest}
        with stamps.open("a") as fh:
            fh.write(json.dumps(line) + "\n")
        latest.clear()
        return None

    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=nodes,
        min_available_nodes=nodes,
        train_metrics_aggr_fn=train_metrics,
    )
    strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(initial),
        num_rounds=rounds,
        evaluate_fn=stamp,
    )
