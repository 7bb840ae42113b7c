"""Command lines from the docs and the --help examples: find them, parse them against the real
parser (no execution), and tell which of them can run here (only files of the repository, no weights).

Used by tests/test_docs.py and tests/test_help.py.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

#: Values for the shell variables the docs use (SLURM's, xargs' {} placeholder): a doc that uses
#: another variable fails the test until it is added here with a realistic value.
SHELL_VALUES = {
    "SLURM_CPUS_PER_TASK": "8",
    "SLURM_ARRAY_TASK_ID": "3",
    "SLURM_ARRAY_TASK_COUNT": "8",
    "{}": "2",
}

_SEPARATORS = {"|", "||", "&&", ";", "&"}
_REDIRECTIONS = {"<", ">", ">>", "2>", "2>>", "&>"}
_SH_BLOCK = re.compile(r"^```sh[ \t]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)


def sh_blocks(markdown: str) -> list[str]:
    """The bodies of the ```sh blocks of a Markdown text."""
    return [match.group(1) for match in _SH_BLOCK.finditer(markdown)]


def shell_lines(block: str) -> Iterator[str]:
    """The command lines of a shell block: continuations joined, `$ ` prompts and comment lines dropped."""
    pending = ""
    for raw in block.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = (pending + line).strip()
        pending = ""
        if line.startswith("$ "):
            line = line[2:]
        if line and not line.startswith("#"):
            yield line


def _expand(token: str) -> str:
    token = re.sub(r"\$\([^)]*\)", "x", token)  # a command substitution: any word will do
    for name, value in SHELL_VALUES.items():
        if name == "{}":
            token = token.replace("{}", value)
        else:
            token = token.replace("${" + name + "}", value).replace("$" + name, value)
    if "$" in token:
        raise ValueError(f"unknown shell variable in {token!r}: add a value to SHELL_VALUES")
    return token


def resnet_commands(line: str) -> list[list[str]]:
    """The `resnet ...` commands in one shell line (pipelines, xargs), as argument lists after `resnet`."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars="|&;<>")
    lexer.whitespace_split = True
    lexer.commenters = "#"
    segments: list[list[str]] = [[]]
    tokens = list(lexer)
    skip_next = False
    for token in tokens:
        if skip_next:
            skip_next = False
        elif token in _SEPARATORS:
            segments.append([])
        elif token in _REDIRECTIONS:
            skip_next = True  # the file redirected from or to
        else:
            segments[-1].append(token)
    commands = []
    for segment in segments:
        if "resnet" in segment:
            commands.append([_expand(token) for token in segment[segment.index("resnet") + 1 :]])
    return commands


#: Options whose callbacks act while the command line is parsed: never parsed by these checks.
ACTING_OPTIONS = {"--install-completion", "--show-completion"}


def parse(argv: list[str]):
    """Parse `resnet ARGV` with the real app, without running anything. Returns the leaf context.

    Raises click's exceptions for a line the parser rejects; `--help` ends in an Exit with code 0.
    """
    import typer.main

    from resnetcli.cli import app

    command = typer.main.get_command(app)
    # These act as soon as they are parsed (they write to the user's shell start-up files): check
    # only that the app has them.
    acting = [word for word in argv if word in ACTING_OPTIONS]
    if acting:
        root_options = {option for param in command.params for option in param.opts}
        assert set(acting) <= root_options, f"unknown option {acting} in {argv}"
        return None
    name, args = "resnet", list(argv)
    parent = None
    while True:
        ctx = command.make_context(name, args, parent=parent)
        commands = getattr(command, "commands", None)
        if not commands:
            return ctx
        # A group's own options here are flags only (--debug, --version, --help): the first word
        # that is not an option names the subcommand.
        position = next((i for i, word in enumerate(args) if not word.startswith("-")), None)
        if position is None:
            return ctx
        subcommand = command.get_command(ctx, args[position])
        if subcommand is None:
            raise AssertionError(f"no such command: {args[position]!r} in {argv}")
        name, args, parent, command = args[position], args[position + 1 :], ctx, subcommand


def check_parses(argv: list[str], where: str) -> None:
    """Assert that the parser accepts `resnet ARGV` (help and version exits count as accepted)."""
    try:
        parse(argv)
    except Exception as error:
        if type(error).__name__ == "Exit" and getattr(error, "exit_code", 1) == 0:
            return
        message = error.format_message() if hasattr(error, "format_message") else str(error)
        raise AssertionError(f"{where}: `resnet {shlex.join(argv)}` does not parse: {message}") from error


def with_placeholders(argv: list[str], folder: Path) -> list[str]:
    """`argv` with the user's own files and folders it names (photo.jpg, ft.pth, classes.txt,
    /media/usb/x.pth, photos/) made into empty stand-ins under `folder`, so that the parser's existence checks see them.
    Absolute paths are moved under `folder`; the repository's sample_images are linked there."""
    link = folder / "sample_images"
    if not link.exists():
        link.symlink_to(REPO / "sample_images")
    result = []
    for word in argv:
        if (
            not word.startswith(("-", "sample_images"))
            and "://" not in word
            and "*" not in word
            and re.fullmatch(r"[\w./-]+\.(jpe?g|png|pth|pt|txt|json|onnx|safetensors|csv)", word)
        ):
            word = word.lstrip("/")
            path = folder / word
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        elif re.fullmatch(r"[\w.-]+/", word) and word != "sample_images/":  # the user's own folder: photos/
            (folder / word).mkdir(parents=True, exist_ok=True)
        result.append(word)
    return result


#: Commands that run with nothing but the repository (no weights, no network): their examples are run.
_RUNNABLE = {("summary",), ("features",), ("list",), ("cache", "list"), ("cache", "verify")}
_NEEDS_WEIGHTS = {"--save", "--image", "-i"}


def runnable_here(argv: list[str]) -> bool:
    """Whether `resnet ARGV` needs only files of the repository and no weights."""
    if not argv or "--help" in argv or "-h" in argv or argv == ["--version"]:
        return True
    words = [w for w in argv if not w.startswith("-")]
    if not any(tuple(words[: len(key)]) == key for key in _RUNNABLE):
        return False
    if words[:2] == ["cache", "verify"] and len(words) > 2:
        return False  # names a file that is not in an empty cache
    if _NEEDS_WEIGHTS & set(argv):
        return False
    for option in ("--weights", "-w"):
        if option in argv:
            value = argv[argv.index(option) + 1]
            if "." in value or "/" in value:
                return False  # a checkpoint file or URL
    return True
