"""Checkpoints: exact resume, cross-layout load, crash safety, pruning, PolicyValueModel, resume choice.

Runs use forked gloo ranks (`tests.helpers.distributed`). One TP=2 run (module fixture) trains 4 steps
with Adam and a warmup+cosine LR schedule and saves after step 2; the other tests resume from it.
Resuming under the same layout must reproduce losses and parameters bit for bit (CPU is
deterministic); under another layout the same within fp32 reordering noise (see
tests/test_parallel_layouts.py for the tolerance argument).
"""

from __future__ import annotations

import os

import pytest
import torch

from dqo_megatron.training import checkpoint_commit, checkpointing
from dqo_megatron.training.checkpointing import (
    COMPLETE_MARKER,
    CheckpointError,
    find_latest_checkpoint,
    resolve_resume,
    step_dir_name,
)
from tests.helpers.distributed import DistributedTestError, run_distributed
from tests.training.ckpt_bodies import crash_body, lm_body, pv_body

TP2 = dict(tensor_model_parallel_size=2)
REL_TOL = 2e-5


@pytest.fixture(scope="module")
def tp2_run(tmp_path_factory):
    """TP=2: train steps 1-4, save after step 2 (+ probe there); returns (root, per-rank results)."""
    root = tmp_path_factory.mktemp("tp2")
    results = run_distributed(lm_body, 2, TP2, dict(until=4, save_at=(2,), save_root=str(root), probe_at=(2,)))
    return root, results


def _assert_same_rng(saved: dict, loaded: dict, where: str) -> None:
    assert saved["python"] == loaded["python"], f"{where}: python RNG"
    assert saved["numpy"] == loaded["numpy"], f"{where}: numpy RNG"
    assert torch.equal(saved["torch"], loaded["torch"]), f"{where}: torch RNG"
    assert saved["tracker"].keys() == loaded["tracker"].keys() and saved["tracker"], f"{where}: tracker states"
    for name in saved["tracker"]:
        assert torch.equal(saved["tracker"][name], loaded["tracker"][name]), f"{where}: tracker {name}"


# ------------------------------------------------------------------------------ 1. exact round trip
def test_resume_is_exact(tp2_run):
    root, first = tp2_run
    assert find_latest_checkpoint(root) == root / "step_00000002"
    resumed = run_distributed(lm_body, 2, TP2, dict(until=4, load=str(root / "step_00000002")))
    for rank, (a, b) in enumerate(zip(first, resumed)):
        assert sorted(b["losses"]) == [3, 4]
        assert b["losses"] == {3: a["losses"][3], 4: a["losses"][4]}, f"rank {rank}: losses after resume differ"
        assert a["params"].keys() == b["params"].keys()
        for name, value in a["params"].items():
            assert torch.equal(value, b["params"][name]), f"rank {rank}: {name} differs after resume"
        assert b["lr"] == a["lr"], f"rank {rank}: LR schedule not restored"
        assert b["extra"] == {
            "step": 2,
            "consumed_samples": 8,
            "metrics": {"loss": a["losses"][2]},
            "sampler": {"epoch": 0, "position": 2},
        }
        assert not b["rng_warned"]
        _assert_same_rng(a["rng"][2], b["rng"]["load"], f"rank {rank}")
    # The two TP ranks hold different RNG states (Megatron offsets the TP-region seed by the rank).
    assert not all(
        torch.equal(first[0]["rng"][2]["tracker"][k], first[1]["rng"][2]["tracker"][k])
        for k in first[0]["rng"][2]["tracker"]
    )


def test_resume_without_optimizer_state_diverges(tp2_run):
    """The exact-resume test would notice lost Adam moments: step 3 (weights only) is the same, step 4
    (after an update with fresh moments) is not."""
    root, first = tp2_run
    (b, _) = run_distributed(lm_body, 2, TP2, dict(until=4, load=str(root / "step_00000002"), load_optimizer=False))
    assert b["losses"][3] == first[0]["losses"][3]
    assert abs(b["losses"][4] - first[0]["losses"][4]) > 1e-4


# ------------------------------------------------------------------------------ 2. other layouts
OTHER_LAYOUTS = {
    "pp2": (2, dict(pipeline_model_parallel_size=2)),
    "pp2-vpp2": (2, dict(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2)),
    "tp1": (1, {}),
}


