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
from importlib import import_module

from uptrain.version import __version__

_API = {
    "convert": "uptrain.conversion",
    "inspect": "uptrain.conversion",
    "train": "uptrain.api",
    "plan": "uptrain.training.plan",
    "evaluate": "uptrain.evaluation",
    "push": "uptrain.publishing",
    "demo": "uptrain.miniature",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(import_module(_API[name]), name)
    raise AttributeError(f"module 'uptrain' has no attribute {name!r}")
