"""Conversion methods behind one small interface, and the one factory that knows them all (`make_method`).

A method has `layerwise` (False: each KV tensor is merged alone; True: all `touched(spec)` tensors of a
layer are merged together), `prepare(ctx) -> record` (runs before any output exists, e.g. the layer-by-layer
calibration and refinement of uptrain/conversion/calibrated.py) and
`merge(layer, {suffix: float32 tensor}, ctx) -> {suffix: tensor}`; optionally `stats(layer, inputs, outputs,
ctx)` for its own per-layer error. `ctx` is a ConvertContext (uptrain/conversion/context.py).

    PoolMethod          pool_method.py       mean / first / random / mean-norm, tensor by tensor
    CalibratedMethod    calibrated.py        aligned, or any method with refine steps: decoder-only, layer by layer
    Seq2SeqCalibrated   seq2seq_aligned.py   the same for encoder-decoders (T5), on the whole source model
"""
from __future__ import annotations

from uptrain.arch import AttentionSpec
from uptrain.conversion.options import ConvertOptions


def make_method(options: ConvertOptions, spec: AttentionSpec):
    """The method object for checked options (ConvertOptions.check has refused unknown names) and the source's
    attention spec: a pooling method streams tensor by tensor; aligned, and any method with refine steps,
    calibrates (layer by layer; an encoder-decoder on its whole model). Calibration code is imported only when
    asked for."""
    if not options.calibrated:
        from uptrain.conversion.pool_method import PoolMethod

        return PoolMethod(options.method)
    if spec.blocks:  # encoder-decoder
        from uptrain.conversion.seq2seq_aligned import Seq2SeqCalibrated

        return Seq2SeqCalibrated(options)
    from uptrain.conversion.calibrated import CalibratedMethod

    return CalibratedMethod(options)
