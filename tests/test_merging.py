"""`--method aligned`: exact where the heads of a group are related by maps the method can fold
(per-frequency complex scalars for RoPE keys — on the rotated rows only under partial rotary —, invertible
maps for values), where mean-pooling is not; similarity grouping finds a planted grouping after the heads
were shuffled; refusals are clear and point to mean-norm with refinement (tests/calibration/test_refine.py)."""
import math
import os
import subprocess
import sys

import pytest
import torch
from model_io import ids, load, logits, record
from tiny_models import save, tiny_model

import uptrain
from uptrain.arch import spec_for_config
from uptrain.calibration.text import OFFLINE_MIX
from uptrain.conversion.options import DEFAULT_REFINE_STEPS
from uptrain.errors import UptrainError
from uptrain.merging import head_gram, merge_attention, merge_pca, partition
from uptrain.pooling import pool_mean, pool_mean_norm, split_groups

from repo_paths import REPO as ROOT
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny matrices: a second thread only spins on a busy machine


# ------------------------------------------------------------------------------------------ planted heads
def pair_transform(dh: int, gen) -> torch.Tensor:
    """A real d_h × d_h map that is one complex scalar (rotation + scale) per rotate-half pair (f, f + d_h/2)."""
    half = dh // 2
    ang, mag = torch.rand(half, generator=gen) * 2 * math.pi, 0.5 + 1.5 * torch.rand(half, generator=gen)
    i, t = torch.arange(half), torch.zeros(dh, dh)
    t[i, i], t[i, i + half] = mag * torch.cos(ang), -mag * torch.sin(ang)
    t[i + half, i], t[i + half, i + half] = mag * torch.sin(ang), mag * torch.cos(ang)
    return t


def invertible(dh: int, gen) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(dh, dh, generator=gen))
    return q * (0.5 + 1.5 * torch.rand(dh, generator=gen))


def key_transform(d: int, rotary: int, gen) -> torch.Tensor:
    """A map between RoPE keys that a fold can undo: per-frequency complex scalars on the `rotary` rotated rows,
    any invertible map on the rows passed through (partial rotary)."""
    return torch.block_diag(pair_transform(rotary, gen), *([invertible(d - rotary, gen)] if rotary < d else []))


def plant(model, groups: int, seed: int = 0, q_scale: float = 3.0):
    """Make each group's K heads foldable maps of the group's first head (per-frequency complex scalars on RoPE's
    rows, invertible maps of the rows passed through under partial rotary; any invertible map without RoPE) and
    its V heads invertible maps of it (weights and biases alike, separate or fused projections, in any stored
    layout: Conv1D transposed, q/k/v fused per KV head). Queries are scaled up so attention is far from uniform
    and a blurred key shows in the logits."""
    from uptrain.calibration.aligned import rotary_dims

    cfg = model.config
    spec = spec_for_config(cfg)
    kv, d = spec.kv_heads(cfg), spec.head_dim(cfg)
    rotary = (rotary_dims(spec, cfg.to_dict()) or d) if spec.rope else 0
    n, gen, sd = kv // groups, torch.Generator().manual_seed(seed), model.state_dict()
    with torch.no_grad():
        for layer in range(spec.layers(cfg)):
            maps = {"k": [key_transform(d, rotary, gen) if rotary else invertible(d, gen) for _ in range(kv)],
                    "v": [invertible(d, gen) for _ in range(kv)]}
            prefix = spec.layer_prefix.format(layer)
            for suffix in spec.kv:
                t = sd.get(prefix + suffix)
                if t is None:
                    continue
                storage = spec.storage(suffix, cfg)
                c = storage.canonical(t).clone()
                for role, a, b in spec.rows(suffix, cfg):
                    heads = c[a:b].view(-1, d, *c.shape[1:])
                    if role == "q":
                        heads.mul_(q_scale)
                        continue
                    for h in range(kv):
                        if h % n:
                            heads[h] = torch.einsum("ij,j...->i...", maps[role][h], heads[h - h % n].clone())
                t.copy_(storage.stored(c, tuple(t.shape)))
            if f"{spec.q}.weight" not in spec.kv:
                sd[prefix + f"{spec.q}.weight"].mul_(q_scale)
    return model


