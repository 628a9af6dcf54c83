"""What a run is made of before its first step: the accelerator, the models (through uptrain/hf.py), the
trainable parameters and the optimiser. Errors here come before the output folder is touched."""
from __future__ import annotations

from pathlib import Path

from uptrain.errors import UptrainError
from uptrain.hf import Source, load_config, load_tokenizer, resolve
from uptrain.training.recipe import Recipe


# ---------------------------------------------------------------------------------------- accelerate
def reset_accelerate(world: int) -> None:
    """accelerate keeps process-wide singletons (AcceleratorState, GradientState): a second train() in one
    process (the demo, a notebook) with other settings needs them cleared. Launched runs keep theirs."""
    if world > 1:
        return
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def make_accelerator(r: Recipe, out: Path, world: int):
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
def model_source(path: str, revision: str | None, what: str) -> tuple[Source, object]:
    """(source, config) of a causal LM the attention table knows, or one clear error naming `what`."""
    from uptrain.arch import spec_for_config

    src = resolve(path, revision, what=what)
    cfg = load_config(src, causal=True)
    spec_for_config(cfg)  # raises for architectures the attention table does not know
    return src, cfg


def model_tokenizer(src: Source):
    tok = load_tokenizer(src, why="training tokenises the data with the model's own tokenizer: save it beside "
                                  "the weights")
    if tok.eos_token_id is None:
        raise UptrainError(f"the tokenizer of {src.what} {src.name!r} has no EOS token; packing needs one between "
                           f"documents")
    return tok


def check_teacher(r: Recipe, student_cfg, tokenizer, teacher) -> None:
    """A teacher must predict over the same vocabulary as the student (same size and same tokens)."""
    from uptrain.data import tokenizer_hash

    if teacher is not None:
        t_vocab, where = teacher.config.vocab_size, "the teacher"
    else:
        where = f"distill.teacher {r.distill.teacher!r}"
        t_vocab = model_source(r.distill.teacher, None, "distill.teacher")[1].vocab_size
    if t_vocab != student_cfg.vocab_size:
        raise UptrainError(f"{where} has a vocabulary of {t_vocab} tokens, the student {student_cfg.vocab_size}: "
                           f"distillation compares distributions over the same tokens")
    if teacher is None:
        try:
            t_tok = model_tokenizer(resolve(r.distill.teacher, what="distill.teacher"))
        except UptrainError:
            return  # weights-only teacher folder: the vocabulary size check is what we can do
        if tokenizer_hash(t_tok) != tokenizer_hash(tokenizer):
            raise UptrainError(f"{where} has a different tokenizer than the student (same size, other tokens); "
                               f"distillation needs the same token ids")


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


SHARDED = ("FSDP", "DEEPSPEED")  # DistributedType values whose parameters are sharded


def adamw(groups, o, fused: bool):
    """AdamW, the fused kernel where torch has one for the device (what transformers' Trainer uses too)."""
    import torch

    if fused:
        try:
            return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps, fused=True)
        except (RuntimeError, ValueError, TypeError):
            pass
    return torch.optim.AdamW(groups, lr=o.lr, betas=o.betas, eps=o.eps)


def enable_checkpointing(model) -> None:
    if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5.x name
        model.activation_checkpointing_enable()
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
