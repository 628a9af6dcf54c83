"""Benchmark: streaming `uptrain convert` against a plain `cp -r` of the same folder (and the naive recipe).

    python tests/benchmarks/bench_convert.py [--workdir DIR] [--keep] [--cases small,7b] [--repeats N]
                                             [--naive]

Cases (random bf16 weights, MHA, generated shard by shard with safetensors' save_file: never a whole model
in memory; a real LlamaConfig config.json and a model.safetensors.index.json):
  small  Llama-shaped, hidden 2048, 16 layers, 16 heads, intermediate 5632, vocab 32000: ~1.9 GB, written
         once in ~0.5 GB shards and once in ~2 GB shards; converted → 4 KV heads
  7b     Llama-2-7B-shaped, hidden 4096, 32 layers, 32 heads, intermediate 11008, vocab 32000: ~13.5 GB in
         7 shards of ~2 GB; converted → 8 KV heads
Measured, alternating in one run (the page cache cannot be dropped here, so each command runs once first
as a warm-up, then `--repeats` pairs):
  cp       `cp -r SRC DST` (the floor for anything that writes the same bytes)
  uptrain  `python -m uptrain convert SRC OUT --groups G -q` in a fresh interpreter (start-up included)
  naive    (with --naive, small case only) load with transformers, mean-pool K/V, save_pretrained
Wall time and peak RSS (of the command and its children, from wait4). Prints every pair's uptrain/cp
ratio and min / median. Targets: uptrain ≤ 1.3× cp on the 7B case, ≤ 2× on the small case; peak RSS ≤
0.5 GB + 2× the largest tensor.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

CASES = {
    # name: (hidden, layers, heads, intermediate, vocab, groups, [shard sizes])
    "small": (2048, 16, 16, 5632, 32000, 4, [500_000_000, 2_000_000_000]),
    "7b": (4096, 32, 32, 11008, 32000, 8, [2_000_000_000]),
}
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


def tensor_shapes(hidden: int, layers: int, inter: int, vocab: int) -> dict[str, tuple[int, ...]]:
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            shapes[p + f"self_attn.{n}_proj.weight"] = (hidden, hidden)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def make_checkpoint(folder: str, case: str, shard_bytes: int) -> int:
    """Random bf16 weights written shard by shard. Each tensor is a slice, at a random offset, of one pool
    of N(0, 0.02²) bf16 values (64 Mi elements, cloned): cheap to make, distinct per tensor, and the
    generator holds one shard at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    hidden, layers, heads, inter, vocab, _, _ = CASES[case]
    os.makedirs(folder, exist_ok=True)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                      max_position_embeddings=4096, tie_word_embeddings=False, dtype="bfloat16")
    cfg.save_pretrained(folder)
    shapes = tensor_shapes(hidden, layers, inter, vocab)
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
    gen = torch.Generator().manual_seed(0)
    largest = max(torch.Size(s).numel() for s in shapes.values())
    pool_n = 64 << 20
    pool = (torch.randn(pool_n + largest, generator=gen) * 0.02).to(torch.bfloat16)
    weight_map, total = {}, 0
    for i, names in enumerate(groups):
        fname = "model.safetensors" if len(groups) == 1 else f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        sd = {}
        for n in names:
            k = torch.Size(shapes[n]).numel()
            off = int(torch.randint(0, pool_n, (), generator=gen))
            sd[n] = pool[off:off + k].view(shapes[n]).clone()  # save_file refuses tensors sharing memory
        total += sum(t.numel() * 2 for t in sd.values())
        save_file(sd, os.path.join(folder, fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in names})
        del sd
    if len(groups) > 1:
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return total


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))


