"""The one layer pass: read a decoder layer → watch its attention's inputs → run it → closed form → round →
refine. The conversion (method.py), the KV-budget measure (sensitivity.py), distillation's forward (distill.py)
and the tests all drive it.

As GPTQ-style quantizers do (llm-compressor's sequential pipeline), the calibration blocks' hidden states are
carried from layer to layer and only one layer is materialised at a time (layers.py): `run` is the loop, and
calls back per layer with what it saw (`LayerStep`); `convert` turns one seen layer into the converted one:

  1. the closed form: a pooling method (mean, mean-norm, …), or aligned, fitted in the second moment of the
     attention's input X with maps folded into q and o (aligned.py; the math in uptrain/merging.py);
  2. rounded to the checkpoint's dtype (what the written checkpoint will hold: refinement starts there);
  3. refined (refine steps > 0): the converted attention module fitted to what the source's attention
     returned (Y) on X (refine.py), rounded again.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from uptrain.calibration.aligned import attention_suffixes, merge_aligned
from uptrain.calibration.converted import Layouts
from uptrain.calibration.holdout import batch_kinds
from uptrain.calibration.layers import AttentionCall, Batch, LayerByLayer, SecondMoment, pick_device, run_layer, \
    watch_attention
from uptrain.calibration.refine import refine_attention, relative_error
from uptrain.calibration.text import DEFAULT_BATCH_SIZE, calibration_data
from uptrain.checkpoint import DTYPES
from uptrain.conversion.context import ConvertContext
from uptrain.conversion.pool_method import PoolMethod
from uptrain.errors import UptrainError
from uptrain.kv_heads import KVHeads


@dataclass(frozen=True)
class Recipe:
    """How a layer is converted: the closed form (a pooling method, or aligned with its grouping and weighting)
    and refinement's Adam steps (0: none)."""

    method: str
    grouping: str = "contiguous"
    weighted: bool = True
    steps: int = 0

    @classmethod
    def of(cls, options: Any) -> Recipe:
        """From checked ConvertOptions."""
        return cls(options.method, options.grouping or "contiguous", bool(options.weighted), options.steps)

    @property
    def aligned(self) -> bool:
        return self.method == "aligned"


