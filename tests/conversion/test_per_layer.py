"""Per-layer KV heads (`--groups 8,2,1,4`): the nemotron-nas / DeciLM form of Llama-family results, its modeling
file, every method per layer, and the pipeline on the result (inspect, eval, push, train)."""
import json
import shutil

import pytest
import torch
from model_io import generate_here, generate_without_uptrain, ids, load, logits, record, weights
from test_cli_convert import run
from tiny_models import save, tiny_model

import uptrain
from uptrain.arch import spec_for_config
from uptrain.errors import UptrainError
from uptrain.modeling import TEMPLATES
from uptrain.training.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")
GROUPS = [8, 2, 1, 4]
TEMPLATE = TEMPLATES["nemotron-nas"]


def shared(model, groups):
    """The source with each layer's K/V heads (weights and biases) replaced by the mean of their group, repeated:
    an MHA model that computes exactly what mean pooling to G_l KV heads computes."""
    cfg = model.config
    spec = spec_for_config(cfg)
    kv, d = spec.kv_heads(cfg), spec.head_dim(cfg)
    with torch.no_grad():
        for layer, g in zip(model.model.layers, groups):
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                for t in (proj.weight, proj.bias):
                    if t is None:
                        continue
                    rows = t.view(g, kv // g, d, -1)
                    t.copy_(rows.mean(1, keepdim=True).expand_as(rows).reshape(t.shape))
    return model


def cache_heads(model, x):
    """KV heads per layer of the cache a real generate() leaves, and its bytes."""
    out = model.generate(x, max_new_tokens=2, do_sample=False, return_dict_in_generate=True, pad_token_id=1)
    cache = out.get("cache") or out.get("past_key_values")
    heads = [layer.keys.shape[1] for layer in cache.layers]
    return heads, sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


@pytest.fixture(scope="module")
def converted(tmp_path_factory, tokenizer):
    """A 4-layer tiny Llama and its per-layer conversion to 8, 2, 1, 4 KV heads through the CLI."""
    root = tmp_path_factory.mktemp("per_layer")
    model = tiny_model(layers=4, seed=2)
    src = save(model, root / "src", tokenizer)
    r = run("convert", src, root / "out", "--groups", ",".join(map(str, GROUPS)), "--quiet")
    assert r.returncode == 0, r.stderr
    return model, src, root / "out", r.stdout


# ------------------------------------------------------------------------------------------- the checkpoint
def test_written_in_the_nemotron_nas_form(converted):
    _, _, out, stdout = converted
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["model_type"], cfg["architectures"]) == ("nemotron-nas", ["DeciLMForCausalLM"])
    assert cfg["auto_map"] == {"AutoConfig": "modeling_decilm.DeciLMConfig",
                               "AutoModelForCausalLM": "modeling_decilm.DeciLMForCausalLM"}
    assert "num_key_value_heads" not in cfg
    assert [b["attention"]["n_heads_in_group"] for b in cfg["block_configs"]] == [8 // g for g in GROUPS]
    # tiny MLP (hidden 64 → 128): DeciLM's ffn_mult rule cannot give 128, so only intermediate_size is written
    assert {json.dumps(b["ffn"], sort_keys=True) for b in cfg["block_configs"]} == {json.dumps(
        {"intermediate_size": 128, "no_op": False, "replace_with_linear": False}, sort_keys=True)}
    assert (out / TEMPLATE.file).read_bytes() == TEMPLATE.path.read_bytes()
    w = weights(out)
    assert [w[f"model.layers.{i}.self_attn.k_proj.weight"].shape[0] for i in range(4)] == [8 * g for g in GROUPS]
    assert "from 8 to 8,2,1,4 KV heads per layer" in stdout and "vLLM serves natively" in stdout
    conv = record(out)["conversion"]
    assert conv["groups"] == GROUPS and conv["kv_heads_after"] == GROUPS
    assert conv["kv_cache_bytes_per_token_after"] == 2 * sum(GROUPS) * 8 * 4
    assert [x["kv_heads"] for x in conv["layers"]] == GROUPS


def test_ffn_mult_is_written_only_where_deci_lm_gives_back_the_size():
    from uptrain.arch import block_configs, ffn_mult_to_intermediate_size

    assert block_configs(9, (3,), 576, 1536)[0]["ffn"]["ffn_mult"] == 4.0  # SmolLM2-135M: exact
    assert ffn_mult_to_intermediate_size(4.0, 576) == 1536
    assert "ffn_mult" not in block_configs(8, (2,), 256, 680)[0]["ffn"]  # 680 is no multiple of 256
    assert ffn_mult_to_intermediate_size(3 * 680 / 512, 256) == 768


@pytest.mark.parametrize("attn", ("eager", "sdpa"))
def test_computes_the_source_with_each_layers_heads_shared(converted, attn):
    model, src, out, _ = converted
    ref = shared(tiny_model(layers=4, seed=2), GROUPS)
    deci = load(out, attn_implementation=attn)
    assert type(deci).__name__ == "DeciLMForCausalLM" and deci.config._attn_implementation == attn
    x = ids()
    assert (logits(ref, x) - logits(deci, x)).abs().max().item() <= 1e-5
    assert (logits(model, x) - logits(deci, x)).abs().max().item() > 1e-3  # the merge did change something


def test_the_cache_holds_each_layers_heads(converted):
    model, _, out, _ = converted
    deci = load(out)
    x = ids(batch=1, length=6, seed=1)
    heads, nbytes = cache_heads(deci, x)
    assert heads == GROUPS
    _, mha = cache_heads(model, x)
    assert nbytes * 4 * 8 == mha * sum(GROUPS)  # Σ G_l of the source's 4 × 8 heads
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=1)
    assert torch.equal(deci.generate(x, use_cache=True, **kw), deci.generate(x, use_cache=False, **kw))


