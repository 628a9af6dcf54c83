"""What the demo runs: the model and budget of each size, the variants compared, the α sweep."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DemoSize:
    """Model and budget of one demo size. `lr` is pre-training's peak; it decays (cosine) to
    lr·final_lr_ratio, and uptraining continues at that final lr (re-warming to a high lr after the
    anneal made the model worse in our measurements: an unfair baseline)."""

    layers: int
    heads: int
    hidden: int
    vocab: int
    seq_len: int
    batch: int
    pretrain_steps: int
    lr: float
    eval_tokens: int
    calibration_tokens: int
    tokenizer_plays: int | None  # None: every training play
    max_train_blocks: int | None
    decode_prompt: int
    decode_new: int
    final_lr_ratio: float = 0.1


FULL = DemoSize(layers=4, heads=8, hidden=256, vocab=4096, seq_len=128, batch=16, pretrain_steps=320, lr=2e-3,
                eval_tokens=16384, calibration_tokens=16384, tokenizer_plays=None, max_train_blocks=None,
                decode_prompt=256, decode_new=32)
QUICK = DemoSize(layers=2, heads=8, hidden=64, vocab=1024, seq_len=64, batch=8, pretrain_steps=60, lr=3e-3,
                 eval_tokens=4096, calibration_tokens=2048, tokenizer_plays=4, max_train_blocks=2000,
                 decode_prompt=32, decode_new=8)


@dataclass(frozen=True)
class Variant:
    name: str
    groups: int | None  # None: the MHA model itself (the fair baseline: continued for the same steps)
    method: str | None = None
    role: str = "main"  # main (Table 1 / Fig. 3), ablation (Fig. 4), beyond (methods beyond the paper)


def variants(heads: int) -> list[Variant]:
    return [Variant("MHA", None),
            Variant(f"GQA-{heads // 2}", heads // 2, "mean"),
            Variant("GQA-2", 2, "mean"),
            Variant("MQA", 1, "mean"),
            Variant("MQA first", 1, "first", "ablation"),
            Variant("MQA random", 1, "random", "ablation"),
            Variant("GQA-2 mean-norm", 2, "mean-norm", "beyond"),
            Variant("GQA-2 aligned", 2, "aligned", "beyond"),
            Variant("MQA mean-norm", 1, "mean-norm", "beyond"),
            Variant("MQA aligned", 1, "aligned", "beyond")]


ALPHAS = (0.0, 0.025, 0.05, 0.1)
SWEEP_VARIANT = "MQA"  # the α sweep (Figure 5) is run on this one


def slug(name: str) -> str:
    """A variant's folder name: "MQA first" → "mqa-first"."""
    return name.lower().replace(" ", "-")
