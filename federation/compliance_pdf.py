"""The compliance report as a PDF: the facts of ``reports.compliance_report_json``, laid out for
an auditor's file (plan and hash, every decision with its signature, data used, privacy spent
per silo, the fairness summary, the run's audit trail and the chain's head)."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from federation import reports
from federation.models import Run
from federation.pdf import MONO, Column, PdfDocument


def _when(value: str | None) -> str:
    """An ISO timestamp to the second, with its zone (or a dash)."""
    if not value:
        return "-"
    return datetime.fromisoformat(value).replace(microsecond=0).isoformat(sep=" ")


def filename(run: Run) -> str:
    """The PDF's download name: run id and the start of the plan hash."""
    return f"compliance-run{run.pk}-{run.plan_hash[:12]}.pdf"


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _limits_table(doc: PdfDocument, metrics: Any) -> None:
    """A fairness report's metrics against the plan's limits: value, limit, status."""
    doc.table(
        [
            Column("Metric", 2.2),
            Column("Value", 1.0),
            Column("Plan's limit", 1.0),
            Column("Status", 1.4),
        ],
        [
            [
                m["label"],
                _number(m["value"]),
                _number(m["limit"]),
                "exceeds the limit"
                if m["flagged"]
                else ("within the limit" if m["limit"] is not None else "no limit"),
            ]
            for m in metrics
        ],
    )


def _signature(signature: Any) -> str:
    """A decision's signature as lines of 'field: value' (every field: it is what a site
    verifies), or why there is none."""
    if not signature:
        return "none (approved without a signature)"
    if not isinstance(signature, dict):
        return json.dumps(signature, sort_keys=True)
    return "\n".join(f"{key}: {signature[key]}" for key in sorted(signature))


def compliance_report_pdf(run: Run) -> bytes:
    """The run's compliance report as PDF bytes."""
    return render_compliance_pdf(
        reports.compliance_report_json(run), consortium=run.plan.consortium.name
    )


def _evaluated(evaluated: dict[str, Any]) -> str:
    source = evaluated["source"]
    if source.get("uploaded") is not None:
        what = (
            f"uploaded model {source['uploaded']} '{source.get('name') or '(gone)'}', uploaded "
            f"by {source.get('uploaded_by') or '-'} (trained outside Quorum: its training rows "
            "are unknown)"
        )
    else:
        what = f"model v{source['model_version']} of run {source['run']}"
    return f"{what}; SHA-256 {source['sha256']}; {evaluated['rows_note']}"


