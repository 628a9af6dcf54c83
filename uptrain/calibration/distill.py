"""End-to-end distillation after the layer-wise pass (`--distill-steps N`): the converted model's attention
tensors fitted to the source model's next-token distributions on the calibration blocks, one decoder layer at
a time in memory.

The layer-wise pass fits each attention to the source's on the source's inputs; its errors still add up over
the layers, and it weighs every direction of an attention output alike whether or not the rest of the model
reads it. Here the loss is the one that counts: KL(source ‖ converted) of the next-token distributions, the
source as teacher, with the source's top-k probabilities (TOP_K, plus the rest as one bucket) taken once, at
the end of the calibration pass. Only the tensors the conversion writes (the attention's) move; the rest of
the model is the source's.

One step over a batch of blocks, never the whole model in memory (as the layer-wise engine keeps it):
  forward   each converted layer in turn is materialised, run on the batch, dropped; its input kept;
  top       the head (final norm, lm_head) on the last hidden state → logits → KL → its gradient;
  backward  from the last layer down, each layer is materialised again, rerun from its kept input with
            gradients, and its attention tensors take an Adam step at once.
Memory: the non-layer tensors with the head and one float32 decoder layer, the batch's hidden states entering
each layer (layers × batch tokens × hidden float32), the head's logits for the batch (tokens × vocabulary, with
their gradient), the teacher's top-k for the calibration set, and the Adam moments of one layer (the others
wait in the scratch folder, beside the float32 tensors being fitted).

One batch in HOLD_OUT is held out, every kind of text of the calibration mix among them (holdout.py); the result
is kept only if it lowers the KL there and makes no kind's KL higher, else the layer-wise result stands (an exact
merge is exact already: it is never distilled).
"""
from __future__ import annotations

import math
import time
from typing import Sequence

import torch

from uptrain.calibration.holdout import Row, held_out, judge, overall
from uptrain.calibration.layer_pass import LayerPass
from uptrain.calibration.layers import Batch
from uptrain.calibration.refine import rms_scale
from uptrain.kv_heads import KVHeads

TOP_K = 64  # teacher probabilities kept per position (the rest as one bucket)
EXACT_KL = 1e-6  # a held-out KL below this (nats per token) is float32 rounding: the merge is exact
DEFAULT_DISTILL_LR = 1e-3  # Adam, relative to each tensor's RMS (measured on the 135M model: docs/calibration.md)


@torch.no_grad()
def teacher(logits: torch.Tensor, k: int = TOP_K) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k log-probabilities and their token ids per position: logits [B, T, V] → two [B, T, k]."""
    logp = torch.log_softmax(logits.float(), -1)
    values, ids = logp.topk(min(k, logp.shape[-1]), -1)
    return values, ids


def kl_topk(logits: torch.Tensor, t_logp: torch.Tensor, t_ids: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher ‖ student) on the teacher's top-k tokens and the rest as one bucket
    (a lower bound of the full KL, exact when the top k hold all the teacher's mass)."""
    return kl_positions(logits, t_logp, t_ids).mean()


def kl_positions(logits: torch.Tensor, t_logp: torch.Tensor, t_ids: torch.Tensor) -> torch.Tensor:
    """kl_topk at every position: [B, T]."""
    s_logp = torch.log_softmax(logits.float(), -1)
    s_top = s_logp.gather(-1, t_ids)
    p = t_logp.exp()
    p_rest = (1 - p.sum(-1)).clamp_min(0)
    q_rest = (1 - s_top.exp().sum(-1)).clamp_min(1e-12)
    rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(1e-30).log() - q_rest.log()), torch.zeros_like(p_rest))
    return (p * (t_logp - s_top)).sum(-1) + rest


