"""Where `predict` writes its records: stdout, or `--output FILE` written whole or not at all.

The rules:
- An output file is written to a hidden temporary file beside it (`.NAME.XXXXXXXX.tmp`) and renamed
  over FILE when the run ends (input errors and `--strict` included). An interrupted or failed run
  leaves FILE as it was. Two processes writing the same FILE: the last to finish wins, whole; the
  other's records are lost, never interleaved.
- FILE is never an input: when it is the same file as an input argument or as the file stdin reads
  (by device and inode, so every spelling counts: relative, absolute, a symbolic or hard link), the
  command is refused (exit 2) before anything is read or written. An input found later (in a folder,
  through a glob or the stdin list) that is FILE gets an error record instead of being read.
- FILE that exists and is not a regular file (`/dev/stdout`, a FIFO, a device) is written directly.
- A write that fails (`/dev/full`, a full disk, an I/O error) stops the run with one line and exit
  code 4 (`errors.OutputError`).
"""

from __future__ import annotations

import os
import secrets
import stat
import sys
from pathlib import Path
from typing import IO, Iterable, Iterator, Optional

from resnetcli.errors import OutputError, UsageError
from resnetcli.inputs import STDIN, Input
from resnetcli.urls import is_url

#: The error record of an input that is the output file itself.
IS_OUTPUT = "is the --output file; not read"


def _identity(status: os.stat_result) -> tuple[int, int]:
    return status.st_dev, status.st_ino


class RecordsOutput:
    """The stream records go to, committed by `commit()` or abandoned by `abandon()`."""

    def __init__(self, path: Optional[Path]) -> None:
        self.path = path
        self.identity: tuple[int, int] | None = None
        self._temporary: str | None = None
        self._target: str | None = None
        self.stream: IO[str] = _Guarded(sys.stdout, self)
        if path is None:
            return
        try:
            status = os.stat(path)
        except FileNotFoundError:
            status = None
        except OSError as error:
            raise UsageError(f"--output {path}: cannot write: {error.strerror or error}") from None
        if status is not None:
            self.identity = _identity(status)
        if status is not None and not stat.S_ISREG(status.st_mode):
            self.stream = _Guarded(self._open(str(path), os.O_WRONLY | os.O_TRUNC), self)
            return
        # A symbolic link is followed: the file it points to is replaced, the link stays.
        self._target = os.path.realpath(path)
        folder, name = os.path.split(self._target)
        self._temporary = os.path.join(folder, f".{name}.{secrets.token_hex(4)}.tmp")
        self.stream = _Guarded(self._open(self._temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL), self)
        if status is not None:
            os.chmod(self._temporary, stat.S_IMODE(status.st_mode))

    def _open(self, name: str, flags: int) -> IO[str]:
        try:
            descriptor = os.open(name, flags | getattr(os, "O_CLOEXEC", 0), 0o666)
        except OSError as error:
            raise UsageError(f"--output {self.path}: cannot write: {error.strerror or error}") from None
        return os.fdopen(descriptor, "w", encoding="utf-8", newline="")

    def commit(self) -> None:
        """Flush everything; move the temporary file into place. OutputError when it cannot be written."""
        stream = self.stream.inner
        try:
            stream.flush()
            if self._temporary is not None:
                os.fsync(stream.fileno())
                stream.close()
                os.replace(self._temporary, self._target)
                self._temporary = None
            elif stream is not sys.stdout:
                stream.close()
        except BrokenPipeError:
            raise
        except OSError as error:
            raise self.failed(error) from None

    def abandon(self) -> None:
        """Close without committing: the temporary file is removed, FILE stays as it was."""
        if self.stream.inner is not sys.stdout:
            try:
                self.stream.inner.close()
            except OSError:
                pass
        if self._temporary is not None:
            try:
                os.unlink(self._temporary)
            except OSError:
                pass
            self._temporary = None

    def failed(self, error: OSError) -> OutputError:
        """The OutputError to raise for a write that failed, with nothing half-written left behind."""
        where = str(self.path) if self.path is not None else "stdout"
        if self.stream.inner is sys.stdout:
            _silence_stdout()
        self.abandon()
        return OutputError(f"cannot write the records to {where}: {error.strerror or error}")

    def refuse_inputs(self, specs: Iterable[str], stdin: Optional[IO[bytes]]) -> None:
        """UsageError when an input argument, or the file stdin reads (with `-`), is the output file."""
        if self.identity is None:
            return
        for spec in specs:
            if spec == STDIN:
                try:
                    same = stdin is not None and _identity(os.fstat(stdin.fileno())) == self.identity
                except (OSError, ValueError, AttributeError):
                    same = False
                if same:
                    raise UsageError(
                        f"--output {self.path} is the file stdin reads the input list from; choose another file"
                    )
            elif not is_url(spec) and self.same_file(spec):
                raise UsageError(f"--output {self.path} is the input {spec}; choose another file")

    def same_file(self, name: str) -> bool:
        try:
            return self.identity is not None and _identity(os.stat(name)) == self.identity
        except (OSError, ValueError):
            return False

    def screen(self, items: Iterable[Input]) -> Iterator[Input]:
        """The inputs, with any that is the output file turned into an error record."""
        for item in items:
            if (
                self.identity is not None
                and item.error is None
                and not is_url(item.source)
                and self.same_file(item.source)
            ):
                yield Input(item.source, IS_OUTPUT)
            else:
                yield item


class _Guarded:
    """A text stream whose failing writes raise `OutputError` (a closed pipe stays BrokenPipeError,
    which the application turns into a quiet exit)."""

    def __init__(self, inner: IO[str], owner: RecordsOutput) -> None:
        self.inner = inner
        self._owner = owner

    def _call(self, method: str, *args):
        try:
            return getattr(self.inner, method)(*args)
        except BrokenPipeError:
            raise
        except OSError as error:
            raise self._owner.failed(error) from None

    def write(self, text: str) -> int:
        return self._call("write", text)

    def flush(self) -> None:
        self._call("flush")

    def isatty(self) -> bool:
        return self.inner.isatty()

    @property
    def encoding(self) -> str:
        return getattr(self.inner, "encoding", None) or "utf-8"

    def fileno(self) -> int:
        return self.inner.fileno()


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush of what it still holds cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass
