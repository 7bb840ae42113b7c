"""What `list` and `summary` show a person at 80 columns, GFLOPS that agree with torchvision, every
`list --sort` key, and a half-precision checkpoint's dtypes.

Expected numbers come from torchvision's weights.meta and from models built here, never from
resnetcli's own formatting.
"""

from __future__ import annotations

import json

import pytest
from torchvision import models

ARCHITECTURES = models.list_models(module=models)


def invoke(runner, app, *args, columns: int | None = 80):
    env = {"COLUMNS": str(columns)} if columns else {"COLUMNS": None}
    result = runner.invoke(app, [str(a) for a in args], env=env)
    assert result.exit_code == 0, result.stderr
    return result


def data_lines(text: str) -> list[str]:
    """The body rows of the first rich table in `text` (between the header rule and the bottom border)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("┡"))
    end = next(i for i, line in enumerate(lines) if line.startswith("└") and i > start)
    return lines[start + 1 : end]


@pytest.mark.parametrize("arch", ["resnet50", "vit_b_16", "swin_t", "convnext_tiny", "efficientnet_b0"])
def test_summary_gflops_agree_with_torchvision(runner, app, arch):
    weights = models.get_model_weights(arch).DEFAULT
    document = json.loads(invoke(runner, app, "summary", arch, "--depth", "0", "--format", "json").stdout)
    assert document["totals"]["gflops"] == pytest.approx(weights.meta["_ops"], rel=0.02)
    assert document["build"] == "meta"
    # torchinfo's figure stays under its own name; for ViT it misses attention's products.
    assert any("mult_adds" in note and "torchinfo" in note for note in document["notes"])
    if arch == "vit_b_16":
        assert document["totals"]["mult_adds"] < 0.5 * weights.meta["_ops"] * 1e9


@pytest.mark.parametrize("pattern", ["*", "vit*", "resnet*", "regnet_y*"])
def test_list_fits_80_columns_without_breaking_numbers(runner, app, pattern):
    records = json.loads(invoke(runner, app, "list", pattern, "--format", "json").stdout)
    table = invoke(runner, app, "list", pattern, "--format", "table").stdout
    assert max(len(line) for line in table.splitlines()) <= 80
    rows = data_lines(table)
    assert len(rows) == len(records)  # not one row wrapped onto a second line
    for record, row in zip(records, rows, strict=True):
        cells = [cell.strip() for cell in row.strip("│").split("│")]
        assert cells[:2] == [record["arch"], record["weights"]]
        assert f"{record['acc@1']:.3f}" in cells  # the published precision, not padded to 4 decimals
        if "params" in table.splitlines()[2]:
            assert f"{record['params']:,}" in cells
    assert "; --wide shows all" in table


def test_list_wide_shows_every_column_and_the_file(runner, app):
    table = invoke(runner, app, "list", "vit*", "--wide", "--format", "table").stdout
    header = [cell.strip() for cell in table.splitlines()[2].strip("┃").split("┃")]
    assert header == ["arch", "weights", "default", "acc@1", "acc@5", "params", "gflops", "file_mb", "cached", "file"]
    weights = models.ViT_H_14_Weights.IMAGENET1K_SWAG_E2E_V1
    row = next(line for line in data_lines(table) if "vit_h_14" in line and "SWAG_E2E" in line)
    cells = [cell.strip() for cell in row.strip("│").split("│")]
    assert cells[3:9] == [
        f"{weights.meta['_metrics']['ImageNet-1K']['acc@1']:.3f}",
        f"{weights.meta['_metrics']['ImageNet-1K']['acc@5']:.3f}",
        f"{weights.meta['num_params']:,}",
        f"{weights.meta['_ops']:,.2f}",
        f"{weights.meta['_file_size']:,.1f}",
        "no",
    ]
    assert cells[9] == weights.url.rsplit("/", 1)[1]
    assert "--wide shows all" not in table


@pytest.mark.parametrize("columns", ["layer,type,output_shape,params", "layer,type,output_shape,params,mult_adds"])
def test_summary_fits_80_columns_without_breaking_numbers(runner, app, columns):
    document = json.loads(invoke(runner, app, "summary", "resnet50", "--format", "json", "--columns", columns).stdout)
    table = invoke(runner, app, "summary", "resnet50", "--format", "table", "--columns", columns).stdout
    lines = table.splitlines()
    assert max(len(line) for line in lines) <= 80
    for layer in document["layers"]:
        # Each layer's counts and shape are whole on one line.
        whole = [f"{layer['params']:,}", str(layer["output_shape"])]
        if layer.get("mult_adds"):
            whole.append(f"{layer['mult_adds']:,}")
        assert any(all(text in line for text in whole) for line in lines), layer
    totals = document["totals"]
    assert any("gflops" in line and f"{totals['gflops']:.2f}" in line for line in lines)
    assert any("params_size_mb" in line and f"{totals['params_size_mb']:.2f}" in line for line in lines)
    assert any("mult_adds" in line and f"{totals['mult_adds']:,}" in line for line in lines)


SORTS = {
    "name": (lambda r: (r["arch"], r["weights"]), False),
    "acc@1": (lambda r: r["acc@1"], True),
    "acc@5": (lambda r: r["acc@5"], True),
    "params": (lambda r: r["params"], False),
    "gflops": (lambda r: r["gflops"], False),
    "size": (lambda r: r["file_mb"], False),
}


@pytest.mark.parametrize("key", list(SORTS))
def test_list_sort_by_each_key(runner, app, key):
    records = json.loads(invoke(runner, app, "list", "--sort", key, "--format", "json").stdout)
    assert len(records) == sum(len(models.get_model_weights(a)) for a in ARCHITECTURES)
    value, descending = SORTS[key]
    values = [value(r) for r in records]
    assert values == sorted(values, reverse=descending)
    assert values != sorted(values, reverse=not descending)


def test_summary_params_show_a_half_precision_checkpoints_dtype(runner, app, tmp_path):
    import torch

    model = models.resnet18(num_classes=4)
    state = {key: (t.half() if t.is_floating_point() else t) for key, t in model.state_dict().items()}
    checkpoint = tmp_path / "half.pth"
    torch.save(state, checkpoint)
    document = json.loads(
        invoke(runner, app, "summary", "resnet18", "--weights", checkpoint, "--params", "--format", "json").stdout
    )
    dtypes = {p["name"]: p["dtype"] for p in document["parameters"]}
    assert dtypes["fc.weight"] == "float16" and dtypes["conv1.weight"] == "float16"
    assert dtypes["bn1.num_batches_tracked"] == "int64"
    assert {p["name"]: p["shape"] for p in document["parameters"]}["fc.weight"] == [4, 512]
