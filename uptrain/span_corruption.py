"""T5's pre-training objective, span corruption, as pure seeded functions on token ids.

A block of `tokens_length` tokens loses ~15% of its tokens in spans of mean length 3. Each dropped span
becomes one sentinel in the encoder input; the target lists every dropped span after its sentinel:

    tokens   The  cute dog  walks in  the  park
    noise          ^^^^^^^^                ^^^^
    inputs   The <X0> walks in  the <X1> </s>
    labels   <X0> cute dog <X1> park <X2> </s>

Ported from transformers' `examples/flax/language-modeling/run_t5_mlm_flax.py` (`DataCollatorForT5MLM`,
`compute_input_and_target_lengths`), itself a port of T5's `random_spans_noise_mask`: the same lengths, the
same span sampling, the same sentinel numbering. What differs is only where randomness comes from: a numpy
Generator seeded per block (`block_rng(seed, index)`), not numpy's global state, so a block is corrupted the
same way whatever the batch, rank or resume point it is read at.

Sentinels are the tokenizer's `<extra_id_k>`: `<extra_id_0>` is the highest id and each next one is one
lower (T5's layout; `sentinel_ids` checks it). A tokenizer without them gets them from `add_sentinel_tokens`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from uptrain.errors import UptrainError

NOISE_DENSITY = 0.15  # T5 (Raffel et al. 2020) and the GQA paper's uptraining
MEAN_NOISE_SPAN_LENGTH = 3.0
SENTINEL = "<extra_id_{}>"
T5_EXTRA_IDS = 100  # what T5's tokenizers carry


def _lengths(tokens_length: int, noise_density: float, mean_noise_span_length: float) -> tuple[int, int]:
    """(input length, target length) after corrupting `tokens_length` tokens: the inputs keep the non-noise
    tokens, one sentinel per noise span and EOS; the targets hold the noise tokens, one sentinel per span, EOS."""
    num_noise_tokens = int(round(tokens_length * noise_density))
    num_nonnoise_tokens = tokens_length - num_noise_tokens
    num_noise_spans = int(round(num_noise_tokens / mean_noise_span_length))
    return num_nonnoise_tokens + num_noise_spans + 1, num_noise_tokens + num_noise_spans + 1


def compute_input_and_target_lengths(inputs_length: int, noise_density: float = NOISE_DENSITY,
                                     mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> tuple[int, int]:
    """(tokens_length, targets_length): the longest raw block whose corrupted input is at most `inputs_length`
    tokens, and the length of its targets. T5 at inputs_length 512: (568, 114)."""
    tokens_length = inputs_length
    while _lengths(tokens_length + 1, noise_density, mean_noise_span_length)[0] <= inputs_length:
        tokens_length += 1
    _, targets_length = _lengths(tokens_length, noise_density, mean_noise_span_length)
    # T5's own adjustment: at density 0.5 keep the targets no longer than the (likely round) input length
    if noise_density == 0.5 and targets_length > inputs_length:
        tokens_length -= 1
        targets_length -= 1
    return tokens_length, targets_length


def noise_span_counts(length: int, noise_density: float = NOISE_DENSITY,
                      mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> tuple[int, int]:
    """(noise tokens, noise spans) that `random_spans_noise_mask` draws for `length` tokens; at least one of
    each and at least one non-noise token (T5 avoids the degenerate cases)."""
    num_noise_tokens = int(np.round(length * noise_density))
    num_nonnoise_tokens = length - num_noise_tokens  # before the clamp, as the reference does
    num_noise_tokens = min(max(num_noise_tokens, 1), length - 1)
    num_noise_spans = int(np.round(min(num_noise_tokens, num_nonnoise_tokens) / mean_noise_span_length))
    return num_noise_tokens, max(num_noise_spans, 1)


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of `num_segments` non-empty segments partitioning `num_items` items, uniformly at random."""
    mask_indices = np.arange(num_items - 1) < (num_segments - 1)
    rng.shuffle(mask_indices)
    first_in_segment = np.pad(mask_indices, [[1, 0]])
    segment_id = np.cumsum(first_in_segment)
    _, segment_length = np.unique(segment_id, return_counts=True)
    return segment_length