def measure(cmd: list[str]) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of a command and its children."""
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    wall = time.perf_counter() - t
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{cmd} failed: {p.stderr.read().decode()[-2000:]}")
    return wall, ru.ru_maxrss / 1024 ** 2  # ru_maxrss is in KB on Linux


def run_case(work: str, case: str, shard: int, repeats: int, naive: bool) -> dict:
    hidden, layers, heads, inter, vocab, groups, _ = CASES[case]
    label = f"{case}, {shard / 1e9:.1f} GB shards"
    src = os.path.join(work, f"src-{case}-{shard}")
    if not os.path.isdir(src):
        print(f"generating {label} checkpoint …", flush=True)
        t = time.perf_counter()
        # In a child process: a fork of a big parent would count the parent's pages in the children's
        # peak RSS below.
        subprocess.run([sys.executable, __file__, "--generate", src, case, str(shard)], check=True)
        print(f"  generated in {time.perf_counter() - t:.0f} s", flush=True)
    n_files = len([f for f in os.listdir(src) if f.endswith(".safetensors")])
    size = folder_bytes(src)
    print(f"{label}: {size / 1e9:.2f} GB in {n_files} file(s), → {groups} KV heads", flush=True)
    dst = {"cp": os.path.join(work, "copy"), "uptrain": os.path.join(work, "gqa"),
           "naive": os.path.join(work, "naive")}
    cmds = {"cp": ["cp", "-r", src, dst["cp"]],
            "uptrain": [sys.executable, "-m", "uptrain", "convert", src, dst["uptrain"], "--groups", str(groups),
                        "-q"]}
    if naive:
        cmds["naive"] = [sys.executable, "-c", NAIVE, src, dst["naive"], str(groups)]

    def once(name: str) -> tuple[float, float]:
        r = measure(cmds[name])
        for d in dst.values():
            shutil.rmtree(d, ignore_errors=True)
        return r

    for name in cmds:  # warm-up: page cache, .pyc files
        w, rss = once(name)
        print(f"  warm-up  {name:8} {w:7.2f} s   peak RSS {rss:5.2f} GB", flush=True)
    pairs = []
    for i in range(repeats):
        order = ("cp", "uptrain") if i % 2 == 0 else ("uptrain", "cp")
        r = {name: once(name) for name in order}
        pairs.append(r)
        print(f"  pair {i + 1}   cp {r['cp'][0]:6.2f} s   uptrain {r['uptrain'][0]:6.2f} s "
              f"(peak RSS {r['uptrain'][1]:.2f} GB)   ratio {r['uptrain'][0] / r['cp'][0]:.2f}×", flush=True)
    res = {"label": label, "size": size, "pairs": pairs,
           "naive": once("naive") if naive else None}
    if naive:
        print(f"  naive {res['naive'][0]:.1f} s, peak RSS {res['naive'][1]:.2f} GB", flush=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=None, help="where to generate checkpoints (default: a temp folder in /tmp)")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints (reused by --workdir)")
    ap.add_argument("--cases", default="small,7b", help="comma-separated: small, 7b")
    ap.add_argument("--repeats", type=int, default=3, help="timed cp/uptrain pairs per case (after a warm-up)")
    ap.add_argument("--naive", action="store_true", help="also time the load-pool-save_pretrained recipe (small)")
    ap.add_argument("--generate", nargs=3, metavar=("DIR", "CASE", "SHARD_BYTES"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate:
        make_checkpoint(args.generate[0], args.generate[1], int(args.generate[2]))
        return
    work = args.workdir or tempfile.mkdtemp(prefix="bench-convert-")
    os.makedirs(work, exist_ok=True)
    results = []
    try:
        for case in args.cases.split(","):
            for shard in CASES[case][6]:
                results.append(run_case(work, case, shard, args.repeats, args.naive and case == "small"))
                if not args.keep:
                    shutil.rmtree(os.path.join(work, f"src-{case}-{shard}"), ignore_errors=True)
        print()
        print("| checkpoint | GB | cp s (min / median) | uptrain s (min / median) | uptrain/cp per pair | "
              "ratio min / median | uptrain peak RSS GB |")
        print("|---|---|---|---|---|---|---|")
        for r in results:
            cp = [p["cp"][0] for p in r["pairs"]]
            up = [p["uptrain"][0] for p in r["pairs"]]
            ratios = [u / c for u, c in zip(up, cp)]
            rss = max(p["uptrain"][1] for p in r["pairs"])
            print(f"| {r['label']} | {r['size'] / 1e9:.2f} | {min(cp):.2f} / {statistics.median(cp):.2f} | "
                  f"{min(up):.2f} / {statistics.median(up):.2f} | {' '.join(f'{x:.2f}' for x in ratios)} | "
                  f"{min(ratios):.2f}× / {statistics.median(ratios):.2f}× | {rss:.2f} |")
        for r in results:
            if r["naive"]:
                up = statistics.median(p["uptrain"][0] for p in r["pairs"])
                print(f"naive recipe ({r['label']}): {r['naive'][0]:.1f} s, peak RSS {r['naive'][1]:.2f} GB "
                      f"({r['naive'][0] / up:.1f}× uptrain)")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
