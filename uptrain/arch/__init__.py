"""What uptrain knows of architectures, as data: for each `model_type`, where the K/V heads live in the
checkpoint and what a result with G KV heads is.

    storage.py       the canonical form of a tensor and how a checkpoint stores it instead (Storage, row layouts)
    specs.py         the spec types: AttentionSpec, Form, Extra, Block (and reading a config's fields)
    table.py         the table itself: SPECS (decoder-only), SEQ2SEQ_SPECS, PER_LAYER_SPECS; spec_for_config
    nemotron_nas.py  the nemotron-nas / DeciLM config a per-layer result is written in (block_configs)
    kv.py            KV-head arithmetic: valid G, MHA / GQA / MQA labels, KV-cache bytes
    shapes.py        a config's attention shape (layers, H, K, head_dim), through the table when it knows it

Adding an architecture = one entry in `SPECS` (table.py) + one tiny-model test.
"""
# The package's names are imported from `uptrain.arch` everywhere (code, tests, notebooks, docs), whichever
# module holds them: this list keeps those imports working and says what the package offers.
from uptrain.arch.kv import attention_kind, check_groups, kv_cache_bytes_per_token, kv_heads_text, valid_groups
from uptrain.arch.nemotron_nas import block_configs, ffn_mult_to_intermediate_size
from uptrain.arch.shapes import AttentionShape, attention_shape
from uptrain.arch.specs import G, AttentionSpec, Block, Extra, Form, model_type
from uptrain.arch.storage import ATTENTION_BUFFERS, K_ROWS, QKV_ROWS, V_ROWS, Layout, Storage, per_kv_head_order
from uptrain.arch.table import PER_LAYER_SPECS, SEQ2SEQ_SPECS, SPECS, spec_for_config

__all__ = [
    "ATTENTION_BUFFERS", "G", "K_ROWS", "PER_LAYER_SPECS", "QKV_ROWS", "SEQ2SEQ_SPECS", "SPECS", "V_ROWS",
    "AttentionShape", "AttentionSpec", "Block", "Extra", "Form", "Layout", "Storage",
    "attention_kind", "attention_shape", "block_configs", "check_groups", "ffn_mult_to_intermediate_size",
    "kv_cache_bytes_per_token", "kv_heads_text", "model_type", "per_kv_head_order", "spec_for_config",
    "valid_groups",
]
