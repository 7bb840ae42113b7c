"""Attacks on the weight cache (issue 9, 13, 16): links out of the folder, endless downloads, stale
partials, hostile records, file:// URLs, credentials in URLs, a live download's lock, empty caches.

Everything is real: symlinks, FIFOs, a loopback HTTP server, other processes holding real locks.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import REPO, env_without_resnet
from helpers import jsonl, run_cli
from test_cache import WeightFile, _tiny_checkpoint, cache_contents

ENDLESS_BOUND = 64 << 20  # the server gives up after this many bytes: a test that fails stays bounded


class _Handler(BaseHTTPRequestHandler):
    """/ok/NAME serves a file with its length; /endless/ANYTHING sends zeros with no length, until the
    client goes away or ENDLESS_BOUND; anything else is a 404. Authorization headers are kept."""

    server: _Server

    def log_message(self, format, *args):
        pass

    def do_GET(self):
        self.server.requests.append((self.path, self.headers.get("Authorization")))
        mode, _, name = self.path.lstrip("/").partition("/")
        if mode == "ok" and name in self.server.files:
            body = self.server.files[name]
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        if mode == "endless":
            self.send_response(200)
            self.send_header("Connection", "close")
            self.end_headers()
            chunk = bytes(64 << 10)
            try:
                while self.server.sent < ENDLESS_BOUND:
                    self.wfile.write(chunk)
                    self.server.sent += len(chunk)
            except OSError:
                pass  # the client stopped reading: what the cap is for
            self.close_connection = True
            return
        self.send_error(404)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    files: dict
    requests: list
    sent: int


@contextlib.contextmanager
def web_server():
    """A real HTTP server on 127.0.0.1 (see _Handler), stopped on exit."""
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.requests, httpd.sent = {}, [], 0
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()


@pytest.fixture
def web():
    with web_server() as httpd:
        yield httpd


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> WeightFile:
    """A ~150 kB checkpoint named as torchvision names its files (the same bytes as test_cache's)."""
    return _tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=1, stem="tiny")


def serve(web, weight_file: WeightFile) -> str:
    web.files[weight_file.name] = weight_file.data
    return f"{web.url}/ok/{weight_file.name}"


def cli_process(torch_home: Path, *args: str, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "resnetcli", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env_without_resnet(TORCH_HOME=str(torch_home), **env),
        timeout=timeout,
    )


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (links not followed) and its bytes: to show nothing there changed."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def link_message(path: Path) -> str:
    return (
        f"resnet: error: {path} is a symbolic link; resnetcli never follows links out of its cache folder: "
        "remove the link\n"
    )


@pytest.fixture
def cached_tiny(runner, app, web, tiny, checkpoint_dir) -> Path:
    """The tiny file fetched into the cache, with its record."""
    assert run_cli(runner, app, "fetch", "--url", serve(web, tiny)).exit_code == 0
    return checkpoint_dir / tiny.name


# ---------------------------------------------------------------------------------------------
# 1. The store never follows a link out of its folder


@pytest.mark.parametrize("command", [["cache", "verify"], ["cache", "list"], ["cache", "rm", "--all"], ["fetch"]])
def test_records_folder_that_is_a_link_is_refused_and_nothing_outside_is_touched(
    runner, app, web, tiny, checkpoint_dir, tmp_path, command
):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "precious.json").write_text('{"keep": true}')
    (elsewhere / f"{tiny.name}.json").write_text('{"sha256": "0", "size": 1}')
    before = tree(elsewhere)
    checkpoint_dir.mkdir(parents=True)
    (checkpoint_dir / tiny.name).write_bytes(tiny.data)
    os.symlink(elsewhere, checkpoint_dir / ".resnetcli")
    if command == ["fetch"]:
        command = ["fetch", "--url", serve(web, tiny), "--sha256", tiny.sha256]
        (checkpoint_dir / tiny.name).unlink()

    result = run_cli(runner, app, *command, "--format", "jsonl")
    assert result.exit_code == 3
    assert result.stderr == link_message(checkpoint_dir / ".resnetcli")
    assert tree(elsewhere) == before
    assert web.requests == []
    assert (checkpoint_dir / tiny.name).exists() == (command[0] != "fetch")  # nothing removed either


