"""The run's output folder: what may be written where, checkpoints, metrics and the resolved recipe.

    OUT/recipe.yaml        the resolved recipe (written first: it marks OUT as an uptrain run)
    OUT/step0/             the converted model before uptraining, when the recipe converts
    OUT/checkpoints/step_N accelerate save_state + trainer_state.json (written last: marks it complete)
    OUT/metrics.jsonl      one line per step and per evaluation
    OUT/*.safetensors, config.json, tokenizer …, uptrain.json   the final model (uptrain.json written last)
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from uptrain.errors import UptrainError
from uptrain.files import atomic_write, write_json
from uptrain.record import read_record
from uptrain.training.recipe import Recipe, read_yaml
from uptrain.version import __version__

CHECKPOINTS = "checkpoints"
STEP0 = "step0"
STATE_FILE = "trainer_state.json"
METRICS = "metrics.jsonl"
RECIPE = "recipe.yaml"
# Recipe keys that may change between a run and its resumption without changing its numbers.
RESUME_FREE = ("overwrite", "resume", "budget.stop_at", "log", "push_to_hub", "checkpoint", "eval.every",
               "data.cache_dir", "data.cache")


def recipe_differences(saved: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ, except those in RESUME_FREE."""
    out = []
    for k in sorted(set(saved) | set(new)):
        key = f"{prefix}{k}"
        if key in RESUME_FREE:
            continue
        a, b = saved.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += recipe_differences(a, b, key + ".")
        elif a != b:
            out.append(f"{key} ({a!r} → {b!r})")
    return out


def latest_checkpoint(out: Path) -> Path | None:
    """Newest complete checkpoint (its trainer_state.json is written last) or None."""
    folder = out / CHECKPOINTS
    done = sorted(p for p in folder.glob("step_*") if p.suffix != ".tmp" and (p / STATE_FILE).is_file()) \
        if folder.is_dir() else []
    return done[-1] if done else None


def read_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / STATE_FILE).read_text(encoding="utf-8"))


def plan_output(out: Path, recipe: Recipe) -> str:
    """"fresh", "overwrite", "restart" (resume: auto on a run without checkpoints) or "resume"; raises
    when OUT holds something we must not touch. Decided before anything is written."""
    if out.exists() and not out.is_dir():
        raise UptrainError(f"out {str(out)!r} exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return "fresh"
    is_run = (out / RECIPE).is_file()
    try:
        record = read_record(out)
    except UptrainError:
        record = None  # an unreadable record does not make a folder a run, nor a finished one
    finished = bool(record and record.uptraining)
    if recipe.overwrite:
        if not is_run and not finished:
            raise UptrainError(f"out {str(out)!r} is not empty and is not an uptrain run (no recipe.yaml); "
                               f"refusing to delete it with overwrite: true. Choose another out")
        return "overwrite"
    if recipe.resume == "auto" and is_run:
        if finished:
            raise UptrainError(f"out {str(out)!r} already holds a finished run; set overwrite: true to train again "
                               f"or choose another out")
        diff = recipe_differences(read_yaml(out / RECIPE), recipe.to_dict())
        if diff:
            raise UptrainError(f"cannot resume the run in {str(out)!r}: the recipe differs in {'; '.join(diff)}. "
                               f"Resume with the run's recipe ({out / RECIPE}) or set overwrite: true")
        return "resume" if latest_checkpoint(out) else "restart"
    what = "another run" if is_run else "files"
    raise UptrainError(f"out {str(out)!r} already holds {what}; set overwrite: true to replace it"
                       + (" or resume: auto to continue it" if is_run else "") + ", or choose another out")


def prepare(out: Path, mode: str, recipe: Recipe) -> None:
    """Main process only: clear what `mode` replaces and write the resolved recipe."""
    if mode == "overwrite":
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if mode != "resume":
        for stale in (out / METRICS, out / CHECKPOINTS):
            shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
    atomic_write(out / RECIPE, f"# The resolved recipe of this run (uptrain {__version__}).\n"
                 f"# Continue it:  uptrain train {out / RECIPE} resume=auto\n"
                 f"# Repeat it:    uptrain train {out / RECIPE} out=NEW_FOLDER\n" + recipe.to_yaml())


def open_metrics(out: Path, start: int):
    """metrics.jsonl, opened for appending; on resume the lines past the checkpoint are dropped."""
    path = out / METRICS
    if start and path.is_file():
        keep = [line for line in path.read_text(encoding="utf-8").splitlines()
                if line.strip() and json.loads(line)["step"] <= start]
        atomic_write(path, "".join(line + "\n" for line in keep))
    return open(path, "a", encoding="utf-8", buffering=1)  # line-buffered: a killed run keeps its lines


def save_checkpoint(acc, out: Path, step: int, state: dict, keep: int) -> Path:
    """accelerate's save_state into step_N.tmp, then trainer_state.json, then a rename: a kill at any moment
    leaves either the complete checkpoint or none. The newest `keep` stay. Called on every process."""
    folder = out / CHECKPOINTS
    final, tmp = folder / f"step_{step:08d}", folder / f"step_{step:08d}.tmp"
    main = acc.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    if main:
        write_json(tmp / STATE_FILE, state)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        done = sorted(p for p in folder.glob("step_*") if p.suffix != ".tmp")
        for old in done[:-keep]:
            shutil.rmtree(old)
    acc.wait_for_everyone()
    return final
