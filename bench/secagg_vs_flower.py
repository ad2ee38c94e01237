"""Our SecAgg+ (fedcore.secagg) against Flower's SecAgg+, per round: time and bytes per client.

Both sides run every stage of a round in one process, with real client and server objects:

- ours: ``SecAggClient`` / ``SecAggServer``, every message carried as the frames Quorum sends
  over the websocket (``fedcore.protocol``): the stage messages as ``secagg`` JSON control
  frames (``encode_control``, payload through ``fedcore.secagg.wire``: bytes as base64), the
  masked vector as a binary ``masked_update`` message (``encode_binary``: prefix, JSON header,
  4 bytes per coordinate). Each frame is decoded again before the receiver sees it.
- Flower 1.42: its own code, not a re-implementation: ``SecAggPlusWorkflow`` (server) drives
  ``secaggplus_mod`` (one per client, with a ``Context`` each) through an in-process ``Grid``.
  Every ``Message`` crosses that grid the way Flower 1.42's transport carries it: split into
  its inflatable objects (Message, RecordDict, ConfigRecord, ArrayRecord, MetricRecord, ...),
  each ``deflate()``-d to the bytes that ``PushObject`` / ``PullObject`` carry, and inflated
  again on the other side (``inflate_object_from_contents``). Bytes are the sum of those
  deflated objects (protobuf body plus Flower's object header); the 64-character object ids
  and the gRPC/HTTP framing are not counted, as the websocket framing is not counted for us.

What is counted, both sides: every message a client receives (down) and sends (up) in the four
stages, the masked update included. The global model is not: the workflow is given an empty
ArrayRecord as the model, and our ``task`` message is outside secure aggregation.

Time: *client* is one client's compute summed over its stages (key generation, agreement,
share generation and encryption, masking, unmasking reply), averaged over the clients; for
Flower the time inside ``secaggplus_mod`` (which includes its state (de)serialisation into
the Context, part of how a Flower client keeps state between stages). *Server* is the
server's compute for the whole round (routing, summing, reconstruction, mask removal): for us
the time inside ``SecAggServer``; for Flower the workflow's wall time minus the clients' time
and minus the grid's (de)serialisation, which is not counted on either side (it includes
``configure_fit`` and ``aggregate_fit`` of a FedAvg over the already-unmasked mean).

Settings shared by both sides: clip 1.0, the same n, the same neighbourhood (a Harary ring
over a random permutation of the clients: our degree k is Flower's ``num_shares = k + 1``),
the same threshold t counted in the closed neighbourhood (Quorum's default ceil(2(k+1)/3)),
and dropouts at the masked-input stage (a client that shared keys but whose masked vector
never arrives). Differences that remain, by design of each side: Flower quantises to 2^22
levels with stochastic rounding and masks int64 values modulo 2^32 (8 bytes a coordinate on
the wire), uses P-384 ECDH keys in PEM, Fernet for shares, pycryptodome's GF(2^128) Shamir
and numpy's RandomState seeded with 32 bits; it also masks the example weight (one more
coordinate) and returns the weighted mean, which is multiplied by the number of clients to
compare with the plain sum. Ours quantises to floor((2^32 - 1) / n) levels, 4 bytes a
coordinate.

    .venv-bench/bin/python bench/secagg_vs_flower.py            # n = 10, 50, 100; P = 100,000
    .venv-bench/bin/python bench/secagg_vs_flower.py --quick    # n = 5, 10; P = 10,000
    .venv-bench/bin/python bench/secagg_vs_flower.py --n 20 --params 50000 --graph sparse
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import secrets
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench._common import Table, bar, write_results  # noqa: E402
from fedcore import protocol  # noqa: E402
from fedcore.secagg import SecAggClient, SecAggConfig, SecAggServer, Stage  # noqa: E402
from fedcore.secagg import wire as secagg_wire  # noqa: E402
from fedcore.secagg.graph import effective_degree  # noqa: E402

BYTES_BAR = 0.55  # our bytes per client at most this fraction of Flower's
CLIP = 1.0
FLOWER_MAX_WEIGHT = 1000.0  # the workflow's default; every client reports this many examples
FLOWER_QUANTIZATION_RANGE = 2**22  # the workflow's default


@dataclass
class Setting:
    """One comparison: n clients, P parameters, a graph and the clients that drop out."""

    n: int
    params: int
    graph: str  # "complete" or "sparse"
    degree: int  # effective degree k (n - 1 for the complete graph)
    threshold: int
    dropped: tuple[int, ...]  # indices into the client list, dropping at the masked input

    @property
    def ours_degree(self) -> int | None:
        """Degree for SecAggConfig: None for the complete graph."""
        return None if self.graph == "complete" else self.degree


@dataclass
class Outcome:
    """What one side measured for one setting."""

    client_s: list[float]  # per client, all stages
    server_s: float
    up: dict[int, int]  # bytes sent, by client index
    down: dict[int, int]  # bytes received, by client index
    max_error: float
    tolerance: float
    extra: dict[str, Any] = field(default_factory=dict)

    def per_client(self, survivors: list[int]) -> tuple[float, float]:
        """Mean bytes up and down over the clients that completed the round."""
        return (
            float(np.mean([self.up[i] for i in survivors])),
            float(np.mean([self.down[i] for i in survivors])),
        )


def make_setting(n: int, params: int, graph: str, drop_fraction: float, seed: int) -> Setting:
    """The degree, threshold and dropouts of one comparison."""
    if graph == "complete":
        k = n - 1
    else:
        # Bell et al.: a degree growing like log n; an even k so both sides build H(k, n).
        k = min(n - 1, 2 * math.ceil(math.log2(n)))
        k = effective_degree(n, k)
    neighbourhood = k + 1
    t = max(2, math.ceil(2 * neighbourhood / 3))  # Quorum's default (fedcore.plan.secagg_threshold)
    n_drop = round(drop_fraction * n) if drop_fraction > 0 else 0
    if drop_fraction > 0:
        n_drop = max(1, n_drop)
    rng = random.Random(seed * 7919 + n)
    dropped = tuple(sorted(rng.sample(range(n), n_drop)))
    return Setting(n, params, graph, k, t, dropped)


def make_vectors(n: int, params: int, seed: int) -> list[np.ndarray]:
    """n float64 updates in [-clip/2, clip/2]."""
    rng = np.random.default_rng(seed)
    return [rng.uniform(-CLIP / 2, CLIP / 2, params) for _ in range(n)]


# ------------------------------------------------------------------------------------- ours


def run_ours(setting: Setting, vectors: list[np.ndarray]) -> Outcome:
    """One round of fedcore.secagg with every message through Quorum's real frames."""
    n = setting.n
    ids = list(range(1, n + 1))
    run, rnd, attempt = 1, 1, 1
    config = SecAggConfig(
        round_id=f"{run}:{rnd}:{attempt}",
        client_ids=tuple(ids),
        threshold=setting.threshold,
        vector_length=setting.params,
        clip=CLIP,
        degree=setting.ours_degree,
    )
    dropped = {ids[i] for i in setting.dropped}
    server = SecAggServer(config, stage_timeout=60.0)
    clients = {cid: SecAggClient(cid) for cid in ids}
    client_s = dict.fromkeys(ids, 0.0)
    server_s = 0.0
    up = dict.fromkeys(ids, 0)
    down = dict.fromkeys(ids, 0)
    reassembler = protocol.Reassembler()

    def timed(fn: Any, *args: Any) -> tuple[Any, float]:
        started = time.perf_counter()
        value = fn(*args)
        return value, time.perf_counter() - started

    def over_the_wire(message: dict[str, Any], **extra: Any) -> tuple[dict[str, Any], int]:
        """A SecAgg message as a "secagg" control frame and back; the frame's bytes."""
        text = protocol.encode_control(
            "secagg",
            run=run,
            round=rnd,
            attempt=attempt,
            stage=message["stage"],
            payload=secagg_wire.to_json(message),
            **extra,
        )
        received = secagg_wire.from_json(protocol.decode_control(text)["payload"])
        return received, len(text.encode("utf-8"))

    clock = 0.0
    outbox, spent = timed(server.start, clock)
    server_s += spent
    for stage in (Stage.ADVERTISE_KEYS, Stage.SHARE_KEYS, Stage.MASKED_INPUT, Stage.UNMASKING):
        for cid, request in sorted(outbox.items()):
            # server -> agent: what federation.consumers sends for a "secagg.message" event
            extra = {"client": cid} if stage is Stage.ADVERTISE_KEYS else {}
            received, nbytes = over_the_wire(request, **extra)
            down[cid] += nbytes
            if cid in dropped and stage is Stage.MASKED_INPUT:
                continue  # shared keys, then vanished: its masked vector never arrives
            client = clients[cid]
            if stage is Stage.ADVERTISE_KEYS:
                reply, spent = timed(client.advertise_keys, received)
            elif stage is Stage.SHARE_KEYS:
                reply, spent = timed(client.share_keys, received)
            elif stage is Stage.MASKED_INPUT:
                reply, spent = timed(client.masked_input, received, vectors[cid - 1])
            else:
                reply, spent = timed(client.unmask, received)
            client_s[cid] += spent
            # agent -> server: what clientagent.secagg_session sends
            if stage is Stage.MASKED_INPUT:
                fields = {
                    "run": run,
                    "round": rnd,
                    "attempt": attempt,
                    "nonce": secrets.token_hex(16),
                    "num_examples": 1000,
                    "metrics": {},
                }
                frames = protocol.encode_binary(
                    protocol.BinaryMessage("masked_update", fields, reply["masked_vector"])
                )
                up[cid] += sum(len(f) for f in frames)
                message = None
                for frame in frames:
                    message = reassembler.feed(frame)
                assert message is not None
                # as federation.secagg_rounds.receive_masked hands it to the server
                delivered = {
                    "stage": Stage.MASKED_INPUT.value,
                    "masked_vector": bytes(message.payload),
                }
            else:
                delivered, nbytes = over_the_wire(reply)
                up[cid] += nbytes
            _, spent = timed(server.collect, cid, delivered, clock)
            server_s += spent
        if not server.ready(clock):
            clock = server.deadline  # the dropouts never answer: the stage times out
        outbox, spent = timed(server.advance, clock)
        server_s += spent

    contributors = [cid - 1 for cid in server.contributors]
    expected = np.sum([vectors[i] for i in contributors], axis=0)
    error = float(np.max(np.abs(server.result - expected)))
    tolerance = len(contributors) * config.quantizer.max_error + 1e-9
    return Outcome(
        client_s=[client_s[cid] for cid in ids if cid - 1 not in setting.dropped],
        server_s=server_s,
        up={cid - 1: v for cid, v in up.items()},
        down={cid - 1: v for cid, v in down.items()},
        max_error=error,
        tolerance=tolerance,
        extra={"contributors": len(contributors)},
    )


