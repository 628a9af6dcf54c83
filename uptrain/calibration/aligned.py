"""`method aligned` as a conversion method: the glue between checkpoint tensors (separate or fused
projections, biases) and the pure merge in uptrain/merging.py, plus the architectures it refuses."""
from __future__ import annotations

import math

import torch

from uptrain.arch import ATTENTION_BUFFERS
from uptrain.conversion.options import DEFAULT_REFINE_STEPS
from uptrain.errors import UptrainError
from uptrain.merging import merge_attention

# A RoPE pair merged as if it did not turn (merging.merge_attention's static_pairs) turns at most this angle over
# the model's whole context (max_position_embeddings): an eighth of a turn. On the 135M model (rope θ 10⁵, 8,192
# positions) that is its 6 slowest of 32 pairs; measured there, the joint merge of those 6 stays better than
# the per-pair one out to 4,096-token windows, while 8 pairs (a quarter turn) lost to 6 at 4,096.
STATIC_TURN = math.pi / 4


def static_pairs(inv_freq: torch.Tensor | None, config: dict) -> int:
    """How many of the slowest RoPE pairs turn less than STATIC_TURN over the model's context; inv_freq: the
    model's own per-pair angles per position (after any rope scaling), None when unknown (then 0)."""
    context = config.get("max_position_embeddings")
    if inv_freq is None or not context or inv_freq.numel() == 0:
        return 0
    slow = (inv_freq.double() * context <= STATIC_TURN).tolist()
    n = sum(slow)
    return n if n and all(slow[-n:]) else 0  # only a tail of the slowest pairs (inv_freq falls with the pair)


def _alternatives(options) -> str:
    """What to use instead, in the caller's words: a closed-form-free merge (mean-norm, then local reconstruction)."""
    if options is None:
        return "use method mean-norm with refine steps (local reconstruction), or mean, first or random"
    return (f"use {options.said('method', 'mean-norm')} with {options.said('refine_steps', DEFAULT_REFINE_STEPS)} "
            f"instead (local reconstruction fits the merged heads without a closed form), or a data-free "
            f"{options.key('method')} (mean, first, random)")


def _nested_values(cfg, key):
    """Every value of `key` anywhere in a config dict (rope_parameters may be nested per layer type)."""
    if isinstance(cfg, dict):
        for k, v in cfg.items():
            if k == key:
                yield v
            yield from _nested_values(v, key)


def check_supported(spec, config: dict | None = None, options=None) -> None:
    """Raise a clear UptrainError where aligned merging cannot be exact in the lossless case, in the words
    of `options` (a ConvertOptions: `--method aligned`, `model.convert.method: aligned`)."""
    said = options.said("method") if options is not None else "method aligned"
    instead = _alternatives(options)
    attn = spec.q.rsplit(".", 1)[0] + "."
    norms = sorted(s for s in (*spec.kv, *spec.copy) if s.startswith(attn) and "norm" in s)
    if norms:
        raise UptrainError(f"{said} cannot fold maps through the attention norms "
                           f"({', '.join(norms)}) of this architecture: they act between the "
                           f"projection and RoPE and are nonlinear, so the merged model would be silently "
                           f"wrong; {instead}")
    if spec.rope not in ("rotate_half", None):
        raise UptrainError(f"{said} knows RoPE only in the rotate-half layout, not {spec.rope!r}; "
                           f"{instead}")
    if config is None:
        return
    mt = config.get("model_type", "this model")
    if config.get("clip_qkv") is not None:
        raise UptrainError(f"{said} cannot fold maps through {mt}'s clip_qkv ({config['clip_qkv']}): q, k and v "
                           f"are clamped between the projection and attention, which no linear map commutes "
                           f"with; {instead}")
    r = rotary_dims(spec, config)
    if r is not None and (r % 2 or not 0 < r <= spec.head_dim(config)):
        raise UptrainError(f"{said} cannot pair RoPE's rows: {mt} rotates {r} of {spec.head_dim(config)} rows of each "
                           f"head; {instead}")


def rotary_dims(spec, config: dict) -> int | None:
    """Rows of each head RoPE rotates when it rotates only part of it (partial_rotary_factor, rotary_pct,
    rotary_dim, as transformers computes them: int(head_dim · factor)), else None."""
    d = spec.head_dim(config)
    factors = [f for key in ("partial_rotary_factor", "rotary_pct") for f in _nested_values(config, key)
               if f is not None and float(f) != 1.0]
    if factors:
        return int(d * float(factors[0]))
    dims = [x for x in _nested_values(config, "rotary_dim") if x is not None and x != d]
    return dims[0] if dims else None


