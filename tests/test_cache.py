"""The weight cache a batch job can trust: `resnet fetch` and `resnet cache list|verify|rm`.

Every network test talks to a real HTTP server on 127.0.0.1 that misbehaves on request (wrong
bytes, a body cut short, a stall, silence, 404, slowness); concurrency, SIGKILL, Ctrl-C and a write
failure are real subprocesses of `python -m resnetcli`.
"""

from __future__ import annotations

import csv
import io
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import REPO, env_without_resnet, save_hub_style, sha256_file
from helpers import jsonl, run_cli, run_on_terminal
from readonly_cache import first_way, run_cli_read_only


def cache_contents(folder: Path) -> list[str]:
    """Every file in the cache folder except lock files (which hold no data and are never trusted)."""
    if not folder.exists():
        return []
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and not p.name.endswith(".lock"))


def hub_prefix(file_name: str) -> str:
    """The hash part of a torchvision file name or URL: `.../resnet18-f37072fd.pth` gives `f37072fd`."""
    return file_name.rsplit("-", 1)[1].split(".")[0]


def partials_in(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.partial")) if folder.exists() else []


# ---------------------------------------------------------------------------------------------
# Weight files and a server that misbehaves on request


@dataclass
class WeightFile:
    path: Path
    data: bytes
    sha256: str

    @property
    def name(self) -> str:
        return self.path.name


def _tiny_checkpoint(folder: Path, seed: int, stem: str) -> WeightFile:
    import torch

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 64, 3), torch.nn.Conv2d(64, 64, 3))
    path = save_hub_style(model.state_dict(), folder, stem)
    return WeightFile(path, path.read_bytes(), sha256_file(path))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> WeightFile:
    """A ~150 kB random-init checkpoint named as torchvision names its files: tiny-<sha256 prefix>.pth."""
    return _tiny_checkpoint(tmp_path_factory.mktemp("tiny"), seed=1, stem="tiny")


@pytest.fixture(scope="session")
def impostor(tmp_path_factory) -> WeightFile:
    """Another checkpoint of the same size: what a compromised or broken server might send."""
    return _tiny_checkpoint(tmp_path_factory.mktemp("impostor"), seed=2, stem="impostor")


