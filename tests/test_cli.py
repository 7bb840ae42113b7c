"""The foundation: the four subcommands through the CLI, output formats, exit codes, startup cost."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest
from conftest import REPO, cache_leftovers, env_without_resnet
from helpers import jsonl, run_cli

# ---------------------------------------------------------------------------------------------
# Startup


def test_help_does_not_import_torch():
    code = (
        "import sys\n"
        "from resnetcli.cli import app\n"
        "try:\n"
        "    app(['--help'], prog_name='resnet')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print('torch' in sys.modules, 'torchvision' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert "predict" in done.stdout and "summary" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "False False"


def test_python_dash_m_and_version():
    done = subprocess.run(
        [sys.executable, "-m", "resnetcli", "--version"], capture_output=True, text=True, cwd=REPO, check=True
    )
    from importlib.metadata import version

    import resnetcli

    assert done.stdout.strip() == (
        f"resnetcli {resnetcli.__version__} (torch {version('torch')}, torchvision {version('torchvision')})"
    )


# ---------------------------------------------------------------------------------------------
# summary


@pytest.mark.parametrize("arch, total", [("resnet18", 11_689_512), ("resnet50", 25_557_032)])
def test_summary_totals(runner, app, arch, total):
    result = run_cli(runner, app, "summary", arch, "--format", "json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["totals"]["total_params"] == total
    assert document["totals"]["trainable_params"] == total
    assert document["input_size"] == [1, 3, 224, 224]
    assert document["layers"][0]["layer"] == arch and document["layers"][0]["output_shape"] == [1, 1000]
    names = {p["name"]: p for p in document["parameters"]}
    assert names["conv1.weight"]["shape"] == [64, 3, 7, 7]
    assert names["bn1.running_mean"] == {
        "name": "bn1.running_mean",
        "shape": [64],
        "dtype": "float32",
        "kind": "buffer",
        "trainable": False,
    }


def test_summary_table_shows_tree_and_totals(runner, app):
    result = run_cli(runner, app, "summary", "resnet18", "--depth", "1", "--format", "table")
    assert result.exit_code == 0, result.stderr
    assert "11,689,512" in result.stdout
    for layer in ("conv1", "layer1", "layer4", "fc"):
        assert f" {layer} " in result.stdout
    assert "[1, 512, 7, 7]" in result.stdout


def test_summary_params_table(runner, app):
    result = run_cli(runner, app, "summary", "resnet18", "--params", "--format", "tsv")
    assert result.exit_code == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout), delimiter="\t"))
    by_name = {row["name"]: row for row in rows}
    assert by_name["conv1.weight"]["shape"] == "[64, 3, 7, 7]"
    assert by_name["bn1.running_mean"]["shape"] == "[64]"
    assert by_name["bn1.running_mean"]["kind"] == "buffer"
    assert by_name["fc.weight"]["shape"] == "[1000, 512]"


# ---------------------------------------------------------------------------------------------
# features


def test_features_resnet18_at_640(runner, app):
    result = run_cli(runner, app, "features", "resnet18", "--input-size", "640", "--format", "jsonl")
    assert result.exit_code == 0, result.stderr
    maps = {m["name"]: m for m in jsonl(result.stdout)}
    assert list(maps) == ["stem", "layer1", "layer2", "layer3", "layer4"]
    assert maps["layer2"]["shape"] == [1, 128, 80, 80]
    assert maps["layer3"]["shape"] == [1, 256, 40, 40]
    assert maps["layer4"]["shape"] == [1, 512, 20, 20]
    assert [maps[n]["stride"] for n in maps] == [4, 4, 8, 16, 32]
    assert maps["stem"]["node"] == "maxpool"


# ---------------------------------------------------------------------------------------------
# predict


def torchvision_top_k(state_dict, images, k):
    """The reference: torchvision's own pipeline (weights.transforms() + the model) on the same tensors."""
    import torch
    from PIL import Image
    from torchvision import models

    weights = models.ResNet18_Weights.DEFAULT
    model = models.resnet18(weights=None)
    model.load_state_dict(state_dict)
    model.eval()
    transforms = weights.transforms()
    reference = {}
    with torch.no_grad():
        for path in images:
            probabilities = torch.softmax(model(transforms(Image.open(path).convert("RGB")).unsqueeze(0)), dim=1)[0]
            values, indices = probabilities.topk(k)
            reference[str(path)] = [
                (int(i), weights.meta["categories"][int(i)], float(v)) for v, i in zip(values, indices)
            ]
    return reference


