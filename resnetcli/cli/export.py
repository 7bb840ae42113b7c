"""`resnet export`: a classifier to a self-describing ONNX file, checked against torch before it is kept."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from resnetcli.cli.app import (
    FormatOption,
    MirrorOption,
    OfflineOption,
    app,
    cache_settings,
    download_progress,
    say,
    warn,
)
from resnetcli.cli.output import RecordWriter, choose_format
from resnetcli.onnxmeta import DEFAULT_OPSET, MIN_OPSET

EXPORT_COLUMNS = ["path", "arch", "weights", "opset", "classes", "size", "max_abs_diff", "tolerance", "source_sha256"]


@app.command()
def export(
    models: Annotated[
        str,
        typer.Argument(
            help="ARCH or ARCH:WEIGHTS (resnet50, resnet18:IMAGENET1K_V1), or a model spec with --weights FILE: "
            "timm:NAME[.TAG], file.py:Name, pkg.mod:Name (docs/models.md).",
            metavar="ARCH[:WEIGHTS]",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path, typer.Option("--output", "-o", dir_okay=False, help="The .onnx file to write (atomically).")
    ],
    weights: Annotated[
        str | None,
        typer.Option(
            "--weights", "-w", help="A weights name, `none`, a checkpoint file or a URL (instead of ARCH:WEIGHTS)."
        ),
    ] = None,
    opset: Annotated[
        int, typer.Option("--opset", min=MIN_OPSET, help="ONNX opset to write (the exporter's own or later).")
    ] = DEFAULT_OPSET,
    labels: Annotated[
        Path | None,
        typer.Option(
            "--labels",
            exists=True,
            dir_okay=False,
            help="Class names to store for a fine-tuned checkpoint: text or JSON.",
        ),
    ] = None,
    check_with: Annotated[
        list[Path] | None,
        typer.Option(
            "--check-with",
            exists=True,
            dir_okay=False,
            metavar="IMAGE",
            help="Photos to compare ONNX Runtime with torch on (default: the sample photos).",
        ),
    ] = None,
    output_format: FormatOption = None,
    offline: OfflineOption = False,
    mirror: MirrorOption = None,
) -> None:
    """Export a classifier to ONNX with its classes and preprocessing, checked against torch on real photos."""
    from resnetcli.catalogue import architecture_names
    from resnetcli.cli.predict_records import read_labels
    from resnetcli.errors import UsageError
    from resnetcli.export import export as run_export
    from resnetcli.foreign import is_spec

    # ARCH:WEIGHTS when ARCH is torchvision's (resnet18:IMAGENET1K_V1 also reads as module:Name);
    # timm:NAME, file.py:Name and pkg.mod:Name keep their colon, their weights come from --weights.
    head, colon, tail = models.partition(":")
    if colon and head not in architecture_names() and is_spec(models):
        head, colon, tail = models, "", ""
    arch, spec_weights = head, tail
    if colon and weights is not None:
        raise UsageError(f"{models}: give the weights either as ARCH:WEIGHTS or with --weights, not both")
    if output.is_dir():
        raise UsageError(f"-o {output}: is a directory")
    if not output.parent.is_dir():
        raise UsageError(f"-o {output}: no such folder {output.parent}")
    with download_progress() as on_progress:
        result = run_export(
            arch,
            weights if weights is not None else (spec_weights or None),
            output,
            opset=opset,
            labels=read_labels(labels) if labels else None,
            images=check_with,
            settings=cache_settings(offline, mirror),
            on_progress=on_progress,
        )
    if result.info.weights == "none":
        warn(f"{result.info.arch} was exported with random weights (--weights none)")
    say(
        f"exported {result.path} ({result.size / 1e6:.1f} MB, opset {result.info.opset}); "
        f"ONNX Runtime matches torch on {len(result.checked_on)} photos within {result.max_abs_diff:.2g} "
        f"(tolerance {result.tolerance:.2g})"
    )
    import sys

    with RecordWriter(choose_format(output_format, sys.stdout), EXPORT_COLUMNS, title="export") as writer:
        writer.write(result.record())
