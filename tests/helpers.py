"""How the tests drive the CLI and read what it prints: in process (CliRunner), as `python -c` in this
checkout, and as a subprocess with its stdout or stderr on a terminal (a pty)."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import threading
from dataclasses import dataclass

from conftest import REPO


def run_cli(runner, app, *args):
    return runner.invoke(app, [str(a) for a in args])


def run_json(runner, app, *args):
    result = run_cli(runner, app, *args, "--format", "json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def one_line_error(result) -> str:
    """The one line a failed command prints: `resnet: error: ...`, no traceback, no terminal codes."""
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("resnet: error: ")
    assert "\x1b" not in lines[0]
    return lines[0]


def python_c(code: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -c CODE` in this checkout, its output captured as text."""
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env
    )


@dataclass(frozen=True)
class TerminalRun:
    returncode: int
    terminal: bytes  # what the terminal got, its line endings as the terminal has them (\r\n)
    stdout: str | None  # the stream when it was not on the terminal
    stderr: str | None


def run_on_terminal(argv: list[str], env: dict, *, streams=("stdout",), timeout: float = 120) -> TerminalRun:
    """Run `argv` in this checkout with `streams` ("stdout", "stderr" or both) on a new terminal (a pty)
    and the others captured; the terminal is read while the process runs, or it would block once
    the terminal's buffer is full."""
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        argv,
        cwd=REPO,
        stdout=terminal if "stdout" in streams else subprocess.PIPE,
        stderr=terminal if "stderr" in streams else subprocess.PIPE,
        text=True,
        env=env,
    )
    os.close(terminal)
    screen = bytearray()

    def drain():
        while True:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # EIO: every process holding the terminal closed it
                return
            if not chunk:
                return
            screen.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        out, err = process.communicate(timeout=timeout)
    finally:
        process.kill()  # only when the process outlived `timeout`
        process.wait()
        reader.join(timeout=10)
        os.close(controller)
    return TerminalRun(process.returncode, bytes(screen), out, err)
