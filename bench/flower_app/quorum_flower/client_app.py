"""The ClientApp: one site trains a round exactly as Quorum's agent does.

The node's ``site`` and the bench folder come from the SuperNode's node config. The site's data
file, the plan and the fitted preprocessing are the ones Quorum's run used (written by
bench/_flower.py); training, evaluation and the update's weights come from
``clientagent.trainer.handle_task``, the function Quorum's agent calls for every task, so both
frameworks do the same work per round and differ only in what carries it.
"""

from __future__ import annotations

import json
import time
from functools import cache
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from clientagent.data import LocalData
from clientagent.trainer import handle_task
from fedcore import protocol, tensors

app = ClientApp()


@cache
def _site_data(path: str) -> LocalData:
    return LocalData(path)  # cached for the life of this process (its split and arrays too)


@cache
def _settings(folder: str) -> dict[str, Any]:
    return json.loads((Path(folder) / "settings.json").read_text())


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global model on this site's split; reply with the new weights."""
    started = time.time()
    folder = str(context.node_config["bench-dir"])
    site = str(context.node_config["site"])
    settings = _settings(folder)
    state = msg.content["arrays"].to_torch_state_dict()
    rnd = int(msg.content["config"]["server-round"])
    task = protocol.BinaryMessage(
        type="task",
        fields={
            "run": 1,
            "round": rnd,
            "rounds": settings["rounds"],
            "plan_hash": settings["plan_hash"],
            "plan": settings["plan"],
            "preprocessing": settings["preprocessing"],
            "deadline": time.time() + 120.0,
        },
        payload=tensors.encode_state_dict(state),
    )
    update = handle_task(task, _site_data(str(Path(folder) / f"{site}.csv")), silo=site)
    timing = update.fields["metrics"].get("timing") or {}
    metrics = MetricRecord(
        {
            "num-examples": int(update.fields["num_examples"]),
            "train-seconds": float(timing.get("train_seconds", 0.0)),
            "clientapp-seconds": time.time() - started,
        }
    )
    reply = RecordDict(
        {
            "arrays": ArrayRecord(tensors.decode_state_dict(update.payload)),
            "metrics": metrics,
        }
    )
    return Message(content=reply, reply_to=msg)
