"""The pretrained-weight cache: torch.hub's checkpoint folder, made safe for batch jobs.

Files live where torch.hub and torchvision keep them (`$TORCH_HOME/hub/checkpoints`), so either
tool reuses the other's downloads. What resnetcli adds:

- a download goes to a unique temporary file in the cache folder, is checked (length, sha256) and
  only then renamed into place; on any failure, Ctrl-C included, nothing is left behind;
- a per-file lock (filelock, an flock that dies with its holder) so that many processes starting
  at once download a file once, and a killed downloader never blocks the next one;
- a record of each file's full sha256, size and modification time beside it
  (`.resnetcli/NAME.json`): a file truncated later is caught by the size check on every load, a
  file rewritten later by a full hash when its modification time moved, and anything by `verify`;
- a mirror base URL and an offline mode for firewalled and air-gapped machines.

Nothing here imports torch; the one function that needs torchvision's registry imports it lazily.
"""

from __future__ import annotations

import glob
import hashlib
import http.client
import json
import os
import re
import socket
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator
from urllib.parse import urlparse

from resnetcli.errors import CacheError, InputError, UsageError, WeightsUnavailable

#: torch.hub's convention: `NAME-<first hex digits of the sha256>.EXT` (the same pattern torch.hub uses).
HASH_PREFIX = re.compile(r"-([a-f0-9]{6,64})\.")
#: What `--sha256` accepts: a full sha256 or a prefix of at least 8 hex digits (torchvision's length).
SHA256_ARGUMENT = re.compile(r"[0-9a-f]{8,64}")
RECORD_DIR = ".resnetcli"
PARTIAL_SUFFIX = ".partial"
CHUNK = 1 << 20
DEFAULT_TIMEOUT = 30.0
#: How long a process waits for another one that is downloading the same file.
LOCK_WAIT = 3600.0

#: Called as on_progress(file_name, bytes_done, bytes_total_or_None) while a file downloads.
ProgressCallback = Callable[[str, int, "int | None"], None]


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
class CacheSettings:
    """How weights may be obtained: offline or not, from which mirror, with which network timeout."""

    offline: bool = False
    mirror: str | None = None
    timeout: float = DEFAULT_TIMEOUT

    @classmethod
    def from_env(cls, offline: bool | None = None, mirror: str | None = None, timeout: float | None = None) -> "CacheSettings":
        """Settings from command-line values, falling back to RESNET_OFFLINE, RESNET_MIRROR, RESNET_TIMEOUT."""
        env_offline = os.environ.get("RESNET_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
        if timeout is None:
            timeout = _timeout_from_env()
        if timeout <= 0:
            raise UsageError(f"the network timeout must be a positive number of seconds, not {timeout:g}")
        return cls(
            offline=bool(offline) or env_offline,
            mirror=mirror or os.environ.get("RESNET_MIRROR") or None,
            timeout=timeout,
        )

    def source_url(self, url: str) -> str:
        """The URL to download `url` from: the mirror (same file name) when one is set."""
        if not self.mirror:
            return url
        return self.mirror.rstrip("/") + "/" + file_name_of(url)


def _timeout_from_env() -> float:
    text = os.environ.get("RESNET_TIMEOUT", "").strip()
    if not text:
        return DEFAULT_TIMEOUT
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"RESNET_TIMEOUT={text}: not a number of seconds") from None


@dataclass(frozen=True)
class CachedFile:
    """One file in the cache, as `fetch`, `cache list` and `cache rm` report it."""

    name: str
    path: Path
    size: int
    sha256: str | None
    status: str  # "downloaded", "already cached", "imported", "cached", "removed"


def file_name_of(url: str) -> str:
    """The last path component of a URL: the name a download is cached under."""
    name = Path(urlparse(url).path).name
    if not name or name.startswith("."):  # "." names are resnetcli's own partial files and records
        raise WeightsUnavailable(f"{url}: the URL does not end in a file name")
    return name


def hash_prefix_of(file_name: str) -> str | None:
    """The sha256 prefix in a torch.hub-style file name (`resnet50-11ad3fa6.pth` gives `11ad3fa6`)."""
    match = HASH_PREFIX.search(file_name)
    return match.group(1) if match else None


