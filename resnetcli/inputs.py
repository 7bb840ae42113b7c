"""Turning command-line inputs into a stream of images to classify.

An input is an image file, a folder (searched for image files), a glob pattern, an http(s) URL, or
`-` for paths read from stdin. Expansion is lazy: stdin and folders are read as the stream is
consumed, so ten million paths never sit in memory at once. The order is deterministic: inputs in
the order given, folder entries sorted by name.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import select
import threading
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Iterator

from resnetcli.errors import UsageError
from resnetcli.images import is_image_file
from resnetcli.urls import is_url

log = logging.getLogger(__name__)

#: The input that means "read paths from stdin".
STDIN = "-"

_GLOB_CHARACTERS = re.compile(r"[*?[]")
_READ_CHUNK = 1 << 16


@dataclass(frozen=True)
class Input:
    """One input to classify: a file path or URL, or an input that already failed (`error` says why)."""

    source: str
    error: str | None = None


def expand_inputs(
    specs: Iterable[str],
    *,
    recursive: bool = True,
    stdin: BinaryIO | None = None,
    null: bool = False,
    cancel: threading.Event | None = None,
) -> Iterator[Input]:
    """Expand inputs lazily into single images, in a deterministic order.

    - a folder gives the image files in it, sorted by name, descending into sub-folders when
      `recursive`; hidden entries (names starting with ".") are skipped; files are recognised as
      images by their content (a file with an image extension is taken and reported if broken);
      a folder without any image file is an error;
    - a pattern with `*`, `?` or `[` that names no existing file is expanded like a shell glob
      (`**` spans folders), matches sorted; no match is an error;
    - `-` reads paths (files, folders or URLs, not patterns) from `stdin`, one per line, or
      NUL-separated when `null`;
    - anything else (a file, an http(s) URL, a missing path) is passed on as it is, for the
      decoder to read or report.

    Once `cancel` is set, the expansion stops within about POLL seconds, even while waiting for
    stdin or walking a large folder (the prediction pipeline sets it when it is closed).
    """
    cancel = cancel if cancel is not None else threading.Event()
    for spec in specs:
        if cancel.is_set():
            return
        if spec == STDIN:
            if stdin is None:
                raise UsageError("'-' reads paths from stdin, but there is no stdin")
            for line in read_paths(stdin, null=null, cancel=cancel):
                yield from _expand(line, recursive, allow_glob=False, cancel=cancel)
        else:
            yield from _expand(spec, recursive, allow_glob=True, cancel=cancel)


#: How often (seconds) a wait for stdin checks whether the expansion was cancelled.
POLL = 0.1


def read_paths(stream: BinaryIO, *, null: bool = False, cancel: threading.Event | None = None) -> Iterator[str]:
    """Paths from a byte stream, one per line (or NUL-separated), each yielded as soon as it is complete.

    Paths are decoded as the file system does (undecodable bytes survive); empty entries are
    skipped, and a line's trailing carriage return is dropped. Reading stops once `cancel` is set.
    """
    separator = b"\0" if null else b"\n"
    read = _reader(stream, cancel)
    pending = b""
    while True:
        chunk = read(_READ_CHUNK)
        if not chunk:
            break
        pending += chunk
        *complete, pending = pending.split(separator)
        for raw in complete:
            path = _decode_path(raw, null)
            if path:
                yield path
    path = _decode_path(pending, null)
    if path:
        yield path


def _reader(stream: BinaryIO, cancel: threading.Event | None = None):
    """A function reading what is available, up to n bytes (b"" at the end, or once `cancel` is set).

    For a real file descriptor this is os.read, not the buffered reader: a thread blocked inside
    a BufferedReader holds its lock, and the interpreter aborts at exit (after Ctrl-C) when it
    cannot take that lock to flush stdin. It waits in steps of POLL seconds (select) so that a
    cancelled pipeline does not leave a thread blocked on a pipe that stays open.
    """
    try:
        descriptor = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return getattr(stream, "read1", stream.read)

    def read(size: int) -> bytes:
        while cancel is not None and not cancel.is_set():
            try:
                readable, _, _ = select.select([descriptor], [], [], POLL)
            except (OSError, ValueError) as error:  # not selectable (some platforms' files): just read
                log.debug("stdin cannot be polled (%s); reading it blocking", error)
                break
            if readable:
                break
        if cancel is not None and cancel.is_set():
            return b""
        return os.read(descriptor, size)

    return read


def _decode_path(raw: bytes, null: bool) -> str:
    if not null and raw.endswith(b"\r"):
        raw = raw[:-1]
    return os.fsdecode(raw)


def _expand(spec: str, recursive: bool, *, allow_glob: bool, cancel: threading.Event) -> Iterator[Input]:
    if is_url(spec):
        yield Input(spec)
        return
    if allow_glob and _GLOB_CHARACTERS.search(spec) and not os.path.lexists(spec):
        matches = sorted(glob.iglob(os.path.expanduser(spec), recursive=True))
        if not matches:
            yield Input(spec, "no files match this pattern")
        for match in matches:
            yield from _expand_path(match, recursive, cancel)
        return
    yield from _expand_path(spec, recursive, cancel)


def _expand_path(path: str, recursive: bool, cancel: threading.Event) -> Iterator[Input]:
    if not os.path.isdir(path):
        yield Input(path)
        return
    found = False
    for item in _walk(path, recursive, ancestors=frozenset(), cancel=cancel):
        found = True
        yield item
    if not found:
        where = "in this folder or below" if recursive else "at the top of this folder (--no-recursive)"
        yield Input(path, f"is a directory with no image files {where}")


def _walk(
    folder: str, recursive: bool, ancestors: frozenset[tuple[int, int]], cancel: threading.Event
) -> Iterator[Input]:
    try:
        status = os.stat(folder)
        with os.scandir(folder) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
    except OSError as error:
        yield Input(folder, f"cannot list folder: {error.strerror or error}")
        return
    # Following symbolic links to folders is allowed, going round in a loop is not.
    ancestors = ancestors | {(status.st_dev, status.st_ino)}
    for entry in entries:
        if cancel.is_set():
            return
        if entry.name.startswith("."):
            continue
        try:
            is_folder = entry.is_dir()
            is_file = not is_folder and entry.is_file()
        except OSError as error:
            log.debug("skipped %s: %s", entry.path, error)
            continue
        if is_folder:
            if recursive:
                try:
                    status = entry.stat()
                except OSError as error:
                    log.debug("skipped folder %s: %s", entry.path, error)
                    continue
                if (status.st_dev, status.st_ino) not in ancestors:
                    yield from _walk(entry.path, recursive, ancestors, cancel)
        elif is_file and is_image_file(entry.path):
            yield Input(entry.path)


def parse_shard(text: str) -> tuple[int, int]:
    """Parse `--shard I/N` (1 <= I <= N, 1-based like SLURM_ARRAY_TASK_ID) into (I, N)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not match:
        raise UsageError(f"--shard {text}: expected I/N, for example 1/4")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 1 <= index <= count:
        raise UsageError(f"--shard {text}: I must be between 1 and N (shards are numbered from 1)")
    return index, count


def take_shard(items: Iterable[Input], index: int, count: int) -> Iterator[Input]:
    """The inputs of shard `index` (1-based) of `count`: the k-th input (from 0) goes to shard k % count + 1."""
    for position, item in enumerate(items):
        if position % count == index - 1:
            yield item
