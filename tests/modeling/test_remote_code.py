"""Architectures without a KV-head field (gpt_neox, gpt2, opt): below G = H the converted folder carries
uptrain's modeling file and an auto_map, and loads with trust_remote_code=True where uptrain is not
installed; GPT-2 → MQA is a native gpt_bigcode checkpoint instead."""
import json

import pytest
import torch
from model_io import generate_here, generate_without_uptrain, ids, load, logits
from tiny_models import REMOTE_CODE, cache_kw, make_groups_equal, save, tiny_model

import uptrain
from uptrain.arch import SPECS, attention_shape
from uptrain.errors import UptrainError
from uptrain.evaluation.cost import output_cache
from uptrain.modeling import TEMPLATES

pytestmark = pytest.mark.usefixtures("one_thread")
ATTN = ("eager", "sdpa")


def template_class(arch):
    import importlib

    t = TEMPLATES[arch]
    return getattr(importlib.import_module(f"uptrain.modeling.{t.module}"), t.model_class)


def cache_bytes(model, x) -> int:
    """Bytes of the keys and values a real generate() leaves in its cache."""
    out = model.generate(x, max_new_tokens=4, do_sample=False, return_dict_in_generate=True, pad_token_id=1)
    cache = output_cache(out)
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tokenizer):
    """Per architecture: a tiny source with KV heads equal within 2 groups, and its GQA-2 conversion."""
    root = tmp_path_factory.mktemp("remote")
    out = {}
    for arch in REMOTE_CODE:
        model = make_groups_equal(tiny_model(arch, seed=3), groups=2)
        src = save(model, root / arch / "src", tokenizer=tokenizer)
        uptrain.convert(src, root / arch / "gqa2", groups=2, progress=False)
        out[arch] = (model, src, root / arch / "gqa2")
    return out


def test_storage_with_labelled_rows():
    """Rows labelled by role and head (q 10–13, k 20–21, v 30–31): fused per KV head, transposed, flat."""
    from uptrain.arch import Storage, per_kv_head_order

    stored = torch.tensor([10, 11, 20, 30, 12, 13, 21, 31])  # H = 4, K = 2: [q q k v] per KV head
    per_kv = Storage(order=per_kv_head_order(4, 2, 1))
    assert per_kv.canonical(stored).tolist() == [10, 11, 12, 13, 20, 21, 30, 31]
    assert torch.equal(per_kv.stored(per_kv.canonical(stored), (8,)), stored)
    neox = Storage(order=per_kv_head_order(2, 2, 2))  # gpt_neox: [q k v] per head, head_dim 2
    assert neox.canonical(torch.tensor([10, 10, 20, 20, 30, 30, 11, 11, 21, 21, 31, 31])).tolist() == \
        [10, 10, 11, 11, 20, 20, 21, 21, 30, 30, 31, 31]
    assert per_kv_head_order(4, 1, 1) == tuple(range(6))  # MQA: [q … q k v] is canonical
    conv1d = Storage(transposed=True, order=per_kv_head_order(4, 2, 1))
    w = stored.repeat(3, 1)  # [in = 3, out = 8]
    assert conv1d.canonical(w)[:, 0].tolist() == [10, 11, 12, 13, 20, 21, 30, 31]
    assert torch.equal(conv1d.stored(conv1d.canonical(w), (3, 8)), w)
    flat = Storage(flat=True)  # cohere's k_norm [K, head_dim]
    k_norm = torch.tensor([[20, 20], [21, 21]])
    assert flat.canonical(k_norm).tolist() == [20, 20, 21, 21]
    assert torch.equal(flat.stored(flat.canonical(k_norm), (2, 2)), k_norm)


