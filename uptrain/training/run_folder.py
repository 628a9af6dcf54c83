"""The run's output folder: what may be written where, checkpoints, metrics and the resolved recipe.

    OUT/recipe.yaml        the resolved recipe (written first: it marks OUT as an uptrain run)
    OUT/step0/             the converted model before uptraining, when the recipe converts
    OUT/checkpoints/step_N accelerate save_state, data_state_rank{r}.json (streamed data: where each rank's
                           stream stands), best_state.safetensors (keep_best's earlier state, when it has
                           one), trainer_state.json (written last, with the size of every
                           file: complete means all of them there at that size)
    OUT/metrics.jsonl      one line per step and per evaluation
    OUT/*.safetensors, config.json, tokenizer …, uptrain.json   the final model (uptrain.json written last)
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from uptrain.checkpoint import read_safetensors_header
from uptrain.errors import UptrainError
from uptrain.files import atomic_write, write_json
from uptrain.record import read_record
from uptrain.training.recipe import Recipe, read_yaml
from uptrain.version import __version__

CHECKPOINTS = "checkpoints"
STEP0 = "step0"
STATE_FILE = "trainer_state.json"
# A streamed run's data position, one file per rank (data_stream.StreamLoader.state_dict), written into the
# checkpoint before trainer_state.json, so a complete checkpoint always has them.
DATA_STATE = "data_state_rank{rank}.json"
METRICS = "metrics.jsonl"
RECIPE = "recipe.yaml"
CURVES = "curves.png"  # the finished run's training and held-out losses (plots.plot_training)
_STEP = re.compile(r"step_\d+")
# Recipe keys that may change between a run and its resumption without changing its numbers.
RESUME_FREE = ("overwrite", "resume", "budget.stop_at", "log", "push_to_hub", "checkpoint", "eval.every",
               "data.cache_dir", "data.cache", "train.save_dtype")


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


def checkpoints(out: Path) -> list[Path]:
    """OUT/checkpoints/step_N folders, oldest first (not the .tmp a save is writing, nor ones set aside)."""
    folder = out / CHECKPOINTS
    return sorted(p for p in folder.glob("step_*") if _STEP.fullmatch(p.name)) if folder.is_dir() else []


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why `checkpoint` cannot be resumed from, or None when it is complete: trainer_state.json (written last)
    must be there and readable, every file its manifest lists present with the size that was written, and every
    safetensors file exactly as long as its header says (also for checkpoints written before manifests)."""
    try:
        state = read_state(checkpoint)
    except FileNotFoundError:
        return f"no {STATE_FILE}"
    except (OSError, ValueError) as e:
        return f"{STATE_FILE} is unreadable ({type(e).__name__})"
    for name, size in (state.get("files") or {}).items():
        f = checkpoint / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size:,} bytes, {size:,} were written"
    for f in sorted(checkpoint.rglob("*.safetensors")):
        try:
            read_safetensors_header(f, exact=True)
        except UptrainError:
            return f"{f.relative_to(checkpoint)} is truncated or corrupt"
    return None


