"""What is in the weight cache, and cleaning it: listing, verifying, removing files, partials and leftovers.

Everything removed is a directory entry inside the cache folder or its records folder, removed
under the lock of the file it belongs to; a link is removed, never what it points to, and a
records folder that is a link stops the command before anything is touched. A lock held by a
live download is never taken from it: what belongs to that download stays.
Nothing here imports torch: the labels shown for each file are passed in by the caller.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping, Sequence

from resnetcli.errors import CacheError, InputError, WeightsUnavailable
from resnetcli.store import (
    LOCK_SUFFIX,
    CachedFile,
    checkpoint_dir,
    file_lock,
    hash_prefix_of,
    owner_of_partial,
    partials_of,
    record_state,
    records_dir,
    sha256_of,
    try_write_record,
)

log = logging.getLogger(__name__)


def cached_files() -> list[Path]:
    """The weight files in the cache folder (not records, locks or partial downloads), sorted."""
    folder = checkpoint_dir()
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def cached_file(name: str) -> Path:
    """The cached weight file called `name` (a bare file name), or InputError."""
    if not name or name != Path(name).name or name.startswith("."):
        raise InputError(name, "not a weight file name (give a name that `resnet cache list` shows)")
    path = checkpoint_dir() / name
    if not path.is_file():
        raise InputError(name, f"not in the weight cache {checkpoint_dir()}")
    return path


@dataclass(frozen=True)
class Listed:
    """A cached file as `cache list` shows it."""

    name: str
    path: Path
    size: int
    sha256: str | None  # from a sound record whose size still matches; None if never verified
    source: str | None  # the URL it was downloaded from (redacted), when recorded
    weights: tuple[str, ...]  # the labels the caller gave for this file name (ARCH:WEIGHTS)
    problem: str | None = None  # what is wrong with its record, if anything

    def record(self) -> dict:
        return {
            "file": self.name,
            "size": self.size,
            "weights": list(self.weights),
            "sha256": self.sha256,
            "source": self.source,
            "path": str(self.path),
        }


def describe(path: Path, labels: Mapping[str, Sequence[str]] | None = None) -> Listed:
    """A cached file with its recorded sha256 and source, labelled from `labels` (file name -> labels)."""
    size = path.stat().st_size
    record, problem = record_state(path)
    sha256 = record["sha256"] if record is not None and record["size"] == size else None
    url = (record or {}).get("url")
    return Listed(
        path.name,
        path,
        size,
        sha256,
        url if isinstance(url, str) else None,
        tuple((labels or {}).get(path.name, ())),
        problem,
    )


def listing(labels: Mapping[str, Sequence[str]] | None = None) -> list[Listed]:
    """Every cached file, described."""
    return [describe(path, labels) for path in cached_files()]


@dataclass(frozen=True)
class Verification:
    """The result of hashing one cached file in full (or of finding a stale partial file)."""

    name: str
    path: Path
    size: int
    sha256: str | None
    status: str  # "ok", "corrupt", "unverifiable", "stale partial"
    problem: str | None = None

    def record(self) -> dict:
        return {
            "file": self.name,
            "size": self.size,
            "sha256": self.sha256,
            "status": self.status,
            "problem": self.problem,
            "path": str(self.path),
        }


def verify(path: Path) -> Verification:
    """Hash a cached file in full and compare it with its record, or else with its file-name prefix.

    A good file's record is (re)written, so later loads trust it by size and modification time;
    a corrupt record (not a small regular JSON file) is never trusted and is replaced when the
    file matches its name's prefix, else the file is reported corrupt.
    """
    size = path.stat().st_size
    actual = sha256_of(path)
    record, record_problem = record_state(path)
    if record is not None:
        problems = []
        if record["size"] != size:
            problems.append(f"{size} bytes, {record['size']} recorded")
        if record["sha256"] != actual:
            problems.append(f"sha256 {actual[:12]}..., {record['sha256'][:12]}... recorded")
        if problems:
            return Verification(path.name, path, size, actual, "corrupt", "; ".join(problems))
    else:
        prefix = hash_prefix_of(path.name)
        if prefix is None:
            if record_problem:
                return Verification(path.name, path, size, actual, "corrupt", record_problem)
            problem = "no recorded sha256 and none in the file name"
            return Verification(path.name, path, size, actual, "unverifiable", problem)
        if not actual.startswith(prefix):
            problem = f"sha256 {actual[:12]}..., the file name says {prefix}"
            problem = "; ".join(filter(None, [record_problem, problem]))
            return Verification(path.name, path, size, actual, "corrupt", problem)
    url = (record or {}).get("url")
    try_write_record(path, actual, url if isinstance(url, str) else None)
    if record_problem:
        return Verification(path.name, path, size, actual, "ok", f"{record_problem}; rewritten")
    return Verification(path.name, path, size, actual, "ok")


def _unless_busy(folder: Path, file_name: str) -> Iterator[Path]:
    """Yield the lock's path once, holding `file_name`'s lock; not at all when a live process holds it."""
    try:
        with file_lock(folder, file_name, wait=0) as lock:
            yield lock
    except WeightsUnavailable as error:
        if isinstance(error, CacheError):
            raise
        log.debug("%s: left alone, its lock is held by a live process", folder / file_name)


def _stale_partials(folder: Path) -> Iterator[tuple[str, Path, int]]:
    """(file name, partial, size) of each partial file whose lock is free, holding that lock while yielding."""
    owners = sorted({owner_of_partial(p.name) or "" for p in partials_of(folder)})
    for owner in owners:
        for _ in _unless_busy(folder, owner):
            for partial in partials_of(folder, owner):
                try:
                    size = os.lstat(partial).st_size
                except FileNotFoundError:
                    continue
                yield owner, partial, size


def stale_partials() -> list[Verification]:
    """Partial files left by downloads or imports whose process died (their lock is free)."""
    folder = checkpoint_dir()
    return [
        Verification(
            partial.name,
            partial,
            size,
            None,
            "stale partial",
            f"left by an interrupted download of {owner}; remove it with `resnet cache rm --partials`",
        )
        for owner, partial, size in _stale_partials(folder)
    ]


def remove(path: Path) -> CachedFile:
    """Remove a cached weight file, its record and its lock file, under the file's lock."""
    folder = path.parent
    try:
        size = path.stat().st_size
        with file_lock(folder, path.name) as lock:
            path.unlink(missing_ok=True)
            records = records_dir(folder, create=False)
            if records is not None:
                (records / f"{path.name}.json").unlink(missing_ok=True)
            lock.unlink(missing_ok=True)  # filelock never counts a hold on an unlinked lock file
    except OSError as error:
        raise CacheError(
            f"cannot remove {path.name} from the weight cache folder {folder}: {error.strerror or error}"
        ) from None
    return CachedFile(path.name, path, size, None, "removed")