def assert_matches_reference(records, reference):
    assert [r["input"] for r in records] == list(reference)
    for record in records:
        expected = reference[record["input"]]
        assert [(s["index"], s["label"]) for s in record["top"]] == [(i, label) for i, label, _ in expected]
        assert [s["rank"] for s in record["top"]] == list(range(1, len(expected) + 1))
        for score, (_, _, prob) in zip(record["top"], expected):
            assert score["prob"] == pytest.approx(prob, abs=1e-4)


def test_predict_checkpoint_matches_torchvision_pipeline(runner, app, steered_resnet18, model_args, sample_images):
    result = run_cli(runner, app, "predict", *sample_images, *model_args, "--top", "3", "--format", "jsonl")
    assert result.exit_code == 0, result.stderr
    records = jsonl(result.stdout)
    assert_matches_reference(records, torchvision_top_k(steered_resnet18.state_dict, sample_images, 3))
    # The steered head is discriminating: every photo lands on its own class.
    assert {r["input"].rsplit("/", 1)[-1]: r["top"][0]["index"] for r in records} == steered_resnet18.expected
    assert {r["weights"] for r in records} == {str(steered_resnet18.path)}
    assert {r["arch"] for r in records} == {"resnet18"}


def test_predict_downloads_into_hub_cache_then_works_offline(
    runner, app, steered_resnet18, sample_images, weight_server, checkpoint_dir
):
    url = weight_server.add(steered_resnet18.path)
    result = run_cli(
        runner, app, "predict", *sample_images, "--arch", "resnet18", "--weights", url, "--top", "5", "--format", "json"
    )
    assert result.exit_code == 0, result.stderr
    assert_matches_reference(
        json.loads(result.stdout), torchvision_top_k(steered_resnet18.state_dict, sample_images, 5)
    )
    cached = checkpoint_dir / steered_resnet18.path.name
    assert cached.read_bytes() == steered_resnet18.path.read_bytes()
    assert "downloading" in result.stderr
    # Second run: from the cache, with the network forbidden.
    photo = sample_images[0]
    again = run_cli(
        runner, app, "predict", photo, "--arch", "resnet18", "--weights", url, "--offline", "--format", "jsonl"
    )
    assert again.exit_code == 0, again.stderr
    assert jsonl(again.stdout)[0]["top"][0]["index"] == steered_resnet18.expected[sample_images[0].name]


def test_predict_formats(runner, app, steered_resnet18, model_args, sample_images):
    # One image per forward pass, so that the probabilities of the CSV and TSV runs are bit-identical.
    args = ["predict", *sample_images[:2], *model_args, "--top", "2", "--batch-size", "1"]
    reference = torchvision_top_k(steered_resnet18.state_dict, sample_images[:2], 2)
    rows = {}
    for fmt, delimiter in (("csv", ","), ("tsv", "\t")):
        result = run_cli(runner, app, *args, "--format", fmt)
        assert result.exit_code == 0, result.stderr
        rows[fmt] = list(csv.DictReader(io.StringIO(result.stdout), delimiter=delimiter))
        assert [(r["input"], int(r["rank"]), int(r["index"])) for r in rows[fmt]] == [
            (path, rank, index) for path, top in reference.items() for rank, (index, _, _) in enumerate(top, start=1)
        ]
    assert rows["csv"] == rows["tsv"]
    table = run_cli(runner, app, *args, "--format", "table")
    assert table.exit_code == 0
    first_label = next(iter(reference.values()))[0][1]
    assert first_label in table.stdout


def test_predict_default_format_off_terminal_is_jsonl(runner, app, steered_resnet18, sample_images):
    result = run_cli(runner, app, "predict", sample_images[0], "--arch", "resnet18", "--weights", steered_resnet18.path)
    assert result.exit_code == 0
    (record,) = jsonl(result.stdout)
    assert set(record) == {"input", "arch", "weights", "top"}
    assert len(record["top"]) == 5


