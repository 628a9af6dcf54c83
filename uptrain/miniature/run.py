"""`demo()`: the stages in order, then the report."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from uptrain.miniature import stages
from uptrain.miniature.report import DemoResult, write_outputs
from uptrain.errors import UptrainError
from uptrain.miniature.sizes import ARCHS, THREADS, DemoSize
from uptrain.miniature.state import State, prepare_out


def demo(out: str = "demo-out", quick: bool = False, seed: int = 0, overwrite: bool = False, resume: bool = False,
         alpha: float = 0.05, progress: bool = True, size: DemoSize | None = None, arch: str = "llama",
         threads: int = THREADS) -> DemoResult:
    """Run the paper in miniature into `out` on a Llama or (arch="t5") a T5.1.1 pre-trained with span
    corruption; returns the paths of the report, JSON and plots. threads: torch CPU threads for the run."""
    t0, cpu0 = time.time(), time.process_time()
    if threads < 1:
        raise UptrainError(f"--threads {threads}: give 1 or more torch threads")
    if arch not in ARCHS:
        raise UptrainError(f"demo architecture {arch!r} is not one of {', '.join(ARCHS)}")
    a = ARCHS[arch]
    size = size or (a.quick if quick else a.full)
    if not progress:  # one line per stage only: silence transformers' own load/save bars too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    out_dir = Path(out)
    prepare_out(out_dir, overwrite, resume)
    settings = {"size": asdict(size), "seed": seed, "alpha": alpha}
    if a.seq2seq:  # (a Llama run's settings stay as they were, so earlier runs still resume)
        settings["arch"] = a.name
    run = stages.Run(out_dir, size, seed, alpha, progress, State(out_dir, settings), arch=a)
    torch.manual_seed(seed)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        stages.prepare_data(run)
        pre = stages.pretrain(run)
        vs = a.variants(size.heads)
        step0 = stages.convert_variants(run, pre["out"], vs)
        uptrained = stages.uptrain_variants(run, step0, vs)
        sweep = stages.alpha_sweep(run, step0)
        ev = stages.evaluate_all(run, step0, uptrained, vs)
    finally:
        torch.set_num_threads(before)

    result = write_outputs(run, vs, pre, uptrained, sweep, ev, t0, cpu0, threads)
    stages.say(f"done in {result.wall_time_s / 60:.1f} min ({result.cpu_time_s / 60:.1f} min of CPU time on "
               f"{threads} torch thread{'s' if threads > 1 else ''}): {result.report}")
    for f in result.findings:
        print(f"  - {f}")
    return result