def parse_sha256(text: str) -> str:
    """A `--sha256` value, lower-cased: a full sha256 or a prefix of at least 8 hex digits."""
    value = text.strip().lower()
    if not SHA256_ARGUMENT.fullmatch(value):
        raise UsageError(f"--sha256 {text}: expected 8 to 64 hexadecimal digits")
    return value


def sha256_of(path: Path) -> str:
    """The full sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Records of verified files


def _record_path(path: Path) -> Path:
    return path.parent / RECORD_DIR / (path.name + ".json")


def read_record(path: Path) -> dict | None:
    """The sha256/size record written when `path` entered the cache or was last verified, if any."""
    try:
        record = json.loads(_record_path(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str) or not isinstance(record.get("size"), int):
        return None
    return record


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}{PARTIAL_SUFFIX}")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _record_bytes(stat: os.stat_result, sha256: str, url: str | None) -> bytes:
    record = {
        "sha256": sha256,
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "url": url,
        "verified": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    return json.dumps(record, indent=1).encode()


def write_record(path: Path, sha256: str, url: str | None = None) -> None:
    """Record the full hash, size and modification time of a verified cache file."""
    _write_atomically(_record_path(path), _record_bytes(path.stat(), sha256, url))


def _try_write_record(path: Path, sha256: str, url: str | None) -> None:
    try:
        write_record(path, sha256, url)
    except OSError:
        pass  # A read-only cache can still be used; the hash is simply computed again next time.


def _corrupt(path: Path, what: str) -> WeightsUnavailable:
    return WeightsUnavailable(
        f"{path}: cached file is corrupt ({what}); remove it with `resnet cache rm {path.name}` and fetch it again"
    )


def check_cached_file(path: Path, expected_sha256: str | None = None) -> str:
    """Check a cached file before it is loaded and return its full sha256.

    With a record: the size must match (cheap, on every load); when the modification time moved
    the file is hashed again and must still match the record. Without a record (a file torchvision
    downloaded) the full hash is computed once, checked against `expected_sha256` or the file-name
    prefix, and recorded. Raises WeightsUnavailable naming the file when it is truncated, altered
    or not the expected file.
    """
    stat = path.stat()
    record = read_record(path)
    if record is not None:
        if record["size"] != stat.st_size:
            raise _corrupt(path, f"{stat.st_size} bytes, {record['size']} expected")
        actual = record["sha256"]
        if record.get("mtime_ns") != stat.st_mtime_ns:
            actual = sha256_of(path)
            if actual != record["sha256"]:
                raise _corrupt(path, f"sha256 {actual[:12]}..., {record['sha256'][:12]}... was recorded")
            _try_write_record(path, actual, record.get("url"))
    else:
        actual = sha256_of(path)
        expected = expected_sha256 or hash_prefix_of(path.name)
        if not expected:
            raise WeightsUnavailable(f"{path}: cached file has no recorded sha256 and none in its name; it cannot be verified")
        if not actual.startswith(expected.lower()):
            raise _corrupt(path, f"sha256 {actual[:12]}..., expected {expected[:12]}...")
        _try_write_record(path, actual, None)
    if expected_sha256 and not actual.startswith(expected_sha256.lower()):
        raise WeightsUnavailable(
            f"{path}: cached file has sha256 {actual[:16]}..., not the expected {expected_sha256[:16]}...; "
            f"remove it with `resnet cache rm {path.name}` to fetch the other one"
        )
    return actual


# ---------------------------------------------------------------------------------------------
# Locks, partial files and installing a verified file


def _cache_folder_ready(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CacheError(f"cannot create the weight cache folder {folder}: {error.strerror or error}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CacheError(f"the weight cache folder {folder} is not writable")


@contextmanager
def _file_lock(folder: Path, file_name: str, wait: float = LOCK_WAIT) -> Iterator[None]:
    """Hold the per-file lock; it is an flock, so the kernel releases it when its holder dies."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(folder / RECORD_DIR / f"{file_name}.lock"))
    try:
        (folder / RECORD_DIR).mkdir(exist_ok=True)
        lock.acquire(timeout=wait)
    except Timeout:
        raise WeightsUnavailable(f"{folder / file_name}: another process has held its lock for {wait:g} s") from None
    except OSError as error:
        raise CacheError(f"cannot lock {file_name} in the weight cache folder {folder}: {error.strerror or error}") from None
    try:
        yield
    finally:
        lock.release()


