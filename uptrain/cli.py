"""`uptrain` console script: argument parsing and messages only; every subcommand calls the public API.

Each subcommand has one `_add_<name>` (its arguments) and one `_run_<name>` (API call + printing).
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings

from uptrain.errors import UptrainError


# ---------------------------------------------------------------- options → flags
def _add_option_flags(p, options_class) -> None:
    """One flag per field of an options dataclass (ConvertOptions, EvalOptions: uptrain/options.py), which is the
    single definition: the API and recipes read the same fields. Unset flags stay None (the field's default)."""
    import dataclasses
    import typing

    hints = typing.get_type_hints(options_class)
    sections: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(options_class):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        group = meta.get("group")
        where = sections.setdefault(group, p.add_argument_group(group)) if group else p
        flag, tp = "--" + f.name.replace("_", "-"), hints[f.name]
        if tp is bool or typing.get_args(tp) == (bool, type(None)):
            where.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=meta["help"])
            continue
        kind = _cli_parser(meta["parse"]) if meta.get("parse") else next(
            (t for t in (int, float, str) if t == tp or t in typing.get_args(tp)), str)
        where.add_argument(flag, *([meta["short"]] if meta.get("short") else []), type=kind, default=None,
                           required=meta.get("required", False), choices=meta.get("choices"),
                           metavar=meta.get("metavar"), help=meta["help"])


def _options_from(args, options_class):
    import dataclasses

    fields = {f.name for f in dataclasses.fields(options_class)}
    return options_class.from_kwargs("cli", **{k: v for k, v in vars(args).items() if k in fields})


# ---------------------------------------------------------------- convert
def _add_convert(sub):
    from uptrain.conversion.options import ConvertOptions

    p = sub.add_parser("convert", help="MHA/GQA checkpoint → GQA checkpoint with G KV heads (streaming)")
    p.add_argument("src", help="local Hugging Face checkpoint folder or Hub repo id")
    p.add_argument("out", help="output folder (written atomically)")
    _add_option_flags(p, ConvertOptions)  # recipes read the same fields
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
    from uptrain.conversion import ConvertOptions, convert

    result = convert(args.src, args.out, options=_options_from(args, ConvertOptions), overwrite=args.overwrite,
                     revision=args.revision, progress=not args.quiet)
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
class _HelpRecipe(argparse.Action):
    """`--help-recipe [text|markdown]`: print every recipe key and exit, as --help does (no RECIPE needed)."""

    def __call__(self, parser, namespace, values, option_string=None):
        from uptrain.training.recipe_keys import render

        print(render(values), end="")
        parser.exit()


