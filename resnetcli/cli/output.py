r"""Formatting records for the terminal and for programs: rich tables, JSON, JSONL, CSV, TSV.

Only the CLI formats; core modules hand it plain records (dicts). Machine formats stream: each
record is written and flushed as soon as it is given, so a consumer reading a pipe sees it at once.

Text that is not valid Unicode (a file name with bytes that are not UTF-8, which Python decodes
with `surrogateescape` to the lone surrogates U+DC80..U+DCFF) is written as the JSON escape
`\udcXX` of each such character, in every format: JSON and JSONL stay valid UTF-8, and
`os.fsencode(json.loads(line)["input"])` gives back the original bytes. On a terminal, CSV and TSV
cells also show control characters escaped (`\x1b`, `\n`), as the table does.
"""

from __future__ import annotations

import csv
import json
import sys
from enum import Enum
from typing import IO, Any, Callable, Iterable, Sequence

from resnetcli.cli.text import escape_controls, escape_surrogates


class OutputFormat(str, Enum):
    """The `--format` choices shared by every subcommand."""

    table = "table"
    json = "json"
    jsonl = "jsonl"
    csv = "csv"
    tsv = "tsv"


def choose_format(requested: OutputFormat | None, stream: IO[str]) -> OutputFormat:
    """The requested format, or a rich table on a terminal and JSON Lines anywhere else."""
    if requested is not None:
        return requested
    isatty = getattr(stream, "isatty", None)
    return OutputFormat.table if isatty is not None and isatty() else OutputFormat.jsonl


def cell(value: Any) -> str:
    """A value as text for a CSV or TSV cell: exact numbers, lists in brackets, booleans as true/false."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(cell(v) for v in value) + "]"
    return str(value)


class RecordWriter:
    """Writes a sequence of records in one format.

    `rows` turns a record into the flat rows of the table/CSV/TSV formats (predict's nested top-k
    becomes one row per rank); JSON and JSONL keep records whole. `document` shapes the single
    JSON document (default: the list of records).
    """

    def __init__(
        self,
        fmt: OutputFormat,
        columns: Sequence[str],
        *,
        stream: IO[str] | None = None,
        rows: Callable[[dict], Iterable[dict]] | None = None,
        title: str | None = None,
        document: Callable[[list[dict]], Any] | None = None,
        console=None,
        table: Callable[[list[dict], str | None, IO[str]], None] | None = None,
    ) -> None:
        self.fmt = fmt
        self.columns = list(columns)
        self.stream = stream if stream is not None else sys.stdout
        self.rows = rows or (lambda record: [record])
        self.title = title
        self.document = document
        self.console = console
        self.table = table
        self._records: list[dict] = []
        self._csv = None
        isatty = getattr(self.stream, "isatty", None)
        self._terminal = bool(isatty is not None and isatty())
        if fmt in (OutputFormat.csv, OutputFormat.tsv):
            self._csv = csv.DictWriter(
                self.stream,
                fieldnames=self.columns,
                delimiter="," if fmt is OutputFormat.csv else "\t",
                extrasaction="ignore",
                lineterminator="\n",
            )
            self._csv.writeheader()
            self.stream.flush()

    def write(self, record: dict) -> None:
        """Write (or, for table and JSON, keep) one record."""
        if self.fmt is OutputFormat.jsonl:
            self.stream.write(escape_surrogates(json.dumps(record, ensure_ascii=False)) + "\n")
            self.stream.flush()
        elif self._csv is not None:
            for row in self.rows(record):
                self._csv.writerow({key: self._cell(row.get(key)) for key in self.columns})
            self.stream.flush()
        else:
            self._records.append(record)

    def _cell(self, value: Any) -> str:
        text = escape_surrogates(cell(value))
        return escape_controls(text) if self._terminal else text

    def close(self) -> None:
        """Write what the format keeps until the end (the table, the JSON document)."""
        if self.fmt is OutputFormat.json:
            document = self.document(self._records) if self.document else self._records
            self.stream.write(escape_surrogates(json.dumps(document, ensure_ascii=False, indent=2)) + "\n")
            self.stream.flush()
        elif self.fmt is OutputFormat.table and self.table is not None:
            self.table(self._records, self.title, self.stream)
        elif self.fmt is OutputFormat.table:
            print_table(
                self.columns,
                [row for record in self._records for row in self.rows(record)],
                self.title,
                self.stream,
                self.console,
            )

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        if exc_type is None or not issubclass(exc_type, Exception):
            self.close()


def print_table(columns: Sequence[str], rows: Iterable[dict], title: str | None, stream: IO[str], console=None) -> None:
    """Print rows as a table fitted to the terminal (cli/tables.py: numbers never wrap, each column
    with its precision); `console` only sets the width."""
    from resnetcli.cli.tables import print_fitted

    print_fitted(columns, rows, title, stream, width=console.width if console is not None else None)


def write_document(
    fmt: OutputFormat,
    document: dict,
    sections: dict[str, tuple[Sequence[str], list[dict]]],
    primary: str,
    stream: IO[str] | None = None,
) -> None:
    """Write a report made of several sections (a summary's layers, totals and parameters).

    JSON gets the whole document; JSONL, CSV and TSV get the rows of the `primary` section; a
    table shows each non-empty section in turn.
    """
    stream = stream if stream is not None else sys.stdout
    if fmt is OutputFormat.json:
        stream.write(json.dumps(document, ensure_ascii=False, indent=2) + "\n")
    elif fmt is OutputFormat.table:
        for title, (columns, rows) in sections.items():
            if rows:
                print_table(columns, rows, title, stream)
    else:
        columns, rows = sections[primary]
        with RecordWriter(fmt, columns, stream=stream) as writer:
            for row in rows:
                writer.write(row)
    stream.flush()
