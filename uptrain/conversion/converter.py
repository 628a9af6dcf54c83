"""`uptrain convert`: for every tensor of the source either copy its bytes or merge its KV heads, streamed
shard by shard into a new checkpoint with G KV heads.

    SRC → hf.resolve → config.json → spec = arch.SPECS[model_type] → tensor_plan.py (copy | merge per tensor)
        → methods.py (prepare: e.g. calibration) → writer.py (shards, index) → config (result_config.py),
        companions, uptrain.json (record.py) → atomic rename into OUT
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from uptrain.arch import AttentionSpec, kv_cache_bytes_per_token, kv_heads_text, model_type, spec_for_config
from uptrain.checkpoint import CHECKPOINT_FILES, check_free_space, check_output, copy_companions, dtype_size, \
    fingerprint, kv_dtype, open_source, quantization, read_config
from uptrain.conversion.context import ConvertContext
from uptrain.conversion.methods import make_method
from uptrain.conversion.options import ConvertOptions
from uptrain.conversion.result_config import foreign_auto_map, foreign_auto_map_note, result_config
from uptrain.conversion.tensor_plan import plan_conversion
from uptrain.conversion.writer import write_converted
from uptrain.errors import UptrainError
from uptrain.files import AtomicFolder
from uptrain.hf import card_licence, local_folder, resolve
from uptrain.kv_heads import KVHeads
from uptrain.record import ConversionRecord, Record, read_record, write_record
from uptrain.report import fmt_bytes


@dataclass
class ConvertResult:
    out: str
    source: str
    model_type: str
    method: str
    groups: int | list[int]  # one G, or G_l per layer
    heads: int
    kv_heads_before: int
    kv_heads_after: int | list[int]
    head_dim: int
    num_layers: int
    bytes_written: int
    shards: int
    seconds: float
    kv_cache_bytes_per_token_before: int
    kv_cache_bytes_per_token_after: int
    layers: list[dict]
    written_as: str = ""  # the result's model_type (gpt2 → MQA: gpt_bigcode)
    remote_code: str | None = None  # the modeling file the result needs (trust_remote_code=True), if any
    allocation: dict | None = None  # --kv-budget: the measured losses and the chosen G_l (sensitivity.py)

    def summary(self) -> str:
        saving = 1 - self.kv_cache_bytes_per_token_after / self.kv_cache_bytes_per_token_before
        k = max((s["k_rel_error"] for s in self.layers), default=0.0)
        v = max((s["v_rel_error"] for s in self.layers), default=0.0)
        after = (f"{kv_heads_text(self.kv_heads_after)} KV heads per layer" if isinstance(self.kv_heads_after, list)
                 else f"{self.kv_heads_after} KV heads")
        return (self.allocation_text() +
                f"Converted {self.source} ({self.model_type}, {self.num_layers} layers, {self.heads} query heads) "
                f"from {self.kv_heads_before} to {after} with method {self.method!r}: "
                f"KV cache {fmt_bytes(self.kv_cache_bytes_per_token_before)} → "
                f"{fmt_bytes(self.kv_cache_bytes_per_token_after)} per token ({saving:.0%} smaller). Largest "
                f"relative change of a layer's K / V weights: {k:.3f} / {v:.3f}. Wrote "
                f"{fmt_bytes(self.bytes_written)} in {self.shards} shard(s) to {self.out} in {self.seconds:.1f} s."
                + (f" Written as a native {self.written_as} checkpoint." if self.written_as != self.model_type
                   and not self.remote_code else "")
                + (f" Written in the {self.written_as} form (block_configs), which vLLM serves natively; the "
                   f"folder carries {self.remote_code} for transformers: load it with trust_remote_code=True."
                   if self.remote_code and isinstance(self.kv_heads_after, list) else
                   f" No transformers class for model_type {self.model_type} holds {self.kv_heads_after} KV "
                   f"heads: the folder carries {self.remote_code}, load it with trust_remote_code=True."
                   if self.remote_code else ""))

    def allocation_text(self) -> str:
        """--kv-budget: the chosen G_l, every layer's measured loss at every G, the budget asked and used."""
        a = self.allocation
        if not a:
            return ""
        before, after = self.kv_cache_bytes_per_token_before, self.kv_cache_bytes_per_token_after
        gs = sorted({int(g) for x in a["losses"] for g in x if g != "layer"})
        lines = [f"KV budget {a['kv_budget']:g} of the source's {fmt_bytes(before)} per token: "
                 f"{fmt_bytes(a['kv_budget'] * before)} ({a['budget_heads']} of {a['source_heads']} KV heads over "
                 f"the layers); the chosen G_l use {fmt_bytes(after)} ({a['heads']} KV heads, "
                 f"{after / before:.4g} of the source's).",
                 f"Loss: KL of the next-token distribution from the source's when only that layer is converted "
                 f"(nats per token, {a['measured']['tokens']:,} calibration tokens, {a['measured']['seconds']:.0f} s). "
                 f"Predicted (summed): chosen {a['predicted_loss']:.4g}"
                 + "".join(f"; uniform G = {g}: {v:.4g}" for g, v in a["uniform_loss"].items()) + ".",
                 "  layer   G_l   " + "".join(f"{'G = ' + str(g):>11}" for g in gs)]
        for x, g_l in zip(a["losses"], a["groups"]):
            lines.append(f"  {x['layer']:>5}   {g_l:>3}   " + "".join(
                f"{x[str(g)]:>10.4g}{'*' if g == g_l else ' '}" for g in gs))
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict:
        return asdict(self)


