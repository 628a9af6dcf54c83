"""train(): recipe → (optional convert) → token blocks → model and teacher → the steps (loop.py) → a normal
HF checkpoint with its uptraining record. The package, dependencies pointing one way:

    recipe.py      typed recipe dataclasses, YAML + key=value overrides
    budget.py      steps from α, learning-rate schedule (pure)
    run_folder.py  OUT: what may be written, recipe.yaml, checkpoints, metrics
    setup.py       accelerator, models through uptrain/hf.py, trainable parameters, optimiser
    preflight.py   what the end of a run needs, checked before step 1: OUT writable, free disk, a saveable
                   (not quantized) model, push_to_hub's repo id and token
    preemption.py  SIGTERM / SIGINT → every rank stops after the same step with a checkpoint (exit 75)
    data_stream.py streamed data: each rank reads, tokenises and packs its own part; its exact position
    document_masking.py  data.packing: document, checked on the model before step 1
    objectives.py  what the steps optimise: next-token prediction, or span corruption for an encoder-decoder
    loop.py        the optimiser steps, evaluation, checkpoints, resume
    keep_best.py   eval.keep_best: the state of the lowest held-out loss (the start included) is what is saved
    train.py       this file: one run, start to end
    plan.py        `uptrain plan`: FLOPs, memory per GPU and GPU-hours of a recipe, from its config alone

One code path for one CPU and for many GPUs: `accelerate launch` (DDP, FSDP, DeepSpeed configs in
recipes/accelerate/) decides the distribution; nothing here is home-made distributed code (on CPU ranks,
setup.shard_on_cpu only tells accelerate to take its own FSDP2 path, which it otherwise keeps for GPUs).

    result = uptrain.train("recipes/tiny-cpu.yaml", overrides=["budget.max_steps=20"])

Heavy imports (torch, transformers, accelerate) happen inside `train()` after the recipe and the output
folder were checked, so bad input fails in a fraction of a second. Publishing (`push_to_hub`) is done by
uptrain/api.py after this returns: training knows nothing about the Hub.
"""
from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from uptrain.errors import UptrainError
from uptrain.training.budget import Budget, resolve_budget
from uptrain.training.recipe import Recipe, load_recipe, params_text
from uptrain.training.preemption import StopSignal, signal_name
from uptrain.training.preflight import preflight, step0_reusable
from uptrain.training.run_folder import (CURVES, RECIPE, STEP0, latest_checkpoint, passed_over, plan_output,
                                         prepare, resumable_checkpoint)

FINAL_TMP = ".final-save.tmp"  # the final model is written here, then moved into OUT
# The record's name for each objective (objectives.py's `name` is the prose the log prints).
OBJECTIVE_KEYS = {"causal language modelling": "causal-lm", "span corruption": "span-corruption"}


@dataclass
class TrainResult:
    out: str
    steps: int  # optimiser steps done, resumed ones included
    total_steps: int  # the budget
    tokens_seen: int
    losses: list[float]  # mean CE per target token of every step (1-based step i → losses[i-1])
    eval_history: list[dict]  # {"step", "loss", "perplexity", "tokens"}
    final_eval: dict | None  # of the saved model: the last step's, or the earlier state keep_best kept
    wall_time_s: float  # this invocation
    finished: bool  # False when `budget.stop_at` ended the run early (no final model then)
    history: list[dict] = field(default_factory=list)  # per-step records, as in metrics.jsonl
    resumed_from: int | None = None
    trainable_parameters: int = 0
    process_index: int = 0
    push_to_hub: str | None = None  # the recipe's Hub repo: uptrain.api.train publishes a finished run there
    kept_step: int | None = None  # keep_best saved the state after this step (0: the start) instead of the last

    def summary(self) -> str:
        ev = self.final_eval or (self.eval_history[-1] if self.eval_history else None)
        what = "Uptrained" if self.finished else "Stopped (resume: auto continues)"
        kept = ("" if self.kept_step is None else " (the start's, kept by keep_best)" if self.kept_step == 0
                else f" (the state after step {self.kept_step}, kept by keep_best)")
        return (f"{what} {self.steps}/{self.total_steps} steps, {self.tokens_seen:,} tokens, "
                f"last loss {self.losses[-1]:.4f}"
                + (f", held-out perplexity {ev['perplexity']:.2f}{kept}" if ev else "")
                + f", {self.wall_time_s:.1f} s → {self.out}")


