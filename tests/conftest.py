"""Shared fixtures: an isolated cache, the CLI runner, real photos, a discriminating checkpoint, and a
real HTTP server on 127.0.0.1 serving weight files the tests generate."""

from __future__ import annotations

import hashlib
import http.server
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parent.parent
SAMPLE_DIR = REPO / "sample_images"
#: ImageNet classes each sample photo is steered to by the discriminating head.
STEERED_CLASSES = {"astronaut.jpg": 0, "cat.jpg": 281, "coffee.jpg": 967, "rocket.jpg": 812}


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch) -> Path:
    """Every test gets its own TORCH_HOME and XDG cache (completion names), and no resnetcli settings."""
    home = tmp_path_factory.mktemp("torch_home")
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg_cache")))
    for name in ("RESNET_OFFLINE", "RESNET_MIRROR", "RESNET_TIMEOUT"):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture
def checkpoint_dir(isolated_cache: Path) -> Path:
    return isolated_cache / "hub" / "checkpoints"


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def model_args(steered_resnet18) -> list[str]:
    """`--arch` and `--weights` of the discriminating resnet18 checkpoint."""
    return ["--arch", "resnet18", "--weights", str(steered_resnet18.path)]


@pytest.fixture
def app():
    from resnetcli.cli import app

    return app


@pytest.fixture(scope="session")
def sample_images() -> list[Path]:
    return sorted(SAMPLE_DIR.glob("*.jpg"))


def sha256_file(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def save_hub_style(state_dict, folder: Path, stem: str) -> Path:
    """Save a state dict as torchvision names its files: STEM-<sha256 prefix>.pth."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    temporary = folder / f"{stem}.tmp"
    torch.save(state_dict, temporary)
    final = folder / f"{stem}-{sha256_file(temporary)[:8]}.pth"
    temporary.rename(final)
    return final


def penultimate_features(model, images: list[Path], transforms):
    """The pooled features in front of the classifier, through torchvision's own preprocessing."""
    import torch
    from PIL import Image

    captured = {}
    handle = model.avgpool.register_forward_hook(lambda m, i, o: captured.setdefault("x", o.flatten(1)))
    batch = torch.stack([transforms(Image.open(p).convert("RGB")) for p in images])
    with torch.no_grad():
        model(batch)
    handle.remove()
    return captured["x"]


def steer_head(model, features, classes: list[int]) -> None:
    """Set the classifier so that each feature row lands on its own class by a wide margin."""
    import torch

    mean = features.mean(0)
    centred = features - mean
    rows = centred / centred.norm(dim=1, keepdim=True)
    with torch.no_grad():
        model.fc.weight.zero_()
        model.fc.bias.zero_()
        for row, cls in zip(rows, classes):
            model.fc.weight[cls] = row * 50
        model.fc.bias.copy_(-(model.fc.weight @ mean))


@dataclass
class Checkpoint:
    path: Path
    state_dict: dict
    expected: dict  # image file name -> class index


@pytest.fixture(scope="session")
def steered_resnet18(tmp_path_factory, sample_images) -> Checkpoint:
    """A resnet18 checkpoint whose head sends each sample photo to its own ImageNet class."""
    import torch
    from torchvision import models

    torch.manual_seed(0)
    model = models.resnet18(weights=None).eval()
    transforms = models.ResNet18_Weights.DEFAULT.transforms()
    features = penultimate_features(model, sample_images, transforms)
    steer_head(model, features, [STEERED_CLASSES[p.name] for p in sample_images])
    state_dict = {k: v.clone() for k, v in model.state_dict().items()}
    path = save_hub_style(state_dict, tmp_path_factory.mktemp("ckpt"), "resnet18-steered")
    return Checkpoint(path, state_dict, dict(STEERED_CLASSES))


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@dataclass
class WeightServer:
    root: Path
    url: str

    def add(self, path: Path, name: str | None = None) -> str:
        target = self.root / (name or path.name)
        shutil.copyfile(path, target)
        return f"{self.url}/{target.name}"


@pytest.fixture(scope="session")
def weight_server(tmp_path_factory):
    """A real HTTP server on 127.0.0.1 serving files from a folder the tests fill."""
    root = tmp_path_factory.mktemp("served")
    handler = lambda *args, **kwargs: _QuietHandler(*args, directory=str(root), **kwargs)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield WeightServer(root, f"http://127.0.0.1:{server.server_address[1]}")
    server.shutdown()
    server.server_close()


def cache_leftovers(folder: Path) -> list[str]:
    """Files in a cache folder other than complete weight files and resnetcli's records and locks."""
    if not folder.exists():
        return []
    leftovers = []
    for path in folder.rglob("*"):
        if path.is_file() and (path.name.endswith(".partial") or path.name.endswith(".tmp")):
            leftovers.append(str(path.relative_to(folder)))
    return leftovers


def env_without_resnet(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESNET_")}
    env.update(extra)
    return env
