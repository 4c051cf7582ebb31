"""The demo's stages (see pipeline.py for the order). Each returns (one-line summary, outputs written)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from dqo_megatron.demo.pipeline import (
    MAX_NEW_TOKENS,
    MODEL,
    SEQ,
    DemoConfig,
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

    def path(self, *parts: str) -> Path:
        """A path inside the run directory."""
        return self.root.joinpath(*parts)

    @property
    def tokenizer(self) -> str:
        return str(self.path("tokenizer.model"))

    def _tokenize_config(self):
        from dqo_megatron.data.tokenize import TokenizeConfig, TokenizerConfig

        return TokenizeConfig(tokenizer=TokenizerConfig(path=self.tokenizer), max_length=SEQ)

    # ------------------------------------------------------------------ data and warm-up
    def make_task(self):
        cfg, task = self.cfg, self.task
        held_out = make_problems(task, cfg.eval_problems + cfg.analysis_problems, seed=10_000 + cfg.seed)
        train = make_problems(task, max(cfg.demonstrations, cfg.rollout_problems), seed=cfg.seed, exclude=set(held_out))
        write_problems(task, held_out[:cfg.eval_problems], self.path("test.jsonl"))
        write_problems(task, held_out[cfg.eval_problems:], self.path("analysis.jsonl"))
        write_problems(task, train[:cfg.rollout_problems], self.path("train.jsonl"))
        _, right = write_demonstrations(task, train[:cfg.demonstrations], self.path("demonstrations.jsonl"),
                                        seed=cfg.seed)  # fmt: skip
        no_carry = sum(task.carries(a, b) == 0 for a, b in held_out[:cfg.eval_problems]) / cfg.eval_problems
        self.measured.update(demonstrations_correct=right, test_without_carry=no_carry)
        return (f"{cfg.demonstrations} demonstrations ({100 * right:.0f}% correct), {cfg.rollout_problems} training "
                f"and {cfg.eval_problems} held-out problems ({100 * no_carry:.0f}% need no carry)",
                {"problems": str(self.path("train.jsonl")), "test": str(self.path("test.jsonl"))})  # fmt: skip

    def make_tokenizer(self):
        import sentencepiece as spm

        problems = make_problems(self.task, 2000, seed=self.cfg.seed + 7)
        train_tokenizer(tokenizer_corpus(self.task, problems), self.tokenizer, vocab_size=MODEL["vocab_size"])
        sp = spm.SentencePieceProcessor(model_file=self.tokenizer)
        sample = self.task.solution(47, 38)
        if sp.decode(sp.encode(sample)) != sample:
            raise RuntimeError("the demo tokenizer does not round-trip the task's text")
        return f"vocabulary {sp.vocab_size()}, a solution is {len(sp.encode(sample))} tokens", {"tokenizer": self.tokenizer}

    def _preprocess(self, records: Path, prefix: Path) -> str:
        from dqo_megatron.data.preprocess import PreprocessConfig, preprocess

        summary = preprocess(PreprocessConfig(inputs=[str(records)], output_prefix=str(prefix),
                                              tokenize=self._tokenize_config(), skip_invalid=True, progress=False))  # fmt: skip
        if summary.written == 0:
            raise RuntimeError(f"preprocess wrote no document from {records}:\n{summary.report()}")
        return f"{summary.written} documents ({summary.skips.total} skipped)"

    def _train(self, name: str, **kwargs) -> Path:
        run_dir = self.path("runs", name)
        config = write_yaml(self.path("configs", f"{name}.yaml"), run_config(self.cfg, run_dir, **kwargs))
        megatron_command(self.cfg, ["train", "-c", str(config)], self.path("logs", f"train_{name}.log"))
        return run_dir

    def warm_up(self):
        self.path("configs").mkdir(exist_ok=True)
        docs = self._preprocess(self.path("demonstrations.jsonl"), self.path("data", "demonstrations"))
        run_dir = self._train("sft", algorithm="sft", train_prefix=str(self.path("data", "demonstrations")),
                              steps=self.cfg.sft_steps, lr=3e-3,
                              extra={"train": {"min_lr": 3e-4, "lr_warmup_steps": 20, "lr_decay_style": "cosine"}})  # fmt: skip
        # the base model as users hold theirs: an HF checkpoint, converted for Megatron with a parity check
        self._export(run_dir, "base")
        single_command(["convert", "hf-to-megatron", str(self.path("hf", "base")), str(self.path("base")), "--verify"],
                       self.path("logs", "convert_base.log"))  # fmt: skip
        losses = [row["loss"] for row in read_metrics(run_dir)]
        self.measured["sft_loss"] = (losses[0], losses[-1])
        return (f"{docs}; loss {losses[0]:.3f} -> {losses[-1]:.3f}; base policy in hf/base, converted to base/",
                {"run": str(run_dir), "hf": str(self.path("hf", "base")), "base": str(self.path("base"))})

    def _export(self, run_dir: Path, name: str) -> Path:
        out = self.path("hf", name)
        single_command(["export", str(latest_checkpoint(run_dir)), str(out), "--verify"],
                       self.path("logs", f"export_{name}.log"))  # fmt: skip
        return out

    # ------------------------------------------------------------------ generation
    def _backend(self, model: str):
        from dqo_megatron.rollout.factory import build_backend

        return build_backend("transformers", model, self.tokenizer, device="cpu", batch_size=256)

    def _rollout(self, problems: Path, output: Path, n: int) -> object:
        from dqo_megatron.rollout.rollout import RolloutConfig, run_rollout

        return run_rollout(RolloutConfig(problems=str(problems), output=str(output), model=str(self.path("hf", "base")),
                                         tokenizer=self.tokenizer, backend="transformers", device="cpu", batch_size=256, task="gsm8k", n=n,
                                         max_new_tokens=MAX_NEW_TOKENS, seed=self.cfg.seed, label=True, problems_per_call=16,
                                         progress=False, **SAMPLING))  # fmt: skip

    def rollout(self):
        s = self._rollout(self.path("train.jsonl"), self.path("rollouts.jsonl"), self.cfg.samples_per_problem)
        self.measured["rollout_accuracy"] = s.correct / max(s.labeled, 1)
        return (f"{s.written} labeled samples ({100 * s.correct / max(s.labeled, 1):.0f}% correct), "
                f"{s.samples_per_s:.0f} samples/s", {"rollouts": str(self.path("rollouts.jsonl"))})  # fmt: skip

    def process_scores(self):
        from dqo_megatron.rollout.process_scores import ProcessScoresConfig, process_scores

        self._rollout(self.path("analysis.jsonl"), self.path("analysis_rollouts.jsonl"), 4)
        backend = self._backend(str(self.path("hf", "base")))
        try:
            s = process_scores(ProcessScoresConfig(inputs=[str(self.path("analysis_rollouts.jsonl"))],
                                                   output=str(self.path("analysis_scored.jsonl")),
                                                   model_id=str(self.path("hf", "base")), splitter="lines",
                                                   num_completions=self.cfg.process_completions,
                                                   max_new_tokens=MAX_NEW_TOKENS, seed=self.cfg.seed,
                                                   progress=False, **SAMPLING), backend)  # fmt: skip
        finally:
            backend.close()
        return s.report().splitlines()[0], {"scored": str(self.path("analysis_scored.jsonl"))}

    # ------------------------------------------------------------------ RL
    def prepare_data(self):
        docs = self._preprocess(self.path("rollouts.jsonl"), self.path("data", "rollouts"))
        config = write_yaml(self.path("configs", "annotate.yaml"),
                            run_config(self.cfg, self.path("runs", "annotate"), algorithm="dqo",
                                       train_prefix=str(self.path("data", "rollouts")), steps=1, lr=0.0,
                                       init_policy=str(self.path("base"))))  # fmt: skip
        megatron_command(self.cfg, ["annotate", "-c", str(config)], self.path("logs", "annotate.log"))
        return f"{docs}, reference log-probs stored", {"prefix": str(self.path("data", "rollouts"))}

    def train_rl(self, algorithm: str):
        cfg = self.cfg
        run_dir = self._train(algorithm, algorithm=algorithm, train_prefix=str(self.path("data", "rollouts")),
                              steps=cfg.rl_steps, lr=cfg.rl_lr, init_policy=str(self.path("base")),
                              extra={"loss": {"beta": cfg.beta}, "data": {"reference": "data"}})  # fmt: skip
        self._export(run_dir, algorithm)
        rows = read_metrics(run_dir)
        self.measured[f"{algorithm}_value_loss"] = (rows[0]["value_loss"], rows[-1]["value_loss"])
        return (f"value loss {rows[0]['value_loss']:.4f} -> {rows[-1]['value_loss']:.4f}, "
                f"KL to reference {rows[-1].get('kl_ref', float('nan')):.4f}",
                {"run": str(run_dir), "checkpoint": str(latest_checkpoint(run_dir))})

    # ------------------------------------------------------------------ eval and analysis
    def models(self) -> dict[str, str]:
        """Name -> HF model directory (base, then each algorithm's exported policy)."""
        return {"base": str(self.path("hf", "base")), **{a.upper(): str(self.path("hf", a)) for a in self.cfg.algorithms}}

    def evaluate(self):
        from dqo_megatron.eval.run import EvalConfig, evaluate

        models = self.models()
        cfg = EvalConfig(models=list(models.values()), names=list(models), output_dir=str(self.path("eval")),
                         datasets=[f"addition={self.path('test.jsonl')}"], max_new_tokens=MAX_NEW_TOKENS,
                         seed=self.cfg.seed, progress=False, **SAMPLING)  # fmt: skip
        results = evaluate(cfg, self._backend)
        acc = {name: {dec: results.scores[name]["addition"][dec].accuracy for dec in ("greedy", "sample")}
               for name in models}  # fmt: skip
        self.measured["accuracy"] = acc
        line = ", ".join(f"{n} {100 * a['greedy']:.1f}/{100 * a['sample']:.1f}" for n, a in acc.items())
        return f"greedy/sampled accuracy %: {line}", {"table": str(self.path("eval", "results.md"))}

    def value_analysis(self):
        from dqo_megatron.analysis.value_analysis import ValueAnalysisConfig, run_value_analysis

        ckpts = [str(latest_checkpoint(self.path("runs", a))) for a in self.cfg.algorithms]
        rows = run_value_analysis(ValueAnalysisConfig(checkpoints=ckpts, records=[str(self.path("analysis_scored.jsonl"))],
                                                      tokenize=self._tokenize_config(),
                                                      out_dir=str(self.path("value_analysis")), skip_invalid=True))  # fmt: skip
        self.measured["value_analysis"] = rows
        parts = []
        for algo, row in zip(self.cfg.algorithms, rows):
            r = row.get("pearson")
            parts.append(f"{algo.upper()}: Pearson {r:.2f} over {row['n']} steps" if isinstance(r, float)
                         else f"{algo.upper()}: undefined ({row.get('undefined_reason')})")  # fmt: skip
        return "; ".join(parts), {"dir": str(self.path("value_analysis"))}

    def report(self, seconds: float, done: list):
        from dqo_megatron.demo.report import write_report

        paths = write_report(self, seconds, done)
        return f"wrote {', '.join(Path(p).name for p in paths)}", {"files": [str(p) for p in paths]}

    def results(self, done: list, seconds: float) -> dict:
        """Everything measured, JSON-able."""
        return {"config": asdict(self.cfg), "status": "done", "seconds": seconds, "measured": self.measured,
                "stages": [{"name": s.name, "seconds": s.seconds, "summary": s.summary, "outputs": s.outputs}
                           for s in done]}  # fmt: skip


