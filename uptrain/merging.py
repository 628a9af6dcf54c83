"""Calibration-aware K/V merging (method `aligned`) and similarity grouping: pure tensor math. The
conversion method that feeds it checkpoint tensors is uptrain/calibration/aligned.py.

Mean-pooling averages K heads that point in unrelated directions; on RoPE models the merged keys shrink
and blur and attention goes nearly uniform. Here each group of n KV heads is replaced by the one shared
head that best reproduces the group's keys and values on calibration activations X (second moment
C = XᵀX of the attention input, constant column appended so biases ride along as a last weight
column), and the per-head maps that link the shared head back to each original head are folded into the
query and output projections that read it. Nothing else changes: the result is a standard checkpoint.

V (any positions). Stack the group's heads M = [W_v,1; …; W_v,n] (n·d_h rows). The best rank-d_h fit in
the C metric keeps the top-d_h eigenvectors U of M C Mᵀ: W_v,h ≈ U_h W′ with W′ = Uᵀ M. The value a query
head reads becomes U_h v′, so o_proj's columns of every query head q that used head h absorb it:
W_o[:, q] ← W_o[:, q] U_h. Lossless whenever the group's values span ≤ d_h dimensions (equal heads, or
heads related by invertible d_h × d_h maps).

K with RoPE (HF rotate-half layout: dim f pairs with f + d_h/2, rotated by e^{iθ_f·pos}). Only maps
that commute with every position's rotation can move into the queries: per frequency pair one complex
number. Write head h's pair f as a complex row z_h,f = W_k[f] + i·W_k[f + d_h/2]; with a the top
eigenvector of the n × n Hermitian Z_fᴴ C Z_f the shared row is Σ_h a_h z_h,f, and k_h,f ≈ conj(a_h)·k′_f,
so every query head reading h multiplies its pair f by a_h. Scores Re(q_f·conj(k_f)·e^{iΔθ}) are then
unchanged, for every position and every rope_type that only rescales frequencies (linear, dynamic, yarn,
llama3, longrope). The 1/√d_h attention scale is untouched because d_h is.
K without RoPE: the same PCA as V, folded into W_q rows (W_q,q ← U_hᵀ W_q,q).

Weighting (the prototype: 4.6× → 3.6× source perplexity at step 0 on a 3 → 1 merge). V is fitted in the
metric of what reads it, L_h = (Σ_{q reads h} W_o,qᵀ W_o,q)^½; K per frequency by the energy of the
queries that read it, e_h,f = (Σ_q E|q_f|²)^½; non-RoPE K in the query second-moment metric.

Similarity grouping picks which KV heads share a result head from the pairwise merge residuals (K and V,
relative), then permutes query heads (q rows, o_proj columns) so that groups are contiguous again.

Partial rotary (RoPE on the first rotary_dims rows of a head): scores are the sum over the rotated rows
and the passed-through rows, so the first take the per-frequency fold and the rest the non-RoPE one.

Refused: norms between a projection and RoPE (qwen3's per-head q/k RMSNorm, olmo2's k_norm over all KV
heads) are nonlinear, so maps cannot be folded through them. There local reconstruction serves instead
(uptrain/calibration/refine.py): it fits the merged module without a closed form.
"""
from __future__ import annotations

import torch




# ------------------------------------------------------------------------------------------ pure math
def sqrt_psd(s: torch.Tensor, floor: float = 1e-10) -> tuple[torch.Tensor, torch.Tensor]:
    """(S^½, S^-½) of symmetric PSD matrices [..., d, d]; eigenvalues floored at floor·max so the
    inverse stays finite (directions nobody reads get almost no weight, which is what they deserve)."""
    w, v = torch.linalg.eigh((s + s.mT) / 2)
    w = w.clamp_min(floor * w.amax(-1, keepdim=True).clamp_min(1e-300))
    r = w.sqrt()
    return (v * r.unsqueeze(-2)) @ v.mT, (v / r.unsqueeze(-2)) @ v.mT


