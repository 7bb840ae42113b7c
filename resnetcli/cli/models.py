"""`resnet summary`, `resnet features` and `resnet list`: model inspection without weights."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from resnetcli.cli.app import (
    FormatOption,
    MirrorOption,
    OfflineOption,
    TrustCheckpointOption,
    app,
    cache_settings,
    download_progress,
    say,
    warn,
)
from resnetcli.cli.output import OutputFormat, RecordWriter, choose_format
from resnetcli.cli.specopts import (
    InputOption,
    InputShapeOption,
    InputSizeOption,
    KwargsOption,
    no_weights_for_specs,
    parse_inputs,
    parse_kwargs,
    torchvision_shape,
    write_onnx_summary,
)
from resnetcli.cli.tables import display, print_fitted
from resnetcli.errors import UsageError

LAYER_COLUMNS = ["depth", "layer", "type", "output_shape", "params", "kernel_size", "mult_adds"]
DEFAULT_LAYER_COLUMNS = "layer,type,output_shape,params"
PARAM_COLUMNS = ["name", "shape", "dtype", "kind", "trainable"]
FEATURE_COLUMNS = ["name", "node", "shape", "layout", "channels", "stride"]
LIST_COLUMNS = ["arch", "weights", "default", "acc@1", "acc@5", "params", "gflops", "file_mb", "cached"]
#: `resnet list` columns a narrow terminal drops, first to last (`--wide` keeps them, and adds `file`).
LIST_DROPPED_FIRST = ["cached", "file_mb", "acc@5", "default", "gflops", "params"]

ArchArgument = Annotated[
    str,
    typer.Argument(
        metavar="MODEL",
        help="A torchvision architecture (`resnet list`), path/to/file.py:Name or package.module:Name (an nn.Module "
        "class, a function returning one, or an instance; importing the file runs it), timm:NAME, or (summary) a "
        ".onnx file.",
        show_default=False,
    ),
]
SummaryModelArgument = Annotated[
    Optional[str],
    typer.Argument(
        metavar="MODEL",
        help="As for features; may be left out with --weights CHECKPOINT that names its architecture (OUT.pth).",
        show_default=False,
    ),
]
InspectWeightsOption = Annotated[
    Optional[str],
    typer.Option(
        "--weights",
        "-w",
        help="Weights whose model to show: a weights name (configures e.g. the image size; nothing is "
        "downloaded), `none`, or a checkpoint file (its own shapes, e.g. a fine-tuned head).",
    ),
]


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


def _write_records(fmt: OutputFormat, columns: list[str], records: list[dict], title: str) -> None:
    """Records in a machine format, or a table fitted to the terminal."""
    if fmt is OutputFormat.table:
        print_fitted(columns, records, title, sys.stdout)
        return
    with RecordWriter(fmt, columns, title=title) as writer:
        for record in records:
            writer.write(record)


# ---------------------------------------------------------------------------------------------
# summary


def _print_summary_tables(document: dict, chosen: list[str], params: bool) -> None:
    title = f"{document['arch']} ({document['weights']})"
    if params:
        print_fitted(PARAM_COLUMNS, document["parameters"], f"{title} parameters", sys.stdout)
        return
    layers = [{**row, "layer": "  " * row["depth"] + row["layer"]} for row in document["layers"]]  # every column
    print_fitted(chosen, layers, f"{title} at {'x'.join(map(str, document['input_size']))}", sys.stdout)
    totals = [{"total": key, "value": display(key, value)} for key, value in document["totals"].items()]
    print_fitted(["total", "value"], totals, "totals", sys.stdout, footer="\n".join(document["notes"]))


def _write_summary(fmt: OutputFormat, document: dict, chosen: list[str], params: bool) -> None:
    import json

    if fmt is OutputFormat.table:
        _print_summary_tables(document, chosen, params)
        return
    document = {**document, "layers": [{key: row[key] for key in chosen} for row in document["layers"]]}
    if fmt is OutputFormat.json:
        sys.stdout.write(json.dumps(document, ensure_ascii=False, indent=2) + "\n")
    else:
        columns, rows = (PARAM_COLUMNS, document["parameters"]) if params else (chosen, document["layers"])
        with RecordWriter(fmt, columns) as writer:
            for row in rows:
                writer.write(row)
    sys.stdout.flush()


@app.command()
def summary(
    arch: SummaryModelArgument = None,
    input_size: InputSizeOption = None,
    batch: Annotated[int, typer.Option("--batch", min=1, help="Batch size of the example input.")] = 1,
    depth: Annotated[int, typer.Option("--depth", "-d", min=0, help="How deep the layer tree goes.")] = 3,
    columns: Annotated[
        str,
        typer.Option("--columns", "-c", metavar="COL,...", help=f"Layer columns, from: {', '.join(LAYER_COLUMNS)}."),
    ] = DEFAULT_LAYER_COLUMNS,
    params: Annotated[
        bool, typer.Option("--params", help="List every parameter and buffer with its shape instead of the layer tree.")
    ] = False,
    name_filter: Annotated[
        Optional[str], typer.Option("--filter", help="With --params: only names containing this text.")
    ] = None,
    weights: InspectWeightsOption = None,
    trust_checkpoint: TrustCheckpointOption = False,
    input_shape: InputShapeOption = None,
    inputs: InputOption = None,
    kwargs: KwargsOption = None,
    output_format: FormatOption = None,
) -> None:
    """The layer tree (torchinfo) with output shapes and parameter counts, totals with GFLOPS, and every parameter.

    For a .onnx file: its inputs and outputs, operator histogram, parameter count and metadata.
    """
    from resnetcli import specs
    from resnetcli.shapes import parse_size

    if arch is None:  # the checkpoint's own architecture (a fine-tuned OUT.pth, a reference train.py file)
        from resnetcli.checkpoints import read_checkpoint

        named = read_checkpoint(Path(weights), trust=trust_checkpoint).arch if weights else None
        if named is None:
            raise UsageError("summary needs MODEL, or --weights CHECKPOINT that names its architecture")
        arch = named
    spec = specs.parse_spec(arch)
    fmt = choose_format(output_format, sys.stdout)
    if spec.kind == specs.ONNX:
        from resnetcli.onnxinfo import summarize_onnx

        write_onnx_summary(fmt, summarize_onnx(arch).record())
        return
    chosen = parse_list("--columns", columns, LAYER_COLUMNS) or []
    size = parse_size(input_size)
    if spec.kind == specs.TORCHVISION:
        from resnetcli.summary import summarize

        batch, size = torchvision_shape(input_shape, inputs, kwargs, batch, size)
        report = summarize(
            arch,
            weights=weights,
            input_size=size,
            batch=batch,
            depth=depth,
            name_filter=name_filter,
            trust_checkpoint=trust_checkpoint,
        )
        _remember_names()
    else:
        from resnetcli.anymodel import summarize_spec

        no_weights_for_specs(weights)
        report = summarize_spec(
            arch,
            kwargs=parse_kwargs(kwargs),
            inputs=parse_inputs(input_shape, inputs),
            input_size=size,
            batch=batch,
            depth=depth,
            name_filter=name_filter,
        )
        for note in report.notes:
            say(f"note: {note}")
    _write_summary(fmt, report.record(), chosen, params)


# ---------------------------------------------------------------------------------------------
# features


@app.command()
def features(
    arch: ArchArgument,
    input_size: InputSizeOption = None,
    nodes: Annotated[
        Optional[str],
        typer.Option(
            "--nodes",
            "-n",
            metavar="NODE,...",
            help="Graph nodes or module names to report instead of the natural stages (see --list-nodes).",
        ),
    ] = None,
    list_nodes: Annotated[
        bool, typer.Option("--list-nodes", help="Print the graph node names --nodes takes, and exit.")
    ] = False,
    save: Annotated[
        Optional[Path],
        typer.Option(
            "--save",
            metavar="FILE.npz|FILE.pt",
            help="Run --image through the model with its weights and save the feature tensors.",
            dir_okay=False,
        ),
    ] = None,
    image: Annotated[
        Optional[Path],
        typer.Option("--image", "-i", metavar="IMAGE", help="The image whose features --save saves.", dir_okay=False),
    ] = None,
    weights: Annotated[
        Optional[str],
        typer.Option(
            "--weights",
            "-w",
            help="Weights (as for predict: a name, DEFAULT, none, a checkpoint file or a URL); "
            "without --save only their configuration is used.",
        ),
    ] = None,
    trust_checkpoint: TrustCheckpointOption = False,
    input_shape: InputShapeOption = None,
    inputs: InputOption = None,
    kwargs: KwargsOption = None,
    output_format: FormatOption = None,
    offline: OfflineOption = False,
    mirror: MirrorOption = None,
) -> None:
    """The multi-scale feature maps of the backbone: name, graph node, shape, layout, channels and stride."""
    from resnetcli import features as core
    from resnetcli import specs
    from resnetcli.shapes import check_save_path, parse_size

    node_list = parse_list("--nodes", nodes)
    fmt = choose_format(output_format, sys.stdout)
    spec = specs.parse_spec(arch)
    if spec.kind == specs.ONNX:
        raise UsageError(f"{arch}: features needs a torch model; `resnet summary` reads .onnx files")
    if spec.kind != specs.TORCHVISION:
        from resnetcli.anymodel import spec_features

        if node_list or list_nodes or save or image:
            raise UsageError("--nodes, --list-nodes, --save and --image apply to torchvision architectures")
        no_weights_for_specs(weights)
        report, notes = spec_features(
            arch,
            kwargs=parse_kwargs(kwargs),
            inputs=parse_inputs(input_shape, inputs),
            input_size=parse_size(input_size),
        )
        for note in notes:
            say(f"note: {note}")
        title = f"{report.arch} feature maps at {'x'.join(map(str, report.input_size))}"
        _write_records(fmt, FEATURE_COLUMNS, [feature.record() for feature in report.maps], title)
        return
    if input_shape or inputs or kwargs:
        raise UsageError("--input-shape, --input and --kwargs apply to model specs; torchvision takes --input-size")
    if list_nodes:
        names = core.list_graph_nodes(arch, weights, trust_checkpoint)
        _remember_names()
        _write_records(fmt, ["node"], [{"node": name} for name in names], f"{arch} graph nodes")
        return
    if (save is None) != (image is None):
        raise UsageError("--save and --image go together: --save FILE.npz|.pt --image IMAGE")
    if save is not None and image is not None:
        if input_size is not None:
            raise UsageError("--input-size does not apply with --image: the weights' preprocessing sets the size")
        check_save_path(save)
        with download_progress() as on_progress:
            report, tensors, notes = core.extract_features(
                arch,
                str(image),
                weights=weights,
                nodes=node_list,
                settings=cache_settings(offline, mirror),
                on_progress=on_progress,
                trust_checkpoint=trust_checkpoint,
            )
        for note in notes:
            warn(note)
        core.save_features(tensors, save)
        say(f"saved {len(tensors)} feature maps of {image} to {save}")
    else:
        report = core.feature_maps(
            arch, weights=weights, input_size=parse_size(input_size), nodes=node_list, trust_checkpoint=trust_checkpoint
        )
    _remember_names()
    title = f"{report.arch} ({report.weights}) feature maps at {'x'.join(map(str, report.input_size))}"
    _write_records(fmt, FEATURE_COLUMNS, [feature.record() for feature in report.maps], title)


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
    pattern: Annotated[
        Optional[str],
        typer.Argument(help="Shell-style pattern of architecture names ('resnet*', '*vit*').", show_default=False),
    ] = None,
    sort: Annotated[
        SortKey,
        typer.Option(
            "--sort",
            help="Order: name, best accuracy first (acc@1, acc@5), or smallest first (params, gflops, size).",
            case_sensitive=False,
        ),
    ] = SortKey.name,
    wide: Annotated[
        bool, typer.Option("--wide", help="Show every column (and the file name) however wide the terminal.")
    ] = False,
    output_format: FormatOption = None,
) -> None:
    """Architectures and their pretrained weights: accuracy, parameters, GFLOPS, file size, and whether cached."""
    from resnetcli.catalogue import weights_catalogue

    if pattern is not None and pattern.startswith("timm:"):
        from resnetcli.anymodel import timm_catalogue

        records = [info.record() for info in timm_catalogue(pattern.removeprefix("timm:"))]
        _write_records(
            choose_format(output_format, sys.stdout),
            ["arch", "weights", "default"],
            records,
            "timm models and their pretrained tags",
        )
        return
    rows = sorted(weights_catalogue(pattern), key=_sort_key(sort))
    _remember_names()
    fmt = choose_format(output_format, sys.stdout)
    title = "torchvision classifiers (acc@1/acc@5 on ImageNet-1K)"
    records = [info.record() for info in rows]
    if fmt is OutputFormat.table:
        columns = [*LIST_COLUMNS, "file"] if wide else LIST_COLUMNS
        print_fitted(columns, records, title, sys.stdout, drop=LIST_DROPPED_FIRST, fit=not wide)
        return
    _write_records(fmt, LIST_COLUMNS, records, title)
