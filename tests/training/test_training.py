"""The uptraining loop on tiny models and real text (Shakespeare), on CPU: numbers, not exit codes."""
import json
import math
import os
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from model_io import record
from launching import launch
from small_recipes import small_recipe
from tiny_models import save, tiny_config, tiny_model
from uptrain.errors import UptrainError
from uptrain.training import train
from uptrain.training.budget import lr_factor, resolve_budget
from uptrain.training.loop import BlockStream
from uptrain.training.run_folder import latest_checkpoint
from uptrain.training.setup import trainable_mask

from repo_paths import REPO


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tmp_path_factory, tokenizer):
    root = tmp_path_factory.mktemp("models")
    return {"mha": save(tiny_model(), root / "mha", tokenizer),
            "gqa": save(tiny_model(kv_heads=2, seed=1), root / "gqa", tokenizer),
            "cache": str(tmp_path_factory.mktemp("cache"))}


def recipe(models, out, **sections):
    return small_recipe(models["gqa"], out, models["cache"], grad_accum=2, **sections)


@pytest.fixture(scope="module")
def reference(models, tmp_path_factory):
    """4 steps of 2 × 4 blocks: compared with 1 × 8 and with 2 processes × 4."""
    return train(recipe(models, tmp_path_factory.mktemp("ref") / "run"))


# ------------------------------------------------------------------------------------------ pure parts
def test_budget_from_alpha_and_tokens():
    from uptrain.training.recipe import BudgetSection

    b = resolve_budget(BudgetSection(fraction=0.05, pretrain_tokens=2 * 10**12), 8 * 4 * 32 * 4096)
    assert b.steps == 23841 and b.alpha == 0.05 and "23,841 steps" in b.text
    assert resolve_budget(BudgetSection(fraction=0.07, pretrain_steps=100), 1).steps == 7  # 7.000000000000001
    assert resolve_budget(BudgetSection(max_tokens=1000, pretrain_steps=100), 100).alpha == 0.1
    with pytest.raises(UptrainError, match="0 optimiser steps"):
        resolve_budget(BudgetSection(max_tokens=99), 100)


def test_cached_blocks_are_pack_blocks(tokenizer, tmp_path):
    from uptrain.data import DataSpec, load_texts, pack_blocks, token_blocks

    spec = DataSpec(max_documents=1)
    want = pack_blocks(load_texts(spec), tokenizer, 48)
    got = token_blocks(spec, tokenizer, 48, cache_dir=str(tmp_path))
    assert got.dtype == torch.long and torch.equal(got, want)
    files = sorted((tmp_path / "blocks").iterdir())
    stamp = [f.stat().st_mtime_ns for f in files]
    mapped = token_blocks(spec, tokenizer, 48, cache_dir=str(tmp_path), dtype=torch.int32)  # a cache hit
    assert torch.equal(mapped.long(), want) and [f.stat().st_mtime_ns for f in files] == stamp
    assert torch.equal(token_blocks(spec, tokenizer, 48, max_blocks=3, cache_dir=str(tmp_path)), want[:3])
    token_blocks(spec, tokenizer, 40, cache_dir=str(tmp_path))  # another seq_len: another entry
    assert len(list((tmp_path / "blocks").glob("*.json"))) == 3


