"""`resnet finetune` and `resnet eval` end to end on a small data set generated from the sample photos.

Pretrained weights cannot be had here: training starts from a seeded random-init resnet18, whose
frozen features (standardised by the trainer) with a trained linear head still separate the
photos' classes. Images are small (64 px, trained and read at 64 px with --input-size), torch runs
one thread (--threads 1: a loaded machine's cores are not fought over), runs are a few epochs, and
one training run (the module-scoped `trained`) serves every test that only reads its result.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, SAMPLE_DIR, STEERED_CLASSES, env_without_resnet
from photo_sets import make_photo_set

CLASSES = ["cat", "coffee", "rocket"]
PER_SPLIT = 4
EPOCHS = 8
#: The arguments of every run; FAST_ARGS adds the 64-pixel input size the generated images have.
BASE_ARGS = ["-a", "resnet18", "-w", "none", "--seed", "0", "--batch-size", "8", "--workers", "2", "--threads", "1"]
INPUT_SIZE = 64
TRAIN_ARGS = [*BASE_ARGS, "--input-size", str(INPUT_SIZE)]


def make_dataset(root: Path, per_split: int = PER_SPLIT) -> Path:
    """train/ and val/ folders of small variants (crop, flip, colour, brightness) of three sample photos."""
    return make_photo_set(root, [SAMPLE_DIR / f"{label}.jpg" for label in CLASSES], per_split, INPUT_SIZE)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture
def tiny_dataset(tmp_path) -> Path:
    """Two images per class and split: for the runs that forward every image every epoch."""
    return make_dataset(tmp_path / "tiny", per_split=2)


def run(app, *args: str):
    from typer.testing import CliRunner

    return CliRunner().invoke(app, list(args))


def load(path: Path) -> dict:
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def trained(dataset, tmp_path_factory):
    from resnetcli.cli import app

    out = tmp_path_factory.mktemp("run") / "out.pth"
    result = run(
        app, "finetune", str(dataset), *TRAIN_ARGS, "--epochs", str(EPOCHS), "-o", str(out), "--format", "json"
    )
    assert result.exit_code == 0, result.stderr
    return out, json.loads(result.stdout), result.stderr


def test_finetune_learns_the_classes_and_writes_the_checkpoint_format(trained):
    import torch
    from torchvision.models import ResNet18_Weights

    out, record, stderr = trained
    assert record["classes"] == CLASSES and record["arch"] == "resnet18" and record["train"] == "head"
    assert record["cached_features"] is True
    assert [epoch["epoch"] for epoch in record["epochs"]] == list(range(1, EPOCHS + 1))
    assert record["best_val_accuracy"] >= 0.8  # chance is 1/3
    assert record["train_images"] == record["val_images"] == 3 * PER_SPLIT and record["skipped"] == []
    assert f"epoch {EPOCHS}: train loss" in stderr and "best epoch" in stderr

    checkpoint = load(out)  # weights_only=True
    reference = ResNet18_Weights.DEFAULT.transforms()
    assert checkpoint["format"] == "resnetcli.finetune/1"
    assert checkpoint["arch"] == "resnet18" and checkpoint["classes"] == CLASSES
    # --input-size 64: the weights' resize-to-crop ratio (256/224) kept, mean/std/interpolation theirs.
    assert checkpoint["preprocessing"] == {
        "resize_size": round(INPUT_SIZE * reference.resize_size[0] / reference.crop_size[0]),
        "crop_size": INPUT_SIZE,
        "mean": list(reference.mean),
        "std": list(reference.std),
        "interpolation": "bilinear",
    }
    assert checkpoint["preprocessing"]["resize_size"] == 73
    assert checkpoint["base_weights"] == "none"
    assert checkpoint["epoch"] == EPOCHS and checkpoint["train"] == "head" and checkpoint["seed"] == 0
    assert checkpoint["metrics"]["epochs"] == record["epochs"]
    assert checkpoint["metrics"]["best_epoch"] == record["best_epoch"]
    from resnetcli import __version__

    assert checkpoint["resnetcli_version"] == __version__
    assert checkpoint["state_dict"]["fc.weight"].shape == (3, 512)
    # The frozen backbone is exactly the seeded random init.
    torch.manual_seed(0)
    from torchvision import models

    fresh = models.resnet18(weights=None).state_dict()
    assert torch.equal(checkpoint["state_dict"]["layer4.1.conv2.weight"], fresh["layer4.1.conv2.weight"])
    assert not any(out.parent.glob(".*.tmp"))


def test_same_seed_gives_the_same_weights_and_metrics(app, dataset, trained, tmp_path):
    import torch

    out, record, _ = trained
    again = tmp_path / "again.pth"
    result = run(
        app, "finetune", str(dataset), *TRAIN_ARGS, "--epochs", str(EPOCHS), "-o", str(again), "--format", "json"
    )
    assert result.exit_code == 0, result.stderr
    strip = lambda epochs: [{k: v for k, v in e.items() if k != "seconds"} for e in epochs]  # noqa: E731
    assert strip(json.loads(result.stdout)["epochs"]) == strip(record["epochs"])
    first, second = load(out)["state_dict"], load(again)["state_dict"]
    assert first.keys() == second.keys()
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_ctrl_c_leaves_the_last_epoch_and_resume_matches_the_uninterrupted_run(app, dataset, trained, tmp_path):
    """Ctrl-C is not held back while a checkpoint is written: the temporary file is dropped and OUT.pth stays
    the last complete epoch's. If the run does not exit, faulthandler's dump of every thread (SIGABRT) says
    where it is stuck."""
    import torch

    reference_path, _, _ = trained
    out = tmp_path / "interrupted.pth"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "resnetcli",
            "finetune",
            str(dataset),
            *TRAIN_ARGS,
            "--epochs",
            "100000",
            "-o",
            str(out),
        ],
        cwd=REPO,
        env=env_without_resnet(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not out.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert out.exists(), process.stderr.read() if process.poll() is not None else "no checkpoint within 120 s"
        process.send_signal(signal.SIGINT)
        try:
            # Seconds on a quiet machine (interpreter shutdown included); the bound only stops a hang.
            _, stderr = process.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)
            _, dump = process.communicate(timeout=30)
            pytest.fail(f"still running 90 s after Ctrl-C; where every thread was:\n{dump[-6000:]}")
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=10)
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    assert not list(tmp_path.glob(".*.tmp"))
    done = load(out)["epoch"]
    assert 1 <= done < EPOCHS

    result = run(
        app, "finetune", str(dataset), *TRAIN_ARGS, "--epochs", str(EPOCHS), "-o", str(out), "--resume", str(out)
    )
    assert result.exit_code == 0, result.stderr
    resumed, reference = load(out), load(reference_path)
    assert resumed["epoch"] == EPOCHS
    assert [e["epoch"] for e in resumed["metrics"]["epochs"]] == list(range(1, EPOCHS + 1))
    assert all(torch.equal(resumed["state_dict"][k], reference["state_dict"][k]) for k in reference["state_dict"])
    strip = lambda epochs: [{k: v for k, v in e.items() if k != "seconds"} for e in epochs]  # noqa: E731
    assert strip(resumed["metrics"]["epochs"]) == strip(reference["metrics"]["epochs"])


def test_bad_images_are_reported_once_and_skipped(app, tiny_dataset, tmp_path):
    data = tiny_dataset
    (data / "train" / "cat" / "broken.jpg").write_bytes(b"not a jpeg at all")
    truncated = (data / "val" / "coffee" / "coffee_0.jpg").read_bytes()
    (data / "val" / "coffee" / "cut.jpg").write_bytes(truncated[: len(truncated) // 3])
    out = tmp_path / "out.pth"
    # --augment forces full passes: every epoch reads the images again, the broken ones are still reported once.
    result = run(
        app, "finetune", str(data), *TRAIN_ARGS, "--augment", "--epochs", "2", "-o", str(out), "--format", "json"
    )
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["cached_features"] is False
    assert sorted(Path(p).name for p in record["skipped"]) == ["broken.jpg", "cut.jpg"]
    assert record["train_images"] == record["val_images"] == 3 * 2
    lines = result.stderr.splitlines()
    assert len([line for line in lines if "broken.jpg" in line]) == 1
    assert len([line for line in lines if "cut.jpg" in line]) == 1
    assert "Traceback" not in result.stderr

    strict = run(
        app, "finetune", str(data), *TRAIN_ARGS, "--strict", "--epochs", "1", "-o", str(tmp_path / "strict.pth")
    )
    assert strict.exit_code == 1
    assert "broken.jpg" in strict.stderr and "Traceback" not in strict.stderr
    assert not (tmp_path / "strict.pth").exists()


def test_last_stage_trains_layer4_and_the_head_only(app, tiny_dataset, tmp_path):
    """Also the run without --input-size: OUT.pth records the weights' own preprocessing."""
    import torch
    from torchvision import models
    from torchvision.models import ResNet18_Weights

    out = tmp_path / "last.pth"
    result = run(
        app,
        "finetune",
        str(tiny_dataset),
        *BASE_ARGS,
        "--train",
        "last-stage",
        "--epochs",
        "1",
        "-o",
        str(out),
        "--format",
        "json",
    )
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["cached_features"] is False
    state = load(out)["state_dict"]
    torch.manual_seed(0)
    fresh = models.resnet18(weights=None).state_dict()
    changed = {
        key.split(".")[0]
        for key in state
        if key in fresh and state[key].shape == fresh[key].shape and not torch.equal(state[key], fresh[key])
    }
    assert changed == {"layer4"}  # fc has another shape; everything in front of layer4 is frozen
    assert load(out)["train"] == "last-stage"
    reference = ResNet18_Weights.DEFAULT.transforms()
    assert load(out)["preprocessing"] == {
        "resize_size": reference.resize_size[0],
        "crop_size": reference.crop_size[0],
        "mean": list(reference.mean),
        "std": list(reference.std),
        "interpolation": "bilinear",
    }


