"""The optimiser steps of one run: data order, losses, accumulation normalised across ranks, periodic
held-out evaluation, metrics, checkpoints and exact resume. Idioms from accelerate's examples: the loss of
an optimiser step is normalised by the number of target tokens in the whole accumulation window across all
ranks; exact resume with `save_state` / `load_state` plus `skip_first_batches` over a data order that is a
pure function of (seed, sample index)."""
from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

from uptrain.errors import UptrainError
from uptrain.training.budget import Budget, lr_factor
from uptrain.training.recipe import Recipe
from uptrain.training.run_folder import latest_checkpoint, open_metrics, read_state, save_checkpoint
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


def token_losses(model, teacher, ids, temperature: float, autocast):
    """Summed CE over the targets of `ids` [b, l] (every position but the first) and, with a teacher,
    summed T²·KL(teacher ‖ student) over the same positions (None without one)."""
    import torch
    import torch.nn.functional as F

    logits = model(input_ids=ids, use_cache=False).logits
    labels = F.pad(ids[:, 1:], (0, 1), value=-100)  # the last position predicts past the block
    ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    if teacher is None:
        return ce, None
    with torch.no_grad(), autocast():
        t_logits = teacher(input_ids=ids, use_cache=False).logits
    t = temperature
    s_logp = F.log_softmax(logits[:, :-1].float() / t, dim=-1)
    t_logp = F.log_softmax(t_logits[:, :-1].float() / t, dim=-1)
    return ce, F.kl_div(s_logp, t_logp, log_target=True, reduction="sum") * (t * t)


# ---------------------------------------------------------------------------------------- the steps
@dataclass
class Steps:
    """What the steps produced: per-step records, held-out evaluations, the final one (None when
    budget.stop_at ended the run early), the step resumed from, the last step done and the prepared model."""

    history: list[dict]
    evals: list[dict]
    final: dict | None
    resumed: int | None
    stop: int
    model: object


