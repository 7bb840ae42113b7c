"""Partial files in the weight cache: where a file is written before it is verified and renamed into place.

A partial file is `.NAME.PID.NS.partial` in the cache folder, unique to its writer, so two writers
never share one and the name says which file it was meant to become. Only the holder of a file's
lock (resnetcli.store.file_lock) writes its partial files, so any found while holding the lock
were left by a process that died mid-write and are removed. Torch-free, like the rest of the store.
"""

from __future__ import annotations

import logging
import os
import re
import time
from pathlib import Path

log = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"
_PARTIAL_NAME = re.compile(rf"^\.(?P<name>.+)\.\d+\.\d+{re.escape(PARTIAL_SUFFIX)}$")


def new_partial(folder: Path, file_name: str) -> Path:
    return folder / f".{file_name}.{os.getpid()}.{time.monotonic_ns()}{PARTIAL_SUFFIX}"


def owner_of_partial(name: str) -> str | None:
    """The file name a partial file (`.NAME.PID.NS.partial`) was meant to become, or None."""
    match = _PARTIAL_NAME.match(name)
    return match.group("name") if match else None


def partials_of(folder: Path, file_name: str | None = None) -> list[Path]:
    """Partial files in `folder` (of `file_name` only, when given), links included, sorted."""
    try:
        entries = os.listdir(folder)
    except FileNotFoundError:
        return []
    found = [
        folder / entry
        for entry in entries
        if (owner := owner_of_partial(entry)) is not None and (file_name is None or owner == file_name)
    ]
    return sorted(found)


def remove_stale_partials(folder: Path, file_name: str) -> list[Path]:
    """Remove partial files of `file_name`; call it holding that file's lock.

    Only the lock holder writes partial files, so any found while holding the lock belong to a
    process that died (SIGKILL, power loss) mid-write. Unlinking removes a link, never its target.
    """
    removed = []
    for stale in partials_of(folder, file_name):
        try:
            stale.unlink()
            removed.append(stale)
        except FileNotFoundError:
            pass
        except OSError as error:
            log.debug("%s: stale partial not removed: %s", stale, error)
    return removed
