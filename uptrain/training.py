"""The uptraining loop: recipe → (optional convert) → token blocks → accelerate-prepared model, optimiser
and loader → steps with eval and checkpoints → a normal HF checkpoint with its uptraining record.

One code path for one CPU and for many GPUs: `accelerate launch` (DDP, FSDP, DeepSpeed configs in
recipes/accelerate/) decides the distribution; nothing here is home-made distributed code. Idioms from
accelerate's examples: the loss of an optimiser step is normalised by the number of target tokens in the
whole accumulation window across all ranks; preprocessing under `main_process_first`; exact resume
with `save_state` / `load_state` plus `skip_first_batches` over a data order that is a pure function of
(seed, sample index).

    result = uptrain.train("recipes/tiny-cpu.yaml", overrides=["budget.max_steps=20"])

Heavy imports (torch, transformers, accelerate) happen inside `train()` after the recipe and the output
folder were checked, so bad input fails in a fraction of a second.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from uptrain.config import Recipe, load_recipe
from uptrain.errors import UptrainError

CHECKPOINTS = "checkpoints"
STEP0 = "step0"  # the converted model before uptraining, when the recipe converts
STATE_FILE = "trainer_state.json"
# Recipe keys that may change between a run and its resumption without changing its numbers.
RESUME_FREE = ("overwrite", "resume", "budget.stop_at", "log", "push_to_hub", "checkpoint", "eval.every",
               "data.cache_dir", "data.cache")


@dataclass
class TrainResult:
    out: str
    steps: int  # optimiser steps done, resumed ones included
    total_steps: int  # the budget
    tokens_seen: int
    losses: list[float]  # mean CE per target token of every step (1-based step i → losses[i-1])
    eval_history: list[dict]  # {"step", "loss", "perplexity", "tokens"}
    final_eval: dict | None
    wall_time_s: float  # this invocation
    finished: bool  # False when `budget.stop_at` ended the run early (no final model then)
    history: list[dict] = field(default_factory=list)  # per-step records, as in metrics.jsonl
    resumed_from: int | None = None
    trainable_parameters: int = 0
    process_index: int = 0

    def summary(self) -> str:
        ev = self.final_eval or (self.eval_history[-1] if self.eval_history else None)
        what = "Uptrained" if self.finished else "Stopped (resume: auto continues)"
        return (f"{what} {self.steps}/{self.total_steps} steps, {self.tokens_seen:,} tokens, "
                f"last loss {self.losses[-1]:.4f}" + (f", held-out perplexity {ev['perplexity']:.2f}" if ev else "")
                + f", {self.wall_time_s:.1f} s → {self.out}")


@dataclass
class Budget:
    steps: int
    tokens_per_step: int
    alpha: float | None
    text: str


# ---------------------------------------------------------------------------------------- pure parts
def resolve_budget(b, tokens_per_step: int) -> Budget:
    """Optimiser steps from α × pre-training steps/tokens, or max_steps / max_tokens (floored: never more)."""
    tps = tokens_per_step
    if b.max_steps is not None:
        steps, text = b.max_steps, f"max_steps = {b.max_steps:,}"
    elif b.max_tokens is not None:
        steps = b.max_tokens // tps
        text = f"max_tokens {b.max_tokens:,} / {tps:,} tokens per step"
    elif b.pretrain_steps is not None:
        steps = math.floor(b.fraction * b.pretrain_steps + 1e-9)
        text = f"α = {b.fraction:g} × {b.pretrain_steps:,} pre-training steps"
    else:
        steps = math.floor(b.fraction * b.pretrain_tokens / tps + 1e-9)
        text = f"α = {b.fraction:g} × {b.pretrain_tokens:,} pre-training tokens / {tps:,} tokens per step"
    if steps < 1:
        raise UptrainError(f"the budget gives 0 optimiser steps ({text}); raise budget.fraction / max_steps / "
                           f"max_tokens or lower the batch (micro_batch_size × grad_accum × processes × seq_len)")
    alpha = b.fraction
    if alpha is None and b.pretrain_steps:
        alpha = steps / b.pretrain_steps
    elif alpha is None and b.pretrain_tokens:
        alpha = steps * tps / b.pretrain_tokens
    return Budget(steps, tps, alpha, f"{text} = {steps:,} steps of {tps:,} tokens ({steps * tps:,} tokens)")


def lr_factor(step: int, total: int, warmup: int, schedule: str, final_ratio: float) -> float:
    """Multiplier of the base lr at 0-based optimiser step `step`: linear warmup, then constant, linear
    or cosine decay reaching `final_ratio` at the last step."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup - 1))
    if schedule == "linear":
        return 1.0 - (1.0 - final_ratio) * progress
    return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def trainable_mask(names, spec, params: str) -> dict[str, bool]:
    """name → trains? `kv`: tensors whose shape depends on the KV-head count (k/v projections; for fused
    qkv layouts such as phi3 the whole qkv projection); `attention`: every tensor of the attention block."""
    def keep(name):
        if params == "all":
            return True
        try:
            kind, layer, suffix = spec.classify(name)
        except UptrainError:
            return False
        if layer is None:
            return False
        return kind == "kv" if params == "kv" else suffix.startswith("self_attn.")

    return {n: keep(n) for n in names}


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


