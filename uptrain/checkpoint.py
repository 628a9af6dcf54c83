"""Streaming checkpoint I/O: read safetensors headers without loading data, read one tensor at a time,
copy unchanged tensors as raw bytes, and write shards incrementally from a plan of (name, dtype, shape). Nothing here holds more than one tensor.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING

from uptrain.errors import UptrainError

if TYPE_CHECKING:
    import torch

# safetensors dtype names → bytes per element, and the floating ones. torch is not imported here: the
# converter starts copying bytes while a helper thread imports it (~1 s). DTYPES (names → torch dtypes)
# and DTYPE_NAMES (the reverse) are built on first use (module __getattr__).
DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
_TORCH_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                 "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
                 "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def __getattr__(name: str):
    if name in ("DTYPES", "DTYPE_NAMES"):
        import torch

        dtypes = {k: getattr(torch, v) for k, v in _TORCH_DTYPES.items()}
        globals().update(DTYPES=dtypes, DTYPE_NAMES={v: k for k, v in dtypes.items()})
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
    return DTYPE_SIZES[dtype]


# ------------------------------------------------------------------------------------------ source
def read_config(folder: Path) -> dict:
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise UptrainError(f"{folder} has no config.json; is it a Hugging Face checkpoint folder?")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise UptrainError(f"{cfg} is not valid JSON ({e})") from e


def read_safetensors_header(path, exact: bool = False, fix: str = "re-download or re-save it") -> tuple[dict, int]:
    """The JSON header of a safetensors file (with "__metadata__" when present) and the byte offset where its
    data starts, after checking the file: long enough for every tensor it declares (a truncated download),
    and with `exact`, exactly as long (what a file to publish must be: a longer one is a half-overwritten
    copy). `fix` ends every message: what the user should do about a bad file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n < 2 or n > min(size - 8, 100 << 20):  # safetensors caps headers at 100 MB
            raise UptrainError(f"{path} is truncated or not a safetensors file (bad header length); {fix}")
        try:
            header = json.loads(f.read(n))
            ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"]
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise UptrainError(f"{path} has a corrupt safetensors header ({e!r}); {fix}") from e
    data_start = 8 + n
    end = data_start + max(ends, default=0)
    if end > size or (exact and end != size):
        raise UptrainError(f"{path} is truncated or corrupt: its header describes {end:,} bytes, the file has "
                           f"{size:,}; {fix}")
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
                if v["dtype"] not in DTYPE_SIZES:
                    raise UptrainError(f"{name} in {fname} has dtype {v['dtype']}, which uptrain cannot read")
                a, b = v["data_offsets"]
                self.entries[name] = TensorEntry(name, str(path), v["dtype"], tuple(v["shape"]), start + a, start + b)
        if weight_map is not None:
            for name, fname in weight_map.items():
                entry = self.entries.get(name)
                if entry is None or os.path.basename(entry.file) != fname:
                    raise UptrainError(f"the shard index maps {name} to {fname}, but that shard does not hold it; "
                                       f"the checkpoint is inconsistent — re-download or re-save it")

    reads_into = True  # read(name, out=buffer) reuses a buffer (the writer asks before it passes one)

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """One tensor, read straight into its memory. `out` (a uint8 CPU tensor of at least its size) is
        reused instead of fresh memory: the result is then a view of it, valid until `out` is reused."""
        import torch

        from uptrain.checkpoint import DTYPES

        e = self.entries[name]
        if not e.nbytes:
            return torch.empty(e.shape, dtype=DTYPES[e.dtype])
        raw = None
        if out is not None:
            buf = out.view(-1)[:e.nbytes]
            result = buf.view(DTYPES[e.dtype]).view(e.shape)
            view = buf.numpy().data
        else:
            raw = bytearray(e.nbytes)  # not bytes: frombuffer wants writable memory
            result = None
            view = memoryview(raw)
        got = 0
        with open(e.file, "rb", buffering=0) as f:
            f.seek(e.begin)
            while got < e.nbytes:
                n = f.readinto(view[got:])
                if not n:
                    raise UptrainError(f"{e.file} is truncated while reading {name}")
                got += n
        return result if result is not None else torch.frombuffer(raw, dtype=DTYPES[e.dtype]).view(e.shape)

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
        import torch  # (imported here, not at the top: see DTYPE_SIZES)

        from uptrain.checkpoint import DTYPE_NAMES

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
        if e.dtype in FLOAT_DTYPES:
            counts[e.dtype] = counts.get(e.dtype, 0) + math.prod(e.shape)
    return max(counts, key=lambda d: counts[d]) if counts else "F32"


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


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor as a read-only view of its memory (no copy for a contiguous CPU tensor)."""
    import torch

    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return memoryview(b"")
    a = (t.view(torch.uint8) if t.dtype != torch.uint8 else t).numpy()
    return a.data.cast("B").toreadonly()


def plan_shards(tensors: dict[str, tuple[str, tuple[int, ...]]], max_shard_size) -> tuple[dict[str, list[str]], int]:
    """Assign output tensors to shards with huggingface_hub's framework-agnostic splitter (the one behind
    `split_torch_state_dict_into_shards`, which would import torch.distributed, ~1 s, to look for DTensors),
    from (dtype, shape) only. Returns ({filename: [names]}, total bytes); one shard is model.safetensors."""
    from huggingface_hub import split_state_dict_into_shards_factory

    def nbytes(entry):
        return dtype_size(entry[0]) * math.prod(entry[1])

    split = split_state_dict_into_shards_factory(tensors, get_storage_size=nbytes, get_storage_id=lambda _: None,
                                                 filename_pattern="model{suffix}.safetensors",
                                                 max_shard_size=max_shard_size)
    total = sum(nbytes(e) for e in tensors.values())
    # Keep the source order inside each shard (layer by layer) so reads stay local.
    order = {n: i for i, n in enumerate(tensors)}
    return {f: sorted(names, key=order.__getitem__) for f, names in split.filename_to_tensors.items()}, total


def shard_header(names: list[str], tensors: dict[str, tuple[str, tuple[int, ...]]], metadata: dict | None = None):
    """(the file's first bytes: length + JSON header, the header, data bytes) of a safetensors file holding
    `names` in this order; tensor n's data lies at len(prefix) + header[n]["data_offsets"]."""
    header, offset = {}, 0
    for n in names:
        dt, shape = tensors[n]
        size = dtype_size(dt) * math.prod(shape)
        header[n] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(blob)) + blob, header, offset


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