def test_every_remote_code_form_names_a_template():
    named = {f.remote_code for s in SPECS.values() for f in s.forms if f.remote_code and f.groups != "per-layer"}
    assert named == set(REMOTE_CODE) and named <= set(TEMPLATES)
    per_layer = {f.remote_code for s in SPECS.values() for f in s.forms if f.groups == "per-layer"}
    assert per_layer == {"nemotron-nas"} <= set(TEMPLATES)  # per-layer KV heads: tests/conversion/test_per_layer.py
    for arch in REMOTE_CODE:
        assert TEMPLATES[arch].path.is_file()


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("arch", REMOTE_CODE)
def test_gqa_class_at_g_equal_h_is_the_transformers_class(arch, attn):
    """With G = H the modeling file computes exactly what the installed transformers class computes."""
    native = tiny_model(arch, seed=1)
    native.config._attn_implementation = attn
    gqa = template_class(arch)(native.config).eval()
    gqa.load_state_dict(native.state_dict())
    x = ids()
    assert torch.equal(logits(native, x), logits(gqa, x))


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("arch", REMOTE_CODE)
def test_equal_heads_convert_to_the_same_logits(arch, attn, converted):
    model, _, out = converted[arch]
    model.config._attn_implementation = attn
    gqa = load(out, attn_implementation=attn)
    assert type(gqa).__name__ == TEMPLATES[arch].model_class
    assert gqa.config._attn_implementation == attn
    x = ids()
    assert (logits(model, x) - logits(gqa, x)).abs().max().item() <= 1e-5
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_key_value_heads"] == 2 and cfg["model_type"] == arch
    assert cfg["auto_map"] == TEMPLATES[arch].auto_map()
    assert (out / TEMPLATES[arch].file).read_bytes() == TEMPLATES[arch].path.read_bytes()


@pytest.mark.parametrize("arch", REMOTE_CODE)
def test_unrelated_heads_change_the_logits(arch, tmp_path):
    """The check above can fail: pooling unrelated heads moves the logits."""
    model = tiny_model(arch, seed=4)
    src = save(model, tmp_path / "src")
    r = uptrain.convert(src, tmp_path / "out", groups=2, progress=False)
    assert (logits(model, ids()) - logits(load(tmp_path / "out"), ids())).abs().max().item() > 1e-3
    assert all(s["k_rel_error"] > 0.1 for s in r.layers)


@pytest.mark.parametrize("attn", ATTN)
@pytest.mark.parametrize("arch", REMOTE_CODE)
def test_cache_holds_g_heads_and_cached_generation_is_uncached(arch, attn, converted):
    model, _, out = converted[arch]
    model.config._attn_implementation = attn
    gqa = load(out, attn_implementation=attn)
    x = ids(batch=1, length=6, seed=1)
    # a real cache after generate: H/G = 4 times fewer bytes than the MHA source's
    assert cache_bytes(model, x) == 4 * cache_bytes(gqa, x)
    assert {tuple(layer.keys.shape) for layer in output_cache(gqa.generate(
        x, max_new_tokens=1, return_dict_in_generate=True, pad_token_id=1)).layers} == {(1, 2, 6, 8)}  # [batch, G, prompt, d]
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=1)
    assert torch.equal(gqa.generate(x, use_cache=True, **kw), gqa.generate(x, use_cache=False, **kw))
    # step by step with the cache = one forward over the whole sequence
    seq = ids(batch=1, length=10, seed=2)
    with torch.no_grad():
        full = gqa(seq).logits
        first = gqa(seq[:, :6], use_cache=True)
        cache, steps = output_cache(first), [first.logits]
        for t in range(6, 10):
            step = gqa(seq[:, t: t + 1], **cache_kw(gqa, cache), use_cache=True)
            cache = output_cache(step)
            steps.append(step.logits)
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-5


def test_a_fresh_interpreter_without_uptrain_loads_and_generates(converted, tmp_path):
    """One interpreter (torch's import is most of the time) in which `import uptrain` fails loads every
    architecture's result with plain transformers and generates what this process generates."""
    folders = [converted[arch][2] for arch in REMOTE_CODE]
    rows = generate_without_uptrain(folders, tmp_path)
    assert [r["model"] for r in rows] == [TEMPLATES[arch].model_class for arch in REMOTE_CODE]
    for folder, there in zip(folders, rows):
        assert there["tokens"] == generate_here(folder)


@pytest.mark.parametrize("arch", REMOTE_CODE)
def test_without_trust_remote_code_loading_fails_loudly(arch, converted):
    """The native class must refuse the smaller K/V tensors, never load them into random weights."""
    from transformers import AutoModelForCausalLM

    with pytest.raises(Exception, match="mismatch|size"):
        AutoModelForCausalLM.from_pretrained(converted[arch][2])


@pytest.mark.parametrize("arch", REMOTE_CODE)
def test_save_and_reload_keeps_the_code(arch, converted, tmp_path):
    """What `uptrain train` does with the result: save_pretrained copies the modeling file and auto_map."""
    _, _, out = converted[arch]
    gqa = load(out)
    gqa.save_pretrained(tmp_path / "again")
    cfg = json.loads((tmp_path / "again" / "config.json").read_text())
    assert cfg["auto_map"] == TEMPLATES[arch].auto_map() and cfg["num_key_value_heads"] == 2
    assert (tmp_path / "again" / TEMPLATES[arch].file).read_bytes() == TEMPLATES[arch].path.read_bytes()
    assert torch.equal(logits(gqa, ids()), logits(load(tmp_path / "again"), ids()))


