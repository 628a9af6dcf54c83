"""Token ids in fixed-length blocks: documents concatenated with EOS between them (`pack_blocks`; `pack_tokens`
for a token stream already made), and the causal-LM targets of packed blocks (`causal_lm_targets`: concatenated
or document-aware)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Iterator

from uptrain.errors import UptrainError

if TYPE_CHECKING:  # torch is imported where it is used: recipe parsing must not pay for it
    import torch


def tokenize_stream(texts: Iterable[str], tokenizer) -> Iterator[int]:
    """Token ids of all documents, EOS after each one."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UptrainError("the tokenizer has no EOS token; packing needs one between documents")
    for text in texts:
        yield from tokenizer(text, add_special_tokens=False)["input_ids"]
        yield eos


def pack_blocks(texts: Iterable[str], tokenizer, seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """Concatenate documents (EOS between them) and cut into full blocks: LongTensor [n_blocks, seq_len].
    The tail shorter than a block is dropped."""
    return pack_tokens(tokenize_stream(texts, tokenizer), seq_len, max_blocks)


def pack_tokens(tokens: Iterable[int], seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """Token ids cut into full blocks (at most max_blocks): LongTensor [n_blocks, seq_len]. The tail shorter
    than a block is dropped."""
    ids: list[int] = []
    limit = None if max_blocks is None else max_blocks * seq_len
    for tok in tokens:
        ids.append(tok)
        if limit is not None and len(ids) >= limit:
            break
    import torch

    n = len(ids) // seq_len
    if n == 0:
        raise UptrainError(f"the data yields {len(ids)} tokens, fewer than one block of seq_len={seq_len}; "
                           f"give more text or a smaller seq_len")
    return torch.tensor(ids[: n * seq_len], dtype=torch.long).view(n, seq_len)



def causal_lm_targets(ids, eos_id: int | None, packing: str = "concat"):
    """(labels, position_ids) for next-token prediction over token blocks `ids` [b, l] in which documents end
    with EOS. Position t's label is token t+1; the last position has none (-100).

    concat: documents attend to the ones before them in the block; position_ids None (the model's 0…l-1).
    document: position ids restart at 0 after each EOS, which transformers' attention reads as a document
    boundary (masking_utils.find_packed_sequence_indices: with no attention_mask and no cache, i.e.
    use_cache=False, a position that is not the previous one + 1 starts a new sequence; flash-attention derives
    cu_seqlens the same way), and an EOS
    predicts nothing: the first token of a document is never a target of the previous document.

        ids        a  b  E  c  d  E  e
        positions  0  1  2  0  1  2  0
        labels     b  E  -  d  E  -  -
    """
    import torch
    import torch.nn.functional as F

    labels = F.pad(ids[:, 1:], (0, 1), value=-100)
    if packing == "concat":
        return labels, None
    if packing != "document":
        raise ValueError(packing)
    if eos_id is None:
        raise UptrainError("data.packing: document needs a tokenizer with an EOS token (documents end with it)")
    ends = ids == eos_id
    labels = labels.masked_fill(ends, -100)
    idx = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    starts = F.pad(ends[:, :-1], (1, 0), value=True)  # a document starts at 0 and after every EOS
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
    return labels, idx - first
