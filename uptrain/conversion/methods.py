"""Conversion methods behind one small interface (`ConversionMethod`), and the one factory that knows them all
(`make_method`).

    PoolMethod          pool_method.py                  mean / first / random / mean-norm, tensor by tensor
    CalibratedMethod    uptrain/calibration/method.py   aligned, or any method with refine steps: decoder-only,
                                                        layer by layer (resumable)
    Seq2SeqCalibrated   uptrain/calibration/seq2seq.py  the same for encoder-decoders (T5), on the whole model
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from uptrain.conversion.pool_method import PoolMethod

if TYPE_CHECKING:
    import torch

    from uptrain.arch import AttentionSpec
    from uptrain.conversion.context import ConvertContext
    from uptrain.conversion.options import ConvertOptions
    from uptrain.kv_heads import LayerKey


class ConversionMethod(Protocol):
    """What the streaming converter (converter.py, writer.py) knows of a method."""

    name: str
    layerwise: bool  # False: each KV tensor is merged alone; True: a layer's `touched` tensors together

    def touched(self, spec: AttentionSpec) -> tuple[str, ...]:
        """The per-layer tensors (suffixes) a layerwise method rewrites."""
        ...

    def prepare(self, ctx: ConvertContext) -> dict:
        """Runs before any output exists (e.g. the layer-by-layer calibration); returns what uptrain.json records."""
        ...

    def merge(self, layer: LayerKey, tensors: dict[str, torch.Tensor],
              ctx: ConvertContext) -> dict[str, torch.Tensor]:
        """{suffix: float32 tensor} of one layer (or one KV tensor) → the same with G KV heads."""
        ...

    def stats(self, layer: LayerKey, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor],
              ctx: ConvertContext) -> dict:
        """The method's own per-layer error (k_rel_error, v_rel_error, …), called for every merged layer."""
        ...

    def finish(self) -> None:
        """The result is written: drop what `prepare` left for `merge` (a calibration's work folder)."""
        ...


def make_method(options: ConvertOptions, spec: AttentionSpec) -> ConversionMethod:
    """The method object for checked options (ConvertOptions.check has refused unknown names) and the source's
    attention spec: a pooling method streams tensor by tensor; aligned, and any method with refine steps,
    calibrates (layer by layer; an encoder-decoder on its whole model). Calibration (and torch with it) is
    imported only when asked for: a pooling conversion starts copying while torch loads."""
    if not options.calibrated:
        return PoolMethod(options.method)
    if spec.blocks:  # encoder-decoder
        from uptrain.calibration.seq2seq import Seq2SeqCalibrated

        return Seq2SeqCalibrated(options)
    from uptrain.calibration.method import CalibratedMethod

    return CalibratedMethod(options)