def check_free_space(path, need: int, what: str, fix: str) -> int:
    """The free bytes of the file system that will hold `path` (its nearest existing folder); one UptrainError
    naming `what` (with its estimate) and `fix` when fewer than `need` are free. Checked before writing."""
    from uptrain.report import fmt_bytes

    probe = Path(path).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise UptrainError(f"not enough free disk for {what}: {fmt_bytes(free)} free on {probe}, about "
                           f"{fmt_bytes(need)} needed; {fix}")
    return free


# ------------------------------------------------------------------------------------------ quantization
# Tensors that only a quantized checkpoint holds, by the last part of their name: GPTQ / AWQ (qweight, qzeros,
# scales, g_idx), bitsandbytes (absmax, quant_map, nested_*, quant_state.*, SCB, weight_format), FP8 and
# compressed-tensors (weight_scale, weight_scale_inv, input_scale, weight_zero_point, weight_packed …).
QUANT_TENSORS = frozenset({"qweight", "qzeros", "scales", "g_idx", "absmax", "quant_map", "nested_absmax",
                           "nested_quant_map", "SCB", "weight_format", "weight_scale", "weight_scale_inv",
                           "input_scale", "weight_zero_point", "weight_packed", "weight_global_scale"})
PLAIN_FLOATS = frozenset({"F64", "F32", "F16", "BF16"})  # what uptrain converts, trains and saves


