"""recipes/accelerate/fsdp.yaml on CPU ranks: FSDP2 over gloo really shards (each rank holds half of every
weight), trains the same numbers as one process and as DDP, checkpoints sharded, resumes, and saves one
consolidated model. Real `accelerate launch` processes, as a user runs them."""
import json
import os
import subprocess

import launching
import pytest
import torch
import yaml
from safetensors.torch import load_file

from model_io import record
from small_recipes import small_recipe
from tiny_models import save, tiny_model
from uptrain.errors import UptrainError
from uptrain.training import train


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("fsdp")
    return {"path": save(tiny_model(kv_heads=2, seed=1), root / "gqa", tokenizer),
            "cache": str(tmp_path_factory.mktemp("cache"))}


def recipe(model, out, **over):
    return small_recipe(model["path"], out, model["cache"], **{"checkpoint": {"every": 2, "keep": 2}, **over})


def launch(config: str, recipe_file, *overrides, processes: int = 2) -> subprocess.CompletedProcess:
    """`accelerate launch --config_file recipes/accelerate/CONFIG` with 2 CPU ranks and no mixed precision
    (fsdp.yaml is written for 8 GPUs in bf16: the flags override it, as a user would)."""
    return launching.launch(recipe_file, *overrides, config=config,
                            flags=("--num_processes", str(processes), "--mixed_precision", "no"))


def losses(out) -> list[float]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x]


