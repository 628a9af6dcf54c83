"""Number formats and markdown tables shared by `uptrain eval`, the demo, the model card and the messages.
Text only: the eval table's columns are in uptrain/evaluation/table.py, the plots in uptrain/plots.py."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence


# ---------------------------------------------------------------- formatting
def fmt_bytes(n: float | None) -> str:
    """Binary units, 3 significant digits: 1536 → '1.50 KiB'."""
    if n is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError  # pragma: no cover


def fmt_count(n: float | None) -> str:
    """Parameter-style counts: 1234567 → '1.23M'."""
    if n is None:
        return "—"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:g}"


def fmt_num(x: float | None, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    if isinstance(x, int):
        return str(x)
    return f"{x:.{digits}g}"


def fmt_ratio(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}×"


# ---------------------------------------------------------------- tables
@dataclass(frozen=True)
class Column:
    """One table column: header and how a row (a dict) becomes its cell text."""

    header: str
    cell: Callable[[dict], str]
    align: str = "right"  # "left" | "right"


def col(key: str, header: str, fmt: Callable = fmt_num, align: str = "right") -> Column:
    """A column that formats row[key] (missing → '—')."""
    return Column(header, lambda row: fmt(row.get(key)) if row.get(key) is not None else "—", align)


def markdown_table(rows: Sequence[dict], columns: Sequence[Column]) -> str:
    """A GitHub-flavoured markdown table; cells padded so it also reads well in a terminal."""
    cells = [[c.header for c in columns]] + [[c.cell(r) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]

    def line(values):
        padded = [v.ljust(w) if c.align == "left" else v.rjust(w) for v, w, c in zip(values, widths, columns)]
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join((":" + "-" * (w + 1)) if c.align == "left" else ("-" * (w + 1) + ":")
                          for w, c in zip(widths, columns)) + "|"
    return "\n".join([line(cells[0]), rule] + [line(r) for r in cells[1:]])
