"""The run monitor's Plotly figures, built in Python, and the tables that stand in for them.

Each chart comes with the same numbers as a table (``ChartTable``): the page shows it in a
``<details>`` element, for screen readers and for anyone who wants the exact values.

Metrics come as rows of ``selectors.run_metric_rows``: a silo name (None for the round's summary,
an example-weighted mean over the silos that reported) and a scope: "global" is the incoming
global model evaluated on the silo's held-out split at the start of the round, "local" the silo's
locally trained model on the same split, "train" the training loss.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import plotly.graph_objects as go

from fedcore.analytics.tables import analysis_table
from federation.reports import FAIRNESS_METRICS

# Colour-blind-safe (Okabe-Ito): the summary lines keep their colour on every chart; each silo
# gets one of the others, the same on every chart (assigned by name).
SUMMARY_COLOURS = {"global": "#0072B2", "local": "#D55E00", "train": "#009E73"}
SILO_COLOURS = ["#CC79A7", "#E69F00", "#56B4E9", "#000000", "#882255", "#999933", "#44AA99"]
METRICS = (("loss", "Loss"), ("accuracy", "Accuracy"), ("auc", "AUC"))
# The per-round metric charts of each prediction task (docs/tasks.md): a multi-class or
# regression round's "global" figures are pooled exactly from the silos' parts.
TASK_METRICS: dict[str, tuple[tuple[str, str], ...]] = {
    "binary": METRICS,
    "multiclass": (
        ("loss", "Loss"),
        ("accuracy", "Accuracy"),
        ("macro_f1", "Macro F1"),
        ("auc_ovr", "AUC (one-vs-rest)"),
    ),
    "regression": (("loss", "Loss (MSE)"), ("rmse", "RMSE"), ("r2", "R²")),
}


@dataclass
class ChartTable:
    """A chart's data as a table: column headings and rows of already formatted cells."""

    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)


@dataclass
class Chart:
    """One figure of the monitor, its accessible description and its table alternative."""

    key: str
    title: str
    description: str
    figure: dict[str, Any]
    table: ChartTable
    points: int


