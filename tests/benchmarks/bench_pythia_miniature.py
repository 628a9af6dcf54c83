"""The demo's pipeline on a Pythia-shaped model: does "it works for GPT-NeoX" hold in numbers?

    python tests/benchmarks/bench_pythia_miniature.py [--out DIR] [--quick]

Runs `uptrain demo`'s stages (uptrain/miniature/stages.py: same data, tokenizer, sizes, schedule, α = 0.05)
with a GPT-NeoX in place of the Llama: 4 layers, 8 heads, hidden 256, Pythia's rotary_pct 0.25, parallel
residual, untied embeddings; pre-trained for N = 320 steps, converted to GQA-2 and MQA (mean pooling, and
aligned with its default refinement; the results carry uptrain's modeling file and load with trust_remote_code=True), uptrained α·N = 16 steps at
the lr pre-training ended at, next to the MHA model continued for the same steps, and evaluated on the
same 16k held-out tokens. Prints the table (step-0 and uptrained perplexity, KV cache per token) and
writes it to DIR/pythia.md. About 5 minutes on 2 CPU cores (--quick: the demo's quick size, under one).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="pythia-demo-out")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM, GPTNeoXConfig

    from uptrain.miniature.sizes import FULL, QUICK, Variant
    from uptrain.miniature.stages import (Run, convert_variants, evaluate_all, prepare_data, say, train_run,
                                          uptrain_variants)
    from uptrain.miniature.state import State

    size = QUICK if args.quick else FULL
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Run(out, size, seed=0, alpha=0.05, progress=False,
              state=State(out, {"bench": "pythia", "size": size.__dict__, "alpha": 0.05}))
    t0 = time.time()
    prepare_data(run)
    init = out / "init"
    if run.state.get("init") is None:
        tok = run.tok
        cfg = GPTNeoXConfig(vocab_size=len(tok), hidden_size=size.hidden, intermediate_size=4 * size.hidden,
                            num_hidden_layers=size.layers, num_attention_heads=size.heads, rotary_pct=0.25,
                            use_parallel_residual=True, max_position_embeddings=max(1024, size.seq_len),
                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
        torch.manual_seed(run.seed)
        AutoModelForCausalLM.from_config(cfg).save_pretrained(init)
        tok.save_pretrained(init)
        run.state.put("init", str(init))
    n = run.pretrain_steps
    say(f"pre-training a {size.layers}-layer MHA GPT-NeoX ({size.heads} heads, hidden {size.hidden}, rotary_pct "
        f"0.25) for {n} steps")
    pre = train_run(run, "mha-pretrain", str(init), n, size.lr, "cosine", max(1, n // 20), max(1, n // 5))
    vs = [Variant("MHA", None), Variant("GQA-2", 2, "mean"), Variant("MQA", 1, "mean"),
          # calibrated, layer by layer through uptrain's GPT-NeoX GQA class (partial rotary: RoPE'd rows take
          # the per-frequency fold, the rest the PCA fold), then refined
          Variant("GQA-2 aligned", 2, "aligned", "beyond"), Variant("MQA aligned", 1, "aligned", "beyond")]
    step0 = convert_variants(run, pre["out"], vs)
    uptrained = uptrain_variants(run, step0, vs)
    ev = evaluate_all(run, step0, uptrained, vs)
    rows = {r["label"]: r for r in ev["rows"]}
    lines = ["| model | KV heads | KV cache / token | loads with | ppl step 0 | ppl after "
             f"{run.uptrain_steps} steps |", "|:--|--:|--:|:--|--:|--:|"]
    for v in vs:
        a, b = rows[f"{v.name} (step 0)"], rows[f"{v.name} (uptrained)"]
        code = json.loads((Path(step0[v.name]) / "config.json").read_text()).get("auto_map")
        lines.append(f"| {v.name} | {a['num_key_value_heads']} | {a['kv_cache_bytes_per_token']:,} B | "
                     f"{'trust_remote_code=True' if code else 'plain transformers'} | {a['perplexity']:.2f} | "
                     f"{b['perplexity']:.2f} |")
    table = "\n".join(lines)
    (out / "pythia.md").write_text(table + "\n")
    print(table)
    print(f"pre-training: held-out perplexity {pre['final_eval']['perplexity']:.2f} after {n} steps; "
          f"total {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
