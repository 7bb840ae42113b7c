"""The fast path gives the naive pipeline's answers: same top-5 labels, probabilities within 1e-3."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from conftest import STEERED_CLASSES, save_hub_style

TOLERANCE = 1e-3
#: Scales the steered head's logits down so that the top classes share the probability mass
#: (top-1 0.66-0.90, top-2 0.06-0.19): a wrong pipeline moves these by far more than 1e-3.
SOFTENING = 0.02


def naive_probabilities(arch: str, state_dict: dict, images: list[Path]):
    """The tutorial pipeline: random init + load_state_dict, Image.open().convert("RGB"),
    weights.transforms(), one image at a time under no_grad, softmax."""
    import torch
    from PIL import Image
    from torchvision import models

    model = models.get_model(arch, weights=None)
    model.load_state_dict(state_dict)
    model.eval()
    preprocess = models.get_model_weights(arch).DEFAULT.transforms()
    rows = []
    for path in images:
        with torch.no_grad():
            rows.append(model(preprocess(Image.open(path).convert("RGB")).unsqueeze(0)).softmax(dim=1)[0])
    return torch.stack(rows)


def fast_probabilities(checkpoint: Path, arch: str, images: list[Path], plan=None):
    """The fast path as `resnet predict` uses it: the registry's model through optimize_for_inference, batched."""
    import torch

    from resnetcli import fastpath
    from resnetcli.factory import load_model
    from resnetcli.images import load_image

    loaded = load_model(arch, str(checkpoint))
    crop = min(loaded.transforms.crop_size)
    model = fastpath.optimize_for_inference(
        loaded.model, example_shape=(len(images), 3, crop, crop), plan=plan or fastpath.plan_for("cpu")
    )
    batch = torch.stack([loaded.transforms(load_image(path)) for path in images])
    with torch.inference_mode():
        model(batch)  # the first batch checks the traced graph against the eager model, and adopts it
        probabilities = torch.softmax(model(batch), dim=1)
    return probabilities, model


@pytest.fixture(scope="module")
def soft_steered(steered_resnet18, tmp_path_factory):
    """The steered resnet18 with its head's logits scaled down: each photo still lands on its own class."""
    state_dict = dict(steered_resnet18.state_dict)
    state_dict["fc.weight"] = state_dict["fc.weight"] * SOFTENING
    state_dict["fc.bias"] = state_dict["fc.bias"] * SOFTENING
    return save_hub_style(state_dict, tmp_path_factory.mktemp("soft"), "resnet18-soft"), state_dict


