"""Getting files into the weight cache: HTTP downloads (size-capped, mirrorable, offline-aware) and imports.

Both go through `store.store_verified`, the one lock -> partial -> hash -> install path. Downloads
are http(s) only. A download is capped: at the expected size when it is known (torchvision's
weights, `fetch --size`), otherwise at RESNET_MAX_DOWNLOAD (default 4 GiB, larger than any
torchvision file: the biggest, vit_h_14's SWAG weights, is 2.4 GiB); a known size must also fit
in the free space of the cache's disk. Credentials in a URL are sent as Basic authentication and
shown nowhere (see resnetcli.urls). Nothing here imports torch.
"""

from __future__ import annotations

import http.client
import logging
import math
import os
import re
import shutil
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlparse

from resnetcli.errors import CacheError, UsageError, WeightsUnavailable
from resnetcli.store import (
    CachedFile,
    Source,
    already_cached,
    checkpoint_dir,
    hash_prefix_of,
    store_verified,
)
from resnetcli.urls import is_url, redact_url, split_credentials

log = logging.getLogger(__name__)

#: What `--sha256` accepts: a full sha256 or a prefix of at least 8 hex digits (torchvision's length).
SHA256_ARGUMENT = re.compile(r"[0-9a-f]{8,64}")
DEFAULT_TIMEOUT = 30.0
#: The cap on a download of unknown size (RESNET_MAX_DOWNLOAD overrides it).
DEFAULT_MAX_DOWNLOAD = 4 << 30
_SIZE = re.compile(r"(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[kmgt]?)(?P<i>i?)b?", re.IGNORECASE)
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"", "0", "false", "no", "off"}

#: Called as on_progress(file_name, bytes_done, bytes_total_or_None) while a file downloads.
ProgressCallback = Callable[[str, int, "int | None"], None]


def parse_size(text: str, what: str) -> int:
    """A byte count such as `4GiB`, `500M`, `1.5G` or `123456` (K, M, G, T: powers of 1024)."""
    match = _SIZE.fullmatch(text.strip())
    if not match:
        raise UsageError(f"{what}={text}: expected a size in bytes such as 123456, 500MiB or 4GiB")
    power = " kmgt".index(match.group("unit").lower() or " ")
    value = int(float(match.group("number")) * 1024**power)
    if value <= 0:
        raise UsageError(f"{what}={text}: the size must be positive")
    return value


def format_size(size: int) -> str:
    """A byte count for a message: `4 GiB`, `1.5 MiB`, `900 bytes`."""
    for power, unit in ((3, "GiB"), (2, "MiB"), (1, "KiB")):
        if size >= 1024**power:
            return f"{size / 1024**power:.1f}".removesuffix(".0") + f" {unit}"
    return f"{size} bytes"


def size_of_mib(file_size_mib: float | None) -> int | None:
    """The cap in bytes for a file whose published size is `file_size_mib` (torchvision's `meta["_file_size"]`).

    That is the size of torchvision's own file, to 3 decimals. The same tensors saved by another
    torch version differ slightly (a resnet18 state dict saved by torch 2.14: 4.5 kB, 0.01%, more),
    so the cap allows 1% + 64 KiB more; a file larger than that is not the file, whatever its hash.
    """
    if file_size_mib is None or file_size_mib <= 0:
        return None
    return math.ceil(file_size_mib * (1 << 20) * 1.01) + (64 << 10)


def parse_sha256(text: str) -> str:
    """A `--sha256` value, lower-cased: a full sha256 or a prefix of at least 8 hex digits."""
    value = text.strip().lower()
    if not SHA256_ARGUMENT.fullmatch(value):
        raise UsageError(f"--sha256 {text}: expected 8 to 64 hexadecimal digits")
    return value


def _flag_from_env(name: str) -> bool:
    text = os.environ.get(name, "").strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise UsageError(f"{name}={text}: expected 1, true, yes or on (or 0, false, no, off)")


