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
    p = sub.add_parser("convert", help="MHA/GQA checkpoint → GQA checkpoint with G KV heads (streaming)")
    p.add_argument("src", help="local Hugging Face checkpoint folder or Hub repo id")
    p.add_argument("out", help="output folder (written atomically)")
    p.add_argument("--groups", "-g", type=int, required=True, help="G: KV heads of the result (1 = MQA)")
    p.add_argument("--method", default="mean", help="mean (paper, default) | first | random | mean-norm | aligned")
    p.add_argument("--seed", type=int, default=0, help="seed for --method random")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--max-shard-size", default="5GB", help="largest output shard, e.g. 500MB, 5GB")
    p.add_argument("--revision", default=None, help="Hub revision when SRC is a repo id")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pytorch_model*.bin (loaded with weights_only=True)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    return p


def _run_convert(args) -> int:
    from uptrain.conversion import convert

    extra = {k: v for k, v in vars(args).items() if k.startswith("calibration") or k == "grouping"}
    result = convert(
        args.src, args.out, groups=args.groups, method=args.method, seed=args.seed,
        overwrite=args.overwrite, max_shard_size=args.max_shard_size, revision=args.revision,
        allow_pickle=args.allow_pickle, progress=not args.quiet, **{k: v for k, v in extra.items() if v is not None},
    )
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
    from uptrain.inspection import inspect

    info = inspect(args.src, revision=args.revision)
    print(json.dumps(info.to_dict(), indent=2) if args.json else info.to_text())
    return 0


# ---------------------------------------------------------------- train
def _add_train(sub):
    p = sub.add_parser("train", help="uptrain a converted model from a YAML recipe (accelerate-ready)")
    p.add_argument("recipe", help="recipe YAML (see recipes/)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=3e-4 budget.max_steps=20")
    return p


def _run_train(args) -> int:
    from uptrain.training import train

    train(args.recipe, overrides=args.overrides)
    return 0


# ---------------------------------------------------------------- eval
def _add_eval(sub):
    p = sub.add_parser("eval", help="perplexity, KV-cache bytes and decode speed of several models side by side")
    p.add_argument("models", nargs="+")
    return p


def _run_eval(args) -> int:
    from uptrain.evaluation import evaluate

    evaluate(args.models)
    return 0


# ---------------------------------------------------------------- demo
def _add_demo(sub):
    p = sub.add_parser("demo", help="the GQA paper in miniature on Shakespeare, offline, on a CPU")
    p.add_argument("--out", default="demo-out")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p


def _run_demo(args) -> int:
    from uptrain.miniature import demo

    demo(out=args.out, quick=args.quick, seed=args.seed)
    return 0


# ---------------------------------------------------------------- push
def _add_push(sub):
    p = sub.add_parser("push", help="upload a converted/uptrained checkpoint to the Hub with a model card")
    p.add_argument("dir")
    p.add_argument("--repo-id", required=True)
    return p


def _run_push(args) -> int:
    from uptrain.hub import push

    push(args.dir, repo_id=args.repo_id)
    return 0


COMMANDS = {
    "convert": (_add_convert, _run_convert),
    "inspect": (_add_inspect, _run_inspect),
    "train": (_add_train, _run_train),
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
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command][1](args)
    except UptrainError as e:
        print(f"uptrain {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"uptrain {args.command}: interrupted", file=sys.stderr)
        return 130
