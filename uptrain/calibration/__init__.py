"""Calibration: the source run on a little text, one decoder layer at a time, to convert it better than
data-free pooling can (`--method aligned`, `--refine-steps`, `--distill-steps`, `--kv-budget`).

    text.py        the calibration text: corpora, token blocks, the line that says what was read
    layers.py      one decoder layer at a time from the shards (Skeleton, LayerByLayer), the attention watch
    converted.py   the converted model's class and tensor layouts while calibrating
    layer_pass.py  LayerPass, the one layer loop: read → watch → run → closed form → round → refine
    aligned.py     aligned's glue to checkpoint tensors and its refusals (the math: uptrain/merging.py)
    refine.py      local reconstruction of one attention module
    distill.py     end-to-end distillation on the next-token distributions, one layer in memory
    method.py      the calibrated conversion methods (CalibratedBase; CalibratedMethod, decoder-only, resumable)
    seq2seq.py     the encoder-decoder method (T5): calibrated on the whole model
    sensitivity.py --kv-budget: every layer's measured loss at every G (resumable)
    allocation.py  --kv-budget: the G_l of least summed loss under the budget (an exact knapsack; pure)
    per_layer.py   the model of a per-layer result (nemotron-nas), for calibrating and refining it
    work.py        work in progress beside the output (OUT.partial): what a rerun resumes from

The streaming converter (uptrain/conversion/) knows calibration only through its method interface
(conversion/methods.py: ConversionMethod).
"""