class _Handler(BaseHTTPRequestHandler):
    """GET /MODE/NAME serves the file NAME the way MODE says (see FlakyServer)."""

    server: _Server

    def log_message(self, format, *args):
        pass

    def do_GET(self):
        mode, _, name = self.path.lstrip("/").partition("/")
        with self.server.lock:
            self.server.gets[self.path] += 1
        self.server.gate.wait(60)  # open unless a test holds answers back
        body = self.server.files.get(name)
        if body is None or mode not in FlakyServer.MODES:
            self.send_error(404)
            return
        if mode == "silent":
            self.server.release.wait(30)
            return
        if mode == "wrong":
            body = self.server.wrong_body
        try:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if mode in ("short", "stall"):
                self.wfile.write(body[: len(body) // 2])
                self.wfile.flush()
                if mode == "stall":
                    self.server.release.wait(30)
                return  # "short": the connection closes with half the promised bytes sent.
            if mode == "slow":
                pieces = 16
                step = -(-len(body) // pieces)
                for start in range(0, len(body), step):
                    self.wfile.write(body[start : start + step])
                    self.wfile.flush()
                    time.sleep(self.server.slow_seconds / pieces)
                return
            self.wfile.write(body)
        except (ConnectionError, OSError):
            pass  # The client went away (killed, interrupted, timed out): nothing to do.


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    files: dict
    wrong_body: bytes
    gets: Counter
    lock: threading.Lock
    release: threading.Event
    gate: threading.Event
    slow_seconds: float


@dataclass
class FlakyServer:
    """A real HTTP server on 127.0.0.1.

    /ok/NAME serves NAME; /wrong/NAME other bytes; /short/NAME half the bytes, then closes;
    /stall/NAME half the bytes, then nothing; /silent/NAME never answers; /slow/NAME takes
    `slow_seconds`; any other path is a 404. `gets` counts GET requests per path. While `gate` is
    clear, every answer waits (the request is counted first).
    """

    MODES = ("ok", "wrong", "short", "stall", "silent", "slow")
    server: _Server
    url: str
    gets: Counter = field(default_factory=Counter)

    def add(self, weight_file: WeightFile, name: str | None = None) -> str:
        self.server.files[name or weight_file.name] = weight_file.data
        return name or weight_file.name

    def file_url(self, mode: str, name: str) -> str:
        return f"{self.url}/{mode}/{name}"


@pytest.fixture
def server(impostor):
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.files, httpd.wrong_body, httpd.gets = {}, impostor.data, Counter()
    httpd.lock, httpd.release, httpd.slow_seconds = threading.Lock(), threading.Event(), 2.0
    httpd.gate = threading.Event()
    httpd.gate.set()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield FlakyServer(httpd, f"http://127.0.0.1:{httpd.server_address[1]}", httpd.gets)
    httpd.release.set()
    httpd.shutdown()
    httpd.server_close()


def refused_url(name: str) -> str:
    """A URL on a 127.0.0.1 port with nothing listening."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


def fetch_process(url: str, torch_home: Path, *extra: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "resnetcli", "fetch", "--url", url, "--format", "jsonl", *extra],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env_without_resnet(TORCH_HOME=str(torch_home), **env),
    )


def wait_for_partial_data(folder: Path, process: subprocess.Popen, seconds: float = 20) -> Path:
    """Wait until a download has written bytes to its partial file in the cache folder."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for partial in partials_in(folder):
            if partial.stat().st_size > 0:
                return partial
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    raise AssertionError(f"no partial download appeared in {folder}")


# ---------------------------------------------------------------------------------------------
# fetch --url: the summary in every format


def test_fetch_url_downloads_verified_file_and_reports_it_in_every_format(runner, app, server, tiny, checkpoint_dir):
    name = server.add(tiny)
    url = server.file_url("ok", name)
    result = run_cli(runner, app, "fetch", "--url", url, "--format", "jsonl")
    assert result.exit_code == 0, result.stderr
    cached = checkpoint_dir / tiny.name
    assert jsonl(result.stdout) == [
        {
            "name": url,
            "file": tiny.name,
            "size": len(tiny.data),
            "sha256": tiny.sha256,
            "path": str(cached),
            "status": "downloaded",
        }
    ]
    assert cached.read_bytes() == tiny.data
    assert f"resnet: downloading {tiny.name}" in result.stderr  # progress on stderr only
    assert cache_contents(checkpoint_dir) == [f".resnetcli/{tiny.name}.json", tiny.name]

    # Again, in each other format: served from the cache, no second download.
    again = {
        fmt: run_cli(runner, app, "fetch", "--url", url, "--format", fmt) for fmt in ("json", "csv", "tsv", "table")
    }
    assert {fmt: r.exit_code for fmt, r in again.items()} == {"json": 0, "csv": 0, "tsv": 0, "table": 0}
    fields = {
        "name": url,
        "file": tiny.name,
        "size": len(tiny.data),
        "sha256": tiny.sha256,
        "path": str(cached),
        "status": "already cached",
    }
    assert json.loads(again["json"].stdout) == [fields]
    text_row = {**{key: str(value) for key, value in fields.items()}, "error": ""}
    assert list(csv.DictReader(io.StringIO(again["csv"].stdout))) == [text_row]
    assert list(csv.DictReader(io.StringIO(again["tsv"].stdout), delimiter="\t")) == [text_row]
    table = again["table"].stdout
    assert tiny.name in table and "already cached" in table and tiny.sha256 in table
    assert server.gets == Counter({f"/ok/{name}": 1})


def test_fetch_url_needs_a_hash_from_sha256_or_the_file_name(runner, app, server, tiny, checkpoint_dir):
    name = server.add(tiny, "finetuned.pth")
    url = server.file_url("ok", name)

    unverifiable = run_cli(runner, app, "fetch", "--url", url)
    assert unverifiable.exit_code == 3
    assert (
        unverifiable.stderr == f"resnet: error: {url}: no sha256 to verify against: "
        "pass --sha256 or use a NAME-<sha256 prefix>.pth file name\n"
    )
    assert server.gets == Counter()  # refused before any download

    bad_argument = run_cli(runner, app, "fetch", "--url", url, "--sha256", "not-hex")
    assert bad_argument.exit_code == 2
    assert bad_argument.stderr == "resnet: error: --sha256 not-hex: expected 8 to 64 hexadecimal digits\n"

    fetched = run_cli(runner, app, "fetch", "--url", url, "--sha256", tiny.sha256.upper(), "--format", "json")
    assert fetched.exit_code == 0, fetched.stderr
    assert json.loads(fetched.stdout)[0]["status"] == "downloaded"
    assert (checkpoint_dir / "finetuned.pth").read_bytes() == tiny.data

    # A cached file that is not the one asked for is reported, not silently used.
    other = run_cli(runner, app, "fetch", "--url", url, "--sha256", "0" * 64)
    assert other.exit_code == 3
    assert (
        f"{checkpoint_dir / 'finetuned.pth'}: cached file has sha256 {tiny.sha256[:16]}..., not the expected"
        in other.stderr
    )


# ---------------------------------------------------------------------------------------------
# Failed downloads: one line naming the URL, exit 3, nothing left in the cache


@pytest.mark.parametrize("mode", ["wrong", "short", "stall", "silent", "404", "refused"])
def test_failed_download_is_one_line_naming_the_url_and_leaves_nothing(
    runner, app, server, tiny, impostor, checkpoint_dir, monkeypatch, mode
):
    name = server.add(tiny)
    size = len(tiny.data)
    url = {"404": f"{server.url}/ok/missing-0123abcd.pth", "refused": refused_url(name)}.get(mode) or server.file_url(
        mode, name
    )
    unreachable = (
        f"where the network is unreachable, copy the file in with `resnet fetch --from-file PATH --url {url}`"
        " and use --offline"
    )
    expected_message = {
        "wrong": f"{url}: sha256 mismatch: expected {tiny.sha256[:8]}..., got {impostor.sha256[:16]}..."
        "; the file was discarded",
        "short": f"{url}: download incomplete: got {size // 2} of {size} bytes",
        "stall": f"{url}: download stalled: no data for 1 s",
        # issue 13: when no server answers, the message names the next step
        "silent": f"{url}: download failed: no answer within 1 s; {unreachable}",
        "404": f"{url}: download failed: HTTP 404 Not Found",
        "refused": f"{url}: download failed: Connection refused; {unreachable}",
    }[mode]
    if mode == "silent":
        monkeypatch.setenv("RESNET_TIMEOUT", "1")  # the variable, for one case; --timeout for the others
        options = []
    else:
        options = ["--timeout", "1"]
    started = time.monotonic()
    result = run_cli(runner, app, "fetch", "--url", url, *options, "--format", "jsonl")
    assert time.monotonic() - started < 10
    assert result.exit_code == 3
    lines = result.stderr.splitlines()
    assert [line for line in lines if not line.startswith("resnet: downloading ")] == [
        f"resnet: error: {expected_message}"
    ]
    assert jsonl(result.stdout) == [{"name": url, "error": expected_message}]
    assert cache_contents(checkpoint_dir) == []


def test_batch_goes_on_after_a_failed_file(runner, app, server, tiny, checkpoint_dir):
    url = server.file_url("ok", server.add(tiny))
    misspelt = run_cli(runner, app, "fetch", "resnt18", "--url", url)
    assert misspelt.exit_code == 2  # names are all checked before anything is fetched
    assert server.gets == Counter()

    assert run_cli(runner, app, "fetch", "--url", url).exit_code == 0
    result = run_cli(runner, app, "fetch", "resnet18", "--url", url, "--offline", "--format", "jsonl")
    assert result.exit_code == 3
    records = jsonl(result.stdout)
    assert [r["name"] for r in records] == ["resnet18:IMAGENET1K_V1", url]
    assert "is not in the weight cache" in records[0]["error"] and records[1]["status"] == "already cached"
    assert result.stderr.splitlines()[0].startswith("resnet: error: resnet18-")
    assert len([line for line in result.stderr.splitlines() if "error" in line]) == 1


def test_url_without_a_file_name_is_refused(runner, app, server, checkpoint_dir):
    for url in (f"{server.url}/", f"{server.url}/ok/.resnetcli"):
        result = run_cli(runner, app, "fetch", "--url", url, "--sha256", "0" * 64)
        assert result.exit_code == 3
        assert result.stderr == f"resnet: error: {url}: the URL does not end in a file name\n"
    assert server.gets == Counter()


def test_downloaded_checkpoint_that_would_run_code_is_refused(runner, app, server, tmp_path, sample_images):
    """The hash proves the file is the one published, not that it is safe: loading stays weights_only."""
    import torch

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    crafted = save_hub_style({"fc.weight": Exploit()}, tmp_path / "served", "evil")
    name = server.add(WeightFile(crafted, crafted.read_bytes(), sha256_file(crafted)))
    url = server.file_url("ok", name)
    result = run_cli(runner, app, "predict", sample_images[0], "--arch", "resnet18", "--weights", url)
    assert result.exit_code == 3
    assert f"resnet: error: {torch.hub.get_dir()}/checkpoints/{name}: refused to load" in result.stderr
    assert not marker.exists()


def test_bad_timeout_is_a_usage_error(runner, app, server, tiny, monkeypatch):
    url = server.file_url("ok", server.add(tiny))
    result = run_cli(runner, app, "fetch", "--url", url, "--timeout", "0")
    assert result.exit_code == 2
    assert result.stderr == "resnet: error: the network timeout must be a positive number of seconds, not 0\n"
    monkeypatch.setenv("RESNET_TIMEOUT", "soon")
    result = run_cli(runner, app, "fetch", "--url", url)
    assert result.exit_code == 2
    assert result.stderr == "resnet: error: RESNET_TIMEOUT=soon: not a number of seconds\n"
    assert server.gets == Counter()


# ---------------------------------------------------------------------------------------------
# Offline and mirror


def test_offline_fails_at_once_naming_file_and_fetch_command(runner, app, server, tiny, checkpoint_dir, monkeypatch):
    name = server.add(tiny)
    monkeypatch.setenv("RESNET_MIRROR", f"{server.url}/ok")  # were the network touched, the server would see it
    from torchvision.models import ResNet18_Weights

    file_name = ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]
    started = time.monotonic()
    result = run_cli(runner, app, "fetch", "resnet18", "--offline")
    assert result.exit_code == 3
    assert result.stderr == (
        f"resnet: error: {file_name} is not in the weight cache {checkpoint_dir} and downloads are off (offline mode); "
        "get it with `resnet fetch resnet18:IMAGENET1K_V1` where the network is reachable, "
        "or copy it in with `resnet fetch --from-file PATH resnet18:IMAGENET1K_V1`\n"
    )

    monkeypatch.setenv("RESNET_OFFLINE", "1")
    url = server.file_url("ok", name)
    result = run_cli(runner, app, "fetch", "--url", url)
    assert result.exit_code == 3
    assert f"{tiny.name} is not in the weight cache" in result.stderr
    assert (
        f"`resnet fetch --url {url}` where the network is reachable, "
        f"or copy it in with `resnet fetch --from-file PATH --url {url}`" in result.stderr
    )
    assert time.monotonic() - started < 5
    assert server.gets == Counter()
    assert cache_contents(checkpoint_dir) == []


def test_mirror_replaces_torchvisions_host_but_not_a_users_url(
    runner, app, server, tiny, impostor, checkpoint_dir, monkeypatch, steered_resnet18, sample_images
):
    from torchvision.models import ResNet18_Weights

    file_name = ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]
    server.add(impostor, file_name)  # the mirror has a file by that name, but not torchvision's bytes
    mirror = f"{server.url}/ok/"
    monkeypatch.setenv("RESNET_MIRROR", mirror)
    result = run_cli(runner, app, "fetch", "resnet18:IMAGENET1K_V1")
    assert result.exit_code == 3
    assert (
        f"resnet: error: {server.url}/ok/{file_name}: sha256 mismatch: expected {hub_prefix(file_name)}..."
        in result.stderr
    )
    assert server.gets == Counter({f"/ok/{file_name}": 1})
    assert cache_contents(checkpoint_dir) == []

    # --mirror wins over the variable.
    result = run_cli(runner, app, "fetch", "resnet18:IMAGENET1K_V1", "--mirror", f"{server.url}/wrong")
    assert result.exit_code == 3
    assert f"resnet: error: {server.url}/wrong/{file_name}: sha256 mismatch" in result.stderr
    assert server.gets == Counter({f"/ok/{file_name}": 1, f"/wrong/{file_name}": 1})

    # A user's own URL (fetch --url, predict --weights URL) is fetched as given.
    name = server.add(tiny)
    result = run_cli(runner, app, "fetch", "--url", server.file_url("ok", name), "--mirror", refused_url(""))
    assert result.exit_code == 0, result.stderr
    assert (checkpoint_dir / tiny.name).read_bytes() == tiny.data
    steered = server.add(
        WeightFile(steered_resnet18.path, steered_resnet18.path.read_bytes(), sha256_file(steered_resnet18.path))
    )
    url = server.file_url("ok", steered)
    result = run_cli(
        runner, app, "predict", sample_images[0], "--arch", "resnet18", "--weights", url, "--format", "jsonl"
    )
    assert result.exit_code == 0, result.stderr
    assert jsonl(result.stdout)[0]["top"][0]["index"] == steered_resnet18.expected[sample_images[0].name]
    assert server.gets[f"/ok/{steered}"] == 1


# ---------------------------------------------------------------------------------------------
# --from-file: the air-gapped case


def test_from_file_imports_only_verified_files(runner, app, server, tiny, impostor, checkpoint_dir, tmp_path):
    from torchvision.models import ResNet18_Weights

    # A file carried in under torchvision's name is checked against torchvision's hash.
    carried = tmp_path / "carried.pth"
    carried.write_bytes(impostor.data)
    refused = run_cli(runner, app, "fetch", "--from-file", carried, "resnet18:IMAGENET1K_V1")
    assert refused.exit_code == 3
    prefix = hub_prefix(ResNet18_Weights.IMAGENET1K_V1.url)
    assert refused.stderr == (
        f"resnet: error: {carried}: sha256 mismatch: expected {prefix}..., got {impostor.sha256[:16]}..."
        "; not imported\n"
    )
    assert cache_contents(checkpoint_dir) == []

    # A hub-style name verifies itself; the file then serves its URL offline.
    imported = run_cli(runner, app, "fetch", "--from-file", tiny.path, "--format", "jsonl")
    assert imported.exit_code == 0, imported.stderr
    assert jsonl(imported.stdout) == [
        {
            "name": str(tiny.path),
            "file": tiny.name,
            "size": len(tiny.data),
            "sha256": tiny.sha256,
            "path": str(checkpoint_dir / tiny.name),
            "status": "imported",
        }
    ]
    name = server.add(tiny)
    offline = run_cli(runner, app, "fetch", "--url", server.file_url("ok", name), "--offline", "--format", "jsonl")
    assert offline.exit_code == 0, offline.stderr
    assert jsonl(offline.stdout)[0]["status"] == "already cached"

    # Under the name of a --url, with --sha256 for a name that carries no hash.
    url = f"{server.url}/ok/finetuned.pth"
    no_hash = run_cli(runner, app, "fetch", "--from-file", carried, "--url", url)
    assert no_hash.exit_code == 3 and "no sha256 to verify against" in no_hash.stderr
    wrong = run_cli(runner, app, "fetch", "--from-file", carried, "--url", url, "--sha256", tiny.sha256)
    assert wrong.exit_code == 3 and "sha256 mismatch" in wrong.stderr
    assert not (checkpoint_dir / "finetuned.pth").exists()
    right = run_cli(
        runner, app, "fetch", "--from-file", carried, "--url", url, "--sha256", impostor.sha256[:12], "--format", "json"
    )
    assert right.exit_code == 0, right.stderr
    assert (checkpoint_dir / "finetuned.pth").read_bytes() == impostor.data
    assert server.gets == Counter()  # imports never touch the network
    assert partials_in(checkpoint_dir) == []

    assert (
        run_cli(runner, app, "fetch", "--from-file", tmp_path / "nope.pth").stderr
        == f"resnet: error: --from-file {tmp_path / 'nope.pth'}: no such file\n"
    )
    assert run_cli(runner, app, "fetch", "--from-file", carried, "resnet18", "resnet50").exit_code == 2


# ---------------------------------------------------------------------------------------------
# A cached file altered after download


def test_truncated_or_altered_cached_file_is_caught_before_loading(
    runner, app, server, tiny, checkpoint_dir, sample_images
):
    name = server.add(tiny)
    url = server.file_url("ok", name)
    assert run_cli(runner, app, "fetch", "--url", url).exit_code == 0
    cached = checkpoint_dir / tiny.name

    cached.write_bytes(tiny.data[:-1000])  # truncated (a full disk, a killed copy)
    corrupt_size = (
        f"{cached}: cached file is corrupt ({len(tiny.data) - 1000} bytes, {len(tiny.data)} expected)"
        f"; remove it with `resnet cache rm {tiny.name}` and fetch it again"
    )
    for args in (["predict", sample_images[0], "--arch", "resnet18", "--weights", url], ["fetch", "--url", url]):
        result = run_cli(runner, app, *args)
        assert result.exit_code == 3
        assert result.stderr.splitlines()[-1] == f"resnet: error: {corrupt_size}"  # the cache's check, not torch.load's

    altered = bytearray(tiny.data)
    altered[len(altered) // 2] ^= 0xFF  # same size, new modification time
    cached.write_bytes(bytes(altered))
    result = run_cli(runner, app, "predict", sample_images[0], "--arch", "resnet18", "--weights", url)
    assert result.exit_code == 3
    altered_sha = sha256_file(cached)
    assert result.stderr == (
        f"resnet: error: {cached}: cached file is corrupt (sha256 {altered_sha[:12]}..., "
        f"{tiny.sha256[:12]}... was recorded); "
        f"remove it with `resnet cache rm {tiny.name}` and fetch it again\n"
    )
    assert server.gets == Counter({f"/ok/{name}": 1})


def test_bad_file_torchvision_left_in_the_cache_is_caught_before_loading(
    runner, app, impostor, checkpoint_dir, sample_images
):
    """torch.hub can accept a truncated download; a file without resnetcli's record is hashed in full before use."""
    from torchvision.models import ResNet18_Weights

    file_name = ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]
    checkpoint_dir.mkdir(parents=True)
    (checkpoint_dir / file_name).write_bytes(impostor.data)
    result = run_cli(
        runner, app, "predict", sample_images[0], "--arch", "resnet18", "--weights", "IMAGENET1K_V1", "--offline"
    )
    assert result.exit_code == 3
    assert result.stderr == (
        f"resnet: error: {checkpoint_dir / file_name}: cached file is corrupt (sha256 {impostor.sha256[:12]}..., "
        f"expected {hub_prefix(file_name)}...); "
        f"remove it with `resnet cache rm {file_name}` and fetch it again\n"
    )


def test_verify_hashes_every_file_in_full(runner, app, server, tiny, impostor, checkpoint_dir):
    from torchvision.models import ResNet18_Weights

    name = server.add(tiny)
    assert run_cli(runner, app, "fetch", "--url", server.file_url("ok", name)).exit_code == 0
    # A file torchvision itself downloaded (no record): its name holds the hash to check against.
    impostor_name = ResNet18_Weights.IMAGENET1K_V1.url.rsplit("/", 1)[1]
    (checkpoint_dir / impostor_name).write_bytes(impostor.data)
    (checkpoint_dir / "notes.pth").write_bytes(b"no hash anywhere")

    result = run_cli(runner, app, "cache", "verify", "--format", "jsonl")
    assert result.exit_code == 3
    records = {r["file"]: r for r in jsonl(result.stdout)}
    assert {f: r["status"] for f, r in records.items()} == {
        tiny.name: "ok",
        impostor_name: "corrupt",
        "notes.pth": "unverifiable",
    }
    assert records[tiny.name]["sha256"] == tiny.sha256
    assert (
        result.stderr.splitlines()
        == [  # one line per file that is not ok, in file-name order
            f"resnet: warning: {checkpoint_dir / 'notes.pth'}: cannot be verified "
            "(no recorded sha256 and none in the file name)",
            f"resnet: error: {checkpoint_dir / impostor_name}: corrupt (sha256 {impostor.sha256[:12]}..., "
            f"the file name says {hub_prefix(impostor_name)}); "
            f"remove it with `resnet cache rm {impostor_name}` and fetch it again",
        ]
    )

    # Altered with its size and modification time kept: only a full hash sees it.
    cached = checkpoint_dir / tiny.name
    stat = cached.stat()
    altered = bytearray(tiny.data)
    altered[100] ^= 0x01
    cached.write_bytes(bytes(altered))
    os.utime(cached, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    result = run_cli(runner, app, "cache", "verify", tiny.name, "--format", "json")
    assert result.exit_code == 3
    assert [r["status"] for r in json.loads(result.stdout)] == ["corrupt"]
    assert result.stderr.startswith(
        f"resnet: error: {cached}: corrupt (sha256 {sha256_file(cached)[:12]}..., {tiny.sha256[:12]}... recorded)"
    )

    cached.write_bytes(tiny.data)
    clean = run_cli(runner, app, "cache", "verify", tiny.name, "--format", "csv")
    assert clean.exit_code == 0 and clean.stderr == ""
    assert list(csv.DictReader(io.StringIO(clean.stdout)))[0]["status"] == "ok"
    missing = run_cli(runner, app, "cache", "verify", "gone.pth")
    assert missing.exit_code == 1
    assert missing.stderr == f"resnet: error: gone.pth: not in the weight cache {checkpoint_dir}\n"


# ---------------------------------------------------------------------------------------------
# cache list and cache rm


def test_cache_list_names_the_weights_each_file_belongs_to(runner, app, server, tiny, checkpoint_dir):
    from torchvision.models import ResNet18_Weights, ResNet50_Weights

    empty = run_cli(runner, app, "cache", "list", "--format", "json")
    assert empty.exit_code == 0 and json.loads(empty.stdout) == []

    name = server.add(tiny)
    url = server.file_url("ok", name)
    assert run_cli(runner, app, "fetch", "--url", url).exit_code == 0
    files = {
        w.url.rsplit("/", 1)[1]: f"{arch}:{w.name}"
        for arch, w in (("resnet18", ResNet18_Weights.IMAGENET1K_V1), ("resnet50", ResNet50_Weights.IMAGENET1K_V2))
    }
    for file_name in files:
        (checkpoint_dir / file_name).write_bytes(b"as torchvision would have left it")

    result = run_cli(runner, app, "cache", "list", "--format", "jsonl")
    assert result.exit_code == 0, result.stderr
    listed = {r["file"]: r for r in jsonl(result.stdout)}
    assert listed[tiny.name] == {
        "file": tiny.name,
        "size": len(tiny.data),
        "weights": [],
        "sha256": tiny.sha256,
        "source": url,
        "path": str(checkpoint_dir / tiny.name),
    }
    for file_name, owner in files.items():
        assert listed[file_name]["weights"] == [owner]
        assert listed[file_name]["sha256"] is None  # never verified by resnetcli
    assert len(listed) == 3
    table = run_cli(runner, app, "cache", "list", "--format", "table").stdout
    assert "resnet50:IMAGENET1K_V2" in table and str(checkpoint_dir) in table


def test_cache_rm_removes_files_records_and_abandoned_partials(runner, app, server, tiny, impostor, checkpoint_dir):
    for weight_file in (tiny, impostor):
        assert run_cli(runner, app, "fetch", "--url", server.file_url("ok", server.add(weight_file))).exit_code == 0
    assert cache_contents(checkpoint_dir) == sorted(
        [f".resnetcli/{impostor.name}.json", f".resnetcli/{tiny.name}.json", impostor.name, tiny.name]
    )

    result = run_cli(runner, app, "cache", "rm", tiny.name, "../hub", "nothing.pth", "--format", "jsonl")
    assert result.exit_code == 1
    assert jsonl(result.stdout) == [
        {"file": tiny.name, "size": len(tiny.data), "status": "removed", "path": str(checkpoint_dir / tiny.name)}
    ]
    assert result.stderr.splitlines() == [
        "resnet: error: ../hub: not a weight file name (give a name that `resnet cache list` shows)",
        f"resnet: error: nothing.pth: not in the weight cache {checkpoint_dir}",
    ]
    assert cache_contents(checkpoint_dir) == [f".resnetcli/{impostor.name}.json", impostor.name]

    abandoned = checkpoint_dir / f".{tiny.name}.4242.1.partial"  # a download whose process died
    abandoned.write_bytes(tiny.data[:10])
    assert run_cli(runner, app, "cache", "rm").exit_code == 2
    result = run_cli(runner, app, "cache", "rm", "--all", "--format", "csv")
    assert result.exit_code == 0, result.stderr
    assert [row["file"] for row in csv.DictReader(io.StringIO(result.stdout))] == [impostor.name]
    assert cache_contents(checkpoint_dir) == []


# ---------------------------------------------------------------------------------------------
# Unusable cache folders


def test_cache_folder_that_cannot_be_created_is_named(runner, app, server, tiny, tmp_path, monkeypatch):
    # Root ignores permission bits, so a read-only folder is simulated honestly: its parent is a file.
    torch_home = tmp_path / "home"
    torch_home.mkdir()
    (torch_home / "hub").write_text("a file where the cache folder should be")
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    result = run_cli(runner, app, "fetch", "--url", server.file_url("ok", server.add(tiny)))
    assert result.exit_code == 3
    assert (
        result.stderr == f"resnet: error: cannot create the weight cache folder "
        f"{torch_home / 'hub' / 'checkpoints'}: Not a directory\n"
    )
    assert server.gets == Counter()


def test_read_only_cache_folder_is_named(server, tiny, checkpoint_dir):
    """Read-only for the CLI even as root: chmod, chattr +i, an unprivileged user or a read-only mount."""
    checkpoint_dir.mkdir(parents=True)
    way = first_way(checkpoint_dir)
    url = server.file_url("ok", server.add(tiny))
    result = run_cli_read_only(way, checkpoint_dir, checkpoint_dir.parent.parent, "fetch", "--url", url)
    assert cache_contents(checkpoint_dir) == []
    assert result.returncode == 3, (way, result.stderr)
    assert result.stderr == f"resnet: error: the weight cache folder {checkpoint_dir} is not writable\n"
    assert server.gets == Counter()


def test_write_failure_mid_download_names_the_folder_and_leaves_nothing(server, tiny, checkpoint_dir):
    """A disk that fills up mid-download, simulated with a file-size limit on the process (EFBIG)."""
    limit = len(tiny.data) // 3

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    url = server.file_url("ok", server.add(tiny))
    done = subprocess.run(
        [sys.executable, "-m", "resnetcli", "fetch", "--url", url, "--format", "jsonl"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env_without_resnet(TORCH_HOME=str(checkpoint_dir.parent.parent)),
        preexec_fn=limit_file_size,
        timeout=60,
    )
    assert done.returncode == 3
    assert (
        done.stderr.splitlines()[-1]
        == f"resnet: error: cannot write to the weight cache folder {checkpoint_dir}: File too large"
    )
    assert cache_contents(checkpoint_dir) == []


# ---------------------------------------------------------------------------------------------
# Many processes, killed processes, Ctrl-C


def test_many_processes_download_a_file_once(server, tiny, checkpoint_dir):
    """Contention is certain: the one answer is held back until the 4 other processes say they wait for the lock."""
    url = server.file_url("slow", server.add(tiny))
    server.server.gate.clear()
    processes = [fetch_process(url, checkpoint_dir.parent.parent) for _ in range(5)]
    errors: list[list[str]] = [[] for _ in processes]
    readers = [threading.Thread(target=lambda p=p, e=e: e.extend(p.stderr)) for p, e in zip(processes, errors)]
    for reader in readers:
        reader.start()
    waiting_line = f"resnet: waiting for another process that is downloading {tiny.name}\n"
    deadline = time.monotonic() + 60
    while sum(waiting_line in e for e in errors) < 4 and time.monotonic() < deadline:
        assert all(p.poll() is None for p in processes), errors
        time.sleep(0.05)
    assert server.gets == Counter({f"/slow/{tiny.name}": 1})  # the downloader's request, still unanswered
    server.server.gate.set()
    outputs = [(p.stdout.read(), p.wait(timeout=60)) for p in processes]
    for reader in readers:
        reader.join(timeout=10)
    assert [p.returncode for p in processes] == [0] * 5, errors
    assert sorted(waiting_line in e for e in errors) == [False] + [True] * 4
    records = [json.loads(out) for out, _ in outputs]  # stdout is exactly one JSON record each
    assert sorted(r["status"] for r in records) == ["already cached"] * 4 + ["downloaded"]
    assert {r["sha256"] for r in records} == {tiny.sha256}
    assert server.gets == Counter({f"/slow/{tiny.name}": 1})
    assert (checkpoint_dir / tiny.name).read_bytes() == tiny.data
    assert cache_contents(checkpoint_dir) == [f".resnetcli/{tiny.name}.json", tiny.name]
    downloader = next("".join(err) for err, r in zip(errors, records) if r["status"] == "downloaded")
    assert f"resnet: downloading {tiny.name}" in downloader
    assert waiting_line not in downloader


def test_progress_bar_on_a_terminal_stays_off_stdout(server, tiny, checkpoint_dir):
    """stderr is a terminal (a pty): the rich progress bar is drawn there, stdout holds the record only."""
    url = server.file_url("slow", server.add(tiny))
    server.server.slow_seconds = 1.0
    done = run_on_terminal(
        [sys.executable, "-m", "resnetcli", "fetch", "--url", url],
        env_without_resnet(TORCH_HOME=str(checkpoint_dir.parent.parent), COLUMNS="120"),
        streams=("stderr",),
        timeout=60,
    )
    screen = done.terminal.decode(errors="replace")
    assert done.returncode == 0, screen
    assert json.loads(done.stdout)["status"] == "downloaded"  # exactly one JSON record, nothing else
    assert tiny.name in screen and "\x1b[" in screen  # the bar, with terminal control sequences
    assert "downloaded: " in screen


def test_killed_download_leaves_nothing_trusted_and_does_not_block_the_next(runner, app, server, tiny, checkpoint_dir):
    name = server.add(tiny)
    victim = fetch_process(server.file_url("stall", name), checkpoint_dir.parent.parent)
    wait_for_partial_data(checkpoint_dir, victim)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=10)
    assert json.loads(run_cli(runner, app, "cache", "list", "--format", "json").stdout) == []
    assert not (checkpoint_dir / tiny.name).exists()

    started = time.monotonic()
    result = run_cli(runner, app, "fetch", "--url", server.file_url("ok", name), "--format", "jsonl")
    assert time.monotonic() - started < 5
    assert result.exit_code == 0, result.stderr
    assert jsonl(result.stdout)[0]["status"] == "downloaded"
    assert (checkpoint_dir / tiny.name).read_bytes() == tiny.data
    assert cache_contents(checkpoint_dir) == [f".resnetcli/{tiny.name}.json", tiny.name]  # the dead partial is gone


def test_ctrl_c_mid_download_exits_130_and_leaves_no_partial(server, tiny, checkpoint_dir):
    process = fetch_process(server.file_url("stall", server.add(tiny)), checkpoint_dir.parent.parent)
    wait_for_partial_data(checkpoint_dir, process)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=20)
    assert process.returncode == 130
    assert err.splitlines()[-1] == "resnet: interrupted"
    assert "Traceback" not in err
    assert out == ""
    assert cache_contents(checkpoint_dir) == []
