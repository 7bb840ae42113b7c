"""The factory split: checkpoint formats and hostile files (issues 9, 11), messages (issue 13), building
without process-wide patching (issue 10), and whole paths the README claims (issue 16)."""

from __future__ import annotations

import json
import os
import threading
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, penultimate_features, steer_head
from helpers import one_line_error, run_cli


def top1_indices(stdout: str) -> dict[str, int]:
    records = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    return {Path(r["input"]).name: r["top"][0]["index"] for r in records}


def top1_labels(stdout: str) -> dict[str, str]:
    records = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    return {Path(r["input"]).name: r["top"][0]["label"] for r in records}


def predict_args(sample_images, *extra):
    return ["predict", *sample_images, "-k", "1", "--format", "jsonl", *extra]


# ---------------------------------------------------------------------------------------------
# Files that are not checkpoints (issue 9, item 10)


def _zip_with_malformed_pickle(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00(X\x03\x00\x00\x00fooq\x01h\x99")
        archive.writestr("archive/version", b"3\n")


def _onnx_model(path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    onnx.save(helper.make_model(graph, producer_name="pytorch"), str(path))


NOT_CHECKPOINTS = {
    "passwd.pth": (lambda p: p.write_bytes(Path("/etc/passwd").read_bytes()), "a text file"),
    "notes.pth": (lambda p: p.write_text("these are not weights\nat all\n"), "a text file"),
    "garbage.pth": (lambda p: p.write_bytes(bytes(range(7, 250)) * 5), "unrecognised binary data"),
    "empty.pth": (lambda p: p.write_bytes(b""), "an empty file"),
    "malformed.pth": (_zip_with_malformed_pickle, "a zip archive that is not a readable PyTorch checkpoint"),
    "error-page.pth": (
        lambda p: p.write_text("<!DOCTYPE html>\n<html><body>403 Forbidden</body></html>\n"),
        "an HTML page (an error page saved in place of the file?)",
    ),
    "lfs.pth": (
        lambda p: p.write_text(
            "version https://git-lfs.github.com/spec/v1\noid sha256:" + "ab" * 32 + "\nsize 46830571\n"
        ),
        "a Git LFS pointer, not the file itself (run `git lfs pull`)",
    ),
    "config.pth": (
        lambda p: p.write_text(json.dumps({"arch": "resnet18", "classes": ["a", "b"]})),
        "a JSON or text document",
    ),
    "photo.pth": (lambda p: p.write_bytes((REPO / "sample_images" / "cat.jpg").read_bytes()), "an image"),
    # An ONNX model under a checkpoint's name (a file named *.onnx runs on ONNX Runtime instead: test_onnx_predict).
    "exported.pth": (_onnx_model, "an ONNX model (run it with ONNX Runtime, or give the PyTorch checkpoint)"),
}


@pytest.mark.parametrize("name", NOT_CHECKPOINTS)
def test_a_file_that_is_not_a_checkpoint_is_named_in_one_line_exit_3(runner, app, tmp_path, sample_images, name):
    make, what = NOT_CHECKPOINTS[name]
    path = tmp_path / name
    make(path)
    result = run_cli(runner, app, "predict", sample_images[0], "--arch", "resnet18", "--weights", path)
    assert result.exit_code == 3
    line = one_line_error(result)
    assert line.startswith(f"resnet: error: {path}: not a PyTorch checkpoint: {what}")
    assert "weights_only" not in line
    assert result.stdout == ""


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_device_as_weights_is_not_a_regular_file(runner, app, tmp_path, sample_images, kind):
    if kind == "fifo":
        path = tmp_path / "weights.pth"
        os.mkfifo(path)
        what = "a FIFO"
    else:
        path, what = Path("/dev/zero"), "a device"
    for command in (["predict", sample_images[0], "--arch", "resnet18"], ["summary", "resnet18"]):
        result = run_cli(runner, app, *command, "--weights", path)
        assert result.exit_code == 2
        assert (
            one_line_error(result)
            == f"resnet: error: --weights {path}: not a regular file ({what}), not a checkpoint file"
        )


# ---------------------------------------------------------------------------------------------
# Enormous declared tensors (issue 9, item 11)


def test_a_zero_stride_head_claiming_2e8_rows_is_refused_before_anything_is_built(
    runner, app, tmp_path, sample_images, steered_resnet18
):
    import torch

    state_dict = dict(steered_resnet18.state_dict)
    state_dict["fc.weight"] = torch.zeros(1).expand(200_000_000, 512)
    state_dict["fc.bias"] = torch.zeros(1).expand(200_000_000)
    path = tmp_path / "huge.pth"
    torch.save(state_dict, path)
    assert path.stat().st_size < 60_000_000
    result = run_cli(runner, app, "predict", sample_images[0], "--arch", "resnet18", "--weights", path)
    assert result.exit_code == 3
    assert one_line_error(result) == (
        f"resnet: error: {path}: refused: fc.weight declares [200000000, 512] but its data holds only 4 bytes"
    )


def test_a_head_of_a_million_classes_is_refused_from_its_declared_shape():
    import torch

    from resnetcli import checkpoints
    from resnetcli.factory import expected_shapes

    declared = {
        "fc.weight": torch.empty(1_000_000, 512, device="meta"),
        "fc.bias": torch.empty(1_000_000, device="meta"),
    }
    problems = checkpoints.declared_size_problems(declared, expected_shapes("resnet18", 1000))
    assert problems == [
        f"fc.weight declares 1000000 classes (more than {checkpoints.MAX_CLASSES:,})",
        f"fc.bias declares 1000000 classes (more than {checkpoints.MAX_CLASSES:,})",
    ]
    fitting = {"fc.weight": torch.empty(3, 512, device="meta")}
    assert checkpoints.declared_size_problems(fitting, expected_shapes("resnet18", 1000)) == []


# ---------------------------------------------------------------------------------------------
# Checkpoint formats users already have (issue 11)


def test_torchvision_reference_train_checkpoint_loads_weights_only_and_names_its_arch(
    runner, app, tmp_path, sample_images, steered_resnet18
):
    import argparse

    import torch
    from torchvision import models

    model = models.resnet18()
    model.load_state_dict(steered_resnet18.state_dict)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(1, 3, 64, 64)).sum().backward()
    optimizer.step()
    model.load_state_dict(steered_resnet18.state_dict)  # the step moved the weights; keep the steered ones
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=30)
    args = argparse.Namespace(model="resnet18", lr=0.1, epochs=90, data_path="/data/imagenet", weights=None)
    path = tmp_path / "model_89.pth"
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "lr_scheduler": scheduler.state_dict(),
            "epoch": 89,
            "args": args,
        },
        path,
    )

    result = run_cli(runner, app, *predict_args(sample_images, "--weights", path))  # no --arch: args.model
    assert result.exit_code == 0, result.stderr
    assert top1_indices(result.stdout) == steered_resnet18.expected
    assert all(json.loads(line)["arch"] == "resnet18" for line in result.stdout.splitlines())


