"""Receiving what agents send: federated statistics and model updates.

Every check names what is wrong; a refused message changes nothing, so a bad update never
corrupts a round and the round goes on with the others.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from django.db import IntegrityError, transaction

from fedcore import compression, tabular, task_metrics, tensors
from federation import dispatch, ledger
from federation.models import ModelVersion, Round, RoundMetric, Run, Silo, SiloStatistics
from federation.services import fairness as fairness_service
from federation.services import mitigation
from federation.services.audit import audit_append
from federation.storage import BlobStoreError, blob_store, update_key

log = logging.getLogger("quorum.updates")

MAX_METRICS = 64


@dataclass
class Refused(Exception):
    """An agent message was refused; code and reason go back in an error frame.

    ``ask_again`` (round id, the round's deadline in unix seconds): the fault was the server's
    (its blob store could not write), so the connection sends the round's task again after a
    back-off, within the deadline, and the agent sends the same update again.
    """

    code: str
    reason: str
    ask_again: tuple[int, float] | None = None

    def __str__(self) -> str:
        return f"{self.code}: {self.reason}"


def audit_refused(silo_id: int, action: str, run: Any, refused: Refused, **data: Any) -> None:
    """Audit a refused report of a silo in its own transaction (nothing else of it is kept)."""
    silo = Silo.objects.filter(pk=silo_id).first()
    with transaction.atomic():
        audit_append(
            actor=f"silo:{silo.name if silo else silo_id}",
            action=action,
            consortium_id=silo.consortium_id if silo else None,
            object_type="run",
            object_id=run,
            data={**data, "code": refused.code, "reason": refused.reason},
        )


def _active_run_for(silo: Silo, run_id: int) -> Run:
    run = Run.objects.select_related("plan", "version").filter(pk=run_id).first()
    if run is None or not run.version.silos.filter(pk=silo.pk).exists():
        raise Refused("wrong_run", f"run {run_id} does not exist or this silo does not take part")
    return run


def stats_receive(
    *, silo_id: int, run_id: int, stats: dict[str, Any], label_counts: Any = None
) -> None:
    """Check and store a silo's local statistics for a run's federated preprocessing pass.

    A report that breaks ``fedcore.tabular.check_site_statistics`` (an undeclared category, a
    name with markup or control characters, more values than the cap...) is refused naming
    silo, column and rule and changes nothing; every refusal is audited as ``stats.refused``
    in its own transaction. Noised statistics (``privacy.statistics_epsilon``) are charged to
    the silo's ledger. ``label_counts`` (a plan that reweighs: its rows per group and label)
    are checked by ``federation.services.mitigation.checked_label_counts``.
    """
    try:
        _stats_receive(silo_id=silo_id, run_id=run_id, stats=stats, label_counts=label_counts)
    except Refused as refused:
        audit_refused(silo_id, "stats.refused", run_id, refused)
        raise


@transaction.atomic
def _stats_receive(*, silo_id: int, run_id: int, stats: dict[str, Any], label_counts: Any) -> None:
    silo = Silo.objects.get(pk=silo_id)
    run = _active_run_for(silo, run_id)
    if run.status != Run.Status.STATS:
        raise Refused(
            "wrong_run", f"run {run_id} is not collecting statistics (it is {run.status})"
        )
    epsilon = ledger.plan_statistics_epsilon(run.version.spec)
    try:  # before anything is stored: a poisoned report never reaches the merge
        schema = tabular.DatasetSchema.from_dict(run.version.spec["schema"])
        tabular.check_site_statistics(
            stats, schema, noised=epsilon > 0.0, where=f"statistics of silo {silo.name!r}"
        )
    except tabular.SchemaError as exc:
        raise Refused("invalid_update", str(exc)) from None
    try:
        counts = mitigation.checked_label_counts(
            run, label_counts, stats, f"statistics of silo {silo.name!r}"
        )
    except ValueError as exc:
        raise Refused("invalid_update", str(exc)) from None
    _, created = SiloStatistics.objects.get_or_create(
        run=run, silo=silo, defaults={"stats": stats, "label_counts": counts}
    )
    if not created:
        raise Refused("duplicate_update", f"statistics for run {run_id} were already received")
    if counts is not None:  # label counts noised with fairness.dp_epsilon: one table charged
        fairness_service.counts_charge(run=run, round_number=None, silo=silo, tables=1)
    if epsilon > 0.0:  # the noised numeric statistics: one pure epsilon-DP release of its data
        ledger.ledger_append(
            silo=silo,
            run=run,
            round_number=None,
            mechanism=ledger.STATISTICS,
            noise_multiplier=1.0 / epsilon,
            sample_rate=1.0,
            steps=1,
            delta=ledger.plan_delta(run.version.spec) or ledger.DEFAULT_DELTA,
            epsilon_pure=epsilon,
        )
    audit_append(
        actor=f"silo:{silo.name}",
        action="stats.received",
        consortium_id=silo.consortium_id,
        object_type="run",
        object_id=run.pk,
        data={"n_rows": stats.get("n_rows")},
    )
    dispatch.enqueue_advance(run.pk)


def validate_metrics(metrics: dict[str, Any]) -> list[tuple[str, str, float]]:
    """Check an update's metrics are a small dict of numbers or None (one level of nesting)."""
    flat: list[tuple[str, str, float]] = []
    for key, value in metrics.items():
        items = value.items() if isinstance(value, dict) else [(key, value)]
        scope = key if isinstance(value, dict) else "train"
        for name, v in items:
            if v is None:  # undefined for this split (e.g. AUC with one class): not recorded
                continue
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise Refused("invalid_update", f"metric {key}.{name} is not a number")
            if math.isinf(v):
                raise Refused("invalid_update", f"metric {key}.{name} is infinite")
            flat.append((scope, str(name)[:50], float(v)))
    if len(flat) > MAX_METRICS:
        raise Refused("invalid_update", f"{len(flat)} metrics sent; at most {MAX_METRICS} allowed")
    return flat


def update_receive(*, silo_id: int, fields: dict[str, Any], payload: bytes) -> Round:
    """Validate and store one update; returns its round. Raises Refused with a code and reason.

    Accepted and refused updates both land in the audit log (a refusal in its own transaction,
    since nothing else of it is kept).
    """
    try:
        return _update_receive(silo_id=silo_id, fields=fields, payload=payload)
    except Refused as refused:
        audit_refused(
            silo_id,
            "update.refused",
            fields.get("run", ""),
            refused,
            round=fields.get("round"),
            sha256=tensors.sha256_hex(payload),
            bytes=len(payload),
        )
        raise


def _update_receive(*, silo_id: int, fields: dict[str, Any], payload: bytes) -> Round:
    silo = Silo.objects.get(pk=silo_id)
    run = _active_run_for(silo, fields["run"])
    if run.status != Run.Status.RUNNING:
        raise Refused("wrong_run", f"run {run.pk} is not training (it is {run.status})")
    round_ = run.round_set.order_by("-number", "-attempt").first()
    if (
        round_ is None
        or round_.number != fields["round"]
        or round_.status != Round.Status.COLLECTING
    ):
        current = "none" if round_ is None else f"{round_.number} ({round_.status})"
        raise Refused(
            "wrong_round",
            f"update for round {fields['round']} refused: the current round is {current}",
        )
    if run.version.spec.get("secure_aggregation") is True:
        # Refused before anything is stored: a secure round never keeps an individual update.
        raise Refused(
            "invalid_update",
            f"round {round_.number} uses secure aggregation: send a masked_update, never the "
            "weights in clear",
        )
    method = fields.get("compression")
    writing: BlobWrite | None = None
    if method is None:
        # What is stored is what was received: its write (two fsyncs) starts now and runs beside
        # the checks below, which read the database (bench/round_split.py, "receipt"). A refused
        # update's blob is deleted: the key is this receipt's alone.
        writing = BlobWrite.start(run, round_, silo, payload)
    try:
        kept, stored = _checked_and_stored(run, round_, silo, fields, payload, method, writing)
    except Refused:
        if writing is not None:
            writing.discard()
        raise
    flat, dp_round, fairness_counts, task_part = kept.checked
    try:
        with transaction.atomic():
            locked = Round.objects.select_for_update().get(pk=round_.pk)
            if locked.status != Round.Status.COLLECTING:
                raise Refused(
                    "wrong_round", f"round {round_.number} closed while the update arrived"
                )
            _record_accepted(
                run,
                round_,
                silo,
                fields,
                flat,
                dp_round,
                kept.digest,
                len(stored),
                blob_key=kept.key,
                wire=(len(payload), method, tensors.sha256_hex(payload)) if method else None,
                fairness=fairness_counts,
                task_part=task_part,
            )
            if fairness_counts is not None:
                fairness_service.charge_update_counts(
                    run=run, round_=round_, silo=silo, counts=fairness_counts
                )
            # Only the update that completes the round wakes the orchestrator: earlier ones
            # would only find the round still collecting (a step, a lock and ~13 queries each;
            # bench/round_split.py). The round's deadline timer and the sweep close a round
            # that stays short. Counted under the round's row lock, so of two updates
            # committing together the later one sees the other.
            if round_.updates.count() >= kept.selected:
                dispatch.enqueue_advance(run.pk)
    except (Refused, IntegrityError) as exc:
        _delete_blob(kept.key)  # no row names it: the transaction rolled back
        if isinstance(exc, Refused):
            raise
        raise Refused("duplicate_update", "an update for this round was already accepted") from exc
    return round_


@dataclass(frozen=True)
class _Stored:
    """Where an update that passed every check before its transaction was stored."""

    key: str
    digest: str
    checked: tuple[Any, Any, Any, Any]  # (metrics, sample-level DP round, fairness, task part)
    selected: int  # silos the round selected


def _blob_key(run: Run, round_: Round, silo: Silo, digest: str) -> str:
    """This receipt's own blob key: content-addressed, plus a random part so that two receipts
    of the same bytes (a replay, two ASGI processes during a reconnect) never share a file and a
    refused one can delete its own."""
    return update_key(
        run_id=run.pk,
        round_number=round_.number,
        attempt=round_.attempt,
        silo_id=silo.pk,
        sha256=digest,
        receipt=secrets.token_hex(4),
    )


def _checked_and_stored(
    run: Run,
    round_: Round,
    silo: Silo,
    fields: dict[str, Any],
    payload: bytes,
    method: Any,
    writing: BlobWrite | None,
) -> tuple[_Stored, bytes]:
    """Every check of an update before its transaction, and its blob written (Refused if not)."""
    flat, dp_round, selected = _check_contribution(run, round_, silo, fields)
    fairness_counts = _checked_fairness(run, fields)
    task_part = checked_task_part(run, fields)
    try:
        state = tensors.decode_state_dict(payload)
    except tensors.TensorCodecError as exc:
        raise Refused("invalid_update", str(exc)) from exc
    reference = ModelVersion.objects.get(run=run, number=round_.number - 1)
    global_state: tensors.StateDict | None = None
    stored = payload
    if method is not None:
        # Decoded here, before every other check: norm bound, DP and aggregation only ever see
        # full weights, and the blob stored is the dense model (docs/architecture.md).
        global_state = _global_state(reference)
        state = _decompressed(run, method, state, global_state)
        stored = tensors.encode_state_dict(state)
    _check_against_signature(state, reference.signature)
    bad = tensors.first_non_finite(state)
    if bad is not None:
        raise Refused("non_finite", f"tensor {bad!r} holds NaN or Inf values")
    _check_norm_bound(run, state, reference, global_state)
    if writing is None:
        writing = BlobWrite.start(run, round_, silo, stored, background=False)
    try:
        writing.wait()
    except BlobStoreError as exc:
        log.error("update of silo %s refused: %s", silo.name, exc)
        raise Refused(
            "internal",
            "the server could not store the update; it will ask for it again shortly",
            ask_again=(round_.pk, round_.deadline.timestamp()),
        ) from exc
    checked = (flat, dp_round, fairness_counts, task_part)
    return _Stored(writing.key, writing.digest, checked, selected), stored


# Receipts' blob writes, beside their database checks; the receipt waits for its own.
_BLOB_WRITERS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="quorum-blob-write")


