"""T5's span corruption: the lengths T5 computes, the masks it draws, and inputs + targets that give back the text."""
import copy

import numpy as np
import pytest
import torch

from uptrain.errors import UptrainError
from uptrain.span_corruption import SpanCorruption, add_sentinel_tokens, block_rng, compute_input_and_target_lengths, \
    create_sentinel_ids, filter_input_ids, noise_span_counts, random_spans_noise_mask, sentinel_ids


@pytest.mark.parametrize("inputs_length, density, span, expected", [
    # T5 / run_t5_mlm_flax at 512: 568 raw tokens → 85 noise in round(85/3) = 28 spans → 483 + 28 + 1 = 512
    # inputs and 85 + 28 + 1 = 114 targets; 569 would give 85 noise, 484 + 28 + 1 = 513 inputs.
    (512, 0.15, 3, (568, 114)),
    # 70 → round(10.5) = 10 noise (round half to even, as T5), 3 spans: 60 + 3 + 1 = 64, 10 + 3 + 1 = 14;
    # 71 → 11 noise, 4 spans: 60 + 4 + 1 = 65 > 64.
    (64, 0.15, 3, (70, 14)),
    # 630 → round(94.5) = 94 noise, 31 spans: 536 + 31 + 1 = 568, 94 + 31 + 1 = 126; 631 → 95 noise, 32 spans → 569
    (568, 0.15, 3, (630, 126)),
    # density 0.5 (T5's own adjustment): 35 raw → round(17.5) = 18 noise, 6 spans: 17 + 6 + 1 = 24 inputs but
    # 18 + 6 + 1 = 25 targets > 24, so one raw token fewer and targets 24 (34 → 17 noise, 6 spans: 24 / 24)
    (24, 0.5, 3, (34, 24)),
])
def test_lengths_as_t5_computes_them(inputs_length, density, span, expected):
    assert compute_input_and_target_lengths(inputs_length, density, span) == expected


def test_an_inconsistent_t5_length_is_refused():
    """At density 0.5, inputs 27: T5's adjustment gives (38 raw, 27 targets), but 38 raw tokens corrupt to 26 + 26.
    The lengths stay T5's; the objective refuses to run on them rather than produce wrong shapes."""
    assert compute_input_and_target_lengths(27, 0.5, 3) == (38, 27)
    assert noise_span_counts(38, 0.5, 3) == (19, 6)  # 19 + 6 + 1 = 26
    with pytest.raises(UptrainError, match="inputs_length 27.*26 input and 26 target tokens"):
        SpanCorruption(27, 0, 0, noise_density=0.5)
    SpanCorruption(24, 0, 0, noise_density=0.5)


def runs(mask: np.ndarray) -> list[tuple[bool, int]]:
    """[(value, run length)] of a boolean array."""
    out = []
    for v in mask:
        if out and out[-1][0] == bool(v):
            out[-1] = (bool(v), out[-1][1] + 1)
        else:
            out.append((bool(v), 1))
    return out


@pytest.mark.parametrize("length", [568, 70, 130, 31, 2])
def test_mask_has_exactly_t5s_noise_tokens_and_spans(length):
    noise, spans = noise_span_counts(length)
    assert noise == min(max(int(np.round(length * 0.15)), 1), length - 1)
    for seed in range(20):
        mask = random_spans_noise_mask(length, block_rng(seed, 0))
        r = runs(mask)
        assert mask.dtype == bool and mask.shape == (length,)
        assert mask.sum() == noise
        assert sum(1 for v, _ in r if v) == spans == sum(1 for v, _ in r if not v)  # alternating, as many of each
        assert r[0][0] is False and r[-1][0] is True  # starts with kept text, ends with a noise span (T5's layout)


def test_mask_statistics_match_the_objective():
    """Over many blocks of 568: noise fraction 85/568 ≈ 0.15 and mean span length 85/28 ≈ 3 exactly as T5 sets
    them; span lengths vary (a random segmentation, not fixed spans). As in T5 the first token is never noise and
    the last always is (the known end-of-block bias of its layout); every position between can be noise."""
    masks = np.stack([random_spans_noise_mask(568, block_rng(0, i)) for i in range(400)])
    assert masks.mean() == pytest.approx(85 / 568)
    lengths = [n for m in masks for v, n in runs(m) if v]
    assert np.mean(lengths) == pytest.approx(85 / 28)
    assert min(lengths) == 1 and max(lengths) >= 10
    per_position = masks.mean(axis=0)
    assert per_position[0] == 0 and per_position[-1] == 1
    assert per_position[1:-8].min() > 0.04 and per_position[1:-8].max() < 0.3


def test_masks_are_seeded_per_block():
    a = random_spans_noise_mask(568, block_rng(3, 7))
    assert np.array_equal(a, random_spans_noise_mask(568, block_rng(3, 7)))
    assert not np.array_equal(a, random_spans_noise_mask(568, block_rng(3, 8)))
    assert not np.array_equal(a, random_spans_noise_mask(568, block_rng(4, 7)))


