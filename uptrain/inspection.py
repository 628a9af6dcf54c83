"""`uptrain inspect`: what a checkpoint is and what converting it would buy, from headers only."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass


from uptrain.arch import kv_cache_bytes_per_token, spec_for_config, valid_groups
from uptrain.checkpoint import DTYPES, dtype_size, open_source, read_config, resolve_source


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
        kind = "MHA" if self.kv_heads == self.heads else "MQA" if self.kv_heads == 1 else f"GQA-{self.kv_heads}"
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
            lines.append(f"  {o['groups']:>10}   {b:>20,}   {_human(b * 4096):>14}   {o['saving']:>6.1%}")
        return "\n".join(lines)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def inspect(src: str, revision: str | None = None, allow_pickle: bool = True) -> CheckpointInfo:
    """Architecture, heads, KV heads, head_dim, parameters, dtype and the KV cache of every valid G.
    Reads config.json and shard headers only (pickle checkpoints are only listed, never unpickled here
    unless allowed; their shapes come from a weights-only mmap load)."""
    folder, _ = resolve_source(src, revision)
    cfg = read_config(folder)
    spec = spec_for_config(cfg)
    source = open_source(folder, allow_pickle=allow_pickle)
    params = sum(math.prod(e.shape) for e in source.entries.values())
    floats = Counter(e.dtype for e in source.entries.values() if DTYPES[e.dtype].is_floating_point)
    dtype = floats.most_common(1)[0][0] if floats else "F32"
    nbytes = dtype_size(dtype)
    layers, heads, kv, d = spec.layers(cfg), spec.heads(cfg), spec.kv_heads(cfg), spec.head_dim(cfg)
    base = kv_cache_bytes_per_token(layers, kv, d, nbytes)
    options = []
    for g in valid_groups(kv):
        b = kv_cache_bytes_per_token(layers, g, d, nbytes)
        options.append({"groups": g, "kv_cache_bytes_per_token": b, "saving": 1 - b / base})
    return CheckpointInfo(str(src), cfg["model_type"], layers, heads, kv, d, params, str(DTYPES[dtype]).replace(
        "torch.", ""), base, options)
