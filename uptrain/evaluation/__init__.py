"""Quality and inference cost of several checkpoints, side by side.

    quality.py   perplexity over blocks or a sliding window (the project's one scorer; torch only)
    kinds.py     held-out text by kind (in no calibration set), perplexity per kind, ratios and the worst kind
    cost.py      bytes a real KV cache holds, prefill / cached-decode speed, peak memory
    tasks.py     downstream tasks through lm-evaluation-harness (optional)
    options.py   EvalOptions: the flags of `uptrain eval` = the keyword arguments of evaluate()
    serving.py   the vLLM adapter: serve folders in a child process (vllm_child.py), KV capacity, tokens/s,
                 greedy tokens; `--engine vllm`
    compare.py   evaluate(): inputs checked, one row per model, EvalResult (markdown, JSON, plot)
    table.py     the columns of the `uptrain eval` table (number formats: uptrain/report.py; plots: uptrain/plots.py)

Names are imported lazily, so `from uptrain.evaluation.quality import perplexity` (the training loop)
never loads transformers, tqdm or the report code.
"""
from importlib import import_module

_EXPORTS = {
    "perplexity": "quality", "sliding_perplexity": "quality", "sliding_windows": "quality",
    "scored_ranges": "quality",
    "KINDS": "kinds", "kind_blocks": "kinds", "score_kinds": "kinds", "kind_ratios": "kinds", "kinds_markdown": "kinds",
    "output_cache": "cost", "cache_tensors": "cost", "cache_bytes": "cost", "decode_speed": "cost",
    "reset_peak_memory": "cost", "peak_memory": "cost",
    "lm_eval_available": "tasks", "run_tasks": "tasks",
    "EvalOptions": "options",
    "vllm_available": "serving", "serve_in_vllm": "serving", "ServeSettings": "serving", "ServeJob": "serving",
    "evaluate": "compare", "EvalResult": "compare", "eval_data_spec": "compare", "eval_token_ids": "compare",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
