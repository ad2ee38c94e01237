"""Wire protocol between the server and the site agents: control messages and binary frames.

One websocket per agent. Text frames carry JSON control messages ``{"v": 1, "type": ..., ...}``;
binary frames carry a model (safetensors bytes) with a small JSON header, chunked when the payload
does not fit in one frame. Everything received is validated strictly against the schemas below:
unknown fields, mistyped values and non-finite numbers are refused with a :class:`ProtocolError`
whose ``code`` is what the receiver puts in its ``error`` reply. docs/protocol.md is the
newcomer's description of all this.
"""

import hashlib
import json
import math
import mmap
import os
import queue
import re
import secrets
import struct
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, NoReturn

__all__ = [
    "BINARY_SCHEMAS",
    "CONTROL_SCHEMAS",
    "DEFAULT_MAX_CONTROL_BYTES",
    "DEFAULT_MAX_FRAME_BYTES",
    "DEFAULT_MAX_HEADER_BYTES",
    "DEFAULT_MAX_MESSAGE_BYTES",
    "DEFAULT_SPOOL_THRESHOLD",
    "ERROR_CODES",
    "FRAME_MAGIC",
    "FRAME_PREFIX_BYTES",
    "MAX_ERROR_REASON_CHARS",
    "MAX_JSON_DEPTH",
    "PROTOCOL_VERSION",
    "BinaryFrames",
    "BinaryMessage",
    "ChecksumMismatch",
    "ChunkSequenceError",
    "InvalidField",
    "MalformedFrame",
    "OversizedFrame",
    "ProtocolError",
    "Reassembler",
    "TruncatedFrame",
    "UnknownMessageType",
    "UnsupportedVersion",
    "decode_control",
    "spooled_file",
    "binary_frames",
    "encode_binary",
    "encode_control",
    "encode_error",
]

PROTOCOL_VERSION = 1
DEFAULT_MAX_FRAME_BYTES = 1 << 20  # one websocket frame; payloads above are chunked
DEFAULT_MAX_MESSAGE_BYTES = 256 << 20  # one reassembled binary message
DEFAULT_MAX_CONTROL_BYTES = 1 << 20  # one JSON control frame
DEFAULT_MAX_HEADER_BYTES = 64 << 10  # the JSON header of one binary frame
DEFAULT_SPOOL_THRESHOLD = 8 << 20  # a Reassembler with a spool_dir spools messages this large
# Deeper JSON is refused: a legitimate plan nests about 5 levels, and deep nesting received from a
# peer would later blow the recursion limit of whatever walks it (json.dumps, a JSONField, ...).
MAX_JSON_DEPTH = 32
MAX_ERROR_REASON_CHARS = 2000

FRAME_MAGIC = b"QRMB"
# magic (4 bytes) | protocol version (u8) | header length (u32, big-endian)
_FRAME_PREFIX = struct.Struct(">4sBI")
FRAME_PREFIX_BYTES = _FRAME_PREFIX.size  # 9

# Values a field declared "int" may take: ids, counts and round numbers are never negative, and
# anything wider than a signed 64-bit integer would overflow the database column it ends up in.
_INT_MIN, _INT_MAX = 0, (1 << 63) - 1

ERROR_CODES: tuple[str, ...] = (
    "auth_failed",  # the connection's token is missing, unknown or revoked
    "malformed",  # not UTF-8 / not JSON / not an object / bad magic / undecodable payload
    "truncated",  # a binary frame ends before its prefix or header does
    "oversized",  # a frame, header or declared message size is above the receiver's limit
    "unsupported_version",  # missing or unknown protocol version
    "unknown_type",  # message type not in CONTROL_SCHEMAS / BINARY_SCHEMAS
    "invalid_field",  # missing, unknown or mistyped field
    "checksum_mismatch",  # reassembled payload does not match its declared sha256
    "chunk_sequence",  # chunks out of order, duplicated, interleaved or not adding up to size
    "wrong_run",  # the message names a run this silo is not part of, or one not running
    "wrong_round",  # the message names a round that is not the open one
    "not_selected",  # this silo was not selected for the round
    "duplicate_update",  # this silo already delivered an update for the round
    "incompatible_update",  # update tensors differ from the global model (keys/shapes/dtypes)
    "non_finite",  # update holds NaN or Inf
    "invalid_update",  # update refused for another reason (e.g. num_examples, nonce)
    "data_invalid",  # the agent's local data does not match the plan's schema
    "invalid_task",  # the task's plan, preprocessing or global weights are unusable at the site
    "training_failed",  # local training diverged (NaN/Inf loss)
    "replaced",  # a newer connection of the same silo took over this one
    "not_authorized",  # the task's signed authorization is missing, forged or not for this silo
    "policy_refused",  # the site's local policy refuses the plan (model kind, DP, epsilon, ...)
    "secagg_aborted",  # a site aborted its secure-aggregation client for the round (refusal)
    "timeout",  # the peer was too slow: no hello in time, or a chunked message stalled
    "internal",  # unexpected failure on the sending side; nothing the peer can fix
)


class ProtocolError(ValueError):
    """A frame or message violates the wire protocol; ``code`` is the error code to reply with."""

    code: str = "malformed"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class MalformedFrame(ProtocolError):
    """The frame is not what the protocol allows (not UTF-8, not JSON, bad magic, ...)."""

    code = "malformed"


class TruncatedFrame(ProtocolError):
    """A binary frame ends before its prefix or header does."""

    code = "truncated"


class OversizedFrame(ProtocolError):
    """A frame, header or declared message size exceeds the configured limit."""

    code = "oversized"


class UnsupportedVersion(ProtocolError):
    """The protocol version is missing or not one this peer speaks."""

    code = "unsupported_version"


class UnknownMessageType(ProtocolError):
    """The message type is not in the schemas."""

    code = "unknown_type"


class InvalidField(ProtocolError):
    """A field is missing, unknown, mistyped or out of range."""

    code = "invalid_field"


class ChecksumMismatch(ProtocolError):
    """A reassembled payload does not match its declared sha256."""

    code = "checksum_mismatch"


class ChunkSequenceError(ProtocolError):
    """Chunks of a binary message arrived out of order, duplicated, interleaved or inconsistent."""

    code = "chunk_sequence"


# --------------------------------------------------------------------------------------- schemas

FieldSpec = tuple[tuple[type, ...], bool]  # (accepted python types, required)
Schema = dict[str, FieldSpec]

_INT: tuple[type, ...] = (int,)
_NUMBER: tuple[type, ...] = (int, float)
_STR: tuple[type, ...] = (str,)
_DICT: tuple[type, ...] = (dict,)
_REQ, _OPT = True, False

