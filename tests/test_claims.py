"""Gaps found while verifying issues 9 and 16 line by line (notes/verification.md): claims whose
code line could be broken without any test failing. Real files, real links, a real loopback server."""

from __future__ import annotations

import json
import os

from test_cache import jsonl, run_cli
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
