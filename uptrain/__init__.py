"""uptrain: MHA → GQA conversion (Ainslie et al. 2023) and uptraining.

The public API — the CLI is a thin layer over exactly these calls, so a notebook can do the same:

    import uptrain
    uptrain.inspect("path/or/hub-id")
    result = uptrain.convert("src", "out", groups=8, method="mean")
    uptrain.train("recipes/tiny-cpu.yaml", overrides=["budget.max_steps=20"])
    uptrain.plan("recipes/llama2-7b-gqa8.yaml", accelerate_config="recipes/accelerate/fsdp.yaml").to_text()
    uptrain.evaluate(["src", "out"], data=...)
    uptrain.push("out", repo_id="me/model-gqa8")
    uptrain.demo(out="demo-out", quick=True)

Functions are imported lazily: `import uptrain` stays cheap (no transformers import), which matters
for the streaming converter's memory budget. Module names differ from the function names on purpose
(`uptrain.conversion.converter.convert`, `uptrain.evaluation.compare.evaluate`) so an import of a submodule
never shadows an API function. The layers below these calls are drawn in CONTRIBUTING.md's "Layers".
"""
from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from uptrain.version import __version__

# name → the module that defines it; imported on first use (PEP 562), so `import uptrain` loads no torch.
_API = {
    # the calls
    "convert": "uptrain.conversion",
    "inspect": "uptrain.conversion",
    "train": "uptrain.api",
    "plan": "uptrain.training.plan",
    "evaluate": "uptrain.evaluation",
    "push": "uptrain.publishing",
    "demo": "uptrain.miniature",
    # what they take and return
    "ConvertOptions": "uptrain.conversion",
    "ConvertResult": "uptrain.conversion",
    "CheckpointInfo": "uptrain.conversion",
    "Recipe": "uptrain.training.recipe",
    "TrainResult": "uptrain.training",
    "TrainingPlan": "uptrain.training.plan",
    "EvalOptions": "uptrain.evaluation",
    "EvalResult": "uptrain.evaluation",
    "PushOptions": "uptrain.publishing",
    "PushResult": "uptrain.publishing",
    "DemoOptions": "uptrain.miniature",
    "DemoResult": "uptrain.miniature.report",
    "UptrainError": "uptrain.errors",
}

if TYPE_CHECKING:  # what IDEs and type checkers see; at run time the names load lazily below
    from uptrain.api import train
    from uptrain.conversion import CheckpointInfo, ConvertOptions, ConvertResult, convert, inspect
    from uptrain.errors import UptrainError
    from uptrain.evaluation import EvalOptions, EvalResult, evaluate
    from uptrain.miniature import DemoOptions, demo
    from uptrain.miniature.report import DemoResult
    from uptrain.publishing import PushOptions, PushResult, push
    from uptrain.training import TrainResult
    from uptrain.training.plan import TrainingPlan, plan
    from uptrain.training.recipe import Recipe

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'uptrain' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
