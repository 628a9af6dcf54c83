"""Pure tensor functions on one tensor's KV-head rows: split into contiguous groups and merge each group
into one head. No I/O, no architecture names.

A KV-headed tensor has K·d rows (d = head_dim), head k owning rows [k·d, (k+1)·d); trailing dims (the
input features of a weight) are untouched. Merging to G heads views it as [G, n = K/G, d, …] and reduces
over n. All math runs in float32; the caller casts back to the checkpoint dtype.
"""
from __future__ import annotations

import math

import torch


def split_groups(t: torch.Tensor, groups: int, head_dim: int) -> torch.Tensor:
    """[K·d, …] → [G, K/G, d, …] (a view)."""
    rows = t.shape[0]
    if rows % head_dim or (rows // head_dim) % groups:
        raise ValueError(f"{rows} rows are not {groups} groups of heads of {head_dim} rows")
    n = rows // head_dim // groups
    return t.view(groups, n, head_dim, *t.shape[1:])


def merge_groups(g: torch.Tensor) -> torch.Tensor:
    """[G, d, …] → [G·d, …]."""
    return g.reshape(g.shape[0] * g.shape[1], *g.shape[2:])


def pool_mean(t: torch.Tensor, groups: int, head_dim: int, **_) -> torch.Tensor:
    """The paper's method: each result head is the mean of its group's heads."""
    return merge_groups(split_groups(t.float(), groups, head_dim).mean(dim=1))


def pool_first(t: torch.Tensor, groups: int, head_dim: int, **_) -> torch.Tensor:
    """Ablation (paper Fig. 4): keep the first head of each group."""
    return merge_groups(split_groups(t.float(), groups, head_dim)[:, 0])


def pool_random(t: torch.Tensor, groups: int, head_dim: int, kind: str = "weight",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Ablation (paper Fig. 4): fresh initialisation. Weights ~ N(0, σ²) with σ the source tensor's own
    standard deviation (keeps activation scale sane whatever the model's init); biases 0, norm weights 1
    (what transformers' own init gives)."""
    split_groups(t, groups, head_dim)  # validates the row count
    shape = (groups * head_dim, *t.shape[1:])
    if kind == "bias":
        return torch.zeros(shape)
    if kind == "norm":
        return torch.ones(shape)
    std = t.float().std().item() if t.numel() > 1 else 1.0
    return torch.randn(shape, generator=generator) * std


def pool_mean_norm(t: torch.Tensor, groups: int, head_dim: int, **_) -> torch.Tensor:
    """Data-free variant: mean-pool, then rescale each pooled row to the mean norm of the rows it came
    from. Averaging heads that point in different directions shrinks them; this undoes the shrinkage.
    1-D tensors (biases, norm weights) are plain means: a scalar row has no direction to keep."""
    g = split_groups(t.float(), groups, head_dim)
    pooled = g.mean(dim=1)
    if t.dim() == 1:
        return merge_groups(pooled)
    target = g.norm(dim=-1).mean(dim=1, keepdim=True)  # [G, 1, d] → mean source row norm per result row
    norm = pooled.norm(dim=-1, keepdim=True)
    scale = torch.where(norm > 0, target.squeeze(1).unsqueeze(-1) / norm.clamp_min(1e-30), torch.ones_like(norm))
    return merge_groups(pooled * scale)


POOLERS = {"mean": pool_mean, "first": pool_first, "random": pool_random, "mean-norm": pool_mean_norm}


def expand_groups(pooled: torch.Tensor, groups: int, n: int, head_dim: int) -> torch.Tensor:
    """Inverse view of pooling for error measurement: [G·d, …] → [G·n·d, …], each head repeated n times."""
    g = pooled.view(groups, 1, head_dim, *pooled.shape[1:])
    return g.expand(groups, n, head_dim, *pooled.shape[1:]).reshape(groups * n * head_dim, *pooled.shape[1:])


def _sum_squares(t: torch.Tensor) -> float:
    """Σ t² of a float32 tensor, accurate to ~1e-7 relative at any size: float32 norms of rows (short sums),
    added up in float64. (One float32 norm over millions of values drifts by ~1e-4.)"""
    if t.numel() == 0:
        return 0.0
    rows = torch.linalg.vector_norm(t.reshape(t.shape[0], -1), dim=-1)
    return rows.double().square().sum().item()


def _sum_products(a: torch.Tensor, b: torch.Tensor) -> float:
    """Σ a·b, accumulated like `_sum_squares`."""
    if a.numel() == 0:
        return 0.0
    return (a * b).reshape(a.shape[0], -1).sum(dim=-1).double().sum().item()


CLOSED_FORM_MIN = 1e-2  # below this squared relative error the closed form loses digits: compute it directly


def pooling_error(source: torch.Tensor, pooled: torch.Tensor, groups: int, head_dim: int, *,
                  is_mean: bool = False) -> float:
    """‖W − repeat(pooled)‖ / ‖W‖: how much of the group's heads the merged head does not represent
    (0 when the heads of each group were already equal). A weight's error, recorded per layer as k_rel_error /
    v_rel_error (refine.relative_error is another measure: of the attention's outputs on calibration data).

    Computed without the expanded copy: with S_g the sum of group g's n heads,
    ‖W − repeat(P)‖² = ‖W‖² − 2⟨S, P⟩ + n‖P‖² (for mean pooling P = S/n, so ‖W‖² − n‖P‖²), sums
    accumulated in float64. When the result is small (the heads nearly equal) that difference cancels, so
    it is then computed directly from W − P broadcast over each group (exactly 0 for equal heads).
    `is_mean=True` says that `pooled` is pool_mean(source): the ⟨S, P⟩ pass is then skipped (P = S/n up to
    float32 rounding, which moves the result by < 1e-6 above the cut-over)."""
    src, p = source.float(), pooled.float()
    w2 = _sum_squares(src)
    if not w2:
        return 0.0
    g = split_groups(src, groups, head_dim)  # [G, n, d, …]
    n = g.shape[1]
    pg = p.view(groups, head_dim, *p.shape[1:])
    p2 = _sum_squares(p)
    err2 = w2 - n * p2 if is_mean else w2 - 2 * _sum_products(g.sum(dim=1), pg) + n * p2
    if err2 <= CLOSED_FORM_MIN * w2:
        diff = g - pg.unsqueeze(1)
        err2 = _sum_squares(diff.reshape(src.shape[0], -1))
    return math.sqrt(max(err2, 0.0) / w2)


def pool_rows(t: torch.Tensor, segments: list[tuple[str, int, int]], groups: int, head_dim: int,
              pool, **kw) -> torch.Tensor:
    """Pool the k/v row segments of a (possibly fused) tensor; other segments (q) are copied.
    segments: [(role, start, stop)] in source rows, e.g. [("q", 0, H·d), ("k", H·d, …), ("v", …)]."""
    parts = []
    for role, a, b in segments:
        parts.append(pool(t[a:b], groups, head_dim, **kw) if role in ("k", "v") else t[a:b].float())
    if len(parts) == 1 and _fresh(parts[0], t):
        return parts[0]  # what cat would return, without its copy (a separate K or V tensor: the usual case)
    return torch.cat(parts, dim=0)


def _fresh(p: torch.Tensor, t: torch.Tensor) -> bool:
    """Whether `p` is a contiguous float32 tensor of its own, sharing no memory with `t` (as cat's result)."""
    return (p.dtype == torch.float32 and p.is_contiguous() and p.storage_offset() == 0
            and p.untyped_storage().data_ptr() != t.untyped_storage().data_ptr()
            and p.untyped_storage().nbytes() == p.numel() * 4)
