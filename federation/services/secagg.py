"""Secure aggregation as an agent connection sees it: when a silo is a dropout, stage replies.

The consumer only parses frames; these decide. A silo is a dropout of a secure round attempt
when its agent (re)connects (a new session holds no secure-aggregation secrets), when a greeted
connection ends without being replaced by a newer one, and when its agent reports an error about
that round: stages then stop waiting for it (``federation.secagg_rounds.silo_gone``).
"""

from __future__ import annotations

from typing import Any

from fedcore.protocol import BinaryMessage
from federation import secagg_analysis, secagg_rounds, selectors


def secagg_session_started(*, silo_id: int) -> None:
    """A new session of the silo's agent: a dropout of every secure attempt in progress."""
    secagg_rounds.silo_gone(silo_id)
    secagg_analysis.silo_gone(silo_id)


def secagg_session_ended(*, silo_id: int, greeted: bool, replaced: bool) -> None:
    """A connection ended: its secrets went with it, unless a newer session already took over
    (that one made the silo a dropout when it said hello) or it never said hello."""
    if greeted and not replaced:
        secagg_rounds.silo_gone(silo_id)
        secagg_analysis.silo_gone(silo_id)


def secagg_round_refused(*, silo_id: int, run_id: int | None, number: int | None) -> None:
    """The silo's agent reported an error about a round: it will not contribute to it."""
    if run_id is not None and number is not None:
        secagg_rounds.silo_gone(silo_id, run_id=run_id, number=number)
    if run_id is not None:
        secagg_analysis.silo_gone(silo_id, run_id=run_id)


def secagg_stage_receive(*, silo_id: int, fields: dict[str, Any]) -> None:
    """A ``secagg`` stage reply, to the round attempt's coordinator, or to the analysis step's
    when it names a step (raises ``Refused``)."""
    if "step" in fields:
        secagg_analysis.receive(silo_id=silo_id, fields=fields)
        return
    secagg_rounds.receive(silo_id=silo_id, fields=fields)


def secagg_masked_receive(*, silo_id: int, fields: dict[str, Any], payload: bytes) -> None:
    """A ``masked_update``: accounted for and added to the masked sum (raises ``Refused``)."""
    secagg_rounds.receive_masked(silo_id=silo_id, fields=fields, payload=payload)


def round_task_for(*, round_id: int, silo_id: int) -> BinaryMessage | None:
    """The silo's task message for a round, or None (not selected, over, or a secure dropout:
    nothing to train for)."""
    if secagg_rounds.is_dropout(round_id, silo_id):
        return None
    return selectors.task_message(round_id=round_id, silo_id=silo_id)
