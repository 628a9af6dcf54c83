"""Per-layer KV heads for Llama-family checkpoints converted by uptrain: the nemotron-nas / DeciLM form.

This file travels with the weights: `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`
loads it through config.json's `auto_map` (AutoConfig → DeciLMConfig, AutoModelForCausalLM →
DeciLMForCausalLM). It imports only torch and transformers.

config.json is a Llama config (model_type "nemotron-nas", the Nemotron-51B family's) plus one entry per layer:

    "block_configs": [{"attention": {"no_op": false, "n_heads_in_group": 4},
                       "ffn": {"no_op": false, "ffn_mult": 4.0, "intermediate_size": 1536}}, …]

Layer l keeps G_l = H / n_heads_in_group KV heads, shared by groups of n_heads_in_group query heads (query
head h reads KV head h // n_heads_in_group): its `k_proj` and `v_proj` have G_l heads of rows. vLLM serves
the same folder natively (DeciLMForCausalLM, vllm/model_executor/models/nemotron_nas.py), and llama.cpp's
converter reads the same config (its `deci` architecture). The KV cache holds G_l heads in layer l.

The model is transformers' Llama: every layer is a LlamaDecoderLayer whose attention has k/v projections of
G_l heads and `num_key_value_groups` = n_heads_in_group (what the eager, SDPA and flash paths read), so
everything else (RoPE and its scaling, the cache, the attention implementations) is transformers' own code.
Biases follow vLLM's rule: `qkv_bias` (when present) for q, k and v, `attention_bias` for o (Qwen2: q/k/v
biases, none on o). The MLP of layer l has ffn.intermediate_size (else DeciLM's ffn_mult rule).

Written for transformers 5.19 to 5.24.
"""
from torch import nn
from transformers import LlamaConfig
from transformers.activations import ACT2FN
from transformers.models.llama import modeling_llama as llama


def _get(x, key, default=None):
    """A field of a block config entry, given as a dict (config.json) or as an attribute object."""
    return x.get(key, default) if isinstance(x, dict) else getattr(x, key, default)


class BlockSection:
    """`block_configs[i].attention` or `.ffn`: the JSON object's keys as attributes (only those present: vLLM
    asks `hasattr(ffn, "ffn_mult")` before it falls back on intermediate_size)."""

    def __init__(self, fields=None):
        self.__dict__.update(dict(fields or {}))

    def to_dict(self):
        return dict(self.__dict__)

    def __repr__(self):
        return f"BlockSection({self.__dict__})"


class BlockConfig:
    """One layer's entry of `block_configs`: `.attention` and `.ffn` (plus any other keys, kept as they are)."""

    def __init__(self, attention=None, ffn=None, **other):
        self.__dict__.update(other)
        self.attention = attention if isinstance(attention, BlockSection) else BlockSection(attention)
        self.ffn = ffn if isinstance(ffn, BlockSection) else BlockSection(ffn)

    def to_dict(self):
        return {k: v.to_dict() if isinstance(v, BlockSection) else v for k, v in self.__dict__.items()}

    def __repr__(self):
        return f"BlockConfig({self.to_dict()})"


class DeciLMConfig(LlamaConfig):
    """LlamaConfig with `block_configs`: per layer, the attention's n_heads_in_group and the MLP's size."""

    model_type = "nemotron-nas"
    block_configs: list | None = None

    def __post_init__(self, **kwargs):
        if self.block_configs is not None:
            self.block_configs = [b if isinstance(b, BlockConfig) else BlockConfig(**b) for b in self.block_configs]
        super().__post_init__(**kwargs)

    def to_dict(self):
        out = super().to_dict()
        if self.block_configs is not None:
            out["block_configs"] = [b.to_dict() if isinstance(b, BlockConfig) else dict(b) for b in self.block_configs]
        return out


def kv_heads_of_layer(config, i: int) -> int:
    """G_l: the KV heads of layer i."""
    attention = _get(config.block_configs[i], "attention")
    return config.num_attention_heads // _get(attention, "n_heads_in_group")


def _check_block(block, i: int) -> None:
    for part in ("attention", "ffn"):
        section = _get(block, part)
        for flag in ("no_op", "replace_with_linear"):
            if _get(section, flag, False):
                raise ValueError(f"block_configs[{i}].{part}.{flag} is set: this modeling file (written by uptrain) "
                                 f"implements full attention and MLP blocks only; vLLM serves such checkpoints")
        if _get(section, "sparsify"):
            raise ValueError(f"block_configs[{i}].{part}.sparsify is set: not implemented by this modeling file")


def _intermediate_size(config, ffn) -> int:
    size = _get(ffn, "intermediate_size")
    if size is not None:
        return size
    mult = _get(ffn, "ffn_mult")
    if mult is None:
        return config.intermediate_size
    size = int(2 * mult * config.hidden_size / 3)  # DeciLM's rule: rounded up to a multiple of 256
    return size if size % 256 == 0 else size + 256 - size % 256


def _per_layer(layer, config, i: int) -> None:
    """Layer i of a LlamaModel turned into what block_configs[i] says: G_l KV heads, its own MLP size."""
    block = config.block_configs[i]
    _check_block(block, i)
    attn, heads = layer.self_attn, config.num_attention_heads
    kv_heads, d = kv_heads_of_layer(config, i), attn.head_dim
    qkv_bias = getattr(config, "qkv_bias", None)
    qkv_bias = config.attention_bias if qkv_bias is None else qkv_bias
    if qkv_bias != config.attention_bias:
        attn.q_proj = nn.Linear(config.hidden_size, heads * d, bias=qkv_bias)
    attn.k_proj = nn.Linear(config.hidden_size, kv_heads * d, bias=qkv_bias)
    attn.v_proj = nn.Linear(config.hidden_size, kv_heads * d, bias=qkv_bias)
    attn.num_key_value_groups = heads // kv_heads  # read by transformers' eager / SDPA / flash attention
    ffn = _get(block, "ffn")
    size = _intermediate_size(config, ffn)
    mlp = layer.mlp
    if size != mlp.intermediate_size:
        mlp.intermediate_size = size
        mlp.gate_proj = nn.Linear(config.hidden_size, size, bias=config.mlp_bias)
        mlp.up_proj = nn.Linear(config.hidden_size, size, bias=config.mlp_bias)
        mlp.down_proj = nn.Linear(size, config.hidden_size, bias=config.mlp_bias)
    if _get(ffn, "hidden_act"):
        mlp.act_fn = ACT2FN[_get(ffn, "hidden_act")]


class DeciLMForCausalLM(llama.LlamaForCausalLM):
    """LlamaForCausalLM whose layer l keeps G_l = H / block_configs[l].attention.n_heads_in_group KV heads."""

    config_class = DeciLMConfig

    def __init__(self, config):
        super().__init__(config)
        if len(config.block_configs or ()) != config.num_hidden_layers:
            raise ValueError(f"config.block_configs has {len(config.block_configs or ())} entries for "
                             f"{config.num_hidden_layers} layers")
        for i, layer in enumerate(self.model.layers):
            _per_layer(layer, config, i)
        self.post_init()  # initialises the new projections only (the rest is marked initialised)
