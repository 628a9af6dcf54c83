"""What the demo writes: the plots (the paper's Figures 3-5 and the training curves), report.md and
results.json, all through uptrain.report and uptrain.files."""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from uptrain.files import atomic_write, write_json
from uptrain.miniature.findings import findings, mha_step0, sweep_points, table_rows


@dataclass
class DemoResult:
    out: str
    report: str
    results: str
    plots: list[str]
    rows: list[dict]
    wall_time_s: float
    findings: list[str] = field(default_factory=list)
    cpu_time_s: float = 0.0  # of this process, all threads: on one thread, the wall time on a quiet machine
    threads: int = 1


def write_outputs(run, vs, pre: dict, uptrained: dict, sweep: dict, ev: dict, t0: float, cpu0: float = 0.0,
                  threads: int = 1) -> DemoResult:
    """Tables, findings, plots, results.json and report.md of a finished run (started at wall time `t0` and
    process CPU time `cpu0`, on `threads` torch threads)."""
    n, steps, alpha, size = run.pretrain_steps, run.uptrain_steps, run.alpha, run.size
    rows = table_rows(vs, ev["rows"], uptrained, steps, alpha)
    lengths = (size.seq_len, run.span.targets_length) if run.span is not None else None
    found = findings(rows, sweep, n, lengths)
    paths = plots(run.out, rows, pre, uptrained, sweep, n, vs)
    wall, cpu = time.time() - t0, time.process_time() - cpu0
    results = {"settings": {"size": asdict(size), "seed": run.seed, "alpha": alpha, "uptrain_steps": steps,
                            "pretrain_steps": n, "eval": ev["settings"], "arch": run.arch.name},
               "rows": rows, "alpha_sweep": sweep_points(sweep, n), "findings": found,
               "pretrain": {"final_eval": pre["final_eval"], "eval_history": pre["eval_history"]},
               "eval_rows": ev["rows"], "wall_time_s": wall, "cpu_time_s": cpu, "threads": threads,
               "machine": machine()}
    results_path = write_json(str(run.out / "results.json"), within(results, str(run.out)))
    report_path = atomic_write(str(run.out / "report.md"),
                               report_md(rows, found, paths, size, n, steps, alpha, ev["settings"], wall, run.out,
                                         run.arch.title, lengths, cpu, threads))
    return DemoResult(str(run.out), report_path, results_path, paths, rows, wall, found, cpu, threads)


