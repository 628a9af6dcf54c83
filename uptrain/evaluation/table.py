"""The `uptrain eval` table: its columns, from the rows evaluate() measures (compare.py)."""
from __future__ import annotations

from typing import Sequence

from uptrain.arch import kv_heads_text
from uptrain.report import Column, col, fmt_bytes, fmt_count, fmt_num, fmt_ratio, markdown_table


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


def eval_columns(rows: Sequence[dict]) -> list[Column]:
    """The columns of the `uptrain eval` table; bits/byte only when present, one column per task metric."""
    cols = [
        col("label", "model", str, "left"),
        Column("H/KV", lambda r: f"{r.get('num_attention_heads')}/{kv_heads_text(r.get('num_key_value_heads'))}"),
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
