"""The predict pipeline's contracts (issues 10, 13, 16): a settled, swappable model side; closing
stops every thread; the in-flight bound; threads from the affinity mask and cgroup quota; streaming
CSV/TSV; the progress line; the 80-column table; formats chosen by suffix; first frames; labels."""

from __future__ import annotations

import json
import logging
import os
import re
import select
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import REPO
from helpers import jsonl, python_c, run_on_terminal
from predict_cli import command, run, subprocess_env


def pipeline_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("resnet-")]


def numpy_classifier(categories=("dark", "bright"), classify_delay: float = 0.0, on_preprocess=None):
    """A classifier that needs no torch: mean brightness decides between two classes."""
    import numpy as np

    from resnetcli.predict import Classifier

    def preprocess(image):
        if on_preprocess is not None:
            on_preprocess()
        return np.asarray(image.convert("L").resize((16, 16)), dtype=np.float32).mean() / 255.0

    def classify(values):
        time.sleep(classify_delay)
        bright = np.asarray(values, dtype=np.float32)
        return np.stack([1.0 - bright, bright], axis=1)

    return Classifier("brightness", "none", tuple(categories), preprocess, classify)


# ---------------------------------------------------------------------------------------------
# Issue 10: a linear flow


def test_the_pipeline_runs_a_classifier_of_another_runtime_without_torch(tmp_path):
    """Decoding and batching never import torch: a numpy classifier plugs into the same pipeline."""
    from PIL import Image

    Image.new("RGB", (40, 30), (250, 250, 250)).save(tmp_path / "white.png")
    Image.new("RGB", (40, 30), (5, 5, 5)).save(tmp_path / "black.png")
    code = (
        "import sys, json\n"
        "sys.path.insert(0, 'tests')\n"
        "from test_predict_pipeline import numpy_classifier\n"
        "from resnetcli.inputs import expand_inputs\n"
        "from resnetcli.predict import predict\n"
        f"inputs = expand_inputs([{str(tmp_path)!r}])\n"
        "records = [p.record() for p in predict(numpy_classifier(), inputs, top=1, workers=2)]\n"
        "print(json.dumps(records))\n"
        "print('torch' in sys.modules)\n"
    )
    done = python_c(code, subprocess_env(tmp_path))
    assert done.returncode == 0, done.stderr
    records_line, torch_line = done.stdout.splitlines()
    records = json.loads(records_line)
    assert [(Path(r["input"]).name, r["top"][0]["label"]) for r in records] == [
        ("black.png", "dark"),
        ("white.png", "bright"),
    ]
    assert torch_line == "False"


def test_closing_the_results_stops_the_feeder_and_the_decoders_with_stdin_still_open(steered_resnet18, sample_images):
    from resnetcli.factory import load_model
    from resnetcli.inference import torch_classifier
    from resnetcli.inputs import expand_inputs
    from resnetcli.predict import predict

    classifier = torch_classifier(load_model("resnet18", str(steered_resnet18.path)))
    read_end, write_end = os.pipe()
    stdin = os.fdopen(read_end, "rb")
    try:
        cancel = threading.Event()
        results = predict(classifier, expand_inputs(["-"], stdin=stdin, cancel=cancel), workers=2, cancel=cancel)
        os.write(write_end, f"{sample_images[1]}\n".encode())
        first = next(results)
        assert first.top[0].index == 281
        assert "resnet-inputs" in pipeline_threads()  # the feeder waits on the open pipe
        results.close()
        deadline = time.monotonic() + 5
        while pipeline_threads() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert pipeline_threads() == []
    finally:
        os.close(write_end)
        stdin.close()


