"""Streaming checkpoint I/O: read safetensors headers without loading data, read one tensor at a time,
copy unchanged tensors as raw bytes, and write shards incrementally from a plan of (name, dtype, shape). Nothing here holds more than one tensor.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import struct
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

import torch

from uptrain.errors import UptrainError

# safetensors dtype names ↔ torch dtypes
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"

# Non-weight files that travel with a checkpoint (tokenizer, generation config, chat template, licence).
# An allow-list on purpose: training leftovers, old model cards and caches are not copied.
COMPANION_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "vocab.txt", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "generation_config.json",
    "chat_template.jinja", "chat_template.json", "LICENSE*", "NOTICE*", "USE_POLICY*",
)
# What a Hub download of a checkpoint fetches (no pickles, no extra formats).
CHECKPOINT_FILES = ["*.json", "*.safetensors", "README.md", *COMPANION_FILES]
COPY_CHUNK = 64 << 20


@dataclass(frozen=True)
class TensorEntry:
    name: str
    file: str  # absolute path of the shard
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    begin: int  # absolute byte offsets in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


def dtype_size(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


# ------------------------------------------------------------------------------------------ source
def read_config(folder: Path) -> dict:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise UptrainError(f"{folder} has no config.json; is it a Hugging Face checkpoint folder?")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise UptrainError(f"{cfg} is not valid JSON ({e})") from e


def read_safetensors_header(path: str) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the byte offset where its data starts; validates that
    the file is long enough for every tensor it declares (a truncated download is caught here)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UptrainError(f"{path} is truncated or not a safetensors file (re-download or re-save it)")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 << 20):
            raise UptrainError(f"{path} is corrupt or not a safetensors file (header length {n}); re-download it")
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UptrainError(f"{path} has a corrupt safetensors header ({e}); re-download it") from e
    data_start = 8 + n
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
    if ends and data_start + max(ends) > size:
        raise UptrainError(f"{path} is truncated: it declares {data_start + max(ends)} bytes but has {size}; "
                           f"re-download or re-save it")
    return header, data_start


class SafetensorsSource:
    """All tensors of a checkpoint folder by name, from the shard headers only."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / SAFE_INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise UptrainError(f"{index} is not a valid shard index ({e})") from e
            files = sorted(set(weight_map.values()))
        elif (folder / SAFE_SINGLE).is_file():
            weight_map, files = None, [SAFE_SINGLE]
        else:
            raise UptrainError(f"{folder} has no {SAFE_SINGLE} or {SAFE_INDEX}"
                               + ("; it holds pickle .bin weights: pass --allow-pickle to read them"
                                  if any(folder.glob("pytorch_model*.bin")) else ""))
        self.files = files
        self.entries: dict[str, TensorEntry] = {}
        self.header_hash = hashlib.sha256()
        for fname in files:
            path = folder / fname
            if not path.is_file():
                raise UptrainError(f"the shard index names {fname}, which is missing from {folder}; "
                                   f"re-download the checkpoint")
            header, start = read_safetensors_header(str(path))
            self.header_hash.update(json.dumps(header, sort_keys=True).encode())
            for name, v in header.items():
                if name == "__metadata__":
                    continue
                if v["dtype"] not in DTYPES:
                    raise UptrainError(f"{name} in {fname} has dtype {v['dtype']}, which uptrain cannot read")
                a, b = v["data_offsets"]
                self.entries[name] = TensorEntry(name, str(path), v["dtype"], tuple(v["shape"]), start + a, start + b)
        if weight_map is not None:
            for name, fname in weight_map.items():
                e = self.entries.get(name)
                if e is None or os.path.basename(e.file) != fname:
                    raise UptrainError(f"the shard index maps {name} to {fname}, but that shard does not hold it; "
                                       f"the checkpoint is inconsistent — re-download or re-save it")

    def read(self, name: str) -> torch.Tensor:
        e = self.entries[name]
        with open(e.file, "rb") as f:
            f.seek(e.begin)
            buf = bytearray(f.read(e.nbytes))
        if len(buf) != e.nbytes:
            raise UptrainError(f"{e.file} is truncated while reading {name}")
        if not buf:
            return torch.empty(e.shape, dtype=DTYPES[e.dtype])
        return torch.frombuffer(buf, dtype=DTYPES[e.dtype]).view(e.shape)

    def copy_bytes(self, name: str, dst) -> None:
        """Raw byte copy of an unchanged tensor: no parsing, no dtype round trip. Uses the kernel's
        copy_file_range where it can (no trip through user space, like `cp`), else read/write chunks.
        `dst` must be unbuffered (FileIO) so that its file position is the descriptor's."""
        e = self.entries[name]
        with open(e.file, "rb", buffering=0) as f:
            offset, left = e.begin, e.nbytes
            if hasattr(os, "copy_file_range"):
                try:
                    while left:
                        n = os.copy_file_range(f.fileno(), dst.fileno(), min(left, 1 << 30), offset)
                        if n == 0:
                            raise UptrainError(f"{e.file} is truncated while copying {name}")
                        offset, left = offset + n, left - n
                    return
                except OSError:  # e.g. across file systems on old kernels: fall back to plain copies
                    pass
            f.seek(offset)
            while left:
                chunk = f.read(min(COPY_CHUNK, left))
                if not chunk:
                    raise UptrainError(f"{e.file} is truncated while copying {name}")
                write_all(dst, chunk)
                left -= len(chunk)


