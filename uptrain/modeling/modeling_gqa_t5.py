"""Grouped-query attention for T5, mT5 and umT5 checkpoints converted by uptrain.

This file travels with the weights: `AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True)`
loads it through config.json's `auto_map`. It imports only torch and transformers.

The checkpoint is a T5 one except for the attention blocks config.json's `gqa_attention` names:

    "decoder" (default, the GQA paper's choice)   decoder self-attention and cross-attention
    "all"                                          the same, plus encoder self-attention

In those blocks `num_key_value_heads` (G) KV heads are shared by groups of H/G query heads (query head h
reads KV head h // (H/G)): `k` and `v` have G heads of `d_kv` rows instead of H. Encoder self-attention
is left alone by default because it runs over the whole source in parallel, so it is not bound by memory
bandwidth, and it has no cache. The decoder caches hold G heads: self-attention G per generated token,
cross-attention G per source token.

Everything else is transformers' own T5 code: relative position bias (shared from the first layer in T5 /
mT5, one per layer in umT5), no 1/sqrt(d) scaling, gated-gelu or relu feed-forward, tied or untied heads, the
eager / SDPA attention implementations. With G = H these classes compute what transformers' T5 computes.

Written for transformers 5.19 to 5.25 (T5Attention's cache argument is `past_key_values` in 5.19, `cache` from
5.20; `EncoderDecoderCache.is_updated` of 5.x).
"""
import torch
from torch import nn
from transformers.cache_utils import EncoderDecoderCache
from transformers.models.mt5 import modeling_mt5 as mt5
from transformers.models.t5 import modeling_t5 as t5
from transformers.models.umt5 import modeling_umt5 as umt5

GQA_ATTENTION = ("decoder", "all")


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


class GroupedKV:
    """Mixin placed before a transformers T5-family attention class: k and v with G heads, K/V through the
    cache with G heads, and the query heads of a group attending to their shared K/V head."""

    def __init__(self, config, has_relative_attention_bias=False, layer_idx=None, is_causal=False):
        super().__init__(config, has_relative_attention_bias=has_relative_attention_bias, layer_idx=layer_idx,
                         is_causal=is_causal)
        self.num_key_value_heads = getattr(config, "num_key_value_heads", None) or self.n_heads
        if self.n_heads % self.num_key_value_heads:
            raise ValueError(f"num_key_value_heads {self.num_key_value_heads} does not divide num_heads {self.n_heads}")
        self.num_key_value_groups = self.n_heads // self.num_key_value_heads  # read by transformers' SDPA path
        kv_dim = self.num_key_value_heads * self.key_value_proj_dim
        self.k = nn.Linear(self.d_model, kv_dim, bias=False)
        self.v = nn.Linear(self.d_model, kv_dim, bias=False)

    def _key_value(self, current_states, cache, is_cross, kwargs):
        """K and V [batch, G, seq, d_kv]. With an EncoderDecoderCache the cross-attention's are computed once,
        on the first step, and read back afterwards (as T5Attention does)."""
        layer_cache, is_updated = cache, False
        if isinstance(cache, EncoderDecoderCache):
            is_updated = cache.is_updated.get(self.layer_idx)
            layer_cache = cache.cross_attention_cache if is_cross else cache.self_attention_cache
        if is_cross and cache is not None and is_updated:
            layer = layer_cache.layers[self.layer_idx]
            return layer.keys, layer.values
        shape = (*current_states.shape[:-1], self.num_key_value_heads, self.key_value_proj_dim)
        key_states = self.k(current_states).view(shape).transpose(1, 2)
        value_states = self.v(current_states).view(shape).transpose(1, 2)
        if cache is not None:  # the cache keeps G heads
            key_states, value_states = layer_cache.update(key_states, value_states, self.layer_idx, kwargs=kwargs)
            if is_cross and isinstance(cache, EncoderDecoderCache):
                cache.is_updated[self.layer_idx] = True
        return key_states, value_states

    def _attend(self, module, query_states, key_states, value_states, mask, position_bias, kwargs):
        """module: the transformers modeling module whose eager_attention_forward is the default."""
        if self.config._attn_implementation == "eager":  # T5's eager attention expects H heads
            n = self.num_key_value_groups
            key_states, value_states = repeat_kv(key_states, n), repeat_kv(value_states, n)
        attention_interface = module.ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, module.eager_attention_forward)
        return attention_interface(
            self, query_states, key_states, value_states, mask, dropout=0.0 if not self.training else self.dropout,
            scaling=self.scaling, position_bias=position_bias, **kwargs)

    def _past_seen(self, cache):
        past = cache.get_seq_length(self.layer_idx) if cache is not None else 0
        return past.clone() if isinstance(past, torch.Tensor) else past  # as T5Attention (StaticCache)


