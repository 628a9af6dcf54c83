"""Never lose a run: what the end of a run needs is checked before step 1 (free disk, a model that can be
saved, a writable OUT, a Hub repo and token), a signal stops every rank after the current step with a
checkpoint, a half-written checkpoint is never resumed from, and a failed final save keeps the trained state.
Every run is a real one on a tiny model; "exact" means weights within 1e-6 of an uninterrupted run.
(Transient Hub errors on push: tests/publishing/test_hub.py.)"""
import errno
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from launching import launch, launch_cmd, launch_env
from model_io import record, weights
from safetensors.torch import load_file, save_file
from test_training import models, recipe  # noqa: F401  (the same tiny models and recipe)

from uptrain.checkpoint import quantization
from uptrain.errors import UptrainError
from uptrain.report import fmt_bytes, fmt_count
from uptrain.training import train
from uptrain.training.loop import Loop
from uptrain.training.preemption import PREEMPTED_EXIT, Preempted
from uptrain.training.run_folder import latest_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 6


def same_weights(a, b) -> float:
    """Largest difference between the final model.safetensors of two runs."""
    x, y = weights(a), weights(b)
    assert sorted(x) == sorted(y)
    return max((x[k] - y[k]).abs().max().item() for k in x)


@pytest.fixture(scope="module")
def full(models, tmp_path_factory):
    """The uninterrupted run every interrupted one must reproduce."""
    out = tmp_path_factory.mktemp("full") / "run"
    return out, train(recipe(models, out, budget={"max_steps": STEPS}, checkpoint={"every": 2}))


def with_config(src, folder: Path, **entries) -> str:
    """A copy of the checkpoint folder `src` whose config.json carries `entries` too."""
    shutil.copytree(src, folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **entries}))
    return str(folder)


# ------------------------------------------------------------------------------------------ saveable model
def test_a_leftover_quantization_config_trains_and_saves(models, tmp_path, capsys):
    """The reported case: plain float weights whose config.json still says quant_method gguf. transformers alone
    loads a quantizer and refuses to save after the run; uptrain drops the leftover with a note."""
    from transformers import AutoModelForCausalLM

    src = with_config(models["gqa"], tmp_path / "src", quantization_config={"quant_method": "gguf"})
    # 5.24 says "quantized with gguf", 5.19 "quantized with QuantizationMethod.GGUF"
    with pytest.raises(ValueError, match=r"(?i)is quantized with \S*gguf and is not serializable"):
        AutoModelForCausalLM.from_pretrained(src).save_pretrained(tmp_path / "plain")  # what the user hit
    assert quantization(Path(src)).leftover

    res = train(recipe(models, tmp_path / "run", model={"path": src}, budget={"max_steps": 2}))
    out = capsys.readouterr().out
    assert res.finished and "carries a quantization_config (quant_method 'gguf') but every weight is a plain " \
                             "float tensor: a leftover, dropped" in out
    assert "quantization_config" not in json.loads((tmp_path / "run" / "config.json").read_text())
    AutoModelForCausalLM.from_pretrained(tmp_path / "run").save_pretrained(tmp_path / "again")  # saveable

    mha = with_config(models["mha"], tmp_path / "mha", quantization_config={"quant_method": "gguf"})
    res = train(recipe(models, tmp_path / "conv", model={"path": mha, "convert": {"groups": 2}},
                       budget={"max_steps": 1}))
    assert res.finished and "a leftover, dropped" in capsys.readouterr().err  # said by the converter
    for folder in ("step0", "."):
        assert "quantization_config" not in json.loads((tmp_path / "conv" / folder / "config.json").read_text())


