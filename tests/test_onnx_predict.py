"""`resnet predict` on ONNX Runtime, driven through the CLI: an .onnx file, `--runtime`, `fetch --onnx`.

The ONNX runs are real `python -m resnetcli predict` processes whose `sys.modules` is read when they
exit; their records are compared with the torch path's on the sample photos, a broken image and a
missing file, with a checkpoint whose whole top-5 is defined (test_onnx.ranked_checkpoint).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, STEERED_CLASSES, env_without_resnet, sha256_file

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

import test_onnx
from test_onnx import tiny_model, without_metadata

from resnetcli.errors import ExitStatus

# test_onnx's module fixtures (each module exports once): the discriminating checkpoint and its export.
ranked_checkpoint = test_onnx.ranked_checkpoint
steered_export = test_onnx.steered_export

#: Runs `python -m resnetcli ARGS` (runpy, as -m does) and writes the modules loaded at exit to a file.
RUN_CLI = """
import atexit, json, runpy, sys
report, args = sys.argv[1], sys.argv[2:]
if "--no-onnxruntime" in args:
    args.remove("--no-onnxruntime")
    sys.modules["onnxruntime"] = None  # what Python does for a package that is not installed
atexit.register(lambda: open(report, "w").write(json.dumps(sorted(sys.modules))))
sys.argv = ["resnet", *args]
runpy.run_module("resnetcli", run_name="__main__", alter_sys=True)
"""

TORCH_SIDE = ("torch", "torchvision", "resnetcli.factory", "resnetcli.inference", "resnetcli.export")


def run_cli(
    tmp_path: Path, *args: str, debug: bool = False, home: Path | None = None
) -> tuple[subprocess.CompletedProcess, list[str]]:
    """A real `python -m resnetcli` process; returns it and the torch-side modules it had loaded at exit.

    Its caches are the test's (conftest's TORCH_HOME, XDG_CACHE_HOME), or folders under `home`."""
    import os

    report = tmp_path / f"modules-{len(list(tmp_path.glob('modules-*')))}.json"
    caches = (
        {"TORCH_HOME": str(home / "torch"), "XDG_CACHE_HOME": str(home / "xdg")}
        if home is not None
        else {"TORCH_HOME": os.environ["TORCH_HOME"], "XDG_CACHE_HOME": os.environ["XDG_CACHE_HOME"]}
    )
    extra = {"RESNET_DEBUG": "1"} if debug else {}
    done = subprocess.run(
        [sys.executable, "-c", RUN_CLI, str(report), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env_without_resnet(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra, **caches),
    )
    loaded = json.loads(report.read_text()) if report.exists() else []
    return done, [m for m in loaded if m.split(".")[0] in TORCH_SIDE[:2] or m in TORCH_SIDE]


@pytest.fixture(scope="module")
def batch_inputs(tmp_path_factory, sample_images) -> list[str]:
    """The sample photos with a broken image and a missing file among them: errors keep their places."""
    folder = tmp_path_factory.mktemp("inputs")
    broken = folder / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    paths = [str(p) for p in sample_images]
    return [paths[0], str(broken), *paths[1:3], str(folder / "missing.jpg"), paths[3]]


def records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def assert_same_records(ours: list[dict], theirs: list[dict], *, weights: str | None = None) -> None:
    """Equal records (input order, errors, arch, weights, labels, ranks), probabilities within 1e-3."""
    assert [r["input"] for r in ours] == [r["input"] for r in theirs]
    for mine, other in zip(ours, theirs, strict=True):
        if "error" in other:
            assert mine == other
            continue
        assert (mine["arch"], mine["weights"]) == (other["arch"], weights or other["weights"])
        assert [(s["rank"], s["index"], s["label"]) for s in mine["top"]] == [
            (s["rank"], s["index"], s["label"]) for s in other["top"]
        ]
        assert all(abs(a["prob"] - b["prob"]) <= 1e-3 for a, b in zip(mine["top"], other["top"], strict=True))
    photos = [r for r in ours if "error" not in r]
    assert [r["top"][0]["index"] for r in photos] == [STEERED_CLASSES[Path(r["input"]).name] for r in photos]


@pytest.fixture(scope="module")
def torch_records(tmp_path_factory, ranked_checkpoint, batch_inputs) -> tuple[list[dict], str]:
    """The torch path's records and stderr for batch_inputs (exit code 1: two inputs fail)."""
    folder = tmp_path_factory.mktemp("torch")
    done, modules = run_cli(
        folder,
        "predict", *batch_inputs, "--arch", "resnet18", "--weights", str(ranked_checkpoint), "--runtime", "torch",
        "-f", "jsonl", "--workers", "2", "--batch-size", "3", home=folder,
    )  # fmt: skip
    assert done.returncode == ExitStatus.INPUTS_FAILED, done.stderr
    assert "torch" in modules
    return records(done.stdout), done.stderr


