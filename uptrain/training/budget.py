"""How long uptraining runs and at which learning rate: pure arithmetic, no I/O."""
from __future__ import annotations

import math
from dataclasses import dataclass

from uptrain.errors import UptrainError


@dataclass
class Budget:
    steps: int
    tokens_per_step: int
    alpha: float | None
    text: str


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