class BlobWrite:
    """One update blob being written, in the background or already written in this thread;
    ``digest``: the SHA-256 of its bytes, hashed once."""

    def __init__(
        self,
        key: str,
        digest: str,
        future: Future[None] | None,
        error: BlobStoreError | None,
    ):
        self.key = key
        self.digest = digest
        self._future = future
        self._error = error

    @classmethod
    def start(
        cls, run: Run, round_: Round, silo: Silo, data: bytes, *, background: bool = True
    ) -> BlobWrite:
        """Write ``data`` under this receipt's own key (:func:`_blob_key`)."""
        digest = tensors.sha256_hex(data)
        key = _blob_key(run, round_, silo, digest)
        if background:
            return cls(key, digest, _BLOB_WRITERS.submit(blob_store().put, key, data), None)
        try:
            blob_store().put(key, data)
        except BlobStoreError as exc:
            return cls(key, digest, None, exc)
        return cls(key, digest, None, None)

    def wait(self) -> None:
        """Return once the blob is durable; raise the store's BlobStoreError if it is not."""
        if self._future is not None:
            self._future.result()
        elif self._error is not None:
            raise self._error

    def discard(self) -> None:
        """The update was refused: wait for the write to end, then delete what it wrote."""
        try:
            self.wait()
        except BlobStoreError:
            pass  # the store already removed its temporary file
        _delete_blob(self.key)


