"""The file store under the weight cache: records, locks, partial files and installing a verified file.

Files live where torch.hub and torchvision keep them (`$TORCH_HOME/hub/checkpoints`), so either
tool reuses the other's downloads. What resnetcli adds:

- a new file is written to a unique partial file in the cache folder, hashed, and renamed into
  place only once its sha256 is right; on any failure, Ctrl-C included, nothing is left behind;
- a per-file lock (filelock, an flock that dies with its holder), so that many processes starting
  at once fill a file once, and a killed writer never blocks the next one;
- a record of each file's full sha256, size and modification time (`.resnetcli/NAME.json`): a
  file truncated later is caught by the size check on every load, a file rewritten later by a
  full hash when its modification time moved, and anything by `verify`.

The store never follows a symbolic link out of its folder: the records folder, a record, a lock
and a partial file are each refused or replaced, never followed, when they are a link. Records are
read as regular files of at most RECORD_MAX bytes; anything else is a corrupt record, never trusted.
Nothing here imports torch or knows about models: callers pass in the names they want shown.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import stat
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

from resnetcli.errors import CacheError, WeightsUnavailable
from resnetcli.partials import (  # noqa: F401 (owner_of_partial, partials_of: the store's API, used by inventory)
    PARTIAL_SUFFIX,
    new_partial,
    owner_of_partial,
    partials_of,
    remove_stale_partials,
)

log = logging.getLogger(__name__)

#: torch.hub's convention: `NAME-<first hex digits of the sha256>.EXT` (the same pattern torch.hub uses).
HASH_PREFIX = re.compile(r"-([a-f0-9]{6,64})\.")
RECORD_DIR = ".resnetcli"
LOCK_SUFFIX = ".lock"
CHUNK = 1 << 20
#: How long a process waits for another one that is writing the same file.
LOCK_WAIT = 3600.0
#: The largest record read. A record is about 250 bytes (sha256, size, mtime, URL, date); 4 KiB
#: leaves room for a long URL and keeps a planted huge or endless file from being read at all.
RECORD_MAX = 4096


def hub_dir() -> Path:
    """torch.hub's cache folder, computed as torch.hub.get_dir() does (without importing torch)."""
    torch_home = os.environ.get("TORCH_HOME")
    if torch_home is None:
        xdg = os.environ.get("XDG_CACHE_HOME", os.path.join("~", ".cache"))
        torch_home = os.path.join(xdg, "torch")
    return Path(os.path.expanduser(torch_home)) / "hub"


def checkpoint_dir() -> Path:
    """The folder torchvision's pretrained weights are cached in."""
    return hub_dir() / "checkpoints"


@dataclass(frozen=True)
class CachedFile:
    """One file in the cache, as `fetch` and `cache rm` report it."""

    name: str
    path: Path
    size: int
    sha256: str | None
    status: str  # "downloaded", "already cached", "imported", "cached", "removed"


def hash_prefix_of(file_name: str) -> str | None:
    """The sha256 prefix in a torch.hub-style file name (`resnet50-11ad3fa6.pth` gives `11ad3fa6`)."""
    match = HASH_PREFIX.search(file_name)
    return match.group(1) if match else None


