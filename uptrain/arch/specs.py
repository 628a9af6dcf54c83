"""The spec types: where one architecture keeps its attention weights (`AttentionSpec`), and what a result is.

What the result is for a given G is data as well (`Form`): a native config change (the KV-head field,
gpt_bigcode's multi_query), a native *other* architecture (GPT-2 with G = 1 is a gpt_bigcode checkpoint),
or, where no transformers class can hold G KV heads, a modeling file that travels with the checkpoint
(remote code: uptrain/modeling/, loaded with trust_remote_code=True). Tensors that exist only under a config
flag are an `Extra`; an encoder-decoder's kinds of attention are `Block`s.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from uptrain.arch.kv import valid_groups
from uptrain.arch.nemotron_nas import block_configs
from uptrain.arch.storage import Layout, Storage, per_kv_head_order
from uptrain.errors import UptrainError
from uptrain.kv_heads import KVHeads, LayerKey, per_layer_counts
from uptrain.kv_heads import text as kv_heads_text

# The global tensors of the Llama layout: a spec's default.
_GLOBAL = ("model.embed_tokens.weight", "model.norm.weight", "model.norm.bias", "lm_head.weight")

G = "G"  # in a Form's config: the result's KV-head count


@dataclass(frozen=True)
class Form:
    """One way to write a result with G KV heads; a spec's first form that applies is used.

    groups: for which G — "any", "H" (MHA kept: the source unchanged), "1" (MQA) or "per-layer" (a tuple
        G_l whose values differ; every other form takes one G).
    requires: source config values the form needs (a missing key counts as False / None).
    config: config.json changes; the value G stands for the result's KV-head count, None removes a key.
    remote_code: the template in uptrain/modeling/ the result needs (no transformers class holds G KV
        heads of this architecture); None: native, loads with plain transformers.
    untransposed: per-layer suffixes the source stores transposed (spec.transposed) and this form does not
        (GPT-2's Conv1D weights in a gpt_bigcode checkpoint, which uses nn.Linear).
    per_layer: how config.json holds G_l (a "per-layer" form): "block_configs" (nemotron-nas / DeciLM).
    """

    groups: str = "any"
    requires: dict = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    remote_code: str | None = None
    untransposed: tuple[str, ...] = ()
    per_layer: str | None = None

    def applies(self, cfg, heads: int, groups) -> bool:
        if (self.groups == "per-layer") != (KVHeads.of(groups).per_layer is not None):
            return False
        if self.groups == "H" and groups != heads or self.groups == "1" and groups != 1:
            return False
        return not self.unmet(cfg)

    def unmet(self, cfg) -> list[str]:
        """The source config values this form needs and does not have, as "key: wanted (has value)"."""
        return [f"{k}: {v} (has {config_value(cfg, k, None)})" for k, v in self.requires.items()
                if (config_value(cfg, k, None) or False) != v]

    @property
    def native(self) -> bool:
        return self.remote_code is None

    @property
    def model_type(self) -> str | None:
        """The model_type of the result when it differs from the source's."""
        return self.config.get("model_type")


@dataclass(frozen=True)
class Extra:
    """Tensors a checkpoint holds only when config flag `flag` is set (stablelm's qk_layernorm, cohere's
    use_qk_norm, phi's qk_layernorm): spec_for_config adds them for such configs only, so that a spec lists
    what the checkpoint at hand holds (calibration-aware methods refuse what it lists between projection and
    attention)."""

    flag: str
    kv: dict = field(default_factory=dict)
    copy: tuple[str, ...] = ()
    copy_patterns: tuple[str, ...] = ()
    flat: tuple[str, ...] = ()


@dataclass(frozen=True)
class Block:
    """One kind of attention block of an encoder-decoder, where each layer has more than one (T5: encoder
    self-attention; decoder self-attention and cross-attention). Its tensors are `prefix` + a suffix of the
    spec's kv / copy; a tensor's unit (what `classify` calls its layer) is (block name, layer index).

    layers_fields: config fields counting its layers, the first one set wins (T5's num_decoder_layers is null
        when the decoder is as deep as the encoder). pooled: its K/V heads are pooled by default.
    cached: it keeps a KV cache while generating (the decoder's blocks; the encoder runs once, in parallel)."""

    name: str
    prefix: str
    layers_fields: tuple[str, ...]
    pooled: bool
    cached: bool

    def layers(self, cfg) -> int:
        return next(v for v in (config_value(cfg, f, None) for f in self.layers_fields) if v is not None)


@dataclass(frozen=True)
class AttentionSpec:
    """Where one architecture keeps its attention weights, as data.

    kv: per-layer tensor suffix → row layout; every tensor whose shape depends on the KV-head count.
    copy: per-layer suffixes that are copied unchanged (may be absent in a checkpoint).
    copy_patterns: regular expressions for per-layer suffixes copied unchanged that carry an index of their
        own (the experts of a mixture-of-experts MLP: block_sparse_moe.experts.{e}.w1.weight).
    required: kv suffixes every layer must have (a checkpoint without them is not what we think).
    q / o: the query and output projections (calibration-aware methods fold maps into them).
    rope: "rotate_half" (HF layout: pair i ↔ i + d/2) or None (no rotary positions).
    root: the checkpoint names of a base model lack this leading module name (GPT-2's "transformer.",
        OPT's "model."): classify() accepts both.
    transposed / per_kv_head / flat: per-layer suffixes stored other than canonically (see Storage).
    mqa_field: a boolean config key that makes the model MQA (gpt_bigcode, falcon: multi_query), unless
        gqa_field is set (falcon's new_decoder_architecture: then kv_heads_field counts).
    forms: how a result is written, first that applies (default: kv_heads_field = G, native).
    extras: tensors that exist only when a config flag is set (see Extra; spec_for_config applies them).
    blocks: encoder-decoders only: the attention blocks of a layer (see Block); layer_prefix is then unused
        and per-layer tensors outside attention (feed-forward, norms) are matched by global_patterns.
    global_patterns: regular expressions for whole tensor names copied unchanged.
    head_dim_field: the config field holding head_dim when it is set explicitly (T5: d_kv).
    per_layer: the config holds KV heads per layer (a result written in a per-layer form, read back):
        "block_configs" (nemotron-nas / DeciLM: H / n_heads_in_group, none where attention is a no_op).
    """

    kv: dict[str, Layout]
    copy: tuple[str, ...]
    copy_patterns: tuple[str, ...] = ()
    required: tuple[str, ...] = ("self_attn.k_proj.weight", "self_attn.v_proj.weight")
    global_tensors: tuple[str, ...] = _GLOBAL
    layer_prefix: str = "model.layers.{}."
    q: str = "self_attn.q_proj"
    o: str = "self_attn.o_proj"
    rope: str | None = "rotate_half"
    kv_heads_field: str | None = "num_key_value_heads"
    heads_field: str = "num_attention_heads"
    layers_field: str = "num_hidden_layers"
    hidden_field: str = "hidden_size"
    root: str = ""
    transposed: tuple[str, ...] = ()
    per_kv_head: tuple[str, ...] = ()
    flat: tuple[str, ...] = ()
    mqa_field: str | None = None
    gqa_field: str | None = None
    forms: tuple[Form, ...] = ()
    extras: tuple[Extra, ...] = ()
    blocks: tuple[Block, ...] = ()
    global_patterns: tuple[str, ...] = ()
    head_dim_field: str = "head_dim"
    per_layer: str | None = None
    notes: str = ""

    # -- config-derived quantities -------------------------------------------------------------
    def heads(self, cfg) -> int:
        return config_value(cfg, self.heads_field)

    def kv_heads(self, cfg) -> int | tuple[int, ...]:
        """K: the KV heads of every layer; a tuple G_l when a per-layer checkpoint's layers differ (0 for a layer
        without attention: nemotron-nas' no_op)."""
        if self.per_layer:
            heads = self.layer_kv_heads(cfg)
            # a layer without attention keeps no KV heads: counts as read, not a result's G_l (KVHeads: at least 1)
            return heads if 0 in heads else KVHeads.of(heads).value
        return self._config_kv_heads(cfg)

    def uniform_kv_heads(self, cfg) -> int:
        """K of a checkpoint whose layers all have the same KV heads (every conversion source); UptrainError for
        one whose layers differ (a per-layer result: uptrain converts its source instead)."""
        kv = self.kv_heads(cfg)
        if per_layer_counts(kv) is not None:
            raise UptrainError(f"this {model_type(cfg)} checkpoint has per-layer KV heads ({kv_heads_text(kv)}), "
                               f"not one K for every layer")
        return KVHeads.of(kv).at(0)

    def _config_kv_heads(self, cfg) -> int:
        """K of a spec whose config holds one KV-head count (not `per_layer`)."""
        if self.gqa_field and config_value(cfg, self.gqa_field, None):
            return config_value(cfg, self.kv_heads_field)
        if self.mqa_field and config_value(cfg, self.mqa_field, None):
            return 1
        # MHA configs often omit the KV-head count (None / missing means "= heads").
        return (config_value(cfg, self.kv_heads_field, None) if self.kv_heads_field else None) or self.heads(cfg)

    def layer_kv_heads(self, cfg) -> tuple[int, ...]:
        """KV heads of each layer holding a KV cache: G_l of a per-layer checkpoint, else K for every layer."""
        if self.per_layer == "block_configs":
            return tuple(0 if config_value(config_value(b, "attention"), "no_op", False)
                         else self.heads(cfg) // config_value(config_value(b, "attention"), "n_heads_in_group")
                         for b in config_value(cfg, "block_configs"))
        return (self._config_kv_heads(cfg),) * self.layers(cfg)

    def layers(self, cfg) -> int:
        """Layers holding a KV cache (an encoder-decoder's decoder layers)."""
        cached = [b for b in self.blocks if b.cached]
        return cached[0].layers(cfg) if cached else config_value(cfg, self.layers_field)

    def head_dim(self, cfg) -> int:
        # Never assume hidden / heads: gemma, qwen3 and others set head_dim explicitly.
        return (config_value(cfg, self.head_dim_field, None)
                or config_value(cfg, self.hidden_field) // self.heads(cfg))

    def units(self, cfg) -> list[LayerKey]:
        """What `classify` calls a layer, for every unit whose K/V are pooled: layer indices, or (block name,
        layer index) for an encoder-decoder."""
        if not self.blocks:
            return list(range(self.layers(cfg)))
        return [(b.name, i) for b in self.blocks if b.pooled for i in range(b.layers(cfg))]

    def cached_blocks(self) -> tuple[Block, ...]:
        return tuple(b for b in self.blocks if b.cached)

    def pooling(self, attention: str) -> AttentionSpec:
        """This spec with the attention blocks `attention` names pooled: "decoder" (the default: an
        encoder-decoder's decoder self- and cross-attention, as the GQA paper) or "all" (encoder
        self-attention too). Decoder-only specs pool their one block either way. The result's modeling file
        reads the choice from config.json's gqa_attention."""
        if not self.blocks or attention == "decoder":
            return self
        blocks = tuple(dataclasses.replace(b, pooled=True) for b in self.blocks)
        forms = tuple(dataclasses.replace(f, config={**f.config, "gqa_attention": attention}) if f.remote_code
                      else f for f in self.forms)
        return dataclasses.replace(self, blocks=blocks, forms=forms)

    def for_config(self, cfg) -> AttentionSpec:
        """This spec plus the tensors of the config's optional features (extras whose flag is set)."""
        on = [x for x in self.extras if config_value(cfg, x.flag, None)]
        if not on:
            return self
        return dataclasses.replace(
            self, kv={**self.kv, **{k: v for x in on for k, v in x.kv.items()}},
            copy=self.copy + tuple(c for x in on for c in x.copy),
            copy_patterns=self.copy_patterns + tuple(c for x in on for c in x.copy_patterns),
            flat=self.flat + tuple(c for x in on for c in x.flat), extras=())

    # -- the result ------------------------------------------------------------------------------
    def form(self, cfg, groups) -> Form | None:
        """How a result with `groups` KV heads (one G, or a tuple G_l per layer) is written; None when no form
        can hold it."""
        forms = self.forms or (Form(config={self.kv_heads_field: G}),)
        return next((f for f in forms if f.applies(cfg, self.heads(cfg), groups)), None)

    def result_form(self, cfg, groups) -> Form:
        """The form a result with `groups` KV heads is written in; UptrainError when none can hold it (a caller
        that offers a choice of G asks `form` first and says why in its own words)."""
        form = self.form(cfg, groups)
        if form is None:
            raise UptrainError(f"no {model_type(cfg)} checkpoint can hold {kv_heads_text(groups)} KV heads of "
                               f"{self.heads(cfg)} query heads (see its forms in uptrain/arch/table.py)")
        return form

    def per_layer_refusal(self, cfg) -> str | None:
        """Why this source cannot get per-layer KV heads (None when it can), for the caller's message."""
        forms = [f for f in self.forms if f.groups == "per-layer"]
        if not forms:
            from uptrain.arch.table import SPECS  # the table is built from these types: imported when it is asked

            return (f"no per-layer form is known for {model_type(cfg)} checkpoints (per-layer KV heads are written "
                    f"in the nemotron-nas form, which holds the Llama family: "
                    f"{', '.join(k for k, s in SPECS.items() if any(f.groups == 'per-layer' for f in s.forms))})")
        unmet = [u for f in forms for u in f.unmet(cfg)]
        if unmet:
            return (f"the nemotron-nas form cannot hold this {model_type(cfg)} checkpoint: it needs "
                    f"{'; '.join(unmet)}")
        return None

    def valid_groups(self, cfg) -> list[int]:
        """G values this source can be converted to: divisors of its KV heads that some form can hold."""
        return [g for g in valid_groups(self.uniform_kv_heads(cfg)) if self.form(cfg, g) is not None]

    def result_config(self, cfg: dict, groups) -> dict:
        """config.json of the result (remote code's auto_map is added by the converter, which knows the file)."""
        out = dict(cfg)
        form = self.result_form(cfg, groups)
        for k, v in form.config.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = groups if v == G else v
        if form.per_layer == "block_configs":
            out["block_configs"] = block_configs(self.heads(cfg), groups, config_value(cfg, self.hidden_field),
                                                 config_value(cfg, "intermediate_size"))
        return out

    def storage(self, suffix: str, cfg, kv_heads: int | None = None, form: Form | None = None) -> Storage:
        """How `suffix` is stored in a checkpoint with `kv_heads` KV heads (a result written as `form`)."""
        transposed = suffix in self.transposed and not (form and suffix in form.untransposed)
        order = None
        if suffix in self.per_kv_head:
            order = per_kv_head_order(self.heads(cfg), kv_heads or self.uniform_kv_heads(cfg),
                                      self.head_dim(cfg))
            if order == tuple(range(len(order))):  # one KV head: [q … q k v] is already canonical
                order = None
        return Storage(transposed, order, suffix in self.flat)

    def kv_rows_in(self, suffix: str, shape: tuple[int, ...]) -> int:
        """The number of canonical rows of a tensor of `shape` stored as `suffix`."""
        if suffix in self.flat:
            return shape[0] * shape[1]
        return shape[1] if suffix in self.transposed and len(shape) == 2 else shape[0]

    def stored_shape(self, suffix: str, shape: tuple[int, ...], rows: int, cfg, form: Form | None = None):
        """`shape` (the source's) with its canonical rows changed to `rows`, as the result stores it."""
        if suffix in self.flat:
            return (rows // self.head_dim(cfg), *shape[1:])
        if suffix in self.transposed and len(shape) == 2:
            return (shape[0], rows) if not (form and suffix in form.untransposed) else (rows, shape[0])
        return (rows, *shape[1:])

    # -- tensor names ----------------------------------------------------------------------------
    def classify(self, name: str) -> tuple[str, LayerKey | None, str]:
        """name → (kind, layer, suffix) with kind "kv", "copy"; raises on a name the spec does not know. layer: the
        unit the tensor belongs to (a layer index; (block name, layer index) in an encoder-decoder), None for a
        global tensor."""
        if self.blocks:
            return self._classify_in_blocks(name)
        prefix_re = re.escape(self.layer_prefix).replace(r"\{\}", r"(\d+)")
        # a base model's checkpoint names lack the root (GPT-2's h.0.… for transformer.h.0.…)
        for full in (name, self.root + name) if self.root and not name.startswith(self.root) else (name,):
            m = re.fullmatch(prefix_re + r"(.+)", full)
            if m:
                layer, suffix = int(m.group(1)), m.group(2)
                if suffix in self.kv:
                    return "kv", layer, suffix
                family = self.head_family(suffix)
                if family:  # one tensor per KV head: the family's key (head_index says which head)
                    return "kv", layer, family[0]
                if suffix in self.copy or any(re.fullmatch(p, suffix) for p in self.copy_patterns):
                    return "copy", layer, suffix
            elif full in self.global_tensors:
                return "copy", None, full
        raise UptrainError(f"tensor {name!r} is not described by the attention spec; converting it blindly "
                           f"could produce a wrong model. Add it to uptrain/arch/table.py (kv if its shape depends "
                           f"on the KV-head count, copy otherwise)")

    def _classify_in_blocks(self, name: str) -> tuple[str, LayerKey | None, str]:
        """Encoder-decoders: k / v of a pooled block are "kv", everything else is copied."""
        for b in self.blocks:
            m = re.fullmatch(re.escape(b.prefix).replace(r"\{\}", r"(\d+)") + r"(.+)", name)
            if m and (m.group(2) in self.kv or m.group(2) in self.copy):
                unit, suffix = (b.name, int(m.group(1))), m.group(2)
                return ("kv" if b.pooled and suffix in self.kv else "copy"), unit, suffix
        if name in self.global_tensors or any(re.fullmatch(p, name) for p in self.global_patterns):
            return "copy", None, name
        raise UptrainError(f"tensor {name!r} is not described by the attention spec; converting it blindly "
                           f"could produce a wrong model. Add it to uptrain/arch/table.py (kv if its shape depends "
                           f"on the KV-head count, copy otherwise)")

    def head_family(self, suffix: str) -> tuple[str, int] | None:
        """(kv key, head) for a per-layer suffix of a tensor family with one tensor per KV head, whose kv key
        holds "{}" for the head (stablelm's self_attn.k_layernorm.norms.{}.weight); None otherwise. Such a
        family is canonically the concatenation of its K tensors."""
        for key in self.kv:
            if "{}" in key:
                m = re.fullmatch(re.escape(key).replace(r"\{\}", r"(\d+)"), suffix)
                if m:
                    return key, int(m.group(1))
        return None

    def head_of(self, name: str, key: str) -> int:
        """The head of tensor `name` in the one-tensor-per-head family `key` (see head_family)."""
        m = re.search(re.escape(key).replace(r"\{\}", r"(\d+)") + "$", name)
        if m is None:
            raise UptrainError(f"tensor {name!r} is not one of the {key.replace('{}', '*')} family")
        return int(m.group(1))

    def rows(self, suffix: str, cfg, kv_heads: int | None = None) -> list[tuple[str, int, int]]:
        """[(role, start_row, stop_row)] of a kv tensor for a model with `kv_heads` KV heads."""
        d, k = self.head_dim(cfg), kv_heads or self.uniform_kv_heads(cfg)
        counts = {"H": self.heads(cfg), "K": k}
        out, start = [], 0
        for role, count in self.kv[suffix]:
            stop = start + counts[count] * d
            out.append((role, start, stop))
            start = stop
        return out

    def kv_row_blocks(self, name: str, cfg) -> list[tuple[int, int]]:
        """Row ranges of `name` that hold KV heads (empty for tensors that do not)."""
        kind, _, suffix = self.classify(name)
        if kind != "kv":
            return []
        return [(a, b) for role, a, b in self.rows(suffix, cfg) if role in ("k", "v")]


def config_value(cfg, key, *default):
    """`cfg[key]` of a config.json dict or a transformers config (`default` when given and the key is missing);
    UptrainError naming the key when a dict lacks it and no default is given."""
    if isinstance(cfg, dict):
        if key in cfg:
            return cfg[key]
        if default:
            return default[0]
        raise UptrainError(f"config.json has no {key!r}")
    return getattr(cfg, key, *default)


def model_type(cfg) -> str:
    return config_value(cfg, "model_type", None) or "<missing model_type>"