def test_sentinels_count_down_from_the_first():
    mask = np.array([[0, 1, 1, 0, 1, 0, 1, 1],
                     [1, 0, 0, 1, 1, 1, 0, 0]])
    assert create_sentinel_ids(mask, first_sentinel=99).tolist() == [
        [0, 99, -1, 0, 98, 0, 97, -1],
        [99, 0, 0, 98, -1, -1, 0, 0]]


def test_filter_replaces_spans_by_sentinels_and_appends_eos():
    ids = np.array([[10, 11, 12, 13, 14, 15, 16, 17]])
    mask = np.array([[0, 1, 1, 0, 1, 0, 1, 1]], dtype=bool)
    assert filter_input_ids(ids, create_sentinel_ids(mask, 99), eos_id=1).tolist() == [[10, 99, 13, 98, 15, 97, 1]]
    assert filter_input_ids(ids, create_sentinel_ids(~mask, 99), eos_id=1).tolist() == [[99, 11, 12, 98, 14, 97, 16,
                                                                                         17, 1]]


@pytest.fixture(scope="module")
def t5_tokenizer(tokenizer):
    return add_sentinel_tokens(copy.deepcopy(tokenizer))


def test_sentinel_tokens_added_as_t5_has_them(t5_tokenizer, tokenizer):
    from tiny_models import V

    assert len(t5_tokenizer) == V + 100
    ids = sentinel_ids(t5_tokenizer, 100)
    assert ids[0] == V + 99 == len(t5_tokenizer) - 1 and ids[-1] == V  # <extra_id_0> on top, then down by one
    assert t5_tokenizer.convert_ids_to_tokens(V + 99) == "<extra_id_0>"
    ids = t5_tokenizer("a <extra_id_3> b", add_special_tokens=False)["input_ids"]
    assert ids.count(V + 96) == 1 and len(ids) <= 5  # one token, never split
    assert add_sentinel_tokens(t5_tokenizer) is t5_tokenizer and len(t5_tokenizer) == V + 100  # idempotent
    with pytest.raises(UptrainError, match="<extra_id_0> … <extra_id_1>.*add_sentinel_tokens"):
        sentinel_ids(tokenizer, 2)  # the plain BPE has none


def reconstruct(inputs: list[int], labels: list[int], sentinels: set[int], eos: int) -> list[int]:
    """Put every target span back in place of its sentinel."""
    spans, key = {}, None
    for t in labels[:-1]:
        if t in sentinels:
            key = t
            spans[key] = []
        else:
            spans[key].append(t)
    out = []
    for t in inputs[:-1]:
        out.extend(spans[t] if t in sentinels else [t])
    assert inputs[-1] == labels[-1] == eos
    return out


def test_inputs_and_targets_give_back_the_text(t5_tokenizer, heldout_text):
    sc = SpanCorruption.for_tokenizer(t5_tokenizer, inputs_length=64)
    assert (sc.tokens_length, sc.targets_length, sc.spans_per_block) == (70, 14, 3)
    ids = t5_tokenizer(heldout_text, add_special_tokens=False)["input_ids"]
    blocks = torch.tensor(ids[: 8 * 70]).view(8, 70)
    batch = sc(blocks, seed=5, first_index=100)
    assert batch["input_ids"].shape == (8, 64) and batch["labels"].shape == (8, 14)
    sentinels = set(sentinel_ids(t5_tokenizer, 100))
    for i in range(8):
        inputs, labels = batch["input_ids"][i].tolist(), batch["labels"][i].tolist()
        assert reconstruct(inputs, labels, sentinels, t5_tokenizer.eos_token_id) == blocks[i].tolist()
        # the k-th span's sentinel is <extra_id_k>, in inputs and labels alike
        used = [t for t in inputs if t in sentinels]
        assert used == [t for t in labels if t in sentinels] == [len(t5_tokenizer) - 1 - k for k in range(3)]
    text = t5_tokenizer.decode(batch["input_ids"][0])
    assert "<extra_id_0>" in text and "<extra_id_2>" in text
    # a block is corrupted the same way wherever it sits in a batch (resume, ranks)
    alone = sc(blocks[3:4], seed=5, first_index=103)
    assert np.array_equal(alone["input_ids"][0], batch["input_ids"][3])


def test_refusals(t5_tokenizer):
    sc = SpanCorruption.for_tokenizer(t5_tokenizer, inputs_length=64)
    with pytest.raises(UptrainError, match="blocks of 70 tokens, got shape"):
        sc(np.zeros((2, 64), dtype=np.int64))
    with pytest.raises(UptrainError, match="100 sentinel tokens|needs 1\\d\\d sentinel"):
        SpanCorruption.for_tokenizer(t5_tokenizer, inputs_length=2048)  # 114 spans > T5's 100 extra ids
    with pytest.raises(UptrainError, match="noise_density"):
        SpanCorruption(64, 0, 0, noise_density=1.5)