CONTROL_SCHEMAS: dict[str, Schema] = {
    # agent -> server, first message after connecting
    "hello": {"agent_version": (_STR, _REQ), "site": (_STR, _OPT), "capabilities": (_DICT, _OPT)},
    # server -> agent, reply to hello
    "welcome": {
        "silo": (_STR, _REQ),
        "silo_id": (_INT, _REQ),
        "consortium": (_STR, _REQ),
        "heartbeat_seconds": (_NUMBER, _REQ),
    },
    "heartbeat": {"ts": (_NUMBER, _OPT), "state": (_STR, _OPT)},  # agent -> server
    "heartbeat_ack": {"ts": (_NUMBER, _OPT)},  # server -> agent
    # agent -> server: the site's operator recorded a new decision; the site may accept work it
    # refused before, so the server may select it again (federation.services.refusals)
    "ready": {},
    # server -> agent: compute local statistics for the plan (plan has "schema", "evaluation")
    # "authorization" is the server's Ed25519-signed grant (fedcore.signing) that the agent checks
    "stats_request": {
        "run": (_INT, _REQ),
        "plan_hash": (_STR, _REQ),
        "plan": (_DICT, _REQ),
        "authorization": (_DICT, _REQ),
    },
    # server -> agent: a plan version that names this silo was submitted (for local review)
    "plan_offer": {
        "plan_hash": (_STR, _REQ),
        "plan": (_DICT, _REQ),
        "name": (_STR, _REQ),
        "version": (_INT, _REQ),
        "consortium": (_STR, _REQ),
        "status": (_STR, _REQ),
        "authorization": (_DICT, _REQ),  # fedcore.signing.sign_offer: the agent verifies it
    },
    # agent -> server; label_counts = {group: {"negatives", "positives"}} of the training rows,
    # for a plan whose fairness.mitigation kind is reweighing or constraint
    # (fedcore.fairness_mitigation)
    "stats": {"run": (_INT, _REQ), "stats": (_DICT, _REQ), "label_counts": (_DICT, _OPT)},
    # server -> agent: one step of an analysis plan (fedcore.analytics.steps); params are what
    # the server derived from earlier steps (Kaplan-Meier's grid), signed with the step
    "analysis_request": {
        "run": (_INT, _REQ),
        "plan_hash": (_STR, _REQ),
        "plan": (_DICT, _REQ),
        "step": (_STR, _REQ),
        "params": (_DICT, _REQ),
        "authorization": (_DICT, _REQ),
    },
    # agent -> server: the site's answer to that step (fedcore.analytics.steps.site_answer)
    "analysis": {"run": (_INT, _REQ), "step": (_STR, _REQ), "answer": (_DICT, _REQ)},
    # agent -> server, answering "evaluate": the final model on the site's held-out rows.
    # evaluation = {"bins", "positives", "negatives", "loss_sum"} (fedcore.evaluation, checked
    # there); fairness = sensitive attribute -> {group: {tp, fp, tn, fn}} as in "update"
    "evaluation": {
        "run": (_INT, _REQ),
        "model_version": (_INT, _REQ),
        "evaluation": (_DICT, _REQ),
        "fairness": (_DICT, _OPT),
        # a postprocess plan: {group: {"negatives", "positives"}}, one count per score-grid point
        "score_histograms": (_DICT, _OPT),
        # the same of the held-out rows when the thresholds are chosen on the training rows
        # (fedcore.plan.held_out_score_histograms_sent)
        "held_out_score_histograms": (_DICT, _OPT),
        # a binary model's calibration sums per probability bin (fedcore.calibration)
        "calibration": (_DICT, _OPT),
    },
    "update_ack": {"run": (_INT, _REQ), "round": (_INT, _REQ), "status": (_STR, _REQ)},
    "run_finished": {"run": (_INT, _REQ), "status": (_STR, _REQ)},
    # either direction: one secure-aggregation stage message of a round attempt (docs/protocol.md,
    # "Secure aggregation"); payload is the fedcore.secagg message with bytes as base64 strings
    # (fedcore.secagg.wire). "client" (server -> agent, advertise_keys only) is the site's id in
    # the attempt's roster.
    "secagg": {
        "run": (_INT, _REQ),
        "round": (_INT, _REQ),
        "attempt": (_INT, _REQ),
        "stage": (_STR, _REQ),
        "payload": (_DICT, _REQ),
        "client": (_INT, _OPT),
        # an analysis step's secure aggregation (federation.secagg_analysis): its step, with
        # round 0; the masked input travels in this message then, not as a masked_update
        "step": (_STR, _OPT),
    },
    # either direction
    "error": {
        "code": (_STR, _REQ),
        "reason": (_STR, _REQ),
        "run": (_INT, _OPT),
        "round": (_INT, _OPT),
    },
}

BINARY_SCHEMAS: dict[str, Schema] = {
    # server -> agent; payload = global model (safetensors); deadline in unix seconds
    "task": {
        "run": (_INT, _REQ),
        "round": (_INT, _REQ),
        "rounds": (_INT, _REQ),
        "plan_hash": (_STR, _REQ),
        "plan": (_DICT, _REQ),
        "preprocessing": (_DICT, _REQ),
        "deadline": (_NUMBER, _REQ),
        # the server's wall clock (Unix seconds) as it starts sending the task's frames: with
        # the agent's clock on the same host, the task's transfer time (docs/protocol.md)
        "sent_at": (_NUMBER, _OPT),
        "authorization": (_DICT, _REQ),
        # a weighted bias mitigation's ExampleWeights.to_json(), covered by the grant's
        # example_weights_sha256
        "example_weights": (_DICT, _OPT),
    },
    # server -> agent after the last round; payload = the final model (safetensors) to evaluate
    # on the held-out split, no training; answered with an "evaluation" control message
    "evaluate": {
        "run": (_INT, _REQ),
        "rounds": (_INT, _REQ),
        "model_version": (_INT, _REQ),
        "plan_hash": (_STR, _REQ),
        "plan": (_DICT, _REQ),
        "preprocessing": (_DICT, _REQ),
        "deadline": (_NUMBER, _REQ),
        "sent_at": (_NUMBER, _OPT),
        "authorization": (_DICT, _REQ),
    },
    # agent -> server; payload = locally trained model (full weights, same keys/shapes/dtypes)
    "update": {
        "run": (_INT, _REQ),
        "round": (_INT, _REQ),
        "nonce": (_STR, _REQ),
        "num_examples": (_INT, _REQ),
        "metrics": (_DICT, _REQ),
        "silo": (_STR, _OPT),
        # sample-level DP: {"noise_multiplier", "sample_rate", "steps", "epsilon"} of this round
        "privacy": (_DICT, _OPT),
        # plans with a fairness section: sensitive attribute -> {group: {tp, fp, tn, fn}} of the
        # received global model on the held-out split (fedcore.fairness; docs/fairness.md)
        "fairness": (_DICT, _OPT),
        # plans with compression: "float16" | "int8" | "topk"; the payload is then the encoded
        # change from the global model (fedcore.compression). Absent: dense weights.
        "compression": (_STR, _OPT),
        # the agent's wall clock (Unix seconds) as it starts sending the update's frames
        "sent_at": (_NUMBER, _OPT),
        # multi-class and regression plans: the received global model's part of the pooled
        # metrics on the held-out split (fedcore.task_metrics, multi-class without histograms)
        "task_part": (_DICT, _OPT),
    },
    # agent -> server, secure rounds only, instead of "update": payload = the masked vector
    # (little-endian uint32, 4 bytes per coordinate) of the masked-input stage; metrics and the
    # example count travel in clear, as in "update"
    "masked_update": {
        "run": (_INT, _REQ),
        "round": (_INT, _REQ),
        "attempt": (_INT, _REQ),
        "nonce": (_STR, _REQ),
        "num_examples": (_INT, _REQ),
        "metrics": (_DICT, _REQ),
        "silo": (_STR, _OPT),
        "privacy": (_DICT, _OPT),
    },
}

