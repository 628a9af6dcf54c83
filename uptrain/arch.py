"""The table of attention specs: for each `model_type`, where the K/V heads live in the checkpoint.

Adding an architecture = one entry in `SPECS` + one tiny-model test. Nothing else in the converter
knows architecture names.

Grouping (litgpt's picture; H query heads, K source KV heads, G result KV heads, contiguous groups):

    MHA  (G = H)   q: 0 1 2 3 4 5 6 7      GQA-2 (G = 2)   q: 0 1 2 3 | 4 5 6 7      MQA (G = 1)   q: 0 … 7
                   k: 0 1 2 3 4 5 6 7                       k:    0    |    1                      k:   0

Query head h reads KV head h // (H/G). Reducing a GQA source with K KV heads to G (G | K) merges
KV heads k in [j·K/G, (j+1)·K/G) into result head j, which keeps every query head on its group.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from uptrain.errors import UptrainError

# A row layout describes dim 0 of a tensor as consecutive segments of heads × head_dim rows.
# Roles: "q" (H heads, copied), "k"/"v" (K heads, pooled to G).
Layout = tuple[tuple[str, str], ...]  # ((role, count), …) with count "H" or "K"
K_ROWS: Layout = (("k", "K"),)
V_ROWS: Layout = (("v", "K"),)
QKV_ROWS: Layout = (("q", "H"), ("k", "K"), ("v", "K"))

_LLAMA_LAYER = (
    "input_layernorm.weight", "post_attention_layernorm.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    "mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias",  # llama mlp_bias=True
    "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.o_proj.weight", "self_attn.o_proj.bias",
    "self_attn.rotary_emb.inv_freq",  # a buffer some older checkpoints saved
)
_SEPARATE_KV = {
    "self_attn.k_proj.weight": K_ROWS, "self_attn.k_proj.bias": K_ROWS,
    "self_attn.v_proj.weight": V_ROWS, "self_attn.v_proj.bias": V_ROWS,
}
_FUSED_EXPERTS = r"mlp\.experts\.(gate_up_proj|down_proj)"
_GEMMA_FFN_NORMS = ("pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight")
_GLOBAL = ("model.embed_tokens.weight", "model.norm.weight", "model.norm.bias", "lm_head.weight")


@dataclass(frozen=True)
class AttentionSpec:
    """Where one architecture keeps its attention weights, as data.

    kv: per-layer tensor suffix → row layout; every tensor whose shape depends on the KV-head count.
    copy: per-layer suffixes that are copied unchanged (may be absent in a checkpoint).
    copy_patterns: regular expressions for per-layer suffixes copied unchanged that carry an index of their
        own (the experts of a mixture-of-experts MLP: block_sparse_moe.experts.{e}.w1.weight).
    required: kv suffixes every layer must have (a checkpoint without them is not what we think).
    q / o: the query and output projections (calibration-aware methods fold maps into them).
    rope: "rotate_half" (HF layout: pair i ↔ i + d/2) or None (no rotary positions).
    """

    kv: dict[str, Layout]
    copy: tuple[str, ...]
    copy_patterns: tuple[str, ...] = ()
    required: tuple[str, ...] = ("self_attn.k_proj.weight", "self_attn.v_proj.weight")
    global_tensors: tuple[str, ...] = _GLOBAL
    layer_prefix: str = "model.layers.{}."
    q: str = "self_attn.q_proj"
    o: str = "self_attn.o_proj"
    rope: str | None = "rotate_half"
    kv_heads_field: str = "num_key_value_heads"
    heads_field: str = "num_attention_heads"
    layers_field: str = "num_hidden_layers"
    notes: str = ""
    _patterns: dict = field(default=None, compare=False, repr=False)

    # -- config-derived quantities -------------------------------------------------------------
    def heads(self, cfg) -> int:
        return _get(cfg, self.heads_field)

    def kv_heads(self, cfg) -> int:
        # MHA configs often omit the KV-head count (None / missing means "= heads").
        return _get(cfg, self.kv_heads_field, None) or self.heads(cfg)

    def layers(self, cfg) -> int:
        return _get(cfg, self.layers_field)

    def head_dim(self, cfg) -> int:
        # Never assume hidden / heads: gemma, qwen3 and others set head_dim explicitly.
        return _get(cfg, "head_dim", None) or _get(cfg, "hidden_size") // self.heads(cfg)

    # -- tensor names ----------------------------------------------------------------------------
    def classify(self, name: str) -> tuple[str, int | None, str]:
        """name → (kind, layer, suffix) with kind "kv", "copy"; raises on a name the spec does not know."""
        prefix_re = re.escape(self.layer_prefix).replace(r"\{\}", r"(\d+)")
        m = re.fullmatch(prefix_re + r"(.+)", name)
        if m:
            layer, suffix = int(m.group(1)), m.group(2)
            if suffix in self.kv:
                return "kv", layer, suffix
            if suffix in self.copy or any(re.fullmatch(p, suffix) for p in self.copy_patterns):
                return "copy", layer, suffix
        elif name in self.global_tensors:
            return "copy", None, name
        raise UptrainError(f"tensor {name!r} is not described by the attention spec; converting it blindly "
                           f"could produce a wrong model. Add it to uptrain/arch.py (kv if its shape depends "
                           f"on the KV-head count, copy otherwise)")

    def rows(self, suffix: str, cfg, kv_heads: int | None = None) -> list[tuple[str, int, int]]:
        """[(role, start_row, stop_row)] of a kv tensor for a model with `kv_heads` KV heads."""
        d, k = self.head_dim(cfg), kv_heads or self.kv_heads(cfg)
        counts = {"H": self.heads(cfg), "K": k}
        out, start = [], 0
        for role, count in self.kv[suffix]:
            stop = start + counts[count] * d
            out.append((role, start, stop))
            start = stop
        return out

    def kv_row_blocks(self, name: str, cfg) -> list[tuple[int, int]]:
        """Row ranges of `name` that hold KV heads (empty for tensors that do not)."""
        kind, _, suffix = self.classify(name)
        if kind != "kv":
            return []
        return [(a, b) for role, a, b in self.rows(suffix, cfg) if role in ("k", "v")]


_LLAMA = AttentionSpec(kv=_SEPARATE_KV, copy=_LLAMA_LAYER)

SPECS: dict[str, AttentionSpec] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,  # q/k/v biases are in _SEPARATE_KV / _LLAMA_LAYER
    # q_norm / k_norm: RMSNorm over head_dim, one weight shared by all heads → shape independent of K.
    "qwen3": AttentionSpec(kv=_SEPARATE_KV, copy=_LLAMA_LAYER + ("self_attn.q_norm.weight", "self_attn.k_norm.weight")),
    "gemma": _LLAMA,  # explicit head_dim handled by head_dim()
    # Fused [q | k | v] rows; fused gate_up MLP is copied.
    "phi3": AttentionSpec(
        kv={"self_attn.qkv_proj.weight": QKV_ROWS, "self_attn.qkv_proj.bias": QKV_ROWS},
        copy=("input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_up_proj.weight",
              "mlp.down_proj.weight", "self_attn.o_proj.weight"),
        required=("self_attn.qkv_proj.weight",), q="self_attn.qkv_proj"),
    "starcoder2": AttentionSpec(
        kv=_SEPARATE_KV,
        copy=("input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
              "post_attention_layernorm.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
              "mlp.c_proj.bias", "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.o_proj.weight",
              "self_attn.o_proj.bias")),
    # k_norm is an RMSNorm over the concatenation of all KV heads: its weight has K·head_dim entries.
    "granite": _LLAMA,  # its multipliers (embedding, attention, residual, logits) are config scalars
    "smollm3": _LLAMA,  # every 4th layer has no RoPE: a per-frequency fold is exact without rotations too
    "gemma2": AttentionSpec(kv=_SEPARATE_KV, copy=_LLAMA_LAYER + _GEMMA_FFN_NORMS),
    # q_norm / k_norm as in qwen3: one RMSNorm weight over head_dim, shared by all heads.
    "gemma3_text": AttentionSpec(kv=_SEPARATE_KV, copy=_LLAMA_LAYER + _GEMMA_FFN_NORMS
                                 + ("self_attn.q_norm.weight", "self_attn.k_norm.weight")),
    # Parallel attention and MLP after one LayerNorm (weight only); RoPE on interleaved pairs (2i, 2i+1).
    # use_qk_norm checkpoints (per-head norm weights [heads, head_dim]) are not described: refused.
    "cohere": AttentionSpec(
        kv=_SEPARATE_KV,
        copy=("input_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
              "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.o_proj.weight", "self_attn.o_proj.bias"),
        rope="interleaved"),
    # OLMo-1: LayerNorms without parameters; clip_qkv clamps q, k and v (no effect on pooling).
    "olmo": AttentionSpec(
        kv=_SEPARATE_KV,
        copy=("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "self_attn.q_proj.weight",
              "self_attn.o_proj.weight")),
    # LayerNorms with biases, partial rotary, optional q/k/v biases. qk_layernorm checkpoints keep one norm
    # tensor per head under the head's index (k_layernorm.norms.{h}): not described, refused.
    "stablelm": AttentionSpec(
        kv=_SEPARATE_KV,
        copy=("input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
              "post_attention_layernorm.bias", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
              "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.o_proj.weight")),
    # Mixture-of-experts MLPs: only attention changes; router and experts are copied byte for byte. Both the
    # per-expert names checkpoints hold and the fused ones transformers 5 uses in memory (mlp.experts.*_proj).
    "mixtral": AttentionSpec(
        kv=_SEPARATE_KV, copy=_LLAMA_LAYER + ("block_sparse_moe.gate.weight", "mlp.gate.weight"),
        copy_patterns=(r"block_sparse_moe\.experts\.\d+\.w[123]\.weight", _FUSED_EXPERTS)),
    "qwen2_moe": AttentionSpec(
        kv=_SEPARATE_KV,
        copy=_LLAMA_LAYER + ("mlp.gate.weight", "mlp.shared_expert_gate.weight", "mlp.shared_expert.gate_proj.weight",
                             "mlp.shared_expert.up_proj.weight", "mlp.shared_expert.down_proj.weight"),
        copy_patterns=(r"mlp\.experts\.\d+\.(gate|up|down)_proj\.weight", _FUSED_EXPERTS)),
    "olmo2": AttentionSpec(
        kv={**_SEPARATE_KV, "self_attn.k_norm.weight": K_ROWS},
        copy=("post_attention_layernorm.weight", "post_feedforward_layernorm.weight", "mlp.gate_proj.weight",
              "mlp.up_proj.weight", "mlp.down_proj.weight", "self_attn.q_proj.weight", "self_attn.o_proj.weight",
              "self_attn.q_norm.weight")),
}


def _get(cfg, key, *default):
    if isinstance(cfg, dict):
        if key in cfg:
            return cfg[key]
        if default:
            return default[0]
        raise UptrainError(f"config.json has no {key!r}")
    return getattr(cfg, key, *default)


def model_type(cfg) -> str:
    return _get(cfg, "model_type", None) or "<missing model_type>"


def spec_for_config(cfg) -> AttentionSpec:
    mt = model_type(cfg)
    if mt not in SPECS:
        raise UptrainError(f"architecture {mt!r} is not supported yet; supported: {', '.join(sorted(SPECS))}. "
                           f"Adding one is an entry in uptrain/arch.py plus a tiny-model test")
    return SPECS[mt]


# ------------------------------------------------------------------------------------------ shapes and sizes
# For configs outside the table (evaluating a model uptrain cannot convert): the usual field names.
_GENERIC = AttentionSpec(kv={}, copy=())


@dataclass(frozen=True)
class AttentionShape:
    layers: int
    heads: int  # H
    kv_heads: int  # K (or G after a conversion)
    head_dim: int

    @property
    def kind(self) -> str:
        return attention_kind(self.heads, self.kv_heads)

    def kv_cache_bytes_per_token(self, bytes_per_value: int) -> int:
        return kv_cache_bytes_per_token(self.layers, self.kv_heads, self.head_dim, bytes_per_value)

    def to_dict(self) -> dict:
        """The field names of an evaluation row and of config.json."""
        return {"num_layers": self.layers, "num_attention_heads": self.heads,
                "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim}


def attention_shape(cfg) -> AttentionShape:
    """Layers, query heads, KV heads and head_dim of a config (dict or transformers config; the text config
    of a multimodal one), through its spec when the table knows it."""
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    spec = SPECS.get(_get(cfg, "model_type", None), _GENERIC)
    return AttentionShape(spec.layers(cfg), spec.heads(cfg), spec.kv_heads(cfg), spec.head_dim(cfg))


def attention_kind(heads, kv_heads) -> str:
    """"MHA" (K = H), "MQA" (K = 1) or "GQA-K"; "?" when either count is unknown."""
    if not heads or not kv_heads:
        return "?"
    return "MHA" if kv_heads == heads else "MQA" if kv_heads == 1 else f"GQA-{kv_heads}"


def kv_cache_bytes_per_token(layers: int, kv_heads: int, head_dim: int, bytes_per_value: int) -> int:
    """K and V, every layer, one token: layers × 2 × KV heads × head_dim × bytes."""
    return layers * 2 * kv_heads * head_dim * bytes_per_value


def valid_groups(kv_heads: int) -> list[int]:
    """G values a checkpoint with `kv_heads` KV heads can be reduced to (divisors, contiguous groups)."""
    return [g for g in range(1, kv_heads + 1) if kv_heads % g == 0]


def check_groups(groups: int, kv_heads: int, key: str = "groups") -> None:
    """`key` is how the caller spells the option: --groups, model.convert.groups, groups."""
    if groups < 1 or groups > kv_heads or kv_heads % groups:
        why = "larger than the" if groups > kv_heads else "does not divide the"
        if groups < 1:
            why = "must be at least 1 and divide the"
        raise UptrainError(f"{key} {groups} {why} source's {kv_heads} KV heads; "
                           f"valid values: {', '.join(map(str, valid_groups(kv_heads)))}")
