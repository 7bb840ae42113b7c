"""`resnet summary`, `resnet features` and `resnet list`: model inspection without weights."""

from __future__ import annotations

import sys
from dataclasses import asdict
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from resnetcli.cli.app import FormatOption, MirrorOption, OfflineOption, app, cache_settings, download_progress, say, warn
from resnetcli.cli.output import OutputFormat, RecordWriter, choose_format, write_document
from resnetcli.errors import UsageError

LAYER_COLUMNS = ["depth", "layer", "type", "output_shape", "params", "kernel_size", "mult_adds"]
DEFAULT_LAYER_COLUMNS = "layer,type,output_shape,params"
PARAM_COLUMNS = ["name", "shape", "dtype", "kind", "trainable"]
FEATURE_COLUMNS = ["name", "node", "shape", "layout", "channels", "stride"]
LIST_COLUMNS = ["arch", "weights", "default", "acc@1", "acc@5", "params", "gflops", "file_mb", "cached"]

ArchArgument = Annotated[str, typer.Argument(help="Architecture name (`resnet list`).", show_default=False)]
InputSizeOption = Annotated[
    Optional[str],
    typer.Option("--input-size", "-s", metavar="H[,W]", help="Input height and width (default: the crop size of the weights' preprocessing)."),
]
InspectWeightsOption = Annotated[
    Optional[str],
    typer.Option(
        "--weights",
        "-w",
        help="Weights whose model to show: a weights name (configures e.g. the image size; nothing is downloaded), `none`, or a checkpoint file (its own shapes, e.g. a fine-tuned head).",
    ),
]


