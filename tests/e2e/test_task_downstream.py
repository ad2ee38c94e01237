"""End to end: multi-class and regression plans with real agents over a real websocket, and
what follows the task downstream: DP-SGD (Opacus) with a robust strategy and top-k compression,
client-level DP with secure aggregation. After each run the final figures are those of the union
of the sites' held-out rows, the registry's ONNX export gives the model's own outputs under
onnxruntime, and the compliance report shows the task's pooled figures (docs/tasks.md).

One server and three agents per task (the ``federation`` fixture) run every plan of the task in
turn: starting the four processes cost more than most runs."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from django.test import override_settings
from fairlearn.metrics import MetricFrame, mean_prediction
from sklearn import metrics as skm

from clientagent.data import LocalData
from fedcore import onnx_export, tabular, tensors, training
from fedcore.models import build_model
from federation import reports, selectors
from federation.compliance_pdf import compliance_report_pdf
from federation.models import (
    Consortium,
    ModelVersion,
    RoundMetric,
    Run,
    Silo,
    TrainingPlan,
    Update,
)
from federation.server import free_port
from federation.services.silos import silo_issue_token
from federation.storage import blob_store
from tests.e2e import harness
from tests.e2e.test_federation import online_count, run_plan
from tests.factories import (
    SCHEMA,
    ConsortiumFactory,
    PlanFactory,
    SiloFactory,
    approve_by_stewards,
    plan_spec,
)
from tests.pdf_reading import page_text, read_pdf

# The mark has pytest-django create the test database; the rows live as long as the task's
# federation (below), flushed after its last test: this module's _django_db_helper replaces
# pytest-django's, which flushes the database after each transactional test.
pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

CLASSES = ["low", "mid", "high"]
FAIRNESS = {"sensitive_attribute": "sex", "groups": {"sex": ["F", "M"]}}


def write_site(path: Path, seed: int, task: str, n: int = 160) -> Path:
    """A site's rows: three features, a sex column and a target of the task (non-IID shift)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(loc=0.4 * seed, size=(n, 3))
    score = x[:, 0] - 0.6 * x[:, 1] + 0.3 * rng.normal(size=n)
    if task == "multiclass":
        y: object = np.array(CLASSES)[np.digitize(score, [-0.5, 0.7])]
    else:
        y = 50.0 + 12.0 * score
    frame = pd.DataFrame({"x1": x[:, 0], "x2": x[:, 1], "x3": x[:, 2], "y": y})
    frame["sex"] = rng.choice(["F", "M"], size=n)
    frame.to_csv(path, index=False)
    return path


TARGETS = {
    "multiclass": {"column": "y", "task": "multiclass", "classes": CLASSES},
    "regression": {"column": "y", "task": "regression", "standardize": True},
}
SAMPLE_DP = {"mode": "sample", "noise_multiplier": 0.8, "clip": 1.0, "delta": 1e-5}
CLIENT_DP = {"mode": "client", "noise_multiplier": 0.3, "clip": 1.0, "delta": 1e-5}
SITES = 3
# (privacy, strategy, compression, secure aggregation)
VARIANTS = {
    "dp_sgd_median_topk": (SAMPLE_DP, {"strategy": "median"}, "topk", False),
    "dp_sgd_trimmed_mean": (SAMPLE_DP, {"strategy": "trimmed_mean", "beta": 0.2}, None, False),
    "krum": (None, {"strategy": "krum", "f": 0}, None, False),
    "client_dp_secagg": (CLIENT_DP, {"strategy": "fedavg"}, None, True),
}


@dataclass
class Federation:
    """A task's consortium: its sites' silos and files, the server and one agent per site."""

    tmp: Path
    schema: dict
    consortium: Consortium
    silos: list[Silo]
    csvs: list[Path]
    procs: list[harness.Proc]

    @property
    def agents(self) -> list[harness.Proc]:
        return self.procs[1:]


def signing_key(tmp: Path) -> Path:
    return tmp / "keys" / "server-ed25519.pem"


