"""Streamed training data, read per rank: every rank reads its own part of a `datasets` stream
(`split_dataset_by_node`), tokenises it in DataLoader workers (in the training process with data.workers 0)
and packs it into blocks itself. No rank waits for another's preprocessing and nothing is read ahead of the
steps, so a run starts training within seconds whatever its budget.

Who reads what: rank r's part is cut again into `readers` = max(1, data.workers) parts, reader j reading part
r·readers + j of world·readers, so the data order depends on (world, readers), not on timing. A reader packs
its documents back to back (EOS after each) into blocks of seq_len and hands out micro-batches of them; the
DataLoader takes micro-batches from its workers in turn (reader 0, 1, …, 0, 1, …).

Exact resume. Each micro-batch carries its reader's position after it:

    {"epoch": e, "read": datasets state_dict() before the last batch of documents read (None: from the
     start of epoch e), "doc": documents of that batch already packed, "offset": tokens of the next one packed}

Re-reading one batch of DOCS_PER_READ documents on resume costs less than saving the packer's leftover tokens,
which can be most of a book. The loader keeps every reader's latest position and whose turn is next; a
checkpoint stores that per rank (run_folder.DATA_STATE) and a resumed loader starts each reader there, the
reader whose turn it was first. A reader that reaches the end of its part starts the next epoch (datasets'
`set_epoch`: shard order reshuffled where there are shards to shuffle).
"""
from __future__ import annotations

import os

import torch

from uptrain.errors import UptrainError

DOCS_PER_READ = 16  # documents per read and per tokeniser call; on resume one such batch is read again


class PackedStream(torch.utils.data.IterableDataset):
    """This rank's micro-batches: {"input_ids": LongTensor [micro_batch, seq_len], "reader": j, "position": …}
    forever (a reader at the end of its part starts another epoch)."""

    def __init__(self, spec, tokenizer, seq_len: int, micro_batch: int, rank: int, world: int, workers: int,
                 seed: int):
        from uptrain.data import text_stream

        if tokenizer.eos_token_id is None:
            raise UptrainError("the tokenizer has no EOS token; packing needs one between documents")
        self.texts = text_stream(spec, "train", seed)  # checks files and columns now; reads nothing yet
        self.source = spec.source if not spec.sources else "the mixture"
        self.tokenizer, self.eos = tokenizer, tokenizer.eos_token_id
        self.seq_len, self.micro_batch = seq_len, micro_batch
        self.rank, self.world, self.workers = rank, world, workers
        self.readers = max(1, workers)
        self.start = {"turn": 0, "positions": [None] * self.readers}  # set by StreamLoader before iterating

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        if info is not None:  # a forked worker: fsspec's lock belongs to the parent's event loop (as datasets does)
            import fsspec.asyn

            fsspec.asyn.reset_lock()
        reader = ((info.id if info else 0) + self.start["turn"]) % self.readers
        blocks = self.blocks(reader, self.start["positions"][reader])
        while True:
            batch, position = [], None
            for _ in range(self.micro_batch):
                block, position = next(blocks)
                batch.append(block)
            yield {"input_ids": torch.tensor(batch, dtype=torch.long), "reader": reader, "position": position}

    def blocks(self, reader: int, position: dict | None):
        """(block of seq_len token ids, the position after it) of `reader`'s part, from `position` on."""
        from datasets.distributed import split_dataset_by_node

        part = split_dataset_by_node(self.texts, self.rank * self.readers + reader, self.world * self.readers)
        p = position or {"epoch": 0, "read": None, "doc": 0, "offset": 0}
        epoch, read, skip_docs, skip_tokens = p["epoch"], p["read"], p["doc"], p["offset"]
        n = self.seq_len
        buf: list[int] = []
        while True:
            part.set_epoch(epoch)
            fresh, documents = read is None, 0
            if read is not None:
                part.load_state_dict(read)
            for batch in part.iter(batch_size=DOCS_PER_READ):
                docs = self.tokenizer(self.text_of(batch), add_special_tokens=False)["input_ids"]
                documents += len(docs)
                for d in range(skip_docs, len(docs)):
                    tokens, at = docs[d] + [self.eos], skip_tokens
                    skip_tokens = 0
                    while at < len(tokens):
                        take = min(n - len(buf), len(tokens) - at)
                        buf.extend(tokens[at:at + take])
                        at += take
                        if len(buf) == n:
                            done = at == len(tokens)  # the document ends with this block: resume at the next
                            yield buf, {"epoch": epoch, "read": read, "doc": d + done, "offset": 0 if done else at}
                            buf = []
                skip_docs = 0
                read = part.state_dict()
            if fresh and documents == 0:
                raise UptrainError(
                    f"rank {self.rank}'s data reader {reader} got no documents from {self.source}: the "
                    f"{self.world} rank(s) × {self.readers} reader(s) (data.workers) share fewer documents (or "
                    f"shards) than that; lower data.workers or give more data")
            epoch, read = epoch + 1, None

    def text_of(self, batch: dict) -> list[str]:
        if "text" not in batch:  # a Hub stream whose columns were unknown until read
            raise UptrainError(f"the data has no text column (columns: {list(batch)}); set data.text_column")
        return batch["text"]


def _as_is(item):
    return item


class StreamLoader:
    """The DataLoader over a PackedStream, and where this rank's data stands after the micro-batches it has
    handed out (`state_dict`, what a checkpoint keeps; `load_state_dict` before iterating resumes there)."""

    def __init__(self, stream: PackedStream, pin_memory: bool = False):
        self.stream, self.pin_memory = stream, pin_memory
        self.turn, self.positions = 0, [None] * stream.readers

    def __iter__(self):
        from torch.utils.data import DataLoader

        s = self.stream
        s.start = {"turn": self.turn, "positions": list(self.positions)}
        if s.workers:
            # the tokenizer's own threads would be switched off in each forked worker anyway, with a warning
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        loader = DataLoader(s, batch_size=None, num_workers=s.workers, collate_fn=_as_is, pin_memory=self.pin_memory)
        for item in loader:
            self.positions[item["reader"]] = item["position"]
            self.turn = (item["reader"] + 1) % s.readers
            yield item["input_ids"]

    def state_dict(self) -> dict:
        s = self.stream
        return {"rank": s.rank, "world": s.world, "readers": s.readers, "turn": self.turn,
                "positions": self.positions}

    def load_state_dict(self, state: dict, where: str = "the checkpoint") -> None:
        s = self.stream
        saved = (state.get("rank"), state.get("world"), state.get("readers"))
        if saved != (s.rank, s.world, s.readers):
            raise UptrainError(f"{where} holds the data position of rank {saved[0]} of {saved[1]} with {saved[2]} "
                               f"reader(s) per rank; this is rank {s.rank} of {s.world} with {s.readers} "
                               f"(data.workers): resume with the same processes and data.workers")
        self.turn, self.positions = state["turn"], list(state["positions"])