class Distillation:
    """The state of one distillation: the batches (token ids, the hidden states entering layer 0, the calls'
    arguments, per batch the kind of text of each block: None for one kind), the teacher's top-k per batch, and
    where each layer's tensors are (`tensors(i)`: the converted layer's full tensors by name, float32;
    `put(i, attention)`: the attention tensors back, by name)."""

    def __init__(self, engine, ids: list[torch.Tensor], batches: list[Batch], targets: list[tuple], tensors, put,
                 attention: list[str], store, moving: set[int] | None = None, groups: KVHeads | None = None,
                 kinds: Sequence[Sequence[str]] | None = None):
        self.engine, self.ids, self.batches, self.targets = engine, ids, batches, targets
        self.kinds = kinds
        self.groups = groups  # the converted skeleton's KV heads
        self.tensors, self.put, self.attention, self.store = tensors, put, attention, store
        # the layers whose attention moves (all by default; a per-layer result's layers that keep their heads don't)
        self.moving = set(range(engine.layers)) if moving is None else moving

    def forward(self, b: int) -> list[torch.Tensor]:
        """The hidden states entering each layer and leaving the last, for batch b (no gradients)."""
        batch = self.batches[b]
        stream = LayerPass(self.engine, [Batch(batch.hidden, batch.calls)], progress=False)
        hs: list[torch.Tensor] = []
        stream.run(lambda step: hs.append(step.inputs[0]), tensors_of=self.tensors, groups=self.groups)
        return [*hs, stream.batches[0].hidden]

    def loss(self, b: int, logits_of, hidden: torch.Tensor, grad: bool) -> tuple[float, torch.Tensor | None]:
        """(KL of batch b's logits, its gradient with respect to the last hidden state when `grad`)."""
        h = hidden.detach().requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            kl = kl_topk(logits_of(self.ids[b], h), *self.targets[b])
            if grad:
                kl.backward()
        return float(kl.detach()), (h.grad if grad else None)

    def step(self, b: int, lr: float, t: int, logits_of) -> float:
        """One Adam step (number t, from 1) of every layer's attention tensors on batch b; returns its KL."""
        e, batch = self.engine, self.batches[b]
        hs = self.forward(b)
        kl, g = self.loss(b, logits_of, hs[-1], grad=True)
        for i in reversed(range(e.layers)):
            tensors = self.tensors(i)
            with e.layer(i, tensors, self.groups) as layer:
                params = {n: p for n, p in layer.named_parameters(prefix=e.prefix(i).rstrip("."))
                          if n in self.attention_of(i)} if i in self.moving else {}
                x = hs[i].detach().requires_grad_(True)
                with torch.enable_grad():
                    for p in params.values():
                        p.requires_grad_(True)
                    args, kwargs = batch.calls[i]
                    out = layer(x, *args, **kwargs)
                    out = out[0] if isinstance(out, tuple) else out
                    out.backward(g)
                g = x.grad
                if params:
                    self.put(i, self._adam(i, {n: (p.detach(), p.grad) for n, p in params.items()}, lr, t))
        return kl

    def attention_of(self, i: int) -> set[str]:
        return {self.engine.prefix(i) + s for s in self.attention}

    def _adam(self, i: int, grads: dict, lr: float, t: int, betas=(0.9, 0.99), eps=1e-12) -> dict:
        """Adam on one layer's tensors, each with a step of lr × its RMS (as refine.py); the moments wait in
        the store between steps (float32, twice the size of the layer's attention)."""
        key = f"adam{i}"
        saved = self.store.get(key) if t > 1 else {}
        out, moments = {}, {}
        for n, (p, gr) in grads.items():
            m, v = saved.get("m:" + n, torch.zeros_like(p)), saved.get("v:" + n, torch.zeros_like(p))
            m.mul_(betas[0]).add_(gr, alpha=1 - betas[0])
            v.mul_(betas[1]).addcmul_(gr, gr, value=1 - betas[1])
            moments.update({"m:" + n: m, "v:" + n: v})
            step = lr * rms_scale(p) * math.sqrt(1 - betas[1] ** t) / (1 - betas[0] ** t)
            out[n] = p - step * m / (v.sqrt() + eps)
        self.store.put(key, moments)
        return out

    @torch.no_grad()
    def rows(self, batches: list[int], logits_of) -> list[list[Row]]:
        """Per batch, per block: (its KL summed over its positions, their count)."""
        out = []
        for b in batches:
            kl = kl_positions(logits_of(self.ids[b], self.forward(b)[-1]), *self.targets[b]).double()
            out.append([(float(r.sum()), float(r.numel())) for r in kl])
        return out


def distill(state: Distillation, steps: int, lr: float = DEFAULT_DISTILL_LR, seed: int = 0, progress=None) -> dict:
    """`steps` Adam steps of every layer's attention on the calibration batches (some held out: holdout.py);
    returns {"before", "after" (held-out KL, nats per token), "steps", "seconds"}, with the batches' kinds
    "by_kind" {kind: [before, after]} and "worst_kind", and "undone" when the held-out KL did not fall or a kind's
    rose (the caller then keeps the layer-wise tensors); "diverged" when it became NaN or infinite."""
    t0 = time.time()
    n = len(state.batches)
    labels = list(state.kinds) if state.kinds is not None else [("",)] * n
    held = held_out(labels)
    fit = [b for b in range(n) if b not in held] or list(range(n))
    judged = held or fit
    with state.engine.top(state.groups) as logits_of:
        first = state.rows(judged, logits_of)
        before = overall(first)
        if before < EXACT_KL:  # the merge is exact already (up to float32 rounding): nothing to distil
            return {"steps": 0, "lr": lr, "before": before, "after": before, "seconds": round(time.time() - t0, 2)}
        gen = torch.Generator().manual_seed(seed)
        order: list[int] = []
        train_kl = []
        for t in range(1, steps + 1):
            if not order:
                order = [fit[j] for j in torch.randperm(len(fit), generator=gen).tolist()]
            train_kl.append(state.step(order.pop(), lr, t, logits_of))
            if progress is not None:
                progress(t, train_kl[-1])
        last = state.rows(judged, logits_of)
    verdict = judge(first, last, [labels[b] for b in judged] if state.kinds is not None else None)
    after = verdict.after
    result = {"steps": steps, "lr": lr, "before": before, "after": after, "held_out_batches": len(held),
              "train_kl": [round(k, 5) for k in train_kl]}
    if state.kinds is not None:
        result.update(verdict.record())
    if not math.isfinite(after):  # the steps blew up (a NaN or an infinite KL); uptrain.json writes it as null
        result["diverged"] = True
    if not verdict.kept:  # NaN compares false: a diverged run is undone too
        result["undone"] = True
    return {**result, "seconds": round(time.time() - t0, 2)}
