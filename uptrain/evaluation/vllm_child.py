"""The vLLM side of uptrain/evaluation/serving.py: `python -m uptrain.evaluation.vllm_child REQUEST RESULTS`.

The only module of uptrain that imports vllm. It runs in a child process (vLLM spawns workers, which needs this
`__main__` guard; and the child's exit gives back the engine's memory), serves the request's jobs one after
another, and appends one JSON line per job to RESULTS as it finishes: the measurements, or {"error": "…"}.
"""
from __future__ import annotations

import gc
import json
import statistics
import sys
import time
from typing import Any


def measure(job: dict, s: dict, agreement_prompts: int) -> dict:
    from vllm import LLM, SamplingParams, __version__
    from vllm.platforms import current_platform

    t0 = time.perf_counter()
    # eager by default on a CPU, where compiling costs minutes; compiled (CUDA graphs) on GPUs
    eager = bool(s["eager"]) if s["eager"] is not None else current_platform.is_cpu()
    llm = LLM(model=job["path"], revision=job["revision"], tokenizer=job["tokenizer"],
              trust_remote_code=job["trust_remote_code"], dtype=s["dtype"] or job["dtype"] or "auto",
              enforce_eager=eager,
              kv_cache_memory_bytes=s["kv_cache_bytes"], max_model_len=s["max_model_len"], seed=s["seed"])
    load_s = time.perf_counter() - t0
    try:
        cache = llm.llm_engine.vllm_config.cache_config
        blocks, block_size = cache.num_gpu_blocks, cache.block_size
        assert blocks is not None  # set once the engine has started, which LLM() waits for
        # vLLM's TokensPrompt is a TypedDict: a plain dict at run time, typed as one on every vLLM version
        prompts: list[Any] = [{"prompt_token_ids": p} for p in job["prompts"]]
        n = s["new_tokens"]
        # greedy, exactly n tokens (EOS held off, as transformers' min_new_tokens does)
        greedy = llm.generate(prompts[:agreement_prompts], SamplingParams(temperature=0.0, max_tokens=n,
                                                                           min_tokens=n), use_tqdm=False)
        batch = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
        llm.generate(prompts, batch, use_tqdm=False)  # warm-up
        rates, walls, cpus = [], [], []
        for _ in range(s["repeats"]):
            t, c = time.perf_counter(), time.process_time()
            outs = llm.generate(prompts, batch, use_tqdm=False)
            walls.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)  # every thread of this process (the engine runs in it)
            rates.append(sum(len(o.outputs[0].token_ids) for o in outs) / walls[-1])
        return {
            "greedy": [list(o.outputs[0].token_ids) for o in greedy],
            "kv_cache_tokens": blocks * block_size, "kv_cache_blocks": blocks, "block_size": block_size,
            # requests of `context` tokens that fit at once: each takes whole blocks
            "max_concurrency": blocks // -(-s["context"] // block_size),
            "output_tokens_per_s": statistics.median(rates), "requests": len(prompts),
            "batch_wall_s": statistics.median(walls), "batch_cpu_s": statistics.median(cpus),
            "load_s": load_s, "device": current_platform.device_type, "eager": eager,
            "dtype": str(llm.llm_engine.vllm_config.model_config.dtype).replace("torch.", ""),
            "version": __version__,
        }
    finally:
        del llm
        gc.collect()
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()


def main(request: str, results: str) -> int:
    with open(request) as f:
        req = json.load(f)
    status = 0
    for job in req["jobs"]:
        try:
            res = measure(job, req["settings"], req["agreement_prompts"])
        except Exception as e:  # reported by the parent in one message; the log holds the traceback
            import traceback

            traceback.print_exc()
            first = (str(e).strip().splitlines() or [""])[0]
            res, status = {"error": f"{type(e).__name__}: {first[:400]}{'…' if len(first) > 400 else ''}"}, 1
        with open(results, "a") as f:
            f.write(json.dumps(res) + "\n")
        if status:
            break  # the engine may be left half-built: the parent reports this model
    return status


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
