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

Served by vLLM's Transformers backend (`LLM(folder, trust_remote_code=True)`), which builds the base model
through auto_map's `AutoModel` entry (GPTNeoXGQAModel), replaces the attention call with its own paged
attention (it finds the call to `ALL_ATTENTION_FUNCTIONS` in `forward`'s source and reads `scaling=`), and
renames the checkpoint's `embed_out` by the conversion mapping registered below.

Written for transformers 5.19 to 5.25 (the attention's `layer_past` / `position_embeddings` arguments of 5.x).
"""
from torch import nn
from transformers.conversion_mapping import WeightRenaming, register_checkpoint_conversion_mapping
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # this name: vLLM looks for it in forward
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

        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, neox.eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self, query_states, key_states, value_states, attention_mask, scaling=self.scaling,
            dropout=0.0 if not self.training else self.attention_dropout, **kwargs)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.dense(attn_output), attn_weights


def use_gqa_attention(model: neox.GPTNeoXModel) -> None:
    """Give every layer of `model` attention with `num_key_value_heads` KV heads."""
    for i, layer in enumerate(model.layers):
        layer.attention = GPTNeoXGQAAttention(model.config, i)


class GPTNeoXGQAModel(neox.GPTNeoXModel):
    """GPTNeoXModel whose attention layers keep `num_key_value_heads` KV heads (auto_map's AutoModel: the base
    model vLLM's Transformers backend builds)."""

    _supports_attention_backend = True  # vLLM's Transformers backend: attention through ALL_ATTENTION_FUNCTIONS

    def __init__(self, config):
        super().__init__(config)
        use_gqa_attention(self)
        self.post_init()  # initialises the new attention modules only (the rest is marked initialised)


class GPTNeoXGQAForCausalLM(neox.GPTNeoXForCausalLM):
    """GPTNeoXForCausalLM whose attention layers keep `num_key_value_heads` KV heads."""

    _supports_attention_backend = True

    def __init__(self, config):
        super().__init__(config)
        use_gqa_attention(self.gpt_neox)
        self.post_init()  # initialises the new attention modules only (the rest is marked initialised)


# Pythia checkpoints name the output embedding embed_out. transformers renames it for its own
# GPTNeoXForCausalLM only; registered under this class's name, the renaming applies to it in from_pretrained
# (and back in save_pretrained), and vLLM reads it for the checkpoint's `architectures`.
register_checkpoint_conversion_mapping(
    "GPTNeoXGQAForCausalLM", [WeightRenaming(source_patterns=r"^embed_out\.", target_patterns="lm_head.")],
    overwrite=True)
