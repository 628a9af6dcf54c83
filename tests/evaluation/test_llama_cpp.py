"""Every decoder-only result uptrain writes runs in llama.cpp (GGUF, through llama.cpp's own converter) with
transformers' greedy tokens, and llama.cpp's KV cache for a context is H/G times smaller (Σ G_l / Σ K per
layer). llama.cpp is built once by .ci/build_llama_cpp.sh (uptrain/evaluation/llama_cpp.py); each tiny model is
converted and run in child processes. Slow tier; skipped without that build unless UPTRAIN_REQUIRE_LLAMA_CPP=1
(CI), which makes a missing build a failure.

The tiny models' tokenizer is trained in-process, so llama.cpp's table of known BPE pre-tokenizers does not
know it: the converter is told its pre-tokenizer (gpt-2's, the byte-level one it is), which only names how
llama.cpp would split text; the tests feed token ids. Gemma, Gemma 2 and Phi-3's converters read a SentencePiece
tokenizer.model only: those folders get one trained in-process too."""
import io
import os

import pytest
import torch
from serving_models import HEADS, save_servable
from tiny_models import TINY_CONFIGS

import uptrain
from uptrain import hf
from uptrain.errors import UptrainError
from uptrain.evaluation.serving import transformers_greedy

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]

NEW_TOKENS, PROMPTS, PROMPT_LEN, N_CTX = 32, 4, 16, 4096
SENTENCEPIECE_ONLY = ("gemma", "gemma2", "phi3")
# what llama.cpp's converter (llama-cpp-python 0.3.36's tree) refuses, whatever uptrain writes: name → (arch,
# config overrides, the converter's message). OPT has no llama.cpp architecture; llama.cpp's phi2 has no tensor
# for Phi's qk_layernorm; its Falcon converter splits q/k/v as Falcon-7B / 40B store them, without biases
# (falcon-rw-1b has biases and ALiBi).
REFUSED = {"opt": ("opt", {}, "Model OPTGQAForCausalLM is not supported"),
           "phi-qk-layernorm": ("phi", {}, "Can not map tensor 'model.layers.0.self_attn.k_layernorm"),
           "falcon-rw": ("falcon", {"parallel_attn": False, "alibi": True},
                         "Can not map tensor 'transformer.h.0.post_attention_layernorm")}
# the layouts the cases run, as the families ship: Phi-1 / 2 (no qk_layernorm, a 4 × hidden MLP), Falcon-7B / 40B (no biases),
# GPT-2 and StarCoder (a 4 × hidden MLP: llama.cpp's converters write that size whatever the config says),
# SmolLM3 (no RoPE every 4th layer: llama.cpp's SmolLM3 hard-codes that step), Gemma 2 / 3 but the 27B ones
# (query_pre_attn_scalar = head_dim: llama.cpp scales queries by 1/√head_dim whatever the config says; the tiny
# Gemma 3's and Phi's seeds give no two top logits closer than 0.006 on these prompts: ties break either way)
OVERRIDES = {"gemma2": {"query_pre_attn_scalar": 32}, "gemma3_text": {"query_pre_attn_scalar": 32, "seed": 4, "initializer_range": 0.03},
             "phi": {"qk_layernorm": False, "intermediate_size": 512, "seed": 4}, "falcon": {"bias": False}, "gpt2": {"n_inner": 512},
             "gpt_bigcode": {"n_inner": 512}, "smollm3": {"no_rope_layer_interval": 4, "layers": 4}}
# (name, arch, G, config overrides): every architecture at G = 1 but OPT (gpt2's G = 1 is a native gpt_bigcode
# checkpoint, gpt_neox's uptrain's remote code); llama and falcon at every G for the KV ratio (falcon's G = 2 is
# the new decoder architecture, G = 1 multi_query); gpt2 at G = 2 (uptrain's remote code); the per-layer
# nemotron-nas form (intermediate 256: llama.cpp derives it from ffn_mult, to a multiple of 256)
PER_LAYER = (4, 2, 1, 2)
CASES = [(arch, arch, 1, OVERRIDES.get(arch, {})) for arch in TINY_CONFIGS if arch != "opt"]
CASES += [(arch, arch, g, OVERRIDES.get(arch, {})) for arch in ("llama", "falcon") for g in (2, HEADS)]
CASES += [("gpt2", "gpt2", 2, OVERRIDES["gpt2"])]
CASES += [(f"{arch}-per-layer", arch, PER_LAYER, {"layers": len(PER_LAYER)}) for arch in ("llama", "qwen2")]


def case_id(case):
    g = case[2]
    return f"{case[0]}-G{','.join(map(str, g)) if isinstance(g, tuple) else g}"