@pytest.fixture(scope="module")
def large_photos(sample_images, tmp_path_factory) -> list[Path]:
    """The sample photos upscaled 6x (2.4-9.8 megapixels), so that draft decoding kicks in."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("large")
    large = []
    for path in sample_images:
        with Image.open(path) as image:
            target = folder / path.name
            image.resize((image.width * 6, image.height * 6), Image.Resampling.BICUBIC).save(target, quality=92)
            large.append(target)
    return large


def test_fast_path_matches_naive_pipeline(soft_steered, sample_images):
    checkpoint, state_dict = soft_steered
    expected = naive_probabilities("resnet18", state_dict, sample_images)
    got, model = fast_probabilities(checkpoint, "resnet18", sample_images)

    assert model.levers == ("torchscript_onednn",)
    assert [STEERED_CLASSES[p.name] for p in sample_images] == expected.argmax(dim=1).tolist()
    assert got.topk(5).indices.tolist() == expected.topk(5).indices.tolist()
    assert (got - expected).abs().max().item() <= TOLERANCE
    assert expected.max(dim=1).values.max().item() < 0.95  # the probabilities are spread: the check has teeth


def test_fast_path_matches_naive_pipeline_resnet50(tmp_path, sample_images):
    import torch
    from torchvision import models

    torch.manual_seed(0)
    state_dict = models.resnet50(weights=None).state_dict()
    checkpoint = save_hub_style(state_dict, tmp_path, "resnet50-random")
    expected = naive_probabilities("resnet50", state_dict, sample_images)
    got, _ = fast_probabilities(checkpoint, "resnet50", sample_images)

    assert (got - expected).abs().max().item() <= TOLERANCE
    assert got.topk(5).indices.tolist() == expected.topk(5).indices.tolist()


def test_gpu_plan_half_precision_keeps_answers(soft_steered, sample_images):
    """The CUDA plan (float16, eager, batch norm folded) run on the CPU: same top-5, half-precision tolerance."""
    from resnetcli import fastpath

    checkpoint, state_dict = soft_steered
    cuda_plan = fastpath.plan_for("cuda")
    assert (cuda_plan.dtype, cuda_plan.torchscript_onednn, cuda_plan.fold_batchnorm) == ("float16", False, True)

    expected = naive_probabilities("resnet18", state_dict, sample_images)
    got, model = fast_probabilities(
        checkpoint, "resnet18", sample_images, plan=dataclasses.replace(cuda_plan, device="cpu")
    )

    assert model.levers == ("fold_batchnorm", "float16", "channels_last")
    assert got.topk(5).indices.tolist() == expected.topk(5).indices.tolist()
    assert (got - expected).abs().max().item() <= 1e-2


def test_model_whose_trace_depends_on_batch_size_stays_eager():
    import torch

    from resnetcli import fastpath

    class BatchSizeAsInt(torch.nn.Module):
        """Turns the batch size into a Python int, which a trace would freeze as a constant."""

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3)
            self.bn = torch.nn.BatchNorm2d(4)

        def forward(self, x):
            count = int(x.shape[0])
            pooled = self.bn(self.conv(x)).mean(dim=(2, 3))
            return pooled * torch.arange(1, count + 1, dtype=x.dtype).reshape(count, 1)

    torch.manual_seed(0)
    eager = BatchSizeAsInt().eval()
    batch = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        expected = eager(batch)
    fast = fastpath.optimize_for_inference(eager, example_shape=(3, 3, 16, 16), plan=fastpath.plan_for("cpu"))

    with torch.inference_mode():
        for _ in range(3):
            assert torch.allclose(fast(batch), expected, atol=1e-5)
    assert "torchscript_onednn" not in fast.levers


def test_graph_only_for_enough_images_and_never_on_cuda():
    from resnetcli import fastpath

    assert not fastpath.plan_for("cpu", images=1).torchscript_onednn
    assert not fastpath.plan_for("cpu", images=fastpath.GRAPH_MIN_IMAGES - 1).torchscript_onednn
    assert fastpath.plan_for("cpu", images=fastpath.GRAPH_MIN_IMAGES).torchscript_onednn
    assert fastpath.plan_for("cpu").torchscript_onednn
    assert not fastpath.plan_for("cuda:0").torchscript_onednn


def test_draft_decoding_only_shrinks_large_jpegs_and_keeps_the_short_side(sample_images, large_photos, tmp_path):
    from PIL import Image

    from resnetcli.images import load_image

    small, large = sample_images[0], large_photos[0]
    assert load_image(small, draft_short_side=464).size == load_image(small).size
    with Image.open(large) as image:
        full_size = image.size
    drafted = load_image(large, draft_short_side=464)
    assert min(drafted.size) >= 464 and drafted.size[0] <= full_size[0] // 2
    png = tmp_path / "large.png"
    load_image(large).save(png)
    assert load_image(png, draft_short_side=464).size == full_size


def test_draft_decoding_keeps_top5_labels_of_large_photos(soft_steered, large_photos):
    """Draft decoding is opt-in: it keeps the labels, not the probabilities to 1e-3 (see the README)."""
    import torch
    from torchvision import models

    from resnetcli import fastpath
    from resnetcli.images import load_image

    checkpoint, state_dict = soft_steered
    expected = naive_probabilities("resnet18", state_dict, large_photos)
    model = models.resnet18(weights=None)
    model.load_state_dict(state_dict)
    transforms = models.ResNet18_Weights.DEFAULT.transforms()
    short_side = fastpath.draft_short_side(transforms)
    with torch.no_grad():
        got = model.eval()(
            torch.stack([transforms(load_image(p, draft_short_side=short_side)) for p in large_photos])
        ).softmax(dim=1)

    assert [STEERED_CLASSES[p.name] for p in large_photos] == got.argmax(dim=1).tolist()
    assert got.topk(5).indices.tolist() == expected.topk(5).indices.tolist()


def test_draft_decoding_reports_bad_inputs_like_full_decoding(tmp_path):
    from resnetcli.errors import InputError
    from resnetcli.images import load_image

    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes((Path(__file__).parent.parent / "sample_images" / "cat.jpg").read_bytes()[:2000])
    cases = {
        tmp_path / "missing.jpg": "no such file",
        tmp_path: "is a directory, not an image",
        truncated: "cannot decode image",
    }
    text = tmp_path / "notes.jpg"
    text.write_text("not a photo")
    cases[text] = "not an image (unrecognised format)"
    for path, message in cases.items():
        with pytest.raises(InputError) as caught:
            load_image(path, draft_short_side=464)
        assert str(caught.value).startswith(f"{path}: {message}")


def test_configure_threads_follows_the_affinity_mask():
    import torch

    from resnetcli import fastpath

    before = torch.get_num_threads()
    try:
        assert fastpath.configure_threads() == len(os.sched_getaffinity(0)) == torch.get_num_threads()
        assert fastpath.configure_threads(1) == 1 == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def test_resnet_predict_end_to_end_matches_naive_pipeline(soft_steered, sample_images, runner, app, tmp_path):
    """`resnet predict` on a folder (count unknown: the traced-graph plan) against the tutorial loop."""
    import json
    import shutil

    checkpoint, state_dict = soft_steered
    folder = tmp_path / "photos"
    folder.mkdir()
    for path in sample_images:
        shutil.copy(path, folder / path.name)
    result = runner.invoke(
        app,
        [
            "predict",
            str(folder),
            "--arch",
            "resnet18",
            "--weights",
            str(checkpoint),
            "--top",
            "5",
            "--format",
            "jsonl",
            "--batch-size",
            "4",
        ],
    )
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [Path(r["input"]).name for r in records] == [p.name for p in sample_images]
    reference = naive_probabilities("resnet18", state_dict, sample_images)
    for record, row in zip(records, reference):
        values, indices = row.topk(5)
        assert [s["index"] for s in record["top"]] == indices.tolist()
        assert [s["prob"] for s in record["top"]] == pytest.approx(values.tolist(), abs=TOLERANCE)
        assert record["top"][0]["index"] == STEERED_CLASSES[Path(record["input"]).name]


@pytest.mark.parametrize(
    "arch", ["swin_t", "efficientnet_b0", "mobilenet_v3_small", "convnext_tiny", "densenet121", "googlenet"]
)
def test_fast_path_keeps_the_answers_of_other_families_call_after_call(arch):
    """Whatever the fast path chooses for a family (graph or eager), every call answers as eager.

    swin_t's traced graph passes its first run and fails once oneDNN's fused kernels take over:
    the check covers the runs up to the optimised graph, so such a model stays eager.
    """
    import torch
    from torchvision import models

    from resnetcli import fastpath

    torch.manual_seed(0)
    extra = {"init_weights": True} if arch == "googlenet" else {}  # silences torchvision's FutureWarning
    model = models.get_model(arch, weights=None, **extra).eval()
    batch = torch.rand(2, 3, 224, 224)
    with torch.inference_mode():
        expected = model(batch)
        fast = fastpath.optimize_for_inference(model, example_shape=(2, 3, 224, 224), images=None)
        answers = [fast(batch) for _ in range(5)]
    scale = float(expected.abs().max())
    for answer in answers:
        torch.testing.assert_close(answer, expected, rtol=1e-3, atol=1e-3 * scale)
