"""KV heads of a result as one value: G for every layer, or G_l per layer, with its text and arithmetic.

    KVHeads.parse("8")        → 8 in every layer          str(...) == "8"
    KVHeads.parse("8,2,1,4")  → G_l = 8, 2, 1, 4           str(...) == "8,2,1,4"
    KVHeads.of([2, 2, 2])     → 2 in every layer (a uniform list is one G: written exactly as G = 2 is)

A layer key names one unit the converter merges: a decoder layer's index, or (block, index) in an
encoder-decoder (block: "encoder", "decoder", "cross").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence, Tuple, Union

LayerKey = Union[int, Tuple[str, int]]

RULE = "must be at least 1 (the KV heads of the result)"


@dataclass(frozen=True)
class KVHeads:
    """G (`uniform`) or G_l (`per_layer`, whose values differ); exactly one of the two is set."""

    uniform: int | None = None
    per_layer: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if (self.uniform is None) == (self.per_layer is None):
            raise ValueError("KVHeads holds one G or a tuple G_l")
        bad = [g for g in ([self.uniform] if self.per_layer is None else self.per_layer) if g is None or g < 1]
        if bad:
            raise ValueError(RULE if self.per_layer is None else f"every layer's G {RULE}")

    # -- making one ------------------------------------------------------------------------------
    @classmethod
    def of(cls, value: KVHeads | int | Sequence[int]) -> KVHeads:
        """An int, a list or tuple of ints (uniform → one G), or a KVHeads; raises ValueError with the reason."""
        if isinstance(value, KVHeads):
            return value
        if isinstance(value, bool):
            raise ValueError(f"{value!r} is not a number of KV heads")
        if isinstance(value, int):
            return cls(uniform=value)
        if isinstance(value, (list, tuple)):
            if not value or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ValueError(f"{list(value)!r} is not a list of KV-head counts (whole numbers, one per layer)")
            if len(set(value)) == 1:
                return cls(uniform=value[0]) if value[0] >= 1 else cls(per_layer=tuple(value))
            return cls(per_layer=tuple(value))
        raise ValueError(f"{value!r} is not a number of KV heads")

    @classmethod
    def parse(cls, text: str) -> KVHeads:
        """ "2" or "8,2,1,4" (one per layer) → a KVHeads; raises ValueError saying what is wrong."""
        parts = [p.strip() for p in str(text).split(",")]
        try:
            numbers = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"{text!r} is not a number of KV heads or a comma-separated list of them "
                             f"(e.g. 2, or 8,2,1,4: one per layer)") from None
        return cls.of(numbers[0] if len(numbers) == 1 else numbers)

    # -- reading it --------------------------------------------------------------------------------
    @property
    def _g(self) -> int:
        """The one G of a uniform value (__post_init__ sets `uniform` whenever `per_layer` is None)."""
        assert self.uniform is not None
        return self.uniform

    @property
    def value(self) -> int | tuple[int, ...]:
        """G or the tuple G_l (what the architecture table's functions take)."""
        return self.per_layer if self.per_layer is not None else self._g

    def at(self, layer: LayerKey) -> int:
        """G of one unit: its layer's G_l, or the one G (of every unit, an encoder-decoder's (block, index) too).
        Per-layer KV heads are a form of decoder-only models: their units are layer indices."""
        if self.per_layer is None:
            return self._g
        if not isinstance(layer, int):
            raise ValueError(f"per-layer KV heads are G_l per decoder layer; {layer!r} is not a layer index")
        return self.per_layer[layer]

    def layers(self, n: int) -> tuple[int, ...]:
        """G_l of each of n layers."""
        return self.per_layer if self.per_layer is not None else (self._g,) * n

    def total(self, n: int) -> int:
        """Σ_l G_l over n layers: the KV cache is proportional to it."""
        return sum(self.layers(n))

    def as_json(self) -> int | list[int]:
        return list(self.per_layer) if self.per_layer is not None else self._g

    def __str__(self) -> str:
        return ",".join(map(str, self.per_layer)) if self.per_layer is not None else str(self.uniform)


# Raw values as configs, records and options hold them (an int, a list or tuple with one count per layer, or None).
# Unlike KVHeads.of they keep a uniform list as it was given: a message quotes what the user said, and a list's
# length is checked against the layers.
def per_layer_counts(value: object) -> tuple[int, ...] | None:
    """The per-layer counts of a list or tuple (uniform or not), or None for one G (or no value)."""
    return tuple(value) if isinstance(value, (list, tuple)) else None


def text(value: object) -> str:
    """"4", or a per-layer list as "8,2,1,4" (how --groups takes it)."""
    per_layer = per_layer_counts(value)
    return ",".join(map(str, per_layer)) if per_layer is not None else str(value)