# ---------------------------------------------------------------------------------------- output folder
def latest_checkpoint(out: Path) -> Path | None:
    """Newest complete checkpoint (its trainer_state.json is written last) or None."""
    folder = out / CHECKPOINTS
    done = sorted(p for p in folder.glob("step_*") if p.suffix != ".tmp" and (p / STATE_FILE).is_file()) \
        if folder.is_dir() else []
    return done[-1] if done else None


def plan_output(out: Path, recipe: Recipe) -> str:
    """"fresh", "overwrite", "restart" (resume: auto on a run without checkpoints) or "resume"; raises
    when OUT holds something we must not touch. Decided before anything is written."""
    if out.exists() and not out.is_dir():
        raise UptrainError(f"out {str(out)!r} exists and is not a folder")
    if not out.exists() or not any(out.iterdir()):
        return "fresh"
    is_run = (out / "recipe.yaml").is_file()
    record = _read_json(out / "uptrain.json") or {}
    if recipe.overwrite:
        if not is_run and "uptraining" not in record:
            raise UptrainError(f"out {str(out)!r} is not empty and is not an uptrain run (no recipe.yaml); "
                               f"refusing to delete it with overwrite: true. Choose another out")
        return "overwrite"
    if recipe.resume == "auto" and is_run:
        if "uptraining" in record:
            raise UptrainError(f"out {str(out)!r} already holds a finished run; set overwrite: true to train again "
                               f"or choose another out")
        from uptrain.config import read_yaml

        diff = recipe_differences(read_yaml(out / "recipe.yaml"), recipe.to_dict())
        if diff:
            raise UptrainError(f"cannot resume the run in {str(out)!r}: the recipe differs in {'; '.join(diff)}. "
                               f"Resume with the run's recipe ({out / 'recipe.yaml'}) or set overwrite: true")
        return "resume" if latest_checkpoint(out) else "restart"
    what = "another run" if is_run else "files"
    raise UptrainError(f"out {str(out)!r} already holds {what}; set overwrite: true to replace it"
                       + (" or resume: auto to continue it" if is_run else "") + ", or choose another out")


