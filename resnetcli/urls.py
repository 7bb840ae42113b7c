"""What counts as a URL, and how one is shown: the rules every command shares (no torch, no network).

resnetcli downloads over http(s) only, for weights and images alike: `file://`, `ftp://` and the
other schemes urllib would also open are refused, so a URL never reads a local file behind the
user's back. Credentials written into a URL (`https://user:secret@host/...`) are used for the
request but never shown: records, cache records and messages carry the redacted form.
"""

from __future__ import annotations

import base64
from urllib.parse import unquote, urlsplit, urlunsplit

#: The schemes resnetcli downloads from.
SCHEMES = ("http", "https")
#: What stands in for the user name and password of a URL wherever it is shown.
REDACTED = "***"


def is_url(text: str) -> bool:
    """Whether `text` is an http(s) URL (case-insensitive scheme), as opposed to a local path."""
    return text[:8].lower().startswith(("http://", "https://"))


def has_scheme(text: str) -> bool:
    """Whether `text` looks like any URL (`scheme://...`), downloadable or not."""
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.isascii() and scheme[:1].isalpha() and all(c.isalnum() or c in "+-." for c in scheme)


def redact_url(url: str) -> str:
    """`url` with any user name and password replaced by `***`; other URLs unchanged.

    `https://user:secret@host/a.pth` gives `https://***@host/a.pth`.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, f"{REDACTED}@{host}", parts.path, parts.query, parts.fragment))


def split_credentials(url: str) -> tuple[str, str | None]:
    """The URL without its user name and password, and the Basic `Authorization` header value they make."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None
    userinfo, _, host = parts.netloc.rpartition("@")
    user, _, password = userinfo.partition(":")
    token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode("ascii")
    return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment)), f"Basic {token}"