def closed_form(recipe: Recipe, layer: Any, tensors: dict[str, torch.Tensor], moment: torch.Tensor | None,
                ctx: ConvertContext, static: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """{suffix: float32} of a layer's attention tensors (canonical rows) → (the same with ctx.groups KV heads
    (q, o folded for aligned), what aligned's merge says of it: {} for a pooling method); static: RoPE pairs
    aligned merges as unrotated."""
    if recipe.aligned:
        assert moment is not None and ctx.groups is not None
        new, info = merge_aligned(tensors, moment, ctx.spec, ctx.config, ctx.groups, ctx.head_dim,
                                  recipe.grouping, recipe.weighted, static)
        return new, {"layer": layer, **info}
    kv = {s: t for s, t in tensors.items() if s in ctx.spec.kv}
    return {**tensors, **PoolMethod(recipe.method).merge(layer, kv, ctx)}, {}


@dataclass
class LayerStep:
    """What the pass saw of one source layer."""

    index: int
    tensors: dict[str, torch.Tensor]  # its checkpoint tensors (full names), float32
    inputs: list[torch.Tensor]  # the hidden states entering it, per batch
    calls: list[AttentionCall] = field(default_factory=list)  # what its attention saw and returned (kept ones)
    moment: torch.Tensor | None = None  # C of its attention's input (aligned)


@dataclass
class Converted:
    """One converted layer: its attention tensors (canonical rows, float32, rounded to `dtypes`) and records."""

    tensors: dict[str, torch.Tensor]
    layouts: Layouts
    dtypes: dict[str, torch.dtype]
    info: dict  # aligned's record of the merge ({} for a pooling method)
    fit: dict | None  # refinement's record (None without refinement)


class LayerPass:
    """The calibration blocks through a checkpoint, one decoder layer at a time (`run`), and the conversion of a
    seen layer (`convert`). `moment`: collect the second moment of each watched attention's input; `calls`:
    keep each watched attention's calls (input, arguments, output) for refinement; `kinds`: each block's kind of
    text (calibration_mix), which refinement holds out and judges by (None: one kind)."""

    def __init__(self, engine: LayerByLayer, batches: list[Batch], recipe: Recipe | None = None, *,
                 moment: bool = False, calls: bool = False, progress: bool = True,
                 kinds: Sequence[str] | None = None):
        self.engine, self.batches, self.recipe = engine, batches, recipe
        self.moment, self.calls, self.progress = moment, calls, progress
        self.kinds = tuple(kinds) if kinds is not None else None
        self.attention = engine.skeleton.attention_name  # "self_attn"

    @property
    def layers(self) -> int:
        return self.engine.layers

    @property
    def batch_kinds(self) -> list[tuple[str, ...]] | None:
        """Per batch, the kind of text of each of its blocks (None: one kind)."""
        if self.kinds is None:
            return None
        return batch_kinds(self.kinds, [b.hidden.shape[0] for b in self.batches])

    def run(self, visit: Callable[[LayerStep], None] | None = None, *, start: int = 0,
            tensors_of: Callable[[int], dict[str, torch.Tensor]] | None = None, groups: KVHeads | None = None,
            watch: Callable[[int], bool] = lambda i: True, stop_after_attention: bool = False,
            through: Callable[[int, torch.nn.Module], None] | None = None,
            done: Callable[[int], None] | None = None, desc: str = "calibrate") -> None:
        """Layers start … L-1 in turn: read (`tensors_of(i)`, default the source's), materialised in the source
        skeleton (or the one converted to `groups`), its attention watched where `watch(i)`, run over every batch
        (the batches' hidden states move on, unless `stop_after_attention` ended a watched layer after its
        attention); `through(i, layer)` while it is materialised, `visit(step)` after (watched layers), then
        `done(i)`."""
        from tqdm.auto import tqdm

        e = self.engine
        for i in tqdm(range(start, e.layers), initial=start, total=e.layers, desc=desc, unit="layer",
                      disable=not self.progress):
            tensors = tensors_of(i) if tensors_of is not None else e.read(i)
            watched = watch(i)
            moment = SecondMoment() if watched and self.moment else None
            calls: list[AttentionCall] = []

            def seen(call: AttentionCall) -> None:
                if moment is not None:
                    moment.add(call.x)
                if self.calls:
                    calls.append(call)

            inputs = [b.hidden for b in self.batches]
            with e.layer(i, tensors, groups) as layer:
                with (watch_attention(e.skeleton_for(groups).attention(layer), seen, stop=stop_after_attention)
                      if watched else contextlib.nullcontext()):
                    for b in self.batches:
                        out = run_layer(layer, b, i)
                        if out is not None:
                            b.hidden = out
                if through is not None:  # other streams through the same layer, unwatched
                    through(i, layer)
            if watched and visit is not None:
                visit(LayerStep(i, tensors, inputs, calls, moment.result() if moment is not None else None))
            calls.clear()  # X and Y of this layer: not needed any more
            if done is not None:
                done(i)

    # -- one seen layer, converted ----------------------------------------------------------------
    def convert(self, step: LayerStep, at: ConvertContext, static: int = 0,
                model: KVHeads | None = None) -> Converted:
        """The closed form of step's layer at `at.groups` KV heads, rounded, refined (recipe.steps > 0), rounded.
        `static`: RoPE pairs aligned may merge as unrotated (kept only where its attention error is lower than
        the per-pair merge's); `model`: the KV heads of the converted skeleton (a per-layer result's G_l)."""
        e, spec, i, recipe = self.engine, at.spec, step.index, self.recipe
        assert at.groups is not None and recipe is not None, "a pass that converts has a recipe"
        prefix, src = e.prefix(i), step.tensors
        model = model or KVHeads(uniform=at.groups)
        here = [s for s in attention_suffixes(spec) if prefix + s in src]
        layouts = Layouts(spec, at.config, at.groups, {s: tuple(src[prefix + s].shape) for s in here})
        # the merges see canonical rows, as the writer's `merge` does; the skeletons load their own layout
        mine = layouts.canonical({s: src[prefix + s] for s in here})
        dtypes = {s: DTYPES[at.source.entries[e.stored[prefix + s]].dtype] for s in here}

        def rounded(new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {s: t.to(dtypes[s]).float() for s, t in new.items()}

        new, info = closed_form(recipe, i, mine, step.moment, at, static)
        new = rounded(new)
        if static:
            # Merging the slow pairs as unrotated is the better start on pre-trained models, but only
            # approximately commutes with RoPE: where the per-pair merge is better (e.g. exact), it is kept.
            plain, plain_info = closed_form(recipe, i, mine, step.moment, at, 0)
            plain = rounded(plain)
            errors = [self.attention_error(i, self.full(step, layouts, t), step.calls, model) for t in (new, plain)]
            if not errors[0] < errors[1]:
                new, info = plain, plain_info
            info.update(static_pairs=static if errors[0] < errors[1] else 0,
                        attn_error={"static": errors[0], "per_pair": errors[1]})
        fit = None
        if recipe.steps > 0:
            o_name = spec.o[len(self.attention) + 1:]  # o_proj, relative to the attention module
            with e.layer(i, self.full(step, layouts, new), model, only=self.attention) as attn:
                fit = refine_attention(attn, o_name, step.calls, recipe.steps, seed=i, kinds=self.batch_kinds)
                params = {f"{self.attention}.{n}": p for n, p in attn.named_parameters()}
                missing = [s for s in new if s not in params]
                if missing:
                    raise UptrainError(f"refinement found no parameter for {', '.join(missing)} in the "
                                       f"{at.config.get('model_type')} attention module")
                new = rounded({s: layouts.from_converted(s, params[s].detach().to("cpu")) for s in new})
        return Converted(new, layouts, dtypes, info, fit)

    def full(self, step: LayerStep, layouts: Layouts, new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The converted layer's tensors by full name, as its skeleton stores them: the source's with `new`."""
        prefix = self.engine.prefix(step.index)
        return {**step.tensors, **{prefix + s: t for s, t in layouts.converted(new).items()}}

    def attention_error(self, i: int, tensors: dict[str, torch.Tensor], calls: list[AttentionCall],
                        model: KVHeads) -> float:
        """One layer's merge error Σ‖attn′(X) − Y‖² / Σ‖Y‖² of the converted attention built from `tensors` on
        the recorded source calls."""
        with self.engine.layer(i, tensors, model, only=self.attention) as attn:
            return relative_error(attn, calls)

    def run_converted(self, i: int, tensors: dict[str, torch.Tensor], model: KVHeads,
                      inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Converted layer i (full tensors) over `inputs` (per batch)."""
        with self.engine.layer(i, tensors, model) as layer:
            out = [run_layer(layer, Batch(h, b.calls), i) for h, b in zip(inputs, self.batches)]
        assert all(o is not None for o in out)
        return out  # type: ignore[return-value]


def open_pass(ctx: ConvertContext, options: Any, recipe: Recipe | None = None, *, tokens: int | None = None,
              moment: bool = False, calls: bool = False, fits: bool | None = None,
              say: Callable[[str], None] | None = None) -> tuple[LayerPass, torch.Tensor, dict]:
    """(the pass over the calibration text of `options` (first `tokens` tokens; default calibration_tokens)
    through ctx's source, with each block's kind of text; its token blocks; the calibration record). The blocks
    are embedded: the batches' hidden states enter layer 0. `fits`: whether anything is fitted on the text
    (default: the options' refinement or distillation; a few tokens are then warned about)."""
    device = pick_device(options.device)
    recipe = recipe or Recipe.of(options)
    if fits is None:  # the conversion's own pass: refinement and distillation fit on it
        fits = recipe.steps > 0 or options.distill > 0
    blocks, kinds, record = calibration_data(ctx.src_dir, ctx.config, options.calibration,
                                      tokens or options.calibration_tokens, options.calibration_seq_len, say=say,
                                      fits=fits)
    record["device"] = device.type
    engine = LayerByLayer(ctx.src_dir, ctx.spec, ctx.config, ctx.source, device)
    batches = engine.embed(blocks, options.calibration_batch_size or DEFAULT_BATCH_SIZE)
    return LayerPass(engine, batches, recipe, moment=moment, calls=calls,
                     progress=ctx.progress, kinds=kinds), blocks, record
