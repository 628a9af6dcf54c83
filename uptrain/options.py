"""Options as data: a dataclass whose fields are at once the flags of a subcommand, the keys of a recipe section and
the keyword arguments of an API call (ConvertOptions, EvalOptions). This mixin makes their errors speak the
caller's language: `spoken_as("cli")` names `--eval-tokens`, a recipe section (`spoken_as("model.convert")`) names
`model.convert.calibration_tokens`, Python names `eval_tokens`.

A field's metadata (see `option`) carries its help text and how the CLI reads it; uptrain/cli.py builds the flags
from it. Light on purpose (standard library only): recipes validate with it before anything heavy loads.
"""
from __future__ import annotations

import dataclasses
import difflib
from dataclasses import field
from typing import TYPE_CHECKING, Any, ClassVar

from uptrain.errors import UptrainError


def option(help: str, default=None, cli: bool = True, scope: str | None = None, **kw):
    """A field with its help text. scope: which part of the command reads it (ConvertOptions: "aligned" /
    "calibrated"; EvalOptions: "vllm"), so that setting it elsewhere can be refused. Other keys are for the CLI:
    choices, metavar, group (the --help section), short (e.g. "-g"), required, parse (str → value, e.g.
    comma_list); for the docs' options table, shown (what the table says instead of a sentinel default)."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, "cli": cli,
                                                                                "scope": scope, **kw})
    return field(default=default, metadata={"help": help, "cli": cli, "scope": scope, **kw})


def comma_list(text: str) -> list[str]:
    """'a, b,,c' → ['a', 'b', 'c'] (a CLI flag that holds a list)."""
    return [t.strip() for t in text.split(",") if t.strip()]


class SpokenOptions:
    """Mixin for an options dataclass. KIND names it in messages ("unknown conversion option --x")."""

    KIND = "option"
    if TYPE_CHECKING:  # what the dataclass it is mixed into has
        __dataclass_fields__: ClassVar[dict[str, Any]]

    def spoken_as(self, style: str):
        """"python" (keyword names), "cli" (flags) or a recipe section such as "model.convert"."""
        self._style = style  # not a field: never recorded, never compared
        return self

    def key(self, name: str) -> str:
        style = getattr(self, "_style", "python")
        if style == "cli":
            return "--" + name.replace("_", "-")
        return name if style == "python" else f"{style}.{name}"

    def said(self, name: str, value=None) -> str:
        """`--method aligned` / `model.convert.method: aligned` / `method='aligned'`."""
        value = getattr(self, name) if value is None else value
        style = getattr(self, "_style", "python")
        if style == "cli":
            if isinstance(value, bool):  # a switch: --dry-run / --no-dry-run
                return self.key(name) if value else "--no-" + name.replace("_", "-")
            return f"{self.key(name)} {value}"
        return f"{self.key(name)}={value!r}" if style == "python" else f"{self.key(name)}: {value}"

    @classmethod
    def from_kwargs(cls, style: str = "python", **kw):
        """The options from keyword arguments (None: the field's default), spoken in `style`; an unknown name is
        refused with the nearest known one."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in kw if k not in names]
        if unknown:
            probe = cls().spoken_as(style)
            near = difflib.get_close_matches(unknown[0], names, n=1)
            hint = f"; did you mean {probe.key(near[0])}?" if near else ""
            raise UptrainError(f"unknown {cls.KIND} {probe.key(unknown[0])}{hint} (options: "
                               f"{', '.join(probe.key(n) for n in names)})")
        return cls(**{k: v for k, v in kw.items() if v is not None}).spoken_as(style)

    def set_in(self, scope: str) -> list[str]:
        """Options of `scope` set to something other than their default."""
        defaults = type(self)()
        return [f.name for f in dataclasses.fields(self) if f.metadata.get("scope") == scope
                and getattr(self, f.name) != getattr(defaults, f.name)]


def markers(command: str) -> tuple[str, str]:
    """The comments that enclose `uptrain COMMAND`'s generated options table in the docs."""
    return (f"<!-- uptrain {command} options: generated from the options dataclass by options_markdown(); "
            f"do not edit by hand -->", f"<!-- end of uptrain {command} options -->")


def options_markdown(cls, command: str) -> str:
    """`uptrain COMMAND`'s flags built from `cls` (ConvertOptions, EvalOptions) as a markdown table: flag,
    default, help, in the order and --help sections of the CLI. A default of None (—) is decided by other options
    (the method, the model): its help says how; metadata "shown" replaces a sentinel default in the table.
    tests/test_docs.py checks that the docs hold this table."""
    import typing

    hints = typing.get_type_hints(cls)
    start, end = markers(command)
    lines, section = [start, ""], object()
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        switch = hints[f.name] is bool or typing.get_args(hints[f.name]) == (bool, type(None))
        if meta.get("group") != section:
            section = meta.get("group")
            lines += ([""] if len(lines) > 2 else []) + ([f"**{section}**", ""] if section else [])
            lines += ["| flag | default | what it does |", "|---|---|---|"]
        value = f.default
        if value is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        default = meta.get("shown") or ("—" if value in (None, []) else ("on" if value else "off") if switch
                                         else f"`{value}`")
        flag = "--" + f.name.replace("_", "-") + (f", {meta['short']}" if meta.get("short") else "")
        if switch:
            flag += f" / --no-{f.name.replace('_', '-')}"
        lines.append(f"| `{flag}` | {default} | {' '.join(meta['help'].split()).replace('|', chr(92) + '|')} |")
    return "\n".join(lines + ["", end]) + "\n"