def gptq_like(src, folder: Path) -> str:
    """The tiny model with its q_proj weights replaced by GPTQ's packed int32 qweight + scales/qzeros/g_idx."""
    folder.mkdir()
    for f in Path(src).iterdir():
        if f.name != "model.safetensors":
            shutil.copy(f, folder / f.name)
    tensors = {}
    for name, t in load_file(Path(src) / "model.safetensors").items():
        if name.endswith("q_proj.weight"):
            base, (rows, cols) = name[:-len(".weight")], t.shape
            tensors |= {f"{base}.qweight": torch.zeros(cols // 8, rows, dtype=torch.int32),
                        f"{base}.qzeros": torch.zeros(1, rows // 8, dtype=torch.int32),
                        f"{base}.scales": torch.ones(1, rows, dtype=torch.float16),
                        f"{base}.g_idx": torch.zeros(cols, dtype=torch.int32)}
        else:
            tensors[name] = t
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": -1}
    (folder / "config.json").write_text(json.dumps(cfg))
    return str(folder)


def test_a_quantized_checkpoint_is_refused_before_step_1_and_before_convert_writes(models, tmp_path):
    import uptrain

    src = gptq_like(models["gqa"], tmp_path / "gptq")
    q = quantization(Path(src))
    assert q.quantized and q.method == "gptq" and len(q.evidence) == 2 * 4  # 2 layers × qweight, qzeros, scales, g_idx
    message = (r"model.path '.*gptq' is a quantized checkpoint \(quant_method 'gptq'; tensors "
               r"model.layers.0.self_attn.q_proj.g_idx \(I32\), .*qweight \(I32\), .* and 5 more\); .*dequantize first")
    with pytest.raises(UptrainError, match=message):
        train(recipe(models, tmp_path / "run", model={"path": src}))
    with pytest.raises(UptrainError, match=r"source '.*gptq' is a quantized checkpoint .* dequantize first"):
        uptrain.convert(src, str(tmp_path / "conv"), groups=1)
    assert not (tmp_path / "run").exists() and not (tmp_path / "conv").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["gptq"]  # no hidden half-written folder either
    # bitsandbytes-style weights (uint8) whose config lost its quantization_config: the tensors decide
    sd = load_file(Path(models["gqa"]) / "model.safetensors")
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(10, dtype=torch.uint8)
    (tmp_path / "bnb").mkdir()
    shutil.copy(Path(models["gqa"]) / "config.json", tmp_path / "bnb")
    save_file(sd, tmp_path / "bnb" / "model.safetensors")
    q = quantization(tmp_path / "bnb")
    assert q.method is None and q.evidence == ("model.layers.0.mlp.up_proj.weight (U8)",)
    assert quantization(Path(models["gqa"])) == quantization(Path(models["gqa"])).__class__(None, ())


# ------------------------------------------------------------------------------------------ disk, folder, Hub
def test_too_little_disk_is_refused_before_step_1_with_the_estimate(models, tmp_path, monkeypatch):
    import uptrain

    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
    p = sum(t.numel() for t in load_file(Path(models["gqa"]) / "model.safetensors").values())
    kv = sum(t.numel() for k, t in load_file(Path(models["gqa"]) / "model.safetensors").items()
             if k.endswith(("k_proj.weight", "v_proj.weight")))
    ck = {"every": 2, "keep": 2}  # 6 steps: 3 saves, at most keep + 1 = 3 checkpoints at once
    with pytest.raises(UptrainError) as e:
        train(recipe(models, tmp_path / "run", budget={"max_steps": STEPS}, checkpoint=ck))
    need = 4 * p + 3 * (4 * p + 8 * p) + (64 << 20)
    assert str(e.value) == (
        f"not enough free disk for final model {fmt_bytes(4 * p)} ({fmt_count(p)} parameters × 4 bytes, float32) + "
        f"3 checkpoints {fmt_bytes(36 * p)} ({fmt_bytes(12 * p)} each: the weights + AdamW: 2 float32 moments for "
        f"{fmt_count(p)} trainable parameters) + small files 64 MiB (tokenizer, records, metrics): 1 MiB free on "
        f"{tmp_path}, about {fmt_bytes(need)} needed; free space, lower checkpoint.keep, or choose an `out` on a "
        f"larger disk")
    ckpt = 2 * p + 2 * 2 * kv  # training in bfloat16, moments for the K/V projections only; saved as the source
    with pytest.raises(UptrainError, match=rf"final model {fmt_bytes(4 * p)} \({fmt_count(p)} parameters × 4 bytes, "
                                           rf"float32\) \+ 1 checkpoint {fmt_bytes(ckpt)} \({fmt_bytes(ckpt)} each: "
                                           rf"the weights \+ AdamW: 2 bfloat16 moments for {fmt_count(kv)} "):
        train(recipe(models, tmp_path / "run", model={"dtype": "bfloat16"}, train={"params": "kv"},
                     checkpoint={"every": 0}))  # no periodic checkpoint: room for one (a preemption's)
    with pytest.raises(UptrainError, match=rf"final model {fmt_bytes(2 * p)} \({fmt_count(p)} parameters × 2 bytes, "
                                           rf"bfloat16\)"):
        train(recipe(models, tmp_path / "run", train={"save_dtype": "bfloat16"}))
    # A conversion of the 8-KV-head model to G = 2: step0 and the final model count the converted K/V rows (the
    # gqa model's p parameters), not the source's.
    mha = sum(t.numel() for t in load_file(Path(models["mha"]) / "model.safetensors").values())
    assert fmt_bytes(4 * mha) != fmt_bytes(4 * p)
    with pytest.raises(UptrainError, match=rf"final model {fmt_bytes(4 * p)} .* the converted step0 "
                                           rf"{fmt_bytes(4 * p)} \(in the source dtypes\)"):
        train(recipe(models, tmp_path / "run", model={"path": models["mha"], "convert": {"groups": 2}}))
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=100 << 10))  # < the 529 KiB model
    with pytest.raises(UptrainError, match=rf"not enough free disk for the converted model \(\d+ tensors, "
                                           rf"{fmt_bytes(4 * p)}\): 100 KiB free"):
        uptrain.convert(models["mha"], str(tmp_path / "conv"), groups=2)
    assert os.listdir(tmp_path) == []