def _new_partial(folder: Path, file_name: str) -> Path:
    return folder / f".{file_name}.{os.getpid()}.{time.monotonic_ns()}{PARTIAL_SUFFIX}"


def _partials_of(folder: Path, file_name: str) -> list[Path]:
    return [Path(p) for p in glob.glob(os.path.join(glob.escape(str(folder)), f".{glob.escape(file_name)}.*{PARTIAL_SUFFIX}"))]


def _remove_stale_partials(folder: Path, file_name: str) -> None:
    # Only the lock holder writes partial files, so any found while holding the lock belong to a
    # process that died (SIGKILL, power loss) mid-download.
    for stale in _partials_of(folder, file_name):
        stale.unlink(missing_ok=True)


def _install(partial: Path, target: Path, sha256: str, url: str | None) -> None:
    """Rename a verified partial file into place, its record first: whoever sees the file sees its record."""
    try:
        _write_atomically(_record_path(target), _record_bytes(partial.stat(), sha256, url))
        os.replace(partial, target)
    except OSError as error:
        raise CacheError(f"cannot write to the weight cache folder {target.parent}: {error.strerror or error}") from None


def _copy_hashing(read: Callable[[int], bytes], handle: BinaryIO, folder: Path, report: Callable[[int], None]) -> tuple[str, int]:
    """Copy chunks from `read` into `handle`, hashing them; read errors propagate, write errors name the folder."""
    digest = hashlib.sha256()
    size = 0
    while chunk := read(CHUNK):
        try:
            handle.write(chunk)
        except OSError as error:
            raise CacheError(f"cannot write to the weight cache folder {folder}: {error.strerror or error}") from None
        digest.update(chunk)
        size += len(chunk)
        report(size)
    try:
        handle.flush()
        os.fsync(handle.fileno())
    except OSError as error:
        raise CacheError(f"cannot write to the weight cache folder {folder}: {error.strerror or error}") from None
    return digest.hexdigest(), size


def _open_for_writing(path: Path) -> BinaryIO:
    try:
        return open(path, "xb")
    except OSError as error:
        raise CacheError(f"cannot write to the weight cache folder {path.parent}: {error.strerror or error}") from None


# ---------------------------------------------------------------------------------------------
# Downloading


def _network_error(url: str, error: BaseException, timeout: float, started: bool) -> WeightsUnavailable:
    """One line naming the URL and what went wrong with it."""
    if isinstance(error, urllib.error.HTTPError):
        return WeightsUnavailable(f"{url}: download failed: HTTP {error.code} {error.reason}")
    if isinstance(error, urllib.error.URLError):
        error = error.reason if isinstance(error.reason, BaseException) else OSError(str(error.reason))
    if isinstance(error, (socket.timeout, TimeoutError)):
        if started:
            return WeightsUnavailable(f"{url}: download stalled: no data for {timeout:g} s")
        return WeightsUnavailable(f"{url}: download failed: no answer within {timeout:g} s")
    if isinstance(error, http.client.IncompleteRead):
        return WeightsUnavailable(f"{url}: download incomplete: the server closed the connection early")
    if isinstance(error, http.client.HTTPException):
        return WeightsUnavailable(f"{url}: download failed: bad answer from the server ({type(error).__name__})")
    if isinstance(error, OSError) and error.strerror:
        return WeightsUnavailable(f"{url}: download failed: {error.strerror}")
    return WeightsUnavailable(f"{url}: download failed: {error or type(error).__name__}")


