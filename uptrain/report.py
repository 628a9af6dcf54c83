"""Tables (markdown, JSON) and plots (PNG) shared by `uptrain eval`, the demo and the model card.

Plots use matplotlib's object API with the Agg canvas (no pyplot, no global backend switch, no display
needed), written atomically through uptrain/files.py.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence


# ---------------------------------------------------------------- formatting
def fmt_bytes(n: float | None) -> str:
    """Binary units, 3 significant digits: 1536 → '1.50 KiB'."""
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def fmt_count(n: float | None) -> str:
    """Parameter-style counts: 1234567 → '1.23M'."""
    if n is None:
        return "—"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}"


def fmt_num(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}g}"


def fmt_ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}×"


# ---------------------------------------------------------------- tables
@dataclass(frozen=True)
class Column:
    """One table column: header and how a row (a dict) becomes its cell text."""

    header: str
    cell: Callable[[dict], str]
    align: str = "right"  # "left" | "right"


def col(key: str, header: str, fmt: Callable = fmt_num, align: str = "right") -> Column:
    """A column that formats row[key] (missing → '—')."""
    return Column(header, lambda row: fmt(row.get(key)) if row.get(key) is not None else "—", align)


def markdown_table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    """A GitHub-flavoured markdown table; cells padded so it also reads well in a terminal."""
    cells = [[c.header for c in columns]] + [[c.cell(r) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]

    def line(values):
        padded = [v.ljust(w) if c.align == "left" else v.rjust(w) for v, w, c in zip(values, widths, columns)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join((":" + "-" * (w + 1)) if c.align == "left" else ("-" * (w + 1) + ":")
                          for w, c in zip(widths, columns)) + "|"
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])


def _conversion_cell(row: dict) -> str:
    conv = row.get("conversion") or {}
    if not conv:
        return "—"
    parts = [str(conv.get("method", "?"))]
    budget = (conv.get("options") or {}).get("kv_budget")
    if budget is not None:  # per-layer KV heads chosen for a KV budget
        parts.append(f"budget {budget:g}")
    if conv.get("grouping") not in (None, "contiguous"):
        parts.append(conv["grouping"])
    up = row.get("uptraining") or {}
    if up.get("steps") is not None:
        parts.append(f"+{up['steps']} steps")
    return " ".join(parts)


def _heads(kv) -> str:
    """KV heads as `uptrain convert --groups` takes them: 4, or 8,2,1,4 per layer."""
    return ",".join(map(str, kv)) if isinstance(kv, (list, tuple)) else str(kv)


def eval_columns(rows: Sequence[dict]) -> list[Column]:
    """The columns of the `uptrain eval` table; bits/byte only when present, one column per task metric."""
    cols = [
        col("label", "model", str, "left"),
        Column("H/KV", lambda r: f"{r.get('num_attention_heads')}/{_heads(r.get('num_key_value_heads'))}"),
        Column("conversion", _conversion_cell, "left"),
        col("params", "params", fmt_count),
        col("perplexity", "ppl"),
        col("loss", "NLL/token"),
    ]
    if any(r.get("bits_per_byte") is not None for r in rows):
        cols.append(col("bits_per_byte", "bits/byte"))
    cols += [
        col("ppl_ratio", "ppl ×", fmt_ratio),
        col("kv_cache_bytes_per_token", "KV/token", fmt_bytes),
    ]
    if any(r.get("cross_kv_cache_bytes_per_source_token") is not None for r in rows):  # encoder-decoders
        cols.append(col("cross_kv_cache_bytes_per_source_token", "cross KV/src token", fmt_bytes))
    cols += [
        Column("KV @ ctx", lambda r: fmt_bytes(r.get("kv_cache_bytes_at_context"))),
        col("kv_ratio", "KV ×", fmt_ratio),
        col("prefill_tokens_per_s", "prefill tok/s", lambda x: f"{x:,.0f}"),
        col("decode_tokens_per_s", "decode tok/s", lambda x: f"{x:,.1f}"),
        col("decode_ms_per_token", "ms/token", lambda x: f"{x:.2f}"),
        col("decode_speedup", "speed-up", fmt_ratio),
        col("peak_memory_bytes", "peak mem", fmt_bytes),
    ]
    if any(r.get("vllm_kv_cache_tokens") is not None for r in rows):  # uptrain eval --engine vllm
        cols += [
            col("vllm_kv_cache_tokens", "vLLM KV tokens", lambda x: f"{x:,}"),
            col("vllm_kv_capacity_ratio", "KV tokens ×", fmt_ratio),
            col("vllm_max_concurrency", "vLLM max conc."),
            col("vllm_output_tokens_per_s", "vLLM out tok/s", lambda x: f"{x:,.1f}"),
            col("vllm_speedup", "vLLM ×", fmt_ratio),
            Column("vLLM = HF", lambda r: "—" if r.get("vllm_greedy_prompts") is None else
                   f"{r['vllm_greedy_identical']}/{r['vllm_greedy_prompts']} ({r['vllm_greedy_agreement']:.2f})"),
        ]
    for task, metric in _task_metrics(rows):
        cols.append(Column(f"{task} {metric}", _task_cell(task, metric)))
    return cols


def _task_metrics(rows) -> list[tuple[str, str]]:
    seen: dict[tuple[str, str], None] = {}
    for r in rows:
        for task, res in (r.get("tasks") or {}).items():
            metric = res.get("metric") if isinstance(res, dict) else None
            seen.setdefault((task, metric or "error"), None)
    return list(seen)


def _task_cell(task, metric):
    def cell(row):
        res = (row.get("tasks") or {}).get(task) or {}
        return "failed" if "error" in res else fmt_num(res.get("value"))
    return cell


def eval_markdown(rows: Sequence[dict]) -> str:
    return markdown_table(rows, eval_columns(rows))


# ---------------------------------------------------------------- plots
def _figure(ncols: int = 1, width: float = 5.0, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _save(fig, path: str) -> str:
    from uptrain.files import atomic_write

    return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))


_AXIS_LABELS = {
    "perplexity": "held-out perplexity (lower is better)",
    "loss": "held-out NLL / token",
    "bits_per_byte": "bits per byte (lower is better)",
    "kv_cache_bytes_per_token": "KV-cache bytes per token",
    "decode_ms_per_token": "decode ms / token (batch)",
    "decode_tokens_per_s": "decode tokens / s",
    "vllm_ms_per_output_token": "vLLM ms / output token (batch)",
}


def plot_quality_vs_cost(rows: Sequence[dict], path: str, quality: str = "perplexity",
                         costs: Sequence[str] = ("kv_cache_bytes_per_token", "decode_ms_per_token"),
                         label: str = "label", title: str | None = None) -> str:
    """The GQA paper's Figure 3 shape: one panel per cost (x) against quality (y), one labelled point per
    row. Rows missing a value are left out of that panel."""
    fig, axes = _figure(len(costs))
    for ax, cost in zip(axes, costs):
        pts = [(r[cost], r[quality], str(r.get(label, "?"))) for r in rows
               if r.get(cost) is not None and r.get(quality) is not None]
        for i, (x, y, name) in enumerate(pts):
            ax.scatter([x], [y], s=40, color=f"C{i % 10}", zorder=3)
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        ax.set_xlabel(_AXIS_LABELS.get(cost, cost))
        ax.set_ylabel(_AXIS_LABELS.get(quality, quality))
        ax.grid(True, alpha=0.3)
        ax.margins(0.15)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_lines(series: dict[str, tuple[Sequence[float], Sequence[float]]], path: str, xlabel: str,
               ylabel: str, title: str | None = None, logy: bool = False, logx: bool = False) -> str:
    """Curves (e.g. held-out loss against step, one per run): {label: (xs, ys)}."""
    fig, (ax,) = _figure()
    for i, (name, (xs, ys)) in enumerate(series.items()):
        ax.plot(list(xs), list(ys), marker="o" if len(xs) < 30 else None, markersize=3, label=name,
                color=f"C{i % 10}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("log")
    ax.grid(True, alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    return _save(fig, path)


def plot_bars(categories: Sequence[str], series: dict[str, Sequence[float]], path: str, ylabel: str,
              title: str | None = None, errors: dict[str, Sequence[float]] | None = None,
              baseline: float | None = None) -> str:
    """Grouped bars for ablations: one group per category, one bar per series ({name: value per category}).
    `baseline` draws a dashed reference line (e.g. the MHA model's perplexity)."""
    fig, (ax,) = _figure(width=max(5.0, 1.0 + 0.9 * len(categories) * max(1, len(series)) ** 0.5))
    n = max(1, len(series))
    width = 0.8 / n
    for i, (name, values) in enumerate(series.items()):
        xs = [j + (i - (n - 1) / 2) * width for j in range(len(categories))]
        err = (errors or {}).get(name)
        ax.bar(xs, list(values), width=width, label=name, yerr=list(err) if err else None, capsize=3,
               color=f"C{i % 10}")
    ax.set_xticks(range(len(categories)), list(categories), rotation=20 if len(categories) > 4 else 0)
    ax.set_ylabel(ylabel)
    if baseline is not None:
        ax.axhline(baseline, linestyle="--", color="gray", linewidth=1)
    if len(series) > 1:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)

