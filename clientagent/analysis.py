"""The site's part of an analysis plan: answer one ``analysis_request`` step.

The request's grant and the site operator's decision are checked first
(``clientagent.connection.Agent.check_request``); then this module parses the plan with the plan
language (``fedcore.plan.parse_analysis_plan``, the parser the server ran at proposal), applies
the site's ``[disclosure]`` policy and computes the step's answer with ``fedcore.analytics``.
Nothing of the rows leaves but the answer; a refusal says why (docs/analytics.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from clientagent.data import DataFileError, LocalData
from clientagent.policy import POLICY_REFUSED
from clientagent.trainer import DATA_INVALID, INVALID_TASK, TaskError
from fedcore import tabular
from fedcore.analytics.disclosure import DisclosurePolicy, DisclosureRefused
from fedcore.analytics.steps import secure_answer, site_answer
from fedcore.plan import PlanError, parse_analysis_plan


def handle_analysis_request(
    fields: Mapping[str, Any], data: LocalData, disclosure: DisclosurePolicy
) -> dict[str, Any]:
    """Answer one step of an analysis plan.

    Args:
        fields: the decoded ``analysis_request`` (``run``, ``plan``, ``step``, ``params``),
            its grant already checked.
        data: the site's data.
        disclosure: ``[disclosure]`` from site.toml.

    Returns:
        The fields of the ``analysis`` reply: ``{"run", "step", "answer"}``.

    Raises:
        TaskError: ``invalid_task`` (a plan the language refuses, a step it does not have),
            ``policy_refused`` (the disclosure policy refuses: a kind not allowed, a cohort
            below the minimum cell count) or ``data_invalid`` (the data does not match).
    """
    run, step = fields["run"], fields["step"]
    try:
        plan = parse_analysis_plan(fields["plan"])
    except PlanError as exc:
        raise TaskError(INVALID_TASK, str(exc), run=run) from None
    try:
        frame = tabular.validate_frame(data.load(), plan.schema)
    except (tabular.DataValidationError, DataFileError) as exc:
        raise TaskError(
            DATA_INVALID,
            f"the site's data does not match the plan's schema: {exc}",
            run=run,
            shared_reason="the site's data does not match the plan's schema",
        ) from None
    try:
        answer = site_answer(
            plan.analysis, step, fields["params"], frame, disclosure, noise=plan.privacy
        )
    except DisclosureRefused as exc:
        raise TaskError(
            POLICY_REFUSED, f"the site's [disclosure] policy refuses: {exc}", run=run
        ) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise TaskError(INVALID_TASK, f"analysis step {step!r}: {exc}", run=run) from None
    return {"run": run, "step": step, "answer": answer}


def mask_reply(
    fields: Mapping[str, Any], reply: Mapping[str, Any]
) -> tuple[dict[str, Any], list[int] | None]:
    """The reply as it leaves under the plan: unchanged, with no cells, for a plan in clear;
    for a plan under secure aggregation, the answer without its summary (its layout in place,
    ``fedcore.analytics.steps.secure_answer``) and the summary's cells, which leave only
    masked, in the step's SecAgg session (``clientagent.secagg_session``).

    Raises:
        TaskError: ``invalid_task``: a summary that cannot be encoded (a value too large).
    """
    plan = parse_analysis_plan(fields["plan"])
    if not plan.secure_aggregation:
        return dict(reply), None
    try:
        answer, cells = secure_answer(reply["answer"])
    except ValueError as exc:
        raise TaskError(
            INVALID_TASK, f"analysis step {fields['step']!r}: {exc}", run=fields["run"]
        ) from None
    return {**reply, "answer": answer}, cells or None  # event times: no summary, no cells
