"""Per-kind held-out perplexity of a source and its converted or uptrained folders, and each one's worst kind.

    python tests/benchmarks/bench_kinds.py SRC OUT [OUT …] [--kinds plays c …] [--tokens 8192] [--seq-len 1024]
           [--threads N] [--json FILE]

Every model is scored on the same tokens (the source's tokenizer) of every kind of uptrain/evaluation/kinds.py:
held-out text that no built-in corpus trains on and the default offline calibration never reads. Prints one row per
kind: the source's perplexity, then each folder's perplexity and its ratio to the source, and the worst kind (the
largest ratio), by which a change is judged. Also prints wall and CPU seconds per model.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def kind_parser(doc: str, tokens: int | None = None) -> argparse.ArgumentParser:
    """The arguments every held-out-kinds benchmark takes: a source, folders to compare, which kinds, how many
    tokens a kind in blocks of how many, torch threads."""
    from uptrain.evaluation.kinds import KIND_NAMES, KIND_SEQ_LEN, KIND_TOKENS

    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("src", help="the source checkpoint folder (its tokenizer tokenises every kind)")
    p.add_argument("outs", nargs="+", help="converted or uptrained folders to compare with the source")
    p.add_argument("--kinds", nargs="+", choices=KIND_NAMES, help="these kinds only (default: all)")
    p.add_argument("--tokens", type=int, default=tokens or KIND_TOKENS, help="tokens per kind")
    p.add_argument("--seq-len", type=int, default=KIND_SEQ_LEN, help="tokens per block")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    return p


def kind_setup(a: argparse.Namespace):
    """(the source's tokenizer, each kind's blocks [n, seq_len]) for parsed kind_parser arguments; sets threads."""
    from uptrain import hf
    from uptrain.evaluation.kinds import kind_blocks

    if a.threads:
        torch.set_num_threads(a.threads)
    tok = hf.load_tokenizer(hf.resolve(a.src), "every kind is tokenised with the source's tokenizer")
    return tok, kind_blocks(tok, a.kinds, a.tokens, a.seq_len)


def main() -> None:
    from uptrain import hf
    from uptrain.evaluation.kinds import kinds_markdown, score_kinds

    p = kind_parser(__doc__)
    p.add_argument("--json", help="also write the perplexities here")
    a = p.parse_args()
    tok, blocks = kind_setup(a)
    print(f"{len(blocks)} kinds × {a.tokens // a.seq_len} blocks of {a.seq_len} tokens", flush=True)
    scores: dict[str, dict[str, float]] = {}
    labels: dict[str, str] = {}
    for path in [a.src] + a.outs:
        label = os.path.basename(os.path.normpath(path))
        label = label if label not in labels.values() else path
        labels[path] = label
        t0, c0 = time.time(), cpu_seconds()
        model = hf.load_model(hf.resolve(path), dtype=torch.float32, quiet=True)
        scores[label] = score_kinds(model, blocks)
        del model
        print(f"{label}: {time.time() - t0:.0f} s wall, {cpu_seconds() - c0:.0f} s CPU", flush=True)
    print()
    print(kinds_markdown(scores, labels[a.src]))
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump({"source": labels[a.src], "tokens": a.tokens, "seq_len": a.seq_len, "perplexity": scores}, f,
                      indent=1)


if __name__ == "__main__":
    main()
