"""Grouped-query attention for GPT-NeoX (Pythia) checkpoints converted by uptrain.

This file travels with the weights: `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`
loads it through config.json's `auto_map`. It imports only torch and transformers.

The checkpoint is a GPT-NeoX one except for the attention: config.json's `num_key_value_heads` (G) KV heads
are shared by groups of H/G query heads (query head h reads KV head h // (H/G)), and `query_key_value` fuses
q, k and v per KV head, as GPT-NeoX fuses them per head:

    rows = [q q … q k v] × G     (H/G query heads, then the key and the value of KV head j, for j < G)

With G = H that is GPT-NeoX's own layout, and this class computes what GPTNeoXForCausalLM computes.
The KV cache holds G heads. Everything else (partial rotary, parallel residual, eager / SDPA / flash
attention) is transformers' GPT-NeoX code: only the projection's shape and the head split change.

Written for transformers 5.24 (the attention's `layer_past` / `position_embeddings` arguments of 5.x).
"""
from torch import nn
from transformers.models.gpt_neox import modeling_gpt_neox as neox


def repeat_kv(x, n: int):
    """[batch, G, seq, d] → [batch, G·n, seq, d]: each KV head serves its n query heads (eager attention)."""
    if n == 1:
        return x
    b, g, s, d = x.shape
    return x[:, :, None].expand(b, g, n, s, d).reshape(b, g * n, s, d)


class GPTNeoXGQAAttention(neox.GPTNeoXAttention):
    def __init__(self, config, layer_idx=None):
        super().__init__(config, layer_idx)
        heads = config.num_attention_heads
        self.num_key_value_heads = getattr(config, "num_key_value_heads", None) or heads
        self.num_key_value_groups = heads // self.num_key_value_heads  # read by transformers' SDPA / flash paths
        rows = (heads + 2 * self.num_key_value_heads) * self.head_size
        self.query_key_value = nn.Linear(config.hidden_size, rows, bias=config.attention_bias)

    def forward(self, hidden_states, attention_mask, layer_past=None, position_embeddings=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        n, d = self.num_key_value_groups, self.head_size
        # [batch, G, seq, (n + 2)·d]: per KV head its n query heads, its key, its value (GPT-NeoX's own split
        # when n = 1)
        qkv = self.query_key_value(hidden_states).view(*input_shape, self.num_key_value_heads, (n + 2) * d)
        qkv = qkv.transpose(1, 2)
        b, g, s, _ = qkv.shape
        query_states = qkv[..., : n * d].reshape(b, g, s, n, d).transpose(2, 3).reshape(b, g * n, s, d)
        key_states, value_states = qkv[..., n * d: (n + 1) * d], qkv[..., (n + 1) * d:]

        cos, sin = position_embeddings
        query_states, key_states = neox.apply_rotary_pos_emb(query_states, key_states, cos, sin)
        if layer_past is not None:  # the cache keeps G heads
            key_states, value_states = layer_past.update(key_states, value_states, self.layer_idx)
        if self.config._attn_implementation == "eager":  # GPT-NeoX's eager attention expects H heads
            key_states, value_states = repeat_kv(key_states, n), repeat_kv(value_states, n)

        attention_interface = neox.ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, neox.eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self, query_states, key_states, value_states, attention_mask, scaling=self.scaling,
            dropout=0.0 if not self.training else self.attention_dropout, **kwargs)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.dense(attn_output), attn_weights


class GPTNeoXGQAForCausalLM(neox.GPTNeoXForCausalLM):
    """GPTNeoXForCausalLM whose attention layers keep `num_key_value_heads` KV heads."""

    def __init__(self, config):
        super().__init__(config)
        for i, layer in enumerate(self.gpt_neox.layers):
            layer.attention = GPTNeoXGQAAttention(config, i)
        self.post_init()  # initialises the new attention modules only (the rest is marked initialised)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # Pythia checkpoints name the output embedding embed_out; transformers renames it for its own
        # GPTNeoXForCausalLM only, never for custom code
        kwargs.setdefault("key_mapping", {r"^embed_out\.": "lm_head."})
        return super().from_pretrained(*args, **kwargs)