def _delete_blob(key: str) -> None:
    try:
        blob_store().delete(key)
    except BlobStoreError as exc:  # an orphan file, never a row naming a missing blob
        log.warning("could not delete the blob of a refused update %s: %s", key, exc)


def checked_task_part(run: Run, fields: dict[str, Any]) -> dict[str, Any] | None:
    """A multi-class or regression update's ``task_part`` (the received global model's part of
    the pooled metrics on the held-out rows, fedcore.task_metrics), checked; None when absent.
    Refused for a binary plan, or naming the faulty field."""
    raw = fields.get("task_part")
    if raw is None:
        return None
    target = tabular.TargetSpec.from_dict(run.version.spec["schema"]["target"])
    where = "task_part"
    try:
        if target.task == "multiclass":
            # a round's grid (task_metrics.round_bins), or none (no per-round AUC)
            bins = task_metrics.round_bins(target.n_outputs)
            if isinstance(raw, dict) and raw.get("bins") is None:
                bins = None
            return task_metrics.check_multiclass_part(
                raw, classes=target.n_outputs, bins=bins, where=where
            )
        if target.task == "regression":
            return task_metrics.check_regression_part(raw, where=where)
    except task_metrics.TaskPartError as exc:
        raise Refused("invalid_update", str(exc)) from None
    raise Refused("invalid_update", "a binary plan's update carries no task_part")


