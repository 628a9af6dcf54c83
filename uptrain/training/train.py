"""train(): recipe → (optional convert) → token blocks → model and teacher → the steps (loop.py) → a normal
HF checkpoint with its uptraining record. The package, dependencies pointing one way:

    recipe.py      typed recipe dataclasses, YAML + key=value overrides
    budget.py      steps from α, learning-rate schedule (pure)
    run_folder.py  OUT: what may be written, recipe.yaml, checkpoints, metrics
    setup.py       accelerator, models through uptrain/hf.py, trainable parameters, optimiser
    loop.py        the optimiser steps, evaluation, checkpoints, resume
    train.py       this file: one run, start to end

One code path for one CPU and for many GPUs: `accelerate launch` (DDP, FSDP, DeepSpeed configs in
recipes/accelerate/) decides the distribution; nothing here is home-made distributed code.

    result = uptrain.train("recipes/tiny-cpu.yaml", overrides=["budget.max_steps=20"])

Heavy imports (torch, transformers, accelerate) happen inside `train()` after the recipe and the output
folder were checked, so bad input fails in a fraction of a second. Publishing (`push_to_hub`) is done by
uptrain/api.py after this returns: training knows nothing about the Hub.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from uptrain.errors import UptrainError
from uptrain.training.budget import Budget, resolve_budget
from uptrain.training.recipe import Recipe, load_recipe
from uptrain.training.run_folder import STEP0, plan_output, prepare


@dataclass
class TrainResult:
    out: str
    steps: int  # optimiser steps done, resumed ones included
    total_steps: int  # the budget
    tokens_seen: int
    losses: list[float]  # mean CE per target token of every step (1-based step i → losses[i-1])
    eval_history: list[dict]  # {"step", "loss", "perplexity", "tokens"}
    final_eval: dict | None
    wall_time_s: float  # this invocation
    finished: bool  # False when `budget.stop_at` ended the run early (no final model then)
    history: list[dict] = field(default_factory=list)  # per-step records, as in metrics.jsonl
    resumed_from: int | None = None
    trainable_parameters: int = 0
    process_index: int = 0
    push_to_hub: str | None = None  # the recipe's Hub repo: uptrain.api.train publishes a finished run there

    def summary(self) -> str:
        ev = self.final_eval or (self.eval_history[-1] if self.eval_history else None)
        what = "Uptrained" if self.finished else "Stopped (resume: auto continues)"
        return (f"{what} {self.steps}/{self.total_steps} steps, {self.tokens_seen:,} tokens, "
                f"last loss {self.losses[-1]:.4f}" + (f", held-out perplexity {ev['perplexity']:.2f}" if ev else "")
                + f", {self.wall_time_s:.1f} s → {self.out}")


def train(recipe, overrides: list[str] | None = None, *, tokenizer=None, train_blocks=None, eval_blocks=None,
          teacher=None, progress: bool | None = None) -> TrainResult:
    """Run (or resume) the uptraining a recipe describes; returns the TrainResult on every process.

    recipe: a YAML path, a dict or a Recipe; overrides: ["optim.lr=3e-4", …] applied on top.
    tokenizer / train_blocks / eval_blocks: already-built ones (LongTensor [n, seq_len] from
    uptrain.data), replacing the recipe's data section; teacher: a loaded model instead of distill.teacher.
    Does not publish: `uptrain.train` (uptrain/api.py) pushes a finished run when the recipe says so.
    Callable many times in one process: each call creates its own Accelerator and resets accelerate's
    process-wide state afterwards (single-process runs)."""
    from uptrain.training.setup import make_accelerator, reset_accelerate

    t0 = time.time()
    r = load_recipe(recipe, overrides)
    recipe_file = os.fspath(recipe) if isinstance(recipe, (str, os.PathLike)) else None
    out = Path(r.out)
    mode = plan_output(out, r)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    budget = resolve_budget(r.budget, r.train.micro_batch_size * r.train.grad_accum * world * r.data.seq_len)

    show = r.log.progress if progress is None else progress

    reset_accelerate(world)
    accelerator = make_accelerator(r, out, world)
    try:
        if accelerator.num_processes != world:
            raise UptrainError(f"WORLD_SIZE={world} but accelerate runs {accelerator.num_processes} processes")
        run = _Run(r, out, budget, accelerator, show, recipe_file)
        return run.execute(mode, t0, tokenizer, train_blocks, eval_blocks, teacher)
    finally:
        if r.log.trackers:
            accelerator.end_training()
        accelerator.free_memory()
        reset_accelerate(world)


# ---------------------------------------------------------------------------------------- one run
class _Run:
    """One invocation of train(): everything that can fail on bad input runs before OUT is touched."""

    def __init__(self, r: Recipe, out: Path, budget: Budget, accelerator, show: bool, recipe_file: str | None):
        self.r, self.out, self.budget, self.acc, self.recipe_file = r, out, budget, accelerator, recipe_file
        self.main = accelerator.is_main_process
        self.show = show and self.main

    def say(self, msg: str) -> None:
        if self.main:
            print(msg, flush=True)

    def execute(self, mode, t0, tokenizer, train_blocks, eval_blocks, teacher) -> TrainResult:
        import torch

        from uptrain.arch import check_groups, spec_for_config
        from uptrain.hf import load_model, resolve
        from uptrain.training.loop import Loop
        from uptrain.training.setup import (check_teacher, enable_checkpointing, model_source, model_tokenizer,
                                            trainable_mask)

        r = self.r
        src, cfg = model_source(r.model.path, r.model.revision, "model.path")
        spec = spec_for_config(cfg)
        if r.model.convert:
            check_groups(r.model.convert.groups, spec.kv_heads(cfg), r.model.convert.key("groups"))
        tokenizer = tokenizer or model_tokenizer(src)
        if teacher is not None or r.distill.teacher:
            check_teacher(r, cfg, tokenizer, teacher)
        train_blocks, eval_blocks = self.data(tokenizer, train_blocks, eval_blocks)

        if self.main:
            prepare(self.out, mode, r)
        self.acc.wait_for_everyone()
        if r.model.convert:
            src = resolve(self.convert(), what="the converted model")
        torch.manual_seed(r.train.seed)
        model = load_model(src, r.model.dtype)
        path = src.path
        mask = trainable_mask([n for n, _ in model.named_parameters()], spec, r.train.params)
        for n, p in model.named_parameters():
            p.requires_grad_(mask[n])
        n_train = sum(p.numel() for n, p in model.named_parameters() if mask[n])
        if n_train == 0:
            raise UptrainError(f"train.params={r.train.params} selects no parameter of this {cfg.model_type} model")
        if r.train.gradient_checkpointing:
            enable_checkpointing(model)
        if teacher is None and r.distill.teacher:
            # Frozen: only its logits matter, so it takes the autocast precision (half the memory in bf16).
            half = {"bf16": "bfloat16", "fp16": "float16"}.get(str(self.acc.mixed_precision))
            teacher = load_model(resolve(r.distill.teacher, what="distill.teacher"), half or r.model.dtype)
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            teacher.to(self.acc.device)
        n_all = sum(p.numel() for p in model.parameters())
        self.say(f"uptrain train: {path} ({cfg.model_type}, {spec.layers(cfg)} layers, {spec.heads(cfg)} heads, "
                 f"{spec.kv_heads(model.config)} KV heads); training {r.train.params}: {n_train:,} of {n_all:,} "
                 f"parameters"
                 + (f"; distilling from {r.distill.teacher or 'the given teacher'}" if teacher is not None else ""))
        self.say(f"data: {r.data.source}, {len(train_blocks):,} training blocks and {len(eval_blocks):,} held-out "
                 f"blocks of {r.data.seq_len} tokens")
        self.say(f"budget: {self.budget.text}; {self.acc.num_processes} process(es) × micro-batch "
                 f"{r.train.micro_batch_size} × accumulation {r.train.grad_accum}")
        steps = Loop(r, self.out, self.budget, self.acc, self.show).run(mode, model, teacher, train_blocks,
                                                                        eval_blocks)
        result = TrainResult(
            out=str(self.out), steps=steps.stop, total_steps=self.budget.steps,
            tokens_seen=steps.stop * self.budget.tokens_per_step, losses=[h["loss"] for h in steps.history],
            eval_history=steps.evals, final_eval=steps.final, wall_time_s=time.time() - t0,
            finished=steps.final is not None, history=steps.history, resumed_from=steps.resumed,
            trainable_parameters=n_train, process_index=self.acc.process_index, push_to_hub=r.push_to_hub)
        if result.finished:
            self.save_final(steps.model, tokenizer, path, result)
        self.say(result.summary())
        return result

    def data(self, tokenizer, train_blocks, eval_blocks):
        import torch

        from uptrain.data import token_blocks

        d, t = self.r.data, self.r.train
        kw = dict(cache_dir=d.cache_dir, cache=d.cache, progress=self.show)
        # A streamed corpus is read only as far as the run needs (100B tokens of a bigger corpus); an
        # in-memory one is tokenised whole, so that every epoch shuffles all of it.
        needed = self.budget.steps * t.grad_accum * t.micro_batch_size * self.acc.num_processes
        cap = min(needed, d.max_train_blocks or needed) if d.streaming else d.max_train_blocks
        with self.acc.main_process_first():  # the main process tokenises and caches, the others read
            if train_blocks is None:
                train_blocks = token_blocks(d, tokenizer, d.seq_len, "train", cap, dtype=torch.int32, **kw)
            if eval_blocks is None:
                eval_blocks = token_blocks(d, tokenizer, d.seq_len, "eval", self.r.eval.max_blocks, **kw)
        for name, b in (("train_blocks", train_blocks), ("eval_blocks", eval_blocks)):
            if b.ndim != 2 or b.shape[1] != d.seq_len or b.shape[0] == 0:
                raise UptrainError(f"{name} must be [n ≥ 1, seq_len={d.seq_len}] token ids, got {list(b.shape)}")
        return train_blocks, eval_blocks[: self.r.eval.max_blocks].long()

    def convert(self) -> str:
        """Convert model.path into OUT/step0 on the main process; a step0 converted with the same options is
        kept (resume, or a rerun after a crash)."""
        from uptrain.record import try_read_record

        options, step0 = self.r.model.convert, self.out / STEP0
        if self.main:
            done = try_read_record(step0)
            if not (done and done.conversion and done.conversion.options == options.recorded()):
                from uptrain.conversion import convert

                result = convert(self.r.model.path, str(step0), options=options, overwrite=True,
                                 revision=self.r.model.revision, progress=self.show)
                self.say(result.summary())
        self.acc.wait_for_everyone()
        return str(step0)

    def save_final(self, model, tokenizer, init_path: str, res: TrainResult) -> None:
        """A normal HF checkpoint in OUT; uptrain.json (written last) keeps the init model's records
        (its conversion) and adds this uptraining."""
        from uptrain.record import Record, read_record, write_record

        self.acc.wait_for_everyone()
        state_dict = self.acc.get_state_dict(model)  # gathers FSDP / ZeRO-3 shards
        if self.main:
            self.acc.unwrap_model(model).save_pretrained(self.out, state_dict=state_dict, max_shard_size="5GB")
            tokenizer.save_pretrained(self.out)
            record = read_record(init_path) or Record()
            record.uptraining = self.uptraining_record(res, init_path)
            write_record(self.out, record)
        self.acc.wait_for_everyone()

    def uptraining_record(self, res: TrainResult, init_path: str):
        from uptrain.record import UptrainingRecord

        r, b = self.r, self.budget
        return UptrainingRecord(
            recipe=r.to_dict(), recipe_file=self.recipe_file, base_model=r.model.path, init=init_path,
            data=r.data.source, steps=res.steps, tokens_seen=res.tokens_seen, alpha=b.alpha, budget=b.text,
            params=r.train.params, trainable_parameters=res.trainable_parameters, processes=self.acc.num_processes,
            mixed_precision=str(self.acc.mixed_precision), seq_len=r.data.seq_len, lr=r.optim.lr,
            schedule=r.optim.schedule,
            distillation={"teacher": r.distill.teacher, "weight": r.distill.weight,
                          "temperature": r.distill.temperature} if "kl" in (res.history or [{}])[-1] else None,
            initial_eval=res.eval_history[0] if res.eval_history and res.eval_history[0]["step"] == 0 else None,
            final_eval=res.final_eval, eval_history=res.eval_history,
            first_loss=res.losses[0], last_loss=res.losses[-1], wall_time_s=round(res.wall_time_s, 2),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"))

