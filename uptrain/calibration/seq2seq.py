"""`--method aligned` and `--refine-steps` on encoder-decoders (T5, mT5, umT5).

Aligned: K and V of each pooled attention merged by PCA in the second moment of what they read, the
per-head maps folded into q and o (uptrain/merging.py, the no-RoPE path: T5 has relative position bias, no
rotary positions, no biases, no 1/√d scaling).

Unlike decoder-only models (the layer-by-layer engine, uptrain/calibration/method.py), the calibration
pass here loads the WHOLE source model in float32 and runs the calibration text through it once, with
forward pre-hooks on every pooled attention's q and k projections:

    decoder self-attention   q and K/V read the decoder's normed hidden state (one moment)
    cross-attention          q reads the decoder's, K/V read the ENCODER OUTPUT (two moments)
    encoder self-attention   (--attention all) q and K/V read the encoder's normed hidden state

merge_attention weighs the K/V fit by the K/V input's moment and the key fit by the queries that read it
(W_q C_q W_qᵀ). With one moment for both it takes one C; for cross-attention, q and K/V act on different
inputs, so the rows are laid side by side on a doubled input [x_dec, x_enc] whose moment is
block-diagonal (C_q, C_kv): q rows live in the first half, k and v rows in the second, and the folds never
mix them (see `merge_unit`).

The calibration text is span-corrupted as T5 pre-trains (uptrain/span_corruption.py: inputs of
calibration_seq_len tokens, their targets as decoder inputs) when the tokenizer has T5's sentinels, else
plain text blocks as encoder input and decoder target. Calibration options are the decoder-only ones
(ConvertOptions: calibration, calibration_tokens, calibration_seq_len, calibration_batch_size, device).

Refinement (--refine-steps N: default 200 for aligned, 0 for the pooling methods, as for decoder-only models;
any method with steps calibrates): the same pass records every pooled attention's calls (input, arguments,
output); each merged attention (aligned's closed form, or the pooling method's), built as the GQA class of
uptrain/modeling/modeling_gqa_t5.py, is then fitted to the source attention's outputs on them
(uptrain/calibration/refine.py: o refitted in closed form, then Adam on q, k, v, o; kept only if it beats the
closed form on held-out batches and makes no kind of text worse there: holdout.py). The relative position bias is never trained. End-to-end distillation
(--distill-steps) is decoder-only: refused here.

Left as they are: the relative position bias (per query head, shared from layer 0 in T5 / mT5): query heads
keep their order, which is why grouping is contiguous only. Not built: calibration on converted inputs.

Memory: the float32 model plus one (d_model + 1)² float64 moment per pooled self-attention and two per
cross-attention; with refinement also every pooled attention's recorded input and output (tokens × d_model
float32 each: the decoder's target tokens for decoder blocks, the source tokens for encoder blocks). Merged
tensors wait in a scratch folder beside the output until the writer takes them.
"""
from __future__ import annotations

import contextlib
import copy
import time

import torch

from uptrain.calibration.holdout import batch_kinds
from uptrain.calibration.layer_pass import closed_form
from uptrain.calibration.layers import SecondMoment, pick_device, watch_attention
from uptrain.calibration.method import CalibratedBase, opening_record
from uptrain.calibration.refine import refine
from uptrain.calibration.text import DEFAULT_BATCH_SIZE, calibration_data, default_seq_len
from uptrain.calibration.work import WorkFolder
from uptrain.checkpoint import DTYPES
from uptrain.conversion.context import ConvertContext
from uptrain.conversion.options import DEFAULT_CALIBRATION_TOKENS
from uptrain.errors import UptrainError
from uptrain.hf import load_model, load_tokenizer, resolve
from uptrain.kv_heads import LayerKey
from uptrain.merging import merge_attention
from uptrain.modeling import modeling_gqa_t5
from uptrain.span_corruption import SENTINEL, SpanCorruption


# ------------------------------------------------------------------------------------------ refusals
def check_seq2seq(options, model_type: str) -> None:
    """Refuse, in the caller's words, what calibration cannot do on an encoder-decoder yet."""
    if (options.grouping or "contiguous") != "contiguous":
        raise UptrainError(f"{options.said('grouping')} is not supported on {model_type}: it permutes query heads, "
                           f"and T5's relative position bias (one column per query head, shared by every "
                           f"layer) would no longer match them. Leave {options.key('grouping')} out (contiguous)")
    if options.distill_steps:
        raise UptrainError(f"{options.said('distill_steps')} is not supported on {model_type}: end-to-end "
                           f"distillation runs on decoder-only models. Leave {options.key('distill_steps')} out")
    if (options.calibration_inputs or "source") != "source":
        raise UptrainError(f"{options.said('calibration_inputs')} is not supported on {model_type}: its "
                           f"calibration runs the source model once. Leave {options.key('calibration_inputs')} out")


