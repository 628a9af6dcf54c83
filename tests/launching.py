"""Real multi-process runs of `uptrain train` for the tests: `accelerate launch` with 2 CPU ranks over gloo
(recipes/accelerate/cpu.yaml: `--cpu --num_processes 2` would silently run one), one torch thread per rank,
the checkout on PYTHONPATH so the ranks import the uptrain under test."""
from __future__ import annotations

import os
import subprocess
import sys

from repo_paths import REPO
ACCELERATE = os.path.join(REPO, "recipes", "accelerate")


def launch_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}


def launch_cmd(recipe_file, *overrides, config: str = "cpu.yaml", flags: tuple = ()) -> list[str]:
    """`accelerate launch --config_file recipes/accelerate/CONFIG [FLAGS] -m uptrain train RECIPE [OVERRIDES]`."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", os.path.join(ACCELERATE, config),
            *flags, "--main_process_port", "0", "-m", "uptrain", "train", str(recipe_file), *overrides]


def launch(recipe_file, *overrides, config: str = "cpu.yaml", flags: tuple = (), timeout: int = 600,
           cwd=None) -> subprocess.CompletedProcess:
    """Run the launch to the end; it must succeed."""
    p = subprocess.run(launch_cmd(recipe_file, *overrides, config=config, flags=flags), env=launch_env(),
                       capture_output=True, text=True, timeout=timeout, cwd=cwd)
    assert p.returncode == 0, p.stderr[-4000:]
    return p
