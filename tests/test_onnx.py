"""ONNX export and the torch-free ONNX Runtime path: answers, metadata, preprocessing, errors, cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, STEERED_CLASSES, env_without_resnet, sha256_file

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

from resnetcli import __version__
from resnetcli.errors import CheckpointError, ExitStatus, UsageError, WeightsUnavailable


@pytest.fixture(scope="module")
def ranked_checkpoint(tmp_path_factory, steered_resnet18):
    """conftest's steered checkpoint with its whole top-5 defined: the head is softened (x0.1, so
    the probabilities below rank 1 are not all ~0) and every class gets its own bias offset, 0.004
    apart in a shuffled order (without it, 996 classes tie at logit 0 and ranks 3-5 are arbitrary).
    Each sample photo still lands on its own class."""
    import torch

    state = {k: v.clone() for k, v in steered_resnet18.state_dict.items()}
    generator = torch.Generator().manual_seed(0)
    offsets = torch.randperm(1000, generator=generator).float() * 0.004
    state["fc.weight"] *= 0.1
    state["fc.bias"] = state["fc.bias"] * 0.1 + offsets
    path = tmp_path_factory.mktemp("ranked") / "resnet18-ranked.pth"
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def steered_export(tmp_path_factory, ranked_checkpoint):
    """The discriminating checkpoint exported by `resnet export` (checked there against torch)."""
    from typer.testing import CliRunner

    from resnetcli.cli import app
    from resnetcli.export import ExportResult
    from resnetcli.onnxrt import open_classifier

    out = tmp_path_factory.mktemp("onnx") / "steered.onnx"
    result = CliRunner().invoke(
        app, ["export", "resnet18", "--weights", str(ranked_checkpoint), "-o", str(out), "-f", "json"]
    )
    assert result.exit_code == 0, result.stderr
    (record,) = json.loads(result.stdout)
    assert record["path"] == str(out) and record["max_abs_diff"] <= record["tolerance"]
    assert result.stderr.startswith(f"resnet: exported {out} (")
    info = open_classifier(out).info
    return ExportResult(
        out,
        info,
        record["size"],
        tuple(record["checked_on"]),
        record["max_abs_diff"],
        record["tolerance"],
        record["seconds"],
    )


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env=env_without_resnet(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **env),
    )


# ---------------------------------------------------------------------------------------------
# Export


def test_export_metadata_round_trip(steered_export, ranked_checkpoint):
    import onnx
    from torchvision.models import ResNet18_Weights

    from resnetcli.onnxmeta import ModelInfo

    model = onnx.load(str(steered_export.path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    info, problems = ModelInfo.from_metadata(props)
    assert problems == []
    transforms = ResNet18_Weights.DEFAULT.transforms()
    assert info.arch == "resnet18"
    assert info.weights == ranked_checkpoint.name
    assert info.source_sha256 == sha256_file(ranked_checkpoint)
    assert list(info.classes) == ResNet18_Weights.DEFAULT.meta["categories"]
    assert info.preprocessing.record() == {
        "resize_size": list(transforms.resize_size),
        "crop_size": list(transforms.crop_size),
        "mean": list(transforms.mean),
        "std": list(transforms.std),
        "interpolation": transforms.interpolation.value,
    }
    assert (info.opset, info.version) == (18, __version__)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [18]
    # Dynamic batch: the input's first dimension is symbolic, the rest fixed at the crop size.
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 224, 224]
    assert steered_export.checked_on == tuple(p.name for p in sorted((REPO / "sample_images").glob("*.jpg")))
    assert 0 <= steered_export.max_abs_diff <= steered_export.tolerance
    assert not [p for p in steered_export.path.parent.iterdir() if p.name.endswith(".partial")]


def test_export_mismatch_is_an_error(steered_export, tmp_path):
    """The post-export check compares with the torch model given: another model's logits differ."""
    import torch
    from torchvision import models

    from resnetcli.export import _check

    torch.manual_seed(1)
    other = models.resnet18(weights=None).eval()
    batch = torch.randn(3, 3, 224, 224)
    with pytest.raises(WeightsUnavailable, match="differ from torch's by"):
        _check(other, steered_export.path, batch, tmp_path / "x.onnx")


