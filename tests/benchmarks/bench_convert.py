"""Benchmark: streaming `uptrain convert` vs the naive recipe vs a plain copy, side by side.

    python tests/benchmarks/bench_convert.py [--workdir DIR] [--keep]

Generates a Llama-shaped bf16 MHA checkpoint (hidden 2048, 16 layers, 16 heads, vocab 32000: ~1.9 GB),
written once in ~0.5 GB shards and once in ~2 GB shards, then measures wall time and peak RSS (of the
process and its children, from wait4) for:
  copy    `cp -r` of the folder (the floor for anything that writes the same bytes)
  uptrain `uptrain convert SRC OUT --groups 4` in a fresh interpreter (start-up included)
  naive   load the model with transformers, mean-pool K/V, build a GQA model, save_pretrained
Targets (issue 2): convert ≤ 2× copy, ≥ 10× faster than naive, peak RSS ≤ 0.5 GB + 2× largest tensor,
the same for both shard sizes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HIDDEN, LAYERS, HEADS, VOCAB, INTER = 2048, 16, 16, 32000, 5632
NAIVE = r"""
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM
src, out, g = sys.argv[1], sys.argv[2], int(sys.argv[3])
m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
cfg = AutoConfig.from_pretrained(src); h = cfg.num_attention_heads; d = cfg.hidden_size // h
sd = m.state_dict()
for k in list(sd):
    if ".k_proj." in k or ".v_proj." in k:
        sd[k] = sd[k].float().view(g, h // g, d, -1).mean(1).reshape(g * d, -1).to(torch.bfloat16)
cfg.num_key_value_heads = g
new = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
new.load_state_dict(sd)
new.save_pretrained(out)
"""


def make_checkpoint(folder: str, shard_bytes: int) -> int:
    """Random bf16 weights written shard by shard (never the whole model in memory)."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    os.makedirs(folder, exist_ok=True)
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=HEADS, vocab_size=VOCAB,
                      tie_word_embeddings=False, dtype="bfloat16")
    cfg.save_pretrained(folder)
    shapes = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            shapes[p + f"self_attn.{n}_proj.weight"] = (HIDDEN, HIDDEN)
        shapes[p + "mlp.gate_proj.weight"] = (INTER, HIDDEN)
        shapes[p + "mlp.up_proj.weight"] = (INTER, HIDDEN)
        shapes[p + "mlp.down_proj.weight"] = (HIDDEN, INTER)
        shapes[p + "input_layernorm.weight"] = (HIDDEN,)
        shapes[p + "post_attention_layernorm.weight"] = (HIDDEN,)
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    groups, cur, size = [], [], 0
    for n, s in shapes.items():
        b = 2
        for x in s:
            b *= x
        if cur and size + b > shard_bytes:
            groups.append(cur)
            cur, size = [], 0
        cur.append(n)
        size += b
    groups.append(cur)
    weight_map, total = {}, 0
    g = torch.Generator().manual_seed(0)
    for i, names in enumerate(groups):
        fname = "model.safetensors" if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        sd = {n: (torch.randn(shapes[n], generator=g) * 0.02).to(torch.bfloat16) for n in names}
        total += sum(t.numel() * 2 for t in sd.values())
        save_file(sd, os.path.join(folder, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in names})
        del sd
    if len(groups) > 1:
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return total


def measure(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of a command and its children."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd} failed: {p.stderr.read().decode()[-2000:]}")
    return wall, ru.ru_maxrss / 1024 ** 2  # ru_maxrss is in KB on Linux


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--generate", nargs=2, metavar=("DIR", "SHARD_BYTES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate:
        make_checkpoint(args.generate[0], int(args.generate[1]))
        return
    work = args.workdir or tempfile.mkdtemp(prefix="bench-convert-")
    largest = VOCAB * HIDDEN * 2 / 1e9  # embed / lm_head, GB
    rows = []
    try:
        for label, shard in (("0.5 GB shards", 500_000_000), ("2 GB shards", 2_000_000_000)):
            src = os.path.join(work, f"src-{shard}")
            if not os.path.isdir(src):
                print(f"generating {label} checkpoint …", flush=True)
                # In a child process: a fork of a big parent would count the parent's pages in the
                # children's peak RSS below.
                subprocess.run([sys.executable, __file__, "--generate", src, str(shard)], check=True)
            n_files = len([f for f in os.listdir(src) if f.endswith(".safetensors")])
            print(f"  {label}: {n_files} file(s)", flush=True)
            res = {}
            for name, cmd in (
                ("copy", ["cp", "-r", src, os.path.join(work, "copy")]),
                ("uptrain", [sys.executable, "-m", "uptrain", "convert", src, os.path.join(work, "gqa"), "--groups",
                             "4", "--quiet"]),
                ("naive", [sys.executable, "-c", NAIVE, src, os.path.join(work, "naive"), "4"]),
            ):
                if name == "naive" and args.skip_naive:
                    continue
                res[name] = measure(cmd)
                print(f"  {label:14} {name:8} {res[name][0]:7.1f} s   peak RSS {res[name][1]:5.2f} GB", flush=True)
                for d in ("copy", "gqa", "naive"):
                    shutil.rmtree(os.path.join(work, d), ignore_errors=True)
            rows.append((label, res))
        print()
        print(f"largest tensor: {largest:.3f} GB → RSS target ≤ {0.5 + 2 * largest:.2f} GB")
        print("| shards | copy s | uptrain s | naive s | uptrain/copy | naive/uptrain | uptrain RSS GB | naive RSS GB |")
        print("|---|---|---|---|---|---|---|---|")
        for label, r in rows:
            c, u, n = r["copy"], r["uptrain"], r.get("naive", (float("nan"), float("nan")))
            print(f"| {label} | {c[0]:.1f} | {u[0]:.1f} | {n[0]:.1f} | {u[0] / c[0]:.2f}× | {n[0] / u[0]:.1f}× | "
                  f"{u[1]:.2f} | {n[1]:.2f} |")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
