"""How much each layer costs the model at each KV-head count: the measured losses `--kv-budget` allocates by.

loss_l(G) = the mean KL divergence (nats per token) of the model's next-token distribution from the source's
when layer l alone is converted to G KV heads (by the conversion's own method: its pooling method or aligned,
fitted on these tokens, then refined on them when the conversion refines) and every other layer is the
source's. G = K costs 0. Measured on the first
`allocation_tokens` of the calibration text, one decoder layer at a time (uptrain/conversion/layerwise.py):

    clean stream  h_0 → layer 0 → h_1 → … → h_L → norm, lm_head → p (the source's distribution)
    at layer l, for every G < K: layer l with G KV heads on h_l starts a stream (l, G), which the source's
        layers l+1 … L-1 carry on → p_(l,G);     loss_l(G) = mean over tokens of KL(p ‖ p_(l,G))

so the loss includes everything after the layer (how much the model's output suffers), not the layer's own
error alone. Memory: one float32 decoder layer + (1 + L · #G) streams of tokens × hidden float32. Time: about
L² · #G / 2 layer forwards over the tokens, plus L · #G passes of the output head.

The sum over layers predicts the loss of an allocation (it leaves out how the layers' errors interact);
uptrain/conversion/allocation.py minimises it under the budget.
"""
from __future__ import annotations

import contextlib
import time

import torch

from uptrain.conversion.options import DEFAULT_ALLOCATION_TOKENS
from uptrain.errors import UptrainError

HEAD_ROWS = 256  # positions whose vocabulary-wide distributions are held at once (memory: 4 × rows × vocab floats)


@contextlib.contextmanager
def _materialised(skeleton, i: int, tensors: dict):
    """Layer i of `skeleton` loaded from `tensors` (full names), dropped on exit."""
    layer = skeleton.layer(i)
    skeleton.load(tensors)
    try:
        skeleton.check_loaded(layer, f"layer {i}")
        yield layer
    finally:
        skeleton.drop(layer)


def _head(engine):
    """(final norm, output weight) of the source, loaded from the checkpoint (a tied head: the embeddings)."""
    sk = engine.skeleton
    names = [n for n in engine.stored if n in engine.globals or n.startswith("lm_head.")]
    sk.load({n: engine.source.read(engine.stored[n]) for n in names})
    norm = getattr(sk.base, "norm", None)
    if norm is None:
        raise UptrainError(f"{sk.config.model_type}: no final norm found (model.norm) for the KV-budget measure")
    out = sk.model.get_output_embeddings()
    weight = out.weight if not out.weight.is_meta else sk.model.get_input_embeddings().weight
    if weight.is_meta:
        raise UptrainError(f"{sk.config.model_type}: the checkpoint holds no output head nor embeddings")
    return norm, weight


