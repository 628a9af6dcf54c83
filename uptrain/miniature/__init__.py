"""`uptrain demo`: the GQA paper in miniature — offline, on a CPU, in minutes.

Pre-train a small MHA Llama on Shakespeare (the stand-in for "the original pre-training"), convert it to
GQA-4, GQA-2 and MQA, uptrain each for α of the pre-training steps, evaluate everything on held-out plays
and write a report with the paper's Table 1 / Figures 3-5 shapes. Built only from the public pieces:
`uptrain.data`, `uptrain.convert`, `uptrain.train`, `uptrain.evaluate`, `uptrain.report`, `uptrain.plots`.

    options.py   DemoOptions: the flags of `uptrain demo` = the arguments of `uptrain.demo(...)`
    sizes.py     DemoSize (FULL, QUICK), the variants compared, the α sweep
    state.py     DIR/state.json: every finished unit of work, so `--resume` redoes only the rest
    stages.py    tokenizer and data, pre-training, conversion, uptraining, α sweep, evaluation
    findings.py  the paper's tables and plain-language findings from the numbers
    report.py    plots, report.md, results.json
    run.py       demo(): the stages in order, then the report
"""
from importlib import import_module

from uptrain.miniature.sizes import FULL, QUICK, DemoSize

from uptrain.miniature.options import DemoOptions

__all__ = ["demo", "DemoOptions", "DemoResult", "DemoSize", "FULL", "QUICK"]
_LAZY = {"demo": "uptrain.miniature.run", "DemoResult": "uptrain.miniature.report"}  # they import torch


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'uptrain.miniature' has no attribute {name!r}")
