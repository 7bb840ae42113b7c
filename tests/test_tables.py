"""Every table goes through one fitting implementation (cli/tables.py): the precision a number has,
numbers never wrapped at 80 columns (issue 13: cache verify, export, eval and features tables)."""

from __future__ import annotations

import io
import re

from helpers import run_cli
from test_cache_views import on_terminal, tiny, web  # noqa: F401 (fixtures)
from test_store_attacks import serve

from resnetcli.cli.output import OutputFormat, RecordWriter, print_table


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True

    def screen(self) -> str:
        """What the terminal shows: the text without its colour and style codes."""
        return re.sub(r"\x1b\[[0-9;]*m", "", self.getvalue())


def rows_of(screen: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("│").split("│")] for line in screen.splitlines() if line.startswith("│")]


def test_print_table_shows_each_column_with_its_precision(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    stream = Terminal()
    print_table(
        ["top-1", "top-5", "prob", "images", "train_loss", "other"],
        [{"top-1": 0.875, "top-5": 1.0, "prob": 0.123456, "images": 12345, "train_loss": 0.69314718, "other": 2.5}],
        "eval",
        stream,
    )
    assert rows_of(stream.screen()) == [["0.875", "1.000", "0.1235", "12,345", "0.6931", "2.50"]]


def test_numbers_never_wrap_at_80_columns_however_long_the_text(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    stream = Terminal()
    long_path = "/data/" + "very-long-folder-name/" * 6 + "image.jpg"
    counts = {"cat": 1234567, "dog": 7654321, "bird": 31415926}
    with RecordWriter(OutputFormat.table, ["input", *counts], stream=stream, title="confusion") as writer:
        writer.write({"input": long_path, **counts})
    screen = stream.screen()
    assert max(len(line) for line in screen.splitlines()) <= 80, screen
    for number in counts.values():
        assert f" {number:,} " in screen  # whole, on one line, right-aligned
    assert "very-long" in screen  # the text column folds instead


def test_cache_verify_table_at_80_columns(runner, app, web, tiny, checkpoint_dir):  # noqa: F811
    assert run_cli(runner, app, "fetch", "--url", serve(web, tiny)).exit_code == 0
    code, screen, err = on_terminal(checkpoint_dir.parent.parent, "cache", "verify", columns=80)
    assert code == 0, err
    assert max(len(line) for line in screen.splitlines()) <= 80, screen
    assert f" {len(tiny.data):,} " in screen  # the size in bytes, whole
    assert "0.0000" not in screen
