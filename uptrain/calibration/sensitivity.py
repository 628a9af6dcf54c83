"""How much each layer costs the model at each KV-head count: the measured losses `--kv-budget` allocates by.

loss_l(G) = the mean KL divergence (nats per token) of the model's next-token distribution from the source's
when layer l alone is converted to G KV heads (by the conversion's own method: its pooling method or aligned,
fitted on these tokens, then refined on them when the conversion refines) and every other layer is the
source's. G = K costs 0. Measured on the first
`allocation_tokens` of the calibration text, one decoder layer at a time (uptrain/calibration/layers.py):

    clean stream  h_0 → layer 0 → h_1 → … → h_L → norm, lm_head → p (the source's distribution)
    at layer l, for every G < K: layer l with G KV heads on h_l starts a stream (l, G), which the source's
        layers l+1 … L-1 carry on → p_(l,G);     loss_l(G) = mean over tokens of KL(p ‖ p_(l,G))

so the loss includes everything after the layer (how much the model's output suffers), not the layer's own
error alone. Memory: one float32 decoder layer + (1 + L · #G) streams of tokens × hidden float32. Time: about
L² · #G / 2 layer forwards over the tokens, plus L · #G passes of the output head.

The sum over layers predicts the loss of an allocation (it leaves out how the layers' errors interact);
uptrain/calibration/allocation.py minimises it under the budget.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

import torch

from uptrain.calibration.allocation import allocate, budget_heads
from uptrain.calibration.layer_pass import LayerStep, Recipe, open_pass
from uptrain.calibration.layers import Batch, run_layer
from uptrain.calibration.work import WorkFolder, work_fingerprint
from uptrain.conversion.context import ConvertContext
from uptrain.conversion.options import DEFAULT_ALLOCATION_TOKENS
from uptrain.kv_heads import KVHeads

HEAD_ROWS = 256  # positions whose vocabulary-wide distributions are held at once (memory: 4 × rows × vocab floats)


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@torch.no_grad()
def measure_losses(ctx: ConvertContext, options: Any) -> tuple[list[dict[int, float]], dict, WorkFolder]:
    """(losses[l][G] for every layer and every G < K the source can be converted to, plus G = K at 0; the record:
    data, tokens, seconds; the work folder, which the caller removes once the result is written). Killed and
    rerun, it resumes after the last measured layer (its streams wait in OUT.measure.partial)."""
    t0 = time.time()
    o, spec, config = options, ctx.spec, ctx.config
    kv = ctx.kv_heads
    candidates = [g for g in spec.valid_groups(config) if g != kv]
    tokens = o.allocation_tokens or min(DEFAULT_ALLOCATION_TOKENS, o.calibration_tokens or DEFAULT_ALLOCATION_TOKENS)
    recipe = Recipe.of(o)  # the conversion's closed form (a pooling method, or aligned) and refine steps
    layer_pass, blocks, record = open_pass(ctx, o, recipe, tokens=tokens, moment=recipe.aligned,
                                           calls=recipe.steps > 0, fits=recipe.steps > 0)
    out = ctx.out_dir.parent / f"{ctx.out_dir.name}.measure" if ctx.out_dir is not None else None
    work = WorkFolder.beside(out, work_fingerprint(ctx, o, blocks, layer_pass.kinds, measure=candidates), _say)
    batches, layers = layer_pass.batches, layer_pass.layers
    streams: dict[tuple[int, int], list[torch.Tensor]] = {}  # (layer, G) → hidden states per batch
    start = int(work.state.get("layers_done", 0))
    if start:
        saved = work.get(f"streams-{start}")
        for j, b in enumerate(batches):
            b.hidden = saved[f"clean.{j}"]
        for key in work.state["streams"]:
            layer, g = key
            streams[(layer, g)] = [saved[f"{layer}.{g}.{j}"] for j in range(len(batches))]
        _say(f"resuming from layer {start} of {layers}: the KV-budget measure of layers 0-{start - 1} was finished "
             f"by an earlier run of this command ({work.path})")

    def through(i: int, layer: torch.nn.Module) -> None:  # the earlier layers' streams through this source layer
        for key, hidden in streams.items():
            streams[key] = [run_layer(layer, Batch(h, b.calls), i) for h, b in zip(hidden, batches)]  # type: ignore

    def visit(step: LayerStep) -> None:  # layer i alone converted to each G starts a stream
        for g in candidates:
            at_g = dataclasses.replace(ctx, groups=g, layer_groups=None)
            new = layer_pass.convert(step, at_g)
            streams[(step.index, g)] = layer_pass.run_converted(step.index, layer_pass.full(step, new.layouts, new.tensors),
                                                                KVHeads(uniform=g), step.inputs)

    def done(i: int) -> None:
        saved = {f"clean.{j}": b.hidden for j, b in enumerate(batches)}
        saved.update({f"{layer}.{g}.{j}": h for (layer, g), hs in streams.items() for j, h in enumerate(hs)})
        work.put(f"streams-{i + 1}", saved)
        work.save(layers_done=i + 1, streams=[list(k) for k in streams])
        work.drop(f"streams-{i}")

    if "losses" not in work.state:
        if start < layers:
            layer_pass.run(visit, start=start, through=through, done=done, desc="measure layers for the KV budget")
        size = len(batches[0].hidden)
        ids = [blocks[s:s + size] for s in range(0, blocks.shape[0], size)]
        kl = _divergences(layer_pass.engine, ids, [b.hidden for b in batches], streams)
        losses = [{kv: 0.0, **{g: kl[(i, g)] for g in candidates}} for i in range(layers)]
        work.drop(f"streams-{layers}")
        work.save(losses=[{str(g): v for g, v in x.items()} for x in losses], seconds=round(time.time() - t0, 2))
    losses = [{int(g): v for g, v in x.items()} for x in work.state["losses"]]
    record.update(measure="KL(source || one layer converted), nats per token", seconds=work.state["seconds"])
    return losses, record, work


def _divergences(engine: Any, ids: list[torch.Tensor], clean: list[torch.Tensor],
                 streams: dict[tuple[int, int], list[torch.Tensor]]) -> dict[tuple[int, int], float]:
    """Mean KL(p ‖ p_stream) per token of each stream's next-token distribution from the clean one's, the logits
    as the model's forward makes them (Skeleton.logits: final norm, head, any soft-capping), HEAD_ROWS
    positions at a time."""
    kl = {key: 0.0 for key in streams}
    count = 0
    with engine.top() as logits_of:
        for j, (x, h) in enumerate(zip(ids, clean)):
            # the batch's positions in one row, HEAD_ROWS at a time (the decoder layers are stubbed out: a
            # position's logits depend on its hidden state alone)
            flat_ids, rows = x.reshape(1, -1), h.reshape(1, -1, h.shape[-1])
            count += rows.shape[1]
            for a in range(0, rows.shape[1], HEAD_ROWS):
                cut = slice(a, a + HEAD_ROWS)
                ref = torch.log_softmax(logits_of(flat_ids[:, cut], rows[:, cut]).float(), dim=-1)
                p = ref.exp()
                for key, hidden in streams.items():
                    other = hidden[j].reshape(1, -1, h.shape[-1])[:, cut]
                    lp = torch.log_softmax(logits_of(flat_ids[:, cut], other).float(), dim=-1)
                    kl[key] += float((p * (ref - lp)).sum())
    return {key: max(v / count, 0.0) for key, v in kl.items()}


def choose_groups(ctx: ConvertContext, options: Any) -> tuple[KVHeads, dict, WorkFolder]:
    """The KV heads of every layer for `options.kv_budget`: measured losses, then the exact knapsack. Returns
    (the KV heads: one G when every layer got the same; the allocation record for uptrain.json; the measure's work
    folder, removed by the caller once the result is written)."""
    layers = ctx.spec.layers(ctx.config)
    budget = budget_heads(options.kv_budget, [ctx.kv_heads] * layers, options.said("kv_budget"))
    losses, measured, work = measure_losses(ctx, options)
    chosen = allocate(losses, budget)
    uniform = {g: sum(x[g] for x in losses) for g in losses[0] if g * layers <= budget}
    record = {"kv_budget": options.kv_budget, "budget_heads": budget, "source_heads": ctx.kv_heads * layers,
              **chosen.to_dict(), "predicted_loss": chosen.loss,
              "uniform_loss": {str(g): v for g, v in sorted(uniform.items())},
              "losses": [{"layer": i, **{str(g): v for g, v in sorted(x.items())}} for i, x in enumerate(losses)],
              "measured": measured}
    del record["loss"]
    return KVHeads.of(chosen.groups), record, work
