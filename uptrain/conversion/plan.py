"""The conversion plan: for every tensor of the source, copy its bytes or merge it, and its output shape.
Shape logic only, so a 70B header is planned without memory (tests do it on the meta device)."""
from __future__ import annotations

from uptrain.arch import AttentionSpec, check_groups
from uptrain.errors import UptrainError


def plan_conversion(spec: AttentionSpec, config: dict, entries: dict, groups: int, touched: tuple[str, ...] = (),
                    groups_key: str = "groups"):
    """name → (action, layer, suffix, dtype, out shape). action is "merge" for tensors the method rewrites
    (every KV tensor, plus the per-layer suffixes in `touched`), "copy" for the rest."""
    heads, kv, d = spec.heads(config), spec.kv_heads(config), spec.head_dim(config)
    check_groups(groups, kv, groups_key)
    plan, seen = {}, {}
    for name, e in entries.items():
        kind, layer, suffix = spec.classify(name)
        shape = tuple(e.shape)
        if kind == "kv":
            rows = spec.rows(suffix, config)
            if shape[0] != rows[-1][2]:
                raise UptrainError(f"{name} has {shape[0]} rows but {heads} heads / {kv} KV heads × head_dim {d} "
                                   f"imply {rows[-1][2]}; config.json and the weights disagree")
            shape = (spec.rows(suffix, config, kv_heads=groups)[-1][2], *shape[1:])
        action = "merge" if kind == "kv" or (layer is not None and suffix in touched) else "copy"
        plan[name] = (action, layer, suffix, e.dtype, shape)
        if layer is not None:
            seen.setdefault(layer, set()).add(suffix)
    for layer in range(spec.layers(config)):
        missing = [s for s in spec.required if s not in seen.get(layer, ())]
        if missing:
            raise UptrainError(f"layer {layer} has no {', '.join(missing)}; the checkpoint does not match the "
                               f"{config.get('model_type')} attention spec (incomplete or not this architecture)")
    return plan