def head_gram(w: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Second moments of the heads' outputs: w [..., n, d_h, D], c [D, D] → [..., n, d_h, n, d_h]
    (entry (a, i, b, j) = E[out_a,i · out_b,j] over the calibration tokens)."""
    *lead, n, dh, big_d = w.shape
    m = w.reshape(*lead, n * dh, big_d)
    return (m @ c @ m.mT).view(*lead, n, dh, n, dh)


def group_gram(gram: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """The [G, n, d_h, n, d_h] Grams of the head groups idx [G, n] from one [K, d_h, K, d_h] Gram."""
    return gram[idx[:, :, None], :, idx[:, None, :], :].permute(0, 1, 3, 2, 4)


def merge_pca(w: torch.Tensor, gram: torch.Tensor, metric: tuple[torch.Tensor, torch.Tensor] | None = None):
    """One shared head for n heads in the C metric: w [..., n, d_h, D] (rows act on the augmented input),
    gram = head_gram(w, C); leading dims are independent groups.

    Returns (shared [..., d_h, D], maps [..., n, d_h, d_h], residual [...]) with w_h ≈ maps[h] @ shared;
    residual is the fraction of the group's (weighted) energy the shared head misses. metric = (L, L⁻¹)
    [..., n, d_h, d_h]: fit L_h w_h instead of w_h, then undo L_h in the maps."""
    *lead, n, dh, _ = w.shape
    target = gram.diagonal(dim1=-4, dim2=-2).diagonal(dim1=-3, dim2=-2).sum((-1, -2)) / n  # one head's energy
    if metric is not None:
        w = metric[0] @ w
        gram = torch.einsum("...aij,...ajbk,...blk->...aibl", metric[0], gram, metric[0])
    a = gram.reshape(*lead, n * dh, n * dh)
    evals, evecs = torch.linalg.eigh((a + a.mT) / 2)  # ascending
    evals = evals.clamp_min(0)
    u = evecs[..., -dh:].flip(-1)  # [..., n·d_h, d_h], strongest first
    shared, maps = u.mT @ w.reshape(*lead, n * dh, -1), u.reshape(*lead, n, dh, dh)
    # Balance the scale between the shared head and the maps: the shared head (whose energy is the kept
    # eigenvalues) gets the mean energy of the heads it replaces: n equal heads give back that head.
    kept = evals[..., -dh:].sum(-1)
    s = torch.where((kept > 0) & (target > 0), (target / kept.clamp_min(1e-300)).sqrt(), 1.0)
    shared, maps = shared * s[..., None, None], maps / s[..., None, None, None]
    if metric is not None:
        maps = metric[1] @ maps
    return shared, maps, evals[..., :-dh].sum(-1) / evals.sum(-1).clamp_min(1e-300)


def to_pairs(w: torch.Tensor) -> torch.Tensor:
    """[…, d_h, D] real rows → […, d_h/2, D] complex: pair f = row f + i·row f + d_h/2 (HF rotate-half)."""
    half = w.shape[-2] // 2
    return torch.complex(w[..., :half, :], w[..., half:, :])


def from_pairs(z: torch.Tensor) -> torch.Tensor:
    return torch.cat([z.real, z.imag], dim=-2)


def pair_gram(gram: torch.Tensor) -> torch.Tensor:
    """Per frequency pair, the n × n Hermitian conj(z_a) C z_b of complex heads z = row f + i·row f+d_h/2,
    from the real Gram [..., n, d_h, n, d_h] → [..., F, n, n] complex."""
    half = gram.shape[-1] // 2

    def part(i, j):  # [..., n, n, F]: entries (a, f + i·half, b, f + j·half)
        return gram[..., i * half:(i + 1) * half, :, j * half:(j + 1) * half].diagonal(dim1=-3, dim2=-1)

    g = torch.complex(part(0, 0) + part(1, 1), part(0, 1) - part(1, 0))
    return g.movedim(-1, -3)


def merge_rope(w: torch.Tensor, gram: torch.Tensor, energy: torch.Tensor | None = None):
    """One shared RoPE key head for n heads, per frequency pair: w [..., n, d_h, D], gram = head_gram(w, C),
    energy [..., n, d_h/2] (how strongly queries read head h at pair f; None = equal).

    Returns (shared [..., d_h, D], mult [..., n, d_h/2] complex, residual [...]): a query head that read
    head h keeps its scores by multiplying its pair f by mult[h, f]."""
    g = pair_gram(gram)  # [..., F, n, n]
    e = torch.ones(g.shape[:-3] + g.shape[-2:-1] + g.shape[-3:-2], dtype=w.dtype) if energy is None else energy
    et = e.transpose(-1, -2)  # [..., F, n]
    target = g.diagonal(dim1=-2, dim2=-1).real.mean(-1)  # [..., F] one head's energy at pair f
    evals, evecs = torch.linalg.eigh(g * (et.unsqueeze(-1) * et.unsqueeze(-2)))
    evals = evals.clamp_min(0)
    a = evecs[..., -1]  # [..., F, n] top eigenvector per pair (of the weighted Hermitian)
    shared = ((a * et).unsqueeze(-1) * to_pairs(w).transpose(-3, -2)).sum(-2)  # Σ_h a_h e_h z_h: [..., F, D]
    mult = (a / et).transpose(-1, -2)  # [..., n, F]
    # Scale per pair: the shared key (energy: the top eigenvalue) gets the mean energy of the heads it
    # replaces (n equal heads → that head).
    s = torch.where(evals[..., -1] > 0, (target / evals[..., -1].clamp_min(1e-300)).sqrt(), 1.0)
    shared, mult = shared * s.unsqueeze(-1), mult / s.unsqueeze(-2)
    return from_pairs(shared), mult, evals[..., :-1].sum((-1, -2)) / evals.sum((-1, -2)).clamp_min(1e-300)


def query_energy(q: torch.Tensor, c: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """√(Σ over the query heads reading KV head h of E|q_f|²) per (h, pair f): q [H, d_h, D] → [K, d_h/2]."""
    heads, dh, _ = q.shape
    rows = ((q @ c) * q).sum(-1).clamp_min(0)  # [H, d_h]: energy of each query row
    pairs = rows[:, : dh // 2] + rows[:, dh // 2:]
    e = pairs.view(kv_heads, heads // kv_heads, dh // 2).sum(1).sqrt()
    return e.clamp_min(1e-6 * float(e.max()) if e.numel() and e.max() > 0 else 1e-30)


def output_metric(o: torch.Tensor, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_h, L_h⁻¹) with L_h² = Σ_{q reads h} W_o,qᵀ W_o,q: o [out, H·d_h] → two [K, d_h, d_h]."""
    cols = o.view(o.shape[0], -1, head_dim).transpose(0, 1)  # [H, out, d_h]
    s = (cols.mT @ cols).view(kv_heads, -1, head_dim, head_dim).sum(1)
    return sqrt_psd(s)


def query_metric(q: torch.Tensor, c: torch.Tensor, kv_heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_h, L_h⁻¹) with L_h² = Σ_{q reads h} W_q C W_qᵀ (the non-RoPE key metric): q [H, d_h, D]."""
    heads, dh, _ = q.shape
    s = (q @ c @ q.mT).view(kv_heads, heads // kv_heads, dh, dh).sum(1)
    return sqrt_psd(s)


# ------------------------------------------------------------------------------------------ grouping
def pair_costs(k_parts, v_gram: torch.Tensor, v_metric) -> torch.Tensor:
    """[K, K] relative residual of merging each pair of KV heads (K part + V part); diagonal 0.
    k_parts: per key segment (Gram [K, d, K, d], rope, weight): weight is the query energy [K, d/2] (RoPE)
    or a (L, L⁻¹) query metric (no RoPE); v_gram [K, d_h, K, d_h]; v_metric: (L, L⁻¹) or None."""
    cost = _pca_pair_costs(v_gram, v_metric)
    for k_gram, rope, k_weight in k_parts:
        cost = cost + (_rope_pair_costs(k_gram, k_weight) if rope else _pca_pair_costs(k_gram, k_weight))
    cost.fill_diagonal_(0)
    return cost


def _rope_pair_costs(k_gram: torch.Tensor, k_weight) -> torch.Tensor:
    g = pair_gram(k_gram)  # [F, K, K]
    if k_weight is not None:
        et = k_weight.T
        g = g * et.unsqueeze(-1) * et.unsqueeze(-2)
    d = g.diagonal(dim1=-2, dim2=-1).real  # [F, K]
    ga, gb = d.unsqueeze(-1), d.unsqueeze(-2)
    lam_min = (ga + gb) / 2 - (((ga - gb) / 2) ** 2 + g.abs() ** 2).sqrt()  # smaller eigenvalue of each 2×2
    return lam_min.clamp_min(0).sum(0) / (ga + gb).sum(0).clamp_min(1e-300)


def _pca_pair_costs(gram: torch.Tensor, metric) -> torch.Tensor:
    n_kv, dh = gram.shape[:2]
    if metric is not None:
        gram = torch.einsum("aij,ajbk,blk->aibl", metric[0], gram, metric[0])
    a_idx, b_idx = torch.triu_indices(n_kv, n_kv, 1)
    cost = torch.zeros(n_kv, n_kv, dtype=gram.dtype)
    for i in range(0, len(a_idx), 64):  # bounded memory for many heads
        pairs = torch.stack([a_idx[i: i + 64], b_idx[i: i + 64]], 1)  # [P, 2]
        blocks = group_gram(gram, pairs).reshape(-1, 2 * dh, 2 * dh)
        ev = torch.linalg.eigvalsh((blocks + blocks.mT) / 2).clamp_min(0)
        rel = ev[:, :dh].sum(-1) / ev.sum(-1).clamp_min(1e-300)
        cost[pairs[:, 0], pairs[:, 1]] = rel
        cost[pairs[:, 1], pairs[:, 0]] = rel
    return cost


def partition(cost: torch.Tensor, groups: int) -> list[list[int]]:
    """Split K heads into `groups` groups of equal size with a small total within-group pair cost:
    greedy growth from the tightest seed, then pairwise swaps between groups while the total drops."""
    n_kv = cost.shape[0]
    n = n_kv // groups
    cost = cost.double()
    if n == 1 or groups == 1:
        return [list(range(j * n, (j + 1) * n)) for j in range(groups)]
    free, out = set(range(n_kv)), []
    while free:
        def tightness(h):
            return sum(sorted(float(cost[h, o]) for o in free if o != h)[: n - 1])
        group = [min(sorted(free), key=tightness)]
        while len(group) < n:
            group.append(min(sorted(free - set(group)), key=lambda o: float(cost[o, group].sum())))
        out.append(group)
        free -= set(group)
    improved = True
    while improved:
        improved = False
        for ga in range(groups):
            for gb in range(ga + 1, groups):
                for ia in range(n):
                    for ib in range(n):
                        a, b = out[ga][ia], out[gb][ib]
                        rest_a = [h for h in out[ga] if h != a]
                        rest_b = [h for h in out[gb] if h != b]
                        delta = (cost[b, rest_a].sum() + cost[a, rest_b].sum()
                                 - cost[a, rest_a].sum() - cost[b, rest_b].sum())
                        if delta < -1e-12:
                            out[ga][ia], out[gb][ib] = b, a
                            improved = True
    return sorted(sorted(g) for g in out)


# ------------------------------------------------------------------------------------------ one layer
def key_segments(head_dim: int, rope: bool, rotary_dims: int | None = None,
                 static_pairs: int = 0) -> list[tuple[list[int], bool]]:
    """Rows of a key head merged apart: [(rows, rotated)], rows in the order the merge sees them (for a rotated
    segment: its pairs' first rows, then their second rows, as to_pairs reads them). Partial rotary (stablelm,
    phi with partial_rotary_factor) rotates the first rotary_dims rows (pairs f ↔ f + rotary_dims/2) and passes
    the rest through: scores are the sum of the parts, so each is merged in its own way. static_pairs: the
    slowest-turning pairs (the last of the rotated ones), merged as if unrotated (see `merge_attention`)."""
    if not rope:
        return [(list(range(head_dim)), False)]
    r = head_dim if rotary_dims is None else rotary_dims
    half = r // 2
    s = max(0, min(static_pairs, half))
    turning = list(range(half - s)) + list(range(half, r - s))
    static = list(range(half - s, half)) + list(range(r - s, r)) + list(range(r, head_dim))
    return [(rows, rot) for rows, rot in ((turning, True), (static, False)) if rows]


def merge_attention(q, k, v, o, c, groups: int, rope: bool = True, grouping: str = "contiguous",
                    weighted: bool = True, rotary_dims: int | None = None, static_pairs: int = 0):
    """Merge one layer's K/V heads into `groups` heads and fold the maps into q and o.

    q [H, d_h, D], k, v [K, d_h, D]: augmented rows (weight columns, then the bias as column D-1; zeros
    when the projection has no bias); o [out, H·d_h]; c [D, D] second moment of the augmented input.
    rotary_dims: rows of each head RoPE rotates (None: all); the others take the non-RoPE fold.
    static_pairs: the number of slowest-turning RoPE pairs merged as if they did not turn: one PCA over all their
    rows, with general maps folded into q, instead of one complex number per pair. On pre-trained models the
    slow pairs carry most of what keys match on, and a joint PCA keeps far more of it (the 135M model 3 → 1: a
    layer's attention error 0.46 → 0.09); the price is that a general map commutes with a pair's rotation only
    approximately, with an error growing with the pair's angle θ·distance, so callers pass only pairs that turn
    less than an eighth of a turn over the model's context (calibration/aligned.py: static_pairs).
    Query head p reads KV head p // (H/K) before and p // (H/G) after. float64 in, float64 out.
    Returns (q′, k′ [G, d_h, D], v′, o′, info) with info = {"kv_groups", "k_fit_error", "v_fit_error"}."""
    heads, dh, big_d = q.shape
    n_kv, out_dim = k.shape[0], o.shape[0]
    r, n = heads // n_kv, n_kv // groups
    segments = key_segments(dh, rope, rotary_dims, static_pairs)
    v_metric = output_metric(o, n_kv, dh) if weighted else None
    k_weights = [None if not weighted else query_energy(q[:, rows], c, n_kv) if rot else
                 query_metric(q[:, rows], c, n_kv) for rows, rot in segments]
    # all the calibration the merge needs: Grams [K, d, K, d] of each key segment and of the values
    k_grams, v_gram = [head_gram(k[:, rows], c) for rows, _ in segments], head_gram(v, c)
    if grouping == "similarity":
        parts = [(g, rot, w) for g, (_, rot), w in zip(k_grams, segments, k_weights)]
        sets = partition(pair_costs(parts, v_gram, v_metric), groups)
    elif grouping == "contiguous":
        sets = [list(range(j * n, (j + 1) * n)) for j in range(groups)]
    else:
        raise ValueError(f"unknown grouping {grouping!r}")  # ConvertOptions.check names the choices

    idx = torch.tensor(sets)  # [G, n]: source KV heads of each result head
    qperm = (idx.reshape(-1, 1) * r + torch.arange(r)).reshape(-1)  # query heads, grouped contiguously
    q = q[qperm].view(groups, n, r, dh, big_d)
    o = o.view(out_dim, heads, dh)[:, qperm].view(out_dim, groups, n, r, dh)
    sub = (lambda m: None if m is None else (m[0][idx], m[1][idx]))
    v_new, v_maps, v_res = merge_pca(v[idx], group_gram(v_gram, idx), sub(v_metric))
    o = torch.einsum("ognrd,gnde->ognre", o, v_maps)  # W_o[:, q] ← W_o[:, q] B_h
    k_new, q_new, k_res = k.new_zeros(groups, dh, big_d), torch.empty_like(q), 0.0
    for (rows, rot), gram, weight in zip(segments, k_grams, k_weights):
        ks, qs = k[idx][:, :, rows], q[:, :, :, rows]
        if rot:
            merged, mult, res = merge_rope(ks, group_gram(gram, idx), None if weight is None else weight[idx])
            qs = from_pairs(to_pairs(qs) * mult[:, :, None, :, None])
        else:
            merged, k_maps, res = merge_pca(ks, group_gram(gram, idx), sub(weight))
            qs = torch.einsum("gnde,gnrdx->gnrex", k_maps, qs)  # W_q,q ← B_hᵀ W_q,q
        k_new[:, rows] = merged
        q_new[:, :, :, rows] = qs
        k_res += float(res.mean()) * len(rows) / dh  # a segment's share of the rows
    q = q_new
    info = {"kv_groups": sets, "k_fit_error": k_res, "v_fit_error": float(v_res.mean())}
    return q.reshape(heads, dh, big_d), k_new, v_new, o.reshape(out_dim, heads * dh), info
