"""Model kinds a site installs itself: the example package built into a wheel and installed into a
folder of its own, found through the ``quorum.models`` entry points, verified by version and
distribution digest, allowed by site.toml, refused before any data is read otherwise."""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from clientagent.config import ConfigError, ModelsConfig, PolicyConfig, load_config
from clientagent.policy import announced_kinds, check_policy
from clientagent.trainer import TaskError, check_model_available, handle_stats_request
from fedcore import model_kinds, models, signing, training
from fedcore.plan import parse_plan
from fedcore.privacy import dpsgd
from tests.kind_packages import build_wheel, install


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("kinds")
    wheel = build_wheel(root / "wheel")
    target = install(wheel, root / "site-packages")
    sys.path.insert(0, str(target))  # importable, as a pip install into the venv would make it
    try:
        yield {
            "wheel": wheel,
            "target": target,
            "kinds": model_kinds.installed_kinds([str(target)]),
        }
    finally:
        sys.path.remove(str(target))
        sys.modules.pop("quorum_resmlp", None)


def spec(installed: dict[str, Any], **changes: Any) -> dict[str, Any]:
    found = installed["kinds"]["resmlp"]
    return {
        "kind": "installed",
        "name": "resmlp",
        "version": found.version,
        "sha256": found.sha256,
        "options": {"width": 16, "blocks": 2},
        **changes,
    }


def plan(model: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": model,
        "schema": {
            "columns": [{"name": "x", "type": "numeric"}],
            "target": {"column": "y", "task": "multiclass", "classes": ["a", "b", "c"]},
        },
        "training": {"rounds": 1, "local_epochs": 1, "batch_size": 8, "lr": 0.1},
    }


def test_the_wheels_digest_is_the_installed_distributions(installed: dict[str, Any]) -> None:
    found = installed["kinds"]["resmlp"]

    assert found.problem is None
    assert (found.distribution, found.version) == ("quorum-resmlp", "0.1.0")
    assert found.sha256 == model_kinds.wheel_digest(installed["wheel"])
    assert found.announcement() == {"name": "resmlp", "version": "0.1.0", "sha256": found.sha256}


def test_an_installed_kind_builds_with_the_tasks_outputs_and_the_same_seed_same_weights(
    installed: dict[str, Any],
) -> None:
    kinds = installed["kinds"]

    first = models.build_model(spec(installed), 5, n_outputs=3, seed=4, kinds=kinds)
    again = models.build_model(spec(installed), 5, n_outputs=3, seed=4, kinds=kinds)

    assert first(torch.zeros(7, 5)).shape == (7, 3)
    for (name, a), (_, b) in zip(
        first.state_dict().items(), again.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name


def test_a_plan_naming_an_installed_kind_parses_and_trains_with_dp_sgd(
    installed: dict[str, Any],
) -> None:
    parsed = parse_plan(plan(spec(installed)))
    objective = parsed.objective()
    rng = np.random.default_rng(0)
    X = rng.normal(size=(96, 5)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.float32) + (X[:, 1] > 1)
    model = models.build_model(parsed.model, 5, n_outputs=3, seed=0, kinds=installed["kinds"])

    result = dpsgd.train_dp(
        model,
        X,
        y,
        epochs=2,
        batch_size=16,
        lr=0.01,
        clip=1.0,
        delta=1e-5,
        noise_multiplier=0.5,
        seed=3,
        optimizer="adam",
        objective=objective,
    )

    assert result["steps"] == 12 and result["epsilon"] > 0
    assert set(training.evaluate(model, X, y, objective)) >= {"accuracy", "macro_f1"}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"name": "tabnet"}, "model kind 'tabnet' is not installed here (installed kinds: resmlp)"),
        ({"version": "0.2.0"}, "the plan needs version 0.2.0, this site has 0.1.0"),
        ({"sha256": "0" * 64}, "not the code the plan was approved with"),
    ],
)
def test_a_kind_not_installed_of_another_version_or_digest_is_refused_before_any_data(
    installed: dict[str, Any], tmp_path: Path, changes: dict[str, Any], message: str
) -> None:
    parsed = parse_plan(plan(spec(installed, **changes)))

    with pytest.raises(TaskError) as caught:
        check_model_available(parsed, 1, 1, kinds=installed["kinds"])
    assert caught.value.code == "policy_refused" and message in caught.value.reason

    class Untouchable:  # the site's data: reading it would fail the test
        def split(self, plan: Any) -> Any:
            raise AssertionError("the data was read")

    with pytest.raises(TaskError, match="policy_refused|" + message.split(" (")[0]):
        handle_stats_request(
            {"run": 1, "plan": plan(spec(installed, **changes))},
            Untouchable(),  # type: ignore[arg-type]
            kinds=installed["kinds"],
        )


