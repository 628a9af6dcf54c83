"""`uptrain inspect`: what a checkpoint is and what converting it would buy, from headers only."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from uptrain.arch import attention_kind, kv_cache_bytes_per_token, spec_for_config, valid_groups
from uptrain.checkpoint import CHECKPOINT_FILES, DTYPES, dtype_size, kv_dtype, open_source, read_config
from uptrain.hf import local_folder, resolve
from uptrain.report import fmt_bytes


@dataclass
class CheckpointInfo:
    path: str
    model_type: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    params: int
    dtype: str
    kv_cache_bytes_per_token: int
    options: list[dict]  # one per valid G: groups, kv_cache_bytes_per_token, saving

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
            "  --groups G   KV cache bytes/token   at 4096 tokens   saving",
        ]
        for o in self.options:
            b = o["kv_cache_bytes_per_token"]
            lines.append(f"  {o['groups']:>10}   {b:>20,}   {fmt_bytes(b * 4096):>14}   {o['saving']:>6.1%}")
        return "\n".join(lines)


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
    layers, heads, kv, d = spec.layers(cfg), spec.heads(cfg), spec.kv_heads(cfg), spec.head_dim(cfg)
    base = kv_cache_bytes_per_token(layers, kv, d, nbytes)
    options = []
    for g in valid_groups(kv):
        b = kv_cache_bytes_per_token(layers, g, d, nbytes)
        options.append({"groups": g, "kv_cache_bytes_per_token": b, "saving": 1 - b / base})
    return CheckpointInfo(str(src), cfg["model_type"], layers, heads, kv, d, params, str(DTYPES[dtype]).replace(
        "torch.", ""), base, options)