def _download_to(url: str, partial: Path, timeout: float, report: Callable[[int, "int | None"], None]) -> tuple[str, int]:
    """Stream `url` into the new file `partial`; return its sha256 and size once its length is checked."""
    request = urllib.request.Request(url, headers={"User-Agent": "resnetcli"})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except ValueError:
        raise WeightsUnavailable(f"{url}: not a URL resnetcli can download from") from None
    except (OSError, http.client.HTTPException) as error:
        raise _network_error(url, error, timeout, started=False) from None
    with response:
        length_header = response.headers.get("Content-Length")
        expected_length = int(length_header) if length_header and length_header.isdigit() else None
        report(0, expected_length)

        def read(amount: int) -> bytes:
            try:
                # read1 returns what has arrived: progress moves, and a stall is a timeout, not a hang.
                return response.read1(amount)
            except (OSError, http.client.HTTPException) as error:
                raise _network_error(url, error, timeout, started=True) from None

        with _open_for_writing(partial) as handle:
            actual, size = _copy_hashing(read, handle, partial.parent, lambda done: report(done, expected_length))
    if expected_length is not None and size != expected_length:
        raise WeightsUnavailable(f"{url}: download incomplete: got {size} of {expected_length} bytes")
    return actual, size


def _already_cached(target: Path, expected: str) -> CachedFile:
    actual = check_cached_file(target, expected)
    return CachedFile(target.name, target, target.stat().st_size, actual, "already cached")


def download(
    url: str,
    *,
    sha256: str | None = None,
    settings: CacheSettings = CacheSettings(),
    on_progress: ProgressCallback | None = None,
    fetch_hint: str | None = None,
    mirrored: bool = True,
) -> CachedFile:
    """Make sure the file at `url` is in the cache, verified; download it when it is missing.

    `sha256` is the full hash or a prefix; without it the `NAME-<hexprefix>.ext` convention of the
    file name applies; a file with neither is refused, since it could not be verified.
    `fetch_hint` is the `resnet fetch` command named when the file is missing in offline mode.
    `mirrored` says whether `settings.mirror` applies (torchvision's weights) or not (a user's URL).
    """
    file_name = file_name_of(url)
    expected = (sha256 or hash_prefix_of(file_name) or "").lower()
    if not expected:
        raise WeightsUnavailable(
            f"{url}: no sha256 to verify against: pass --sha256 or use a NAME-<sha256 prefix>.pth file name"
        )
    folder = checkpoint_dir()
    target = folder / file_name
    if target.is_file():
        return _already_cached(target, expected)
    if settings.offline:
        fetch_hint = fetch_hint or f"resnet fetch --url {url}"
        import_hint = fetch_hint.replace("resnet fetch ", "resnet fetch --from-file PATH ", 1)
        raise WeightsUnavailable(
            f"{file_name} is not in the weight cache {folder} and downloads are off (offline mode); "
            f"get it with `{fetch_hint}` where the network is reachable, or copy it in with `{import_hint}`"
        )
    source = settings.source_url(url) if mirrored else url
    _cache_folder_ready(folder)
    with _file_lock(folder, file_name):
        if target.is_file():  # Another process finished it while we waited for the lock.
            return _already_cached(target, expected)
        _remove_stale_partials(folder, file_name)
        partial = _new_partial(folder, file_name)
        report = (lambda done, total: on_progress(file_name, done, total)) if on_progress else (lambda done, total: None)
        try:
            actual, size = _download_to(source, partial, settings.timeout, report)
            if not actual.startswith(expected):
                raise WeightsUnavailable(
                    f"{source}: sha256 mismatch: expected {expected[:16]}..., got {actual[:16]}...; the file was discarded"
                )
            _install(partial, target, actual, source)
        finally:
            # After a failure, Ctrl-C included; after success the partial was renamed and is gone.
            partial.unlink(missing_ok=True)
    return CachedFile(file_name, target, size, actual, "downloaded")


