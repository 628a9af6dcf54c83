"""Conversion: MHA/GQA checkpoint → G KV heads, streaming.

    options.py        ConvertOptions: the one definition of every conversion option (CLI, recipes, Python)
    tensor_plan.py    per tensor: copy its bytes or merge it, and its output shape
    result_config.py  the result's config.json (and the modeling template that travels with it)
    context.py        ConvertContext: what a method sees of the conversion at hand
    methods.py        ConversionMethod (the interface, a Protocol) and make_method, the one factory
    pool_method.py    mean / first / random / mean-norm, tensor by tensor (math in uptrain/pooling.py)
    writer.py         executes a plan: shards planned from dtypes and shapes, written tensor by tensor
    converter.py      convert(): resolve, plan, write, record (a module name unlike the function's, so an
                      import of the module never shadows it)
    inspection.py     inspect(): what a checkpoint is and what converting it would buy

The calibrated methods (aligned, refinement, distillation, the KV-budget measure) are uptrain/calibration/: the
converter knows them only through ConversionMethod.

Names are imported lazily so that recipes can import ConvertOptions without torch.
"""
from importlib import import_module

_NAMES = {
    "convert": "converter", "ConvertResult": "converter", "ConvertOptions": "options", "plan_conversion": "tensor_plan",
    "inspect": "inspection", "CheckpointInfo": "inspection",
}
__all__ = list(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(import_module(f"uptrain.conversion.{_NAMES[name]}"), name)
    raise AttributeError(f"module 'uptrain.conversion' has no attribute {name!r}")