def weight_table(folder: Path, allow_pickle: bool = True) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name → (safetensors dtype name, shape) of every stored tensor, from the shard headers (or, for pickle
    weights and `allow_pickle`, a weights-only memory map); no tensor data is read and any dtype is accepted.
    {} without weights it may read. Missing or damaged shards are skipped: the readers that need them
    (open_source, transformers) say what is wrong with them."""
    folder = Path(folder)
    if (folder / SAFE_INDEX).is_file() or (folder / SAFE_SINGLE).is_file():
        try:
            files = [SAFE_SINGLE] if not (folder / SAFE_INDEX).is_file() else sorted(set(
                json.loads((folder / SAFE_INDEX).read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError):
            return {}
        table = {}
        for f in files:
            try:
                header, _ = read_safetensors_header(folder / f)
            except (OSError, UptrainError):
                continue
            table.update({k: (v["dtype"], tuple(v["shape"])) for k, v in header.items() if k != "__metadata__"})
        return table
    bins = [folder / BIN_SINGLE] if (folder / BIN_SINGLE).is_file() else sorted(folder.glob("pytorch_model-*.bin"))
    if bins and allow_pickle:
        import torch

        from uptrain.checkpoint import DTYPE_NAMES

        table = {}
        for f in bins:
            try:
                sd = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
            except Exception:  # (PickleSource and transformers report an unreadable pickle)
                continue
            table.update({k: (DTYPE_NAMES.get(t.dtype, str(t.dtype)), tuple(t.shape)) for k, t in sd.items()})
        return table
    return {}


@dataclass(frozen=True)
class Quantization:
    """What config.json says (`method`: its quantization_config's quant_method) and what the weights show
    (`evidence`: tensors only a quantized checkpoint holds). The weights decide: a quant_method on plain float
    weights is a leftover (transformers would load a quantizer and then refuse to save the model)."""

    method: str | None
    evidence: tuple[str, ...]
    inspected: bool = True  # False: no weights could be read (pickles not allowed), only config.json spoke

    @property
    def quantized(self) -> bool:
        return bool(self.evidence)

    @property
    def leftover(self) -> bool:
        return self.method is not None and not self.evidence and self.inspected

    def check(self, what: str, name: str) -> None:
        if self.quantized:
            shown = ", ".join(self.evidence[:3]) + (f" and {len(self.evidence) - 3} more" if len(self.evidence) > 3
                                                    else "")
            how = f"quant_method {self.method!r}" if self.method else "no quantization_config"
            raise UptrainError(f"{what} {name!r} is a quantized checkpoint ({how}; tensors {shown}); uptrain "
                               f"converts, trains and saves plain floating-point weights: dequantize first (the "
                               f"original float checkpoint, or transformers' `model.dequantize()` then "
                               f"`save_pretrained`) and give that folder")

    def note(self, what: str, name: str) -> str:
        return (f"note: the config.json of {what} {name!r} carries a quantization_config (quant_method "
                f"{self.method!r}) but every weight is a plain float tensor: a leftover, dropped (with it, "
                f"transformers would refuse to save the trained model)")


def quantization(folder: Path, config: dict | None = None, allow_pickle: bool = True) -> Quantization:
    folder = Path(folder)
    config = read_config(folder) if config is None else config
    qc = config.get("quantization_config") or (config.get("text_config") or {}).get("quantization_config")
    method = None
    if qc:
        method = str(qc.get("quant_method") or ("bitsandbytes" if qc.get("load_in_4bit") or qc.get("load_in_8bit")
                                                else "unknown")) if isinstance(qc, dict) else str(qc)
    table = weight_table(folder, allow_pickle)
    if not table:
        gguf = sorted(p.name for p in folder.glob("*.gguf"))
        return Quantization(method or ("gguf" if gguf else None), tuple(f"{g} (a GGUF file)" for g in gguf), False)
    evidence = []
    for name, (dtype, _) in table.items():
        last = name.rsplit(".", 1)[-1]
        packed = dtype not in PLAIN_FLOATS and (last == "weight" or last.endswith(("_blocks", "_scales")))
        if last in QUANT_TENSORS or ".quant_state." in name or packed:
            evidence.append(f"{name} ({dtype})")
    return Quantization(method, tuple(evidence))
