"""Execute a conversion plan: output shards planned on the meta device, then written tensor by tensor —
unchanged tensors as raw bytes, merged ones through the method — plus the shard index."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from uptrain.checkpoint import DTYPES, SAFE_INDEX, dtype_size, plan_shards, tensor_bytes, write_all, write_shard


def write_converted(folder: Path, plan: dict, source, merger, ctx, max_shard_size, progress: bool = True):
    """Write the weights of `plan` into `folder`. Returns (bytes written, number of shards, per-layer stats)."""
    from tqdm.auto import tqdm

    out_tensors = {n: (p[3], p[4]) for n, p in plan.items()}
    shards, total = plan_shards(out_tensors, max_shard_size)
    layer_names: dict[int, list[str]] = {}
    for n, (action, layer, *_rest) in plan.items():
        if action == "merge":
            layer_names.setdefault(layer, []).append(n)
    cache: dict[str, torch.Tensor] = {}
    stats: dict[int, dict] = {}

    def merged(name: str) -> torch.Tensor:
        _, layer, suffix, dt, shape = plan[name]
        if name not in cache:
            names = layer_names[layer] if merger.layerwise else [name]
            inputs = {plan[n][2]: source.read(n).float() for n in names}
            outputs = merger.merge(layer, inputs, ctx)
            stats.setdefault(layer, {"layer": layer}).update(merger.stats(layer, inputs, outputs, ctx))
            for n in names:
                cache[n] = outputs[plan[n][2]]
        t = cache.pop(name).to(DTYPES[dt])
        if tuple(t.shape) != shape:
            raise RuntimeError(f"method {merger.name} produced {tuple(t.shape)} for {name}, planned {shape}")
        return t

    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"convert → {ctx.groups} KV heads", disable=not progress)

    def write_tensor(name, f):
        if plan[name][0] == "copy":
            source.copy_bytes(name, f)
        else:
            write_all(f, tensor_bytes(merged(name)))
        dt, shape = out_tensors[name]
        bar.update(dtype_size(dt) * math.prod(shape))

    written = 0
    try:
        for fname, names in shards.items():
            written += write_shard(folder / fname, names, out_tensors, write_tensor)
    finally:
        bar.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": written},
                 "weight_map": {n: f for f, names in shards.items() for n in names}}
        (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return written, len(shards), [stats[k] for k in sorted(stats)]