@torch.no_grad()
def measure_losses(ctx, options) -> tuple[list[dict[int, float]], dict]:
    """(losses[l][G] for every layer and every G < K the source can be converted to, plus G = K at 0; the record:
    data, tokens, seconds)."""
    from tqdm.auto import tqdm

    from uptrain.checkpoint import DTYPES
    from uptrain.conversion.aligned import attention_suffixes
    from uptrain.conversion.calibrated import CalibratedMethod, Layouts, converted_model
    from uptrain.conversion.calibration import DEFAULT_BATCH_SIZE, SecondMoment, calibration_data
    from uptrain.conversion.layerwise import Batch, LayerByLayer, Skeleton, pick_device, run_layer, watch_attention
    from uptrain.conversion.refine import refine_attention

    t0 = time.time()
    o, spec, config = options, ctx.spec, ctx.config
    kv = ctx.kv_heads
    candidates = [g for g in spec.valid_groups(config) if g != kv]
    tokens = o.allocation_tokens or min(DEFAULT_ALLOCATION_TOKENS, o.calibration_tokens or DEFAULT_ALLOCATION_TOKENS)
    device = pick_device(o.device)
    blocks, record = calibration_data(ctx.src_dir, config, o.calibration, tokens, o.calibration_seq_len)
    engine = LayerByLayer(ctx.src_dir, spec, config, ctx.source, device)
    batches = engine.embed(blocks, o.calibration_batch_size or DEFAULT_BATCH_SIZE)
    skeletons = {g: Skeleton(ctx.src_dir, spec, device, *converted_model(spec, config, g)) for g in candidates}
    method = CalibratedMethod(o)  # the conversion's closed form (a pooling method, or aligned) and refine steps
    attention = engine.skeleton.attention_name
    o_name = spec.o[len(attention) + 1:]  # o_proj, relative to the attention module
    streams: dict[tuple[int, int], list[torch.Tensor]] = {}  # (layer, G) → hidden states per batch
    for i in tqdm(range(engine.layers), desc="measure layers for the KV budget", unit="layer",
                  disable=not ctx.progress):
        src, prefix = engine.read(i), engine.prefix(i)
        inputs = [b.hidden for b in batches]
        moment = SecondMoment() if method.aligned else None
        calls = []  # what the source's attention saw and returned: refinement fits to it

        def seen(call):
            if moment is not None:
                moment.add(call.x)
            if method.steps > 0:
                calls.append(call)

        with engine.layer(i, src) as layer:
            with watch_attention(layer.get_submodule(attention), seen):
                for b in batches:
                    b.hidden = run_layer(layer, b, i)
            for key, hidden in streams.items():  # the earlier layers' streams through this source layer
                streams[key] = [run_layer(layer, Batch(h, b.calls), i) for h, b in zip(hidden, batches)]
        here = [s for s in attention_suffixes(spec) if prefix + s in src]
        shapes = {s: tuple(src[prefix + s].shape) for s in here}
        c = moment.result() if moment is not None else None
        for g in candidates:
            at_g = _with_groups(ctx, g)
            layouts = Layouts(spec, config, g, shapes)
            new, _ = method.closed_form(i, layouts.canonical({s: src[prefix + s] for s in here}), c, at_g)
            # what a written checkpoint would hold: the checkpoint's dtype
            dtypes = {s: DTYPES[ctx.source.entries[engine.stored[prefix + s]].dtype] for s in new}
            new = {s: t.to(dtypes[s]).float() for s, t in new.items()}
            with _materialised(skeletons[g], i, {**src, **{prefix + s: t for s, t in layouts.converted(new).items()}}) \
                    as layer:
                if method.steps > 0:  # the conversion refines: so does the measure (calibrated.py's refinement)
                    attn = layer.get_submodule(attention)
                    refine_attention(attn, o_name, calls, method.steps, seed=i)
                    for n, p in attn.named_parameters():  # rounded to the checkpoint's dtype, as written
                        s = f"{attention}.{n}"
                        if s in dtypes:
                            p.data = p.data.to(dtypes[s]).float()
                streams[(i, g)] = [run_layer(layer, Batch(h, b.calls), i) for h, b in zip(inputs, batches)]
        del src, inputs
        calls.clear()  # the stored activations go now, not with the next layer's list
    norm, weight = _head(engine)
    kl = {key: 0.0 for key in streams}
    count = 0
    for j, b in enumerate(batches):
        rows = b.hidden.reshape(-1, b.hidden.shape[-1])
        count += rows.shape[0]
        for a in range(0, rows.shape[0], HEAD_ROWS):  # a few hundred positions at a time: vocab-wide logits
            ref = _log_probs(norm, weight, rows[a:a + HEAD_ROWS])
            p = ref.exp()
            for key, hidden in streams.items():
                lp = _log_probs(norm, weight, hidden[j].reshape(-1, rows.shape[1])[a:a + HEAD_ROWS])
                kl[key] += float((p * (ref - lp)).sum())
    engine.skeleton.drop(engine.skeleton.model)
    losses = [{kv: 0.0, **{g: max(kl[(i, g)] / count, 0.0) for g in candidates}} for i in range(engine.layers)]
    record.update(measure="KL(source || one layer converted), nats per token", device=device.type,
                  seconds=round(time.time() - t0, 2))
    return losses, record


def _log_probs(norm, weight, hidden: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(torch.nn.functional.linear(norm(hidden), weight).float(), dim=-1)


def _with_groups(ctx, g: int):
    import dataclasses

    return dataclasses.replace(ctx, groups=g, layer_groups=None)


def choose_groups(ctx, options) -> tuple[int | tuple[int, ...], dict]:
    """The KV heads of every layer for `options.kv_budget`: measured losses, then the exact knapsack. Returns
    (one G when every layer got the same, else the tuple G_l; the allocation record for uptrain.json)."""
    from uptrain.conversion.allocation import allocate, budget_heads

    layers = ctx.spec.layers(ctx.config)
    budget = budget_heads(options.kv_budget, [ctx.kv_heads] * layers, options.said("kv_budget"))
    losses, measured = measure_losses(ctx, options)
    chosen = allocate(losses, budget)
    uniform = {g: sum(x[g] for x in losses) for g in losses[0] if g * layers <= budget}
    record = {"kv_budget": options.kv_budget, "budget_heads": budget, "source_heads": ctx.kv_heads * layers,
              **chosen.to_dict(), "predicted_loss": chosen.loss,
              "uniform_loss": {str(g): v for g, v in sorted(uniform.items())},
              "losses": [{"layer": i, **{str(g): v for g, v in sorted(x.items())}} for i, x in enumerate(losses)],
              "measured": measured}
    del record["loss"]
    groups = chosen.groups
    return (groups[0] if len(set(groups)) == 1 else groups), record
