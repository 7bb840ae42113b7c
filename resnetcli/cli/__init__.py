"""The `resnet` command line: an app, one module per group of subcommands, one output module."""

from __future__ import annotations

from resnetcli.cli import cache, export, models, predict, train  # noqa: F401  (registers the subcommands)
from resnetcli.cli.app import PROG, app


def main() -> None:
    """Entry point of the `resnet` console script and `python -m resnetcli`."""
    app(prog_name=PROG)
