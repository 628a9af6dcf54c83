"""The paper's methods (mean / first / random / mean-norm; uptrain/pooling.py holds their math) as a conversion
method: each KV tensor merged on its own, streaming. The calibrated methods start from it too."""
from __future__ import annotations

import zlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from uptrain.conversion.context import ConvertContext
    from uptrain.kv_heads import LayerKey


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

    def touched(self, spec) -> tuple[str, ...]:
        return tuple(spec.kv)

    def prepare(self, ctx: ConvertContext) -> dict:
        return {}

    def finish(self) -> None:
        pass

    def merge(self, layer: LayerKey, tensors: dict[str, torch.Tensor], ctx: ConvertContext) -> dict[str, torch.Tensor]:
        import torch

        from uptrain.pooling import pool_rows

        assert ctx.groups is not None  # a merge sees its layer's context (ConvertContext.at): one G
        out = {}
        for suffix, t in tensors.items():
            gen = torch.Generator().manual_seed(ctx.seed * 1_000_003 + zlib.crc32(f"{layer}.{suffix}".encode()))
            kind = "bias" if suffix.endswith(".bias") else "norm" if "norm" in suffix else "weight"
            out[suffix] = pool_rows(t, ctx.spec.rows(suffix, ctx.config), ctx.groups, ctx.head_dim, self.pool,
                                    kind=kind, generator=gen)
        return out

    def stats(self, layer: LayerKey, src: dict[str, torch.Tensor], out: dict[str, torch.Tensor], ctx) -> dict:
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