def test_a_uniform_list_is_written_exactly_as_one_g(converted, tmp_path):
    _, src, _, _ = converted
    for name, groups in (("list", "2,2,2,2"), ("one", "2")):
        assert run("convert", src, tmp_path / name, "--groups", groups, "--quiet").returncode == 0
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "list").iterdir()) and "modeling_decilm.py" not in files
    for f in files:
        if f != "uptrain.json":  # (it records the options as given: [2, 2, 2, 2] and 2)
            assert (tmp_path / "list" / f).read_bytes() == (tmp_path / "one" / f).read_bytes(), f
    assert json.loads((tmp_path / "list" / "config.json").read_text())["model_type"] == "llama"


def test_save_pretrained_keeps_the_code_and_the_blocks(converted, tmp_path):
    """What `uptrain train` does with the result."""
    _, _, out, _ = converted
    deci = load(out)
    deci.save_pretrained(tmp_path / "again")
    cfg = json.loads((tmp_path / "again" / "config.json").read_text())
    assert cfg["auto_map"] == TEMPLATE.auto_map() and cfg["model_type"] == "nemotron-nas"
    assert [b["attention"]["n_heads_in_group"] for b in cfg["block_configs"]] == [8 // g for g in GROUPS]
    assert (tmp_path / "again" / TEMPLATE.file).read_bytes() == TEMPLATE.path.read_bytes()
    assert torch.equal(logits(deci, ids()), logits(load(tmp_path / "again"), ids()))


def test_a_fresh_interpreter_without_uptrain_loads_and_generates(converted, tmp_path):
    _, _, out, _ = converted
    [there] = generate_without_uptrain([out], tmp_path)
    assert (there["model"], there["config"]) == ("DeciLMForCausalLM", "DeciLMConfig")
    assert there["tokens"] == generate_here(out)


# ------------------------------------------------------------------------------------------- the family
@pytest.mark.parametrize("arch", ("qwen2", "mistral"))
def test_the_llama_family(arch, tmp_path):
    """qwen2's q/k/v biases (none on o: qkv_bias in the config, as vLLM's DeciLM reads it), mistral without a
    sliding window: the per-layer result computes the source with each layer's heads shared."""
    model = tiny_model(arch, layers=2, seed=3)
    model.config.sliding_window = None  # (tiny_config drops None: mistral's default window is 4096)
    src = save(model, tmp_path / "src")
    uptrain.convert(src, tmp_path / "out", groups=[4, 1], progress=False)
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "nemotron-nas"
    if arch == "qwen2":
        assert (cfg["qkv_bias"], cfg["attention_bias"]) == (True, False)
        assert "use_sliding_window" not in cfg and "layer_types" not in cfg
    deci = load(tmp_path / "out")
    assert (deci.model.layers[0].self_attn.k_proj.bias is not None) == (arch == "qwen2")
    assert deci.model.layers[0].self_attn.o_proj.bias is None
    ref = shared(model, [4, 1])
    assert (logits(ref, ids()) - logits(deci, ids())).abs().max().item() <= 1e-5


def test_what_the_form_cannot_hold_is_refused_in_the_callers_words(tmp_path):
    mistral = save(tiny_model("mistral", layers=2, sliding_window=16), tmp_path / "mistral")
    r = run("convert", mistral, tmp_path / "o", "--groups", "4,1")
    assert r.returncode == 2 and "--groups 4,1: the nemotron-nas form cannot hold this mistral checkpoint: it " \
                                  "needs sliding_window: False (has 16)" in r.stderr
    neox = save(tiny_model("gpt_neox", layers=2), tmp_path / "neox")
    with pytest.raises(UptrainError, match=r"groups 4,1: no per-layer form is known for gpt_neox checkpoints .*"
                                           r"llama, mistral, qwen2\); use one groups G for every layer"):
        uptrain.convert(neox, tmp_path / "o", groups=[4, 1], progress=False)
    llama = save(tiny_model(layers=2), tmp_path / "llama")
    r = run("convert", llama, tmp_path / "o", "--groups", "4,3")
    assert r.returncode == 2 and "--groups 4,3: layer 1's 3 does not divide the source's 8 KV heads" in r.stderr
    r = run("convert", llama, tmp_path / "o", "--groups", "4,2,1")
    assert "--groups 4,2,1: 3 values for a model with 2 layers" in r.stderr
    r = run("convert", llama, tmp_path / "o", "--groups", "4,x")
    assert r.returncode == 2 and "'4,x' is not a number of KV heads or a comma-separated list" in r.stderr
    with pytest.raises(UptrainError, match=r"model.convert.groups: \['4', 1\] is not a list of KV-head counts"):
        load_recipe({"model": {"path": "x", "convert": {"groups": ["4", 1]}}})
    assert not (tmp_path / "o").exists()
    # a per-layer result is not a source: its own source is
    uptrain.convert(llama, tmp_path / "deci", groups=[4, 1], progress=False)
    with pytest.raises(UptrainError, match="already has per-layer KV heads .*4,1.*convert its source"):
        uptrain.convert(str(tmp_path / "deci"), tmp_path / "o", groups=1, progress=False)


@pytest.mark.parametrize("method, extra", [("mean", {}), ("first", {}), ("random", {"seed": 3}), ("mean-norm", {}),
                                           ("mean", {"refine_steps": 3}), ("aligned", {"refine_steps": 0}),
                                           ("aligned", {"refine_steps": 3})])
def test_every_method_per_layer_is_each_layers_own_conversion(method, extra, tmp_path, tokenizer):
    """Layer l of a per-layer result is layer l of the uniform conversion to G_l, for every method (each layer is
    calibrated and refined on the source's hidden states, so nothing else reaches it); a layer that keeps the
    source's heads keeps its tensors."""
    src = save(tiny_model(layers=3, seed=4), tmp_path / "src", tokenizer)
    kw = dict(method=method, progress=False, **extra)
    if method == "aligned" or extra.get("refine_steps"):
        kw.update(calibration_tokens=256, calibration_seq_len=64)
    if method == "aligned":
        kw.update(distill_steps=0)  # distillation fits all layers together: a layer would no longer be its own
    uptrain.convert(src, tmp_path / "per", groups=[2, 8, 1], **kw)
    per = weights(tmp_path / "per")
    whole = {g: weights(uptrain.convert(src, tmp_path / str(g), groups=g, **kw).out)
             for g in (2, 1)}
    source = weights(tmp_path / "src")
    for layer, g in enumerate([2, 8, 1]):
        names = [n for n in per if n.startswith(f"model.layers.{layer}.")]
        for n in names:
            want = source[n] if g == 8 else whole[g][n]
            assert torch.allclose(per[n], want, atol=1e-6, rtol=0), (n, (per[n] - want).abs().max())


# ------------------------------------------------------------------------------------------- the pipeline
def test_inspect_shows_each_layers_heads(converted):
    _, src, out, _ = converted
    info = uptrain.inspect(out)
    assert info.kv_heads == GROUPS and info.per_layer == "block_configs" and info.options == []
    assert info.kv_cache_bytes_per_token == 2 * sum(GROUPS) * 8 * 4
    text = info.to_text()
    assert "KV heads          8,2,1,4 (per layer, block_configs; 15 in all)" in text
    assert "nemotron-nas (per-layer GQA)" in text
    assert [line.split()[:2] for line in text.splitlines() if line.strip()[:1].isdigit() and "   " in line][-4:] == \
        [["0", "8"], ["1", "2"], ["2", "1"], ["3", "4"]]
    assert "--kv-budget F" in uptrain.inspect(src).to_text()


def test_a_layer_without_attention_keeps_no_kv_heads(converted, tmp_path):
    """nemotron-nas checkpoints of other makers (the Nemotron-51B family) may replace a layer's attention by a no_op:
    that layer holds no K/V weights and keeps no cache, 0 KV heads. inspect and push read such a folder, and convert
    refuses it as a source in words (it is a per-layer checkpoint), never with a traceback."""
    from safetensors.torch import save_file

    from uptrain.arch import attention_shape
    from uptrain.publishing.hub import push

    _, _, out, _ = converted
    folder = tmp_path / "no_op"
    shutil.copytree(out, folder)
    (folder / "uptrain.json").unlink()  # written by another tool
    cfg = json.loads((folder / "config.json").read_text())
    cfg["block_configs"][2]["attention"] = {"no_op": True, "replace_with_linear": False, "n_heads_in_group": None}
    (folder / "config.json").write_text(json.dumps(cfg))
    kept = {k: t for k, t in weights(folder).items() if not k.startswith("model.layers.2.self_attn.")}
    save_file(kept, folder / "model.safetensors", metadata={"format": "pt"})
    heads = [8, 2, 0, 4]
    shape = attention_shape(cfg)
    assert shape.kv_heads == tuple(heads) and shape.kind == "per-layer GQA"
    assert shape.kv_cache_bytes_per_token(4) == 2 * sum(heads) * 8 * 4

    r = run("inspect", folder)
    assert r.returncode == 0, r.stderr
    assert "KV heads          8,2,0,4 (per layer, block_configs; 14 in all)" in r.stdout
    assert "nemotron-nas (per-layer GQA)" in r.stdout and f"{2 * 14 * 8 * 4:,} bytes per token" in r.stdout
    rows = [line.split() for line in r.stdout.splitlines() if line.strip()[:1].isdigit() and "   " in line][-4:]
    assert rows == [["0", "8", "1", "512"], ["1", "2", "4", "128"], ["2", "0", "—", "0"], ["3", "4", "2", "256"]]
    assert "8,2,0,4 key/value heads" in push(str(folder), "someone/no-op", dry_run=True).card
    r = run("convert", folder, tmp_path / "x", "--groups", "1")
    assert r.returncode == 2 and "already has per-layer KV heads (block_configs: 8,2,0,4)" in r.stderr


def test_eval_counts_each_layers_heads_and_the_real_cache_agrees(converted):
    from uptrain.evaluation import evaluate

    _, src, out, _ = converted
    res = evaluate([src, str(out)], eval_tokens=128, seq_len=32, prompt_len=8, new_tokens=4, repeats=1, progress=False)
    mha, deci = res.rows
    assert deci["num_key_value_heads"] == GROUPS and mha["num_key_value_heads"] == 8
    assert deci["kv_cache_bytes_per_token"] == 2 * sum(GROUPS) * 8 * 4 == mha["kv_cache_bytes_per_token"] * 15 // 32
    assert deci["kv_cache_measured_bytes"] == deci["kv_cache_expected_bytes"] > 0
    assert "8/8,2,1,4" in res.to_markdown() and not [n for n in res.notes if "formula" in n]


def test_push_card_lists_each_layers_heads(converted):
    from uptrain.publishing.hub import push

    _, _, out, _ = converted
    p = push(str(out), "someone/tiny-per-layer", dry_run=True)
    assert TEMPLATE.file in [f for f, _ in p.files]
    assert "| key/value heads                 |      8 | 8,2,1,4 (per layer) |" in p.card
    rows = [line for line in p.card.splitlines() if line.startswith("| ") and line.count("|") == 5]
    assert [r.split("|")[1:3] for r in rows[-4:]] == [[" 0     ", "        8 "], [" 1     ", "        2 "],
                                                      [" 2     ", "        1 "], [" 3     ", "        4 "]]
    assert "--groups 8,2,1,4" in p.card and "vllm serve someone/tiny-per-layer --trust-remote-code" in p.card
    assert 'AutoTokenizer.from_pretrained("someone/tiny-per-layer", trust_remote_code=True)' in p.card
    assert "- custom_code" in p.card.split("---")[1]


def test_train_converts_to_per_layer_heads_and_learns(tmp_path, tokenizer):
    """`uptrain train` with model.convert.groups as a list: step0 is per-layer, training lowers the loss, the final
    model keeps its heads and its code."""
    from uptrain.training import train

    src = save(tiny_model(layers=2, seed=5), tmp_path / "src", tokenizer)
    out = tmp_path / "run"
    res = train({"out": str(out), "model": {"path": src, "convert": {"groups": [4, 1]}},
                 "data": {"max_documents": 2, "seq_len": 32, "max_train_blocks": 64, "cache_dir": str(tmp_path / "c")},
                 "budget": {"max_steps": 4}, "optim": {"lr": 3e-3}, "train": {"micro_batch_size": 4},
                 "eval": {"max_blocks": 4, "at_start": True}, "log": {"progress": False}})
    assert res.finished and res.final_eval["loss"] < res.eval_history[0]["loss"]
    for folder in (out / "step0", out):
        cfg = json.loads((folder / "config.json").read_text())
        assert [b["attention"]["n_heads_in_group"] for b in cfg["block_configs"]] == [2, 8]
        assert (folder / TEMPLATE.file).read_bytes() == TEMPLATE.path.read_bytes()
    assert record(out)["conversion"]["groups"] == [4, 1]
    heads, _ = cache_heads(load(out), ids(batch=1, length=5))
    assert heads == [4, 1]


@pytest.mark.slow  # two real 2-rank launches, ~30 s each (one process trains a per-layer model in the default tier)
@pytest.mark.parametrize("config", ("cpu.yaml", "fsdp.yaml"))
def test_two_ranks_train_a_per_layer_model_as_one_process_does(config, converted, tmp_path):
    """`accelerate launch` with 2 gloo ranks (DDP, and FSDP2 sharding the per-layer k/v projections too) × 4
    blocks = one process × 4 blocks × accumulation 2: the same losses and final weights, and the final model is
    the per-layer checkpoint with its code."""
    import yaml
    from launching import launch

    from uptrain.training import train

    _, _, out, _ = converted

    def recipe(run, **train_over):
        return {"out": str(run), "model": {"path": str(out)},
                "data": {"max_documents": 2, "seq_len": 32, "max_train_blocks": 64, "cache_dir": str(tmp_path / "c")},
                "budget": {"max_steps": 2}, "optim": {"lr": 3e-3},
                "train": {"micro_batch_size": 4, **train_over}, "eval": {"max_blocks": 4, "at_start": False},
                "checkpoint": {"every": 0}, "log": {"progress": False}}

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe(tmp_path / "two")))
    launch(tmp_path / "r.yaml", config=config, flags=("--num_processes", "2", "--mixed_precision", "no"), timeout=300)
    one = train(recipe(tmp_path / "one", grad_accum=2))
    got = [json.loads(x)["loss"] for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
           if "loss" in json.loads(x)]
    assert len(got) == 2 and max(abs(a - b) for a, b in zip(got, one.losses)) < 1e-4
    two, ref = weights(tmp_path / "two"), weights(tmp_path / "one")
    assert max((two[k] - ref[k]).abs().max().item() for k in ref) < 1e-4
    assert [two[f"model.layers.{i}.self_attn.v_proj.weight"].shape[0] for i in range(4)] == [8 * g for g in GROUPS]
    assert (tmp_path / "two" / TEMPLATE.file).read_bytes() == TEMPLATE.path.read_bytes()
    assert record(tmp_path / "two")["uptraining"]["processes"] == 2