def test_lock_that_is_a_link_is_refused_and_its_target_kept(runner, app, web, tiny, checkpoint_dir, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("a user's file")
    (checkpoint_dir / ".resnetcli").mkdir(parents=True)
    lock = checkpoint_dir / ".resnetcli" / f"{tiny.name}.lock"
    os.symlink(victim, lock)

    result = run_cli(runner, app, "fetch", "--url", serve(web, tiny))
    assert result.exit_code == 3
    assert result.stderr == link_message(lock)
    assert web.requests == []
    assert victim.read_text() == "a user's file"
    assert not (checkpoint_dir / tiny.name).exists()


def test_rm_removes_links_in_the_cache_never_their_targets(runner, app, cached_tiny, checkpoint_dir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("weights.pth", "record.json", "partial.bin"):
        (outside / name).write_text(name)
    os.symlink(outside / "weights.pth", checkpoint_dir / "linked-weights.pth")
    os.symlink(outside / "record.json", checkpoint_dir / ".resnetcli" / "gone-12345678.pth.json")
    os.symlink(outside / "partial.bin", checkpoint_dir / f".{cached_tiny.name}.999999.1.partial")

    result = run_cli(runner, app, "cache", "rm", "--all", "--format", "jsonl")
    assert result.exit_code == 0, result.stderr
    assert sorted(r["file"] for r in jsonl(result.stdout)) == sorted(["linked-weights.pth", cached_tiny.name])
    assert os.listdir(checkpoint_dir) == [".resnetcli"] and os.listdir(checkpoint_dir / ".resnetcli") == []
    assert tree(outside) == {name: name.encode() for name in ("partial.bin", "record.json", "weights.pth")}


# ---------------------------------------------------------------------------------------------
# 3. Downloads are capped


def test_endless_body_stops_at_resnet_max_download_and_leaves_nothing(runner, app, web, checkpoint_dir, monkeypatch):
    monkeypatch.setenv("RESNET_MAX_DOWNLOAD", "1MiB")
    url = f"{web.url}/endless/huge-12345678.pth"
    result = run_cli(runner, app, "fetch", "--url", url)
    assert result.exit_code == 3
    assert result.stderr == (
        "resnet: downloading huge-12345678.pth\n"
        f"resnet: error: {url}: download stopped: the server sent more than RESNET_MAX_DOWNLOAD=1 MiB; "
        "the file was discarded\n"
    )
    assert cache_contents(checkpoint_dir) == []
    assert web.sent < ENDLESS_BOUND  # the client hung up; the server did not run into its own bound

    monkeypatch.setenv("RESNET_MAX_DOWNLOAD", "lots")
    bad = run_cli(runner, app, "fetch", "--url", url)
    assert bad.exit_code == 2
    assert bad.stderr == (
        "resnet: error: RESNET_MAX_DOWNLOAD=lots: expected a size in bytes such as 123456, 500MiB or 4GiB\n"
    )


def test_size_caps_a_url_download_before_and_while_reading(runner, app, web, tiny, checkpoint_dir):
    announced = run_cli(runner, app, "fetch", "--url", serve(web, tiny), "--size", "1000")
    assert announced.exit_code == 3
    assert announced.stderr == (
        f"resnet: error: {web.url}/ok/{tiny.name}: download refused: the server announces "
        f"{len(tiny.data) / 1024:.1f} KiB, more than the expected 1000 bytes\n"
    )
    endless = f"{web.url}/endless/huge-12345678.pth"
    result = run_cli(runner, app, "fetch", "--url", endless, "--size", "100KiB")
    assert result.exit_code == 3
    assert result.stderr.splitlines()[-1] + "\n" == (
        f"resnet: error: {endless}: download stopped: the server sent more than the expected 100 KiB; "
        "the file was discarded\n"
    )
    assert cache_contents(checkpoint_dir) == []
    exact = run_cli(runner, app, "fetch", "--url", serve(web, tiny), "--size", str(len(tiny.data)), "--format", "jsonl")
    assert exact.exit_code == 0, exact.stderr
    assert jsonl(exact.stdout)[0]["status"] == "downloaded"


def test_size_larger_than_the_free_disk_space_is_refused_before_downloading(runner, app, web, tiny, checkpoint_dir):
    result = run_cli(runner, app, "fetch", "--url", serve(web, tiny), "--size", "1000000GiB")
    assert result.exit_code == 3
    assert result.stderr.startswith(
        f"resnet: error: not enough free space in the weight cache folder {checkpoint_dir}: 1000000 GiB needed, "
    )
    assert web.requests == []


def test_torchvision_weights_are_capped_at_their_published_size(runner, app, web, checkpoint_dir):
    from torchvision.models import ResNet18_Weights

    published = ResNet18_Weights.IMAGENET1K_V1.meta["_file_size"]  # MiB, 3 decimals
    cap = published * 1.01 + 1 / 16  # 1% + 64 KiB of slack for the same tensors saved by another torch
    file_name = ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]
    result = run_cli(runner, app, "fetch", "resnet18:IMAGENET1K_V1", "--mirror", f"{web.url}/endless")
    assert result.exit_code == 3
    assert result.stderr.splitlines()[-1] == (
        f"resnet: error: {web.url}/endless/{file_name}: download stopped: the server sent more than the expected "
        f"{cap:.1f} MiB; the file was discarded"
    )
    assert web.sent < ENDLESS_BOUND
    assert cache_contents(checkpoint_dir) == []


# ---------------------------------------------------------------------------------------------
# 4. Stale partial files


def stale_partial(checkpoint_dir: Path, name: str, pid: int = 424242) -> Path:
    """A partial file as a download killed mid-way leaves it."""
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    partial = checkpoint_dir / f".{name}.{pid}.1.partial"
    partial.write_bytes(b"half a file")
    return partial


@pytest.mark.parametrize("how", ["download", "import"])
def test_every_install_clears_stale_partials_of_its_name(runner, app, web, tiny, checkpoint_dir, how):
    stale = stale_partial(checkpoint_dir, tiny.name)
    other = stale_partial(checkpoint_dir, "other-12345678.pth")
    source = ["--url", serve(web, tiny)] if how == "download" else ["--from-file", tiny.path]
    result = run_cli(runner, app, "fetch", *source, "--format", "jsonl")
    assert result.exit_code == 0, result.stderr
    assert not stale.exists()
    assert other.exists()  # another name's partial is that name's business
    assert cache_contents(checkpoint_dir) == sorted([f".resnetcli/{tiny.name}.json", other.name, tiny.name])


def test_verify_reports_stale_partials_and_rm_partials_removes_them(runner, app, cached_tiny, checkpoint_dir):
    stale = stale_partial(checkpoint_dir, "resnet18-f37072fd.pth")
    result = run_cli(runner, app, "cache", "verify", "--format", "jsonl")
    assert result.exit_code == 0, result.stderr
    assert jsonl(result.stdout)[-1] == {
        "file": stale.name,
        "size": len(b"half a file"),
        "sha256": None,
        "status": "stale partial",
        "problem": "left by an interrupted download of resnet18-f37072fd.pth; "
        "remove it with `resnet cache rm --partials`",
        "path": str(stale),
    }
    assert result.stderr == (
        f"resnet: warning: {stale}: stale partial file (left by an interrupted download of resnet18-f37072fd.pth; "
        "remove it with `resnet cache rm --partials`)\n"
    )
    removed = run_cli(runner, app, "cache", "rm", "--partials", "--format", "jsonl")
    assert removed.exit_code == 0, removed.stderr
    assert jsonl(removed.stdout) == [{"file": stale.name, "size": 11, "status": "removed", "path": str(stale)}]
    assert cache_contents(checkpoint_dir) == [f".resnetcli/{cached_tiny.name}.json", cached_tiny.name]
    assert run_cli(runner, app, "cache", "rm", "--partials", cached_tiny.name).exit_code == 2


# ---------------------------------------------------------------------------------------------
# A live download's lock (issue 16) and the locks of failed ones (issue 13)


class HeldLock:
    """Another process holding a file's lock in the cache, as a download in progress does."""

    def __init__(self, lock: Path):
        code = (
            "import sys, filelock; lock = filelock.FileLock(sys.argv[1]); lock.acquire(); "
            "print('held', flush=True); sys.stdin.read()"
        )
        self.process = subprocess.Popen(
            [sys.executable, "-c", code, str(lock)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert self.process.stdout.readline() == "held\n"

    def release(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=30)


def test_rm_all_leaves_a_download_in_progress_alone_and_removes_dead_locks(runner, app, web, tiny, checkpoint_dir):
    failed = run_cli(runner, app, "fetch", "--url", f"{web.url}/missing/{tiny.name}")
    assert failed.exit_code == 3
    dead_lock = checkpoint_dir / ".resnetcli" / f"{tiny.name}.lock"
    assert dead_lock.exists()  # what a failed download leaves behind
    live = "live-12345678.pth"
    live_lock = checkpoint_dir / ".resnetcli" / f"{live}.lock"
    holder = HeldLock(live_lock)
    try:
        partial = stale_partial(checkpoint_dir, live, pid=holder.process.pid)
        for command in (["cache", "rm", "--all"], ["cache", "rm", "--partials"], ["cache", "verify"]):
            result = run_cli(runner, app, *command, "--format", "jsonl")
            assert result.exit_code == 0, result.stderr
            assert jsonl(result.stdout) == []
            assert partial.read_bytes() == b"half a file" and live_lock.exists()
        assert not dead_lock.exists()
    finally:
        holder.release()
    result = run_cli(runner, app, "cache", "rm", "--all", "--format", "jsonl")
    assert result.exit_code == 0, result.stderr
    assert not partial.exists() and not live_lock.exists()
    assert os.listdir(checkpoint_dir / ".resnetcli") == []


# ---------------------------------------------------------------------------------------------
# 12. Records: small regular files only


def test_record_that_is_a_fifo_is_corrupt_and_never_read(cached_tiny, checkpoint_dir):
    record = checkpoint_dir / ".resnetcli" / f"{cached_tiny.name}.json"
    record.unlink()
    os.mkfifo(record)
    home = checkpoint_dir.parent.parent
    listed = cli_process(home, "cache", "list", "--format", "jsonl", timeout=60)  # hung for ever before
    assert listed.returncode == 0, listed.stderr
    assert jsonl(listed.stdout)[0]["sha256"] is None  # not trusted
    assert listed.stderr == (
        f"resnet: warning: {cached_tiny}: its record .resnetcli/{cached_tiny.name}.json is corrupt: "
        f"it is not a regular file; `resnet cache verify {cached_tiny.name}` checks the file and rewrites it\n"
    )
    verified = cli_process(home, "cache", "verify", "--format", "jsonl", timeout=60)
    assert verified.returncode == 0, verified.stderr
    assert jsonl(verified.stdout)[0]["status"] == "ok"
    assert json.loads(record.read_text())["size"] == cached_tiny.stat().st_size  # replaced by a sound record


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[" * 3000, "it is nested too deeply"),
        ("[" * 100_000, "it is larger than 4096 bytes"),
        ('{"sha256": 1}', "it lacks a sha256 and a size"),
        ("{", "it is not valid JSON"),
    ],
)
def test_hostile_record_is_corrupt_everywhere_and_repaired_from_the_file_name(
    runner, app, web, tiny, cached_tiny, checkpoint_dir, text, problem
):
    record = checkpoint_dir / ".resnetcli" / f"{cached_tiny.name}.json"
    record.write_text(text)
    listed = run_cli(runner, app, "cache", "list", "--format", "jsonl")
    assert listed.exit_code == 0
    assert f"its record .resnetcli/{tiny.name}.json is corrupt: {problem};" in listed.stderr
    offline = run_cli(runner, app, "fetch", "--url", serve(web, tiny), "--offline", "--format", "jsonl")
    assert offline.exit_code == 0, offline.stderr
    assert jsonl(offline.stdout)[0]["status"] == "already cached"
    assert json.loads(record.read_text())["sha256"] == tiny.sha256  # rewritten after a full hash


def test_record_of_a_file_without_a_hash_in_its_name_cannot_vouch_when_corrupt(runner, app, checkpoint_dir):
    (checkpoint_dir / ".resnetcli").mkdir(parents=True)
    (checkpoint_dir / "notes.pth").write_bytes(b"mine")
    os.mkfifo(checkpoint_dir / ".resnetcli" / "notes.pth.json")
    result = run_cli(runner, app, "cache", "verify", "--format", "jsonl")
    assert result.exit_code == 3
    assert [(r["status"], r["problem"]) for r in jsonl(result.stdout)] == [
        ("corrupt", "its record .resnetcli/notes.pth.json is corrupt: it is not a regular file")
    ]


# ---------------------------------------------------------------------------------------------
# URLs: http(s) only, credentials never shown


def test_fetch_url_refuses_file_urls(runner, app, tmp_path, checkpoint_dir):
    secret = tmp_path / "secret-12345678.pth"
    secret.write_bytes(b"a local file a URL must not read")
    digest = __import__("hashlib").sha256(secret.read_bytes()).hexdigest()
    for url in (secret.as_uri(), f"ftp://127.0.0.1/{secret.name}"):
        result = run_cli(runner, app, "fetch", "--url", url, "--sha256", digest)
        assert result.exit_code == 2
        assert result.stderr == f"resnet: error: --url {url}: only http:// and https:// URLs are downloaded\n"
    assert cache_contents(checkpoint_dir) == []


def test_credentials_in_a_url_are_sent_but_never_shown(runner, app, web, tiny, checkpoint_dir):
    host = web.url.removeprefix("http://")
    url = f"http://alice:s3cret@{host}/ok/{tiny.name}"
    serve(web, tiny)
    shown = f"http://***@{host}/ok/{tiny.name}"
    result = run_cli(runner, app, "fetch", "--url", url, "--format", "jsonl")
    assert result.exit_code == 0, result.stderr
    assert web.requests == [(f"/ok/{tiny.name}", "Basic " + base64.b64encode(b"alice:s3cret").decode())]
    assert jsonl(result.stdout)[0]["name"] == shown
    listed = run_cli(runner, app, "cache", "list", "--format", "json")
    assert json.loads(listed.stdout)[0]["source"] == shown
    missing = run_cli(runner, app, "fetch", "--url", f"http://alice:s3cret@{host}/nothing/gone-12345678.pth")
    assert missing.stderr == (
        f"resnet: error: http://***@{host}/nothing/gone-12345678.pth: download failed: HTTP 404 Not Found\n"
    )
    everything = result.stdout + result.stderr + listed.stdout + missing.stdout + missing.stderr
    assert "s3cret" not in everything + "".join(tree(checkpoint_dir.parent).keys()) + str(tree(checkpoint_dir))


# ---------------------------------------------------------------------------------------------
# RESNET_OFFLINE (issue 16)


@pytest.mark.parametrize("value", ["1", "true", "yes", "on", "TRUE", " On "])
def test_resnet_offline_accepts_the_usual_true_words(runner, app, web, tiny, checkpoint_dir, monkeypatch, value):
    monkeypatch.setenv("RESNET_OFFLINE", value)
    result = run_cli(runner, app, "fetch", "--url", serve(web, tiny))
    assert result.exit_code == 3
    assert "downloads are off (offline mode)" in result.stderr
    assert web.requests == []


@pytest.mark.parametrize("value", ["0", "false", "no", "off", "", "OFF"])
def test_resnet_offline_false_words_mean_online(runner, app, web, tiny, checkpoint_dir, monkeypatch, value):
    monkeypatch.setenv("RESNET_OFFLINE", value)
    result = run_cli(runner, app, "fetch", "--url", serve(web, tiny), "--format", "jsonl")
    assert result.exit_code == 0, result.stderr
    assert jsonl(result.stdout)[0]["status"] == "downloaded"


def test_resnet_offline_with_another_word_is_a_usage_error(runner, app, web, tiny, monkeypatch):
    monkeypatch.setenv("RESNET_OFFLINE", "maybe")
    result = run_cli(runner, app, "fetch", "--url", serve(web, tiny))
    assert result.exit_code == 2
    assert result.stderr == "resnet: error: RESNET_OFFLINE=maybe: expected 1, true, yes or on (or 0, false, no, off)\n"