def test_in_flight_inputs_never_exceed_batch_size_plus_twice_the_workers(tmp_path):
    from PIL import Image

    from resnetcli.predict import predict

    for index in range(60):
        Image.new("RGB", (20, 20), (index * 4, 0, 0)).save(tmp_path / f"{index:02d}.png")
    batch_size, workers = 4, 3
    lock = threading.Lock()
    counts = {"started": 0, "yielded": 0, "most": 0}

    def started():
        with lock:
            counts["started"] += 1
            counts["most"] = max(counts["most"], counts["started"] - counts["yielded"])

    classifier = numpy_classifier(classify_delay=0.05, on_preprocess=started)
    paths = sorted(str(p) for p in tmp_path.glob("*.png"))
    for _prediction in predict(classifier, paths, batch_size=batch_size, workers=workers):
        with lock:
            counts["yielded"] += 1
        time.sleep(0.01)
    assert counts["yielded"] == 60
    # Fast decoding, slow classification: the bound is reached, and never exceeded.
    assert counts["most"] == batch_size + 2 * workers


def test_the_model_side_is_settled_before_the_pipeline_and_never_changed(steered_resnet18, sample_images):
    import torch

    from resnetcli.factory import load_model
    from resnetcli.fastpath import plan_for
    from resnetcli.inference import choose_transforms, torch_classifier
    from resnetcli.predict import predict

    loaded = load_model("resnet18", str(steered_resnet18.path))
    transforms_before = loaded.transforms
    smaller = choose_transforms(loaded, input_size=160)
    assert loaded.transforms is transforms_before and smaller.crop_size == [160]
    weights_before = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    fusion_before = torch.jit.onednn_fusion_enabled()
    assert plan_for("cpu", images=None).torchscript_onednn  # the graph plan, which uses oneDNN fusion
    classifier = torch_classifier(loaded, transforms=smaller, expected_count=None, batch_size=2)
    records = list(predict(classifier, [*sample_images, *sample_images], batch_size=2, workers=2))
    assert [r.top[0].index for r in records[:4]] == [0, 281, 967, 812]
    assert loaded.transforms is transforms_before
    assert all(torch.equal(v, weights_before[k]) for k, v in loaded.model.state_dict().items())
    assert torch.jit.onednn_fusion_enabled() == fusion_before  # switched on only while the graph runs