def _fmt(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _layout(title: str, y_title: str, *, x_title: str = "Round", **extra: Any) -> go.Layout:
    return go.Layout(
        title={"text": title, "x": 0, "xanchor": "left", "font": {"size": 15}},
        template="plotly_white",
        colorway=[*SUMMARY_COLOURS.values(), *SILO_COLOURS],
        margin={"l": 56, "r": 16, "t": 44, "b": 8},
        height=380,
        hovermode="x unified",
        legend={"orientation": "h", "yanchor": "top", "y": -0.18, "x": 0, "traceorder": "normal"},
        xaxis={"title": {"text": x_title, "standoff": 4}, "dtick": 1},
        yaxis={"title": {"text": y_title}},
        font={"family": "system-ui, -apple-system, Segoe UI, Roboto, sans-serif", "size": 12},
        **extra,
    )


def _as_dict(fig: go.Figure) -> dict[str, Any]:
    # fig.to_json() is Plotly's own encoder (dates, numpy, NaN -> null); parse it back so the
    # page and the live endpoint can embed it in a larger JSON document.
    return json.loads(fig.to_json())


def _latest_attempts(metric_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep, per round number, the metrics of its latest attempt (a retried round replaces the
    failed one)."""
    latest: dict[int, int] = {}
    for row in metric_rows:
        n = row["round_number"]
        latest[n] = max(latest.get(n, 0), row["attempt"])
    return [r for r in metric_rows if r["attempt"] == latest[r["round_number"]]]


def metric_chart(metric: str, label: str, metric_rows: list[dict[str, Any]]) -> Chart:
    """One metric per round: the global model over all silos, the local models' mean, and the
    global model at each silo."""
    rows = _latest_attempts(metric_rows)
    series: dict[str, dict[int, float]] = {}
    colours: dict[str, str] = {}
    summaries = {
        "global": "Global model (all silos)",
        "local": "Local models (mean)",
        "train": "Training loss (mean)",
    }
    silo_names = sorted({r["silo_name"] for r in metric_rows if r["silo_name"] is not None})
    for row in rows:
        scope, name, silo = row["metric_scope"], row["metric_name"], row["silo_name"]
        if silo is None and scope in ("global", "local") and name == metric:
            key, colour = summaries[scope], SUMMARY_COLOURS[scope]
        elif silo is None and metric == "loss" and scope == "train" and name == "train_loss":
            key, colour = summaries["train"], SUMMARY_COLOURS["train"]
        elif silo is not None and scope == "global" and name == metric:
            key = f"Global model at {silo}"
            colour = SILO_COLOURS[silo_names.index(silo) % len(SILO_COLOURS)]
        else:
            continue
        series.setdefault(key, {})[row["round_number"]] = row["metric_value"]
        colours[key] = colour

    order = list(summaries.values())
    names = [n for n in order if n in series] + sorted(n for n in series if n not in order)
    fig = go.Figure(layout=_layout(f"{label} per round", label))
    for name in names:
        points = sorted(series[name].items())
        summary = name in order
        fig.add_trace(
            go.Scatter(
                x=[p[0] for p in points],
                y=[p[1] for p in points],
                name=name,
                mode="lines+markers",
                line={
                    "width": 3 if summary else 1.5,
                    "dash": "solid" if summary else "dot",
                    "color": colours[name],
                },
                hovertemplate="%{y:.4f}",
            )
        )
    rounds = sorted({n for s in series.values() for n in s})
    table = ChartTable(columns=["Round", *names])
    for n in rounds:
        table.rows.append([str(n), *(_fmt(series[name].get(n)) for name in names)])
    return Chart(
        key=metric,
        title=f"{label} per round",
        description=(
            f"{label} per round of the global model over all silos (example-weighted mean), of "
            "the silos' local models, and of the global model at each silo."
        ),
        figure=_as_dict(fig),
        table=table,
        points=sum(len(s) for s in series.values()),
    )


def _round_label(round_: Any) -> str:
    return str(round_.number) if round_.attempt == 1 else f"{round_.number} (try {round_.attempt})"


def participation_chart(rounds: list[Any]) -> Chart:
    """Per round attempt: silos that sent an update, and selected silos that dropped out."""
    labels = [_round_label(r) for r in rounds]
    answered = [r.updates_count for r in rounds]
    dropped = [max(0, r.selected_count - r.updates_count) for r in rounds]
    fig = go.Figure(layout=_layout("Participation per round", "Silos", barmode="stack"))
    fig.update_xaxes(type="category", dtick=None)
    top = max((r.selected_count for r in rounds), default=0)
    fig.update_yaxes(tickformat="d", rangemode="tozero", dtick=1 if top <= 10 else None)
    fig.add_trace(
        go.Bar(x=labels, y=answered, name="Sent an update", marker_color=SUMMARY_COLOURS["train"])
    )
    fig.add_trace(
        go.Bar(x=labels, y=dropped, name="Dropped out", marker_color=SUMMARY_COLOURS["local"])
    )
    table = ChartTable(columns=["Round", "Status", "Selected", "Sent an update", "Dropped out"])
    for r, label, a, d in zip(rounds, labels, answered, dropped, strict=True):
        table.rows.append([label, r.get_status_display(), str(r.selected_count), str(a), str(d)])
    return Chart(
        key="participation",
        title="Participation per round",
        description="Selected silos per round: those that sent an update and those that dropped "
        "out before the deadline.",
        figure=_as_dict(fig),
        table=table,
        points=len(rounds),
    )


def duration_chart(rounds: list[Any]) -> Chart:
    """Wall time of every finished round attempt, from opening to aggregation."""
    finished = [r for r in rounds if r.duration_seconds is not None]
    labels = [_round_label(r) for r in finished]
    seconds = [round(r.duration_seconds, 3) for r in finished]
    fig = go.Figure(layout=_layout("Round duration", "Seconds", showlegend=False))
    fig.update_xaxes(type="category", dtick=None)
    fig.add_trace(
        go.Bar(
            x=labels,
            y=seconds,
            name="Duration",
            marker_color=SUMMARY_COLOURS["global"],
            hovertemplate="%{y:.2f} s<extra></extra>",
        )
    )
    table = ChartTable(columns=["Round", "Status", "Duration (s)"])
    for r, label, s in zip(finished, labels, seconds, strict=True):
        table.rows.append([label, r.get_status_display(), f"{s:.2f}"])
    return Chart(
        key="duration",
        title="Round duration",
        description="Wall time of each round, from opening it to aggregating its updates.",
        figure=_as_dict(fig),
        table=table,
        points=len(finished),
    )


def _bytes(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def traffic_chart(rounds: list[Any]) -> Chart:
    """Per round attempt: the KiB the accepted updates took on the wire (compressed, as the
    sites sent them) next to the dense models stored from them."""
    with_updates = [r for r in rounds if r.updates_count]
    labels = [_round_label(r) for r in with_updates]
    received = [round((r.received_bytes or 0) / 1024, 1) for r in with_updates]
    stored = [round((r.stored_bytes or 0) / 1024, 1) for r in with_updates]
    fig = go.Figure(layout=_layout("Update traffic per round", "KiB", barmode="group"))
    fig.update_xaxes(type="category", dtick=None)
    for name, values, colour in (
        ("Received (wire)", received, SUMMARY_COLOURS["global"]),
        ("Stored (dense)", stored, SUMMARY_COLOURS["train"]),
    ):
        fig.add_trace(
            go.Bar(
                x=labels, y=values, name=name, marker_color=colour, hovertemplate="%{y:,.1f} KiB"
            )
        )
    table = ChartTable(
        columns=["Round", "Updates", "Received (bytes)", "Stored (bytes)", "Received / stored"]
    )
    for r, label in zip(with_updates, labels, strict=True):
        ratio = (
            f"{r.received_bytes / r.stored_bytes:.3f}"
            if r.received_bytes is not None and r.stored_bytes
            else "-"
        )
        table.rows.append(
            [label, str(r.updates_count), _bytes(r.received_bytes), _bytes(r.stored_bytes), ratio]
        )
    return Chart(
        key="traffic",
        title="Update traffic per round",
        description="Bytes of the accepted updates per round as received over the wire (after the "
        "plan's compression) and as stored (dense models).",
        figure=_as_dict(fig),
        table=table,
        points=2 * len(with_updates),
    )


EMPTY_NOTE = "No round has reported yet: points appear here as rounds complete."


def _without_data(chart: Chart) -> Chart:
    """A chart with no point yet: fixed axes (0 to 1, rounds 1 to 5) instead of Plotly's guess
    for empty data (-1 to 4, or a 0-4 accuracy axis), and a note in the plot area saying why it
    is empty. The live endpoint redraws it with data as soon as a round reports."""
    layout = chart.figure.setdefault("layout", {})
    layout.setdefault("yaxis", {}).update({"range": [0, 1], "autorange": False})
    layout.setdefault("xaxis", {}).update(
        {"range": [0.5, 5.5], "autorange": False, "type": "linear", "dtick": 1}
    )
    layout["annotations"] = [
        {
            "text": EMPTY_NOTE,
            "xref": "paper",
            "yref": "paper",
            "x": 0.5,
            "y": 0.5,
            "showarrow": False,
            "font": {"size": 13, "color": "#4a5263"},
        }
    ]
    return chart


def run_charts(
    rounds: list[Any],
    metric_rows: list[dict[str, Any]],
    task: str = "binary",
    evaluation: dict[str, Any] | None = None,
    *,
    trains: bool = True,
) -> list[Chart]:
    """Every chart of the run monitor, in page order (the metric charts of the plan's task);
    the final model's (or an evaluation plan's) calibration curve first when the run has one.
    A run that does not train (an evaluation plan's) has no rounds: only its calibration
    curve."""
    curve = (evaluation or {}).get("calibration")
    first = [calibration_chart(curve)] if curve else []
    if not trains:
        return first
    charts = [metric_chart(metric, label, metric_rows) for metric, label in TASK_METRICS[task]]
    charts += [participation_chart(rounds), duration_chart(rounds), traffic_chart(rounds)]
    return first + [c if c.points else _without_data(c) for c in charts]


def calibration_chart(curve: dict[str, Any]) -> Chart:
    """The pooled calibration curve (mean predicted probability against the observed rate of
    positives per bin, fedcore.calibration) with the diagonal of perfect calibration."""
    rows = [row for row in curve["rows"] if row["count"]]
    fig = go.Figure(
        layout=_layout(
            "Calibration", "Observed rate of positives", x_title="Mean predicted probability"
        )
    )
    fig.update_xaxes(dtick=None, range=[0, 1])
    fig.update_yaxes(range=[0, 1])
    fig.add_trace(
        go.Scatter(
            x=[0, 1],
            y=[0, 1],
            mode="lines",
            name="perfect calibration",
            line={"dash": "dot", "color": "#999999"},
            hoverinfo="skip",
        )
    )
    fig.add_trace(
        go.Scatter(
            x=[row["mean_predicted"] for row in rows],
            y=[row["observed_rate"] for row in rows],
            mode="lines+markers",
            name="pooled",
            line={"color": SUMMARY_COLOURS["global"]},
            customdata=[row["count"] for row in rows],
            hovertemplate="predicted %{x:.3f}, observed %{y:.3f} (%{customdata} rows)",
        )
    )
    table = ChartTable(
        columns=["Bin", "Rows", "Positives", "Mean predicted", "Observed rate"],
        rows=[
            [
                f"{row['lower']:g}–{row['upper']:g}",
                str(row["count"]),
                str(row["positives"]),
                _fmt(row["mean_predicted"]),
                _fmt(row["observed_rate"]),
            ]
            for row in curve["rows"]
        ],
    )
    ece = curve.get("expected_calibration_error")
    return Chart(
        key="calibration",
        title="Calibration of the evaluated model",
        description=(
            f"{curve['method']}; {curve['n']} rows; expected calibration error {_fmt(ece)}."
        ),
        figure=_as_dict(fig),
        table=table,
        points=len(rows),
    )


# --------------------------------------------------------------------------------------------
# The fairness report's trend and the privacy budget report's spend over time.


def fairness_trend_chart(reports: list[dict[str, Any]]) -> Chart:
    """Per round: each attribute's demographic parity and equalized odds differences, with the
    plan's limits as dashed lines. Round k's report is about model version k-1; the final
    evaluation's (``round`` None, about the last model v) is placed at v + 1, after the last
    round."""
    reports = [
        {**r, "round": r["model_version"] + 1} if r.get("round") is None else r for r in reports
    ]
    fig = go.Figure(layout=_layout("Fairness per round", "Difference between groups"))
    fig.update_yaxes(rangemode="tozero")
    attributes: list[str] = []
    for report in reports:
        for name in report["attributes"]:
            if name not in attributes:
                attributes.append(name)
    columns = ["Round", "Model version"]
    series: list[tuple[str, str, dict[int, float | None]]] = []
    for a_index, attribute in enumerate(attributes):
        for m_index, (key, label, _) in enumerate(FAIRNESS_METRICS):
            name = f"{label} ({attribute})"
            values: dict[int, float | None] = {}
            for report in reports:
                entry = report["attributes"].get(attribute) or {}
                values[report["round"]] = (entry.get("report") or {}).get(key)
            series.append((name, key, values))
            columns.append(name)
            colour = SILO_COLOURS[(2 * a_index + m_index) % len(SILO_COLOURS)]
            points = [(n, v) for n, v in sorted(values.items()) if v is not None]
            fig.add_trace(
                go.Scatter(
                    x=[p[0] for p in points],
                    y=[p[1] for p in points],
                    name=name,
                    mode="lines+markers",
                    line={"width": 3 if a_index == 0 else 1.5, "color": colour},
                    hovertemplate="%{y:.4f}",
                )
            )
    thresholds = reports[-1]["thresholds"] if reports else {}
    rounds = [report["round"] for report in reports]
    for m_index, (_, label, limit_key) in enumerate(FAIRNESS_METRICS):
        limit = thresholds.get(limit_key)
        if limit is None or not rounds:
            continue
        fig.add_trace(
            go.Scatter(
                x=[min(rounds), max(rounds)],
                y=[limit, limit],
                name=f"Limit: {label.lower()}",
                mode="lines",
                line={"width": 1.5, "dash": "dash", "color": SILO_COLOURS[m_index]},
                hovertemplate="%{y:.4f}",
            )
        )
    columns.append("Flags")
    table = ChartTable(columns=columns)
    for report in reports:
        row = [
            "final" if report.get("final") else str(report["round"]),
            f"v{report['model_version']}",
        ]
        row += [_fmt(values.get(report["round"])) for _, _, values in series]
        row.append(str(len(report.get("flags") or [])))
        table.rows.append(row)
    return Chart(
        key="fairness",
        title="Fairness per round",
        description=(
            "Demographic parity and equalized odds differences between the groups of each "
            "sensitive attribute, per round, with the plan's limits as dashed lines; round k "
            "evaluates model version k-1."
        ),
        figure=_as_dict(fig),
        table=table,
        points=sum(1 for _, _, values in series for v in values.values() if v is not None),
    )


def privacy_spend_chart(silos: list[dict[str, Any]]) -> Chart:
    """Each silo's epsilon spent after every ledger entry over time, with its budget (dashed).

    ``silos``: rows of ``selectors.consortium_privacy`` (``silo``, ``budget``, ``entries``).
    """
    fig = go.Figure(layout=_layout("Privacy budget spent over time", "ε spent", x_title="Time"))
    fig.update_layout(hovermode="closest")
    fig.update_xaxes(dtick=None, type="date")
    fig.update_yaxes(rangemode="tozero")
    names = sorted(row["silo"].name for row in silos)
    table = ChartTable(
        columns=["When", "Silo", "Run", "Round", "Mechanism", "ε after this entry", "Budget"]
    )
    points = 0
    for row in sorted(silos, key=lambda r: r["silo"].name):
        name = row["silo"].name
        colour = SILO_COLOURS[names.index(name) % len(SILO_COLOURS)]
        entries = row["entries"]
        if entries:
            fig.add_trace(
                go.Scatter(
                    x=[e.created_at.isoformat() for e in entries],
                    y=[e.epsilon_total for e in entries],
                    name=name,
                    mode="lines+markers",
                    line={"shape": "hv", "width": 2, "color": colour},
                    hovertemplate="%{y:.4f}",
                )
            )
            points += len(entries)
            if row["budget"] is not None:
                fig.add_trace(
                    go.Scatter(
                        x=[entries[0].created_at.isoformat(), entries[-1].created_at.isoformat()],
                        y=[row["budget"], row["budget"]],
                        name=f"Budget of {name}",
                        mode="lines",
                        line={"width": 1.5, "dash": "dash", "color": colour},
                        hovertemplate="%{y:.4f}",
                    )
                )
        for e in entries:
            table.rows.append(
                [
                    e.created_at.strftime("%Y-%m-%d %H:%M:%S"),
                    name,
                    "—" if e.run_id is None else str(e.run_id),
                    "—" if e.round_number is None else str(e.round_number),
                    e.mechanism,
                    _fmt(e.epsilon_total),
                    _fmt(row["budget"]) if row["budget"] is not None else "none",
                ]
            )
    return Chart(
        key="privacy",
        title="Privacy budget spent over time",
        description=(
            "Each silo's epsilon spent, composed over its whole ledger, after every ledger entry, "
            "with its budget as a dashed line."
        ),
        figure=_as_dict(fig),
        table=table,
        points=points,
    )


def _forest_plot(result: dict[str, Any]) -> tuple[go.Figure, int, str]:
    """Coefficients with their confidence intervals, one row per term (a forest plot), on the
    scale of the linear predictor: a hazard or odds ratio is exp() of it (the table has both)."""
    kind = result["kind"]
    names = list(result["coef"])
    level = f"{100 * (1 - result['alpha']):g}%"
    axis = {"cox": "log hazard ratio", "logistic_regression": "log odds ratio"}.get(
        kind, "coefficient"
    )
    fig = go.Figure(layout=_layout("Coefficients", "", x_title=f"{axis} ({level} CI)"))
    fig.update_layout(hovermode="closest")
    fig.update_xaxes(dtick=None, zeroline=True)
    fig.update_yaxes(dtick=None, type="category", autorange="reversed")
    coef = [result["coef"][n] for n in names]
    fig.add_trace(
        go.Scatter(
            x=coef,
            y=names,
            mode="markers",
            name="coef",
            error_x={
                "type": "data",
                "symmetric": False,
                "array": [result["ci_upper"][n] - c for n, c in zip(names, coef, strict=True)],
                "arrayminus": [c - result["ci_lower"][n] for n, c in zip(names, coef, strict=True)],
            },
            hovertemplate="%{y}: %{x:.4f}",
        )
    )
    fig.add_vline(x=0, line={"width": 1, "dash": "dot"})
    if kind == "cox":
        model = (
            "Cox model stratified by site (a baseline hazard per site)"
            if result["stratified_by_site"]
            else f"Cox model, one baseline hazard, {result['ties']} ties; {result['coarsening']}"
        )
        what = f"{model}: {result['rows']} rows, {result['events']} events"
    elif kind == "logistic_regression":
        what = (
            f"Logistic regression of {result['outcome']} by federated IRLS: {result['rows']} rows"
        )
    else:
        what = (
            f"Linear regression of {result['outcome']} from the sites' X'X and X'y: "
            f"{result['rows']} rows, R² {result.get('r_squared', float('nan')):.4f}"
        )
    steps = result.get("newton_steps")
    description = (
        f"{what}, {result['sites']} sites"
        + (f", {steps} Newton steps" if steps else "")
        + f". Points are coefficients, bars their {level} confidence intervals "
        f"({'t' if result['distribution'] == 't' else 'Wald z'})."
    )
    return fig, len(names), description


def analysis_chart(result: dict[str, Any]) -> Chart:
    """The chart of a released analysis result, with the result's table under it: survival
    curves with their confidence bands, a histogram, or bars of counts or means."""
    kind = result["kind"]
    header, rows = analysis_table(result)
    table = ChartTable(
        columns=[str(c) for c in header],
        rows=[
            [
                "suppressed" if v is None else (_fmt(v, 6) if isinstance(v, float) else str(v))
                for v in row
            ]
            for row in rows
        ],
    )
    if kind == "kaplan_meier":
        fig = go.Figure(layout=_layout("Kaplan-Meier survival", "Survival", x_title="Time"))
        fig.update_xaxes(dtick=None)
        for index, (group, curve) in enumerate(result["curves"].items()):
            colour = SILO_COLOURS[index % len(SILO_COLOURS)]
            for key, name in (("ci_upper", None), ("ci_lower", "band")):
                fig.add_trace(
                    go.Scatter(
                        x=curve["time"],
                        y=curve[key],
                        line={"shape": "hv", "width": 0, "color": colour},
                        fill="tonexty" if key == "ci_lower" else None,
                        opacity=0.2,
                        showlegend=False,
                        hoverinfo="skip",
                        name=name or key,
                    )
                )
            fig.add_trace(
                go.Scatter(
                    x=curve["time"],
                    y=curve["survival"],
                    name=f"{group}",
                    mode="lines",
                    line={"shape": "hv", "width": 2.5, "color": colour},
                    hovertemplate="%{y:.4f}",
                )
            )
        points = sum(len(c["time"]) for c in result["curves"].values())
        description = (
            f"Survival by group with {100 * (1 - result['alpha']):g}% "
            f"{result['interval']} intervals as bands; {result['coarsening']}."
        )
        if "logrank" in result:
            description += (
                f" Log-rank test: chi-square {result['logrank']['statistic']:.4f}, "
                f"p = {result['logrank']['p_value']:.4g}."
            )
    elif kind in ("cox", "linear_regression", "logistic_regression"):
        fig, points, description = _forest_plot(result)
    elif kind == "quantile":
        fig = go.Figure(layout=_layout("Quantiles", result["column"], x_title="Level"))
        fig.update_xaxes(dtick=None, type="category")
        fig.add_trace(
            go.Scatter(
                x=[f"{p:g}" for p in result["probs"]],
                y=result["values"],
                mode="markers+lines",
                name="quantile",
            )
        )
        points = len(result["probs"])
        description = (
            f"Exact quantiles ({result['method']}) of {result['n']} rows, found by federated "
            f"bisection in {result['rounds']} steps."
        )
    elif kind == "moments":
        fig = go.Figure(layout=_layout("Means", "Mean (± sd)", x_title="Column"))
        fig.update_xaxes(dtick=None)
        fig.add_trace(
            go.Bar(
                x=result["columns"],
                y=result["mean"],
                error_y={"type": "data", "array": result["sd"]},
                name="mean",
            )
        )
        points = len(result["columns"])
        description = f"Mean and standard deviation of {result['n']} complete rows."
    else:
        labels = [
            f"{'−∞' if row[0] is None else row[0]}–{'∞' if row[1] is None else row[1]}"
            if kind == "histogram"
            else str(row[0])
            for row in rows
        ]
        values = [row[-1] for row in rows]
        if "col_levels" in result:  # a cross-table: its row totals
            labels, values = [str(row[0]) for row in rows], [row[-1] for row in rows]
        shown = [(x, y) for x, y in zip(labels[:-1], values[:-1], strict=True) if y is not None]
        fig = go.Figure(layout=_layout("Counts", "Rows", x_title=""))
        fig.update_xaxes(dtick=None, type="category")
        fig.add_trace(go.Bar(x=[s[0] for s in shown], y=[s[1] for s in shown], name="count"))
        points = len(shown)
        description = (
            f"Counts; cells below {result.get('min_cell_count')} are suppressed, with "
            "complementary cells so that no total reveals them."
        )
    if result.get("noise"):
        description += f" Noised: {result['noise']['note']}."
    if result.get("secure_aggregation"):
        description += f" Secure aggregation: {result['secure_aggregation']['note']}."
    return Chart(
        key="analysis",
        title=f"Result: {kind.replace('_', ' ')}",
        description=description,
        figure=_as_dict(fig),
        table=table,
        points=points,
    )