def resumable_checkpoint(out: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """(newest complete checkpoint or None, [(newer checkpoint passed over, its problem)])."""
    skipped: list[tuple[Path, str]] = []
    for ckpt in reversed(checkpoints(out)):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt, skipped
        skipped.append((ckpt, problem))
    return None, skipped


def passed_over(skipped: list[tuple[Path, str]], resumed: Path | None) -> str:
    """"step_40 is incomplete (…); resuming from step_30" (or "; starting again from step 0")."""
    what = "; ".join(f"{p.name} is incomplete ({why})" for p, why in skipped)
    return f"{what}; " + (f"resuming from {resumed.name}" if resumed else "no complete checkpoint: starting again "
                                                                         "from step 0")


def latest_checkpoint(out: Path) -> Path | None:
    """Newest complete checkpoint or None."""
    return resumable_checkpoint(out)[0]


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


class CheckpointNotSaved(UptrainError):
    """A checkpoint could not be written (a full disk, …) on some rank; every rank raises it, the partial
    step_N.tmp is removed, and the model, optimiser and data position in memory are untouched."""

    def __init__(self, step: int, why: str):
        super().__init__(f"the checkpoint of step {step} could not be saved ({why})")
        self.step, self.why = step, why


def save_checkpoint(acc, out: Path, step: int, state: dict, keep: int, data_state: dict | None = None,
                    extra_files: dict[str, dict] | None = None) -> Path:
    """accelerate's save_state into step_N.tmp (and each rank's `data_state`, for streamed data; `extra_files`: more
    safetensors files {name: tensors} the main process writes, keep_best's weights), then
    trainer_state.json, then a rename: a kill at any moment leaves either the complete checkpoint or none. The
    newest `keep` stay. Called on every process. A write that fails on any rank (OSError: a full disk, a quota)
    raises CheckpointNotSaved on every rank, after the partial step_N.tmp is removed."""
    folder = out / CHECKPOINTS
    final, tmp = folder / f"step_{step:08d}", folder / f"step_{step:08d}.tmp"
    main = acc.is_main_process
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        folder.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    error = None
    try:
        acc.save_state(str(tmp))
        if data_state is not None:
            write_json(tmp / DATA_STATE.format(rank=acc.process_index), data_state)
        if main and extra_files:
            from safetensors.torch import save_file

            for name, tensors in extra_files.items():
                save_file(tensors, str(tmp / name))
    except OSError as e:
        error = e
    _agree_or_discard(acc, tmp, step, error)
    if main:
        try:
            # The manifest: what accelerate wrote, file by file, so that a checkpoint damaged after the rename (a
            # truncating copy, a full disk on another writer) is recognised and passed over on resume.
            files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            write_json(tmp / STATE_FILE, {**state, "files": files})
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
        except OSError as e:
            error = e
    _agree_or_discard(acc, tmp, step, error)
    if main:
        for old in checkpoints(out)[:-keep]:
            shutil.rmtree(old)
    acc.wait_for_everyone()
    return final


def any_rank(acc, flag: bool) -> bool:
    """Whether `flag` is true on any rank: one all-reduce, so every rank takes the same branch after it."""
    if acc.num_processes == 1:
        return bool(flag)
    import torch

    return bool(acc.reduce(torch.tensor(int(flag), device=acc.device), "sum").item())


def _agree_or_discard(acc, tmp: Path, step: int, error: OSError | None) -> None:
    """Every rank learns whether any rank failed (one all-reduce; a rank that raised alone would leave the others
    waiting in the next collective); on a failure the main process removes the partial checkpoint and every rank
    raises CheckpointNotSaved with the first failing rank's reason where it is known."""
    if not any_rank(acc, error is not None):
        return
    if acc.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    acc.wait_for_everyone()
    raise CheckpointNotSaved(step, f"{type(error).__name__}: {error}" if error else "a write failed on another "
                             "process") from error


def read_data_state(checkpoint: Path, rank: int) -> dict:
    """Rank `rank`'s data position in a streamed run's checkpoint."""
    path = checkpoint / DATA_STATE.format(rank=rank)
    if not path.is_file():
        raise UptrainError(f"{checkpoint} has no {path.name}: it was not written by a streamed run (data.streaming) "
                           f"of {rank + 1} or more processes, so the stream's position is unknown")
    return json.loads(path.read_text(encoding="utf-8"))


def set_aside(skipped: list[tuple[Path, str]]) -> None:
    """Rename incomplete checkpoints newer than the one resumed from to step_N.incomplete: never resumed from,
    never counted among the `keep` newest, there to inspect or delete. Main process only."""
    for ckpt, _ in skipped:
        shutil.rmtree(ckpt.with_name(ckpt.name + ".incomplete"), ignore_errors=True)
        os.replace(ckpt, ckpt.with_name(ckpt.name + ".incomplete"))