@pytest.mark.parametrize("layout", list(OTHER_LAYOUTS))
def test_load_under_another_layout(tp2_run, layout, tmp_path):
    root, first = tp2_run
    world, par = OTHER_LAYOUTS[layout]
    save_root = tmp_path / "again"
    results = run_distributed(
        lm_body,
        world,
        par,
        dict(
            until=4,
            load=str(root / "step_00000002"),
            probe_at=(0, 4),
            save_at=(4,) if layout == "pp2-vpp2" else (),
            save_root=str(save_root),
        ),
    )
    want = first[0]["probes"][2]
    for rank, res in enumerate(results):
        got = res["probes"][2]
        assert got["loss"] == pytest.approx(want["loss"], rel=REL_TOL), f"rank {rank}: probe loss"
        if got["per_token"] is not None:  # last pipeline stage: -log p of every token
            assert (got["per_token"] - want["per_token"]).abs().max() <= REL_TOL * want["per_token"].abs().max()
        # Training on (optimizer state resharded): losses of the next steps as in the TP=2 run.
        for step in (3, 4):
            assert res["losses"][step] == pytest.approx(first[0]["losses"][step], rel=1e-4), f"rank {rank} step {step}"
        assert res["rng_warned"], "RNG states of another layout must not be restored"
    if layout == "pp2-vpp2":
        # Saved from 2 virtual chunks as model0/model1 (Megatron-LM's names); loads into one chunk.
        meta = torch.load(save_root / "step_00000004" / "extra_state.pt", weights_only=True)
        assert meta["model_keys"] == ["model0", "model1"]
        (single,) = run_distributed(lm_body, 1, {}, dict(until=4, load=str(save_root / "step_00000004"), probe_at=(0,)))
        assert single["probes"][4]["loss"] == pytest.approx(results[0]["probes"][4]["loss"], rel=REL_TOL)


# ------------------------------------------------------------------------------ 3. crash safety
@pytest.mark.parametrize("stage", ["during_write", "before_rename", "after_rename"])
def test_killed_save_keeps_last_good_checkpoint(stage, tmp_path):
    root, record = tmp_path / "ckpt", tmp_path / "record.pt"
    with pytest.raises(DistributedTestError, match="exit code -9"):
        run_distributed(crash_body, 1, str(root), stage, str(record), timeout=120)
    saved = torch.load(record, weights_only=True)
    good = root / "step_00000001"
    assert (good / COMPLETE_MARKER).is_file()
    if stage == "after_rename":
        # The new directory was already complete when renamed; `latest` still names the older one,
        # which stays the resume point (both are good).
        assert (root / "step_00000002" / COMPLETE_MARKER).is_file()
        assert (root / "latest").read_text().strip() == "1"
    else:
        assert not (root / "step_00000002").exists()
        partial = root / ".tmp_step_00000002"
        if stage == "during_write":  # killed with shard files on disk, before torch_dist's metadata
            assert list(partial.glob("*.distcp")) and not (partial / "metadata.json").exists()
        else:  # killed between the marker and the rename
            assert (partial / COMPLETE_MARKER).is_file()
    assert find_latest_checkpoint(root) == good
    assert resolve_resume(root, "auto") == good
    if stage == "during_write":  # the good checkpoint still loads, with the weights it was saved with
        (res,) = run_distributed(lm_body, 1, {}, dict(until=1, load=str(good)))
        assert res["extra"]["step"] == 1
        for name, value in saved["params"].items():
            assert torch.equal(value, res["params"][name]), name


def _prune_body(root: str) -> dict:
    from tests.training.ckpt_bodies import lm_setup, lm_train_step, shutdown_writer_manager

    info, chunks, ddp, optimizer, scheduler = lm_setup({})
    seen = {}

    def listing():  # rank 0 only: the other rank may already be in the next save
        return sorted(p.name for p in os.scandir(root)) if info.rank == 0 else None

    try:
        for step in range(1, 5):
            lm_train_step(info, ddp, optimizer, scheduler, step - 1)
            checkpointing.save_checkpoint(root, step, ddp, optimizer, scheduler, extra={"step": step}, keep_last=2)
            seen[step] = listing()
        # Same step again (a run resumed at 4 and stopped again): replaced, still complete.
        checkpointing.save_checkpoint(root, 4, ddp, optimizer, scheduler, extra={"step": 4, "again": True}, keep_last=2)
        seen["again"] = listing()
        # A rename that fails: every rank gets the error (no hang), the last good checkpoint stays.
        original = checkpoint_commit._publish

        def broken(tmp, final):
            raise OSError(f"simulated rename failure for {final}")

        checkpoint_commit._publish = broken
        try:
            checkpointing.save_checkpoint(root, 5, ddp, optimizer, scheduler, extra={"step": 5}, keep_last=2)
        except CheckpointError as err:
            seen["error"] = str(err)
        checkpoint_commit._publish = original
        seen["after_error"] = listing()
    finally:
        shutdown_writer_manager()
    return seen


def test_prune_replace_and_failed_rename(tmp_path):
    root = tmp_path / "ckpt"
    seen = run_distributed(_prune_body, 2, str(root), timeout=120)  # DP=2: the error path is collective
    listed = seen[0]
    assert listed[1] == ["latest", "step_00000001"]
    assert listed[2] == ["latest", "step_00000001", "step_00000002"]
    assert listed[3] == ["latest", "step_00000002", "step_00000003"]
    assert listed[4] == ["latest", "step_00000003", "step_00000004"]
    assert listed["again"] == ["latest", "step_00000003", "step_00000004"]
    assert listed["after_error"] == [".tmp_step_00000005", "latest", "step_00000003", "step_00000004"]
    for rank_seen in seen:  # both ranks got rank 0's error
        assert "simulated rename failure" in rank_seen["error"] and "step_00000005" in rank_seen["error"]
    assert (root / "latest").read_text().strip() == "4"
    again = torch.load(root / "step_00000004" / "extra_state.pt", weights_only=True)
    assert again["extra"] == {"step": 4, "again": True}
    assert find_latest_checkpoint(root) == root / "step_00000004"


