"""`resnet fetch`: fill the weight cache so that later runs work offline."""

from __future__ import annotations

import sys
from typing import List

import typer
from typing_extensions import Annotated

from resnetcli.cli.app import FormatOption, MirrorOption, OfflineOption, app, cache_settings, download_progress, say
from resnetcli.cli.output import RecordWriter, choose_format

FETCH_COLUMNS = ["name", "file", "size", "sha256", "path", "status"]


@app.command()
def fetch(
    models: Annotated[List[str], typer.Argument(help="ARCH or ARCH:WEIGHTS (resnet50, resnet18:IMAGENET1K_V1).", metavar="ARCH[:WEIGHTS]...")],
    output_format: FormatOption = None,
    offline: OfflineOption = False,
    mirror: MirrorOption = None,
) -> None:
    """Download pretrained weights into the cache ($TORCH_HOME/hub/checkpoints), verified by sha256."""
    from resnetcli.cache import download
    from resnetcli.registry import resolve_weights
    from resnetcli.errors import UsageError

    choices = []
    for spec in models:
        arch, _, weights = spec.partition(":")
        choice = resolve_weights(arch, weights or None)
        if choice.kind != "pretrained":
            raise UsageError(f"{spec}: fetch takes torchvision weights names (ARCH or ARCH:WEIGHTS)")
        choices.append(choice)
    settings = cache_settings(offline, mirror)
    fmt = choose_format(output_format, sys.stdout)
    with download_progress() as on_progress, RecordWriter(fmt, FETCH_COLUMNS, title="weight cache") as writer:
        for choice in choices:
            cached = download(choice.pretrained.url, settings=settings, on_progress=on_progress)
            say(f"{cached.status}: {choice.arch}:{choice.name} -> {cached.path}")
            writer.write({
                "name": f"{choice.arch}:{choice.name}", "file": cached.name, "size": cached.size,
                "sha256": cached.sha256, "path": str(cached.path), "status": cached.status,
            })
