"""One decoder layer at a time, straight from the shards: the engine under calibration and refinement.

As GPTQ-style quantizers do (AutoGPTQ's layer loop, llm-compressor's sequential pipeline), the model is
never built whole. Its own class is instantiated with every parameter on the meta device (accelerate's
`init_empty_weights`; buffers such as RoPE tables are computed for real, they are small), the embeddings
run once over the calibration blocks, then each decoder layer in turn is materialised in float32 from its
checkpoint tensors (read one by one with the streaming reader, loaded through transformers' own key
conversions, so fused-expert and renamed checkpoints load as from_pretrained would), run over the carried
hidden states, and dropped back to meta.

Nothing here knows an architecture: what the model's forward hands each decoder layer besides its hidden
states (the attention mask of that layer's type, its position embeddings, position ids) is recorded by
running the model's own forward once with every layer replaced by a stub that returns its input; what the
attention sees and returns is taken by a forward hook on the module that holds `spec.q`.

Memory: the larger of (the non-layer tensors except lm_head) and one float32 decoder layer, plus the
activations the caller carries (tokens × hidden float32 per stream). `Skeleton.loaded()` counts the
materialised parameters, so tests can check the bound.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from uptrain.calibration.converted import converted_model
from uptrain.errors import UptrainError
from uptrain.kv_heads import KVHeads


class _Stop(Exception):
    """Raised by a hook when the rest of the layer's forward is not needed."""


