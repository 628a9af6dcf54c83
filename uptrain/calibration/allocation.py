"""Per-layer KV heads under a KV-cache budget (`--kv-budget F`), as pure functions.

Layer l may keep G_l KV heads, G_l a divisor of its source's K_l (contiguous groups). Every layer has the same
head_dim and dtype, so the KV cache is proportional to Σ_l G_l: a budget F of the source's bytes is a budget
of B = ⌊F · Σ_l K_l⌋ heads. Given a measured loss for every layer at every candidate G (uptrain/conversion/
sensitivity.py: how far the model's next-token distribution moves when only that layer is converted), the
allocation minimises the summed loss under the budget — a multiple-choice knapsack (one item per layer, its
weight G, its cost the loss), solved exactly by dynamic programming over the heads used (L · B states).

Sums are exact (fractions.Fraction of the float losses), so ties are real ties, broken by fewer heads, then by
the smaller tuple (G_0, G_1, …): an allocation does not depend on the order floats were added in.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Mapping, Sequence

from uptrain.errors import UptrainError


@dataclass(frozen=True)
class Allocation:
    groups: tuple[int, ...]  # G_l
    loss: float  # Σ_l loss_l(G_l): the predicted loss
    heads: int  # Σ_l G_l
    budget_heads: int  # B

    def to_dict(self) -> dict:
        return {**asdict(self), "groups": list(self.groups)}


def budget_heads(fraction: float, kv_heads: Sequence[int], said: str = "kv_budget") -> int:
    """B = ⌊F · Σ K_l⌋ KV heads (a hair of tolerance, so that 2/9 of 270 heads is 60, not 59); raises when even
    one head in every layer does not fit. `said`: the option as the caller wrote it (--kv-budget 0.1)."""
    total = sum(kv_heads)
    heads = math.floor(fraction * total + 1e-9)
    smallest = len(kv_heads)  # G = 1 everywhere: MQA in every layer
    if heads < smallest:
        least = Fraction(smallest, total)
        raise UptrainError(f"{said} keeps the bytes of {fraction * total:.3g} of the source's {total} KV heads (summed "
                           f"over its {len(kv_heads)} layers), but every layer needs at least one KV head: the "
                           f"smallest budget is {least} = {float(least):.4g} (MQA in every layer)")
    return heads


def allocate(losses: Sequence[Mapping[int, float]], budget: int) -> Allocation:
    """The G_l (one key of each losses[l]) with Σ G_l ≤ budget and the least Σ losses[l][G_l]; among equal
    losses the fewest heads, then the smallest tuple. Raises when no choice fits the budget."""
    if not losses:
        raise ValueError("no layers to allocate KV heads to")
    if any(not layer for layer in losses):
        raise ValueError(f"layer {next(i for i, x in enumerate(losses) if not x)} has no candidate KV-head count")
    least = sum(min(layer) for layer in losses)
    if least > budget:
        raise UptrainError(f"a budget of {budget} KV heads is below the {least} that the fewest KV heads of every "
                           f"layer need")
    # best[used] = (exact summed loss, G_0 … G_l) over the layers so far, using `used` heads
    best: dict[int, tuple[Fraction, tuple[int, ...]]] = {0: (Fraction(0), ())}
    for layer in losses:
        nxt: dict[int, tuple[Fraction, tuple[int, ...]]] = {}
        for used, (loss, chosen) in best.items():
            for g, cost in layer.items():
                if used + g > budget:
                    continue
                cand = (loss + Fraction(cost), chosen + (g,))
                if used + g not in nxt or cand < nxt[used + g]:
                    nxt[used + g] = cand
        best = nxt
    used, (loss, chosen) = min(best.items(), key=lambda kv: (kv[1][0], kv[0], kv[1][1]))
    return Allocation(chosen, float(loss), used, budget)
