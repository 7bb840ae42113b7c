"""Running the CLI against a cache folder it cannot write, even as root.

Root ignores permission bits, so a read-only folder needs another way: the immutable flag
(`chattr +i`, absent in Docker without CAP_LINUX_IMMUTABLE and on overlayfs), running the CLI as
an unprivileged user (`setpriv`), or a read-only bind mount in a private mount namespace
(`unshare -m`). Each way is tried in that order; when none works the test is skipped with a
warning that names what was tried, so that the gap shows in the summary.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from conftest import REPO, env_without_resnet

WAYS = ("chmod", "chattr", "setpriv", "unshare")
NOBODY = 65534
#: An unprivileged user that may still read and search everything (CAP_DAC_READ_SEARCH), so that
#: pytest's private folders need no mode change, but writes only where `nobody` may: nowhere here.
AS_NOBODY = [
    "setpriv",
    f"--reuid={NOBODY}",
    f"--regid={NOBODY}",
    "--clear-groups",
    "--inh-caps=+dac_read_search",
    "--ambient-caps=+dac_read_search",
]


def _works(argv: list[str]) -> bool:
    try:
        return subprocess.run(argv, capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def available(way: str, folder: Path) -> bool:
    """Whether `way` can make `folder` read-only for a child process here."""
    root = os.geteuid() == 0
    if way == "chmod":
        return not root
    if not root:
        return False
    if way == "chattr":
        if shutil.which("chattr") is None or not _works(["chattr", "+i", str(folder)]):
            return False
        subprocess.run(["chattr", "-i", str(folder)], check=True)
        return True
    if way == "setpriv":
        return shutil.which("setpriv") is not None and _works([*AS_NOBODY, "true"])
    if way == "unshare":
        return shutil.which("unshare") is not None and _works(
            ["unshare", "-m", "sh", "-c", 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1"', "sh", str(folder)]
        )
    raise ValueError(way)


def first_way(folder: Path) -> str:
    """The first way that works here, or a loud skip."""
    for way in WAYS:
        if available(way, folder):
            return way
    message = "no way to make a folder read-only here (root, and chattr +i, setpriv and unshare -m all failed)"
    warnings.warn(message, pytest.PytestWarning, stacklevel=2)
    pytest.skip(message)


def run_cli_read_only(way: str, folder: Path, torch_home: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    """`python -m resnetcli ARGS` with `folder` and everything in it read-only for it, made so by `way`."""
    argv = [sys.executable, "-m", "resnetcli", *map(str, args)]
    environment = env_without_resnet(TORCH_HOME=str(torch_home), **env)

    def run(command: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=environment, timeout=120)

    if way == "chmod":
        folders = [folder, *(p for p in folder.rglob("*") if p.is_dir() and not p.is_symlink())]
        for part in folders:
            part.chmod(0o555)
        try:
            return run(argv)
        finally:
            for part in folders:
                part.chmod(0o755)
    if way == "chattr":
        subprocess.run(["chattr", "-R", "+i", str(folder)], check=True)
        try:
            return run(argv)
        finally:
            subprocess.run(["chattr", "-R", "-i", str(folder)], check=True)
    if way == "setpriv":
        # The folder stays owned by root with mode 0755: writable by root only.
        return run([*AS_NOBODY, *argv])
    if way == "unshare":
        script = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
        return run(["unshare", "-m", "sh", "-c", script, "sh", str(folder), *argv])
    raise ValueError(way)