def _read_json(path: Path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------- entry point
def train(recipe, overrides: list[str] | None = None, *, tokenizer=None, train_blocks=None, eval_blocks=None,
          teacher=None, progress: bool | None = None) -> TrainResult:
    """Run (or resume) the uptraining a recipe describes; returns the TrainResult on every process.

    recipe: a YAML path, a dict or a Recipe; overrides: ["optim.lr=3e-4", …] applied on top.
    tokenizer / train_blocks / eval_blocks: already-built ones (LongTensor [n, seq_len] from
    uptrain.data), replacing the recipe's data section; teacher: a loaded model instead of distill.teacher.
    Callable many times in one process: each call creates its own Accelerator and resets accelerate's
    process-wide state afterwards (single-process runs)."""
    t0 = time.time()
    r = load_recipe(recipe, overrides)
    recipe_file = os.fspath(recipe) if isinstance(recipe, (str, os.PathLike)) else None
    out = Path(r.out)
    mode = plan_output(out, r)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    budget = resolve_budget(r.budget, r.train.micro_batch_size * r.train.grad_accum * world * r.data.seq_len)

    show = r.log.progress if progress is None else progress

    _reset_accelerate(world)
    accelerator = _make_accelerator(r, out, world)
    try:
        if accelerator.num_processes != world:
            raise UptrainError(f"WORLD_SIZE={world} but accelerate runs {accelerator.num_processes} processes")
        run = _Run(r, out, budget, accelerator, show, recipe_file)
        return run.execute(mode, t0, tokenizer, train_blocks, eval_blocks, teacher)
    finally:
        if r.log.trackers:
            accelerator.end_training()
        accelerator.free_memory()
        _reset_accelerate(world)


# ---------------------------------------------------------------------------------------- data order
class BlockStream:
    """Sample i of a run → a training block: epoch e = i // n reads the n blocks in the order of a
    permutation seeded by (seed, e). A pure function of i, so `skip_first_batches` resumes exactly and
    any number of processes reads the same global sequence (accelerate shards it by batch)."""

    def __init__(self, blocks, length: int, seed: int, shuffle: bool):
        self.blocks, self.length, self.seed, self.shuffle = blocks, length, seed, shuffle
        self._epoch, self._perm = -1, None

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        epoch, j = divmod(i, len(self.blocks))
        if self.shuffle:
            if epoch != self._epoch:
                import torch

                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                self._epoch, self._perm = epoch, torch.randperm(len(self.blocks), generator=g)
            j = int(self._perm[j])
        return self.blocks[j]


# ---------------------------------------------------------------------------------------- accelerate
def _reset_accelerate(world: int) -> None:
    """accelerate keeps process-wide singletons (AcceleratorState, GradientState): a second train() in one
    process (the demo, a notebook) with other settings needs them cleared. Launched runs keep theirs."""
    if world > 1:
        return
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def _make_accelerator(r: Recipe, out: Path, world: int):
    import torch
    from accelerate import Accelerator
    from accelerate.utils import GradientAccumulationPlugin, ProjectConfiguration

    # Ranks launched on a machine without an accelerator (`accelerate launch --config_file
    # recipes/accelerate/cpu.yaml`) only form a gloo group when accelerate is told cpu=True; otherwise
    # every rank would silently train alone.
    has_device = torch.accelerator.is_available() if hasattr(torch, "accelerator") else torch.cuda.is_available()
    if r.log.trackers:  # accelerate drops a tracker whose package is missing without a word
        from accelerate.tracking import get_available_trackers
        from accelerate.utils import LoggerType

        available = {getattr(t, "value", str(t)) for t in get_available_trackers()}
        missing = [t for t in r.log.trackers if t not in available and t in {k.value for k in LoggerType}]
        if missing:
            raise UptrainError(f"log.trackers: {', '.join(missing)} not installed (pip install {' '.join(missing)})")
    try:
        return Accelerator(
            cpu=world > 1 and not has_device,
            mixed_precision=r.train.mixed_precision,
            # Windows are cut by the loop, not by the end of the dataloader.
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=r.train.grad_accum, sync_with_dataloader=False),
            # The loop steps the schedule once per optimiser step (accelerate would step it once per process).
            step_scheduler_with_optimizer=False,
            log_with=r.log.trackers or None,
            project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
        )
    except (ValueError, ImportError) as e:
        raise UptrainError(f"accelerate could not start with this recipe: {e}") from e


