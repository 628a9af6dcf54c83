"""The converter on tiny checkpoints of every supported architecture: exact where it must be exact."""
import json
import os

import pytest
import torch
from model_io import all_weights, ids, load, logits, record
from safetensors.torch import load_file
from tiny_models import REMOTE_CODE, TINY_CONFIGS, dummy_files, make_groups_equal, save, tiny_model

import uptrain
from uptrain.arch import SPECS
from uptrain.checkpoint import TensorEntry
from uptrain.conversion import plan_conversion
from uptrain.errors import UptrainError
from uptrain.evaluation.cost import output_cache
from uptrain.pooling import pool_mean

ARCHS = sorted(TINY_CONFIGS)
pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_spec_has_a_tiny_model():
    assert set(SPECS) == set(TINY_CONFIGS)  # adding an architecture = one spec entry + one tiny model here


@pytest.mark.parametrize("arch", ARCHS)
def test_groups_equal_heads_is_bit_identical(arch, tmp_path):
    src = save(tiny_model(arch), tmp_path / "src")
    r = uptrain.convert(src, tmp_path / "out", groups=8, progress=False)
    a, b = all_weights(src), all_weights(tmp_path / "out")
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert r.kv_heads_before == r.kv_heads_after == 8


@pytest.mark.parametrize("arch", ARCHS)
def test_equal_heads_within_groups_convert_losslessly(arch, tmp_path, tokenizer):
    from uptrain.arch import attention_shape

    g = 2 if 2 in SPECS[arch].valid_groups(tiny_model(arch).config) else 1  # gpt_bigcode: MHA or MQA only
    model = make_groups_equal(tiny_model(arch, seed=1), groups=g)
    src = save(model, tmp_path / "src", tokenizer=tokenizer)
    dummy_files(src)
    r = uptrain.convert(src, tmp_path / "out", groups=g, progress=False)
    out = load(tmp_path / "out")
    assert attention_shape(out.config).kv_heads == g
    x = ids(2, 24, low=0)
    assert (logits(model, x) - logits(out, x)).abs().max().item() <= 1e-5
    # exactly 0 when each group's mean is of 4 equal floats; a mean of 8 (MQA) rounds (x + x + x ≠ 3x)
    assert all(s["k_rel_error"] <= (0 if g > 1 else 1e-6) and s["v_rel_error"] <= (0 if g > 1 else 1e-6)
               for s in r.layers)
    # the output generates with a KV cache, and the cache has the new head count
    gen = out.generate(x[:1, :5], max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    assert gen.sequences.shape == (1, 9)
    # config identical except the KV-head count (and the modeling file's auto_map); companions copied; tied
    # embeddings kept
    src_cfg = json.loads((tmp_path / "src" / "config.json").read_text())
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    # (the keys the spec's form for G sets: falcon's new_decoder_architecture, gpt_bigcode's multi_query …)
    kv_keys = {"num_key_value_heads", "auto_map", *SPECS[arch].form(src_cfg, g).config} | (
        {"architectures"} if r.remote_code else set())
    assert {k: v for k, v in out_cfg.items() if k not in kv_keys} == {k: v for k, v in src_cfg.items() if k not in kv_keys}
    assert ("auto_map" in out_cfg) == (arch in REMOTE_CODE) == (r.remote_code is not None)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (tmp_path / "out" / f).is_file(), f
    if out.config.tie_word_embeddings:
        assert out.get_output_embeddings().weight.data_ptr() == out.get_input_embeddings().weight.data_ptr()
    rec = record(tmp_path / "out")["conversion"]
    assert (rec["groups"], rec["method"], rec["kv_heads_before"], rec["kv_heads_after"]) == (g, "mean", 8, g)
    assert rec["source_fingerprint"].startswith("sha256:")
    assert record(tmp_path / "out")["uptrain_version"] == uptrain.__version__
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary folder left behind


def test_different_heads_are_not_lossless(tmp_path):
    """The check above can fail: with unrelated heads, mean-pooling changes the logits."""
    model = tiny_model("llama", seed=2)
    src = save(model, tmp_path / "src")
    r = uptrain.convert(src, tmp_path / "out", groups=2, progress=False)
    x = ids(1, 16)
    assert (logits(model, x) - logits(load(tmp_path / "out"), x)).abs().max().item() > 1e-3
    assert all(s["k_rel_error"] > 0.1 for s in r.layers)


def test_sharded_bf16_gqa_source_to_mqa(tmp_path):
    """bf16, sharded input (GQA-4) → sharded MQA output: index, sizes and every tensor checked."""
    model = tiny_model("qwen2", kv_heads=4, dtype=torch.bfloat16, layers=3)
    src = save(model, tmp_path / "src", max_shard_size="60KB")
    assert (tmp_path / "src" / "model.safetensors.index.json").is_file()
    r = uptrain.convert(src, tmp_path / "out", groups=1, max_shard_size="80KB", progress=False)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) == r.shards > 1
    a, b = all_weights(src), all_weights(tmp_path / "out")
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in b.values())
    assert set(index["weight_map"]) == set(b)
    d = model.config.hidden_size // model.config.num_attention_heads
    for name, t in a.items():
        assert b[name].dtype == torch.bfloat16
        if ".k_proj." in name or ".v_proj." in name:
            assert torch.equal(b[name], pool_mean(t, 1, d).to(torch.bfloat16)), name  # pooled in fp32, stored bf16
        else:
            assert torch.equal(b[name], t), name


