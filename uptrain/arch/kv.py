"""KV-head arithmetic of a config: which G a source can take, its MHA / GQA / MQA label, its KV-cache bytes.

Grouping (litgpt's picture; H query heads, K source KV heads, G result KV heads, contiguous groups):

    MHA  (G = H)   q: 0 1 2 3 4 5 6 7      GQA-2 (G = 2)   q: 0 1 2 3 | 4 5 6 7      MQA (G = 1)   q: 0 … 7
                   k: 0 1 2 3 4 5 6 7                       k:    0    |    1                      k:   0

Query head h reads KV head h // (H/G). Reducing a GQA source with K KV heads to G (G | K) merges
KV heads k in [j·K/G, (j+1)·K/G) into result head j, which keeps every query head on its group.
"""
from __future__ import annotations

from uptrain.errors import UptrainError
from uptrain.kv_heads import KVHeads, per_layer_counts
from uptrain.kv_heads import text as kv_heads_text


def attention_kind(heads, kv_heads) -> str:
    """"MHA" (K = H), "MQA" (K = 1), "GQA-K", or "per-layer GQA" for KV heads that differ between layers (a
    list G_l; a layer without attention counts 0); "?" when either count is unknown."""
    per_layer = per_layer_counts(kv_heads)
    if per_layer is not None and 0 in per_layer and any(per_layer):  # some layers have no attention (no_op)
        return "per-layer GQA" if heads else "?"
    try:
        kv = KVHeads.of(kv_heads)
    except ValueError:  # unknown (None, 0)
        return "?"
    if kv.per_layer is not None:
        return "per-layer GQA" if heads else "?"
    kv_heads = kv.uniform
    if not heads or not kv_heads:
        return "?"
    return "MHA" if kv_heads == heads else "MQA" if kv_heads == 1 else f"GQA-{kv_heads}"


def kv_cache_bytes_per_token(layers: int, kv_heads, head_dim: int, bytes_per_value: int) -> int:
    """K and V, every layer, one token: 2 × head_dim × bytes × the KV heads summed over layers (layers × K, or
    Σ_l G_l when `kv_heads` is a list with one count per layer)."""
    per_layer = per_layer_counts(kv_heads)
    if per_layer is not None:
        if len(per_layer) != layers:
            raise ValueError(f"{len(per_layer)} per-layer KV-head counts for {layers} layers")
        return 2 * sum(per_layer) * head_dim * bytes_per_value
    return layers * 2 * kv_heads * head_dim * bytes_per_value


def valid_groups(kv_heads: int) -> list[int]:
    """G values a checkpoint with `kv_heads` KV heads can be reduced to (divisors, contiguous groups)."""
    return [g for g in range(1, kv_heads + 1) if kv_heads % g == 0]


def check_groups(groups, kv_heads: int, key: str = "groups", layers: int | None = None) -> None:
    """`key` is how the caller spells the option: --groups, model.convert.groups, groups. `groups`: one G, or a
    list with one G per layer (`layers` of them)."""
    per_layer = per_layer_counts(groups)
    if per_layer is not None:
        said = kv_heads_text(per_layer)
        if layers is not None and len(per_layer) != layers:
            raise UptrainError(f"{key} {said}: {len(per_layer)} values for a model with {layers} layers; give one G "
                               f"for every layer, or a single G")
        for layer, g in enumerate(per_layer):
            try:
                check_groups(g, kv_heads, key)
            except UptrainError as e:
                raise UptrainError(f"{key} {said}: layer {layer}'s {e.args[0][len(key) + 1:]}") from None
        return
    if groups < 1 or groups > kv_heads or kv_heads % groups:
        why = "larger than the" if groups > kv_heads else "does not divide the"
        if groups < 1:
            why = "must be at least 1 and divide the"
        raise UptrainError(f"{key} {groups} {why} source's {kv_heads} KV heads; "
                           f"valid values: {', '.join(map(str, valid_groups(kv_heads)))}")