def test_predict_onnx_file_same_records_as_torch_without_torch(steered_export, torch_records, batch_inputs, tmp_path):
    done, modules = run_cli(
        tmp_path, "predict", *batch_inputs, "--weights", str(steered_export.path), "-f", "jsonl",
        "--workers", "2", "--batch-size", "3", "--threads", "1",
    )  # fmt: skip
    assert done.returncode == ExitStatus.INPUTS_FAILED, done.stderr
    assert modules == []
    assert_same_records(records(done.stdout), torch_records[0], weights=str(steered_export.path))
    assert done.stderr == torch_records[1]  # the same error lines, in the same order


def test_predict_onnx_file_shard_and_output_file(steered_export, torch_records, batch_inputs, tmp_path):
    out = tmp_path / "part.csv"
    done, modules = run_cli(
        tmp_path, "predict", *batch_inputs, "--weights", str(steered_export.path), "--shard", "1/2",
        "-o", str(out), "--top", "2",
    )  # fmt: skip
    assert modules == []
    assert done.returncode == ExitStatus.INPUTS_FAILED, done.stderr  # broken.jpg is in shard 1/2
    lines = out.read_text().splitlines()
    assert lines[0] == "input,arch,weights,rank,index,label,prob,error"
    expected = [r for i, r in enumerate(torch_records[0]) if i % 2 == 0]
    shown = [line.split(",")[0] for line in lines[1:]]
    assert shown == [r["input"] for r in expected for _ in (r.get("top") or [None])[:2]]


def test_runtime_onnxruntime_exports_once_then_auto_is_torch_free(
    ranked_checkpoint, torch_records, batch_inputs, checkpoint_dir, tmp_path
):
    from resnetcli.onnxcache import export_file_name

    args = ["predict", *batch_inputs, "--arch", "resnet18", "--weights", str(ranked_checkpoint), "-f", "jsonl"]
    before, modules = run_cli(tmp_path, *args, debug=True)
    assert "runtime: torch (no cached ONNX export" in before.stderr and "torch" in modules
    exported, _ = run_cli(tmp_path, *args, "--runtime", "onnxruntime", "-b", "2")
    cached = checkpoint_dir / export_file_name("resnet18", "file", sha256_file(ranked_checkpoint))
    assert f"resnet: exported: {cached} (ONNX Runtime runs it from now on)" in exported.stderr
    assert_same_records(records(exported.stdout), torch_records[0])
    auto, modules = run_cli(tmp_path, *args, "--workers", "1", debug=True)
    assert f"runtime: onnxruntime (cached export {cached}" in auto.stderr
    assert modules == []
    assert_same_records(records(auto.stdout), torch_records[0])  # records as on torch: the checkpoint's path
    forced, modules = run_cli(tmp_path, *args, "--runtime", "torch")
    assert "torch" in modules and records(forced.stdout) == torch_records[0]
    bigger, modules = run_cli(tmp_path, *args, "--input-size", "256", debug=True)
    assert "runtime: torch (--input-size 256" in bigger.stderr and "torch" in modules


@pytest.fixture(scope="module")
def finetuned_ranked(tmp_path_factory, ranked_checkpoint) -> Path:
    """The ranked checkpoint in resnetcli's fine-tuned format: it names its architecture and classes."""
    import torch
    from torchvision.models import ResNet18_Weights

    from resnetcli.export import preprocessing_of

    path = tmp_path_factory.mktemp("finetuned") / "ranked-ft.pth"
    spec = preprocessing_of(ResNet18_Weights.DEFAULT.transforms())
    torch.save(
        {
            "format": "resnetcli.finetune/1",
            "state_dict": torch.load(ranked_checkpoint, weights_only=True),
            "arch": "resnet18",
            "classes": [f"class {i}" for i in range(1000)],
            "preprocessing": {**spec.record(), "resize_size": spec.resize_size[0], "crop_size": spec.crop_size[0]},
            "base_weights": "none",
            "metrics": {},
            "resnetcli_version": "0.0.0",
        },
        path,
    )
    return path


