"""What a user sees of the cache (issue 13, 16): empty caches, missing names, the 80-column list, and a
read-only cache that still serves what is in it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import REPO, env_without_resnet
from helpers import jsonl, python_c, run_cli, run_on_terminal
from readonly_cache import WAYS, available, run_cli_read_only
from test_store_attacks import serve, tiny, web  # noqa: F401 (fixtures)


def on_terminal(torch_home: Path, *args: str, columns: int = 80) -> tuple[int, str, str]:
    """Run the CLI with stdout on a terminal (a pty) `columns` wide; (exit code, screen, stderr)."""
    done = run_on_terminal(
        [sys.executable, "-m", "resnetcli", *map(str, args)],
        env_without_resnet(TORCH_HOME=str(torch_home), COLUMNS=str(columns), TERM="dumb"),
    )
    return done.returncode, done.terminal.decode().replace("\r\n", "\n"), done.stderr


@pytest.mark.parametrize("command", [["cache", "list"], ["cache", "verify"]])
def test_empty_cache_says_so_at_once_without_torch(checkpoint_dir, command):
    probe = (
        "import sys\n"
        "from resnetcli.cli import app\n"
        "try:\n"
        f"    app({command + ['--format', 'table']!r})\n"
        "except SystemExit as end:\n"
        "    print(end.code, sorted(m for m in ('torch', 'torchvision') if m in sys.modules), file=sys.stderr)\n"
    )
    done = python_c(probe, env_without_resnet(TORCH_HOME=str(checkpoint_dir.parent.parent), PYTHONPATH=str(REPO)), 60)
    assert done.stdout == ""
    assert done.stderr == f"resnet: the cache is empty ({checkpoint_dir})\n0 []\n"


def test_rm_of_a_missing_name_prints_its_error_and_no_table(runner, app, checkpoint_dir):
    result = run_cli(runner, app, "cache", "rm", "foo.pth", "--format", "table")
    assert result.exit_code == 1
    assert result.stdout == ""
    assert result.stderr == f"resnet: error: foo.pth: not in the weight cache {checkpoint_dir}\n"


def test_cache_list_fits_80_columns_and_says_how_to_use_an_imported_file(runner, app, web, tiny, checkpoint_dir):  # noqa: F811
    from torchvision.models import ResNet18_Weights, ViT_H_14_Weights

    assert run_cli(runner, app, "fetch", "--url", serve(web, tiny)).exit_code == 0
    big = ViT_H_14_Weights.IMAGENET1K_SWAG_E2E_V1  # the longest names and the largest file
    for weights in (ResNet18_Weights.IMAGENET1K_V1, big):
        (checkpoint_dir / weights.url.rsplit("/", 1)[1]).write_bytes(b"x" * 1_234_567)
    code, screen, err = on_terminal(checkpoint_dir.parent.parent, "cache", "list")
    assert code == 0, err
    lines = screen.splitlines()
    assert max(len(line) for line in lines) <= 80, screen
    rows = {line.split()[1]: line for line in lines if line.startswith("│") and "MiB" in line}
    tiny_row = rows[tiny.name]
    assert f" {len(tiny.data) / 2**20:.1f} MiB " in tiny_row  # the size in MiB, 1 decimal, on one line
    assert f" {tiny.sha256[:8]}… " in tiny_row
    assert "[]" not in screen  # no empty list for a file that is not torchvision's
    assert " 1.2 MiB " in rows[ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]]
    assert "resnet18:IMAGENET1K_V1" in screen
    big_row = rows[big.url.rsplit("/", 1)[1]]  # its whole name: what `cache rm` takes
    label = big_row.split("│")[3].strip()  # a label too long for the width is cut, never folded
    assert label.endswith("…") and f"vit_h_14:{big.name}".startswith(label[:-1]) and len(label) > 12
    assert lines[-1] == f"Use a file that is not torchvision's by its name: --weights {tiny.name}"
    assert len(rows) == 3  # one line per file: nothing folded onto a second line


@pytest.mark.parametrize("way", WAYS)
def test_read_only_cache_serves_the_files_already_in_it(runner, app, web, tiny, checkpoint_dir, way):  # noqa: F811
    """A cache shared read-only (a site-wide copy) still answers for its files, and says so when one is missing."""
    url = serve(web, tiny)
    assert run_cli(runner, app, "fetch", "--url", url).exit_code == 0
    record = checkpoint_dir / ".resnetcli" / f"{tiny.name}.json"
    record.unlink()  # a file torchvision left: the hash is computed, and cannot be recorded
    if not available(way, checkpoint_dir):
        pytest.skip(f"{way} cannot make a folder read-only here")
    home = checkpoint_dir.parent.parent
    fetched = run_cli_read_only(way, checkpoint_dir, home, "fetch", "--url", url, "--format", "jsonl")
    assert fetched.returncode == 0, fetched.stderr
    assert [(r["status"], r["sha256"]) for r in jsonl(fetched.stdout)] == [("already cached", tiny.sha256)]
    verified = run_cli_read_only(way, checkpoint_dir, home, "cache", "verify", "--format", "jsonl")
    assert verified.returncode == 0, verified.stderr
    assert [r["status"] for r in jsonl(verified.stdout)] == ["ok"]
    listed = run_cli_read_only(way, checkpoint_dir, home, "cache", "list", "--format", "json")
    assert listed.returncode == 0, listed.stderr
    assert [r["file"] for r in json.loads(listed.stdout)] == [tiny.name]
    other = run_cli_read_only(way, checkpoint_dir, home, "fetch", "--url", f"{web.url}/ok/other-12345678.pth")
    assert other.returncode == 3
    assert other.stderr == f"resnet: error: the weight cache folder {checkpoint_dir} is not writable\n"
    assert not record.exists()