def test_lr_schedule():
    cos = [lr_factor(s, 10, 2, "cosine", 0.1) for s in range(10)]
    assert cos[:2] == [0.5, 1.0] and cos[2] == 1.0 and cos[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(cos[1:], cos[2:]))
    assert [lr_factor(s, 5, 0, "linear", 0.0) for s in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert {lr_factor(s, 5, 0, "constant", 0.1) for s in range(5)} == {1.0}


def test_block_stream_is_a_pure_function_of_the_index():
    blocks = torch.arange(5).view(5, 1)
    s = BlockStream(blocks, 15, seed=3, shuffle=True)
    order = [int(s[i]) for i in range(15)]
    assert all(sorted(order[e * 5:(e + 1) * 5]) == list(range(5)) for e in range(3))  # every epoch: every block
    assert order[:5] != order[5:10]  # reshuffled per epoch
    assert [int(BlockStream(blocks, 15, 3, True)[i]) for i in (12, 2, 7)] == [order[12], order[2], order[7]]
    assert [int(BlockStream(blocks, 7, 0, False)[i]) for i in range(7)] == [0, 1, 2, 3, 4, 0, 1]


def test_freezing_selects_exactly_what_it_says():
    """Parameter counts per option, from the config's shapes (llama: separate q/k/v/o)."""
    from uptrain.arch import spec_for_config

    model = tiny_model(kv_heads=2)
    cfg, spec = model.config, spec_for_config(model.config)
    named = dict(model.named_parameters())
    d, h, kv, hid, L = 8, 8, 2, 64, cfg.num_hidden_layers
    expect = {"kv": L * 2 * kv * d * hid, "attention": L * (2 * h * d * hid + 2 * kv * d * hid),
              "all": sum(p.numel() for p in named.values())}
    for option, n in expect.items():
        mask = trainable_mask(named, spec, option)
        assert sum(named[k].numel() for k, v in mask.items() if v) == n, option
    # phi3 fuses q, k, v: "kv" must train the fused projection (its K/V rows cannot be split off).
    from transformers import AutoModelForCausalLM

    phi = AutoModelForCausalLM.from_config(tiny_config("phi3", kv_heads=2))
    mask = trainable_mask([n for n, _ in phi.named_parameters()], spec_for_config(phi.config), "kv")
    assert sorted({n.split(".", 3)[3] for n, v in mask.items() if v}) == ["self_attn.qkv_proj.weight"]


# ------------------------------------------------------------------------------------------ training
def test_converted_model_learns_shakespeare(models, tokenizer, tmp_path):
    """The tiny-cpu recipe as shipped: convert MHA → 2 KV heads, then uptrain; loss and held-out
    perplexity go down, and the saved model is the one that was evaluated."""
    from transformers import AutoModelForCausalLM

    from uptrain.training.recipe import load_recipe
    from uptrain.evaluation import perplexity

    out = tmp_path / "run"
    res = train(os.path.join(REPO, "recipes", "tiny-cpu.yaml"),
                [f"out={out}", f"model.path={models['mha']}", f"data.cache_dir={models['cache']}",
                 "log.progress=false"])
    assert res.finished and res.steps == 24 and len(res.losses) == 24 and res.tokens_seen == 24 * 8 * 64
    first, last = res.eval_history[0], res.final_eval
    assert first["step"] == 0 and last["step"] == 24
    assert sum(res.losses[-4:]) / 4 < res.losses[0] - 0.5
    assert last["loss"] < first["loss"] - 0.4, (first, last)

    rec = record(out)
    assert rec["conversion"]["kv_heads_after"] == 2  # kept from step0's record
    up = rec["uptraining"]
    assert up["steps"] == 24 and up["final_eval"] == last and up["initial_eval"] == first
    assert load_recipe(str(out / "recipe.yaml")) == load_recipe(up["recipe"])
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == list(range(1, 25))
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000016", "step_00000024"]

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_key_value_heads == 2
    from uptrain.data import DataSpec, token_blocks

    blocks = token_blocks(DataSpec(max_documents=2), tokenizer, 64, "eval", 16, cache_dir=models["cache"])
    assert perplexity(model, blocks)["loss"] == pytest.approx(last["loss"], abs=1e-5)


def test_resume_reproduces_the_uninterrupted_run(models, tmp_path):
    full = train(recipe(models, tmp_path / "full", budget={"max_steps": 6}, checkpoint={"every": 2}))
    part = train(recipe(models, tmp_path / "part", budget={"max_steps": 6, "stop_at": 3}, checkpoint={"every": 2}))
    assert not part.finished and part.steps == 3 and not (tmp_path / "part" / "model.safetensors").exists()
    assert (tmp_path / "part" / "checkpoints" / "step_00000003").is_dir()
    with pytest.raises(UptrainError, match="already holds another run; set overwrite: true .* or resume: auto"):
        train(recipe(models, tmp_path / "part", budget={"max_steps": 6}, checkpoint={"every": 2}))
    with pytest.raises(UptrainError, match=r"cannot resume .* differs in optim.lr \(0.003 → 0.001\)"):
        train(recipe(models, tmp_path / "part", budget={"max_steps": 6}, checkpoint={"every": 2}, resume="auto",
                     optim={"lr": 1e-3}))
    rest = train(recipe(models, tmp_path / "part", budget={"max_steps": 6}, checkpoint={"every": 2}, resume="auto"))
    assert rest.resumed_from == 3 and rest.finished and len(rest.losses) == 6
    assert max(abs(a - b) for a, b in zip(full.losses, rest.losses)) <= 1e-6
    a, b = load_file(tmp_path / "full" / "model.safetensors"), load_file(tmp_path / "part" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    steps = [json.loads(x)["step"] for x in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps == list(range(1, 7))


def test_accumulation_equals_a_bigger_batch(models, reference, tmp_path):
    big = train(recipe(models, tmp_path / "big", train={"micro_batch_size": 8, "grad_accum": 1}))
    assert reference.tokens_seen == big.tokens_seen
    assert max(abs(a - b) for a, b in zip(reference.losses, big.losses)) < 1e-5
    assert reference.losses[-1] < reference.losses[0]


def test_gradient_checkpointing_changes_memory_not_numbers(models, reference, tmp_path):
    ckpt = train(recipe(models, tmp_path / "gc", train={"gradient_checkpointing": True}))
    assert max(abs(a - b) for a, b in zip(reference.losses, ckpt.losses)) < 1e-5


def test_push_to_hub_is_called_after_training_not_by_the_loop(models, tmp_path, monkeypatch):
    import uptrain.publishing

    calls = []

    class Pushed:
        def summary(self):
            return "pushed"

    monkeypatch.setattr(uptrain.publishing, "push", lambda folder, repo_id: calls.append((folder, repo_id)) or Pushed())
    monkeypatch.setenv("HF_TOKEN", "hf_test")  # push_to_hub needs a token before step 1 (test_reliability.py)
    r = recipe(models, tmp_path / "p", budget={"max_steps": 1}, push_to_hub="me/tiny-gqa")
    res = train(r)  # the training package alone never publishes
    assert calls == [] and res.push_to_hub == "me/tiny-gqa"
    uptrain.train(dict(r, overwrite=True))  # the public API (and the CLI) push a finished run
    assert calls == [(str(tmp_path / "p"), "me/tiny-gqa")]
    assert record(tmp_path / "p")["uptraining"]["steps"] == 1


def test_two_processes_match_one(models, reference, tmp_path):
    """A real `accelerate launch` with 2 gloo ranks × 4 blocks = the single process's 2 × 4 window."""
    import yaml

    r = recipe(models, tmp_path / "ddp", train={"micro_batch_size": 4, "grad_accum": 1})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    p = launch(tmp_path / "r.yaml", timeout=300)
    up = record(tmp_path / "ddp")["uptraining"]
    assert up["processes"] == 2 and up["tokens_seen"] == reference.tokens_seen
    losses = [json.loads(x)["loss"] for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert len(losses) == 4 and max(abs(a - b) for a, b in zip(losses, reference.losses)) < 1e-4
    assert up["final_eval"]["loss"] == pytest.approx(reference.final_eval["loss"], abs=1e-4)
    assert p.stdout.count("Uptrained 4/4 steps") == 1  # only the main process prints


def test_distillation_from_itself_starts_at_zero_kl_and_keeps_the_teacher(models, tmp_path):
    from transformers import AutoModelForCausalLM

    teacher = AutoModelForCausalLM.from_pretrained(models["gqa"])
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    res = train(recipe(models, tmp_path / "kd", distill={"weight": 1.0, "temperature": 2.0}), teacher=teacher)
    kl = [h["kl"] for h in res.history]
    assert kl[0] < 1e-6 and kl[-1] > 1e-4  # the student moved away from a teacher that did not move
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    assert sorted(load_file(tmp_path / "kd" / "model.safetensors")) == sorted(before)  # one model saved
    # through the recipe: same numbers (the teacher loaded from its folder)
    again = train(recipe(models, tmp_path / "kd2", distill={"teacher": models["gqa"], "temperature": 2.0}))
    assert again.losses == pytest.approx(res.losses, abs=1e-6) and again.history[0]["kl"] < 1e-6


def test_distillation_alone_from_itself_leaves_the_student_where_it_is(models, tmp_path):
    """ce_weight 0: the loss is the KL to the teacher alone, 0 when the teacher is the student itself, with a
    gradient of float32 rounding only (AdamW's ε = 1 keeps Adam from scaling that up to full steps). With the
    training text's CE the same run moves the weights 1,000 times as far."""
    start = load_file(os.path.join(models["gqa"], "model.safetensors"))

    def moved(name: str, ce_weight: float) -> float:
        train(recipe(models, tmp_path / name, distill={"teacher": models["gqa"], "ce_weight": ce_weight},
                     optim={"weight_decay": 0.0, "eps": 1.0}, eval={"keep_best": False}))
        after = load_file(tmp_path / name / "model.safetensors")
        return max(float((after[k] - start[k]).abs().max()) for k in start)

    alone, with_ce = moved("kd", 0.0), moved("ce", 1.0)
    assert alone < 1e-3 * with_ce, (alone, with_ce)
    with pytest.raises(UptrainError, match="ce_weight 0 trains on the teacher's distribution alone, and there is no "
                                           "teacher"):
        train(recipe(models, tmp_path / "none", distill={"ce_weight": 0.0}))
    assert not (tmp_path / "none").exists()  # refused before the run's folder is made


@pytest.mark.parametrize("params", ["kv", "attention"])
def test_frozen_weights_do_not_move(models, tmp_path, params):
    res = train(recipe(models, tmp_path / params, train={"params": params}, budget={"max_steps": 1}))
    a = load_file(os.path.join(models["gqa"], "model.safetensors"))
    b = load_file(tmp_path / params / "model.safetensors")
    moved = {k for k in a if not torch.equal(a[k], b[k])}
    want = {"kv": ("k_proj", "v_proj"), "attention": ("self_attn",)}[params]
    assert moved == {k for k in a if any(w in k for w in want)}
    assert res.trainable_parameters == sum(a[k].numel() for k in moved)


def test_prebuilt_blocks_constant_lr_and_repeated_calls(models, tokenizer, tmp_path, capsys):
    """What the demo does: its own tokenizer and blocks, a constant lr, many calls in one process
    (here with different mixed precision settings, which accelerate's global state would reject)."""
    from uptrain.data import pack_blocks

    texts = ["To be, or not to be, that is the question. " * 40, "Now is the winter of our discontent. " * 40]
    blocks = pack_blocks(texts, tokenizer, 32)
    r = recipe(models, tmp_path / "a", optim={"schedule": "constant", "lr": 1e-3}, budget={"max_steps": 2},
               data={"source": "/nonexistent/never-read.txt"})
    one = train(r, tokenizer=tokenizer, train_blocks=blocks[:-2], eval_blocks=blocks[-2:])
    assert {h["lr"] for h in one.history} == {1e-3}
    two = train({**r, "out": str(tmp_path / "b"), "train": {**r["train"], "mixed_precision": "bf16"}},
                tokenizer=tokenizer, train_blocks=blocks[:-2], eval_blocks=blocks[-2:])
    assert two.losses[0] == pytest.approx(one.losses[0], rel=2e-2) and two.final_eval["tokens"] == 2 * 31
    said = capsys.readouterr().out
    assert "strategy: one process on cpu; the final" in said and "strategy: one process on cpu; bf16 autocast" in said


@pytest.mark.parametrize("device, mixed, bf16_instructions, says", [
    ("cpu", "no", False, None),
    ("cuda", "bf16", False, None),                      # a GPU: nothing to say
    ("cpu", "bf16", True, None),                        # AVX512-BF16 / AMX: bf16 is the fast path
    ("cpu", "bf16", False, "train.mixed_precision=no"),  # emulated bf16
    ("cpu", "fp16", True, "train.mixed_precision=bf16"),  # fp16 is emulated on CPU whatever the instructions
])
def test_half_precision_on_cpu_is_questioned_where_it_is_slow(device, mixed, bf16_instructions, says):
    from uptrain.training.setup import cpu_half_note

    note = cpu_half_note(device, mixed, bf16_instructions)
    assert (note is None) if says is None else (says in note)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(models, tmp_path, capsys):
    from uptrain.cli import main

    out = tmp_path / "nan"
    r = recipe(models, out, optim={"lr": 1e30, "grad_clip": 0.0}, checkpoint={"every": 1, "keep": 5},
               budget={"max_steps": 8})
    import yaml

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    assert main(["train", str(tmp_path / "r.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    m = re.search(r"the loss became (nan|inf) at step (\d+); stopped before updating the weights, the last good "
                  r"checkpoint is (\S+):", err)
    assert m, err
    k = int(m.group(2))  # weights of ~1e30 overflow a step or two after the first update
    assert 2 <= k <= 4 and m.group(3) == str(out / "checkpoints" / f"step_{k - 1:08d}")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [x for x in lines if "loss" in x]  # the steps (the others: keep_best's evaluation at step 0)
    assert [x["step"] for x in lines if "eval_loss" in x] == [0]
    assert [x["step"] for x in logged] == list(range(1, k)) and all(math.isfinite(x["loss"]) for x in logged)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [f"step_{i:08d}" for i in range(1, k)]
    state = json.loads((out / "checkpoints" / f"step_{k - 1:08d}" / "trainer_state.json").read_text())
    assert state["step"] == k - 1 and [h["loss"] for h in state["history"]] == [x["loss"] for x in logged]
    assert not (out / "model.safetensors").exists() and not (out / "uptrain.json").exists()


# ------------------------------------------------------------------------------------------ bad input
def run_cli(*args):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", "uptrain", "train", *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_recipe_mistakes_through_the_real_cli(models, tmp_path):
    """Errors found before anything heavy is imported: one line, exit 2, nothing written."""
    import yaml

    f = tmp_path / "r.yaml"
    f.write_text(yaml.safe_dump(recipe(models, tmp_path / "out")))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "recipe.yaml").write_text("out: x\n")
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "notes.txt").write_text("precious")
    cases = [
        ((str(tmp_path / "missing.yaml"),), "recipe not found"),
        ((str(f), "optim.lrr=1"), "unknown key 'optim.lrr' in the recipe; did you mean optim.lr?"),
        ((str(f), "train.params=mlp"), "train.params: 'mlp' is not one of all, attention, kv"),
        ((str(f), "budget.max_steps=0"), "the budget gives 0 optimiser steps (max_steps = 0)"),
        ((str(f), "budget.max_steps=null", "budget.fraction=0.0001", "budget.pretrain_steps=100"),
         "the budget gives 0 optimiser steps (α = 0.0001 × 100 pre-training steps)"),
        ((str(f), f"out={tmp_path / 'busy'}"), "already holds another run; set overwrite: true"),
        ((str(f), f"out={tmp_path / 'home'}", "overwrite=true"), "is not an uptrain run (no recipe.yaml); refusing"),
    ]
    for args, message in cases:
        p = run_cli(*args)
        assert p.returncode == 2 and p.stderr.startswith("uptrain train: error: "), (args, p.stderr)
        assert message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "out").exists() and (tmp_path / "home" / "notes.txt").read_text() == "precious"
    assert os.listdir(tmp_path / "busy") == ["recipe.yaml"]


def test_model_data_and_teacher_mistakes_through_the_cli(models, tokenizer, tmp_path, capsys):
    """Errors that need the model or the data (the CLI's main(), in-process to spare 10 s of imports per
    case): one message, exit 2, no output folder."""
    import yaml
    from transformers import BloomConfig, BloomForCausalLM

    from uptrain.cli import main

    # a causal LM the attention table does not know (ALiBi, fused heads)
    bloom = save(BloomForCausalLM(BloomConfig(hidden_size=32, n_layer=1, n_head=2, vocab_size=512)),
                 tmp_path / "bloom", tokenizer)
    big_vocab = save(tiny_model(vocab=600), tmp_path / "v600", tokenizer)
    (tmp_path / "short.txt").write_text("Too short.")
    cases = [
        ({"model": {"path": str(tmp_path / "nowhere")}}, "model.path '%s' not found" % (tmp_path / "nowhere")),
        ({"model": {"path": bloom}}, "architecture 'bloom' is not supported yet"),
        ({"model": {"path": models["mha"], "convert": {"groups": 3}}}, "model.convert.groups 3 does not divide the source's 8"),
        ({"data": {"source": str(tmp_path / "short.txt"), "eval_files": str(tmp_path / "short.txt")}},
         "fewer tokens than one block of seq_len=32"),
        ({"distill": {"teacher": big_vocab}}, "has a vocabulary of 600 tokens, the student 512"),
        ({"log": {"trackers": ["nonsense"]}}, "Unsupported logging capability: nonsense"),
    ]
    for i, (over, message) in enumerate(cases):
        r = recipe(models, tmp_path / f"out{i}", **over)
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
        assert main(["train", str(tmp_path / "r.yaml")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("uptrain train: error: ") and message in err[-1], (over, err)
        assert not (tmp_path / f"out{i}").exists()


@pytest.mark.slow
def test_kill_9_loses_only_the_steps_since_the_last_checkpoint(models, tokenizer, tmp_path):
    """A real `kill -9` in the middle of a CLI run; resume: auto then gives the uninterrupted run's losses."""
    import signal
    import time

    import yaml

    big = save(tiny_model(hidden=128, layers=4, kv_heads=2, seed=2), tmp_path / "big", tokenizer)
    over = dict(model={"path": big}, budget={"max_steps": 400}, checkpoint={"every": 5, "keep": 2},
                train={"micro_batch_size": 4, "grad_accum": 1})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe(models, tmp_path / "killed", **over)))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    p = subprocess.Popen([sys.executable, "-m", "uptrain", "train", str(tmp_path / "r.yaml")], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, t0 = tmp_path / "killed" / "metrics.jsonl", time.time()
    while p.poll() is None and time.time() - t0 < 600:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 13:
            break
        time.sleep(0.02)
    assert p.poll() is None, "the run ended before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    done = len([x for x in metrics.read_text().splitlines() if '"loss"' in x])
    last = latest_checkpoint(tmp_path / "killed")  # a .tmp one a kill interrupted does not count
    assert last and done - 5 <= int(last.name.split("_")[1]) <= done
    rest = train(recipe(models, tmp_path / "killed", resume="auto", **over))
    full = train(recipe(models, tmp_path / "full", **over))
    assert rest.resumed_from <= done and len(rest.losses) == 400
    assert max(abs(a - b) for a, b in zip(full.losses, rest.losses)) <= 1e-6
