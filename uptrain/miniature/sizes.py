"""What the demo runs: the model and budget of each size, the variants compared, the α sweep."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


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


def t5_variants(heads: int) -> list[Variant]:
    """The paper's T5 comparison (Table 1, Fig. 4): decoder self- and cross-attention pooled; the same
    beyond-the-paper rows as the Llama (aligned calibrates on span-corrupted text: uptrain/calibration/seq2seq.py)."""
    return variants(heads)


# T5.1.1 in miniature (gated-GELU, untied head): seq_len is the encoder's input length; span corruption reads
# raw blocks of the length T5's rule gives and eval_tokens counts those raw tokens.
T5_FULL = DemoSize(layers=2, heads=8, hidden=128, vocab=2048, seq_len=64, batch=16, pretrain_steps=400, lr=3e-3,
                   eval_tokens=16384, calibration_tokens=16384, tokenizer_plays=None, max_train_blocks=None,
                   decode_prompt=64, decode_new=16)
T5_QUICK = DemoSize(layers=2, heads=8, hidden=64, vocab=1024, seq_len=64, batch=8, pretrain_steps=80, lr=3e-3,
                    eval_tokens=4096, calibration_tokens=2048, tokenizer_plays=4, max_train_blocks=2000,
                    decode_prompt=32, decode_new=8)


@dataclass(frozen=True)
class DemoArch:
    """What differs between the demo's architectures, as data: the sizes, the variants compared, the
    optimiser's weight decay and how the report names the model and its quality measure."""

    name: str
    title: str  # the model family in the report: "Llama", "T5.1.1"
    full: DemoSize
    quick: DemoSize
    variants: Callable[[int], list[Variant]]
    weight_decay: float
    seq2seq: bool = False  # span corruption (encoder-decoder) rather than next-token prediction


ARCHS = {"llama": DemoArch("llama", "Llama", FULL, QUICK, variants, weight_decay=0.1),
         "t5": DemoArch("t5", "T5.1.1", T5_FULL, T5_QUICK, t5_variants, weight_decay=0.0, seq2seq=True)}

# torch threads of a demo run (`--threads`). One: on a busy machine more threads cost several times the CPU
# time, and on one thread the run's CPU time is its wall time on a quiet machine (the figure SECONDS records
# and the help promises). Measured on a 2-core machine shared with other jobs: the full Llama run on two
# threads took 16.8 min wall and 20.7 min of CPU, on one thread 11.1-11.6 min wall and 6.9-7.3 min of CPU; the
# T5 miniature's steps on two threads were 4-11x slower. On a quiet machine two threads ran a training step
# 1.7x (Llama) and 1.2x (T5) faster: `--threads 2` there.
THREADS = 1

# What `uptrain demo` took, measured: CPU seconds on one torch thread, which is the wall time on a quiet machine.
# `uptrain demo --help`, the README and docs/demo.md say these; the full Llama run's is that of the committed run
# (docs/demo-run/results.json: tests/test_docs.py keeps the two within 30 s).
SECONDS = {("llama", False): 614, ("llama", True): 22, ("t5", False): 108, ("t5", True): 27}


def took(arch: str, quick: bool = False) -> str:
    """"about 10 minutes on one CPU core": what the CLI's help and the docs say a run takes."""
    s = SECONDS[(arch, quick)]
    return f"about {s / 60:.0f} minutes on one CPU core" if s >= 90 else f"about {s} seconds on one CPU core"


ALPHAS = (0.0, 0.025, 0.05, 0.1)
SWEEP_VARIANT = "MQA"  # the α sweep (Figure 5) is run on this one


def slug(name: str) -> str:
    """A variant's folder name: "MQA first" → "mqa-first"."""
    return name.lower().replace(" ", "-")
