"""Grouped-query attention for OPT checkpoints converted by uptrain.

This file travels with the weights: `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`
loads it through config.json's `auto_map`. It imports only torch and transformers.

The checkpoint is an OPT one except for the attention: config.json's `num_key_value_heads` (G) KV heads are
shared by groups of H/G query heads (query head h reads KV head h // (H/G)): `k_proj` and `v_proj` (weights
and biases) have G heads of rows instead of H. With G = H this class computes what OPTForCausalLM computes.
The KV cache holds G heads.

Served by vLLM's Transformers backend (`LLM(folder, trust_remote_code=True)`), which builds the base model
through auto_map's `AutoModel` entry (OPTGQAModel) and replaces the attention call with its own paged
attention (it finds the call to `ALL_ATTENTION_FUNCTIONS` in `forward`'s source and reads `scaling=`).

Written for transformers 5.19 to 5.25 (OPTAttention's cache argument is `past_key_values` in 5.19, `cache`
from 5.20).
"""
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # this name: vLLM looks for it in forward
from transformers.models.opt import modeling_opt as opt


# Copied from uptrain.modeling.modeling_gqa_gpt_neox.repeat_kv
def repeat_kv(x, n: int):
    """[batch, G, seq, d] → [batch, G·n, seq, d]: each KV head serves its n query heads (eager attention)."""
    if n == 1:
        return x
    b, g, s, d = x.shape
    return x[:, :, None].expand(b, g, n, s, d).reshape(b, g * n, s, d)


# Copied from uptrain.modeling.modeling_gqa_gpt2.the_cache
def the_cache(cache, kwargs):
    """The layer's cache: transformers >= 5.20 passes it as `cache`, 5.19 as `past_key_values`."""
    return cache if cache is not None else kwargs.pop("past_key_values", None)


class OPTGQAAttention(opt.OPTAttention):
    def __init__(self, config, layer_idx=None, **kwargs):
        super().__init__(config, layer_idx=layer_idx, **kwargs)
        self.num_key_value_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads  # read by SDPA / flash paths
        kv_dim = self.num_key_value_heads * self.head_dim
        self.k_proj = nn.Linear(self.embed_dim, kv_dim, bias=self.enable_bias)
        self.v_proj = nn.Linear(self.embed_dim, kv_dim, bias=self.enable_bias)

    def forward(self, hidden_states, cache=None, attention_mask=None, output_attentions=False, **kwargs):
        cache = the_cache(cache, kwargs)
        bsz, tgt_len, _ = hidden_states.size()
        # OPT scales the query before the product (see OPTAttention.forward) and attends with scaling 1
        query_states = self.q_proj(hidden_states) * self.scaling
        query_states = query_states.view(bsz, -1, self.num_heads, self.head_dim).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(bsz, -1, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(bsz, -1, self.num_key_value_heads, self.head_dim)
        value_states = value_states.transpose(1, 2)
        if cache is not None:  # the cache keeps G heads
            key_states, value_states = cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
        if self.config._attn_implementation == "eager":  # OPT's eager attention expects H heads
            n = self.num_key_value_groups
            key_states, value_states = repeat_kv(key_states, n), repeat_kv(value_states, n)

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, opt.eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self, query_states, key_states, value_states, attention_mask,
            dropout=0.0 if not self.training else self.dropout, scaling=1.0, **kwargs)
        attn_output = attn_output.reshape(bsz, tgt_len, -1).contiguous()
        return self.out_proj(attn_output), attn_weights


def use_gqa_attention(model: opt.OPTModel) -> None:
    """Give every decoder layer of `model` attention with `num_key_value_heads` KV heads."""
    for i, layer in enumerate(model.decoder.layers):
        layer.self_attn = OPTGQAAttention(model.config, layer_idx=i)


class OPTGQAModel(opt.OPTModel):
    """OPTModel whose attention layers keep `num_key_value_heads` KV heads (auto_map's AutoModel: the base model
    vLLM's Transformers backend builds)."""

    _supports_attention_backend = True  # vLLM's Transformers backend: attention through ALL_ATTENTION_FUNCTIONS

    def __init__(self, config):
        super().__init__(config)
        use_gqa_attention(self)
        self.post_init()  # initialises the new attention modules only (the rest is marked initialised)


class OPTGQAForCausalLM(opt.OPTForCausalLM):
    """OPTForCausalLM whose attention layers keep `num_key_value_heads` KV heads."""

    _supports_attention_backend = True

    def __init__(self, config):
        super().__init__(config)
        use_gqa_attention(self.model)
        self.post_init()  # initialises the new attention modules only (the rest is marked initialised)
