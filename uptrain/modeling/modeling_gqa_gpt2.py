"""Grouped-query attention for GPT-2 checkpoints converted by uptrain.

This file travels with the weights: `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`
loads it through config.json's `auto_map`. It imports only torch and transformers.

The checkpoint is a GPT-2 one except for the attention: config.json's `num_key_value_heads` (G) KV heads are
shared by groups of H/G query heads (query head h reads KV head h // (H/G)), and `c_attn` (a Conv1D, stored
[in, out]) has H + 2G heads of outputs instead of 3H:

    columns = [q (H heads) | k (G heads) | v (G heads)]

With G = H that is GPT-2's own layout, and this class computes what GPT2LMHeadModel computes. The KV cache
holds G heads. Self-attention only (a GPT-2 with cross-attention is not a causal LM checkpoint).

Served by vLLM's Transformers backend (`LLM(folder, trust_remote_code=True)`), which builds the base model
through auto_map's `AutoModel` entry (GPT2GQAModel) and replaces the attention call with its own paged
attention (it finds the call to `ALL_ATTENTION_FUNCTIONS` in `forward`'s source and reads `scaling=`).

Written for transformers 5.19 to 5.25 (GPT2Attention's cache argument is `past_key_values` in 5.19, `cache`
from 5.20).
"""
from transformers.cache_utils import EncoderDecoderCache
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # this name: vLLM looks for it in forward
from transformers.models.gpt2 import modeling_gpt2 as gpt2
from transformers.pytorch_utils import Conv1D


# Copied from uptrain.modeling.modeling_gqa_gpt_neox.repeat_kv
def repeat_kv(x, n: int):
    """[batch, G, seq, d] → [batch, G·n, seq, d]: each KV head serves its n query heads (eager attention)."""
    if n == 1:
        return x
    b, g, s, d = x.shape
    return x[:, :, None].expand(b, g, n, s, d).reshape(b, g * n, s, d)


def the_cache(cache, kwargs):
    """The layer's cache: transformers >= 5.20 passes it as `cache`, 5.19 as `past_key_values`."""
    return cache if cache is not None else kwargs.pop("past_key_values", None)


class GPT2GQAAttention(gpt2.GPT2Attention):
    def __init__(self, config, is_cross_attention=False, layer_idx=None):
        super().__init__(config, is_cross_attention=is_cross_attention, layer_idx=layer_idx)
        if is_cross_attention:
            raise ValueError("uptrain's GQA attention for GPT-2 is self-attention only")
        self.num_key_value_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.num_key_value_groups = self.num_heads // self.num_key_value_heads  # read by SDPA / flash paths
        self.kv_dim = self.num_key_value_heads * self.head_dim
        self.c_attn = Conv1D(self.embed_dim + 2 * self.kv_dim, self.embed_dim)

    def forward(self, hidden_states, cache=None, attention_mask=None, **kwargs):
        cache = the_cache(cache, kwargs)
        kwargs.pop("encoder_hidden_states", None)
        kwargs.pop("encoder_attention_mask", None)
        kwargs.pop("output_attentions", None)
        query, key, value = self.c_attn(hidden_states).split((self.embed_dim, self.kv_dim, self.kv_dim), dim=2)
        query, key, value = (x.view(*x.shape[:-1], -1, self.head_dim).transpose(1, 2) for x in (query, key, value))
        if cache is not None:  # the cache keeps G heads
            self_cache = cache.self_attention_cache if isinstance(cache, EncoderDecoderCache) else cache
            key, value = self_cache.update(key, value, self.layer_idx, kwargs=kwargs)

        eager = self.config._attn_implementation == "eager"
        if eager:  # GPT-2's eager attention expects H heads
            n = self.num_key_value_groups
            key, value = repeat_kv(key, n), repeat_kv(value, n)
        if eager and self.reorder_and_upcast_attn:
            attn_output, attn_weights = self._upcast_and_reordered_attn(query, key, value, attention_mask)
        else:
            attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
                self.config._attn_implementation, gpt2.eager_attention_forward)
            attn_output, attn_weights = attention_interface(
                self, query, key, value, attention_mask, dropout=self.attn_dropout.p if self.training else 0.0,
                scaling=self.scaling, **kwargs)
        # [batch, seq, H·d] (vLLM's attention returns [seq, H·d]: reshaped by the input's shape, not its own)
        attn_output = attn_output.reshape(*hidden_states.shape[:-1], -1).contiguous()
        return self.resid_dropout(self.c_proj(attn_output)), attn_weights


def use_gqa_attention(model: gpt2.GPT2Model) -> None:
    """Give every block of `model` attention with `num_key_value_heads` KV heads."""
    for i, block in enumerate(model.h):
        block.attn = GPT2GQAAttention(model.config, layer_idx=i)


# Old GPT-2 checkpoints store the causal-mask buffers attn.bias / attn.masked_bias; GPT-2 ignores them with the
# unanchored patterns "attn.bias", which vLLM's weight loader also applies (with re.search) to the weights it
# expects, and so it would drop every c_attn.bias. Anchored, they name the buffers only.
IGNORED_BUFFERS = [r"(^|\.)attn\.(masked_)?bias$", r"(^|\.)crossattention\.(masked_)?bias$"]


class GPT2GQAModel(gpt2.GPT2Model):
    """GPT2Model whose attention layers keep `num_key_value_heads` KV heads (auto_map's AutoModel: the base
    model vLLM's Transformers backend builds)."""

    _supports_attention_backend = True  # vLLM's Transformers backend: attention through ALL_ATTENTION_FUNCTIONS
    _keys_to_ignore_on_load_unexpected = IGNORED_BUFFERS

    def __init__(self, config):
        super().__init__(config)
        use_gqa_attention(self)
        self.post_init()  # initialises the new attention modules only (the rest is marked initialised)


class GPT2GQALMHeadModel(gpt2.GPT2LMHeadModel):
    """GPT2LMHeadModel whose attention layers keep `num_key_value_heads` KV heads."""

    _supports_attention_backend = True
    _keys_to_ignore_on_load_unexpected = IGNORED_BUFFERS

    def __init__(self, config):
        super().__init__(config)
        use_gqa_attention(self.transformer)
        self.post_init()  # initialises the new attention modules only (the rest is marked initialised)
