"""Calibrated conversion (`--method aligned`, refinement) on architectures whose result below G = H carries
uptrain's GQA modeling file (gpt_neox, gpt2, opt): the layer-by-layer engine builds the converted layers
from those classes and reads / writes their stored layouts (q, k, v fused per KV head; Conv1D transposed)."""
import json

import pytest
import torch
from model_io import load, record
from test_merging import IDS, logits, plant
from tiny_models import REMOTE_CODE, save, tiny_model

import uptrain

pytestmark = pytest.mark.usefixtures("one_thread")

CAL = dict(calibration_tokens=256, calibration_seq_len=32, calibration_batch_size=8)


def load_remote(folder):
    return load(folder, dtype=torch.float32)


@pytest.mark.parametrize("arch", REMOTE_CODE)
def test_groups_equal_heads_is_the_source(arch, tmp_path, tokenizer):
    from safetensors.torch import load_file

    src = save(tiny_model(arch), tmp_path / "src", tokenizer=tokenizer)
    r = uptrain.convert(src, tmp_path / "out", groups=8, method="aligned", progress=False, **CAL)
    a, b = load_file(tmp_path / "src" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert r.remote_code is None and "auto_map" not in json.loads((tmp_path / "out" / "config.json").read_text())


@pytest.mark.parametrize("arch, groups, written_as", [
    ("gpt_neox", 2, "gpt_neox"),  # fused per KV head, partial rotary (half of each head), parallel residual
    ("gpt_neox", 1, "gpt_neox"),
    ("gpt2", 2, "gpt2"),          # Conv1D (stored transposed), no RoPE: keys take the invertible fold
    ("gpt2", 1, "gpt_bigcode"),   # MQA is written natively; calibrated with GPT-2's GQA class meanwhile
    ("opt", 2, "opt"),            # separate projections with biases, the query scaled before the product
    ("falcon", 2, "falcon"),      # native, fused per KV head: becomes the new decoder architecture
    ("gpt_bigcode", 1, "gpt_bigcode"),  # native, MHA → MQA
])
def test_aligned_is_lossless_on_foldable_heads(arch, groups, written_as, tmp_path, tokenizer):
    model = plant(tiny_model(arch), groups)
    src = save(model, tmp_path / "src", tokenizer=tokenizer)
    ref = logits(model, IDS)
    r = uptrain.convert(src, tmp_path / "aligned", groups=groups, method="aligned", progress=False, **CAL)
    uptrain.convert(src, tmp_path / "mean", groups=groups, method="mean", progress=False)
    aligned = load_remote(tmp_path / "aligned")
    assert r.written_as == written_as and aligned.config.model_type == written_as and r.kv_heads_after == groups
    assert (r.remote_code is not None) == (arch in REMOTE_CODE and written_as == arch)
    assert (logits(aligned, IDS) - ref).abs().max().item() <= 1e-4
    assert (logits(load_remote(tmp_path / "mean"), IDS) - ref).abs().max().item() >= 0.03
    conv = record(tmp_path / "aligned")["conversion"]
    assert [e["layer"] for e in conv["aligned"]["layers"]] == [0, 1]
    assert all(e["k_fit_error"] < 1e-6 and e["v_fit_error"] < 1e-6 for e in conv["aligned"]["layers"])
    # refinement (aligned's default) finds nothing to improve on an exact merge and keeps it
    assert all(f["after"] == f["before"] < 1e-8 for f in conv["refine"]["layers"])
    # greedy generation with the converted (G-head) cache gives the source's tokens
    prompt = IDS[:1, :8]
    with torch.no_grad():
        want = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=1)
        got = aligned.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=1)
    assert torch.equal(got, want)


@pytest.mark.parametrize("arch, over", [*((a, {}) for a in REMOTE_CODE),
                                        ("cohere", {"use_qk_norm": True})],  # k_norm stored [heads, head_dim]
                         ids=[*REMOTE_CODE, "cohere-qk-norm"])
def test_refinement_lowers_the_layer_error(arch, over, tmp_path, tokenizer):
    """Unrelated heads (a random model): mean-norm alone loses what refinement fits back, layer by layer and in
    the logits; the converted layers are run from uptrain's GQA classes (calibration inputs: converted)."""
    model = tiny_model(arch, **over)
    src = save(model, tmp_path / "src", tokenizer=tokenizer)
    ref = logits(model, IDS)
    uptrain.convert(src, tmp_path / "plain", groups=2, method="mean-norm", progress=False)
    r = uptrain.convert(src, tmp_path / "refined", groups=2, method="mean-norm", refine_steps=30,
                        calibration_inputs="converted", progress=False, **CAL)
    fits = record(tmp_path / "refined")["conversion"]["refine"]["layers"]
    assert [f["layer"] for f in fits] == [0, 1] and all(f["after"] < 0.2 * f["before"] for f in fits)
    assert all(s["attn_error_after"] < s["attn_error_before"] for s in r.layers)

    def rel(folder):
        return ((logits(load_remote(folder), IDS) - ref).norm() / ref.norm()).item()

    assert rel(tmp_path / "refined") < 0.5 * rel(tmp_path / "plain")