def import_file(source: Path, file_name: str | None = None, *, sha256: str | None = None) -> CachedFile:
    """Copy a file brought in by hand into the cache (the air-gapped case), verified before it enters.

    The file is cached as `file_name` (default: its own name) and must match `sha256` (full or a
    prefix) or, without it, the sha256 prefix in `file_name`.
    """
    file_name = file_name or source.name
    expected = (sha256 or hash_prefix_of(file_name) or "").lower()
    if not expected:
        raise WeightsUnavailable(f"{source}: no sha256 to verify against: pass --sha256 HEX")
    try:
        reader = open(source, "rb")
    except OSError as error:
        raise WeightsUnavailable(f"{source}: cannot read: {error.strerror or error}") from None
    folder = checkpoint_dir()
    target = folder / file_name
    with reader:
        _cache_folder_ready(folder)

        def read(amount: int) -> bytes:
            try:
                return reader.read(amount)
            except OSError as error:
                raise WeightsUnavailable(f"{source}: cannot read: {error.strerror or error}") from None

        with _file_lock(folder, file_name):
            partial = _new_partial(folder, file_name)
            try:
                with _open_for_writing(partial) as handle:
                    actual, _ = _copy_hashing(read, handle, folder, lambda done: None)
                if not actual.startswith(expected):
                    raise WeightsUnavailable(
                        f"{source}: sha256 mismatch: expected {expected[:16]}..., got {actual[:16]}...; not imported"
                    )
                _install(partial, target, actual, None)
            finally:
                partial.unlink(missing_ok=True)
    return CachedFile(file_name, target, target.stat().st_size, actual, "imported")


# ---------------------------------------------------------------------------------------------
# Listing, verifying, removing


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


def weights_by_file_name() -> dict[str, list[str]]:
    """Which torchvision ARCH:WEIGHTS each weights file name belongs to, from the weights enums' URLs."""
    from resnetcli.catalogue import architecture_names, weights_enum, weights_file_name

    owners: dict[str, list[str]] = {}
    for arch in architecture_names():
        for weights in weights_enum(arch):  # Iterating an enum skips its aliases (DEFAULT).
            owners.setdefault(weights_file_name(weights), []).append(f"{arch}:{weights.name}")
    return owners


def describe(path: Path) -> tuple[CachedFile, str | None]:
    """A cached file as `cache list` shows it, with the URL it was downloaded from when recorded."""
    record = read_record(path)
    sha256 = record["sha256"] if record is not None and record["size"] == path.stat().st_size else None
    return CachedFile(path.name, path, path.stat().st_size, sha256, "cached"), (record or {}).get("url")


@dataclass(frozen=True)
class Verification:
    """The result of hashing one cached file in full."""

    name: str
    path: Path
    size: int
    sha256: str
    status: str  # "ok", "corrupt", "unverifiable"
    problem: str | None = None


def verify(path: Path) -> Verification:
    """Hash a cached file in full and compare it with its record, or else with its file-name prefix.

    A good file's record is (re)written, so later loads trust it by size and modification time.
    """
    size = path.stat().st_size
    actual = sha256_of(path)
    record = read_record(path)
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
            return Verification(path.name, path, size, actual, "unverifiable", "no recorded sha256 and none in the file name")
        if not actual.startswith(prefix):
            return Verification(path.name, path, size, actual, "corrupt", f"sha256 {actual[:12]}..., the file name says {prefix}")
    _try_write_record(path, actual, (record or {}).get("url"))
    return Verification(path.name, path, size, actual, "ok")


def remove(path: Path) -> CachedFile:
    """Remove a cached weight file and its record, under the file's lock."""
    folder = path.parent
    try:
        size = path.stat().st_size
        with _file_lock(folder, path.name):
            path.unlink(missing_ok=True)
            _record_path(path).unlink(missing_ok=True)
    except OSError as error:
        raise CacheError(f"cannot remove {path.name} from the weight cache folder {folder}: {error.strerror or error}") from None
    return CachedFile(path.name, path, size, None, "removed")


def remove_leftovers() -> None:
    """Remove records of files no longer cached and partial files of downloads whose process died."""
    folder = checkpoint_dir()
    for record in (folder / RECORD_DIR).glob("*.json"):
        if not (folder / record.name[: -len(".json")]).exists():
            record.unlink(missing_ok=True)
    for partial in folder.glob(f".*{PARTIAL_SUFFIX}"):
        file_name = re.sub(rf"^\.(.+)\.\d+\.\d+{re.escape(PARTIAL_SUFFIX)}$", r"\1", partial.name)
        try:
            # A partial whose lock is free belongs to a dead process; a held lock means a live download.
            with _file_lock(folder, file_name, wait=0):
                _remove_stale_partials(folder, file_name)
        except WeightsUnavailable:
            continue
