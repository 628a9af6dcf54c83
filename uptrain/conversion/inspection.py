"""`uptrain inspect`: what a checkpoint is and what converting it would buy, from headers only."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from uptrain.arch import attention_kind, kv_cache_bytes_per_token, kv_heads_text, spec_for_config
from uptrain.checkpoint import CHECKPOINT_FILES, DTYPES, dtype_size, kv_dtype, open_source, read_config
from uptrain.hf import local_folder, resolve
from uptrain.modeling import code_files
from uptrain.report import fmt_bytes


@dataclass
class CheckpointInfo:
    path: str
    model_type: str
    layers: int
    heads: int
    kv_heads: int | list[int]  # a list G_l when the checkpoint's layers differ (nemotron-nas)
    head_dim: int
    params: int
    dtype: str
    kv_cache_bytes_per_token: int  # an encoder-decoder's: decoder self-attention, per generated token
    options: list[dict]  # one per valid G: groups, kv_cache_bytes_per_token, saving (+ cross_… for seq2seq)
    cross_kv_cache_bytes_per_token: int | None = None  # encoder-decoders: cross-attention, per source token
    gqa_attention: str | None = None  # encoder-decoders converted by uptrain: which attention shares KV heads
    code: list[str] | None = None  # modeling files config.json's auto_map names: it loads with trust_remote_code
    per_layer: str | None = None  # where a per-layer checkpoint's config holds G_l ("block_configs")
    per_layer_result: str | None = None  # how a per-layer conversion of this source is written (None: refused)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_text(self) -> str:
        kind = attention_kind(self.heads, self.kv_heads)
        lines = [
            f"{self.path}",
            f"  architecture      {self.model_type} ({kind})",
            f"  layers            {self.layers}",
            f"  query heads (H)   {self.heads}",
            f"  KV heads          {self.kv_heads}",
            f"  head_dim          {self.head_dim}",
            f"  parameters        {self.params:,}",
            f"  dtype             {self.dtype}",
            f"  KV cache          {self.kv_cache_bytes_per_token:,} bytes per token",
            "",
            "  --groups G   KV cache bytes/token   at 4096 tokens   saving   result",
        ]
        if self.code:
            lines.insert(2, f"  code              {', '.join(self.code)} (load with trust_remote_code=True)")
        if self.per_layer:  # per-layer KV heads: one line per layer instead of the table of G (not a source)
            per_layer = self.kv_heads if isinstance(self.kv_heads, list) else [self.kv_heads] * self.layers
            lines[lines.index(f"  KV heads          {self.kv_heads}")] = (
                f"  KV heads          {kv_heads_text(self.kv_heads)} (per layer, {self.per_layer}; "
                f"{sum(per_layer)} in all)")
            lines[-2:] = ["", "  layer   KV heads   query heads per KV head   KV cache bytes/token"]
            per = self.kv_cache_bytes_per_token // sum(per_layer) if sum(per_layer) else 0
            lines += [f"  {i:>5}   {g:>8}   {(self.heads // g if g else '—'):>23}   {g * per:>20,}"
                      for i, g in enumerate(per_layer)]
            lines.append("  (a per-layer result: uptrain converts its source, not this checkpoint)")
            return "\n".join(lines)
        if self.cross_kv_cache_bytes_per_token is not None:  # an encoder-decoder: two caches, two units
            lines[-3:] = [
                f"  KV cache          decoder self-attention {self.kv_cache_bytes_per_token:,} bytes per generated "
                f"token; cross-attention {self.cross_kv_cache_bytes_per_token:,} bytes per source token",
                "  pooled            " + {None: "by convert: decoder self- and cross-attention (--attention all: "
                                                   "encoder self-attention too)",
                                             "decoder": "decoder self- and cross-attention (gqa_attention: decoder)",
                                             "all": "every attention block (gqa_attention: all)"}.get(
                    self.gqa_attention, f"gqa_attention: {self.gqa_attention}"),
                "", "  --groups G   self bytes/generated token   cross bytes/source token   at 4096 + 4096   saving"]
        for o in self.options:
            b = o["kv_cache_bytes_per_token"]
            if self.cross_kv_cache_bytes_per_token is not None:
                c = o["cross_kv_cache_bytes_per_token"]
                lines.append(f"  {o['groups']:>10}   {b:>26,}   {c:>24,}   {fmt_bytes((b + c) * 4096):>13}   "
                             f"{o['saving']:>6.1%}   {o['result']}")
                continue
            lines.append(f"  {o['groups']:>10}   {b:>20,}   {fmt_bytes(b * 4096):>14}   {o['saving']:>6.1%}   "
                         f"{o['result']}")
        if self.per_layer_result:
            lines += ["", f"  per layer: --groups with one G per layer (e.g. {kv_heads_text(self._example())}), or "
                          f"--kv-budget F (the fraction of the KV cache to keep: G_l chosen from calibration); "
                          f"written as {self.per_layer_result}"]
        return "\n".join(lines)

    def _example(self) -> list[int]:
        gs = [o["groups"] for o in self.options]
        return [gs[(len(gs) - 1 - i) % len(gs)] for i in range(self.layers)]


def inspect(src: str, revision: str | None = None, allow_pickle: bool = True) -> CheckpointInfo:
    """Architecture, heads, KV heads, head_dim, parameters, dtype and the KV cache of every valid G.
    Reads config.json and shard headers only (pickle checkpoints are only listed, never unpickled here
    unless allowed; their shapes come from a weights-only mmap load)."""
    folder, _ = local_folder(resolve(src, revision, what="source"), CHECKPOINT_FILES)
    cfg = read_config(folder)
    spec = spec_for_config(cfg)
    source = open_source(folder, allow_pickle=allow_pickle)
    params = sum(math.prod(e.shape) for e in source.entries.values())
    dtype = kv_dtype(source.entries)
    nbytes = dtype_size(dtype)
    layers, heads, d = spec.layers(cfg), spec.heads(cfg), spec.head_dim(cfg)
    if spec.per_layer:  # a per-layer result (nemotron-nas): its heads, no conversion options
        base = kv_cache_bytes_per_token(layers, spec.kv_heads(cfg), d, nbytes)
        return CheckpointInfo(str(src), cfg["model_type"], layers, heads, list(spec.layer_kv_heads(cfg)), d, params,
                              str(DTYPES[dtype]).replace("torch.", ""), base, [],
                              code=code_files(cfg.get("auto_map")) or None, per_layer=spec.per_layer)
    kv = spec.uniform_kv_heads(cfg)
    base = kv_cache_bytes_per_token(layers, kv, d, nbytes)
    options = []
    for g in spec.valid_groups(cfg):  # the G some form of the architecture can hold (gpt_bigcode: 1 or H)
        b = kv_cache_bytes_per_token(layers, g, d, nbytes)
        options.append({"groups": g, "kv_cache_bytes_per_token": b, "saving": 1 - b / base,
                        "result": result_kind(spec, cfg, g)})
    cross = None
    if spec.blocks:  # per cached block: the decoder's self-attention (per generated token) and cross-attention
        self_b, cross_b = (b.layers(cfg) for b in spec.cached_blocks())
        cross = kv_cache_bytes_per_token(cross_b, kv, d, nbytes)
        for o in options:
            o["cross_kv_cache_bytes_per_token"] = kv_cache_bytes_per_token(cross_b, o["groups"], d, nbytes)
    # per_layer_refusal is None only where the spec has a per-layer form
    form = None if spec.blocks or spec.per_layer_refusal(cfg) else next(
        f for f in spec.forms if f.groups == "per-layer")
    per_layer = None if form is None else (
        f"{form.config['model_type']} (remote code, trust_remote_code=True; vLLM serves it natively)")
    return CheckpointInfo(str(src), cfg["model_type"], layers, heads, kv, d, params, str(DTYPES[dtype]).replace(
        "torch.", ""), base, options, cross, cfg.get("gqa_attention") if cross is not None else None,
        code_files(cfg.get("auto_map")) or None, per_layer_result=per_layer)


def result_kind(spec, cfg, groups: int) -> str:
    """What `uptrain convert --groups G` writes: "native" (plain transformers), "native <model_type>" (another
    architecture: GPT-2 MQA is a gpt_bigcode checkpoint) or "remote code" (uptrain's modeling file travels with
    it: trust_remote_code=True)."""
    form = spec.form(cfg, groups)
    if form.remote_code:
        return "remote code (trust_remote_code=True)"
    return f"native {form.model_type}" if form.model_type else "native"
