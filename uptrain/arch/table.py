"""The table of attention specs: for each `model_type`, where the K/V heads live in the checkpoint.

Adding an architecture = one entry in `SPECS` + one tiny-model test. Nothing else in the converter
knows architecture names.
"""
from __future__ import annotations

import dataclasses

from uptrain.arch.specs import G, AttentionSpec, Block, Extra, Form, model_type
from uptrain.arch.storage import K_ROWS, QKV_ROWS, V_ROWS
from uptrain.errors import UptrainError

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


_LLAMA = AttentionSpec(kv=_SEPARATE_KV, copy=_LLAMA_LAYER)
_C_ATTN = {"attn.c_attn.weight": QKV_ROWS, "attn.c_attn.bias": QKV_ROWS}
_GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_GPT2_LAYER = ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.c_proj.weight", "attn.c_proj.bias",
               "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
               "attn.bias", "attn.masked_bias")  # causal-mask buffers older checkpoints saved
_GPT2_GLOBAL = ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias",
                "lm_head.weight")


def _remote_code_forms(template: str) -> tuple[Form, ...]:
    """G = H: the source as it is (native); otherwise num_key_value_heads = G plus uptrain/modeling's file."""
    return Form(groups="H"), Form(config={"num_key_value_heads": G}, remote_code=template)


def _deci_form(requires: dict | None = None, config: dict | None = None) -> Form:
    """Per-layer KV heads of a Llama-family source: the nemotron-nas / DeciLM config (block_configs) and
    uptrain/modeling's file, whose model is transformers' Llama with per-layer k/v widths. `requires`: what the
    form cannot express must be off (a sliding window); `config`: the source's other differences from Llama."""
    return Form(groups="per-layer", requires=requires or {}, remote_code="nemotron-nas", per_layer="block_configs",
                config={"model_type": "nemotron-nas", "architectures": ["DeciLMForCausalLM"],
                        "num_key_value_heads": None, **(config or {})})


def _llama_family(deci: Form) -> AttentionSpec:
    return dataclasses.replace(_LLAMA, forms=(Form(config={"num_key_value_heads": G}), deci))