def remove_partials() -> list[CachedFile]:
    """Remove the partial files of downloads whose process died; those of live downloads stay."""
    folder = checkpoint_dir()
    removed = []
    for _, partial, size in _stale_partials(folder):
        try:
            partial.unlink()
        except FileNotFoundError:
            continue
        except OSError as error:
            raise CacheError(f"cannot remove {partial}: {error.strerror or error}") from None
        removed.append(CachedFile(partial.name, partial, size, None, "removed"))
    return removed


def _leftover_owner(entry: str) -> str | None:
    """Which cached file a leftover in the records folder belongs to: a record, a lock, a record being written."""
    temporary = owner_of_partial(entry)
    if temporary is not None:
        entry = temporary
    for suffix in (".json", LOCK_SUFFIX):
        if entry.endswith(suffix) and len(entry) > len(suffix):
            return entry[: -len(suffix)]
    return None


def remove_leftovers() -> None:
    """Remove records and lock files of files no longer cached, and partial files of dead downloads.

    Each under its file's lock taken without waiting: what a live download holds stays.
    """
    folder = checkpoint_dir()
    remove_partials()
    records = records_dir(folder, create=False)
    if records is None:
        return
    by_owner: dict[str, list[str]] = {}
    for entry in sorted(os.listdir(records)):
        owner = _leftover_owner(entry)
        if owner is not None and not os.path.lexists(folder / owner):
            by_owner.setdefault(owner, []).append(entry)
    for owner, entries in by_owner.items():
        for lock in _unless_busy(folder, owner):
            for entry in entries:
                if entry != lock.name:
                    (records / entry).unlink(missing_ok=True)
            lock.unlink(missing_ok=True)
