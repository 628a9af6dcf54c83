"""train.params: which parameters uptraining trains. `attention` is every architecture's attention module as the
attention table (uptrain/arch/table.py) names it; a list of glob patterns selects by name, and a pattern that selects
nothing is refused. Frozen weights come back bit for bit, with distillation, keep_best and a resume; 2 ranks:
tests/training/test_fsdp.py."""
import pytest
import torch

from model_io import record, weights
from test_training import models, recipe  # noqa: F401  (the same tiny models and recipe)
from tiny_models import TINY_CONFIGS, tiny_model
from uptrain.arch import spec_for_config
from uptrain.errors import UptrainError
from uptrain.training import train
from uptrain.training.recipe import load_recipe
from uptrain.training.setup import attention_patterns, trainable_mask

pytestmark = pytest.mark.usefixtures("one_thread")

# The attention module of a decoder layer, written out for three families (the others: checked against the spec)
MODULE = {"llama": "model.layers.{}.self_attn.", "gpt2": "transformer.h.{}.attn.",
          "gpt_neox": "gpt_neox.layers.{}.attention."}


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_attention_is_each_architectures_attention_module(arch):
    """Every K/V tensor, q and o train; nothing outside a layer's attention module does (embeddings, MLPs, norms
    of the layer, the head)."""
    model = tiny_model(arch, heads=4)
    spec = spec_for_config(model.config)
    names = [n for n, _ in model.named_parameters()]
    mask = trainable_mask(names, spec, "attention")
    layers = spec.layers(model.config)
    module = MODULE.get(arch) or attention_patterns(spec)[0].replace("*", "{}", 1).removesuffix("*")
    want = {n for n in names if any(n.startswith(module.format(i)) for i in range(layers))}
    assert {n for n, t in mask.items() if t} == want
    for i in range(layers):
        prefix = spec.layer_prefix.format(i)
        assert {prefix + spec.q + ".weight", prefix + spec.o + ".weight"} <= want
        assert {n for n in names if n.startswith(prefix) and spec.classify(n)[0] == "kv"} <= want
    assert not any(("mlp" in n or "embed" in n or "wte" in n or "lm_head" in n) for n in want)


def test_patterns_from_a_yaml_list_or_one_command_line_string():
    base = {"model": {"path": "m"}, "budget": {"max_steps": 1}}
    r = load_recipe({**base, "train": {"params": ["model.layers.1.*", "lm_head.weight"]}})
    assert r.train.params == ["model.layers.1.*", "lm_head.weight"]
    r = load_recipe(base, ["train.params=*.q_proj.*, *.k_proj.*"])
    assert r.train.params == ["*.q_proj.*", "*.k_proj.*"]
    assert load_recipe(base, ["train.params=attention"]).train.params == "attention"
    assert load_recipe({**base, "train": {"params": None}}).train.params == "all"
    for bad in ("mlp", [], [""], 3):
        with pytest.raises(UptrainError, match=r"^train.params: .* is not one of all, attention, kv \(or a list of "
                                               r"glob patterns"):
            load_recipe({**base, "train": {"params": bad}})


def test_a_pattern_that_selects_nothing_is_refused_before_anything_is_written(models, tmp_path):
    r = recipe(models, tmp_path / "run", train={"params": ["model.layers.*.self_attn.*", "*.self_atn.*"]})
    with pytest.raises(UptrainError) as e:
        train(r)
    msg = str(e.value)
    assert msg.startswith("train.params: '*.self_atn.*' matches no parameter of this model")
    shown = msg.split("the names look like: ")[1].split(", ")
    assert len(shown) >= 4 and set(shown) <= set(weights(models["gqa"]))  # names to copy a pattern from
    assert "'model.layers.*.self_attn.*'" not in msg  # the pattern that matches is not blamed
    assert not (tmp_path / "run").exists()