def test_export_below_the_exporters_opset_is_an_error_and_leaves_the_old_file(tmp_path):
    """Asked for opset 17 the exporter falls back to 18 after a failed conversion: refused, not mislabelled."""
    from resnetcli import factory
    from resnetcli.export import export_loaded

    out = tmp_path / "model.onnx"
    out.write_bytes(b"the previous export")
    loaded = factory.load_model("squeezenet1_1", "none")
    with pytest.raises(CheckpointError, match=r"cannot write opset 17 \(it wrote 18\)"):
        export_loaded(loaded, out, source_sha="none", opset=17)
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"] and out.read_bytes() == b"the previous export"


def test_export_cli_checkpoint_error_one_line_nothing_written(runner, app, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    out = tmp_path / "out.onnx"
    result = runner.invoke(app, ["export", "resnet18", "--weights", str(bad), "-o", str(out)])
    assert result.exit_code == ExitStatus.WEIGHTS_UNAVAILABLE
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("resnet: error: ") and str(bad) in lines[0]
    assert list(tmp_path.iterdir()) == [bad]


def test_export_cli_both_weights_forms_is_usage_error(runner, app, tmp_path):
    result = runner.invoke(
        app, ["export", "resnet18:IMAGENET1K_V1", "--weights", "none", "-o", str(tmp_path / "m.onnx")]
    )
    assert result.exit_code == ExitStatus.USAGE
    assert "not both" in result.stderr


# ---------------------------------------------------------------------------------------------
# Answers and preprocessing


def test_onnxruntime_top5_matches_torch_pipeline(steered_export, ranked_checkpoint, sample_images):
    from resnetcli import factory
    from resnetcli.images import load_image
    from resnetcli.inference import torch_classifier
    from resnetcli.onnxrt import open_classifier
    from resnetcli.predict import predict

    loaded = factory.load_model("resnet18", str(ranked_checkpoint))
    torch_side = torch_classifier(loaded)
    torch_records = {Path(p.input).name: p for p in predict(torch_side, [str(p) for p in sample_images], top=5)}
    classifier = open_classifier(steered_export.path)
    batch = np.stack([classifier.preprocess(load_image(p)) for p in sample_images])
    probabilities = classifier.classify(batch)
    assert probabilities.shape == (len(sample_images), 1000)
    for path, row in zip(sample_images, probabilities, strict=False):
        expected = torch_records[path.name].top
        order = np.argsort(-row, kind="stable")[:5]
        assert [int(i) for i in order] == [s.index for s in expected]
        assert order[0] == STEERED_CLASSES[path.name]
        assert np.allclose(row[order], [s.prob for s in expected], rtol=0, atol=1e-3)
        assert [classifier.categories[i] for i in order] == [s.label for s in expected]


@pytest.mark.parametrize(
    "weights_name",
    [
        "ResNet50_Weights.IMAGENET1K_V2",
        "Inception_V3_Weights.IMAGENET1K_V1",
        "ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1",
        "EfficientNet_B3_Weights.IMAGENET1K_V1",
        "RegNet_Y_400MF_Weights.IMAGENET1K_V2",
    ],
)
def test_numpy_preprocessing_equals_torchvision(weights_name, sample_images, tmp_path):
    from PIL import Image
    from torchvision.models import get_weight

    from resnetcli.export import preprocessing_of
    from resnetcli.images import load_image
    from resnetcli.onnxrt import preprocess

    transforms = get_weight(weights_name).transforms()
    spec = preprocessing_of(transforms)
    grey = tmp_path / "grey.png"
    Image.linear_gradient("L").resize((97, 301)).save(grey)  # odd sizes, portrait, grayscale
    for path in [*sample_images, grey]:
        image = load_image(path)
        ours, theirs = preprocess(image, spec), transforms(image).numpy()
        assert ours.dtype == np.float32 and ours.shape == theirs.shape
        assert float(np.abs(ours - theirs).max()) <= 1e-6, path.name


def test_numpy_preprocessing_pads_like_torchvision_when_crop_exceeds_resize(sample_images):
    from torchvision.models import ResNet18_Weights
    from torchvision.transforms._presets import ImageClassification

    from resnetcli.export import preprocessing_of
    from resnetcli.images import load_image
    from resnetcli.onnxrt import preprocess, preprocessing_with_sizes

    base = ResNet18_Weights.DEFAULT.transforms()
    theirs = ImageClassification(
        crop_size=300, resize_size=200, mean=base.mean, std=base.std, interpolation=base.interpolation
    )
    spec = preprocessing_with_sizes(preprocessing_of(base), input_size=300, resize=200)
    image = load_image(sample_images[1])
    assert float(np.abs(preprocess(image, spec) - theirs(image).numpy()).max()) <= 1e-6


def test_onnx_path_never_imports_torch(steered_export, sample_images):
    code = f"""
import json, sys
import numpy as np
from resnetcli.images import load_image
from resnetcli.onnxrt import open_classifier
c = open_classifier({str(steered_export.path)!r})
paths = {[str(p) for p in sample_images]!r}
probs = c.classify(np.stack([c.preprocess(load_image(p)) for p in paths]))
loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))
print(json.dumps({{"top1": [int(r.argmax()) for r in probs], "torch_modules": loaded}}))
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["torch_modules"] == []
    assert answer["top1"] == [STEERED_CLASSES[p.name] for p in sample_images]


# ---------------------------------------------------------------------------------------------
# Errors


def assert_one_line_exit_3(error: BaseException, path: Path) -> None:
    assert error.exit_status == ExitStatus.WEIGHTS_UNAVAILABLE
    assert "\n" not in str(error) and str(path) in str(error)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_onnx_file(steered_export, tmp_path, damage):
    from resnetcli.onnxrt import open_classifier

    data = steered_export.path.read_bytes()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00\xffnot onnx" * 100, "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="not a readable ONNX model") as caught:
        open_classifier(bad)
    assert_one_line_exit_3(caught.value, bad)


def without_metadata(source: Path, target: Path) -> Path:
    import onnx

    model = onnx.load(str(source))
    del model.metadata_props[:]
    onnx.save(model, str(target))
    return target


def test_model_without_metadata_names_what_is_missing(steered_export, tmp_path):
    from resnetcli.onnxrt import open_classifier

    bare = without_metadata(steered_export.path, tmp_path / "bare.onnx")
    with pytest.raises(CheckpointError) as caught:
        open_classifier(bare)
    assert_one_line_exit_3(caught.value, bare)
    assert "(class names, preprocessing missing)" in str(caught.value)
    with pytest.raises(CheckpointError, match=r"\(preprocessing missing\)"):
        open_classifier(bare, labels=[f"c{i}" for i in range(1000)])


def test_model_without_metadata_accepted_with_explicit_options(steered_export, sample_images, tmp_path):
    from resnetcli.images import load_image
    from resnetcli.onnxrt import open_classifier

    bare = without_metadata(steered_export.path, tmp_path / "bare.onnx")
    labels = [f"c{i}" for i in range(1000)]
    classifier = open_classifier(bare, labels=labels, preprocessing=steered_export.info.preprocessing)
    probabilities = classifier.classify(np.stack([classifier.preprocess(load_image(p)) for p in sample_images]))
    assert [classifier.categories[int(r.argmax())] for r in probabilities] == [
        f"c{STEERED_CLASSES[p.name]}" for p in sample_images
    ]
    with pytest.raises(CheckpointError, match="predicts 1000 classes but the labels name 3"):
        open_classifier(bare, labels=["a", "b", "c"], preprocessing=steered_export.info.preprocessing)


def tiny_model(path: Path, elem_type: int, shape: list) -> Path:
    """A real ONNX model (global average pool + flatten) with resnetcli's metadata and the given input."""
    import onnx
    from onnx import TensorProto, helper

    from resnetcli.onnxmeta import ModelInfo, Preprocessing

    cast = helper.make_node("Cast", ["input"], ["floats"], to=TensorProto.FLOAT)
    pool = helper.make_node("GlobalAveragePool", ["floats"], ["pooled"])
    flat = helper.make_node("Flatten", ["pooled"], ["logits"])
    graph = helper.make_graph(
        [cast, pool, flat],
        "tiny",
        [helper.make_tensor_value_info("input", elem_type, shape)],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [shape[0], shape[1]])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    spec = Preprocessing((8,), (8,), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear")
    info = ModelInfo("tiny", "none", "none", ("r", "g", "b")[: shape[1]] if shape[1] <= 3 else ("x",), spec, 18, "hand")
    for key, value in info.metadata().items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize(
    "elem_type, shape, shown",
    [
        ("FLOAT", ["N", 1, 8, 8], "tensor(float) N x 1 x 8 x 8"),
        ("INT64", ["N", 3, 8, 8], "tensor(int64) N x 3 x 8 x 8"),
        ("FLOAT", ["N", 3, 8], "tensor(float) N x 3 x 8"),
    ],
)
def test_input_not_n3hw_float(tmp_path, elem_type, shape, shown):
    from onnx import TensorProto

    from resnetcli.onnxrt import open_classifier

    path = tiny_model(tmp_path / "tiny.onnx", getattr(TensorProto, elem_type), shape)
    with pytest.raises(CheckpointError) as caught:
        open_classifier(path)
    assert_one_line_exit_3(caught.value, path)
    assert f"the model's input is {shown}; an image classifier takes N x 3 x H x W float" in str(caught.value)


def test_tiny_valid_model_runs(tmp_path, sample_images):
    """The same hand-built graph with a proper input works, so the cases above fail for their input alone."""
    from onnx import TensorProto

    from resnetcli.images import load_image
    from resnetcli.onnxrt import open_classifier

    classifier = open_classifier(tiny_model(tmp_path / "ok.onnx", TensorProto.FLOAT, ["N", 3, 8, 8]))
    image = load_image(sample_images[0])
    probabilities = classifier.classify(classifier.preprocess(image)[None])
    assert probabilities.shape == (1, 3) and abs(float(probabilities.sum()) - 1) < 1e-6


def test_fixed_batch_model_takes_any_number_of_images(tmp_path, sample_images):
    """A model exported for batch 2 classifies 3 images (in chunks, the last padded) as it would one by one."""
    from onnx import TensorProto

    from resnetcli.images import load_image
    from resnetcli.onnxrt import open_classifier

    fixed = open_classifier(tiny_model(tmp_path / "fixed.onnx", TensorProto.FLOAT, [2, 3, 8, 8]))
    assert fixed.fixed_batch == 2
    batch = np.stack([fixed.preprocess(load_image(p)) for p in sample_images[:3]])
    together = fixed.classify(batch)
    one_by_one = np.concatenate([fixed.classify(batch[i : i + 1]) for i in range(3)])
    assert together.shape == (3, 3) and np.array_equal(together, one_by_one)
    assert len({tuple(np.round(row, 4)) for row in together}) == 3  # three different photos, three answers


def test_onnxruntime_not_installed_is_usage_error_with_install_command(steered_export):
    code = f"""
import sys
sys.modules["onnxruntime"] = None  # what Python does for a package that is not installed: ImportError
from resnetcli.errors import ResnetError
from resnetcli.onnxrt import open_classifier
try:
    open_classifier({str(steered_export.path)!r})
except ResnetError as error:
    print(int(error.exit_status), error)
"""
    result = run_python(code)
    assert result.returncode == 0, result.stderr
    status, _, message = result.stdout.strip().partition(" ")
    assert int(status) == ExitStatus.USAGE
    assert message.endswith("onnxruntime is not installed; install it with: pip install onnxruntime")


# ---------------------------------------------------------------------------------------------
# The export cache


def test_cached_export_found_without_torch_and_managed_by_cache_commands(steered_resnet18, runner, app, checkpoint_dir):
    from resnetcli.onnxcache import ensure_export, export_file_name, find_export

    assert find_export("resnet18", str(steered_resnet18.path)) is None
    path = ensure_export("resnet18", str(steered_resnet18.path))
    assert path == checkpoint_dir / export_file_name("resnet18", "file", sha256_file(steered_resnet18.path))
    assert not [p.name for p in checkpoint_dir.rglob("*") if p.name.endswith(".partial")]
    stamp = path.stat().st_mtime_ns
    assert ensure_export("resnet18", str(steered_resnet18.path)) == path and path.stat().st_mtime_ns == stamp

    code = f"""
import json, sys
from resnetcli.onnxcache import find_export
found = find_export("resnet18", {str(steered_resnet18.path)!r})
print(json.dumps([str(found), sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))]))
"""
    result = run_python(code, TORCH_HOME=os.environ["TORCH_HOME"], XDG_CACHE_HOME=os.environ["XDG_CACHE_HOME"])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [str(path), []]

    listed = runner.invoke(app, ["cache", "list", "-f", "json"])
    assert path.name in listed.stdout
    verified = runner.invoke(app, ["cache", "verify", "-f", "jsonl"])
    assert [json.loads(line)["status"] for line in verified.stdout.splitlines()] == ["ok"]
    with open(path, "r+b") as handle:
        handle.truncate(1000)
    with pytest.raises(WeightsUnavailable, match="corrupt"):
        find_export("resnet18", str(steered_resnet18.path))
    removed = runner.invoke(app, ["cache", "rm", path.name])
    assert removed.exit_code == 0 and not path.exists()
    assert find_export("resnet18", str(steered_resnet18.path)) is None


def test_random_weights_are_not_cached(steered_resnet18):
    from resnetcli.onnxcache import ensure_export

    with pytest.raises(UsageError, match="not cached as an export"):
        ensure_export("resnet18", "none")


def test_export_of_url_weights_cached_and_found_without_torch(
    ranked_checkpoint, weight_server, checkpoint_dir, tmp_path
):
    import torch
    from conftest import save_hub_style

    from resnetcli.onnxcache import ensure_export, export_file_name, find_export

    served = save_hub_style(torch.load(ranked_checkpoint, weights_only=True), tmp_path, "resnet18-ranked")
    url = weight_server.add(served)
    assert find_export("resnet18", url) is None  # not even downloaded yet
    path = ensure_export("resnet18", url)
    assert path == checkpoint_dir / export_file_name("resnet18", "url", sha256_file(served))
    assert (checkpoint_dir / served.name).is_file()  # the weights were downloaded into the cache first
    code = f"""
import json, sys
from resnetcli.onnxcache import find_export
from resnetcli.onnxrt import open_classifier
found = find_export("resnet18", {url!r})
info = open_classifier(found).info
print(json.dumps([str(found), info.weights, info.source_sha256,
                  sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))]))
"""
    result = run_python(code, TORCH_HOME=os.environ["TORCH_HOME"], XDG_CACHE_HOME=os.environ["XDG_CACHE_HOME"])
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [str(path), url, sha256_file(served), []]


def test_pretrained_names_and_default_map_to_the_cached_export_without_torch(steered_export, checkpoint_dir):
    """No pretrained weights exist here, so the export is put in the cache by the cache's own
    produce step (the store's verified install); what is tested is the torch-free mapping of
    `--weights` values to it."""
    import shutil

    from resnetcli import names
    from resnetcli.onnxcache import _remember_default, export_file_name, produce

    names.remember()  # the names file completion keeps
    sha = "ab" * 32
    made = produce(
        export_file_name("resnet18", "IMAGENET1K_V1", sha), lambda p: shutil.copyfile(steered_export.path, p)
    )
    path = made.path
    assert (made.status, made.sha256, made.size) == ("exported", sha256_file(path), path.stat().st_size)
    assert not [p for p in checkpoint_dir.iterdir() if p.name.endswith(".partial")]
    code = """
import json, sys
from resnetcli.onnxcache import find_export
specs = [None, "DEFAULT", "IMAGENET1K_V1", "imagenet1k_v1", "ResNet18_Weights.IMAGENET1K_V1", "IMAGENET1K_V9", "none"]
found = {str(spec): str(find_export(arch, spec)) for arch in ["ResNet18"] for spec in specs}
print(json.dumps([found, sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))]))
"""
    env = {"TORCH_HOME": os.environ["TORCH_HOME"], "XDG_CACHE_HOME": os.environ["XDG_CACHE_HOME"]}
    before = json.loads(run_python(code, **env).stdout)[0]
    assert before["IMAGENET1K_V1"] == str(path) and before["None"] == "None"  # DEFAULT unknown until recorded
    _remember_default("resnet18", "IMAGENET1K_V1")  # what ensure_export does after exporting DEFAULT
    result = run_python(code, **env)
    assert result.returncode == 0, result.stderr
    found, torch_modules = json.loads(result.stdout)
    assert torch_modules == []
    assert found == {
        "None": str(path),
        "DEFAULT": str(path),
        "IMAGENET1K_V1": str(path),
        "imagenet1k_v1": str(path),
        "ResNet18_Weights.IMAGENET1K_V1": str(path),
        "IMAGENET1K_V9": "None",
        "none": "None",
    }
