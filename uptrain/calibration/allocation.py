"""Per-layer KV heads under a KV-cache budget (`--kv-budget F`), as pure functions.

Layer l may keep G_l KV heads, G_l a divisor of its source's K_l (contiguous groups). Every layer has the same
head_dim and dtype, so the KV cache is proportional to Σ_l G_l: a budget F of the source's bytes is a budget
of B = ⌊F · Σ_l K_l⌋ heads. Given a measured loss for every layer at every candidate G (uptrain/conversion/
sensitivity.py: how far the model's next-token distribution moves when only that layer is converted), the
allocation minimises the summed loss under the budget — a multiple-choice knapsack (one item per layer, its
weight G, its cost the loss), solved exactly by dynamic programming over the heads used (L · B states).

Sums are exact (fractions.Fraction of the float losses), so an allocation does not depend on the order floats
were added in. Allocations whose summed loss is within TIE of the least are ties, broken by fewer heads, then by
the smaller tuple (G_0, G_1, …): a layer that loses nothing measures a loss of float rounding (~1e-8 nats, which
differs between CPUs), and a head bought for less than TIE is not worth its cache.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Mapping, Sequence

from uptrain.errors import UptrainError

TIE = 1e-6  # nats per token: summed predicted losses this close are equal (the KL's float rounding is far below)


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
    """The G_l (one key of each losses[l]) with Σ G_l ≤ budget and the least Σ losses[l][G_l]; among sums within
    TIE of the least, the fewest heads, then the smallest tuple. Raises when no choice fits the budget."""
    if not losses:
        raise ValueError("no layers to allocate KV heads to")
    if any(not layer for layer in losses):
        raise ValueError(f"layer {next(i for i, x in enumerate(losses) if not x)} has no candidate KV-head count")
    least = sum(min(layer) for layer in losses)
    if least > budget:
        raise UptrainError(f"a budget of {budget} KV heads is below the {least} that the fewest KV heads of every "
                           f"layer need")
    # least_after[l][h]: the least exact summed loss of layers l, l+1, … using exactly h heads (absent: impossible)
    least_after: list[dict[int, Fraction]] = [{} for _ in losses] + [{0: Fraction(0)}]
    for i in reversed(range(len(losses))):
        for h, rest in least_after[i + 1].items():
            for g, cost in losses[i].items():
                if h + g <= budget and (h + g not in least_after[i] or rest + Fraction(cost) < least_after[i][h + g]):
                    least_after[i][h + g] = rest + Fraction(cost)
    bound = min(least_after[0].values()) + Fraction(TIE)
    heads = min(h for h, loss in least_after[0].items() if loss <= bound)
    chosen: list[int] = []
    left, spent = heads, Fraction(0)
    for i, layer in enumerate(losses):  # each G_l as small as a completion within the bound allows
        g = min(g for g in layer if left - g in least_after[i + 1]
                and spent + Fraction(layer[g]) + least_after[i + 1][left - g] <= bound)
        chosen, left, spent = chosen + [g], left - g, spent + Fraction(layer[g])
    return Allocation(tuple(chosen), float(spent), heads, budget)
