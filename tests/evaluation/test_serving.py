"""Every decoder-only result uptrain writes serves in vLLM with transformers' greedy tokens, and vLLM's KV cache
holds H/G times more tokens in the same memory. One vLLM child process serves every tiny model one after another
(uptrain/evaluation/serving.py), so the engine's start-up is paid once. Slow tier; skipped without vLLM unless
UPTRAIN_REQUIRE_VLLM=1 (CI), which makes a missing vLLM a failure."""
import pytest
import torch
from serving_models import HEADS, require_vllm, save_servable
from tiny_models import REMOTE_CODE, TINY_CONFIGS

import uptrain
from uptrain import hf
from uptrain.evaluation.serving import ServeJob, ServeSettings, serve_in_vllm, transformers_greedy

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

NEW_TOKENS, PROMPTS, PROMPT_LEN = 32, 4, 16
# sources served too, for the KV-capacity ratio: a native family, every remote-code one, and Falcon (whose cache
# transformers does not shrink); G = 2 too where its form differs from G = 1's (gpt2: remote code vs native
# gpt_bigcode; falcon: num_kv_heads vs multi_query)
WITH_SOURCE = ("llama", *REMOTE_CODE, "falcon")
# (name, tiny_models arch, G, config overrides): every architecture at G = 1 (MQA, every family has it)
CASES = [(arch, arch, 1, {}) for arch in TINY_CONFIGS]
CASES += [(arch, arch, g, {}) for arch in WITH_SOURCE for g in (2, HEADS)]
CASES += [("falcon-rw", "falcon", 1, {"parallel_attn": False, "alibi": True})]  # falcon-rw-1b's sequential block
# per-layer KV heads (--groups G_0,…): the nemotron-nas form, which vLLM serves natively (DeciLMForCausalLM) with
# uptrain's configuration class; qwen2 for its q/k/v biases
PER_LAYER = (4, 2, 1, 2)
CASES += [(f"{arch}-per-layer", arch, PER_LAYER, {"layers": len(PER_LAYER)}) for arch in ("llama", "qwen2")]


def case_id(case):
    g = case[2]
    return f"{case[0]}-G{','.join(map(str, g)) if isinstance(g, tuple) else g}"


@pytest.fixture(scope="module")
def served(tmp_path_factory, tokenizer, heldout_text):
    """Per case: (transformers' greedy tokens, vLLM's measurements, folder, whether uptrain's code travels)."""
    require_vllm()
    root = tmp_path_factory.mktemp("serve")
    settings = ServeSettings(kv_cache_bytes=64 << 20, max_model_len=256, requests=PROMPTS, prompt_len=PROMPT_LEN,
                             new_tokens=NEW_TOKENS, repeats=1, context=256)
    prompts = settings.prompts(torch.tensor(tokenizer(heldout_text)["input_ids"]))
    sources, jobs, refs = {}, [], []
    for name, arch, g, over in CASES:
        if name not in sources:
            sources[name] = save_servable(arch, root / name / "src", tokenizer, **over)
        folder = sources[name] if g == HEADS else str(root / name / f"g{g}")
        if g != HEADS:
            uptrain.convert(sources[name], folder, groups=list(g) if isinstance(g, tuple) else g, progress=False)
        src = hf.resolve(folder)
        refs.append(transformers_greedy(hf.load_model(src, "float32").eval(), prompts, NEW_TOKENS, tokenizer))
        jobs.append(ServeJob(folder, prompts, trust_remote_code=hf.carries_uptrain_code(src), dtype="float32",
                             label=case_id((name, arch, g))))
    results = serve_in_vllm(jobs, settings)
    return {case_id(c): (ref, res, job) for c, ref, res, job in zip(CASES, refs, results, jobs)}


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_every_result_serves_with_transformers_greedy_tokens(case, served):
    ref, res, job = served[case_id(case)]
    assert len(ref) == PROMPTS and all(len(r) == NEW_TOKENS for r in ref)
    assert len({t for r in ref for t in r}) >= 8  # varied continuations: equal tokens mean something
    assert res["greedy"] == ref
    name, arch, g, _ = case
    # below G = H, gpt_neox / gpt2 / opt travel with uptrain's modeling file (vLLM's Transformers backend runs
    # it); GPT-2 at G = 1 is a native gpt_bigcode checkpoint; a per-layer result carries its configuration class
    per_layer = isinstance(g, tuple)
    assert job.trust_remote_code == (per_layer or arch in REMOTE_CODE and g < HEADS and (arch, g) != ("gpt2", 1))


@pytest.mark.parametrize("arch", WITH_SOURCE)
def test_kv_capacity_is_h_over_g_times_the_sources(arch, served):
    tokens = {g: served[f"{arch}-G{g}"][1]["kv_cache_tokens"] for g in (HEADS, 2, 1)}
    assert tokens[HEADS] > 0
    assert tokens[2] == (HEADS // 2) * tokens[HEADS] and tokens[1] == HEADS * tokens[HEADS]
    conc = {g: served[f"{arch}-G{g}"][1]["max_concurrency"] for g in (HEADS, 2, 1)}
    assert conc[1] == HEADS * conc[HEADS] > 0  # requests of 256 tokens that fit at once


@pytest.mark.parametrize("arch", ("llama", "qwen2"))
def test_kv_capacity_of_per_layer_heads_is_what_their_sum_predicts(arch, served):
    """vLLM allocates each layer's own KV heads: 2 (K and V) × Σ G_l × head_dim × 4 bytes a token in float32."""
    from uptrain.arch import attention_shape

    _, res, job = served[f"{arch}-per-layer-G{','.join(map(str, PER_LAYER))}"]
    per_token = attention_shape(hf.load_config(hf.resolve(job.path))).kv_cache_bytes_per_token(4)
    assert per_token == 2 * sum(PER_LAYER) * 32 * 4  # head_dim 32
    size = res["block_size"]
    assert res["kv_cache_tokens"] == (64 << 20) // (per_token * size) * size > 0