_ENVELOPE_KEYS = ("v", "type")

# ------------------------------------------------------------------------------- JSON handling


class _JSONRefused(Exception):
    """Raised from inside json.loads hooks; turned into MalformedFrame by _parse_json."""


def _refuse_constant(name: str) -> NoReturn:
    raise _JSONRefused(f"{name} is not allowed; send finite numbers only")


# Integers a peer may send anywhere in a JSON document (fields, stats, metrics, plans): the signed
# 64-bit range, which every database column and float conversion downstream can take. A literal
# of 10**400 used to pass, then blew up where it was first turned into a float or stored.
JSON_INT_MIN, JSON_INT_MAX = -(1 << 63), (1 << 63) - 1
_JSON_INT_MAX_DIGITS = len(str(JSON_INT_MAX))  # 19: longer literals are refused unparsed


def _parse_bounded_int(text: str) -> int:
    digits = len(text) - (text[0] == "-")
    value = int(text) if digits <= _JSON_INT_MAX_DIGITS else None
    if value is None or not JSON_INT_MIN <= value <= JSON_INT_MAX:
        raise _JSONRefused(
            f"integer {_short(text, 30)} ({digits} digits) is outside the signed 64-bit range "
            f"[{JSON_INT_MIN}, {JSON_INT_MAX}]; send a smaller number"
        )
    return value


def _parse_finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _JSONRefused(f"number {_short(text)} overflows a 64-bit float")
    return value


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _JSONRefused(f"duplicate key {_short(key)}")
        obj[key] = value
    return obj