def _check_contribution(
    run: Run, round_: Round, silo: Silo, fields: dict[str, Any]
) -> tuple[list[tuple[str, str, float]], tuple[float, float, int] | None, int]:
    """Checks shared by updates and masked updates: sender, selection, replay, count, metrics.

    Returns the update's metrics, its sample-level DP round and how many silos the round
    selected (fixed when it opened)."""
    if fields.get("silo") not in (None, silo.name):
        raise Refused(
            "invalid_update", f"update names silo {fields['silo']!r}, sent by {silo.name!r}"
        )
    selected = set(round_.selected.values_list("pk", flat=True))
    if silo.pk not in selected:
        raise Refused("not_selected", f"this silo was not selected for round {round_.number}")
    if round_.updates.filter(silo=silo).exists():
        raise Refused(
            "duplicate_update", f"an update for round {round_.number} was already accepted"
        )
    if silo.updates.filter(nonce=fields["nonce"]).exists():
        raise Refused("duplicate_update", "this nonce was used before (replayed update)")
    if fields["num_examples"] <= 0:
        raise Refused("invalid_update", "num_examples must be a positive integer")
    flat = validate_metrics(fields["metrics"])
    return flat, _sample_dp_round(run, silo, fields), len(selected)


def masked_update_receive(
    *,
    silo_id: int,
    fields: dict[str, Any],
    payload: bytes,
    collect: Callable[[], None],
) -> Round:
    """Account for one silo's masked vector of a secure round; ``collect`` adds it to the sum.

    The same checks as an update, then, in one transaction: an ``Update`` row with an empty
    blob key and the SHA-256 of the *masked* bytes (nothing else of the vector is kept), the
    silo's metrics, its sample-level DP ledger entry, the ``update.accepted`` audit event with
    ``"masked": true``, and last ``collect()`` (``federation.secagg_rounds``), which adds the
    vector to the coordinator's running sum or raises Refused, rolling all of it back.
    """
    try:
        return _masked_update_receive(
            silo_id=silo_id, fields=fields, payload=payload, collect=collect
        )
    except Refused as refused:
        audit_refused(
            silo_id,
            "update.refused",
            fields.get("run", ""),
            refused,
            round=fields.get("round"),
            attempt=fields.get("attempt"),
            masked=True,
            sha256=tensors.sha256_hex(payload),
            bytes=len(payload),
        )
        raise