# ----------------------------------------------------------------------------------- Flower


def flower_available() -> str | None:
    """None if Flower's SecAgg+ can be imported, else why not."""
    try:
        import flwr  # noqa: F401
        from flwr.client.mod.secure_aggregation.secaggplus_mod import secaggplus_mod  # noqa: F401
        from flwr.server.workflow.secure_aggregation.secaggplus_workflow import (  # noqa: F401
            SecAggPlusWorkflow,
        )
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def run_flower(setting: Setting, vectors: list[np.ndarray], seed: int) -> Outcome:
    """One round of Flower's SecAggPlusWorkflow and secaggplus_mod through an in-process grid."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.client.mod.secure_aggregation.secaggplus_mod import secaggplus_mod
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
    from flwr.common.secure_aggregation.secaggplus_constants import Stage as FlowerStage
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict
    from flwr.server.client_manager import SimpleClientManager
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow.secure_aggregation.secaggplus_workflow import SecAggPlusWorkflow
    from flwr.serverapp.grid import Grid
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
    from flwr.supercore.task_identity import TaskIdentity

    logging.getLogger("flwr").setLevel(logging.ERROR)
    TaskIdentity.run_id = 1
    TaskIdentity.node_id = 1  # SUPERLINK_NODE_ID: messages from the ServerApp
    TaskIdentity.task_id = 1

    n = setting.n
    random.seed(seed)  # the workflow shuffles the ring with `random`
    rng = np.random.default_rng(seed)
    # Flower's node ids are random 64-bit integers; their varint size is part of the bytes.
    node_ids = [int(x) for x in rng.choice(2**62, size=n, replace=False) + 2**62]
    index = {nid: i for i, nid in enumerate(node_ids)}
    dropped = {node_ids[i] for i in setting.dropped}

    def transmit(message: Message) -> tuple[Message, int]:
        """The message as the receiver rebuilds it from the deflated objects; their bytes."""
        contents = {oid: obj.deflate() for oid, obj in get_all_nested_objects(message).items()}
        nbytes = sum(len(c) for c in contents.values())
        copy = inflate_object_from_contents(message.object_id, contents)  # empties `contents`
        copy.metadata.__dict__["_message_id"] = message.metadata.message_id  # as the link sets
        return copy, nbytes

    class LocalGrid(Grid):
        """Delivers each message to its client's secaggplus_mod; counts bytes and time."""

        def __init__(self) -> None:
            self.contexts = {
                nid: Context(
                    run_id=1, node_id=nid, node_config={}, state=RecordDict(), run_config={}
                )
                for nid in node_ids
            }
            self.client_s = dict.fromkeys(node_ids, 0.0)
            self.up = dict.fromkeys(node_ids, 0)
            self.down = dict.fromkeys(node_ids, 0)
            self.transport_s = 0.0

        def set_run(self, run: Any) -> None:
            pass

        @property
        def run(self) -> Any:
            return None

        def create_message(self, *args: Any, **kwargs: Any) -> Message:
            raise NotImplementedError(
                f"{type(self).__name__}: the SecAgg+ workflow only calls send_and_receive, not create_message"
            )

        def get_node_ids(self) -> list[int]:
            return list(node_ids)

        def push_messages(self, messages: Any) -> Any:
            raise NotImplementedError(
                f"{type(self).__name__}: the SecAgg+ workflow only calls send_and_receive, not push_messages"
            )

        def pull_messages(self, message_ids: Any) -> Any:
            raise NotImplementedError(
                f"{type(self).__name__}: the SecAgg+ workflow only calls send_and_receive, not pull_messages"
            )

        def send_and_receive(self, messages: Any, *, timeout: float | None = None) -> list[Message]:
            replies = []
            for outgoing in messages:
                started = time.perf_counter()
                # The SuperLink names a message by its object id when the ServerApp pushes it.
                outgoing.metadata.__dict__["_message_id"] = outgoing.object_id
                nid = outgoing.metadata.dst_node_id
                incoming, nbytes = transmit(outgoing)
                self.down[nid] += nbytes
                self.transport_s += time.perf_counter() - started
                stage = incoming.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
                if nid in dropped and stage == FlowerStage.COLLECT_MASKED_VECTORS:
                    continue  # shared keys, then vanished: no reply (the workflow moves on)

                def fit(message: Message, _context: Context, nid: int = nid) -> Message:
                    fitres = FitRes(
                        Status(Code.OK, ""),
                        ndarrays_to_parameters([vectors[index[nid]]]),
                        int(FLOWER_MAX_WEIGHT),
                        {},
                    )
                    return Message(fitres_to_recorddict(fitres, False), reply_to=message)

                started = time.perf_counter()
                reply = secaggplus_mod(incoming, self.contexts[nid], fit)
                done = time.perf_counter()
                self.client_s[nid] += done - started
                delivered, nbytes = transmit(reply)
                self.up[nid] += nbytes
                replies.append(delivered)
                self.transport_s += time.perf_counter() - done
            return replies

    grid = LocalGrid()
    manager = SimpleClientManager()
    for nid in node_ids:
        manager.register(GridClientProxy(nid, grid, 1))
    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=n,
        min_available_clients=n,
    )
    server_context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context = LegacyContext(server_context, strategy=strategy, client_manager=manager)
    context.state.config_records["config"] = ConfigRecord({"current_round": 1})
    context.state.array_records["parameters"] = ArrayRecord()  # no model download counted
    workflow = SecAggPlusWorkflow(
        num_shares=setting.degree + 1,
        reconstruction_threshold=setting.threshold,
        clipping_range=CLIP,
        max_weight=FLOWER_MAX_WEIGHT,
        quantization_range=FLOWER_QUANTIZATION_RANGE,
    )
    started = time.perf_counter()
    workflow(grid, context)
    wall = time.perf_counter() - started

    result = context.state.array_records["parameters"].to_numpy_ndarrays()
    if not result:
        raise RuntimeError("Flower's SecAgg+ workflow halted without an aggregate")
    survivors = [i for i in range(n) if i not in setting.dropped]
    total = result[0] * len(survivors)  # the workflow returns the (equally weighted) mean
    expected = np.sum([vectors[i] for i in survivors], axis=0)
    error = float(np.max(np.abs(total - expected)))
    step = 2 * CLIP / FLOWER_QUANTIZATION_RANGE  # stochastic rounding: under one step each
    tolerance = len(survivors) * step + 1e-9
    client_total = sum(grid.client_s.values())
    return Outcome(
        client_s=[grid.client_s[node_ids[i]] for i in survivors],
        server_s=wall - client_total - grid.transport_s,
        up={index[nid]: v for nid, v in grid.up.items()},
        down={index[nid]: v for nid, v in grid.down.items()},
        max_error=error,
        tolerance=tolerance,
    )


