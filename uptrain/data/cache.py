"""The on-disk block cache: `token_blocks` is the data's token stream (uptrain/data/mixing.py: a mixture read in
memory block by block, anything else document by document) cut into blocks, kept on disk (int32, memory-mapped),
keyed by tokenizer, data and seq_len, so a recipe tokenises its corpus once, however many runs and processes read
it. The cache lives in $UPTRAIN_CACHE (default ~/.cache/uptrain), never beside the package."""
from __future__ import annotations

import hashlib
import json
import os

from uptrain.data.corpora import BUILTINS
from uptrain.data.mixing import block_tokens
from uptrain.data.packing import pack_tokens
from uptrain.data.sources import DataSpec, TextSource, as_source
from uptrain.data.texts import local_files
from uptrain.data.tokenizer import tokenizer_hash
from uptrain.errors import UptrainError


def _source_stamp(spec: TextSource) -> list:
    """What identifies the text behind a spec: file sizes and mtimes for local files, the shipping package's (or
    the interpreter's) version for a built-in corpus; `datasets` names are identified by name/config/split (clear
    the cache to refresh)."""
    if isinstance(spec, DataSpec) and spec.sources:
        return [_source_stamp(as_source(s)) for s in spec.sources] + [_source_stamp(TextSource(
            source="", eval_files=spec.eval_files))]
    if spec.source in BUILTINS:
        return [spec.source, BUILTINS[spec.source].version()]
    stamp = []
    for src in (spec.source, spec.eval_files):
        for f in (local_files(src) or []) if src else []:
            st = os.stat(f)
            stamp.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
    return stamp


def blocks_cache_key(spec: DataSpec, tokenizer, seq_len: int, part: str, max_blocks: int | None,
                     seed: int = 0) -> str:
    fields = {f: getattr(spec, f) for f in DataSpec.__dataclass_fields__ if f != "streaming"}
    if not spec.sources:  # a single corpus keeps the keys it had before mixtures existed (no seed in them)
        del fields["sources"]
    else:
        fields["seed"] = seed  # the mixture's order
    # 3: a mixture read in memory is drawn block by block (2: document by document)
    blob = json.dumps([3, fields, _source_stamp(spec), tokenizer_hash(tokenizer), seq_len, part, max_blocks],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def default_cache_dir() -> str:
    return os.environ.get("UPTRAIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "uptrain")


def token_blocks(spec: DataSpec, tokenizer, seq_len: int, part: str = "train", max_blocks: int | None = None,
                 cache_dir: str | None = None, cache: bool = True, progress: bool = False, dtype=None,
                 seed: int = 0):
    """`block_tokens(spec, …, part, seed)` cut into blocks, the result kept on disk, keyed by tokenizer, data and
    seq_len: [n_blocks, seq_len]; for one corpus, the same token ids as `pack_blocks` of its documents.

    Tokens stream into an int32 file (never a Python list of the whole corpus); the result is that file
    memory-mapped. dtype=None gives a LongTensor (what evaluation expects); torch.int32 returns the map
    itself, which training uses so that a large corpus is not loaded into RAM."""
    import torch

    dtype = dtype or torch.long
    if not cache:
        return pack_tokens(block_tokens(spec, tokenizer, seq_len, part, seed), seq_len, max_blocks).to(dtype)
    folder = os.path.join(cache_dir or default_cache_dir(), "blocks")
    key = blocks_cache_key(spec, tokenizer, seq_len, part, max_blocks, seed)
    path, meta_path = os.path.join(folder, key + ".int32"), os.path.join(folder, key + ".json")
    if not os.path.isfile(meta_path):
        _write_blocks(block_tokens(spec, tokenizer, seq_len, part, seed), tokenizer, seq_len, max_blocks, path,
                      meta_path, progress)
    with open(meta_path, encoding="utf-8") as f:
        n = json.load(f)["blocks"]
    if n == 0:
        raise UptrainError(f"the {part} data ({spec.source}) yields fewer tokens than one block of "
                           f"seq_len={seq_len}; give more text or a smaller seq_len")
    blocks = torch.from_file(path, shared=False, size=n * seq_len, dtype=torch.int32).view(n, seq_len)
    return blocks if dtype == torch.int32 else blocks.to(dtype)


def _write_blocks(tokens, tokenizer, seq_len, max_blocks, path, meta_path, progress):
    """Pack into `path` through a temporary file; the .json written last marks the entry complete."""
    from array import array

    from tqdm.auto import tqdm

    os.makedirs(os.path.dirname(path), exist_ok=True)
    if len(tokenizer) >= 2 ** 31:
        raise UptrainError(f"vocabulary of {len(tokenizer)} tokens does not fit the int32 token cache")
    tmp = f"{path}.{os.getpid()}.tmp"
    limit = None if max_blocks is None else max_blocks * seq_len
    written, buf = 0, array("i")
    bar = tqdm(desc="tokenising", unit=" tok", unit_scale=True, disable=not progress)
    with open(tmp, "wb") as f:
        for tok in tokens:
            buf.append(tok)
            if len(buf) >= 1 << 20 or (limit is not None and written + len(buf) >= limit):
                written += _flush(buf, f, bar, limit, written)
                if limit is not None and written >= limit:
                    break
        written += _flush(buf, f, bar, limit, written)
        n = written // seq_len
        f.truncate(n * seq_len * 4)  # the tail shorter than a block is dropped, as in pack_blocks
    bar.close()
    os.replace(tmp, path)
    from uptrain.files import write_json

    write_json(meta_path, {"blocks": n, "seq_len": seq_len, "tokens_read": written})


def _flush(buf, f, bar, limit, written) -> int:
    if limit is not None:
        del buf[limit - written:]
    buf.tofile(f)
    n = len(buf)
    bar.update(n)
    del buf[:]
    return n