@pytest.mark.parametrize("kind", ["torchvision-reference", "safetensors"])
def test_finetune_starts_from_a_users_checkpoint(app, dataset, tmp_path, kind):
    """A torchvision reference train.py checkpoint (argparse.Namespace inside, loaded with weights_only=True;
    no --arch: args.model names it) or a .safetensors file (with --arch) is where training starts."""
    import argparse
    import hashlib

    import torch
    from torchvision import models

    torch.manual_seed(7)
    start = models.resnet18(weights=None).state_dict()
    if kind == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "start.safetensors"
        save_file({k: v.contiguous() for k, v in start.items()}, str(path))
        arch_args = ["-a", "resnet18"]
    else:
        path = tmp_path / "model_89.pth"
        args = argparse.Namespace(model="resnet18", lr=0.1, epochs=90, weights=None)
        torch.save({"model": start, "optimizer": {}, "lr_scheduler": {}, "epoch": 89, "args": args}, path)
        arch_args = []
    out = tmp_path / "out.pth"
    common = [a for a in TRAIN_ARGS if a not in ("-a", "resnet18", "-w", "none")]
    assert len(common) == len(TRAIN_ARGS) - 4
    result = run(app, "finetune", str(dataset), *arch_args, "-w", str(path), *common, "--epochs", "1", "-o", str(out))
    assert result.exit_code == 0, result.stderr
    checkpoint = load(out)
    assert checkpoint["arch"] == "resnet18" and checkpoint["classes"] == CLASSES
    assert checkpoint["base_weights"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert torch.equal(checkpoint["state_dict"]["layer4.1.conv2.weight"], start["layer4.1.conv2.weight"])
    assert checkpoint["state_dict"]["fc.weight"].shape == (3, 512)


def test_input_size_a_model_cannot_take_is_one_clear_line(app, dataset, tmp_path):
    result = run(
        app,
        "finetune",
        str(dataset),
        "-a",
        "vit_b_16",
        "-w",
        "none",
        "--input-size",
        "64",
        "-o",
        str(tmp_path / "v.pth"),
    )
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "resnet: error: --input-size 64: vit_b_16 cannot take 64-pixel images"
    )
    assert not (tmp_path / "v.pth").exists()


