"""W&B without wandb installed: a fake module in sys.modules. A missing wandb stops a run before anything is
built; a resumed run continues its W&B run; TensorBoard and W&B get the same tags, all in docs/training.md."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from dqo_megatron.config import ConfigError, RunConfig
from dqo_megatron.training import metrics_logger
from dqo_megatron.training.member_step import MEMBER_KEY
from dqo_megatron.training.metrics_logger import FIXED_TAGS, WANDB_ID_FILE, WANDB_STEP, MetricsLogger

DOCS = Path(__file__).resolve().parents[2] / "docs" / "training.md"


class FakeWandb:
    """What the logger uses of wandb: init(...) -> a run with id, define_metric, log, finish. Like W&B, a
    `log(step=s)` below the last step logged is dropped (what made resumed runs lose their redone steps)."""

    def __init__(self) -> None:
        self.inits: list[dict] = []
        self.logged: list[tuple[dict, int | None]] = []
        self.step_metrics: dict[str, str | None] = {}
        self._last_step = -1

    def init(self, **kwargs):
        self.inits.append(kwargs)
        run_id = kwargs.get("id") or f"run{len(self.inits)}"
        return SimpleNamespace(id=run_id, log=self._log, define_metric=self._define, finish=lambda: None)

    def _define(self, name, step_metric=None):
        self.step_metrics[name] = step_metric

    def _log(self, data, step=None):
        if step is not None and step < self._last_step:
            return  # W&B: "Steps must be monotonically increasing"
        self._last_step = self._last_step + 1 if step is None else step
        self.logged.append((data, step))


class FakeWriter:
    def __init__(self) -> None:
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag, value, step) -> None:
        self.scalars.append((tag, value, step))

    def close(self) -> None:
        pass


def _run(tmp_path) -> RunConfig:
    run = RunConfig()
    run.run_dir, run.train.wandb_project, run.train.peak_tflops = str(tmp_path), "dqo-tests", 100.0
    return run


def _parts():
    optimizer = SimpleNamespace(param_groups=[{"lr": 1e-3}, {"lr": 2e-3, MEMBER_KEY: "value"}])
    return SimpleNamespace(
        info=SimpleNamespace(world_size=1),
        optimizer=optimizer,
        is_logger=True,
        algorithm=SimpleNamespace(rows_per_item=1),
        chunks=[SimpleNamespace(value=True, reference=None)],
    )


@pytest.fixture
def fakes(monkeypatch):
    wandb, writer = FakeWandb(), FakeWriter()
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setattr(metrics_logger, "_tensorboard", lambda run: writer)
    return wandb, writer


def test_missing_wandb_stops_the_run_before_anything_is_built(monkeypatch, tmp_path):
    from dqo_megatron import parallel
    from dqo_megatron.training import trainer

    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    monkeypatch.setattr(parallel, "initialize", lambda *a, **k: pytest.fail("process groups started"))
    run = _run(tmp_path)
    run.run_dir, run.data.train_prefix = None, str(tmp_path / "data")
    with pytest.raises(ConfigError, match=r"^train.wandb_project=dqo-tests is set but wandb is not installed"):
        trainer.train(run)


def test_a_resumed_run_continues_its_wandb_run(fakes, tmp_path):
    wandb, _ = fakes
    MetricsLogger(_run(tmp_path), _parts(), start_step=0).close()
    assert (tmp_path / WANDB_ID_FILE).read_text() == "run1\n" and "id" not in wandb.inits[0]
    MetricsLogger(_run(tmp_path), _parts(), start_step=40).close()
    assert wandb.inits[1]["id"] == "run1" and wandb.inits[1]["resume"] == "allow"
    MetricsLogger(_run(tmp_path), _parts(), start_step=0).close()  # a fresh start: a new W&B run
    assert "id" not in wandb.inits[2] and (tmp_path / WANDB_ID_FILE).read_text() == "run3\n"


def test_tensorboard_and_wandb_get_the_same_tags_and_docs_list_them(fakes, tmp_path):
    wandb, writer = fakes
    metrics = {"loss": 1.0, "policy_loss": 0.6, "value_loss": 0.4, "kl_ref": float("nan")}
    result = SimpleNamespace(
        loss=1.0, grad_norm=0.5, update_successful=True, tokens=4096, document_tokens=5000, metrics=metrics
    )
    with MetricsLogger(_run(tmp_path), _parts()) as logger:
        logger.log_step(1, result, seconds=0.25)
        logger.log_eval(1, SimpleNamespace(accuracy=0.5))
    to_tensorboard = {tag: value for tag, value, _ in writer.scalars}
    to_wandb = {tag: value for data, _ in wandb.logged for tag, value in data.items() if tag != WANDB_STEP}
    assert to_tensorboard == to_wandb and all(math.isfinite(v) for v in to_wandb.values())
    assert set(to_wandb) == {"train/loss", "train/policy_loss", "train/value_loss", *FIXED_TAGS}
    documented = set(re.findall(r"`((?:train|perf|lr|eval)/[a-z_]+)`", DOCS.read_text()))
    assert set(to_wandb) <= documented, set(to_wandb) - documented


def _train_with_fake_wandb(run: RunConfig) -> dict:
    """In the forked rank: train with a fake wandb; what W&B was asked and given."""
    from dqo_megatron.training.trainer import train

    wandb = FakeWandb()
    sys.modules["wandb"] = wandb
    summary = train(run)
    inits = [{k: v for k, v in i.items() if k != "config"} for i in wandb.inits]
    return {"inits": inits, "steps": summary.steps, "logged_steps": [d[WANDB_STEP] for d, _ in wandb.logged]}


def test_the_trainer_continues_the_wandb_run_on_resume(tmp_path):
    from tests.helpers.distributed import run_distributed
    from tests.helpers.synthetic_data import write_synthetic_dataset
    from tests.training.test_trainer_layouts import _run as tiny_run

    run = tiny_run(write_synthetic_dataset(str(tmp_path / "data" / "d")), {}, steps=2)
    run.run_dir, run.train.wandb_project, run.train.save_interval = str(tmp_path / "run"), "dqo-tests", 2
    (first,) = run_distributed(_train_with_fake_wandb, 1, run)
    assert first["inits"] == [{"project": "dqo-tests", "dir": run.run_dir}]
    assert (tmp_path / "run" / WANDB_ID_FILE).read_text() == "run1\n"
    run.train.train_steps = 4
    (second,) = run_distributed(_train_with_fake_wandb, 1, run)
    assert second["steps"] == 4
    assert second["inits"] == [{"project": "dqo-tests", "dir": run.run_dir, "id": "run1", "resume": "allow"}]
    assert first["logged_steps"] == [1, 2] and second["logged_steps"] == [3, 4]


def test_steps_redone_after_a_resume_reach_wandb(fakes, tmp_path):
    """A run killed after step 4 with its checkpoint at 2 redoes step 3: W&B gets it again (as TensorBoard
    does), plotted against trainer/step, not dropped as a step below the last one."""
    wandb, _writer = fakes
    result = SimpleNamespace(
        loss=1.0, grad_norm=0.5, update_successful=True, tokens=4096, document_tokens=5000, metrics={"loss": 1.0}
    )
    with MetricsLogger(_run(tmp_path), _parts()) as logger:
        for step in (1, 2, 3, 4):
            logger.log_step(step, result, seconds=0.25)
    with MetricsLogger(_run(tmp_path), _parts(), start_step=2) as logger:
        logger.log_step(3, result, seconds=0.25)
    assert [data[WANDB_STEP] for data, _ in wandb.logged] == [1, 2, 3, 4, 3]
    assert wandb.step_metrics == {WANDB_STEP: None, "*": WANDB_STEP}
