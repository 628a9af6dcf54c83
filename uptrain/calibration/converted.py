"""The converted model's side of a layer: which class computes the converted layers while calibrating (`engine_form`,
`converted_model`), how their tensors are stored there (`Layouts`), and what is refused up front.

The merges work on canonical rows ([q | k | v], [out, in]: arch.Storage), as the writer's `merge` does; the
source skeleton is the checkpoint's own class, the converted one the class that holds G KV heads with the
source's module names (`engine_form`): the source's class with fewer KV heads where transformers has a KV-head
field, else uptrain/modeling's GQA class (gpt_neox: q, k, v fused per KV head; gpt2: Conv1D; opt), each loaded
in its own stored layout.
"""
from __future__ import annotations

import importlib
from typing import Any

import torch

from uptrain.arch import G, AttentionSpec, Form
from uptrain.calibration.per_layer import per_layer_model_class
from uptrain.errors import UptrainError
from uptrain.kv_heads import KVHeads
from uptrain.modeling import TEMPLATES


def engine_form(spec: AttentionSpec, config: dict, groups: KVHeads) -> Form | None:
    """The form whose model computes the converted layers while calibrating: the result's own when it keeps
    the source's model type (native, or uptrain/modeling's GQA class), else the spec's remote-code form
    (GPT-2 → MQA is written as gpt_bigcode, whose layers take other arguments: GPT-2's GQA class with one KV
    head computes the same). None when there is neither."""
    form = spec.form(config, groups.value)
    if form is not None and (not form.model_type or form.per_layer):  # per-layer: Llama's module names
        return form
    if groups.per_layer:
        return None
    return next((f for f in spec.forms if f.remote_code and not f.model_type
                 and f.applies(config, spec.heads(config), groups.uniform)), None)


def converted_model(spec: AttentionSpec, config: dict, groups: KVHeads) -> tuple[dict[str, Any], type | None]:
    """(config overrides, model class or None for the config's own) of the converted skeleton."""
    form = engine_form(spec, config, groups)
    if form is None:
        raise UptrainError(f"no {config.get('model_type')} form holds {groups} KV heads with the source's module names")
    if form.per_layer:  # G_l per layer: the template's model, configured as the result will be
        assert groups.per_layer is not None
        return {}, per_layer_model_class(spec, config, groups.per_layer)
    g = groups.uniform
    changes: dict[str, Any] = form.config if form.config else {str(spec.kv_heads_field): G}
    overrides: dict[str, Any] = {k: g if v == G else v for k, v in changes.items() if k not in ("model_type", "architectures")}
    if form.remote_code is None:
        return overrides, None
    template = TEMPLATES[form.remote_code]
    return overrides, getattr(importlib.import_module(f"uptrain.modeling.{template.module}"), template.model_class)


def check_calibratable(spec: AttentionSpec, config: dict, options: Any, groups: KVHeads | None = None) -> None:
    """Refuse, in the caller's words, sources whose converted layers the engine cannot build. `groups`: the KV
    heads converted to, when not options.groups (a KV budget's)."""
    groups = KVHeads.of(options.groups) if groups is None else groups
    if engine_form(spec, config, groups) is None:
        raise UptrainError(f"{options.said('method')} with calibration cannot build the converted "
                           f"{config.get('model_type')} layers for {options.key('groups')} {groups} (no form "
                           f"of it keeps the source's module names). Use a data-free {options.key('method')} "
                           f"(mean, mean-norm) without {options.key('refine_steps')}")


class Layouts:
    """How one layer's attention tensors are stored in the source and in the converted skeleton (arch.Storage):
    the merges work on canonical rows ([q | k | v], [out, in]), the skeletons load their own layout (gpt_neox's
    q, k, v fused per KV head; GPT-2's transposed Conv1D). `groups`: this layer's G."""

    def __init__(self, spec: AttentionSpec, config: dict, groups: int, shapes: dict[str, tuple[int, ...]]):
        form = engine_form(spec, config, KVHeads(uniform=groups))
        self.read = {s: spec.storage(s, config) for s in shapes}
        self.write = {s: spec.storage(s, config, groups, form) for s in shapes}
        rows = {s: spec.rows(s, config, kv_heads=groups)[-1][2] for s in shapes if s in spec.kv}
        self.shapes = {s: spec.stored_shape(s, shape, rows[s], config, form) if s in rows else shape
                       for s, shape in shapes.items()}

    def canonical(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {s: self.read[s].canonical(t) for s, t in tensors.items()}

    def converted(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Canonical → as the converted skeleton stores them."""
        return {s: self.write[s].stored(t, self.shapes[s]) for s, t in tensors.items()}

    def from_converted(self, suffix: str, t: torch.Tensor) -> torch.Tensor:
        return self.write[suffix].canonical(t)


def rope_frequencies(model: torch.nn.Module) -> torch.Tensor | None:
    """The model's RoPE angle per pair and position (its rotary module's inv_freq, after any rope scaling), or
    None when it has none or several that differ (per-layer-type RoPE: then no pair is merged as static)."""
    found = {}
    for name, buf in model.named_buffers():
        if name.rsplit(".", 1)[-1] == "inv_freq" and buf is not None and not buf.is_meta:
            found[tuple(buf.double().cpu().tolist())] = buf
    return next(iter(found.values())).double().cpu() if len(found) == 1 else None
