"""eval.keep_best: uptraining never leaves a model worse than it started. Held-out loss is judged at step 0 and at
every eval.every; a run whose last state is worse saves the best one (the start itself, bit for bit, when nothing
beat it) and says so, also after a resume and on 2 ranks. Real runs of the CLI, the API and `accelerate launch` on
a tiny Llama; the learning rates are planted: 0.3 makes every step of a trained start worse (held-out loss 5.2 →
about 12), 0.03 takes a random start lower for a few steps, then higher."""
import json
import math
import re
from pathlib import Path

import pytest
import torch
import yaml
from launching import launch
from model_io import record, weights
from test_training import models, recipe, run_cli  # noqa: F401  (the same tiny models, recipe and CLI runner)

from uptrain.training import train

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 8
HARMFUL = {"lr": 0.3, "warmup_steps": 0, "schedule": "constant"}
ROUGH = {"lr": 0.03, "warmup_steps": 0, "schedule": "constant"}


@pytest.fixture(scope="module")
def trained(models, tmp_path_factory) -> str:
    """A start worth keeping: the tiny GQA model after 16 steps at a sane rate."""
    out = tmp_path_factory.mktemp("trained") / "run"
    train(recipe(models, out, budget={"max_steps": 16}, optim={"lr": 1e-2}))
    return str(out)


def bit_identical(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def cli_run(models, start: str, out: Path, optim: dict, *overrides: str):
    r = recipe(models, out, model={"path": start}, budget={"max_steps": STEPS}, optim=optim)
    (out.parent / "r.yaml").write_text(yaml.safe_dump(r))
    p = run_cli(str(out.parent / "r.yaml"), *overrides)
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout, record(out)["uptraining"]


def test_a_harmful_learning_rate_saves_the_start_model_unchanged(models, trained, tmp_path):
    out = tmp_path / "run"
    said, up = cli_run(models, trained, out, HARMFUL)
    start, last = up["eval_history"][0], up["eval_history"][-1]
    assert start["step"] == 0 and last["step"] == STEPS and last["loss"] > start["loss"]  # the rate did harm
    assert (f"keep_best: the held-out loss never went below the start's ({start['loss']:.4f} at step 0, "
            f"{last['loss']:.4f} after step {STEPS}): the saved model is the one the run started from, "
            f"unchanged\n") in said
    assert said.count("keep_best:") == 1 and f"held-out perplexity {start['perplexity']:.2f} (the start's, kept by keep_best)" in said
    assert bit_identical(weights(out), weights(trained))
    assert up["kept_step"] == 0 and up["final_eval"] == start and up["steps"] == STEPS

    off = tmp_path / "off"
    said, up = cli_run(models, trained, off, HARMFUL, "eval.keep_best=false")
    assert "keep_best" not in said and up["kept_step"] is None and up["final_eval"]["step"] == STEPS
    assert not bit_identical(weights(off), weights(trained))  # what the run would have saved


def test_the_best_earlier_state_is_saved_and_a_resume_keeps_it(models, tmp_path, capsys):
    """0.03 lowers held-out loss for a few steps, then raises it: the lowest state is saved; it equals a run that
    stopped there, and a run stopped after it and resumed (the best state travels in the checkpoint) ends the same."""
    r = recipe(models, tmp_path / "full", budget={"max_steps": STEPS}, optim=ROUGH, eval={"every": 1},
               train={"grad_accum": 1})
    full = train(r)
    losses = [e["loss"] for e in full.eval_history]
    k = min(range(len(losses)), key=losses.__getitem__)
    assert 0 < k < 6 and losses[-1] > losses[k]  # the planted shape: better for a while, worse at the end
    assert full.kept_step == k and full.final_eval == full.eval_history[k]
    assert (tmp_path / "full" / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # the run plots its curves
    assert (f"keep_best: the held-out loss was lowest after step {k} ({losses[k]:.4f}; {losses[-1]:.4f} after step "
            f"{STEPS}): the saved model is the state after step {k}\n") in capsys.readouterr().out

    there = train({**r, "out": str(tmp_path / "there"), "budget": {"max_steps": k}})
    assert there.kept_step is None and bit_identical(weights(tmp_path / "full"), weights(tmp_path / "there"))

    out = tmp_path / "resumed"
    stopped = train({**r, "out": str(out), "budget": {"max_steps": STEPS, "stop_at": 6}, "checkpoint": {"every": 2}})
    assert not stopped.finished
    ckpt = out / "checkpoints" / "step_00000006"
    assert (ckpt / "best_state.safetensors").is_file()  # step k's weights: neither the start nor step 6
    assert json.loads((ckpt / "trainer_state.json").read_text())["best"]["step"] == k
    rest = train({**r, "out": str(out), "resume": "auto", "checkpoint": {"every": 2}})
    assert rest.resumed_from == 6 and rest.kept_step == k and rest.final_eval == full.final_eval
    assert bit_identical(weights(out), weights(tmp_path / "full"))


def test_a_resume_after_a_harmful_start_still_saves_the_start(models, trained, tmp_path):
    """The best state is the start: the checkpoint carries only its loss, and the resumed run takes the start's
    weights from model.path before loading the checkpoint."""
    r = recipe(models, tmp_path / "run", model={"path": trained}, budget={"max_steps": STEPS, "stop_at": 4},
               optim=HARMFUL, checkpoint={"every": 2})
    train(r)
    assert not (tmp_path / "run" / "checkpoints" / "step_00000004" / "best_state.safetensors").exists()
    rest = train({**r, "resume": "auto", "budget": {"max_steps": STEPS}})
    assert rest.resumed_from == 4 and rest.kept_step == 0 and math.isfinite(rest.final_eval["loss"])
    assert bit_identical(weights(tmp_path / "run"), weights(trained))


@pytest.mark.slow
def test_two_ranks_agree_and_save_the_start(models, trained, tmp_path):
    """`accelerate launch` on 2 ranks: held-out loss is reduced over both, one decision, one message."""
    out = tmp_path / "run"
    r = recipe(models, out, model={"path": trained}, budget={"max_steps": 4}, optim=HARMFUL)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    p = launch(tmp_path / "r.yaml", timeout=300)
    assert len(re.findall(r"keep_best: the held-out loss never went below the start's", p.stdout)) == 1, p.stdout
    assert bit_identical(weights(out), weights(trained))
    up = record(out)["uptraining"]
    assert up["kept_step"] == 0 and up["processes"] == 2


def test_the_curves_plot_the_losses_and_mark_the_kept_state():
    """OUT/curves.png's figure, read back from its lines: training CE and KL per step, held-out loss per evaluation,
    the saved state starred; no held-out panel without evaluations."""
    from uptrain.plots import training_figure

    history = [{"step": 1, "loss": 3.0, "kl": 0.5}, {"step": 2, "loss": 2.5, "kl": 0.4}, {"step": 3, "loss": 2.7}]
    evals = [{"step": 0, "loss": 2.9}, {"step": 2, "loss": 2.4}, {"step": 3, "loss": 2.6}]
    left, right = training_figure(history, evals, kept_step=2).axes
    lines = {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ax in (left, right) for ln in ax.lines}
    assert lines == {"training CE": ([1, 2, 3], [3.0, 2.5, 2.7]), "KL to the teacher": ([1, 2], [0.5, 0.4]),
                     "held-out loss": ([0, 2, 3], [2.9, 2.4, 2.6]), "saved: step 2": ([2], [2.4])}
    assert len(training_figure(history, [], kept_step=None).axes) == 1