# ------------------------------------------------------------------------------------------ the math of one attention
def merge_unit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, c_q: torch.Tensor,
               c_kv: torch.Tensor | None, groups: int, head_dim: int, weighted: bool = True):
    """One T5 attention's aligned merge. q [H·d, D], k, v [K·d, D], o [D, H·d] (no biases); c_q [D, D] the
    second moment of q's input, c_kv that of K/V's input (None: the same input, self-attention).
    Returns (q′, k′ [G·d, D], v′, o′, info), float64."""
    big_d = q.shape[1]

    def heads(w, width):
        return w.double().reshape(-1, head_dim, width)

    if c_kv is None:
        c, qa, ka, va = c_q.double(), heads(q, big_d), heads(k, big_d), heads(v, big_d)
    else:  # q reads x_q, K/V read x_kv: rows on the doubled input [x_q, x_kv], moment diag(C_q, C_kv)
        c = torch.block_diag(c_q.double(), c_kv.double())
        zq, zk = torch.zeros_like(q.double()), torch.zeros_like(k.double())
        qa = heads(torch.cat([q.double(), zq], 1), 2 * big_d)
        ka, va = heads(torch.cat([zk, k.double()], 1), 2 * big_d), heads(torch.cat([zk, v.double()], 1), 2 * big_d)
    q2, k2, v2, o2, info = merge_attention(qa, ka, va, o.double(), c, groups, rope=False, weighted=weighted)
    if c_kv is not None:  # the folds combine rows only: q′ stays on x_q, k′ and v′ on x_kv
        q2, k2, v2 = q2[..., :big_d], k2[..., big_d:], v2[..., big_d:]
    return q2.reshape(-1, big_d), k2.reshape(-1, big_d), v2.reshape(-1, big_d), o2, info


# ------------------------------------------------------------------------------------------ calibration
def calibration_batches(blocks: torch.Tensor, span, batch_size: int):
    """[(input_ids, labels)] of `blocks`: span-corrupted (span: a SpanCorruption) or plain text (span None:
    the block is both the encoder input and the decoder target)."""
    out = []
    for i in range(0, len(blocks), batch_size):
        b = blocks[i: i + batch_size]
        if span is None:
            out.append((b, b))
        else:
            s = span(b, seed=0, first_index=i)
            out.append((torch.from_numpy(s["input_ids"]), torch.from_numpy(s["labels"])))
    return out