def render_compliance_pdf(report: dict[str, Any], *, consortium: str) -> bytes:
    """Lay out a compliance report (the API's JSON form) as a PDF."""
    run, plan = report["run"], report["plan"]
    title = f"Compliance report: run {run['id']} of {plan['name']}"
    doc = PdfDocument(title, footer=f"{title} · generated {_when(report['generated_at'])}")
    doc.heading(title)
    doc.paragraph(f"{consortium} · generated {_when(report['generated_at'])}")

    state = report["approval_state"]
    doc.heading("Plan and its approval", 2)
    rules = "yes" if state.get("satisfied") else "no"
    if state.get("parts"):  # the rule's parts, each with its capped progress (as the page)
        rules += ": " + "; ".join(
            ("stewards of every silo: " if part["name"] == "stewards" else "organisations: ")
            + part["progress"]
            for part in state["parts"]
        )
    else:
        approved = state.get("organizations_approved") or []
        needed = state.get("organizations_needed") or 0
        rules += f": organisations: {min(len(approved), needed)} of {needed} needed" + (
            f" ({', '.join(approved)})" if approved else ""
        )
    if state.get("stewards_missing"):
        rules += f"; stewards missing: {', '.join(state['stewards_missing'])}"
    facts_rule = [("Approval rule", state["rule"])] if state.get("rule") else []
    if report.get("evaluated"):
        facts_rule.append(("Model evaluated", _evaluated(report["evaluated"])))
    doc.facts(
        [
            ("Plan", f"{plan['name']} (id {plan['id']}), version {plan['version']}"),
            ("Plan hash (SHA-256)", run["plan_hash"]),
            *facts_rule,
            ("Approval rules met", rules),
            (
                "Run",
                f"{run['status']}"
                + (", final model over a fairness limit" if run.get("fairness_warning") else "")
                + (
                    ", within the fairness limits after thresholds"
                    if run.get("fairness_info")
                    else ""
                )
                + f"; started {_when(run['started_at'])}, finished {_when(run['finished_at'])}",
            ),
        ]
    )
    doc.table(
        [
            Column("When", 1.3),
            Column("Who", 1.1),
            Column("For", 1.4),
            Column("Role", 1.0),
            Column("Decision", 0.8),
            Column("Signature", 3.4, MONO),
        ],
        [
            [
                _when(d["at"]),
                d["user"],
                d["organization"],
                d["role"],
                d["decision"] + (f": {d['reason']}" if d.get("reason") else ""),
                _signature(d.get("signature")),
            ]
            for d in report["decisions"]
        ],
        empty="No decision recorded for this hash.",
    )

    doc.heading("Data used", 2)
    doc.table(
        [
            Column("Silo", 1.2),
            Column("Organisation", 2.0),
            Column("Rows registered", 1.0),
            Column("Updates sent", 0.9),
            Column("Examples trained on (sum over rounds)", 1.6),
        ],
        [
            [
                d["silo"],
                d["organization"],
                str(d["rows"]),
                str(d["updates_sent"]),
                str(d["examples_trained"]),
            ]
            for d in report["data_used"]
        ],
        empty="No silo.",
    )
    doc.paragraph(
        "No raw record left a site: silos sent model updates and aggregate statistics only."
    )

    task = report.get("task_metrics")
    if task is not None:
        doc.heading(f"Final evaluation ({task['task']} task)", 2)
        doc.paragraph(
            f"The final model v{task['model_version']} on each silo's held-out rows and pooled: "
            f"{task['method']}."
        )
        doc.table(
            [Column("Silo", 2.0), Column("Rows", 0.7)]
            + [Column(heading, 1.0) for heading in task["columns"]],
            [
                [row["name"], str(row["n"])] + [_number(v) for v in row["values"]]
                for row in task["rows"]
            ],
            empty="No silo evaluated the final model.",
        )
        for d in task["largest_disparities"]:
            if d.get("metric") is None:
                continue
            doc.paragraph(
                f"Largest group disparity by {d['attribute']}: {d['metric']}"
                + (f" of class {d['class']}" if d.get("class") is not None else "")
                + f", difference {_number(d['difference'])}."
            )
        if task.get("fairness_note"):
            doc.paragraph(task["fairness_note"])

    analysis = report.get("analysis")
    if analysis is not None:
        doc.heading("Analysis released", 2)
        release = analysis["release"]
        doc.paragraph(
            f"A {analysis['kind']} analysis in {len(analysis['steps'])} step(s), each a signed "
            "request to every site, answered under the site's own disclosure policy. "
            + (
                f"Released from {release.get('sites')} site(s)"
                + (
                    f", cells below {release['min_cell_count']} suppressed"
                    if "min_cell_count" in release
                    else ""
                )
                + (f"; event times: {release['coarsening']}" if "coarsening" in release else "")
                + (f"; noised: {release['noise']['note']}" if release.get("noise") else "")
                + "."
                if analysis["released"]
                else f"Nothing was released: {analysis['withheld'] or 'the run did not finish'}."
            )
        )
        doc.table(
            [
                Column("Silo", 1.6),
                Column("Steps asked", 0.9),
                Column("Steps answered", 0.9),
                Column("Refused", 3.0),
            ],
            [
                [
                    s["silo"],
                    str(len(s["steps_asked"])),
                    str(len(s["steps_answered"])),
                    s["refused"] or "-",
                ]
                for s in analysis["sites"]
            ],
            empty="No silo.",
        )

    privacy = report["privacy"]
    doc.heading("Privacy (epsilon spent per silo)", 2)
    doc.paragraph(f"Differential privacy mode: {privacy['mode']}. {privacy['status']}.")
    no_dp = privacy["mode"] == "none"
    doc.table(
        [Column("Silo", 2.0), Column("Epsilon spent", 1.0)],
        [
            [silo, _number(eps) + (" (no DP)" if no_dp else "")]
            for silo, eps in privacy["epsilon_spent"].items()
        ],
        empty="No silo.",
    )

    fairness = report["fairness"]
    doc.heading("Fairness", 2)
    warning = fairness.get("final_warning")
    if warning:
        doc.paragraph(f"WARNING, fairness limit exceeded: the run ended, but {warning['message']}.")
    info = fairness.get("final_info")
    if info:  # the raw model over a limit, its deployed thresholds within: information
        doc.paragraph(f"Within the fairness limits after thresholds: {info['message']}.")
    doc.paragraph(f"Fairness report: {fairness['status']}.")
    mitigation = fairness.get("mitigation")
    if mitigation:
        parameters = ", ".join(f"{k} = {v}" for k, v in mitigation["parameters"].items())
        doc.paragraph(
            f"Bias mitigation: {mitigation['kind']}"
            + (f" ({parameters})" if parameters else "")
            + f": {mitigation['note']}."
        )
    summary = fairness.get("report")
    if summary:
        if summary.get("error"):
            doc.paragraph(f"No metrics for {summary['attribute']}: {summary['error']}.")
        else:
            doc.paragraph(
                f"Model v{summary['model_version']} on {summary['records']} held-out records of "
                f"{len(summary['silos'])} silos, {summary['groups']} groups of "
                f"'{summary['attribute']}'."
            )
            _limits_table(doc, summary["metrics"])
        doc.paragraph(
            f"Threshold flags over the run: {summary.get('flags_in_run', 0)} in "
            f"{summary.get('rounds_reported', 0)} reported rounds."
        )
    thresholded = fairness.get("thresholded")
    if thresholded:  # a postprocess run's deployed decisions
        doc.paragraph(
            f"Model v{thresholded['model_version']}'s thresholded decisions (postprocess group "
            f"thresholds, deployed with it) on {thresholded['n']} pooled held-out records: "
            f"{thresholded['note']}."
        )
        _limits_table(doc, thresholded["disparities"])
    if fairness.get("settings"):
        doc.paragraph("The plan declares: " + json.dumps(fairness["settings"], sort_keys=True))

    doc.heading("Audit trail", 2)
    verification = report["audit_verification"]
    if verification.get("ok"):
        doc.paragraph(
            f"The audit chain verifies ({verification.get('checked')} events recomputed)."
        )
    else:
        doc.paragraph(
            f"The audit chain is broken at event #{verification.get('broken_index')}: "
            f"{verification.get('problem')}"
        )
    head = report["audit_head"] or {}
    doc.facts([("Chain head", f"#{head.get('index')}"), ("Head hash", str(head.get("hash")))])
    doc.table(
        [
            Column("#", 0.5),
            Column("When", 1.4),
            Column("Actor", 1.1),
            Column("Action", 1.4),
            Column("Data", 3.2, MONO),
            Column("Hash", 1.4, MONO),
        ],
        [
            [
                str(e["index"]),
                _when(e["at"]),
                e["actor"],
                e["action"],
                json.dumps(e["data"], sort_keys=True),
                e["hash"],
            ]
            for e in report["audit_events"]
        ],
        size=7.5,
        empty="No event recorded for this run.",
    )
    return doc.to_bytes()
