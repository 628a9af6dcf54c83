"""How a checkpoint stores the tensors of attention, relative to the one form methods see.

Methods see every tensor in one canonical form: rows = heads × head_dim, the roles of a fused tensor one
after the other ([q | k | v]), input features along dim 1. How a checkpoint stores it instead is data too
(`Storage`): GPT-2's Conv1D keeps weights transposed ([in, out]); gpt_neox, gpt_bigcode and falcon fuse
q, k and v per KV head:

    per KV head (K = 2, H = 4):  [q0 q1 k0 v0 | q2 q3 k1 v1]    canonical:  [q0 q1 q2 q3 | k0 k1 | v0 v1]

(with K = H that is gpt_neox's [q k v] per head; with K = 1 the plain [q | k | v] of an MQA checkpoint.)
"""
from __future__ import annotations

from dataclasses import dataclass

# A row layout describes dim 0 of a tensor as consecutive segments of heads × head_dim rows.
# Roles: "q" (H heads, copied), "k"/"v" (K heads, pooled to G).
Layout = tuple[tuple[str, str], ...]  # ((role, count), …) with count "H" or "K"
K_ROWS: Layout = (("k", "K"),)
V_ROWS: Layout = (("v", "K"),)
QKV_ROWS: Layout = (("q", "H"), ("k", "K"), ("v", "K"))

# Buffers older checkpoints saved inside the attention module (names relative to it: GPT-2's and Pythia's causal
# masks, RoPE's inv_freq): copied as bytes, never parameters a calibrated method rewrites.
ATTENTION_BUFFERS = ("bias", "masked_bias", "rotary_emb.inv_freq")


@dataclass(frozen=True)
class Storage:
    """How a checkpoint stores one tensor, relative to its canonical form [heads × head_dim rows, …].

    transposed: stored [in, out] (GPT-2's Conv1D). order: the stored row of each canonical row (fused
    q/k/v per KV head), None when the rows are canonical. flat: stored [heads, head_dim] (cohere's per-head
    norm weights), canonical [heads · head_dim]. Works on any tensor with .t(), [list] and reshape (torch)."""

    transposed: bool = False
    order: tuple[int, ...] | None = None
    flat: bool = False

    @property
    def changes(self) -> bool:
        return self.transposed or self.order is not None or self.flat

    def canonical(self, t):
        if self.transposed:
            t = t.t()
        if self.flat:
            t = t.reshape(-1)
        if self.order is not None:
            t = t[list(self.order)]
        return t.contiguous() if self.changes else t

    def stored(self, t, shape: tuple[int, ...]):
        """The canonical `t` as this storage holds it; `shape`: the stored shape."""
        if self.order is not None:
            inverse = [0] * len(self.order)
            for canonical_row, stored_row in enumerate(self.order):
                inverse[stored_row] = canonical_row
            t = t[inverse]
        if self.transposed:
            t = t.t()
        if self.flat:
            t = t.reshape(shape)
        return t.contiguous() if self.changes else t


def per_kv_head_order(heads: int, kv_heads: int, head_dim: int) -> tuple[int, ...]:
    """Stored row of each canonical [q | k | v] row when q, k and v are fused per KV head: KV head j's block
    holds its H/K query heads, then its key, then its value (H/K + 2 heads of head_dim rows)."""
    n, d = heads // kv_heads, head_dim
    block = (n + 2) * d
    q = [(h // n) * block + (h % n) * d + r for h in range(heads) for r in range(d)]
    k = [j * block + n * d + r for j in range(kv_heads) for r in range(d)]
    v = [j * block + (n + 1) * d + r for j in range(kv_heads) for r in range(d)]
    return tuple(q + k + v)
