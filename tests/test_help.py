"""--help as a user reads it at 80 columns, its examples, shell completion, and --debug."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from doc_commands import REPO, check_parses, resnet_commands, runnable_here, with_placeholders

from resnetcli.cli.examples import EXAMPLES


def command_paths() -> list[str]:
    """Every command path of the real app ("", "predict", "cache list", ...)."""
    import typer.main

    from resnetcli.cli import app

    paths = []

    def walk(command, prefix: str) -> None:
        paths.append(prefix.strip())
        for name, sub in (getattr(command, "commands", None) or {}).items():
            walk(sub, f"{prefix} {name}")

    walk(typer.main.get_command(app), "")
    return paths


PATHS = command_paths()


def env_80(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RESNET_", "_RESNET"))}
    env.update(COLUMNS="80", LINES="50", TERM="dumb", PYTHONPATH=str(REPO), **extra)
    env.pop("FORCE_COLOR", None)
    return env


def resnet(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "resnetcli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env_80(**env),
        timeout=120,
    )


@pytest.mark.parametrize("path", PATHS, ids=lambda p: p or "resnet")
def test_help_at_80_columns_ends_with_the_examples(path):
    done = resnet(*path.split(), "--help")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.rstrip().splitlines()
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    usage = next(line for line in lines if "Usage:" in line)
    for wrong in ("<bool>", "<list[", "<str>", "<int", "<float", "<path>", "<file>"):
        assert wrong not in done.stdout, f"{wrong} in `resnet {path} --help`"
    assert "{" not in usage and "}" not in usage, usage
    examples = EXAMPLES[path]
    assert 3 <= len(examples) <= 5
    tail = [line.strip() for line in lines[-len(examples) - 1 :]]
    assert tail == ["Examples", *examples]


def test_usage_lines_read_like_a_well_kept_cli():
    assert "Usage: resnet predict [OPTIONS] INPUT..." in resnet("predict", "--help").stdout
    assert "Usage: resnet fetch [OPTIONS] [ARCH[:WEIGHTS]]..." in resnet("fetch", "--help").stdout
    assert "Usage: resnet summary [OPTIONS] [MODEL]" in resnet("summary", "--help").stdout
    top = resnet("predict", "--help").stdout
    # Value types click-style; flags without one.
    strict = next(line for line in top.splitlines() if "--strict" in line)
    assert strict.split("│")[1].split()[:1] == ["--strict"] and "Stop at the first" in strict
    assert any("--top" in line and "INTEGER [x>=1]" in line for line in top.splitlines())
    assert any("--format" in line and "FORMAT" in line for line in top.splitlines())
    assert "One of: table, json, jsonl, csv, tsv." in " ".join(
        line.strip("│ ") for line in top.splitlines() if line.startswith("│")
    )
    root = resnet("--help").stdout
    version = next(line for line in root.splitlines() if "--version" in line)
    assert version.split()[1:4] == ["--version", "-V", "Show"]


@pytest.mark.parametrize(
    "path, example",
    [(path, example) for path, lines in EXAMPLES.items() for example in lines if path in PATHS],
)
def test_every_example_parses(path, example, tmp_path, monkeypatch):
    commands = resnet_commands(example)
    assert commands, example
    assert commands[0][: len(path.split())] == path.split() or path == ""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    for argv in commands:
        check_parses(with_placeholders(argv, tmp_path), f"`resnet {path} --help`")


def test_an_example_the_parser_rejects_fails_the_check():
    with pytest.raises(AssertionError, match="does not parse"):
        check_parses(["list", "--sort", "speed"], "planted")
    with pytest.raises(AssertionError, match="does not parse"):
        check_parses(["predict", "photo.jpg", "--no-such-option"], "planted")


def test_examples_that_need_no_weights_run(runner, app, monkeypatch):
    monkeypatch.chdir(REPO)
    ran = []
    for path, lines in EXAMPLES.items():
        if path not in PATHS:
            continue
        for example in lines:
            for argv in resnet_commands(example):
                if runnable_here(argv):
                    result = runner.invoke(app, argv, prog_name="resnet")
                    assert result.exit_code == 0, (example, result.output)
                    ran.append(shlex.join(argv))
    assert (
        "summary resnet18" in ran and "list" in ran and "cache list" in ran and "features resnet50 --list-nodes" in ran
    )


# ---------------------------------------------------------------------------------------------
# Shell completion: install, show, and enum values through the completion protocol


def complete(words: str, **env: str) -> list[str]:
    current = len(words.split()) - (0 if words.endswith(" ") else 1)
    done = resnet(_RESNET_COMPLETE="complete_bash", COMP_WORDS=words, COMP_CWORD=str(current), **env)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_completion_of_enum_values(tmp_path):
    assert complete("resnet predict x.jpg --format ", XDG_CACHE_HOME=str(tmp_path)) == [
        "table",
        "json",
        "jsonl",
        "csv",
        "tsv",
    ]
    assert complete("resnet summary resnet18 --format j", XDG_CACHE_HOME=str(tmp_path)) == ["json", "jsonl"]
    assert complete("resnet list --sort ", XDG_CACHE_HOME=str(tmp_path)) == [
        "name",
        "acc@1",
        "acc@5",
        "params",
        "gflops",
        "size",
    ]
    assert complete("resnet list --sort acc", XDG_CACHE_HOME=str(tmp_path)) == ["acc@1", "acc@5"]
    assert complete("resnet cache ", XDG_CACHE_HOME=str(tmp_path)) == ["list", "verify", "rm"]


def in_bash(*args: str, **env: str) -> subprocess.CompletedProcess:
    """`resnet ARGS` as a user's shell runs it: Typer finds the shell among the parent processes
    (shellingham), so a pytest started without a shell above it (cron, some CI runners) still works."""
    command = " ".join(shlex.quote(word) for word in [sys.executable, "-m", "resnetcli", *args])
    return subprocess.run(
        ["bash", "-c", f"{command}; exit $?"], capture_output=True, text=True, cwd=REPO, env=env_80(**env), timeout=120
    )


def test_show_completion_prints_the_script_for_the_shell(tmp_path):
    done = in_bash("--show-completion", "bash", HOME=str(tmp_path), SHELL="/bin/bash")
    assert done.returncode == 0, done.stderr
    assert "_RESNET_COMPLETE=complete_bash" in done.stdout
    assert "complete -o default -F _resnet_completion resnet" in done.stdout.replace("-o nosort ", "")
    assert list(tmp_path.iterdir()) == []  # showing installs nothing


def test_install_completion_writes_the_script_and_hooks_it_into_bashrc(tmp_path):
    done = in_bash("--install-completion", "bash", HOME=str(tmp_path), SHELL="/bin/bash")
    assert done.returncode == 0, done.stderr
    script = tmp_path / ".bash_completions" / "resnet.sh"
    assert script.is_file()
    assert script.read_text().strip() == in_bash("--show-completion", "bash", HOME=str(tmp_path)).stdout.strip()
    assert (tmp_path / ".bashrc").read_text().splitlines()[-1] == f"source '{script}'"
    # The installed script really completes: bash sources it and asks it for `resnet cache <TAB>`.
    probe = (
        f"source {shlex.quote(str(script))}; COMP_WORDS=(resnet cache ''); COMP_CWORD=2; _resnet_completion resnet;"
        " printf '%s\\n' \"${COMPREPLY[@]}\""
    )
    asked = subprocess.run(
        ["bash", "--norc", "-c", probe],
        capture_output=True,
        text=True,
        env=env_80(HOME=str(tmp_path), PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}"),
        cwd=tmp_path,
        timeout=120,
    )
    if asked.stdout.split() != ["list", "verify", "rm"]:
        # The script calls the `resnet` program: present as /work/venv/bin/resnet or after `pip install .`.
        pytest.skip(f"no `resnet` program on PATH to answer the installed script: {asked.stderr.strip()[:200]}")
    assert asked.stdout.split() == ["list", "verify", "rm"]


# ---------------------------------------------------------------------------------------------
# --debug and RESNET_DEBUG


def cache_error(tmp_path: Path, *options: str, **env: str) -> subprocess.CompletedProcess:
    """A domain error with a hidden cause: the weight cache folder cannot be created (TORCH_HOME is a file)."""
    blocker = tmp_path / "torch_home_is_a_file"
    blocker.write_text("")
    photo = REPO / "sample_images" / "cat.jpg"
    import hashlib

    digest = hashlib.sha256(photo.read_bytes()).hexdigest()
    return resnet(*options, "fetch", "--from-file", str(photo), "--sha256", digest, TORCH_HOME=str(blocker), **env)


def cache_error_line(tmp_path: Path) -> str:
    folder = tmp_path / "torch_home_is_a_file" / "hub" / "checkpoints"
    return f"resnet: error: cannot create the weight cache folder {folder}: Not a directory"


def test_errors_stay_one_line_without_debug(tmp_path):
    done = cache_error(tmp_path)
    assert done.returncode == 3
    assert done.stderr.splitlines() == [cache_error_line(tmp_path)]


@pytest.mark.parametrize("how", ["--debug", "RESNET_DEBUG=1"])
def test_debug_shows_the_logs_and_the_full_chain(tmp_path, how):
    done = cache_error(tmp_path, "--debug") if how == "--debug" else cache_error(tmp_path, RESNET_DEBUG="1")
    assert done.returncode == 3
    lines = done.stderr.splitlines()
    assert lines[0].startswith("resnet: debug: resnetcli.cli.app: resnetcli ")
    error = cache_error_line(tmp_path)
    assert error in lines
    after = lines[lines.index(error) + 1 :]
    # The hidden cause first (NotADirectoryError, raised `from None`), then the domain error, with tracebacks.
    assert after[0] == "Traceback (most recent call last):"
    assert any(line.startswith("NotADirectoryError: [Errno 20] Not a directory") for line in after)
    assert after[-1].startswith("resnetcli.errors.CacheError: cannot create the weight cache folder")
    assert sum(line == "Traceback (most recent call last):" for line in after) == 2


def test_debug_logs_reach_stderr_from_core_modules(runner, app, capfd):
    import logging

    from resnetcli.cli.app import configure_logging

    try:
        result = runner.invoke(app, ["--debug", "list", "resnet18", "--format", "jsonl"], prog_name="resnet")
        assert result.exit_code == 0
        logging.getLogger("resnetcli.cache").debug("a fallback taken")
        assert "resnet: debug: resnetcli.cache: a fallback taken" in capfd.readouterr().err + result.stderr
    finally:
        configure_logging(False)
    logging.getLogger("resnetcli.cache").debug("not shown")
    assert "not shown" not in capfd.readouterr().err


def test_debug_adds_the_traceback_to_errors_reported_per_item(tmp_path):
    quiet = resnet("cache", "rm", "nosuch.pth", TORCH_HOME=str(tmp_path))
    loud = resnet("--debug", "cache", "rm", "nosuch.pth", TORCH_HOME=str(tmp_path))
    assert quiet.returncode == loud.returncode == 1
    line = f"resnet: error: nosuch.pth: not in the weight cache {tmp_path}/hub/checkpoints"
    assert quiet.stderr.splitlines() == [line]
    lines = loud.stderr.splitlines()
    after = lines[lines.index(line) + 1 :]
    assert after[0] == "Traceback (most recent call last):"
    assert after[-1] == f"resnetcli.errors.InputError: nosuch.pth: not in the weight cache {tmp_path}/hub/checkpoints"
