"""The table of attention specs: for each `model_type`, where the K/V heads live in the checkpoint.

Adding an architecture = one entry in `SPECS` + one tiny-model test. Nothing else in the converter
knows architecture names.

Grouping (litgpt's picture; H query heads, K source KV heads, G result KV heads, contiguous groups):

    MHA  (G = H)   q: 0 1 2 3 4 5 6 7      GQA-2 (G = 2)   q: 0 1 2 3 | 4 5 6 7      MQA (G = 1)   q: 0 … 7
                   k: 0 1 2 3 4 5 6 7                       k:    0    |    1                      k:   0

Query head h reads KV head h // (H/G). Reducing a GQA source with K KV heads to G (G | K) merges
KV heads k in [j·K/G, (j+1)·K/G) into result head j, which keeps every query head on its group.

Methods see every tensor in one canonical form: rows = heads × head_dim, the roles of a fused tensor one
after the other ([q | k | v]), input features along dim 1. How a checkpoint stores it instead is data too
(`Storage`): GPT-2's Conv1D keeps weights transposed ([in, out]); gpt_neox, gpt_bigcode and falcon fuse
q, k and v per KV head:

    per KV head (K = 2, H = 4):  [q0 q1 k0 v0 | q2 q3 k1 v1]    canonical:  [q0 q1 q2 q3 | k0 k1 | v0 v1]

(with K = H that is gpt_neox's [q k v] per head; with K = 1 the plain [q | k | v] of an MQA checkpoint.)

What the result is for a given G is data as well (`Form`): a native config change (the KV-head field,
gpt_bigcode's multi_query), a native *other* architecture (GPT-2 with G = 1 is a gpt_bigcode checkpoint),
or, where no transformers class can hold G KV heads, a modeling file that travels with the checkpoint
(remote code: uptrain/modeling/, loaded with trust_remote_code=True).

Per-layer KV heads (G_l: a tuple with one G per layer, not all equal; a uniform list is one G) are one more
form: for the Llama family the nemotron-nas / DeciLM config that vLLM and llama.cpp read,

    block_configs[l].attention.n_heads_in_group = H / G_l       (layer l keeps G_l KV heads)

and the KV cache of such a model holds Σ_l G_l heads per token (`kv_cache_bytes_per_token`).
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

from uptrain.errors import UptrainError
from uptrain.kv_heads import KVHeads, per_layer_counts
from uptrain.kv_heads import text as kv_heads_text  # callers of arch read it from here too

# A row layout describes dim 0 of a tensor as consecutive segments of heads × head_dim rows.
# Roles: "q" (H heads, copied), "k"/"v" (K heads, pooled to G).
Layout = tuple[tuple[str, str], ...]  # ((role, count), …) with count "H" or "K"
K_ROWS: Layout = (("k", "K"),)
V_ROWS: Layout = (("v", "K"),)
QKV_ROWS: Layout = (("q", "H"), ("k", "K"), ("v", "K"))

_LLAMA_LAYER = (
    "input_layernorm.weight", "post_attention_layernorm.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
    "mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias",  # llama mlp_bias=True
    "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.o_proj.weight", "self_attn.o_proj.bias",
    "self_attn.rotary_emb.inv_freq",  # a buffer some older checkpoints saved
)
_SEPARATE_KV = {
    "self_attn.k_proj.weight": K_ROWS, "self_attn.k_proj.bias": K_ROWS,
    "self_attn.v_proj.weight": V_ROWS, "self_attn.v_proj.bias": V_ROWS,
}
_FUSED_EXPERTS = r"mlp\.experts\.(gate_up_proj|down_proj)"
_GEMMA_FFN_NORMS = ("pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight")
_GLOBAL = ("model.embed_tokens.weight", "model.norm.weight", "model.norm.bias", "lm_head.weight")


G = "G"  # in a Form's config: the result's KV-head count

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
        return [f"{k}: {v} (has {_get(cfg, k, None)})" for k, v in self.requires.items()
                if (_get(cfg, k, None) or False) != v]

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
        return next(v for v in (_get(cfg, f, None) for f in self.layers_fields) if v is not None)


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
        return _get(cfg, self.heads_field)

    def kv_heads(self, cfg) -> int | tuple[int, ...]:
        """K: the KV heads of every layer; a tuple G_l when a per-layer checkpoint's layers differ."""
        if self.per_layer:
            return KVHeads.of(tuple(self.layer_kv_heads(cfg))).value
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
        if self.gqa_field and _get(cfg, self.gqa_field, None):
            return _get(cfg, self.kv_heads_field)
        if self.mqa_field and _get(cfg, self.mqa_field, None):
            return 1
        # MHA configs often omit the KV-head count (None / missing means "= heads").
        return (_get(cfg, self.kv_heads_field, None) if self.kv_heads_field else None) or self.heads(cfg)

    def layer_kv_heads(self, cfg) -> tuple[int, ...]:
        """KV heads of each layer holding a KV cache: G_l of a per-layer checkpoint, else K for every layer."""
        if self.per_layer == "block_configs":
            return tuple(0 if _get(_get(b, "attention"), "no_op", False)
                         else self.heads(cfg) // _get(_get(b, "attention"), "n_heads_in_group")
                         for b in _get(cfg, "block_configs"))
        return (self._config_kv_heads(cfg),) * self.layers(cfg)

    def layers(self, cfg) -> int:
        """Layers holding a KV cache (an encoder-decoder's decoder layers)."""
        cached = [b for b in self.blocks if b.cached]
        return cached[0].layers(cfg) if cached else _get(cfg, self.layers_field)

    def head_dim(self, cfg) -> int:
        # Never assume hidden / heads: gemma, qwen3 and others set head_dim explicitly.
        return _get(cfg, self.head_dim_field, None) or _get(cfg, self.hidden_field) // self.heads(cfg)

    def units(self, cfg) -> list:
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
        import dataclasses

        blocks = tuple(dataclasses.replace(b, pooled=True) for b in self.blocks)
        forms = tuple(dataclasses.replace(f, config={**f.config, "gqa_attention": attention}) if f.remote_code
                      else f for f in self.forms)
        return dataclasses.replace(self, blocks=blocks, forms=forms)

    def for_config(self, cfg) -> AttentionSpec:
        """This spec plus the tensors of the config's optional features (extras whose flag is set)."""
        on = [x for x in self.extras if _get(cfg, x.flag, None)]
        if not on:
            return self
        import dataclasses

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
                               f"{self.heads(cfg)} query heads (see its forms in uptrain/arch.py)")
        return form

    def per_layer_refusal(self, cfg) -> str | None:
        """Why this source cannot get per-layer KV heads (None when it can), for the caller's message."""
        forms = [f for f in self.forms if f.groups == "per-layer"]
        if not forms:
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
            out["block_configs"] = block_configs(self.heads(cfg), groups, _get(cfg, self.hidden_field),
                                                 _get(cfg, "intermediate_size"))
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
    def classify(self, name: str) -> tuple[str, int | None, str]:
        """name → (kind, layer, suffix) with kind "kv", "copy"; raises on a name the spec does not know."""
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
                           f"could produce a wrong model. Add it to uptrain/arch.py (kv if its shape depends "
                           f"on the KV-head count, copy otherwise)")

    def _classify_in_blocks(self, name: str):
        """Encoder-decoders: k / v of a pooled block are "kv", everything else is copied."""
        for b in self.blocks:
            m = re.fullmatch(re.escape(b.prefix).replace(r"\{\}", r"(\d+)") + r"(.+)", name)
            if m and (m.group(2) in self.kv or m.group(2) in self.copy):
                unit, suffix = (b.name, int(m.group(1))), m.group(2)
                return ("kv" if b.pooled and suffix in self.kv else "copy"), unit, suffix
        if name in self.global_tensors or any(re.fullmatch(p, name) for p in self.global_patterns):
            return "copy", None, name
        raise UptrainError(f"tensor {name!r} is not described by the attention spec; converting it blindly "
                           f"could produce a wrong model. Add it to uptrain/arch.py (kv if its shape depends "
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


_LLAMA = AttentionSpec(kv=_SEPARATE_KV, copy=_LLAMA_LAYER)
_C_ATTN = {"attn.c_attn.weight": QKV_ROWS, "attn.c_attn.bias": QKV_ROWS}
_GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_GPT2_LAYER = ("ln_1.weight", "ln_1.bias", "ln_2.weight", "ln_2.bias", "attn.c_proj.weight", "attn.c_proj.bias",
               "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias",
               "attn.bias", "attn.masked_bias")  # causal-mask buffers older checkpoints saved
_GPT2_GLOBAL = ("transformer.wte.weight", "transformer.wpe.weight", "transformer.ln_f.weight", "transformer.ln_f.bias",
                "lm_head.weight")


def _remote_code_forms(template: str) -> tuple[Form, ...]:
    """G = H: the source as it is (native); otherwise num_key_value_heads = G plus uptrain/modeling's file."""
    return Form(groups="H"), Form(config={"num_key_value_heads": G}, remote_code=template)


def _deci_form(requires: dict | None = None, config: dict | None = None) -> Form:
    """Per-layer KV heads of a Llama-family source: the nemotron-nas / DeciLM config (block_configs) and
    uptrain/modeling's file, whose model is transformers' Llama with per-layer k/v widths. `requires`: what the
    form cannot express must be off (a sliding window); `config`: the source's other differences from Llama."""
    return Form(groups="per-layer", requires=requires or {}, remote_code="nemotron-nas", per_layer="block_configs",
                config={"model_type": "nemotron-nas", "architectures": ["DeciLMForCausalLM"],
                        "num_key_value_heads": None, **(config or {})})


def _llama_family(deci: Form) -> AttentionSpec:
    return dataclasses.replace(_LLAMA, forms=(Form(config={"num_key_value_heads": G}), deci))


SPECS: dict[str, AttentionSpec] = {
    "llama": _llama_family(_deci_form()),
    "mistral": _llama_family(_deci_form(requires={"sliding_window": False}, config={"sliding_window": None})),
    # q/k/v biases are in _SEPARATE_KV / _LLAMA_LAYER; o_proj has none: nemotron-nas says so with qkv_bias (the
    # field vLLM's DeciLM reads for q/k/v, attention_bias for o_proj)
    "qwen2": _llama_family(_deci_form(
        requires={"use_sliding_window": False}, config={
            "qkv_bias": True, "attention_bias": False, "use_sliding_window": None, "sliding_window": None,
            "max_window_layers": None, "layer_types": None})),
    # q_norm / k_norm: RMSNorm over head_dim, one weight shared by all heads → shape independent of K.
    "qwen3": AttentionSpec(kv=_SEPARATE_KV, copy=_LLAMA_LAYER + ("self_attn.q_norm.weight", "self_attn.k_norm.weight")),
    "gemma": _LLAMA,  # explicit head_dim handled by head_dim()
    # Fused [q | k | v] rows; fused gate_up MLP is copied.
    "phi3": AttentionSpec(
        kv={"self_attn.qkv_proj.weight": QKV_ROWS, "self_attn.qkv_proj.bias": QKV_ROWS},
        copy=("input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate_up_proj.weight",
              "mlp.down_proj.weight", "self_attn.o_proj.weight"),
        required=("self_attn.qkv_proj.weight",), q="self_attn.qkv_proj"),
    "starcoder2": AttentionSpec(
        kv=_SEPARATE_KV,
        copy=("input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
              "post_attention_layernorm.bias", "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight",
              "mlp.c_proj.bias", "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.o_proj.weight",
              "self_attn.o_proj.bias")),
    # k_norm is an RMSNorm over the concatenation of all KV heads: its weight has K·head_dim entries.
    "granite": _LLAMA,  # its multipliers (embedding, attention, residual, logits) are config scalars
    "smollm3": _LLAMA,  # every 4th layer has no RoPE: a per-frequency fold is exact without rotations too
    "gemma2": AttentionSpec(kv=_SEPARATE_KV, copy=_LLAMA_LAYER + _GEMMA_FFN_NORMS),
    # q_norm / k_norm as in qwen3: one RMSNorm weight over head_dim, shared by all heads.
    "gemma3_text": AttentionSpec(kv=_SEPARATE_KV, copy=_LLAMA_LAYER + _GEMMA_FFN_NORMS
                                 + ("self_attn.q_norm.weight", "self_attn.k_norm.weight")),
    # Parallel attention and MLP after one LayerNorm (weight only); RoPE on interleaved pairs (2i, 2i+1).
    # use_qk_norm (Command R+): a LayerNorm weight per head, stored [heads, head_dim]; k_norm's rows are the KV
    # heads (pooled like K), q_norm's the query heads (copied).
    "cohere": AttentionSpec(
        kv=_SEPARATE_KV,
        copy=("input_layernorm.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
              "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.o_proj.weight", "self_attn.o_proj.bias"),
        rope="interleaved",
        extras=(Extra("use_qk_norm", kv={"self_attn.k_norm.weight": K_ROWS}, copy=("self_attn.q_norm.weight",),
                      flat=("self_attn.k_norm.weight",)),)),
    # OLMo-1: LayerNorms without parameters; clip_qkv clamps q, k and v (no effect on pooling).
    "olmo": AttentionSpec(
        kv=_SEPARATE_KV,
        copy=("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "self_attn.q_proj.weight",
              "self_attn.o_proj.weight")),
    # LayerNorms with biases, partial rotary, optional q/k/v biases. qk_layernorm (StableLM-2-12B) keeps one
    # LayerNorm per head, each its own tensor under the head's index: the K k_layernorm norms are pooled to G
    # like K's rows (a family: "{}" is the head), the H q_layernorm norms copied.
    "stablelm": AttentionSpec(
        kv=_SEPARATE_KV,
        copy=("input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
              "post_attention_layernorm.bias", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
              "self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.o_proj.weight"),
        extras=(Extra("qk_layernorm", kv={"self_attn.k_layernorm.norms.{}.weight": K_ROWS},
                      copy_patterns=(r"self_attn\.q_layernorm\.norms\.\d+\.weight",)),)),
    # Mixture-of-experts MLPs: only attention changes; router and experts are copied byte for byte. Both the
    # per-expert names checkpoints hold and the fused ones transformers 5 uses in memory (mlp.experts.*_proj).
    "mixtral": AttentionSpec(
        kv=_SEPARATE_KV, copy=_LLAMA_LAYER + ("block_sparse_moe.gate.weight", "mlp.gate.weight"),
        copy_patterns=(r"block_sparse_moe\.experts\.\d+\.w[123]\.weight", _FUSED_EXPERTS)),
    "qwen2_moe": AttentionSpec(
        kv=_SEPARATE_KV,
        copy=_LLAMA_LAYER + ("mlp.gate.weight", "mlp.shared_expert_gate.weight", "mlp.shared_expert.gate_proj.weight",
                             "mlp.shared_expert.up_proj.weight", "mlp.shared_expert.down_proj.weight"),
        copy_patterns=(r"mlp\.experts\.\d+\.(gate|up|down)_proj\.weight", _FUSED_EXPERTS)),
    "olmo2": AttentionSpec(
        kv={**_SEPARATE_KV, "self_attn.k_norm.weight": K_ROWS},
        copy=("post_attention_layernorm.weight", "post_feedforward_layernorm.weight", "mlp.gate_proj.weight",
              "mlp.up_proj.weight", "mlp.down_proj.weight", "self_attn.q_proj.weight", "self_attn.o_proj.weight",
              "self_attn.q_norm.weight")),
    # ---- architectures whose transformers class has no KV-head count: below G = H the result carries a
    # modeling file (remote code, uptrain/modeling/), at G = H it is the source, unchanged.
    # Pythia: q, k, v fused per head ([q k v] × H; per KV head in the result), partial rotary, parallel
    # residual. Old checkpoints hold the causal-mask buffers and embed_out (transformers 5 renames it lm_head).
    "gpt_neox": AttentionSpec(
        kv={"attention.query_key_value.weight": QKV_ROWS, "attention.query_key_value.bias": QKV_ROWS},
        copy=("input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
              "post_attention_layernorm.bias", "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias",
              "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias", "attention.dense.weight", "attention.dense.bias",
              "attention.bias", "attention.masked_bias", "attention.rotary_emb.inv_freq"),
        required=("attention.query_key_value.weight",), layer_prefix="gpt_neox.layers.{}.",
        global_tensors=("gpt_neox.embed_in.weight", "gpt_neox.final_layer_norm.weight",
                        "gpt_neox.final_layer_norm.bias", "embed_out.weight", "lm_head.weight"),
        q="attention.query_key_value", o="attention.dense",
        per_kv_head=("attention.query_key_value.weight", "attention.query_key_value.bias"),
        forms=_remote_code_forms("gpt_neox")),
    # GPT-2: Conv1D weights stored [in, out], c_attn = [q | k | v]; learned positions, no RoPE. MQA (G = 1) is
    # written as a native gpt_bigcode checkpoint (multi_query, nn.Linear weights) unless the attention
    # scales by layer index, which gpt_bigcode cannot express.
    "gpt2": AttentionSpec(
        kv=_C_ATTN, copy=_GPT2_LAYER, required=("attn.c_attn.weight",), global_tensors=_GPT2_GLOBAL,
        layer_prefix="transformer.h.{}.", root="transformer.", q="attn.c_attn", o="attn.c_proj", rope=None,
        heads_field="n_head", layers_field="n_layer", hidden_field="n_embd", transposed=_GPT2_CONV1D,
        forms=(Form(groups="H"),
               Form(groups="1", requires={"scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False},
                    config={"model_type": "gpt_bigcode", "architectures": ["GPTBigCodeForCausalLM"],
                            "multi_query": True, "num_key_value_heads": G},
                    untransposed=_GPT2_CONV1D),
               *_remote_code_forms("gpt2")[1:])),
    # OPT: separate projections with biases (enable_bias), learned positions; base-model checkpoints lack
    # "model." (facebook/opt-*: decoder.layers.…).
    "opt": AttentionSpec(
        kv=_SEPARATE_KV,
        copy=("self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.out_proj.weight",
              "self_attn.out_proj.bias", "self_attn_layer_norm.weight", "self_attn_layer_norm.bias", "fc1.weight",
              "fc1.bias", "fc2.weight", "fc2.bias", "final_layer_norm.weight", "final_layer_norm.bias"),
        global_tensors=("model.decoder.embed_tokens.weight", "model.decoder.embed_positions.weight",
                        "model.decoder.final_layer_norm.weight", "model.decoder.final_layer_norm.bias",
                        "model.decoder.project_in.weight", "model.decoder.project_out.weight", "lm_head.weight"),
        layer_prefix="model.decoder.layers.{}.", root="model.", o="self_attn.out_proj", rope=None,
        forms=_remote_code_forms("opt")),
    # phi-1 / phi-1.5 / phi-2: biases everywhere, the output projection is `dense`, partial rotary, one
    # LayerNorm before a parallel attention + MLP; qk_layernorm norms span head_dim (shared by all heads).
    "phi": AttentionSpec(
        kv=_SEPARATE_KV,
        copy=("self_attn.q_proj.weight", "self_attn.q_proj.bias", "self_attn.dense.weight", "self_attn.dense.bias",
              "input_layernorm.weight", "input_layernorm.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
              "mlp.fc2.bias"),
        extras=(Extra("qk_layernorm", copy=("self_attn.q_layernorm.weight", "self_attn.q_layernorm.bias",
                                            "self_attn.k_layernorm.weight", "self_attn.k_layernorm.bias")),),
        global_tensors=("model.embed_tokens.weight", "model.final_layernorm.weight", "model.final_layernorm.bias",
                        "lm_head.weight", "lm_head.bias"),
        o="self_attn.dense"),
    # Falcon: q, k, v fused per KV head in all three layouts — MHA ([q k v] × H), multi_query ([q … q k v],
    # falcon-7b) and new_decoder_architecture ([q … q k v] × num_kv_heads, falcon-40b/180b). Below G = H an
    # MHA source becomes multi_query (G = 1) or, with a parallel block (one LayerNorm kept:
    # num_ln_in_parallel_attn 1), the new decoder architecture; sequential MHA blocks have no GQA form.
    # transformers' Falcon broadcasts K/V to every head before its cache in the new decoder architecture:
    # the cache it keeps there is not smaller (multi_query's is).
    "falcon": AttentionSpec(
        kv={"self_attention.query_key_value.weight": QKV_ROWS, "self_attention.query_key_value.bias": QKV_ROWS},
        copy=("self_attention.dense.weight", "self_attention.dense.bias", "mlp.dense_h_to_4h.weight",
              "mlp.dense_h_to_4h.bias", "mlp.dense_4h_to_h.weight", "mlp.dense_4h_to_h.bias",
              "input_layernorm.weight", "input_layernorm.bias", "post_attention_layernorm.weight",
              "post_attention_layernorm.bias", "ln_attn.weight", "ln_attn.bias", "ln_mlp.weight", "ln_mlp.bias"),
        required=("self_attention.query_key_value.weight",), layer_prefix="transformer.h.{}.", root="transformer.",
        global_tensors=("transformer.word_embeddings.weight", "transformer.ln_f.weight", "transformer.ln_f.bias",
                        "lm_head.weight"),
        q="self_attention.query_key_value", o="self_attention.dense",
        kv_heads_field="num_kv_heads", mqa_field="multi_query", gqa_field="new_decoder_architecture",
        per_kv_head=("self_attention.query_key_value.weight", "self_attention.query_key_value.bias"),
        forms=(Form(groups="H"),
               Form(requires={"new_decoder_architecture": True}, config={"num_kv_heads": G}),
               Form(groups="1", config={"multi_query": True, "num_kv_heads": G}),
               Form(requires={"parallel_attn": True},
                    config={"new_decoder_architecture": True, "num_kv_heads": G, "num_ln_in_parallel_attn": 1}))),
    # gpt_bigcode (SantaCoder, StarCoder-1): MHA or MQA, nothing between (multi_query). c_attn is an
    # nn.Linear fused per head in MHA ([q k v] × H) and [q … q | k | v] in MQA: per KV head both times.
    "gpt_bigcode": AttentionSpec(
        kv=_C_ATTN, copy=_GPT2_LAYER, required=("attn.c_attn.weight",), global_tensors=_GPT2_GLOBAL,
        layer_prefix="transformer.h.{}.", root="transformer.", q="attn.c_attn", o="attn.c_proj", rope=None,
        heads_field="n_head", layers_field="n_layer", hidden_field="n_embd", mqa_field="multi_query",
        kv_heads_field=None,  # transformers 5 writes a num_key_value_heads that multi_query overrides on load
        per_kv_head=tuple(_C_ATTN),
        forms=(Form(groups="H", config={"multi_query": False, "num_key_value_heads": G}),
               Form(groups="1", config={"multi_query": True, "num_key_value_heads": G}))),
}


# ---- encoder-decoders: T5 and its multilingual kin, in the T5.1.1 layout (relative position bias, no 1/sqrt(d)
# scaling, relu or gated-gelu feed-forward, tied or untied LM head). The GQA paper pools the decoder's self- and
# cross-attention and leaves encoder self-attention alone (it runs in parallel over the source: not bound by
# memory bandwidth, and it has no cache); ConvertOptions.attention "all" pools it too (AttentionSpec.pooling).
# No transformers class holds G KV heads of a T5: below G = H the result carries uptrain/modeling's file.
_T5_BLOCKS = (
    Block("encoder", "encoder.block.{}.layer.0.SelfAttention.", ("num_layers",), pooled=False, cached=False),
    Block("decoder", "decoder.block.{}.layer.0.SelfAttention.", ("num_decoder_layers", "num_layers"), pooled=True,
          cached=True),
    Block("cross", "decoder.block.{}.layer.1.EncDecAttention.", ("num_decoder_layers", "num_layers"), pooled=True,
          cached=True),
)


def _t5(model_type: str) -> AttentionSpec:
    return AttentionSpec(
        kv={"k.weight": K_ROWS, "v.weight": V_ROWS},
        # relative_attention_bias: [buckets, H], per query head (every layer's in umT5, the first's in T5)
        copy=("q.weight", "o.weight", "relative_attention_bias.weight"),
        required=("k.weight", "v.weight"), q="q", o="o", rope=None, blocks=_T5_BLOCKS,
        global_tensors=("shared.weight", "encoder.embed_tokens.weight", "decoder.embed_tokens.weight", "lm_head.weight",
                        "encoder.final_layer_norm.weight", "decoder.final_layer_norm.weight"),
        global_patterns=(r"(encoder|decoder)\.block\.\d+\.layer\.\d+\.layer_norm\.weight",
                         r"(encoder|decoder)\.block\.\d+\.layer\.\d+\.DenseReluDense\.(wi|wi_0|wi_1|wo)\.weight"),
        heads_field="num_heads", layers_field="num_layers", hidden_field="d_model", head_dim_field="d_kv",
        forms=(Form(groups="H"), Form(config={"num_key_value_heads": G, "gqa_attention": "decoder"},
                                      remote_code=model_type)))


# A table of its own: SPECS is the causal table (tests keep it equal to their causal tiny models).
SEQ2SEQ_SPECS: dict[str, AttentionSpec] = {"t5": _t5("t5"), "mt5": _t5("mt5"), "umt5": _t5("umt5")}

# Results with per-layer KV heads, read back (inspect, eval, train, push): Llama-named tensors, G_l from the
# config. Not conversion sources (ConvertOptions.check_source refuses them: convert their source instead).
PER_LAYER_SPECS: dict[str, AttentionSpec] = {
    "nemotron-nas": dataclasses.replace(_LLAMA, per_layer="block_configs", kv_heads_field=None, forms=()),
}


def block_configs(heads: int, groups: tuple[int, ...], hidden: int, intermediate: int) -> list[dict]:
    """nemotron-nas' per-layer blocks for KV heads G_l and an unchanged MLP: what vLLM's DeciLM reads
    (attention.no_op, n_heads_in_group = H / G_l; ffn.no_op, then ffn_mult when present, else
    intermediate_size). ffn_mult (Nemotron's own field, which llama.cpp's converter reads) is written only where
    DeciLM's rule turns it back into exactly this intermediate size."""
    ffn: dict[str, bool | float | int] = {"no_op": False, "replace_with_linear": False}
    mult = 3 * intermediate / (2 * hidden)
    if ffn_mult_to_intermediate_size(mult, hidden) == intermediate:
        ffn["ffn_mult"] = mult
    ffn["intermediate_size"] = intermediate
    return [{"attention": {"no_op": False, "replace_with_linear": False, "n_heads_in_group": heads // g},
             "ffn": dict(ffn)} for g in groups]


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden: int) -> int:
    """DeciLM's rule (vLLM's nemotron_nas.py, Nemotron's modeling file): int(2/3 · mult · hidden), rounded up to a
    multiple of 256."""
    size = int(2 * ffn_mult * hidden / 3)
    return size if size % 256 == 0 else size + 256 - size % 256


def _get(cfg, key, *default):
    if isinstance(cfg, dict):
        if key in cfg:
            return cfg[key]
        if default:
            return default[0]
        raise UptrainError(f"config.json has no {key!r}")
    return getattr(cfg, key, *default)


def model_type(cfg) -> str:
    return _get(cfg, "model_type", None) or "<missing model_type>"


def _is_encoder(mt: str) -> bool:
    """A masked-LM architecture without a seq2seq form (BERT, RoBERTa, DeBERTa …), from transformers' own
    auto mappings (imported only on this error path: planning a conversion never imports transformers)."""
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES as MLM
        from transformers.models.auto.modeling_auto import MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES as S2S
    except ImportError:
        return False
    return mt in MLM and mt not in S2S


def spec_for_config(cfg) -> AttentionSpec:
    mt = model_type(cfg)
    spec = SPECS.get(mt) or SEQ2SEQ_SPECS.get(mt) or PER_LAYER_SPECS.get(mt)
    if spec is not None:
        spec = spec.for_config(cfg)  # with the tensors of the config's optional features (Extra)
    if spec is None and _is_encoder(mt):
        raise UptrainError(f"architecture {mt!r} is an encoder (masked-LM family): it reads its whole input at once "
                           f"and keeps no KV cache, so sharing KV heads saves nothing there. GQA is for "
                           f"decoders; supported: {', '.join(sorted({**SPECS, **SEQ2SEQ_SPECS}))}")
    if spec is None:
        raise UptrainError(f"architecture {mt!r} is not supported yet; supported: "
                           f"{', '.join(sorted({**SPECS, **SEQ2SEQ_SPECS}))}. "
                           f"Adding one is an entry in uptrain/arch.py plus a tiny-model test")
    return spec


# ------------------------------------------------------------------------------------------ shapes and sizes
# For configs outside the table (evaluating a model uptrain cannot convert): the usual field names.
_GENERIC = AttentionSpec(kv={}, copy=())


@dataclass(frozen=True)
class AttentionShape:
    layers: int
    heads: int  # H
    kv_heads: int | tuple[int, ...]  # K (or G after a conversion); a tuple G_l when the layers differ
    head_dim: int

    @property
    def kind(self) -> str:
        return attention_kind(self.heads, self.kv_heads)

    def kv_cache_bytes_per_token(self, bytes_per_value: int) -> int:
        return kv_cache_bytes_per_token(self.layers, self.kv_heads, self.head_dim, bytes_per_value)

    def to_dict(self) -> dict:
        """The field names of an evaluation row and of config.json (per-layer KV heads as a list)."""
        kv = list(self.kv_heads) if isinstance(self.kv_heads, tuple) else self.kv_heads
        return {"num_layers": self.layers, "num_attention_heads": self.heads,
                "num_key_value_heads": kv, "head_dim": self.head_dim}


def attention_shape(cfg) -> AttentionShape:
    """Layers, query heads, KV heads and head_dim of a config (dict or transformers config; the text config
    of a multimodal one), through its spec when the table knows it."""
    if hasattr(cfg, "get_text_config"):
        cfg = cfg.get_text_config()
    mt = _get(cfg, "model_type", None)
    spec = SPECS.get(mt) or SEQ2SEQ_SPECS.get(mt) or PER_LAYER_SPECS.get(mt) or _GENERIC
    return AttentionShape(spec.layers(cfg), spec.heads(cfg), spec.kv_heads(cfg), spec.head_dim(cfg))


def attention_kind(heads, kv_heads) -> str:
    """"MHA" (K = H), "MQA" (K = 1), "GQA-K", or "per-layer GQA" for KV heads that differ between layers (a
    list G_l); "?" when either count is unknown."""
    try:
        kv = KVHeads.of(kv_heads)
    except ValueError:  # unknown (None, 0)
        return "?"
    if kv.per_layer is not None:
        return "per-layer GQA" if heads else "?"
    kv_heads = kv.uniform
    if not heads or not kv_heads:
        return "?"
    return "MHA" if kv_heads == heads else "MQA" if kv_heads == 1 else f"GQA-{kv_heads}"


def kv_cache_bytes_per_token(layers: int, kv_heads, head_dim: int, bytes_per_value: int) -> int:
    """K and V, every layer, one token: 2 × head_dim × bytes × the KV heads summed over layers (layers × K, or
    Σ_l G_l when `kv_heads` is a list with one count per layer)."""
    per_layer = per_layer_counts(kv_heads)
    if per_layer is not None:
        if len(per_layer) != layers:
            raise ValueError(f"{len(per_layer)} per-layer KV-head counts for {layers} layers")
        return 2 * sum(per_layer) * head_dim * bytes_per_value
    return layers * 2 * kv_heads * head_dim * bytes_per_value


def valid_groups(kv_heads: int) -> list[int]:
    """G values a checkpoint with `kv_heads` KV heads can be reduced to (divisors, contiguous groups)."""
    return [g for g in range(1, kv_heads + 1) if kv_heads % g == 0]


def check_groups(groups, kv_heads: int, key: str = "groups", layers: int | None = None) -> None:
    """`key` is how the caller spells the option: --groups, model.convert.groups, groups. `groups`: one G, or a
    list with one G per layer (`layers` of them)."""
    per_layer = per_layer_counts(groups)
    if per_layer is not None:
        said = kv_heads_text(per_layer)
        if layers is not None and len(per_layer) != layers:
            raise UptrainError(f"{key} {said}: {len(per_layer)} values for a model with {layers} layers; give one G "
                               f"for every layer, or a single G")
        for layer, g in enumerate(per_layer):
            try:
                check_groups(g, kv_heads, key)
            except UptrainError as e:
                raise UptrainError(f"{key} {said}: layer {layer}'s {e.args[0][len(key) + 1:]}") from None
        return
    if groups < 1 or groups > kv_heads or kv_heads % groups:
        why = "larger than the" if groups > kv_heads else "does not divide the"
        if groups < 1:
            why = "must be at least 1 and divide the"
        raise UptrainError(f"{key} {groups} {why} source's {kv_heads} KV heads; "
                           f"valid values: {', '.join(map(str, valid_groups(kv_heads)))}")
