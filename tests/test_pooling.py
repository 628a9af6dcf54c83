"""The pooling math on labelled tensors: every row says which head and row it came from."""
import pytest
import torch

from uptrain.pooling import (expand_groups, pool_first, pool_mean, pool_mean_norm, pool_random, pool_rows,
                             relative_error, split_groups)


def labelled(heads: int, head_dim: int, cols: int = 3) -> torch.Tensor:
    """Row r of head h holds 100·h + r in every column: the value names its origin."""
    h = torch.arange(heads).repeat_interleave(head_dim) * 100.0
    r = torch.arange(head_dim).repeat(heads).float()
    return (h + r).unsqueeze(1).repeat(1, cols)


@pytest.mark.parametrize("kv, groups, expected_heads", [
    (8, 4, [[0, 1], [2, 3], [4, 5], [6, 7]]),  # MHA → GQA-4: contiguous pairs
    (8, 1, [list(range(8))]),                   # MHA → MQA: everything
    (4, 2, [[0, 1], [2, 3]]),                   # GQA-4 → GQA-2 (a GQA source reduced further)
    (8, 8, [[h] for h in range(8)]),            # G = K: identity
])
def test_mean_pools_contiguous_groups(kv, groups, expected_heads):
    d = 2
    out = pool_mean(labelled(kv, d), groups, d)
    assert out.shape == (groups * d, 3)
    for g, members in enumerate(expected_heads):
        for r in range(d):
            assert out[g * d + r, 0].item() == pytest.approx(sum(100 * h + r for h in members) / len(members))


def test_mean_composes_gqa_to_fewer():
    """Reducing 8 → 4 → 2 equals 8 → 2 (means of equal-size contiguous groups compose)."""
    w = torch.randn(8 * 4, 5, dtype=torch.float64)
    assert torch.allclose(pool_mean(pool_mean(w, 4, 4), 2, 4), pool_mean(w, 2, 4))


def test_first_keeps_first_head_of_each_group():
    out = pool_first(labelled(8, 2), 2, 2)
    assert out[:, 0].tolist() == [0, 1, 400, 401]


def test_random_is_seeded_and_shaped():
    w = torch.randn(16, 4)
    a = pool_random(w, 2, 4, generator=torch.Generator().manual_seed(1))
    b = pool_random(w, 2, 4, generator=torch.Generator().manual_seed(1))
    assert a.shape == (8, 4) and torch.equal(a, b)
    assert not torch.allclose(a, pool_mean(w, 2, 4))
    assert torch.equal(pool_random(torch.randn(16), 2, 4, kind="bias"), torch.zeros(8))
    assert torch.equal(pool_random(torch.randn(16), 2, 4, kind="norm"), torch.ones(8))


def test_mean_norm_restores_row_norms():
    w = torch.randn(4 * 8, 16)
    out = pool_mean_norm(w, 2, 8)
    g = split_groups(w, 2, 8)
    target = g.norm(dim=-1).mean(dim=1).reshape(-1)
    assert torch.allclose(out.norm(dim=-1), target, rtol=1e-5)
    # direction is the mean's direction
    mean = pool_mean(w, 2, 8)
    cos = torch.nn.functional.cosine_similarity(out, mean, dim=-1)
    assert torch.allclose(cos, torch.ones_like(cos), atol=1e-5)


def test_fused_qkv_pools_only_k_and_v():
    H, K, G, d = 4, 4, 2, 2
    q = labelled(H, d)
    k = labelled(K, d) + 10000
    v = labelled(K, d) + 20000
    fused = torch.cat([q, k, v])
    segs = [("q", 0, H * d), ("k", H * d, (H + K) * d), ("v", (H + K) * d, (H + 2 * K) * d)]
    out = pool_rows(fused, segs, G, d, pool_mean)
    assert out.shape == ((H + 2 * G) * d, 3)
    assert torch.equal(out[: H * d], q)  # q rows untouched
    assert out[H * d, 0].item() == 10000 + 50  # mean of k heads 0, 1 row 0 = (0 + 100) / 2
    assert out[(H + G) * d + d + 1, 0].item() == 20000 + 251  # v group 1 row 1: heads 2, 3 → (201 + 301) / 2


def test_relative_error_zero_for_equal_heads():
    head = torch.randn(2, 4)
    w = head.repeat(4, 1)  # 4 equal heads of 2 rows
    assert relative_error(w, pool_mean(w, 1, 2), 1, 2) == 0.0
    w2 = torch.randn(8, 4)
    assert relative_error(w2, pool_mean(w2, 1, 2), 1, 2) > 0.1
    assert torch.equal(expand_groups(pool_mean(w, 1, 2), 1, 4, 2), w)


def test_bad_row_count_is_an_error():
    with pytest.raises(ValueError):
        split_groups(torch.zeros(10, 2), 4, 2)
