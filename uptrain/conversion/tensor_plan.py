"""The conversion's tensor plan: for every tensor of the source, copy its bytes or merge it, and its output shape
(the result's config.json: result_config.py). Shape logic only, so a 70B header is planned without memory (tests
do it on the meta device)."""
from __future__ import annotations

from typing import Any, NamedTuple

from uptrain.arch import AttentionSpec, Storage, check_groups, kv_heads_text
from uptrain.errors import UptrainError
from uptrain.kv_heads import KVHeads, LayerKey


class Step(NamedTuple):
    """What happens to one tensor. action: "copy" (its bytes), "merge" (through the method, in canonical
    form), "restore" (read, rewritten as the result stores it: GPT-2's Conv1D weights in a gpt_bigcode
    checkpoint). read / write: how the source and the result store it (arch.Storage)."""

    action: str
    layer: LayerKey | None  # the unit (spec.classify): a layer index, or (block, index); None: a global tensor
    suffix: str
    dtype: str
    shape: tuple[int, ...]  # in the result
    read: Storage = Storage()
    write: Storage = Storage()
    members: tuple[str, ...] = ()  # a family of one tensor per KV head: all K source tensors, in head order
    part: int | None = None  # … and which result head this one is


def plan_conversion(spec: AttentionSpec, config: dict, entries: dict, groups: KVHeads | int | tuple[int, ...],
                    touched: tuple[str, ...] = (),
                    groups_key: str = "groups") -> dict[str, Step]:
    """name → Step. "merge" for tensors the method rewrites (every KV tensor, plus the per-layer suffixes in
    `touched`), "copy" for the rest unless the result stores them differently. `groups`: one G, or a tuple G_l
    (per-layer KV heads: each tensor takes its layer's)."""
    heads, kv, d = spec.heads(config), spec.uniform_kv_heads(config), spec.head_dim(config)
    result = KVHeads.of(groups)
    per_layer, groups = result.per_layer is not None, result.value
    check_groups(groups, kv, groups_key, spec.layers(config) if per_layer else None)
    form = spec.form(config, groups)
    if form is None and per_layer:
        raise UptrainError(f"{groups_key} {kv_heads_text(groups)}: {spec.per_layer_refusal(config)}")
    if form is None:
        raise UptrainError(f"{groups_key} {groups}: no {config.get('model_type')} checkpoint can hold {groups} KV "
                           f"heads of {heads} query heads (see its forms in uptrain/arch/table.py); valid values: "
                           f"{', '.join(map(str, spec.valid_groups(config)))}")
    plan: dict[str, Step] = {}
    seen: dict[LayerKey, set[str]] = {}  # unit → its per-layer suffixes
    families: dict[tuple[LayerKey, str], dict[int, tuple[str, Any]]] = {}  # (unit, kv key) → {head: (name, entry)}
    for name, e in entries.items():
        kind, layer, suffix = spec.classify(name)
        shape = tuple(e.shape)
        if kind == "kv" and "{}" in suffix:  # one tensor per KV head: planned below, once all are known
            assert layer is not None  # a kv suffix is a per-layer one
            families.setdefault((layer, suffix), {})[spec.head_of(name, suffix)] = (name, e)
            continue
        in_layer = layer is not None
        g = result.at(layer) if per_layer and layer is not None else result.uniform
        read = spec.storage(suffix, config) if in_layer else Storage()
        write = spec.storage(suffix, config, g, form) if in_layer else Storage()
        if kind == "kv":
            rows, want = spec.kv_rows_in(suffix, shape), spec.rows(suffix, config)[-1][2]
            if rows != want:
                raise UptrainError(f"{name} has {rows} rows but {heads} heads / {kv} KV heads × head_dim {d} "
                                   f"imply {want}; config.json and the weights disagree")
            shape = spec.stored_shape(suffix, shape, spec.rows(suffix, config, kv_heads=g)[-1][2], config, form)
        elif read.transposed != write.transposed:
            shape = shape[::-1]
        if (kind == "kv" or (in_layer and suffix in touched)) and not (per_layer and g == kv):
            action = "merge"
        else:  # (a layer of a per-layer result that keeps the source's heads is copied, whatever the method)
            action = "copy" if read == write else "restore"
        plan[name] = Step(action, layer, suffix, e.dtype, shape, read, write)
        if layer is not None:
            seen.setdefault(layer, set()).add(suffix)
    for (layer, suffix), heads_of in families.items():
        if sorted(heads_of) != list(range(kv)):
            raise UptrainError(f"layer {layer} has {suffix.replace('{}', '*')} for heads {sorted(heads_of)}, but "
                               f"config.json has {kv} KV heads; config.json and the weights disagree")
        members = tuple(heads_of[h][0] for h in range(kv))
        for j in range(result.at(layer)):  # result head j keeps source head j's name
            name, e = heads_of[j]
            plan[name] = Step("merge", layer, suffix, e.dtype, tuple(e.shape), members=members, part=j)
    for layer in spec.units(config):
        missing = [s for s in spec.required if s not in seen.get(layer, ())]
        if missing:
            raise UptrainError(f"layer {layer} has no {', '.join(missing)}; the checkpoint does not match the "
                               f"{config.get('model_type')} attention spec (incomplete or not this architecture)")
    return plan