def convert(src: str, out: str, groups: int | None = None, *, options: ConvertOptions | None = None,
            overwrite: bool = False, revision: str | None = None, progress: bool = True,
            **option_kw) -> ConvertResult:
    """Convert the checkpoint at `src` (folder, HF-cache snapshot or Hub id) into one with G KV heads at `out`.

    The conversion is described by `options` (a ConvertOptions) or by its fields as keyword arguments:
    `convert(src, out, groups=8, method="aligned", calibration_tokens=65536)`. Streaming: reads one tensor
    at a time, copies unchanged tensors as bytes, never builds the model (except aligned on an encoder-decoder,
    which calibrates on the whole source model: uptrain/calibration/seq2seq.py). Writes into a temporary folder
    beside `out` and renames it into place only when everything succeeded."""
    t0 = time.time()
    if options is None:
        options = ConvertOptions.from_kwargs(groups=groups, **option_kw)
    elif groups is not None or option_kw:
        raise UptrainError("describe the conversion either with options=ConvertOptions(...) or with keyword "
                           "arguments (groups=…, method=…), not both")
    options.check()
    if options.reads_calibration:  # a typo in the text's name is refused before any model loads
        # calibration (and torch with it) loads only when asked for: a pooling conversion starts copying at once
        from uptrain.calibration.text import check_names

        check_names(options.calibration)
    source_ref = resolve(src, revision, what="source")
    src_dir, rev = local_folder(source_ref, CHECKPOINT_FILES)
    out_dir = Path(out)
    config = read_config(src_dir)
    quant = quantization(src_dir, config, allow_pickle=options.allow_pickle)
    quant.check("source", str(src))  # refused before anything is written: "dequantize first"
    spec = pooled_spec(config, options, str(src))
    options.check_source(spec, config)  # the KV heads asked for fit the source (a budget: at least one per layer)
    heads, kv, d, n_layers = spec.heads(config), spec.uniform_kv_heads(config), spec.head_dim(config), \
        spec.layers(config)
    check_output(src_dir, out_dir, overwrite)
    merger = make_method(options, spec)
    source = open_source(src_dir, allow_pickle=options.allow_pickle)
    touched = tuple(merger.touched(spec)) if merger.layerwise else ()
    ctx = ConvertContext(spec, config, src_dir, source, heads, kv, None, d, options.seed, progress, out_dir)
    allocation, measure = None, None
    if options.kv_budget is not None:  # measure every layer at every G, then the knapsack: before any output
        from uptrain.calibration.sensitivity import choose_groups

        heads_of_result, allocation, measure = choose_groups(ctx, options)
    else:
        heads_of_result = KVHeads.of(options.groups)  # a uniform list is one G: written exactly as --groups G writes it
    g, layer_groups = heads_of_result.value, heads_of_result.per_layer  # layer_groups: G_l, None for one G
    ctx = dataclasses.replace(ctx, groups=heads_of_result.uniform, layer_groups=layer_groups)
    plan = plan_conversion(spec, config, source.entries, g, touched, options.key("groups"))
    planned = sum(math.prod(step.shape) * dtype_size(step.dtype) for step in plan.values())
    check_free_space(out_dir, planned, f"the converted model ({len(plan)} tensors, {fmt_bytes(planned)})",
                     "free space or choose an OUT on a larger disk")
    method_record = merger.prepare(ctx)  # e.g. a calibration pass; before any output exists
    value_bytes = dtype_size(kv_dtype(source.entries))
    after = heads_of_result.as_json()

    with AtomicFolder(out_dir) as tmp:
        written, n_shards, layers = write_converted(tmp, plan, source, merger, ctx, options.max_shard_size, progress)
        if spec.blocks:  # a layerwise method rewrites q / o of every block: list only the pooled units
            pooled = set(spec.units(config))
            layers = [s for s in layers if (s["block"], s["layer"]) in pooled]
        if layer_groups is not None:  # every layer with its G_l; one that kept the source's heads was copied: no error
            seen = {s["layer"]: s for s in layers}
            layers = [{"layer": i, "kv_heads": g_l, **seen.get(i, {"k_rel_error": 0.0, "v_rel_error": 0.0})}
                      for i, g_l in enumerate(layer_groups)]
        new_config, template = result_config(spec, config, g)
        if template is not None:  # the Hub's trust_remote_code convention: the code beside the weights
            shutil.copyfile(template.path, tmp / template.file)
        dropped = foreign_auto_map(config)
        if dropped is not None:  # the source's own code: never run, never copied, so never pointed at
            print(foreign_auto_map_note(str(src), dropped, template), file=sys.stderr, flush=True)
        if quant.leftover:  # plain float weights: a quantizer would make the model unsaveable
            new_config.pop("quantization_config", None)
            print(quant.note("source", str(src)), file=sys.stderr, flush=True)
        (tmp / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")
        copy_companions(src_dir, tmp)
        result = ConvertResult(
            out=str(out_dir), source=str(src), model_type=config["model_type"], method=options.method, groups=after,
            heads=heads, kv_heads_before=kv, kv_heads_after=after, head_dim=d, num_layers=n_layers,
            bytes_written=written, shards=n_shards, seconds=0.0,
            kv_cache_bytes_per_token_before=kv_cache_bytes_per_token(n_layers, kv, d, value_bytes),
            kv_cache_bytes_per_token_after=kv_cache_bytes_per_token(n_layers, after, d, value_bytes),
            layers=layers, written_as=new_config["model_type"], remote_code=template and template.file,
            allocation=allocation)
        conversion = ConversionRecord(
            source=str(src), source_revision=rev or source_ref.revision, source_hub_id=source_ref.hub_id,
            source_fingerprint=fingerprint(src_dir, source), model_type=config["model_type"],
            method=options.method, grouping=method_record.get("grouping", "contiguous"), groups=after,
            seed=options.seed, num_attention_heads=heads, kv_heads_before=kv, kv_heads_after=after, head_dim=d,
            num_layers=n_layers, kv_cache_bytes_per_token_before=result.kv_cache_bytes_per_token_before,
            kv_cache_bytes_per_token_after=result.kv_cache_bytes_per_token_after,
            dtype=str(config.get("torch_dtype") or config.get("dtype") or ""),
            created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            calibration=method_record.get("calibration"), layers=layers, allocation=allocation,
            dropped_auto_map=dropped,
            options=options.recorded(),
            **card_licence(src_dir),
            extra={k: v for k, v in method_record.items() if k not in ("calibration", "grouping")})
        previous = read_record(src_dir)  # the source was itself made by uptrain: keep its history
        write_record(tmp, Record(conversion=conversion, source_record=previous.to_dict() if previous else None))
    merger.finish()  # the result is in place: the work in progress beside it goes
    if measure is not None:
        measure.remove()
    result.seconds = time.time() - t0
    return result


def pooled_spec(config: dict, options: ConvertOptions, src: str) -> AttentionSpec:
    """The source's attention spec with the blocks `options.attention` names pooled (encoder-decoders; a
    decoder-only spec is itself), after the refusals that only an encoder-decoder can meet."""
    spec = spec_for_config(config)
    if not spec.blocks:
        return spec
    mt = model_type(config)
    if options.calibrated:  # aligned / refinement: calibrated on the whole model (calibration/seq2seq.py)
        from uptrain.calibration.seq2seq import check_seq2seq

        check_seq2seq(options, mt)
    before = config.get("gqa_attention") or "decoder"
    if spec.uniform_kv_heads(config) < spec.heads(config) and before != options.attention:
        raise UptrainError(f"{src} already shares its KV heads in its {before} attention (gqa_attention: {before}); "
                           f"converting it further keeps that choice: use {options.said('attention', before)}, or "
                           f"convert the MHA source")
    return spec.pooling(options.attention)

