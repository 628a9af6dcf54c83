"""The optimiser steps of one run: data order, losses, accumulation normalised across ranks, periodic
held-out evaluation, metrics, checkpoints and exact resume. Idioms from accelerate's examples: the loss of
an optimiser step is normalised by the number of target tokens in the whole accumulation window across all
ranks; exact resume with `save_state` / `load_state` plus `skip_first_batches` over a data order that is a
pure function of (seed, sample index), or, for streamed data, each rank's stream position saved with the
checkpoint (data_stream.py)."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uptrain.errors import UptrainError
from uptrain.training.budget import Budget, lr_factor
from uptrain.training.keep_best import BEST_FILE, BestState
from uptrain.training.losses import token_losses, weighted
from uptrain.training.recipe import Recipe
from uptrain.training.preemption import Preempted, StopSignal, signal_name
from uptrain.training.run_folder import (RECIPE, CheckpointNotSaved, latest_checkpoint, open_metrics, passed_over,
                                         read_data_state, read_state, resumable_checkpoint, save_checkpoint,
                                         set_aside)
from uptrain.training.setup import SHARDED, adamw


# ---------------------------------------------------------------------------------------- data order
class BlockStream:
    """Sample i of a run → a training block: epoch e = i // n reads the n blocks in the order of a
    permutation seeded by (seed, e). A pure function of i, so `skip_first_batches` resumes exactly and
    any number of processes reads the same global sequence (accelerate shards it by batch)."""

    def __init__(self, blocks, length: int, seed: int, shuffle: bool):
        self.blocks, self.length, self.seed, self.shuffle = blocks, length, seed, shuffle
        self._epoch, self._perm = -1, None

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        epoch, j = divmod(i, len(self.blocks))
        if self.shuffle:
            if epoch != self._epoch:
                import torch

                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._epoch, self._perm = epoch, torch.randperm(len(self.blocks), generator=g)
            j = int(self._perm[j])
        return self.blocks[j]


# ---------------------------------------------------------------------------------------- will it fit
def check_fits(acc, model, teacher, optimizer, r, objective) -> None:
    """On CUDA, before step 1: one forward and backward of a full micro-batch at seq_len (the teacher's
    forward too), then the AdamW moments the first step will allocate, against the device's memory. A recipe
    that cannot fit fails here, with what to change. Gradients and RNG are left as they were, so the numbers
    of the run do not change. Not on CPU (memory there is virtual: a run swaps or is killed, never told), nor
    under DeepSpeed (its backward also steps the optimiser)."""
    import torch

    device = acc.device
    if device.type != "cuda" or str(acc.distributed_type).endswith("DEEPSPEED"):
        return
    inputs, labels = objective.probe_batch(r.train.micro_batch_size, device)

    def forward_backward():
        with torch.random.fork_rng(devices=[device]):
            ce, kl, hid = token_losses(model, teacher, inputs, labels, r.distill.temperature, acc.autocast,
                                       r.distill.hidden_weight > 0)
            acc.backward(weighted(r.distill, ce, kl, hid))

    torch.cuda.reset_peak_memory_stats(device)
    problem = probe(forward_backward, lambda: optimizer.zero_grad(set_to_none=True))
    if problem is None:
        local = [p.to_local() if hasattr(p, "to_local") else p for p in model.parameters() if p.requires_grad]
        moments = 2 * sum(p.numel() * p.element_size() for p in local)
        free, total = torch.cuda.mem_get_info(device)
        usable = free + torch.cuda.memory_reserved(device)  # what the caching allocator holds is reusable
        problem = moments_problem(torch.cuda.max_memory_allocated(device), moments, usable)
    if problem:
        total = torch.cuda.get_device_properties(device).total_memory
        raise UptrainError(fit_message(problem, r, f"{device} ({total / 2**30:.0f} GiB)", acc.num_processes))


def probe(forward_backward, clear) -> str | None:
    """Run forward_backward(); what ran out of memory, or None. clear() drops the gradients either way."""
    import torch

    try:
        forward_backward()
        return None
    except torch.OutOfMemoryError:
        return "one forward and backward of a micro-batch runs out of memory"
    finally:
        clear()


def moments_problem(peak: int, moments: int, usable: int) -> str | None:
    """The probe's peak plus AdamW's moments (allocated at the first step) against the usable memory."""
    if peak + moments <= usable:
        return None
    return (f"a micro-batch peaks at {peak / 2**30:.1f} GiB and the optimiser state adds {moments / 2**30:.1f} GiB "
            f"at the first step, {usable / 2**30:.1f} GiB are usable")


def fit_message(problem: str, r, where: str, processes: int) -> str:
    t, batch = r.train, r.train.micro_batch_size * r.train.grad_accum * processes
    return (f"train.micro_batch_size {t.micro_batch_size} × data.seq_len {r.data.seq_len} does not fit on {where}: "
            f"{problem}. Lower train.micro_batch_size and raise train.grad_accum by the same factor (the batch "
            f"stays {batch} blocks per step)"
            + ("" if t.gradient_checkpointing else ", set train.gradient_checkpointing: true")
            + ", or shard the model over more GPUs (recipes/accelerate/fsdp.yaml); `uptrain plan` estimates the "
              "memory of each choice before a run")


# ---------------------------------------------------------------------------------------- the steps
@dataclass
class Steps:
    """What the steps produced: per-step records, held-out evaluations, the final one (None when
    budget.stop_at ended the run early), the step resumed from, the last step done, the prepared model, and the
    earlier state keep_best saves instead of the last one."""

    history: list[dict]
    evals: list[dict]
    final: dict | None
    resumed: int | None
    stop: int
    model: object
    kept: BestState | None = None  # keep_best: an earlier state to save instead of the last (its eval, weights)


class Loop:
    """Optimiser, schedule and loader around a prepared model; `run` does the steps."""

    def __init__(self, r: Recipe, out: Path, budget: Budget, accelerator, show: bool, stop: StopSignal | None = None):
        self.r, self.out, self.budget, self.acc = r, out, budget, accelerator
        self.main = accelerator.is_main_process
        self.show = show and self.main
        self.metrics: Any = None  # metrics.jsonl, open on the main process
        self.stream: Any = None  # data_stream.StreamLoader, for streamed data
        self.objective: Any = None  # objectives.py, set by run
        self.stop = stop or StopSignal()  # not entered: never set (train() enters one around the run)
        self.unsaved = 0  # periodic checkpoints that could not be written
        self.best = BestState(accelerator, r.eval.keep_best)

    def say(self, msg: str) -> None:
        if self.main:
            print(msg, flush=True)

    def run(self, mode: str, model, teacher, train_blocks, eval_blocks, objective) -> Steps:
        """train_blocks: token blocks [n, objective.block_len] (sample i → block: BlockStream), or this rank's
        stream (data_stream.StreamLoader); eval_blocks: objective.eval_set of the held-out blocks; objective:
        what the steps optimise (objectives.py: next-token prediction or span corruption)."""
        from tqdm.auto import tqdm

        r, acc, total = self.r, self.acc, self.budget.steps
        self.objective = objective
        model, optimizer, scheduler, loader = self.setup(model, train_blocks, objective)
        check_fits(acc, model, teacher, optimizer, r, objective)
        start, history, evals, resumed, loader = self.resume(mode, model, loader)
        self.metrics = open_metrics(self.out, start) if self.main else None
        if r.log.trackers:
            acc.init_trackers(r.log.project, config=_flat(r.to_dict()))
        stop = min(total, r.budget.stop_at or total)
        bar = tqdm(total=total, initial=start, desc="uptrain", unit="step", disable=not self.show, dynamic_ncols=True)
        ckpt_path, t_run = latest_checkpoint(self.out), time.time()
        try:
            if start == 0 and (r.eval.at_start or r.eval.keep_best):  # keep_best judges against the start
                evals.append(self.evaluate(model, eval_blocks, 0, bar))
                self.best.offer(model, evals[-1])
            model.train()
            batches = iter(loader)
            for step in range(start + 1, stop + 1):
                rec = self.step(model, teacher, batches, optimizer, scheduler, step, ckpt_path)
                rec["tokens"] = step * self.budget.tokens_per_step
                rec["tokens_per_s"] = (step - start) * self.budget.tokens_per_step / (time.time() - t_run)
                history.append(rec)
                self.record(rec, step)
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.4f}", tok_s=f"{rec['tokens_per_s']:,.0f}", refresh=False)
                if r.eval.every and step % r.eval.every == 0 and step < total:
                    evals.append(self.evaluate(model, eval_blocks, step, bar))
                    self.best.offer(model, evals[-1])
                if step == stop < total:
                    ckpt_path = self.save_or_explain(step, history, evals, ckpt_path)
                elif r.checkpoint.every and step % r.checkpoint.every == 0:
                    ckpt_path = self.periodic_save(step, history, evals, ckpt_path)
                signum = self.stop.agreed(acc)  # one all-reduce per optimiser step: every rank stops here
                if signum:
                    if not (ckpt_path and ckpt_path.name == f"step_{step:08d}"):
                        ckpt_path = self.save_or_explain(step, history, evals, ckpt_path)
                    raise self.preempted(signum, step, ckpt_path)
            final, kept = None, None
            if stop == total:
                final = self.evaluate(model, eval_blocks, total, bar)
                if not evals or evals[-1]["step"] != total:
                    evals.append(final)
                verdict = self.best.verdict(final)
                if verdict:
                    self.say(verdict)
                    kept = self.best
        finally:
            bar.close()
            if self.metrics:
                self.metrics.close()
        return Steps(history, evals, final, resumed, stop, model, kept)

    # -- setup: optimiser, schedule, loader, accelerate's wrapping ------------------------------------
    def setup(self, model, train_blocks, objective):
        """(model, optimizer, scheduler, loader), prepared by accelerate."""
        import torch
        from torch.utils.data import DataLoader

        from uptrain.training.data_stream import StreamLoader

        r, acc, total = self.r, self.acc, self.budget.steps
        o = r.optim
        trainable = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": o.weight_decay},
                  {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]  # norms, biases
        optimizer = adamw([g for g in groups if g["params"]], o, fused=acc.distributed_type not in SHARDED)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, total, o.warmup_steps, o.schedule, o.final_lr_ratio))
        self.stream = train_blocks if isinstance(train_blocks, StreamLoader) else None
        if self.stream:  # each rank reads its own part: accelerate must neither shard it nor dispatch it
            loader = self.stream
            ds = getattr(acc.state, "deepspeed_plugin", None)
            if ds is not None and ds.is_auto("train_micro_batch_size_per_gpu"):  # read from a prepared loader
                ds.deepspeed_config["train_micro_batch_size_per_gpu"] = r.train.micro_batch_size
            model, optimizer, scheduler = acc.prepare(model, optimizer, scheduler)
        else:
            samples = total * r.train.grad_accum * r.train.micro_batch_size * acc.num_processes
            loader = DataLoader(objective.dataset(BlockStream(train_blocks, samples, r.train.seed, r.data.shuffle)),
                                batch_size=r.train.micro_batch_size, shuffle=False,
                                pin_memory=acc.device.type == "cuda")
            model, optimizer, loader, scheduler = acc.prepare(model, optimizer, loader, scheduler)
        if acc.gradient_accumulation_steps != r.train.grad_accum:  # a DeepSpeed config may set its own
            raise UptrainError(f"the accelerate config accumulates {acc.gradient_accumulation_steps} micro-batches, "
                               f"the recipe's train.grad_accum {r.train.grad_accum}; make them equal (or leave it "
                               f"'auto')")
        return model, optimizer, scheduler, loader

    def resume(self, mode: str, model, loader):
        """(first step − 1, history, evals, step resumed from or None, loader): the state of the newest usable
        checkpoint when mode is "resume", loaded into the prepared objects; a fresh start otherwise."""
        acc = self.acc
        if mode != "resume":
            return 0, [], [], None, loader
        ckpt, skipped = resumable_checkpoint(self.out)
        assert ckpt is not None  # plan_output chose "resume" because there is one
        if skipped:
            self.say(passed_over(skipped, ckpt))
            acc.wait_for_everyone()  # every rank has chosen before the main process renames
            if self.main:
                set_aside(skipped)
            acc.wait_for_everyone()
        state = read_state(ckpt)
        if state["processes"] != acc.num_processes:
            raise UptrainError(f"the checkpoint {ckpt} was written by {state['processes']} process(es); resume "
                               f"with the same number (now {acc.num_processes}) to keep the data order")
        self.best.before_resume(model, state.get("best"))
        acc.load_state(str(ckpt))
        start = state["step"]
        self.best.after_resume(model, state.get("best"), ckpt, start)
        if self.stream:
            self.stream.load_state_dict(read_data_state(ckpt, acc.process_index), str(ckpt))
        else:
            loader = acc.skip_first_batches(loader, start * self.r.train.grad_accum)
        self.say(f"resuming from {ckpt} at step {start}")
        return start, state["history"], state["eval_history"], start, loader

    # -- one optimiser step ---------------------------------------------------------------------------
    def step(self, model, teacher, batches, optimizer, scheduler, step: int, ckpt_path) -> dict:
        """One optimiser step over an accumulation window of micro-batches; its record (loss, lr, …)."""
        import torch

        r, acc, device, accum = self.r, self.acc, self.acc.device, self.r.train.grad_accum
        window = [self.objective.batch(next(batches), device) for _ in range(accum)]  # (inputs, labels)
        # Normalise by the target tokens (labels ≠ -100) of the whole window on all ranks (accelerate's recipe for
        # autoregressive models): DDP averages gradients over ranks and accelerate's backward divides by the
        # accumulation steps, hence the factor processes × accum.
        n_local = sum((labels != -100).sum() for _, labels in window).float()
        n_global = acc.reduce(n_local, "sum")
        scale = acc.num_processes * accum / n_global
        d = r.distill
        sums = torch.zeros(3, device=device)  # CE, KL, H summed over the window's targets
        for inputs, labels in window:
            with acc.accumulate(model):
                ce, kl, hid = token_losses(model, teacher, inputs, labels, d.temperature, acc.autocast,
                                           d.hidden_weight > 0)
                acc.backward(weighted(d, ce, kl, hid) * scale)
                for i, term in enumerate((ce, kl, hid)):
                    if term is not None:
                        sums[i] += term.detach()
        loss, kl_mean, hid_mean = (acc.reduce(sums, "sum") / n_global).tolist()
        for value in (loss, kl_mean, hid_mean):
            if not math.isfinite(value):
                raise self.diverged(step, value, ckpt_path)
        rec = {"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0]}
        if r.optim.grad_clip > 0:
            rec["grad_norm"] = float(acc.clip_grad_norm_(model.parameters(), r.optim.grad_clip))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if teacher is not None:
            rec["kl"] = kl_mean
            if d.hidden_weight > 0:
                rec["hidden"] = hid_mean
        return rec

    # -- checkpoints, stops ---------------------------------------------------------------------------
    def save(self, step: int, history: list[dict], evals: list[dict]) -> Path:
        """A checkpoint of the state after `step` (every process calls it)."""
        state = {"step": step, "total_steps": self.budget.steps, "processes": self.acc.num_processes,
                 "history": history, "eval_history": evals, "best": self.best.state()}
        best = self.best.tensors_for(step)
        return save_checkpoint(self.acc, self.out, step, state, self.r.checkpoint.keep,
                               data_state=self.stream.state_dict() if getattr(self, "stream", None) else None,
                               extra_files={BEST_FILE: best} if best is not None else None)

    def periodic_save(self, step: int, history: list[dict], evals: list[dict], newest: Path | None) -> Path | None:
        """A checkpoint at checkpoint.every; one that cannot be written (a full disk) costs no trained step: its
        partial files are removed, the run says so and goes on, and the next interval tries again."""
        try:
            return self.save(step, history, evals)
        except CheckpointNotSaved as e:
            nxt = step + self.r.checkpoint.every
            then = (f"the next checkpoint is tried at step {nxt}" if nxt <= self.budget.steps
                    else f"the final model is saved after step {self.budget.steps}")
            if self.unsaved:  # the explanation was given at the first one
                self.say(f"warning: {e} either; {then}")
            else:
                self.say(f"warning: {e}; its partial files were removed and training goes on ({then}). "
                         + (f"The newest checkpoint is {newest}" if newest else "No checkpoint of this run is saved")
                         + ": free disk space, or a stop loses the steps since")
            self.unsaved += 1
            return newest

    def save_or_explain(self, step: int, history: list[dict], evals: list[dict], newest: Path | None) -> Path:
        """A checkpoint the run cannot go on without (budget.stop_at, a signal): its failure ends the run with the
        newest checkpoint that resume: auto would continue from."""
        try:
            return self.save(step, history, evals)
        except CheckpointNotSaved as e:
            raise UptrainError(f"{e}; its partial files were removed. "
                               + (f"The newest checkpoint is {newest}: free disk space and continue with "
                                  f"`uptrain train {self.out / RECIPE} resume=auto`" if newest
                                  else "No checkpoint of this run is saved")) from e

    def preempted(self, signum: int, step: int, ckpt: Path) -> Preempted:
        launch = "accelerate launch … -m uptrain train" if self.acc.num_processes > 1 else "uptrain train"
        return Preempted(f"{signal_name(signum)} after step {step} of {self.budget.steps}; the state is saved in "
                         f"{ckpt}. Continue exactly where it stopped with resume: auto (`{launch} "
                         f"{self.out / RECIPE} resume=auto`)", step, str(ckpt), signum, quiet=not self.main)

    def diverged(self, step, value, ckpt) -> UptrainError:
        where = (f"the last good checkpoint is {ckpt}: lower optim.lr or set optim.grad_clip and continue "
                 f"from it with resume: auto" if ckpt else "no checkpoint was saved (checkpoint.every is 0)")
        return UptrainError(f"the loss became {value} at step {step}; stopped before updating the weights, "
                            f"{where}")

    # -- evaluation, logging, checkpoints -----------------------------------------------------------
    def evaluate(self, model, blocks, step: int, bar) -> dict:
        """Held-out loss as the objective scores it (uptrain.evaluation.quality), the data sharded over the
        processes."""
        import torch

        acc, world = self.acc, self.acc.num_processes
        n = len(blocks) // world * world  # equal shards: FSDP/DeepSpeed ranks must run the same forwards
        shard = blocks[acc.process_index:n:world] if n else blocks
        sharded = acc.distributed_type in SHARDED
        with acc.autocast():
            res = self.objective.evaluate(model if sharded else acc.unwrap_model(model), shard, self.r.eval.batch_size)
        sums = torch.tensor([res["loss"] * res["tokens"], float(res["tokens"])], dtype=torch.float64,
                            device=acc.device)
        nll, tokens = (acc.reduce(sums, "sum") / (1 if n else world)).tolist()
        model.train()
        loss = nll / tokens
        ev = {"step": step, "loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(tokens)}
        self.record({"step": step, "eval_loss": loss, "eval_perplexity": ev["perplexity"]}, step)
        if self.show:
            bar.write(f"step {step}: held-out loss {loss:.4f}, perplexity {ev['perplexity']:.2f}")
        return ev

    def record(self, rec: dict, step: int) -> None:
        if self.metrics:
            self.metrics.write(json.dumps(rec) + "\n")
        if self.r.log.trackers:
            self.acc.log({k: v for k, v in rec.items() if k != "step"}, step=step)


def _flat(d: dict, prefix: str = "") -> dict:
    """Nested recipe → {"optim.lr": 1e-4, …} with scalar values (what trackers accept as hyper-parameters)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
