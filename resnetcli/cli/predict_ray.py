"""`resnet predict --engine ray`: the options Ray adds to predict, and the writing of its records.

`resnetcli.cli.predict` declares these options (in its marked `--engine ray` block) and hands
over to `predict_on_ray` when `--engine ray` is given. Nothing here imports Ray or torch at module
level.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager, redirect_stdout
from enum import Enum
from pathlib import Path
from typing import Iterator, List, Optional

import typer
from typing_extensions import Annotated

from resnetcli.errors import ExitStatus


class Engine(str, Enum):
    """Where `resnet predict` runs the model: in this process, or on Ray actors."""

    local = "local"
    ray = "ray"


EngineOption = Annotated[
    Engine,
    typer.Option(
        "--engine",
        rich_help_panel="Scale-out (--engine ray)",
        case_sensitive=False,
        help="local: this process. ray: Ray Data actors (needs resnetcli\\[ray]).",
    ),
]
AddressOption = Annotated[
    Optional[str],
    typer.Option(
        "--address", rich_help_panel="Scale-out (--engine ray)", metavar="ADDRESS",
        help="Ray cluster to run on (--engine ray): auto, HOST:PORT or ray://HOST:PORT. "
        "Default: start a local Ray instance sized to this machine.",
    ),
]  # fmt: skip
ActorsOption = Annotated[
    Optional[int],
    typer.Option(
        "--actors",
        rich_help_panel="Scale-out (--engine ray)",
        min=1,
        help="Model actors (--engine ray). Default: the cluster's CPUs / --cpus-per-actor.",
    ),
]
CpusPerActorOption = Annotated[
    float,
    typer.Option(
        "--cpus-per-actor",
        rich_help_panel="Scale-out (--engine ray)",
        min=0.01,
        help="CPUs each actor reserves, and its torch threads (--engine ray).",
    ),
]
GpusPerActorOption = Annotated[
    float,
    typer.Option(
        "--gpus-per-actor",
        rich_help_panel="Scale-out (--engine ray)",
        min=0.0,
        help="GPUs each actor reserves (--engine ray); the model runs there.",
    ),
]
OutputDirOption = Annotated[
    Optional[str],
    typer.Option(
        "--output-dir", rich_help_panel="Scale-out (--engine ray)", metavar="DIR|URI",
        help="--engine ray: have Ray write sharded JSONL files there (a new or empty folder) instead of streaming.",
    ),
]  # fmt: skip


@contextmanager
def ray_notices_away() -> Iterator[None]:
    """Ray's driver prints its raylet's notices (task retries with remote tracebacks, idle workers) to
    sys.stdout (ray._private.worker.listen_error_messages): send them to stderr with --debug, else
    drop them (failures reach the user as resnetcli's one-line errors). Records are written to
    the stream opened before, never through sys.stdout."""
    if logging.getLogger("resnetcli").isEnabledFor(logging.DEBUG):
        with redirect_stdout(sys.stderr):
            yield
        return
    with open(os.devnull, "w") as devnull, redirect_stdout(devnull):
        yield


def predict_on_ray(
    inputs: List[str],
    *,
    output: Optional[Path],
    output_format,
    strict: bool,
    shard: Optional[str],
    labels: Optional[Path],
    **options,
) -> None:
    """Run predict on Ray and write its records like the local engine (stdout, or `-o` written whole
    through `RecordsOutput`, any format), or into `--output-dir`; exit 1 when an input failed."""
    from resnetcli.cli.app import say
    from resnetcli.cli.outfile import RecordsOutput
    from resnetcli.cli.output import OutputFormat, RecordWriter, choose_format
    from resnetcli.cli.predict_records import PREDICT_COLUMNS, SUFFIX_FORMATS, one_line, prediction_rows, read_labels
    from resnetcli.cli.predict_table import print_predictions
    from resnetcli.errors import UsageError
    from resnetcli.inputs import parse_shard
    from resnetcli.ray_engine import run_on_ray

    if output is not None and options.get("output_dir") is not None:
        raise UsageError("--output and --output-dir: choose one")
    stdin = sys.stdin.buffer if "-" in inputs else None
    shard_spec = parse_shard(shard) if shard is not None else None
    class_names = read_labels(labels) if labels else None
    failed = 0
    if options.get("output_dir") is not None:
        records = run_on_ray(inputs, shard=shard_spec, labels=class_names, stdin=stdin, **options)
        with ray_notices_away():
            for entry in records:
                failed += 1
                say(f"error: {one_line(entry['error'])}")
        if failed:
            raise typer.Exit(int(ExitStatus.INPUTS_FAILED))
        return
    target = RecordsOutput(output)
    records = None
    try:
        target.refuse_inputs(inputs, stdin)
        records = run_on_ray(inputs, shard=shard_spec, labels=class_names, stdin=stdin, screen=target.screen, **options)
        stream = target.stream
        if output_format is None and output is not None:
            output_format = SUFFIX_FORMATS.get(output.suffix.lower(), OutputFormat.jsonl)
        fmt = choose_format(output_format, stream)
        # The table's title names the model as the records do (the local engine's title); a table is
        # printed at the end, so the first classified input can give it.
        writer = RecordWriter(
            fmt, PREDICT_COLUMNS, stream=stream, rows=prediction_rows, title=None, table=print_predictions
        )
        with ray_notices_away(), writer:
            for entry in records:
                if writer.title is None and "arch" in entry:
                    writer.title = f"{entry['arch']} ({entry['weights']})"
                writer.write(entry)
                if "error" in entry:
                    failed += 1
                    say(f"error: {one_line(entry['error'])}")
                    if strict:
                        say("stopped at the first failure (--strict)")
                        break
        close = getattr(records, "close", None)
        if close is not None:
            close()  # shuts Ray down now, also when stopped early
        target.commit()
    except BaseException:
        close = getattr(records, "close", None)
        if close is not None:
            close()
        target.abandon()
        raise
    if failed:
        raise typer.Exit(int(ExitStatus.INPUTS_FAILED))