def sha256_of(path: Path) -> str:
    """The full sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _cache_error(action: str, folder: Path, error: OSError) -> CacheError:
    return CacheError(f"cannot {action} the weight cache folder {folder}: {error.strerror or error}")


# ---------------------------------------------------------------------------------------------
# The records folder and the records in it


def records_dir(folder: Path, *, create: bool) -> Path | None:
    """`folder/.resnetcli`, made if `create`; None if it does not exist. Refused when it is a link."""
    path = folder / RECORD_DIR
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        if not create:
            return None
        try:
            os.mkdir(path)
        except FileExistsError:
            pass
        except OSError as error:
            raise _cache_error("write to", folder, error) from None
        info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode):
        raise CacheError(
            f"{path} is a symbolic link; resnetcli never follows links out of its cache folder: remove the link"
        )
    if not stat.S_ISDIR(info.st_mode):
        raise CacheError(f"{path} is not a folder; resnetcli keeps its records there: remove it")
    return path


def _record_path(path: Path) -> Path:
    return path.parent / RECORD_DIR / (path.name + ".json")


class BadRecord(Exception):
    """A record that exists but cannot be trusted: its text says why."""


def _load_record(path: Path) -> dict | None:
    """The record of `path`, None when there is none; BadRecord when it is not a small, sound record."""
    if records_dir(path.parent, create=False) is None:
        return None
    where = _record_path(path)
    try:
        fd = os.open(where, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise BadRecord("it is a symbolic link") from None
        raise BadRecord(f"it cannot be read: {error.strerror or error}") from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise BadRecord("it is not a regular file")
        data = handle.read(RECORD_MAX + 1)
    if len(data) > RECORD_MAX:
        raise BadRecord(f"it is larger than {RECORD_MAX} bytes")
    try:
        record = json.loads(data)
    except RecursionError:
        raise BadRecord("it is nested too deeply") from None
    except ValueError:
        raise BadRecord("it is not valid JSON") from None
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str) or type(record.get("size")) is not int:
        raise BadRecord("it lacks a sha256 and a size")
    return record


def record_state(path: Path) -> tuple[dict | None, str | None]:
    """The record of `path` (None if missing or bad) and what is wrong with it (None if nothing)."""
    try:
        return _load_record(path), None
    except BadRecord as problem:
        log.debug("%s: record not trusted: %s", path, problem)
        return None, f"its record {RECORD_DIR}/{path.name}.json is corrupt: {problem}"


def read_record(path: Path) -> dict | None:
    """The sha256/size record written when `path` entered the cache or was last verified, if sound."""
    return record_state(path)[0]


def _write_atomically(folder: Path, name: str, data: bytes) -> None:
    """Write `folder/name` through a new temporary file and a rename: a link there is replaced, not followed."""
    temporary = folder / f".{name}.{os.getpid()}.{time.monotonic_ns()}{PARTIAL_SUFFIX}"
    try:
        with open(temporary, "xb") as handle:  # O_EXCL: never opens an existing file or link
            handle.write(data)
        os.replace(temporary, folder / name)
    finally:
        temporary.unlink(missing_ok=True)


def _record_bytes(info: os.stat_result, sha256: str, url: str | None) -> bytes:
    record = {
        "sha256": sha256,
        "size": info.st_size,
        "mtime_ns": info.st_mtime_ns,
        "url": url,
        "verified": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return json.dumps(record, indent=1).encode()


def write_record(path: Path, sha256: str, url: str | None = None) -> None:
    """Record the full hash, size and modification time of a verified cache file (`url` already redacted)."""
    folder = records_dir(path.parent, create=True)
    assert folder is not None
    _write_atomically(folder, path.name + ".json", _record_bytes(path.stat(), sha256, url))


def try_write_record(path: Path, sha256: str, url: str | None) -> None:
    """write_record, where failing is fine: a read-only cache still works, it only hashes again next time."""
    try:
        write_record(path, sha256, url)
    except OSError as error:
        log.debug("%s: record not written: %s", path, error)


def corrupt_file(path: Path, what: str) -> WeightsUnavailable:
    return WeightsUnavailable(
        f"{path}: cached file is corrupt ({what}); remove it with `resnet cache rm {path.name}` and fetch it again"
    )


def check_cached_file(path: Path, expected_sha256: str | None = None) -> str:
    """Check a cached file before it is loaded and return its full sha256.

    With a record: the size must match (cheap, on every load); when the modification time moved
    the file is hashed again and must still match the record. Without a sound record (a file
    torchvision downloaded) the full hash is computed once, checked against `expected_sha256` or
    the file-name prefix, and recorded. Raises WeightsUnavailable naming the file when it is
    truncated, altered or not the expected file.
    """
    info = path.stat()
    record = read_record(path)
    if record is not None:
        if record["size"] != info.st_size:
            raise corrupt_file(path, f"{info.st_size} bytes, {record['size']} expected")
        actual = record["sha256"]
        if record.get("mtime_ns") != info.st_mtime_ns:
            actual = sha256_of(path)
            if actual != record["sha256"]:
                raise corrupt_file(path, f"sha256 {actual[:12]}..., {record['sha256'][:12]}... was recorded")
            try_write_record(path, actual, record.get("url") if isinstance(record.get("url"), str) else None)
    else:
        actual = sha256_of(path)
        expected = expected_sha256 or hash_prefix_of(path.name)
        if not expected:
            raise WeightsUnavailable(
                f"{path}: cached file has no recorded sha256 and none in its name; it cannot be verified"
            )
        if not actual.startswith(expected.lower()):
            raise corrupt_file(path, f"sha256 {actual[:12]}..., expected {expected[:12]}...")
        try_write_record(path, actual, None)
    if expected_sha256 and not actual.startswith(expected_sha256.lower()):
        raise WeightsUnavailable(
            f"{path}: cached file has sha256 {actual[:16]}..., not the expected {expected_sha256[:16]}...; "
            f"remove it with `resnet cache rm {path.name}` to fetch the other one"
        )
    return actual


# ---------------------------------------------------------------------------------------------
# Locks and partial files


def cache_folder_ready(folder: Path) -> None:
    """Create the cache folder if needed; CacheError naming it when it cannot be created or written."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CacheError(f"cannot create the weight cache folder {folder}: {error.strerror or error}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CacheError(f"the weight cache folder {folder} is not writable")


def _lock_path(folder: Path, file_name: str) -> Path:
    records = records_dir(folder, create=True)
    assert records is not None
    path = records / f"{file_name}{LOCK_SUFFIX}"
    if path.is_symlink():
        raise CacheError(
            f"{path} is a symbolic link; resnetcli never follows links out of its cache folder: remove the link"
        )
    return path