def require_llama_cpp():
    from uptrain.evaluation.llama_cpp import llama_cpp_available, llama_cpp_dir

    missing = "" if llama_cpp_available() else f"no llama.cpp build in {llama_cpp_dir()} (.ci/build_llama_cpp.sh)"
    try:
        import sentencepiece  # noqa: F401  llama.cpp's converter imports it first
    except ImportError:
        missing = missing or "sentencepiece is not installed (llama.cpp's converter imports it)"
    if not missing:
        return
    if os.environ.get("UPTRAIN_REQUIRE_LLAMA_CPP") == "1":
        pytest.fail(f"UPTRAIN_REQUIRE_LLAMA_CPP=1 but {missing}")
    pytest.skip(missing)


def sentencepiece_model(text: str) -> bytes:
    """EOS and padding at the tiny configs' ids (0, 1): llama.cpp holds the tokenizer's EOS off as transformers
    holds the config's."""
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(text.splitlines()), model_writer=out, vocab_size=400,
                                   model_type="bpe", minloglevel=2, eos_id=0, pad_id=1, unk_id=2, bos_id=3)
    return out.getvalue()


@pytest.fixture(scope="module")
def ran(tmp_path_factory, tokenizer, heldout_text):
    """case → (transformers' greedy tokens, llama.cpp's run, the result's folder), each case built, converted and
    run on first use (one module-wide cache: a source is built once for all its G)."""
    from uptrain.evaluation.llama_cpp import run_greedy, to_gguf

    require_llama_cpp()
    root = tmp_path_factory.mktemp("gguf")
    ids = tokenizer(heldout_text)["input_ids"]
    prompts = [ids[i * PROMPT_LEN: (i + 1) * PROMPT_LEN] for i in range(PROMPTS)]
    sp = sentencepiece_model(heldout_text)
    sources, out = {}, {}

    def get(case):
        name, arch, g, over = case
        if case_id(case) in out:
            return out[case_id(case)]
        if name not in sources:
            sources[name] = save_servable(arch, root / name / "src", tokenizer, **over)
        folder = sources[name] if g == HEADS else str(root / name / f"g{g}")
        if g != HEADS:
            uptrain.convert(sources[name], folder, groups=list(g) if isinstance(g, tuple) else g, progress=False,
                            overwrite=True)
        if arch in SENTENCEPIECE_ONLY:
            (root / folder / "tokenizer.model").write_bytes(sp)
        ref = transformers_greedy(hf.load_model(hf.resolve(folder), "float32").eval(), prompts, NEW_TOKENS,
                                  tokenizer)
        gguf = to_gguf(folder, f"{folder}.gguf", pre_tokenizer="gpt-2")
        out[case_id(case)] = (ref, run_greedy(gguf, prompts, NEW_TOKENS, n_ctx=N_CTX, cache_type="f32"),
                               folder)
        return out[case_id(case)]

    get.prompts = prompts
    return get


NEAR_TIE = 0.05  # a logit gap that float32 sums in two engines can flip on a random tiny model


def assert_greedy_equal(ref, run, folder, prompts):
    """llama.cpp's greedy tokens are transformers': identical, or identical up to a step where transformers' two
    candidates are a near-tie (its logit for llama.cpp's token within NEAR_TIE of its own choice; after that the
    two continue different text). At least half the prompts agree to the last token."""
    diverged = [i for i, (a, b) in enumerate(zip(run.tokens, ref)) if a != b]
    assert len(diverged) <= len(ref) // 2, (diverged, run.tokens, ref)
    if not diverged:
        return
    model = hf.load_model(hf.resolve(folder), "float32").eval()
    for i in diverged:
        a, b = run.tokens[i], ref[i]
        n = next(k for k, (x, y) in enumerate(zip(a, b)) if x != y)
        with torch.no_grad():
            logits = model(torch.tensor([prompts[i] + b[:n]])).logits[0, -1]
        assert float(logits[b[n]] - logits[a[n]]) < NEAR_TIE, (i, n, a, b)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_every_result_runs_in_llama_cpp_with_transformers_greedy_tokens(case, ran):
    ref, run, folder = ran(case)
    assert len(ref) == PROMPTS and all(len(r) == NEW_TOKENS for r in ref)
    assert len({t for r in ref for t in r}) >= 8  # varied continuations: equal tokens mean something
    assert_greedy_equal(ref, run, folder, ran.prompts)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_llama_cpp_kv_cache_is_what_the_kv_heads_predict(case, ran):
    """f32 K and V (the tests' cache type; llama.cpp's default f16 rounds K and V, which can swap two close top
    logits of a random tiny model): 2 × 4 bytes × G_l × head_dim per layer and cell, so H/G
    times less than the source's (Σ G_l / Σ K per layer). Every layer caches N_CTX cells, but the sliding-window
    layers of Gemma 2 / 3, which llama.cpp gives a cache of their own with fewer cells."""
    from uptrain.arch import attention_shape

    _, run, folder = ran(case)
    shape = attention_shape(hf.load_config(hf.resolve(folder)))
    g = case[2]
    per_cell_layer = 2 * 4 * shape.head_dim * (1 if isinstance(g, tuple) else g)
    assert run.n_ctx == N_CTX and sum(layers for _, _, layers in run.caches) == shape.layers
    if isinstance(g, tuple):
        assert run.caches == [(per_cell_layer * sum(g) * N_CTX, N_CTX, shape.layers)]
    else:
        assert all(size == per_cell_layer * cells * layers for size, cells, layers in run.caches)
    if case[1] not in ("gemma2", "gemma3_text"):
        assert run.kv_cache_bytes == shape.kv_cache_bytes_per_token(4) * N_CTX > 0


