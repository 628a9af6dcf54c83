"""Decode speed and KV-cache size of MHA vs its GQA-{H/2, H/4} and MQA conversions, side by side (CPU).

    python tests/benchmarks/bench_decode.py                      # ~5 min on 2 busy cores
    python tests/benchmarks/bench_decode.py --settings 1x256 8x1024 --threads 2

One small Llama-shaped model (random weights: speed does not depend on them) is converted with
`uptrain.convert` to G = H/2, H/4 and 1 KV heads. For each (batch × context) setting every model decodes
`--new-tokens` tokens after a prompt of `context` tokens with real `generate` calls (uptrain.evaluation's
decode_speed: one warm-up, then median of `--repeats`). Printed per setting: ms per decode step, tokens/s,
speed-up over MHA, the ideal H/G, and what a purely memory-bound decoder would gain:
(weights + MHA cache) / (weights + GQA cache) bytes read per step.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.dirname(os.path.dirname(HERE))]  # tests/ and the repo root


def build(folder: str, heads: int, hidden: int, layers: int, vocab: int, max_pos: int) -> dict[int, str]:
    """MHA checkpoint + its conversions: {G: path}."""
    from tiny_models import save, tiny_model
    from uptrain import convert

    mha = save(tiny_model(heads=heads, hidden=hidden, layers=layers, vocab=vocab, max_position_embeddings=max_pos,
                          intermediate_size=int(2.75 * hidden)), os.path.join(folder, "mha"))
    paths = {heads: mha}
    for g in (heads // 2, heads // 4, 1):
        if g >= 1 and g not in paths:
            paths[g] = convert(mha, os.path.join(folder, f"gqa{g}"), groups=g, progress=False).out
    return paths


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--settings", nargs="+", default=["1x256", "1x2048", "8x1024"], help="BATCHxCONTEXT")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from uptrain.arch import attention_shape
    from uptrain.evaluation.cost import decode_speed

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    settings = [tuple(int(x) for x in s.lower().split("x")) for s in args.settings]
    max_ctx = max(c for _, c in settings) + args.new_tokens
    dtype = getattr(torch, args.dtype)
    H = args.heads
    print(f"model: llama, {args.layers} layers, hidden {args.hidden}, H={H} heads × head_dim {args.hidden // H}, "
          f"vocab {args.vocab}, {args.dtype}; torch {torch.__version__}, {args.threads} thread(s); "
          f"{args.new_tokens} new tokens, median of {args.repeats}")

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        paths = build(tmp, H, args.hidden, args.layers, args.vocab, max(4096, max_ctx))
        models = {g: AutoModelForCausalLM.from_pretrained(p, dtype=dtype).eval() for g, p in sorted(paths.items(),
                                                                                                      reverse=True)}
        print(f"built and converted in {time.time() - t0:.1f} s\n")
        weights = {g: sum(p.numel() * p.element_size() for p in m.parameters()) for g, m in models.items()}
        per_tok = {g: attention_shape(m.config).kv_cache_bytes_per_token(m.dtype.itemsize) for g, m in models.items()}

        name = {g: "MHA" if g == H else "MQA" if g == 1 else f"GQA-{g}" for g in models}
        print("KV-cache bytes (formula; checked against the real cache after each generate below)")
        ctxs = [256, 1024, 4096, 32768]
        print(f"{'model':8} {'G':>3} {'weights MB':>10} {'B/token':>8} " + " ".join(f"{'@' + str(c):>10}" for c in ctxs)
              + f" {'vs MHA':>7}")
        for g in models:
            print(f"{name[g]:8} {g:>3} {weights[g] / 1e6:>10.1f} {per_tok[g]:>8} "
                  + " ".join(f"{per_tok[g] * c / 2**20:>8.1f}Mi" for c in ctxs) + f" {per_tok[H] / per_tok[g]:>6.0f}×")

        gen = torch.Generator().manual_seed(0)
        for batch, ctx in settings:
            prompt = torch.randint(2, args.vocab, (batch, ctx), generator=gen)
            print(f"\nbatch {batch}, context {ctx} (+{args.new_tokens}): cache at mid-decode "
                  f"{per_tok[H] * batch * (ctx + args.new_tokens // 2) / 2**20:.0f} MiB for MHA, weights "
                  f"{weights[H] / 2**20:.0f} MiB")
            print(f"{'model':8} {'ms/step':>8} {'tok/s':>8} {'prefill tok/s':>13} {'speed-up':>8} {'H/G':>5} "
                  f"{'mem-bound':>9} {'cache ok':>8}")
            base = None
            for g, model in models.items():
                r = decode_speed(model, prompt, args.new_tokens, args.repeats, pad_token_id=0)
                ok = r["kv_cache_measured_bytes"] == per_tok[g] * r["kv_cache_measured_positions"]
                base = base or r
                cache = lambda gg: per_tok[gg] * batch * (ctx + args.new_tokens // 2)  # noqa: E731
                bound = (weights[H] + cache(H)) / (weights[g] + cache(g))
                speedup = base["decode_ms_per_token"] / r["decode_ms_per_token"]
                print(f"{name[g]:8} {r['decode_ms_per_token']:>8.2f} {r['decode_tokens_per_s']:>8.1f} "
                      f"{r['prefill_tokens_per_s']:>13,.0f} {speedup:>7.2f}× "
                      f"{H / g:>4.0f}× {bound:>8.2f}× {'yes' if ok else 'NO':>8}")
                sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
