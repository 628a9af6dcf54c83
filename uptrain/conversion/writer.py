"""Execute a conversion plan: output shards planned from dtypes and shapes, then written tensor by tensor —
unchanged tensors as raw bytes, merged ones through the method — plus the shard index.

Two threads: the calling thread writes the shards (unchanged tensors with copy_file_range, which releases
the GIL), while a helper thread imports torch if needed, then reads, merges and casts the merged tensors in
write order into a small bounded queue (torch ops and file reads release the GIL too). Every tensor has
a known offset in its shard (all shard files are opened, headers written, up front), so the helper writes
each merged tensor in place itself (os.pwrite; elsewhere the writer does, as soon as it is ready) and the
writer never waits in the middle of a shard: merging overlaps copying. Memory stays bounded: the helper is at
most `MERGE_AHEAD` finished tensors ahead of the writer."""
from __future__ import annotations

import json
import os
import queue
import threading
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from uptrain.checkpoint import SAFE_INDEX, plan_shards, shard_header, tensor_bytes, write_all

if TYPE_CHECKING:
    import torch

MERGE_AHEAD = 4  # finished merged tensors the helper thread may hold before the writer takes them
WRITTEN = object()  # a merged tensor the helper has already written into its shard (os.pwrite)


def pwrite_all(fd: int, data, offset: int) -> None:
    """os.pwrite may be partial: loop until every byte is out. Leaves the file position alone."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class _MergeAhead:
    """Runs `produce(name)` for `names` in order on a helper thread; `take(name)` returns the results in the
    same order. An exception in the helper is raised by the `take` that would have received its result."""

    def __init__(self, names: list[str], produce):
        self._queue: queue.Queue = queue.Queue(maxsize=MERGE_AHEAD)
        self._stop = threading.Event()
        self._waiting = threading.Event()  # the writer has nothing left to copy and waits for merges
        self._thread = threading.Thread(target=self._run, args=(names, produce), name="uptrain-merge", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def _run(self, names, produce) -> None:
        threads = None
        try:
            # torch is imported here if nobody has yet (~1 s): meanwhile the writer copies bytes.
            import torch

            # One torch thread here: the writer's byte copies need the other core, and idle OpenMP
            # workers spin. (Pooling results do not depend on the thread count; tests check it.)
            # Once the writer waits (nothing left to copy), all threads again.
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            for name in names:
                if self._waiting.is_set() and torch.get_num_threads() != threads:
                    torch.set_num_threads(threads)
                if not self._put((name, produce(name), None)):
                    return
        except BaseException as e:  # handed to the writer, which raises it
            self._put((None, None, e))
        finally:
            if threads is not None:
                torch.set_num_threads(threads)

    def ready(self) -> bool:
        """Whether `take` would return (or raise) without waiting."""
        return not self._queue.empty()

    def take(self, name: str, last_copy_done: bool = False):
        """The next result, which must be `name`'s. `last_copy_done`: the writer has nothing left to copy,
        so the helper may use every core."""
        if last_copy_done:
            self._waiting.set()
        got, data, error = self._queue.get()
        if error is not None:
            raise error
        if got != name:  # a bug guard: the helper must follow the writer's order
            raise RuntimeError(f"merge order mismatch: expected {name}, got {got}")
        return data

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


class _Scratch:
    """Reused buffers for the helper thread's reads and float32 copies of one tensor at a time (methods
    that merge tensors one by one only). Fresh memory for every 64 MB tensor costs page faults, which
    at 7B size cost as much as the pooling itself."""

    def __init__(self):
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, key: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        import torch

        b = self._bufs.get(key)
        if b is None or b.numel() < numel:
            b = self._bufs[key] = torch.empty(numel, dtype=dtype)
        return b[:numel]

    def holds(self, t: torch.Tensor) -> bool:
        ptr = t.untyped_storage().data_ptr()
        return any(ptr == b.untyped_storage().data_ptr() for b in self._bufs.values())


def write_converted(folder: Path, plan: dict, source, merger, ctx, max_shard_size, progress: bool = True):
    """Write the weights of `plan` into `folder`. Returns (bytes written, number of shards, per-layer stats).

    Every shard's header is known up front: all shard files are opened (and their headers written) before the
    first byte is copied, so that the helper thread can write the merged tensors into any of them."""
    from tqdm.auto import tqdm

    out_tensors = {n: (step.dtype, step.shape) for n, step in plan.items()}
    shards, total = plan_shards(out_tensors, max_shard_size)
    headers = {fname: shard_header(names, out_tensors) for fname, names in shards.items()}
    files: dict[str, BinaryIO] = {}
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"convert → {ctx.groups_text} KV heads",
               disable=not progress)
    ahead, written = None, 0
    try:
        places = _open_shards(folder, shards, headers, plan, files)
        merging = _Merging(plan, source, merger, ctx, places if hasattr(os, "pwrite") else None)
        ahead = _MergeAhead([n for names in shards.values() for n in names if plan[n].action != "copy"],
                            merging.output)
        for i, (fname, names) in enumerate(shards.items()):
            written += _write_shard(files[fname], headers[fname], names, plan, source, ahead, bar,
                                    last=i == len(shards) - 1)
    finally:
        if ahead is not None:
            ahead.close()
        for f in files.values():
            f.close()
        bar.close()
    if len(shards) > 1:
        _write_index(folder, shards, written)
    return written, len(shards), merging.layer_stats()


def _open_shards(folder: Path, shards: dict, headers: dict, plan: dict, files: dict) -> dict[str, tuple[int, int, int]]:
    """Open every shard file into `files` (the caller closes them) and write its header. Returns where each
    tensor that is not copied goes: name → (fd, absolute offset, bytes)."""
    places = {}
    for fname, names in shards.items():
        f = files[fname] = open(folder / fname, "wb", buffering=0)
        prefix, header, _ = headers[fname]
        write_all(f, prefix)
        for n in names:
            if plan[n].action != "copy":
                a, b = header[n]["data_offsets"]
                places[n] = (f.fileno(), len(prefix) + a, b - a)
    return places


class _Merging:
    """The helper thread's work: the output bytes of every tensor that is not copied, merged through the method
    (in canonical form, arch.Storage) or restored to the result's storage. With `places` (os.pwrite), it writes
    them at their offsets itself: its thread's time is the conversion's time."""

    def __init__(self, plan: dict, source, merger, ctx, places: dict | None):
        self.plan, self.source, self.merger, self.ctx, self.places = plan, source, merger, ctx, places
        self.layer_names: dict = {}  # layer → its merged tensors (a layerwise method merges them together)
        # tensor_plan.Step.members → the result tensors of that family
        self.families: dict[tuple[str, ...], list[str]] = {}
        for n, step in plan.items():
            if step.action == "merge":
                self.layer_names.setdefault(step.layer, []).append(n)
            if step.members:
                self.families.setdefault(step.members, []).append(n)
        self.cache: dict[str, torch.Tensor] = {}  # outputs merged together with an earlier tensor, not yet taken
        self.stats: dict = {}
        self.scratch = _Scratch() if not merger.layerwise and getattr(source, "reads_into", False) else None

    def output(self, name: str):
        """The output bytes of `name` (or WRITTEN, once written at its place)."""
        from uptrain.checkpoint import DTYPES

        step = self.plan[name]
        if name not in self.cache:
            if step.action == "restore":  # stored otherwise by the result (tensor_plan.Step): no method involved
                self.cache[name] = step.write.stored(step.read.canonical(self.source.read(name)), step.shape)
            elif step.members:  # one tensor per KV head: pooled as their concatenation
                self._merge_family(step)
            else:
                self._merge_layer(name, step.layer)
        t = self.cache.pop(name).to(DTYPES[step.dtype])
        if tuple(t.shape) != step.shape:
            raise RuntimeError(f"method {self.merger.name} produced {tuple(t.shape)} for {name}, planned {step.shape}")
        data = tensor_bytes(t)
        if self.places is None:
            return data
        fd, start, nbytes = self.places[name]
        if data.nbytes != nbytes:  # a bug guard: a wrong size must never produce a silently bad file
            raise RuntimeError(f"{name}: wrote {data.nbytes} bytes, planned {nbytes}")
        pwrite_all(fd, data, start)
        return WRITTEN

    def _merge_family(self, step) -> None:
        import torch

        here = self.ctx.at(step.layer)
        cat = torch.cat([self.source.read(m).float() for m in step.members])
        pooled = self.merger.merge(step.layer, {step.suffix: cat}, here)[step.suffix]
        rows = pooled.shape[0] // here.groups
        for n in self.families[step.members]:
            part = self.plan[n].part
            self.cache[n] = pooled[part * rows: (part + 1) * rows].clone()

    def _merge_layer(self, name: str, layer) -> None:
        names = self.layer_names[layer] if self.merger.layerwise else [name]
        # methods see the canonical form (arch.Storage); the result's storage is restored below
        inputs = {self.plan[n].suffix: self.plan[n].read.canonical(self._read_float(n)) for n in names}
        here = self.ctx.at(layer)  # its own G_l when the result has per-layer KV heads
        outputs = self.merger.merge(layer, inputs, here)
        at = {"block": layer[0], "layer": layer[1]} if isinstance(layer, tuple) else {"layer": layer}
        self.stats.setdefault(layer, at).update(self.merger.stats(layer, inputs, outputs, here))
        for n in names:
            step = self.plan[n]
            out = step.write.stored(outputs[step.suffix], step.shape)
            # an output sharing memory with an input in the scratch buffers would be overwritten by the next
            # read: keep a copy
            self.cache[n] = out.clone() if self.scratch is not None and self.scratch.holds(out) else out

    def _read_float(self, n: str) -> torch.Tensor:
        import torch

        if self.scratch is None:
            return self.source.read(n).float()
        e = self.source.entries[n]
        raw = self.source.read(n, out=self.scratch.get("raw", e.nbytes, torch.uint8))
        if raw.dtype == torch.float32:  # as .float() would: the same memory (outputs are checked in output())
            return raw
        return self.scratch.get("f32", raw.numel(), torch.float32).view(raw.shape).copy_(raw)

    def layer_stats(self) -> list[dict]:
        return [self.stats[k] for k in sorted(self.stats)]


def _write_shard(f, shard: tuple, names: list[str], plan: dict, source, ahead: _MergeAhead, bar, last: bool) -> int:
    """One shard, header known up front. Each tensor goes to its own offset, so the writer need not wait for a
    merge: it copies the unchanged tensors in order while the helper writes each merged one (or hands it over to
    be written) as soon as it has it; the writer waits for a merge at the latest at the end of the shard."""
    prefix, header, size = shard
    pending = [n for n in names if plan[n].action != "copy"]  # the helper's order

    def put(name: str, data) -> None:
        a, b = header[name]["data_offsets"]
        if data is not WRITTEN:
            f.seek(len(prefix) + a)
            if data is None:
                source.copy_bytes(name, f)
            else:
                write_all(f, data)
            if f.tell() != len(prefix) + b:  # a bug guard: a wrong shape must never produce a silently bad file
                raise RuntimeError(f"{name}: wrote {f.tell() - len(prefix) - a} bytes, planned {b - a}")
        bar.update(b - a)

    for name in names:
        if plan[name].action == "copy":
            put(name, None)
        while pending and ahead.ready():
            put(pending[0], ahead.take(pending[0]))
            pending.pop(0)
    for name in pending:
        put(name, ahead.take(name, last_copy_done=last))
    return size


def _write_index(folder: Path, shards: dict, total_size: int) -> None:
    index = {"metadata": {"total_size": total_size},
             "weight_map": {n: f for f, names in shards.items() for n in names}}
    (folder / SAFE_INDEX).write_text(json.dumps(index, indent=2) + "\n")
