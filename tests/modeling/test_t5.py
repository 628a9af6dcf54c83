"""T5, mT5 and umT5: the GQA modeling file that travels with the checkpoint, and `uptrain convert` / `inspect` on
encoder-decoders (decoder self- and cross-attention pooled by default, encoder self-attention with --attention all)."""
import json
import os
import subprocess
import sys

import pytest
import torch
from model_io import all_weights, ids, load_seq2seq, logits, record
from tiny_models import TINY_SEQ2SEQ_CONFIGS, save, tiny_seq2seq_model

import uptrain
from uptrain.arch import SEQ2SEQ_SPECS, SPECS
from uptrain.errors import UptrainError
from uptrain.evaluation.cost import output_cache
from uptrain.modeling import TEMPLATES
from uptrain.modeling import modeling_gqa_t5 as gqa

pytestmark = pytest.mark.usefixtures("one_thread")
ARCHS = sorted(TINY_SEQ2SEQ_CONFIGS)
GQA_CLASSES = {"t5": gqa.T5GQAForConditionalGeneration, "mt5": gqa.MT5GQAForConditionalGeneration,
               "umt5": gqa.UMT5GQAForConditionalGeneration}


def test_every_seq2seq_spec_has_a_tiny_model_and_a_template():
    assert set(SEQ2SEQ_SPECS) == set(TINY_SEQ2SEQ_CONFIGS) == set(GQA_CLASSES)
    assert not set(SEQ2SEQ_SPECS) & set(SPECS)
    for arch, cls in GQA_CLASSES.items():
        t = TEMPLATES[arch]
        assert (t.file, t.model_class, t.auto_class) == ("modeling_gqa_t5.py", cls.__name__, "AutoModelForSeq2SeqLM")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """One saved tiny checkpoint per architecture (random, unrelated heads)."""
    root = tmp_path_factory.mktemp("t5src")
    return {arch: save(tiny_seq2seq_model(arch), root / arch) for arch in ARCHS}


# ------------------------------------------------------------------------------------------- the modeling file
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ARCHS)
def test_gqa_classes_at_g_equal_h_compute_what_transformers_computes(arch, attn, sources):
    """G = H, every attention block replaced by the GQA class (gqa_attention "all"): bit-identical logits."""
    from transformers import AutoConfig, AutoModelForSeq2SeqLM

    plain = AutoModelForSeq2SeqLM.from_pretrained(sources[arch], attn_implementation=attn).eval()
    cfg = AutoConfig.from_pretrained(sources[arch])
    cfg.gqa_attention = "all"
    ours = GQA_CLASSES[arch].from_pretrained(sources[arch], config=cfg, attn_implementation=attn).eval()
    assert type(ours.encoder.block[0].layer[0].SelfAttention).__name__.endswith("GQAAttention")
    assert type(ours.decoder.block[1].layer[1].EncDecAttention).__name__.endswith("GQAAttention")
    x, dec = ids(length=12), ids(length=7, seed=1)
    assert torch.equal(logits(plain, x, dec), logits(ours, x, dec))


def heads_equal_within_groups(model, groups: int, blocks: tuple[str, ...]):
    """Copy the first K/V head of each group over the others in the named attention blocks."""
    n, d = model.config.num_heads // groups, model.config.d_kv
    places = {"encoder": [b.layer[0].SelfAttention for b in model.encoder.block],
              "decoder": [b.layer[0].SelfAttention for b in model.decoder.block],
              "cross": [b.layer[1].EncDecAttention for b in model.decoder.block]}
    with torch.no_grad():
        for name in blocks:
            for attn in places[name]:
                for lin in (attn.k, attn.v):
                    w = lin.weight.view(groups, n, d, -1)
                    w.copy_(w[:, :1].expand_as(w).clone())
    return model


@pytest.mark.parametrize("attention, blocks", [("decoder", ("decoder", "cross")),
                                               ("all", ("encoder", "decoder", "cross"))])