SPECS: dict[str, AttentionSpec] = {
    "llama": _llama_family(_deci_form()),
    "mistral": _llama_family(_deci_form(requires={"sliding_window": False}, config={"sliding_window": None})),
    # q/k/v biases are in _SEPARATE_KV / _LLAMA_LAYER; o_proj has none: nemotron-nas says so with qkv_bias (the
    # field vLLM's DeciLM reads for q/k/v, attention_bias for o_proj)
    "qwen2": _llama_family(_deci_form(
        requires={"use_sliding_window": False}, config={
            "qkv_bias": True, "attention_bias": False, "use_sliding_window": None, "sliding_window": None,
            "max_window_layers": None, "layer_types": None})),
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
    # use_qk_norm (Command R+): a LayerNorm weight per head, stored [heads, head_dim]; k_norm's rows are the KV
    # heads (pooled like K), q_norm's the query heads (copied).
    "cohere": AttentionSpec(
        kv=_SEPARATE_KV,
        copy=("input_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
              "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.o_proj.weight", "self_attn.o_proj.bias"),
        rope="interleaved",
        extras=(Extra("use_qk_norm", kv={"self_attn.k_norm.weight": K_ROWS}, copy=("self_attn.q_norm.weight",),
                      flat=("self_attn.k_norm.weight",)),)),
    # OLMo-1: LayerNorms without parameters; clip_qkv clamps q, k and v (no effect on pooling).
    "olmo": AttentionSpec(
        kv=_SEPARATE_KV,
        copy=("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "self_attn.q_proj.weight",
              "self_attn.o_proj.weight")),
    # LayerNorms with biases, partial rotary, optional q/k/v biases. qk_layernorm (StableLM-2-12B) keeps one
    # LayerNorm per head, each its own tensor under the head's index: the K k_layernorm norms are pooled to G
    # like K's rows (a family: "{}" is the head), the H q_layernorm norms copied.
    "stablelm": AttentionSpec(
        kv=_SEPARATE_KV,
        copy=("input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
              "post_attention_layernorm.bias", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
              "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.o_proj.weight"),
        extras=(Extra("qk_layernorm", kv={"self_attn.k_layernorm.norms.{}.weight": K_ROWS},
                      copy_patterns=(r"self_attn\.q_layernorm\.norms\.\d+\.weight",)),)),
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
    # ---- architectures whose transformers class has no KV-head count: below G = H the result carries a
    # modeling file (remote code, uptrain/modeling/), at G = H it is the source, unchanged.
    # Pythia: q, k, v fused per head ([q k v] × H; per KV head in the result), partial rotary, parallel
    # residual. Old checkpoints hold the causal-mask buffers and embed_out (transformers 5 renames it lm_head).
    "gpt_neox": AttentionSpec(
        kv={"attention.query_key_value.weight": QKV_ROWS, "attention.query_key_value.bias": QKV_ROWS},
        copy=("input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
              "post_attention_layernorm.bias", "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
              "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias", "attention.dense.weight", "attention.dense.bias",
              "attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq"),
        required=("attention.query_key_value.weight",), layer_prefix="gpt_neox.layers.{}.",
        global_tensors=("gpt_neox.embed_in.weight", "gpt_neox.final_layer_norm.weight",
                        "gpt_neox.final_layer_norm.bias", "embed_out.weight", "lm_head.weight"),
        q="attention.query_key_value", o="attention.dense",
        per_kv_head=("attention.query_key_value.weight", "attention.query_key_value.bias"),
        forms=_remote_code_forms("gpt_neox")),
    # GPT-2: Conv1D weights stored [in, out], c_attn = [q | k | v]; learned positions, no RoPE. MQA (G = 1) is
    # written as a native gpt_bigcode checkpoint (multi_query, nn.Linear weights) unless the attention
    # scales by layer index, which gpt_bigcode cannot express.
    "gpt2": AttentionSpec(
        kv=_C_ATTN, copy=_GPT2_LAYER, required=("attn.c_attn.weight",), global_tensors=_GPT2_GLOBAL,
        layer_prefix="transformer.h.{}.", root="transformer.", q="attn.c_attn", o="attn.c_proj", rope=None,
        heads_field="n_head", layers_field="n_layer", hidden_field="n_embd", transposed=_GPT2_CONV1D,
        forms=(Form(groups="H"),
               Form(groups="1", requires={"scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False},
                    config={"model_type": "gpt_bigcode", "architectures": ["GPTBigCodeForCausalLM"],
                            "multi_query": True, "num_key_value_heads": G},
                    untransposed=_GPT2_CONV1D),
               *_remote_code_forms("gpt2")[1:])),
    # OPT: separate projections with biases (enable_bias), learned positions; base-model checkpoints lack
    # "model." (facebook/opt-*: decoder.layers.…).
    "opt": AttentionSpec(
        kv=_SEPARATE_KV,
        copy=("self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.out_proj.weight",
              "self_attn.out_proj.bias", "self_attn_layer_norm.weight", "self_attn_layer_norm.bias", "fc1.weight",
              "fc1.bias", "fc2.weight", "fc2.bias", "final_layer_norm.weight", "final_layer_norm.bias"),
        global_tensors=("model.decoder.embed_tokens.weight", "model.decoder.embed_positions.weight",
                        "model.decoder.final_layer_norm.weight", "model.decoder.final_layer_norm.bias",
                        "model.decoder.project_in.weight", "model.decoder.project_out.weight", "lm_head.weight"),
        layer_prefix="model.decoder.layers.{}.", root="model.", o="self_attn.out_proj", rope=None,
        forms=_remote_code_forms("opt")),
    # phi-1 / phi-1.5 / phi-2: biases everywhere, the output projection is `dense`, partial rotary, one
    # LayerNorm before a parallel attention + MLP; qk_layernorm norms span head_dim (shared by all heads).
    "phi": AttentionSpec(
        kv=_SEPARATE_KV,
        copy=("self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.dense.weight", "self_attn.dense.bias",
              "input_layernorm.weight", "input_layernorm.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
              "mlp.fc2.bias"),
        extras=(Extra("qk_layernorm", copy=("self_attn.q_layernorm.weight", "self_attn.q_layernorm.bias",
                                            "self_attn.k_layernorm.weight", "self_attn.k_layernorm.bias")),),
        global_tensors=("model.embed_tokens.weight", "model.final_layernorm.weight", "model.final_layernorm.bias",
                        "lm_head.weight", "lm_head.bias"),
        o="self_attn.dense"),
    # Falcon: q, k, v fused per KV head in all three layouts — MHA ([q k v] × H), multi_query ([q … q k v],
    # falcon-7b) and new_decoder_architecture ([q … q k v] × num_kv_heads, falcon-40b/180b). Below G = H an
    # MHA source becomes multi_query (G = 1) or, with a parallel block (one LayerNorm kept:
    # num_ln_in_parallel_attn 1), the new decoder architecture; sequential MHA blocks have no GQA form.
    # transformers' Falcon broadcasts K/V to every head before its cache in the new decoder architecture:
    # the cache it keeps there is not smaller (multi_query's is).
    "falcon": AttentionSpec(
        kv={"self_attention.query_key_value.weight": QKV_ROWS, "self_attention.query_key_value.bias": QKV_ROWS},
        copy=("self_attention.dense.weight", "self_attention.dense.bias", "mlp.dense_h_to_4h.weight",
              "mlp.dense_h_to_4h.bias", "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias",
              "input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
              "post_attention_layernorm.bias", "ln_attn.weight", "ln_attn.bias", "ln_mlp.weight", "ln_mlp.bias"),
        required=("self_attention.query_key_value.weight",), layer_prefix="transformer.h.{}.", root="transformer.",
        global_tensors=("transformer.word_embeddings.weight", "transformer.ln_f.weight", "transformer.ln_f.bias",
                        "lm_head.weight"),
        q="self_attention.query_key_value", o="self_attention.dense",
        kv_heads_field="num_kv_heads", mqa_field="multi_query", gqa_field="new_decoder_architecture",
        per_kv_head=("self_attention.query_key_value.weight", "self_attention.query_key_value.bias"),
        forms=(Form(groups="H"),
               Form(requires={"new_decoder_architecture": True}, config={"num_kv_heads": G}),
               Form(groups="1", config={"multi_query": True, "num_kv_heads": G}),
               Form(requires={"parallel_attn": True},
                    config={"new_decoder_architecture": True, "num_kv_heads": G, "num_ln_in_parallel_attn": 1}))),
    # gpt_bigcode (SantaCoder, StarCoder-1): MHA or MQA, nothing between (multi_query). c_attn is an
    # nn.Linear fused per head in MHA ([q k v] × H) and [q … q | k | v] in MQA: per KV head both times.
    "gpt_bigcode": AttentionSpec(
        kv=_C_ATTN, copy=_GPT2_LAYER, required=("attn.c_attn.weight",), global_tensors=_GPT2_GLOBAL,
        layer_prefix="transformer.h.{}.", root="transformer.", q="attn.c_attn", o="attn.c_proj", rope=None,
        heads_field="n_head", layers_field="n_layer", hidden_field="n_embd", mqa_field="multi_query",
        kv_heads_field=None,  # transformers 5 writes a num_key_value_heads that multi_query overrides on load
        per_kv_head=tuple(_C_ATTN),
        forms=(Form(groups="H", config={"multi_query": False, "num_key_value_heads": G}),
               Form(groups="1", config={"multi_query": True, "num_key_value_heads": G}))),
}


# ---- encoder-decoders: T5 and its multilingual kin, in the T5.1.1 layout (relative position bias, no 1/sqrt(d)
# scaling, relu or gated-gelu feed-forward, tied or untied LM head). The GQA paper pools the decoder's self- and
# cross-attention and leaves encoder self-attention alone (it runs in parallel over the source: not bound by
# memory bandwidth, and it has no cache); ConvertOptions.attention "all" pools it too (AttentionSpec.pooling).
# No transformers class holds G KV heads of a T5: below G = H the result carries uptrain/modeling's file.
_T5_BLOCKS = (
    Block("encoder", "encoder.block.{}.layer.0.SelfAttention.", ("num_layers",), pooled=False, cached=False),
    Block("decoder", "decoder.block.{}.layer.0.SelfAttention.", ("num_decoder_layers", "num_layers"), pooled=True,
          cached=True),
    Block("cross", "decoder.block.{}.layer.1.EncDecAttention.", ("num_decoder_layers", "num_layers"), pooled=True,
          cached=True),
)


def _t5(model_type: str) -> AttentionSpec:
    return AttentionSpec(
        kv={"k.weight": K_ROWS, "v.weight": V_ROWS},
        # relative_attention_bias: [buckets, H], per query head (every layer's in umT5, the first's in T5)
        copy=("q.weight", "o.weight", "relative_attention_bias.weight"),
        required=("k.weight", "v.weight"), q="q", o="o", rope=None, blocks=_T5_BLOCKS,
        global_tensors=("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight",
                        "encoder.final_layer_norm.weight", "decoder.final_layer_norm.weight"),
        global_patterns=(r"(encoder|decoder)\.block\.\d+\.layer\.\d+\.layer_norm\.weight",
                         r"(encoder|decoder)\.block\.\d+\.layer\.\d+\.DenseReluDense\.(wi|wi_0|wi_1|wo)\.weight"),
        heads_field="num_heads", layers_field="num_layers", hidden_field="d_model", head_dim_field="d_kv",
        forms=(Form(groups="H"), Form(config={"num_key_value_heads": G, "gqa_attention": "decoder"},
                                      remote_code=model_type)))


# A table of its own: SPECS is the causal table (tests keep it equal to their causal tiny models).
SEQ2SEQ_SPECS: dict[str, AttentionSpec] = {"t5": _t5("t5"), "mt5": _t5("mt5"), "umt5": _t5("umt5")}

# Results with per-layer KV heads, read back (inspect, eval, train, push): Llama-named tensors, G_l from the
# config. Not conversion sources (ConvertOptions.check_source refuses them: convert their source instead).
PER_LAYER_SPECS: dict[str, AttentionSpec] = {
    "nemotron-nas": dataclasses.replace(_LLAMA, per_layer="block_configs", kv_heads_field=None, forms=()),
}


def _is_encoder(mt: str) -> bool:
    """A masked-LM architecture without a seq2seq form (BERT, RoBERTa, DeBERTa …), from transformers' own
    auto mappings (imported only on this error path: planning a conversion never imports transformers)."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES as MLM
        from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES as S2S
    except ImportError:
        return False
    return mt in MLM and mt not in S2S


def table_entry(mt: str) -> AttentionSpec | None:
    """The spec of `model_type` mt in any of the three tables, as written there (no config applied)."""
    return SPECS.get(mt) or SEQ2SEQ_SPECS.get(mt) or PER_LAYER_SPECS.get(mt)


def spec_for_config(cfg) -> AttentionSpec:
    mt = model_type(cfg)
    spec = table_entry(mt)
    if spec is not None:
        spec = spec.for_config(cfg)  # with the tensors of the config's optional features (Extra)
    if spec is None and _is_encoder(mt):
        raise UptrainError(f"architecture {mt!r} is an encoder (masked-LM family): it reads its whole input at once "
                           f"and keeps no KV cache, so sharing KV heads saves nothing there. GQA is for "
                           f"decoders; supported: {', '.join(sorted({**SPECS, **SEQ2SEQ_SPECS}))}")
    if spec is None:
        raise UptrainError(f"architecture {mt!r} is not supported yet; supported: "
                           f"{', '.join(sorted({**SPECS, **SEQ2SEQ_SPECS}))}. "
                           f"Adding one is an entry in uptrain/arch/table.py plus a tiny-model test")
    return spec
