"""Inference cost measured for real: the bytes a `generate` cache holds, prefill / cached-decode speed
from timestamped `generate` calls, and peak memory per model. The KV-cache *formula* lives in
uptrain.arch (AttentionShape.kv_cache_bytes_per_token); the measured bytes here check it."""
from __future__ import annotations

import statistics
import time

import torch

from uptrain.errors import UptrainError
from uptrain.evaluation.quality import model_device


# ---------------------------------------------------------------- KV cache
def output_cache(out):
    """The cache a `generate` (return_dict_in_generate) or forward output holds: `out.cache` from transformers
    5.20, `out.past_key_values` in 5.19; None when there is none."""
    for name in ("cache", "past_key_values"):
        cache = getattr(out, name, None)
        if cache is not None:
            return cache
    return None


def cache_tensors(cache) -> list[torch.Tensor]:
    """The K and V tensors a `generate` cache holds (DynamicCache layers, older key_cache lists, tuples)."""
    if hasattr(cache, "layers"):
        ts = [t for layer in cache.layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))]
    elif hasattr(cache, "key_cache"):
        ts = list(cache.key_cache) + list(cache.value_cache)
    else:
        ts = [t for layer in cache for t in layer[:2]]
    return [t for t in ts if isinstance(t, torch.Tensor) and t.numel()]


def cache_bytes(cache) -> int:
    if hasattr(cache, "self_attention_cache"):  # an encoder-decoder's: decoder self- and cross-attention
        return cache_bytes(cache.self_attention_cache) + cache_bytes(cache.cross_attention_cache)
    return sum(t.numel() * t.element_size() for t in cache_tensors(cache))


# ---------------------------------------------------------------- speed
class _StepClock:
    """A logits processor that only timestamps: generate calls it once per new token, right after the
    forward pass that produced the token's logits. Gaps between stamps are cached decode steps."""

    def __init__(self, sync):
        self.sync, self.stamps = sync, []

    def __call__(self, input_ids, scores):
        self.sync()
        self.stamps.append(time.perf_counter())
        return scores


@torch.no_grad()
def decode_speed(model, prompt: torch.Tensor, new_tokens: int = 32, repeats: int = 3, pad_token_id=None) -> dict:
    """Prefill and cached-decode speed from real `generate` calls (greedy, exactly `new_tokens` tokens).

    Each call is timestamped per token: prefill = start → first logits, decode step = the mean gap between
    later logits (one cached forward of `batch` tokens). One warm-up call, then `repeats` calls, medians.
    Also returns the bytes held by the cache of the last call. For an encoder-decoder `prompt` is the
    source (the encoder's input) and the cache is split: decoder self-attention (kv_cache_measured_*) and
    cross-attention over the source (cross_kv_cache_measured_*)."""
    from transformers import LogitsProcessorList

    if new_tokens < 2:
        raise UptrainError(f"--new-tokens must be at least 2 to time decoding, got {new_tokens}")
    batch, plen = prompt.shape
    prompt = prompt.to(model_device(model))
    sync = torch.cuda.synchronize if prompt.is_cuda else (lambda: None)
    prefill, step = [], []
    for i in range(repeats + 1):  # the first call warms up kernels, allocator and lazy inits
        clock = _StepClock(sync)
        sync()
        t0 = time.perf_counter()
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                             return_dict_in_generate=True, pad_token_id=pad_token_id,
                             logits_processor=LogitsProcessorList([clock]))
        if i:
            prefill.append(clock.stamps[0] - t0)
            step.append((clock.stamps[-1] - clock.stamps[0]) / (len(clock.stamps) - 1))
    prefill_s, step_s = statistics.median(prefill), statistics.median(step)
    cache = output_cache(out)
    enc_dec = bool(getattr(model.config, "is_encoder_decoder", False))
    generated = out.sequences.shape[1] - (1 if enc_dec else plen)  # a decoder's output starts with its start id
    res = {
        "prefill_tokens_per_s": batch * plen / prefill_s,
        "decode_tokens_per_s": batch / step_s,
        "decode_ms_per_token": step_s * 1e3,
        "generated_tokens": generated,
        # The last generated token is never fed back, so the cache holds prompt + new − 1 positions.
        "kv_cache_measured_bytes": cache_bytes(cache) if cache is not None else None,
        "kv_cache_measured_positions": batch * (plen + generated - 1),
    }
    if enc_dec:  # self-attention holds the start token and every new token but the last; cross, the source
        res["kv_cache_measured_bytes"] = cache_bytes(cache.self_attention_cache) if cache is not None else None
        res["kv_cache_measured_positions"] = batch * generated
        res["cross_kv_cache_measured_bytes"] = cache_bytes(cache.cross_attention_cache) if cache is not None else None
        res["cross_kv_cache_measured_positions"] = batch * plen
    return res


# ---------------------------------------------------------------- memory
def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak: CUDA's allocator statistics, or the process's peak RSS on Linux."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the process's peak RSS (VmHWM), so each model gets its own peak
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_memory(device: torch.device) -> tuple[int | None, str]:
    """(bytes, what was measured) since the last `reset_peak_memory`; (None, "unavailable") when unknown."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024, "process peak RSS"
    except OSError:
        pass
    try:
        import resource
        import sys

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024, "process peak RSS (since start)"
    except (ImportError, OSError):  # pragma: no cover
        return None, "unavailable"
