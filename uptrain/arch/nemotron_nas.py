"""The nemotron-nas / DeciLM config: the form a Llama-family result with per-layer KV heads is written in.

Per-layer KV heads (G_l: a tuple with one G per layer, not all equal; a uniform list is one G) are one more
form: for the Llama family the nemotron-nas / DeciLM config that vLLM and llama.cpp read,

    block_configs[l].attention.n_heads_in_group = H / G_l       (layer l keeps G_l KV heads)

and the KV cache of such a model holds Σ_l G_l heads per token (`kv_cache_bytes_per_token`).
"""
from __future__ import annotations


def block_configs(heads: int, groups: tuple[int, ...], hidden: int, intermediate: int) -> list[dict]:
    """nemotron-nas' per-layer blocks for KV heads G_l and an unchanged MLP: what vLLM's DeciLM reads
    (attention.no_op, n_heads_in_group = H / G_l; ffn.no_op, then ffn_mult when present, else
    intermediate_size). ffn_mult (Nemotron's own field, which llama.cpp's converter reads) is written only where
    DeciLM's rule turns it back into exactly this intermediate size."""
    ffn: dict[str, bool | float | int] = {"no_op": False, "replace_with_linear": False}
    mult = 3 * intermediate / (2 * hidden)
    if ffn_mult_to_intermediate_size(mult, hidden) == intermediate:
        ffn["ffn_mult"] = mult
    ffn["intermediate_size"] = intermediate
    return [{"attention": {"no_op": False, "replace_with_linear": False, "n_heads_in_group": heads // g},
             "ffn": dict(ffn)} for g in groups]


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden: int) -> int:
    """DeciLM's rule (vLLM's nemotron_nas.py, Nemotron's modeling file): int(2/3 · mult · hidden), rounded up to a
    multiple of 256."""
    size = int(2 * ffn_mult * hidden / 3)
    return size if size % 256 == 0 else size + 256 - size % 256