def within(value, root: str):
    """`value` with every path under `root` written relative to it: results.json names the run's checkpoints the
    same wherever the folder is moved or published (os.path.join(folder, path) finds them). A path is an absolute
    one, or a relative one (to the working directory, as `--out demo-out` makes them) that exists."""
    root = os.path.abspath(root)
    if isinstance(value, dict):
        return {k: within(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [within(v, root) for v in value]
    if isinstance(value, str) and (os.path.isabs(value) or os.path.exists(value)):
        full = os.path.abspath(value)
        if os.path.commonpath([full, root]) == root:
            return os.path.relpath(full, root)
    return value


def machine() -> dict:
    """Where a run's times were measured: the CPU, its cores, the load when the run ended, the library versions."""
    import platform

    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"cpu": cpu, "cores": os.cpu_count(), "load_average_1min": load, "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__}


def plots(out_dir: Path, rows, pre, uptrained, sweep, n, vs) -> list[str]:
    from uptrain.plots import plot_bars, plot_lines, plot_quality_vs_cost

    paths = []
    main = [dict(x, label=x["model"], perplexity=x["ppl_uptrained"]) for x in rows if x["role"] == "main"]
    paths.append(plot_quality_vs_cost(main, str(out_dir / "quality_vs_cost.png"),
                                      title="after uptraining (α·N steps): quality vs inference cost"))
    cats = ["mean", "first", "random"]
    ab = {x["method"]: x for x in rows if x["model"].startswith("MQA") and x["role"] != "beyond"}
    beyond = [x for x in rows if x["role"] == "beyond" and x["model"].startswith("MQA")]
    paths.append(plot_bars(
        cats + [x["model"].replace("MQA ", "") for x in beyond],
        {"step 0": [ab[c]["ppl_step0"] for c in cats] + [x["ppl_step0"] for x in beyond],
         "uptrained": [ab[c]["ppl_uptrained"] for c in cats] + [x["ppl_uptrained"] for x in beyond]},
        str(out_dir / "method_ablation.png"), ylabel="held-out perplexity (dashed: MHA)",
        title="MQA conversion method (paper Fig. 4)", baseline=mha_step0(rows)))
    pts = sweep_points(sweep, n)
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


def columns(steps: int, cross: bool = False, decode: bool = True) -> list:
    """The demo's table columns: model, method, KV heads and cache, (decode ms), perplexity at step 0 and after."""
    from uptrain.report import col, fmt_bytes, fmt_num

    return [col("model", "model", str, "left"), col("method", "method", str, "left"), col("kv_heads", "KV heads", str),
            col("kv_cache_bytes_per_token", "KV cache / token", fmt_bytes),
            *([col("cross_kv_cache_bytes_per_source_token", "cross KV / source token", fmt_bytes)] if cross else []),
            *([col("decode_ms_per_token", "decode ms / token", lambda x: fmt_num(x, 3))] if decode else []),
            col("ppl_step0", "ppl step 0", lambda x: fmt_num(x, 4)),
            col("ppl_uptrained", f"ppl after {steps} steps", lambda x: fmt_num(x, 4))]


# The demo's figures that README.md and docs/demo.md show, generated from the results.json of the run that made
# the plot they show (docs/demo-run/): tests/test_docs.py checks that the pages hold what published() writes.
PUBLISHED = "docs/demo-run/results.json"


def published_markers(page: str) -> tuple[str, str]:
    return (f"<!-- demo figures ({page}): generated from {PUBLISHED} by uptrain.miniature.report.published(); "
            f"do not edit by hand -->", f"<!-- end of demo figures ({page}) -->")


def published(results: dict, page: str) -> str:
    """The block of README.md ("readme": the paper's rows and MQA aligned, no timings) or docs/demo.md ("demo":
    every row and the findings) from a run's results.json, with what it took and where it ran."""
    from uptrain.report import markdown_table

    rows, steps = results["rows"], results["settings"]["uptrain_steps"]
    if page == "readme":
        rows = [x for x in rows if x["role"] == "main" or (x["role"] == "beyond" and x["model"] == "MQA aligned")]
    table = markdown_table(rows, columns(steps, decode=page != "readme"))
    m, threads = results["machine"], results["threads"]
    ran = (f"`uptrain demo` took {results['cpu_time_s'] / 60:.1f} min of CPU on {threads} torch thread"
           f"{'s' if threads > 1 else ''} and {results['wall_time_s'] / 60:.1f} min wall on {m['cpu']} "
           f"({m['cores']} cores; 1-minute load average {m['load_average_1min']:.1f} at the end, other jobs "
           f"sharing the cores when it is above {m['cores']}), torch {m['torch']}, transformers {m['transformers']}: "
           f"[results.json]({PUBLISHED if page == 'readme' else os.path.relpath(PUBLISHED, 'docs')}).")
    lines = [published_markers(page)[0], "", table, "", ran]
    if page == "demo":
        lines += ["", *[f"- {f}" for f in results["findings"]]]
    return "\n".join(lines + ["", published_markers(page)[1]]) + "\n"


def report_md(rows, found, plot_paths, size, n, steps, alpha, settings, wall, out_dir, title="Llama",
              lengths=None, cpu=None, threads=1) -> str:
    from uptrain.report import markdown_table

    cols = columns(steps, cross=bool(lengths))
    sections = {"main": "Table 1 shape: MHA, GQA and MQA (mean-pool conversion)",
                "ablation": "Conversion method ablation (Figure 4)",
                "beyond": "Beyond the paper: data-free mean-norm and calibration-aware aligned merging"}
    if lengths:  # an encoder-decoder: span corruption, the decoder's self- and cross-attention converted
        what = (f"A T5.1.1 ({size.layers} encoder and {size.layers} decoder layers, {size.heads} heads, hidden "
                f"{size.hidden}, vocabulary {size.vocab}) pre-trained from scratch with span corruption for N = {n} "
                f"steps of {size.batch} blocks ({lengths[0]} encoder tokens, {lengths[1]} targets) on Shakespeare's "
                f"plays, its decoder's self- and cross-attention converted, then uptrained for α·N = {alpha}·{n} = "
                f"{steps} steps. Span-corruption perplexity over the same {settings['eval_tokens']:,} target tokens "
                f"of corrupted held-out blocks (seed {settings.get('seed')}).")
    else:
        what = (f"A {size.layers}-layer {title} with {size.heads} heads (hidden {size.hidden}, vocabulary "
                f"{size.vocab}) pre-trained from scratch for N = {n} steps of {size.batch}×{size.seq_len} tokens on "
                f"Shakespeare's plays, converted, then uptrained for α·N = {alpha}·{n} = {steps} steps. Perplexity "
                f"over the same {settings['eval_tokens']:,} tokens of held-out plays.")
    took = f"Wall time {wall / 60:.1f} min"
    if cpu is not None:
        took += f", CPU time {cpu / 60:.1f} min on {threads} torch thread{'s' if threads > 1 else ''}"
    md = ["# uptrain demo: the GQA paper in miniature\n", f"{what} {took}.\n"]
    for role, heading in sections.items():
        if not any(x["role"] == role for x in rows):  # T5 has no beyond-the-paper rows
            continue
        sub = [x for x in rows if x["role"] == role or (role != "main" and x["model"] == "MQA")]
        if role == "beyond":
            sub = [x for x in rows if x["model"] in ("GQA-2", "MQA") or x["role"] == "beyond"]
        md += [f"## {heading}\n", markdown_table(sub, cols), ""]
    md += ["## Findings\n", *[f"- {f}" for f in found], ""]
    md += ["## Plots\n", *[f"![{Path(p).stem}]({os.path.relpath(p, out_dir)})" for p in plot_paths], ""]
    md += [f"Checkpoints: `step0/` (converted), `runs/` (pre-training and uptraining). Push one with "
           f"`uptrain push {out_dir}/runs/uptrain-gqa-2 --repo-id you/name --dry-run`."]
    return "\n".join(md) + "\n"
