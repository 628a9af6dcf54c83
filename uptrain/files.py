"""Atomic writes: a file or a folder is either complete or absent, never half-written. Every writer of
the project (records, recipes, reports, plots, token caches, converted checkpoints) goes through here, and
so does the check, before hours of work, that what it will write can be written."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from uptrain.errors import UptrainError


def atomic_write(path, content: str | bytes | Callable[[str], None]) -> str:
    """Write `content` (text, bytes, or a function that writes the file at the path it is given) through
    a temporary file in the same folder, then rename it into place. Returns the path."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    try:
        if callable(content):
            os.close(fd)
            content(tmp)
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs should have normal file permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


def write_json(path, obj, indent: int | None = 2, strict: bool = False) -> str:
    """JSON with numpy / torch scalars as numbers and anything else unknown as its str(). strict: RFC 8259 JSON,
    a ValueError (before anything is written) on a NaN or an infinity, which Python writes as bare NaN / Infinity
    and strict parsers (browsers, jq, the Hub's viewers) reject."""
    return atomic_write(path, json.dumps(obj, indent=indent, default=_json_default, allow_nan=not strict) + "\n")


def _json_default(x):
    if hasattr(x, "item"):  # numpy / torch scalars
        return x.item()
    return str(x)


class AtomicFolder:
    """Write into a hidden temporary folder beside `out`; rename into place only on success, delete on
    failure. An existing `out` (with overwrite) is replaced only after the new one is complete."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.tmp = self.out.parent / f".{self.out.name}.tmp-{os.getpid()}"

    def __enter__(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if self.out.exists():
            old = self.out.parent / f".{self.out.name}.old-{os.getpid()}"
            os.replace(self.out, old)
            os.replace(self.tmp, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.out)
        return False


# ------------------------------------------------------------------ checked before the work starts
def check_file_writable(path) -> None:
    """Raise now, not after the models ran, if the file `path` (a report, a plot) cannot be written later."""
    folder = os.path.dirname(os.path.abspath(os.fspath(path)))
    if not os.path.isdir(folder):
        raise UptrainError(f"cannot write {os.fspath(path)!r}: folder {folder!r} does not exist")
    if os.path.isdir(path):
        raise UptrainError(f"cannot write {os.fspath(path)!r}: it is a folder")


def check_folder_writable(out, key: str = "out") -> None:
    """The folder `out`, or the nearest folder above it that exists, takes a new file (a probe, created and
    removed). `key`: how the caller names it (a recipe's out)."""
    probe = Path(out).absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UptrainError(f"{key} {str(out)!r} cannot be created: {probe} is a file, not a folder")
    try:
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".uptrain-write-probe-")
        os.close(fd)
        os.remove(tmp)
    except OSError as e:
        raise UptrainError(f"{key} {str(out)!r} cannot be written ({probe}: {e.strerror or e}); choose a folder "
                           f"you can write to") from e
