"""`demo()`: the stages in order, then the report."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from uptrain.miniature import stages
from uptrain.miniature.report import DemoResult, write_outputs
from uptrain.miniature.sizes import FULL, QUICK, DemoSize, variants
from uptrain.miniature.state import State, prepare_out


def demo(out: str = "demo-out", quick: bool = False, seed: int = 0, overwrite: bool = False, resume: bool = False,
         alpha: float = 0.05, progress: bool = True, size: DemoSize | None = None) -> DemoResult:
    """Run the paper in miniature into `out`; returns the paths of the report, JSON and plots."""
    t0 = time.time()
    size = size or (QUICK if quick else FULL)
    if not progress:  # one line per stage only: silence transformers' own load/save bars too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    out_dir = Path(out)
    prepare_out(out_dir, overwrite, resume)
    run = stages.Run(out_dir, size, seed, alpha, progress,
                     State(out_dir, {"size": asdict(size), "seed": seed, "alpha": alpha}))
    torch.manual_seed(seed)

    stages.prepare_data(run)
    pre = stages.pretrain(run)
    vs = variants(size.heads)
    step0 = stages.convert_variants(run, pre["out"], vs)
    uptrained = stages.uptrain_variants(run, step0, vs)
    sweep = stages.alpha_sweep(run, step0)
    ev = stages.evaluate_all(run, step0, uptrained, vs)

    result = write_outputs(run, vs, pre, uptrained, sweep, ev, t0)
    stages.say(f"done in {result.wall_time_s / 60:.1f} min: {result.report}")
    for f in result.findings:
        print(f"  - {f}")
    return result