def test_an_unwritable_out_is_refused_before_step_1(models, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UptrainError, match=rf"out '.*file/run' cannot be created: {tmp_path / 'file'} is a file"):
        train(recipe(models, tmp_path / "file" / "run"))

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr("tempfile.mkstemp", denied)  # what a read-only folder does (root ignores chmod)
    with pytest.raises(UptrainError, match=rf"out '.*run' cannot be written \({tmp_path}: Permission denied\)"):
        train(recipe(models, tmp_path / "run"))
    assert sorted(os.listdir(tmp_path)) == ["file"]


def _whoami(monkeypatch, answer):
    import huggingface_hub

    def whoami(self, token=None, **kw):
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(huggingface_hub.HfApi, "whoami", whoami)


def test_push_to_hub_needs_a_valid_repo_and_a_token_before_step_1(models, tmp_path, monkeypatch, capsys):
    import huggingface_hub
    from hub_errors import http_error

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    cases = [("a/b/c", None, "push_to_hub 'a/b/c' is not a Hub repo id"),
             ("me/x", None, "push_to_hub: me/x needs a Hugging Face token with write access, and none was found"),
             ("me/x", http_error(huggingface_hub.errors.HfHubHTTPError, 401),
              "push_to_hub: the Hub rejected the Hugging Face token (401): it is invalid or expired"),
             ("me/x", {"auth": {"accessToken": {"role": "read"}}}, "push_to_hub: the Hugging Face token is read-only")]
    for repo, whoami, message in cases:
        if whoami is not None:
            monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_x")
            _whoami(monkeypatch, whoami)
        with pytest.raises(UptrainError, match=message.replace("(", r"\(").replace(")", r"\)")):
            train(recipe(models, tmp_path / "run", push_to_hub=repo))
        assert not (tmp_path / "run").exists()
    _whoami(monkeypatch, huggingface_hub.errors.OfflineModeIsEnabled("offline"))  # cannot ask: say so, train
    assert train(recipe(models, tmp_path / "run", push_to_hub="me/x", budget={"max_steps": 1})).finished
    assert "push_to_hub: the token could not be checked (OfflineModeIsEnabled)" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ preemption
def signal_at(monkeypatch, step: int, signum: int):
    """Send `signum` to this process while step `step` is being recorded (inside the optimiser step)."""
    record = Loop.record

    def record_and_signal(self, rec, s):
        record(self, rec, s)
        if s == step and "loss" in rec:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(Loop, "record", record_and_signal)