class T5StyleGQA(GroupedKV):
    """T5 / mT5: the position bias is computed by the first layer and passed on to the others."""

    _modeling = t5

    def forward(self, hidden_states, mask=None, key_value_states=None, position_bias=None, cache=None, **kwargs):
        cache = the_cache(cache, kwargs)
        input_shape = hidden_states.shape[:-1]
        past_seen_tokens = self._past_seen(cache)
        is_cross = key_value_states is not None
        query_states = self.q(hidden_states).view(*input_shape, -1, self.key_value_proj_dim).transpose(1, 2)
        key_states, value_states = self._key_value(key_value_states if is_cross else hidden_states, cache, is_cross,
                                                   kwargs)
        if position_bias is None:
            key_length = key_states.shape[-2]
            if not self.has_relative_attention_bias:
                position_bias = torch.zeros((1, self.n_heads, input_shape[1], key_length), device=query_states.device,
                                            dtype=query_states.dtype)
                if self.gradient_checkpointing and self.training:
                    position_bias.requires_grad = True
            else:
                position_bias = self.compute_bias(input_shape[1], key_length, device=query_states.device,
                                                  past_seen_tokens=past_seen_tokens)
        attn_output, attn_weights = self._attend(self._modeling, query_states, key_states, value_states, mask,
                                                 position_bias, kwargs)
        attn_output = self.o(attn_output.reshape(*input_shape, -1).contiguous())
        return attn_output, position_bias, attn_weights


class T5GQAAttention(T5StyleGQA, t5.T5Attention):
    pass


class MT5GQAAttention(T5StyleGQA, mt5.MT5Attention):
    _modeling = mt5


class UMT5GQAAttention(GroupedKV, umt5.UMT5Attention):
    """umT5: every self-attention layer has its own relative position bias."""

    def forward(self, hidden_states, encoder_hidden_states=None, cache=None, attention_mask=None, **kwargs):
        cache = the_cache(cache, kwargs)
        batch_size, seq_length = hidden_states.shape[:2]
        past_seen_tokens = self._past_seen(cache)
        is_cross = encoder_hidden_states is not None
        query_states = self.q(hidden_states).view(batch_size, -1, self.n_heads, self.key_value_proj_dim)
        query_states = query_states.transpose(1, 2)
        key_states, value_states = self._key_value(encoder_hidden_states if is_cross else hidden_states, cache,
                                                   is_cross, kwargs)
        key_length = key_states.shape[-2]
        if not self.has_relative_attention_bias:
            position_bias = torch.zeros((1, self.n_heads, seq_length, key_length), device=query_states.device,
                                        dtype=query_states.dtype)
        else:
            position_bias = self.compute_bias(seq_length, key_length, device=query_states.device,
                                              past_seen_tokens=past_seen_tokens)
        attn_output, attn_weights = self._attend(umt5, query_states, key_states, value_states, attention_mask,
                                                 position_bias, kwargs)
        attn_output = self.o(attn_output.reshape(batch_size, seq_length, -1).contiguous())
        return attn_output, attn_weights


def group_attention(model, attention_class) -> None:
    """Replace the attention of the blocks `config.gqa_attention` names by `attention_class` (G KV heads)."""
    which = getattr(model.config, "gqa_attention", None) or "decoder"
    if which not in GQA_ATTENTION:
        raise ValueError(f"gqa_attention {which!r}: choose one of {', '.join(GQA_ATTENTION)}")
    stacks = [model.decoder] + ([model.encoder] if which == "all" else [])
    for stack in stacks:
        for block in stack.block:
            for layer in block.layer:
                for name in ("SelfAttention", "EncDecAttention"):
                    old = getattr(layer, name, None)
                    if old is not None:
                        setattr(layer, name, attention_class(
                            old.config, has_relative_attention_bias=old.has_relative_attention_bias,
                            layer_idx=old.layer_idx, is_causal=old.is_causal))


class T5GQAForConditionalGeneration(t5.T5ForConditionalGeneration):
    """T5ForConditionalGeneration whose decoder (and, with gqa_attention "all", encoder) attention keeps
    `num_key_value_heads` KV heads."""

    def __init__(self, config):
        super().__init__(config)
        group_attention(self, T5GQAAttention)
        self.post_init()  # initialises the new attention modules only (the rest is marked initialised)


class MT5GQAForConditionalGeneration(mt5.MT5ForConditionalGeneration):
    def __init__(self, config):
        super().__init__(config)
        group_attention(self, MT5GQAAttention)
        self.post_init()


class UMT5GQAForConditionalGeneration(umt5.UMT5ForConditionalGeneration):
    def __init__(self, config):
        super().__init__(config)
        group_attention(self, UMT5GQAAttention)
        self.post_init()