def random_spans_noise_mask(length: int, rng: np.random.Generator, noise_density: float = NOISE_DENSITY,
                            mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> np.ndarray:
    """Boolean [length]: True on noise tokens. Exactly `noise_span_counts(length)` noise tokens in that many
    spans, alternating with as many non-noise spans; the mask starts with a non-noise span."""
    if length < 2:
        raise UptrainError(f"span corruption needs blocks of at least 2 tokens, got {length}")
    num_noise_tokens, num_noise_spans = noise_span_counts(length, noise_density, mean_noise_span_length)
    num_nonnoise_tokens = length - num_noise_tokens
    noise_span_lengths = _random_segmentation(num_noise_tokens, num_noise_spans, rng)
    nonnoise_span_lengths = _random_segmentation(num_nonnoise_tokens, num_noise_spans, rng)
    interleaved = np.stack([nonnoise_span_lengths, noise_span_lengths], axis=1).reshape(num_noise_spans * 2)
    span_starts = np.cumsum(interleaved)[:-1]
    span_start_indicator = np.zeros((length,), dtype=np.int8)
    span_start_indicator[span_starts] = True
    span_num = np.cumsum(span_start_indicator)
    return np.equal(span_num % 2, 1)


def create_sentinel_ids(mask_indices: np.ndarray, first_sentinel: int) -> np.ndarray:
    """[B, L] int: at the first token of the k-th masked span (k = 0, 1, …) the id first_sentinel − k, −1 on the
    span's other tokens, 0 elsewhere. The reference writes len(tokenizer) − (k + 1): the same ids when the
    sentinels are the top of the vocabulary."""
    mask_indices = mask_indices.astype(np.int64)
    start_indices = mask_indices - np.roll(mask_indices, 1, axis=-1) * mask_indices
    start_indices[:, 0] = mask_indices[:, 0]
    sentinel_ids = np.where(start_indices != 0, np.cumsum(start_indices, axis=-1), start_indices)
    sentinel_ids = np.where(sentinel_ids != 0, first_sentinel + 1 - sentinel_ids, 0)
    sentinel_ids -= mask_indices - start_indices
    return sentinel_ids


def filter_input_ids(input_ids: np.ndarray, sentinel_ids: np.ndarray, eos_id: int) -> np.ndarray:
    """Replace each masked span by its sentinel, drop the span's other tokens, append EOS: [B, L'] per row
    (every row of a batch keeps the same count, which T5's mask guarantees)."""
    full = np.where(sentinel_ids != 0, sentinel_ids, input_ids)
    kept = full[full >= 0].reshape((input_ids.shape[0], -1))
    return np.concatenate([kept, np.full((input_ids.shape[0], 1), eos_id, dtype=kept.dtype)], axis=-1)


def block_rng(seed: int, index: int) -> np.random.Generator:
    """The generator for block `index` of a run seeded `seed`: independent of batching, ranks and resume."""
    return np.random.default_rng([seed, index])


@dataclass(frozen=True)
class SpanCorruption:
    """T5's objective for one input length: blocks of `tokens_length` raw tokens → encoder inputs of
    `inputs_length` and targets of `targets_length`, both ending in EOS.

        sc = SpanCorruption.for_tokenizer(tokenizer, inputs_length=512)   # tokens_length 568, targets 114
        batch = sc(blocks, seed=0, first_index=0)   # {"input_ids": [B, 512], "labels": [B, 114]}
    """

    inputs_length: int
    first_sentinel: int
    eos_id: int
    noise_density: float = NOISE_DENSITY
    mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH

    @classmethod
    def for_tokenizer(cls, tokenizer, inputs_length: int, noise_density: float = NOISE_DENSITY,
                      mean_noise_span_length: float = MEAN_NOISE_SPAN_LENGTH) -> SpanCorruption:
        sc = cls(inputs_length, 0, 0, noise_density, mean_noise_span_length)
        if tokenizer.eos_token_id is None:
            raise UptrainError("span corruption needs a tokenizer with an EOS token (it ends inputs and targets)")
        ids = sentinel_ids(tokenizer, sc.spans_per_block)
        return cls(inputs_length, ids[0], tokenizer.eos_token_id, noise_density, mean_noise_span_length)

    def __post_init__(self):
        if not 0 < self.noise_density < 1:
            raise UptrainError(f"noise_density must be in (0, 1), got {self.noise_density}")
        if self.mean_noise_span_length < 1:
            raise UptrainError(f"mean_noise_span_length must be at least 1, got {self.mean_noise_span_length}")
        noise, spans = noise_span_counts(self.tokens_length, self.noise_density, self.mean_noise_span_length)
        got = (self.tokens_length - noise + spans + 1, noise + spans + 1)
        if got != (self.inputs_length, self.targets_length):  # T5's density-0.5 adjustment can miss by one
            raise UptrainError(f"inputs_length {self.inputs_length} at noise density {self.noise_density}: T5's length "
                               f"rule picks {self.tokens_length} raw tokens, which corrupt to {got[0]} input and "
                               f"{got[1]} target tokens, not {self.inputs_length} / {self.targets_length}; choose "
                               f"another inputs_length (e.g. {self.inputs_length - 1} or {self.inputs_length + 1})")

    @property
    def tokens_length(self) -> int:
        return compute_input_and_target_lengths(self.inputs_length, self.noise_density,
                                                self.mean_noise_span_length)[0]

    @property
    def targets_length(self) -> int:
        return compute_input_and_target_lengths(self.inputs_length, self.noise_density,
                                                self.mean_noise_span_length)[1]

    @property
    def spans_per_block(self) -> int:
        """Sentinels one block uses (noise spans; the targets use the same number)."""
        return noise_span_counts(self.tokens_length, self.noise_density, self.mean_noise_span_length)[1]

    def mask(self, seed: int, index: int) -> np.ndarray:
        return random_spans_noise_mask(self.tokens_length, block_rng(seed, index), self.noise_density,
                                       self.mean_noise_span_length)

    def __call__(self, blocks, seed: int = 0, first_index: int = 0) -> dict[str, np.ndarray]:
        """blocks: [B, tokens_length] token ids (numpy or torch); row i is block number first_index + i."""
        blocks = np.asarray(blocks, dtype=np.int64)
        if blocks.ndim != 2 or blocks.shape[1] != self.tokens_length:
            raise UptrainError(f"span corruption for inputs of {self.inputs_length} tokens takes blocks of "
                               f"{self.tokens_length} tokens, got shape {tuple(blocks.shape)}")
        mask = np.stack([self.mask(seed, first_index + i) for i in range(blocks.shape[0])])
        inputs = filter_input_ids(blocks, create_sentinel_ids(mask, self.first_sentinel), self.eos_id)
        labels = filter_input_ids(blocks, create_sentinel_ids(~mask, self.first_sentinel), self.eos_id)
        if inputs.shape[1] != self.inputs_length or labels.shape[1] != self.targets_length:  # a bug guard
            raise RuntimeError(f"span corruption produced {inputs.shape[1]} / {labels.shape[1]} tokens, expected "
                               f"{self.inputs_length} / {self.targets_length}")
        return {"input_ids": inputs, "labels": labels}


def sentinel_ids(tokenizer, needed: int = 1) -> list[int]:
    """Ids of <extra_id_0> … <extra_id_{needed-1}>, checked to count down by one from <extra_id_0> (T5's
    layout, which `create_sentinel_ids` relies on)."""
    vocab = tokenizer.get_vocab()
    ids = [vocab.get(SENTINEL.format(k)) for k in range(needed)]
    if any(i is None for i in ids):
        have = sum(SENTINEL.format(k) in vocab for k in range(T5_EXTRA_IDS * 10))
        raise UptrainError(f"span corruption needs {needed} sentinel tokens <extra_id_0> … <extra_id_{needed - 1}> "
                           f"in the tokenizer, which has {have}. Use a T5 tokenizer, or add them with "
                           f"uptrain.span_corruption.add_sentinel_tokens(tokenizer) (and resize the embeddings)")
    if ids != list(range(ids[0], ids[0] - needed, -1)):
        raise UptrainError("the tokenizer's <extra_id_k> tokens do not count down by one from <extra_id_0>, as T5's "
                           "do; span corruption numbers its sentinels that way")
    return ids


def add_sentinel_tokens(tokenizer, n: int = T5_EXTRA_IDS):
    """Give a tokenizer without them T5's sentinels: <extra_id_{n-1}> … <extra_id_0> appended in that order,
    so <extra_id_0> is the highest id. Returns the tokenizer (changed in place)."""
    vocab = tokenizer.get_vocab()
    new = [SENTINEL.format(k) for k in reversed(range(n)) if SENTINEL.format(k) not in vocab]
    if len(new) not in (0, n):
        raise UptrainError(f"the tokenizer already has {n - len(new)} of the {n} sentinels; not adding the rest")
    if new:
        tokenizer.add_tokens(new, special_tokens=True)  # never split, skipped when decoding
    return tokenizer