def test_predict_bad_inputs_are_reported_and_batch_goes_on(runner, app, steered_resnet18, sample_images, tmp_path):
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("this is text, not a JPEG\n")
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(sample_images[0].read_bytes()[:2000])
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    missing = tmp_path / "missing.jpg"
    inputs = [sample_images[1], not_an_image, missing, truncated, folder, sample_images[2]]
    result = run_cli(
        runner, app, "predict", *inputs, "--arch", "resnet18", "--weights", steered_resnet18.path, "--format", "jsonl"
    )
    assert result.exit_code == 1
    records = jsonl(result.stdout)
    assert [r["input"] for r in records] == [str(p) for p in inputs]
    assert records[0]["top"][0]["index"] == steered_resnet18.expected[sample_images[1].name]
    assert records[-1]["top"][0]["index"] == steered_resnet18.expected[sample_images[2].name]
    errors = {r["input"]: r["error"] for r in records if "error" in r}
    assert set(errors) == {str(not_an_image), str(missing), str(truncated), str(folder)}
    assert "not an image" in errors[str(not_an_image)]
    assert "no such file" in errors[str(missing)]
    assert "directory" in errors[str(folder)]
    stderr_lines = result.stderr.strip().splitlines()
    assert len(stderr_lines) == 4
    for line, path in zip(stderr_lines, [not_an_image, missing, truncated, folder]):
        assert line.startswith(f"resnet: error: {path}: ")
    assert "Traceback" not in result.stderr


def test_predict_random_weights_warns(runner, app, sample_images):
    result = run_cli(runner, app, "predict", sample_images[0], "--arch", "resnet18", "--weights", "none", "--top", "1")
    assert result.exit_code == 0
    assert "random weights" in result.stderr and "meaningless" in result.stderr
    assert jsonl(result.stdout)[0]["weights"] == "none"


# ---------------------------------------------------------------------------------------------
# errors and exit codes


def test_unknown_architecture_suggests_and_exits_2(runner, app, sample_images):
    for args in (
        ["summary", "resnt50"],
        ["predict", sample_images[0], "--arch", "resnt50"],
        ["features", "resnt50"],
        ["fetch", "resnt50"],
    ):
        result = run_cli(runner, app, *args)
        assert result.exit_code == 2, args
        assert (
            result.stderr.strip()
            == "resnet: error: unknown architecture 'resnt50'; did you mean 'resnet50', 'resnet152', 'resnet101'?"
        )
        assert result.stdout == ""


def test_unknown_weights_name_exits_2(runner, app, sample_images):
    result = run_cli(runner, app, "predict", sample_images[0], "--arch", "resnet18", "--weights", "IMAGENET1K_V9")
    assert result.exit_code == 2
    assert "unknown weights 'IMAGENET1K_V9' for resnet18" in result.stderr
    assert "IMAGENET1K_V1" in result.stderr


def test_offline_missing_weights_exit_3_names_fetch_command(runner, app, sample_images, checkpoint_dir):
    result = run_cli(runner, app, "predict", sample_images[0], "--arch", "resnet50", "--offline")
    assert result.exit_code == 3
    assert "resnet50-11ad3fa6.pth" in result.stderr
    assert "`resnet fetch resnet50:IMAGENET1K_V2`" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_fetch_verifies_hash_and_leaves_nothing(runner, app, weight_server, checkpoint_dir, tmp_path):
    """A mirror serving a file under torchvision's name but with other content is refused."""
    import torch
    from torchvision import models

    impostor = tmp_path / "resnet18-f37072fd.pth"
    torch.save(models.resnet18(weights=None).state_dict(), impostor)
    weight_server.add(impostor)
    result = run_cli(runner, app, "fetch", "resnet18", "--mirror", weight_server.url)
    assert result.exit_code == 3
    assert f"{weight_server.url}/resnet18-f37072fd.pth: sha256 mismatch" in result.stderr
    assert not (checkpoint_dir / "resnet18-f37072fd.pth").exists()
    assert cache_leftovers(checkpoint_dir) == []


def test_crafted_pickle_is_refused_and_never_runs(runner, app, tmp_path, sample_images):
    import torch

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    checkpoint = tmp_path / "evil.pth"
    torch.save({"fc.weight": Exploit()}, checkpoint)
    result = run_cli(runner, app, "predict", sample_images[0], "--arch", "resnet18", "--weights", checkpoint)
    assert result.exit_code == 3
    assert result.stderr.startswith(f"resnet: error: {checkpoint}: refused to load")
    assert not marker.exists()
    assert "Traceback" not in result.stderr


def test_console_script_end_to_end(tmp_path, steered_resnet18, sample_images):
    """The installed `resnet` command, piped: machine-readable stdout, logs on stderr."""
    from pathlib import Path

    resnet = Path(sys.executable).parent / "resnet"  # installed beside the interpreter by `pip install`
    done = subprocess.run(
        [
            str(resnet),
            "predict",
            str(sample_images[0]),
            "--arch",
            "resnet18",
            "--weights",
            str(steered_resnet18.path),
            "-k",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env_without_resnet(TORCH_HOME=str(tmp_path)),
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["top"][0]["index"] == steered_resnet18.expected[sample_images[0].name]