def _parse_json(text: str, what: str) -> Any:
    """Parse strict JSON: no NaN/Infinity, no float overflow, no integer beyond 64 bits, no
    duplicate keys."""
    try:
        return json.loads(
            text,
            parse_constant=_refuse_constant,
            parse_float=_parse_finite_float,
            parse_int=_parse_bounded_int,
            object_pairs_hook=_unique_object,
        )
    except _JSONRefused as exc:
        raise MalformedFrame(f"{what} is not valid JSON: {exc}") from None
    except json.JSONDecodeError as exc:
        raise MalformedFrame(
            f"{what} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except (ValueError, RecursionError) as exc:  # over-long integer literal, absurd nesting
        raise MalformedFrame(f"{what} is not valid JSON: {_short(str(exc), 120)}") from None


def _dumps(obj: Any) -> str:
    # Values were validated beforehand, so this cannot meet NaN or a non-JSON type.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _short(value: Any, limit: int = 60) -> str:
    """Render a received value for an error message: JSON-like, cut to ``limit`` characters."""
    if isinstance(value, dict | list | tuple):
        # Never render containers: a hostile one may be huge or nested ~1000 levels deep.
        return "{...}" if isinstance(value, dict) else "[...]"
    try:
        text = json.dumps(value, ensure_ascii=True, allow_nan=True)
    except (TypeError, ValueError):
        text = f"<{type(value).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__


def _valid_text(text: str) -> bool:
    # Lone surrogates (legal in JSON escapes) cannot be encoded as UTF-8 and would fail later,
    # when the value is stored or sent on.
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _child_path(path: str, node: Any, key: Any) -> str:
    return f"{path}.{key}" if isinstance(node, dict) else f"{path}[{key}]"


def _check_json_tree(value: Any, where: str, path: str) -> None:
    """Check a nested value is plain finite JSON (str keys, no surrogates), MAX_JSON_DEPTH deep.

    ``path`` names the value in messages (``plan.schema.columns[3]``); ``where`` the message.
    """
    # Iterative, so hostile nesting cannot exhaust the Python stack.
    stack: list[tuple[Any, str, int]] = [(value, path, 1)]
    while stack:
        node, node_path, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise InvalidField(
                f"{where}: field {node_path!r} nests deeper than {MAX_JSON_DEPTH} levels"
            )
        items: Any = node.items() if isinstance(node, dict) else enumerate(node)
        for key, item in items:
            if isinstance(node, dict) and not (isinstance(key, str) and _valid_text(key)):
                raise InvalidField(
                    f"{where}: field {node_path!r} has key {_short(key)}; keys must be UTF-8 "
                    "strings"
                )
            if isinstance(item, dict | list | tuple):
                stack.append((item, _child_path(node_path, node, key), depth + 1))
                continue
            problem = None
            if isinstance(item, str):
                problem = None if _valid_text(item) else "is not valid UTF-8 (lone surrogate)"
            elif isinstance(item, float):
                problem = None if math.isfinite(item) else f"is {item}, not a finite number"
            elif isinstance(item, int) and not JSON_INT_MIN <= item <= JSON_INT_MAX:
                problem = "is an integer outside the signed 64-bit range"
            elif not (item is None or isinstance(item, int)):  # bool is an int
                problem = f"is a {type(item).__name__}, not a JSON value"
            if problem:
                raise InvalidField(
                    f"{where}: field {_child_path(node_path, node, key)!r} {problem}"
                )


def _type_label(types: tuple[type, ...]) -> str:
    if types == _NUMBER:
        return "a number"
    return {int: "an integer", str: "a string", dict: "an object"}[types[0]]


def _check_value(name: str, value: Any, types: tuple[type, ...], where: str) -> None:
    label = f"{where}: field {name!r}"
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise InvalidField(
            f"{label} must be {_type_label(types)}, got {_json_kind(value)} {_short(value)}"
        )
    if isinstance(value, int) and types == _INT and not _INT_MIN <= value <= _INT_MAX:
        raise InvalidField(f"{label} must be between {_INT_MIN} and {_INT_MAX}, got {value}")
    if isinstance(value, int) and not JSON_INT_MIN <= value <= JSON_INT_MAX:
        raise InvalidField(f"{label} is an integer outside the signed 64-bit range")
    if isinstance(value, float) and not math.isfinite(value):
        raise InvalidField(f"{label} must be a finite number, got {value}")
    if isinstance(value, str) and not _valid_text(value):
        raise InvalidField(f"{label} is not valid UTF-8 (lone surrogate)")
    if isinstance(value, dict):
        _check_json_tree(value, where, name)


def _check_fields(fields: dict[str, Any], schema: Schema, where: str) -> None:
    unknown = sorted(repr(name) for name in fields if name not in schema)
    if unknown:
        raise InvalidField(
            f"{where}: unknown field(s) {', '.join(unknown)}; allowed: {', '.join(sorted(schema))}"
        )
    for name, (types, required) in schema.items():
        if name in fields:
            _check_value(name, fields[name], types, where)
        elif required:
            raise InvalidField(f"{where}: missing required field {name!r} ({_type_label(types)})")


# ------------------------------------------------------------------------------ control frames


def encode_control(msg_type: str, **fields: Any) -> str:
    """Build the JSON text of a control frame, validated against CONTROL_SCHEMAS.

    Args:
        msg_type: one of CONTROL_SCHEMAS, e.g. ``"hello"``.
        **fields: the message fields; optional fields are left out rather than set to None.

    Returns:
        compact JSON ``{"v": PROTOCOL_VERSION, "type": msg_type, **fields}``.

    Raises:
        UnknownMessageType: ``msg_type`` is not a control message type.
        InvalidField: a field is missing, unknown, mistyped, non-finite or nested too deep.
    """
    schema = CONTROL_SCHEMAS.get(msg_type) if isinstance(msg_type, str) else None
    if schema is None:
        raise UnknownMessageType(
            f"unknown control message type {_short(msg_type)}; "
            f"known: {', '.join(sorted(CONTROL_SCHEMAS))}"
        )
    where = f"control message {msg_type!r}"
    reserved = [key for key in _ENVELOPE_KEYS if key in fields]
    if reserved:
        raise InvalidField(f"{where}: {reserved[0]!r} is set by the protocol, not a field")
    _check_fields(fields, schema, where)
    return _dumps({"v": PROTOCOL_VERSION, "type": msg_type, **fields})


def encode_error(code: str, reason: str, **fields: Any) -> str:
    """Build an ``error`` control frame.

    Args:
        code: one of ERROR_CODES, e.g. ``ProtocolError.code``.
        reason: human-readable explanation; cut to MAX_ERROR_REASON_CHARS characters.
        **fields: optional ``run`` / ``round``; None values are dropped.

    Raises:
        InvalidField: ``code`` is not in ERROR_CODES, or a field is invalid.
    """
    if code not in ERROR_CODES:
        raise InvalidField(f"error code {_short(code)} is not one of ERROR_CODES")
    if isinstance(reason, str) and len(reason) > MAX_ERROR_REASON_CHARS:
        reason = reason[: MAX_ERROR_REASON_CHARS - 3] + "..."
    present = {name: value for name, value in fields.items() if value is not None}
    return encode_control("error", code=code, reason=reason, **present)


def decode_control(
    text: str | bytes, *, max_bytes: int = DEFAULT_MAX_CONTROL_BYTES
) -> dict[str, Any]:
    """Parse and validate a control frame; return the whole object including ``v`` and ``type``.

    Args:
        text: the text frame as received (str, or UTF-8 bytes).
        max_bytes: largest accepted frame in UTF-8 bytes, checked before parsing.

    Raises:
        OversizedFrame: the frame is longer than ``max_bytes``.
        MalformedFrame: not UTF-8, not strict JSON (NaN, Infinity, duplicate keys, ...), or not a
            JSON object.
        UnsupportedVersion: ``v`` is missing or not PROTOCOL_VERSION.
        InvalidField: ``type`` is missing or not a string, or a field is missing, unknown,
            mistyped, non-finite or nested too deep.
        UnknownMessageType: ``type`` is not a control message type.
    """
    if isinstance(text, bytes | bytearray | memoryview):
        size = memoryview(text).nbytes
        if size > max_bytes:
            raise OversizedFrame(
                f"control frame of {size} bytes exceeds the limit of {max_bytes} bytes"
            )
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedFrame(
                f"control frame is not UTF-8: invalid byte at byte offset {exc.start}"
            ) from None
    elif isinstance(text, str):
        # A character is at least one byte: the cheap test first, the exact one after.
        size = len(text)
        if size <= max_bytes:
            size = len(text.encode("utf-8", "surrogatepass"))
        if size > max_bytes:
            raise OversizedFrame(
                f"control frame of {size}+ bytes exceeds the limit of {max_bytes} bytes"
            )
    else:
        raise MalformedFrame(f"control frame must be text, got {type(text).__name__}")

    obj = _parse_json(text, "control frame")
    if not isinstance(obj, dict):
        raise MalformedFrame(f"control frame must be a JSON object, got {_json_kind(obj)}")
    _check_version(obj.get("v", None), "v" in obj, "control frame")
    msg_type = obj.get("type")
    if not isinstance(msg_type, str):
        state = "is missing" if "type" not in obj else f"is {_json_kind(msg_type)}"
        raise InvalidField(f"control frame: field 'type' {state}; it must be a string")
    schema = CONTROL_SCHEMAS.get(msg_type)
    if schema is None:
        hint = " (it is a binary message: send it as a binary frame)"
        raise UnknownMessageType(
            f"unknown control message type {_short(msg_type)}"
            f"{hint if msg_type in BINARY_SCHEMAS else ''}; "
            f"known: {', '.join(sorted(CONTROL_SCHEMAS))}"
        )
    fields = {key: value for key, value in obj.items() if key not in _ENVELOPE_KEYS}
    _check_fields(fields, schema, f"control message {msg_type!r}")
    return obj


def _check_version(version: Any, present: bool, where: str) -> None:
    if not present:
        raise UnsupportedVersion(
            f"{where} has no protocol version field 'v'; this peer speaks version "
            f"{PROTOCOL_VERSION}"
        )
    if isinstance(version, bool) or version != PROTOCOL_VERSION or not isinstance(version, int):
        raise UnsupportedVersion(
            f"{where}: protocol version {_short(version)} is not supported; this peer speaks "
            f"version {PROTOCOL_VERSION}: upgrade the older side"
        )


# ------------------------------------------------------------------------------- binary frames


@dataclass(frozen=True)
class BinaryMessage:
    """A reassembled binary message: its type, validated fields and safetensors payload."""

    type: str  # "task" | "update"
    fields: dict[str, Any]  # validated against BINARY_SCHEMAS[type]
    # safetensors bytes (a masked_update: uint32 words). A reassembled message's payload is the
    # bytearray the chunks were written into, handed over without a final copy, or the mmap of
    # the file they were spooled to (Reassembler's spool_dir).
    payload: bytes | bytearray | mmap.mmap


_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def _frame(header_bytes: bytes, chunk: bytes | memoryview) -> bytes:
    prefix = _FRAME_PREFIX.pack(FRAME_MAGIC, PROTOCOL_VERSION, len(header_bytes))
    return b"".join((prefix, header_bytes, chunk))


def encode_binary(
    msg: BinaryMessage,
    *,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    transfer_id: str | None = None,
) -> list[bytes]:
    """Split a binary message into websocket frames of at most ``max_frame_bytes`` each.

    Frame layout: ``b"QRMB" | u8 version | u32 big-endian header length | header JSON | chunk``.
    Every header has ``type, transfer, index, count, size, sha256``; frame 0's also has ``fields``.
    The list holds a second copy of the payload: a sender of large messages iterates
    :func:`binary_frames` instead, which builds each frame as it is sent.

    Args:
        msg: the message; ``msg.fields`` is validated against BINARY_SCHEMAS[msg.type].
        max_frame_bytes: largest frame produced, prefix and header included.
        transfer_id: 32 lowercase hex characters naming the transfer; default
            ``secrets.token_hex(16)``. Fixed ids are for tests.

    Returns:
        the frames in order; at least one (an empty payload gives one frame with no chunk).

    Raises:
        UnknownMessageType: ``msg.type`` is not a binary message type.
        InvalidField: a field, the payload type or ``transfer_id`` is invalid.
        OversizedFrame: ``max_frame_bytes`` leaves no room for payload after the header.
    """
    return list(binary_frames(msg, max_frame_bytes=max_frame_bytes, transfer_id=transfer_id))


@dataclass(frozen=True, eq=False)
class BinaryFrames:
    """The frames of one binary message, built one at a time as they are iterated.

    Made by :func:`binary_frames`; iterating twice gives the same frames again. Memory holds the
    payload and the frame being sent, never a second copy of the whole payload.
    """

    count: int  # number of frames
    nbytes: int  # bytes of all frames together (prefixes, headers and chunks)
    sha256: str  # lowercase hex SHA-256 of the payload, as every header declares it
    _headers: tuple[bytes, ...] = field(repr=False)
    _chunks: tuple[tuple[int, int], ...] = field(repr=False)  # (start, end) in the payload
    _payload: memoryview = field(repr=False)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[bytes]:
        for header_bytes, (start, end) in zip(self._headers, self._chunks, strict=True):
            yield _frame(header_bytes, self._payload[start:end])


def binary_frames(
    msg: BinaryMessage,
    *,
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
    transfer_id: str | None = None,
) -> BinaryFrames:
    """Validate and plan the frames of a binary message; they are built as they are iterated.

    Same frames as :func:`encode_binary` (which is ``list(binary_frames(...))``), same
    arguments and errors, raised here rather than during iteration. The payload is hashed once,
    here; it must not change while the frames are iterated.
    """
    schema = BINARY_SCHEMAS.get(msg.type) if isinstance(msg.type, str) else None
    if schema is None:
        raise UnknownMessageType(
            f"unknown binary message type {_short(msg.type)}; "
            f"known: {', '.join(sorted(BINARY_SCHEMAS))}"
        )
    where = f"binary message {msg.type!r}"
    if not isinstance(msg.fields, dict):
        raise InvalidField(f"{where}: fields must be a dict, got {type(msg.fields).__name__}")
    _check_fields(msg.fields, schema, where)
    if not isinstance(msg.payload, bytes | bytearray | memoryview | mmap.mmap):
        raise InvalidField(f"{where}: payload must be bytes, got {type(msg.payload).__name__}")
    transfer = secrets.token_hex(16) if transfer_id is None else transfer_id
    if not isinstance(transfer, str) or not _HEX32.fullmatch(transfer):
        raise InvalidField(f"transfer_id {_short(transfer)} must be 32 lowercase hex characters")

    payload = memoryview(msg.payload).cast("B")
    size = payload.nbytes
    digest = hashlib.sha256(payload).hexdigest()
    base = {
        "type": msg.type,
        "transfer": transfer,
        "index": 0,
        "count": 1,
        "size": size,
        "sha256": digest,
    }

    def header(index: int, count: int) -> bytes:
        extra = {"fields": msg.fields} if index == 0 else {}
        return _dumps({**base, "index": index, "count": count, **extra}).encode("utf-8")

    def room(index: int, count: int) -> int:
        return max_frame_bytes - FRAME_PREFIX_BYTES - len(header(index, count))

    # Headers grow with the digits of index and count, so look for the fixed point of count.
    # The widest header after frame 0 is the last one's. Rooms only shrink as count grows, so
    # `needed` never decreases and the loop stops at the smallest count that fits the payload.
    count = 1
    while True:
        room0 = room(0, count)
        room_rest = room(max(count - 1, 1), count)
        if room0 < (1 if size else 0) or (size > room0 and room_rest < 1):
            overhead = max_frame_bytes - (room0 if room0 < 1 else room_rest)
            raise OversizedFrame(
                f"{where}: max_frame_bytes={max_frame_bytes} leaves no room for payload after "
                f"the {overhead}-byte prefix and header; raise max_frame_bytes or send smaller "
                "fields"
            )
        needed = 1 if size <= room0 else 1 + -(-(size - room0) // room_rest)
        if needed <= count:
            break
        count = needed

    headers = tuple(header(index, count) for index in range(count))
    chunks = [(0, min(room0, size))]
    for index in range(1, count):
        start = room0 + (index - 1) * room_rest
        chunks.append((start, min(start + room_rest, size)))
    return BinaryFrames(
        count=count,
        nbytes=count * FRAME_PREFIX_BYTES + sum(map(len, headers)) + size,
        sha256=digest,
        _headers=headers,
        _chunks=tuple(chunks),
        _payload=payload,
    )


_HEADER_KEYS: dict[str, type] = {
    "type": str,
    "transfer": str,
    "index": int,
    "count": int,
    "size": int,
    "sha256": str,
}


@dataclass
class _Transfer:
    """The binary message being reassembled."""

    type: str
    transfer: str
    count: int
    size: int
    sha256: str
    fields: dict[str, Any]
    next_index: int = 1
    received: int = 0
    # The payload so far. It grows as chunks arrive (realloc moves big buffers by remapping
    # pages, not copying), so memory follows the bytes actually received, never the declared
    # size, and the finished buffer is the message's payload: one copy of the data in all.
    buffer: bytearray = field(default_factory=bytearray)
    hasher: Any = field(default_factory=hashlib.sha256)
    spool: "_Spool | None" = None  # the payload goes to a file instead of ``buffer``

    def discard(self) -> None:
        """Free what the transfer holds (its spool file)."""
        if self.spool is not None:
            self.spool.close()


@dataclass(frozen=True)
class _SpooledFile:
    fd: int
    sha256: str


# payload mmap -> its spool file. Weak keys: the entry (and the file, by the finalizer that
# closes it) goes when the last reference to the payload does.
_SPOOLED: "weakref.WeakKeyDictionary[mmap.mmap, _SpooledFile]" = weakref.WeakKeyDictionary()


def spooled_file(payload: object) -> tuple[int, str] | None:
    """(file descriptor, verified SHA-256) of a payload a Reassembler spooled, else None.

    The descriptor is an anonymous file (``O_TMPFILE``) in the Reassembler's ``spool_dir``
    holding exactly the received payload; it stays open while the payload lives. A blob store
    links it into place instead of writing the bytes again (``federation.storage``), and the
    digest is that of the file's bytes, checked on receipt, so nobody needs to hash them again.
    """
    if isinstance(payload, mmap.mmap):
        spooled = _SPOOLED.get(payload)
        if spooled is not None:
            return spooled.fd, spooled.sha256
    return None


class _SpoolFailed(ProtocolError):
    """The receiver could not write or map a spooled payload (disk full, ...): its own fault."""

    code = "internal"


_SPOOL_QUEUE_CHUNKS = 16  # chunks handed to a spool's writer thread and not yet written
_SPOOL_FLUSH_BYTES = 4 << 20  # the flusher syncs once this much more has been written


class _Flusher:
    """Flush a spool file to disk while it is being written, so the transfer's last fsync
    finds almost nothing left to write.

    A thread calls ``fdatasync`` each time the writer has written ``_SPOOL_FLUSH_BYTES`` more:
    the disk works beside the network instead of after it. On the reference machine (a KVM guest)
    it cut the wait after the last chunk of 100 MB from 0.13 s to 0.03 s; asking for
    asynchronous writeback (``sync_file_range``) per chunk saved a third of that. A hint only:
    an error here is left to the final fsync (``federation.storage``) to report.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._written = self._flushed = 0
        self._done = False
        self._wake = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="quorum-spool-sync", daemon=True)
        self._thread.start()

    def written(self, total: int) -> None:
        """The writer has written ``total`` bytes so far."""
        with self._wake:
            self._written = total
            if total - self._flushed >= _SPOOL_FLUSH_BYTES:
                self._wake.notify()

    def stop(self) -> None:
        """Finish the flush under way, if any, and end the thread."""
        with self._wake:
            self._done = True
            self._wake.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._wake:
                self._wake.wait_for(
                    lambda: self._done or self._written - self._flushed >= _SPOOL_FLUSH_BYTES
                )
                if self._done:
                    return
                target = self._written
            try:
                os.fdatasync(self._fd)  # releases the GIL
            except OSError:
                return
            with self._wake:
                self._flushed = target


def _spool_writer(
    jobs: "queue.Queue[memoryview | None]",
    fd: int,
    hasher: Any,
    failed: list[OSError],
    flusher: _Flusher,
) -> None:
    """Hash and write the chunks of one spooled transfer, in order, until None arrives."""
    offset = 0
    while (chunk := jobs.get()) is not None:
        if failed:
            continue  # keep draining, so the receiving side never blocks on a full queue
        try:
            hasher.update(chunk)  # both release the GIL: this runs beside the event loop
            length = chunk.nbytes
            while chunk:
                chunk = chunk[os.write(fd, chunk) :]
        except OSError as exc:
            failed.append(exc)
            continue
        offset += length
        flusher.written(offset)


def _stop_spool(
    jobs: "queue.Queue[memoryview | None]",
    writer: threading.Thread,
    flusher: _Flusher,
    fd: int | None,
) -> None:
    jobs.put(None)
    writer.join()
    flusher.stop()
    if fd is not None:
        os.close(fd)


class _Spool:
    """The payload of one transfer written to an anonymous file rather than kept in memory.

    A writer thread hashes and writes the chunks while the receiving thread goes on parsing
    the next frames (hashing and writing release the GIL); at most ``_SPOOL_QUEUE_CHUNKS``
    chunks wait for it, after which ``write`` waits too. A :class:`_Flusher` thread syncs what
    is written as it goes.
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        # O_TMPFILE: the file has no name, so it disappears by itself when closed (a dropped
        # transfer, a crash), yet it can be linked into a directory of the same filesystem.
        self.fd = os.open(directory, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
        self.hasher = hashlib.sha256()
        self._failed: list[OSError] = []
        self._jobs: queue.Queue[memoryview | None] = queue.Queue(maxsize=_SPOOL_QUEUE_CHUNKS)
        self._flusher = _Flusher(self.fd)
        self._writer = threading.Thread(
            target=_spool_writer,
            args=(self._jobs, self.fd, self.hasher, self._failed, self._flusher),
            name="quorum-spool",
            daemon=True,
        )
        self._writer.start()
        # Dropped (reset, refusal, or simply forgotten): stop the threads, close the file.
        self._close = weakref.finalize(
            self, _stop_spool, self._jobs, self._writer, self._flusher, self.fd
        )

    def write(self, chunk: memoryview) -> None:
        """Queue a chunk (the frame it views stays alive until written); raises OSError when
        an earlier chunk could not be written."""
        if self._failed:
            raise self._failed[0]
        self._jobs.put(chunk)

    def close(self) -> None:
        """Stop the writer and close the file (a dropped transfer)."""
        self._close()

    def finish(self) -> str:
        """Wait for the writer to write every chunk; return the payload's SHA-256 (hex)."""
        self._close.detach()
        _stop_spool(self._jobs, self._writer, self._flusher, None)
        self._close = weakref.finalize(self, os.close, self.fd)
        if self._failed:
            raise self._failed[0]
        return str(self.hasher.hexdigest())

    def mapping(self, size: int, sha256: str) -> mmap.mmap:
        """The written payload as a private, writable mapping that owns the file from now on."""
        # Private: writing a tensor decoded from it never changes the file. No MAP_POPULATE:
        # on a private writable mapping it would copy every page (a second 100 MB, anonymous);
        # pages read map the page cache.
        payload = mmap.mmap(
            self.fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE
        )
        self._close.detach()
        weakref.finalize(payload, os.close, self.fd)
        _SPOOLED[payload] = _SpooledFile(self.fd, sha256)
        return payload


class Reassembler:
    """Validate binary frames and reassemble chunked messages, one transfer at a time."""

    def __init__(
        self,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        spool_dir: str | os.PathLike[str] | None = None,
        spool_threshold: int = DEFAULT_SPOOL_THRESHOLD,
    ) -> None:
        """Create an empty reassembler.

        Args:
            max_message_bytes: largest declared payload size accepted (refused at frame 0,
                before anything is buffered).
            max_frame_bytes: largest frame accepted, checked before parsing.
            max_header_bytes: largest JSON header accepted in one frame.
            spool_dir: where to write the payloads of messages of ``spool_threshold`` bytes or
                more as they arrive, as anonymous files (Linux ``O_TMPFILE``), instead of
                holding them in memory. Such a message's payload is then a private, writable
                ``mmap`` of its file (see :func:`spooled_file`). None, or a directory that
                cannot hold anonymous files, keeps every payload in memory (a ``bytearray``).
            spool_threshold: smallest declared payload size that is spooled.

        Raises:
            ValueError: a limit is not a positive int, or max_frame_bytes cannot hold a prefix.
        """
        limits = {
            "max_message_bytes": max_message_bytes,
            "max_frame_bytes": max_frame_bytes,
            "max_header_bytes": max_header_bytes,
        }
        for name, value in limits.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Reassembler: {name} must be a positive int, got {value!r}")
        if max_frame_bytes <= FRAME_PREFIX_BYTES:
            raise ValueError(
                f"Reassembler: max_frame_bytes must exceed the {FRAME_PREFIX_BYTES}-byte prefix"
            )
        self.max_message_bytes = max_message_bytes
        self.max_frame_bytes = max_frame_bytes
        self.max_header_bytes = max_header_bytes
        self.spool_dir = spool_dir
        self.spool_threshold = spool_threshold
        self._transfer: _Transfer | None = None

    def reset(self) -> None:
        """Drop any partially received transfer."""
        if self._transfer is not None:
            self._transfer.discard()
        self._transfer = None

    def feed(self, frame: bytes) -> BinaryMessage | None:
        """Take one binary frame; return the message when its last chunk arrives, else None.

        Args:
            frame: one binary websocket frame as received.

        Returns:
            the complete, checksum-verified message, or None while more chunks are expected.

        Raises:
            ProtocolError: any subclass, with ``str(e)`` naming the problem and where it is. The
                reassembler is then reset: the open transfer (if any) is dropped and the next
                frame must start a new transfer.
        """
        try:
            return self._feed(frame)
        except ProtocolError:
            self.reset()
            raise

    def _feed(self, frame: bytes) -> BinaryMessage | None:
        if not isinstance(frame, bytes | bytearray | memoryview):
            raise MalformedFrame(f"binary frame must be bytes, got {type(frame).__name__}")
        length = memoryview(frame).nbytes
        if length > self.max_frame_bytes:
            raise OversizedFrame(
                f"binary frame of {length} bytes exceeds the limit of {self.max_frame_bytes} "
                "bytes; the sender must chunk with a smaller max_frame_bytes"
            )
        if not isinstance(frame, bytes):
            frame = bytes(frame)
        header, chunk = self._split(frame)
        transfer = self._sequence(header)
        try:
            self._append(transfer, header["index"], chunk)
            if header["index"] < transfer.count - 1:
                transfer.next_index = header["index"] + 1
                self._transfer = transfer
                return None
            self._transfer = None
            return self._finish(transfer)
        except BaseException:
            transfer.discard()
            raise

    def _split(self, frame: bytes) -> tuple[dict[str, Any], memoryview]:
        """Check the prefix, parse and validate the header; return it and the chunk bytes."""
        length = len(frame)
        if length < FRAME_PREFIX_BYTES:
            raise TruncatedFrame(
                f"binary frame of {length} bytes is shorter than the {FRAME_PREFIX_BYTES}-byte "
                "prefix (magic, version, header length)"
            )
        magic, version, header_length = _FRAME_PREFIX.unpack_from(frame)
        if magic != FRAME_MAGIC:
            raise MalformedFrame(
                f"binary frame: bad magic {magic!r} at byte offset 0, expected {FRAME_MAGIC!r}"
            )
        if version != PROTOCOL_VERSION:
            raise UnsupportedVersion(
                f"binary frame: protocol version {version} at byte offset 4 is not supported; "
                f"this peer speaks version {PROTOCOL_VERSION}"
            )
        if header_length > length - FRAME_PREFIX_BYTES:
            raise TruncatedFrame(
                f"binary frame: header length {header_length} (byte offset 5) runs past the end "
                f"of the {length}-byte frame"
            )
        if header_length > self.max_header_bytes:
            raise OversizedFrame(
                f"binary frame: header of {header_length} bytes exceeds the limit of "
                f"{self.max_header_bytes} bytes"
            )
        end = FRAME_PREFIX_BYTES + header_length
        try:
            text = frame[FRAME_PREFIX_BYTES:end].decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MalformedFrame(
                "binary frame header is not UTF-8: invalid byte at byte offset "
                f"{FRAME_PREFIX_BYTES + exc.start}"
            ) from None
        header = _parse_json(text, "binary frame header")
        if not isinstance(header, dict):
            raise MalformedFrame(
                f"binary frame header must be a JSON object, got {_json_kind(header)}"
            )
        self._check_header(header)
        return header, memoryview(frame)[end:]

    def _check_header(self, header: dict[str, Any]) -> None:
        where = "binary frame header"
        allowed = set(_HEADER_KEYS) | {"fields"}
        unknown = sorted(repr(key) for key in header if key not in allowed)
        if unknown:
            raise InvalidField(f"{where}: unknown key(s) {', '.join(unknown)}")
        for key, kind in _HEADER_KEYS.items():
            if key not in header:
                raise InvalidField(f"{where}: missing key {key!r}")
            value = header[key]
            if isinstance(value, bool) or not isinstance(value, kind):
                raise InvalidField(
                    f"{where}: key {key!r} must be {_type_label((kind,))}, "
                    f"got {_json_kind(value)} {_short(value)}"
                )
            if kind is int and not _INT_MIN <= value <= _INT_MAX:
                raise InvalidField(f"{where}: key {key!r} out of range: {value}")
        if not _HEX32.fullmatch(header["transfer"]):
            raise InvalidField(
                f"{where}: 'transfer' {_short(header['transfer'])} is not 32 lowercase hex chars"
            )
        if not _HEX64.fullmatch(header["sha256"]):
            raise InvalidField(
                f"{where}: 'sha256' {_short(header['sha256'])} is not 64 lowercase hex chars"
            )
        index, count, size = header["index"], header["count"], header["size"]
        where = f"binary frame {index} of transfer {header['transfer']}"
        if size > self.max_message_bytes:
            raise OversizedFrame(
                f"{where}: declared size {size} bytes exceeds the limit of "
                f"{self.max_message_bytes} bytes"
            )
        if not 1 <= count <= size + 1:
            raise InvalidField(
                f"{where}: count {count} must be between 1 and size + 1 ({size + 1})"
            )
        if index >= count:
            raise InvalidField(f"{where}: index {index} must be below count {count}")
        if index == 0 and not isinstance(header.get("fields"), dict):
            state = "missing" if "fields" not in header else _json_kind(header["fields"])
            raise InvalidField(f"{where}: frame 0 must carry 'fields' as an object, got {state}")
        if index > 0 and "fields" in header:
            raise InvalidField(f"{where}: only frame 0 carries 'fields'")
        if header["type"] not in BINARY_SCHEMAS:
            raise UnknownMessageType(
                f"{where}: unknown binary message type {_short(header['type'])}; "
                f"known: {', '.join(sorted(BINARY_SCHEMAS))}"
            )

    def _sequence(self, header: dict[str, Any]) -> _Transfer:
        """Return the transfer this frame continues (or starts), refusing anything out of line."""
        index, transfer_id = header["index"], header["transfer"]
        current = self._transfer
        if current is None:
            if index != 0:
                raise ChunkSequenceError(
                    f"binary frame {index} of transfer {transfer_id} arrived with no transfer "
                    "open; a transfer starts at frame 0"
                )
            msg_type = header["type"]
            _check_fields(
                header["fields"], BINARY_SCHEMAS[msg_type], f"binary message {msg_type!r}"
            )
            return _Transfer(
                type=msg_type,
                transfer=transfer_id,
                count=header["count"],
                size=header["size"],
                sha256=header["sha256"],
                fields=header["fields"],
                spool=self._open_spool(header["size"]),
            )
        if transfer_id != current.transfer:
            raise ChunkSequenceError(
                f"binary frame {index} of transfer {transfer_id} arrived while transfer "
                f"{current.transfer} is open ({current.next_index} of {current.count} frames "
                "received); finish one transfer before starting the next"
            )
        if index != current.next_index:
            raise ChunkSequenceError(
                f"transfer {transfer_id}: frame {index} arrived, expected frame "
                f"{current.next_index} (duplicated or out of order)"
            )
        for key in ("type", "count", "size", "sha256"):
            declared = getattr(current, key)
            if header[key] != declared:
                raise ChunkSequenceError(
                    f"transfer {transfer_id} frame {index}: {key!r} is {_short(header[key])}, "
                    f"but frame 0 declared {_short(declared)}"
                )
        return current

    def _open_spool(self, size: int) -> _Spool | None:
        if self.spool_dir is None or size < max(self.spool_threshold, 1):
            return None
        try:
            return _Spool(self.spool_dir)
        except (OSError, AttributeError):  # no such directory, no O_TMPFILE here: keep in memory
            return None

    @staticmethod
    def _append(transfer: _Transfer, index: int, chunk: memoryview) -> None:
        length = chunk.nbytes
        if length == 0 and transfer.size > 0:
            # Every frame of a non-empty transfer must make progress, so a transfer cannot be
            # held open indefinitely with empty frames.
            raise ChunkSequenceError(
                f"transfer {transfer.transfer} frame {index}: empty chunk in a transfer of "
                f"{transfer.size} bytes"
            )
        if transfer.received + length > transfer.size:
            raise ChunkSequenceError(
                f"transfer {transfer.transfer} frame {index}: {length} payload bytes bring the "
                f"total to {transfer.received + length}, beyond the declared size {transfer.size}"
            )
        if transfer.spool is not None:  # hashed and written by the spool's writer thread
            try:
                transfer.spool.write(chunk)
            except OSError as exc:
                raise _SpoolFailed(
                    f"transfer {transfer.transfer} frame {index}: the receiver could not store "
                    f"the chunk ({exc.strerror or exc}); send the message again later"
                ) from exc
        else:
            transfer.hasher.update(chunk)
            transfer.buffer += chunk
        transfer.received += length

    @staticmethod
    def _finish(transfer: _Transfer) -> BinaryMessage:
        if transfer.received != transfer.size:
            raise ChunkSequenceError(
                f"transfer {transfer.transfer}: last frame arrived after {transfer.received} of "
                f"the declared {transfer.size} payload bytes"
            )
        if transfer.spool is not None:
            try:
                digest = transfer.spool.finish()
            except OSError as exc:
                raise _SpoolFailed(
                    f"transfer {transfer.transfer}: the receiver could not store the payload "
                    f"({exc.strerror or exc}); send the message again later"
                ) from exc
        else:
            digest = transfer.hasher.hexdigest()
        if digest != transfer.sha256:
            raise ChecksumMismatch(
                f"transfer {transfer.transfer}: payload sha256 {digest} does not match the "
                f"declared {transfer.sha256}; the payload was corrupted in transit, resend it"
            )
        if transfer.spool is not None:
            try:
                payload: bytes | bytearray | mmap.mmap = transfer.spool.mapping(
                    transfer.size, digest
                )
            except OSError as exc:
                raise _SpoolFailed(
                    f"transfer {transfer.transfer}: the receiver could not map the payload "
                    f"({exc.strerror or exc}); send the message again later"
                ) from exc
        else:
            payload = transfer.buffer
        return BinaryMessage(type=transfer.type, fields=transfer.fields, payload=payload)
