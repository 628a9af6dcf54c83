"""Calibrated conversion: `--method aligned`, and any method with `--refine-steps N`, layer by layer.

Before the converter writes anything, `prepare` runs the calibration text through the source one decoder
layer at a time (uptrain/conversion/layerwise.py) and, per layer:

  1. records what the source's attention sees (X) and returns (Y) on the calibration blocks — on the
     source model's hidden states, or (calibration_inputs: converted) on the already converted layers';
  2. merges the K/V heads in closed form: a pooling method (mean, mean-norm, …), or aligned (fitted in the
     second moment of X, maps folded into q and o: uptrain/merging.py);
  3. refines (refine steps > 0): the converted attention module fitted to Y on X (uptrain/conversion/refine.py);
  4. with converted inputs, runs the converted layer to make the next layer's inputs;
  5. puts the layer's new attention tensors, in the checkpoint's dtype, in a scratch folder beside the
     output (never the whole model in memory), from where the writer's `merge` takes them.

The merges work on canonical rows ([q | k | v], [out, in]: arch.Storage), as the writer's `merge` does; the
source skeleton is the checkpoint's own class, the converted one the class that holds G KV heads with the
source's module names (`engine_form`): the source's class with fewer KV heads where transformers has a KV-head
field, else uptrain/modeling's GQA class (gpt_neox: q, k, v fused per KV head; gpt2: Conv1D; opt), each loaded
in its own stored layout (`Layouts`).

Memory: one float32 decoder layer (two with converted inputs) + the carried hidden states, plus X and Y of
one layer when refining (each tokens × hidden float32) + one (hidden+1)² moment for aligned.
"""
from __future__ import annotations

import shutil
import tempfile
import time
import weakref
from pathlib import Path

import torch

from uptrain.conversion.aligned import attention_suffixes, check_supported, merge_aligned, static_pairs
from uptrain.conversion.calibration import DEFAULT_BATCH_SIZE, SecondMoment, calibration_data
from uptrain.conversion import distill as distillation
from uptrain.conversion.distill import Distillation, teacher
from uptrain.conversion.layerwise import Batch, LayerByLayer, pick_device, run_layer, watch_attention
from uptrain.conversion.pool_method import PoolMethod
from uptrain.conversion.refine import DEFAULT_LR, refine_attention, relative_error
from uptrain.errors import UptrainError

DEFAULT_INPUTS = "source"