# ---------------------------------------------------------------------------------------- models
def _model_config(path: str, revision: str | None, what: str = "model.path"):
    """Config of a supported causal LM, or one clear error."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from uptrain.arch import spec_for_config

    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise UptrainError(f"{what} {path!r} has no config.json: not a Hugging Face model folder")
    if not os.path.isdir(path) and (os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise UptrainError(f"{what} {path!r} not found (neither a folder nor a Hub repo id)")
    try:
        cfg = AutoConfig.from_pretrained(path, revision=revision)
    except Exception as e:  # offline, unknown repo, bad JSON: one message
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise UptrainError(f"could not read the config of {what} {path!r}: {type(e).__name__}: {first}") from e
    if cfg.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UptrainError(f"{what} {path!r} is not a causal language model (model_type {cfg.model_type!r})")
    spec_for_config(cfg)  # raises for architectures the attention table does not know
    return cfg


def _load_tokenizer(path: str, revision: str | None):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, revision=revision)
    except Exception as e:
        raise UptrainError(f"no usable tokenizer in {path!r} ({type(e).__name__}); training tokenises the data "
                           f"with the model's own tokenizer: save it beside the weights") from e
    if tok.eos_token_id is None:
        raise UptrainError(f"the tokenizer of {path!r} has no EOS token; packing needs one between documents")
    return tok


def _check_teacher(r: Recipe, student_cfg, tokenizer, teacher) -> None:
    """A teacher must predict over the same vocabulary as the student (same size and same tokens)."""
    from uptrain.data import tokenizer_hash

    if teacher is not None:
        t_vocab, where = teacher.config.vocab_size, "the teacher"
    else:
        where = f"distill.teacher {r.distill.teacher!r}"
        t_vocab = _model_config(r.distill.teacher, None, "distill.teacher").vocab_size
    if t_vocab != student_cfg.vocab_size:
        raise UptrainError(f"{where} has a vocabulary of {t_vocab} tokens, the student {student_cfg.vocab_size}: "
                           f"distillation compares distributions over the same tokens")
    if teacher is None:
        try:
            t_tok = _load_tokenizer(r.distill.teacher, None)
        except UptrainError:
            return  # weights-only teacher folder: the vocabulary size check is what we can do
        if tokenizer_hash(t_tok) != tokenizer_hash(tokenizer):
            raise UptrainError(f"{where} has a different tokenizer than the student (same size, other tokens); "
                               f"distillation needs the same token ids")


def _load_model(path: str, revision: str | None, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=getattr(torch, dtype))
    except Exception as e:
        raise UptrainError(f"could not load the model {path!r}: {type(e).__name__}: {e}") from e


_SHARDED = ("FSDP", "DEEPSPEED")  # DistributedType values whose parameters are sharded


def _adamw(groups, o, fused: bool):
    """AdamW, the fused kernel where torch has one for the device (what transformers' Trainer uses too)."""
    import torch

    if fused:
        try:
            return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=True)
        except (RuntimeError, ValueError, TypeError):
            pass
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)


def _enable_checkpointing(model) -> None:
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.x name
        model.activation_checkpointing_enable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def token_losses(model, teacher, ids, temperature: float, autocast):
    """Summed CE over the targets of `ids` [b, l] (every position but the first) and, with a teacher,
    summed T²·KL(teacher ‖ student) over the same positions (None without one)."""
    import torch
    import torch.nn.functional as F

    logits = model(input_ids=ids, use_cache=False).logits
    labels = F.pad(ids[:, 1:], (0, 1), value=-100)  # the last position predicts past the block
    ce = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum")
    if teacher is None:
        return ce, None
    with torch.no_grad(), autocast():
        t_logits = teacher(input_ids=ids, use_cache=False).logits
    t = temperature
    s_logp = F.log_softmax(logits[:, :-1].float() / t, dim=-1)
    t_logp = F.log_softmax(t_logits[:, :-1].float() / t, dim=-1)
    return ce, F.kl_div(s_logp, t_logp, log_target=True, reduction="sum") * (t * t)


