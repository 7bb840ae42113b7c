"""summary, features, list and shell completion: every torchvision classifier, on the meta device.

Expected values come from torchvision itself (weights.meta["num_params"], the crop size of
weights.transforms(), create_feature_extractor on the model) or from the papers (ResNet, Swin,
ViT stage shapes), never from resnetcli's own output.
"""

from __future__ import annotations

import csv
import io
import json
import math
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from conftest import REPO, env_without_resnet
from helpers import one_line_error, run_cli, run_json
from torchvision import models

ARCHITECTURES = models.list_models(module=models)
RESNET_FAMILY = [a for a in ARCHITECTURES if a.startswith(("resnet", "resnext", "wide_resnet"))]
#: The first architecture of each torchvision model module (resnet, efficientnet, swin_transformer, ...).
ONE_PER_FAMILY = list({models.get_model_builder(a).__module__: a for a in reversed(ARCHITECTURES)}.values())[::-1]


@pytest.fixture(autouse=True)
def isolated_names_cache(tmp_path, monkeypatch) -> Path:
    """Completion names go to a per-test XDG cache folder, never the user's."""
    folder = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(folder))
    from resnetcli import names

    names.load.cache_clear()
    return folder


def crop_size(weights) -> int:
    return weights.transforms().crop_size[0]


def extracted_shapes(arch, nodes, size):
    """Shapes of graph nodes from torchvision's own feature extractor: the reference for `features`."""
    import torch
    from torchvision.models.feature_extraction import create_feature_extractor

    from resnetcli.factory import meta_model

    extractor = create_feature_extractor(
        meta_model(arch), return_nodes={node: str(i) for i, node in enumerate(nodes)}, suppress_diff_warning=True
    )
    with torch.inference_mode():
        outputs = extractor(torch.empty(1, 3, size, size, device="meta"))
    return [list(outputs[str(i)].shape) for i in range(len(nodes))]


# ---------------------------------------------------------------------------------------------
# Every architecture


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_summary_and_features_every_architecture(runner, app, arch):
    default = models.get_model_weights(arch).DEFAULT
    size = crop_size(default)
    document = run_json(runner, app, "summary", arch, "--depth", "99", "--columns", "layer,output_shape,params")
    assert document["input_size"] == [1, 3, size, size]
    assert document["weights"] == default.name
    assert document["totals"]["total_params"] == default.meta["num_params"]
    assert document["layers"][0] == {
        "layer": arch,
        "output_shape": [1, len(default.meta["categories"])],
        "params": default.meta["num_params"],
    }
    parameters = [p for p in document["parameters"] if p["kind"] == "parameter"]
    assert sum(math.prod(p["shape"]) for p in parameters) == default.meta["num_params"]

    maps = run_json(runner, app, "features", arch)
    assert len(maps) >= 2
    # The same modules' outputs as torchinfo recorded them (a module called twice: its last call).
    layer_shapes = {row["layer"]: row["output_shape"] for row in document["layers"]}
    assert [m["shape"] for m in maps] == [layer_shapes[m["node"]] for m in maps]
    channel_axis = {"NCHW": 1, "NHWC": 3, "NLC": 2}
    for feature in maps:
        assert feature["channels"] == feature["shape"][channel_axis[feature["layout"]]]
        if feature["layout"] != "NLC":
            height = feature["shape"][2] if feature["layout"] == "NCHW" else feature["shape"][1]
            # The stride names the reduction of this map (up to the pixels unpadded convolutions lose).
            assert abs(math.log2(size / height) - math.log2(feature["stride"])) < 0.25, feature
    strides = [m["stride"] for m in maps if m["name"] != "stem"]
    assert strides == sorted(set(strides)), maps
    assert all(m["stride"] <= strides[0] for m in maps if m["name"] == "stem")
    # Nothing inside a stage is reported beside it: stages are the coarsest modules.
    nodes = [m["node"] for m in maps]
    assert not any(a != b and b.startswith(a + ".") for a in nodes for b in nodes)


