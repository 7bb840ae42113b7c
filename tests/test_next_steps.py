"""What a user sees when a download cannot happen, and while one is not happening (issue 13):
the network-failure message names the next step, and no progress display is drawn without a download."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from conftest import env_without_resnet
from helpers import run_cli, run_on_terminal
from test_cache import cache_contents, impostor, refused_url, server, tiny  # noqa: F401 (fixtures)
from torchvision.models import ResNet18_Weights


def test_unreachable_mirror_names_the_next_step(runner, app, sample_images, checkpoint_dir):
    file_name = ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]
    url = refused_url(file_name)  # a 127.0.0.1 port with nothing listening
    result = run_cli(
        runner, app, "predict", sample_images[0], "--arch", "resnet18", "--mirror", url.rsplit("/", 1)[0] + "/"
    )
    assert result.exit_code == 3
    assert result.stdout == ""
    assert result.stderr == (
        f"resnet: error: {url}: download failed: Connection refused; where the network is unreachable, "
        "download through a reachable mirror (--mirror URL), or copy the file in with "
        "`resnet fetch --from-file PATH resnet18:IMAGENET1K_V1` and use --offline\n"
    )
    assert cache_contents(checkpoint_dir) == []


def test_a_users_url_that_cannot_be_reached_names_the_import_and_offline(runner, app, tiny, checkpoint_dir):  # noqa: F811
    url = refused_url(tiny.name)
    result = run_cli(runner, app, "fetch", "--url", url, "--format", "jsonl")
    assert result.exit_code == 3
    assert result.stderr.splitlines()[-1] == (
        f"resnet: error: {url}: download failed: Connection refused; where the network is unreachable, "
        f"copy the file in with `resnet fetch --from-file PATH --url {url}` and use --offline"
    )  # no --mirror: a mirror stands in for torchvision's host only


def stderr_on_terminal(torch_home: Path, *args: str) -> tuple[int, bytes]:
    """Run the CLI with stderr on a terminal (a pty, TERM=xterm); (exit code, bytes the terminal got)."""
    done = run_on_terminal(
        [sys.executable, "-m", "resnetcli", *map(str, args)],
        env_without_resnet(TORCH_HOME=str(torch_home), COLUMNS="80", TERM="xterm"),
        streams=("stderr",),
    )
    return done.returncode, done.terminal


@pytest.mark.timeout(300)
def test_progress_display_starts_with_the_first_download(server, tiny, checkpoint_dir):  # noqa: F811
    url = server.file_url("ok", server.add(tiny))
    torch_home = checkpoint_dir.parent.parent
    code, first = stderr_on_terminal(torch_home, "fetch", "--url", url, "--format", "jsonl")
    assert code == 0, first
    assert b"\x1b[?25l" in first and tiny.name.encode() in first  # the live bar, cursor hidden while it runs
    code, again = stderr_on_terminal(torch_home, "fetch", "--url", url, "--format", "jsonl")
    assert code == 0, again
    (line,) = again.decode().splitlines()  # already cached: one line, no empty frames
    assert line.startswith("resnet: already cached") and line.endswith(tiny.name)
    assert b"\x1b" not in again  # no cursor or line-clearing codes