def test_patterns_train_what_they_name(models, tmp_path):
    res = train(recipe(models, tmp_path / "run", train={"params": ["model.layers.1.mlp.*", "*.q_proj.*"]},
                       budget={"max_steps": 1}))
    a, b = weights(models["gqa"]), weights(tmp_path / "run")
    moved = {k for k in a if not torch.equal(a[k], b[k])}
    assert moved == {k for k in a if k.startswith("model.layers.1.mlp.") or ".q_proj." in k} and moved
    assert res.trainable_parameters == sum(a[k].numel() for k in moved)
    up = record(tmp_path / "run")["uptraining"]
    assert up["params"] == "model.layers.1.mlp.*, *.q_proj.*" and up["trainable_parameters"] == res.trainable_parameters


def test_attention_with_distillation_keeps_the_rest_and_resumes_exactly(models, tmp_path, capsys):
    """Distilled from the MHA source, attention alone trains; the embeddings, MLPs and norms are the start's bit
    for bit; a run stopped after step 2 and resumed ends bit-identical to one that was not stopped."""
    r = recipe(models, tmp_path / "full", train={"params": "attention", "grad_accum": 1},
               distill={"teacher": models["mha"]}, eval={"every": 2}, checkpoint={"every": 2})
    full = train(r)
    start, end = weights(models["gqa"]), weights(tmp_path / "full")
    moved = {k for k in start if not torch.equal(start[k], end[k])}
    attention = {k for k in start if ".self_attn." in k}
    assert moved == attention
    n = sum(start[k].numel() for k in attention)
    assert full.trainable_parameters == n and record(tmp_path / "full")["uptraining"]["trainable_parameters"] == n
    total = sum(t.numel() for t in start.values())
    assert f"training attention (model.layers.*.self_attn.*): {n:,} of {total:,} parameters" in capsys.readouterr().out

    out = tmp_path / "resumed"
    stopped = train({**r, "out": str(out), "budget": {"max_steps": 4, "stop_at": 2}})
    assert not stopped.finished
    rest = train({**r, "out": str(out), "resume": "auto"})
    assert rest.resumed_from == 2 and rest.losses == full.losses
    assert all(torch.equal(v, end[k]) for k, v in weights(out).items())


def test_keep_best_copies_only_the_trainable_weights(models):
    """The best state is a CPU copy of the weights that train (the frozen ones cannot differ from the start)."""
    from transformers import AutoModelForCausalLM

    from uptrain.training.keep_best import BestState

    class OneProcess:  # what BestState asks of accelerate, for one process
        is_main_process, num_processes = True, 1

        def get_state_dict(self, model):
            return model.state_dict()

        def unwrap_model(self, model):
            return model

        def wait_for_everyone(self):
            pass

    model = AutoModelForCausalLM.from_pretrained(models["gqa"])
    mask = trainable_mask([n for n, _ in model.named_parameters()], spec_for_config(model.config), "attention")
    for n, p in model.named_parameters():
        p.requires_grad_(mask[n])
    best = BestState(OneProcess(), enabled=True)
    best.offer(model, {"step": 0, "loss": 1.0})
    assert best.tensors is not None and set(best.tensors) == {n for n, t in mask.items() if t}
    assert all(t.device.type == "cpu" for t in best.tensors.values())


def test_patterns_name_the_models_parameters_not_the_checkpoints_spelling(models, tokenizer, tmp_path):
    """A GPT-NeoX checkpoint stores the head as embed_out.weight (transformers writes it so); the model calls it
    lm_head.weight, which is what a pattern names, and what trains."""
    from tiny_models import save

    folder = tmp_path / "neox"
    save(tiny_model("gpt_neox", heads=4), folder, tokenizer)
    start = weights(folder)
    assert "embed_out.weight" in start and "lm_head.weight" not in start
    res = train(recipe(models, tmp_path / "run", model={"path": str(folder)}, train={"params": ["lm_head.weight"]},
                       budget={"max_steps": 1}))
    end = weights(tmp_path / "run")
    assert res.trainable_parameters == start["embed_out.weight"].numel()
    assert {k for k in start if not torch.equal(start[k], end[k])} == {"embed_out.weight"}
