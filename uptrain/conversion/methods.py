"""Conversion methods behind one small interface, chosen by `ConvertOptions.method`.

A method has `layerwise` (False: each KV tensor is merged alone; True: all `touched(spec)` tensors of a
layer are merged together), `prepare(ctx) -> record` (runs before any output exists, e.g. the layer-by-layer
calibration and refinement of uptrain/conversion/calibrated.py) and `merge(layer, {suffix: float32 tensor}, ctx) -> {suffix: tensor}`; optionally
`stats(layer, inputs, outputs, ctx)` for its own per-layer error.
"""
from __future__ import annotations

import dataclasses
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from uptrain.arch import AttentionSpec
from uptrain.conversion.options import ConvertOptions

if TYPE_CHECKING:
    import torch

@dataclass
class ConvertContext:
    """Everything a merge method may need about the conversion at hand."""

    spec: AttentionSpec
    config: dict
    src_dir: Path
    source: object  # SafetensorsSource | PickleSource
    heads: int
    kv_heads: int
    groups: int | None  # G; None when the layers differ (layer_groups): a merge sees `at(layer)`'s
    head_dim: int
    seed: int = 0
    progress: bool = True
    out_dir: Path | None = None  # where the result goes (a calibrated method parks per-layer tensors beside it)
    layer_groups: tuple[int, ...] | None = None  # G_l, when the result has per-layer KV heads

    def at(self, layer) -> ConvertContext:
        """The context of one layer: its own G (a per-layer result's G_l; the one G otherwise)."""
        if self.layer_groups is None:
            return self
        return dataclasses.replace(self, groups=self.layer_groups[layer], layer_groups=None)

    @property
    def unchanged(self) -> bool:
        """Every layer keeps the source's KV heads: nothing to merge."""
        return self.layer_groups is None and self.groups == self.kv_heads

    @property
    def groups_text(self) -> str:
        return ",".join(map(str, self.layer_groups)) if self.layer_groups else str(self.groups)


class PoolMethod:
    """The paper's family (mean / first / random / mean-norm): each KV tensor is merged on its own, so
    the converter only ever holds one tensor."""

    layerwise = False

    def __init__(self, name: str):
        self.name = name

    @property
    def pool(self):
        from uptrain.pooling import POOLERS

        return POOLERS[self.name]

    def prepare(self, ctx: ConvertContext) -> dict:
        return {}

    def merge(self, layer: int, tensors: dict[str, torch.Tensor], ctx: ConvertContext) -> dict[str, torch.Tensor]:
        import torch

        from uptrain.pooling import pool_rows

        out = {}
        for suffix, t in tensors.items():
            gen = torch.Generator().manual_seed(ctx.seed * 1_000_003 + zlib.crc32(f"{layer}.{suffix}".encode()))
            kind = "bias" if suffix.endswith(".bias") else "norm" if "norm" in suffix else "weight"
            out[suffix] = pool_rows(t, ctx.spec.rows(suffix, ctx.config), ctx.groups, ctx.head_dim, self.pool,
                                    kind=kind, generator=gen)
        return out

    def stats(self, layer: int, src: dict[str, torch.Tensor], out: dict[str, torch.Tensor], ctx) -> dict:
        """Relative change of the K and V projection weights (0 when the heads of each group were equal)."""
        from uptrain.pooling import pooling_error

        stats = {}
        for suffix, t in src.items():
            if suffix not in ctx.spec.kv or t.dim() != 2:
                continue
            src_rows, out_rows = ctx.spec.rows(suffix, ctx.config), ctx.spec.rows(suffix, ctx.config, ctx.groups)
            for (role, a, b), (_, c, e) in zip(src_rows, out_rows):
                if role in ("k", "v"):
                    stats[f"{role}_rel_error"] = pooling_error(t[a:b], out[suffix][c:e], ctx.groups, ctx.head_dim,
                                                               is_mean=self.name == "mean")
        return stats


def make_method(options: ConvertOptions):
    """The method object for checked options (ConvertOptions.check has refused unknown names): a pooling
    method streams tensor by tensor; aligned, and any method with refine steps, calibrates layer by layer."""
    if not options.calibrated:
        return PoolMethod(options.method)
    from uptrain.conversion.calibrated import CalibratedMethod  # calibration code: imported only when asked for

    return CalibratedMethod(options)