def test_methods_first_and_random(tmp_path):
    model = tiny_model("llama", seed=3)
    src = save(model, tmp_path / "src")
    (tmp_path / "src" / "README.md").write_text("---\nlicense: llama2\ntags: [x]\n---\n# card\n")
    uptrain.convert(src, tmp_path / "first", groups=2, method="first", progress=False)
    uptrain.convert(src, tmp_path / "r1", groups=2, method="random", seed=7, progress=False)
    uptrain.convert(src, tmp_path / "r2", groups=2, method="random", seed=7, progress=False)
    uptrain.convert(src, tmp_path / "r3", groups=2, method="random", seed=8, progress=False)
    a = all_weights(src)
    f = all_weights(tmp_path / "first")
    k = "model.layers.0.self_attn.k_proj.weight"
    d = 8
    assert torch.equal(f[k][:d], a[k][:d]) and torch.equal(f[k][d:], a[k][4 * d: 5 * d])
    r1, r2, r3 = (all_weights(tmp_path / n)[k] for n in ("r1", "r2", "r3"))
    assert torch.equal(r1, r2) and not torch.equal(r1, r3)
    rec = record(tmp_path / "r1")["conversion"]
    assert rec["method"] == "random" and rec["seed"] == 7
    assert rec["license"] == "llama2"  # the derivative carries the source's licence into its card
    assert not (tmp_path / "r1" / "README.md").exists()  # the source's card is not copied as ours


def test_unknown_tensor_stops_the_conversion(tmp_path):
    from safetensors.torch import save_file

    src = save(tiny_model("llama"), tmp_path / "src")
    sd = load_file(os.path.join(src, "model.safetensors"))
    sd["model.layers.0.self_attn.mystery.weight"] = torch.zeros(3)
    save_file(sd, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UptrainError, match="mystery"):
        uptrain.convert(src, tmp_path / "out", groups=2, progress=False)
    assert not (tmp_path / "out").exists()


def test_plan_llama2_70b_on_meta_device():
    """Shape planning at real scale without memory: Llama-2-70B (64 heads, 8 KV heads) → MQA."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                      num_key_value_heads=8, vocab_size=32000)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    entries = {n: TensorEntry(n, "x", "BF16", tuple(t.shape), 0, 0) for n, t in model.state_dict().items()}
    plan = plan_conversion(SPECS["llama"], cfg.to_dict(), entries, groups=1)
    k = plan["model.layers.79.self_attn.k_proj.weight"]
    assert k.action == "merge" and k.shape == (128, 8192)
    assert plan["model.layers.0.self_attn.q_proj.weight"].action == "copy"
    merged = [n for n, p in plan.items() if p.action == "merge"]
    assert len(merged) == 160
    # the pooling itself runs on meta tensors too
    assert pool_mean(torch.empty(1024, 8192, device="meta"), 1, 128).shape == (128, 8192)
    with pytest.raises(UptrainError, match="valid values: 1, 2, 4, 8"):
        plan_conversion(SPECS["llama"], cfg.to_dict(), entries, groups=16)


def test_plan_shards_matches_huggingface_hub():
    """Our shard planner (no torch.distributed import) assigns exactly as huggingface_hub's splitter."""
    import random

    from huggingface_hub import split_torch_state_dict_into_shards

    from uptrain.checkpoint import DTYPES, plan_shards

    rng = random.Random(0)
    for _ in range(200):
        tensors = {}
        for i in range(rng.randint(1, 30)):
            shape = tuple(rng.choice([0, 1, 3, 64, 100, 1000]) for _ in range(rng.randint(0, 3)))
            tensors[f"t{i}"] = (rng.choice(["BF16", "F32", "I8", "F64", "BOOL"]), shape)
        limit = rng.choice([1, 100, 5000, 100000, 10 ** 9, "5KB", "1MB", "0.01MB"])
        meta = {n: torch.empty(s, dtype=DTYPES[dt], device="meta") for n, (dt, s) in tensors.items()}
        split = split_torch_state_dict_into_shards(meta, filename_pattern="model{suffix}.safetensors",
                                                   max_shard_size=limit)
        shards, total = plan_shards(tensors, limit)
        assert list(shards) == list(split.filename_to_tensors)
        assert {f: set(v) for f, v in shards.items()} == {f: set(v) for f, v in split.filename_to_tensors.items()}
        assert total == sum(t.numel() * t.element_size() for t in meta.values())


