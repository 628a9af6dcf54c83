"""Saving and memory: the final model's dtype (train.save_dtype, by default the checkpoint's own), the
activation-checkpointing switch, and the message a micro-batch that cannot fit gets before step 1."""
import json

import pytest
import torch
from safetensors.torch import load_file

from model_io import record
from tiny_models import save, tiny_model
from uptrain.training import train
from uptrain.training.loop import fit_message, moments_problem, probe
from uptrain.training.recipe import load_recipe

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("saving")
    return {"bf16": save(tiny_model(kv_heads=2, seed=1, dtype=torch.bfloat16), root / "bf16", tokenizer),
            "f32": save(tiny_model(kv_heads=2, seed=1), root / "f32", tokenizer),
            "cache": str(tmp_path_factory.mktemp("cache"))}


def recipe(models, src, out, **train_over):
    return {"out": str(out), "model": {"path": models[src], "dtype": "float32"},
            "data": {"max_documents": 2, "seq_len": 32, "max_train_blocks": 64, "cache_dir": models["cache"]},
            "budget": {"max_steps": 2}, "optim": {"lr": 3e-3}, "train": {"micro_batch_size": 4, **train_over},
            "eval": {"max_blocks": 4, "at_start": False}, "log": {"progress": False}}


def test_a_bfloat16_checkpoint_trained_in_float32_comes_back_in_bfloat16(models, tmp_path, capsys):
    """The default save_dtype is the source's: the float32 master weights rounded once, at the end; the
    config says so and the model loads in bfloat16. save_dtype: float32 keeps the trained weights as they are."""
    from transformers import AutoModelForCausalLM

    train(recipe(models, "bf16", tmp_path / "default"))
    said = capsys.readouterr().out
    assert "the final model is saved in bfloat16 (the dtype of the checkpoint it starts from)" in said
    train(recipe(models, "bf16", tmp_path / "f32", save_dtype="float32"))
    saved = load_file(tmp_path / "default" / "model.safetensors")
    full = load_file(tmp_path / "f32" / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16} and {t.dtype for t in full.values()} == {torch.float32}
    assert all(torch.equal(saved[k], full[k].to(torch.bfloat16)) for k in full)  # the same run, rounded once
    src = load_file(f"{models['bf16']}/model.safetensors")
    assert any(not torch.equal(saved[k], src[k]) for k in src)  # and it did train
    assert json.loads((tmp_path / "default" / "config.json").read_text())["dtype"] == "bfloat16"
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "default", dtype="auto").dtype == torch.bfloat16
    up = record(tmp_path / "default")["uptraining"]
    assert up["recipe"]["train"]["save_dtype"] is None


def test_save_dtype_float16_from_a_float32_checkpoint(models, tmp_path):
    train(recipe(models, "f32", tmp_path / "h", save_dtype="float16"))
    assert {t.dtype for t in load_file(tmp_path / "h" / "model.safetensors").values()} == {torch.float16}
    assert json.loads((tmp_path / "h" / "config.json").read_text())["dtype"] == "float16"


def test_save_dtype_is_checked_with_the_recipe(models, tmp_path):
    from uptrain.errors import UptrainError

    with pytest.raises(UptrainError, match="train.save_dtype: 'int8' is not one of float32, bfloat16, float16"):
        load_recipe(recipe(models, "f32", tmp_path / "x", save_dtype="int8"))


def test_activation_checkpointing_is_non_reentrant_per_layer():
    from uptrain.training.setup import enable_checkpointing

    model = tiny_model()
    enable_checkpointing(model)
    for layer in model.model.layers:
        assert layer.gradient_checkpointing and layer._gradient_checkpointing_func.keywords == {"use_reentrant": False}


def test_a_micro_batch_that_cannot_fit_is_told_what_to_change():
    """The probe's parts (the CUDA forward and backward itself needs a GPU): an OutOfMemoryError becomes the
    advice, gradients are dropped either way, and the AdamW moments still to come are counted."""
    cleared = []

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    assert probe(oom, lambda: cleared.append(1)) == "one forward and backward of a micro-batch runs out of memory"
    assert probe(lambda: None, lambda: cleared.append(1)) is None and cleared == [1, 1]
    G = 2**30
    assert moments_problem(60 * G, 16 * G, 79 * G) is None
    assert moments_problem(70 * G, 16 * G, 79 * G) == ("a micro-batch peaks at 70.0 GiB and the optimiser state adds "
                                                       "16.0 GiB at the first step, 79.0 GiB are usable")
    r = load_recipe({"model": {"path": "meta-llama/Llama-2-7b-hf"}, "budget": {"max_steps": 1},
                     "train": {"micro_batch_size": 8, "grad_accum": 4}, "data": {"seq_len": 4096}})
    msg = fit_message("one forward and backward of a micro-batch runs out of memory", r, "cuda:0 (80 GiB)", 8)
    assert msg.startswith("train.micro_batch_size 8 × data.seq_len 4096 does not fit on cuda:0 (80 GiB): one forward")
    assert "raise train.grad_accum by the same factor (the batch stays 256 blocks per step)" in msg
    assert "set train.gradient_checkpointing: true" in msg and "uptrain plan" in msg
    r.train.gradient_checkpointing = True
    assert "gradient_checkpointing" not in fit_message("x", r, "cuda:0", 8)
