"""Domain errors and the exit codes they map to.

Core modules raise these; the CLI turns them into one stderr line and an exit code in one place
(`resnetcli.cli._ResnetGroup.invoke`). Nothing here imports torch.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from enum import IntEnum


class ExitStatus(IntEnum):
    """Exit codes of the `resnet` command; documented in the README."""

    OK = 0
    INPUTS_FAILED = 1
    USAGE = 2
    WEIGHTS_UNAVAILABLE = 3
    OUTPUT_FAILED = 4
    INTERRUPTED = 130


class ResnetError(Exception):
    """Base class of every error resnetcli reports to the user as a one-line message."""

    exit_status: ExitStatus = ExitStatus.INPUTS_FAILED


class UsageError(ResnetError):
    """The command line names something that does not exist or does not fit together."""

    exit_status = ExitStatus.USAGE


class UnknownArchitecture(UsageError):
    """An architecture name that torchvision's classification registry does not have."""


class UnknownWeights(UsageError):
    """A weights name that the architecture's weights enum does not have."""


class WeightsUnavailable(ResnetError):
    """Weights that cannot be had: not cached while offline, a failed or corrupt download."""

    exit_status = ExitStatus.WEIGHTS_UNAVAILABLE


class CheckpointError(WeightsUnavailable):
    """A checkpoint file that cannot be loaded safely or does not fit the architecture."""


class CacheError(WeightsUnavailable):
    """The weight cache folder cannot be read or written (read-only, full, missing)."""


class OutputError(ResnetError):
    """The records cannot be written (a full disk, a closed or failing output): exit code 4."""

    exit_status = ExitStatus.OUTPUT_FAILED


class InputError(ResnetError):
    """One input (an image file, a URL) cannot be read; the rest of a batch goes on."""

    def __init__(self, source: str, reason: str) -> None:
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


def did_you_mean(word: str, choices: Iterable[str], *, fallback: str = "") -> str:
    """The "did you mean" tail of an error message: the one rule of every name lookup (architectures,
    weights, timm models, graph nodes, class names).

    Close spellings first (difflib, as `resnt50` -> `resnet50`); when there are none, the choices
    that contain the word (`V2` -> `IMAGENET1K_V2`), compared case-insensitively. `fallback` is
    the tail when nothing is similar.
    """
    choices = list(dict.fromkeys(choices))
    folded = {choice.lower(): choice for choice in choices}
    wanted = word.strip().lower()
    close = [folded[c] for c in difflib.get_close_matches(wanted, list(folded), n=3, cutoff=0.6)]
    if not close and len(wanted) >= 2:
        close = [choice for choice in choices if wanted in choice.lower()][:3]
    if not close:
        return fallback
    return "; did you mean " + ", ".join(repr(c) for c in close) + "?"


def one_line(error: BaseException | str) -> str:
    """An error's text as one line (runs of white space, line breaks included, become one space):
    what every message on stderr and every `error` field of a record shows."""
    return " ".join(str(error).split()) or (type(error).__name__ if isinstance(error, BaseException) else "")