def test_merge_error_on_helper_thread_reaches_the_caller(tmp_path, monkeypatch):
    """A failure while merging (here: the method raises) stops the conversion with that error, leaves no
    output, and does not hang."""
    from uptrain.conversion.pool_method import PoolMethod

    model = tiny_model("llama", seed=4)
    src = save(model, tmp_path / "src")

    def boom(self, layer, tensors, ctx):
        if layer == 1:
            raise UptrainError("merge failed on purpose")
        return orig(self, layer, tensors, ctx)

    orig = PoolMethod.merge
    monkeypatch.setattr(PoolMethod, "merge", boom)
    with pytest.raises(UptrainError, match="on purpose"):
        uptrain.convert(src, tmp_path / "out", groups=2, progress=False)
    assert not (tmp_path / "out").exists()


def test_convert_does_not_import_torch_before_writing(tmp_path):
    """Choosing, planning and starting the conversion need no torch: a fresh interpreter starts copying
    while the helper thread imports it (and never imports transformers for a plain mean conversion)."""
    import subprocess
    import sys

    model = tiny_model("llama", seed=5)
    src = save(model, tmp_path / "src")
    code = (
        "import sys\n"
        "from uptrain.conversion import writer, converter\n"
        "seen = []\n"
        "orig = writer.write_converted\n"
        "def spy(*a, **k):\n"
        "    seen.append('torch' in sys.modules)\n"
        "    return orig(*a, **k)\n"
        "converter.write_converted = spy\n"
        f"converter.convert({str(src)!r}, {str(tmp_path / 'out')!r}, groups=2, progress=False)\n"
        "print(seen, 'transformers' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[False] False"


# ------------------------------------------------------------------------------------------- layout variants
def _lossless(arch, tmp_path, groups, source_groups=None, **cfg):
    """Convert a tiny `arch` (config overrides `cfg`) whose KV heads are equal within `groups` groups; return
    (source model, converted model, ConvertResult), checking the logits match."""
    model = make_groups_equal(tiny_model(arch, seed=8, **cfg), groups=groups)
    src = save(model, tmp_path / "src")
    r = uptrain.convert(src, tmp_path / "out", groups=groups, progress=False)
    out = load(tmp_path / "out")
    x = ids(2, 16, seed=1, low=0)
    assert (logits(model, x) - logits(out, x)).abs().max().item() <= 1e-5
    return model, out, r


def _cache_bytes(model, x) -> int:
    out = model.generate(x, max_new_tokens=2, do_sample=False, return_dict_in_generate=True, pad_token_id=1)
    return sum(t.numel() * t.element_size() for layer in output_cache(out).layers for t in (layer.keys, layer.values))


def test_cohere_per_head_k_norm_is_pooled_like_k(tmp_path):
    """use_qk_norm: k_norm holds one LayerNorm weight per KV head ([K, head_dim]), pooled to [G, head_dim]."""
    model, out, _ = _lossless("cohere", tmp_path, 2, use_qk_norm=True, kv_heads=4)
    assert tuple(out.model.layers[0].self_attn.k_norm.weight.shape) == (2, 8)
    assert tuple(out.model.layers[0].self_attn.q_norm.weight.shape) == (8, 8)


def test_falcon_new_decoder_architecture_to_fewer_kv_heads(tmp_path):
    """Falcon-40B's layout ([q … q k v] per KV head, num_kv_heads 4) → 2 KV heads."""
    model, out, r = _lossless("falcon", tmp_path, 2, new_decoder_architecture=True, kv_heads=4, num_kv_heads=4)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["num_kv_heads"], cfg["new_decoder_architecture"], r.kv_heads_before) == (2, True, 4)
    # transformers' Falcon up to 5.24 broadcasts K/V to all H heads before caching in this layout (no smaller
    # cache); from 5.25 it caches num_kv_heads heads (vLLM always does: tests/evaluation/test_serving.py)
    import transformers
    from packaging.version import Version

    shrinks = Version(transformers.__version__) >= Version("5.25")
    x = ids(1, 6)
    assert _cache_bytes(out, x) == _cache_bytes(model, x) // (2 if shrinks else 1)


