"""Work in progress beside the output: what a calibration has finished, so that a rerun of the same command
continues from it.

`OUT.partial/` holds, per finished unit (a converted layer, a measured layer), its tensors (one safetensors file
a key, each written to a temporary name and renamed: a file is complete or absent), the state carried to the next
unit, and `progress.json` (also renamed into place, last): what the work was computed from (the fingerprint: the
source checkpoint, the options that shape the result, the calibration tokens) and how far it got. A rerun with the
same fingerprint resumes after the last unit that progress.json names; another fingerprint starts afresh and
says what changed. Nothing is ever written inside OUT (the converter renames the finished result into place), and
the folder is removed when the result is written.
"""
from __future__ import annotations

import errno
import hashlib
import json
import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors.torch import load_file, save_file

from uptrain.checkpoint import fingerprint as source_fingerprint
from uptrain.errors import UptrainError
from uptrain.files import atomic_write

PROGRESS = "progress.json"
# options that do not change what calibration computes (where the result goes, how it is sharded, what is said)
NOT_IN_FINGERPRINT = ("max_shard_size", "allow_pickle", "overwrite", "quiet", "revision")


def tokens_digest(blocks: torch.Tensor, kinds: Sequence[str] | None = None) -> str:
    """A hash of the calibration token blocks and their kinds of text (what the pass reads, and what its fits are
    held out and judged by: another text, tokenizer or mix is another run)."""
    digest = hashlib.sha256(blocks.to(torch.int64).contiguous().numpy().tobytes())
    if kinds is not None:
        digest.update(json.dumps(list(kinds)).encode())
    return "sha256:" + digest.hexdigest()


def work_fingerprint(ctx: Any, options: Any, blocks: torch.Tensor, kinds: Sequence[str] | None,
                     **extra: Any) -> dict[str, Any]:
    """What a calibration's result depends on: the source checkpoint, the options that shape it, the calibration
    tokens and their kinds, torch's version (another build may round differently)."""
    chosen = {k: v for k, v in options.recorded().items() if k not in NOT_IN_FINGERPRINT}
    return {"source": source_fingerprint(ctx.src_dir, ctx.source), "options": {**chosen, **extra},
            "calibration": tokens_digest(blocks, kinds), "torch": torch.__version__}


def what_changed(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The difference of two fingerprints in words."""
    if old.get("source") != new.get("source"):
        return "another source checkpoint"
    o, n = old.get("options") or {}, new.get("options") or {}
    changed = [f"{k} {o.get(k)!r} → {n.get(k)!r}" for k in sorted(set(o) | set(n)) if o.get(k) != n.get(k)]
    if changed:
        return "other options (" + ", ".join(changed) + ")"
    if old.get("calibration") != new.get("calibration"):
        return "other calibration text"
    rest = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return "a different " + ", ".join(rest) if rest else "the same inputs"


class WorkFolder:
    """Keys → safetensors files, plus a JSON state; `resumed`: the state found from an earlier run of the same
    fingerprint ({} when starting afresh)."""

    def __init__(self, path: Path, fingerprint: dict[str, Any] | None, disposable: bool = False):
        self.path, self.fingerprint, self.disposable = path, fingerprint, disposable
        self.state: dict[str, Any] = {}
        self.resumed: dict[str, Any] = {}
        self._remove = weakref.finalize(self, shutil.rmtree, path, ignore_errors=True) if disposable else None

    @classmethod
    def beside(cls, out: Path | None, fingerprint: dict[str, Any], say: Callable[[str], None]) -> WorkFolder:
        """The work folder of the conversion to `out` (OUT.partial): resumed when its fingerprint is this one,
        else emptied (saying why). Without `out` (a caller that writes nowhere), a temporary folder."""
        if out is None:
            return cls.temporary(None)
        out = Path(out)
        path = out.parent / f"{out.name}.partial"
        work = cls(path, fingerprint)
        if path.exists():
            try:
                found = json.loads((path / PROGRESS).read_text())
            except (OSError, ValueError):
                found = None
            if found is not None and found.get("fingerprint") == fingerprint:
                work.state = work.resumed = found.get("state") or {}
                return work
            why = what_changed(found["fingerprint"], fingerprint) if found else "no record of what it holds"
            say(f"starting afresh: {path} holds unfinished work on {why}")
            shutil.rmtree(path)
        path.mkdir(parents=True)
        work.save()
        return work

    @classmethod
    def temporary(cls, near: Path | None) -> WorkFolder:
        """A folder that is not resumed (removed at the latest when the object goes), beside `near` if given."""
        parent = Path(near).parent if near is not None else None
        if parent is not None:
            parent.mkdir(parents=True, exist_ok=True)
        return cls(Path(tempfile.mkdtemp(prefix=".uptrain-calibration-", dir=parent)), None, disposable=True)

    # -- the state ------------------------------------------------------------------------------------
    def save(self, **updates: Any) -> None:
        """Update the state and write progress.json (atomically: a kill leaves the last complete one)."""
        self.state.update(updates)
        text = json.dumps({"fingerprint": self.fingerprint, "state": self.state}, indent=1, default=float) + "\n"
        self._guard(lambda: atomic_write(self.path / PROGRESS, text))

    # -- tensors --------------------------------------------------------------------------------------
    def put(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
        self._guard(lambda: atomic_write(self._file(key), lambda tmp: save_file(tensors, tmp)))

    def get(self, key: str) -> dict[str, torch.Tensor]:
        return load_file(self._file(key))

    def has(self, key: str) -> bool:
        return self._file(key).exists()

    def drop(self, key: str) -> None:
        self._file(key).unlink(missing_ok=True)

    def drop_all(self, prefix: str) -> None:
        for f in self.path.glob(f"{prefix}*.safetensors"):
            f.unlink()

    def remove(self) -> None:
        """The result is written: the work in progress goes."""
        shutil.rmtree(self.path, ignore_errors=True)
        if self._remove is not None:
            self._remove.detach()

    def _file(self, key: str) -> Path:
        return self.path / f"{key}.safetensors"

    def _guard(self, write: Callable[[], Any]) -> None:
        """A full disk is the user's to fix, and nothing finished is lost: say so, keep what is there."""
        try:
            write()
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise UptrainError(f"no space left on the disk of {self.path} (work in progress of the calibration): "
                               f"free space and run the same command again; it resumes after the last finished "
                               f"layer") from None