def shard_chunks(checkpoint) -> dict:
    """Tensor name → [(first row, rows)] of the pieces the checkpoint's ranks wrote (torch.distributed.checkpoint
    metadata of accelerate's SHARDED_STATE_DICT)."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(checkpoint / "pytorch_model_fsdp_0")).read_metadata()
    return {k.removeprefix("model."): sorted((c.offsets[0], c.sizes[0]) for c in v.chunks)
            for k, v in meta.state_dict_metadata.items()}


def max_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def test_fsdp_config_shards_on_cpu_and_matches_one_process(model, tmp_path):
    """Two gloo ranks × 4 blocks under fsdp.yaml = one process × 4 blocks × accumulation 2: the same losses and
    final weights (≤ 1e-4); the checkpoint holds every weight in two row halves, one per rank; the final model
    is one consolidated HF checkpoint."""
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe(model, tmp_path / "fsdp", budget={"max_steps": 2})))
    p = launch("fsdp.yaml", tmp_path / "r.yaml")
    one = train(recipe(model, tmp_path / "one", budget={"max_steps": 2}, train={"grad_accum": 2}))

    assert "strategy: FSDP2, parameters, gradients and optimiser state sharded over 2 processes on cpu" in p.stdout
    got = losses(tmp_path / "fsdp")
    assert len(got) == 2 and max(abs(a - b) for a, b in zip(got, one.losses)) < 1e-4
    ckpt = tmp_path / "fsdp" / "checkpoints" / "step_00000002"
    assert sorted(f.name for f in (ckpt / "pytorch_model_fsdp_0").iterdir()) == [".metadata", "__0_0.distcp",
                                                                                  "__1_0.distcp"]
    assert not (ckpt / "model.safetensors").exists()  # not the DDP layout
    final = load_file(tmp_path / "fsdp" / "model.safetensors")
    chunks = shard_chunks(ckpt)
    assert set(chunks) == set(final)
    for name, t in final.items():  # dim 0 split in two halves (FSDP2's Shard(0)), one per rank
        half = t.shape[0] // 2
        assert chunks[name] == [(0, half), (half, t.shape[0] - half)], name
    assert max_diff(final, load_file(tmp_path / "one" / "model.safetensors")) < 1e-4


@pytest.mark.slow
def test_fsdp_against_ddp_with_a_resume_in_the_middle(model, tmp_path):
    """DDP (cpu.yaml) for 4 steps against FSDP stopped after step 2 (budget.stop_at) and resumed from its
    sharded checkpoint: the same losses and final weights (≤ 1e-4), optimiser state included."""
    for name in ("ddp", "fsdp"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe(model, tmp_path / name)))
    launch("cpu.yaml", tmp_path / "ddp.yaml")
    first = launch("fsdp.yaml", tmp_path / "fsdp.yaml", "budget.stop_at=2")
    assert "Stopped" in first.stdout and not (tmp_path / "fsdp" / "model.safetensors").exists()
    again = launch("fsdp.yaml", tmp_path / "fsdp.yaml", "resume=auto")
    assert "resuming from" in again.stdout and "step_00000002" in again.stdout

    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    assert (ddp / "checkpoints" / "step_00000004" / "model.safetensors").is_file()  # DDP: one full copy
    assert (fsdp / "checkpoints" / "step_00000004" / "optimizer_0" / "__1_0.distcp").is_file()  # FSDP: per rank
    assert len(losses(fsdp)) == 4 and max(abs(a - b) for a, b in zip(losses(fsdp), losses(ddp))) < 1e-4
    assert max_diff(load_file(fsdp / "model.safetensors"), load_file(ddp / "model.safetensors")) < 1e-4
    up = record(fsdp)["uptraining"]
    assert up["processes"] == 2 and up["steps"] == 4


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "phi3", "starcoder2", "mixtral"])
def test_fsdp_units_are_each_models_own_decoder_layers(arch, monkeypatch):
    """fsdp.yaml names no layer class: accelerate wraps the model's `_no_split_modules`, whatever the
    architecture (what the launcher's FSDP_* variables give the plugin, read the same way)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    raw = yaml.safe_load(open(os.path.join(launching.ACCELERATE, "fsdp.yaml"), encoding="utf-8"))["fsdp_config"]
    assert "fsdp_transformer_layer_cls_to_wrap" not in raw and raw["fsdp_version"] == 2
    monkeypatch.setenv("FSDP_VERSION", "2")
    monkeypatch.setenv("FSDP_AUTO_WRAP_POLICY", raw["fsdp_auto_wrap_policy"])
    model = tiny_model(arch)
    plugin = FullyShardedDataParallelPlugin()
    plugin.set_auto_wrap_policy(model)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    assert [n for n, m in model.named_modules() if policy(m)] == ["model.layers.0", "model.layers.1"]


def test_fsdp1_and_deepspeed_on_cpu_are_refused_not_run_as_ddp(model, tmp_path, monkeypatch):
    from uptrain.training.recipe import load_recipe
    from uptrain.training.setup import make_accelerator, shard_on_cpu

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(UptrainError, match="FSDP on CPU ranks needs fsdp_version: 2"):
        shard_on_cpu(None)  # refused from the launcher's variables, before the accelerator is touched
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    r = load_recipe(recipe(model, tmp_path / "ds"))
    if not torch.cuda.is_available():
        with pytest.raises(UptrainError, match="DeepSpeed needs GPUs"):
            make_accelerator(r, tmp_path / "ds", world=2)


@pytest.mark.slow
def test_fsdp_keep_best_saves_the_start_gathered_from_the_shards(model, tmp_path):
    """eval.keep_best under FSDP2: the start is gathered from both ranks' shards to the main process's CPU, and a
    run that only does harm (lr 1.0) saves it bit for bit, with one message."""
    r = recipe(model, tmp_path / "fsdp", budget={"max_steps": 2},
               optim={"lr": 1.0, "warmup_steps": 0, "schedule": "constant"})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    p = launch("fsdp.yaml", tmp_path / "r.yaml")
    assert p.stdout.count("keep_best: the held-out loss never went below the start's") == 1, p.stdout
    saved, start = load_file(tmp_path / "fsdp" / "model.safetensors"), load_file(os.path.join(model["path"],
                                                                                               "model.safetensors"))
    assert sorted(saved) == sorted(start) and all(torch.equal(saved[k], start[k]) for k in saved)
    assert record(tmp_path / "fsdp")["uptraining"]["kept_step"] == 0


def test_attention_alone_on_two_ranks_ddp_and_fsdp_with_a_resume(model, tmp_path):
    """train.params attention on 2 ranks: DDP (cpu.yaml) for 2 steps, FSDP2 (fsdp.yaml) stopped after step 1 and
    resumed from its sharded checkpoint. Both train the same numbers (≤ 1e-4); outside attention every weight is
    the start's, bit for bit (no unused-parameter trouble: frozen parameters have no gradient to reduce)."""
    start = load_file(os.path.join(model["path"], "model.safetensors"))
    attention = {k for k in start if ".self_attn." in k}
    for name in ("ddp", "fsdp"):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(recipe(
            model, tmp_path / name, budget={"max_steps": 2}, train={"params": "attention"},
            checkpoint={"every": 1, "keep": 1})))
    p = launch("cpu.yaml", tmp_path / "ddp.yaml")
    n = sum(start[k].numel() for k in attention)
    assert f"training attention (model.layers.*.self_attn.*): {n:,} of" in p.stdout
    launch("fsdp.yaml", tmp_path / "fsdp.yaml", "budget.stop_at=1")
    again = launch("fsdp.yaml", tmp_path / "fsdp.yaml", "resume=auto")
    assert "resuming from" in again.stdout and "step_00000001" in again.stdout

    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    assert len(losses(fsdp)) == 2 and max(abs(a - b) for a, b in zip(losses(fsdp), losses(ddp))) < 1e-4
    for out in (ddp, fsdp):
        end = load_file(out / "model.safetensors")
        assert {k for k in start if not torch.equal(start[k], end[k])} == attention
        assert record(out)["uptraining"]["trainable_parameters"] == n
    assert max_diff(load_file(fsdp / "model.safetensors"), load_file(ddp / "model.safetensors")) < 1e-4
