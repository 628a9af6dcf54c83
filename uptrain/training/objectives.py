"""What a run optimises, chosen by the model: next-token prediction for a causal LM, T5's span corruption for an
encoder-decoder (config.is_encoder_decoder), as the GQA paper uptrains T5. One loop (loop.py) asks its objective
for the same four things, so budget, accumulation across ranks, resume and distillation are shared:

    block_len     raw tokens a training block holds (span corruption reads more than data.seq_len, the
                  encoder's input length, and drops ~15% of them into the targets)
    dataset       sample i → what a micro-batch row is made of (a pure function of i: exact resume, any ranks)
    batch         a collated micro-batch → (model inputs, labels [b, l] with -100 where nothing is predicted)
    eval_set / evaluate   the held-out data as the objective scores it, and its loss

Span corruption seeds block i's noise by (train.seed, sample index i): a block reread in a later epoch is
corrupted anew, as in T5, and the same sample is corrupted identically whatever the batching, number of ranks
or resume point. A streamed block has no global index (each rank reads its own part): its noise is seeded by
(train.seed, a hash of its tokens), as independent of batching, ranks and resume (data_stream.py restores the
stream's position exactly); a block streamed twice is corrupted the same way. Held-out blocks are corrupted once by (HELD_OUT_SEED, block index), so every evaluation of every
model reads the same inputs and predicts the same targets (quality.HELD_OUT_SEED, shared with `uptrain eval`).
"""
from __future__ import annotations

from uptrain.errors import UptrainError



class CausalLM:
    """Next-token prediction over packed blocks of data.seq_len tokens (data.packing: concat or document)."""

    name = "causal language modelling"

    def __init__(self, seq_len: int, eos_id: int | None, packing: str):
        self.block_len, self.eos_id, self.packing = seq_len, eos_id, packing

    def dataset(self, stream):
        return stream

    def batch(self, raw, device):
        from uptrain.data import causal_lm_targets

        ids = raw.to(device).long()
        labels, positions = causal_lm_targets(ids, self.eos_id, self.packing)
        return ({"input_ids": ids} if positions is None else {"input_ids": ids, "position_ids": positions}), labels

    def probe_batch(self, micro_batch: int, device):
        import torch

        return self.batch(torch.zeros(micro_batch, self.block_len, dtype=torch.long), device)

    def eval_set(self, blocks):
        return blocks

    def evaluate(self, model, data, batch_size: int) -> dict:
        from uptrain.evaluation.quality import perplexity

        return perplexity(model, data, batch_size=batch_size)


class SpanCorruptionLM:
    """T5's objective: encoder input of data.seq_len tokens, decoder targets of the length T5's rule gives."""

    name = "span corruption"

    def __init__(self, sc, seed: int, start_id: int, pad_id: int):
        self.sc, self.seed, self.start_id, self.pad_id = sc, seed, start_id, pad_id
        self.block_len = sc.tokens_length

    @classmethod
    def for_model(cls, config, tokenizer, seq_len: int, seed: int) -> SpanCorruptionLM:
        from uptrain.evaluation.quality import decoder_start
        from uptrain.span_corruption import SpanCorruption

        sc = SpanCorruption.for_tokenizer(tokenizer, inputs_length=seq_len)
        if sc.first_sentinel >= config.vocab_size:
            raise UptrainError(f"the tokenizer's sentinel <extra_id_0> is token {sc.first_sentinel}, beyond the "
                               f"model's vocabulary of {config.vocab_size}: resize the embeddings or use the "
                               f"model's own tokenizer")
        return cls(sc, seed, *decoder_start(config))

    def dataset(self, stream):
        return _Corrupted(stream, self.sc, self.seed)

    def batch(self, raw, device):
        from uptrain.evaluation.quality import shift_right

        if not isinstance(raw, dict):  # streamed raw blocks [b, tokens_length] (data_stream.StreamLoader)
            raw = corrupt_by_content(raw, self.sc, self.seed)
        x, y = raw["input_ids"].to(device).long(), raw["labels"].to(device).long()
        return {"input_ids": x, "decoder_input_ids": shift_right(y, self.start_id, self.pad_id)}, y

    def probe_batch(self, micro_batch: int, device):
        import torch

        zeros = torch.zeros(micro_batch, self.sc.inputs_length, dtype=torch.long)
        return self.batch({"input_ids": zeros, "labels": zeros[:, :self.sc.targets_length]}, device)

    def eval_set(self, blocks):
        from uptrain.evaluation.quality import corrupt_blocks

        return corrupt_blocks(blocks, self.sc)

    def evaluate(self, model, data, batch_size: int) -> dict:
        from uptrain.evaluation.quality import seq2seq_loss

        return seq2seq_loss(model, data, batch_size=batch_size)


class _Corrupted:
    """Sample i of a BlockStream, span-corrupted by (seed, i): {"input_ids", "labels"} (collated by the
    DataLoader into [b, L_in] / [b, L_t])."""

    def __init__(self, stream, sc, seed: int):
        self.stream, self.sc, self.seed = stream, sc, seed

    def __len__(self):
        return len(self.stream)

    def __getitem__(self, i):
        import torch

        out = self.sc(self.stream[i][None], seed=self.seed, first_index=i)
        return {"input_ids": torch.from_numpy(out["input_ids"][0]), "labels": torch.from_numpy(out["labels"][0])}


def content_key(block) -> int:
    """A 64-bit key of a block's tokens (what seeds a streamed block's corruption)."""
    import hashlib

    import numpy as np

    digest = hashlib.blake2b(np.ascontiguousarray(np.asarray(block, dtype=np.int64)).tobytes(), digest_size=8)
    return int.from_bytes(digest.digest(), "little")


def corrupt_by_content(blocks, sc, seed: int) -> dict:
    """Span corruption of raw blocks [b, tokens_length], each seeded by (seed, content_key(block))."""
    import numpy as np
    import torch

    rows = [sc(b[None], seed=seed, first_index=content_key(b)) for b in blocks.cpu()]
    return {k: torch.from_numpy(np.concatenate([r[k] for r in rows])) for k in ("input_ids", "labels")}


def objective_for(config, tokenizer, data, seed: int):
    """The objective a model trains with: span corruption for an encoder-decoder, next-token prediction else.
    data: the recipe's data section (seq_len, packing, streaming)."""
    if not getattr(config, "is_encoder_decoder", False):
        return CausalLM(data.seq_len, tokenizer.eos_token_id, data.packing)
    if data.packing != "concat":
        raise UptrainError(f"data.packing: {data.packing} is for causal models; an encoder-decoder trains with span "
                           f"corruption over concatenated text (T5's own packing): set data.packing: concat")
    return SpanCorruptionLM.for_model(config, tokenizer, data.seq_len, seed)