@pytest.mark.parametrize("arch", ONE_PER_FAMILY)
def test_feature_nodes_work_with_create_feature_extractor(runner, app, arch):
    maps = run_json(runner, app, "features", arch)
    size = crop_size(models.get_model_weights(arch).DEFAULT)
    assert [m["shape"] for m in maps] == extracted_shapes(arch, [m["node"] for m in maps], size)


# ---------------------------------------------------------------------------------------------
# features: exact values


def test_resnet50_features_at_224(runner, app):
    maps = run_json(runner, app, "features", "resnet50", "--input-size", "224")
    assert [(m["name"], m["node"], m["shape"], m["layout"], m["channels"], m["stride"]) for m in maps] == [
        ("stem", "maxpool", [1, 64, 56, 56], "NCHW", 64, 4),
        ("layer1", "layer1", [1, 256, 56, 56], "NCHW", 256, 4),
        ("layer2", "layer2", [1, 512, 28, 28], "NCHW", 512, 8),
        ("layer3", "layer3", [1, 1024, 14, 14], "NCHW", 1024, 16),
        ("layer4", "layer4", [1, 2048, 7, 7], "NCHW", 2048, 32),
    ]


@pytest.mark.parametrize("arch", RESNET_FAMILY)
def test_resnet_family_stages(runner, app, arch):
    from resnetcli.factory import meta_model

    maps = run_json(runner, app, "features", arch, "--input-size", "640,480")
    head_width = meta_model(arch).fc.in_features  # layer4's channels; each stage before has half
    assert [m["name"] for m in maps] == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert [m["node"] for m in maps] == ["maxpool", "layer1", "layer2", "layer3", "layer4"]
    assert [m["stride"] for m in maps] == [4, 4, 8, 16, 32]
    assert [m["shape"] for m in maps[1:]] == [
        [1, head_width // 2 ** (4 - i), 640 // 2 ** (i + 1), 480 // 2 ** (i + 1)] for i in range(1, 5)
    ]
    assert maps[0]["shape"] == [1, 64, 160, 120]


def test_swin_is_channels_last(runner, app):
    maps = run_json(runner, app, "features", "swin_t")
    # Swin-T: C = 96, doubled at each patch merging, stages at 1/4 ... 1/32, tensors NHWC.
    assert [(m["shape"], m["layout"], m["channels"], m["stride"]) for m in maps] == [
        ([1, 56, 56, 96], "NHWC", 96, 4),
        ([1, 28, 28, 192], "NHWC", 192, 8),
        ([1, 14, 14, 384], "NHWC", 384, 16),
        ([1, 7, 7, 768], "NHWC", 768, 32),
    ]


def test_vit_patch_grid_and_tokens(runner, app):
    maps = run_json(runner, app, "features", "vit_b_16")
    # ViT-B/16 at 224: a 14x14 grid of 768-wide patches, then 196 + 1 class token.
    assert [(m["name"], m["node"], m["shape"], m["layout"], m["channels"], m["stride"]) for m in maps] == [
        ("stem", "conv_proj", [1, 768, 14, 14], "NCHW", 768, 16),
        ("encoder", "encoder", [1, 197, 768], "NLC", 768, 16),
    ]


@pytest.mark.parametrize("weights, size", [("DEFAULT", 518), ("IMAGENET1K_SWAG_LINEAR_V1", 224), ("none", 224)])
def test_vit_h_14_stride_is_its_patch_size(runner, app, weights, size):
    document = run_json(runner, app, "features", "vit_h_14", "--weights", weights)
    grid = size // 14
    assert document[-1]["shape"] == [1, grid * grid + 1, 1280]
    assert {m["stride"] for m in document} == {14}


def test_inception_odd_sizes_give_power_of_two_strides(runner, app):
    maps = run_json(runner, app, "features", "inception_v3")
    # The stages timm's feature_info names for inception_v3, at 299 pixels (147, 71, 35, 17, 8).
    assert [(m["node"], m["shape"][2], m["stride"]) for m in maps] == [
        ("Conv2d_2b_3x3", 147, 2),
        ("Conv2d_4a_3x3", 71, 4),
        ("Mixed_5d", 35, 8),
        ("Mixed_6e", 17, 16),
        ("Mixed_7c", 8, 32),
    ]


def test_features_nodes_and_list_nodes(runner, app):
    from torchvision.models.feature_extraction import get_graph_node_names

    listed = run_cli(runner, app, "features", "resnet18", "--list-nodes", "--format", "csv")
    assert listed.exit_code == 0, listed.stderr
    expected_nodes = get_graph_node_names(models.resnet18())[1]
    assert [row["node"] for row in csv.DictReader(io.StringIO(listed.stdout))] == expected_nodes

    maps = run_json(runner, app, "features", "resnet18", "--nodes", "layer2.0.relu_1,layer3,fc", "--input-size", "320")
    assert [(m["node"], m["shape"], m["layout"], m["channels"], m["stride"]) for m in maps] == [
        ("layer2.0.relu_1", [1, 128, 40, 40], "NCHW", 128, 8),
        ("layer3", [1, 256, 20, 20], "NCHW", 256, 16),
        ("fc", [1, 1000], None, None, None),
    ]


def test_features_unknown_node_is_a_usage_error(runner, app):
    result = run_cli(runner, app, "features", "resnet18", "--nodes", "layer3.1.relu_9")
    assert result.exit_code == 2
    line = one_line_error(result)
    assert "layer3.1.relu_9" in line and "--list-nodes" in line


def test_features_table(runner, app):
    result = run_cli(runner, app, "features", "swin_t", "--format", "table")
    assert result.exit_code == 0, result.stderr
    assert "features.7" in result.stdout and "[1, 7, 7, 768]" in result.stdout and "NHWC" in result.stdout


# ---------------------------------------------------------------------------------------------
# features --save


def reference_features(state_dict, image: Path) -> dict:
    """layer1..layer4 of resnet18 on the image, through torchvision's own model and preprocessing."""
    import torch
    from PIL import Image
    from torchvision.models._utils import IntermediateLayerGetter

    model = models.resnet18()
    model.load_state_dict(state_dict)
    getter = IntermediateLayerGetter(model.eval(), {f"layer{i}": f"layer{i}" for i in range(1, 5)})
    batch = models.ResNet18_Weights.DEFAULT.transforms()(Image.open(image).convert("RGB")).unsqueeze(0)
    with torch.no_grad():
        return getter(batch)


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_features_save_runs_the_image_with_its_weights(runner, app, steered_resnet18, sample_images, tmp_path, suffix):
    import numpy
    import torch

    target = tmp_path / f"features{suffix}"
    result = run_cli(
        runner,
        app,
        "features",
        "resnet18",
        "--weights",
        steered_resnet18.path,
        "--image",
        sample_images[0],
        "--save",
        target,
        "--format",
        "json",
    )
    assert result.exit_code == 0, result.stderr
    maps = json.loads(result.stdout)
    assert [m["name"] for m in maps] == ["stem", "layer1", "layer2", "layer3", "layer4"]
    if suffix == ".npz":
        with numpy.load(target) as archive:
            saved = {name: torch.from_numpy(archive[name]) for name in archive.files}
    else:
        saved = torch.load(target, weights_only=True)
    assert sorted(saved) == sorted(m["name"] for m in maps)
    assert {name: list(t.shape) for name, t in saved.items()} == {m["name"]: m["shape"] for m in maps}
    for name, tensor in reference_features(steered_resnet18.state_dict, sample_images[0]).items():
        assert torch.allclose(saved[name], tensor, atol=1e-5), name
    assert f"saved 5 feature maps of {sample_images[0]} to {target}" in result.stderr


def test_features_save_needs_weights_it_can_get(runner, app, sample_images, tmp_path):
    target = tmp_path / "f.npz"
    offline = run_cli(runner, app, "features", "resnet18", "--image", sample_images[0], "--save", target, "--offline")
    assert offline.exit_code == 3
    assert "resnet fetch resnet18:IMAGENET1K_V1" in one_line_error(offline)
    assert not target.exists()


def test_features_save_bad_image_fails_before_any_download(runner, app, tmp_path, checkpoint_dir):
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("text, not a JPEG")
    result = run_cli(
        runner,
        app,
        "features",
        "resnet18",
        "--image",
        not_an_image,
        "--save",
        tmp_path / "f.npz",
        "--mirror",
        "http://127.0.0.1:9",
    )
    assert result.exit_code == 1
    assert one_line_error(result) == f"resnet: error: {not_an_image}: not an image (unrecognised format)"
    assert not checkpoint_dir.exists() or not any(checkpoint_dir.iterdir())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--save", "f.npz"], "--save and --image go together"),
        (["--save", "f.json", "--image", "x.jpg"], "must end in .npz or .pt"),
        (["--input-size", "512", "--save", "f.npz", "--image", "x.jpg"], "--input-size does not apply with --image"),
    ],
)
def test_features_save_usage_errors(runner, app, args, message):
    result = run_cli(runner, app, "features", "resnet18", *args)
    assert result.exit_code == 2
    assert message in one_line_error(result)


