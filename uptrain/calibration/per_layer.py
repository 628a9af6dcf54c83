"""The model of a result with per-layer KV heads (G_l), for the layer-by-layer engine that calibrates and
refines it: uptrain/modeling's class for the form (nemotron-nas: DeciLMForCausalLM, Llama's module names),
configured exactly as the written checkpoint will be (block_configs, q/k/v biases), whatever config the engine's
skeleton was read from (the source's)."""
from __future__ import annotations

import importlib
from typing import Any

from uptrain.conversion.result_config import result_config


def per_layer_model_class(spec, config: dict, groups: tuple[int, ...]) -> type:
    """A subclass of the template's model class whose `_from_config` ignores the config it is handed and builds
    the model from the result's config.json (what uptrain/calibration/layers.Skeleton calls)."""
    result, template = result_config(spec, config, groups)
    module = importlib.import_module(f"uptrain.modeling.{template.module}")
    model_class: Any = getattr(module, template.model_class)
    config_class: Any = getattr(module, template.config_class)
    own = config_class.from_dict({k: v for k, v in result.items() if k != "auto_map"})

    class PerLayerModel(model_class):
        @classmethod
        def _from_config(cls, _config, **kwargs):
            return model_class._from_config(own, **kwargs)

    return PerLayerModel
