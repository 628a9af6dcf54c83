"""Attention shapes of a config (layers, H, K, head_dim), through its spec when the table knows it."""
from __future__ import annotations

from dataclasses import dataclass

from uptrain.arch.kv import attention_kind, kv_cache_bytes_per_token
from uptrain.arch.specs import AttentionSpec, config_value
from uptrain.arch.table import table_entry

# For configs outside the table (evaluating a model uptrain cannot convert): the usual field names.
_GENERIC = AttentionSpec(kv={}, copy=())


@dataclass(frozen=True)
class AttentionShape:
    layers: int
    heads: int  # H
    kv_heads: int | tuple[int, ...]  # K (or G after a conversion); a tuple G_l when the layers differ
    head_dim: int

    @property
    def kind(self) -> str:
        return attention_kind(self.heads, self.kv_heads)

    def kv_cache_bytes_per_token(self, bytes_per_value: int) -> int:
        return kv_cache_bytes_per_token(self.layers, self.kv_heads, self.head_dim, bytes_per_value)

    def to_dict(self) -> dict:
        """The field names of an evaluation row and of config.json (per-layer KV heads as a list)."""
        kv = list(self.kv_heads) if isinstance(self.kv_heads, tuple) else self.kv_heads
        return {"num_layers": self.layers, "num_attention_heads": self.heads,
                "num_key_value_heads": kv, "head_dim": self.head_dim}


def attention_shape(cfg) -> AttentionShape:
    """Layers, query heads, KV heads and head_dim of a config (dict or transformers config; the text config
    of a multimodal one), through its spec when the table knows it."""
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    mt = config_value(cfg, "model_type", None)
    spec = table_entry(mt) or _GENERIC
    return AttentionShape(spec.layers(cfg), spec.heads(cfg), spec.kv_heads(cfg), spec.head_dim(cfg))
