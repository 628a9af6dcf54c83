"""Tokenizers: a byte-level BPE trained in-process (no download), and the hash that says two tokenizers give the
same token ids (what the block cache and the records key on)."""
from __future__ import annotations

import hashlib
import json
from typing import Iterable


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = 4096):
    """A byte-level BPE tokenizer trained in-process (no download), as a transformers fast tokenizer
    with <|endoftext|> as BOS/EOS/UNK and <|pad|> for padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", pad_token="<|pad|>")


def tokenizer_hash(tokenizer) -> str:
    """Equal hashes ⇒ the same token ids (the full fast-tokenizer definition, else vocabulary + class)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(
        [type(tokenizer).__name__, sorted(tokenizer.get_vocab().items())])
    return hashlib.sha256(f"{blob}|{tokenizer.eos_token_id}".encode()).hexdigest()[:16]
