"""One recipe trained in float32 and under bf16 autocast, side by side in one run, on the CPU: tokens/s and the
held-out loss each reaches after the same steps. bf16 is the fast path on CPUs with bf16 instructions
(AVX512-BF16, AMX); on others it is emulated, which the run's `strategy:` line says.

    python tests/benchmarks/bench_cpu_precision.py recipes/smollm2-135m-offline.yaml --steps 30 --eval-every 10 \\
        --threads 2 model.path=ALIGNED distill.teacher=real/smollm2-135m

Each run is a fresh `uptrain train` child with OMP_NUM_THREADS=--threads, in order float32, bf16 (--repeats
alternates them again); a step's tokens/s is the recipe's own (metrics.jsonl), the first step (warm-up) left out.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [REPO]


def run(recipe: str, overrides: list[str], precision: str, a, out: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads), "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "uptrain", "train", recipe, *overrides, f"out={out}", "overwrite=true",
           f"budget.stop_at={a.steps}", f"eval.every={a.eval_every or a.steps}", f"checkpoint.every={10 * a.steps}",
           f"train.mixed_precision={precision}"]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if p.returncode:
        sys.exit(f"uptrain train ({precision}) failed:\n{p.stdout[-2000:]}\n{p.stderr[-3000:]}")
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    speeds = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > 1]
    evals = {r["step"]: r["eval_loss"] for r in rows if "eval_loss" in r}
    strategy = next((line for line in p.stdout.splitlines() if line.startswith("strategy:")), "")
    return {"tokens_per_s": statistics.median(speeds), "evals": evals, "strategy": strategy}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipe")
    ap.add_argument("overrides", nargs="*", help="KEY=VALUE recipe overrides (model.path=…, distill.teacher=…)")
    ap.add_argument("--steps", type=int, default=8, help=(
        "optimiser steps per run, on the recipe's schedule (budget.stop_at): held-out loss at 0 and the last"))
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each run")
    ap.add_argument("--repeats", type=int, default=1, help="float32/bf16 pairs, alternated")
    ap.add_argument("--eval-every", type=int, default=0, help="held-out loss every this many steps (0: the last only)")
    a = ap.parse_intermixed_args()  # overrides may come after the flags

    import torch

    from uptrain.training.setup import cpu_bf16_supported

    print(f"torch {torch.__version__}; bf16 instructions (AVX512-BF16 or AMX): {cpu_bf16_supported()}; "
          f"{a.threads} thread(s) a run, {a.steps} steps")
    results: dict[str, list[dict]] = {"no": [], "bf16": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(a.repeats):
            for precision in results:
                res = run(a.recipe, a.overrides, precision, a, os.path.join(tmp, f"{precision}-{i}"))
                results[precision].append(res)
                curve = " → ".join(f"{v:.4f} (step {k})" for k, v in sorted(res["evals"].items()))
                print(f"  {precision:>4} #{i + 1}: {res['tokens_per_s']:.1f} tokens/s, held-out loss {curve}; "
                      f"{res['strategy']}", flush=True)
    speed = {p: statistics.median(r["tokens_per_s"] for r in rs) for p, rs in results.items()}
    steps = sorted(results["no"][0]["evals"])
    print("\n| precision | tokens/s (median) | × float32 | " + " | ".join(f"held-out loss, step {k}" for k in steps)
          + " |")
    print("|---|---|---|" + "---|" * len(steps))
    for p, label in (("no", "float32"), ("bf16", "bf16 autocast")):
        losses = [statistics.median(r["evals"][k] for r in results[p]) for k in steps]
        print(f"| {label} | {speed[p]:.1f} | {speed[p] / speed['no']:.2f}× | "
              + " | ".join(f"{v:.4f}" for v in losses) + " |")


if __name__ == "__main__":
    main()
