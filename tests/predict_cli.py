"""`resnet predict` as the predict tests drive it: in process (CliRunner) or as a subprocess."""

from __future__ import annotations

import sys
from pathlib import Path

from conftest import REPO, env_without_resnet


def run(runner, app, *args, input=None):
    return runner.invoke(app, ["predict", *[str(a) for a in args]], input=input)


def command(*args) -> list[str]:
    return [sys.executable, "-m", "resnetcli", "predict", *[str(a) for a in args]]


def subprocess_env(tmp_path: Path, **extra: str) -> dict:
    """The environment of a `resnet` subprocess: its own cache, this checkout, and stdout buffered as
    usual (PYTHONUNBUFFERED would hide a missing flush)."""
    env = env_without_resnet(TORCH_HOME=str(tmp_path / "torch_home"), PYTHONPATH=str(REPO), **extra)
    env.pop("PYTHONUNBUFFERED", None)
    return env
