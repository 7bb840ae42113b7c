"""`resnet summary` and `resnet features`: model inspection on the meta device, no weights needed."""

from __future__ import annotations

import sys
from dataclasses import asdict
from typing import Optional

import typer
from typing_extensions import Annotated

from resnetcli.cli.app import FormatOption, app
from resnetcli.cli.output import OutputFormat, RecordWriter, choose_format, write_document
from resnetcli.errors import UsageError

LAYER_COLUMNS = ["depth", "layer", "type", "output_shape", "params", "kernel_size", "mult_adds"]
PARAM_COLUMNS = ["name", "shape", "dtype", "kind", "trainable"]
FEATURE_COLUMNS = ["name", "node", "shape", "channels", "stride"]

InputSizeOption = Annotated[
    Optional[str],
    typer.Option("--input-size", "-s", metavar="H[,W]", help="Input height and width (default: the crop size of the default weights)."),
]


def parse_size(text: Optional[str]) -> Optional[list[int]]:
    """`640` or `480,640` as a list of ints."""
    if text is None:
        return None
    try:
        values = [int(part) for part in text.replace("x", ",").split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--input-size {text}: expected H or H,W in pixels") from None
    if not 1 <= len(values) <= 2 or any(v < 1 for v in values):
        raise UsageError(f"--input-size {text}: expected H or H,W in pixels")
    return values


@app.command()
def summary(
    arch: Annotated[str, typer.Argument(help="Architecture name (`resnet list`).")],
    input_size: InputSizeOption = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Batch size of the example input.")] = 1,
    depth: Annotated[int, typer.Option("--depth", "-d", min=0, help="How deep the layer tree goes.")] = 3,
    params: Annotated[bool, typer.Option("--params", help="List every parameter and buffer with its shape instead of the layer tree.")] = False,
    name_filter: Annotated[Optional[str], typer.Option("--filter", help="With --params: only names containing this text.")] = None,
    weights: Annotated[Optional[str], typer.Option("--weights", "-w", help="A checkpoint file whose own shapes to show (fine-tuned heads).")] = None,
    output_format: FormatOption = None,
) -> None:
    """The layer tree (torchinfo) with output shapes and parameter counts, totals, and parameter names."""
    from resnetcli.inspect import summarize
    from resnetcli.registry import load_state_dict, resolve_weights

    state_dict = None
    if weights is not None:
        choice = resolve_weights(arch, weights)
        if choice.kind != "checkpoint":
            raise UsageError("summary --weights takes a checkpoint file; pretrained weights have the architecture's own shapes")
        state_dict = load_state_dict(choice.path)
    report = summarize(arch, input_size=parse_size(input_size), batch=batch, depth=depth, state_dict=state_dict, name_filter=name_filter)
    layers = [
        {"depth": row.depth, "layer": row.name, "type": row.type, "output_shape": row.output_shape,
         "params": row.params, "kernel_size": row.kernel_size, "mult_adds": row.mult_adds}
        for row in report.layers
    ]
    parameters = [asdict(p) for p in report.parameters]
    document = {"arch": report.arch, "input_size": report.input_size, "totals": report.totals, "layers": layers, "parameters": parameters}
    fmt = choose_format(output_format, sys.stdout)
    if fmt is OutputFormat.table:
        indented = [{**row, "layer": "  " * row["depth"] + row["layer"]} for row in layers]
        totals = [{"total": key, "value": value} for key, value in report.totals.items()]
        sections = {f"{report.arch} parameters": (PARAM_COLUMNS, parameters)} if params else {
            f"{report.arch} at {'x'.join(map(str, report.input_size))}": (LAYER_COLUMNS, indented),
            "totals": (["total", "value"], totals),
        }
        write_document(fmt, document, sections, primary="")
    else:
        write_document(fmt, document, {"layers": (LAYER_COLUMNS, layers), "parameters": (PARAM_COLUMNS, parameters)}, primary="parameters" if params else "layers")


@app.command()
def features(
    arch: Annotated[str, typer.Argument(help="Architecture name (`resnet list`).")],
    input_size: InputSizeOption = None,
    output_format: FormatOption = None,
) -> None:
    """The multi-scale feature maps of the backbone: name, graph node, shape, channels and stride."""
    from resnetcli.inspect import feature_maps

    maps = feature_maps(arch, input_size=parse_size(input_size))
    fmt = choose_format(output_format, sys.stdout)
    with RecordWriter(fmt, FEATURE_COLUMNS, title=f"{arch} feature maps") as writer:
        for feature in maps:
            writer.write(asdict(feature))
