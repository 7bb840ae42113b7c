r"""Text made safe to show: lone surrogates and control characters as escapes.

A file name with bytes that are not UTF-8 reaches Python as lone surrogates (U+DC80..U+DCFF,
`surrogateescape`); they are written as `\udcXX` so that every format stays valid UTF-8. Control
characters (a terminal escape or a newline in a file name) are shown as `\x1b`, `\n`, ... on a
terminal, so that a name cannot move the cursor or split a row. Used by the record formats
(cli/output.py) and by every table (cli/tables.py, cli/predict_table.py).
"""

from __future__ import annotations

import re

_SURROGATE = re.compile("[\ud800-\udfff]")
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_NAMED_CONTROLS = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def escape_surrogates(text: str) -> str:
    """`text` with each lone surrogate written as its `\\uXXXX` escape (valid UTF-8 afterwards)."""
    return _SURROGATE.sub(lambda match: f"\\u{ord(match.group()):04x}", text)


def escape_controls(text: str) -> str:
    """`text` with control characters written as escapes, for a terminal: `\\n`, `\\x1b`, ..."""
    return _CONTROL.sub(lambda match: _NAMED_CONTROLS.get(match.group(), f"\\x{ord(match.group()):02x}"), text)


def terminal_text(text: str) -> str:
    """`text` as a terminal shows it: both escapes."""
    return escape_controls(escape_surrogates(text))
