"""How the demo runs, as one dataclass: the flags of `uptrain demo` and the keyword arguments of
`uptrain.demo(...)` are these fields, and a mistake is reported in the caller's words (uptrain/options.py).
Light (no torch): the CLI builds its flags from it."""
from __future__ import annotations

from dataclasses import dataclass

from uptrain.errors import UptrainError
from uptrain.miniature.sizes import ARCHS, THREADS, took
from uptrain.options import SpokenOptions, option


@dataclass
class DemoOptions(SpokenOptions):
    """Every option of a demo run; the defaults are `uptrain demo`'s."""

    KIND = "demo option"

    out: str = option("output folder (report.md, results.json, plots, checkpoints)", "demo-out")
    quick: bool = option(f"a smaller model and fewer steps, a smoke run ({took('llama', True)})", False)
    arch: str = option("llama (next-token prediction) or t5: a T5.1.1 pre-trained with span corruption, its "
                       "decoder's self- and cross-attention converted (the paper's own setting)", "llama",
                       choices=tuple(ARCHS))
    seed: int = option("seed of the data order, the initialisation and method random", 0)
    alpha: float = option("uptraining steps as a fraction of pre-training", 0.05)
    overwrite: bool = option("delete an earlier demo run in the output folder and start again", False)
    resume: bool = option("finish an interrupted run in the output folder, reusing its stages", False)
    threads: int = option(f"torch CPU threads (default {THREADS}: on a busy machine more threads cost several "
                          f"times the CPU time; on a quiet one, 2 are faster)", THREADS)

    def check(self) -> DemoOptions:
        if self.arch not in ARCHS:
            raise UptrainError(f"unknown {self.said('arch')}: the demo runs {', '.join(ARCHS)}")
        if self.threads < 1:
            raise UptrainError(f"{self.said('threads')}: give 1 or more torch threads")
        if not 0 < self.alpha <= 1:
            raise UptrainError(f"{self.said('alpha')}: a fraction of the pre-training steps, in (0, 1]")
        if self.overwrite and self.resume:
            raise UptrainError(f"{self.key('overwrite')} and {self.key('resume')} exclude each other: start again "
                               f"or finish the run, not both")
        return self
