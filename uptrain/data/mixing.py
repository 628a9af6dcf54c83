"""The token stream that training and held-out blocks are cut from. One corpus: its documents back to back, EOS
after each. A mixture read in memory: each source packed into blocks of its own, and the blocks drawn one at a
time, source by source with the mixture's probabilities (seeded), so that a weight is a share of the tokens.

Why blocks and not documents: a mixture drawn document by document gives each source a share of the documents,
and its share of the tokens follows its document length. The built-in corpora differ by 100× in that (a play is
~150k tokens, a conversation topic ~800), so the offline SmolLM2 recipe, drawn by document, trained on 69% plays
and 1.3% conversations, and its 16 held-out blocks were all one C file. A streamed mixture
(uptrain/training/data_stream.py) is still drawn by document: web pages and code files are of like length.

Stopping (MIXTURE_STOPPING): "all_exhausted" (training) starts a source that runs out again and ends once every
source has been read to its end; "all_exhausted_without_replacement" (held-out text) gives every block once.
"""
from __future__ import annotations

import random
from typing import Callable, Iterable, Iterator, Sequence

from uptrain.data.packing import tokenize_stream
from uptrain.data.sources import MIXTURE_STOPPING, DataSpec, as_source, mixture_probabilities
from uptrain.data.texts import iter_texts, load_texts


def block_tokens(spec: DataSpec, tokenizer, seq_len: int, part: str = "train", seed: int = 0) -> Iterator[int]:
    """Token ids of `part` of `spec`, to be cut into blocks of seq_len: a mixture read in memory comes block by
    block (whole blocks of one source each), anything else document by document (`iter_texts`)."""
    if not by_block(spec, part):
        return tokenize_stream(iter_texts(spec, part, seed), tokenizer)
    readers = [_source_blocks(as_source(s), tokenizer, seq_len, part) for s in spec.sources]
    blocks = draw_blocks(readers, mixture_probabilities(spec.sources), seed, MIXTURE_STOPPING[part])
    return (tok for block in blocks for tok in block)


def by_block(spec: DataSpec, part: str) -> bool:
    """Whether `part` of `spec` is a mixture drawn block by block: not streamed, not local held-out files, and
    not cut to its first documents (data.max_documents counts the mixture's documents, so it keeps them)."""
    return isinstance(spec, DataSpec) and bool(spec.sources) and not spec.streaming and not (
        part == "eval" and spec.eval_files) and not spec.max_documents


def _source_blocks(src, tokenizer, seq_len: int, part: str) -> Callable[[], Iterator[list[int]]]:
    """A function that reads one source's `part` from its start as blocks of seq_len (the tail dropped)."""
    def read() -> Iterator[list[int]]:
        buf: list[int] = []
        for tok in tokenize_stream(load_texts(src, part), tokenizer):
            buf.append(tok)
            if len(buf) == seq_len:
                yield buf
                buf = []
    return read


def draw_blocks(readers: Sequence[Callable[[], Iterable[list[int]]]], probabilities: list[float], seed: int,
                stopping: str) -> Iterator[list[int]]:
    """Blocks drawn from `readers` (each a function that reads one source from its start). `stopping`:
    "all_exhausted" (training): each draw picks a source with its probability (random.Random(seed)), restarts a
    source that runs out, and ends when every source has run out once. "all_exhausted_without_replacement"
    (held-out text): the sources take turns by weight, the next block from the source whose share is furthest
    behind, so that the first blocks (eval.max_blocks of them) hold every source in its share; a source that runs
    out is dropped. A source with no block is left out."""
    if stopping not in ("all_exhausted", "all_exhausted_without_replacement"):
        raise ValueError(stopping)
    rng = random.Random(seed)
    live = {i: iter(r()) for i, r in enumerate(readers)}
    exhausted: set[int] = set()
    drawn = [0] * len(readers)
    while live:
        if stopping == "all_exhausted":
            i = rng.choices(list(live), weights=[probabilities[j] for j in live])[0]
        else:
            i = min(live, key=lambda j: ((drawn[j] + 0.5) / probabilities[j], j))
        block = next(live[i], None)
        if block is None:
            exhausted.add(i)
            if len(exhausted) == len(readers):
                return
            fresh = iter(readers[i]()) if stopping == "all_exhausted" else iter(())
            block = next(fresh, None)
            if block is None:  # read to its end without replacement, or no block at all
                del live[i]
                continue
            live[i] = fresh
        drawn[i] += 1
        yield block