def test_lightning_state_dict_with_model_prefix_loads(runner, app, tmp_path, sample_images, steered_resnet18):
    import torch

    path = tmp_path / "epoch=3-step=400.ckpt"
    torch.save(
        {
            "epoch": 3,
            "global_step": 400,
            "pytorch-lightning_version": "2.4.0",
            "state_dict": {f"model.{k}": v for k, v in steered_resnet18.state_dict.items()},
        },
        path,
    )
    result = run_cli(runner, app, *predict_args(sample_images, "--arch", "resnet18", "--weights", path))
    assert result.exit_code == 0, result.stderr
    assert top1_indices(result.stdout) == steered_resnet18.expected


def test_safetensors_file_loads(runner, app, tmp_path, sample_images, steered_resnet18):
    from safetensors.torch import save_file

    path = tmp_path / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in steered_resnet18.state_dict.items()}, str(path), metadata={"format": "pt"})
    result = run_cli(runner, app, *predict_args(sample_images, "--arch", "resnet18", "--weights", path))
    assert result.exit_code == 0, result.stderr
    assert top1_indices(result.stdout) == steered_resnet18.expected


@pytest.fixture(scope="module")
def fine_tuned_resnet18(tmp_path_factory, sample_images):
    """A checkpoint in resnetcli's fine-tuned format: four classes named after the photos, steered
    through its own stored preprocessing (160-pixel crops, not the weights' 224)."""
    import torch
    from torchvision import models

    torch.manual_seed(1)
    model = models.resnet18(num_classes=4).eval()
    preprocessing = {
        "resize_size": 176,
        "crop_size": 160,
        "mean": [0.5, 0.5, 0.5],
        "std": [0.25, 0.25, 0.25],
        "interpolation": "bilinear",
    }
    from resnetcli.checkpoints import transforms_for

    transforms = transforms_for(preprocessing, models.ResNet18_Weights.DEFAULT.transforms())
    features = penultimate_features(model, sample_images, transforms)
    steer_head(model, features, list(range(len(sample_images))))
    classes = [p.stem for p in sample_images]
    path = tmp_path_factory.mktemp("finetuned") / "pets.pth"
    torch.save(
        {
            "format": "resnetcli.finetune/1",
            "state_dict": model.state_dict(),
            "arch": "resnet18",
            "classes": classes,
            "preprocessing": preprocessing,
            "base_weights": "ResNet18_Weights.IMAGENET1K_V1",
            "metrics": {"val_top1": 1.0},
            "resnetcli_version": "0.0.0",
        },
        path,
    )
    return path, classes