@dataclass(frozen=True)
class CacheSettings:
    """How weights may be obtained: offline or not, from which mirror, with which timeout and size cap."""

    offline: bool = False
    mirror: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    max_download: int = DEFAULT_MAX_DOWNLOAD

    @classmethod
    def from_env(
        cls, offline: bool | None = None, mirror: str | None = None, timeout: float | None = None
    ) -> CacheSettings:
        """Settings from command-line values, else RESNET_OFFLINE, RESNET_MIRROR, RESNET_TIMEOUT and
        RESNET_MAX_DOWNLOAD."""
        env_offline = _flag_from_env("RESNET_OFFLINE")
        if timeout is None:
            timeout = _timeout_from_env()
        if timeout <= 0:
            raise UsageError(f"the network timeout must be a positive number of seconds, not {timeout:g}")
        cap = os.environ.get("RESNET_MAX_DOWNLOAD", "").strip()
        mirror = mirror or os.environ.get("RESNET_MIRROR") or None
        if mirror is not None and not is_url(mirror):
            raise UsageError(f"--mirror {redact_url(mirror)}: expected an http:// or https:// base URL")
        return cls(
            offline=bool(offline) or env_offline,
            mirror=mirror,
            timeout=timeout,
            max_download=parse_size(cap, "RESNET_MAX_DOWNLOAD") if cap else DEFAULT_MAX_DOWNLOAD,
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


def file_name_of(url: str) -> str:
    """The last path component of a URL: the name a download is cached under."""
    name = Path(urlparse(url).path).name
    if not name or name.startswith("."):  # "." names are resnetcli's own partial files and records
        raise WeightsUnavailable(f"{redact_url(url)}: the URL does not end in a file name")
    return name


def check_url(url: str) -> None:
    """Refuse a URL resnetcli does not download from: http(s) only, as for `predict --weights`."""
    if not is_url(url):
        raise UsageError(f"--url {redact_url(url)}: only http:// and https:// URLs are downloaded")


# ---------------------------------------------------------------------------------------------
# HTTP


def _network_error(url: str, error: BaseException, timeout: float, started: bool) -> WeightsUnavailable:
    """One line naming the (redacted) URL and what went wrong with it."""
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


def _check_free_space(folder: Path, size: int) -> None:
    try:
        free = shutil.disk_usage(folder).free
    except OSError as error:
        log.debug("free space of %s unknown: %s", folder, error)
        return
    if size > free:
        raise CacheError(
            f"not enough free space in the weight cache folder {folder}: "
            f"{format_size(size)} needed, {format_size(free)} free"
        )


def _http_source(
    url: str, timeout: float, cap: int, known: bool, report: Callable[[int, int | None], None], next_step: str = ""
):
    """Open `url` as a Source that reads at most `cap` bytes and checks the length the server announced.

    `known`: the cap is the expected size (the message says so) rather than RESNET_MAX_DOWNLOAD.
    `next_step` ends the message when no server answered (refused, unknown host, no answer): what to
    do where the network cannot be reached.
    """
    shown = redact_url(url)
    plain, authorization = split_credentials(url)
    headers = {"User-Agent": "resnetcli"}
    if authorization:
        headers["Authorization"] = authorization
    try:
        response = urllib.request.urlopen(urllib.request.Request(plain, headers=headers), timeout=timeout)
    except ValueError:
        raise WeightsUnavailable(f"{shown}: not a URL resnetcli can download from") from None
    except (OSError, http.client.HTTPException) as error:
        failure = _network_error(shown, error, timeout, started=False)
        if next_step and not isinstance(error, (urllib.error.HTTPError, http.client.HTTPException)):
            failure = WeightsUnavailable(f"{failure}; {next_step}")
        raise failure from None
    limit = (
        f"more than the expected {format_size(cap)}" if known else f"more than RESNET_MAX_DOWNLOAD={format_size(cap)}"
    )
    length_header = response.headers.get("Content-Length")
    length = int(length_header) if length_header and length_header.isdigit() else None
    if length is not None and length > cap:
        response.close()
        raise WeightsUnavailable(f"{shown}: download refused: the server announces {format_size(length)}, {limit}")
    report(0, length)
    state = {"size": 0}

    def read(amount: int) -> bytes:
        try:
            # read1 returns what has arrived: progress moves, and a stall is a timeout, not a hang.
            chunk = response.read1(min(amount, cap + 1 - state["size"]))
        except (OSError, http.client.HTTPException) as error:
            response.close()
            raise _network_error(shown, error, timeout, started=True) from None
        state["size"] += len(chunk)
        if state["size"] > cap:
            response.close()
            raise WeightsUnavailable(f"{shown}: download stopped: the server sent {limit}; the file was discarded")
        if not chunk:
            response.close()
            if length is not None and state["size"] != length:
                raise WeightsUnavailable(f"{shown}: download incomplete: got {state['size']} of {length} bytes")
        return chunk

    return Source(shown, read, url=shown, close=response.close)


def download(
    url: str,
    *,
    sha256: str | None = None,
    size: int | None = None,
    settings: CacheSettings = CacheSettings(),
    on_progress: ProgressCallback | None = None,
    fetch_hint: str | None = None,
    mirrored: bool = True,
    on_wait: Callable[[str], None] | None = None,
) -> CachedFile:
    """Make sure the file at `url` is in the cache, verified; download it when it is missing.

    `sha256` is the full hash or a prefix; without it the `NAME-<hexprefix>.ext` convention of the
    file name applies; a file with neither is refused, since it could not be verified. `size` is
    the most bytes the file may have (its expected size), else `settings.max_download` caps it.
    `fetch_hint` is the `resnet fetch` command named when the file is missing in offline mode.
    `mirrored` says whether `settings.mirror` applies (torchvision's weights) or not (a user's URL).
    `on_wait(file_name)` is called when another process is downloading the file and this one waits.
    """
    shown = redact_url(url)
    file_name = file_name_of(url)
    expected = (sha256 or hash_prefix_of(file_name) or "").lower()
    if not expected:
        raise WeightsUnavailable(
            f"{shown}: no sha256 to verify against: pass --sha256 or use a NAME-<sha256 prefix>.pth file name"
        )
    folder = checkpoint_dir()
    target = folder / file_name
    if target.is_file():
        return already_cached(target, expected)
    fetch_hint = redact_url(fetch_hint or f"resnet fetch --url {url}")
    import_hint = fetch_hint.replace("resnet fetch ", "resnet fetch --from-file PATH ", 1)
    if settings.offline:
        raise WeightsUnavailable(
            f"{file_name} is not in the weight cache {folder} and downloads are off (offline mode); "
            f"get it with `{fetch_hint}` where the network is reachable, or copy it in with `{import_hint}`"
        )
    source = settings.source_url(url) if mirrored else url
    if not is_url(source):
        raise WeightsUnavailable(f"{redact_url(source)}: only http:// and https:// URLs are downloaded")
    cap = size if size is not None else settings.max_download
    total: dict[str, int | None] = {}
    # When no server answers, the next step, as the offline message names it (issue 13).
    mirror = "download through a reachable mirror (--mirror URL), or " if mirrored else ""
    next_step = f"where the network is unreachable, {mirror}copy the file in with `{import_hint}` and use --offline"

    def report(done: int, length: int | None = None) -> None:
        total.setdefault("length", length)
        if on_progress is not None:
            on_progress(file_name, done, total["length"])

    def open_source() -> Source:
        if size is not None:
            _check_free_space(folder, size)
        return _http_source(source, settings.timeout, cap, size is not None, report, next_step)

    return store_verified(
        file_name,
        expected,
        open_source,
        "downloaded",
        lambda done: report(done),
        on_wait=(lambda: on_wait(file_name)) if on_wait is not None else None,
    )


def import_file(source: Path, file_name: str | None = None, *, sha256: str | None = None) -> CachedFile:
    """Copy a file brought in by hand into the cache (the air-gapped case), verified before it enters.

    The file is cached as `file_name` (default: its own name) and must match `sha256` (full or a
    prefix) or, without it, the sha256 prefix in `file_name`. It replaces a cached file of that name.
    """
    file_name = file_name or source.name
    expected = (sha256 or hash_prefix_of(file_name) or "").lower()
    if not expected:
        raise WeightsUnavailable(f"{source}: no sha256 to verify against: pass --sha256 HEX")
    try:
        reader = open(source, "rb")  # noqa: SIM115 (closed by `with reader` below; opened here to name a read error)
    except OSError as error:
        raise WeightsUnavailable(f"{source}: cannot read: {error.strerror or error}") from None

    def read(amount: int) -> bytes:
        try:
            return reader.read(amount)
        except OSError as error:
            raise WeightsUnavailable(f"{source}: cannot read: {error.strerror or error}") from None

    with reader:
        return store_verified(
            file_name, expected, lambda: Source(str(source), read, refused="not imported"), "imported", replace=True
        )