def test_a_fast_path_fallback_is_logged_at_debug_level(caplog):
    import torch

    from resnetcli import fastpath

    class NotTraceable(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
                return x.flatten(1)[:, :10]
            return -x.flatten(1)[:, :10]

    with caplog.at_level(logging.DEBUG, logger="resnetcli.fastpath"):
        model, folded = fastpath.fold_batchnorm(NotTraceable())
    assert not folded
    assert any(r.levelno == logging.DEBUG and "batch norm not folded" in r.getMessage() for r in caplog.records)


# ---------------------------------------------------------------------------------------------
# Issue 16: threads, streaming, progress


@pytest.mark.skipif(shutil.which("taskset") is None, reason="needs taskset (util-linux)")
def test_decoder_threads_default_to_the_cpus_the_process_may_run_on(tmp_path, model_args, sample_images):
    """`taskset -c N resnet predict` (one CPU of several): one decoder thread, as one torch thread, as --debug says."""
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs at least 2 usable CPUs: with one, every default is one thread")
    cpu = sorted(os.sched_getaffinity(0))[0]
    argv = ["taskset", "-c", str(cpu), sys.executable, "-m", "resnetcli", "--debug", "predict", sample_images[1]]
    done = subprocess.run(
        [*map(str, argv), *model_args, "--top", "1"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        env=subprocess_env(tmp_path),
    )
    assert done.returncode == 0, done.stderr
    assert jsonl(done.stdout)[0]["top"][0]["index"] == 281
    debug = done.stderr.splitlines()
    decoders = [line for line in debug if "decoder thread" in line]
    assert decoders == ["resnet: debug: resnetcli.predict: 1 decoder thread(s)"]
    assert "resnet: debug: resnetcli.fastpath: torch uses 1 intra-op thread(s)" in debug


def test_threads_default_to_the_affinity_mask_of_the_process(tmp_path, steered_resnet18, sample_images):
    if not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs a platform with affinity masks and at least 2 usable CPUs")
    code = (
        "import os, sys\n"
        "os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})\n"
        "from resnetcli.cli import app\n"
        "try:\n"
        f"    app(['predict', {str(sample_images[1])!r}, '--arch', 'resnet18',"
        f" '--weights', {str(steered_resnet18.path)!r}, '--top', '1'], prog_name='resnet')\n"
        "except SystemExit as done:\n"
        "    assert not done.code, done.code\n"
        "import torch\n"
        "print('threads', torch.get_num_threads())\n"
    )
    done = python_c(code, subprocess_env(tmp_path))
    assert done.returncode == 0, done.stderr
    record, threads = done.stdout.splitlines()
    assert json.loads(record)["top"][0]["index"] == 281
    assert threads == "threads 1"


def test_a_cgroup_cpu_quota_limits_the_thread_count(tmp_path):
    from resnetcli import fastpath

    affinity = len(os.sched_getaffinity(0))
    if affinity < 2:
        pytest.skip("needs at least 2 usable CPUs to tell a quota from the mask")
    proc = tmp_path / "cgroup"
    proc.write_text("0::/job/step\n")
    root = tmp_path / "sys"
    (root / "job" / "step").mkdir(parents=True)
    assert fastpath.usable_cpu_count(str(root), str(proc)) == affinity  # no cpu.max anywhere
    (root / "job" / "step" / "cpu.max").write_text("max 100000\n")
    assert fastpath.usable_cpu_count(str(root), str(proc)) == affinity
    (root / "job" / "cpu.max").write_text("50000 100000\n")  # half a CPU on the parent: 1 thread
    assert fastpath.cgroup_cpu_quota(str(root), str(proc)) == 0.5
    assert fastpath.usable_cpu_count(str(root), str(proc)) == 1
    (root / "job" / "cpu.max").write_text(f"{(affinity - 1) * 100000 + 50000} 100000\n")  # rounds up to the mask
    assert fastpath.usable_cpu_count(str(root), str(proc)) == affinity


@pytest.mark.parametrize("fmt, separator", [("csv", ","), ("tsv", "\t")])
def test_csv_and_tsv_records_stream_one_by_one(tmp_path, model_args, sample_images, fmt, separator):
    process = subprocess.Popen(
        command("-", *model_args, "--format", fmt, "--top", "1", "--batch-size", "4"),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=subprocess_env(tmp_path),
    )
    try:
        process.stdin.write(f"{sample_images[1]}\n")
        process.stdin.flush()
        lines = []
        while len(lines) < 2:
            ready, _, _ = select.select([process.stdout], [], [], 90)
            assert ready, "no record within 90 s"
            lines.append(process.stdout.readline())
        assert process.poll() is None  # still waiting for more paths
        assert lines[0].startswith(f"input{separator}arch{separator}")
        assert lines[1].startswith(f"{sample_images[1]}{separator}resnet18{separator}")
        assert lines[1].split(separator)[3:5] == ["1", "281"]
        process.stdin.close()
        assert process.wait(timeout=60) == 0
    finally:
        process.kill()
        process.wait()


def test_no_progress_line_when_records_stream_to_the_same_terminal(tmp_path, model_args, sample_images):
    done = run_on_terminal(
        command(*[sample_images[1]] * 24, *model_args, "--format", "jsonl", "--top", "1"),
        subprocess_env(tmp_path, TERM="xterm", COLUMNS="100"),
        streams=("stdout", "stderr"),
    )
    terminal = done.terminal.decode(errors="replace")
    assert done.returncode == 0
    records = [json.loads(line[line.index("{") :]) for line in terminal.splitlines() if "{" in line]
    assert len(records) == 24 and all(r["top"][0]["index"] == 281 for r in records)
    assert "inputs," not in terminal


def test_the_progress_line_starts_with_real_counts(tmp_path, model_args, sample_images):
    done = run_on_terminal(
        command(*[sample_images[1]] * 24, *model_args, "--format", "jsonl", "--top", "1"),
        subprocess_env(tmp_path, TERM="xterm", COLUMNS="100"),
        streams=("stderr",),
    )
    terminal = done.terminal.decode(errors="replace")
    assert done.returncode == 0
    assert "24 inputs, 0 failed" in terminal
    assert " 0 inputs" not in terminal and "-/s" not in terminal


# ---------------------------------------------------------------------------------------------
# Issue 13: the terminal table at 80 columns


def test_the_table_fits_80_columns(runner, app, steered_resnet18, model_args, sample_images, tmp_path, monkeypatch):
    deep = tmp_path / "a-rather-long-folder-name-for-photos" / "taken-on-a-long-holiday-somewhere-far"
    deep.mkdir(parents=True)
    long_cat = deep / "cat-photographed-in-the-garden-at-dusk.jpg"
    long_cat.write_bytes(sample_images[1].read_bytes())
    missing = deep / "missing.jpg"
    monkeypatch.setenv("COLUMNS", "80")
    result = run(runner, app, long_cat, sample_images[3], missing, *model_args, "--top", "3", "--format", "table")
    assert result.exit_code == 1
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, result.stdout
    title = lines[0].strip()
    assert title.endswith(f"{steered_resnet18.path.name})") and title.startswith(("resnet18 (", "…"))
    header = lines[1].split()
    assert header == ["input", "class", "prob", "next"]
    body = "\n".join(lines[2:])
    assert "resnet18 " not in body and str(steered_resnet18.path) not in body  # not repeated per row
    cat_row = next(line for line in lines if "dusk.jpg" in line)
    assert cat_row.lstrip().startswith("…") and "tabby" in cat_row
    assert str(long_cat) not in result.stdout  # shortened from the left, the file name kept
    probability = re.search(r"tabby\s+(\d\.\d+)\s", cat_row)
    assert probability and len(probability.group(1)) == 6  # 4 decimals
    rocket_row = next(line for line in lines if "rocket.jpg" in line)
    assert "space shuttle" in rocket_row
    error_rows = [line for line in lines if "missing.jpg" in line]
    assert len(error_rows) == 1 and "error" in error_rows[0] and "no such file" in result.stdout


def test_output_suffixes_choose_the_format(runner, app, model_args, sample_images, tmp_path):
    import csv
    import io

    outputs = {name: tmp_path / name for name in ("out.json", "out.tsv", "out.ndjson")}
    for path in outputs.values():
        result = run(runner, app, sample_images[1], sample_images[3], *model_args, "--top", "1", "-o", path)
        assert result.exit_code == 0, result.stderr
        assert result.stdout == ""
    document = json.loads(outputs["out.json"].read_text())
    assert [(r["input"], r["top"][0]["index"]) for r in document] == [
        (str(sample_images[1]), 281),
        (str(sample_images[3]), 812),
    ]
    assert jsonl(outputs["out.ndjson"].read_text()) == document
    rows = list(csv.DictReader(io.StringIO(outputs["out.tsv"].read_text()), delimiter="\t"))
    assert [(r["input"], r["index"]) for r in rows] == [(str(sample_images[1]), "281"), (str(sample_images[3]), "812")]


@pytest.mark.parametrize("fmt", ["WEBP", "PNG"])
def test_animated_webp_and_png_give_their_first_frame(runner, app, model_args, sample_images, tmp_path, fmt):
    from PIL import Image

    frames = [Image.open(sample_images[3]).convert("RGB")]
    frames.append(Image.open(sample_images[1]).convert("RGB").resize(frames[0].size))
    animated = tmp_path / f"animated.{fmt.lower()}"
    frames[0].save(animated, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)
    with Image.open(animated) as check:
        assert getattr(check, "n_frames", 1) == 2
    reversed_ = tmp_path / f"reversed.{fmt.lower()}"
    frames[1].save(reversed_, format=fmt, save_all=True, append_images=frames[:1], duration=100, loop=0, lossless=True)
    result = run(runner, app, animated, reversed_, *model_args, "--top", "1", "--format", "jsonl")
    assert result.exit_code == 0, result.stderr
    assert [r["top"][0]["index"] for r in jsonl(result.stdout)] == [812, 281]


def test_a_labels_map_with_gaps_is_refused(runner, app, model_args, sample_images, tmp_path):
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({str(i): f"class {i}" for i in range(1000) if i != 500}))
    result = run(runner, app, sample_images[1], *model_args, "--labels", labels)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == f"resnet: error: --labels {labels}: class indices must be 0..998 without gaps\n"
