"""Tiny checkpoints built from configs (never downloaded): one factory for every supported architecture."""
from __future__ import annotations

import os

import torch

V = 512  # vocabulary of the session tokenizer in conftest.py

# Per architecture: the config class name and the overrides that make a tiny instance of it.
# hidden 64, 8 query heads; gemma and qwen3 get an explicit head_dim ≠ hidden / heads on purpose.
TINY_CONFIGS = {
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": None}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "gemma": ("GemmaConfig", {"head_dim": 32}),
    "phi3": ("Phi3Config", {}),
    "starcoder2": ("Starcoder2Config", {}),
    "olmo2": ("Olmo2Config", {}),
    "granite": ("GraniteConfig", {"attention_multiplier": 0.2, "residual_multiplier": 0.5}),
    "smollm3": ("SmolLM3Config", {"no_rope_layer_interval": 2}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": 16}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 16}),
    "cohere": ("CohereConfig", {"attention_bias": True}),
    "olmo": ("OlmoConfig", {"clip_qkv": 8.0}),
    "stablelm": ("StableLmConfig", {"use_qkv_bias": True}),
    "mixtral": ("MixtralConfig", {"num_local_experts": 3, "num_experts_per_tok": 2}),
    "qwen2_moe": ("Qwen2MoeConfig", {"num_experts": 3, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                                     "shared_expert_intermediate_size": 32}),
}


def tiny_config(arch: str = "llama", heads: int = 8, kv_heads: int | None = None, layers: int = 2,
                hidden: int = 64, vocab: int = V, **over):
    import transformers

    cls_name, extra = TINY_CONFIGS[arch]
    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads or heads, max_position_embeddings=512,
              bos_token_id=0, eos_token_id=0, pad_token_id=1)
    kw.update(extra)
    kw.update(over)
    return getattr(transformers, cls_name)(**kw)


def tiny_model(arch: str = "llama", seed: int = 0, dtype=torch.float32, **cfg_kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, **cfg_kw))
    with torch.no_grad():  # HF init leaves biases and norms at 0/1: randomise so tests see every tensor move
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.to(dtype).eval()


def save(model, path, tokenizer=None, max_shard_size: str | None = None) -> str:
    model.save_pretrained(path, max_shard_size=max_shard_size or "5GB")
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    model.generation_config.save_pretrained(path)
    return str(path)


def make_groups_equal(model, groups: int):
    """Copy the first KV head of each group of contiguous KV heads over the others (k/v weights, biases,
    per-KV-head norm segments), so that pooling to `groups` loses nothing."""
    from uptrain.arch import spec_for_config

    cfg = model.config
    spec = spec_for_config(cfg)
    kv, d = spec.kv_heads(cfg), spec.head_dim(cfg)
    n = kv // groups
    sd = model.state_dict()
    with torch.no_grad():
        for name, t in sd.items():
            for rows in spec.kv_row_blocks(name, cfg):  # (start, stop) row ranges holding KV heads
                start, stop = rows
                block = t[start:stop].view(groups, n, d, *t.shape[1:])
                block.copy_(block[:, :1].expand_as(block).clone())
    return model


def dummy_files(path):
    """Non-weight files a real checkpoint carries; the converter must copy them."""
    with open(os.path.join(path, "chat_template.jinja"), "w") as f:
        f.write("{% for m in messages %}{{ m['content'] }}{% endfor %}")