def test_base_model_checkpoint_calibrates(tmp_path, tokenizer):
    """A GPT-2 saved as its base model (h.0.… without transformer.): the engine names its tensors as the
    model does, and the result keeps the checkpoint's names."""
    from safetensors import safe_open

    base = plant(tiny_model("gpt2"), 2).transformer
    base.save_pretrained(tmp_path / "src")
    tokenizer.save_pretrained(tmp_path / "src")
    uptrain.convert(tmp_path / "src", tmp_path / "out", groups=2, method="aligned", progress=False, **CAL)
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as f:
        assert "h.0.attn.c_attn.weight" in f.keys()
    with torch.no_grad():
        want = base(IDS).last_hidden_state
        got = load_remote(tmp_path / "out").transformer(IDS).last_hidden_state
    assert (got - want).abs().max().item() <= 1e-4


def test_pythia_checkpoint_with_saved_buffers(tmp_path, tokenizer):
    """Pythia checkpoints hold the attention's causal mask, masked_bias and inv_freq: copied as they are, never
    taken for parameters by aligned or refinement."""
    from safetensors.torch import load_file, save_file

    model = plant(tiny_model("gpt_neox"), 2)
    src = save(model, tmp_path / "src", tokenizer=tokenizer)
    tensors = load_file(tmp_path / "src" / "model.safetensors")
    buffers = {}
    for i in range(2):
        p = f"gpt_neox.layers.{i}.attention."
        buffers.update({p + "bias": torch.ones(1, 1, 64, 64, dtype=torch.bool).tril(),
                        p + "masked_bias": torch.tensor(-1e9), p + "rotary_emb.inv_freq": torch.rand(2)})
    save_file({**tensors, **buffers}, tmp_path / "src" / "model.safetensors", metadata={"format": "pt"})
    ref = logits(model, IDS)
    for name, kw in {"aligned": dict(method="aligned"),
                     "refined": dict(method="mean-norm", refine_steps=10, calibration_inputs="converted")}.items():
        uptrain.convert(src, tmp_path / name, groups=2, progress=False, **kw, **CAL)
        out = load_file(tmp_path / name / "model.safetensors")
        assert all(torch.equal(out[n], t) for n, t in buffers.items())
    assert (logits(load_remote(tmp_path / "aligned"), IDS) - ref).abs().max().item() <= 1e-4


@pytest.mark.slow  # a fresh interpreter: ~14 s on the shared CPU
def test_cli_aligned_on_pythia(tmp_path, tokenizer):
    import os
    import subprocess
    import sys

    from test_merging import ROOT

    model = plant(tiny_model("gpt_neox"), 2)
    src = save(model, tmp_path / "src", tokenizer=tokenizer)
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "uptrain", "convert", src, str(out), "--groups", "2", "--method",
                        "aligned", "--calibration-tokens", "256", "--calibration-seq-len", "32"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr
    assert "trust_remote_code=True" in p.stdout + p.stderr
    assert json.loads((out / "config.json").read_text())["auto_map"]
    assert (logits(load_remote(out), IDS) - logits(model, IDS)).abs().max().item() <= 1e-4


def test_refuses_what_the_engine_cannot_build():
    """A result whose only form changes the model type (no class with the source's module names computes it)."""
    import dataclasses

    from uptrain.arch import SPECS, Form
    from uptrain.calibration.method import check_calibratable
    from uptrain.conversion.options import ConvertOptions
    from uptrain.errors import UptrainError
    from tiny_models import tiny_config

    spec = dataclasses.replace(SPECS["gpt2"], forms=(Form(groups="H"), Form(config={"model_type": "other"})))
    cfg = tiny_config("gpt2").to_dict()
    options = ConvertOptions.from_kwargs("cli", groups=2, method="aligned")
    with pytest.raises(UptrainError, match="--method aligned with calibration cannot build the converted gpt2 "
                                           "layers for --groups 2.*--method.*mean-norm.*without --refine-steps"):
        check_calibratable(spec, cfg, options)
    check_calibratable(SPECS["gpt2"], cfg, options)  # the table's own: GPT-2's GQA class