@pytest.mark.parametrize("arch", ARCHS)
def test_equal_heads_within_groups_convert_losslessly(arch, attention, blocks, tmp_path):
    model = heads_equal_within_groups(tiny_seq2seq_model(arch, seed=1), 2, blocks)
    src = save(model, tmp_path / "src")
    r = uptrain.convert(src, tmp_path / "out", groups=2, attention=attention, progress=False)
    out = load_seq2seq(tmp_path / "out")
    assert type(out).__name__ == GQA_CLASSES[arch].__name__
    x, dec = ids(length=12), ids(length=7, seed=1)
    delta = (logits(model, x, dec) - logits(out, x, dec)).abs().max()
    assert delta.item() <= 1e-5
    assert {(s["block"], s["layer"]) for s in r.layers} == {(b, i) for b in blocks for i in range(2)}
    assert all(s["k_rel_error"] == 0 and s["v_rel_error"] == 0 for s in r.layers)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["num_key_value_heads"], cfg["gqa_attention"], cfg["model_type"]) == (2, attention, arch)
    assert cfg["auto_map"] == {"AutoModelForSeq2SeqLM": f"modeling_gqa_t5.{GQA_CLASSES[arch].__name__}"}
    assert (tmp_path / "out" / "modeling_gqa_t5.py").read_bytes() == TEMPLATES[arch].path.read_bytes()
    a, b = all_weights(src), all_weights(tmp_path / "out")
    for name, t in a.items():  # pooled blocks have 2 heads of 16 rows, every other tensor is byte-identical
        pooled = any(f"{p}.{kv}.weight" in name for p in ("EncDecAttention", "SelfAttention") for kv in "kv") and (
            "decoder." in name or attention == "all")
        assert b[name].shape == ((32, 64) if pooled else t.shape), name
        if not pooled:
            assert torch.equal(t, b[name]), name


def test_original_t5_relu_tied_head_converts_losslessly(tmp_path):
    """Original T5 (relu feed-forward, tied and rescaled LM head) next to the T5.1.1 layout of the other tests."""
    model = heads_equal_within_groups(
        tiny_seq2seq_model("t5", seed=2, feed_forward_proj="relu", tie_word_embeddings=True), 1, ("decoder", "cross"))
    assert model.config.scale_decoder_outputs and model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr()
    src = save(model, tmp_path / "src")
    uptrain.convert(src, tmp_path / "out", groups=1, progress=False)
    out = load_seq2seq(tmp_path / "out")
    assert out.config.scale_decoder_outputs and out.lm_head.weight.data_ptr() == out.shared.weight.data_ptr()
    x, dec = ids(length=12), ids(length=5)
    assert (logits(model, x, dec) - logits(out, x, dec)).abs().max().item() <= 1e-5


def cache_bytes(layers) -> int:
    return sum(layer.keys.nbytes + layer.values.nbytes for layer in layers)