# ---------------------------------------------------------------------------------------------
# summary


def test_summary_sizes_batch_columns_and_depth(runner, app):
    document = run_json(
        runner,
        app,
        "summary",
        "resnet50",
        "--depth",
        "1",
        "--input-size",
        "512,384",
        "--batch",
        "8",
        "--columns",
        "layer,output_shape,kernel_size,mult_adds",
    )
    assert document["input_size"] == [8, 3, 512, 384]
    layers = {row["layer"]: row for row in document["layers"]}
    assert set(document["layers"][0]) == {"layer", "output_shape", "kernel_size", "mult_adds"}
    assert layers["conv1"] == {
        "layer": "conv1",
        "output_shape": [8, 64, 256, 192],
        "kernel_size": [7, 7],
        "mult_adds": 64 * 3 * 7 * 7 * 256 * 192 * 8,
    }
    assert layers["layer4"]["output_shape"] == [8, 2048, 16, 12]
    assert "layer1.0" not in layers  # depth 1
    assert document["layers"][0]["mult_adds"] == document["totals"]["mult_adds"]
    deeper = run_json(runner, app, "summary", "resnet50", "--depth", "3")
    assert {"layer1.0", "layer1.0.conv1"} <= {row["layer"] for row in deeper["layers"]}


def test_summary_unknown_column_is_a_usage_error(runner, app):
    result = run_cli(runner, app, "summary", "resnet18", "--columns", "layer,flops")
    assert result.exit_code == 2
    assert "--columns: unknown flops" in one_line_error(result)