def test_fetch_onnx_then_predict_by_cache_name_and_cache_list_verify_rm(
    finetuned_ranked, runner, app, checkpoint_dir, tmp_path
):
    from resnetcli.onnxcache import export_file_name

    sha = sha256_file(finetuned_ranked)
    fetch = ["fetch", "--from-file", str(finetuned_ranked), "--sha256", sha, "--onnx", "-f", "json"]
    fetched = runner.invoke(app, fetch)
    assert fetched.exit_code == 0, fetched.stderr
    name = export_file_name("resnet18", "file", sha)
    rows = json.loads(fetched.stdout)
    assert [(r["name"], r["file"], r["status"]) for r in rows] == [
        (str(finetuned_ranked), finetuned_ranked.name, "imported"),
        (f"{finetuned_ranked} (ONNX)", name, "exported"),
    ]
    assert rows[1]["sha256"] == sha256_file(checkpoint_dir / name)
    assert [r["status"] for r in json.loads(runner.invoke(app, fetch).stdout)] == ["imported", "already cached"]
    listed = {r["file"]: r["weights"] for r in json.loads(runner.invoke(app, ["cache", "list", "-f", "json"]).stdout)}
    assert listed[name] == ["resnet18:checkpoint file (ONNX, opset 18)"]
    # The imported file's cache name finds the export, torch-free and without --arch (the file names it).
    cat = str(REPO / "sample_images" / "cat.jpg")
    done, modules = run_cli(tmp_path, "predict", cat, "--weights", finetuned_ranked.name, "-f", "jsonl", debug=True)
    assert modules == [] and f"cached export {checkpoint_dir / name}" in done.stderr
    (record,) = records(done.stdout)
    assert (record["arch"], record["weights"]) == ("resnet18", str(checkpoint_dir / finetuned_ranked.name))
    assert record["top"][0]["label"] == f"class {STEERED_CLASSES['cat.jpg']}"
    verified = runner.invoke(app, ["cache", "verify", "-f", "json"])
    assert sorted(r["status"] for r in json.loads(verified.stdout)) == ["ok", "ok"]
    removed = runner.invoke(app, ["cache", "rm", name, "-f", "json"])
    assert removed.exit_code == 0 and not (checkpoint_dir / name).exists()
    after, modules = run_cli(tmp_path, "predict", cat, "--weights", finetuned_ranked.name, "-f", "jsonl", debug=True)
    assert "runtime: torch (no cached ONNX export" in after.stderr and "torch" in modules
    assert_same_records([record], records(after.stdout))


# ---------------------------------------------------------------------------------------------
# Errors through `resnet predict`


def assert_one_line(done: subprocess.CompletedProcess, status: int, *parts: str) -> None:
    assert done.returncode == status, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("resnet: error: "), done.stderr
    for part in parts:
        assert part in lines[0]
    assert done.stdout == ""


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_cli_corrupt_onnx_is_exit_3(steered_export, tmp_path, damage):
    data = steered_export.path.read_bytes()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\x00\xffnot onnx" * 100)
    done, modules = run_cli(tmp_path, "predict", str(REPO / "sample_images" / "cat.jpg"), "--weights", str(bad))
    assert_one_line(done, ExitStatus.WEIGHTS_UNAVAILABLE, str(bad), "not a readable ONNX model")
    assert modules == []


