"""Local reconstruction: fit one converted attention module to what the source's attention returned on the
calibration activations (`--refine-steps N`).

After the closed-form merge (mean, mean-norm, aligned …) the converted attention is a start, not an optimum:
what no fold can express (heads related by maps that do not commute with RoPE, per-head norms between
projection and RoPE, clamps) is simply lost. Here the module's own parameters (the shared
K/V projections, q and o, any attention norms) are fitted with Adam, in float32, to the source attention's
outputs Y on its recorded inputs X:

    min  Σ_b ‖attn′(X_b) − Y_b‖² / Σ_b ‖Y_b‖²      (relative error; one stored batch per step)

It calls the real module (whatever the architecture computes between projection and attention is in the
graph), so it needs no closed form. Before Adam, o_proj is refitted in closed form (ridge least squares
towards its merged value), which is exact for the last linear map once the rest is fixed. Each parameter
moves with a step size proportional to its own RMS (projections and norm weights differ by 100×), at a
constant rate (DEFAULT_LR). The result is kept only if it beats the start on batches held out of the fit
(one in 8, every kind of text of the calibration mix among them, given 8 or more; else on all) and makes no kind
of text worse there (holdout.py): a fit that only memorised a small calibration set, one that serves most kinds
at another's cost, or an exact merge (equal heads, G = K) made worse, is undone.
"""
from __future__ import annotations

import time
from typing import Any, Sequence

import torch

from uptrain.calibration.holdout import Row, held_out, judge, overall

DEFAULT_LR = 1.5e-2  # relative to each parameter's RMS, constant (measured on the 135M model: docs/calibration.md)
RIDGE = 1e-4  # o_proj refit: λ = RIDGE · mean diagonal of AᵀA (pulls badly determined directions to the merge)
EXACT = 1e-10  # a start with less (squared) relative error is exact already, up to float32 rounding


def rms_scale(p: torch.Tensor) -> float:
    """A tensor's RMS (at least 1e-3): steps are relative to it, as projections and norm weights differ by 100×."""
    return max(float(p.detach().float().square().mean().sqrt()), 1e-3)


@torch.no_grad()  # a measurement: without it a module whose parameters require grad warns on float()
def _sums(module, calls) -> list[list[Row]]:
    """Per call, per row of its batch (one calibration block): (‖attn(X) − Y‖², ‖Y‖²), float64 sums."""
    return [_rows(c(module), c.y) for c in calls]


def _rows(out: torch.Tensor, y: torch.Tensor) -> list[Row]:
    err = (out - y).double().square().reshape(y.shape[0], -1).sum(1)
    norm = y.double().square().reshape(y.shape[0], -1).sum(1)
    return list(zip(err.tolist(), norm.tolist()))


def relative_error(module, calls) -> float:
    """Σ‖attn(X) − Y‖² / Σ‖Y‖² over the recorded calls."""
    return overall(_sums(module, calls))


@torch.no_grad()
def refit_output(module, calls, o_proj: torch.nn.Linear, ridge: float = RIDGE) -> None:
    """o_proj ← argmin Σ‖A W′ᵀ + b′ − Y‖² + λ‖W′ − W‖² with A what o_proj reads (the heads' outputs):
    a linear least-squares problem once everything before o_proj is fixed. float64 normal equations."""
    ata, aty, _ = _output_equations(module, calls, o_proj)
    _solve_output(o_proj, ata, aty, ridge)


@torch.no_grad()
def _output_equations(module, calls, o_proj: torch.nn.Linear):
    """(AᵀA, AᵀY, per-call sums as `_sums` gives them) of o_proj's least squares, in one pass over the calls: the
    pass that sets up the refit also measures the error before it."""
    inputs, sums = [], []
    handle = o_proj.register_forward_pre_hook(lambda m, a: inputs.append(a[0]))
    width = o_proj.in_features + (o_proj.bias is not None)
    ata = torch.zeros(width, width, dtype=torch.float64, device=o_proj.weight.device)
    aty = torch.zeros(width, o_proj.out_features, dtype=torch.float64, device=o_proj.weight.device)
    try:
        for c in calls:
            inputs.clear()
            out = c(module)
            sums.append(_rows(out, c.y))
            a = inputs[0].reshape(-1, o_proj.in_features).double()
            if o_proj.bias is not None:
                a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)], 1)
            ata += a.T @ a
            aty += a.T @ c.y.reshape(-1, o_proj.out_features).double()
    finally:
        handle.remove()
    return ata, aty, sums


