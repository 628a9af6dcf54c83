"""`uptrain.json`: what was done to a checkpoint, typed and versioned. The only reader and writer.

    {"uptrain_version": "0.1.0", "schema": 1,
     "conversion": {...ConversionRecord...},      # written by `uptrain convert`
     "uptraining": {...UptrainingRecord...},      # added by `uptrain train`
     "source_record": {...}}                      # the source's own uptrain.json, when it had one

Unknown keys (a method's own section such as "aligned", fields of a newer uptrain) are kept in `extra`
and written back as they were, so reading and rewriting a record never loses anything. Files written
before the schema field existed read as schema 1.

The file is strict JSON (RFC 8259): a NaN or an infinity (a diverged loss) is written as null and its place
listed under "non_finite" ("uptraining.last_loss", "conversion.distill.train_kl[3]"), so that jq, browsers and
the Hub's viewers read every record.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Optional

from uptrain.errors import UptrainError
from uptrain.files import write_json
from uptrain.version import __version__

FILENAME = "uptrain.json"
SCHEMA = 1


class _Section:
    """from_dict / to_dict with unknown keys kept in `extra` (written after the known ones)."""

    if TYPE_CHECKING:  # what every section, a dataclass with an `extra` field, has
        __dataclass_fields__: ClassVar[dict[str, Any]]
        extra: dict

        def __init__(self, **fields: Any) -> None: ...

    @classmethod
    def from_dict(cls, d: dict):
        if not isinstance(d, dict):
            raise UptrainError(f"{FILENAME}: expected a mapping for {cls.__name__}, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in names}, extra={k: v for k, v in d.items() if k not in names})

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        return {**d, **self.extra}


@dataclass
class ConversionRecord(_Section):
    source: str = ""  # as the user named it: a folder or a Hub id
    source_revision: Optional[str] = None  # the Hub commit, when the source came from the Hub
    source_hub_id: Optional[str] = None  # the Hub repo it came from (a Hub id, or an HF-cache snapshot's repo)
    source_fingerprint: str = ""  # sha256 of config.json and every shard header
    model_type: str = ""
    method: str = ""
    grouping: str = "contiguous"
    groups: int | list = 0  # G, or G_l per layer (a per-layer result: nemotron-nas)
    seed: int = 0
    num_attention_heads: int = 0
    kv_heads_before: int = 0
    kv_heads_after: int | list = 0  # as groups
    head_dim: int = 0
    num_layers: int = 0
    kv_cache_bytes_per_token_before: int = 0
    kv_cache_bytes_per_token_after: int = 0
    dtype: str = ""
    created: str = ""
    calibration: Optional[dict] = None  # method aligned: which data, how many tokens
    layers: list = field(default_factory=list)  # per-layer statistics: {"layer", "k_rel_error", "v_rel_error"}
    # --kv-budget: the budget, every layer's measured loss at every G, the chosen G_l and the predicted loss
    allocation: Optional[dict] = None
    options: dict = field(default_factory=dict)  # every ConvertOptions field, as used
    # the source's own auto_map (modeling code uptrain neither runs nor copies), left out of the result's config
    dropped_auto_map: Optional[dict] = None
    license: Optional[str] = None  # the source card's licence: a derivative carries it
    license_name: Optional[str] = None
    license_link: Optional[str] = None
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = super().to_dict()
        for k in ("license", "license_name", "license_link", "allocation", "dropped_auto_map"):  # only when there is one
            if d.get(k) is None:
                d.pop(k)
        return d

    def summary(self) -> dict:
        """The record without the per-layer list (what an evaluation row carries)."""
        return {k: v for k, v in self.to_dict().items() if k != "layers"}


@dataclass
class UptrainingRecord(_Section):
    recipe: dict = field(default_factory=dict)  # the resolved recipe
    recipe_file: Optional[str] = None
    base_model: Optional[str] = None  # the recipe's model.path
    init: str = ""  # the folder training started from (OUT/step0 when the recipe converted)
    data: Optional[str] = None
    steps: int = 0
    tokens_seen: int = 0
    alpha: Optional[float] = None
    budget: str = ""
    params: str = "all"
    trainable_parameters: int = 0
    processes: int = 1
    mixed_precision: str = "no"
    seq_len: int = 0
    lr: float = 0.0
    schedule: str = ""
    distillation: Optional[dict] = None
    objective: Optional[str] = None  # causal-lm or span-corruption (an encoder-decoder's); None: an older record
    initial_eval: Optional[dict] = None
    final_eval: Optional[dict] = None  # of the saved model
    kept_step: Optional[int] = None  # eval.keep_best saved the state after this step (0: the start), not the last
    eval_history: list = field(default_factory=list)
    first_loss: Optional[float] = None
    last_loss: Optional[float] = None
    wall_time_s: float = 0.0
    created: str = ""
    extra: dict = field(default_factory=dict)

    def summary(self) -> dict:
        """The record without its lists (eval history) for an evaluation row."""
        return {k: v for k, v in self.to_dict().items() if not isinstance(v, list)}


@dataclass
class Record:
    conversion: Optional[ConversionRecord] = None
    uptraining: Optional[UptrainingRecord] = None
    source_record: Optional[dict] = None
    uptrain_version: str = __version__
    schema: int = SCHEMA
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict, where: str = FILENAME) -> Record:
        if not isinstance(d, dict):
            raise UptrainError(f"{where} is not an uptrain record (a JSON object is expected)")
        schema = d.get("schema", 1)
        if not isinstance(schema, int) or schema > SCHEMA:
            raise UptrainError(f"{where} has schema {schema!r}, newer than this uptrain reads ({SCHEMA}); "
                               f"upgrade uptrain")
        known = {"conversion", "uptraining", "source_record", "uptrain_version", "schema"}
        conv, upt = d.get("conversion"), d.get("uptraining")
        return cls(conversion=ConversionRecord.from_dict(conv) if conv else None,
                   uptraining=UptrainingRecord.from_dict(upt) if upt else None,
                   source_record=d.get("source_record"), uptrain_version=d.get("uptrain_version", ""),
                   schema=SCHEMA, extra={k: v for k, v in d.items() if k not in known})

    def to_dict(self) -> dict:
        d: dict[str, Any] = {"uptrain_version": self.uptrain_version, "schema": self.schema}
        if self.conversion is not None:
            d["conversion"] = self.conversion.to_dict()
        if self.uptraining is not None:
            d["uptraining"] = self.uptraining.to_dict()
        if self.source_record is not None:
            d["source_record"] = self.source_record
        return {**d, **self.extra}

    @property
    def stage(self) -> str | None:
        """"uptrained", "converted, step 0", or None for a record that says neither."""
        return "uptrained" if self.uptraining else "converted, step 0" if self.conversion else None

    def licence(self) -> dict:
        """license / license_name / license_link recorded at the top or with the conversion."""
        for holder in (self.extra, self.conversion.to_dict() if self.conversion else {}):
            if holder.get("license"):
                return {k: holder[k] for k in ("license", "license_name", "license_link") if holder.get(k)}
        return {}


def read_record(folder) -> Record | None:
    """FOLDER/uptrain.json as a Record; None when there is none; UptrainError when it is unreadable."""
    path = Path(folder) / FILENAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UptrainError(f"{path} is not valid JSON ({e}); re-create it or delete it") from e
    return Record.from_dict(data, str(path))


def try_read_record(folder) -> Record | None:
    """read_record for callers that only describe (an evaluation row, a commit message): None when the file
    is missing or unreadable."""
    try:
        return read_record(folder)
    except UptrainError:
        return None


def write_record(folder, record: Record) -> Path:
    """Write FOLDER/uptrain.json atomically, stamped with this uptrain's version, as strict JSON."""
    record.uptrain_version, record.schema = __version__, SCHEMA
    found: list[str] = []
    d = _finite(record.to_dict(), "", found)
    if found:
        d["non_finite"] = sorted(set(d.get("non_finite", [])) | set(found))
    return Path(write_json(Path(folder) / FILENAME, d, strict=True))


def _finite(x, where: str, found: list[str]):
    """x with every NaN / infinity (numpy and torch scalars included) replaced by None, its place added to `found`."""
    if hasattr(x, "item"):  # numpy / torch scalars
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        found.append(where)
        return None
    if isinstance(x, dict):
        return {k: _finite(v, f"{where}.{k}" if where else str(k), found) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v, f"{where}[{i}]", found) for i, v in enumerate(x)]
    return x