def test_fine_tuned_format_gives_class_names_arch_and_preprocessing(runner, app, sample_images, fine_tuned_resnet18):
    import torch

    from resnetcli.factory import load_model

    path, classes = fine_tuned_resnet18
    assert isinstance(torch.load(path, weights_only=True), dict)
    result = run_cli(runner, app, *predict_args(sample_images, "--weights", path))
    assert result.exit_code == 0, result.stderr
    assert top1_labels(result.stdout) == {p.name: p.stem for p in sample_images}
    loaded = load_model(None, str(path))
    assert (loaded.arch, loaded.categories) == ("resnet18", classes)
    assert (loaded.transforms.crop_size, loaded.transforms.resize_size) == ([160], [176])
    assert (loaded.transforms.mean, loaded.transforms.std) == ([0.5, 0.5, 0.5], [0.25, 0.25, 0.25])


def test_checkpoint_that_needs_code_is_refused_in_one_clean_line_and_loads_with_trust(
    runner, app, tmp_path, sample_images, steered_resnet18
):
    import datetime

    import torch

    path = tmp_path / "with-extras.pth"
    torch.save({"model": steered_resnet18.state_dict, "saved": datetime.date(2024, 5, 1)}, path)
    refused = run_cli(runner, app, *predict_args(sample_images, "--arch", "resnet18", "--weights", path))
    assert refused.exit_code == 3
    assert one_line_error(refused) == (
        f"resnet: error: {path}: refused to load: the file needs to run code to be read (it holds datetime.date); "
        "if you trust its source, --trust-checkpoint loads it and runs that code"
    )
    trusted = run_cli(
        runner, app, *predict_args(sample_images, "--arch", "resnet18", "--weights", path, "--trust-checkpoint")
    )
    assert trusted.exit_code == 0, trusted.stderr
    assert top1_indices(trusted.stdout) == steered_resnet18.expected
    for command in (["summary", "resnet18", "--params", "--filter", "fc.b"], ["features", "resnet18", "--list-nodes"]):
        refused = run_cli(runner, app, *command, "--weights", path, "--format", "json")
        assert refused.exit_code == 3
        assert one_line_error(refused).startswith(f"resnet: error: {path}: refused to load: the file needs to run code")
        trusted = run_cli(runner, app, *command, "--weights", path, "--format", "json", "--trust-checkpoint")
        assert trusted.exit_code == 0, trusted.stderr
    assert json.loads(trusted.stdout)[0] == {"node": "x"}


def test_code_in_a_checkpoint_runs_only_behind_trust_checkpoint(tmp_path):
    import torch

    from resnetcli.checkpoints import read_checkpoint
    from resnetcli.errors import CheckpointError

    marker = tmp_path / "ran"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": Exploit()}, path)
    with pytest.raises(CheckpointError):
        read_checkpoint(path)
    assert not marker.exists()
    with pytest.raises(CheckpointError):  # the file's code ran, and what it left is no state dict
        read_checkpoint(path, trust=True)
    assert marker.exists()
    # The one weights_only=False in the package is the trusted branch of checkpoints._torch_load.
    hits = [
        (p.name, line.strip())
        for p in (REPO / "resnetcli").rglob("*.py")
        for line in p.read_text().splitlines()
        if "load(" in line and "weights_only=False" in line
    ]
    assert hits == [
        (
            "checkpoints.py",
            'return torch.load(path, map_location="cpu", weights_only=False)  # behind --trust-checkpoint only',
        )
    ]


# ---------------------------------------------------------------------------------------------
# Messages (issue 13)


