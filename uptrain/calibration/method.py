"""Calibrated conversion as a conversion method: `--method aligned`, and any method with `--refine-steps N`.

Before the converter writes anything, `prepare` runs the calibration text through the source one decoder
layer at a time (the layer pass: layer_pass.py) and, per layer:

  1. records what the source's attention sees (X) and returns (Y) on the calibration blocks — on the
     source model's hidden states, or (calibration_inputs: converted) on the already converted layers';
  2. converts it: closed form, rounded to the checkpoint's dtype, refined (LayerPass.convert);
  3. with converted inputs, runs the converted layer to make the next layer's inputs;
  4. parks the layer's new attention tensors, and the hidden states the next layer starts from, in the work
     folder beside the output (work.py), from where the writer's `merge` takes them: killed and rerun with
     the same command, the conversion resumes after the last parked layer and writes the same bits.

Then, with `--distill-steps`, end-to-end distillation (distill.py). Encoder-decoders calibrate on their whole
model instead (seq2seq.py); both are a `CalibratedBase`.

Memory: one float32 decoder layer (two with converted inputs) + the carried hidden states, plus X and Y of
one layer when refining (each tokens × hidden float32) + one (hidden+1)² moment for aligned.
"""
from __future__ import annotations

import sys
import time
from typing import Any

import torch

from uptrain.calibration import distill as distillation
from uptrain.calibration.aligned import attention_suffixes, check_supported, static_pairs
from uptrain.calibration.converted import Layouts, check_calibratable, rope_frequencies
from uptrain.calibration.distill import Distillation, teacher
from uptrain.calibration.layer_pass import LayerPass, LayerStep, Recipe, closed_form, open_pass
from uptrain.calibration.layers import Batch
from uptrain.calibration.refine import DEFAULT_LR
from uptrain.calibration.work import WorkFolder, work_fingerprint
from uptrain.conversion.context import ConvertContext
from uptrain.conversion.pool_method import PoolMethod
from uptrain.kv_heads import KVHeads, LayerKey

DEFAULT_INPUTS = "source"


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def opening_record(grouping: str, aligned: bool, weighted: bool, steps: int, aligned_layers: list,
                   refined_layers: list) -> dict:
    """The start of what a calibrated method records in uptrain.json's conversion section: the grouping,
    aligned's per-layer list, refinement's steps, rate and per-layer list (the lists fill as the layers are done)."""
    record: dict[str, Any] = {"grouping": grouping}
    if aligned:
        record["aligned"] = {"weighted": weighted, "layers": aligned_layers}
    record["refine"] = {"steps": steps, "lr": DEFAULT_LR, "layers": refined_layers}
    return record