# ------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    """Parse flags, run every setting on both sides, print the tables and write the JSON."""
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="n = 5, 10 and P = 10,000")
    parser.add_argument("--n", type=int, nargs="+", default=None, help="clients per round")
    parser.add_argument("--params", type=int, default=None, help="P, parameters per client")
    parser.add_argument(
        "--graph", nargs="+", choices=["complete", "sparse"], default=["complete", "sparse"]
    )
    parser.add_argument(
        "--dropout", type=float, nargs="+", default=[0.0, 0.1], help="fractions that drop out"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ours-only", action="store_true", help="skip Flower")
    args = parser.parse_args(argv)
    ns = args.n or ([5, 10] if args.quick else [10, 50, 100])
    params = args.params or (10_000 if args.quick else 100_000)

    why_not = "--ours-only given" if args.ours_only else flower_available()
    if why_not and not args.ours_only:
        print(f"Flower is not importable ({why_not}): running our side only.", flush=True)

    size = Table(
        f"secure aggregation: bytes per client per round, P = {params:,}",
        [
            "n",
            "graph",
            "k",
            "t",
            "dropped",
            "ours up kB",
            "ours down kB",
            "ours kB",
            "Flower up kB",
            "Flower down kB",
            "Flower kB",
            "ours/Flower",
            f"bar <= {BYTES_BAR}",
        ],
    )
    speed = Table(
        f"secure aggregation: compute per round, P = {params:,}",
        [
            "n",
            "graph",
            "dropped",
            "ours client s",
            "Flower client s",
            "client x",
            "ours server s",
            "Flower server s",
            "server x",
            "sums ok",
        ],
    )
    # One small untimed round per side first, so imports and first-call costs are not measured.
    warm = make_setting(3, params, "complete", 0.0, args.seed)
    run_ours(warm, make_vectors(3, params, args.seed))
    if why_not is None:
        run_flower(warm, make_vectors(3, params, args.seed), args.seed)

    all_met = True
    for n in ns:
        for graph in args.graph:
            for fraction in args.dropout:
                setting = make_setting(n, params, graph, fraction, args.seed)
                if graph == "sparse" and setting.degree >= n - 1:
                    continue  # the sparse graph would be the complete one: already measured
                vectors = make_vectors(n, params, args.seed)
                survivors = [i for i in range(n) if i not in setting.dropped]
                ours = run_ours(setting, vectors)
                ok = ours.max_error <= ours.tolerance
                ours_up, ours_down = ours.per_client(survivors)
                flower: Outcome | None = None
                if why_not is None:
                    flower = run_flower(setting, vectors, args.seed)
                    ok = ok and flower.max_error <= flower.tolerance
                if flower is not None:
                    fl_up, fl_down = flower.per_client(survivors)
                    ratio = (ours_up + ours_down) / (fl_up + fl_down)
                    met = ratio <= BYTES_BAR
                    all_met = all_met and met
                    fl_cells: list[Any] = [fl_up / 1e3, fl_down / 1e3, (fl_up + fl_down) / 1e3]
                    fl_cells += [ratio, bar(met)]
                    fl_client = float(np.mean(flower.client_s))
                    times: list[Any] = [
                        fl_client,
                        fl_client / float(np.mean(ours.client_s)),
                        ours.server_s,
                        flower.server_s,
                        flower.server_s / ours.server_s,
                    ]
                else:
                    fl_cells = [None] * 5
                    times = [None, None, ours.server_s, None, None]
                size.row(
                    n,
                    graph,
                    setting.degree,
                    setting.threshold,
                    len(setting.dropped),
                    ours_up / 1e3,
                    ours_down / 1e3,
                    (ours_up + ours_down) / 1e3,
                    *fl_cells,
                )
                speed.row(
                    n,
                    graph,
                    len(setting.dropped),
                    float(np.mean(ours.client_s)),
                    *times[:2],
                    *times[2:],
                    "yes" if ok else "NO",
                )
                if not ok:
                    raise AssertionError(
                        f"n={n} {graph} dropped={setting.dropped}: unmasked sum off by "
                        f"ours {ours.max_error:.3g} (tolerance {ours.tolerance:.3g})"
                        + (
                            f", Flower {flower.max_error:.3g} (tolerance {flower.tolerance:.3g})"
                            if flower
                            else ""
                        )
                    )
                print(
                    f"  n={n} {graph} dropped={len(setting.dropped)}: done at "
                    f"{time.strftime('%H:%M:%S')}",
                    file=sys.stderr,
                    flush=True,
                )

    size.note(
        "bytes are per client that completed the round (means), everything it received and sent "
        "in the four stages including the masked update, excluding the global model; kB = 1000 B"
    )
    size.note(
        "ours: the exact websocket frames of fedcore.protocol (secagg JSON control frames, "
        "bytes as base64; masked_update binary frames, 4 B/coordinate), framing of the "
        "websocket itself excluded"
    )
    size.note(
        "Flower: sum of the deflated inflatable objects of each Message (what PushObject/"
        "PullObject carry in Flower 1.42), object ids and gRPC framing excluded; its masked "
        "vector is int64 (8 B/coordinate, .npy) plus one masked weight"
    )
    size.note(
        "same graph both sides: Harary ring over a random permutation; our degree k = Flower "
        "num_shares - 1; t = ceil(2(k+1)/3) shares of the closed neighbourhood on both sides; "
        "sparse k = 2*ceil(log2 n)"
    )
    size.note(
        "fedcore.secagg.bytes_per_client counts payload only (no field names, no base64, no "
        "framing): e.g. 423.5 kB up at n = 100, P = 100,000, complete graph; the frames add "
        "the JSON keys, base64 (4/3 on keys, ciphertexts and shares) and the frame headers"
    )
    speed.note(
        "client: mean over the surviving clients of one client's compute over all stages; "
        "server: the whole round's server compute; x = Flower time / our time"
    )
    speed.note(
        "encoding and decoding of messages are not timed on either side; Flower's server time "
        "is the workflow's wall time minus client and transport time (FedAvg's configure_fit "
        "and aggregate_fit included)"
    )
    speed.note(
        "dropouts: clients that shared keys and then never sent their masked vector "
        "(recovered from their s-key / sk1 shares on both sides)"
    )
    if why_not:
        size.note(f"Flower not run: {why_not}")
    size.print()
    speed.print()
    if why_not is None:
        print(f"bytes bar (ours <= {BYTES_BAR} x Flower): {bar(all_met)}")
    write_results(
        "secagg",
        {
            "params": params,
            "clients": ns,
            "flower": None if why_not else "1.42 (installed)",
            "bytes_bar": BYTES_BAR,
            "bytes_bar_met": None if why_not else all_met,
            "bytes": size,
            "time": speed,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
