"""The pretrained-weight cache: torch.hub's checkpoint folder, made safe for batch jobs.

Files live where torch.hub and torchvision keep them (`$TORCH_HOME/hub/checkpoints`), so either
tool reuses the other's downloads. What resnetcli adds:

- a download goes to a unique temporary file in the cache folder, is checked (length, sha256) and
  only then renamed into place; on any failure nothing is left behind;
- a per-file lock (filelock) so that many processes starting at once download a file once;
- a record of each file's full sha256 and size beside it (`.resnetcli/NAME.json`), so a file that
  was truncated or altered later is caught by a size check on every load and a full hash on verify;
- a mirror base URL and an offline mode for firewalled and air-gapped machines.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlparse

from resnetcli.errors import CacheError, WeightsUnavailable

#: torch.hub's convention: `NAME-<first hex digits of the sha256>.EXT`.
HASH_PREFIX = re.compile(r"-([a-f0-9]{6,64})\.")
RECORD_DIR = ".resnetcli"
PARTIAL_SUFFIX = ".partial"
CHUNK = 1 << 20

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
    timeout: float = 30.0

    @classmethod
    def from_env(cls, offline: bool | None = None, mirror: str | None = None, timeout: float | None = None) -> "CacheSettings":
        """Settings from command-line values, falling back to RESNET_OFFLINE, RESNET_MIRROR, RESNET_TIMEOUT."""
        env_offline = os.environ.get("RESNET_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
        env_timeout = os.environ.get("RESNET_TIMEOUT")
        return cls(
            offline=bool(offline) or env_offline,
            mirror=mirror or os.environ.get("RESNET_MIRROR") or None,
            timeout=timeout if timeout is not None else float(env_timeout) if env_timeout else 30.0,
        )

    def source_url(self, url: str) -> str:
        """The URL to download `url` from: the mirror (same file name) when one is set."""
        if not self.mirror:
            return url
        return self.mirror.rstrip("/") + "/" + file_name_of(url)


@dataclass(frozen=True)
class CachedFile:
    """One file in the cache, as `fetch` and `cache list` report it."""

    name: str
    path: Path
    size: int
    sha256: str | None
    status: str  # "downloaded", "already cached", "imported", "cached"


def file_name_of(url: str) -> str:
    """The last path component of a URL: the name a download is cached under."""
    name = Path(urlparse(url).path).name
    if not name:
        raise WeightsUnavailable(f"{url}: the URL does not end in a file name")
    return name


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


# ---------------------------------------------------------------------------------------------
# Records of verified files


def _record_path(path: Path) -> Path:
    return path.parent / RECORD_DIR / (path.name + ".json")


def read_record(path: Path) -> dict | None:
    """The sha256/size record written when `path` entered the cache, if any."""
    try:
        return json.loads(_record_path(path).read_text())
    except (OSError, ValueError):
        return None


def _write_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    try:
        temporary.write_bytes(data)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_record(path: Path, sha256: str, size: int, url: str | None = None) -> None:
    """Record the full hash and size of a verified cache file."""
    record = {"sha256": sha256, "size": size, "url": url, "verified": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    _write_atomically(_record_path(path), json.dumps(record, indent=1).encode())


def check_cached_file(path: Path, expected_sha256: str | None = None) -> str:
    """Check a cached file before it is loaded; return its sha256 when it had to be computed, else "".

    With a record, the size must match (cheap, on every load). Without one (a file torchvision
    downloaded), the full hash is computed once against the file-name prefix and recorded.
    Raises WeightsUnavailable naming the file when it is truncated, altered or unverifiable.
    """
    record = read_record(path)
    size = path.stat().st_size
    if record is not None:
        if record.get("size") != size:
            raise WeightsUnavailable(
                f"{path}: cached file is corrupt ({size} bytes, {record.get('size')} expected); "
                f"remove it with `resnet cache rm {path.name}` and fetch it again"
            )
        if expected_sha256 and not str(record.get("sha256", "")).startswith(expected_sha256.lower()):
            raise WeightsUnavailable(f"{path}: cached file does not have the expected sha256 {expected_sha256}")
        return ""
    actual = sha256_of(path)
    expected = (expected_sha256 or hash_prefix_of(path.name) or "").lower()
    if expected and not actual.startswith(expected):
        raise WeightsUnavailable(
            f"{path}: cached file is corrupt (sha256 {actual[:12]}..., expected {expected[:12]}...); "
            f"remove it with `resnet cache rm {path.name}` and fetch it again"
        )
    try:
        write_record(path, actual, size)
    except OSError:
        pass  # A read-only cache can still be used; the hash is simply computed again next time.
    return actual


# ---------------------------------------------------------------------------------------------
# Downloading


def _cache_folder_ready(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CacheError(f"cannot create the weight cache folder {folder}: {error.strerror or error}") from None
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CacheError(f"the weight cache folder {folder} is not writable")


def _lock_for(folder: Path, file_name: str):
    from filelock import FileLock

    return FileLock(str(folder / RECORD_DIR / f"{file_name}.lock"))


def _remove_stale_partials(folder: Path, file_name: str) -> None:
    # Only a lock holder writes partial files, so any left while we hold the lock belong to a
    # process that died (SIGKILL, power loss) mid-download.
    for stale in folder.glob(f".{file_name}.*{PARTIAL_SUFFIX}"):
        stale.unlink(missing_ok=True)


def _open_url(url: str, timeout: float):
    request = urllib.request.Request(url, headers={"User-Agent": "resnetcli"})
    try:
        return urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        raise WeightsUnavailable(f"{url}: download failed: HTTP {error.code} {error.reason}") from None
    except urllib.error.URLError as error:
        reason = error.reason
        text = reason.strerror if isinstance(reason, OSError) and reason.strerror else str(reason)
        raise WeightsUnavailable(f"{url}: download failed: {text}") from None
    except (socket.timeout, TimeoutError):
        raise WeightsUnavailable(f"{url}: download failed: no answer within {timeout:g} s") from None
    except (OSError, ValueError) as error:
        raise WeightsUnavailable(f"{url}: download failed: {error}") from None


def _stream_to(response, handle, url: str, timeout: float, on_progress: Callable[[int, "int | None"], None] | None) -> tuple[str, int, int | None]:
    length_header = response.headers.get("Content-Length")
    expected_length = int(length_header) if length_header and length_header.isdigit() else None
    digest = hashlib.sha256()
    received = 0
    if on_progress:
        on_progress(0, expected_length)
    while True:
        try:
            chunk = response.read(CHUNK)
        except (socket.timeout, TimeoutError):
            raise WeightsUnavailable(f"{url}: download stalled: no data for {timeout:g} s") from None
        except OSError as error:
            raise WeightsUnavailable(f"{url}: download interrupted: {error}") from None
        if not chunk:
            break
        handle.write(chunk)
        digest.update(chunk)
        received += len(chunk)
        if on_progress:
            on_progress(received, expected_length)
    if expected_length is not None and received != expected_length:
        raise WeightsUnavailable(f"{url}: download incomplete: got {received} of {expected_length} bytes")
    return digest.hexdigest(), received, expected_length


def download(
    url: str,
    file_name: str | None = None,
    *,
    sha256: str | None = None,
    settings: CacheSettings = CacheSettings(),
    on_progress: ProgressCallback | None = None,
    fetch_hint: str | None = None,
) -> CachedFile:
    """Make sure the file at `url` is in the cache, verified; download it when it is missing.

    `sha256` is the full hash or a prefix; without it the `NAME-<hexprefix>.ext` convention of the
    file name applies; a file with neither is refused, since it could not be verified.
    `fetch_hint` is the `resnet fetch` command named when the file is missing in offline mode.
    """
    file_name = file_name or file_name_of(url)
    expected = (sha256 or hash_prefix_of(file_name) or "").lower()
    if not expected:
        raise WeightsUnavailable(
            f"{url}: no sha256 to verify against: pass --sha256 or use a NAME-<sha256 prefix>.pth file name"
        )
    folder = checkpoint_dir()
    target = folder / file_name
    if target.is_file():
        check_cached_file(target, expected)
        return CachedFile(file_name, target, target.stat().st_size, (read_record(target) or {}).get("sha256"), "already cached")
    if settings.offline:
        raise WeightsUnavailable(
            f"{target.name} is not in the weight cache {folder} and downloads are off (offline mode); "
            f"get it with `{fetch_hint or 'resnet fetch --url ' + url}` where the network is reachable, "
            f"or copy it in with `resnet fetch --from-file`"
        )
    _cache_folder_ready(folder)
    source = settings.source_url(url)
    with _locked(folder, file_name, source, settings.timeout):
        if target.is_file():  # Another process finished it while we waited for the lock.
            check_cached_file(target, expected)
            return CachedFile(file_name, target, target.stat().st_size, (read_record(target) or {}).get("sha256"), "already cached")
        _remove_stale_partials(folder, file_name)
        partial = folder / f".{file_name}.{os.getpid()}.{time.monotonic_ns()}{PARTIAL_SUFFIX}"
        try:
            with _open_url(source, settings.timeout) as response:
                try:
                    with open(partial, "wb") as handle:
                        report = (lambda done, total: on_progress(file_name, done, total)) if on_progress else None
                        actual, size, _ = _stream_to(response, handle, source, settings.timeout, report)
                        handle.flush()
                        os.fsync(handle.fileno())
                except OSError as error:
                    raise CacheError(f"cannot write to the weight cache folder {folder}: {error.strerror or error}") from None
            if not actual.startswith(expected):
                raise WeightsUnavailable(
                    f"{source}: sha256 mismatch: expected {expected[:16]}..., got {actual[:16]}...; the file was discarded"
                )
            write_record(target, actual, size, source)
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    return CachedFile(file_name, target, size, actual, "downloaded")


class _locked:
    """Hold the per-file download lock; a stale lock of a killed process is released by the OS."""

    def __init__(self, folder: Path, file_name: str, url: str, timeout: float) -> None:
        (folder / RECORD_DIR).mkdir(exist_ok=True)
        self._lock = _lock_for(folder, file_name)
        self._url = url
        self._file_name = file_name

    def __enter__(self) -> None:
        from filelock import Timeout

        try:
            # Waiting is right: another process is downloading the same file right now. The lock
            # is an flock, so it dies with its holder and never outlives a killed process.
            self._lock.acquire(timeout=3600)
        except Timeout:
            raise WeightsUnavailable(f"{self._url}: another process has been downloading {self._file_name} for an hour") from None

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


def import_file(source: Path, file_name: str, *, sha256: str | None = None) -> CachedFile:
    """Copy a file brought in by hand into the cache after verifying it (the air-gapped case)."""
    expected = (sha256 or hash_prefix_of(file_name) or "").lower()
    if not expected:
        raise WeightsUnavailable(f"{source}: no sha256 to verify against: pass --sha256")
    actual = sha256_of(source)
    if not actual.startswith(expected):
        raise WeightsUnavailable(
            f"{source}: sha256 mismatch: expected {expected[:16]}..., got {actual[:16]}...; not imported"
        )
    folder = checkpoint_dir()
    _cache_folder_ready(folder)
    target = folder / file_name
    with _locked(folder, file_name, str(source), 0):
        partial = folder / f".{file_name}.{os.getpid()}.{time.monotonic_ns()}{PARTIAL_SUFFIX}"
        try:
            try:
                shutil.copyfile(source, partial)
            except OSError as error:
                raise CacheError(f"cannot write to the weight cache folder {folder}: {error.strerror or error}") from None
            if sha256_of(partial) != actual:
                raise WeightsUnavailable(f"{source}: the file changed while it was being copied")
            write_record(target, actual, partial.stat().st_size, None)
            os.replace(partial, target)
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
    return CachedFile(file_name, target, target.stat().st_size, actual, "imported")


def cached_files() -> Iterator[Path]:
    """The weight files in the cache folder (not records, locks or partial downloads)."""
    folder = checkpoint_dir()
    if not folder.is_dir():
        return iter(())
    return iter(sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")))