@pytest.mark.parametrize("arch", ("llama", "falcon"))
def test_llama_cpp_kv_cache_is_h_over_g_times_smaller(arch, ran):
    size = {g: ran(next(c for c in CASES if c[0] == arch and c[2] == g))[1].kv_cache_bytes for g in (HEADS, 2, 1)}
    assert size[HEADS] == 2 * size[2] == HEADS * size[1] > 0


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_what_llama_cpp_refuses_is_pinned(name, tmp_path, tokenizer):
    """gpt_neox / opt below G = H carry uptrain's remote-code class, which llama.cpp's converter has no mapping
    for (its GPT-NeoX graph would take fewer KV heads; OPT has no llama.cpp architecture); Phi with
    qk_layernorm has no phi2 tensor for its norms. One clear error, nothing written."""
    from uptrain.evaluation.llama_cpp import to_gguf

    require_llama_cpp()
    arch, over, message = REFUSED[name]
    src = save_servable(arch, tmp_path / "src", tokenizer, **over)
    uptrain.convert(src, tmp_path / "g1", groups=1, progress=False)
    with pytest.raises(UptrainError, match="convert_hf_to_gguf.py failed") as err:
        to_gguf(tmp_path / "g1", tmp_path / "g1.gguf", pre_tokenizer="gpt-2")
    assert message in str(err.value)
    assert not (tmp_path / "g1.gguf").exists()


def test_llama_cpps_deci_converter_alone_refuses_a_gpt2_style_bpe(tmp_path, tokenizer):
    """What to_gguf's Deci tokenizer path is for: llama.cpp's converter, run unchanged, reads a per-layer result
    whose byte-level BPE vocabulary is not Llama 3's 128256 tokens as a Llama SentencePiece-style one and fails."""
    import subprocess
    import sys

    from uptrain.evaluation.llama_cpp import llama_cpp_dir

    require_llama_cpp()
    src = save_servable("llama", tmp_path / "src", tokenizer, layers=len(PER_LAYER))
    uptrain.convert(src, tmp_path / "pl", groups=list(PER_LAYER), progress=False)
    tree = llama_cpp_dir() / "src"
    proc = subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(tmp_path / "pl"),
                           "--outfile", str(tmp_path / "pl.gguf")], capture_output=True, text=True)
    assert proc.returncode != 0 and "Cannot find Llama BPE tokenizer" in proc.stderr
    assert not (tmp_path / "pl.gguf").exists() or (tmp_path / "pl.gguf").stat().st_size < 1 << 16


def test_export_gguf_cli_writes_what_to_gguf_writes(tmp_path, tokenizer, heldout_text):
    """`uptrain export-gguf` (the per-layer result, whose tokenizer needs to_gguf's Deci path) runs in llama.cpp
    with transformers' greedy tokens."""
    from uptrain.cli import main
    from uptrain.evaluation.llama_cpp import run_greedy

    require_llama_cpp()
    src = save_servable("llama", tmp_path / "src", tokenizer, layers=len(PER_LAYER))
    uptrain.convert(src, tmp_path / "pl", groups=list(PER_LAYER), progress=False)
    assert main(["export-gguf", str(tmp_path / "pl"), str(tmp_path / "pl.gguf"), "--outtype", "f32",
                 "--pre-tokenizer", "gpt-2"]) == 0
    ids = tokenizer(heldout_text)["input_ids"]
    prompts = [ids[i * PROMPT_LEN: (i + 1) * PROMPT_LEN] for i in range(2)]
    ref = transformers_greedy(hf.load_model(hf.resolve(str(tmp_path / "pl")), "float32").eval(), prompts,
                              NEW_TOKENS, tokenizer)
    run = run_greedy(tmp_path / "pl.gguf", prompts, NEW_TOKENS, n_ctx=256, cache_type="f32")
    assert_greedy_equal(ref, run, tmp_path / "pl", prompts)


def test_t5_results_are_refused_by_llama_cpps_converter(tmp_path):
    """Encoder-decoders: uptrain's T5 results below G = H are its remote-code class, which llama.cpp's converter
    does not map. One clear error, nothing written."""
    from tiny_models import save, tiny_seq2seq_model

    from uptrain.evaluation.llama_cpp import to_gguf

    require_llama_cpp()
    src = save(tiny_seq2seq_model("t5"), tmp_path / "src")
    uptrain.convert(src, tmp_path / "g1", groups=1, progress=False)
    with pytest.raises(UptrainError, match="T5GQAForConditionalGeneration is not supported"):
        to_gguf(tmp_path / "g1", tmp_path / "g1.gguf")
    assert not (tmp_path / "g1.gguf").exists()