def _masked_update_receive(
    *, silo_id: int, fields: dict[str, Any], payload: bytes, collect: Callable[[], None]
) -> Round:
    silo = Silo.objects.get(pk=silo_id)
    run = _active_run_for(silo, fields["run"])
    if run.status != Run.Status.RUNNING:
        raise Refused("wrong_run", f"run {run.pk} is not training (it is {run.status})")
    if run.version.spec.get("secure_aggregation") is not True:
        raise Refused("invalid_update", f"run {run.pk} does not use secure aggregation")
    round_ = run.round_set.order_by("-number", "-attempt").first()
    if (
        round_ is None
        or round_.number != fields["round"]
        or round_.attempt != fields["attempt"]
        or round_.status != Round.Status.COLLECTING
    ):
        current = (
            "none" if round_ is None else f"{round_.number}.{round_.attempt} ({round_.status})"
        )
        raise Refused(
            "wrong_round",
            f"masked update for round {fields['round']}.{fields['attempt']} refused: the current "
            f"round is {current}",
        )
    flat, dp_round, _ = _check_contribution(run, round_, silo, fields)
    digest = tensors.sha256_hex(payload)
    try:
        with transaction.atomic():
            locked = Round.objects.select_for_update().get(pk=round_.pk)
            if locked.status != Round.Status.COLLECTING:
                raise Refused(
                    "wrong_round", f"round {round_.number} closed while the update arrived"
                )
            # blob_key "": nothing stored, the vector only joins the coordinator's sum
            _record_accepted(
                run, round_, silo, fields, flat, dp_round, digest, len(payload), blob_key=""
            )
            collect()  # last: a refusal here rolls the rows above back
    except IntegrityError as exc:
        raise Refused("duplicate_update", "an update for this round was already accepted") from exc
    return round_


def _sample_dp_round(
    run: Run, silo: Silo, fields: dict[str, Any]
) -> tuple[float, float, int] | None:
    """For a sample-level DP plan: the round's mechanism, checked against what the agent reports.

    The server computes the mechanism itself (same formulas and accountant as the agent, from
    the silo's training rows) and records that in the ledger; an agent reporting less noise or a
    higher sampling rate than the plan's is refused.
    """
    spec = run.version.spec
    if (spec.get("privacy") or {}).get("mode", "none") != "sample":
        return None
    reported = fields.get("privacy")
    if not isinstance(reported, dict):
        raise Refused("invalid_update", "a sample-level DP plan needs the update's privacy report")
    expected = ledger.round_mechanism(spec, silo, rows=fields["num_examples"])
    assert expected is not None
    noise, sample_rate, steps = expected
    got_noise = reported.get("noise_multiplier")
    if not isinstance(got_noise, int | float) or got_noise < noise * (1 - 1e-6):
        raise Refused(
            "invalid_update",
            f"DP-SGD noise multiplier {got_noise!r} is below the plan's {noise:.6g}",
        )
    got_rate = reported.get("sample_rate")
    if not isinstance(got_rate, int | float) or got_rate > sample_rate * (1 + 1e-6):
        raise Refused(
            "invalid_update",
            f"DP-SGD sample rate {got_rate!r} is above the plan's {sample_rate:.6g}",
        )
    return noise, sample_rate, steps


def _check_against_signature(state: dict[str, Any], signature: dict[str, list[Any]]) -> None:
    got = {name: [dtype, list(shape)] for name, (dtype, shape) in tensors.signature(state).items()}
    missing = sorted(set(signature) - set(got))
    extra = sorted(set(got) - set(signature))
    if missing or extra:
        raise Refused(
            "incompatible_update",
            f"tensors differ from the global model: missing {missing}, unexpected {extra}",
        )
    for name, (dtype, shape) in signature.items():
        if got[name][1] != list(shape):
            raise Refused(
                "incompatible_update",
                f"tensor {name!r}: shape {tuple(got[name][1])}, expected {tuple(shape)}",
            )
        if got[name][0] != dtype:
            raise Refused(
                "incompatible_update", f"tensor {name!r}: dtype {got[name][0]}, expected {dtype}"
            )


def _checked_fairness(run: Run, fields: dict[str, Any]) -> dict[str, Any] | None:
    """The update's fairness counts (federation.services.fairness), refused as invalid_update."""
    try:
        return fairness_service.check_update_counts(run, fields)
    except fairness_service.FairnessCountsError as exc:
        raise Refused("invalid_update", str(exc)) from None