def test_summary_checkpoint_shows_its_own_head(runner, app, tmp_path):
    import torch

    checkpoint = tmp_path / "finetuned.pth"
    torch.save({"state_dict": models.resnet18(num_classes=3).state_dict()}, checkpoint)
    document = run_json(runner, app, "summary", "resnet18", "--weights", checkpoint, "--params", "--filter", "fc")
    assert document["weights"] == str(checkpoint)
    assert document["parameters"] == [
        {"name": "fc.weight", "shape": [3, 512], "dtype": "float32", "kind": "parameter", "trainable": True},
        {"name": "fc.bias", "shape": [3], "dtype": "float32", "kind": "parameter", "trainable": True},
    ]
    assert document["layers"][0]["output_shape"] == [1, 3]
    assert document["totals"]["total_params"] == sum(t.numel() for t in models.resnet18(num_classes=3).parameters())

    tsv = run_cli(
        runner, app, "summary", "resnet18", "--weights", checkpoint, "--params", "--filter", "fc.w", "--format", "tsv"
    )
    assert tsv.stdout.splitlines() == [
        "name\tshape\tdtype\tkind\ttrainable",
        "fc.weight\t[3, 512]\tfloat32\tparameter\ttrue",
    ]

    wrong = run_cli(runner, app, "summary", "resnet50", "--weights", checkpoint)
    assert wrong.exit_code == 3
    assert f"{checkpoint}: does not fit resnet50" in one_line_error(wrong)