def test_find_latest_ignores_incomplete_and_bad_latest(tmp_path):
    root = tmp_path / "ckpt"
    assert find_latest_checkpoint(root) is None
    for step in (3, 7):
        (root / step_dir_name(step)).mkdir(parents=True)
        (root / step_dir_name(step) / COMPLETE_MARKER).write_text("{}")
    (root / step_dir_name(9)).mkdir()  # newest, but incomplete
    (root / ".tmp_step_00000010").mkdir()
    (root / ".tmp_step_00000010" / COMPLETE_MARKER).write_text("{}")  # complete but never renamed
    assert find_latest_checkpoint(root) == root / "step_00000007"
    (root / "latest").write_text("3\n")  # `latest` wins when it names a complete checkpoint
    assert find_latest_checkpoint(root) == root / "step_00000003"
    (root / "latest").write_text("9\n")  # ... and is not trusted when it names an incomplete one
    assert find_latest_checkpoint(root) == root / "step_00000007"
    (root / "latest").write_text("garbage")
    assert find_latest_checkpoint(root) == root / "step_00000007"
    assert [s for s, _ in checkpointing.list_checkpoints(root)] == [3, 7]


# ------------------------------------------------------------------------------ 4. PolicyValueModel
def test_policy_value_model_round_trip(tp2_run, tmp_path):
    root = str(tmp_path / "pv")
    pp2 = dict(pipeline_model_parallel_size=2)
    first = run_distributed(pv_body, 2, pp2, dict(until=4, save_at=(2,), save_root=root, reference=True))
    last_stage_keys = first[1]["keys"]
    assert {"value_head.weight", "value_head.bias"} <= set(last_stage_keys)
    assert not any(k.startswith("value_head") for k in first[0]["keys"])  # the head lives on the last stage
    for member in ("policy.", "value.", "reference."):
        assert any(k.startswith(member) for k in first[0]["keys"]), member
    resumed = run_distributed(pv_body, 2, pp2, dict(until=4, load=f"{root}/step_00000002", reference=True))
    for rank, (a, b) in enumerate(zip(first, resumed)):
        assert b["losses"] == {3: a["losses"][3], 4: a["losses"][4]}, f"rank {rank}"
        for name, value in a["params"].items():
            assert torch.equal(value, b["params"][name]), f"rank {rank}: {name}"
    # Under TP=2 (head replicated over TP instead of on one stage): same losses within fp32 noise.
    # Before that, a checkpoint of another model (the plain GPT of `tp2_run`) fails clearly on every rank.
    lm_ckpt = tp2_run[0] / "step_00000002"
    other = run_distributed(
        pv_body, 2, TP2, dict(until=4, load=f"{root}/step_00000002", reference=True, bad_load=str(lm_ckpt))
    )
    for step in (3, 4):
        assert other[0]["losses"][step] == pytest.approx(first[0]["losses"][step], rel=1e-4)
    for res in other:
        assert str(lm_ckpt) in res["bad_load_model"] and "lacks" in res["bad_load_model"]
        assert "policy." in res["bad_load_model"]
        assert str(lm_ckpt) in res["bad_load_optimizer"]


# ------------------------------------------------------------------------------ 5. choosing a resume point
def test_resolve_resume(tmp_path):
    root = tmp_path / "ckpt"
    assert resolve_resume(root, "auto") is None  # no root yet: start fresh
    assert resolve_resume(root, "none") is None and resolve_resume(root, "") is None
    assert resolve_resume(None, "auto") is None
    missing = tmp_path / "nowhere" / "step_00000005"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        resolve_resume(root, str(missing))
    incomplete = root / "step_00000004"
    incomplete.mkdir(parents=True)
    with pytest.raises(CheckpointError, match=f"{incomplete}.*not a complete checkpoint"):
        resolve_resume(root, str(incomplete))
    assert resolve_resume(root, "auto") is None
    good = root / "step_00000002"
    good.mkdir()
    (good / COMPLETE_MARKER).write_text("{}")
    assert resolve_resume(root, "auto") == good
    assert resolve_resume(root, str(good)) == good
    with pytest.raises(CheckpointError, match="checkpoint root"):
        resolve_resume(tmp_path, str(root))


def test_bad_arguments_fail_before_any_collective(tmp_path):
    with pytest.raises(TypeError, match=r"extra\['sampler'\]\['rng'\] is a builtins.object"):
        checkpointing.save_checkpoint(tmp_path, 1, [], None, extra={"sampler": {"rng": object()}})
    with pytest.raises(ValueError, match="keep_last"):
        checkpointing.save_checkpoint(tmp_path, 1, [], None, keep_last=0)
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        checkpointing.load_checkpoint(tmp_path, [])
