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
    # No KV-head field in these configs (None drops a key): below G = H the result carries remote code.
    "gpt_neox": ("GPTNeoXConfig", {"num_key_value_heads": None, "rotary_pct": 0.5}),
    "gpt2": ("GPT2Config", {"num_key_value_heads": None, "intermediate_size": None, "n_inner": 128}),
    "opt": ("OPTConfig", {"num_key_value_heads": None, "intermediate_size": None, "ffn_dim": 128,
                          "word_embed_proj_dim": 64}),
    "gpt_bigcode": ("GPTBigCodeConfig", {"num_key_value_heads": None, "intermediate_size": None, "n_inner": 128,
                                         "multi_query": False}),
    "phi": ("PhiConfig", {"partial_rotary_factor": 0.5, "qk_layernorm": True}),
    # the original layout (falcon-rw-1b: MHA, parallel block here); see test_conversion for the other two
    "falcon": ("FalconConfig", {"num_key_value_heads": None, "intermediate_size": None, "ffn_hidden_size": 128,
                                "multi_query": False, "parallel_attn": True, "bias": True}),
}
# Architectures whose result below G = H needs uptrain's modeling file (trust_remote_code=True).
REMOTE_CODE = ("gpt_neox", "gpt2", "opt")


def tiny_config(arch: str = "llama", heads: int = 8, kv_heads: int | None = None, layers: int = 2,
                hidden: int = 64, vocab: int = V, **over):
    import transformers

    cls_name, extra = TINY_CONFIGS[arch]
    kw = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv_heads or heads, max_position_embeddings=512,
              bos_token_id=0, eos_token_id=0, pad_token_id=1)
    kw.update(extra)
    kw.update(over)
    return getattr(transformers, cls_name)(**{k: v for k, v in kw.items() if v is not None})


def cache_kw(model, cache) -> dict:
    """A forward call's cache keyword: `cache` from transformers 5.20, `past_key_values` in 5.19."""
    import inspect

    return {"cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values": cache}


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
            blocks = spec.kv_row_blocks(name, cfg)  # (start, stop) canonical row ranges holding KV heads
            if not blocks:
                continue
            key = spec.classify(name)[2]
            if "{}" in key:  # one tensor per KV head (stablelm's k_layernorm.norms.{h}): the group's first
                h = spec.head_of(name, key)
                t.copy_(sd[name[: len(name) - len(key.format(h))] + key.format(h - h % n)])
                continue
            storage = spec.storage(spec.classify(name)[2], cfg)  # e.g. fused per KV head, Conv1D transposed
            canonical = storage.canonical(t).clone()
            for start, stop in blocks:
                block = canonical[start:stop].view(groups, n, d, *canonical.shape[1:])
                block.copy_(block[:, :1].expand_as(block).clone())
            t.copy_(storage.stored(canonical, tuple(t.shape)))
    return model


def dummy_files(path):
    """Non-weight files a real checkpoint carries; the converter must copy them."""
    with open(os.path.join(path, "chat_template.jinja"), "w") as f:
        f.write("{% for m in messages %}{{ m['content'] }}{% endfor %}")


# Encoder-decoders, a table of their own (uptrain.arch's causal SPECS are kept equal to TINY_CONFIGS): d_model 64,
# 2 + 2 layers, 4 heads of d_kv 16, the T5.1.1 layout (gated-gelu, untied LM head); the session tokenizer's 512
# tokens plus T5's 100 sentinels (uptrain.span_corruption.add_sentinel_tokens).
SENTINELS = 100
TINY_SEQ2SEQ_CONFIGS = {
    "t5": ("T5Config", {}),
    "mt5": ("MT5Config", {}),
    "umt5": ("UMT5Config", {}),
}


def tiny_seq2seq_config(arch: str = "t5", heads: int = 4, layers: int = 2, vocab: int = V + SENTINELS, **over):
    import transformers

    cls_name, extra = TINY_SEQ2SEQ_CONFIGS[arch]
    kw = dict(vocab_size=vocab, d_model=64, d_kv=16, d_ff=128, num_layers=layers, num_decoder_layers=layers,
              num_heads=heads, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
              relative_attention_num_buckets=8, relative_attention_max_distance=32,
              pad_token_id=1, eos_token_id=0, decoder_start_token_id=1)  # T5 starts decoding with the pad id
    kw.update(extra)
    kw.update(over)
    return getattr(transformers, cls_name)(**kw)


def tiny_seq2seq_model(arch: str = "t5", seed: int = 0, dtype=torch.float32, **cfg_kw):
    """A random T5-family model; the LM head is its own tensor unless the config ties it (T5.1.1 does not)."""
    from transformers import AutoModelForSeq2SeqLM

    torch.manual_seed(seed)
    cfg = tiny_seq2seq_config(arch, **cfg_kw)
    model = AutoModelForSeq2SeqLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "relative_attention_bias" in name:  # init leaves norms at 1
                p.add_(torch.randn_like(p) * 0.1)
        if cfg_kw.get("tie_word_embeddings", False) is False:  # transformers ties T5 heads unless the weights differ
            model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.shared.weight) * 0.05)
    return model.to(dtype).eval()