class Loop:
    """Optimiser, schedule and loader around a prepared model; `run` does the steps."""

    def __init__(self, r: Recipe, out: Path, budget: Budget, accelerator, show: bool):
        self.r, self.out, self.budget, self.acc = r, out, budget, accelerator
        self.main = accelerator.is_main_process
        self.show = show and self.main
        self.metrics = None

    def say(self, msg: str) -> None:
        if self.main:
            print(msg, flush=True)

    def run(self, mode: str, model, teacher, train_blocks, eval_blocks) -> Steps:
        import torch
        from torch.utils.data import DataLoader
        from tqdm.auto import tqdm

        r, acc, total = self.r, self.acc, self.budget.steps
        accum, o = r.train.grad_accum, r.optim
        trainable = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": o.weight_decay},
                  {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]  # norms, biases
        optimizer = adamw([g for g in groups if g["params"]], o, fused=acc.distributed_type not in SHARDED)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, total, o.warmup_steps, o.schedule, o.final_lr_ratio))
        samples = total * accum * r.train.micro_batch_size * acc.num_processes
        loader = DataLoader(BlockStream(train_blocks, samples, r.train.seed, r.data.shuffle),
                            batch_size=r.train.micro_batch_size, shuffle=False, pin_memory=acc.device.type == "cuda")
        model, optimizer, loader, scheduler = acc.prepare(model, optimizer, loader, scheduler)
        if acc.gradient_accumulation_steps != accum:  # a DeepSpeed config may set its own
            raise UptrainError(f"the accelerate config accumulates {acc.gradient_accumulation_steps} micro-batches, "
                               f"the recipe's train.grad_accum {accum}; make them equal (or leave it 'auto')")

        start, history, evals, resumed = 0, [], [], None
        if mode == "resume":
            ckpt = latest_checkpoint(self.out)
            state = read_state(ckpt)
            if state["processes"] != acc.num_processes:
                raise UptrainError(f"the checkpoint {ckpt} was written by {state['processes']} process(es); resume "
                                   f"with the same number (now {acc.num_processes}) to keep the data order")
            acc.load_state(str(ckpt))
            start, history, evals = state["step"], state["history"], state["eval_history"]
            loader, resumed = acc.skip_first_batches(loader, start * accum), start
            self.say(f"resuming from {ckpt} at step {start}")
        self.metrics = open_metrics(self.out, start) if self.main else None
        if r.log.trackers:
            acc.init_trackers(r.log.project, config=_flat(r.to_dict()))
        stop = min(total, r.budget.stop_at or total)
        bar = tqdm(total=total, initial=start, desc="uptrain", unit="step", disable=not self.show, dynamic_ncols=True)
        ckpt_path, t_run, device = latest_checkpoint(self.out), time.time(), acc.device
        try:
            if start == 0 and r.eval.at_start:
                evals.append(self.evaluate(model, eval_blocks, 0, bar))
            model.train()
            batches = iter(loader)
            for step in range(start + 1, stop + 1):
                window = [next(batches) for _ in range(accum)]
                # Normalise by the target tokens of the whole window on all ranks (accelerate's recipe for
                # autoregressive models): DDP averages gradients over ranks and accelerate's backward
                # divides by the accumulation steps, hence the factor processes × accum.
                n_local = sum(b.shape[0] * (b.shape[1] - 1) for b in window)
                n_global = acc.reduce(torch.tensor(float(n_local), device=device), "sum")
                scale = acc.num_processes * accum / n_global
                sums = torch.zeros(2, device=device)
                for b in window:
                    with acc.accumulate(model):
                        ce, kl = token_losses(model, teacher, b.to(device).long(), r.distill.temperature,
                                              acc.autocast)
                        acc.backward((ce if kl is None else ce + r.distill.weight * kl) * scale)
                        sums[0] += ce.detach()
                        if kl is not None:
                            sums[1] += kl.detach()
                loss, kl_mean = (acc.reduce(sums, "sum") / n_global).tolist()
                if not (math.isfinite(loss) and math.isfinite(kl_mean)):
                    raise self.diverged(step, loss if not math.isfinite(loss) else kl_mean, ckpt_path)
                rec = {"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0]}
                if o.grad_clip > 0:
                    rec["grad_norm"] = float(acc.clip_grad_norm_(model.parameters(), o.grad_clip))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if teacher is not None:
                    rec["kl"] = kl_mean
                rec["tokens"] = step * self.budget.tokens_per_step
                rec["tokens_per_s"] = (step - start) * self.budget.tokens_per_step / (time.time() - t_run)
                history.append(rec)
                self.record(rec, step)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rec['tokens_per_s']:,.0f}", refresh=False)
                if r.eval.every and step % r.eval.every == 0 and step < total:
                    evals.append(self.evaluate(model, eval_blocks, step, bar))
                if (r.checkpoint.every and step % r.checkpoint.every == 0) or step == stop < total:
                    state = {"step": step, "total_steps": total, "processes": acc.num_processes,
                             "history": history, "eval_history": evals}
                    ckpt_path = save_checkpoint(acc, self.out, step, state, r.checkpoint.keep)
            final = None
            if stop == total:
                final = self.evaluate(model, eval_blocks, total, bar)
                if not evals or evals[-1]["step"] != total:
                    evals.append(final)
        finally:
            bar.close()
            if self.metrics:
                self.metrics.close()
        return Steps(history, evals, final, resumed, stop, model)

    def diverged(self, step, value, ckpt) -> UptrainError:
        where = (f"the last good checkpoint is {ckpt}: lower optim.lr or set optim.grad_clip and continue "
                 f"from it with resume: auto" if ckpt else "no checkpoint was saved (checkpoint.every is 0)")
        return UptrainError(f"the loss became {value} at step {step}; stopped before updating the weights, "
                            f"{where}")

    # -- evaluation, logging, checkpoints -----------------------------------------------------------
    def evaluate(self, model, blocks, step: int, bar) -> dict:
        """Held-out loss with uptrain.evaluation.perplexity, the blocks sharded over the processes."""
        import torch

        from uptrain.evaluation.quality import perplexity

        acc, world = self.acc, self.acc.num_processes
        n = len(blocks) // world * world  # equal shards: FSDP/DeepSpeed ranks must run the same forwards
        shard = blocks[acc.process_index:n:world] if n else blocks
        sharded = acc.distributed_type in SHARDED
        with acc.autocast():
            res = perplexity(model if sharded else acc.unwrap_model(model), shard, batch_size=self.r.eval.batch_size)
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
