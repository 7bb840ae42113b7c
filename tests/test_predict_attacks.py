"""Attacks on `resnet predict` (issue 9): each test reproduces one on real files, FIFOs, links and
loopback servers, and checks that nothing is lost, every failure is one record, and no traceback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO
from helpers import jsonl, run_on_terminal
from predict_cli import command, run, subprocess_env

# ---------------------------------------------------------------------------------------------
# 2. -o never destroys an input


@pytest.mark.parametrize("spelling", ["same", "relative", "absolute", "symlink", "hardlink"])
def test_output_that_is_an_input_is_refused_whatever_its_spelling(
    runner, app, model_args, sample_images, tmp_path, monkeypatch, spelling
):
    photo = tmp_path / "a.jpg"
    photo.write_bytes(sample_images[0].read_bytes())
    original = photo.read_bytes()
    monkeypatch.chdir(tmp_path)
    output = {
        "same": str(photo),
        "relative": "a.jpg",
        "absolute": str(photo.resolve()),
        "symlink": str(tmp_path / "link.jpg"),
        "hardlink": str(tmp_path / "hard.jpg"),
    }[spelling]
    if spelling == "symlink":
        os.symlink(photo, output)
    if spelling == "hardlink":
        os.link(photo, output)
    result = run(runner, app, str(photo), sample_images[1], *model_args, "-o", output)
    assert result.exit_code == 2
    assert result.stderr == f"resnet: error: --output {output} is the input {photo}; choose another file\n"
    assert photo.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted({"a.jpg", Path(output).name})


def test_output_that_is_the_stdin_list_is_refused(tmp_path, sample_images, model_args):
    listing = tmp_path / "list.txt"
    listing.write_text(f"{sample_images[0]}\n")
    with open(listing, "rb") as stdin:
        done = subprocess.run(
            command("-", *model_args, "-o", listing),
            stdin=stdin,
            capture_output=True,
            text=True,
            env=subprocess_env(tmp_path),
            cwd=REPO,
            timeout=120,
        )
    assert done.returncode == 2
    assert (
        done.stderr
        == f"resnet: error: --output {listing} is the file stdin reads the input list from; choose another file\n"
    )
    assert listing.read_text() == f"{sample_images[0]}\n"


def test_output_inside_an_input_folder_with_an_image_suffix(runner, app, model_args, sample_images, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in sample_images[:2]:
        (folder / path.name).write_bytes(path.read_bytes())
    output = folder / "results.jpg"
    first = run(runner, app, folder, *model_args, "-o", output, "--format", "jsonl")
    assert first.exit_code == 0, first.stderr
    assert [r["input"] for r in jsonl(output.read_text())] == [str(folder / p.name) for p in sample_images[:2]]
    # Run again: now the output exists inside the folder; it is never read as an image.
    again = run(runner, app, folder, *model_args, "-o", output, "--format", "jsonl")
    assert again.exit_code == 1
    records = jsonl(output.read_text())
    assert records[-1] == {"input": str(output), "error": f"{output}: is the --output file; not read"}
    assert [r["input"] for r in records[:2]] == [str(folder / p.name) for p in sample_images[:2]]
    assert sorted(p.name for p in folder.iterdir()) == sorted([*(p.name for p in sample_images[:2]), "results.jpg"])


def test_an_interrupted_run_leaves_the_previous_output_whole(tmp_path, sample_images, model_args):
    output = tmp_path / "out.jsonl"
    output.write_text('{"old": true}\n')
    process = subprocess.Popen(
        command("-", *model_args, "-o", output),
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(tmp_path),
        cwd=REPO,
    )
    try:
        process.stdin.write(f"{sample_images[0]}\n")
        process.stdin.flush()
        deadline = time.monotonic() + 90
        temporaries = []
        while time.monotonic() < deadline and not temporaries:
            temporaries = [p for p in tmp_path.iterdir() if p.name.startswith(".out.jsonl.")]
            time.sleep(0.2)
        assert temporaries, "the run never opened its temporary output"
        time.sleep(3)  # the first record is classified and written to the temporary file
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 130, process.stderr.read()
    finally:
        process.kill()
        process.wait()
    assert output.read_text() == '{"old": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "torch_home") == ["out.jsonl"]


# ---------------------------------------------------------------------------------------------
# 5. extreme aspect ratios, truncated JPEGs, non-finite scores


def test_extreme_aspect_ratio_is_an_error_record_and_the_batch_goes_on(
    runner, app, model_args, sample_images, tmp_path
):
    from PIL import Image

    strip = tmp_path / "strip.png"
    Image.new("L", (20000, 2)).save(strip)
    assert strip.stat().st_size < 1000
    result = run(runner, app, strip, sample_images[1], *model_args, "--format", "jsonl", "--top", "1")
    assert result.exit_code == 1
    records = jsonl(result.stdout)
    assert records[0] == {
        "input": str(strip),
        "error": f"{strip}: refused: resizing 20000x2 to a shorter side of 256 would make 655360000 pixels "
        "(limit 89478485); the aspect ratio is too extreme",
    }
    assert records[1]["top"][0]["index"] == 281


def test_jpeg_whose_header_claims_more_than_the_file_holds_is_an_error(runner, app, model_args, tmp_path):
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (5000, 5000), (200, 10, 10)).save(buffer, "JPEG")
    short = tmp_path / "short.jpg"
    short.write_bytes(buffer.getvalue()[:2000] + b"\xff\xd9")  # cut short, but with an end marker
    with Image.open(short) as image:
        image.load()  # Pillow alone decodes it, to grey fill, without complaint
    result = run(runner, app, short, *model_args, "--format", "jsonl")
    assert result.exit_code == 1
    assert jsonl(result.stdout) == [
        {
            "input": str(short),
            "error": f"{short}: cannot decode image: "
            "truncated (a 5000x5000 JPEG needs at least 48828 bytes, the file has 2002)",
        }
    ]


def test_non_finite_weights_give_an_error_record(runner, app, steered_resnet18, sample_images, tmp_path):
    import torch

    state = dict(steered_resnet18.state_dict)
    state["fc.bias"] = state["fc.bias"].clone()
    state["fc.bias"][5] = float("nan")
    checkpoint = tmp_path / "nan.pth"
    torch.save(state, checkpoint)
    result = run(runner, app, sample_images[0], "--arch", "resnet18", "--weights", checkpoint, "--format", "jsonl")
    assert result.exit_code == 1
    assert jsonl(result.stdout) == [
        {"input": str(sample_images[0]), "error": f"{sample_images[0]}: the model produced non-finite scores"}
    ]
    assert result.stderr == f"resnet: error: {sample_images[0]}: the model produced non-finite scores\n"


# ---------------------------------------------------------------------------------------------
# 6. FIFOs, devices, and Ctrl-C while a worker is blocked


def test_fifo_and_device_inputs_are_not_regular_files(runner, app, model_args, sample_images, tmp_path):
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    listed = tmp_path / "listed.jpg"
    os.mkfifo(listed)
    outcome = {}

    def invoke():
        outcome["result"] = run(
            runner,
            app,
            fifo,
            "/dev/zero",
            "-",
            sample_images[1],
            *model_args,
            "--format",
            "jsonl",
            "--top",
            "1",
            input=f"{listed}\n",
        )

    thread = threading.Thread(target=invoke, daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "predict blocked on a FIFO"
    result = outcome["result"]
    assert result.exit_code == 1
    records = jsonl(result.stdout)
    assert records[:3] == [
        {"input": str(fifo), "error": f"{fifo}: not a regular file"},
        {"input": "/dev/zero", "error": "/dev/zero: not a regular file"},
        {"input": str(listed), "error": f"{listed}: not a regular file"},
    ]
    assert records[3]["top"][0]["index"] == 281


class StallingServer:
    """A TCP server on 127.0.0.1 that accepts connections and then says nothing (or what it is told)."""

    def __init__(self, reply: bytes | None = None) -> None:
        self.reply = reply
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.connected = threading.Event()
        self.clients: list[socket.socket] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.clients.append(client)
            self.connected.set()
            if self.reply is not None:
                try:
                    client.recv(65536)
                    client.sendall(self.reply)
                    client.close()
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()
        for client in self.clients:
            client.close()


def test_ctrl_c_ends_the_run_while_a_worker_waits_on_a_server(tmp_path, model_args):
    server = StallingServer()
    url = f"http://127.0.0.1:{server.port}/cat.jpg"
    process = subprocess.Popen(
        command(url, *model_args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=subprocess_env(tmp_path, RESNET_TIMEOUT="600"),
        cwd=REPO,
    )
    try:
        assert server.connected.wait(90), "the worker never connected"
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=10) == 130  # not the 600 s of the timeout
        assert process.stderr.read() == "resnet: interrupted\n"
    finally:
        process.kill()
        process.wait()
        server.close()


# ---------------------------------------------------------------------------------------------
# 7. network failures of image URLs are error records of that input


def test_every_network_failure_is_an_error_record(runner, app, model_args, sample_images, monkeypatch):
    not_http = StallingServer(b"SSH-2.0-OpenSSH_9.2\r\n")
    headers = b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-Header-%d: x\r\n" % i for i in range(150)) + b"\r\n"
    many_headers = StallingServer(headers)
    silent = StallingServer()
    closed = socket.create_server(("127.0.0.1", 0))
    closed_port = closed.getsockname()[1]
    closed.close()
    urls = [
        f"http://127.0.0.1:{not_http.port}/a.jpg",
        f"http://127.0.0.1:{many_headers.port}/b.jpg",
        f"http://127.0.0.1:{closed_port}/c.jpg",
        f"http://127.0.0.1:{silent.port}/d.jpg",
    ]
    monkeypatch.setenv("RESNET_TIMEOUT", "1")
    try:
        result = run(runner, app, *urls, sample_images[1], *model_args, "--format", "jsonl", "--top", "1")
    finally:
        for server in (not_http, many_headers, silent):
            server.close()
    assert result.exit_code == 1
    records = jsonl(result.stdout)
    assert [r["input"] for r in records] == [*urls, str(sample_images[1])]
    assert (
        records[0]["error"]
        == f"{urls[0]}: cannot fetch: not a valid HTTP answer (BadStatusLine: SSH-2.0-OpenSSH_9.2\r\n)"
    )
    assert (
        records[1]["error"]
        == f"{urls[1]}: cannot fetch: not a valid HTTP answer (HTTPException: got more than 100 headers)"
    )
    assert records[2]["error"] == f"{urls[2]}: cannot fetch: Connection refused"
    assert records[3]["error"] == f"{urls[3]}: cannot fetch: no answer within 1 s"
    assert records[4]["top"][0]["index"] == 281
    assert "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 4


def test_an_endless_image_body_is_cut_at_the_cap(runner, app, model_args):
    import http.server

    from resnetcli import images

    class Endless(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            chunk = b"\0" * (1 << 20)
            try:
                for _ in range(images.MAX_DOWNLOAD_BYTES // len(chunk) + 8):
                    self.wfile.write(chunk)
            except OSError:
                pass

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Endless)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.server_address[1]}/endless.jpg"
    try:
        result = run(runner, app, url, *model_args, "--format", "jsonl")
    finally:
        server.shutdown()
        server.server_close()
    assert result.exit_code == 1
    assert jsonl(result.stdout) == [{"input": url, "error": f"{url}: refused: larger than 256 MiB"}]


def test_credentials_in_image_urls_are_never_shown(runner, app, model_args, sample_images, weight_server):
    served = weight_server.add(sample_images[1], "secret-cat.jpg")
    with_credentials = served.replace("http://", "http://alice:s3cr3t@")
    missing = f"{weight_server.url}/nothing.jpg".replace("http://", "http://alice:s3cr3t@")
    result = run(runner, app, with_credentials, missing, *model_args, "--format", "jsonl", "--top", "1")
    assert result.exit_code == 1
    records = jsonl(result.stdout)
    shown = served.replace("http://", "http://***@")
    shown_missing = f"{weight_server.url}/nothing.jpg".replace("http://", "http://***@")
    assert records[0]["input"] == shown and records[0]["top"][0]["index"] == 281
    assert records[1] == {"input": shown_missing, "error": f"{shown_missing}: cannot fetch: HTTP 404 File not found"}
    assert "s3cr3t" not in result.stdout + result.stderr
    assert result.stderr == f"resnet: error: {shown_missing}: cannot fetch: HTTP 404 File not found\n"


# ---------------------------------------------------------------------------------------------
# 8. file names that are not UTF-8; 9. a full disk


def test_non_utf8_file_names_give_valid_utf8_records(tmp_path, sample_images, model_args):
    folder = os.fsencode(tmp_path)
    name = folder + b"/caf\xe9-\xff.jpg"
    with open(name, "wb") as file:
        file.write(sample_images[1].read_bytes())
    missing = folder + b"/gone-\xfe.jpg"
    output = tmp_path / "out.jsonl"
    env = subprocess_env(tmp_path)
    argv = [
        *command(*model_args, "--top", "1")[:4],
        os.fsdecode(name),
        os.fsdecode(missing),
        *command(*model_args, "--top", "1")[4:],
    ]
    to_stdout = subprocess.run(argv, capture_output=True, env=env, cwd=REPO, timeout=120)
    to_file = subprocess.run([*argv, "-o", str(output)], capture_output=True, env=env, cwd=REPO, timeout=120)
    as_csv = subprocess.run([*argv, "--format", "csv"], capture_output=True, env=env, cwd=REPO, timeout=120)
    assert to_stdout.returncode == to_file.returncode == as_csv.returncode == 1
    for raw in (to_stdout.stdout, output.read_bytes()):
        records = [json.loads(line) for line in raw.decode("utf-8").splitlines()]  # valid UTF-8 and JSON
        assert [os.fsencode(r["input"]) for r in records] == [name, missing]  # the escape is reversible
        assert records[0]["top"][0]["index"] == 281
        assert b"caf\\udce9-\\udcff.jpg" in raw
    csv_text = as_csv.stdout.decode("utf-8")
    assert f"{tmp_path}/caf\\udce9-\\udcff.jpg,resnet18,{model_args[3]},1,281,tabby," in csv_text
    assert to_stdout.stderr.decode("utf-8").splitlines() == [
        f"resnet: error: {tmp_path}/gone-\\udcfe.jpg: no such file"
    ]


def test_a_full_disk_is_one_line_and_exit_code_4(tmp_path, sample_images, model_args):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full on this system")
    env = subprocess_env(tmp_path)
    as_option = subprocess.run(
        command(sample_images[1], *model_args, "-o", "/dev/full"),
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    with open("/dev/full", "w") as full:
        redirected = subprocess.run(
            command(sample_images[1], *model_args),
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
            timeout=120,
        )
    assert as_option.returncode == redirected.returncode == 4
    assert as_option.stderr == "resnet: error: cannot write the records to /dev/full: No space left on device\n"
    assert redirected.stderr == "resnet: error: cannot write the records to stdout: No space left on device\n"


def test_csv_on_a_terminal_escapes_control_characters(tmp_path, sample_images, model_args):
    name = tmp_path / "evil\x1b[2J.jpg"
    name.write_bytes(sample_images[1].read_bytes())
    done = run_on_terminal(command(name, *model_args, "--top", "1", "--format", "csv"), subprocess_env(tmp_path))
    assert done.returncode == 0
    text = done.terminal.decode()
    assert f"{tmp_path}/evil\\x1b[2J.jpg,resnet18,{model_args[3]},1,281,tabby," in text
    assert "\x1b" not in text
    piped = subprocess.run(
        command(name, *model_args, "--top", "1", "--format", "csv"),
        capture_output=True,
        text=True,
        env=subprocess_env(tmp_path),
        cwd=REPO,
        timeout=120,
    )
    assert (
        f"{name},resnet18,{model_args[3]},1,281,tabby," in piped.stdout
    )  # off a terminal the CSV keeps the name as it is


def test_two_runs_writing_the_same_output_leave_one_whole_result(tmp_path, sample_images, model_args):
    output = tmp_path / "shared.jsonl"
    env = subprocess_env(tmp_path)
    runs = {
        3: subprocess.Popen(command(*sample_images[:3], *model_args, "--top", "1", "-o", output), env=env, cwd=REPO),
        5: subprocess.Popen(
            command(*sample_images, sample_images[0], *model_args, "--top", "1", "-o", output), env=env, cwd=REPO
        ),
    }
    assert [process.wait(timeout=180) for process in runs.values()] == [0, 0]
    records = jsonl(output.read_text())  # every line whole
    assert len(records) in runs
    expected = (
        [str(p) for p in sample_images[:3]] if len(records) == 3 else [*map(str, sample_images), str(sample_images[0])]
    )
    assert [r["input"] for r in records] == expected
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "torch_home") == ["shared.jsonl"]
