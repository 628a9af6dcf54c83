"""The demo folder and its DIR/state.json: every finished unit of work and its result, so `--resume`
redoes only what was not finished."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from uptrain.errors import UptrainError
from uptrain.files import write_json
from uptrain.miniature.options import DemoOptions

STATE = "state.json"


class State:
    """DIR/state.json: finished units and their results, written atomically after each one."""

    def __init__(self, out: Path, settings: dict, said: DemoOptions | None = None):
        said = said or DemoOptions()
        self.path = out / STATE
        self.data = {"settings": settings, "done": {}}
        if self.path.is_file():
            old = json.loads(self.path.read_text())
            if old.get("settings") != settings:
                raise UptrainError(f"{out} holds a demo run with other settings ({old.get('settings')}); "
                                   f"use {said.said('overwrite', True)} to start again or another {said.key('out')}")
            self.data = old

    def get(self, unit: str):
        return self.data["done"].get(unit)

    def put(self, unit: str, value) -> None:
        self.data["done"][unit] = value
        write_json(self.path, self.data, indent=1)


def prepare_out(out: Path, overwrite: bool, resume: bool, said: DemoOptions | None = None) -> None:
    """Create `out`, or check that it may be reused: resume finishes a demo run, overwrite deletes one; a folder
    that holds anything else is never deleted. said: the caller's options, for the words of a message."""
    o = said or DemoOptions()
    flag, again, finish = o.said("out", str(out)), o.said("overwrite", True), o.said("resume", True)
    if out.exists() and not out.is_dir():
        raise UptrainError(f"{flag} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()):
        is_demo = (out / STATE).is_file()
        if resume and is_demo:
            return
        if overwrite and is_demo:
            shutil.rmtree(out)
        elif overwrite or not (resume or is_demo):
            raise UptrainError(f"{flag} is not empty and is not a demo folder; refusing to delete it. "
                               f"Choose another {o.key('out')}")
        elif resume:
            raise UptrainError(f"{flag} is not empty and holds no demo run to resume; choose another {o.key('out')}")
        else:
            raise UptrainError(f"{flag} already holds a demo run; pass {finish} to finish it, {again} to "
                               f"start again, or choose another {o.key('out')}")
    out.mkdir(parents=True, exist_ok=True)
