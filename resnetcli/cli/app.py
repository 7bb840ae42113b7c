"""The Typer application, its shared options, and the one place errors become exit codes.

Commands register on `app` (a ResnetTyper) from their own modules; they get, without doing anything:
name completion for parameters called `arch`, `weights` or `models` (Typer's `autocompletion`),
click-style help, the examples of resnetcli.cli.examples as their help's epilog, and the error
handling of ResnetGroup. `--debug`/RESNET_DEBUG turns on the `resnetcli` logger and tracebacks.

Nothing here imports torch: `resnet --help` and shell completion must stay fast. Commands import
the core modules inside their bodies.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import traceback
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from typer.core import TyperCommand, TyperGroup
from typer.models import ParameterInfo

from resnetcli import __version__
from resnetcli.cli.examples import epilog
from resnetcli.cli.helpstyle import ResnetCommand, tidy
from resnetcli.cli.output import OutputFormat
from resnetcli.errors import ExitStatus, ResnetError, one_line

PROG = "resnet"
log = logging.getLogger(__name__)


def say(message: str) -> None:
    """One line on stderr, prefixed with the program name (logs, warnings, errors)."""
    sys.stderr.write(f"{PROG}: {message}\n")
    sys.stderr.flush()


def warn(message: str) -> None:
    """A warning on stderr."""
    say(f"warning: {message}")


def report_error(error: BaseException) -> None:
    """A domain error as one line on stderr; with --debug, followed by its full chain and tracebacks."""
    text = one_line(error)
    say(f"error: {text}")
    if debug_enabled():
        report_traceback(error)


# ---------------------------------------------------------------------------------------------
# --debug / RESNET_DEBUG: the logs of the `resnetcli` logger and full tracebacks on stderr


class _StderrHandler(logging.Handler):
    """Log records as `resnet: debug: LOGGER: message` on whatever sys.stderr is at the time."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            say(f"{record.levelname.lower()}: {record.name}: {self.format(record)}")
        except Exception:
            self.handleError(record)


_HANDLER = _StderrHandler()


def configure_logging(debug: bool) -> None:
    """With `debug`, every record of the `resnetcli` logger at DEBUG and above goes to stderr;
    without, the logger is left as Python's default has it (warnings through logging's last resort)."""
    root = logging.getLogger("resnetcli")
    if debug:
        if _HANDLER not in root.handlers:
            root.addHandler(_HANDLER)
        root.setLevel(logging.DEBUG)
    else:
        root.removeHandler(_HANDLER)
        root.setLevel(logging.NOTSET)


def debug_enabled() -> bool:
    """Whether --debug (or RESNET_DEBUG) is on for this invocation (set by configure_logging)."""
    return _HANDLER in logging.getLogger("resnetcli").handlers


def report_traceback(error: BaseException) -> None:
    """The full chain of `error`, innermost first, with tracebacks: also the causes hidden with `from None`."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    blocks = ["".join(traceback.format_exception(type(e), e, e.__traceback__, chain=False)) for e in reversed(chain)]
    sys.stderr.write("\nThe above exception led to the next:\n\n".join(blocks))
    sys.stderr.flush()


# ---------------------------------------------------------------------------------------------
# Shell completion of registry names, answered by resnetcli.names without importing torch.


def complete_architecture(incomplete: str) -> list[str]:
    """Typer `autocompletion` callback: architecture names (`--arch resn<TAB>`, `summary <TAB>`)."""
    from resnetcli.names import complete_architecture as complete

    return complete(incomplete)


def complete_weights(ctx: typer.Context, incomplete: str) -> list[str]:
    """Typer `autocompletion` callback: the weights names of the architecture already typed."""
    from resnetcli.names import complete_weights as complete

    # An option still waiting for its value stops click's parsing: later words stay in ctx.args.
    return complete([ctx.params.get("arch"), *ctx.args], incomplete)


def complete_model_specs(incomplete: str) -> list[str]:
    """Typer `autocompletion` callback: fetch's ARCH[:WEIGHTS]."""
    from resnetcli.names import complete_model_spec

    return complete_model_spec(incomplete)


#: Completion of registry names by parameter name, for every command registered on `app`
#: (`--arch`, an ARCH argument, `--weights`, fetch's ARCH[:WEIGHTS]...), unless the parameter
#: declares its own `autocompletion`.
NAME_COMPLETIONS: dict[str, Callable[..., list[str]]] = {
    "arch": complete_architecture,
    "weights": complete_weights,
    "models": complete_model_specs,
}


def _attach_name_completion(function: Callable) -> None:
    """Give the parameters of a command function named in NAME_COMPLETIONS Typer's `autocompletion`.

    With `from __future__ import annotations` every evaluation of an annotation makes new
    typer.Option objects, so the resolved annotation, completion set, is stored back on the
    function: Typer then reads those very objects when it builds the command.
    """
    try:
        hints = typing.get_type_hints(function, include_extras=True)
    except (NameError, TypeError) as error:  # an annotation naming something defined later
        log.debug("no name completion for %s: %s", function.__name__, error)
        hints = {}
    for name, parameter in inspect.signature(function).parameters.items():
        complete = NAME_COMPLETIONS.get(name)
        if complete is None:
            continue
        infos = [parameter.default]
        hint = hints.get(name)
        if typing.get_origin(hint) is Annotated:
            infos.extend(hint.__metadata__)
            function.__annotations__[name] = hint
        for info in infos:
            if isinstance(info, ParameterInfo) and info.autocompletion is None and info.shell_complete is None:
                info.autocompletion = complete


