"""Pre-flight: what the end of a run needs, checked before its first step and before OUT is touched, each
with one clear message — OUT can be written; the disk holds the final model plus the checkpoints the recipe
keeps; the model can be saved (a truly quantized checkpoint is refused, a leftover quantization_config on
plain float weights is dropped with a note); `push_to_hub` names a valid repo and a token is there.

Disk estimate (bytes), from the stored tensors of model.path (their count after a conversion: K/V rows scale
by G/K) and the recipe:
    final model    parameters × bytes of the dtype it is saved in (train.save_dtype, else the source's)
    checkpoint     parameters × bytes of model.dtype                    the weights accelerate saves
                 + trainable × 2 moments × bytes of model.dtype        torch AdamW keeps them in the param dtype
                   (DeepSpeed: trainable × 12, fp32 master weights and two fp32 moments, 8 for float32 models)
    checkpoints    min(keep, saves) + 1 of them at the peak: a new one is written before the oldest goes, and
                   a preemption or a failed final save writes one even with checkpoint.every: 0
    step0          the converted model in the source dtypes, when the recipe converts and OUT has none yet
    small files    64 MiB allowance: tokenizer, records, metrics
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from uptrain.checkpoint import CHECKPOINT_FILES, DTYPE_SIZES, check_free_space, quantization, weight_table
from uptrain.errors import UptrainError
from uptrain.files import check_folder_writable
from uptrain.hf import Source, check_hub_id, check_hub_token, hub_token, local_folder
from uptrain.record import try_read_record
from uptrain.report import fmt_bytes, fmt_count
from uptrain.training.recipe import Recipe
from uptrain.training.run_folder import STEP0, checkpoints

MODEL_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
SMALL_FILES = 64 << 20


@dataclass
class Preflight:
    """What the checks found: notes to print and whether the model loads without its leftover
    quantization_config."""

    notes: list[str] = field(default_factory=list)
    drop_quantization_config: bool = False


def preflight(r: Recipe, out: Path, mode: str, src: Source, spec, kv_heads: int, total_steps: int,
              save_dtype: str, distributed: str) -> Preflight:
    """Run every check; raises the first problem as an UptrainError. save_dtype: what the final model is saved
    in; distributed: accelerate's distributed type."""
    result = Preflight()
    check_folder_writable(out)
    folder = local_folder(src, CHECKPOINT_FILES)[0]  # a Hub model: the download training needs anyway
    quant = quantization(folder)
    quant.check("model.path", src.name)
    if quant.leftover and not r.model.convert:  # (the converter drops it from step0 itself, with the note)
        result.drop_quantization_config = True
        result.notes.append(quant.note("model.path", src.name))
    estimate = disk_estimate(r, out, mode, weight_table(folder), spec, kv_heads, total_steps, save_dtype,
                             distributed)
    freed = folder_bytes(out) if mode == "overwrite" else 0  # OUT is emptied before anything is written
    free = check_free_space(out, estimate.total - freed, estimate.text(),
                            "free space, lower checkpoint.keep, or choose an `out` on a larger disk")
    result.notes.append(f"disk: about {fmt_bytes(estimate.total)} needed, {fmt_bytes(free + freed)} free "
                        f"({estimate.text()})")
    if r.push_to_hub:
        check_hub_id(r.push_to_hub, "push_to_hub")
        token = hub_token()
        if not token:
            raise UptrainError(f"push_to_hub: {r.push_to_hub} needs a Hugging Face token with write access, and "
                               f"none was found: set HF_TOKEN or run `hf auth login` before training (or drop "
                               f"push_to_hub and run `uptrain push` later)")
        unchecked = check_hub_token(token, "push_to_hub")
        if unchecked:
            result.notes.append(f"push_to_hub: {unchecked}")
    return result


@dataclass
class DiskEstimate:
    parts: list[tuple[str, int, str]]  # (what, bytes, how it was estimated)

    @property
    def total(self) -> int:
        return sum(n for _, n, _ in self.parts)

    def text(self) -> str:
        return " + ".join(f"{what} {fmt_bytes(n)}" + (f" ({how})" if how else "") for what, n, how in self.parts if n)


def disk_estimate(r: Recipe, out: Path, mode: str, table: dict, spec, kv_heads: int, total_steps: int,
                  save_dtype: str, distributed: str) -> DiskEstimate:
    """The bytes a run writes into OUT at its peak (the module docstring says how)."""
    from uptrain.training.setup import trainable_mask

    convert = r.model.convert
    count, stored = {}, 0  # parameters per tensor after the conversion; bytes of step0 in the source dtypes
    for name, (dtype, shape) in table.items():
        n = math.prod(shape)
        try:
            kind, layer, _ = spec.classify(name)
            if kind == "kv" and convert:  # a KV budget keeps at most that fraction of the K/V weights
                n = (math.floor(n * convert.kv_budget) if convert.kv_budget is not None
                     else n * convert.kv_heads.at(layer) // kv_heads)  # its layer's G (G_l, or the one G)
        except UptrainError:
            pass  # a tensor the attention spec does not classify is copied as it is
        count[name] = n
        stored += n * DTYPE_SIZES.get(dtype, 4)
    params = sum(count.values())
    mask = trainable_mask(list(count), spec, r.train.params, strict=False)  # a checkpoint's names: an estimate
    trainable = sum(n for name, n in count.items() if mask[name])
    b, fb = MODEL_BYTES[r.model.dtype], MODEL_BYTES[save_dtype]
    if distributed == "DEEPSPEED":
        optim, how = trainable * (8 if b == 4 else 12), "DeepSpeed AdamW: fp32 master weights and 2 fp32 moments"
    else:
        optim, how = trainable * 2 * b, f"AdamW: 2 {r.model.dtype} moments"
    ckpt = params * b + optim
    saves = total_steps // r.checkpoint.every if r.checkpoint.every else 0
    peak = min(r.checkpoint.keep, saves) + 1
    n_ckpt = max(1, peak - (len(checkpoints(out)) if mode == "resume" else 0))
    step0 = stored if r.model.convert and not step0_reusable(out, r.model.convert) else 0
    return DiskEstimate([
        ("final model", params * fb, f"{fmt_count(params)} parameters × {fb} bytes, {save_dtype}"),
        (f"{n_ckpt} checkpoint{'s' if n_ckpt > 1 else ''}", n_ckpt * ckpt,
         f"{fmt_bytes(ckpt)} each: the weights + {how} for {fmt_count(trainable)} trainable parameters"),
        ("the converted step0", step0, "in the source dtypes"),
        ("small files", SMALL_FILES, "tokenizer, records, metrics"),
    ])


def step0_reusable(out: Path, options) -> bool:
    """OUT/step0 holds a conversion with exactly these options (reused on resume or a rerun)."""
    done = try_read_record(Path(out) / STEP0)
    return bool(done and done.conversion and done.conversion.options == options.recorded())


def folder_bytes(folder: Path) -> int:
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
