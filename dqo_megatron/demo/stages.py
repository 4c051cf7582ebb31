"""The demo's stages (pipeline.py runs them in order). Each returns (one-line summary, outputs written)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from dqo_megatron.demo.config import ROWS, VOCAB, DemoConfig
from dqo_megatron.demo.report import describe_value_row, write_report
from dqo_megatron.demo.runs import (
    latest_checkpoint,
    megatron_command,
    read_metrics,
    run_config,
    single_command,
    write_yaml,
)
from dqo_megatron.demo.task import (
    AdditionTask,
    make_problems,
    sequence_lengths,
    tokenizer_corpus,
    train_tokenizer,
    write_demonstrations,
    write_problems,
)

# the paper's sampling settings for data (top_p 0.9, top_k 16) at temperature 1
SAMPLING = dict(temperature=1.0, top_p=0.9, top_k=16)


@dataclass
class Context:
    """State shared by the stages: paths, and what earlier stages measured."""

    cfg: DemoConfig
    root: Path
    task: AdditionTask
    measured: dict = field(default_factory=dict)
    seq: int = 0
    """Tokens per training row (set by the tokenizer stage from the task's longest prompt and answer)."""
    max_new: int = 0
    """Longest generated answer in tokens, EOS included (likewise)."""

    def path(self, *parts: str) -> Path:
        """A path inside the run directory."""
        return self.root.joinpath(*parts)

    @property
    def tokenizer(self) -> str:
        """The demo tokenizer (a sentencepiece model in the run directory)."""
        return str(self.path("tokenizer.model"))

    def _tokenize_config(self):
        from dqo_megatron.data.tokenize import TokenizeConfig, TokenizerConfig

        return TokenizeConfig(tokenizer=TokenizerConfig(path=self.tokenizer), max_length=self.seq + 1)

    # ------------------------------------------------------------------ data and warm-up
    def make_task(self):
        """Stage `task`: held-out splits, training problems and imperfect demonstrations."""
        cfg, task = self.cfg, self.task
        held = (cfg.eval_problems, cfg.validation_problems, cfg.analysis_problems)
        held_out = make_problems(task, sum(held), seed=10_000 + cfg.seed)
        train = make_problems(task, max(cfg.demonstrations, cfg.rollout_problems), seed=cfg.seed, exclude=set(held_out))
        test, validation, analysis = (
            held_out[: held[0]],
            held_out[held[0] : held[0] + held[1]],
            held_out[held[0] + held[1] :],
        )
        write_problems(task, test, self.path("test.jsonl"))
        write_problems(task, validation, self.path("validation.jsonl"))
        write_problems(task, analysis, self.path("analysis.jsonl"))
        write_problems(task, train[: cfg.rollout_problems], self.path("train.jsonl"))
        _, right = write_demonstrations(
            task, train[: cfg.demonstrations], self.path("demonstrations.jsonl"), seed=cfg.seed
        )
        no_carry = sum(task.carries(a, b) == 0 for a, b in test) / len(test)
        self.measured.update(demonstrations_correct=right, test_without_carry=no_carry)
        return (
            f"{cfg.demonstrations} demonstrations ({100 * right:.0f}% correct), {cfg.rollout_problems} training, "
            f"{len(validation)} validation and {len(test)} test problems ({100 * no_carry:.0f}% need no carry)",
            {"problems": str(self.path("train.jsonl")), "test": str(self.path("test.jsonl"))},
        )

    def make_tokenizer(self):
        """Stage `tokenizer`: a BPE model of the task's text; row and answer lengths from it."""
        import sentencepiece as spm

        problems = make_problems(self.task, 2000, seed=self.cfg.seed + 7)
        train_tokenizer(tokenizer_corpus(self.task, problems), self.tokenizer, vocab_size=VOCAB)
        sp = spm.SentencePieceProcessor(model_file=self.tokenizer)
        largest = 10**self.task.digits - 1
        sample = self.task.solution(largest, largest)
        if sp.decode(sp.encode(sample)) != sample:
            raise RuntimeError("the demo tokenizer does not round-trip the task's text")
        self.seq, self.max_new = sequence_lengths(self.task, sp)
        self.measured.update(seq_length=self.seq, max_new_tokens=self.max_new)
        return (
            f"vocabulary {sp.vocab_size()}, the longest solution is {len(sp.encode(sample))} tokens; rows of "
            f"{self.seq} tokens, answers up to {self.max_new}",
            {"tokenizer": self.tokenizer},
        )

    def _preprocess(self, records: Path, prefix: Path) -> str:
        from dqo_megatron.data.preprocess import PreprocessConfig, preprocess

        summary = preprocess(
            PreprocessConfig(
                inputs=[str(records)],
                output_prefix=str(prefix),
                tokenize=self._tokenize_config(),
                skip_invalid=True,
                progress=False,
            )
        )
        if summary.written == 0:
            raise RuntimeError(f"preprocess wrote no document from {records}:\n{summary.report()}")
        return f"{summary.written} documents ({summary.skips.total} skipped)"

    def _train(self, name: str, **kwargs) -> Path:
        run_dir = self.path("runs", name)
        config = write_yaml(self.path("configs", f"{name}.yaml"), run_config(self.cfg, run_dir, seq=self.seq, **kwargs))
        megatron_command(self.cfg, ["train", "-c", str(config)], self.path("logs", f"train_{name}.log"))
        return run_dir

    def warm_up(self):
        """Stage `warm-up`: SFT from random init, exported to HF and converted back: the base policy."""
        self.path("configs").mkdir(exist_ok=True)
        docs = self._preprocess(self.path("demonstrations.jsonl"), self.path("data", "demonstrations"))
        run_dir = self._train(
            "sft",
            algorithm="sft",
            train_prefix=str(self.path("data", "demonstrations")),
            steps=self.cfg.sft_steps,
            lr=3e-3,
            extra={"train": {"min_lr": 3e-4, "lr_warmup_steps": 20, "lr_decay_style": "cosine"}},
        )
        # the base model as users hold theirs: an HF checkpoint, converted for Megatron with a parity check
        self._export(run_dir, "base")
        single_command(
            ["convert", "hf-to-megatron", str(self.path("hf", "base")), str(self.path("base")), "--verify"],
            self.path("logs", "convert_base.log"),
        )
        losses = [row["loss"] for row in read_metrics(run_dir)]
        self.measured["sft_loss"] = (losses[0], losses[-1])
        return (
            f"{docs}; loss {losses[0]:.3f} -> {losses[-1]:.3f}; base policy in hf/base, converted to base/",
            {"run": str(run_dir), "hf": str(self.path("hf", "base")), "base": str(self.path("base"))},
        )

    def _export(self, run_dir: Path, name: str) -> Path:
        return self._export_checkpoint(latest_checkpoint(run_dir), name)

    def _export_checkpoint(self, checkpoint: Path, name: str) -> Path:
        # the sentencepiece model goes along as an HF tokenizer with the same ids: hf/<name> alone is a model
        # that plain transformers runs (the warm-up's run has no init checkpoint to take a tokenizer from)
        out = self.path("hf", name)
        single_command(
            ["export", str(checkpoint), str(out), "--verify", "--tokenizer", self.tokenizer],
            self.path("logs", f"export_{name}.log"),
        )
        return out

    # ------------------------------------------------------------------ generation
    def _backend(self, model: str):
        from dqo_megatron.rollout.factory import build_backend

        return build_backend("transformers", model, self.tokenizer, device="cpu", batch_size=256)

    def _rollout(self, problems: Path, output: Path, n: int) -> object:
        from dqo_megatron.rollout.config import RolloutConfig
        from dqo_megatron.rollout.rollout import run_rollout

        return run_rollout(
            RolloutConfig(
                problems=str(problems),
                output=str(output),
                model=str(self.path("hf", "base")),
                tokenizer=self.tokenizer,
                backend="transformers",
                device="cpu",
                batch_size=256,
                task="gsm8k",
                n=n,
                max_new_tokens=self.max_new,
                seed=self.cfg.seed,
                label=True,
                problems_per_call=16,
                progress=False,
                **SAMPLING,
            )
        )

    def rollout(self):
        """Stage `rollout`: N labeled samples per training problem from the base policy."""
        s = self._rollout(self.path("train.jsonl"), self.path("rollouts.jsonl"), self.cfg.samples_per_problem)
        self.measured["rollout_accuracy"] = s.correct / max(s.labeled, 1)
        return (
            f"{s.written} labeled samples ({100 * s.correct / max(s.labeled, 1):.0f}% correct), "
            f"{s.samples_per_s:.0f} samples/s",
            {"rollouts": str(self.path("rollouts.jsonl"))},
        )

    def _score(self, records: Path, output: Path, backend):
        from dqo_megatron.process_scores import ProcessScoresConfig, process_scores

        return process_scores(
            ProcessScoresConfig(
                inputs=[str(records)],
                output=str(output),
                model_id=str(self.path("hf", "base")),
                splitter="lines",
                num_completions=self.cfg.process_completions,
                assign="every_correct",
                step_reward=self.cfg.step_reward,
                max_new_tokens=self.max_new,
                seed=self.cfg.seed,
                progress=False,
                **SAMPLING,
            ),
            backend,
        )

    def process_scores(self):
        """Stage `process scores`: step rewards of the failed training answers and of held-out answers."""
        self._rollout(self.path("analysis.jsonl"), self.path("analysis_rollouts.jsonl"), 4)
        backend = self._backend(str(self.path("hf", "base")))
        try:  # the training rollouts (the paper's DQO + process scores) and the held-out answers (analysis)
            train = self._score(self.path("rollouts.jsonl"), self.path("rollouts_scored.jsonl"), backend)
            held = self._score(self.path("analysis_rollouts.jsonl"), self.path("analysis_scored.jsonl"), backend)
        finally:
            backend.close()
        self.measured["process_scores"] = {
            "train_rewarded": train.rewarded_records,
            "heldout_rewarded": held.rewarded_records,
        }
        return (
            f"training answers: {train.rewarded_records} failed ones got step rewards; held-out: "
            f"{held.rewarded_records}",
            {"scored": str(self.path("rollouts_scored.jsonl")), "analysis": str(self.path("analysis_scored.jsonl"))},
        )

    # ------------------------------------------------------------------ RL
    def _annotate(self, prefix: Path, name: str) -> None:
        config = write_yaml(
            self.path("configs", f"annotate_{name}.yaml"),
            run_config(
                self.cfg,
                self.path("runs", f"annotate_{name}"),
                seq=self.seq,
                algorithm="dqo",
                train_prefix=str(prefix),
                steps=1,
                lr=0.0,
                init_policy=str(self.path("base")),
            ),
        )
        megatron_command(self.cfg, ["annotate", "-c", str(config)], self.path("logs", f"annotate_{name}.log"))

    def prepare_data(self):
        """Stage `data`: preprocess the rollouts (with and without process scores); reference log-probs."""
        docs = self._preprocess(self.path("rollouts.jsonl"), self.path("data", "rollouts"))
        self._annotate(self.path("data", "rollouts"), "rollouts")
        outputs = {"prefix": str(self.path("data", "rollouts"))}
        if "dqo_ps" in self.cfg.algorithms:
            self._preprocess(self.path("rollouts_scored.jsonl"), self.path("data", "rollouts_ps"))
            self._annotate(self.path("data", "rollouts_ps"), "rollouts_ps")
            outputs["prefix_ps"] = str(self.path("data", "rollouts_ps"))
        return f"{docs}, reference log-probs stored", outputs

    def train_rl(self, name: str):
        """Stage `DRO`/`DQO`/`DQO+PS`: train from the base policy; export the checkpoint validation picks."""
        cfg = self.cfg
        data = self.path("data", "rollouts_ps" if name == "dqo_ps" else "rollouts")
        evaluation = {
            "problems": str(self.path("validation.jsonl")),
            "interval": cfg.eval_interval,
            "task": "gsm8k",
            "tokenizer": self.tokenizer,
            "max_new_tokens": self.max_new,
        }
        steps = cfg.value_warmup_steps + cfg.rl_steps
        keep = cfg.rl_steps // cfg.eval_interval + 2  # every evaluated step survives: the value trend reads them
        train = {"keep_last_checkpoints": keep}
        single = cfg.tp * cfg.pp == 1
        if not single:  # the in-training evaluator needs TP = PP = 1: save every interval, evaluate afterwards
            evaluation["interval"] = 0
            train = {"save_interval": cfg.eval_interval, "keep_last_checkpoints": steps // cfg.eval_interval + 2}
        extra = {
            "loss": {"beta": cfg.beta},
            "data": {"reference": "data"},
            "eval": evaluation,
            "train": train,
            "value": {"lr_ratio": cfg.value_lr_ratio, "warmup_steps": cfg.value_warmup_steps},
        }
        algorithm = "dqo" if name == "dqo_ps" else name
        run_dir = self._train(
            name,
            algorithm=algorithm,
            train_prefix=str(data),
            steps=steps,
            lr=cfg.rl_lr,
            init_policy=str(self.path("base")),
            extra=extra,
        )
        from dqo_megatron.training.evals import best_evaluation, read_evaluations

        if not single:
            self._validate_checkpoints(run_dir)
        evaluations = read_evaluations(run_dir)
        best = best_evaluation(evaluations)
        self._export_checkpoint(Path(best.checkpoint), name)
        rows = read_metrics(run_dir)
        self.measured[f"{name}_selection"] = {
            "validation": {e.step: e.accuracy for e in evaluations},
            "picked_step": best.step,
            "picked_checkpoint": best.checkpoint,
        }
        self.measured[f"{name}_value_loss"] = (rows[0]["value_loss"], rows[-1]["value_loss"])
        last = rows[-1]
        return (
            f"validation greedy accuracy {100 * evaluations[0].accuracy:.0f}% -> best {100 * best.accuracy:.0f}% at "
            f"step {best.step}; value explained variance {last.get('value_explained_var', float('nan')):.2f}, "
            f"KL to reference {last.get('kl_ref', float('nan')):.4f}",
            {"run": str(run_dir), "checkpoint": best.checkpoint},
        )

    def _validate_checkpoints(self, run_dir: Path) -> None:
        """Greedy validation accuracy of each saved checkpoint from the policy's first step on, read at
        TP = PP = 1 by the megatron backend (whatever layout trained it): `evals.jsonl` as the trainer
        writes it, for layouts its in-training evaluator does not support."""
        import time

        from dqo_megatron.eval.during_training import greedy_correct
        from dqo_megatron.rollout.megatron_backend import MegatronBackend
        from dqo_megatron.tasks.datasets import load_problems
        from dqo_megatron.training.checkpointing import list_checkpoints
        from dqo_megatron.training.evals import Evaluation, append_evaluation

        problems = load_problems(self.path("validation.jsonl"), task="gsm8k")
        for step, path in list_checkpoints(run_dir / "checkpoints"):
            if step < self.cfg.value_warmup_steps:
                continue
            started = time.perf_counter()
            backend = MegatronBackend(str(path), self.tokenizer)
            try:
                correct = greedy_correct(backend, problems, self.max_new)
            finally:
                backend.close()
            append_evaluation(
                run_dir,
                Evaluation(
                    step, correct / len(problems), correct, len(problems), time.perf_counter() - started, str(path)
                ),
            )

    # ------------------------------------------------------------------ eval and analysis
    def models(self) -> dict[str, str]:
        """Name -> HF model directory (base, then each algorithm's exported policy)."""
        return {"base": str(self.path("hf", "base")), **{ROWS[a]: str(self.path("hf", a)) for a in self.cfg.algorithms}}

    def evaluate(self):
        """Stage `eval`: base and the trained rows on the test problems, greedy and sampled."""
        from dqo_megatron.eval.config import EvalConfig
        from dqo_megatron.eval.run import evaluate

        models = self.models()
        cfg = EvalConfig(
            models=list(models.values()),
            names=list(models),
            output_dir=str(self.path("eval")),
            datasets=[f"addition={self.path('test.jsonl')}"],
            max_new_tokens=self.max_new,
            seed=self.cfg.seed,
            progress=False,
            **SAMPLING,
        )
        results = evaluate(cfg, self._backend)
        acc = {
            name: {dec: results.scores[name]["addition"][dec].accuracy for dec in ("greedy", "sample")}
            for name in models
        }
        self.measured["accuracy"] = acc
        line = ", ".join(f"{n} {100 * a['greedy']:.1f}/{100 * a['sample']:.1f}" for n, a in acc.items())
        return f"greedy/sampled accuracy %: {line}", {"table": str(self.path("eval", "results.md"))}

    def value_analysis(self):
        """Stage `value analysis`: each run's values against the held-out answers' process scores."""
        from dqo_megatron.analysis.value_analysis import ValueAnalysisConfig, run_value_analysis
        from dqo_megatron.training.checkpointing import list_checkpoints

        # every evaluated checkpoint of each run (the trend), the picked one reported
        ckpts = [
            str(p)
            for a in self.cfg.algorithms
            for step, p in list_checkpoints(self.path("runs", a, "checkpoints"))
            if step >= self.cfg.value_warmup_steps
        ]
        rows = run_value_analysis(
            ValueAnalysisConfig(
                checkpoints=ckpts,
                records=[str(self.path("analysis_scored.jsonl"))],
                tokenize=self._tokenize_config(),
                out_dir=str(self.path("value_analysis")),
                skip_invalid=True,
            )
        )
        picked, trend, parts = [], {}, []
        for algo in self.cfg.algorithms:
            run_dir = self.path("runs", algo).resolve()
            mine = sorted(
                (r for r in rows if Path(r["checkpoint"]).resolve().parent.parent == run_dir),
                key=lambda r: r.get("step") or 0,
            )
            trend[ROWS[algo]] = [value_summary(r) for r in mine]
            chosen = Path(self.measured[f"{algo}_selection"]["picked_checkpoint"]).resolve()
            row = next(value_summary(r) for r in mine if Path(r["checkpoint"]).resolve() == chosen)
            row["label"] = ROWS[algo]
            picked.append(row)
            parts.append(describe_value_row(row))
        self.measured["value_analysis"] = picked
        self.measured["value_trend"] = trend
        return "; ".join(parts), {"dir": str(self.path("value_analysis"))}

    def report(self, seconds: float, done: list):
        """Stage `report`: report.md and training_curves.png."""
        paths = write_report(self, seconds, done)
        return f"wrote {', '.join(Path(p).name for p in paths)}", {"files": [str(p) for p in paths]}

    def results(self, done: list, seconds: float) -> dict:
        """Everything measured, JSON-able."""
        return {
            "config": asdict(self.cfg),
            "status": "done",
            "seconds": seconds,
            "measured": self.measured,
            "stages": [
                {"name": s.name, "seconds": s.seconds, "summary": s.summary, "outputs": s.outputs} for s in done
            ],
        }


def value_summary(row: dict) -> dict:
    """The numbers of one value-analysis row the demo reports: per-step Pearson (token-level values), the
    mean drop at the first unsolvable step, the mean change over steps that stay solvable, and V(s0) vs
    the prompts' success rate (all rows; the only number for DRO, whose V is trained at the prompt only)."""
    drop = row.get("drop") or {}
    first, solvable = drop.get("first_unsolvable") or {}, drop.get("solvable") or {}
    initial = row.get("initial") or {}
    return {
        "step": row.get("step"),
        "algorithm": row.get("algorithm"),
        "value_target": row.get("value_target"),
        "pearson": row.get("pearson"),
        "steps": row.get("n"),
        "drop": first.get("mean"),
        "drops": first.get("n"),
        "solvable_change": solvable.get("mean"),
        "initial_pearson": initial.get("pearson"),
        "reason": row.get("reason") or row.get("undefined_reason"),
    }