@pytest.fixture(scope="module")
def federation(
    task: str,
    tmp_path_factory: pytest.TempPathFactory,
    django_db_setup: Any,
    django_db_blocker: Any,
) -> Iterator[Federation]:
    """The server and three real agents, started once per task: every plan of the task's tests
    runs on them in turn (starting the four processes took most of a run's time)."""
    tmp = tmp_path_factory.mktemp(f"downstream-{task}")
    with (
        harness.shared_database(django_db_blocker),
        override_settings(QUORUM_BLOB_DIR=tmp / "blobs", QUORUM_SIGNING_KEY_FILE=signing_key(tmp)),
    ):
        schema = {**SCHEMA, "target": TARGETS[task], "sensitive": ["sex"]}
        consortium = ConsortiumFactory()
        silos = SiloFactory.create_batch(SITES, organization__consortium=consortium, schema=schema)
        port = free_port()
        url = f"ws://127.0.0.1:{port}/ws/agent/"
        csvs = [write_site(tmp / f"{s.name}.csv", i, task) for i, s in enumerate(silos)]
        procs = [harness.server(tmp, port)] + [
            harness.agent(tmp, s.name, url=url, token=silo_issue_token(silo=s), data_csv=csv)
            for s, csv in zip(silos, csvs, strict=True)
        ]
        try:
            for proc in procs:
                proc.start()
            yield Federation(tmp, schema, consortium, silos, csvs, procs)
        finally:
            harness.stop_all(procs)
        for proc in procs[1:]:  # what a test's own check could not see: the end of each log
            assert "Traceback" not in proc.log.read_text(), proc.tail(60)


@pytest.fixture
def _django_db_helper(federation: Federation) -> None:
    """Overrides pytest-django's (run for the django_db mark): the database stays open with the
    task's federation and its rows (harness.shared_database), not flushed after each test."""


@pytest.fixture(autouse=True)
def _blob_dir(settings: Any, federation: Federation) -> None:
    """Overrides tests/conftest.py: the blobs and signing key of the task's federation."""
    settings.QUORUM_BLOB_DIR = federation.tmp / "blobs"
    settings.QUORUM_SIGNING_KEY_FILE = signing_key(federation.tmp)


def run_on(federation: Federation, plan: TrainingPlan) -> tuple[Run, list[str]]:
    """Run the plan on the federation's agents (online already); returns the run, completed,
    and the log since its start of each of the plan's sites' agents, which evaluated the final
    model and logged no traceback."""
    silos = list(plan.current_version.silos.order_by("pk"))
    agents = [federation.agents[federation.silos.index(silo)] for silo in silos]
    starts = [proc.log.stat().st_size if proc.log.exists() else 0 for proc in agents]
    harness.wait_until(
        lambda: online_count(federation.silos) == SITES,
        timeout=60,
        what=f"{SITES} agents online",
        procs=federation.procs,
    )
    run = run_plan(plan, federation.procs)
    logs = []
    for proc, start in zip(agents, starts, strict=True):

        def log(proc: harness.Proc = proc, start: int = start) -> str:
            return proc.log.read_bytes()[start:].decode(errors="replace")

        # the agent logs its evaluation once sent: the run may have ended a moment before
        harness.wait_until(
            lambda log=log: "sent its evaluation on" in log(),
            timeout=30,
            what=f"{proc.name} to log its evaluation",
            procs=federation.procs,
        )
        assert "Traceback" not in log(), log()[-3000:]
        logs.append(log())
    return run, logs


def run_task(federation: Federation) -> tuple[Run, list[Path]]:
    """The task's plan of three rounds (adam, a fairness section) on the first two sites."""
    spec = plan_spec(
        schema=federation.schema,
        model={"kind": "mlp", "hidden": [8]},
        training={
            "rounds": 3,
            "local_epochs": 2,
            "batch_size": 16,
            "optimizer": "adam",
            "lr": 0.05,
        },
        fairness=FAIRNESS,
        min_silos=2,
    )
    plan = PlanFactory(consortium=federation.consortium, spec=spec, silos=federation.silos[:2])
    approve_by_stewards(plan)
    run, _ = run_on(federation, plan)
    return run, federation.csvs[:2]


def run_variant(federation: Federation, variant: str) -> Run:
    privacy, aggregation, compression, secure = VARIANTS[variant]
    extra: dict = {}
    if privacy:
        extra["privacy"] = {**privacy, "target_epsilon": None}
    if compression:
        extra["compression"] = {"method": compression, "ratio": 0.5}
    if secure:
        extra["secure_aggregation"] = True
    else:  # a fairness section with secure aggregation is refused for these tasks (plan-spec)
        extra["fairness"] = FAIRNESS
    spec = plan_spec(
        schema=federation.schema,
        model={"kind": "mlp", "hidden": [8]},
        training={"rounds": 2, "local_epochs": 1, "batch_size": 16, "optimizer": "sgd", "lr": 0.1},
        aggregation=aggregation,
        min_silos=SITES,
        **extra,
    )
    plan = PlanFactory(consortium=federation.consortium, spec=spec, silos=federation.silos)
    approve_by_stewards(plan)
    run, logs = run_on(federation, plan)
    if secure:
        for log in logs:
            assert "sent the masked update" in log and "sent update" not in log
    updates = Update.objects.filter(round__run=run)
    assert updates.count() == 2 * SITES
    if compression:
        assert {u.compression for u in updates} == {compression}
    if secure:
        # no weights and no task part in clear: the round's figures come from the masked sum
        assert all(u.blob_key == "" and u.task_part is None for u in updates)
    return run


