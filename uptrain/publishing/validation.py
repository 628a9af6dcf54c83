"""What `uptrain push` checks before anything leaves the machine: safetensors weights that match their index and
headers, a config.json transformers loads, KV heads that agree between config.json, uptrain.json and the K/V
weights, and JSON files that parse."""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path

from uptrain.arch import PER_LAYER_SPECS, SPECS, attention_shape, kv_heads_text
from uptrain.checkpoint import read_safetensors_header
from uptrain.errors import UptrainError
from uptrain.kv_heads import KVHeads
from uptrain.record import FILENAME as RECORD, Record

INDEX = "model.safetensors.index.json"


def read_header(path: Path) -> dict:
    """The tensor table of a shard to publish: exactly as long as its header says."""
    header, _ = read_safetensors_header(path, exact=True, fix="re-create or re-copy it")
    header.pop("__metadata__", None)
    return header


def check_weights(folder: Path) -> tuple[list[str], dict]:
    """Weight files to upload and {tensor name: header entry}; the index and every shard must agree."""
    if not (folder / INDEX).is_file():
        if (folder / "model.safetensors").is_file():
            return ["model.safetensors"], read_header(folder / "model.safetensors")
        raise UptrainError(f"no safetensors weights in {folder} (model.safetensors or {INDEX}); only safetensors "
                           f"are uploaded — `uptrain convert` and `uptrain train` write them")
    try:
        weight_map = dict(json.loads((folder / INDEX).read_text(encoding="utf-8"))["weight_map"])
    except (ValueError, KeyError, TypeError) as e:
        raise UptrainError(f"{INDEX} is not a valid shard index ({e!r})") from e
    shards: dict[str, set] = defaultdict(set)
    for tensor, shard in weight_map.items():
        if os.path.isabs(shard) or ".." in Path(shard).parts:
            raise UptrainError(f"{INDEX} points outside the folder: {shard!r}")
        shards[shard].add(tensor)
    missing = sorted(s for s in shards if not (folder / s).is_file())
    if missing:
        raise UptrainError(f"{len(missing)} of {len(shards)} shards named in {INDEX} are missing: "
                           f"{', '.join(missing)}; the checkpoint is incomplete — re-run the conversion or copy them")
    tensors = {}
    for shard, names in sorted(shards.items()):
        header = read_header(folder / shard)
        if set(header) != names:
            extra, absent = sorted(set(header) - names), sorted(names - set(header))
            raise UptrainError(f"{shard} does not match {INDEX}: " + "; ".join(
                x for x in (extra and f"not in the index: {', '.join(extra[:5])}",
                            absent and f"missing from the shard: {', '.join(absent[:5])}") if x))
        tensors.update(header)
    return sorted(shards), tensors


def checked_config_json(folder: Path) -> dict:
    """config.json as a dict, after checking transformers can load it (known model_type, valid fields)."""
    if not (folder / "config.json").is_file():
        raise UptrainError(f"{folder} has no config.json: not a Hugging Face checkpoint folder")
    try:
        from transformers import AutoConfig

        from uptrain.hf import carries_uptrain_code, resolve

        # uptrain's own configuration code (a per-layer nemotron-nas result) runs; no one else's
        AutoConfig.from_pretrained(str(folder), trust_remote_code=carries_uptrain_code(resolve(str(folder))))
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (ValueError, KeyError, OSError, TypeError) as e:
        raise UptrainError(f"{folder}/config.json does not load with transformers: {e}") from e


def _kv_heads(config: dict) -> int | tuple[int, ...] | None:
    try:
        return attention_shape(config).kv_heads
    except (UptrainError, TypeError, ZeroDivisionError):  # a config without the usual fields
        return None


def check_kv_heads(config: dict, record: Record | None, tensors: dict) -> None:
    """The KV-head count must agree between config.json, uptrain.json and the K/V weight shapes (per layer for a
    per-layer checkpoint)."""
    mt = config.get("model_type", "")
    spec = SPECS.get(mt) or PER_LAYER_SPECS.get(mt)
    spec = spec.for_config(config) if spec is not None else None  # with its optional tensors (arch.Extra)
    kv = _kv_heads(config)
    after = record.conversion.kv_heads_after if record and record.conversion else None
    if after and kv is not None and _same(after) != _same(kv):
        raise UptrainError(f"config.json has {kv_heads_text(kv)} KV heads but uptrain.json records a conversion to "
                           f"{kv_heads_text(after)}: the folder mixes two models")
    if spec is None:
        return
    per_layer = spec.layer_kv_heads(config)
    for name, entry in tensors.items():
        try:
            kind, layer, suffix = spec.classify(name)
        except UptrainError:  # the converter is strict about unknown tensors; publishing need not be
            continue
        if kind == "kv" and "{}" not in suffix:  # (a one-tensor-per-head family has head_dim rows per tensor)
            g = per_layer[layer] if isinstance(layer, int) and layer < len(per_layer) else None
            rows = spec.rows(suffix, config, kv_heads=g if spec.per_layer else None)[-1][2]
            have = spec.kv_rows_in(suffix, tuple(entry["shape"]))
            if have != rows:  # kv_rows_in: GPT-2's Conv1D holds its heads along dim 1
                raise UptrainError(f"{name} has {have} rows but config.json's {g if spec.per_layer else kv} KV heads "
                                   f"× head_dim {spec.head_dim(config)} need {rows}: weights and config disagree")


def _same(kv):
    """KV heads as one comparable value: a per-layer list whose layers agree is its one count."""
    try:
        return KVHeads.of(kv).value
    except ValueError:  # not a count (None): compared as it is
        return kv


def check_json_files(folder: Path, names: list[str]) -> None:
    """Every JSON file to upload parses (uptrain.json was already read through record.py)."""
    for name in names:
        if name.endswith(".json") and name != RECORD:
            try:
                json.loads((folder / name).read_text(encoding="utf-8"))
            except ValueError as e:
                raise UptrainError(f"{name} is not valid JSON ({e}); a truncated copy?") from e