# ---------------------------------------------------------------------------------------- one run
class _Run:
    """One invocation of train(): holds the accelerator and what the steps share."""

    def __init__(self, r: Recipe, out: Path, budget: Budget, accelerator, show: bool, recipe_file: str | None):
        self.r, self.out, self.budget, self.acc, self.recipe_file = r, out, budget, accelerator, recipe_file
        self.main = accelerator.is_main_process
        self.show = show and self.main

    def say(self, msg: str) -> None:
        if self.main:
            print(msg, flush=True)

    # -- setup: everything that can fail on bad input runs before the output folder is touched ------
    def execute(self, mode, t0, tokenizer, train_blocks, eval_blocks, teacher) -> TrainResult:
        import torch

        from uptrain.arch import check_groups, spec_for_config

        r = self.r
        cfg = _model_config(r.model.path, r.model.revision)
        spec = spec_for_config(cfg)
        if r.model.convert:
            check_groups(r.model.convert.groups, spec.kv_heads(cfg))
        tokenizer = tokenizer or _load_tokenizer(r.model.path, r.model.revision)
        if teacher is not None or r.distill.teacher:
            _check_teacher(r, cfg, tokenizer, teacher)
        train_blocks, eval_blocks = self.data(tokenizer, train_blocks, eval_blocks)

        self.commit(mode)
        path, revision = (self.convert(), None) if r.model.convert else (r.model.path, r.model.revision)
        torch.manual_seed(r.train.seed)
        model = _load_model(path, revision, r.model.dtype)
        mask = trainable_mask([n for n, _ in model.named_parameters()], spec, r.train.params)
        for n, p in model.named_parameters():
            p.requires_grad_(mask[n])
        n_train = sum(p.numel() for n, p in model.named_parameters() if mask[n])
        if n_train == 0:
            raise UptrainError(f"train.params={r.train.params} selects no parameter of this {cfg.model_type} model")
        if r.train.gradient_checkpointing:
            _enable_checkpointing(model)
        if teacher is None and r.distill.teacher:
            # Frozen: only its logits matter, so it takes the autocast precision (half the memory in bf16).
            half = {"bf16": "bfloat16", "fp16": "float16"}.get(str(self.acc.mixed_precision))
            teacher = _load_model(r.distill.teacher, None, half or r.model.dtype)
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            teacher.to(self.acc.device)
        n_all = sum(p.numel() for p in model.parameters())
        self.say(f"uptrain train: {path} ({cfg.model_type}, {spec.layers(cfg)} layers, {spec.heads(cfg)} heads, "
                 f"{spec.kv_heads(model.config)} KV heads); training {r.train.params}: {n_train:,} of {n_all:,} "
                 f"parameters"
                 + (f"; distilling from {r.distill.teacher or 'the given teacher'}" if teacher is not None else ""))
        self.say(f"data: {r.data.source}, {len(train_blocks):,} training blocks and {len(eval_blocks):,} held-out "
                 f"blocks of {r.data.seq_len} tokens")
        self.say(f"budget: {self.budget.text}; {self.acc.num_processes} process(es) × micro-batch "
                 f"{r.train.micro_batch_size} × accumulation {r.train.grad_accum}")
        return self.loop(mode, t0, model, teacher, tokenizer, train_blocks, eval_blocks, n_train, path)

    def data(self, tokenizer, train_blocks, eval_blocks):
        import torch

        from uptrain.data import token_blocks

        d, t = self.r.data, self.r.train
        kw = dict(cache_dir=d.cache_dir, cache=d.cache, progress=self.show)
        # A streamed corpus is read only as far as the run needs (100B tokens of a bigger corpus); an
        # in-memory one is tokenised whole, so that every epoch shuffles all of it.
        needed = self.budget.steps * t.grad_accum * t.micro_batch_size * self.acc.num_processes
        cap = min(needed, d.max_train_blocks or needed) if d.streaming else d.max_train_blocks
        with self.acc.main_process_first():  # the main process tokenises and caches, the others read
            if train_blocks is None:
                train_blocks = token_blocks(d, tokenizer, d.seq_len, "train", cap, dtype=torch.int32, **kw)
            if eval_blocks is None:
                eval_blocks = token_blocks(d, tokenizer, d.seq_len, "eval", self.r.eval.max_blocks, **kw)
        for name, b in (("train_blocks", train_blocks), ("eval_blocks", eval_blocks)):
            if b.ndim != 2 or b.shape[1] != d.seq_len or b.shape[0] == 0:
                raise UptrainError(f"{name} must be [n ≥ 1, seq_len={d.seq_len}] token ids, got {list(b.shape)}")
        return train_blocks, eval_blocks[: self.r.eval.max_blocks].long()

    def commit(self, mode: str) -> None:
        from uptrain import __version__

        if self.main:
            if mode == "overwrite":
                shutil.rmtree(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
            if mode != "resume":
                for stale in (self.out / "metrics.jsonl", self.out / CHECKPOINTS):
                    shutil.rmtree(stale, ignore_errors=True) if stale.is_dir() else stale.unlink(missing_ok=True)
            _write_text(self.out / "recipe.yaml", f"# The resolved recipe of this run (uptrain {__version__}).\n"
                        f"# Continue it:  uptrain train {self.out / 'recipe.yaml'} resume=auto\n"
                        f"# Repeat it:    uptrain train {self.out / 'recipe.yaml'} out=NEW_FOLDER\n"
                        + self.r.to_yaml())
        self.acc.wait_for_everyone()

    def convert(self) -> str:
        """Convert model.path into OUT/step0 (kept across resumes), on the main process."""
        c, step0 = self.r.model.convert, self.out / STEP0
        if self.main:
            rec = (_read_json(step0 / "uptrain.json") or {}).get("conversion") or {}
            if (rec.get("groups"), rec.get("method"), rec.get("seed")) != (c.groups, c.method, c.seed):
                from uptrain.conversion import convert

                result = convert(self.r.model.path, str(step0), groups=c.groups, method=c.method, seed=c.seed,
                                 overwrite=True, revision=self.r.model.revision, progress=self.show)
                self.say(result.summary())
        self.acc.wait_for_everyone()
        return str(step0)

    # -- the steps ----------------------------------------------------------------------------------
    def loop(self, mode, t0, model, teacher, tokenizer, train_blocks, eval_blocks, n_train, path) -> TrainResult:
        import torch
        from torch.utils.data import DataLoader
        from tqdm.auto import tqdm

        r, acc, total = self.r, self.acc, self.budget.steps
        accum, o = r.train.grad_accum, r.optim
        trainable = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in trainable if p.ndim >= 2], "weight_decay": o.weight_decay},
                  {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0}]  # norms, biases
        optimizer = _adamw([g for g in groups if g["params"]], o, fused=acc.distributed_type not in _SHARDED)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_factor(s, total, o.warmup_steps, o.schedule, o.final_lr_ratio))
        samples = total * accum * r.train.micro_batch_size * acc.num_processes
        loader = DataLoader(BlockStream(train_blocks, samples, r.train.seed, r.data.shuffle),
                            batch_size=r.train.micro_batch_size, shuffle=False, pin_memory=acc.device.type == "cuda")
        model, optimizer, loader, scheduler = acc.prepare(model, optimizer, loader, scheduler)
        if acc.gradient_accumulation_steps != accum:  # a DeepSpeed config may set its own
            raise UptrainError(f"the accelerate config accumulates {acc.gradient_accumulation_steps} micro-batches, "
                               f"the recipe's train.grad_accum {accum}; make them equal (or leave it 'auto')")

        start, history, evals, resumed = 0, [], [], None
        if mode == "resume":
            ckpt = latest_checkpoint(self.out)
            state = _read_json(ckpt / STATE_FILE)
            if state["processes"] != acc.num_processes:
                raise UptrainError(f"the checkpoint {ckpt} was written by {state['processes']} process(es); resume "
                                   f"with the same number (now {acc.num_processes}) to keep the data order")
            acc.load_state(str(ckpt))
            start, history, evals = state["step"], state["history"], state["eval_history"]
            loader, resumed = acc.skip_first_batches(loader, start * accum), start
            self.say(f"resuming from {ckpt} at step {start}")
        self.metrics = self.open_metrics(start)
        if r.log.trackers:
            acc.init_trackers(r.log.project, config=_flat(r.to_dict()))
        stop = min(total, r.budget.stop_at or total)
        bar = tqdm(total=total, initial=start, desc="uptrain", unit="step", disable=not self.show, dynamic_ncols=True)
        ckpt_path, t_run, device = latest_checkpoint(self.out), time.time(), acc.device
        try:
            if start == 0 and r.eval.at_start:
                evals.append(self.evaluate(model, eval_blocks, 0, bar))
            model.train()
            batches = iter(loader)
            for step in range(start + 1, stop + 1):
                window = [next(batches) for _ in range(accum)]
                # Normalise by the target tokens of the whole window on all ranks (accelerate's recipe for
                # autoregressive models): DDP averages gradients over ranks and accelerate's backward
                # divides by the accumulation steps, hence the factor processes × accum.
                n_local = sum(b.shape[0] * (b.shape[1] - 1) for b in window)
                n_global = acc.reduce(torch.tensor(float(n_local), device=device), "sum")
                scale = acc.num_processes * accum / n_global
                sums = torch.zeros(2, device=device)
                for b in window:
                    with acc.accumulate(model):
                        ce, kl = token_losses(model, teacher, b.to(device).long(), r.distill.temperature,
                                              acc.autocast)
                        acc.backward((ce if kl is None else ce + r.distill.weight * kl) * scale)
                        sums[0] += ce.detach()
                        if kl is not None:
                            sums[1] += kl.detach()
                loss, kl_mean = (acc.reduce(sums, "sum") / n_global).tolist()
                if not (math.isfinite(loss) and math.isfinite(kl_mean)):
                    raise self.diverged(step, loss if not math.isfinite(loss) else kl_mean, ckpt_path)
                rec = {"step": step, "loss": loss, "lr": scheduler.get_last_lr()[0]}
                if o.grad_clip > 0:
                    rec["grad_norm"] = float(acc.clip_grad_norm_(model.parameters(), o.grad_clip))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                if teacher is not None:
                    rec["kl"] = kl_mean
                rec["tokens"] = step * self.budget.tokens_per_step
                rec["tokens_per_s"] = (step - start) * self.budget.tokens_per_step / (time.time() - t_run)
                history.append(rec)
                self.record(rec, step)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rec['tokens_per_s']:,.0f}", refresh=False)
                if r.eval.every and step % r.eval.every == 0 and step < total:
                    evals.append(self.evaluate(model, eval_blocks, step, bar))
                if (r.checkpoint.every and step % r.checkpoint.every == 0) or step == stop < total:
                    ckpt_path = self.save_checkpoint(step, {"step": step, "total_steps": total, "processes":
                                                            acc.num_processes, "history": history,
                                                            "eval_history": evals})
            final = None
            if stop == total:
                final = self.evaluate(model, eval_blocks, total, bar)
                if not evals or evals[-1]["step"] != total:
                    evals.append(final)
        finally:
            bar.close()
            if self.metrics:
                self.metrics.close()
        result = TrainResult(
            out=str(self.out), steps=stop, total_steps=total, tokens_seen=stop * self.budget.tokens_per_step,
            losses=[h["loss"] for h in history], eval_history=evals, final_eval=final,
            wall_time_s=time.time() - t0, finished=final is not None, history=history, resumed_from=resumed,
            trainable_parameters=n_train, process_index=acc.process_index)
        if final is not None:
            self.save_final(model, tokenizer, path, self.uptraining_record(result, path))
            if r.push_to_hub and self.main:
                from uptrain.hub import push

                self.say(push(str(self.out), repo_id=r.push_to_hub).summary())
        self.say(result.summary())
        return result

    def diverged(self, step, value, ckpt) -> UptrainError:
        where = (f"the last good checkpoint is {ckpt}: lower optim.lr or set optim.grad_clip and continue "
                 f"from it with resume: auto" if ckpt else "no checkpoint was saved (checkpoint.every is 0)")
        return UptrainError(f"the loss became {value} at step {step}; stopped before updating the weights, "
                            f"{where}")

    # -- evaluation, logging, checkpoints -----------------------------------------------------------
    def evaluate(self, model, blocks, step: int, bar) -> dict:
        """Held-out loss with uptrain.evaluation.perplexity, the blocks sharded over the processes."""
        import torch

        from uptrain.evaluation import perplexity

        acc, world = self.acc, self.acc.num_processes
        n = len(blocks) // world * world  # equal shards: FSDP/DeepSpeed ranks must run the same forwards
        shard = blocks[acc.process_index:n:world] if n else blocks
        sharded = acc.distributed_type in _SHARDED
        with acc.autocast():
            res = perplexity(model if sharded else acc.unwrap_model(model), shard, batch_size=self.r.eval.batch_size)
        sums = torch.tensor([res["loss"] * res["tokens"], float(res["tokens"])], dtype=torch.float64,
                            device=acc.device)
        nll, tokens = (acc.reduce(sums, "sum") / (1 if n else world)).tolist()
        model.train()
        loss = nll / tokens
        ev = {"step": step, "loss": loss, "perplexity": math.exp(min(loss, 700.0)), "tokens": int(tokens)}
        self.record({"step": step, "eval_loss": loss, "eval_perplexity": ev["perplexity"]}, step)
        if self.show:
            bar.write(f"step {step}: held-out loss {loss:.4f}, perplexity {ev['perplexity']:.2f}")
        return ev

    def open_metrics(self, start: int):
        """metrics.jsonl, opened for appending; on resume the lines past the checkpoint are dropped."""
        if not self.main:
            return None
        path = self.out / "metrics.jsonl"
        if start and path.is_file():
            keep = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line)["step"] <= start]
            _write_text(path, "".join(line + "\n" for line in keep))
        return open(path, "a", encoding="utf-8", buffering=1)  # line-buffered: a killed run keeps its lines

    def record(self, rec: dict, step: int) -> None:
        if self.metrics:
            self.metrics.write(json.dumps(rec) + "\n")
        if self.r.log.trackers:
            self.acc.log({k: v for k, v in rec.items() if k != "step"}, step=step)

    def save_checkpoint(self, step: int, state: dict) -> Path:
        """accelerate's save_state into step_N.tmp, then trainer_state.json, then a rename: a kill at
        any moment leaves either the complete checkpoint or none. The newest `checkpoint.keep` stay."""
        folder = self.out / CHECKPOINTS
        final, tmp = folder / f"step_{step:08d}", folder / f"step_{step:08d}.tmp"
        if self.main:
            shutil.rmtree(tmp, ignore_errors=True)
            folder.mkdir(parents=True, exist_ok=True)
        self.acc.wait_for_everyone()
        self.acc.save_state(str(tmp))
        self.acc.wait_for_everyone()
        if self.main:
            _write_json(tmp / STATE_FILE, state)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            done = sorted(p for p in folder.glob("step_*") if p.suffix != ".tmp")
            for old in done[: -self.r.checkpoint.keep]:
                shutil.rmtree(old)
        self.acc.wait_for_everyone()
        return final

    def save_final(self, model, tokenizer, init_path: str, record: dict) -> None:
        """A normal HF checkpoint in OUT; uptrain.json (written last) keeps the init model's records
        (its conversion) and adds this uptraining."""
        from uptrain import __version__

        self.acc.wait_for_everyone()
        state_dict = self.acc.get_state_dict(model)  # gathers FSDP / ZeRO-3 shards
        if self.main:
            self.acc.unwrap_model(model).save_pretrained(self.out, state_dict=state_dict, max_shard_size="5GB")
            tokenizer.save_pretrained(self.out)
            base = _read_json(Path(init_path) / "uptrain.json") or {}
            rec = {k: v for k, v in base.items() if k not in ("uptraining", "uptrain_version")}
            _write_json(self.out / "uptrain.json", {"uptrain_version": __version__, **rec, "uptraining": record})
        self.acc.wait_for_everyone()

    def uptraining_record(self, res: TrainResult, init_path: str) -> dict:
        r, b = self.r, self.budget
        return {
            "recipe": r.to_dict(), "recipe_file": self.recipe_file, "base_model": r.model.path,
            "init": init_path, "data": r.data.source,
            "steps": res.steps, "tokens_seen": res.tokens_seen, "alpha": b.alpha, "budget": b.text,
            "params": r.train.params, "trainable_parameters": res.trainable_parameters,
            "processes": self.acc.num_processes, "mixed_precision": str(self.acc.mixed_precision),
            "seq_len": r.data.seq_len, "lr": r.optim.lr, "schedule": r.optim.schedule,
            "distillation": {"teacher": r.distill.teacher, "weight": r.distill.weight,
                             "temperature": r.distill.temperature} if "kl" in (res.history or [{}])[-1] else None,
            "initial_eval": res.eval_history[0] if res.eval_history and res.eval_history[0]["step"] == 0 else None,
            "final_eval": res.final_eval, "eval_history": res.eval_history,
            "first_loss": res.losses[0], "last_loss": res.losses[-1],
            "wall_time_s": round(res.wall_time_s, 2),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }


def _flat(d: dict, prefix: str = "") -> dict:
    """Nested recipe → {"optim.lr": 1e-4, …} with scalar values (what trackers accept as hyper-parameters)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out
