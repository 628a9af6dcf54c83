"""Plots (PNG) shared by `uptrain eval` and the demo.

matplotlib's object API with the Agg canvas (no pyplot, no global backend switch, no display needed), written
atomically through uptrain/files.py.
"""
from __future__ import annotations

from typing import Mapping, Sequence


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


def plot_lines(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str, xlabel: str,
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


def plot_training(history: Sequence[dict], evals: Sequence[dict], path: str, kept_step: int | None = None,
                  title: str | None = None) -> str:
    """An uptraining run's curves (metrics.jsonl's records): per step the training loss, and with a teacher the
    KL (and the hidden-state term) it is distilled with; beside them the held-out loss at each evaluation, with the
    saved state (`kept_step`: keep_best's choice, else the last step) starred."""
    return _save(training_figure(history, evals, kept_step, title), path)


def training_figure(history: Sequence[dict], evals: Sequence[dict], kept_step: int | None = None,
                    title: str | None = None):
    """plot_training's figure (its axes' lines hold the figures: tests read them back)."""
    fig, axes = _figure(ncols=2 if evals else 1)
    ax = axes[0]
    for i, (key, label) in enumerate((("loss", "training CE"), ("kl", "KL to the teacher"),
                                      ("hidden", "hidden-state term"))):
        points = [(h["step"], h[key]) for h in history if key in h]
        if points:
            ax.plot(*zip(*points), label=label, color=f"C{i}", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token (training batches)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    if evals:
        ax = axes[1]
        ax.plot([e["step"] for e in evals], [e["loss"] for e in evals], marker="o", markersize=3, color="C3",
                label="held-out loss")
        kept = [e for e in evals if e["step"] == kept_step]
        if kept:
            ax.plot([kept[0]["step"]], [kept[0]["loss"]], marker="*", markersize=12, color="C2", linestyle="none",
                    label=f"saved: step {kept_step}")
        ax.set_xlabel("step")
        ax.set_ylabel("held-out NLL / token")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return fig
