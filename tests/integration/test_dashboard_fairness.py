"""Dashboard: a run's fairness report, the consortium's privacy budgets, ONNX export, and the
fairness sections of model cards and compliance reports."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from django.test import Client

from fedcore import onnx_export, tabular, tensors
from fedcore.models import build_model
from federation import ledger
from federation.models import FairnessReport, ModelVersion, Round, Run, Silo
from federation.services.fairness import build_report
from federation.storage import blob_store
from tests.dashboard_factories import World, build_world, finished_run
from tests.factories import SCHEMA

pytestmark = pytest.mark.django_db

ROLES = ["admin", "steward", "scientist", "auditor", "org_admin"]
SCHEMA_SEX = {**SCHEMA, "sensitive": ["sex"]}
FAIRNESS = {
    "sensitive_attribute": "sex",
    "groups": {"sex": ["F", "M"]},
    "max_demographic_parity_difference": 0.1,
    "max_equalized_odds_difference": 0.5,
}


def cells(tp: int, fp: int, tn: int, fn: int) -> dict[str, int]:
    return {"tp": tp, "fp": fp, "tn": tn, "fn": fn}


# Round 1: a disparity above the limit. Round 2: M has no positive label (TPR undefined).
COUNTS = {
    1: {
        "a": {"sex": {"F": cells(8, 2, 6, 4), "M": cells(2, 1, 12, 5)}},
        "b": {"sex": {"F": cells(5, 1, 3, 1), "M": cells(1, 0, 8, 2)}},
    },
    2: {
        "a": {"sex": {"F": cells(6, 3, 7, 4), "M": cells(0, 4, 16, 0)}},
        "b": {"sex": {"F": cells(4, 1, 4, 1), "M": cells(0, 1, 10, 0)}},
    },
}


def fitted_preprocessing() -> dict[str, Any]:
    schema = tabular.DatasetSchema.from_dict(SCHEMA_SEX)
    rng = np.random.default_rng(0)
    frame = pd.DataFrame(rng.normal(size=(20, 3)), columns=["x1", "x2", "x3"]).astype(str)
    frame["y"], frame["sex"] = "1", "F"
    return tabular.merge_statistics([tabular.local_statistics(frame, schema)], schema)


def fairness_run(world: World) -> Run:
    """A finished run of a plan with a fairness section, a report per round and a DP entry."""
    Silo.objects.filter(consortium=world.gov.consortium).update(schema=SCHEMA_SEX)
    run = finished_run(
        world.gov,
        name="Fair readmission",
        schema=SCHEMA_SEX,
        fairness={**FAIRNESS, "dp_epsilon": 1},
    )
    Run.objects.filter(pk=run.pk).update(preprocessing=fitted_preprocessing())
    run.refresh_from_db()
    for number, by_silo in COUNTS.items():
        round_ = Round.objects.get(run=run, number=number)
        report = build_report(
            run.version.spec,
            round_number=number,
            attempt=1,
            counts_by_silo=by_silo,
            metrics_by_silo={"a": {"accuracy": 0.61, "auc": 0.7}, "b": {"accuracy": 0.8}},
        )
        FairnessReport.objects.create(round=round_, report=report)
    silo = world.gov.silos[0]
    ledger.ledger_append(
        silo=silo,
        run=run,
        round_number=1,
        mechanism="fairness",
        noise_multiplier=1.0,
        sample_rate=1.0,
        steps=1,
        delta=1e-5,
        epsilon_pure=1.0,
    )
    Silo.objects.filter(pk=silo.pk).update(epsilon_budget=4.0)
    return run


@pytest.fixture
def world() -> World:
    return build_world()


def client_for(user: Any) -> Client:
    client = Client()
    client.force_login(user)
    return client


def test_every_member_reads_both_reports_and_outsiders_get_404(world: World) -> None:
    run = fairness_run(world)
    model = ModelVersion.objects.filter(run=run).last()
    pages = [
        f"/runs/{run.pk}/fairness/",
        f"/runs/{world.run.pk}/fairness/",
        f"/consortia/{world.gov.consortium.pk}/privacy/",
    ]
    for role in ROLES:
        client = client_for(world.user(role))
        assert [client.get(url).status_code for url in pages] == [200, 200, 200], role
    outsider = client_for(world.user("outsider"))
    for url in [*pages, f"/models/{model.pk}/model.onnx"]:
        response = outsider.get(url)
        assert response.status_code == 404, url
        assert world.gov.consortium.name not in response.content.decode()
    assert Client().get(pages[0])["Location"].startswith("/login/?next=")
    # Navigation: the privacy report for everyone, the fairness report from the run monitor.
    html = client_for(world.user("steward")).get(f"/runs/{run.pk}/").content.decode()
    assert f'href="/consortia/{world.gov.consortium.pk}/privacy/"' in html
    assert f'href="/runs/{run.pk}/fairness/"' in html


def test_fairness_page_shows_groups_disparities_limits_spread_representation_and_trend(
    world: World,
) -> None:
    run = fairness_run(world)
    html = client_for(world.user("scientist")).get(f"/runs/{run.pk}/fairness/").content.decode()
    latest = FairnessReport.objects.get(round__run=run, round__number=2).report
    metrics = latest["attributes"]["sex"]["report"]

    assert "Round 2: model v1" in html and "round k is about model version k−1" in html
    assert f"{metrics['demographic_parity_difference']:.4f}" in html
    assert f"{metrics['by_group']['F']['selection_rate']:.4f}" in html
    assert "exceeds the limit" in html  # the plan's limit 0.1 on demographic parity
    assert "(undefined)" in html and "<code>M</code> TPR (no positive labels)" in html
    assert "Representation" in html and "0.500" in html  # b: 10 F of 20 held-out records
    assert "Performance spread" in html and "0.6100" in html and "0.8000" in html
    assert "ε = 1 per attribute and round" in html
    figures = json.loads(html.split('id="page-figures" type="application/json">')[1].split("<")[0])
    traces = {trace["name"]: trace for trace in figures["fairness"]["data"]}
    assert traces["Demographic parity difference (sex)"]["x"] == [1, 2]
    assert traces["Limit: demographic parity difference"]["y"] == [0.1, 0.1]
    assert '<th scope="row">1</th><td class="num">v0</td>' in html  # the table alternative
    flagged = sum(
        len(FairnessReport.objects.get(round__run=run, round__number=n).report["flags"])
        for n in (1, 2)
    )
    assert html.count("<td>v0</td>") + html.count("<td>v1</td>") == flagged > 0


def test_a_run_without_a_fairness_section_says_so(world: World) -> None:
    html = client_for(world.user("auditor")).get(f"/runs/{world.run.pk}/fairness/").content.decode()
    assert "declares no fairness section" in html
    assert 'id="chart-fairness"' not in html


def test_model_cards_and_compliance_reports_show_the_real_fairness_summary(world: World) -> None:
    run = fairness_run(world)
    v1 = ModelVersion.objects.get(run=run, number=1)
    v2 = ModelVersion.objects.get(run=run, number=2)
    client = client_for(world.user("admin"))

    card = client.get(f"/models/{v1.pk}/card.json").json()
    summary = card["fairness"]["report"]
    expected = FairnessReport.objects.get(round__run=run, round__number=2).report
    assert summary["round"] == 2 and summary["model_version"] == 1  # about v1, from round 2
    assert (
        summary["metrics"][0]["value"]
        == expected["attributes"]["sex"]["report"]["demographic_parity_difference"]
    )
    assert summary["undefined_rates"] == 1
    assert card["deployment"]["feature_names"] == ["x1", "x2", "x3"]
    assert card["deployment"]["preprocessing"]["numeric"]["x1"]["count"] == 20

    final = client.get(f"/models/{v2.pk}/card.json").json()["fairness"]
    assert final["report"] is None
    assert final["status"].startswith("not evaluated: model v2 is evaluated")
    assert "the latest report (round 2) is about model v1" in final["status"]

    html = client.get(f"/runs/{run.pk}/compliance/").content.decode()
    assert "Model v1 on" in html and "exceeds the limit" in html
    assert f'href="/runs/{run.pk}/fairness/"' in html
    assert "Threshold flags over the run:" in html


def test_privacy_page_shows_spend_budgets_mechanisms_and_pending_plans(world: World) -> None:
    run = fairness_run(world)
    silo = world.gov.silos[0]
    html = (
        client_for(world.user("org_admin"))
        .get(f"/consortia/{world.gov.consortium.pk}/privacy/")
        .content.decode()
    )
    assert silo.name in html and "1.0000" in html and "3.0000" in html  # spent 1, remaining 3
    assert f"Run {run.pk}</a> · Fair readmission" in html
    assert "discrete Laplace, scale 1.0000 per count, 1 count table, pure ε = 1.0000" in html
    assert "Noisy fairness counts" in html
    # The submitted plan of the world is pending: projected 0 (no DP) for every silo.
    assert "Sepsis early warning" in html and "over budget" not in html
    figures = json.loads(html.split('id="page-figures" type="application/json">')[1].split("<")[0])
    names = [trace["name"] for trace in figures["privacy"]["data"]]
    assert names == [silo.name, f"Budget of {silo.name}"]


def test_onnx_export_answers_503_naming_the_package_when_onnx_is_missing(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = fairness_run(world)
    model = ModelVersion.objects.get(run=run, number=2)
    monkeypatch.setattr(onnx_export, "available", lambda: False)

    response = client_for(world.user("steward")).get(f"/models/{model.pk}/model.onnx")

    assert response.status_code == 503
    assert "pip install onnx" in response.content.decode()


def test_onnx_export_of_a_run_without_preprocessing_says_why(world: World) -> None:
    model = ModelVersion.objects.filter(run=world.run).last()
    response = client_for(world.user("steward")).get(f"/models/{model.pk}/model.onnx")
    assert response.status_code in (500, 503)
    if onnx_export.available():
        assert "no fitted preprocessing" in response.content.decode()


def test_onnx_export_gives_the_same_logits_as_the_model(world: World) -> None:
    import onnx  # a server dependency (pyproject: server extra)
    import onnxruntime  # a dev dependency

    run = fairness_run(world)
    version = ModelVersion.objects.get(run=run, number=2)

    response = client_for(world.user("auditor")).get(f"/models/{version.pk}/model.onnx")

    assert response.status_code == 200
    assert response["Content-Disposition"].endswith(f'-run{run.pk}-v2.onnx"')
    graph = onnx.load_from_string(response.content)
    onnx.checker.check_model(graph)
    assert [i.name for i in graph.graph.input] == ["features"]
    assert [o.name for o in graph.graph.output] == ["logit"]
    model = build_model(run.version.spec["model"], 3, seed=0)
    model.load_state_dict(tensors.decode_state_dict(blob_store().get(version.blob_key)))
    model.eval()
    features = np.random.default_rng(1).normal(size=(5, 3)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(features)).numpy()
    session = onnxruntime.InferenceSession(response.content)
    (got,) = session.run(None, {"features": features})
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_the_card_summarises_the_plans_attribute_when_several_are_reported(world: World) -> None:
    run = fairness_run(world)
    report = FairnessReport.objects.get(round__run=run, round__number=2)
    other = {**report.report["attributes"]["sex"], "flags": []}
    report.report["attributes"] = {"age_band": other, **report.report["attributes"]}
    report.save()
    v1 = ModelVersion.objects.get(run=run, number=1)

    card = client_for(world.user("steward")).get(f"/models/{v1.pk}/card.json").json()

    assert card["fairness"]["report"]["attribute"] == "sex"
    html = client_for(world.user("steward")).get(f"/runs/{run.pk}/fairness/").content.decode()
    assert 'id="attr-age_band"' in html and 'id="attr-sex"' in html