@pytest.mark.parametrize("how, signum", [("api", signal.SIGINT), ("cli", signal.SIGTERM)], ids=["api-SIGINT", "cli-SIGTERM"])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resumes_exactly(models, full, tmp_path, monkeypatch,
                                                                             capsys, how, signum):
    import yaml

    from uptrain.cli import main

    out = tmp_path / "run"
    r = recipe(models, out, budget={"max_steps": STEPS})  # checkpoint.every 0: only the signal saves
    before = signal.getsignal(signum)
    signal_at(monkeypatch, 3, signum)
    name = signal.Signals(signum).name
    message = (f"{name} after step 3 of {STEPS}; the state is saved in {out / 'checkpoints' / 'step_00000003'}. "
               f"Continue exactly where it stopped with resume: auto (`uptrain train {out / 'recipe.yaml'} "
               f"resume=auto`)")
    if how == "api":
        with pytest.raises(Preempted) as e:
            train(r)
        assert str(e.value) == message and e.value.step == 3 and e.value.exit_status == PREEMPTED_EXIT == 75
    else:
        (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
        assert main(["train", str(tmp_path / "r.yaml")]) == PREEMPTED_EXIT
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"uptrain train: stopped: {message}"
    assert signal.getsignal(signum) is before  # the handler is train()'s only
    assert latest_checkpoint(out).name == "step_00000003" and not (out / "model.safetensors").exists()
    monkeypatch.undo()
    rest = train({**r, "resume": "auto"})
    assert rest.resumed_from == 3 and rest.finished
    assert max(abs(a - b) for a, b in zip(rest.losses, full[1].losses)) <= 1e-6
    assert same_weights(out, full[0]) <= 1e-6


def test_stop_signal_flags_a_signal_once_and_a_second_ctrl_c_aborts():
    from uptrain.training.preemption import StopSignal

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # forwarded again by a launcher: nothing more happens
        assert stop.signum == signal.SIGTERM
    with StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # (the handler runs at the next bytecode; never reached)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def steps_logged(metrics: Path) -> list[int]:
    """The optimiser steps in metrics.jsonl (its other lines are held-out evaluations, keep_best's at step 0)."""
    steps = []
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        try:
            rec = json.loads(line)
        except ValueError:  # the line a running launch is writing
            continue
        if "loss" in rec:
            steps.append(rec["step"])
    return steps


def signalled_launch(tmp_path: Path, recipe_file: Path, send) -> tuple[int, str, int]:
    """Start a 2-rank launch in its own process group, call send(launcher) once 5 steps are logged, and return
    (launcher exit status, its stderr, the steps logged when the signal went)."""
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(tmp_path / "stderr", "w") as se:
        p = subprocess.Popen(launch_cmd(recipe_file), env=launch_env(), stdout=subprocess.DEVNULL, stderr=se,
                             start_new_session=True)
        t0 = time.time()
        while p.poll() is None and time.time() - t0 < 300:
            if len(steps_logged(metrics)) >= 5:
                break
            time.sleep(0.02)
        assert p.poll() is None, "the run ended before it could be signalled"
        logged = len(steps_logged(metrics))
        send(p)
        status = p.wait(timeout=120)
    return status, (tmp_path / "stderr").read_text(), logged


def stopped_step(tmp_path: Path, err: str, logged: int) -> int:
    """The step both ranks stopped after: said once (by the main process), checkpointed, nothing logged past it."""
    stopped = [line for line in err.splitlines() if line.startswith("uptrain train: stopped: SIGTERM after step ")]
    assert len(stopped) == 1, err[-3000:]
    step = int(stopped[0].split("SIGTERM after step ")[1].split()[0])
    done = steps_logged(tmp_path / "run" / "metrics.jsonl")
    assert done == list(range(1, step + 1)) and logged <= step < 40  # no step lost: all up to `step` are kept
    ckpt = latest_checkpoint(tmp_path / "run")
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert ckpt.name == f"step_{step:08d}" and state["processes"] == 2
    assert "random_states_1.pkl" in state["files"]  # both ranks' states were written
    return step


LAUNCH_OVER = dict(budget={"max_steps": 40}, train={"micro_batch_size": 4, "grad_accum": 1})


@pytest.mark.slow
def test_sigterm_to_a_two_rank_launch_stops_both_ranks_at_one_step(models, tmp_path):
    """A scheduler's SIGTERM to the process group of a real 2-rank `accelerate launch`: torch's agent forwards
    it to the ranks (they run in their own sessions), both stop after the same step with one checkpoint, and
    `resume=auto` ends with the weights of an uninterrupted 2-rank run."""
    import yaml

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe(models, tmp_path / "run", **LAUNCH_OVER)))
    (tmp_path / "f.yaml").write_text(yaml.safe_dump(recipe(models, tmp_path / "full", **LAUNCH_OVER)))
    status, err, logged = signalled_launch(tmp_path, tmp_path / "r.yaml", lambda p: os.killpg(p.pid, signal.SIGTERM))
    step = stopped_step(tmp_path, err, logged)
    # torch's agent re-raises the signal it got itself (the ranks exit 75): as an error (exit 1), or, in the agent
    # of torch 2.13 under accelerate 1.16, as the shell's code for a SIGTERM death (128 + 15)
    assert status in (1, 128 + signal.SIGTERM)

    rest = launch(tmp_path / "r.yaml", "resume=auto")
    assert f"resuming from {tmp_path / 'run' / 'checkpoints' / f'step_{step:08d}'} at step {step}" in rest.stdout
    launch(tmp_path / "f.yaml")
    assert same_weights(tmp_path / "run", tmp_path / "full") <= 1e-6