class _Watch:
    """Forward pre-hooks on one attention's q and k: the second moments of what they read. When k reads the
    very tensor q just read (self-attention) one moment serves both."""

    def __init__(self, attn, q_name: str, k_name: str):
        self.q, self.kv, self.last_q, self.calls = SecondMoment(), SecondMoment(), None, {"same": 0, "other": 0}
        self.handles = [attn.get_submodule(q_name).register_forward_pre_hook(self._on_q),
                        attn.get_submodule(k_name).register_forward_pre_hook(self._on_k)]

    def _on_q(self, module, args):
        self.last_q = args[0]
        self.q.add(args[0])

    def _on_k(self, module, args):
        if args[0] is self.last_q:
            self.calls["same"] += 1
        else:
            self.calls["other"] += 1
            self.kv.add(args[0])
        self.last_q = None

    def moments(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(C_q, C_kv or None) without the constant row: T5's projections have no bias."""
        if self.calls["same"] and self.calls["other"]:  # a bug guard: one attention is either self or cross
            raise RuntimeError(f"an attention's k read q's input on some calls and not on others: {self.calls}")
        c_q = self.q.result()[:-1, :-1]
        return c_q, self.kv.result()[:-1, :-1] if self.calls["other"] else None

    def close(self):
        for h in self.handles:
            h.remove()


# the GQA attention class of uptrain/modeling/modeling_gqa_t5.py for each model_type
GQA_ATTENTION_CLASSES = {"t5": "T5GQAAttention", "mt5": "MT5GQAAttention", "umt5": "UMT5GQAAttention"}


def refine_unit(source_attn, new: dict[str, torch.Tensor], calls, groups: int, steps: int, seed: int = 0,
                kinds=None):
    """Fit the merged attention ({suffix: float32} q, k, v, o) to what `source_attn` returned on its recorded
    calls (kinds: per call, the kind of text of each row): the GQA class with G KV heads, the source's relative
    position bias (frozen) → ({suffix: float32}, refine's record)."""
    cfg = copy.deepcopy(source_attn.config)  # the stack's own config: is_decoder sets the position buckets
    cfg.num_key_value_heads = groups
    cls = getattr(modeling_gqa_t5, GQA_ATTENTION_CLASSES[cfg.model_type])
    module = cls(cfg, has_relative_attention_bias=source_attn.has_relative_attention_bias,
                 layer_idx=source_attn.layer_idx, is_causal=source_attn.is_causal)
    weights = {n: t for n, t in source_attn.state_dict().items() if n.startswith("relative_attention_bias")}
    module.load_state_dict({**weights, **new}, strict=True)
    module.to(source_attn.q.weight.device).eval()  # eval: no dropout; gradients still flow
    fit = refine(module, calls, steps, o_proj=module.o, seed=seed, kinds=kinds,
                 train=lambda name: not name.startswith("relative_attention_bias"))
    params = dict(module.named_parameters())
    return {s: params[s].detach().to("cpu", torch.float32) for s in new}, fit


def calibration_text(ctx, options) -> tuple[torch.Tensor, tuple[str, ...], object, dict]:
    """(token blocks, each block's kind of text, SpanCorruption or None for plain text, calibration record) from
    the source's tokenizer."""
    tokenizer = load_tokenizer(resolve(ctx.src_dir, what="source"), why=(
        "calibration runs the source model on text and needs its tokenizer. Save the tokenizer into the "
        "checkpoint folder, or use a data-free method (mean, mean-norm) without refine steps"))
    tokens = options.calibration_tokens or DEFAULT_CALIBRATION_TOKENS
    inputs_length = min(options.calibration_seq_len or default_seq_len(ctx.config), tokens)
    # no <extra_id_k> in the tokenizer: plain text as encoder input and decoder target
    span = (SpanCorruption.for_tokenizer(tokenizer, inputs_length)
            if SENTINEL.format(0) in tokenizer.get_vocab() else None)
    raw = span.tokens_length if span is not None else inputs_length
    blocks, kinds, record = calibration_data(ctx.src_dir, ctx.config, options.calibration, max(tokens, raw), raw, tokenizer)
    unk = tokenizer.unk_token_id
    if unk is not None and (blocks == unk).float().mean().item() > 0.1:  # e.g. a blank tokenizer (no files)
        raise UptrainError(f"the source's tokenizer turns much of the calibration text into its unknown token "
                           f"{tokenizer.unk_token!r}: calibration runs the source model on text and needs the "
                           f"tokenizer the model was trained with. Save it into the checkpoint folder, or use "
                           f"a data-free method (mean, mean-norm) without refine steps")
    record.update(objective="span corruption" if span is not None else "text", inputs="source",
                  model="the whole source model, float32",
                  inputs_length=span.inputs_length if span is not None else raw,
                  targets_length=span.targets_length if span is not None else raw)
    return blocks, kinds, span, record


class Seq2SeqCalibrated(CalibratedBase):
    """Calibrated conversion of an encoder-decoder spec (arch.AttentionSpec with blocks): aligned, and aligned
    or a pooling method with refine steps. The whole source model is calibrated in `prepare`; the merged
    tensors are parked on disk until the writer's `merge` takes them."""

    def _key(self, entry: dict) -> LayerKey:
        return (entry["block"], entry["layer"])

    def _pooled(self, unit: LayerKey, ctx: ConvertContext) -> bool:
        return unit in ctx.spec.units(ctx.config)

    def touched(self, spec) -> tuple[str, ...]:
        return (*spec.kv, f"{spec.q}.weight", f"{spec.o}.weight")

    def closed_form(self, unit: tuple[str, int], w: dict[str, torch.Tensor], watch, ctx,
                    cached: bool = True) -> tuple[dict, dict]:
        """{suffix: float32} of one pooled attention (k, v, q, o) of unit (block name, layer) → (the same with
        G KV heads, its record). watch: its _Watch (aligned); cached: a decoder block."""
        spec, (block, i) = ctx.spec, unit
        if not self.aligned:  # the pooling method, as the streaming path merges it (the same seeds)
            return closed_form(self.recipe, unit, w, None, ctx)[0], {"block": block, "layer": i}
        role = {spec.rows(s, ctx.config)[0][0]: s for s in spec.kv}  # {"k": "k.weight", "v": "v.weight"}
        c_q, c_kv = watch.moments()
        q, k, v, out, info = merge_unit(w[f"{spec.q}.weight"], w[role["k"]], w[role["v"]], w[f"{spec.o}.weight"],
                                        c_q, c_kv, ctx.groups, ctx.head_dim, self.options.weighted)
        new = {f"{spec.q}.weight": q, role["k"]: k, role["v"]: v, f"{spec.o}.weight": out}
        kv_input = "encoder output" if c_kv is not None else "decoder" if cached else "encoder"
        return new, {"block": block, "layer": i, **info, "kv_input": kv_input}

    def prepare(self, ctx) -> dict:
        o, spec = self.options, ctx.spec
        self.merged, self.refined = [], []
        record = opening_record("contiguous", self.aligned, o.weighted, o.steps, self.merged, self.refined)
        if ctx.groups == ctx.kv_heads:  # nothing to merge, nothing to calibrate: `merge` takes the closed form
            return record
        t0 = time.time()
        blocks, kinds, span, calibration = calibration_text(ctx, o)
        size = o.calibration_batch_size or DEFAULT_BATCH_SIZE
        rows = batch_kinds(kinds, [len(blocks[s:s + size]) for s in range(0, len(blocks), size)])
        device = pick_device(o.device)
        calibration["device"] = device.type
        model = load_model(resolve(ctx.src_dir, what="source"), dtype=torch.float32, device=device, quiet=True)
        model.eval()
        units = [(b, i) for b in spec.blocks if b.pooled for i in range(b.layers(ctx.config))]
        attn = {u: model.get_submodule(u[0].prefix.format(u[1]).rstrip(".")) for u in units}
        k_module = next(s for s in spec.kv if spec.rows(s, ctx.config)[0][0] == "k").rsplit(".", 1)[0]
        watches = {u: _Watch(attn[u], spec.q, k_module) for u in units} if self.aligned else {}
        calls: dict = {u: [] for u in units}
        try:
            with torch.no_grad(), contextlib.ExitStack() as stack:
                if o.steps > 0:  # every call of every pooled attention: what refinement fits to
                    for u in units:
                        stack.enter_context(watch_attention(attn[u], calls[u].append))
                for ids, labels in calibration_batches(blocks, span, size):
                    model(input_ids=ids.to(device), labels=labels.to(device), use_cache=False)
        finally:
            for watch in watches.values():
                watch.close()
        # one pass over the whole model: nothing to resume from, so the folder is a temporary one
        self.work = work = WorkFolder.temporary(ctx.out_dir)
        try:
            for block, i in units:
                a = attn[(block, i)]
                w = {s: a.get_submodule(s.rsplit(".", 1)[0]).weight.detach().float().cpu() for s in self.touched(spec)}
                new, info = self.closed_form((block.name, i), w, watches.pop((block, i), None), ctx, block.cached)
                dtypes = {s: DTYPES[ctx.source.entries[block.prefix.format(i) + s].dtype] for s in new}
                # what the written checkpoint will hold: refinement starts from it
                new = {s: t.to(dtypes[s]).float() for s, t in new.items()}
                if o.steps > 0:
                    new, fit = refine_unit(a, new, calls.pop((block, i)), ctx.groups, o.steps, seed=len(self.refined),
                                           kinds=rows)
                    self.refined.append({"block": block.name, "layer": i, **fit})
                work.put(f"{block.name}-{i}", {s: t.to(dtypes[s]) for s, t in new.items()})
                self.merged.append(info)
        except BaseException:
            self.finish()
            raise
        del model
        calibration["seconds"] = round(time.time() - t0, 2)
        record["calibration"] = calibration
        return record

    def merge(self, unit, tensors: dict[str, torch.Tensor], ctx) -> dict[str, torch.Tensor]:
        block, i = unit
        if self._entry(self.merged, tuple(unit)) is None:  # a block that is not pooled (q / o pass through), or G = K
            pooled = ctx.groups == ctx.kv_heads and unit in ctx.spec.units(ctx.config)
            if pooled and not self.aligned:  # what the streaming pooling method writes
                return self.closed_form(unit, tensors, None, ctx)[0]
            return dict(tensors)
        return {s: t.float() for s, t in self._parked(f"{block}-{i}", unit, tensors).items()}
