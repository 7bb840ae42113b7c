"""The Typer application, its shared options, and the one place errors become exit codes.

Nothing here imports torch: `resnet --help` and shell completion must stay fast. Commands import
the core modules inside their bodies.
"""

from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterator, Optional


import typer
from typer.core import TyperGroup
from typing_extensions import Annotated

from resnetcli import __version__
from resnetcli.cli.output import OutputFormat
from resnetcli.errors import ExitStatus, ResnetError

PROG = "resnet"


def say(message: str) -> None:
    """One line on stderr, prefixed with the program name (logs, warnings, errors)."""
    sys.stderr.write(f"{PROG}: {message}\n")
    sys.stderr.flush()


def warn(message: str) -> None:
    """A warning on stderr."""
    say(f"warning: {message}")


def report_error(error: BaseException) -> None:
    """A domain error as one line on stderr."""
    text = " ".join(str(error).split()) or type(error).__name__
    say(f"error: {text}")


def _complete_architecture(ctx, param, incomplete: str) -> list[str]:
    from resnetcli.names import complete_architecture

    return complete_architecture(incomplete)


def _complete_weights(ctx, param, incomplete: str) -> list[str]:
    from resnetcli.names import complete_weights

    # An option still waiting for its value stops click's parsing: later words stay in ctx.args.
    return complete_weights([ctx.params.get("arch"), *ctx.args], incomplete)


def _complete_model_specs(ctx, param, incomplete: str) -> list[str]:
    from resnetcli.names import complete_model_spec

    return complete_model_spec(incomplete)


#: Shell completion of registry names, by parameter name, for every command that has one
#: (`--arch`, an ARCH argument, `--weights`, fetch's ARCH[:WEIGHTS]...). The names come from
#: resnetcli.names, which answers without importing torch.
NAME_COMPLETIONS = {"arch": _complete_architecture, "weights": _complete_weights, "models": _complete_model_specs}


class ResnetGroup(TyperGroup):
    """Maps domain errors, Ctrl-C and a closed stdout to a message and an exit code, for every command."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for command in self.commands.values():
            for param in command.params:
                if param.name in NAME_COMPLETIONS and param._custom_shell_complete is None:
                    param._custom_shell_complete = NAME_COMPLETIONS[param.name]

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except ResnetError as error:
            report_error(error)
            ctx.exit(int(error.exit_status))
        except KeyboardInterrupt:
            say("interrupted")
            ctx.exit(int(ExitStatus.INTERRUPTED))
        except BrokenPipeError:
            # The reader went away (`resnet predict ... | head`): nothing more to say to it.
            _silence_stdout()
            ctx.exit(int(ExitStatus.OK))


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _version_callback(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        parts = []
        for package in ("torch", "torchvision"):
            try:
                parts.append(f"{package} {version(package)}")
            except PackageNotFoundError:
                parts.append(f"{package} not installed")
        typer.echo(f"resnetcli {__version__} ({', '.join(parts)})")
        raise typer.Exit()


app = typer.Typer(
    cls=ResnetGroup,
    name=PROG,
    help="Classify images with torchvision's pretrained models, and inspect the models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def main_options(
    version: Annotated[
        Optional[bool],
        typer.Option("--version", "-V", help="Show the versions of resnetcli, torch and torchvision.", callback=_version_callback, is_eager=True),
    ] = None,
) -> None:
    """Classify images with torchvision's pretrained models, and inspect the models."""


# ---------------------------------------------------------------------------------------------
# Options shared by several commands

FormatOption = Annotated[
    Optional[OutputFormat],
    typer.Option(
        "--format",
        "-f",
        help="Output format. Default: a table on a terminal, jsonl when stdout is a pipe or file.",
        case_sensitive=False,
    ),
]
OfflineOption = Annotated[
    bool,
    typer.Option("--offline", help="Never touch the network; missing weights are an error (also RESNET_OFFLINE=1)."),
]
MirrorOption = Annotated[
    Optional[str],
    typer.Option("--mirror", metavar="BASE_URL", help="Download weights from this base URL instead of the official host (also RESNET_MIRROR)."),
]


def cache_settings(offline: bool, mirror: Optional[str]):
    """CacheSettings from the command line and the environment."""
    from resnetcli.cache import CacheSettings

    return CacheSettings.from_env(offline=offline, mirror=mirror)


@contextmanager
def download_progress() -> Iterator:
    """A progress callback for downloads: a rich bar when stderr is a terminal, log lines otherwise."""
    if not sys.stderr.isatty():
        started: set[str] = set()

        def log(name: str, done: int, total: Optional[int]) -> None:
            if name not in started:
                started.add(name)
                size = f" ({total / 1e6:.1f} MB)" if total else ""
                say(f"downloading {name}{size}")

        yield log
        return

    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    tasks: dict[str, int] = {}
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=False,
        # rich would otherwise send whatever is printed to stdout while the bar is live (the
        # records) to the bar's console, stderr.
        redirect_stdout=False,
    ) as progress:

        def update(name: str, done: int, total: Optional[int]) -> None:
            if name not in tasks:
                tasks[name] = progress.add_task(name, total=total)
            progress.update(tasks[name], completed=done, total=total)

        yield update
