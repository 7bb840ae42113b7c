"""Every table a person reads (inspection, cache, export, eval, features): fitted to the terminal,
numbers never break across lines.

Like `gh` and `kubectl`, a table that is too wide for the terminal drops its least needed columns
(the machine formats and `--wide` keep them all); numeric cells never wrap, and floats show the
precision the number has rather than a fixed four decimals.
"""

from __future__ import annotations

import os
import shutil
from typing import IO, Any, Iterable, Sequence

from resnetcli.cli.text import terminal_text

#: Decimals shown per column: accuracies as published (3), file sizes in MB (1), GFLOPS (2),
#: probabilities and losses (4), seconds (1); any other float gets 2.
DECIMALS = {
    "acc@1": 3,
    "acc@5": 3,
    "top-1": 3,
    "top-5": 3,
    "val top-1": 3,
    "val_accuracy": 3,
    "precision": 3,
    "recall": 3,
    "f1": 3,
    "file_mb": 1,
    "gflops": 2,
    "prob": 4,
    "train_loss": 4,
    "seconds": 1,
}
#: Columns right-aligned and never wrapped (besides any column whose values are all numbers).
NUMERIC = frozenset(
    {
        "rank",
        "index",
        "prob",
        "size",
        "params",
        "mult_adds",
        "acc@1",
        "acc@5",
        "gflops",
        "file_mb",
        "channels",
        "stride",
        "depth",
        "value",
        "count",
        "size_mb",
    }
)
#: Columns of shapes, never wrapped either (a shape broken inside a number reads as two numbers).
SHAPES = frozenset({"output_shape", "kernel_size", "shape", "input_size"})


def terminal_width(stream: IO[str]) -> int | None:
    """The width to fit: $COLUMNS when set, the terminal's on a terminal, else None (no limit: a file or pipe)."""
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    isatty = getattr(stream, "isatty", None)
    if isatty is not None and isatty():
        return shutil.get_terminal_size().columns
    return None


def display(column: str, value: Any) -> str:
    """A cell as a person reads it: thousands separators, the column's precision, yes/no, lists in brackets."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if 0 < abs(value) < 0.01:
            return f"{value:.2g}"  # 0.00042 GFLOPS (LeNet), not 0.00
        return f"{value:,.{DECIMALS.get(column, 2)}f}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return terminal_text(str(value))


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def numeric_columns(columns: Sequence[str], rows: Sequence[dict]) -> set[str]:
    """The columns to right-align and never wrap: the known numeric ones, and those whose every
    value is a number (eval's confusion matrix, whose columns are class names)."""
    return {
        column
        for column in columns
        if column in NUMERIC
        or (
            any(row.get(column) is not None for row in rows)
            and all(is_number(row.get(column)) for row in rows if row.get(column) is not None)
        )
    }


def table_width(widths: Sequence[int]) -> int:
    """Characters a rich table with these column widths takes: a border and one space each side of a cell."""
    return sum(widths) + 3 * len(widths) + 1


def fit_columns(
    columns: Sequence[str], cells: Sequence[dict[str, str]], width: int | None, drop: Sequence[str]
) -> list[str]:
    """`columns` without as many of `drop` (dropped first to last) as it takes for the table to fit `width`."""
    kept = list(columns)
    if width is None:
        return kept

    def needed(names: Sequence[str]) -> int:
        return table_width([max([len(c)] + [len(row[c]) for row in cells]) for c in names])

    for column in drop:
        if needed(kept) <= width:
            break
        if column in kept:
            kept.remove(column)
    return kept


def print_fitted(
    columns: Sequence[str],
    rows: Iterable[dict],
    title: str | None,
    stream: IO[str],
    *,
    drop: Sequence[str] = (),
    width: int | None = None,
    fit: bool = True,
    footer: str | None = None,
) -> list[str]:
    """Print rows as a rich table fitted to the terminal; returns the columns shown."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    width = terminal_width(stream) if width is None and fit else width
    rows = list(rows)
    numeric = numeric_columns(columns, rows)
    cells = [{c: display(c, row.get(c)) for c in columns} for row in rows]
    shown = fit_columns(columns, cells, width, drop if fit else ())
    dropped = [c for c in columns if c not in shown]
    if dropped:
        note = f"hidden at {width} columns: {', '.join(dropped)}; --wide shows all"
        footer = f"{footer}\n{note}" if footer else note
    table = Table(title=title, title_justify="left", header_style="bold")
    for column in shown:
        table.add_column(
            column,
            justify="right" if column in numeric else "left",
            no_wrap=column in numeric or column in SHAPES,
            overflow="fold",
        )
    for row in cells:
        # Text, not markup: a cell such as "[resnet50:IMAGENET1K_V2]" must not be read as a rich tag.
        table.add_row(*(Text(row[c]) for c in shown))
    console = Console(file=stream, width=width or 100_000)
    console.print(table)
    if footer:
        console.print(Text(footer))
    return shown