class PickleSource:
    """pytorch_model*.bin, read only with --allow-pickle and `weights_only=True` (no code execution),
    memory-mapped so that loading a shard does not read it into memory."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / BIN_INDEX
        files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [BIN_SINGLE]
        self.files, self._tensors, self.entries = files, {}, {}
        self.header_hash = hashlib.sha256()
        for fname in files:
            path = folder / fname
            if not path.is_file():
                raise UptrainError(f"{fname} is missing from {folder}")
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:
                raise UptrainError(f"{path} could not be read as a weights-only pickle ({e}); convert it to "
                                   f"safetensors first") from e
            for name, t in sd.items():
                self._tensors[name] = t
                self.entries[name] = TensorEntry(name, str(path), DTYPE_NAMES[t.dtype], tuple(t.shape), 0,
                                                 t.numel() * t.element_size())
                self.header_hash.update(f"{name}{t.dtype}{tuple(t.shape)}".encode())

    def read(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def copy_bytes(self, name: str, dst) -> None:
        write_all(dst, tensor_bytes(self._tensors[name]))


def open_source(folder: Path, allow_pickle: bool = False):
    if (folder / SAFE_INDEX).is_file() or (folder / SAFE_SINGLE).is_file():
        return SafetensorsSource(folder)
    if (folder / BIN_INDEX).is_file() or (folder / BIN_SINGLE).is_file():
        if not allow_pickle:
            raise UptrainError(f"{folder} holds pickle (.bin) weights; pickles can run code when loaded. Pass "
                               f"--allow-pickle to read them anyway (weights_only=True), or convert to safetensors")
        return PickleSource(folder)
    return SafetensorsSource(folder)  # raises the "no weights" message


def kv_dtype(entries: dict) -> str:
    """The dtype a loaded model (dtype="auto") computes in, and so the dtype of its KV cache: the floating
    dtype holding the most parameters ("F32" when there is none)."""
    counts: dict[str, int] = {}
    for e in entries.values():
        if DTYPES[e.dtype].is_floating_point:
            counts[e.dtype] = counts.get(e.dtype, 0) + math.prod(e.shape)
    return max(counts, key=counts.get) if counts else "F32"


def fingerprint(folder: Path, source) -> str:
    """A cheap content hash of a local source: config.json plus every shard header (names, dtypes,
    shapes, offsets). Identifies the checkpoint without reading gigabytes."""
    h = hashlib.sha256((folder / "config.json").read_bytes())
    h.update(source.header_hash.digest())
    return "sha256:" + h.hexdigest()


# ------------------------------------------------------------------------------------------ writing
def write_all(f, data) -> None:
    """Unbuffered writes may be partial: loop until every byte is out."""
    view = memoryview(data)
    while view:
        view = view[f.write(view):]


def tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return b""
    return t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.uint8 else t.numpy().tobytes()


def plan_shards(tensors: dict[str, tuple[str, tuple[int, ...]]], max_shard_size) -> tuple[dict[str, list[str]], int]:
    """Assign output tensors to shards with huggingface_hub's own splitter (meta tensors: no memory).
    Returns ({filename: [names]}, total bytes); one shard is named model.safetensors."""
    from huggingface_hub import split_torch_state_dict_into_shards

    meta = {n: torch.empty(shape, dtype=DTYPES[dt], device="meta") for n, (dt, shape) in tensors.items()}
    split = split_torch_state_dict_into_shards(meta, filename_pattern="model{suffix}.safetensors",
                                               max_shard_size=max_shard_size)
    total = sum(t.numel() * t.element_size() for t in meta.values())
    # Keep the source order inside each shard (layer by layer) so reads stay local.
    order = {n: i for i, n in enumerate(tensors)}
    return {f: sorted(names, key=order.__getitem__) for f, names in split.filename_to_tensors.items()}, total


def write_shard(path: Path, names: list[str], tensors: dict[str, tuple[str, tuple[int, ...]]], write_tensor,
                metadata: dict | None = None) -> int:
    """Write one safetensors file whose header is known up front; `write_tensor(name, fileobj)` streams each
    tensor's bytes in order. Returns the bytes written (data only)."""
    header, offset = {}, 0
    for n in names:
        dt, shape = tensors[n]
        size = dtype_size(dt) * math.prod(shape)
        header[n] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors writes it
    with open(path, "wb", buffering=0) as f:
        write_all(f, struct.pack("<Q", len(blob)) + blob)
        for n in names:
            before = f.tell()
            write_tensor(n, f)
            want = header[n]["data_offsets"][1] - header[n]["data_offsets"][0]
            if f.tell() - before != want:  # a bug guard: a wrong shape must never produce a silently bad file
                raise RuntimeError(f"{n}: wrote {f.tell() - before} bytes, planned {want}")
    return offset


def copy_companions(src: Path, dst: Path) -> list[str]:
    copied = []
    for f in sorted(src.iterdir()):
        if f.is_file() and any(fnmatch(f.name, p) for p in COMPANION_FILES):
            shutil.copy2(f, dst / f.name)
            copied.append(f.name)
    return copied


# ------------------------------------------------------------------------------------------ output folder
def check_output(src: Path, out: Path, overwrite: bool) -> None:
    """Refuse outputs that would lose data: OUT inside SRC, OUT == SRC, OUT non-empty without overwrite."""
    out_r, src_r = out.resolve(), src.resolve()
    if out_r == src_r or src_r in out_r.parents:
        raise UptrainError(f"output {out} is inside the source {src}; choose a folder outside it")
    if out_r in src_r.parents:
        raise UptrainError(f"output {out} contains the source {src}; choose another folder")
    if out.exists() and not out.is_dir():
        raise UptrainError(f"output {out} exists and is a file; choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UptrainError(f"output folder {out} exists and is not empty; pass --overwrite to replace it "
                           f"or choose another folder")
