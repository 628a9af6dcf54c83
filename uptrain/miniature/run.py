"""`demo()`: the stages in order, then the report."""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import torch

from uptrain.miniature import stages
from uptrain.miniature.report import DemoResult, write_outputs
from uptrain.errors import UptrainError
from uptrain.miniature.options import DemoOptions
from uptrain.miniature.sizes import ARCHS, DemoSize
from uptrain.miniature.state import State, prepare_out


def demo(out: str | None = None, *, options: DemoOptions | None = None, progress: bool = True,
         size: DemoSize | None = None, **kwargs) -> DemoResult:
    """Run the paper in miniature into `out` on a Llama or (arch="t5") a T5.1.1 pre-trained with span
    corruption; returns the paths of the report, JSON and plots.

    Options are the fields of DemoOptions (uptrain/miniature/options.py: out, quick, arch, seed, alpha, overwrite,
    resume, threads), given as keyword arguments or as one `options=` object, never both; they are the flags of
    `uptrain demo`. size: a DemoSize instead of the arch's full or quick one (tests)."""
    t0, cpu0 = time.time(), time.process_time()
    if options is not None and (kwargs or out is not None):
        raise UptrainError("demo() takes options= or keyword options, not both")
    o = (options or DemoOptions.from_kwargs("python", out=out, **kwargs)).check()
    arch, quick, seed, alpha, threads = o.arch, o.quick, o.seed, o.alpha, o.threads
    a = ARCHS[arch]
    size = size or (a.quick if quick else a.full)
    if not progress:  # one line per stage only: silence transformers' own load/save bars too
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    out_dir = Path(o.out)
    prepare_out(out_dir, o.overwrite, o.resume, o)
    settings = {"size": asdict(size), "seed": seed, "alpha": alpha}
    if a.seq2seq:  # (a Llama run's settings stay as they were, so earlier runs still resume)
        settings["arch"] = a.name
    run = stages.Run(out_dir, size, seed, alpha, progress, State(out_dir, settings, o), arch=a)
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
