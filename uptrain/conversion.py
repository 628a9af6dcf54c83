"""The conversion plan and its execution: for every tensor of the source either copy its bytes or
merge its KV heads, streamed shard by shard into a new checkpoint with G KV heads.

    SRC → config.json → spec = arch.SPECS[model_type] → plan (copy | merge, output shape per tensor)
        → output shards planned on the meta device → each shard written tensor by tensor
        → index, config (new KV-head count), tokenizer files, uptrain.json → atomic rename into OUT
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import time
import zlib
from dataclasses import asdict, dataclass, field
from importlib import import_module
from pathlib import Path

import torch

from uptrain import __version__
from uptrain.arch import AttentionSpec, check_groups, kv_cache_bytes_per_token, spec_for_config
from uptrain.checkpoint import (DTYPES, SAFE_INDEX, AtomicFolder, card_license, check_output, copy_companions,
                                dtype_size, fingerprint,
                                open_source, plan_shards, read_config, resolve_source, tensor_bytes, write_all,
                                write_shard)
from uptrain.errors import UptrainError
from uptrain.pooling import POOLERS, pool_rows, relative_error


@dataclass
class ConvertContext:
    """Everything a merge method may need about the conversion at hand."""

    spec: AttentionSpec
    config: dict
    src_dir: Path
    source: object  # SafetensorsSource | PickleSource
    heads: int
    kv_heads: int
    groups: int
    head_dim: int
    seed: int = 0
    options: dict = field(default_factory=dict)
    progress: bool = True


class PoolMethod:
    """The paper's family (mean / first / random / mean-norm): each KV tensor is merged on its own, so
    the converter only ever holds one tensor."""

    layerwise = False

    def __init__(self, name: str):
        self.name = name
        self.pool = POOLERS[name]

    def prepare(self, ctx: ConvertContext) -> dict:
        return {}

    def merge(self, layer: int, tensors: dict[str, torch.Tensor], ctx: ConvertContext) -> dict[str, torch.Tensor]:
        out = {}
        for suffix, t in tensors.items():
            gen = torch.Generator().manual_seed(ctx.seed * 1_000_003 + zlib.crc32(f"{layer}.{suffix}".encode()))
            kind = "bias" if suffix.endswith(".bias") else "norm" if "norm" in suffix else "weight"
            out[suffix] = pool_rows(t, ctx.spec.rows(suffix, ctx.config), ctx.groups, ctx.head_dim, self.pool,
                                    kind=kind, generator=gen)
        return out


# Methods beyond pooling live in their own modules and are imported only when asked for.
# A layerwise method has `touched(spec) -> suffixes`, `prepare(ctx) -> record` and
# `merge(layer, {suffix: float32 tensor}, ctx) -> {suffix: tensor}` over all touched tensors of one layer.
METHODS = {name: PoolMethod for name in POOLERS}
EXTRA_METHODS = {"aligned": "uptrain.merging:AlignedMethod"}


def make_method(name: str, **options):
    if name in METHODS:
        if options:  # e.g. --grouping similarity with mean: refuse rather than record what did not happen
            raise UptrainError(f"--method {name} takes no {', '.join('--' + k.replace('_', '-') for k in options)}; "
                               f"those options belong to --method aligned")
        return METHODS[name](name)
    if name in EXTRA_METHODS:
        module, cls = EXTRA_METHODS[name].split(":")
        return getattr(import_module(module), cls)(**options)
    raise UptrainError(f"unknown method {name!r}; choose one of {', '.join([*METHODS, *EXTRA_METHODS])}")


@dataclass
class ConvertResult:
    out: str
    source: str
    model_type: str
    method: str
    groups: int
    heads: int
    kv_heads_before: int
    kv_heads_after: int
    head_dim: int
    num_layers: int
    bytes_written: int
    shards: int
    seconds: float
    kv_cache_bytes_per_token_before: int
    kv_cache_bytes_per_token_after: int
    layers: list[dict]

    def summary(self) -> str:
        saving = 1 - self.kv_cache_bytes_per_token_after / self.kv_cache_bytes_per_token_before
        k = max((s["k_rel_error"] for s in self.layers), default=0.0)
        v = max((s["v_rel_error"] for s in self.layers), default=0.0)
        return (f"Converted {self.source} ({self.model_type}, {self.num_layers} layers, {self.heads} query heads) "
                f"from {self.kv_heads_before} to {self.kv_heads_after} KV heads with method {self.method!r}: "
                f"KV cache {self.kv_cache_bytes_per_token_before:,} → {self.kv_cache_bytes_per_token_after:,} "
                f"bytes per token ({saving:.0%} smaller). Largest relative change of a layer's K / V weights: "
                f"{k:.3f} / {v:.3f}. Wrote {self.bytes_written / 1e6:,.1f} MB in {self.shards} shard(s) to "
                f"{self.out} in {self.seconds:.1f} s.")

    def to_dict(self) -> dict:
        return asdict(self)


def plan_conversion(spec: AttentionSpec, config: dict, entries: dict, groups: int, touched: tuple[str, ...] = ()):
    """Shape logic only (works on a 70B header without memory): name → (action, layer, suffix, dtype, out shape).
    action is "merge" for tensors the method rewrites, "copy" for the rest."""
    heads, kv, d = spec.heads(config), spec.kv_heads(config), spec.head_dim(config)
    check_groups(groups, kv)
    plan, seen = {}, {}
    for name, e in entries.items():
        kind, layer, suffix = spec.classify(name)
        shape = tuple(e.shape)
        if kind == "kv":
            rows = spec.rows(suffix, config)
            if shape[0] != rows[-1][2]:
                raise UptrainError(f"{name} has {shape[0]} rows but {heads} heads / {kv} KV heads × head_dim {d} "
                                   f"imply {rows[-1][2]}; config.json and the weights disagree")
            shape = (spec.rows(suffix, config, kv_heads=groups)[-1][2], *shape[1:])
        action = "merge" if kind == "kv" or (layer is not None and suffix in touched) else "copy"
        plan[name] = (action, layer, suffix, e.dtype, shape)
        if layer is not None:
            seen.setdefault(layer, set()).add(suffix)
    n_layers = spec.layers(config)
    for layer in range(n_layers):
        missing = [s for s in spec.required if s not in seen.get(layer, ())]
        if missing:
            raise UptrainError(f"layer {layer} has no {', '.join(missing)}; the checkpoint does not match the "
                               f"{config.get('model_type')} attention spec (incomplete or not this architecture)")
    return plan


def _kv_stats(layer: int, src: dict[str, torch.Tensor], out: dict[str, torch.Tensor], ctx: ConvertContext) -> dict:
    """Relative change of the K and V projection weights (0 when the heads of each group were equal)."""
    stats = {}
    for suffix, t in src.items():
        if suffix not in ctx.spec.kv or t.dim() != 2:
            continue
        src_rows, out_rows = ctx.spec.rows(suffix, ctx.config), ctx.spec.rows(suffix, ctx.config, ctx.groups)
        for (role, a, b), (_, c, e) in zip(src_rows, out_rows):
            if role in ("k", "v"):
                stats[f"{role}_rel_error"] = relative_error(t[a:b], out[suffix][c:e], ctx.groups, ctx.head_dim)
    return stats


def convert(src: str, out: str, groups: int, method: str = "mean", seed: int = 0, overwrite: bool = False,
            max_shard_size: str | int = "5GB", revision: str | None = None, allow_pickle: bool = False,
            progress: bool = True, **method_options) -> ConvertResult:
    """Convert the checkpoint at `src` (folder or Hub id) into one with `groups` KV heads at `out`.

    Streaming: reads one tensor at a time, copies unchanged tensors as bytes, never builds the model.
    Writes into a temporary folder beside `out` and renames it into place only when everything succeeded.
    """
    t0 = time.time()
    src_dir, rev = resolve_source(src, revision)
    out_dir = Path(out)
    config = read_config(src_dir)
    spec = spec_for_config(config)
    heads, kv, d, n_layers = spec.heads(config), spec.kv_heads(config), spec.head_dim(config), spec.layers(config)
    check_groups(groups, kv)
    check_output(src_dir, out_dir, overwrite)
    merger = make_method(method, **method_options)
    source = open_source(src_dir, allow_pickle=allow_pickle)
    touched = tuple(merger.touched(spec)) if merger.layerwise else ()
    plan = plan_conversion(spec, config, source.entries, groups, touched)
    ctx = ConvertContext(spec, config, src_dir, source, heads, kv, groups, d, seed, method_options, progress)
    method_record = merger.prepare(ctx)  # e.g. a calibration pass; before any output exists

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
            # A method that changes basis (aligned) measures its own error; row-by-row comparison is for pooling.
            measure = getattr(merger, "stats", _kv_stats)
            stats.setdefault(layer, {"layer": layer}).update(measure(layer, inputs, outputs, ctx))
            for n in names:
                cache[n] = outputs[plan[n][2]]
        t = cache.pop(name).to(DTYPES[dt])
        if tuple(t.shape) != shape:
            raise RuntimeError(f"method {method} produced {tuple(t.shape)} for {name}, planned {shape}")
        return t

    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"convert → {groups} KV heads", disable=not progress)

    def write_tensor(name, f):
        if plan[name][0] == "copy":
            source.copy_bytes(name, f)
        else:
            write_all(f, tensor_bytes(merged(name)))
        dt, shape = out_tensors[name]
        bar.update(dtype_size(dt) * math.prod(shape))

    with AtomicFolder(out_dir) as tmp:
        written = 0
        for fname, names in shards.items():
            written += write_shard(tmp / fname, names, out_tensors, write_tensor)
        bar.close()
        if len(shards) > 1:
            index = {"metadata": {"total_size": written},
                     "weight_map": {n: f for f, names in shards.items() for n in names}}
            (tmp / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        new_config = dict(config)
        new_config[spec.kv_heads_field] = groups
        (tmp / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")
        copy_companions(src_dir, tmp)
        dbytes = max((dtype_size(e.dtype) for e in source.entries.values() if DTYPES[e.dtype].is_floating_point),
                     default=2)
        result = ConvertResult(
            out=str(out_dir), source=src, model_type=config["model_type"], method=method, groups=groups,
            heads=heads, kv_heads_before=kv, kv_heads_after=groups, head_dim=d, num_layers=n_layers,
            bytes_written=written, shards=len(shards), seconds=0.0,
            kv_cache_bytes_per_token_before=kv_cache_bytes_per_token(n_layers, kv, d, dbytes),
            kv_cache_bytes_per_token_after=kv_cache_bytes_per_token(n_layers, groups, d, dbytes),
            layers=[stats[k] for k in sorted(stats)])
        previous = src_dir / "uptrain.json"
        record = {
            "uptrain_version": __version__,
            "conversion": {
                "source": src, "source_revision": rev, "source_fingerprint": fingerprint(src_dir, source),
                "model_type": config["model_type"], "method": method,
                "grouping": method_options.get("grouping", "contiguous"), "groups": groups, "seed": seed,
                "num_attention_heads": heads, "kv_heads_before": kv, "kv_heads_after": groups, "head_dim": d,
                "num_layers": n_layers,
                "kv_cache_bytes_per_token_before": result.kv_cache_bytes_per_token_before,
                "kv_cache_bytes_per_token_after": result.kv_cache_bytes_per_token_after,
                "dtype": str(config.get("torch_dtype") or config.get("dtype") or ""),
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                "calibration": method_record.get("calibration"),
                "layers": result.layers,
                **card_license(src_dir),
                **{k: v for k, v in method_record.items() if k != "calibration"},
            },
        }
        if previous.is_file():  # the source was itself made by uptrain: keep its history
            record["source_record"] = json.loads(previous.read_text())
        (tmp / "uptrain.json").write_text(json.dumps(record, indent=2) + "\n")
    result.seconds = time.time() - t0
    return result