def test_uptrain_loads_its_own_code_and_no_one_elses(converted, tmp_path):
    """uptrain/hf.py passes trust_remote_code=True for its own templates only, compared byte for byte."""
    import shutil

    from uptrain.hf import carries_uptrain_code, load_model, resolve

    _, src, out = converted["gpt2"]
    assert carries_uptrain_code(resolve(out)) and not carries_uptrain_code(resolve(src))
    assert type(load_model(resolve(out))).__name__ == "GPT2GQALMHeadModel"
    shutil.copytree(out, tmp_path / "edited")
    with open(tmp_path / "edited" / TEMPLATES["gpt2"].file, "a") as f:
        f.write("\nprint('hello')\n")
    assert not carries_uptrain_code(resolve(tmp_path / "edited"))
    with pytest.raises(UptrainError, match="could not load"):
        load_model(resolve(tmp_path / "edited"))


def test_reconverting_a_remote_code_result(converted, tmp_path):
    """GQA-2 → MQA of a remote-code result: gpt_neox stays remote code, gpt2 becomes a native gpt_bigcode."""
    from transformers import AutoModelForCausalLM

    model, _, out = converted["gpt_neox"]
    uptrain.convert(str(out), tmp_path / "neox1", groups=1, progress=False)
    cfg = json.loads((tmp_path / "neox1" / "config.json").read_text())
    assert cfg["num_key_value_heads"] == 1 and "auto_map" in cfg
    assert attention_shape(load(tmp_path / "neox1").config).kv_heads == 1

    model, _, out = converted["gpt2"]
    r = uptrain.convert(str(out), tmp_path / "gpt2_1", groups=1, progress=False)
    cfg = json.loads((tmp_path / "gpt2_1" / "config.json").read_text())
    assert r.written_as == "gpt_bigcode" and r.remote_code is None
    assert "auto_map" not in cfg and not (tmp_path / "gpt2_1" / TEMPLATES["gpt2"].file).exists()
    mqa = AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2_1").eval()  # native: no trust_remote_code
    assert type(mqa).__name__ == "GPTBigCodeForCausalLM"


