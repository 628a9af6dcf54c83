"""The demo folder and its DIR/state.json: every finished unit of work and its result, so `--resume`
redoes only what was not finished."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from uptrain.errors import UptrainError
from uptrain.files import write_json

STATE = "state.json"


class State:
    """DIR/state.json: finished units and their results, written atomically after each one."""

    def __init__(self, out: Path, settings: dict):
        self.path = out / STATE
        self.data = {"settings": settings, "done": {}}
        if self.path.is_file():
            old = json.loads(self.path.read_text())
            if old.get("settings") != settings:
                raise UptrainError(f"{out} holds a demo run with other settings ({old.get('settings')}); "
                                   f"use --overwrite to start again or another --out")
            self.data = old

    def get(self, unit: str):
        return self.data["done"].get(unit)

    def put(self, unit: str, value) -> None:
        self.data["done"][unit] = value
        write_json(self.path, self.data, indent=1)


def prepare_out(out: Path, overwrite: bool, resume: bool) -> None:
    """Create `out`, or check that it may be reused: --resume finishes a demo run, --overwrite deletes one;
    a folder that holds anything else is never deleted."""
    if out.exists() and not out.is_dir():
        raise UptrainError(f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()):
        is_demo = (out / STATE).is_file()
        if resume and is_demo:
            return
        if overwrite and is_demo:
            shutil.rmtree(out)
        elif overwrite:
            raise UptrainError(f"--out {out} is not empty and is not a demo folder; refusing to delete it. "
                               f"Choose another --out")
        elif resume:
            raise UptrainError(f"--out {out} is not empty and holds no demo run to resume; choose another --out")
        else:
            raise UptrainError(f"--out {out} already holds a demo run; pass --resume to finish it, --overwrite to "
                               f"start again, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