@pytest.mark.parametrize("arch", ARCHS)
def test_cached_generation_equals_uncached_and_caches_hold_g_heads(arch, sources, tmp_path):
    r = uptrain.convert(sources[arch], tmp_path / "out", groups=2, progress=False)  # mean: heads really merged
    model = load_seq2seq(tmp_path / "out")
    source = ids(batch=2, length=9)
    from transformers import AutoModelForSeq2SeqLM

    mha = AutoModelForSeq2SeqLM.from_pretrained(sources[arch]).eval()
    assert min(s["k_rel_error"] for s in r.layers) > 0.3  # unrelated heads: pooling changes the model measurably
    assert (logits(mha, source, ids(length=5)) - logits(model, source, ids(length=5))).abs().max().item() > 1e-2
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_scores=True)
    cached = model.generate(source, use_cache=True, **kw)
    uncached = model.generate(source, use_cache=False, **kw)
    assert torch.equal(cached.sequences, uncached.sequences)
    for a, b in zip(cached.scores, uncached.scores):  # (EOS is -inf while min_new_tokens holds it off)
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # the caches of a real generate: G = 2 heads of d_kv 16 per layer, self over the generated tokens, cross
    # over the source
    cache = output_cache(cached)
    for layer in cache.self_attention_cache.layers:
        assert layer.keys.shape == layer.values.shape == (2, 2, 6, 16)
    for layer in cache.cross_attention_cache.layers:
        assert layer.keys.shape == (2, 2, 9, 16)
    self_per_token = cache_bytes(cache.self_attention_cache.layers) / (2 * 6)
    cross_per_token = cache_bytes(cache.cross_attention_cache.layers) / (2 * 9)
    assert self_per_token == cross_per_token == 2 * 2 * 2 * 16 * 4  # layers × (K, V) × G × d_kv × float32
    info = uptrain.inspect(tmp_path / "out")
    assert info.kv_cache_bytes_per_token == self_per_token and info.cross_kv_cache_bytes_per_token == cross_per_token
    # the MHA source's cache, measured the same way, is H/G = 2× larger
    mha = output_cache(mha.generate(source, use_cache=True, **kw))
    assert cache_bytes(mha.self_attention_cache.layers) / (2 * 6) == 2 * self_per_token
    assert cache_bytes(mha.cross_attention_cache.layers) / (2 * 9) == 2 * cross_per_token


FRESH = """
import sys
sys.modules["uptrain"] = None  # from here on `import uptrain` raises ImportError
try:
    import uptrain
    raise SystemExit("uptrain is importable")
except ImportError:
    pass
import json, torch
from transformers import AutoModelForSeq2SeqLM
model = AutoModelForSeq2SeqLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
out = model.generate(torch.tensor(json.loads(sys.argv[2])), max_new_tokens=5, min_new_tokens=5, do_sample=False,
                     return_dict_in_generate=True)
print(json.dumps({"class": type(model).__name__, "module": type(model).__module__, "tokens": out.sequences.tolist(),
                  # the cache is out.cache from transformers 5.20, out.past_key_values in 5.19
                  "heads": (getattr(out, "cache", None) or out.past_key_values).cross_attention_cache.layers[0].keys.shape[1]}))
"""