def attention_suffixes(spec) -> tuple[str, ...]:
    """Every per-layer tensor of the attention block (the K/V tensors, q, o, their biases, attention norms):
    what a calibrated method may rewrite. Saved buffers (causal masks, inv_freq) are not among them."""
    attn = spec.q.rsplit(".", 1)[0] + "."
    own = (f"{spec.q}.weight", f"{spec.q}.bias", f"{spec.o}.weight", f"{spec.o}.bias")
    norms = (s for s in spec.copy if s.startswith(attn) and s[len(attn):] not in ATTENTION_BUFFERS)
    return tuple(dict.fromkeys((*spec.kv, *own, *norms)))


def merge_aligned(tensors: dict[str, torch.Tensor], c: torch.Tensor, spec, cfg, groups: int, head_dim: int,
                  grouping: str = "contiguous", weighted: bool = True,
                  static: int = 0) -> tuple[dict[str, torch.Tensor], dict]:
    """One layer's aligned merge: {suffix: float32} (K/V tensors, q, o; anything else passes unchanged)
    and the second moment C [(hidden+1)², float64] of its attention input → ({suffix: float32}, info).
    static: RoPE pairs merged as unrotated (`static_pairs`)."""
    parts = _gather(tensors, spec, cfg)
    hidden = c.shape[0] - 1
    aug = {role: _augment(p, head_dim, hidden) for role, p in parts.items() if role in ("q", "k", "v")}
    o = tensors[f"{spec.o}.weight"].double()
    q, k, v, o, info = merge_attention(aug["q"], aug["k"], aug["v"], o, c.to(torch.float64), groups,
                                       rope=spec.rope is not None, grouping=grouping, weighted=weighted,
                                       rotary_dims=rotary_dims(spec, cfg) if spec.rope else None,
                                       static_pairs=static if spec.rope else 0)
    return _scatter(tensors, spec, cfg, groups, {"q": q, "k": k, "v": v}, o), info


def _gather(tensors, spec, cfg) -> dict[str, dict[str, torch.Tensor]]:
    """{role: {"weight": rows, "bias": rows}} for q, k, v from separate or fused projections."""
    parts: dict[str, dict] = {}
    for suffix, t in tensors.items():
        kind = suffix.rsplit(".", 1)[-1]
        if kind not in ("weight", "bias"):
            continue
        if suffix in spec.kv:
            for role, a, b in spec.rows(suffix, cfg):
                parts.setdefault(role, {})[kind] = t[a:b]
        elif suffix == f"{spec.q}.{kind}":
            parts.setdefault("q", {})[kind] = t
    return parts


def _augment(p: dict, head_dim: int, hidden: int) -> torch.Tensor:
    """weight [heads·d_h, hidden] (+ bias) → [heads, d_h, hidden + 1] float64 (bias column, 0 if absent)."""
    w = p["weight"].double()
    if w.shape[1] != hidden:
        raise UptrainError(f"projection input width {w.shape[1]} ≠ calibrated hidden size {hidden}")
    b = p["bias"].double() if "bias" in p else torch.zeros(w.shape[0], dtype=w.dtype)
    return torch.cat([w, b[:, None]], 1).view(-1, head_dim, hidden + 1)


def _scatter(tensors, spec, cfg, groups, new, o) -> dict[str, torch.Tensor]:
    """Write merged parts back into the tensors' layouts (fused projections keep their row order)."""
    def rows(role, kind):
        t = new[role].reshape(-1, new[role].shape[-1])
        return (t[:, :-1] if kind == "weight" else t[:, -1]).float()

    out = {}
    for suffix in tensors:
        kind = suffix.rsplit(".", 1)[-1]
        if suffix in spec.kv:
            out[suffix] = torch.cat([rows(role, kind) for role, _, _ in spec.rows(suffix, cfg, kv_heads=groups)])
        elif suffix == f"{spec.q}.{kind}":
            out[suffix] = rows("q", kind)
        elif suffix == f"{spec.o}.weight":
            out[suffix] = o.float()
        else:  # o's bias, attention norms: the folds leave them alone
            out[suffix] = tensors[suffix]
    return out
