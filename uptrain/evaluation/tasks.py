"""Downstream tasks through lm-evaluation-harness (an optional extra: `pip install 'uptrain[eval]'`)."""
from __future__ import annotations

from typing import Any

_PREFERRED_METRICS = ("acc_norm", "acc", "exact_match", "f1", "mcc", "word_perplexity")


def lm_eval_available() -> bool:
    try:
        import lm_eval  # noqa: F401  (heavy: only imported when tasks are asked for)
    except ImportError:
        return False
    return True


def run_tasks(model, tokenizer, tasks, batch_size: int = 8, limit: int | None = None) -> dict:
    """{task: {"metric", "value", "metrics"} or {"error"}} via lm-evaluation-harness, one task at a time
    so that a task whose data cannot be fetched (offline) fails alone."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        return {t: {"error": "lm-eval is not installed (pip install 'uptrain[eval]')"} for t in tasks}
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out: dict[str, dict[str, Any]] = {}
    for task in tasks:
        try:
            results = lm_eval.simple_evaluate(model=lm, tasks=[task], limit=limit)["results"]
            # a group's own entry when present; a YAML path is reported under its task name
            res = results[task] if task in results else next(iter(results.values()))
        except Exception as e:  # network / unknown task / dataset error: record it, keep going
            out[task] = {"error": f"{type(e).__name__}: {str(e).strip()[:300]}"}
            continue
        metrics = {k.split(",")[0]: v for k, v in res.items()
                   if isinstance(v, (int, float)) and "stderr" not in k and k != "sample_len"}
        name = next((m for m in _PREFERRED_METRICS if m in metrics), next(iter(metrics), None))
        out[task] = {"metric": name, "value": metrics.get(name), "metrics": metrics}
    return out