def test_falcon_mha_to_gqa_and_mqa(tmp_path):
    """An MHA Falcon with a parallel block becomes the new decoder architecture (one LayerNorm kept); any MHA
    Falcon becomes multi_query at G = 1, whose cache holds one head."""
    _, out, _ = _lossless("falcon", tmp_path / "gqa", 2)
    cfg = json.loads((tmp_path / "gqa" / "out" / "config.json").read_text())
    assert (cfg["new_decoder_architecture"], cfg["num_kv_heads"], cfg["num_ln_in_parallel_attn"]) == (True, 2, 1)
    for name, cfg_kw in {"rw": dict(parallel_attn=False, alibi=True), "parallel": {}}.items():
        model, out, _ = _lossless("falcon", tmp_path / name, 1, **cfg_kw)
        assert json.loads((tmp_path / name / "out" / "config.json").read_text())["multi_query"] is True
        x = ids(1, 6)
        assert _cache_bytes(model, x) == 8 * _cache_bytes(out, x)


def test_falcon_forms_say_which_g_are_possible(tmp_path):
    from uptrain.arch import spec_for_config

    seq = tiny_model("falcon", parallel_attn=False).config.to_dict()  # falcon-rw-1b's sequential block
    assert spec_for_config(seq).valid_groups(seq) == [1, 8]
    src = save(tiny_model("falcon", parallel_attn=False), tmp_path / "src")
    with pytest.raises(UptrainError, match="valid values: 1, 8"):
        uptrain.convert(src, tmp_path / "out", groups=2, progress=False)
    mqa = tiny_model("falcon", multi_query=True).config.to_dict()  # falcon-7b: already MQA
    assert spec_for_config(mqa).kv_heads(mqa) == 1 and spec_for_config(mqa).valid_groups(mqa) == [1]


def test_stablelm_per_head_k_layernorms_are_pooled(tmp_path):
    """qk_layernorm: one LayerNorm tensor per head, by name (k_layernorm.norms.{h}); the 4 K norms become 2,
    norms 2 and 3 are gone, the 8 query-head norms are copied."""
    _, out, _ = _lossless("stablelm", tmp_path, 2, qk_layernorm=True, kv_heads=4)
    names = set(all_weights(tmp_path / "out"))
    k_norms = {n for n in names if n.startswith("model.layers.0.self_attn.k_layernorm")}
    assert k_norms == {f"model.layers.0.self_attn.k_layernorm.norms.{h}.weight" for h in (0, 1)}
    assert len([n for n in names if n.startswith("model.layers.0.self_attn.q_layernorm")]) == 8
    src = all_weights(tmp_path / "src")
    k = "model.layers.1.self_attn.k_layernorm.norms.{}.weight"
    assert torch.equal(all_weights(tmp_path / "out")[k.format(1)], src[k.format(2)])  # heads 2, 3 were equal


def test_stablelm_per_head_k_layernorms_pool_as_means(tmp_path):
    src = save(tiny_model("stablelm", seed=9, qk_layernorm=True, kv_heads=4), tmp_path / "src")
    uptrain.convert(src, tmp_path / "out", groups=1, progress=False)
    a, b = all_weights(src), all_weights(tmp_path / "out")
    k = "model.layers.0.self_attn.k_layernorm.norms.{}.weight"
    assert torch.allclose(b[k.format(0)], torch.stack([a[k.format(h)] for h in range(4)]).mean(0), atol=1e-7)
    assert k.format(1) not in b