def test_summary_checkpoint_of_an_architecture_that_computes_its_widths(runner, app, tmp_path):
    import torch

    checkpoint = tmp_path / "regnet.pth"
    torch.save(models.regnet_y_400mf(num_classes=5).state_dict(), checkpoint)
    document = run_json(
        runner, app, "summary", "regnet_y_400mf", "--weights", checkpoint, "--params", "--filter", "fc."
    )
    assert [(p["name"], p["shape"]) for p in document["parameters"]] == [("fc.weight", [5, 440]), ("fc.bias", [5])]


def test_summary_weights_name_configures_the_model_without_download(runner, app, checkpoint_dir):
    for name in ("IMAGENET1K_SWAG_LINEAR_V1", "IMAGENET1K_SWAG_E2E_V1"):
        weights = models.ViT_H_14_Weights[name]
        document = run_json(runner, app, "summary", "vit_h_14", "--weights", name, "--depth", "0")
        size = crop_size(weights)
        assert document["input_size"] == [1, 3, size, size]
        assert document["totals"]["total_params"] == weights.meta["num_params"]
    assert not checkpoint_dir.exists() or not any(checkpoint_dir.iterdir())


@pytest.mark.parametrize("arch, size", [("inception_v3", 50), ("vit_b_16", 200)])
def test_summary_input_too_small_names_smallest_size_that_works(runner, app, arch, size):
    result = run_cli(runner, app, "summary", arch, "--input-size", str(size))
    assert result.exit_code == 2
    line = one_line_error(result)
    assert f"{arch} cannot run on a {size}x{size} input" in line
    smallest = int(line.rsplit("the smallest size that works is ", 1)[1])
    works = run_cli(runner, app, "summary", arch, "--input-size", str(smallest), "--depth", "0", "--format", "json")
    assert works.exit_code == 0, works.stderr
    below = run_cli(runner, app, "summary", arch, "--input-size", str(smallest - 1), "--depth", "0")
    assert below.exit_code == 2


def test_features_input_too_small(runner, app):
    result = run_cli(runner, app, "features", "vit_b_16", "--input-size", "100")
    assert result.exit_code == 2
    assert "the smallest size that works is 224" in one_line_error(result)


# ---------------------------------------------------------------------------------------------
# list


def test_list_reads_torchvision_metadata(runner, app, checkpoint_dir):
    rows = run_json(runner, app, "list", "resnet*")
    expected = {
        (arch, w.name): w
        for arch in ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
        for w in models.get_model_weights(arch)
    }
    assert {(r["arch"], r["weights"]) for r in rows} == set(expected)
    for row in rows:
        weights = expected[(row["arch"], row["weights"])]
        metrics = weights.meta["_metrics"]["ImageNet-1K"]
        assert (row["acc@1"], row["acc@5"]) == (metrics["acc@1"], metrics["acc@5"])
        assert (row["params"], row["gflops"], row["file_mb"]) == (
            weights.meta["num_params"],
            weights.meta["_ops"],
            weights.meta["_file_size"],
        )
        assert row["default"] == (weights is models.get_model_weights(row["arch"]).DEFAULT)
        assert row["cached"] is False
    assert [(r["arch"], r["weights"]) for r in rows] == sorted((r["arch"], r["weights"]) for r in rows)


def test_list_cached_column_follows_the_cache(runner, app, checkpoint_dir):
    checkpoint_dir.mkdir(parents=True)
    (checkpoint_dir / Path(models.ResNet18_Weights.IMAGENET1K_V1.url).name).write_bytes(b"weights")
    rows = run_json(runner, app, "list", "resnet18")
    assert [(r["weights"], r["cached"]) for r in rows] == [("IMAGENET1K_V1", True)]


def test_list_sort_and_formats(runner, app):
    by_accuracy = run_json(runner, app, "list", "*net*", "--sort", "acc@1")
    accuracies = [r["acc@1"] for r in by_accuracy]
    assert accuracies == sorted(accuracies, reverse=True)
    by_size = run_json(runner, app, "list", "--sort", "params")
    assert [r["params"] for r in by_size] == sorted(r["params"] for r in by_size)
    assert len(by_size) == sum(len(models.get_model_weights(a)) for a in ARCHITECTURES)
    tsv = run_cli(runner, app, "list", "vgg11", "--format", "tsv")
    assert tsv.stdout.splitlines()[0].split("\t") == [
        "arch",
        "weights",
        "default",
        "acc@1",
        "acc@5",
        "params",
        "gflops",
        "file_mb",
        "cached",
    ]
    accuracy = models.VGG11_Weights.IMAGENET1K_V1.meta["_metrics"]["ImageNet-1K"]["acc@1"]
    assert tsv.stdout.splitlines()[1].split("\t")[:4] == ["vgg11", "IMAGENET1K_V1", "true", str(accuracy)]