def train(recipe, overrides: list[str] | None = None, *, keys: dict | None = None, tokenizer=None, train_blocks=None,
          eval_blocks=None, teacher=None, progress: bool | None = None) -> TrainResult:
    """Run (or resume) the uptraining a recipe describes; returns the TrainResult on every process.

    recipe: a YAML path, a dict, a Recipe or None; keys: top-level recipe keys and sections ({"optim": {"lr":
    3e-4}}) applied on top, then overrides: ["optim.lr=3e-4", …].
    tokenizer / train_blocks / eval_blocks: already-built ones (LongTensor [n, seq_len] from
    uptrain.data), replacing the recipe's data section; teacher: a loaded model instead of distill.teacher.
    Does not publish: `uptrain.train` (uptrain/api.py) pushes a finished run when the recipe says so.
    Callable many times in one process: each call creates its own Accelerator and resets accelerate's
    process-wide state afterwards (single-process runs)."""
    from uptrain.training.setup import make_accelerator, reset_accelerate

    t0 = time.time()
    r = load_recipe(recipe, overrides, keys)
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
        """torchtune's recipe shape: check and set up (model, data, teacher), train, save."""
        src, cfg, spec, tokenizer, checked = self.check(mode, tokenizer, teacher)
        objective, train_blocks, eval_blocks = self.setup_data(cfg, tokenizer, train_blocks, eval_blocks)
        if self.main:
            prepare(self.out, mode, self.r)
        self.acc.wait_for_everyone()
        model, path, n_train = self.setup_model(src, cfg, spec, checked)
        teacher = self.setup_teacher(teacher)
        self.announce(model, path, cfg, spec, n_train, teacher, train_blocks, eval_blocks, objective)
        return self.train(mode, t0, model, teacher, train_blocks, eval_blocks, objective, tokenizer, path, n_train)

    def check(self, mode, tokenizer, teacher):
        """Everything that can fail on bad input, before OUT is touched: (source, config, spec, tokenizer,
        preflight's findings)."""
        from uptrain.arch import spec_for_config
        from uptrain.training.setup import (check_teacher, checkpoint_dtype, model_parameter_names, model_source,
                                            model_tokenizer, trainable_mask)

        r = self.r
        src, cfg = model_source(r.model.path, r.model.revision, "model.path")
        spec = spec_for_config(cfg)
        if r.model.convert:
            r.model.convert.check_source(spec, cfg)
        tokenizer = tokenizer or model_tokenizer(src)
        if teacher is not None or r.distill.teacher:
            check_teacher(r, cfg, tokenizer, teacher)
        elif r.distill.hidden_weight > 0:
            raise UptrainError("distill.hidden_weight compares the model's layers with a teacher's, and there is no "
                               "teacher: set distill.teacher (typically the source model), or hidden_weight: 0")
        elif r.distill.ce_weight == 0:
            raise UptrainError("distill.ce_weight 0 trains on the teacher's distribution alone, and there is no "
                               "teacher: set distill.teacher (typically the source model), or ce_weight > 0")
        # The dtype of the saved model: the source's (a conversion keeps it in step0) unless train.save_dtype.
        self.save_dtype = r.train.save_dtype or checkpoint_dtype(src, cfg) or r.model.dtype
        checked = self.on_main(lambda: preflight(r, self.out, mode, src, spec, spec.kv_heads(cfg), self.budget.steps,
                                                 self.save_dtype, str(self.acc.distributed_type)))
        if not isinstance(r.train.params, str):  # glob patterns: each must name a parameter of the model
            names = model_parameter_names(src, cfg)
            if names is not None:
                trainable_mask(names, spec, r.train.params)
        for note in checked.notes:
            self.say(note)
        if mode == "restart" and resumable_checkpoint(self.out)[1]:
            self.say(passed_over(resumable_checkpoint(self.out)[1], None))
        return src, cfg, spec, tokenizer, checked

    def setup_data(self, cfg, tokenizer, train_blocks, eval_blocks):
        """(objective, training blocks or stream, the objective's held-out set)."""
        from uptrain.training.objectives import objective_for

        objective = objective_for(cfg, tokenizer, self.r.data, self.r.train.seed)  # span corruption: enc-dec
        self.objective = OBJECTIVE_KEYS.get(objective.name, objective.name)
        train_blocks, eval_blocks = self.data(tokenizer, train_blocks, eval_blocks, objective.block_len)
        return objective, train_blocks, objective.eval_set(eval_blocks)

    def setup_model(self, src, cfg, spec, checked):
        """(model with its trainable parameters marked, the folder it was loaded from, trainable count); the
        recipe's conversion runs first when it has one."""
        import torch

        from uptrain.hf import load_model, resolve
        from uptrain.training.setup import enable_checkpointing, trainable_mask

        r = self.r
        if r.model.convert:
            src = resolve(self.convert(), what="the converted model")
        torch.manual_seed(r.train.seed)
        model = load_model(src, r.model.dtype, drop_quantization_config=checked.drop_quantization_config)
        mask = trainable_mask([n for n, _ in model.named_parameters()], spec, r.train.params)
        for n, p in model.named_parameters():
            p.requires_grad_(mask[n])
        n_train = sum(p.numel() for n, p in model.named_parameters() if mask[n])
        if n_train == 0:
            raise UptrainError(f"train.params={params_text(r.train.params)} selects no parameter of this "
                               f"{cfg.model_type} model")
        if r.train.gradient_checkpointing:
            enable_checkpointing(model)
        if r.data.packing == "document":  # a model that would attend across documents fails here, before step 1
            from uptrain.training.document_masking import check_document_masking

            self.on_main(lambda: check_document_masking(model, model.device))
        return model, src.path, n_train

    def setup_teacher(self, teacher):
        """The distillation teacher, frozen on the device (None without one)."""
        from uptrain.hf import load_model, resolve

        r = self.r
        if teacher is None and r.distill.teacher:
            # Frozen: only its logits matter, so it takes the autocast precision (half the memory in bf16).
            half = {"bf16": "bfloat16", "fp16": "float16"}.get(str(self.acc.mixed_precision))
            teacher = load_model(resolve(r.distill.teacher, what="distill.teacher"), half or r.model.dtype)
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            teacher.to(self.acc.device)
        return teacher

    def announce(self, model, path, cfg, spec, n_train, teacher, train_blocks, eval_blocks, objective) -> None:
        from uptrain.arch import kv_heads_text, spec_for_config
        from uptrain.training.setup import attention_patterns, strategy_text

        r = self.r
        n_all = sum(p.numel() for p in model.parameters())
        self.say(f"uptrain train: {path} ({cfg.model_type}, {spec.layers(cfg)} layers, {spec.heads(cfg)} heads, "
                 f"{kv_heads_text(spec_for_config(model.config).kv_heads(model.config))} KV heads); training "
                 f"{params_text(r.train.params)}"
                 + (f" ({', '.join(attention_patterns(spec))})" if r.train.params == "attention" else "")
                 + f": {n_train:,} of {n_all:,} parameters"
                 + (f"; distilling from {r.distill.teacher or 'the given teacher'}" if teacher is not None else ""))
        self.say(self.data_text(train_blocks, eval_blocks) + f"; objective: {objective.name}")
        self.say(f"budget: {self.budget.text}; {self.acc.num_processes} process(es) × micro-batch "
                 f"{r.train.micro_batch_size} × accumulation {r.train.grad_accum}")
        self.say(f"strategy: {strategy_text(self.acc)}; the final model is saved in {self.save_dtype} ("
                 + ("train.save_dtype)" if r.train.save_dtype else "the dtype of the checkpoint it starts from)"))

    def train(self, mode, t0, model, teacher, train_blocks, eval_blocks, objective, tokenizer, path,
              n_train) -> TrainResult:
        """The steps, then the final save of a finished run."""
        from uptrain.training.loop import Loop

        r = self.r
        # SIGTERM / SIGINT from here on: the loop stops every rank after the current optimiser step with a
        # checkpoint; one that comes after the last step lets the final save finish.
        with StopSignal() as stop:
            loop = Loop(r, self.out, self.budget, self.acc, self.show, stop)
            steps = loop.run(mode, model, teacher, train_blocks, eval_blocks, objective)
            result = TrainResult(
                out=str(self.out), steps=steps.stop, total_steps=self.budget.steps,
                tokens_seen=steps.stop * self.budget.tokens_per_step, losses=[h["loss"] for h in steps.history],
                eval_history=steps.evals, final_eval=steps.kept.eval if steps.kept else steps.final,
                wall_time_s=time.time() - t0, finished=steps.final is not None, history=steps.history,
                resumed_from=steps.resumed, trainable_parameters=n_train, process_index=self.acc.process_index,
                push_to_hub=r.push_to_hub, kept_step=steps.kept.step if steps.kept else None)
            if result.finished:
                self.save_final(steps, tokenizer, path, result, loop)
        if stop.signum:  # came after the last step's check: the run finished rather than stopping at the end
            self.say(f"note: {signal_name(stop.signum)} arrived after the last step; the final save was finished")
        self.say(result.summary())
        return result

    def on_main(self, check):
        """check() on the main process; its result, or its UptrainError, on every process (a check that failed
        on one rank only would leave the others waiting in the next collective)."""
        box, error = [None, None], None
        if self.main:
            try:
                box[0] = check()
            except UptrainError as e:
                box[1], error = str(e), e
        if self.acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(box)
        if error is not None:
            raise error
        if box[1] is not None:
            raise UptrainError(box[1])
        return box[0]

    def data(self, tokenizer, train_blocks, eval_blocks, block_len: int):
        """Training and held-out token blocks of `block_len` tokens (data.seq_len, or the raw block span
        corruption turns into an input of data.seq_len)."""
        import torch

        from uptrain.data import token_blocks

        d, t = self.r.data, self.r.train
        kw: dict[str, Any] = dict(cache_dir=d.cache_dir, cache=d.cache, progress=self.show, seed=t.seed)
        if d.streaming and train_blocks is None:
            # Every rank reads, tokenises and packs its own part of the stream as the steps need it: nothing
            # of the budget is read before step 1, and no rank waits for another.
            from uptrain.training.data_stream import PackedStream, StreamLoader

            acc = self.acc
            train_blocks = StreamLoader(PackedStream(d, tokenizer, block_len, t.micro_batch_size, acc.process_index,
                                                     acc.num_processes, d.workers, t.seed),
                                        pin_memory=acc.device.type == "cuda")
        # An in-memory corpus is tokenised whole, so that every epoch shuffles all of it; held-out text is
        # bounded by eval.max_blocks.
        with self.acc.main_process_first():  # the main process tokenises and caches, the others read
            if train_blocks is None:
                train_blocks = token_blocks(d, tokenizer, block_len, "train", d.max_train_blocks, dtype=torch.int32,
                                            **kw)
            if eval_blocks is None:
                eval_blocks = token_blocks(d, tokenizer, block_len, "eval", self.r.eval.max_blocks, **kw)
        what = f"seq_len={d.seq_len}" if block_len == d.seq_len else f"{block_len} (span corruption's raw blocks)"
        for name, b in (("train_blocks", train_blocks), ("eval_blocks", eval_blocks)):
            if hasattr(b, "ndim") and (b.ndim != 2 or b.shape[1] != block_len or b.shape[0] == 0):
                raise UptrainError(f"{name} must be [n ≥ 1, {what}] token ids, got {list(b.shape)}")
        return train_blocks, eval_blocks[: self.r.eval.max_blocks].long()

    def data_text(self, train_blocks, eval_blocks) -> str:
        """What the run reads, for the start-up message."""
        d = self.r.data
        what = d.source
        if d.sources:
            from uptrain.data import mixture_probabilities

            what = "a mixture of " + ", ".join(f"{s.source} (p = {p:.3g})" for s, p in
                                                zip(d.sources, mixture_probabilities(d.sources)))
        train = (f"streamed: each of {self.acc.num_processes} rank(s) reads its own part with "
                 f"{max(1, d.workers)} reader(s)" if not hasattr(train_blocks, "ndim")
                 else f"{len(train_blocks):,} training blocks")
        return (f"data: {what}, {train}, {len(eval_blocks):,} held-out blocks of {d.seq_len} tokens; "
                f"packing: {d.packing}")

    def convert(self) -> str:
        """Convert model.path into OUT/step0 on the main process; a step0 converted with the same options is
        kept (resume, or a rerun after a crash)."""
        options, step0 = self.r.model.convert, self.out / STEP0
        if self.main:
            if not step0_reusable(self.out, options):
                from uptrain.conversion import convert

                result = convert(self.r.model.path, str(step0), options=options, overwrite=True,
                                 revision=self.r.model.revision, progress=self.show)
                self.say(result.summary())
        self.acc.wait_for_everyone()
        return str(step0)

    def save_final(self, steps, tokenizer, init_path: str, res: TrainResult, loop) -> None:
        """A normal HF checkpoint in OUT; uptrain.json (written last) keeps the init model's records (its
        conversion) and adds this uptraining. Written into OUT/.final-save.tmp and moved into place, so that a
        failure leaves no half model in OUT. When it fails (a full disk, a model transformers cannot
        serialise), the trained state is kept as a checkpoint and the message says how to finish."""
        acc = self.acc
        acc.wait_for_everyone()
        state_dict = acc.get_state_dict(steps.model)  # gathers FSDP / ZeRO-3 shards
        error = None
        if self.main:
            if steps.kept and steps.kept.tensors:  # keep_best: an earlier state's trainable weights
                state_dict = {**state_dict, **steps.kept.tensors}
            try:
                self.write_final(acc.unwrap_model(steps.model), state_dict, tokenizer, init_path, res)
            except Exception as e:  # whatever it was, the weights in memory must not be lost with it
                error = e
        if not self.on_main(lambda: error is None):
            self.keep_trained_state(steps, loop, error)
        acc.wait_for_everyone()

    def write_final(self, model, state_dict, tokenizer, init_path: str, res: TrainResult) -> None:
        from uptrain.record import Record, read_record, write_record

        tmp = self.out / FINAL_TMP
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            from uptrain.training.setup import cast_floats

            model.save_pretrained(tmp, state_dict=cast_floats(state_dict, self.save_dtype), max_shard_size="5GB")
            model.config.dtype = self.save_dtype  # save_pretrained wrote the training dtype there
            model.config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            for f in sorted(tmp.iterdir()):
                os.replace(f, self.out / f.name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        self.plot(res)
        record = read_record(init_path) or Record()
        record.uptraining = self.uptraining_record(res, init_path)
        write_record(self.out, record)  # last: marks the run finished

    def plot(self, res: TrainResult) -> None:
        """OUT/curves.png: the training and held-out losses per step (plots.plot_training). A plot that fails is
        said and skipped: the model is saved already."""
        from uptrain.plots import plot_training

        if not res.history:
            return
        try:
            plot_training(res.history, res.eval_history, str(self.out / CURVES),
                          res.steps if res.kept_step is None else res.kept_step,
                          title=f"{Path(self.r.model.path).name} → {self.out.name}")
        except Exception as e:  # matplotlib's own errors (a font cache it cannot write …)
            self.say(f"note: {CURVES} was not plotted ({type(e).__name__}: {e}); metrics.jsonl holds the figures")

    def keep_trained_state(self, steps, loop, error) -> None:
        """The final save failed: checkpoint the trained state (unless the newest checkpoint already holds it)
        and raise the message that says how to finish."""
        why = f"{type(error).__name__}: {error}" if error is not None else "on the main process"
        ckpt = latest_checkpoint(self.out)
        if not (ckpt and ckpt.name == f"step_{steps.stop:08d}"):
            try:
                ckpt = loop.save(steps.stop, steps.history, steps.evals)
            except Exception as e:
                raise UptrainError(f"the final save into {self.out} failed ({why}), and so did keeping the trained "
                                   f"state as a checkpoint ({type(e).__name__}: {e}); "
                                   + (f"the newest checkpoint is {ckpt} (resume: auto continues from it)" if ckpt
                                      else "no checkpoint of this run is left")) from error
        raise UptrainError(f"the final save into {self.out} failed ({why}); the trained state of all "
                           f"{steps.stop} steps is kept in {ckpt}. Fix the cause (free disk space, …) and run "
                           f"`uptrain train {self.out / RECIPE} resume=auto`: it saves the model from there without "
                           f"training more") from error

    def uptraining_record(self, res: TrainResult, init_path: str):
        from uptrain.record import UptrainingRecord

        r, b = self.r, self.budget
        return UptrainingRecord(
            recipe=r.to_dict(), recipe_file=self.recipe_file, base_model=r.model.path, init=init_path,
            data=",".join(s.source for s in r.data.sources) or r.data.source,  # a mixture: its sources
            steps=res.steps, tokens_seen=res.tokens_seen, alpha=b.alpha, budget=b.text,
            params=params_text(r.train.params), trainable_parameters=res.trainable_parameters,
            processes=self.acc.num_processes,
            mixed_precision=str(self.acc.mixed_precision), seq_len=r.data.seq_len, lr=r.optim.lr,
            schedule=r.optim.schedule,
            distillation={"teacher": r.distill.teacher, "weight": r.distill.weight,
                          "temperature": r.distill.temperature, "ce_weight": r.distill.ce_weight,
                          "hidden_weight": r.distill.hidden_weight} if "kl" in (res.history or [{}])[-1] else None,
            objective=self.objective,
            initial_eval=res.eval_history[0] if res.eval_history and res.eval_history[0]["step"] == 0 else None,
            final_eval=res.final_eval, eval_history=res.eval_history, kept_step=res.kept_step,
            first_loss=res.losses[0], last_loss=res.losses[-1], wall_time_s=round(res.wall_time_s, 2),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"))

