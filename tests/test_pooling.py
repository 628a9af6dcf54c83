"""The pooling math on labelled tensors: every row says which head and row it came from."""
import pytest
import torch

from uptrain.pooling import (expand_groups, pool_first, pool_mean, pool_mean_norm, pool_random, pool_rows,
                             pooling_error, split_groups)


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


def test_pooling_error_zero_for_equal_heads():
    head = torch.randn(2, 4)
    w = head.repeat(4, 1)  # 4 equal heads of 2 rows
    assert pooling_error(w, pool_mean(w, 1, 2), 1, 2) == 0.0
    w2 = torch.randn(8, 4)
    assert pooling_error(w2, pool_mean(w2, 1, 2), 1, 2) > 0.1
    assert torch.equal(expand_groups(pool_mean(w, 1, 2), 1, 4, 2), w)


def test_bad_row_count_is_an_error():
    with pytest.raises(ValueError):
        split_groups(torch.zeros(10, 2), 4, 2)


def _pooling_error_f64(source, pooled, groups, head_dim):
    """The definition, evaluated in float64 with the expanded copy."""
    src = source.double()
    n = src.shape[0] // head_dim // groups
    return ((src - expand_groups(pooled.double(), groups, n, head_dim)).norm() / src.norm()).item()


@pytest.mark.parametrize("pool", [pool_mean, pool_first, pool_mean_norm, pool_random])
@pytest.mark.parametrize("kv, groups, cols", [(8, 4, 3), (8, 1, 5), (4, 2, 1), (8, 8, 3), (6, 3, 4)])
def test_pooling_error_matches_its_definition(pool, kv, groups, cols):
    """The closed form (no expanded copy) equals ‖W − repeat(P)‖ / ‖W‖ on labelled and random tensors,
    including 1-D ones, to float32 accuracy."""
    d = 4
    for w in (labelled(kv, d, cols), torch.randn(kv * d, cols, generator=torch.Generator().manual_seed(kv + cols))):
        for t in (w, w[:, 0]):
            p = pool(t, groups, d, generator=torch.Generator().manual_seed(0))
            want = _pooling_error_f64(t, p, groups, d)
            assert pooling_error(t, p, groups, d) == pytest.approx(want, rel=1e-5, abs=1e-7)
            if pool is pool_mean:
                assert pooling_error(t, p, groups, d, is_mean=True) == pytest.approx(want, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("eps", [0.0, 1e-6, 1e-3, 0.05, 0.3])
def test_pooling_error_nearly_equal_heads(eps):
    """Where the closed form would cancel (heads nearly equal), the direct evaluation takes over: still
    accurate, and exactly 0 for equal heads."""
    g = torch.Generator().manual_seed(1)
    base = torch.randn(2, 1, 16, 32, generator=g).expand(2, 4, 16, 32).reshape(128, 32)
    w = base + eps * torch.randn(128, 32, generator=g)
    p = pool_mean(w, 2, 16)
    for is_mean in (False, True):
        got = pooling_error(w, p, 2, 16, is_mean=is_mean)
        if eps == 0:
            assert got == 0.0
        else:
            assert got == pytest.approx(_pooling_error_f64(w, p, 2, 16), rel=1e-5)


def test_pooling_error_large_tensor_accurate():
    """A 4096² weight: the statistic stays within 1e-6 of float64 (one float32 norm over 16M values
    drifted by ~1e-4)."""
    w = torch.randn(4096, 1024, generator=torch.Generator().manual_seed(2))
    p = pool_mean(w, 8, 128)
    want = _pooling_error_f64(w, p, 8, 128)
    assert pooling_error(w, p, 8, 128) == pytest.approx(want, rel=1e-6)
    assert pooling_error(w, p, 8, 128, is_mean=True) == pytest.approx(want, rel=1e-6)


def test_pool_method_names_match_poolers():
    """The options name the pooling methods without importing torch (uptrain.conversion.options, their one list);
    the pooling functions must be registered under exactly those names."""
    from uptrain.conversion.options import POOLING_METHODS
    from uptrain.pooling import POOLERS

    assert set(POOLING_METHODS) == set(POOLERS)


@pytest.mark.parametrize("pool", [pool_mean, pool_first, pool_mean_norm, pool_random])
def test_pooling_does_not_depend_on_thread_count(pool):
    """The converter merges on a helper thread with one torch thread: results must be bit-identical."""
    w = torch.randn(2048, 512, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).float()
    before = torch.get_num_threads()
    outs = []
    try:
        for n in (before, 1):
            torch.set_num_threads(n)
            outs.append(pool(w, 4, 128, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0].view(torch.int16), outs[1].view(torch.int16))