def _global_state(reference: ModelVersion) -> tensors.StateDict:
    try:
        return tensors.decode_state_dict(blob_store().get(reference.blob_key))
    except BlobStoreError as exc:
        log.error("global model %s unreadable: %s", reference.blob_key, exc)
        raise Refused(
            "internal", "the server could not read the round's global model; it will ask again"
        ) from exc


def _decompressed(
    run: Run, method: Any, wire: tensors.StateDict, global_state: tensors.StateDict
) -> tensors.StateDict:
    """The full weights a compressed update stands for, refused with the decoder's code."""
    try:
        spec = compression.CompressionSpec.from_plan(run.version.spec)
    except compression.CompressionSpecError as exc:  # validated at proposal: cannot happen
        raise Refused("internal", f"the plan's compression is invalid: {exc}") from exc
    if method != spec.method:
        raise Refused(
            "invalid_update",
            f"update compressed with {str(method)[:20]!r}, the plan's compression is "
            f"{spec.method!r}",
        )
    try:
        return compression.decompress_update(wire, spec, global_state)
    except compression.CompressionError as exc:
        raise Refused(exc.code, str(exc)) from exc


def _check_norm_bound(
    run: Run,
    state: dict[str, Any],
    reference: ModelVersion,
    global_state: tensors.StateDict | None = None,
) -> None:
    """Refuse an update whose change from the global model exceeds the plan's norm bound.

    With ``aggregation.norm_bound`` set, an update further than that (L2 over the floating
    tensors) from the round's global model is refused at receipt with an error frame and an
    audit event, before it is stored: scaled (boosted) poisoning never reaches aggregation.
    """
    bound = (run.version.spec.get("aggregation") or {}).get("norm_bound")
    if bound is None:
        return
    if global_state is None:
        global_state = tensors.decode_state_dict(blob_store().get(reference.blob_key))
    squared = sum(
        float((state[name].double() - value.double()).pow(2).sum())
        for name, value in global_state.items()
        if value.is_floating_point()
    )
    norm = math.sqrt(squared)
    if norm > float(bound):
        raise Refused(
            "invalid_update",
            f"the update moves the model by {norm:.4g} (L2), over the plan's norm bound {bound:g}",
        )


def _record_accepted(
    run: Run,
    round_: Round,
    silo: Silo,
    fields: dict[str, Any],
    flat: list[tuple[str, str, float]],
    dp_round: tuple[float, float, int] | None,
    digest: str,
    size: int,
    *,
    blob_key: str,
    wire: tuple[int, str, str] | None = None,
    fairness: dict[str, Any] | None = None,
    task_part: dict[str, Any] | None = None,
) -> None:
    """Rows of an accepted update (plain or masked): the update, its metrics, its sample-level
    DP ledger entry and the audit event, in the caller's transaction.

    ``wire`` is (payload bytes received, compression method or "", their SHA-256); None when
    what was received is what is stored (``size``, ``digest``).
    """
    wire_bytes, method, wire_sha = wire if wire is not None else (size, "", digest)
    round_.updates.create(
        silo=silo,
        num_examples=fields["num_examples"],
        nonce=fields["nonce"],
        sha256=digest,
        size_bytes=size,
        blob_key=blob_key,
        metrics=fields["metrics"],
        task_part=task_part,
        wire_bytes=wire_bytes,
        compression=method,
        fairness=fairness,
    )
    RoundMetric.objects.bulk_create(
        RoundMetric(round=round_, silo=silo, scope=scope, name=name, value=value)
        for scope, name, value in flat
    )
    if dp_round is not None:
        noise, sample_rate, steps = dp_round
        ledger.ledger_append(
            silo=silo,
            run=run,
            round_number=round_.number,
            mechanism="sample",
            noise_multiplier=noise,
            sample_rate=sample_rate,
            steps=steps,
            delta=float(run.version.spec["privacy"].get("delta", 1e-5)),
            epsilon_reported=fields["privacy"].get("epsilon"),
        )
    data = {
        "round": round_.number,
        "attempt": round_.attempt,
        "num_examples": fields["num_examples"],
        "sha256": digest,
        "bytes": size,
    }
    if not blob_key:
        data["masked"] = True
    if method:
        # the sha256 the site's sent log holds is the one of what it sent
        data |= {"compression": method, "wire_bytes": wire_bytes, "wire_sha256": wire_sha}
    audit_append(
        actor=f"silo:{silo.name}",
        action="update.accepted",
        consortium_id=silo.consortium_id,
        object_type="run",
        object_id=run.pk,
        data=data,
    )
