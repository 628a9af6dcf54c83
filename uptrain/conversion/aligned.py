"""`method aligned` as a conversion method: the glue between checkpoint tensors (separate or fused
projections, biases) and the pure merge in uptrain/merging.py, plus the architectures it refuses."""
from __future__ import annotations

import torch

from uptrain.errors import UptrainError
from uptrain.merging import merge_attention

_ALTERNATIVES = "use method mean, mean-norm, first or random for this model"


def _nested_values(cfg, key):
    """Every value of `key` anywhere in a config dict (rope_parameters may be nested per layer type)."""
    if isinstance(cfg, dict):
        for k, v in cfg.items():
            if k == key:
                yield v
            yield from _nested_values(v, key)


def check_supported(spec, config: dict | None = None, said: str = "method aligned") -> None:
    """Raise a clear UptrainError where aligned merging cannot be exact in the lossless case; `said` is
    how the caller spelled the option (`--method aligned`, `model.convert.method: aligned`)."""
    attn = spec.q.rsplit(".", 1)[0] + "."
    norms = sorted(s for s in (*spec.kv, *spec.copy) if s.startswith(attn) and "norm" in s)
    if norms:
        raise UptrainError(f"{said} cannot fold maps through the attention norms "
                           f"({', '.join(norms)}) of this architecture: they act between the "
                           f"projection and RoPE and are nonlinear, so the merged model would be silently "
                           f"wrong; {_ALTERNATIVES}")
    if spec.rope not in ("rotate_half", None):
        raise UptrainError(f"{said} knows RoPE only in the rotate-half layout, not {spec.rope!r}; "
                           f"{_ALTERNATIVES}")
    if config is None:
        return
    mt = config.get("model_type", "this model")
    if config.get("clip_qkv") is not None:
        raise UptrainError(f"{said} cannot fold maps through {mt}'s clip_qkv ({config['clip_qkv']}): q, k and v "
                           f"are clamped between the projection and attention, which no linear map commutes "
                           f"with; {_ALTERNATIVES}")
    factors = [f for key in ("partial_rotary_factor", "rotary_pct") for f in _nested_values(config, key)
               if f is not None and float(f) != 1.0]
    dims = [x for x in _nested_values(config, "rotary_dim") if x is not None and x != spec.head_dim(config)]
    if factors or dims:
        what = f"partial_rotary_factor {factors[0]}" if factors else f"rotary_dim {dims[0]}"
        raise UptrainError(f"{said} needs RoPE over the whole head; {mt} rotates only part of it "
                           f"({what}), which breaks the pair layout (dim f ↔ f + d_h/2) the key merge relies "
                           f"on; {_ALTERNATIVES}")


class AlignedMethod:
    """`method aligned`: calibrate once, then merge layer by layer (see uptrain/merging.py's docstring).

    Reads the aligned options of ConvertOptions: calibration (a data source; the Python API also takes a
    DataSpec or a dict of its fields), calibration_tokens, calibration_seq_len, calibration_batch_size,
    grouping and weighted."""

    layerwise = True
    name = "aligned"

    def __init__(self, options):
        self.options = options
        self.grouping = options.grouping or "contiguous"
        self.moments: list[torch.Tensor] = []
        # Filled layer by layer during merge; the converter writes the record after the last layer.
        self.layer_record: list[dict] = []

    def touched(self, spec) -> tuple[str, ...]:
        check_supported(spec, said=self.options.said("method"))
        own = (f"{spec.q}.weight", f"{spec.q}.bias", f"{spec.o}.weight")
        return tuple(dict.fromkeys((*spec.kv, *own)))

    def prepare(self, ctx) -> dict:
        from uptrain.conversion.calibration import calibrate

        o = self.options
        check_supported(ctx.spec, ctx.config, said=o.said("method"))
        self.layer_record = []
        self.moments, record = calibrate(
            ctx.src_dir, ctx.spec, ctx.config, data=o.calibration, tokens=o.calibration_tokens,
            seq_len=o.calibration_seq_len, batch_size=o.calibration_batch_size or 8, progress=ctx.progress)
        return {"calibration": record, "grouping": self.grouping,
                "aligned": {"weighted": o.weighted, "layers": self.layer_record}}

    def merge(self, layer: int, tensors: dict[str, torch.Tensor], ctx) -> dict[str, torch.Tensor]:
        spec, cfg, dh = ctx.spec, ctx.config, ctx.head_dim
        parts = _gather(tensors, spec, cfg)
        c, self.moments[layer] = self.moments[layer], None  # each layer is merged once: free as we go
        hidden = c.shape[0] - 1
        aug = {role: _augment(p, dh, hidden) for role, p in parts.items() if role in ("q", "k", "v")}
        o = tensors[f"{spec.o}.weight"].double()
        q, k, v, o, info = merge_attention(aug["q"], aug["k"], aug["v"], o, c, ctx.groups,
                                           rope=spec.rope is not None, grouping=self.grouping,
                                           weighted=self.options.weighted)
        self.layer_record.append({"layer": layer, **info})
        self.layer_record.sort(key=lambda e: e["layer"])  # in place: the record holds this very list
        new = {"q": q, "k": k, "v": v}
        return _scatter(tensors, spec, cfg, ctx.groups, new, o)

    def stats(self, layer: int, inputs, outputs, ctx) -> dict:
        """The converter's per-layer error for this method: the merged weights live in another basis than
        the source heads, so comparing them row by row means nothing; the calibration-weighted fraction of
        K / V the shared heads miss (as a norm ratio, like the pooling methods' relative error) does."""
        entry = next(e for e in self.layer_record if e["layer"] == layer)
        return {"k_rel_error": entry["k_fit_error"] ** 0.5, "v_rel_error": entry["v_fit_error"] ** 0.5}


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
        else:
            raise UptrainError(f"method aligned was handed {suffix}, which it does not know how to merge")
    return out