def test_cli_model_without_metadata(steered_export, tmp_path):
    bare = without_metadata(steered_export.path, tmp_path / "bare.onnx")
    cat = str(REPO / "sample_images" / "cat.jpg")
    done, _ = run_cli(tmp_path, "predict", cat, "--weights", str(bare))
    assert_one_line(done, ExitStatus.WEIGHTS_UNAVAILABLE, str(bare), "(class names, preprocessing missing)")
    labels = tmp_path / "labels.txt"
    labels.write_text("".join(f"class {i}\n" for i in range(1000)))
    partial, _ = run_cli(
        tmp_path, "predict", cat, "--weights", str(bare), "--labels", str(labels), "--mean", "0.5,0.5,0.5"
    )
    assert_one_line(partial, ExitStatus.USAGE, "--std, --interpolation, --resize, --input-size missing")
    spec = steered_export.info.preprocessing
    full, modules = run_cli(
        tmp_path, "predict", cat, "--weights", str(bare), "--labels", str(labels), "-f", "jsonl",
        "--mean", ",".join(map(str, spec.mean)), "--std", ",".join(map(str, spec.std)),
        "--interpolation", spec.interpolation, "--resize", str(spec.resize_size[0]),
        "--input-size", str(spec.crop_size[0]),
    )  # fmt: skip
    assert full.returncode == 0, full.stderr
    assert modules == []
    (record,) = records(full.stdout)
    assert record["top"][0]["label"] == f"class {STEERED_CLASSES['cat.jpg']}"


def test_cli_input_not_n3hw_float(tmp_path):
    from onnx import TensorProto

    path = tiny_model(tmp_path / "tiny.onnx", TensorProto.INT64, ["N", 3, 8, 8])
    done, _ = run_cli(tmp_path, "predict", str(REPO / "sample_images" / "cat.jpg"), "--weights", str(path))
    assert_one_line(done, ExitStatus.WEIGHTS_UNAVAILABLE, str(path), "an image classifier takes N x 3 x H x W float")


def test_cli_runtime_onnxruntime_not_installed_is_exit_2(ranked_checkpoint, steered_export, tmp_path):
    cat = str(REPO / "sample_images" / "cat.jpg")
    done, modules = run_cli(tmp_path, "--no-onnxruntime", "predict", cat, "--weights", str(ranked_checkpoint),
                            "--arch", "resnet18", "--runtime", "onnxruntime")  # fmt: skip
    assert_one_line(done, ExitStatus.USAGE, "--runtime onnxruntime: onnxruntime is not installed; install it with: "
                    "pip install onnxruntime")  # fmt: skip
    assert modules == []  # refused before any export
    onnx_file, _ = run_cli(tmp_path, "--no-onnxruntime", "predict", cat, "--weights", str(steered_export.path))
    assert_one_line(onnx_file, ExitStatus.USAGE, "pip install onnxruntime")
    auto, modules = run_cli(tmp_path, "--no-onnxruntime", "predict", cat, "--weights", str(ranked_checkpoint),
                            "--arch", "resnet18", "-f", "jsonl", debug=True)  # fmt: skip
    assert auto.returncode == 0 and "runtime: torch (onnxruntime is not installed)" in auto.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--runtime", "torch"], "an ONNX model runs on ONNX Runtime, not --runtime torch"),
        (["--device", "cuda"], "ONNX Runtime runs on the CPU here; --device cuda needs --runtime torch"),
        (["--preprocess", "IMAGENET1K_V1"], "--preprocess takes torchvision's transforms"),
    ],
)
def test_cli_onnx_file_usage_errors(steered_export, runner, app, extra, message):
    result = runner.invoke(app, ["predict", str(REPO / "sample_images" / "cat.jpg"), "--weights",
                                 str(steered_export.path), *extra])  # fmt: skip
    assert result.exit_code == ExitStatus.USAGE
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"resnet: error: --weights {steered_export.path}: {message}")


def test_default_arch_agrees_with_the_factory():
    from resnetcli.factory import DEFAULT_ARCH
    from resnetcli.onnxcache import DEFAULT_ARCH as ONNX_DEFAULT_ARCH

    assert ONNX_DEFAULT_ARCH == DEFAULT_ARCH


@pytest.mark.parametrize(
    "name, shown",
    [
        ("resnet50.IMAGENET1K_V2.11ad3fa6a8d1b7f0.dynamo_opset18.onnx", "resnet50:IMAGENET1K_V2 (ONNX, opset 18)"),
        ("resnet18.url.0123456789abcdef.dynamo_opset20.onnx", "resnet18:URL (ONNX, opset 20)"),
        ("resnet50-11ad3fa6.pth", None),
        ("model.onnx", None),
    ],
)
def test_describe_export(name, shown):
    from resnetcli.onnxcache import describe_export

    assert describe_export(name) == shown
