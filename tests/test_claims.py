"""Gaps found while verifying issues 9 and 16 line by line (notes/verification.md): claims whose
code line could be broken without any test failing. Real files, real links, a real loopback server."""

from __future__ import annotations

import json
import os
import subprocess
import time

from conftest import REPO
from helpers import jsonl, run_cli
from predict_cli import command, subprocess_env
from test_store_attacks import cached_tiny, serve, tiny, web  # noqa: F401 (fixtures)


def test_a_record_that_is_a_link_is_corrupt_and_replaced_never_followed(runner, app, cached_tiny, tmp_path):  # noqa: F811
    """Issue 9.1: a record planted as a link to a file outside the cache is neither read nor written through."""
    record = cached_tiny.parent / ".resnetcli" / f"{cached_tiny.name}.json"
    genuine = json.loads(record.read_text())
    outside = tmp_path / "outside.json"
    outside.write_text(json.dumps({**genuine, "note": "a user's file"}))  # would vouch for the file if read
    before = outside.read_bytes()
    record.unlink()
    os.symlink(outside, record)

    listed = run_cli(runner, app, "cache", "list", "--format", "jsonl")
    assert listed.exit_code == 0, listed.stderr
    assert [(r["file"], r["sha256"]) for r in jsonl(listed.stdout)] == [(cached_tiny.name, None)]  # not trusted
    assert listed.stderr == (
        f"resnet: warning: {cached_tiny}: its record .resnetcli/{cached_tiny.name}.json is corrupt: "
        f"it is a symbolic link; `resnet cache verify {cached_tiny.name}` checks the file and rewrites it\n"
    )

    verified = run_cli(runner, app, "cache", "verify", "--format", "jsonl")
    assert verified.exit_code == 0, verified.stderr
    assert [(r["file"], r["status"]) for r in jsonl(verified.stdout)] == [(cached_tiny.name, "ok")]
    assert not record.is_symlink()  # the link itself was replaced by a sound record
    assert json.loads(record.read_text())["sha256"] == genuine["sha256"]
    assert outside.read_bytes() == before  # nothing written through the link


def test_the_run_that_finishes_last_leaves_its_whole_result_never_a_mix(
    tmp_path,
    sample_images,
    steered_resnet18,
    model_args,
):
    """Issue 9.2: two runs on one `-o`, made certain to overlap: one writes its first record, another
    runs whole, then the first finishes. The file holds the last finisher's records, whole, nothing else."""
    output = tmp_path / "shared.jsonl"
    env = subprocess_env(tmp_path)
    slow = subprocess.Popen(
        command("-", *model_args, "--top", "1", "-o", output), stdin=subprocess.PIPE, text=True, env=env, cwd=REPO
    )
    try:
        slow.stdin.write(f"{sample_images[0]}\n")
        slow.stdin.flush()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not any(
            p.name.startswith(("shared.jsonl", ".shared.jsonl.")) and p.stat().st_size for p in tmp_path.iterdir()
        ):
            time.sleep(0.1)
        assert time.monotonic() < deadline, "the first run never wrote its first record"
        fast = subprocess.run(
            command(*sample_images[1:4], *model_args, "--top", "1", "-o", output), env=env, cwd=REPO, timeout=180
        )
        assert fast.returncode == 0
        assert [r["input"] for r in jsonl(output.read_text())] == [str(p) for p in sample_images[1:4]]
        slow.stdin.write(f"{sample_images[1]}\n")
        slow.stdin.close()
        assert slow.wait(timeout=120) == 0
    finally:
        slow.kill()
        slow.wait()
    records = jsonl(output.read_text())  # every line whole JSON
    assert [(r["input"], r["top"][0]["index"]) for r in records] == [
        (str(p), steered_resnet18.expected[p.name]) for p in sample_images[:2]
    ]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "torch_home") == ["shared.jsonl"]