class CalibratedBase:
    """What the decoder-only and the encoder-decoder calibrated methods share: the recipe, the per-unit records
    (aligned's fit, refinement's errors), the work folder the merged tensors wait in, and the writer's side of
    the method interface (`merge` takes a parked unit, `stats` reads the records, `finish` clears the folder)."""

    layerwise = True

    def __init__(self, options: Any):
        self.options = options
        self.name = options.method
        self.recipe = Recipe.of(options)
        self.merged: list[dict] = []  # aligned's record per unit merged
        self.refined: list[dict] = []  # refinement's record per unit refined
        self.work: WorkFolder | None = None

    @property
    def aligned(self) -> bool:
        return self.recipe.aligned

    def _key(self, entry: dict) -> LayerKey:
        return entry["layer"]

    def _entry(self, records: list[dict], unit: LayerKey) -> dict | None:
        key = tuple(unit) if isinstance(unit, list) else unit  # a unit may come as a list from JSON
        return next((e for e in records if self._key(e) == key), None)

    def _pooled(self, unit: LayerKey, ctx: ConvertContext) -> bool:
        return True

    def stats(self, unit: LayerKey, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor],
              ctx: ConvertContext) -> dict:
        """K / V error per unit: aligned's calibration-weighted fit error (its heads live in another basis),
        else the relative change of the K / V weights; with refinement also the attention's relative output
        error on the calibration set before and after. {} for units passed through."""
        if not self._pooled(unit, ctx):
            return {}
        if self.aligned:
            entry = self._entry(self.merged, unit)
            out = ({"k_rel_error": entry["k_fit_error"] ** 0.5, "v_rel_error": entry["v_fit_error"] ** 0.5}
                   if entry else {"k_rel_error": 0.0, "v_rel_error": 0.0})
        else:
            out = PoolMethod(self.name).stats(unit, inputs, outputs, ctx)
        fit = self._entry(self.refined, unit)
        if fit is not None:
            out.update(attn_error_before=fit["before"], attn_error_after=fit["after"])
        return out

    def _parked(self, key: str, unit: LayerKey, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        assert self.work is not None
        new = self.work.get(key)
        missing = [s for s in tensors if s not in new]
        if missing:
            raise RuntimeError(f"calibrated merge of {unit} lacks {missing}")  # a bug guard
        return {s: new[s].to(tensors[s].dtype) for s in tensors}

    def finish(self) -> None:
        if self.work is not None:
            self.work.remove()
            self.work = None


class CalibratedMethod(CalibratedBase):
    """A closed-form merge (aligned or a pooling method) + optional refinement and distillation, calibrated
    layer by layer on a decoder-only model."""

    def __init__(self, options: Any):
        super().__init__(options)
        self.inputs = options.calibration_inputs or DEFAULT_INPUTS
        self.grouping = options.grouping or "contiguous"
        self.distill_steps = options.distill

    def touched(self, spec: Any) -> tuple[str, ...]:
        if self.aligned:
            check_supported(spec, options=self.options)
        return attention_suffixes(spec)

    # -- the converter's interface ---------------------------------------------------------------
    def prepare(self, ctx: ConvertContext) -> dict:
        o = self.options
        if self.aligned:
            check_supported(ctx.spec, ctx.config, options=o)
        groups = ctx.kv_heads_of_result
        check_calibratable(ctx.spec, ctx.config, o, groups)
        self.merged, self.refined = [], []
        record = opening_record(self.grouping, self.aligned, o.weighted, o.steps, self.merged, self.refined)
        if ctx.unchanged:  # nothing to merge, nothing to calibrate: `merge` takes the closed form
            return record
        t0 = time.time()
        layer_pass, blocks, calibration = open_pass(ctx, o, moment=self.aligned)
        calibration.update(inputs=self.inputs)
        work = self.work = WorkFolder.beside(ctx.out_dir, work_fingerprint(ctx, o, blocks, layer_pass.kinds, groups=str(groups)), say)
        try:
            first = [b.hidden.clone() for b in layer_pass.batches] if self.distill_steps else None
            self._run(layer_pass, ctx, groups)
            if self.distill_steps:
                assert first is not None
                size = len(layer_pass.batches[0].hidden)
                ids = [blocks[s:s + size] for s in range(0, blocks.shape[0], size)]
                if "distill" not in work.state:
                    work.drop_all("d")
                    work.drop_all("adam")
                    work.save(distill=self._distill(layer_pass, ids, first, ctx, groups))
                record["distill"] = work.state["distill"]
        except BaseException:
            if work.disposable:
                work.remove()
            raise
        calibration["seconds"] = round(time.time() - t0, 2)
        record["calibration"] = calibration
        return record

    def _converts(self, ctx: ConvertContext, i: int) -> bool:
        """Whether layer i is converted (a per-layer result's layer that keeps the source's heads is copied)."""
        return not (ctx.layer_groups and ctx.at(i).groups == ctx.kv_heads)

    def _run(self, layer_pass: LayerPass, ctx: ConvertContext, groups: KVHeads) -> None:
        work = self.work
        assert work is not None
        e, layers = layer_pass.engine, layer_pass.layers
        start = int(work.state.get("layers_done", 0))
        if start:
            hidden = work.get(f"hidden-{start}")
            for j, b in enumerate(layer_pass.batches):
                b.hidden = hidden[str(j)].to(b.hidden.device)
            self.merged[:], self.refined[:] = work.state["merged"], work.state["refined"]
            say(f"resuming from layer {start} of {layers}: layers 0-{start - 1} were finished by an earlier run of "
                f"this command ({work.path})")
        static = (static_pairs(rope_frequencies(e.skeleton.model), ctx.config)
                  if self.aligned and ctx.spec.rope else 0)
        layer_pass.calls = self.recipe.steps > 0 or static > 0

        def visit(step: LayerStep) -> None:
            i = step.index
            new = layer_pass.convert(step, ctx.at(i), static, model=groups)
            if new.info:
                self.merged.append(new.info)
            if new.fit is not None:
                self.refined.append({"layer": i, **new.fit})
            if self.inputs == "converted":
                out = layer_pass.run_converted(i, layer_pass.full(step, new.layouts, new.tensors), groups, step.inputs)
                for b, h in zip(layer_pass.batches, out):
                    b.hidden = h
            # distillation moves the tensors further: it needs them in float32 (merge() rounds them)
            work.put(f"layer-{i}", {s: t if self.distill_steps else t.to(new.dtypes[s])
                                    for s, t in new.tensors.items()})

        def done(i: int) -> None:
            work.put(f"hidden-{i + 1}", {str(j): b.hidden for j, b in enumerate(layer_pass.batches)})
            work.save(layers_done=i + 1, merged=self.merged, refined=self.refined)
            work.drop(f"hidden-{i}")

        if start < layers:
            layer_pass.run(visit, start=start, watch=lambda i: self._converts(ctx, i), done=done,
                           stop_after_attention=self.inputs == "converted",
                           desc="calibrate" + (" + refine" if self.recipe.steps > 0 else ""))

    # -- end-to-end distillation (distill.py) ------------------------------------------------------
    def _teacher(self, layer_pass: LayerPass, ids: list[torch.Tensor],
                 first: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The source's top-k next-token log-probabilities per batch. With source inputs the calibration pass
        left the source's last hidden states in the batches; with converted inputs the source runs again."""
        e = layer_pass.engine
        if self.inputs == "converted":
            again = LayerPass(e, [Batch(h.clone(), b.calls) for h, b in zip(first, layer_pass.batches)],
                              layer_pass.recipe, progress=False)
            again.run(desc="teacher")
            finals = [b.hidden for b in again.batches]
        else:
            finals = [b.hidden for b in layer_pass.batches]
        with e.top() as logits_of, torch.no_grad():
            return [teacher(logits_of(x, h)) for x, h in zip(ids, finals)]

    def _distill(self, layer_pass: LayerPass, ids: list[torch.Tensor], first: list[torch.Tensor],
                 ctx: ConvertContext, groups: KVHeads) -> dict:
        from tqdm.auto import tqdm

        work = self.work
        assert work is not None
        e = layer_pass.engine
        targets = self._teacher(layer_pass, ids, first)
        moving = {i for i in range(e.layers) if self._converts(ctx, i)}

        def layouts(i: int) -> Layouts:
            prefix = e.prefix(i)
            shapes = {s: tuple(ctx.source.entries[e.stored[prefix + s]].shape) for s in attention_suffixes(ctx.spec)
                      if prefix + s in e.stored}
            return Layouts(ctx.spec, ctx.config, ctx.kv_heads_of_result.at(i), shapes)

        def tensors(i: int) -> dict[str, torch.Tensor]:
            if i not in moving:  # a layer that keeps its heads (per-layer G): the source's, never moved
                return e.read(i)
            prefix, key = e.prefix(i), (f"d{i}" if work.has(f"d{i}") else f"layer-{i}")
            return {**e.read(i), **{prefix + s: t for s, t in layouts(i).converted(work.get(key)).items()}}

        def put(i: int, new: dict[str, torch.Tensor]) -> None:
            prefix, lay = e.prefix(i), layouts(i)
            work.put(f"d{i}", {s: lay.from_converted(s, new[prefix + s].cpu()) for s in lay.shapes})

        state = Distillation(e, ids, [Batch(h, b.calls) for h, b in zip(first, layer_pass.batches)], targets, tensors,
                             put, list(attention_suffixes(ctx.spec)), work, moving=moving, groups=groups,
                             kinds=layer_pass.batch_kinds)
        bar = tqdm(total=self.distill_steps, desc="distil", unit="step", disable=not ctx.progress)
        try:
            result = distillation.distill(state, self.distill_steps, distillation.DEFAULT_DISTILL_LR,
                                          progress=lambda t, kl: (bar.update(1), bar.set_postfix(kl=f"{kl:.4f}")))
        finally:
            bar.close()
        work.drop_all("adam")
        return result

    def merge(self, layer: LayerKey, tensors: dict[str, torch.Tensor], ctx: ConvertContext) -> dict[str, torch.Tensor]:
        # decoder-only: a unit is a layer index (make_method gives encoder-decoders Seq2SeqCalibrated)
        assert isinstance(layer, int), f"CalibratedMethod merges decoder layers, not {layer!r}"
        if self.work is None:  # G = K: nothing was merged
            if self.aligned:
                return dict(tensors)
            return closed_form(self.recipe, layer, tensors, None, ctx)[0]
        distilled = self.work.state.get("distill") or {}
        key = f"d{layer}" if distilled and not distilled.get("undone") and self.work.has(f"d{layer}") else \
            f"layer-{layer}"
        return self._parked(key, layer, tensors)
