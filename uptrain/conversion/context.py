"""What a conversion method sees of the conversion at hand (uptrain/conversion/methods.py has the interface)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uptrain.arch import AttentionSpec
from uptrain.kv_heads import KVHeads


@dataclass
class ConvertContext:
    """Everything a merge method may need about the conversion at hand."""

    spec: AttentionSpec
    config: dict
    src_dir: Path
    source: Any  # SafetensorsSource | PickleSource
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
    def kv_heads_of_result(self) -> KVHeads:
        """G_l of a per-layer result, else the one G (ValueError before the converter has chosen them)."""
        if self.layer_groups is not None:
            return KVHeads.of(self.layer_groups)
        if self.groups is None:
            raise ValueError("the result's KV heads are not chosen yet")
        return KVHeads.of(self.groups)

    @property
    def groups_text(self) -> str:
        return ",".join(map(str, self.layer_groups)) if self.layer_groups else str(self.groups)