def test_wrong_architecture_in_predict_is_concise_and_names_the_right_one(runner, app, sample_images, steered_resnet18):
    from torchvision import models

    ours = {k: list(v.shape) for k, v in models.resnet50().state_dict().items()}
    theirs = {k: list(v.shape) for k, v in steered_resnet18.state_dict.items()}
    count = (
        len(set(ours) - set(theirs))
        + len(set(theirs) - set(ours))
        + sum(1 for k in set(ours) & set(theirs) if ours[k] != theirs[k])
    )
    result = run_cli(runner, app, "predict", sample_images[0], "--arch", "resnet50", "--weights", steered_resnet18.path)
    assert result.exit_code == 3
    line = one_line_error(result)
    assert line.startswith(f"resnet: error: {steered_resnet18.path}: does not fit resnet50: missing ")
    assert line.endswith(f" (and {count - 3} more); this looks like a resnet18 checkpoint (--arch resnet18)")
    assert len(line) < 400


def test_summary_and_predict_say_the_same_about_a_checkpoint_of_another_architecture(
    runner, app, sample_images, steered_resnet18
):
    predicted = run_cli(
        runner, app, "predict", sample_images[0], "--arch", "resnet50", "--weights", steered_resnet18.path
    )
    summarised = run_cli(runner, app, "summary", "resnet50", "--weights", steered_resnet18.path)
    assert (predicted.exit_code, summarised.exit_code) == (3, 3)
    assert summarised.stdout == ""
    assert one_line_error(summarised) == one_line_error(predicted)
    assert one_line_error(summarised).endswith("; this looks like a resnet18 checkpoint (--arch resnet18)")


def test_unknown_weights_list_each_name_once_and_suggest_by_similarity(runner, app, sample_images):
    from torchvision.models import ResNet50_Weights

    names = [m.name for m in ResNet50_Weights] + ["DEFAULT", "none"]
    result = run_cli(runner, app, "predict", sample_images[0], "--arch", "resnet50", "--weights", "V2")
    assert result.exit_code == 2
    assert one_line_error(result) == (
        f"resnet: error: unknown weights 'V2' for resnet50: choose one of {', '.join(names)}, "
        "a checkpoint path or a URL; "
        "did you mean 'IMAGENET1K_V2'?"
    )
    assert result.stderr.count("DEFAULT") == 1


def test_a_checkpoint_in_the_cache_is_usable_by_name_from_any_folder_and_a_local_file_wins(
    runner, app, tmp_path, sample_images, steered_resnet18, monkeypatch
):
    import torch

    name = steered_resnet18.path.name
    imported = run_cli(runner, app, "fetch", "--from-file", steered_resnet18.path)
    assert imported.exit_code == 0, imported.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = run_cli(runner, app, *predict_args(sample_images, "--arch", "resnet18", "--weights", name))
    assert result.exit_code == 0, result.stderr
    assert top1_indices(result.stdout) == steered_resnet18.expected

    three = dict(steered_resnet18.state_dict)
    three["fc.weight"], three["fc.bias"] = three["fc.weight"][:3].clone(), three["fc.bias"][:3].clone()
    torch.save(three, elsewhere / name)  # same name here: the local file wins
    local = run_cli(runner, app, *predict_args(sample_images, "--arch", "resnet18", "--weights", name))
    assert local.exit_code == 0, local.stderr
    assert {r["top"][0]["label"] for r in map(json.loads, local.stdout.splitlines())} <= {
        "class_0",
        "class_1",
        "class_2",
    }


# ---------------------------------------------------------------------------------------------
# No process-wide patching (issue 10)


def test_two_threads_building_different_models_at_once_each_get_their_exact_weights(steered_resnet18, tmp_path):
    import torch
    from torchvision import models

    from resnetcli.factory import build_model, load_model, resolve_weights

    torch.manual_seed(3)
    squeeze = models.squeezenet1_1().state_dict()
    torch.manual_seed(4)
    mobile = models.mobilenet_v3_small(num_classes=5).eval()
    mobile_path = tmp_path / "mobile.pth"
    torch.save(mobile.state_dict(), mobile_path)
    jobs = {
        "resnet18 checkpoint": (
            lambda: load_model("resnet18", str(steered_resnet18.path)),
            steered_resnet18.state_dict,
        ),
        "squeezenet1_1 pretrained": (
            lambda: build_model(resolve_weights("squeezenet1_1"), state_dict=squeeze),
            squeeze,
        ),
        "mobilenet checkpoint": (lambda: load_model("mobilenet_v3_small", str(mobile_path)), mobile.state_dict()),
    }
    for _ in range(3):
        barrier = threading.Barrier(len(jobs))
        results, errors = {}, []

        def work(name, build, barrier=barrier, results=results, errors=errors):
            try:
                barrier.wait(timeout=30)
                results[name] = build()
            except Exception as error:  # reported below with the job's name
                errors.append((name, error))

        threads = [threading.Thread(target=work, args=(name, build)) for name, (build, _) in jobs.items()]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert errors == []
        for name, (_, expected) in jobs.items():
            got = results[name].model.state_dict()
            assert set(got) == set(expected), name
            assert all(torch.equal(got[k], expected[k]) for k in expected), name
    assert "get_state_dict" not in models.SqueezeNet1_1_Weights.IMAGENET1K_V1.__dict__