def shuffle_heads(model, seed: int = 1) -> list[list[int]]:
    """Permute the (MHA, separate-projection) KV heads of every layer together with their query heads and
    o_proj columns: the same function, the planted groups scattered. Returns each layer's inverse map."""
    cfg = model.config
    h, d = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    gen, perms = torch.Generator().manual_seed(seed), []
    with torch.no_grad():
        for layer in model.model.layers:
            perm = torch.randperm(h, generator=gen)
            rows = (perm[:, None] * d + torch.arange(d)).reshape(-1)
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.weight.copy_(proj.weight[rows])
                if proj.bias is not None:
                    proj.bias.copy_(proj.bias[rows])
            layer.self_attn.o_proj.weight.copy_(layer.self_attn.o_proj.weight[:, rows])
            perms.append(perm.tolist())
    return perms


IDS = ids(2, 40, seed=3, low=0)


# ------------------------------------------------------------------------------------------ pure math
def rope(x: torch.Tensor) -> torch.Tensor:
    """HF rotate-half RoPE on [heads, T, d_h]."""
    t, dh = x.shape[1], x.shape[2]
    inv = 1.0 / (10000 ** (torch.arange(0, dh, 2, dtype=x.dtype) / dh))
    ang = torch.arange(t, dtype=x.dtype)[:, None] * inv
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    return x * cos + torch.cat([-x[..., dh // 2:], x[..., : dh // 2]], -1) * sin


def attend(x, q, k, v, o, use_rope=True):
    """Causal attention with augmented weights ([heads, d_h, D], bias last) and o [out, H·d_h]."""
    xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
    qs, ks, vs = (torch.einsum("hdi,ti->htd", w, xa) for w in (q, k, v))
    if use_rope:
        qs, ks = rope(qs), rope(ks)
    rep = q.shape[0] // k.shape[0]
    ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
    s = qs @ ks.mT / math.sqrt(q.shape[1])
    s = s.masked_fill(torch.ones_like(s[0], dtype=torch.bool).triu(1), -torch.inf)
    heads = torch.softmax(s, -1) @ vs  # [H, T, d_h]
    return heads.transpose(0, 1).reshape(x.shape[0], -1) @ o.T


def planted_layer(heads, kv, groups, dh=8, hidden=24, use_rope=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(heads, dh, hidden + 1, generator=gen, dtype=torch.float64)
    k = torch.randn(kv, dh, hidden + 1, generator=gen, dtype=torch.float64)
    v = torch.randn(kv, dh, hidden + 1, generator=gen, dtype=torch.float64)
    o = torch.randn(hidden, heads * dh, generator=gen, dtype=torch.float64)
    n = kv // groups
    for h in range(kv):
        if h % n:
            tk = pair_transform(dh, gen) if use_rope else invertible(dh, gen)
            k[h] = tk.double() @ k[h - h % n]
            v[h] = invertible(dh, gen).double() @ v[h - h % n]
    x = torch.randn(32, hidden, generator=gen, dtype=torch.float64)
    xa = torch.cat([x, torch.ones(32, 1, dtype=x.dtype)], 1)
    return x, xa.T @ xa, q * 0.5, k * 0.5, v, o


@pytest.mark.parametrize("heads, kv, groups", [(4, 4, 1), (8, 4, 2), (8, 8, 2)])
@pytest.mark.parametrize("use_rope", [True, False])
@pytest.mark.parametrize("weighted", [True, False])
def test_merge_attention_exact_for_foldable_heads(heads, kv, groups, use_rope, weighted):
    x, c, q, k, v, o = planted_layer(heads, kv, groups, use_rope=use_rope)
    ref = attend(x, q, k, v, o, use_rope)
    q2, k2, v2, o2, info = merge_attention(q, k, v, o, c, groups, rope=use_rope, weighted=weighted)
    assert k2.shape == v2.shape == (groups, *k.shape[1:]) and q2.shape == q.shape and o2.shape == o.shape
    assert (attend(x, q2, k2, v2, o2, use_rope) - ref).abs().max() <= 1e-9 * ref.abs().max()
    assert info["k_fit_error"] < 1e-10 and info["v_fit_error"] < 1e-10
    # mean-pooling the same heads is far off
    n = kv // groups
    km, vm = k.view(groups, n, *k.shape[1:]).mean(1), v.view(groups, n, *v.shape[1:]).mean(1)
    assert (attend(x, q, km, vm, o, use_rope) - ref).abs().max() > 0.05 * ref.abs().max()


def test_partial_rotary_merges_rotated_and_passed_rows_apart():
    """RoPE on the first 4 of 8 rows: keys related by complex scalars there and by any invertible map on
    the rest merge exactly; treating the whole head as rotated (or as unrotated) does not."""
    x, c, q, k, v, o = planted_layer(4, 4, 1)
    gen = torch.Generator().manual_seed(5)
    for h in range(1, 4):
        k[h] = key_transform(8, 4, gen).double() @ k[0]

    def partial(w):  # HF partial rotary: rotate_half over the first 4 rows, the rest as they are
        return torch.cat([rope(w[..., :4]), w[..., 4:]], -1)

    def attend_partial(q, k, v, o):
        xa = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)
        qs, ks, vs = (torch.einsum("hdi,ti->htd", w, xa) for w in (q, k, v))
        qs, ks = partial(qs), partial(ks)
        rep = q.shape[0] // k.shape[0]
        s = qs @ ks.repeat_interleave(rep, 0).mT / math.sqrt(8)
        s = s.masked_fill(torch.ones_like(s[0], dtype=torch.bool).triu(1), -torch.inf)
        heads = torch.softmax(s, -1) @ vs.repeat_interleave(rep, 0)
        return heads.transpose(0, 1).reshape(x.shape[0], -1) @ o.T

    ref = attend_partial(q, k, v, o)
    q2, k2, v2, o2, info = merge_attention(q, k, v, o, c, 1, rotary_dims=4)
    assert (attend_partial(q2, k2, v2, o2) - ref).abs().max() <= 1e-9 * ref.abs().max()
    assert info["k_fit_error"] < 1e-10
    for wrong in (None, 8):  # the whole head as rotated
        q3, k3, v3, o3, info = merge_attention(q, k, v, o, c, 1, rotary_dims=wrong)
        assert info["k_fit_error"] > 0.01
        assert (attend_partial(q3, k3, v3, o3) - ref).abs().max() > 0.01 * ref.abs().max()


def test_rope_keys_related_by_a_general_map_are_not_foldable():
    """The complex-scalar restriction is real: an arbitrary invertible map between RoPE keys does not
    commute with the rotations, so the merge is approximate (and says so) rather than silently exact."""
    x, c, q, k, v, o = planted_layer(4, 4, 1, use_rope=False)  # K heads related by general maps
    *_, info = merge_attention(q, k, v, o, c, 1, rope=True)
    assert info["k_fit_error"] > 0.05 and info["v_fit_error"] < 1e-10


def test_key_segments_put_the_slowest_pairs_apart():
    """Rotate-half rows of a d_h = 8 head: pairs (0,4) (1,5) (2,6) (3,7), slowest last. Two static pairs are rows
    3, 7 and 2, 6; under partial rotary (4 rows rotated) the static pair joins the rows passed through."""
    from uptrain.merging import key_segments

    assert key_segments(8, True) == [([0, 1, 2, 3, 4, 5, 6, 7], True)]
    assert key_segments(8, True, static_pairs=2) == [([0, 1, 4, 5], True), ([2, 3, 6, 7], False)]
    assert key_segments(8, True, rotary_dims=4, static_pairs=1) == [([0, 2], True), ([1, 3, 4, 5, 6, 7], False)]
    assert key_segments(8, False, static_pairs=2) == [(list(range(8)), False)]


def test_static_pairs_fold_what_per_pair_scalars_cannot():
    """Keys related by one complex number per pair on the fast pairs and by a general map across the two slowest
    pairs: merged as static, those pairs fit exactly (the per-pair merge cannot), and over a span where they
    turn little the attention output is far closer to the source's."""
    x, c, q, k, v, o = planted_layer(4, 4, 1)
    gen = torch.Generator().manual_seed(7)
    fast, slow = [0, 1, 4, 5], [2, 3, 6, 7]
    for h in range(1, 4):
        t = torch.zeros(8, 8, dtype=torch.float64)
        t[torch.tensor(fast)[:, None], torch.tensor(fast)] = pair_transform(4, gen).double()
        t[torch.tensor(slow)[:, None], torch.tensor(slow)] = invertible(4, gen).double()
        k[h] = t @ k[0]
    ref = attend(x, q, k, v, o)
    per_pair = merge_attention(q, k, v, o, c, 1)
    static = merge_attention(q, k, v, o, c, 1, static_pairs=2)
    assert static[4]["k_fit_error"] < 1e-10 < 0.01 < per_pair[4]["k_fit_error"]
    err = [float((attend(x, *m[:4]) - ref).norm() / ref.norm()) for m in (static, per_pair)]
    assert err[0] < 0.5 * err[1]


def test_pca_fit_beats_the_mean_head():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 8, 17, generator=gen, dtype=torch.float64)
    x = torch.randn(200, 17, generator=gen, dtype=torch.float64)
    c = x.T @ x
    shared, maps, residual = merge_pca(w, head_gram(w, c))

    def err(fit):  # the group's key/value energy the fit misses, as a fraction
        return ((x @ (w - fit).mT) ** 2).sum() / ((x @ w.mT) ** 2).sum()
    assert err(maps @ shared) == pytest.approx(float(residual), rel=1e-6)
    assert err(w.mean(0).expand_as(w)) > 1.5 * residual


def test_partition_recovers_planted_blocks():
    gen = torch.Generator().manual_seed(0)
    truth = [[0, 5, 9, 12], [1, 2, 7, 14], [3, 4, 10, 11], [6, 8, 13, 15]]
    cost = 0.5 + 0.1 * torch.rand(16, 16, generator=gen)
    for g in truth:
        for a in g:
            for b in g:
                cost[a, b] = 0.05 * torch.rand(1, generator=gen).item()
    cost = (cost + cost.T) / 2
    cost.fill_diagonal_(0)
    assert partition(cost, 4) == truth
    assert partition(cost, 1) == [list(range(16))]


def test_similarity_grouping_recovers_shuffled_groups():
    x, c, q, k, v, o = planted_layer(8, 8, 2)
    perm = torch.tensor([3, 6, 0, 5, 2, 7, 4, 1])  # new head i = old head perm[i]
    rows = (perm[:, None] * 8 + torch.arange(8)).reshape(-1)
    q, k, v, o = q[perm], k[perm], v[perm], o[:, rows]
    ref = attend(x, q, k, v, o)
    q2, k2, v2, o2, info = merge_attention(q, k, v, o, c, 2, grouping="similarity")
    planted = sorted(sorted(i for i in range(8) if perm[i] // 4 == j) for j in range(2))
    assert info["kv_groups"] == planted
    assert (attend(x, q2, k2, v2, o2) - ref).abs().max() <= 1e-9 * ref.abs().max()
    q3, k3, v3, o3, _ = merge_attention(q, k, v, o, c, 2, grouping="contiguous")
    assert (attend(x, q3, k3, v3, o3) - ref).abs().max() > 0.05 * ref.abs().max()


def test_mean_norm_matches_its_definition():
    """Issue 7: mean-pool, then rescale each pooled row to the mean norm of the rows it came from."""
    w = torch.randn(6 * 4, 10)  # 6 heads of 4 rows → 2 groups of 3
    out = pool_mean_norm(w, 2, 4).view(2, 4, 10)
    heads = split_groups(w, 2, 4)  # [2, 3, 4, 10]
    for g in range(2):
        for r in range(4):
            rows = heads[g, :, r]
            expected = rows.mean(0) / rows.mean(0).norm() * rows.norm(dim=-1).mean()
            assert torch.allclose(out[g, r], expected, atol=1e-6)
    bias = torch.randn(6 * 4)
    assert torch.allclose(pool_mean_norm(bias, 2, 4), pool_mean(bias, 2, 4))  # 1-D: plain mean


# ------------------------------------------------------------------------------------------ checkpoints
FOLDABLE = {"phi": {"qk_layernorm": False}}  # tiny phi has q/k LayerNorms, which no fold passes (refused below)


@pytest.mark.parametrize("arch, kv, groups", [
    ("llama", 4, 1),       # a GQA source reduced to MQA: 2 query heads per source KV head
    ("qwen2", None, 2),    # q/k/v biases ride along as the constant column
    ("starcoder2", None, 2),  # biases everywhere, LayerNorm with bias
    ("gemma", None, 2),    # explicit head_dim ≠ hidden / heads
    ("phi3", None, 4),     # fused qkv_proj
    ("stablelm", None, 2),  # partial rotary (a quarter of each head): rotated rows and the rest apart
    ("gemma2", None, 2),   # attention logit soft-capping: exact folds keep the scores it caps
    ("smollm3", None, 2),  # layers without RoPE take the same per-frequency fold
    ("mixtral", None, 2),  # mixture-of-experts MLP: attention only
    ("phi", None, 2),      # partial rotary (half of each head), biases, `dense`; built without qk_layernorm
])
def test_aligned_reproduces_source_logits(arch, kv, groups, tmp_path, tokenizer):
    model = plant(tiny_model(arch, kv_heads=kv, **FOLDABLE.get(arch, {})), groups)
    src = save(model, tmp_path / "src", tokenizer=tokenizer)
    ref = logits(model, IDS)
    r = uptrain.convert(src, tmp_path / "aligned", groups=groups, method="aligned", calibration_tokens=256,
                        progress=False)
    uptrain.convert(src, tmp_path / "mean", groups=groups, method="mean", progress=False)
    aligned, mean = load(tmp_path / "aligned"), load(tmp_path / "mean")
    assert aligned.config.num_key_value_heads == groups and r.kv_heads_after == groups
    assert (logits(aligned, IDS) - ref).abs().max().item() <= 1e-4
    assert (logits(mean, IDS) - ref).abs().max().item() >= 0.03
    conv = record(tmp_path / "aligned")["conversion"]
    assert conv["method"] == "aligned" and conv["grouping"] == "contiguous"
    assert conv["calibration"]["tokens"] == 256 and conv["calibration"]["data"] == " + ".join(
        s.source for s in OFFLINE_MIX)
    assert [entry["layer"] for entry in conv["aligned"]["layers"]] == [0, 1]
    assert all(entry["k_fit_error"] < 1e-6 and entry["v_fit_error"] < 1e-6 for entry in conv["aligned"]["layers"])


# The real CLI in a subprocess, on one torch thread: two OpenMP threads on a busy 2-core machine cost several
# times the CPU time for matrices this small.
ONE_THREAD = dict(os.environ, OMP_NUM_THREADS="1")


def test_similarity_grouping_through_the_cli(tmp_path, tokenizer, capfd):
    """The CLI's main() in-process (argv parsing, exit status, the progress bar); the fresh-interpreter CLI runs
    in the refusal test below and in tests/conversion/test_cli_convert.py."""
    from uptrain.cli import main

    model = plant(tiny_model("llama"), 2)
    perms = shuffle_heads(model)
    src = save(model, tmp_path / "src", tokenizer=tokenizer)
    ref = logits(model, IDS)
    out = tmp_path / "out"
    status = main(["convert", src, str(out), "--groups", "2", "--method", "aligned", "--grouping", "similarity",
                   "--calibration-tokens", "300"])
    err = capfd.readouterr().err
    assert status == 0, err
    assert "calibrate" in err  # the calibration pass shows a progress bar
    conv = record(out)["conversion"]
    assert conv["grouping"] == "similarity" and conv["calibration"]["tokens"] == 300
    for layer, perm in zip(conv["aligned"]["layers"], perms):
        planted = sorted(sorted(i for i in range(8) if perm[i] // 4 == j) for j in range(2))
        assert layer["kv_groups"] == planted
    assert (logits(load(out), IDS) - ref).abs().max().item() <= 1e-4
    # the same model with contiguous groups merges unrelated heads
    uptrain.convert(src, tmp_path / "contig", groups=2, method="aligned", calibration_tokens=300, progress=False)
    assert (logits(load(tmp_path / "contig"), IDS) - ref).abs().max().item() >= 0.03


def test_refuses_per_head_norms_through_the_cli(tmp_path):
    src = save(tiny_model("qwen3"), tmp_path / "src")
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "uptrain", "convert", src, str(out), "--groups", "2",
                        "--method", "aligned"], capture_output=True, text=True, cwd=ROOT, env=ONE_THREAD)
    assert p.returncode == 2
    msg = p.stderr.strip().splitlines()
    assert len(msg) == 1 and "k_norm" in msg[0] and "Traceback" not in p.stderr
    assert f"use --method mean-norm with --refine-steps {DEFAULT_REFINE_STEPS} instead" in msg[0]  # the CLI's words
    assert not out.exists() and not any(n.startswith(".out") for n in os.listdir(tmp_path))


@pytest.mark.parametrize("arch, over, words", [
    ("olmo2", {}, "k_norm"),
    ("olmo", {"clip_qkv": 8.0}, "clip_qkv"),
    ("cohere", {}, "rotate-half layout"),
])
def test_refuses_what_it_cannot_fold(arch, over, words, tmp_path, tokenizer):
    src = save(tiny_model(arch, **over), tmp_path / "src", tokenizer=tokenizer)
    with pytest.raises(UptrainError, match=words) as e:
        uptrain.convert(src, tmp_path / "out", groups=2, method="aligned", progress=False)
    assert "mean-norm" in str(e.value)
    assert not (tmp_path / "out").exists()