@torch.no_grad()
def _solve_output(o_proj: torch.nn.Linear, ata: torch.Tensor, aty: torch.Tensor, ridge: float = RIDGE) -> None:
    width = ata.shape[0]
    w0 = o_proj.weight.double().T
    if o_proj.bias is not None:
        w0 = torch.cat([w0, o_proj.bias.double()[None]], 0)
    lam = ridge * float(ata.diagonal().mean())
    if lam <= 0:
        return
    eye = torch.eye(width, dtype=ata.dtype, device=ata.device)
    w = torch.linalg.solve(ata + lam * eye, aty + lam * w0)
    o_proj.weight.copy_(w[:o_proj.in_features].T)
    if o_proj.bias is not None:
        o_proj.bias.copy_(w[-1])


def refine(module, calls, steps: int, lr: float = DEFAULT_LR, o_proj: torch.nn.Linear | None = None,
           seed: int = 0, train=None, kinds: Sequence[Sequence[str]] | None = None) -> dict:
    """Fit `module`'s parameters (in place) so that it reproduces each call's recorded output `y`.

    calls: AttentionCall-like (call(module) → output [rows, …], .y the target); o_proj: refitted in closed form
    first; train: which parameters Adam moves (a predicate on their names; all by default); kinds: per call, the
    kind of text of each row (None: one kind). Returns {"before", "after" (relative errors on all calls),
    "seconds"}, with "held_out" [before, after] when batches were held out (from HOLD_OUT on), with kinds
    "by_kind" {kind: [before, after]} and "worst_kind" on the judged batches (the held-out ones, else all), and
    "undone" when the fit did not lower the error there or made a kind's worse (holdout.judge): an exact merge
    (equal heads, G = K) is never made worse."""
    t0 = time.time()
    start = {n: p.detach().clone() for n, p in module.named_parameters()}
    labels = list(kinds) if kinds is not None else [("",)] * len(calls)
    if len(labels) != len(calls):  # a bug guard: one batch of blocks per call
        raise ValueError(f"{len(calls)} calls but the kinds of {len(labels)} batches")
    # With enough batches, some (every kind among them) are kept out of the fit and decide whether it is kept.
    held = set(held_out(labels))
    fit = [c for i, c in enumerate(calls) if i not in held]
    equations = None
    if o_proj is not None and steps > 0 and calls:  # o_proj's equations and the fit batches' error: one pass
        *equations, fit_sums = _output_equations(module, fit, o_proj)
        held_sums = iter(_sums(module, [calls[i] for i in sorted(held)]))
        fit_sums = iter(fit_sums)
        first = [next(held_sums) if i in held else next(fit_sums) for i in range(len(calls))]
    else:
        first = _sums(module, calls)
    before = overall(first)
    if steps <= 0 or before < EXACT or not calls:
        return {"before": before, "after": before, "seconds": round(time.time() - t0, 3)}
    if equations is not None and o_proj is not None:
        _solve_output(o_proj, equations[0], equations[1])
    names = [n for n, _ in module.named_parameters() if train is None or train(n)]
    params = [dict(module.named_parameters())[n] for n in names]
    scale = [rms_scale(p) for p in params]
    opt = torch.optim.Adam([{"params": [p], "lr": lr * s} for p, s in zip(params, scale)], betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    with torch.enable_grad():
        for p in params:
            p.requires_grad_(True)
        try:
            for _ in range(steps):
                if not order:
                    order = torch.randperm(len(fit), generator=gen).tolist()
                c = fit[order.pop()]
                loss = (c(module) - c.y).square().sum() / c.y.square().sum().clamp_min(1e-30)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        finally:
            for p in params:
                p.requires_grad_(False)
    last = _sums(module, calls)
    judged = sorted(held) or range(len(calls))
    verdict = judge([first[i] for i in judged], [last[i] for i in judged],
                    [labels[i] for i in judged] if kinds is not None else None)
    result: dict[str, Any] = {"before": before, "after": overall(last)}
    if held:
        result["held_out"] = [verdict.before, verdict.after]
    if kinds is not None:
        result.update(verdict.record())
    if not verdict.kept:
        with torch.no_grad():
            for n, p in module.named_parameters():
                p.copy_(start[n])
        result["after"] = before
        result["undone"] = True
    return {**result, "seconds": round(time.time() - t0, 3)}


def refine_attention(attn, o_name: str, calls, steps: int, seed: int = 0,
                     kinds: Sequence[Sequence[str]] | None = None) -> dict:
    """refine() on a layer's attention module, as a calibrated conversion runs it (and a KV budget's measure, which
    must refine as the conversion will): its output projection `o_name` refitted in closed form first where it is
    an nn.Linear (measured better: docs/calibration.md; GPT-2's Conv1D: Adam alone); kinds: per call, its rows'."""
    o_proj = attn.get_submodule(o_name)
    return refine(attn, calls, steps, o_proj=o_proj if isinstance(o_proj, torch.nn.Linear) else None, seed=seed,
                  kinds=kinds)
