"""`predict`'s table for a person at a terminal: one row per input that fits the width.

Columns: the input (shortened from the left, where the file name is, when too long), the rank-1
class and its probability (4 decimals), then the next ranks compactly ("label 0.1234, ...") in the
room that is left. The title names the architecture and weights once. A failed input shows
"error" and its reason in its own row. The machine formats (JSON, JSONL, CSV, TSV) keep every
field; this table is only for reading.
"""

from __future__ import annotations

from typing import IO, Optional

from resnetcli.cli.tables import terminal_width
from resnetcli.cli.text import terminal_text

#: What stands for the cut part of a shortened input or title.
ELLIPSIS = "…"
#: Width of the probability column ("0.1234").
PROB_WIDTH = 6
#: The class column is at most this wide (longer labels end with an ellipsis).
MAX_CLASS_WIDTH = 24
#: The input column keeps at least this many characters however narrow the terminal.
MIN_INPUT_WIDTH = 16
#: The "next" column is dropped when less room than this is left for it.
MIN_NEXT_WIDTH = 12
#: Characters between columns: rich's padding of one on each side of the (blank) column divider.
GAP = 3


def shorten_left(text: str, width: int) -> str:
    """`text` cut from the left to `width` characters, an ellipsis marking the cut."""
    if width <= 0 or len(text) <= width:
        return text
    return ELLIPSIS + text[len(text) - width + 1 :]


def _reason(record: dict) -> str:
    error, prefix = record["error"], f"{record['input']}: "
    return error[len(prefix) :] if error.startswith(prefix) else error


def print_predictions(records: list[dict], title: Optional[str], stream: IO[str], width: Optional[int] = None) -> None:
    """Print prediction records as the terminal table, fitted to `width` (default: the terminal's)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    width = width if width is not None else terminal_width(stream)
    inputs = [terminal_text(record["input"]) for record in records]
    labels = [terminal_text(record["top"][0]["label"]) for record in records if record.get("top")]
    class_width = min(MAX_CLASS_WIDTH, max([len("class"), *map(len, labels)]))
    input_width = max([len("input"), *map(len, inputs)])
    show_next = any(len(record.get("top") or []) > 1 for record in records) or any("error" in r for r in records)
    if width is not None:
        fixed = class_width + PROB_WIDTH + 2 * GAP
        room = width - fixed
        if show_next and room - GAP - min(input_width, max(MIN_INPUT_WIDTH, room // 2)) >= MIN_NEXT_WIDTH:
            input_width = min(input_width, max(MIN_INPUT_WIDTH, room // 2))
        else:
            show_next = False
            input_width = min(input_width, max(MIN_INPUT_WIDTH, room))
    next_width = None
    if width is not None and show_next:
        next_width = width - input_width - class_width - PROB_WIDTH - 3 * GAP

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold", title_justify="left")
    if title:
        table.title = shorten_left(terminal_text(title), width) if width else terminal_text(title)
    table.add_column("input", no_wrap=True, width=input_width if width else None)
    table.add_column("class", no_wrap=True, overflow="ellipsis", width=class_width if width else None)
    table.add_column("prob", justify="right", no_wrap=True, width=PROB_WIDTH)
    if show_next:
        table.add_column("next", no_wrap=True, overflow="ellipsis", width=next_width)
    for shown, record in zip(inputs, records):
        name = Text(shorten_left(shown, input_width) if width else shown)
        if "error" in record:
            # An error's reason wraps inside its cell rather than being cut: the user needs all of it.
            reason = Text(terminal_text(_reason(record)), style="red", overflow="fold", no_wrap=False)
            if show_next:
                table.add_row(name, Text("error", style="red"), Text(""), reason)
            else:
                table.add_row(name, Text("error: ", style="red") + reason, Text(""))
            continue
        top = record.get("top") or []
        if not top:
            cells = [name, Text("(none above --threshold)"), Text("")]
        else:
            cells = [name, Text(terminal_text(top[0]["label"])), Text(f"{top[0]['prob']:.4f}")]
        if show_next:
            cells.append(Text(", ".join(f"{terminal_text(s['label'])} {s['prob']:.4f}" for s in top[1:])))
        table.add_row(*cells)
    console = Console(
        file=stream, width=width if width else 100_000, no_color=not getattr(stream, "isatty", lambda: False)()
    )
    console.print(table)