def test_fresh_interpreter_without_uptrain_loads_and_generates(sources, tmp_path):
    uptrain.convert(sources["t5"], tmp_path / "out", groups=1, progress=False)
    source = ids(batch=1, length=8)
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="")
    p = subprocess.run([sys.executable, "-c", FRESH, str(tmp_path / "out"), json.dumps(source.tolist())],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["class"] == "T5GQAForConditionalGeneration" and got["module"].startswith("transformers_modules.")
    assert got["heads"] == 1
    here = load_seq2seq(tmp_path / "out").generate(source, max_new_tokens=5, min_new_tokens=5, do_sample=False)
    assert got["tokens"] == here.tolist()


def test_save_pretrained_keeps_the_code(sources, tmp_path):
    """A loaded GQA model saves as it came (what training and pushing do): weights, config, auto_map, the file."""
    uptrain.convert(sources["t5"], tmp_path / "out", groups=2, progress=False)
    load_seq2seq(tmp_path / "out").save_pretrained(tmp_path / "again")
    cfg = json.loads((tmp_path / "again" / "config.json").read_text())
    assert (cfg["num_key_value_heads"], cfg["gqa_attention"]) == (2, "decoder")
    assert cfg["auto_map"] == json.loads((tmp_path / "out" / "config.json").read_text())["auto_map"]
    assert (tmp_path / "again" / "modeling_gqa_t5.py").read_bytes() == TEMPLATES["t5"].path.read_bytes()
    a, b = all_weights(tmp_path / "out"), all_weights(tmp_path / "again")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------------- convert
def test_g_equal_h_is_the_source_unchanged(sources, tmp_path):
    r = uptrain.convert(sources["umt5"], tmp_path / "out", groups=4, progress=False)
    a, b = all_weights(sources["umt5"]), all_weights(tmp_path / "out")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "auto_map" not in cfg and not (tmp_path / "out" / "modeling_gqa_t5.py").exists()  # native
    assert r.remote_code is None and r.kv_heads_after == 4


def test_gqa_source_converts_further_with_its_own_choice(sources, tmp_path):
    uptrain.convert(sources["t5"], tmp_path / "gqa2", groups=2, attention="all", progress=False)
    with pytest.raises(UptrainError, match="already shares its KV heads in its all attention.*attention='all'"):
        uptrain.convert(tmp_path / "gqa2", tmp_path / "bad", groups=1, progress=False)
    uptrain.convert(tmp_path / "gqa2", tmp_path / "mqa", groups=1, attention="all", progress=False)
    cfg = json.loads((tmp_path / "mqa" / "config.json").read_text())
    assert (cfg["num_key_value_heads"], cfg["gqa_attention"]) == (1, "all")
    w = all_weights(tmp_path / "mqa")
    assert w["encoder.block.0.layer.0.SelfAttention.k.weight"].shape == (16, 64)
    rec = record(tmp_path / "mqa")
    assert rec["conversion"]["options"]["attention"] == "all" and rec["source_record"]["conversion"]["groups"] == 2
    model = load_seq2seq(tmp_path / "mqa")
    assert model.generate(ids(batch=1, length=12), max_new_tokens=3).shape[1] >= 2


def test_methods_and_refusals(sources, tmp_path):
    a = all_weights(sources["t5"])
    for method in ("first", "random", "mean-norm"):
        r = uptrain.convert(sources["t5"], tmp_path / method, groups=2, method=method, seed=3, progress=False)
        w = all_weights(tmp_path / method)["decoder.block.1.layer.1.EncDecAttention.v.weight"]
        assert w.shape == (32, 64) and r.method == method
        if method == "first":  # heads 0 and 2 of the source's 4
            src = a["decoder.block.1.layer.1.EncDecAttention.v.weight"]
            assert torch.equal(w, torch.cat([src[0:16], src[32:48]]))
    with pytest.raises(UptrainError, match="grouping='similarity' is not supported on t5: .*relative position bias"):
        uptrain.convert(sources["t5"], tmp_path / "x", groups=2, method="aligned", grouping="similarity",
                        progress=False)
    with pytest.raises(UptrainError, match="attention='encoder'; choose one of decoder, all"):
        uptrain.convert(sources["t5"], tmp_path / "x", groups=2, attention="encoder", progress=False)
    with pytest.raises(UptrainError, match="groups 3 does not divide"):
        uptrain.convert(sources["t5"], tmp_path / "x", groups=3, progress=False)
    assert not (tmp_path / "x").exists()


def test_cli_convert_and_inspect(sources, tmp_path):
    from uptrain.cli import main

    assert main(["convert", sources["mt5"], str(tmp_path / "out"), "--groups", "2", "--attention", "all"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["gqa_attention"] == "all"
    info = uptrain.inspect(sources["mt5"])
    text = info.to_text()
    assert (info.heads, info.kv_heads, info.head_dim, info.layers) == (4, 4, 16, 2)
    # decoder self-attention per generated token and cross-attention per source token: 2 layers × (K, V) × 4 heads
    # × 16 × float32 each
    assert info.kv_cache_bytes_per_token == info.cross_kv_cache_bytes_per_token == 2 * 2 * 4 * 16 * 4
    assert "self-attention 1,024 bytes per generated token; cross-attention 1,024 bytes per source token" in text
    assert [o["groups"] for o in info.options] == [1, 2, 4]
    assert "every attention block" in uptrain.inspect(tmp_path / "out").to_text()