@pytest.mark.slow
def test_sigterm_to_one_rank_stops_the_other_at_the_same_step(models, tmp_path):
    """SIGTERM to rank 1 alone: rank 0, never signalled, learns it from the per-step all-reduce, saves with it and
    says so. The first rank to leave exits 75 (torch's agent reports it, then ends the other, whose state is
    already saved: both pass the barrier at the end of the checkpoint before either leaves)."""
    import yaml

    def rank(pid: str) -> int:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        return int(next(e for e in env if e.startswith(b"RANK=")).split(b"=")[1])

    def signal_rank_1(p):
        kids = subprocess.run(["ps", "--ppid", str(p.pid), "-o", "pid="], capture_output=True, text=True).stdout
        os.kill(next(int(k) for k in kids.split() if rank(k) == 1), signal.SIGTERM)

    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe(models, tmp_path / "run", **LAUNCH_OVER)))
    status, err, logged = signalled_launch(tmp_path, tmp_path / "r.yaml", signal_rank_1)
    stopped_step(tmp_path, err, logged)
    assert status == 1 and re.search(r"failed \(exitcode: 75\) local_rank: [01]", err), err[-3000:]


# ------------------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize("damage", ["model.safetensors", "optimizer.bin", "model.safetensors, no manifest"])
def test_a_damaged_newest_checkpoint_is_passed_over(models, full, tmp_path, capsys, damage):
    """A kill while a checkpoint is saved leaves step_N.tmp, never resumed from (test_training's kill -9 test);
    here the newest checkpoint is complete by name but truncated afterwards."""
    out = tmp_path / "run"
    r = recipe(models, out, budget={"max_steps": STEPS, "stop_at": 4}, checkpoint={"every": 1, "keep": 3})
    train(r)
    newest = out / "checkpoints" / "step_00000004"
    f = newest / damage.split(",")[0]
    size = f.stat().st_size
    f.write_bytes(f.read_bytes()[: size // 2])
    if "no manifest" in damage:  # a checkpoint written before manifests: the safetensors header still tells
        state = json.loads((newest / "trainer_state.json").read_text())
        del state["files"]
        (newest / "trainer_state.json").write_text(json.dumps(state))
        why = "model.safetensors is truncated or corrupt"
    else:
        why = f"{f.name} has {size // 2:,} bytes, {size:,} were written"
    capsys.readouterr()
    rest = train({**r, "resume": "auto", "budget": {"max_steps": STEPS}})
    assert f"step_00000004 is incomplete ({why}); resuming from step_00000003\n" in capsys.readouterr().out
    assert rest.resumed_from == 3 and same_weights(out, full[0]) <= 1e-6
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "step_00000004", "step_00000004.incomplete", "step_00000005", "step_00000006"]


# ------------------------------------------------------------------------------------------ periodic checkpoints
def disk_full_while_writing(monkeypatch, checkpoint: str) -> None:
    """The disk fills up in the middle of the weights of `checkpoint` (e.g. "step_00000004"), once: accelerate's
    safetensors writer leaves half a file and raises ENOSPC, as a full tmpfs does."""
    import accelerate.utils.other

    write = accelerate.utils.other.safe_save_file

    def half_then_enospc(tensors, filename, metadata=None):
        if f"{checkpoint}.tmp" in str(filename):
            Path(filename).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return write(tensors, filename, metadata=metadata)

    monkeypatch.setattr(accelerate.utils.other, "safe_save_file", half_then_enospc)


def test_a_full_disk_at_a_periodic_checkpoint_loses_no_step(models, full, tmp_path, monkeypatch, capsys):
    """The step-4 checkpoint of a run that checkpoints every 2 steps meets a full disk: one warning, the partial
    step_4.tmp removed, training goes on and the step-6 checkpoint is written; the model is the uninterrupted
    run's."""
    out = tmp_path / "run"
    disk_full_while_writing(monkeypatch, "step_00000004")
    res = train(recipe(models, out, budget={"max_steps": STEPS}, checkpoint={"every": 2}))
    said = capsys.readouterr().out
    assert ("warning: the checkpoint of step 4 could not be saved (OSError: [Errno 28] No space left on device); its "
            "partial files were removed and training goes on (the next checkpoint is tried at step 6). The newest "
            f"checkpoint is {out / 'checkpoints' / 'step_00000002'}: free disk space, or a stop loses the steps "
            "since\n") in said
    assert said.count("could not be saved") == 1 and "Traceback" not in said
    assert res.finished and res.steps == STEPS and res.losses == full[1].losses
    assert same_weights(out, full[0]) <= 1e-6
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000006"]


def test_a_full_disk_at_the_stop_at_checkpoint_names_the_newest_one(models, tmp_path, monkeypatch):
    """budget.stop_at's checkpoint is the one the run cannot go on without: its failure ends the run with the
    checkpoint resume: auto continues from, and no partial folder."""
    out = tmp_path / "run"
    disk_full_while_writing(monkeypatch, "step_00000004")
    with pytest.raises(UptrainError) as e:
        train(recipe(models, out, budget={"max_steps": STEPS, "stop_at": 4}, checkpoint={"every": 2}))
    assert str(e.value) == (
        "the checkpoint of step 4 could not be saved (OSError: [Errno 28] No space left on device); its partial "
        f"files were removed. The newest checkpoint is {out / 'checkpoints' / 'step_00000002'}: free disk space "
        f"and continue with `uptrain train {out / 'recipe.yaml'} resume=auto`")
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]