TrustOption = Annotated[
    bool,
    typer.Option("--trust-checkpoint", help="Load a --weights checkpoint that needs to run code from the file (weights_only=False): this RUNS THE FILE'S CODE; only for files from a source you trust."),
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


def parse_list(option: str, text: Optional[str], allowed: Optional[list[str]] = None) -> Optional[list[str]]:
    """A comma-separated option value as a list, checked against `allowed` when given."""
    if text is None:
        return None
    values = [part.strip() for part in text.split(",") if part.strip()]
    if not values:
        raise UsageError(f"{option}: expected a comma-separated list")
    unknown = [value for value in values if allowed is not None and value not in allowed]
    if unknown:
        raise UsageError(f"{option}: unknown {', '.join(unknown)} (choose from {', '.join(allowed or [])})")
    return values


def _remember_names() -> None:
    from resnetcli.names import remember

    remember()


# ---------------------------------------------------------------------------------------------
# summary


@app.command()
def summary(
    arch: ArchArgument,
    input_size: InputSizeOption = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Batch size of the example input.")] = 1,
    depth: Annotated[int, typer.Option("--depth", "-d", min=0, help="How deep the layer tree goes.")] = 3,
    columns: Annotated[
        str,
        typer.Option("--columns", "-c", metavar="COL,...", help=f"Layer columns, from: {', '.join(LAYER_COLUMNS)}."),
    ] = DEFAULT_LAYER_COLUMNS,
    params: Annotated[bool, typer.Option("--params", help="List every parameter and buffer with its shape instead of the layer tree.")] = False,
    name_filter: Annotated[Optional[str], typer.Option("--filter", help="With --params: only names containing this text.")] = None,
    weights: InspectWeightsOption = None,
    trust_checkpoint: TrustOption = False,
    output_format: FormatOption = None,
) -> None:
    """The layer tree (torchinfo) with output shapes and parameter counts, totals, and every parameter."""
    from resnetcli.inspect import summarize

    chosen = parse_list("--columns", columns, LAYER_COLUMNS) or []
    report = summarize(arch, weights=weights, input_size=parse_size(input_size), batch=batch, depth=depth, name_filter=name_filter,
                       trust_checkpoint=trust_checkpoint)
    _remember_names()
    rows = [
        {"depth": row.depth, "layer": row.name, "type": row.type, "output_shape": row.output_shape,
         "params": row.params, "kernel_size": row.kernel_size, "mult_adds": row.mult_adds}
        for row in report.layers
    ]
    layers = [{key: row[key] for key in chosen} for row in rows]
    parameters = [asdict(p) for p in report.parameters]
    document = {
        "arch": report.arch, "weights": report.weights, "input_size": report.input_size,
        "totals": report.totals, "layers": layers, "parameters": parameters,
    }
    fmt = choose_format(output_format, sys.stdout)
    if fmt is OutputFormat.table:
        indented = [{**layer, "layer": "  " * row["depth"] + row["layer"]} for layer, row in zip(layers, rows)]
        totals = [{"total": key, "value": value} for key, value in report.totals.items()]
        title = f"{report.arch} ({report.weights})"
        sections = {f"{title} parameters": (PARAM_COLUMNS, parameters)} if params else {
            f"{title} at {'x'.join(map(str, report.input_size))}": (chosen, indented),
            "totals": (["total", "value"], totals),
        }
        write_document(fmt, document, sections, primary="")
    else:
        write_document(fmt, document, {"layers": (chosen, layers), "parameters": (PARAM_COLUMNS, parameters)}, primary="parameters" if params else "layers")


# ---------------------------------------------------------------------------------------------
# features


@app.command()
def features(
    arch: ArchArgument,
    input_size: InputSizeOption = None,
    nodes: Annotated[Optional[str], typer.Option("--nodes", "-n", metavar="NODE,...", help="Graph nodes or module names to report instead of the natural stages (see --list-nodes).")] = None,
    list_nodes: Annotated[bool, typer.Option("--list-nodes", help="Print the graph node names --nodes takes, and exit.")] = False,
    save: Annotated[Optional[Path], typer.Option("--save", metavar="FILE.npz|FILE.pt", help="Run --image through the model with its weights and save the feature tensors.", dir_okay=False)] = None,
    image: Annotated[Optional[Path], typer.Option("--image", "-i", metavar="IMAGE", help="The image whose features --save saves.", dir_okay=False)] = None,
    weights: Annotated[
        Optional[str],
        typer.Option("--weights", "-w", help="Weights (as for predict: a name, DEFAULT, none, a checkpoint file or a URL); without --save only their configuration is used."),
    ] = None,
    trust_checkpoint: TrustOption = False,
    output_format: FormatOption = None,
    offline: OfflineOption = False,
    mirror: MirrorOption = None,
) -> None:
    """The multi-scale feature maps of the backbone: name, graph node, shape, layout, channels and stride."""
    from resnetcli import inspect

    node_list = parse_list("--nodes", nodes)
    fmt = choose_format(output_format, sys.stdout)
    if list_nodes:
        names = inspect.list_graph_nodes(arch, weights, trust_checkpoint)
        _remember_names()
        with RecordWriter(fmt, ["node"], title=f"{arch} graph nodes") as writer:
            for name in names:
                writer.write({"node": name})
        return
    if (save is None) != (image is None):
        raise UsageError("--save and --image go together: --save FILE.npz|.pt --image IMAGE")
    if save is not None and image is not None:
        if input_size is not None:
            raise UsageError("--input-size does not apply with --image: the weights' preprocessing sets the size")
        if save.suffix.lower() not in (".npz", ".pt"):
            raise UsageError(f"--save {save}: the file name must end in .npz or .pt")
        with download_progress() as on_progress:
            report, tensors, notes = inspect.extract_features(
                arch, str(image), weights=weights, nodes=node_list, settings=cache_settings(offline, mirror), on_progress=on_progress,
                trust_checkpoint=trust_checkpoint,
            )
        for note in notes:
            warn(note)
        inspect.save_features(tensors, save)
        say(f"saved {len(tensors)} feature maps of {image} to {save}")
    else:
        report = inspect.feature_maps(arch, weights=weights, input_size=parse_size(input_size), nodes=node_list,
                                      trust_checkpoint=trust_checkpoint)
    _remember_names()
    title = f"{report.arch} ({report.weights}) feature maps at {'x'.join(map(str, report.input_size))}"
    with RecordWriter(fmt, FEATURE_COLUMNS, title=title) as writer:
        for feature in report.maps:
            writer.write(asdict(feature))


# ---------------------------------------------------------------------------------------------
# list


class SortKey(str, Enum):
    """Orders of `resnet list`: by name, best accuracy first, or smallest first."""

    name = "name"
    acc1 = "acc@1"
    acc5 = "acc@5"
    params = "params"
    gflops = "gflops"
    size = "size"


def _sort_key(key: SortKey):
    missing_high = float("inf")
    return {
        SortKey.name: lambda info: (info.arch, info.weights),
        SortKey.acc1: lambda info: -(info.acc1 if info.acc1 is not None else -missing_high),
        SortKey.acc5: lambda info: -(info.acc5 if info.acc5 is not None else -missing_high),
        SortKey.params: lambda info: info.params if info.params is not None else missing_high,
        SortKey.gflops: lambda info: info.gflops if info.gflops is not None else missing_high,
        SortKey.size: lambda info: info.file_mb if info.file_mb is not None else missing_high,
    }[key]


@app.command("list")
def list_command(
    pattern: Annotated[Optional[str], typer.Argument(help="Shell-style pattern of architecture names ('resnet*', '*vit*').", show_default=False)] = None,
    sort: Annotated[SortKey, typer.Option("--sort", help="Order: name, best accuracy first (acc@1, acc@5), or smallest first (params, gflops, size).", case_sensitive=False)] = SortKey.name,
    output_format: FormatOption = None,
) -> None:
    """Architectures and their pretrained weights: accuracy, parameters, GFLOPS, file size, and whether cached."""
    from resnetcli.catalogue import weights_catalogue

    rows = sorted(weights_catalogue(pattern), key=_sort_key(sort))
    _remember_names()
    fmt = choose_format(output_format, sys.stdout)
    with RecordWriter(fmt, LIST_COLUMNS, title="torchvision classifiers (acc@1/acc@5 on ImageNet-1K)") as writer:
        for info in rows:
            writer.write({
                "arch": info.arch, "weights": info.weights, "default": info.default, "acc@1": info.acc1,
                "acc@5": info.acc5, "params": info.params, "gflops": info.gflops, "file_mb": info.file_mb,
                "file": info.file, "cached": info.cached,
            })
