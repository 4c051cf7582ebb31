"""Outputs never destroy what existed: refused when they exist (without --overwrite) or overlap an input
(in every mode), written aside and renamed only when complete, so a rejected or killed run leaves the
old output byte-identical. And the CLI ends bad input with one line, never a traceback."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from dqo_megatron.cli import app
from dqo_megatron.outputs import OutputError, check_apart, staged_dir, staged_file, staged_files

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under `root` (hidden ones included) -> its bytes."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _records(path: Path, n: int, bad_line: int | None = None) -> str:
    rows = [
        {"prompt": f"Question {i}: what is {i} plus {i}?", "response": f"It is {2 * i}.", "reward": float(i % 2)}
        for i in range(n)
    ]
    lines = [json.dumps(r) for r in rows]
    if bad_line is not None:
        lines[bad_line - 1] = json.dumps({"prompt": "x", "response": "y", "reward": "not a number"})
    path.write_text("\n".join(lines) + "\n")
    return str(path)


# ----------------------------------------------------------------------------------------- the rules
@pytest.mark.parametrize(
    "out,inp,how",
    [
        ("a.jsonl", "a.jsonl", "is"),
        ("d/sub/out", "d", "lies inside"),
        ("d", "d/in.jsonl", "contains"),
        ("./d/../a.jsonl", "a.jsonl", "is"),
    ],
)
def test_overlap_is_refused(tmp_path, out, inp, how):
    (tmp_path / "d").mkdir()
    (tmp_path / "a.jsonl").write_text("x\n")
    with pytest.raises(OutputError, match=f"output .* {how} the input .*refused even with --overwrite"):
        check_apart([tmp_path / out], [tmp_path / inp])
    check_apart([tmp_path / "elsewhere.jsonl"], [tmp_path / inp])  # no overlap: no error


def test_overlap_through_links_is_refused(tmp_path):
    real = tmp_path / "in.jsonl"
    real.write_text("x\n")
    (tmp_path / "sym.jsonl").symlink_to(real)
    os.link(real, tmp_path / "hard.jsonl")
    for alias in ("sym.jsonl", "hard.jsonl"):
        with pytest.raises(OutputError, match="is the input"):
            check_apart([tmp_path / alias], [real])


def test_stagers_refuse_existing_and_keep_it_on_failure(tmp_path):
    target = tmp_path / "out.jsonl"
    target.write_text("old\n")
    with pytest.raises(OutputError, match="already exists .*--overwrite"):
        with staged_file(target, overwrite=False):
            raise AssertionError("not reached: refused before the block")
    with pytest.raises(KeyboardInterrupt):
        with staged_file(target, overwrite=True) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    assert target.read_text() == "old\n" and sorted(os.listdir(tmp_path)) == ["out.jsonl"]
    with staged_file(target, overwrite=True) as tmp:
        tmp.write_text("new\n")
    assert target.read_text() == "new\n" and sorted(os.listdir(tmp_path)) == ["out.jsonl"]
    directory = tmp_path / "model"
    directory.mkdir()
    (directory / "w").write_text("old")
    with pytest.raises(RuntimeError):
        with staged_dir(directory, overwrite=True) as tmp:
            (tmp / "w").write_text("new")
            raise RuntimeError("failed mid-write")
    assert (directory / "w").read_text() == "old"
    with staged_dir(directory, overwrite=True) as tmp:
        (tmp / "v").write_text("new")
    assert sorted(os.listdir(directory)) == ["v"] and sorted(os.listdir(tmp_path)) == ["model", "out.jsonl"]


def test_only_dead_runs_staging_is_swept(tmp_path):
    import socket

    from dqo_megatron.outputs import sweep_stale_staging

    host = socket.gethostname()
    mine, dead, elsewhere = (
        tmp_path / f".x.partial-{host}-{os.getpid()}-a1",
        tmp_path / f".x.partial-{host}-999999999-b2",
        tmp_path / ".x.partial-otherhost-1-c3",
    )
    for d in (mine, dead, elsewhere):
        d.mkdir()
    assert sweep_stale_staging(tmp_path, "x") == [dead]
    assert mine.exists() and elsewhere.exists() and not dead.exists()


def test_a_file_set_is_swapped_whole_marker_last(tmp_path):
    names = [tmp_path / "d_a.bin", tmp_path / "d_b.bin", tmp_path / "d.json"]
    for n in names:
        n.write_text("old " + n.name)
    with staged_files(names, overwrite=True) as tmp:
        (tmp / "d_a.bin").write_text("new")
        (tmp / "d.json").write_text("new marker")
    # d_b.bin was not part of the new set: it does not survive beside it
    assert sorted(os.listdir(tmp_path)) == ["d.json", "d_a.bin"]
    assert (tmp_path / "d.json").read_text() == "new marker"


# --------------------------------------------------------------------------------------- preprocess
def _preprocess(inputs, prefix, tok, *extra):
    return runner.invoke(app, ["preprocess", *inputs, "-o", str(prefix), "-t", tok, "--no-progress", *extra])


def test_preprocess_never_destroys_a_good_dataset(tmp_path, sp_model):
    good = _records(tmp_path / "good.jsonl", 20)
    bad = _records(tmp_path / "bad.jsonl", 20, bad_line=7)
    out = tmp_path / "d"
    out.mkdir()
    assert _preprocess([good], out / "data", sp_model).exit_code == 0
    before = snapshot(out)
    assert len(before) == 9  # 4 parts (no behavior log-probs) x .bin/.idx + the manifest
    # a rerun without --overwrite: refused before reading anything
    r = _preprocess([bad], out / "data", sp_model)
    assert r.exit_code == 2 and "dataset" in r.output and "already exists" in r.output and "--overwrite" in r.output
    assert snapshot(out) == before
    # with --overwrite, a rejected record: the old dataset stays, nothing half-written appears
    r = _preprocess([bad], out / "data", sp_model, "--overwrite")
    assert r.exit_code == 2 and "bad.jsonl:7" in r.output and "Traceback" not in r.output
    assert snapshot(out) == before
    # with --overwrite and good input: replaced (other content), no leftovers
    other = _records(tmp_path / "other.jsonl", 5)
    assert _preprocess([other], out / "data", sp_model, "--overwrite").exit_code == 0
    after = snapshot(out)
    assert set(after) == set(before) and after != before
    assert json.loads(after["data.json"])["num_documents"] == 5


def test_preprocess_output_inside_its_input_is_refused(tmp_path, sp_model):
    folder = tmp_path / "records"
    folder.mkdir()
    good = _records(folder / "good.jsonl", 5)
    before = snapshot(folder)
    for extra in ((), ("--overwrite",)):
        r = _preprocess([str(folder)], folder / "data", sp_model, *extra)
        assert r.exit_code == 2 and "lies inside the input" in r.output, r.output
        r = _preprocess([good], tmp_path / "records" / "good.jsonl" / "x", sp_model, *extra)
        assert r.exit_code == 2 and "lies inside the input" in r.output, r.output
    assert snapshot(folder) == before


def test_preprocess_killed_mid_run_leaves_the_old_dataset(tmp_path, sp_model):
    out = tmp_path / "d"
    assert _preprocess([_records(tmp_path / "small.jsonl", 10)], out / "data", sp_model).exit_code == 0
    before = snapshot(out)
    big = _records(tmp_path / "big.jsonl", 200_000)
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "dqo_megatron",
            "preprocess",
            big,
            "-o",
            str(out / "data"),
            "-t",
            sp_model,
            "--overwrite",
            "--no-progress",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.time() + 120
    try:
        while time.time() < deadline and proc.poll() is None:
            staged = [p for p in out.glob(".data.partial-*/data_tokens.bin") if p.stat().st_size > 0]
            if staged:
                break
            time.sleep(0.05)
        assert proc.poll() is None, f"preprocess ended before it could be killed: {proc.stderr.read()[-2000:]!r}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    visible = {k: v for k, v in snapshot(out).items() if not k.startswith(".")}
    assert visible == before  # the staging directory stays behind, hidden; the dataset is the old one
    assert len(list(out.glob(".data.partial-*"))) == 1
    # the next run removes the dead run's leftovers
    assert _preprocess([_records(tmp_path / "small.jsonl", 10)], out / "data", sp_model, "--overwrite").exit_code == 0
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


# ------------------------------------------------------------------------------------ records files
def test_label_refuses_existing_and_its_own_input(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(
        json.dumps({"prompt": "q", "response": "#### 4", "reference_answer": "#### 4", "task": "gsm8k"}) + "\n"
    )
    before = inp.read_bytes()
    for extra in ((), ("--overwrite",)):
        r = runner.invoke(app, ["label", str(inp), "-o", str(inp), "--no-progress", *extra])
        assert r.exit_code == 2 and "is the input" in r.output and inp.read_bytes() == before
    out = tmp_path / "out.jsonl"
    assert runner.invoke(app, ["label", str(inp), "-o", str(out), "--no-progress"]).exit_code == 0
    labeled = out.read_bytes()
    r = runner.invoke(app, ["label", str(inp), "-o", str(out), "--no-progress"])
    assert r.exit_code == 2 and "already exists" in r.output and out.read_bytes() == labeled
    assert runner.invoke(app, ["label", str(inp), "-o", str(out), "--no-progress", "--overwrite"]).exit_code == 0
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl"]


def test_process_scores_refuses_its_input_and_cache(tmp_path):
    from dqo_megatron.process_scores import ProcessScoresConfig, check_outputs

    inp = tmp_path / "in.jsonl"
    inp.write_text("{}\n")
    for out, cache in ((inp, None), (tmp_path / "o.jsonl", str(inp))):
        cfg = ProcessScoresConfig(inputs=[str(inp)], output=str(out), cache=cache, overwrite=True, progress=False)
        with pytest.raises(OutputError, match="is the input"):
            check_outputs(cfg)
    r = runner.invoke(
        app,
        ["process-scores", str(inp), "-o", str(inp), "-m", str(tmp_path / "no-model"), "--overwrite", "--no-progress"],
    )
    assert r.exit_code == 2 and "is the input" in r.output and inp.read_text() == "{}\n"


def test_rollout_refuses_its_problems_file_in_every_mode(tmp_path):
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"id": "p0", "question": "1+1?", "answer": "#### 2"}) + "\n")
    before = problems.read_bytes()
    for extra in ((), ("--overwrite",)):
        r = runner.invoke(
            app,
            ["rollout", str(problems), "-o", str(problems), "-m", str(tmp_path / "no-model"), "--no-progress", *extra],
        )
        assert r.exit_code == 2 and "is the input" in r.output and problems.read_bytes() == before


def test_rollout_overwrite_replaces_only_when_complete(tmp_path, stories_files):
    from dqo_megatron.rollout.rollout import RolloutConfig, run_rollout
    from dqo_megatron.rollout.transformers_backend import load_tokenizer
    from tests.rollout.conftest import write_problems
    from tests.rollout.test_records import StubBackend, _completion

    tok = load_tokenizer(stories_files[1])
    problems = write_problems(tmp_path / "p.jsonl", ["Once upon a time", "Tom ran.", "The dog sat."])
    cfg = RolloutConfig(problems=problems, output=str(tmp_path / "o.jsonl"), n=2, progress=False, problems_per_call=1)
    run_rollout(cfg, StubBackend(tok, [_completion(tok, "Once upon a time")]))
    before = snapshot(tmp_path)

    class FailsOnSecondCall(StubBackend):
        def generate(self, prompts, params, *, seeds, prefixes=None):
            if self.calls:
                raise RuntimeError("backend died")
            return super().generate(prompts, params, seeds=seeds, prefixes=prefixes)

    again = RolloutConfig(**{**cfg.__dict__, "overwrite": True, "temperature": 0.5})
    with pytest.raises(RuntimeError, match="backend died"):
        run_rollout(again, FailsOnSecondCall(tok, [_completion(tok, "Tom ran.")]))
    assert snapshot(tmp_path) == before  # the old output as it was, the staged one removed
    # a new output whose first call fails leaves nothing behind (no empty file + sidecar to trip a resume)
    fresh = RolloutConfig(**{**cfg.__dict__, "output": str(tmp_path / "new.jsonl")})
    failing = FailsOnSecondCall(tok, [_completion(tok, "Tom ran.")])
    failing.calls.append("pretend a first call happened")
    with pytest.raises(RuntimeError, match="backend died"):
        run_rollout(fresh, failing)
    assert snapshot(tmp_path) == before
    summary = run_rollout(again, StubBackend(tok, [_completion(tok, "Tom ran.")]))
    assert summary.written == 6 and "Tom ran." in Path(cfg.output).read_text()
    assert json.loads(Path(cfg.output + ".meta.json").read_text())["settings"]["temperature"] == 0.5
    assert sorted(os.listdir(tmp_path)) == ["o.jsonl", "o.jsonl.meta.json", "p.jsonl"]


# ---------------------------------------------------------------------------------- model directories
def test_convert_refuses_output_equal_to_or_inside_its_source(tmp_path):
    src = tmp_path / "ck"
    src.mkdir()
    (src / "model_config.yaml").write_text("keep me\n")
    before = snapshot(src)
    for cmd in (
        ["convert", "megatron-to-hf", str(src), str(src)],
        ["convert", "hf-to-megatron", str(src), str(src)],
        ["convert", "value-from-megatron", str(src), str(src)],
        ["convert", "hf-to-megatron", str(src), str(src / "inner")],
        ["convert", "megatron-to-hf", str(src / "weights"), str(tmp_path)],
    ):
        r = runner.invoke(app, cmd + ["--overwrite"])
        assert r.exit_code != 0 and "input" in r.output and "refused even with --overwrite" in r.output, (cmd, r.output)
    assert snapshot(src) == before


def test_a_demo_replaces_an_earlier_one_only_when_it_completes(tmp_path):
    from dqo_megatron.config import ConfigError
    from dqo_megatron.demo.pipeline import MARKER, fresh_run_dir

    run = tmp_path / "demo"
    run.mkdir()
    (run / MARKER).write_text("earlier")
    with pytest.raises(RuntimeError):
        with fresh_run_dir(run):
            (run / "partial.log").write_text("stage 3 failed")
            raise RuntimeError("stage 3 failed")
    assert snapshot(run) == {MARKER: b"earlier"}
    assert snapshot(tmp_path / "demo.failed") == {"partial.log": b"stage 3 failed"}
    with fresh_run_dir(run):
        (run / MARKER).write_text("new")
    assert snapshot(run) == {MARKER: b"new"} and sorted(os.listdir(tmp_path)) == ["demo", "demo.failed"]
    # a demo killed (-9) while replacing this one left it aside and its own partial run in place
    aside = tmp_path / ".demo.old-x1"
    aside.mkdir()
    os.replace(run, aside / "demo")
    run.mkdir()
    (run / MARKER).write_text("running")
    with fresh_run_dir(run):  # the next demo puts the complete one back first, then replaces it as usual
        assert not aside.exists() and snapshot(tmp_path / "demo.failed") == {MARKER: b"running"}
        (run / MARKER).write_text("newest")
    assert snapshot(run) == {MARKER: b"newest"} and sorted(os.listdir(tmp_path)) == ["demo", "demo.failed"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("keep")
    with pytest.raises(ConfigError, match="not a demo run directory"):
        with fresh_run_dir(mine):
            raise AssertionError("not reached")
    assert snapshot(mine) == {"thesis.tex": b"keep"}


# -------------------------------------------------------------------------------------- no tracebacks
def test_unexpected_errors_are_one_line_unless_debug(tmp_path, monkeypatch, sp_model):
    import dqo_megatron.data.preprocess as pre

    def broken(cfg):
        raise RuntimeError("something deep broke\n  with a second line")

    monkeypatch.setattr(pre, "preprocess", broken)
    args = ["preprocess", "x.jsonl", "-o", str(tmp_path / "d"), "-t", sp_model]
    r = runner.invoke(app, args)
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "error: RuntimeError: something deep broke" in r.output and "--debug" in r.output
    assert "second line" not in r.output
    r = runner.invoke(app, ["--debug"] + args)
    assert isinstance(r.exception, RuntimeError)
    r = runner.invoke(app, args, env={"DQO_DEBUG": "1"})
    assert isinstance(r.exception, RuntimeError)


def test_a_full_disk_is_named(tmp_path, monkeypatch, sp_model):
    import dqo_megatron.data.preprocess as pre

    def full(cfg):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "d_tokens.bin"))

    monkeypatch.setattr(pre, "preprocess", full)
    r = runner.invoke(app, ["preprocess", "x.jsonl", "-o", str(tmp_path / "d"), "-t", sp_model])
    assert r.exit_code == 2 and "no space left on device writing" in r.output and "MiB free" in r.output


def test_train_refuses_a_run_dir_whose_outputs_hold_its_inputs(tmp_path):
    from dqo_megatron.config import ConfigError, RunConfig, load_config
    from dqo_megatron.training.trainer import _check_run_dir_apart

    run_dir = tmp_path / "run"
    ok = [f"run_dir={run_dir}", f"data.train_prefix={tmp_path / 'data' / 'train'}"]
    _check_run_dir_apart(load_config(RunConfig, None, ok))  # apart: no error
    # the checkpoints the run prunes would hold its starting point; its config would overwrite the dataset's
    for bad in (
        f"init.policy={run_dir / 'checkpoints' / 'step_00000010'}",
        f"data.train_prefix={run_dir / 'checkpoints' / 'data'}",
        f"eval.problems={run_dir / 'tensorboard' / 'p.jsonl'}",
        f"init.reference={run_dir}",
    ):
        with pytest.raises(ConfigError, match=f"run_dir={run_dir}: output .* the input"):
            _check_run_dir_apart(load_config(RunConfig, None, ok + [bad]))


def test_a_fresh_start_never_overwrites_existing_checkpoints(tmp_path):
    from dqo_megatron.training.checkpointing import CheckpointError, resume_checkpoint

    root = tmp_path / "checkpoints"
    (root / "step_00000002").mkdir(parents=True)
    (root / "step_00000002" / "COMPLETE").write_text("{}")
    (root / ".tmp_step_00000004").mkdir()  # an unfinished save is not a checkpoint to protect
    for choice in ("none", "", None):
        with pytest.raises(
            CheckpointError,
            match=r"holds checkpoints \(steps 2..2\) that a fresh start .* would "
            "overwrite",
        ):
            resume_checkpoint(root, choice, [])
    assert resume_checkpoint(tmp_path / "fresh", "none", []) is None  # nothing there: a fresh start
