"""Quality: mean NLL per target token and its exp, over blocks or a sliding window on a token stream.

`perplexity` is the one perplexity implementation in the project: training's periodic eval and the demo
call it too; `sliding_perplexity` is the same scorer over a token stream with overlapping windows. Only
torch is imported here, so the training loop can use it without loading the rest of evaluation.
"""
from __future__ import annotations

import inspect
import itertools
import math

import torch

from uptrain.errors import UptrainError


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 8, progress=None) -> dict:
    """Mean NLL per target token over `blocks` (LongTensor [n, seq_len], e.g. from data.pack_blocks)
    and its exp. Every position but the first of a block is a target: tokens = n · (seq_len − 1).

    Returns floats: {"loss", "perplexity", "tokens"}. The model runs in eval mode (its mode is restored).
    `progress`: an optional tqdm-like object, updated once per batch."""
    batches = ((blocks[i: i + batch_size], 0) for i in range(0, blocks.shape[0], batch_size))
    nll, tokens = _score(model, batches, progress)
    return _result(nll, tokens)


def sliding_windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a stream of n_tokens so that each target (positions 1..n−1) is scored once.

    Returns (start, end, skip): the model reads ids[start:end]; its first `skip` predictions are context
    only. The first window scores everything it can; each later one scores the next `stride` targets
    with at least seq_len − stride tokens of context. stride = seq_len gives disjoint blocks (the block
    perplexity above: the first token of each block is not scored); a stride below seq_len scores every
    target."""
    if seq_len < 2:
        raise UptrainError(f"--seq-len must be at least 2, got {seq_len}")
    if not 1 <= stride <= seq_len:
        raise UptrainError(f"--stride must be between 1 and --seq-len ({seq_len}), got {stride}")
    out: list[tuple[int, int, int]] = []
    next_target = 1
    while next_target < n_tokens:
        end = min(n_tokens, seq_len if not out else next_target + stride)
        start = max(0, end - seq_len)
        out.append((start, end, max(0, next_target - start - 1)))
        next_target = end
    return out


def scored_ranges(windows) -> list[tuple[int, int]]:
    """[a, b) ranges of stream positions that `windows` score."""
    return [(start + 1 + skip, end) for start, end, skip in windows]


@torch.no_grad()
def sliding_perplexity(model, ids: torch.Tensor, seq_len: int, stride: int | None = None,
                       batch_size: int = 8, progress=None) -> dict:
    """Perplexity of a 1-D token stream with a sliding window (see `sliding_windows`); stride defaults
    to seq_len // 2. Same result dict as `perplexity`."""
    stride = stride or max(1, seq_len // 2)
    wins = sliding_windows(int(ids.numel()), seq_len, stride)
    if progress is not None and hasattr(progress, "reset"):
        progress.reset(total=sum(1 for _ in _window_batches(ids, wins, batch_size, stack=False)))
    nll, tokens = _score(model, _window_batches(ids, wins, batch_size), progress)
    return _result(nll, tokens)


def model_device(model) -> torch.device:
    """Where the model's parameters live (cpu for a model without parameters)."""
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


def _window_batches(ids, wins, batch_size, stack: bool = True):
    # Consecutive windows of equal length and skip stack into one batch (all but the first and last do).
    for _, same in itertools.groupby(wins, key=lambda w: (w[1] - w[0], w[2])):
        group = list(same)
        for i in range(0, len(group), batch_size):
            chunk = group[i: i + batch_size]
            yield (torch.stack([ids[s:e] for s, e, _ in chunk]) if stack else None), chunk[0][2]


def _score(model, batches, progress=None) -> tuple[float, int]:
    """Sum of NLL and number of scored targets over (input_ids [b, l], skip) batches."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    keep = "logits_to_keep" in inspect.signature(model.forward).parameters
    total, count = 0.0, 0
    try:
        for input_ids, skip in batches:
            x = input_ids.to(device)
            n = x.shape[1] - skip  # logits positions needed: skip..l−1 (the last predicts past the window)
            kw = {"logits_to_keep": n} if keep and skip else {}
            logits = model(input_ids=x, use_cache=False, **kw).logits[:, -n:][:, :-1].float()
            targets = x[:, skip + 1:]
            total += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
            count += targets.numel()
            if progress is not None:
                progress.update(1)
    finally:
        model.train(was_training)
    return total, count


def _result(nll: float, tokens: int) -> dict:
    loss = nll / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens}


# ---------------------------------------------------------------------------------------- encoder-decoders
HELD_OUT_SEED = 0  # held-out span corruption: one fixed seed, so every model and every run reads the same inputs


class Seq2SeqSet:
    """Encoder inputs [n, L_in] and decoder targets [n, L_t], row by row; sliced like a block tensor (training
    shards held-out data over processes with `blocks[rank::world]`)."""

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor):
        self.input_ids, self.labels = input_ids, labels

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, i) -> Seq2SeqSet:
        return Seq2SeqSet(self.input_ids[i], self.labels[i])

    @property
    def shape(self) -> tuple[int, int, int]:
        """(rows, input length, target length)."""
        return (len(self), self.input_ids.shape[1], self.labels.shape[1])


def corrupt_blocks(blocks: torch.Tensor, sc, seed: int = HELD_OUT_SEED) -> Seq2SeqSet:
    """T5's span corruption (uptrain.span_corruption.SpanCorruption `sc`) of held-out blocks [n, tokens_length]:
    block i is corrupted by (seed, i) alone, so every model evaluated with the same seed reads the same inputs
    and predicts the same targets."""
    out = sc(blocks, seed=seed, first_index=0)
    return Seq2SeqSet(torch.from_numpy(out["input_ids"]), torch.from_numpy(out["labels"]))


def shift_right(labels: torch.Tensor, start_id: int, pad_id: int) -> torch.Tensor:
    """Decoder inputs for teacher forcing: the start token, then the targets but the last (T5's _shift_right;
    an ignored target, -100, reads as padding)."""
    dec = torch.cat([torch.full_like(labels[:, :1], start_id), labels[:, :-1]], dim=1)
    return dec.masked_fill(dec == -100, pad_id)


def decoder_start(config) -> tuple[int, int]:
    """(decoder start id, pad id) of an encoder-decoder config (T5 starts decoding with the pad id)."""
    pad = config.pad_token_id
    start = config.decoder_start_token_id if config.decoder_start_token_id is not None else pad
    if start is None or pad is None:
        raise UptrainError("the encoder-decoder's config has no decoder_start_token_id / pad_token_id; teacher "
                           "forcing needs them")
    return start, pad


@torch.no_grad()
def seq2seq_loss(model, data: Seq2SeqSet, batch_size: int = 8, progress=None) -> dict:
    """Mean NLL per target token of an encoder-decoder over `data` (every target counts; -100 is skipped) and
    its exp: the held-out span-corruption loss and perplexity. Same result dict as `perplexity`."""
    was_training = model.training
    model.eval()
    device = model_device(model)
    start, pad = decoder_start(model.config)
    total, count = 0.0, 0
    try:
        for i in range(0, len(data), batch_size):
            x, y = data.input_ids[i: i + batch_size].to(device), data.labels[i: i + batch_size].to(device)
            logits = model(input_ids=x, decoder_input_ids=shift_right(y, start, pad), use_cache=False).logits
            total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), y.flatten(),
                                                             ignore_index=-100, reduction="sum"))
            count += int((y != -100).sum())
            if progress is not None:
                progress.update(1)
    finally:
        model.train(was_training)
    return _result(total, count)