def test_list_pattern_matching_nothing_is_a_usage_error(runner, app):
    result = run_cli(runner, app, "list", "resnet9*")
    assert result.exit_code == 2
    assert "no architecture matches 'resnet9*'" in one_line_error(result)
    bad_sort = run_cli(runner, app, "list", "--sort", "speed")
    assert bad_sort.exit_code == 2


# ---------------------------------------------------------------------------------------------
# Shell completion

COMPLETE = (
    "import sys\n"
    "from resnetcli.cli import app\n"
    "try:\n"
    "    app(prog_name='resnet')\n"
    "except SystemExit:\n"
    "    pass\n"
    "print('torch imported' if 'torch' in sys.modules else 'torch not imported', file=sys.stderr)\n"
)


def complete(words: str, cache: Path) -> tuple[list[str], str]:
    """Ask the program for bash completions of `words` (the cursor at its end), as the shell would."""
    current = len(words.split()) - (0 if words.endswith(" ") else 1)
    env = env_without_resnet(
        _RESNET_COMPLETE="complete_bash", COMP_WORDS=words, COMP_CWORD=str(current), XDG_CACHE_HOME=str(cache)
    )
    done = subprocess.run(
        [sys.executable, "-c", COMPLETE], capture_output=True, text=True, cwd=REPO, env=env, check=True, timeout=120
    )
    return done.stdout.split(), done.stderr.strip().splitlines()[-1]


def test_completion_of_architectures_does_not_import_torch_once_names_are_kept(isolated_names_cache):
    from resnetcli.names import names_file

    expected = [a for a in ARCHITECTURES if a.startswith("resn")]
    first, first_state = complete("resnet predict --arch resn", isolated_names_cache)
    assert first == expected
    assert first_state == "torch imported"  # the names file did not exist: made from the registry once
    assert names_file().is_file()
    again, state = complete("resnet predict --arch resn", isolated_names_cache)
    assert again == expected and "resnet18" in again
    assert state == "torch not imported"


def test_completion_of_weights_commands_and_options(isolated_names_cache):
    from resnetcli import names

    names.save({a: [w.name for w in models.get_model_weights(a)] for a in ARCHITECTURES})
    assert complete("resnet predict --arch resnet50 --weights IMAGENET1K_", isolated_names_cache) == (
        ["IMAGENET1K_V1", "IMAGENET1K_V2"],
        "torch not imported",
    )
    summary_weights, _ = complete("resnet summary vit_b_16 --weights ", isolated_names_cache)
    assert summary_weights == [w.name for w in models.ViT_B_16_Weights] + ["DEFAULT", "none"]
    specs, _ = complete("resnet fetch resnet18:", isolated_names_cache)
    assert specs == ["resnet18:IMAGENET1K_V1", "resnet18:DEFAULT"]
    assert sorted(complete("resnet fe", isolated_names_cache)[0]) == ["features", "fetch"]
    assert complete("resnet summary resnet18 --dep", isolated_names_cache)[0] == ["--depth"]
    assert complete("resnet features swin_t", isolated_names_cache)[0] == ["swin_t"]


def test_commands_that_load_the_registry_keep_the_names(runner, app, isolated_names_cache):
    from resnetcli.names import names_file

    assert not names_file().exists()
    assert run_cli(runner, app, "list", "alexnet", "--format", "json").exit_code == 0
    kept = json.loads(names_file().read_text())
    assert kept == {a: [w.name for w in models.get_model_weights(a)] for a in ARCHITECTURES}
    assert names_file().name == f"names-{version('torchvision')}.json"
    assert names_file().parent == isolated_names_cache / "resnetcli"
