"""`uptrain eval … --engine vllm` end to end through the real console script: the vLLM columns join the same
rows, table, JSON and plot. Slow tier (one vLLM child serves the five models, one with per-layer KV heads);
skipped without vLLM unless UPTRAIN_REQUIRE_VLLM=1 (CI)."""
import json
import os
import subprocess
import sys

import pytest
from repo_paths import REPO as ROOT
from serving_models import HEADS, require_vllm, save_servable

import uptrain

pytestmark = pytest.mark.slow
KV_CACHE = 64 << 20


def test_eval_engine_vllm_through_the_real_cli(tmp_path, tokenizer):
    require_vllm()
    llama = save_servable("llama", tmp_path / "llama", tokenizer)
    neox = save_servable("gpt_neox", tmp_path / "neox", tokenizer)
    for src, g in ((llama, 2), (llama, 1), (neox, 2)):
        uptrain.convert(src, f"{src}-g{g}", groups=g, progress=False)
    uptrain.convert(llama, f"{llama}-g2,1", groups=[2, 1], progress=False)  # per-layer KV heads (nemotron-nas)
    models = [llama, f"{llama}-g2", f"{llama}-g1", f"{neox}-g2", f"{llama}-g2,1"]
    out = tmp_path / "out"
    out.mkdir()
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "uptrain", "eval", *models, "--labels", "mha,gqa2,mqa,neox-gqa2,per-layer",
                        "--eval-tokens", "200", "--seq-len", "64", "--prompt-len", "16", "--new-tokens", "32",
                        "--repeats", "1", "--threads", "1", "--engine", "vllm", "--vllm-kv-cache", "64MiB",
                        "--vllm-requests", "8", "--json", str(out / "r.json"), "--markdown", str(out / "r.md"),
                        "--plot", str(out / "r.png"), "-q"],
                       capture_output=True, text=True, cwd=ROOT, env=env, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads((out / "r.json").read_text())
    assert [r["label"] for r in rows] == ["mha", "gqa2", "mqa", "neox-gqa2", "per-layer"]
    settings = rows[0]["settings"]
    assert settings["engine"] == "vllm" and settings["vllm"]["kv_cache_bytes"] == KV_CACHE
    for r in rows:
        # vLLM's cache holds what uptrain's formula says fits in the same memory (whole blocks)
        per_block = r["kv_cache_bytes_per_token"] * r["vllm_block_size"]
        assert r["vllm_kv_cache_tokens"] == KV_CACHE // per_block * r["vllm_block_size"]
        assert r["vllm_max_concurrency"] == r["vllm_kv_cache_blocks"] // -(-64 // r["vllm_block_size"])  # context 64
        assert r["vllm_greedy_identical"] == r["vllm_greedy_prompts"] == 8 and r["vllm_greedy_agreement"] == 1.0
        assert r["vllm_output_tokens_per_s"] > 0 and r["vllm_requests"] == 8
        assert r["vllm_device"] == "cpu" and r["vllm_dtype"] == "float32" and r["vllm_eager"] is True  # CPU default
    # per-layer: 2 then 1 KV heads of the source's 4 in its two layers, 3/8 of the source's bytes (KV capacity
    # in whole blocks, hence approx)
    assert [r["vllm_kv_capacity_ratio"] for r in rows][:4] == [1.0, HEADS / 2, HEADS, HEADS / 2]
    assert rows[4]["vllm_kv_capacity_ratio"] == pytest.approx(2 * HEADS / 3, rel=0.01)
    # the transformers columns are still there, and agree with vLLM's on the cache size
    assert [r["kv_ratio"] for r in rows] == [1.0, 2 / HEADS, 1 / HEADS, 2 / HEADS, 3 / (2 * HEADS)]
    md = (out / "r.md").read_text()
    assert "vLLM KV tokens" in md and "| 8/8 (1.00) |" in md and "vLLM = HF: prompts whose 32 greedy tokens" in md
    assert "on cpu (float32, eager): vLLM KV tokens = what 64 MiB of KV cache holds" in md
    png = (out / "r.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[16:20], "big") > 1200  # three panels
