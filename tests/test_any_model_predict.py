"""predict, export and finetune with model specs: timm models and a user's nn.Module, from local weights.

No weights can be downloaded here, and none may be: every test runs with HF_HOME in a temporary
folder and HF_HUB_OFFLINE=1, and checks that folder afterwards. Checkpoints are made here from a
seeded random init with a steered head (see conftest.steer_head): each sample photo lands on its own
class, through the preprocessing timm's data config gives, so a wrong preprocessing or a wrong
tensor loaded shows up as a wrong class.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import REPO, STEERED_CLASSES, env_without_resnet, steer_head

timm = pytest.importorskip("timm", reason="timm is not installed (pip install 'resnetcli[timm]')")

TIMM_NAME = "resnet18"
STEMS = {name: name.removesuffix(".jpg") for name in STEERED_CLASSES}

USER_NET = textwrap.dedent(
    '''
    import torch
    from torch import nn


    class TinyNet(nn.Module):
        """A small CNN over 48x48 images that carries its preprocessing as timm's pretrained_cfg does."""

        pretrained_cfg = {
            "input_size": (3, 48, 48), "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3),
            "crop_pct": 0.8, "interpolation": "bilinear", "crop_mode": "center",
        }

        def __init__(self, num_classes=4):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(3, 16, 3, stride=2), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2), nn.ReLU(),
                nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            )
            self.fc = nn.Linear(32, num_classes)

        def forward(self, x):
            return self.fc(self.features(x))


    class Bare(TinyNet):
        """The same network without a pretrained_cfg: its preprocessing is unknown."""

        pretrained_cfg = None
    '''
)


def hf_env(hf_home: Path, **extra: str) -> dict:
    return env_without_resnet(
        HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra
    )


def resnet(*args: str, env: dict, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "resnetcli", *args],
        env=env,
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else []


@pytest.fixture(autouse=True)
def no_hub(tmp_path, monkeypatch) -> Path:
    """HF_HOME in an empty temporary folder and the Hub offline; the folder must stay empty."""
    hf_home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    yield hf_home


def timm_reference_transform(name: str = TIMM_NAME):
    """timm's own eval transform for the model, straight from timm (what resnetcli must use)."""
    model = timm.create_model(name, pretrained=False)
    config = timm.data.resolve_model_data_config(model)
    return config, timm.data.create_transform(**config)


def steered(model, transform, photos: list[Path], classes: list[int], features) -> None:
    import torch
    from PIL import Image

    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in photos])
    with torch.no_grad():
        steer_head(model, features(batch), classes)


@pytest.fixture(scope="module")
def timm_checkpoint(tmp_path_factory, sample_images) -> Path:
    """timm's resnet18, seeded random init, steered through timm's preprocessing; saved as .safetensors."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(TIMM_NAME, pretrained=False).eval()
    _, transform = timm_reference_transform()
    classes = [STEERED_CLASSES[p.name] for p in sample_images]
    steered(model, transform, sample_images, classes, lambda x: model.forward_head(model.forward_features(x), True))
    path = tmp_path_factory.mktemp("timm") / "resnet18-steered.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="module")
def imagenet_labels(tmp_path_factory) -> Path:
    """1000 labels: the steered classes named after their photos, the others numbered."""
    names = [f"other_{i}" for i in range(1000)]
    for photo, index in STEERED_CLASSES.items():
        names[index] = STEMS[photo]
    path = tmp_path_factory.mktemp("labels") / "labels.txt"
    path.write_text("\n".join(names) + "\n")
    return path


def top1(stdout: str) -> dict[str, str]:
    return {Path(r["input"]).name: r["top"][0]["label"] for r in map(json.loads, stdout.splitlines())}


def test_predict_timm_spec_with_a_safetensors_file_uses_timms_preprocessing(
    timm_checkpoint, imagenet_labels, sample_images, no_hub
):
    args = ["--debug", "predict", *map(str, sample_images), "--arch", f"timm:{TIMM_NAME}"]
    result = resnet(
        *args, "--weights", str(timm_checkpoint), "--labels", str(imagenet_labels), "-f", "jsonl", env=hf_env(no_hub)
    )
    assert result.returncode == 0, result.stderr
    assert top1(result.stdout) == STEMS
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert {(r["arch"], r["weights"]) for r in records} == {(f"timm:{TIMM_NAME}", str(timm_checkpoint))}
    config, transform = timm_reference_transform()
    resize, crop = transform.transforms[0].size, transform.transforms[1].size
    expected = (
        f"resize {resize}, crop {crop[0]}, mean {list(config['mean'])}, std {list(config['std'])}, "
        f"interpolation {config['interpolation']}, crop_mode {config['crop_mode']}"
    )
    assert f"timm:{TIMM_NAME}: preprocessing from timm's data config" in result.stderr
    assert expected in result.stderr, result.stderr
    assert files_under(no_hub) == []


def test_the_loaded_preprocessing_is_timms_transform(timm_checkpoint, sample_images):
    import torch
    from PIL import Image

    from resnetcli.factory import load_model

    loaded = load_model(f"timm:{TIMM_NAME}", str(timm_checkpoint))
    _, transform = timm_reference_transform()
    for photo in sample_images:
        image = Image.open(photo).convert("RGB")
        assert torch.equal(loaded.transforms(image), transform(image))
    # With no --labels, a 1000-class timm model has timm's ImageNet names.
    assert (
        loaded.categories[STEERED_CLASSES["cat.jpg"]]
        == timm.data.ImageNetInfo().label_descriptions()[281].split(",")[0]
    )


def write_hub_cache(hf_home: Path, repo: str, weights: Path) -> Path:
    """The Hugging Face cache layout (hub/models--ORG--NAME/{refs/main, snapshots/REV/FILE}) for one file."""
    revision = "0" * 40
    folder = hf_home / "hub" / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(revision)
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    target = snapshot / "model.safetensors"
    target.write_bytes(weights.read_bytes())
    return target


def test_predict_timm_tag_from_the_hugging_face_cache_and_only_from_there(
    timm_checkpoint, imagenet_labels, sample_images, no_hub
):
    from huggingface_hub import scan_cache_dir

    tagged = f"timm:{TIMM_NAME}.a1_in1k"
    repo = timm.models.get_pretrained_cfg(f"{TIMM_NAME}.a1_in1k").hf_hub_id
    # Not cached: a clear error naming --weights FILE (exit 3), and nothing fetched or written.
    missing = resnet("predict", str(sample_images[0]), "--arch", tagged, env=hf_env(no_hub))
    assert missing.returncode == 3, missing.stderr
    assert missing.stderr.count("\n") == 1 and "--weights FILE" in missing.stderr and repo in missing.stderr
    assert files_under(no_hub) == []

    cached = write_hub_cache(no_hub, repo, timm_checkpoint)
    assert [r.repo_id for r in scan_cache_dir(no_hub / "hub").repos] == [repo]  # huggingface_hub sees it
    before = files_under(no_hub)
    for offline in ("0", "1"):
        result = resnet(
            "predict",
            *map(str, sample_images),
            "--arch",
            tagged,
            "--labels",
            str(imagenet_labels),
            "-f",
            "jsonl",
            env=hf_env(no_hub, RESNET_OFFLINE=offline),
        )
        assert result.returncode == 0, result.stderr
        assert top1(result.stdout) == STEMS
        assert {json.loads(line)["weights"] for line in result.stdout.splitlines()} == {str(cached)}
    assert files_under(no_hub) == before


def test_predict_rejects_preprocess_with_a_spec(app, runner, timm_checkpoint, sample_images):
    args = ["predict", str(sample_images[0]), "--arch", f"timm:{TIMM_NAME}", "--weights", str(timm_checkpoint)]
    result = runner.invoke(app, [*args, "--preprocess", "IMAGENET1K_V1"])
    assert result.exit_code == 2
    assert "--preprocess names torchvision weights" in result.stderr


def test_input_size_changes_timms_crop_keeping_its_ratio(timm_checkpoint):
    from resnetcli.factory import load_model
    from resnetcli.inference import choose_transforms

    loaded = load_model(f"timm:{TIMM_NAME}", str(timm_checkpoint))
    changed = choose_transforms(loaded, input_size=160)
    assert changed.crop_size == [160] and changed.resize_size == [round(160 * 235 / 224)]
    assert changed.mean == loaded.transforms.mean and changed.interpolation == loaded.transforms.interpolation


# ---------------------------------------------------------------------------------------------
# A user's nn.Module


@pytest.fixture(scope="module")
def user_model(tmp_path_factory, sample_images):
    """net.py with TinyNet, and a state dict steered through TinyNet's own timm-style preprocessing."""
    import importlib.util

    import torch

    folder = tmp_path_factory.mktemp("user")
    (folder / "net.py").write_text(USER_NET)
    loader = importlib.util.spec_from_file_location("tiny_net_for_test", folder / "net.py")
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    torch.manual_seed(0)
    model = module.TinyNet().eval()
    transform = timm.data.create_transform(**timm.data.resolve_data_config({}, model=model))
    steered(model, transform, sample_images, list(range(len(sample_images))), model.features)
    weights = folder / "tiny.pth"
    torch.save(model.state_dict(), weights)
    labels = folder / "labels.txt"
    labels.write_text("\n".join(p.stem for p in sample_images) + "\n")
    return folder, weights, labels, model


def test_predict_user_file_spec_with_weights(app, runner, user_model, sample_images):
    folder, weights, labels, _ = user_model
    spec = f"{folder / 'net.py'}:TinyNet"
    args = ["predict", *map(str, sample_images), "--arch", spec, "--weights", str(weights), "--labels", str(labels)]
    result = runner.invoke(app, [*args, "-f", "jsonl"])
    assert result.exit_code == 0, result.stderr
    assert top1(result.stdout) == STEMS
    assert {json.loads(line)["arch"] for line in result.stdout.splitlines()} == {spec}


def test_user_spec_errors_name_what_is_missing(app, runner, user_model, sample_images):
    folder, weights, _, _ = user_model
    photo = str(sample_images[0])
    no_weights = runner.invoke(app, ["predict", photo, "--arch", f"{folder / 'net.py'}:TinyNet"])
    assert no_weights.exit_code == 2
    assert "give its weights: --weights FILE" in no_weights.stderr
    bare = runner.invoke(app, ["predict", photo, "--arch", f"{folder / 'net.py'}:Bare", "--weights", str(weights)])
    assert bare.exit_code == 2
    assert "no preprocessing known for Bare" in bare.stderr and bare.stderr.count("\n") == 1
    wrong = runner.invoke(app, ["predict", photo, "--arch", f"timm:{TIMM_NAME}", "--weights", str(weights)])
    assert wrong.exit_code == 3 and str(weights) in wrong.stderr


def test_a_fine_tuned_user_model_needs_no_arch_and_keeps_its_preprocessing(tmp_path, app, runner, user_model):
    """resnetcli's checkpoint format naming a spec: predict builds the spec, with the stored classes and sizes."""
    import torch

    from resnetcli.checkpoints import FINETUNE_FORMAT

    folder, weights, labels, model = user_model
    config = model.pretrained_cfg
    payload = {
        "format": FINETUNE_FORMAT,
        "state_dict": torch.load(weights, weights_only=True),
        "arch": f"{folder / 'net.py'}:Bare",
        "classes": labels.read_text().split(),
        "preprocessing": {"resize_size": 60, "crop_size": 48, "mean": list(config["mean"]),
                          "std": list(config["std"]), "interpolation": "bilinear"},
    }  # fmt: skip
    path = tmp_path / "tiny-ft.pth"
    torch.save(payload, path)
    from resnetcli.factory import load_model

    loaded = load_model(None, str(path))
    assert loaded.arch == payload["arch"] and loaded.categories == payload["classes"]
    assert (loaded.transforms.resize_size, loaded.transforms.crop_size) == ([60], [48])
    assert list(loaded.transforms.mean) == list(config["mean"])


# ---------------------------------------------------------------------------------------------
# export and finetune


def test_export_timm_spec_matches_torch_in_onnx_runtime(tmp_path, app, runner, timm_checkpoint, sample_images):
    import numpy as np
    import onnxruntime
    import torch
    from PIL import Image

    from resnetcli.factory import load_model
    from resnetcli.onnxmeta import ModelInfo

    out = tmp_path / "r18.onnx"
    spec = f"timm:{TIMM_NAME}"
    result = runner.invoke(app, ["export", spec, "--weights", str(timm_checkpoint), "-o", str(out), "-f", "json"])
    assert result.exit_code == 0, result.stderr
    import onnx

    info, problems = ModelInfo.from_metadata({p.key: p.value for p in onnx.load(str(out)).metadata_props})
    assert problems == []
    config, transform = timm_reference_transform()
    assert info.arch == spec and info.preprocessing.crop_size == (224,)
    assert info.preprocessing.resize_size == (transform.transforms[0].size,)
    assert info.preprocessing.mean == tuple(config["mean"]) and info.preprocessing.interpolation == "bicubic"
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p in sample_images])
    with torch.no_grad():
        expected = load_model(spec, str(timm_checkpoint)).model(batch).numpy()
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    actual = session.run(None, {session.get_inputs()[0].name: batch.numpy()})[0]
    assert np.abs(actual - expected).max() <= 1e-4 * (1 + np.abs(expected).max())
    assert [STEERED_CLASSES[p.name] for p in sample_images] == list(actual.argmax(1))


def test_finetune_a_timm_spec_then_predict_without_arch(tmp_path, app, runner, no_hub):
    """`resnet finetune --arch timm:NAME` fine-tunes timm's model; its checkpoint names the spec and
    keeps timm's preprocessing (or the --input-size it was trained at), and predict needs no --arch."""
    from test_finetune import CLASSES, make_dataset

    from resnetcli.checkpoints import read_checkpoint

    data = make_dataset(tmp_path / "data", per_split=2)
    out = tmp_path / "ft.pth"
    common = ["finetune", str(data), "--arch", f"timm:{TIMM_NAME}", "--weights", "none", "--workers", "1"]
    trained = runner.invoke(app, [*common, "--epochs", "2", "--batch-size", "8", "-o", str(out), "-f", "json"])
    assert trained.exit_code == 0, trained.stderr
    result = json.loads(trained.stdout)
    assert result["arch"] == f"timm:{TIMM_NAME}" and list(result["classes"]) == CLASSES
    small = tmp_path / "ft-64.pth"
    trained = runner.invoke(app, [*common, "--epochs", "1", "--input-size", "64", "-o", str(small)])
    assert trained.exit_code == 0, trained.stderr
    assert read_checkpoint(small).preprocessing["crop_size"] == 64
    stored = read_checkpoint(out)
    _, transform = timm_reference_transform()
    assert stored.arch == f"timm:{TIMM_NAME}"
    assert (stored.preprocessing["resize_size"], stored.preprocessing["crop_size"]) == (
        transform.transforms[0].size,
        224,
    )
    photos = sorted((data / "val").rglob("*.jpg"))
    predicted = runner.invoke(app, ["predict", *map(str, photos), "--weights", str(out), "-f", "jsonl"])
    assert predicted.exit_code == 0, predicted.stderr
    records = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert {r["arch"] for r in records} == {f"timm:{TIMM_NAME}"}
    assert {r["top"][0]["label"] for r in records} <= set(CLASSES) and len(records[0]["top"]) == len(CLASSES)
    assert files_under(no_hub) == [] and os.environ["HF_HUB_OFFLINE"] == "1"


def test_spec_weights_errors_and_offline_urls(app, runner, sample_images, no_hub):
    photo = str(sample_images[0])
    unknown = runner.invoke(app, ["predict", photo, "--arch", "timm:resnet18x"])
    assert unknown.exit_code == 2 and "timm has no model 'resnet18x'" in unknown.stderr and "resnet18" in unknown.stderr
    url = "http://127.0.0.1:9/weights/resnet18-0123abcd.pth"  # hash-named, as the cache wants
    offline = runner.invoke(app, ["predict", photo, "--arch", f"timm:{TIMM_NAME}", "--weights", url, "--offline"])
    assert offline.exit_code == 3 and offline.stderr.count("\n") == 1, offline.stderr
    assert "offline" in offline.stderr
    missing = runner.invoke(app, ["predict", photo, "--arch", f"timm:{TIMM_NAME}", "--weights", "nothere.safetensors"])
    assert missing.exit_code == 2 and "no such weights file" in missing.stderr
    assert files_under(no_hub) == []


def test_export_a_user_module_with_its_timm_style_preprocessing(tmp_path, app, runner, user_model):
    import onnx

    from resnetcli.onnxmeta import ModelInfo

    folder, weights, labels, model = user_model
    out = tmp_path / "tiny.onnx"
    spec = f"{folder / 'net.py'}:TinyNet"
    args = ["export", spec, "--weights", str(weights), "--labels", str(labels), "-o", str(out), "-f", "json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    info, problems = ModelInfo.from_metadata({p.key: p.value for p in onnx.load(str(out)).metadata_props})
    assert problems == [] and info.arch == spec and list(info.classes) == labels.read_text().split()
    config = model.pretrained_cfg
    assert info.preprocessing.crop_size == (48,) and info.preprocessing.resize_size == (int(48 / config["crop_pct"]),)
    assert info.preprocessing.mean == config["mean"] and info.preprocessing.std == config["std"]