class Scratch:
    """Per-layer tensors parked on disk between `prepare` and the writer (safetensors, one file a key): layer i
    under key i until the writer takes it; distillation's working copies and Adam moments under other keys."""

    def __init__(self, near: Path | None):
        parent = near.parent if near is not None else None
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        self.dir = Path(tempfile.mkdtemp(prefix=".uptrain-calibrated-", dir=parent))
        self.close = weakref.finalize(self, shutil.rmtree, self.dir, ignore_errors=True)  # at the latest
        self.left: set[int] = set()

    def put(self, key: int | str, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in tensors.items()}, self.dir / f"{key}.safetensors")
        if isinstance(key, int):
            self.left.add(key)

    def get(self, key: int | str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        return load_file(self.dir / f"{key}.safetensors")

    def has(self, key: int | str) -> bool:
        return (self.dir / f"{key}.safetensors").exists()

    def drop(self, key: int | str) -> None:
        (self.dir / f"{key}.safetensors").unlink(missing_ok=True)

    def take(self, key: int | str) -> dict[str, torch.Tensor]:
        out = self.get(key)
        self.drop(key)
        if isinstance(key, int):
            self.left.discard(key)
            if not self.left:
                self.close()
        return out


def engine_form(spec, config: dict, groups: int):
    """The form whose model computes the converted layers while calibrating: the result's own when it keeps
    the source's model type (native, or uptrain/modeling's GQA class), else the spec's remote-code form
    (GPT-2 → MQA is written as gpt_bigcode, whose layers take other arguments: GPT-2's GQA class with one KV
    head computes the same). None when there is neither."""
    form = spec.form(config, groups)
    if form is not None and (not form.model_type or form.per_layer):  # per-layer: Llama's module names
        return form
    return next((f for f in spec.forms if f.remote_code and not f.model_type
                 and f.applies(config, spec.heads(config), groups)), None)


def converted_model(spec, config: dict, groups: int) -> tuple[dict, type | None]:
    """(config overrides, model class or None for the config's own) of the converted skeleton."""
    import importlib

    from uptrain.arch import G
    from uptrain.modeling import TEMPLATES

    form = engine_form(spec, config, groups)
    if form.per_layer:  # G_l per layer: the template's model, configured as the result will be
        from uptrain.conversion.per_layer import per_layer_model_class

        return {}, per_layer_model_class(spec, config, groups)
    changes = form.config if form.config else {spec.kv_heads_field: G}
    overrides = {k: groups if v == G else v for k, v in changes.items() if k not in ("model_type", "architectures")}
    if form.remote_code is None:
        return overrides, None
    template = TEMPLATES[form.remote_code]
    return overrides, getattr(importlib.import_module(f"uptrain.modeling.{template.module}"), template.model_class)


def check_calibratable(spec, config: dict, options, groups=None) -> None:
    """Refuse, in the caller's words, sources whose converted layers the engine cannot build. `groups`: the G (or
    tuple G_l) converted to, when not options.groups (a KV budget's)."""
    groups = options.groups if groups is None else groups
    if engine_form(spec, config, groups) is None:
        raise UptrainError(f"{options.said('method')} with calibration cannot build the converted "
                           f"{config.get('model_type')} layers for {options.key('groups')} {groups} (no form "
                           f"of it keeps the source's module names). Use a data-free {options.key('method')} "
                           f"(mean, mean-norm) without {options.key('refine_steps')}")


class Layouts:
    """How one layer's attention tensors are stored in the source and in the converted skeleton (arch.Storage):
    the merges work on canonical rows ([q | k | v], [out, in]), the skeletons load their own layout (gpt_neox's
    q, k, v fused per KV head; GPT-2's transposed Conv1D)."""

    def __init__(self, spec, config: dict, groups: int, shapes: dict[str, tuple[int, ...]]):
        form = engine_form(spec, config, groups)
        self.read = {s: spec.storage(s, config) for s in shapes}
        self.write = {s: spec.storage(s, config, groups, form) for s in shapes}
        rows = {s: spec.rows(s, config, kv_heads=groups)[-1][2] for s in shapes if s in spec.kv}
        self.shapes = {s: spec.stored_shape(s, shape, rows[s], config, form) if s in rows else shape
                       for s, shape in shapes.items()}

    def canonical(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {s: self.read[s].canonical(t) for s, t in tensors.items()}

    def converted(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Canonical → as the converted skeleton stores them."""
        return {s: self.write[s].stored(t, self.shapes[s]) for s, t in tensors.items()}

    def from_converted(self, suffix: str, t: torch.Tensor) -> torch.Tensor:
        return self.write[suffix].canonical(t)


def rope_frequencies(model) -> torch.Tensor | None:
    """The model's RoPE angle per pair and position (its rotary module's inv_freq, after any rope scaling), or
    None when it has none or several that differ (per-layer-type RoPE: then no pair is merged as static)."""
    found = {}
    for name, buf in model.named_buffers():
        if name.rsplit(".", 1)[-1] == "inv_freq" and buf is not None and not buf.is_meta:
            found[tuple(buf.double().cpu().tolist())] = buf
    return next(iter(found.values())).double().cpu() if len(found) == 1 else None


def attention_error(engine: LayerByLayer, layer: int, tensors: dict[str, torch.Tensor], calls, only: str) -> float:
    """One layer's merge error: Σ‖attn′(X) − Y‖² / Σ‖Y‖² of the converted skeleton's attention built from
    `tensors` (the layer's checkpoint tensors by full name, as that skeleton stores them) on the recorded source
    calls (X the attention's input, Y what the source's attention returned)."""
    with engine.layer(layer, tensors, converted=True, only=only) as attn:
        return relative_error(attn, calls)


def opening_record(grouping: str, aligned: bool, weighted: bool, steps: int, aligned_layers: list,
                   refined_layers: list) -> dict:
    """The start of what a calibrated method records in uptrain.json's conversion section, shared by the
    decoder-only method here and the encoder-decoder one (seq2seq_aligned.py): the grouping, aligned's per-layer
    list, refinement's steps, rate and per-layer list (the lists fill as the layers are done)."""
    record = {"grouping": grouping}
    if aligned:
        record["aligned"] = {"weighted": weighted, "layers": aligned_layers}
    record["refine"] = {"steps": steps, "lr": DEFAULT_LR, "layers": refined_layers}
    return record


class CalibratedMethod:
    """A closed-form merge (aligned or a pooling method) + optional refinement, calibrated layer by layer."""

    layerwise = True

    def __init__(self, options):
        self.options = options
        self.name = options.method
        self.steps = options.steps
        self.inputs = options.calibration_inputs or DEFAULT_INPUTS
        self.grouping = options.grouping or "contiguous"
        self.distill_steps = options.distill
        self.scratch: Scratch | None = None
        self.aligned_layers: list[dict] = []
        self.refined_layers: list[dict] = []
        self.layouts: dict[int, Layouts] = {}  # per layer, for distillation
        self.dtypes: dict[int, dict] = {}

    @property
    def aligned(self) -> bool:
        return self.name == "aligned"

    def touched(self, spec) -> tuple[str, ...]:
        if self.aligned:
            check_supported(spec, options=self.options)
        return attention_suffixes(spec)

    # -- the closed form of one layer ------------------------------------------------------------
    def closed_form(self, layer: int, tensors: dict[str, torch.Tensor], moment, ctx,
                    static: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
        """{suffix: float32} of the attention tensors → (the same with G KV heads (q, o folded for aligned), what
        aligned's merge says of it); static: RoPE pairs aligned merges as unrotated."""
        if self.aligned:
            new, info = merge_aligned(tensors, moment, ctx.spec, ctx.config, ctx.groups, ctx.head_dim,
                                      self.grouping, self.options.weighted, static)
            return new, {"layer": layer, **info}
        kv = {s: t for s, t in tensors.items() if s in ctx.spec.kv}
        return {**tensors, **PoolMethod(self.name).merge(layer, kv, ctx)}, {}

    # -- the converter's interface ---------------------------------------------------------------
    def prepare(self, ctx) -> dict:
        o = self.options
        if self.aligned:
            check_supported(ctx.spec, ctx.config, options=o)
        check_calibratable(ctx.spec, ctx.config, o, ctx.layer_groups or ctx.groups)
        self.aligned_layers, self.refined_layers = [], []
        record = opening_record(self.grouping, self.aligned, o.weighted, self.steps, self.aligned_layers,
                                self.refined_layers)
        if ctx.unchanged:  # nothing to merge, nothing to calibrate: `merge` takes the closed form
            return record
        t0 = time.time()
        device = pick_device(o.device)
        blocks, calibration = calibration_data(ctx.src_dir, ctx.config, o.calibration, o.calibration_tokens,
                                               o.calibration_seq_len)
        calibration.update(inputs=self.inputs, device=device.type)
        self.scratch = Scratch(getattr(ctx, "out_dir", None))
        try:
            overrides, model_class = converted_model(ctx.spec, ctx.config, ctx.layer_groups or ctx.groups)
            engine = LayerByLayer(ctx.src_dir, ctx.spec, ctx.config, ctx.source, device, ctx.groups, overrides,
                                  model_class)
            size = o.calibration_batch_size or DEFAULT_BATCH_SIZE
            batches = engine.embed(blocks, size)
            first = [b.hidden.clone() for b in batches] if self.distill_steps else None
            self._run(engine, batches, ctx)
            if self.distill_steps:
                ids = [blocks[s:s + size] for s in range(0, blocks.shape[0], size)]
                record["distill"] = self._distill(engine, batches, ids, first, ctx)
        except BaseException:
            self.scratch.close()
            raise
        calibration["seconds"] = round(time.time() - t0, 2)
        record["calibration"] = calibration
        return record

    def _run(self, engine: LayerByLayer, batches, ctx) -> None:
        from tqdm.auto import tqdm

        from uptrain.checkpoint import DTYPES

        spec, attn_name = ctx.spec, engine.skeleton.attention_name
        o_name = spec.o[len(attn_name) + 1:]  # o_proj, relative to the attention module
        suffixes = attention_suffixes(spec)
        refine_on = self.steps > 0
        static = static_pairs(rope_frequencies(engine.skeleton.model), ctx.config) if self.aligned and spec.rope else 0
        keep_calls = refine_on or static > 0
        for i in tqdm(range(engine.layers), desc="calibrate" + (" + refine" if refine_on else ""), unit="layer",
                      disable=not ctx.progress):
            prefix = engine.prefix(i)
            src = engine.read(i)
            if ctx.layer_groups and ctx.at(i).groups == ctx.kv_heads:  # a layer that keeps its heads: copied as it
                with engine.layer(i, src) as layer:                    # is (plan.py); only its outputs are needed
                    for b in batches:
                        b.hidden = run_layer(layer, b, i)
                continue
            moment = SecondMoment() if self.aligned else None
            calls = []

            def seen(call):
                if moment is not None:
                    moment.add(call.x)
                if keep_calls:
                    calls.append(call)

            with engine.layer(i, src) as layer, watch_attention(engine.skeleton.attention(layer), seen,
                                                                 stop=self.inputs == "converted"):
                for b in batches:
                    out = run_layer(layer, b, i)
                    if out is not None:
                        b.hidden = out
            here = [s for s in suffixes if prefix + s in src]
            at = ctx.at(i)  # this layer's G (G_l of a per-layer result)
            layouts = Layouts(spec, ctx.config, at.groups, {s: tuple(src[prefix + s].shape) for s in here})
            # the merges see canonical rows, as the writer's `merge` does; the skeletons load their own layout
            mine = layouts.canonical({s: src[prefix + s] for s in here})
            dtypes = {s: DTYPES[ctx.source.entries[engine.stored[prefix + s]].dtype] for s in here}

            def converted_layer(src, new):
                return {**src, **{prefix + s: t for s, t in layouts.converted(new).items()}}

            def rounded(new):  # what the written checkpoint will hold: the converted stream and refinement start there
                return {s: t.to(dtypes[s]).float() for s, t in new.items()}

            c = moment.result() if moment is not None else None
            new, info = self.closed_form(i, mine, c, at, static)
            new = rounded(new)
            if static:
                # Merging the slow pairs as unrotated is the better start on pre-trained models, but only
                # approximately commutes with RoPE: where the per-pair merge is better (e.g. exact), it is kept.
                plain, plain_info = self.closed_form(i, mine, c, at, 0)
                plain = rounded(plain)
                errors = [attention_error(engine, i, converted_layer(src, t), calls, attn_name) for t in (new, plain)]
                if not errors[0] < errors[1]:
                    new, info = plain, plain_info
                info.update(static_pairs=static if errors[0] < errors[1] else 0,
                            attn_error={"static": errors[0], "per_pair": errors[1]})
            if info:
                self.aligned_layers.append(info)
            if refine_on:
                with engine.layer(i, converted_layer(src, new), converted=True, only=attn_name) as attn:
                    fit = refine_attention(attn, o_name, calls, self.steps, seed=i)
                    params = {f"{attn_name}.{n}": p for n, p in attn.named_parameters()}
                    missing = [s for s in new if s not in params]
                    if missing:
                        raise UptrainError(f"refinement found no parameter for {', '.join(missing)} in the "
                                           f"{ctx.config.get('model_type')} attention module")
                    new = rounded({s: layouts.from_converted(s, params[s].detach().to("cpu")) for s in new})
                self.refined_layers.append({"layer": i, **fit})
            calls.clear()  # X and Y of this layer: not needed any more
            if self.inputs == "converted":
                with engine.layer(i, converted_layer(src, new), converted=True) as layer:
                    for b in batches:
                        b.hidden = run_layer(layer, b, i)
            # distillation moves the tensors further: it needs them in float32 (merge() rounds them)
            self.scratch.put(i, {s: t if self.distill_steps else t.to(dtypes[s]) for s, t in new.items()})
            self.layouts[i], self.dtypes[i] = layouts, dtypes
            del src, new

    # -- end-to-end distillation (conversion/distill.py) ------------------------------------------
    def _teacher(self, engine: LayerByLayer, batches, ids, first) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The source's top-k next-token log-probabilities per batch. With source inputs the calibration pass
        left the source's last hidden states in the batches; with converted inputs the source runs again."""
        finals = [b.hidden for b in batches]
        if self.inputs == "converted":
            finals = [h.clone() for h in first]
            for i in range(engine.layers):
                with engine.layer(i, engine.read(i)) as layer:
                    for j, b in enumerate(batches):
                        finals[j] = run_layer(layer, Batch(finals[j], b.calls), i)
        with engine.top() as logits_of, torch.no_grad():
            return [teacher(logits_of(x, h)) for x, h in zip(ids, finals)]

    def _distill(self, engine: LayerByLayer, batches, ids, first, ctx) -> dict:
        from tqdm.auto import tqdm

        targets = self._teacher(engine, batches, ids, first)
        scratch = self.scratch

        def tensors(i):
            if i not in self.layouts:  # a layer that keeps its heads (per-layer G): the source's, never moved
                return engine.read(i)
            prefix, key = engine.prefix(i), (f"d{i}" if scratch.has(f"d{i}") else i)
            return {**engine.read(i), **{prefix + s: t for s, t in self.layouts[i].converted(scratch.get(key)).items()}}

        def put(i, new):
            prefix, layouts = engine.prefix(i), self.layouts[i]
            scratch.put(f"d{i}", {s: layouts.from_converted(s, new[prefix + s].cpu()) for s in self.dtypes[i]})

        state = Distillation(engine, ids, [Batch(h, b.calls) for h, b in zip(first, batches)], targets, tensors, put,
                             list(attention_suffixes(ctx.spec)), scratch, moving=set(self.layouts))
        bar = tqdm(total=self.distill_steps, desc="distil", unit="step", disable=not ctx.progress)
        try:
            result = distillation.distill(state, self.distill_steps, distillation.DEFAULT_DISTILL_LR,
                                          progress=lambda t, kl: (bar.update(1), bar.set_postfix(kl=f"{kl:.4f}")))
        finally:
            bar.close()
        for i in range(engine.layers):
            scratch.drop(f"adam{i}")
            if scratch.has(f"d{i}"):
                tuned = scratch.take(f"d{i}")
                if not result.get("undone"):
                    scratch.put(i, tuned)
        return result

    def merge(self, layer: int, tensors: dict[str, torch.Tensor], ctx) -> dict[str, torch.Tensor]:
        if self.scratch is None:  # G = K: nothing was merged
            if self.aligned:
                return dict(tensors)
            return self.closed_form(layer, tensors, None, ctx)[0]
        new = self.scratch.take(layer)
        missing = [s for s in tensors if s not in new]
        if missing:
            raise RuntimeError(f"calibrated merge of layer {layer} lacks {missing}")  # a bug guard
        return {s: new[s].to(tensors[s].dtype) for s in tensors}

    def stats(self, layer: int, inputs, outputs, ctx) -> dict:
        """K / V error per layer: aligned's calibration-weighted fit error (its heads live in another basis),
        else the relative change of the K / V weights; with refinement also the attention's relative output
        error on the calibration set before and after."""
        if self.aligned:
            entry = next((e for e in self.aligned_layers if e["layer"] == layer), None)
            out = ({"k_rel_error": entry["k_fit_error"] ** 0.5, "v_rel_error": entry["v_fit_error"] ** 0.5}
                   if entry else {"k_rel_error": 0.0, "v_rel_error": 0.0})
        else:
            out = PoolMethod(self.name).stats(layer, inputs, outputs, ctx)
        fit = next((e for e in self.refined_layers if e["layer"] == layer), None)
        if fit is not None:
            out.update(attn_error_before=fit["before"], attn_error_after=fit["after"])
        return out
