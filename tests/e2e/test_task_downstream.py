"""End to end: multi-class and regression plans through what follows the task downstream, with
real agents over a real websocket: DP-SGD (Opacus) with a robust strategy and top-k compression,
client-level DP with secure aggregation. After each run the final figures are those of the union
of the sites' held-out rows, the registry's ONNX export gives the model's own outputs under
onnxruntime, and the compliance report shows the task's pooled figures (docs/tasks.md)."""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from django.test import override_settings
from sklearn import metrics as skm

from clientagent.data import LocalData
from fedcore import onnx_export, tabular, tensors, training
from fedcore.models import build_model
from federation import reports, selectors
from federation.compliance_pdf import compliance_report_pdf
from federation.models import Consortium, ModelVersion, RoundMetric, Run, Silo, Update
from federation.server import free_port
from federation.services.silos import silo_issue_token
from federation.storage import blob_store
from tests.e2e import harness
from tests.e2e.test_federation import online_count, run_plan
from tests.e2e.test_tasks import CLASSES, FAIRNESS, pooled_rows, write_site
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
# federation (below), flushed after its last variant: this module's _django_db_helper replaces
# pytest-django's, which flushes the database after each transactional test.
pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

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
    """The server and three real agents, started once per task: each variant's plan runs on them
    in turn (starting the four processes took most of a variant's time)."""
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
            for proc in procs:
                proc.stop()
        for proc in procs[1:]:  # what a variant's own check could not see: the end of each log
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
    # each agent's log from here on is this variant's
    starts = [proc.log.stat().st_size if proc.log.exists() else 0 for proc in federation.agents]
    harness.wait_until(
        lambda: online_count(federation.silos) == SITES,
        timeout=60,
        what=f"{SITES} agents online",
        procs=federation.procs,
    )
    run = run_plan(plan, federation.procs)
    for proc, start in zip(federation.agents, starts, strict=True):

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
        if secure:
            assert "sent the masked update" in log() and "sent update" not in log()
    updates = Update.objects.filter(round__run=run)
    assert updates.count() == 2 * SITES
    if compression:
        assert {u.compression for u in updates} == {compression}
    if secure:
        # no weights and no task part in clear: the round's figures come from the masked sum
        assert all(u.blob_key == "" and u.task_part is None for u in updates)
    return run


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