def _add_train(sub):
    p = sub.add_parser(
        "train", help="uptrain a converted model from a YAML recipe (accelerate-ready)",
        description="Run the recipe on this machine, or on many GPUs with `accelerate launch --config_file "
                    "recipes/accelerate/fsdp.yaml -m uptrain train RECIPE.yaml`. Writes a HF checkpoint, "
                    "uptrain.json, recipe.yaml, metrics.jsonl and checkpoints/ into the recipe's `out`. "
                    "`uptrain train --help-recipe` lists every recipe key with its type, default and meaning.")
    p.add_argument("recipe", help="recipe YAML (see recipes/; --help-recipe lists every key)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="beat the YAML, e.g. optim.lr=3e-4 budget.max_steps=20 resume=auto log.progress=false")
    p.add_argument("--help-recipe", nargs="?", const="text", choices=("text", "markdown"), action=_HelpRecipe,
                   metavar="FORMAT", help="print every recipe key (type, default, what it does) and exit; FORMAT "
                                          "text (default) or markdown (the table of docs/training.md)")
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
    from uptrain.evaluation.options import EvalOptions

    p = sub.add_parser("eval", help="perplexity, KV-cache bytes and decode speed of several models side by side",
                       description="Evaluate MODEL [MODEL …] on the same held-out tokens and with the same decode "
                                   "settings; ratios are against the first model. --engine vllm also serves each "
                                   "model in vLLM (docs/serving.md).")
    p.add_argument("models", nargs="+", metavar="MODEL", help="checkpoint folders or Hub ids (first = reference)")
    _add_option_flags(p, EvalOptions)  # uptrain.evaluate(...) takes the same fields
    o = p.add_argument_group("output")
    o.add_argument("--json", default=None, metavar="FILE", help="write the rows as JSON (a list of models)")
    o.add_argument("--markdown", default=None, metavar="FILE", help="write the table as markdown")
    o.add_argument("--plot", default=None, metavar="FILE.png", help="quality vs KV-cache size and decode time")
    o.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    return p


def _run_eval(args) -> int:
    from uptrain.evaluation import EvalOptions, evaluate
    from uptrain.files import check_file_writable

    options = _options_from(args, EvalOptions).check()
    for path in (args.json, args.markdown, args.plot):
        if path:
            check_file_writable(path)  # fail now, not after the models ran
    result = evaluate(args.models, options=options, progress=not args.quiet)
    print(result.to_markdown())
    for path, write in ((args.json, result.write_json), (args.markdown, result.write_markdown),
                        (args.plot, result.plot)):
        if path:
            print(f"wrote {write(path)}")
    return 0


# ---------------------------------------------------------------- demo
def _add_demo(sub):
    from uptrain.miniature.options import DemoOptions
    from uptrain.miniature.sizes import took

    p = sub.add_parser("demo", help=f"the GQA paper in miniature on Shakespeare, offline, on a CPU ({took('llama')})",
                       description="Pre-train a small MHA Llama on Shakespeare, convert it to GQA/MQA, uptrain each "
                                   "for α of the pre-training steps, evaluate, and write DIR/report.md with plots. "
                                   f"Measured: {took('llama')} (its wall time on a quiet machine); --quick "
                                   f"{took('llama', True)}; --arch t5 {took('t5')}, with --quick {took('t5', True)}.")
    _add_option_flags(p, DemoOptions)  # uptrain.demo(...) takes the same fields
    p.add_argument("--no-progress", action="store_true", help="no progress bars (one line per stage only)")
    return p


def _run_demo(args) -> int:
    from uptrain.miniature import DemoOptions, demo

    demo(options=_options_from(args, DemoOptions), progress=not args.no_progress)
    return 0


# ---------------------------------------------------------------- push
def _add_push(sub):
    from uptrain.publishing.options import PushOptions

    p = sub.add_parser("push", help="upload a converted/uptrained checkpoint to the Hub with a model card")
    p.add_argument("dir", help="checkpoint folder written by `uptrain convert` or `uptrain train`")
    _add_option_flags(p, PushOptions)  # uptrain.push(...) takes the same fields
    return p


def _run_push(args) -> int:
    from uptrain.publishing import PushOptions, push

    print(push(args.dir, options=_options_from(args, PushOptions)).summary())
    return 0


# ---------------------------------------------------------------- export-gguf
def _add_export_gguf(sub):
    p = sub.add_parser("export-gguf", help="a checkpoint folder → one GGUF file for llama.cpp (its own converter)",
                       description="Runs llama.cpp's convert_hf_to_gguf.py on a folder uptrain wrote, per-layer "
                                   "and remote-code results included (docs/serving.md#llamacpp).")
    p.add_argument("dir", help="checkpoint folder")
    p.add_argument("out", help="the .gguf file to write")
    p.add_argument("--outtype", default="f16", choices=("f32", "f16", "bf16", "q8_0"),
                   help="tensor type of the file (the converter's --outtype; default f16)")
    p.add_argument("--llama-cpp", default=None, metavar="DIR",
                   help="the folder .ci/build_llama_cpp.sh printed (default: $UPTRAIN_LLAMA_CPP, else its cache)")
    p.add_argument("--pre-tokenizer", default=None, metavar="NAME",
                   help="llama.cpp pre-tokenizer name for a BPE tokenizer llama.cpp does not recognise (e.g. gpt-2)")
    return p


def _run_export_gguf(args) -> int:
    from uptrain.evaluation.llama_cpp import to_gguf

    out = to_gguf(args.dir, args.out, outtype=args.outtype, llama_cpp=args.llama_cpp, pre_tokenizer=args.pre_tokenizer)
    print(f"Wrote {out} ({args.outtype}) with llama.cpp's convert_hf_to_gguf.py")
    return 0


COMMANDS = {
    "convert": (_add_convert, _run_convert),
    "inspect": (_add_inspect, _run_inspect),
    "train": (_add_train, _run_train),
    "plan": (_add_plan, _run_plan),
    "eval": (_add_eval, _run_eval),
    "demo": (_add_demo, _run_demo),
    "push": (_add_push, _run_push),
    "export-gguf": (_add_export_gguf, _run_export_gguf),
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


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A library's warning as its message alone: Python's default shows the source line that raised it, code
    that means nothing to the user of a command."""
    print(f"warning: {message} ({category.__name__})", file=file or sys.stderr)


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
        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning
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