def test_a_file_changed_after_installation_changes_the_digest(
    installed: dict[str, Any], tmp_path: Path
) -> None:
    copy = tmp_path / "site-packages"
    shutil.copytree(installed["target"], copy)
    module = copy / "quorum_resmlp" / "__init__.py"
    module.write_text(module.read_text() + "\n# patched\n")

    tampered = model_kinds.installed_kinds([str(copy)])["resmlp"]

    assert tampered.sha256 != installed["kinds"]["resmlp"].sha256
    with pytest.raises(model_kinds.KindUnavailable, match="not the code the plan was approved"):
        model_kinds.resolve(spec(installed), {"resmlp": tampered})


def test_an_editable_install_is_unusable(installed: dict[str, Any], tmp_path: Path) -> None:
    copy = tmp_path / "site-packages"
    shutil.copytree(installed["target"], copy)
    (direct,) = copy.glob("*.dist-info/direct_url.json")
    direct.write_text(json.dumps({"url": "file:///src", "dir_info": {"editable": True}}))

    found = model_kinds.installed_kinds([str(copy)])["resmlp"]

    assert found.kind is None and "editable install" in (found.problem or "")


def policy_check(installed: dict[str, Any], model: dict[str, Any], models_config: Any) -> None:
    check_policy(
        plan(model),
        "ab" * 32,
        policy=PolicyConfig(),
        config_path=Path("site.toml"),
        decision=None,
        spent_by_run={},
        run=1,
        models=models_config,
        kinds=installed["kinds"],
    )


def test_the_site_policy_refuses_an_installed_kind_its_site_toml_does_not_allow(
    installed: dict[str, Any],
) -> None:
    for config in (None, ModelsConfig(), ModelsConfig(allowed=("tabnet",))):
        with pytest.raises(TaskError) as caught:
            policy_check(installed, spec(installed), config)
        assert caught.value.code == "policy_refused"
        assert "installed model kind 'resmlp' is not allowed here" in caught.value.shared_reason

    policy_check(installed, spec(installed), ModelsConfig(allowed=("resmlp",)))  # accepted


def test_the_site_policy_refuses_an_allowed_kind_with_another_digest(
    installed: dict[str, Any],
) -> None:
    with pytest.raises(TaskError, match="not the code the plan was approved with"):
        policy_check(installed, spec(installed, sha256="f" * 64), ModelsConfig(allowed=("resmlp",)))


def test_an_agent_announces_only_the_kinds_it_has_and_allows(installed: dict[str, Any]) -> None:
    kinds = installed["kinds"]

    assert announced_kinds(ModelsConfig(), kinds) == []
    assert announced_kinds(ModelsConfig(allowed=("resmlp", "tabnet")), kinds) == [
        kinds["resmlp"].announcement()
    ]


def test_site_toml_models_section(tmp_path: Path) -> None:
    base = '[server]\nurl = "ws://127.0.0.1:8000/ws/agent/"\ntoken = "t"\npublic_key = "{key}"\n'
    base += '[data]\npath = "data.csv"\n'
    key = signing.public_key_text(signing.generate_private_key())
    (tmp_path / "data.csv").write_text("x,y\n1,a\n")
    config = tmp_path / "site.toml"

    config.write_text(base.format(key=key) + '[models]\nallowed = ["resmlp"]\n')
    assert load_config(config).models.allowed == ("resmlp",)
    config.write_text(base.format(key=key))
    assert load_config(config).models.allowed == ()
    config.write_text(base.format(key=key) + '[models]\nallowed = ["mlp"]\n')
    with pytest.raises(ConfigError, match="built-in kind"):
        load_config(config)
    config.write_text(base.format(key=key) + '[models]\nallowed = ["Res MLP"]\n')
    with pytest.raises(ConfigError, match="not a model kind's name"):
        load_config(config)
    many = ", ".join(f'"kind{i}"' for i in range(65))  # more than a hello may announce
    config.write_text(base.format(key=key) + f"[models]\nallowed = [{many}]\n")
    with pytest.raises(ConfigError, match="lists 65 kinds; at most 64"):
        load_config(config)


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ("resmlp", "must be a list"),
        ([{"name": "resmlp", "version": "0.1.0"}], "capabilities.models[0] must be exactly"),
        ([{"name": "Res MLP", "version": "1", "sha256": "a" * 64}], "models[0].name must match"),
        ([{"name": "resmlp", "version": "", "sha256": "a" * 64}], "models[0].version"),
        ([{"name": "resmlp", "version": "1", "sha256": "A" * 64}], "models[0].sha256"),
        ([{"name": "k", "version": "1", "sha256": "a" * 64}] * 65, "at most 64"),
    ],
)
def test_a_hello_announcing_malformed_kinds_is_refused_naming_the_entry(
    raw: object, words: str
) -> None:
    from fedcore.model_kinds import check_announcement

    with pytest.raises(ValueError, match=re.escape(words)):
        check_announcement(raw)


def test_a_plan_kind_counts_as_announced_only_with_its_version_and_digest() -> None:
    from fedcore.model_kinds import announced

    kind = {"name": "resmlp", "version": "0.1.0", "sha256": "a" * 64}
    spec = {"kind": "installed", "options": {}, **kind}
    assert announced(spec, [[], [kind]])
    assert not announced({**spec, "version": "0.2.0"}, [[kind]])
    assert not announced({**spec, "sha256": "b" * 64}, [[kind]])