# ---------------------------------------------------------------------------------------------
# eval


def eval_json(app, data: Path, *args: str) -> dict:
    result = run(app, "eval", str(data), "--threads", "1", *args, "--format", "json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_eval_document_and_rows_agree(app, dataset, trained):
    out, record, _ = trained
    document = eval_json(app, dataset, "-w", str(out))
    assert {"accuracy", "top5", "classes", "per_class", "confusion_matrix", "errors"} <= document.keys()
    assert document["classes"] == CLASSES and document["images"] == 3 * PER_SPLIT
    # The checkpoint holds the last epoch: eval scores what finetune measured for it.
    assert document["accuracy"] == pytest.approx(record["epochs"][-1]["val_accuracy"], abs=1e-6)
    assert document["top5"] == 1.0  # three classes: the true one is always among the top five

    result = run(app, "eval", str(dataset), "-w", str(out), "--threads", "1", "--format", "csv")
    assert result.exit_code == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert sorted(Path(r["input"]).parent.name + "/" + Path(r["input"]).name for r in rows) == sorted(
        f"{label}/{label}_{i}.jpg" for label in CLASSES for i in range(PER_SPLIT)
    )
    assert all(Path(r["input"]).parent.parent.name == "val" for r in rows)
    matrix = [[0] * 3 for _ in CLASSES]
    for row in rows:
        matrix[CLASSES.index(row["label"])][CLASSES.index(row["predicted"])] += 1
    assert document["confusion_matrix"] == matrix
    assert document["accuracy"] == sum(r["correct"] == "true" for r in rows) / len(rows)
    assert sorted(e["input"] for e in document["errors"]) == sorted(r["input"] for r in rows if r["correct"] == "false")
    for i, metrics in enumerate(document["per_class"]):
        assert metrics["support"] == sum(matrix[i]) == PER_SPLIT
        assert metrics["recall"] == matrix[i][i] / PER_SPLIT
        predicted = sum(row[i] for row in matrix)
        assert metrics["precision"] == (matrix[i][i] / predicted if predicted else 0.0)


def test_eval_matches_predict_per_image(app, dataset, trained):
    out, _, _ = trained
    files = sorted(str(p) for p in (dataset / "val").rglob("*.jpg"))
    predicted = run(
        app,
        "predict",
        *files,
        "--weights",
        str(out),
        "--arch",
        "resnet18",
        "--top",
        "1",
        "--threads",
        "1",
        "--format",
        "jsonl",
    )
    assert predicted.exit_code == 0, predicted.stderr
    predict_index = {r["input"]: r["top"][0]["index"] for r in map(json.loads, predicted.stdout.splitlines())}
    result = run(app, "eval", str(dataset), "-w", str(out), "--threads", "1", "--format", "jsonl")
    eval_index = {r["input"]: CLASSES.index(r["predicted"]) for r in map(json.loads, result.stdout.splitlines())}
    assert eval_index == predict_index


def test_eval_accuracy_equals_predicts_named_top1(app, dataset, trained):
    """predict names the fine-tuned classes without --arch or --labels, and eval's accuracy is its top-1's."""
    out, _, _ = trained
    files = sorted(str(p) for p in (dataset / "val").rglob("*.jpg"))
    predicted = run(app, "predict", *files, "--weights", str(out), "--top", "1", "--threads", "1", "--format", "jsonl")
    assert predicted.exit_code == 0, predicted.stderr
    records = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert len(records) == len(files) == 3 * PER_SPLIT
    assert all(r["arch"] == "resnet18" and r["top"][0]["label"] in CLASSES for r in records)
    accuracy = sum(r["top"][0]["label"] == Path(r["input"]).parent.name for r in records) / len(records)
    assert eval_json(app, dataset, "-w", str(out))["accuracy"] == accuracy


def test_predict_table_names_the_classes(app, dataset, trained):
    """The table a person reads: the stored class names, no numbered `class_N` and no ImageNet names."""
    out, _, _ = trained
    photos = [dataset / "val" / label / f"{label}_0.jpg" for label in CLASSES]
    result = run(app, "predict", *map(str, photos), "-w", str(out), "--top", "3", "--threads", "1", "--format", "table")
    assert result.exit_code == 0, result.stderr
    assert "resnet18" in result.stdout
    for label in CLASSES:
        assert label in result.stdout
    assert "class_" not in result.stdout and "tabby" not in result.stdout


def test_summary_shows_the_new_head(app, trained):
    out, _, _ = trained
    result = run(app, "summary", "resnet18", "--weights", str(out), "--depth", "1", "--format", "json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    text = json.dumps(document)
    assert str(out) in text
    fc = next(layer for layer in document["layers"] if layer["layer"] == "fc")
    assert fc["output_shape"] == [1, 3] and fc["params"] == 512 * 3 + 3
    table = run(app, "summary", "resnet18", "--weights", str(out), "--depth", "1", "--format", "table")
    assert table.exit_code == 0, table.stderr
    assert f"resnet18 ({out})" in table.stdout
    fc_rows = [line for line in table.stdout.splitlines() if "Linear" in line]
    assert len(fc_rows) == 1 and " fc " in fc_rows[0] and "[1, 3]" in fc_rows[0] and "1,539" in fc_rows[0]
    # MODEL left out: OUT.pth names its architecture.
    alone = run(app, "summary", "--weights", str(out), "--depth", "1", "--format", "table")
    assert alone.exit_code == 0, alone.stderr
    assert alone.stdout == table.stdout
    missing = run(app, "summary", "--depth", "1")
    assert missing.exit_code == 2
    assert (
        missing.stderr.strip()
        == "resnet: error: summary needs MODEL, or --weights CHECKPOINT that names its architecture"
    )


def test_eval_plot_writes_a_png(app, dataset, trained, tmp_path):
    from PIL import Image

    out, _, _ = trained
    png = tmp_path / "confusion.png"
    result = run(app, "eval", str(dataset), "-w", str(out), "--threads", "1", "--format", "json", "--plot", str(png))
    assert result.exit_code == 0, result.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        assert image.format == "PNG" and min(image.size) >= 300
    assert not list(tmp_path.glob(".*.tmp"))


def test_eval_of_an_imagenet_model_by_category_names(app, steered_resnet18, tmp_path):
    from torchvision.models import ResNet18_Weights

    categories = ResNet18_Weights.DEFAULT.meta["categories"]
    for photo, index in STEERED_CLASSES.items():
        folder = tmp_path / "data" / categories[index].replace(" ", "_")  # "space_shuttle" names "space shuttle"
        folder.mkdir(parents=True)
        shutil.copyfile(SAMPLE_DIR / photo, folder / photo)
    document = eval_json(app, tmp_path / "data", "-a", "resnet18", "-w", str(steered_resnet18.path))
    wanted = [categories[i] for i in sorted(STEERED_CLASSES.values())]
    assert document["accuracy"] == 1.0 and document["classes"] == wanted
    assert document["confusion_matrix"] == [[int(i == j) for j in range(4)] for i in range(4)]
    assert document["errors"] == []

    (tmp_path / "data" / "no_such_class").mkdir()
    shutil.copyfile(SAMPLE_DIR / "cat.jpg", tmp_path / "data" / "no_such_class" / "cat.jpg")
    result = run(
        app, "eval", str(tmp_path / "data"), "-a", "resnet18", "-w", str(steered_resnet18.path), "--threads", "1"
    )
    assert result.exit_code == 2
    assert "'no_such_class'" in result.stderr and len(result.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# Data sets and heads


def test_lists_and_stratified_split(tmp_path, dataset):
    from resnetcli.datasets import load_eval_set, load_split

    images = sorted((dataset / "train").rglob("*.jpg"))
    listing = tmp_path / "list.csv"
    listing.write_text("path,label\n" + "".join(f"{os.path.relpath(p, tmp_path)},{p.parent.name}\n" for p in images))
    jsonl = tmp_path / "list.jsonl"
    jsonl.write_text("".join(json.dumps({"path": str(p), "label": p.parent.name}) + "\n" for p in images))
    for source in (listing, jsonl):
        split = load_split(source, val_split=0.5, seed=3)
        assert split.classes == tuple(CLASSES)
        assert {Path(s.path).resolve() for s in split.train + split.val} == {p.resolve() for p in images}
        assert not {s.path for s in split.train} & {s.path for s in split.val}
        assert [sum(s.label == c for s in split.val) for c in CLASSES] == [PER_SPLIT // 2] * 3
        assert all(Path(s.path).parent.name == s.label for s in split.train + split.val)
    assert load_split(listing, 0.5, seed=3) == load_split(listing, 0.5, seed=3)
    assert load_split(listing, 0.5, seed=3).val != load_split(listing, 0.5, seed=4).val
    assert len(load_eval_set(listing)) == len(images)
    assert len(load_eval_set(dataset)) == 3 * PER_SPLIT  # val/ only


def _smallest_of_each_family() -> list[str]:
    """One architecture per torchvision family (the module that builds it: resnet, vgg, vision_transformer,
    ...), the one with the fewest parameters: the head's place and the stages are the family's code, the
    same for every size, and a regnet_y_128gf (built on the CPU: RegNet cannot be built on the meta
    device) would take a minute for nothing more."""
    from torchvision import models

    from resnetcli import factory

    smallest: dict[str, tuple[int, str]] = {}
    for arch in factory.architecture_names():
        family = models.get_model_builder(arch).__module__
        size = factory.weights_enum(arch).DEFAULT.meta["num_params"]
        smallest[family] = min(smallest.get(family, (size, arch)), (size, arch))
    return sorted(arch for _, arch in smallest.values())


@pytest.mark.parametrize("arch", _smallest_of_each_family())
def test_head_replaced_for_every_family(arch):
    """A 7-class head for each family's classifier, on the meta device, with the logits coming out of it."""
    import torch

    from resnetcli import factory
    from resnetcli.heads import TrainMode, replace_head, trainable_names

    model = factory.meta_model(arch)
    categories = len(factory.weights_enum(arch).DEFAULT.meta["categories"])
    head = replace_head(model, categories, 7)
    layer = model.get_submodule(head.name)
    assert getattr(layer, "out_features", getattr(layer, "out_channels", None)) == 7
    crop = factory.weights_enum(arch).DEFAULT.transforms().crop_size[0]
    with torch.no_grad():
        assert model(torch.empty(2, 3, crop, crop, device="meta")).shape == (2, 7)
    names = [name for name, _ in model.named_parameters()]
    assert not any(name.split(".")[0] in ("aux1", "aux2", "AuxLogits") for name in names)
    only_head = trainable_names(model, head.name, TrainMode.head)
    assert only_head and all(name.startswith(head.name + ".") for name in only_head)
    stage = trainable_names(model, head.name, TrainMode.last_stage)
    assert set(only_head) < set(stage) < set(names)


def test_plot_without_matplotlib_is_one_clear_line(dataset, tmp_path):
    """A stand-in `matplotlib` package that fails to import, first on the path of a real subprocess."""
    blocker = tmp_path / "blocker" / "matplotlib"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named matplotlib')\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "resnetcli",
            "eval",
            str(dataset),
            "-w",
            "none",
            "-a",
            "resnet18",
            "--plot",
            str(tmp_path / "c.png"),
        ],
        cwd=REPO,
        env=env_without_resnet(PYTHONPATH=os.pathsep.join([str(blocker.parent), str(REPO)])),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == "resnet: error: --plot needs matplotlib: pip install 'resnetcli[plot]'"
    assert not (tmp_path / "c.png").exists()