# ---------------------------------------------------------------------------------------------
# README claims (issue 16)


def test_fine_tuned_inception_v3_is_built_and_preprocessed_as_its_weights_configure_it(tmp_path):
    import torch
    from torchvision import models

    from resnetcli.factory import load_model

    torch.manual_seed(0)
    # torchvision's recipe: inception_v3(weights=IMAGENET1K_V1) (input transform on, aux head kept),
    # both heads replaced.
    fine_tuned = models.Inception3(aux_logits=True, transform_input=True, init_weights=False).eval()
    fine_tuned.fc = torch.nn.Linear(2048, 3)
    fine_tuned.AuxLogits.fc = torch.nn.Linear(768, 3)
    path = tmp_path / "inception-finetuned.pth"
    torch.save(fine_tuned.state_dict(), path)
    loaded = load_model("inception_v3", str(path))
    preset = models.Inception_V3_Weights.IMAGENET1K_V1.transforms()
    assert (
        (loaded.transforms.crop_size, loaded.transforms.resize_size)
        == (preset.crop_size, preset.resize_size)
        == ([299], [342])
    )
    assert loaded.model.transform_input is True
    assert loaded.categories == ["class_0", "class_1", "class_2"]
    batch = torch.rand(2, 3, 299, 299)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(batch), fine_tuned(batch))


def test_fine_tuned_vit_at_384_is_built_and_preprocessed_as_its_weights_configure_it(tmp_path):
    import torch
    from torchvision import models

    from resnetcli.factory import load_model

    torch.manual_seed(0)
    fine_tuned = models.vit_b_16(image_size=384).eval()
    fine_tuned.heads.head = torch.nn.Linear(768, 2)
    path = tmp_path / "vit-finetuned.pth"
    torch.save({"model": fine_tuned.state_dict()}, path)
    loaded = load_model("vit_b_16", str(path))
    preset = models.ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1.transforms()
    assert (
        (loaded.transforms.crop_size, loaded.transforms.resize_size)
        == (preset.crop_size, preset.resize_size)
        == ([384], [384])
    )
    assert loaded.model.image_size == 384
    batch = torch.rand(1, 3, 384, 384)
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(batch), fine_tuned(batch))


def test_whole_pretrained_path_from_a_mirror_through_the_cache_with_torchvisions_labels(
    runner, app, sample_images, steered_resnet18, weight_server, checkpoint_dir, monkeypatch
):
    """`predict --arch resnet18` with DEFAULT: torchvision's weights URL names the steered file (name and
    hash served), --mirror points at the loopback server, the file lands in the cache, labels are
    meta["categories"]; a second, offline run reads the cache."""
    from torchvision.models import ResNet18_Weights

    weights = ResNet18_Weights.DEFAULT
    name = steered_resnet18.path.name
    monkeypatch.setattr(weights.value, "url", f"https://download.pytorch.org/models/{name}")
    weight_server.add(steered_resnet18.path)
    expected = {image: weights.meta["categories"][index] for image, index in steered_resnet18.expected.items()}

    result = run_cli(runner, app, *predict_args(sample_images, "--arch", "resnet18", "--mirror", weight_server.url))
    assert result.exit_code == 0, result.stderr
    assert top1_labels(result.stdout) == expected
    assert (checkpoint_dir / name).read_bytes() == steered_resnet18.path.read_bytes()
    offline = run_cli(runner, app, *predict_args(sample_images, "--arch", "resnet18", "--offline"))
    assert offline.exit_code == 0, offline.stderr
    assert top1_labels(offline.stdout) == expected