def pooled_rows(run: Run, csvs: list[Path]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The held-out targets, the final model's raw outputs and the sex column of every site."""
    final = ModelVersion.objects.filter(run=run).order_by("-number").first()
    state = tensors.decode_state_dict(blob_store().get(final.blob_key))
    target = tabular.DatasetSchema.from_dict(run.version.spec["schema"]).target
    plan = run.version.spec
    objective = training.Objective.for_task(target.task, n_outputs=target.n_outputs)
    ys, outs, sexes = [], [], []
    for csv in csvs:
        data = LocalData(csv)
        test = data.arrays(data.split(plan), run.preprocessing).test
        model = build_model(plan["model"], int(test.X.shape[1]), n_outputs=target.n_outputs)
        model.load_state_dict(state)
        ys.append(test.y)
        outs.append(training.predict(model, test.X, objective))
        sexes.append(np.asarray(test.groups["sex"], dtype=object))
    assert run.evaluation is not None and run.evaluation["model_version"] == final.number
    assert run.evaluation["missing"] == [] and run.evaluation["task"] == target.task
    return np.concatenate(ys), np.concatenate(outs), np.concatenate(sexes)


def check_final_figures(run: Run, csvs: list[Path], task: str) -> None:
    y, out, _ = pooled_rows(run, csvs)
    figures = run.evaluation["metrics"]
    assert figures["n"] == y.size
    if task == "multiclass":
        choice = np.argmax(out, axis=1)
        assert figures["accuracy"] == pytest.approx(skm.accuracy_score(y, choice), abs=1e-9)
        macro = skm.f1_score(y, choice, average="macro", labels=[0, 1, 2], zero_division=0)
        assert figures["macro_f1"] == pytest.approx(macro, abs=1e-9)
    else:
        schema = tabular.DatasetSchema.from_dict(run.version.spec["schema"])
        mean, std = tabular.target_scale(schema, run.preprocessing)
        truth, values = mean + std * y, mean + std * out
        assert figures["rmse"] == pytest.approx(
            np.sqrt(skm.mean_squared_error(truth, values)), abs=1e-9
        )
        assert figures["r2"] == pytest.approx(skm.r2_score(truth, values), abs=1e-9)


def check_round_figures(run: Run, csvs: list[Path], task: str) -> None:
    """Round k's global figures are model v(k-1)'s on the union of the held-out rows, pooled
    from the sites' parts: in clear, or summed under the masks in a secure round."""
    spec = run.version.spec
    schema = tabular.DatasetSchema.from_dict(spec["schema"])
    mean, std = tabular.target_scale(schema, run.preprocessing)
    for version in ModelVersion.objects.filter(run=run, number__lt=2):
        state = tensors.decode_state_dict(blob_store().get(version.blob_key))
        ys, outs = [], []
        for csv in csvs:
            data = LocalData(csv)
            test = data.arrays(data.split(spec), run.preprocessing).test
            model = build_model(
                spec["model"], int(test.X.shape[1]), n_outputs=schema.target.n_outputs
            )
            model.load_state_dict(state)
            objective = training.Objective.for_task(task, n_outputs=schema.target.n_outputs)
            ys.append(test.y)
            outs.append(training.predict(model, test.X, objective))
        y, out = np.concatenate(ys), np.concatenate(outs)
        figures = {
            m.name: m.value
            for m in RoundMetric.objects.filter(
                round__run=run, round__number=version.number + 1, silo__isnull=True, scope="global"
            )
        }
        assert figures["n"] == y.size
        if task == "multiclass":
            choice = np.argmax(out, axis=1)
            macro = skm.f1_score(y, choice, average="macro", labels=[0, 1, 2], zero_division=0)
            assert figures["macro_f1"] == pytest.approx(macro, abs=1e-9)
            assert figures["accuracy"] == pytest.approx(skm.accuracy_score(y, choice), abs=1e-9)
        else:
            truth, values = mean + std * y, mean + std * out
            assert figures["r2"] == pytest.approx(skm.r2_score(truth, values), abs=1e-9)
            assert figures["rmse"] == pytest.approx(
                np.sqrt(skm.mean_squared_error(truth, values)), abs=1e-9
            )


def check_onnx(run: Run, csvs: list[Path], task: str) -> None:
    """The registry's final version exported to ONNX gives the model's outputs (onnxruntime)."""
    final = ModelVersion.objects.filter(run=run).order_by("-number").first()
    assert final.checksum and reports.model_card(final)["model"]["final"] is True
    if not onnx_export.available() or importlib.util.find_spec("onnxruntime") is None:
        return
    import onnxruntime

    session = onnxruntime.InferenceSession(
        selectors.model_version_onnx(final), providers=["CPUExecutionProvider"]
    )
    (output,) = session.get_outputs()
    target = tabular.DatasetSchema.from_dict(run.version.spec["schema"]).target
    assert output.name == onnx_export.OUTPUT_NAMES[task]
    data = LocalData(csvs[0])
    test = data.arrays(data.split(run.version.spec), run.preprocessing).test
    model = build_model(run.version.spec["model"], int(test.X.shape[1]), n_outputs=target.n_outputs)
    model.load_state_dict(tensors.decode_state_dict(blob_store().get(final.blob_key)))
    model.eval()
    with torch.no_grad():
        expected = model(torch.as_tensor(test.X, dtype=torch.float32)).numpy()
    (got,) = session.run(None, {onnx_export.INPUT_NAME: test.X.astype(np.float32)})
    assert got.shape == (test.X.shape[0], target.n_outputs)
    np.testing.assert_allclose(got, expected.reshape(got.shape), rtol=1e-5, atol=1e-5)


def check_compliance(run: Run, task: str) -> None:
    """The compliance report's JSON, page and PDF carry the task's pooled figures."""
    report = reports.compliance_report_json(run)
    table = report["task_metrics"]
    assert table["task"] == task and table["rows"][-1]["pooled"] is True
    headline = "macro F1" if task == "multiclass" else "RMSE"
    key = "macro_f1" if task == "multiclass" else "rmse"
    column = table["columns"].index(headline)
    assert table["rows"][-1]["values"][column] == run.evaluation["metrics"][key]
    _, runs = read_pdf(compliance_report_pdf(run))
    text = page_text(runs)
    assert "Final evaluation" in text and headline in text


@pytest.mark.parametrize("task", ["multiclass", "regression"], scope="module")
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_a_task_runs_through_each_downstream_feature(
    federation: Federation, task: str, variant: str
) -> None:
    run = run_variant(federation, variant)
    csvs = federation.csvs
    assert run.evaluation["task"] == task and run.evaluation["missing"] == []
    check_final_figures(run, csvs, task)
    check_round_figures(run, csvs, task)
    check_onnx(run, csvs, task)
    check_compliance(run, task)


@pytest.mark.parametrize("task", ["multiclass"], scope="module")
def test_a_multiclass_plan_runs_and_its_final_figures_are_the_pooled_rows(
    federation: Federation, task: str
) -> None:
    run, csvs = run_task(federation)
    y, probs, sex = pooled_rows(run, csvs)
    choice = np.argmax(probs, axis=1)
    pooled = run.evaluation["metrics"]
    assert pooled["n"] == y.size and set(run.evaluation["by_silo"]) == {
        s for s in run.evaluation["asked"]
    }
    assert pooled["accuracy"] == pytest.approx(skm.accuracy_score(y, choice), abs=1e-9)
    assert pooled["macro_f1"] == pytest.approx(
        skm.f1_score(y, choice, average="macro", labels=[0, 1, 2], zero_division=0), abs=1e-9
    )
    assert pooled["accuracy"] > 0.6, "three rounds learnt nothing"
    by_group = run.evaluation["task_fairness"]["attributes"]["sex"]["by_group"]
    frame = MetricFrame(
        metrics=lambda t, p: float(np.mean(p == 2)), y_true=y, y_pred=choice, sensitive_features=sex
    )
    for group, rate in frame.by_group.items():
        assert by_group[group]["selection_rate"]["high"] == pytest.approx(rate, abs=1e-9)


@pytest.mark.parametrize("task", ["regression"], scope="module")
def test_a_regression_plan_runs_and_its_final_figures_are_the_pooled_rows(
    federation: Federation, task: str
) -> None:
    run, csvs = run_task(federation)
    y, predicted, sex = pooled_rows(run, csvs)
    mean, std = tabular.target_scale(
        tabular.DatasetSchema.from_dict(run.version.spec["schema"]), run.preprocessing
    )
    truth, values = mean + std * y, mean + std * predicted
    pooled = run.evaluation["metrics"]
    assert pooled["n"] == y.size
    assert pooled["rmse"] == pytest.approx(np.sqrt(skm.mean_squared_error(truth, values)), abs=1e-9)
    assert pooled["mae"] == pytest.approx(skm.mean_absolute_error(truth, values), abs=1e-9)
    assert pooled["r2"] == pytest.approx(skm.r2_score(truth, values), abs=1e-9)
    assert pooled["r2"] > 0.5, "three rounds learnt nothing"
    by_group = run.evaluation["task_fairness"]["attributes"]["sex"]["by_group"]
    frame = MetricFrame(
        metrics=mean_prediction, y_true=truth, y_pred=values, sensitive_features=sex
    )
    for group, value in frame.by_group.items():
        assert by_group[group]["mean_prediction"] == pytest.approx(value, abs=1e-9)