# ------------------------------------------------------------------------------------------ final save
@pytest.mark.parametrize("fault", ["disk full", "not serialisable"])
def test_a_failed_final_save_keeps_the_trained_state(models, full, tmp_path, monkeypatch, fault):
    import transformers

    out = tmp_path / "run"
    r = recipe(models, out, budget={"max_steps": STEPS})  # checkpoint.every 0: nothing else keeps the run
    if fault == "disk full":
        def half_then_enospc(tensors, filename, metadata=None):  # the disk fills up in the middle of the weights
            Path(filename).write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", half_then_enospc)
        why = "OSError: [Errno 28] No space left on device"
    else:
        def unserialisable(self, *a, **k):
            raise ValueError("The model is quantized with gguf and is not serializable")

        monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", unserialisable)
        why = "ValueError: The model is quantized with gguf and is not serializable"
    with pytest.raises(UptrainError) as e:
        train(r)
    ckpt = out / "checkpoints" / f"step_{STEPS:08d}"
    assert str(e.value) == (f"the final save into {out} failed ({why}); the trained state of all {STEPS} steps is "
                            f"kept in {ckpt}. Fix the cause (free disk space, …) and run `uptrain train "
                            f"{out / 'recipe.yaml'} resume=auto`: it saves the model from there without training more")
    assert latest_checkpoint(out) == ckpt
    assert not any(p.name.endswith(".safetensors") or p.name.startswith(".") for p in out.iterdir())  # no half model
    assert not (out / "uptrain.json").exists()
    monkeypatch.undo()
    rest = train({**r, "resume": "auto"})
    assert rest.resumed_from == STEPS and rest.finished and rest.losses == full[1].losses
    assert same_weights(out, full[0]) <= 1e-6
    assert record(out)["uptraining"]["steps"] == STEPS
