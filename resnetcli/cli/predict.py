"""`resnet predict`: top-k classification of images."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated

from resnetcli.cli.app import FormatOption, MirrorOption, OfflineOption, app, cache_settings, download_progress, say, warn
from resnetcli.cli.output import RecordWriter, choose_format
from resnetcli.errors import ExitStatus

PREDICT_COLUMNS = ["input", "arch", "weights", "rank", "index", "label", "prob", "error"]


def prediction_rows(record: dict) -> list[dict]:
    """One flat row per ranked class (one row with the error for a failed input)."""
    if "error" in record:
        return [{"input": record["input"], "error": record["error"]}]
    base = {"input": record["input"], "arch": record["arch"], "weights": record["weights"]}
    return [{**base, **score} for score in record["top"]] or [base]


def read_labels(path: Path) -> list[str]:
    """Class names from a text file (one per line) or JSON (a list, or an index-to-name map)."""
    import json

    from resnetcli.errors import UsageError

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"--labels {path}: cannot read: {error}") from None
    stripped = text.strip()
    if stripped.startswith(("[", "{")):
        try:
            data = json.loads(stripped)
        except ValueError as error:
            raise UsageError(f"--labels {path}: invalid JSON: {error}") from None
        if isinstance(data, list):
            return [str(label) for label in data]
        try:
            indexed = {int(key): str(value) for key, value in data.items()}
        except (TypeError, ValueError):
            raise UsageError(f"--labels {path}: a JSON map must go from class index to name") from None
        if sorted(indexed) != list(range(len(indexed))):
            raise UsageError(f"--labels {path}: class indices must be 0..{len(indexed) - 1} without gaps")
        return [indexed[i] for i in range(len(indexed))]
    return [line.strip() for line in text.splitlines() if line.strip()]


@app.command()
def predict(
    inputs: Annotated[List[str], typer.Argument(help="Image files to classify.", metavar="IMAGE...")],
    arch: Annotated[str, typer.Option("--arch", "-a", help="Architecture: any torchvision classifier (`resnet list`).")] = "resnet50",
    weights: Annotated[
        str,
        typer.Option("--weights", "-w", help="DEFAULT, a weights name (IMAGENET1K_V1, ...), `none` (random init), a checkpoint file or a URL."),
    ] = "DEFAULT",
    top: Annotated[int, typer.Option("--top", "-k", min=1, help="How many classes to report per image.")] = 5,
    threshold: Annotated[float, typer.Option("--threshold", min=0.0, max=1.0, help="Drop classes whose probability is below this.")] = 0.0,
    labels: Annotated[
        Optional[Path],
        typer.Option("--labels", exists=True, dir_okay=False, help="Class names for a fine-tuned checkpoint: text (one per line) or JSON."),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per forward pass.")] = 16,
    output_format: FormatOption = None,
    offline: OfflineOption = False,
    mirror: MirrorOption = None,
) -> None:
    """Classify images: the top-k ImageNet classes (or a checkpoint's own classes) with probabilities."""
    from resnetcli.predict import predict as run_predictions
    from resnetcli.registry import load_model

    with download_progress() as on_progress:
        loaded = load_model(
            arch,
            weights,
            labels=read_labels(labels) if labels else None,
            settings=cache_settings(offline, mirror),
            on_progress=on_progress,
        )
    for note in loaded.notes:
        warn(note)
    fmt = choose_format(output_format, sys.stdout)
    failed = 0
    with RecordWriter(fmt, PREDICT_COLUMNS, rows=prediction_rows, title=f"{loaded.arch} ({loaded.weights.name})") as writer:
        for prediction in run_predictions(loaded, inputs, top=top, batch_size=batch_size, threshold=threshold):
            if prediction.error is not None:
                failed += 1
                say(f"error: {prediction.error}")
            writer.write(prediction.record())
    if failed:
        raise typer.Exit(int(ExitStatus.INPUTS_FAILED))
