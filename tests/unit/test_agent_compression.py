"""The agent builds compressed updates as the plan says and keeps top-k residuals on disk."""

from __future__ import annotations

import pytest
import torch

from clientagent.data import LocalData
from clientagent.residuals import ResidualStore
from clientagent.trainer import INVALID_TASK, TaskError, handle_task
from fedcore import compression, protocol, tensors
from tests.unit.test_agent_trainer import PLAN, make_task, write_data

TOPK = {"method": "topk", "ratio": 0.1}


@pytest.fixture
def data(tmp_path) -> LocalData:
    return LocalData(write_data(tmp_path / "data.csv"))


def decoded(update: protocol.BinaryMessage, task: protocol.BinaryMessage) -> dict:
    spec = compression.CompressionSpec.from_plan(task.fields["plan"])
    global_ = tensors.decode_state_dict(task.payload)
    return compression.decompress_update(tensors.decode_state_dict(update.payload), spec, global_)


@pytest.mark.parametrize("section", [{"method": "float16"}, {"method": "int8"}, TOPK])
def test_the_update_is_the_compressed_change_named_in_its_header(data, section) -> None:
    plan = {**PLAN, "compression": section}
    dense = handle_task(make_task(data), data)  # same seed: the same training
    task = make_task(data, plan=plan)

    update = handle_task(task, data)

    assert update.fields["compression"] == section["method"]
    assert len(update.payload) < len(dense.payload)
    state = decoded(update, task)
    trained = tensors.decode_state_dict(dense.payload)
    if section["method"] != "topk":  # lossy per coordinate, but close
        for name, value in trained.items():
            assert torch.allclose(state[name], value, atol=0.02), name
    # the wire codec carries it as is
    reassembler = protocol.Reassembler()
    frames = protocol.encode_binary(update, max_frame_bytes=1024)
    assert [reassembler.feed(frame) for frame in frames][-1] == update


def test_topk_residual_is_saved_per_run_and_survives_a_restart(data, tmp_path) -> None:
    plan = {**PLAN, "compression": TOPK}
    store = ResidualStore(tmp_path / "state" / "residuals")
    task1 = make_task(data, plan=plan, round_=1)
    update1 = handle_task(task1, data, residuals=store)
    assert store.path(5).exists()

    # "restart": a new store object on the same folder finds the residual
    restarted = ResidualStore(tmp_path / "state" / "residuals")
    feedback = restarted.load(5, plan_hash="h")
    assert feedback.round == 1 and feedback.after and not feedback.before
    sent = compression.decode_delta(
        tensors.decode_state_dict(update1.payload),
        compression.CompressionSpec.from_section(TOPK),
        tensors.decode_state_dict(task1.payload),
    )[0]
    dense = handle_task(make_task(data), data)
    trained = tensors.decode_state_dict(dense.payload)
    global_ = tensors.decode_state_dict(task1.payload)
    for name, residual in feedback.after.items():  # sent + kept == the true change
        assert torch.allclose(sent[name] + residual, trained[name] - global_[name], atol=1e-5)

    # round 2 starts from round 1's residual; a rebuild of round 2 starts from it again
    task2 = make_task(data, plan=plan, round_=2, state=decoded(update1, task1))
    first = handle_task(task2, data, residuals=restarted)
    again = handle_task(task2, data, residuals=restarted)
    assert first.payload == again.payload
    after2 = restarted.load(5, plan_hash="h")
    assert after2.round == 2
    assert all(torch.equal(after2.before[n], feedback.after[n]) for n in feedback.after)
    # another plan under the same run id does not inherit it
    assert restarted.load(5, plan_hash="other").after == {}


def test_bad_compression_or_secagg_with_compression_is_invalid_task(data) -> None:
    for plan in (
        {**PLAN, "compression": {"method": "zip"}},
        {**PLAN, "compression": TOPK, "secure_aggregation": True},
    ):
        with pytest.raises(TaskError) as caught:
            handle_task(make_task(data, plan=plan), data)
        assert caught.value.code == INVALID_TASK


def test_the_end_of_a_run_deletes_its_residual_and_only_its_own(tmp_path, caplog) -> None:
    from clientagent.config import load_config
    from clientagent.connection import Agent
    from tests.unit.test_agent_session import write_site

    agent = Agent(
        load_config(write_site(tmp_path, "ws://127.0.0.1:9/ws/agent/")), progress_tty=False
    )
    store = ResidualStore(agent.config.agent.state_dir / "residuals")
    for run in (5, 6):
        store.save(run, compression.ErrorFeedback(), plan_hash="h")

    with caplog.at_level("INFO", logger="clientagent.connection"):
        agent.on_run_finished({"run": 5, "status": "completed"})
        agent.on_run_finished({"run": 7, "status": "failed"})  # no residual: nothing to say

    assert not store.path(5).exists() and store.path(6).exists()
    deleted = [r.getMessage() for r in caplog.records if "top-k residual" in r.getMessage()]
    assert deleted == [f"run 5: its top-k residual {store.path(5)} is deleted"]