# ------------------------------------------------------------------------------------------- GPT-2 → gpt_bigcode
@pytest.mark.parametrize("attn", ATTN)
def test_gpt2_mqa_is_a_native_gpt_bigcode_checkpoint(attn, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    model = make_groups_equal(tiny_model("gpt2", seed=5), groups=1)
    model.config._attn_implementation = attn
    src = save(model, tmp_path / "src", tokenizer=tokenizer)
    r = uptrain.convert(src, tmp_path / "mqa", groups=1, progress=False)
    assert (r.written_as, r.remote_code) == ("gpt_bigcode", None)
    assert not list((tmp_path / "mqa").glob("*.py"))
    cfg = json.loads((tmp_path / "mqa" / "config.json").read_text())
    assert (cfg["model_type"], cfg["multi_query"], cfg["architectures"]) == ("gpt_bigcode", True,
                                                                              ["GPTBigCodeForCausalLM"])
    mqa = AutoModelForCausalLM.from_pretrained(tmp_path / "mqa", attn_implementation=attn).eval()
    assert type(mqa).__name__ == "GPTBigCodeForCausalLM"
    assert attention_shape(mqa.config).kv_heads == 1
    # Conv1D (addmm on [in, out]) and Linear differ in rounding only
    assert (logits(model, ids()) - logits(mqa, ids())).abs().max().item() <= 1e-5
    x = ids(batch=1, length=6)
    assert cache_bytes(model, x) == 8 * cache_bytes(mqa, x)


def test_gpt2_scaled_by_layer_index_stays_gpt2_with_remote_code(tmp_path):
    """gpt_bigcode cannot scale attention by 1/(layer + 1): such a GPT-2's MQA keeps uptrain's modeling file."""
    model = make_groups_equal(tiny_model("gpt2", seed=6, scale_attn_by_inverse_layer_idx=True), groups=1)
    src = save(model, tmp_path / "src")
    r = uptrain.convert(src, tmp_path / "mqa", groups=1, progress=False)
    assert (r.written_as, r.remote_code) == ("gpt2", TEMPLATES["gpt2"].file)
    assert (logits(model, ids()) - logits(load(tmp_path / "mqa"), ids())).abs().max().item() <= 1e-5


def test_gpt_bigcode_is_mha_or_mqa_only(tmp_path):
    src = save(tiny_model("gpt_bigcode"), tmp_path / "src")
    with pytest.raises(UptrainError, match="valid values: 1, 8"):
        uptrain.convert(src, tmp_path / "out", groups=2, progress=False)
    assert SPECS["gpt_bigcode"].valid_groups(json.loads((tmp_path / "src" / "config.json").read_text())) == [1, 8]


# ------------------------------------------------------------------------------------------- the pipeline
def test_push_uploads_the_modeling_file_and_the_card_says_so(converted):
    from uptrain.publishing.hub import push

    _, _, out = converted["opt"]
    p = push(str(out), "someone/opt-gqa2", dry_run=True)
    assert TEMPLATES["opt"].file in [f for f, _ in p.files]
    assert 'from_pretrained("someone/opt-gqa2", dtype="auto", trust_remote_code=True)' in p.card
    front = p.card.split("---")[1]
    assert "- opt" in front and "- custom_code" in front


@pytest.mark.slow  # ~25 s: a 4-step training run and a 3-model evaluation
def test_pythia_convert_train_eval_push(tmp_path, tokenizer):
    """A tiny GPT-NeoX through the whole pipeline: `uptrain train` converts it to GQA-2 (remote code) and
    uptrains it, `uptrain eval` loads all three, `uptrain push --dry-run` uploads the modeling file and its
    card says trust_remote_code=True."""
    from uptrain.evaluation import evaluate
    from uptrain.publishing.hub import push
    from uptrain.training import train

    src = save(tiny_model("gpt_neox", seed=7), tmp_path / "pythia", tokenizer=tokenizer)
    out = tmp_path / "run"
    res = train({"out": str(out), "model": {"path": src, "convert": {"groups": 2}},
                 "data": {"max_documents": 2, "seq_len": 32, "max_train_blocks": 64, "cache_dir": str(tmp_path / "c")},
                 "budget": {"max_steps": 4}, "optim": {"lr": 3e-3}, "train": {"micro_batch_size": 4},
                 "eval": {"max_blocks": 4, "at_start": True}, "log": {"progress": False}})
    assert res.finished and res.final_eval["perplexity"] < res.eval_history[0]["perplexity"]
    template = TEMPLATES["gpt_neox"]
    for folder in (out / "step0", out):  # the converted and the uptrained model both carry the code
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["auto_map"] == template.auto_map() and cfg["num_key_value_heads"] == 2
        assert (folder / template.file).read_bytes() == template.path.read_bytes()

    rows = evaluate([src, str(out / "step0"), str(out)], eval_tokens=256, seq_len=32, prompt_len=8, new_tokens=4,
                    repeats=1, progress=False).rows
    assert [r["num_key_value_heads"] for r in rows] == [8, 2, 2]
    assert rows[0]["kv_cache_bytes_per_token"] == 4 * rows[1]["kv_cache_bytes_per_token"]
    assert rows[2]["perplexity"] < rows[1]["perplexity"]

    p = push(str(out), "someone/pythia-gqa2", dry_run=True)
    assert template.file in [f for f, _ in p.files]
    assert "trust_remote_code=True" in p.card and "gpt_neox" in p.card and "custom_code" in p.card


def test_inspect_says_native_or_remote_code_for_every_g(converted):
    from uptrain.conversion.inspection import inspect

    _, src, out = converted["gpt2"]
    info = inspect(src)
    assert {o["groups"]: o["result"].split(" (")[0] for o in info.options} == {
        1: "native gpt_bigcode", 2: "remote code", 4: "remote code", 8: "native"}
    assert info.code is None and "remote code (trust_remote_code=True)" in info.to_text()
    info = inspect(str(out))
    assert info.code == [TEMPLATES["gpt2"].file] and info.kv_heads == 2
    assert "modeling_gqa_gpt2.py (load with trust_remote_code=True)" in info.to_text()


def test_encoders_and_unknown_architectures_are_refused_with_the_reason():
    from uptrain.arch import spec_for_config

    with pytest.raises(UptrainError, match="'bert' is an encoder.*no KV cache"):
        spec_for_config({"model_type": "bert"})
    with pytest.raises(UptrainError, match="'mamba' is not supported yet; supported: .*gpt2.*gpt_neox.*opt"):
        spec_for_config({"model_type": "mamba"})