# ---------------------------------------------------------------------------------------------
# The group: examples, --debug, and the one place errors become messages and exit codes


class ResnetGroup(TyperGroup):
    """Maps domain errors, Ctrl-C and a closed stdout to a message and an exit code, for every command.

    The top-level group also gives every command below it its examples (resnetcli.cli.examples)
    as the epilog of its help, and the click-style help of ResnetCommand.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.name == PROG:
            self.epilog = self.epilog or epilog("")
            _adopt_commands(self, prefix="")

    def get_params(self, ctx: typer.Context) -> list:
        return tidy(super().get_params(ctx))

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


def _adopt_commands(group: TyperGroup, prefix: str) -> None:
    """Attach the examples to every command below `group`, and make Typer's commands ours."""
    for name, command in group.commands.items():
        path = f"{prefix}{name}"
        if command.epilog is None:
            command.epilog = epilog(path)
        if type(command) is TyperCommand:
            command.__class__ = ResnetCommand
        elif type(command) is TyperGroup:
            command.__class__ = ResnetGroup
        if isinstance(command, TyperGroup):
            _adopt_commands(command, prefix=f"{path} ")


class ResnetTyper(typer.Typer):
    """The app: commands registered on it complete registry names (NAME_COMPLETIONS) and show
    click-style help, whichever module declares them."""

    def command(self, name: str | None = None, *, cls: type[TyperCommand] | None = None, **kwargs):
        register = super().command(name, cls=cls or ResnetCommand, **kwargs)

        def decorator(function):
            _attach_name_completion(function)
            return register(function)

        return decorator


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


app = ResnetTyper(
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
        bool | None,
        typer.Option(
            "--version",
            "-V",
            help="Show the versions of resnetcli, torch and torchvision.",
            callback=_version_callback,
            is_eager=True,
        ),
    ] = None,
    debug: Annotated[
        bool,
        typer.Option(
            "--debug",
            envvar="RESNET_DEBUG",
            show_envvar=False,
            help="Log what happens (fallbacks included) to stderr, and show an error's full traceback"
            " (also RESNET_DEBUG=1).",
        ),
    ] = False,
) -> None:
    """Classify images with torchvision's pretrained models, and inspect the models."""
    configure_logging(debug)
    log.debug("resnetcli %s, Python %s, arguments %s", __version__, sys.version.split()[0], sys.argv[1:])


# ---------------------------------------------------------------------------------------------
# Options shared by several commands

FormatOption = Annotated[
    OutputFormat | None,
    typer.Option(
        "--format",
        "-f",
        rich_help_panel="Output",
        help="Output format. Default: a table on a terminal, jsonl when stdout is a pipe or file.",
        case_sensitive=False,
    ),
]
TrustCheckpointOption = Annotated[
    bool,
    typer.Option(
        "--trust-checkpoint",
        rich_help_panel="Model",
        help="Load a --weights checkpoint that needs to run code from the file (weights_only=False): this RUNS THE "
        "FILE'S CODE; only for files from a source you trust.",
    ),
]
OfflineOption = Annotated[
    bool,
    typer.Option(
        "--offline",
        rich_help_panel="Weights cache",
        help="Never touch the network; missing weights are an error (also RESNET_OFFLINE=1).",
    ),
]
MirrorOption = Annotated[
    str | None,
    typer.Option(
        "--mirror",
        rich_help_panel="Weights cache",
        metavar="BASE_URL",
        help="Download weights from this base URL instead of the official host (also RESNET_MIRROR).",
    ),
]


def cache_settings(offline: bool, mirror: str | None):
    """CacheSettings from the command line and the environment."""
    from resnetcli.cache import CacheSettings

    return CacheSettings.from_env(offline=offline, mirror=mirror)


@contextmanager
def download_progress() -> Iterator:
    """A progress callback for downloads: a rich bar when stderr is a terminal, log lines otherwise."""
    if not sys.stderr.isatty():
        started: set[str] = set()

        def log(name: str, done: int, total: int | None) -> None:
            if name not in started:
                started.add(name)
                size = f" ({total / 1e6:.1f} MB)" if total else ""
                say(f"downloading {name}{size}")

        yield log
        return

    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    tasks: dict[str, int] = {}
    progress = Progress(
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
    )

    def update(name: str, done: int, total: int | None) -> None:
        if not tasks:  # the display starts with the first download: nothing is drawn when none happens
            progress.start()
        if name not in tasks:
            tasks[name] = progress.add_task(name, total=total)
        progress.update(tasks[name], completed=done, total=total)

    try:
        yield update
    finally:
        if tasks:
            progress.stop()
