"""`resnet predict` as the predict tests drive it: in process (CliRunner) or as a subprocess."""

from __future__ import annotations

import json
import sys


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def run(runner, app, *args, input=None):
    return runner.invoke(app, ["predict", *[str(a) for a in args]], input=input)


def command(*args) -> list[str]:
    return [sys.executable, "-m", "resnetcli", "predict", *[str(a) for a in args]]
