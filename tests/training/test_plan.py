"""`uptrain plan`: docs/training.md's worked example checked by hand, a tiny recipe against its real model, and the
activation formula against what autograd really keeps."""
import json
import os
import re

import pytest
import torch

from tiny_models import save, tiny_model
from uptrain.cli import main
from uptrain.errors import UptrainError
from uptrain.training.plan import activation_bytes, layer_bytes, plan, read_launcher, state_bytes

from repo_paths import REPO
LLAMA2_7B = os.path.join(REPO, "tests", "data", "llama-2-7b-hf")  # Llama-2-7b-hf's config.json, no weights
GiB = 2**30

pytestmark = pytest.mark.usefixtures("one_thread")


def test_llama2_7b_to_gqa8_worked_example_by_hand():
    """recipes/llama2-7b-gqa8.yaml on 8 GPUs with FSDP, every figure recomputed here from the config."""
    p = plan(os.path.join(REPO, "recipes", "llama2-7b-gqa8.yaml"), [f"model.path={LLAMA2_7B}"],
             accelerate_config=os.path.join(REPO, "recipes", "accelerate", "fsdp.yaml"))
    h, i, L, V, d = 4096, 11008, 32, 32000, 128
    layer = 4 * h * h + 3 * h * i + 2 * h  # q, k, v, o; gate, up, down; two norms
    before = 2 * V * h + L * layer + h  # + embedding, lm_head, final norm
    assert before == 6_738_415_616  # Llama-2-7B's published size
    after = before - L * 2 * (h - 8 * d) * h  # GQA-8: K and V keep 8 of 32 heads
    assert (p.parameters_before, p.parameters, p.trainable) == (before, after, after) == (before, 5_933_109_248, after)
    assert (p.processes, p.strategy, p.mixed_precision) == (8, "FSDP", "bf16")

    tokens_per_step = 8 * 4 * 32 * 4096  # GPUs × micro-batch × accumulation × seq_len = Llama-2's 4M batch
    steps = int(0.05 * 2e12) // tokens_per_step
    assert (p.tokens_per_step, p.steps, p.tokens) == (4_194_304, steps, steps * tokens_per_step) and steps == 23_841
    assert p.flops == 6 * after * steps * tokens_per_step == pytest.approx(3.56e21, rel=1e-3)
    assert "compute      3.6e21 FLOP  (6·N·tokens)" in p.to_text()

    # Activations of one micro-batch (4 × 4096 tokens), bf16 autocast, float32 weights, checkpointing on:
    tok, kv = 4 * 4096, 8 * d
    per_layer = 2 * (3 * h + 2 * kv + h + 4 * i) + 16 * h  # attention, SwiGLU MLP, float32 norms
    acts = L * h * 4 * tok + per_layer * tok + 10 * tok * V  # layer inputs + one recomputed layer + loss
    rows = {m.strategy: m for m in p.memory}
    assert {m.activations for m in p.memory} == {acts} and acts / GiB == pytest.approx(15.79, abs=0.01)
    unit = 2 * h * h + 2 * kv * h + 3 * h * i + 2 * h  # one GQA-8 decoder layer, the largest FSDP unit
    assert (rows["FSDP"].weights, rows["FSDP"].gradients, rows["FSDP"].optimiser, rows["FSDP"].working) == \
        (4 * after // 8, 4 * after // 8, 8 * after // 8, 2 * unit * 2)
    assert (rows["ZeRO-3"].weights, rows["ZeRO-3"].gradients, rows["ZeRO-3"].optimiser) == \
        (2 * after // 8, 2 * after // 8, 12 * after // 8)  # 16-bit weights and gradients, fp32 master + moments
    assert (rows["DDP"].weights, rows["DDP"].gradients, rows["DDP"].optimiser, rows["DDP"].working) == \
        (4 * after, 4 * after, 8 * after, 2 * after)  # replicated; autocast's bf16 copy of every weight
    assert rows["FSDP"].total / GiB == pytest.approx(27.5, abs=0.05) and rows["DDP"].total > 80 * GiB

    h100 = next(a for a in p.accelerators if a["name"] == "H100")
    assert h100["gpu_hours"] == pytest.approx(p.flops / (989e12 * 0.4) / 3600) == pytest.approx(2500, abs=1)
    assert h100["wall_hours"] == pytest.approx(h100["gpu_hours"] / 8) and h100["fits"] == ["FSDP", "ZeRO-3"]
    h200 = next(a for a in p.accelerators if a["name"] == "H200")
    assert h200["fits"] == ["DDP", "FSDP", "ZeRO-3"]  # 115 GiB replicated fits 141 GiB


def test_a_tiny_recipe_against_its_real_model(tokenizer, tmp_path, capsys):
    """Through the CLI with --json: the counts are those of the model the recipe would train."""
    from uptrain.arch import spec_for_config
    from uptrain.training.setup import trainable_mask

    src = save(tiny_model(), tmp_path / "mha", tokenizer)
    recipe = os.path.join(REPO, "recipes", "tiny-cpu.yaml")
    args = ["plan", recipe, f"model.path={src}", "train.params=kv", "--processes", "2", "--mfu", "0.5", "--json"]
    assert main(args) == 0
    p = json.loads(capsys.readouterr().out)
    converted = tiny_model(kv_heads=2)  # what the recipe's convert: {groups: 2} makes of it
    named = dict(converted.named_parameters())
    mask = trainable_mask(named, spec_for_config(converted.config), "kv")
    n, n_train = sum(t.numel() for t in named.values()), sum(named[k].numel() for k, v in mask.items() if v)
    assert p["parameters_before"] == sum(t.numel() for t in tiny_model().parameters()) > p["parameters"] == n
    assert p["trainable"] == n_train < n and (p["kv_heads_before"], p["kv_heads"]) == (8, 2)
    assert p["tokens_per_step"] == 4 * 2 * 2 * 64 and p["steps"] == 24 and p["tokens"] == 24 * 1024
    assert p["flops"] == (4 * n + 2 * n_train) * 24 * 1024  # frozen weights get no weight gradient
    assert p["mfu"] == 0.5 and p["processes"] == 2 and p["strategy"] is None
    ddp = p["memory"][0]
    assert ddp["strategy"] == "DDP" and ddp["weights"] == 4 * n and ddp["optimiser"] == 2 * 4 * n_train
    assert main(["plan", recipe, f"model.path={src}"]) == 0  # the text, every parameter training
    text = capsys.readouterr().out
    assert re.search(r"compute +\d\.\de\d+ FLOP  \(6·N·tokens\)", text), text


def test_state_bytes_per_strategy():
    n, t = 1000, 400  # parameters, trainable
    assert state_bytes("DDP", n, t, 4, False, 8) == {"weights": 4000, "gradients": 1600, "optimiser": 3200}
    assert state_bytes("FSDP", n, t, 4, True, 8) == {"weights": 500, "gradients": 200, "optimiser": 400}
    # bf16 weights under FSDP2 mixed precision: the trainable ones are upcast to float32, the frozen stay bf16
    assert state_bytes("FSDP", n, t, 2, True, 1) == {"weights": 4 * t + 2 * (n - t), "gradients": 4 * t,
                                                      "optimiser": 8 * t}
    assert state_bytes("ZeRO-3", n, t, 4, True, 4) == {"weights": 500, "gradients": 200, "optimiser": 1200}
    assert state_bytes("ZeRO-2", n, t, 4, False, 4) == {"weights": 4000, "gradients": 400, "optimiser": 800}


def _saved_bytes(model, ids, autocast: bool) -> int:
    """Bytes of the tensors autograd keeps for the backward of the training loss (weights and autocast's
    copies of them left out: the plan counts those apart)."""
    import torch.nn.functional as F

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shapes = {tuple(p.shape) for p in model.parameters() if p.ndim == 2}
    kept = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights and not (t.dtype == torch.bfloat16 and tuple(t.shape) in shapes):
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=ids, use_cache=False).logits
        labels = F.pad(ids[:, 1:], (0, 1), value=-100)
        F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
    return sum(kept.values())


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bf16-autocast"])
def test_activation_formula_against_what_autograd_keeps(autocast):
    """The estimate is at least what autograd saves and at most 1.35× it (the excess: the transient logits the
    loss makes at its peak, which autograd does not keep)."""
    h, i, layers, heads, kv, vocab, b, s = 256, 688, 4, 8, 2, 512, 2, 256
    model = tiny_model(hidden=h, intermediate_size=i, layers=layers, heads=heads, kv_heads=kv, vocab=vocab).train()
    ids = torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(0))
    a = 2 if autocast else 4
    estimate = activation_bytes(layers, layer_bytes(h, kv * h // heads, i, True, a), h, vocab, b * s, a, 4, False)
    measured = _saved_bytes(model, ids, autocast)
    assert 0.95 <= estimate / measured <= 1.35, (estimate, measured)


def test_launcher_configs_and_mistakes(tmp_path, capsys):
    acc = os.path.join(REPO, "recipes", "accelerate")
    assert read_launcher(os.path.join(acc, "deepspeed_zero3.yaml")) == {"strategy": "ZeRO-3", "processes": 8,
                                                                        "mixed_precision": "bf16"}
    assert read_launcher(os.path.join(acc, "multi_gpu.yaml"))["strategy"] == "DDP"
    assert read_launcher(os.path.join(acc, "cpu.yaml")) == {"strategy": "DDP", "processes": 2,
                                                            "mixed_precision": "no"}
    recipe = os.path.join(REPO, "recipes", "llama2-7b-gqa8.yaml")
    assert main(["plan", recipe, f"model.path={LLAMA2_7B}", "train.micro_batchsize=2"]) == 2
    assert "unknown key 'train.micro_batchsize'" in capsys.readouterr().err
    assert main(["plan", recipe, "--processes", "8", f"model.path={LLAMA2_7B}", "model.convert.groups=3"]) == 2
    assert "model.convert.groups 3 does not divide the source's 32 KV heads" in capsys.readouterr().err
    with pytest.raises(UptrainError, match="mfu must be in"):
        plan(recipe, [f"model.path={LLAMA2_7B}"], mfu=40)