def pick_device(device: str | None) -> torch.device:
    """None → cuda when present, else cpu; anything else must exist."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        d = torch.device(device)
    except RuntimeError as e:
        raise UptrainError(f"unknown device {device!r}: {e}") from e
    if d.type == "cuda" and not torch.cuda.is_available():
        raise UptrainError(f"device {device!r} asked for, but torch sees no CUDA device here; use cpu")
    return d


def release_memory() -> None:
    """Give freed memory back to the OS. glibc keeps freed blocks in its arenas (one per thread that
    allocated: transformers' loader uses a pool), so without this RSS grows by about a layer per arena
    although nothing is alive (measured: 0.45 → 0.85 GB over 16 layers of a 1.9 GB model, 0.44 after a trim)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc: nothing to do
        pass


def _quiet_loading():
    """transformers' loader shows a progress bar per call; one call per layer would flood the terminal."""
    from transformers.utils import logging as hf_logging

    @contextlib.contextmanager
    def ctx():
        was = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            if was:
                hf_logging.enable_progress_bar()
    return ctx()


class Skeleton:
    """The checkpoint's model class with every parameter on the meta device; layers come and go.

    `overrides`: config fields to change (the converted model: fewer KV heads); `model_class`: the class to
    build instead of the config's own (the converted model where no transformers class holds its KV heads:
    a GQA class of uptrain/modeling, which keeps the source's module names)."""

    def __init__(self, src_dir, spec, device: torch.device, overrides: dict | None = None, model_class=None):
        from accelerate import init_empty_weights
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.conversion_mapping import get_model_conversion_mapping

        self.spec, self.device = spec, device
        self.config = AutoConfig.from_pretrained(src_dir)
        for key, value in (overrides or {}).items():  # set, not passed: from_pretrained drops unknown fields
            setattr(self.config, key, value)
        with init_empty_weights(include_buffers=False):
            if model_class is None:
                self.model = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32)
            else:
                self.model = model_class._from_config(self.config, dtype=torch.float32)
        self.model.eval().requires_grad_(False)
        for module in self.model.modules():  # real buffers (RoPE tables, embedding scales) to the device
            for name, buf in module._buffers.items():
                if buf is not None and not buf.is_meta:
                    module._buffers[name] = buf.to(device)
        self.layers_path = spec.layer_prefix.split("{}")[0].rstrip(".")  # "model.layers"
        try:
            self.layers = self.model.get_submodule(self.layers_path)
        except AttributeError as e:
            raise UptrainError(f"{type(self.model).__name__} has no {self.layers_path}; the attention spec and the "
                               f"transformers implementation disagree") from e
        base = self.layers_path.rsplit(".", 1)[0] if "." in self.layers_path else ""
        self.base = self.model.get_submodule(base)
        self.attention_name = spec.q.rsplit(".", 1)[0]  # "self_attn"
        self._mapping = get_model_conversion_mapping(self.model)
        self._tuple_output: bool | None = None  # see logits

    # -- tensors in and out ------------------------------------------------------------------------
    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """Checkpoint tensors (full names) → float32 parameters on the device, through transformers' own
        key conversions (renamed keys, per-expert tensors fused into one)."""
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        cfg = LoadStateDictConfig(weight_mapping=self._mapping, dtype=torch.float32,  # type: ignore[arg-type]
                                  device_map={"": self.device})
        with _quiet_loading():
            convert_and_load_state_dict_in_model(self.model, dict(tensors), cfg)

    @staticmethod
    def drop(module: torch.nn.Module) -> None:
        """Parameters back to meta (buffers stay: they are part of the skeleton), memory back to the OS."""
        for m in module.modules():
            for name, p in m._parameters.items():
                if p is not None and not p.is_meta:
                    m._parameters[name] = torch.nn.Parameter(p.detach().to("meta"), requires_grad=False)
        release_memory()

    def check_loaded(self, module: torch.nn.Module, what: str) -> None:
        missing = [n for n, p in module.named_parameters() if p.is_meta]
        if missing:
            raise UptrainError(f"{what}: the checkpoint holds no tensor for {', '.join(missing[:4])}; it does not "
                               f"match the {self.config.model_type} implementation of transformers")

    def loaded(self) -> int:
        """Materialised parameter elements right now (for memory checks)."""
        return sum(p.numel() for p in self.model.parameters() if not p.is_meta)

    def layer(self, i: int) -> torch.nn.Module:
        return self.layers[i]

    def attention(self, layer: torch.nn.Module) -> torch.nn.Module:
        return layer.get_submodule(self.attention_name)

    # -- what the model's forward hands its layers --------------------------------------------------
    @torch.no_grad()
    def layer_inputs(self, ids: torch.Tensor) -> tuple[torch.Tensor, list[tuple[tuple, dict]]]:
        """(hidden states entering layer 0, per layer the (args, kwargs) it is called with besides them),
        from one forward of the model with every decoder layer replaced by a stub returning its input."""
        calls: dict[int, tuple] = {}

        def stub(i):
            def forward(hidden_states, *args, **kwargs):
                calls[i] = (hidden_states, args, kwargs)
                return hidden_states
            return forward

        for i, layer in enumerate(self.layers):
            layer.forward = stub(i)
        try:
            self.base(input_ids=ids.to(self.device), use_cache=False)
        finally:
            for layer in self.layers:
                del layer.forward
        if sorted(calls) != list(range(len(self.layers))):
            raise UptrainError(f"the {self.config.model_type} forward did not call every decoder layer once")
        return calls[0][0], [(calls[i][1], calls[i][2]) for i in range(len(self.layers))]


    def logits(self, ids: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """What the model's forward makes of `hidden` as the last decoder layer's output (final norm, head, any
        soft-capping): one forward with every decoder layer replaced by a stub, the first returning `hidden`.
        Gradients flow back to `hidden`. Whether the model's forward reads its layers' outputs as tuples
        (Falcon reads outputs[0]) is seen from the first call's shape: a tensor indexed [0] loses the batch axis."""
        if self._tuple_output is None:
            try:
                logits = self._logits(ids, hidden, wrap=False)
            except (IndexError, RuntimeError, ValueError):  # a tensor taken for a tuple fails on the way
                logits = None
            if logits is not None and logits.dim() == 3 and tuple(logits.shape[:2]) == tuple(ids.shape):
                self._tuple_output = False
                return logits
            self._tuple_output = True
        return self._logits(ids, hidden, wrap=self._tuple_output)

    def _logits(self, ids: torch.Tensor, hidden: torch.Tensor, wrap: bool) -> torch.Tensor:
        def stub(i: int) -> Callable[..., Any]:
            def forward(hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
                out = hidden if i == 0 else hidden_states
                return (out,) if wrap else out
            return forward

        for i, layer in enumerate(self.layers):
            layer.forward = stub(i)
        try:
            return self.model(input_ids=ids.to(self.device), use_cache=False).logits
        finally:
            for layer in self.layers:
                del layer.forward


@dataclass
class Batch:
    """A batch of calibration blocks on its way through the layers."""

    hidden: torch.Tensor  # [B, T, D] float32: the input of the current layer
    calls: list  # per layer: (args, kwargs) the model's forward passes that layer besides the hidden states


@dataclass
class AttentionCall:
    """One captured call of an attention module: its input, how to call it again, and what it returned."""

    x: torch.Tensor
    args: tuple
    kwargs: dict
    key: int | str  # where x goes: a position in args, or a keyword
    y: torch.Tensor | None = None

    def __call__(self, module, x: torch.Tensor | None = None) -> torch.Tensor:
        x = self.x if x is None else x
        args, kwargs = list(self.args), dict(self.kwargs)
        if isinstance(self.key, int):
            args.insert(self.key, x)
        else:
            kwargs[self.key] = x
        out = module(*args, **kwargs)
        return out[0] if isinstance(out, tuple) else out


def _attention_call(args: tuple, kwargs: dict) -> AttentionCall:
    if args:
        return AttentionCall(args[0], tuple(args[1:]), dict(kwargs), 0)
    key = "hidden_states" if "hidden_states" in kwargs else next(k for k, v in kwargs.items() if torch.is_tensor(v))
    rest = {k: v for k, v in kwargs.items() if k != key}
    return AttentionCall(kwargs[key], (), rest, key)


@contextlib.contextmanager
def watch_attention(attention: torch.nn.Module, on_call: Callable[[AttentionCall], None], stop: bool = False):
    """Hand every call of `attention` (input, arguments, output) to `on_call`; with `stop`, end the layer's
    forward right after its attention (the caller catches nothing: `run_layer` does)."""
    def hook(module, args, kwargs, output):
        call = _attention_call(args, kwargs)
        call.y = output[0] if isinstance(output, tuple) else output
        on_call(call)
        if stop:
            raise _Stop

    handle = attention.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def run_layer(layer: torch.nn.Module, batch: Batch, i: int) -> torch.Tensor | None:
    """The layer's output for `batch` (None when a hook stopped it after the attention)."""
    args, kwargs = batch.calls[i]
    try:
        out = layer(batch.hidden, *args, **kwargs)
    except _Stop:
        return None
    return out[0] if isinstance(out, tuple) else out


@dataclass
class LayerByLayer:
    """A source checkpoint read one decoder layer at a time, with the calibration blocks' hidden states.

    `source`: the converter's open checkpoint (SafetensorsSource or PickleSource). The converted skeletons
    (one per KV heads asked for: `converted(groups)`) are built on first use. Tensors are named as the model
    names them (a base-model checkpoint's names get the spec's root: GPT-2's h.0.… → transformer.h.0.…)."""

    src_dir: Any
    spec: Any
    config: dict
    source: Any
    device: torch.device
    _names: dict = field(default_factory=dict)
    _converted: dict = field(default_factory=dict)

    def __post_init__(self):
        self.skeleton = Skeleton(self.src_dir, self.spec, self.device)
        self.globals: list[str] = []
        self.heads: list[str] = []  # lm_head: needed only to distil on the logits (calibration/distill.py)
        self.stored: dict[str, str] = {}  # model name → checkpoint name
        root = self.spec.root
        for name in self.source.entries:
            _, layer, _ = self.spec.classify(name)
            full = name if not root or name.startswith(root) or name in self.spec.global_tensors else root + name
            self.stored[full] = name
            if layer is None:
                # the head is not needed by calibration, which ends at the last layer
                (self.heads if full.startswith("lm_head.") else self.globals).append(full)
            else:
                self._names.setdefault(layer, []).append(full)

    @property
    def layers(self) -> int:
        return self.spec.layers(self.config)

    def read(self, layer: int) -> dict[str, torch.Tensor]:
        """The checkpoint tensors of one layer (full names), float32."""
        return {n: self.source.read(self.stored[n]).float() for n in self._names.get(layer, [])}

    def prefix(self, layer: int) -> str:
        return self.spec.layer_prefix.format(layer)

    def converted(self, groups: KVHeads) -> Skeleton:
        """The skeleton of the model converted to `groups` KV heads (converted.py's class and overrides)."""
        if groups not in self._converted:
            overrides, model_class = converted_model(self.spec, self.config, groups)
            self._converted[groups] = Skeleton(self.src_dir, self.spec, self.device, overrides, model_class)
        return self._converted[groups]

    def skeleton_for(self, groups: KVHeads | None) -> Skeleton:
        return self.skeleton if groups is None else self.converted(groups)

    def embed(self, blocks: torch.Tensor, batch_size: int) -> list[Batch]:
        """Every batch of blocks through the embeddings (and whatever the model does before its first layer)."""
        sk = self.skeleton
        sk.load({n: self.source.read(self.stored[n]) for n in self.globals})
        try:
            batches: list[Batch] = []
            calls_by_size: dict[tuple[int, ...], Any] = {}
            for start in range(0, blocks.shape[0], batch_size):
                ids = blocks[start:start + batch_size]
                hidden, calls = sk.layer_inputs(ids)
                # Masks and position embeddings depend on the batch shape only: one set per batch size.
                calls = calls_by_size.setdefault(tuple(ids.shape), calls)
                batches.append(Batch(hidden.float(), calls))
        finally:
            sk.drop(sk.model)
        return batches

    @contextlib.contextmanager
    def top(self, groups: KVHeads | None = None) -> Iterator[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
        """Everything outside the decoder layers, lm_head included, materialised (a tied head tied to the
        embeddings), of the source or (`groups`) the converted skeleton; yields logits(ids, hidden)
        (Skeleton.logits). Dropped on exit."""
        sk = self.skeleton_for(groups)
        sk.load({n: self.source.read(self.stored[n]) for n in self.globals + self.heads})
        head = sk.model.get_output_embeddings()
        if head is not None and head.weight.is_meta and getattr(sk.config, "tie_word_embeddings", False):
            head.weight = sk.model.get_input_embeddings().weight
        try:
            sk.check_loaded(head if head is not None else sk.model, "the model's head")
            yield sk.logits
        finally:
            sk.drop(sk.model)

    @contextlib.contextmanager
    def layer(self, i: int, tensors: dict[str, torch.Tensor], groups: KVHeads | None = None,
              only: str | None = None) -> Iterator[torch.nn.Module]:
        """Decoder layer i (of the skeleton converted to `groups`, else the source's) materialised from `tensors`
        (full names); `only` = a submodule name: materialise just that (e.g. the attention). Dropped on exit."""
        sk = self.skeleton_for(groups)
        layer = sk.layer(i)
        if only is not None:
            prefix = self.prefix(i) + only + "."
            tensors = {n: t for n, t in tensors.items() if n.startswith(prefix)}
        sk.load(tensors)
        module = layer if only is None else layer.get_submodule(only)
        try:
            sk.check_loaded(module, f"layer {i}")
            yield module
        finally:
            sk.drop(layer)


class SecondMoment:
    """C = Σ [x 1]ᵀ[x 1] over every token added, float64 (on the device of the first batch): the statistic aligned
    fits its heads in. The constant column lets projection biases ride along as one more weight column."""

    def __init__(self) -> None:
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
        assert self.c is not None, "no input was seen"
        c = self.c.cpu()
        c[-1, :-1] = c[:-1, -1]
        return (c + c.T) / 2
