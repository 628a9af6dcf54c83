"""Which files of a folder `uptrain push` uploads, and the plan of an upload (validated folder, files, card).

Only an allow-list of files leaves the machine (config, safetensors weights named by the index, tokenizer,
chat template, uptrain.json, recipe.yaml, licence files, the card and the plots it shows): optimizer
states, `checkpoint-*` folders and logs stay home without anyone having to remember to delete them.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from pathlib import Path

from uptrain.errors import UptrainError
from uptrain.modeling import code_files
from uptrain.publishing.card_facts import IMAGE_SUFFIXES
from uptrain.publishing.model_card import is_generated, model_card
from uptrain.publishing.options import PushOptions
from uptrain.publishing.validation import INDEX, check_json_files, check_kv_heads, check_weights, checked_config_json
from uptrain.record import FILENAME as RECORD, read_record
from uptrain.training.run_folder import RECIPE

# Besides these: the weights the index names, the tokenizer/generation/chat-template/licence files the
# converter copies (checkpoint.COMPANION_FILES, one list for both), and the images the card shows.
ALLOWED_FILES = frozenset({"config.json", INDEX, RECORD, RECIPE, "README.md"})
PLOTS_DIR = "plots"
# Why a file is left out, for the listing (first match wins); anything else: "not in the allow-list".
LEFTOVERS = (
    ("checkpoints", "training checkpoints"), ("checkpoint-*", "training checkpoint"), ("step_*", "training checkpoint"),
    ("optimizer*", "optimizer state"), ("scheduler*", "scheduler state"),
    ("rng_state*", "RNG state"), ("trainer_state.json", "trainer state"), ("training_args.bin", "trainer state"),
    ("step0", "the converted model before uptraining"), ("metrics.jsonl", "training log"),
    ("*.log", "log"), ("logs", "logs"), ("runs", "logs"), ("wandb", "logs"), ("events.out.tfevents*", "log"),
    ("*.bin", "pickled file (only safetensors weights are uploaded)"), ("*.pt", "pickled file"),
    ("*.pth", "pickled file"), ("*.ckpt", "pickled file"), ("*.safetensors", "weights not named by the index"),
)

def allowed(name: str) -> bool:
    from uptrain.checkpoint import COMPANION_FILES

    return name in ALLOWED_FILES or any(fnmatch.fnmatch(name, pat) for pat in COMPANION_FILES)


def _why_left_out(name: str) -> str:
    return next((why for pat, why in LEFTOVERS if fnmatch.fnmatch(name, pat)), "not in the allow-list")


def _images(folder: Path) -> list[str]:
    top = [p.name for p in folder.iterdir() if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)]
    plots = folder / PLOTS_DIR
    sub = [f"{PLOTS_DIR}/{p.name}" for p in plots.iterdir()
           if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES)] if plots.is_dir() else []
    return sorted(top + sub)


def _referenced(card: str, candidates: list[str]) -> list[str]:
    links = set(re.findall(r"\]\(\s*<?([^)\s>]+)", card)) | set(re.findall(r"src=[\"']([^\"']+)", card))
    links = {link.removeprefix("./") for link in links}
    return [c for c in candidates if c in links]


def select_files(folder: Path, weights: list[str], images: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(files to upload, (left-out entry, why)); folders are listed once with a trailing slash."""
    keep, skipped = [], []
    for p in sorted(folder.iterdir()):
        if p.is_dir():
            if p.name == PLOTS_DIR:
                inside = [f"{PLOTS_DIR}/{q.name}" for q in sorted(p.iterdir())]
                keep += [f for f in inside if f in images]
                skipped += [(f, "not shown in the model card") for f in inside if f not in images]
            else:
                skipped.append((p.name + "/", _why_left_out(p.name)))
        elif allowed(p.name) or p.name in weights or p.name in images:
            keep.append(p.name)
        elif p.name.lower().endswith(IMAGE_SUFFIXES):
            skipped.append((p.name, "not shown in the model card"))
        else:
            skipped.append((p.name, _why_left_out(p.name)))
    return keep, skipped


@dataclass
class Upload:
    """What `uptrain push` would send: the files, those left out and why, the card."""

    files: list[str]
    skipped: list[tuple[str, str]]
    card: str
    card_origin: str
    notes: list[str]


def plan_upload(folder, repo_id: str, eval_json=None, overwrite_card: bool = False,
                base_model: str | None = None, said: PushOptions | None = None) -> Upload:
    """Validate DIR, choose the files, write the card. Reads only; touches neither DIR nor the network.
    base_model: the Hub model the card names as `base_model`, over what uptrain.json suggests. said: the
    caller's options, for the words of a note (--base-model or base_model)."""
    said = said or PushOptions()
    folder = Path(folder)
    if not folder.is_dir():
        raise UptrainError(f"{folder} is not a folder")
    config = checked_config_json(folder)
    weights, tensors = check_weights(folder)
    record = read_record(folder)
    check_kv_heads(config, record, tensors)
    notes = [] if record else ["no uptrain.json: the card can only describe the config"]

    readme = folder / "README.md"
    user_card = readme.read_text(encoding="utf-8") if readme.is_file() else None
    if user_card is not None and not is_generated(user_card) and not overwrite_card:
        images = _referenced(user_card, _images(folder))
        files, skipped = select_files(folder, weights + code_files(config.get("auto_map")), images)
        card, origin = user_card, "kept"
        if base_model:
            notes.append(f"{said.key('base_model')} {base_model} is not used: README.md is your own card, kept as it "
                         f"is (set base_model in its front matter, or replace it with {said.said('overwrite_card', True)})")
    else:
        # the modeling file that config.json's auto_map names travels with the weights (trust_remote_code)
        files, skipped = select_files(folder, weights + code_files(config.get("auto_map")), _images(folder))
        files = sorted(set(files) | {"README.md"})
        card = model_card(folder, repo_id, files, eval_json, base_model=base_model)
        origin = "regenerated" if user_card is not None and not is_generated(user_card) else "generated"
    check_json_files(folder, files)
    if not any(f.startswith("tokenizer") or f in ("vocab.json", "spiece.model") for f in files):
        notes.append("no tokenizer files: users will need the source model's tokenizer")
    return Upload(files=files, skipped=skipped, card=card, card_origin=origin, notes=notes)