@contextmanager
def file_lock(
    folder: Path, file_name: str, wait: float = LOCK_WAIT, on_wait: Callable[[], None] | None = None
) -> Iterator[Path]:
    """Hold the per-file lock and yield its path; an flock, so the kernel releases it when its holder dies.

    `on_wait` is called once when another process holds the lock and this one starts waiting.

    filelock opens the lock file with O_NOFOLLOW and does not count an flock on a file that was
    unlinked meanwhile, so a lock file may be removed by whoever holds it (`cache rm`).
    """
    from filelock import FileLock, Timeout

    path = _lock_path(folder, file_name)
    lock = FileLock(str(path))
    try:
        try:
            lock.acquire(timeout=0)
        except Timeout:
            if wait <= 0:
                raise
            log.debug("%s: waiting for the lock another process holds", folder / file_name)
            if on_wait is not None:
                on_wait()
            lock.acquire(timeout=wait)
    except Timeout:
        raise WeightsUnavailable(f"{folder / file_name}: another process has held its lock for {wait:g} s") from None
    except OSError as error:
        if error.errno == errno.ELOOP:
            _lock_path(folder, file_name)  # a link planted meanwhile: the same clear message
        raise CacheError(
            f"cannot lock {file_name} in the weight cache folder {folder}: {error.strerror or error}"
        ) from None
    try:
        yield path
    finally:
        lock.release()


def _copy_hashing(
    read: Callable[[int], bytes], handle: BinaryIO, folder: Path, report: Callable[[int], None]
) -> tuple[str, int]:
    """Copy chunks from `read` into `handle`, hashing them; read errors propagate, write errors name the folder."""
    digest = hashlib.sha256()
    size = 0
    while chunk := read(CHUNK):
        try:
            handle.write(chunk)
        except OSError as error:
            raise _cache_error("write to", folder, error) from None
        digest.update(chunk)
        size += len(chunk)
        report(size)
    try:
        handle.flush()
        os.fsync(handle.fileno())
    except OSError as error:
        raise _cache_error("write to", folder, error) from None
    return digest.hexdigest(), size


@dataclass(frozen=True)
class Source:
    """Where the bytes of a new cache file come from, and how it is named in messages and records."""

    name: str  # shown in messages: a path, or a URL with its credentials redacted
    read: Callable[[int], bytes]  # read(n): up to n bytes, b"" at the end; raises WeightsUnavailable
    url: str | None = None  # kept in the file's record (redacted)
    refused: str = "the file was discarded"  # said after a sha256 mismatch
    close: Callable[[], None] = lambda: None


def store_verified(
    file_name: str,
    expected: str,
    open_source: Callable[[], Source],
    status: str,
    report: Callable[[int], None] = lambda done: None,
    *,
    replace: bool = False,
    on_wait: Callable[[], None] | None = None,
) -> CachedFile:
    """Fill the cache file `file_name` from `open_source()`, verified, under its lock: the one way a file enters.

    Holding the lock: unless `replace` (an import may repair a file), a file another process
    completed meanwhile is checked and returned as "already cached"; stale partial files of the
    name are removed; the bytes go to a new partial file, hashed on the way; only a file whose
    sha256 starts with `expected` is renamed into place, its record first, so that whoever sees
    the file sees its record.
    """
    folder = checkpoint_dir()
    target = folder / file_name
    cache_folder_ready(folder)
    with file_lock(folder, file_name, on_wait=on_wait):
        if not replace and target.is_file():  # Another process finished it while we waited for the lock.
            return already_cached(target, expected)
        remove_stale_partials(folder, file_name)
        source = open_source()
        partial = new_partial(folder, file_name)
        try:
            try:
                handle = open(partial, "xb")  # noqa: SIM115 (closed by `with handle` below; opened here to name an error)
            except OSError as error:
                raise _cache_error("write to", folder, error) from None
            with handle:
                actual, size = _copy_hashing(source.read, handle, folder, report)
            if not actual.startswith(expected):
                raise WeightsUnavailable(
                    f"{source.name}: sha256 mismatch: expected {expected[:16]}..., got {actual[:16]}...; "
                    + source.refused
                )
            try:
                records = records_dir(folder, create=True)
                assert records is not None
                _write_atomically(records, file_name + ".json", _record_bytes(os.stat(partial), actual, source.url))
                os.replace(partial, target)
            except OSError as error:
                raise _cache_error("write to", folder, error) from None
        finally:
            source.close()
            # After a failure, Ctrl-C included; after success the partial was renamed and is gone.
            partial.unlink(missing_ok=True)
    return CachedFile(file_name, target, size, actual, status)


def already_cached(target: Path, expected: str) -> CachedFile:
    actual = check_cached_file(target, expected)
    return CachedFile(target.name, target, target.stat().st_size, actual, "already cached")
