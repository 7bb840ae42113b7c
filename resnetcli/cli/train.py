"""`resnet finetune` and `resnet eval`: teach a backbone your own classes, then score it."""

from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import typer
from typing_extensions import Annotated

from resnetcli.cli.app import (
    MirrorOption,
    OfflineOption,
    TrustCheckpointOption,
    app,
    cache_settings,
    download_progress,
    say,
    warn,
)
from resnetcli.cli.output import OutputFormat, RecordWriter, choose_format, print_table
from resnetcli.errors import ExitStatus, UsageError
from resnetcli.heads import TrainMode  # torch-free: an Enum and functions that import torch when called

EPOCH_COLUMNS = ["epoch", "train_loss", "val_accuracy", "seconds"]
EVAL_COLUMNS = ["input", "label", "predicted", "prob", "correct", "in_top5"]

DataArgument = Annotated[
    Path,
    typer.Argument(
        exists=True,
        help="A folder with one sub-folder of images per class (optionally inside train/ and val/), "
        "or a CSV/JSONL list of path,label.",
        show_default=False,
    ),
]
WeightsOption = Annotated[
    str,
    typer.Option(
        "--weights",
        "-w",
        help="DEFAULT, a weights name (IMAGENET1K_V1, ...), `none` (random init), a checkpoint file (resnetcli's, "
        "torchvision reference train.py's, Lightning's, .safetensors) or a URL.",
    ),
]
BatchOption = Annotated[int, typer.Option("--batch-size", "-b", min=1, help="Images per step.")]
WorkersOption = Annotated[
    Optional[int],
    typer.Option(
        "--workers",
        "-j",
        min=1,
        help="Threads decoding images (default: one per CPU this process may run on, at most 8).",
    ),
]
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N or mps.")]
ThreadsOption = Annotated[
    Optional[int],
    typer.Option(
        "--threads",
        min=1,
        help="Threads torch uses inside each operation (default: the CPUs this process may run on), as for predict.",
    ),
]
StrictOption = Annotated[
    bool, typer.Option("--strict", help="Stop at the first image that cannot be read (exit code 1).")
]
RunFormatOption = Annotated[
    Optional[OutputFormat],
    typer.Option(
        "--format",
        "-f",
        case_sensitive=False,
        help="Also write the run to stdout: json (one record), jsonl, or csv/tsv (one row per epoch).",
    ),
]
EvalFormatOption = Annotated[
    Optional[OutputFormat],
    typer.Option(
        "--format",
        "-f",
        case_sensitive=False,
        help="table (default on a terminal); json (one document: accuracy, top5, classes, per_class, "
        "confusion_matrix, errors); jsonl (default off a terminal), csv or tsv: one row per image.",
    ),
]


class EpochProgress:
    """A rich progress bar per phase (feature extraction, each epoch) on a terminal's stderr; one log line per
    epoch elsewhere."""

    def __init__(self) -> None:
        self.live = sys.stderr.isatty()
        self.progress = None
        self.task = None

    def phase(self, description: str, total: int) -> Callable[[int], None]:
        if not self.live:
            return lambda done: None
        if self.progress is None:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
                redirect_stdout=False,
            )
            self.progress.start()
        task = self.progress.add_task(description, total=total, status="")
        self.task = task
        return lambda done: self.progress.update(task, completed=done)

    def epoch(self, result) -> None:
        accuracy = "-" if result.val_accuracy is None else f"{result.val_accuracy:.4f}"
        status = f"train loss {result.train_loss:.4f}, val top-1 {accuracy}"
        if self.live and self.task is not None:
            self.progress.update(self.task, status=status)
        else:
            say(f"epoch {result.epoch}: {status} ({result.seconds:.1f} s)")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()


@contextmanager
def _progress() -> Iterator[EpochProgress]:
    progress = EpochProgress()
    try:
        yield progress
    finally:
        progress.close()


@app.command()
def finetune(
    data: DataArgument,
    output: Annotated[
        Path,
        typer.Option("--output", "-o", dir_okay=False, help="The checkpoint to write (rewritten after every epoch)."),
    ],
    arch: Annotated[
        Optional[str],
        typer.Option(
            "--arch",
            "-a",
            help="Architecture (`resnet list`); default: the --weights or --resume checkpoint's own, else resnet50.",
        ),
    ] = None,
    weights: WeightsOption = "DEFAULT",
    trust_checkpoint: TrustCheckpointOption = False,
    train: Annotated[
        Optional[TrainMode],
        typer.Option(
            "--train",
            case_sensitive=False,
            help="head: only the new head (backbone frozen; default); last-stage: also the last stage; "
            "all: everything.",
        ),
    ] = None,
    epochs: Annotated[
        int, typer.Option("--epochs", "-e", min=1, help="Epochs in all (with --resume: including those done).")
    ] = 10,
    lr: Annotated[float, typer.Option("--lr", min=0.0, help="Adam's learning rate.")] = 1e-3,
    batch_size: BatchOption = 32,
    input_size: Annotated[
        Optional[int],
        typer.Option(
            "--input-size",
            min=16,
            help="Centre-crop size to train at (default: the weights'); recorded in OUT.pth for predict and eval.",
        ),
    ] = None,
    workers: WorkersOption = None,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
    seed: Annotated[
        int, typer.Option("--seed", help="Seed of the head's init, the shuffling, the split and augmentation.")
    ] = 0,
    val_split: Annotated[
        float,
        typer.Option(
            "--val-split",
            min=0.0,
            max=0.9,
            help="Share of each class kept for validation when DATA has no train/ and val/.",
        ),
    ] = 0.2,
    augment: Annotated[
        bool, typer.Option("--augment", help="Random crops and flips (forces a full forward pass every epoch).")
    ] = False,
    resume: Annotated[
        Optional[Path],
        typer.Option(
            "--resume", exists=True, dir_okay=False, help="Continue the run saved in this checkpoint (usually OUT.pth)."
        ),
    ] = None,
    strict: StrictOption = False,
    output_format: RunFormatOption = None,
    offline: OfflineOption = False,
    mirror: MirrorOption = None,
) -> None:
    """Teach a backbone your own classes: a new head (and optionally more) trained on DATA, saved to OUT.pth.

    With the backbone frozen (--train head, no --augment) its features are computed once and the head
    is trained on them. OUT.pth is rewritten after every epoch; Ctrl-C keeps the last complete one and
    --resume OUT.pth continues from it. `resnet predict`, `summary` and `eval` read OUT.pth.
    """
    from resnetcli.datasets import load_split
    from resnetcli.fastpath import configure_threads
    from resnetcli.finetune import FinetuneConfig, Trainer
    from resnetcli.inference import resolve_device
    from resnetcli.predict import default_workers

    if not output.parent.is_dir():
        raise UsageError(f"--output {output}: the folder {output.parent} does not exist")

    split = load_split(data, val_split=val_split, seed=seed)
    configure_threads(threads)
    config = FinetuneConfig(
        arch=arch,
        weights=weights,
        train=train or TrainMode.head,
        epochs=epochs,
        lr=lr,
        batch_size=batch_size,
        workers=workers or default_workers(),
        device=resolve_device(device),
        seed=seed,
        augment=augment,
        strict=strict,
        input_size=input_size,
        trust_checkpoint=trust_checkpoint,
    )
    skipped: list[str] = []

    def on_skip(message: str) -> None:
        skipped.append(message)
        say(f"error: {message} (skipped)")

    with download_progress() as on_progress:
        trainer = Trainer(
            config,
            split,
            output,
            resume=resume,
            settings=cache_settings(offline, mirror),
            on_progress=on_progress,
            on_skip=on_skip,
        )
    if resume is not None and (
        arch
        and arch != trainer.arch
        or train is not None
        and train.value != trainer.config.train.value
        or input_size is not None
        and input_size != trainer.transforms.crop_size[0]
    ):
        saved = f"{trainer.arch}, --train {trainer.config.train.value}, --input-size {trainer.transforms.crop_size[0]}"
        warn(f"--resume: continuing as saved ({saved})")
    started = time.monotonic()
    with _progress() as progress:
        result = trainer.run(progress.epoch, progress.phase)
    rows = [
        {
            "best epoch": result.best_epoch,
            "val top-1": result.best_val_accuracy,
            "epochs": len(result.epochs),
            "time (s)": f"{time.monotonic() - started:.1f}",
            "checkpoint": result.output,
        }
    ]
    print_table(list(rows[0]), rows, f"{result.arch} fine-tuned on {len(result.classes)} classes", sys.stderr)
    if output_format is not None and output_format is not OutputFormat.table:
        import json

        record = result.record()
        if output_format is OutputFormat.json:
            sys.stdout.write(json.dumps(record, ensure_ascii=False, indent=2) + "\n")
        elif output_format is OutputFormat.jsonl:
            sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")
        else:
            with RecordWriter(output_format, EPOCH_COLUMNS, stream=sys.stdout) as writer:
                for epoch in record["epochs"]:
                    writer.write(epoch)


@app.command("eval")
def evaluate_command(
    data: DataArgument,
    arch: Annotated[
        Optional[str],
        typer.Option("--arch", "-a", help="Architecture; default: the checkpoint's own (OUT.pth's), else resnet50."),
    ] = None,
    weights: WeightsOption = "DEFAULT",
    trust_checkpoint: TrustCheckpointOption = False,
    batch_size: BatchOption = 16,
    workers: WorkersOption = None,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
    plot: Annotated[
        Optional[Path],
        typer.Option(
            "--plot", dir_okay=False, help="Draw the confusion matrix into this PNG (needs resnetcli\\[plot])."
        ),
    ] = None,
    strict: StrictOption = False,
    output_format: EvalFormatOption = None,
    offline: OfflineOption = False,
    mirror: MirrorOption = None,
) -> None:
    """Score a model on labelled images: top-1, top-5, per-class precision/recall/F1, confusion matrix, errors.

    DATA's val/ is used if it has one, else every image. Class folder names must be class names of
    the model (ImageNet category names, or a fine-tuned checkpoint's classes).
    """
    if plot is not None:  # before anything slow is imported or loaded
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise UsageError("--plot needs matplotlib: pip install 'resnetcli[plot]'") from None
    from resnetcli.datasets import load_eval_set
    from resnetcli.evaluate import evaluate, plot_confusion
    from resnetcli.factory import load_model
    from resnetcli.fastpath import configure_threads
    from resnetcli.inference import choose_transforms, resolve_device, torch_classifier

    samples = load_eval_set(data)
    chosen_device = resolve_device(device)
    # The model side exactly as `resnet predict` settles it, so that eval scores predict's answers.
    configure_threads(threads)
    with download_progress() as on_progress:
        loaded = load_model(
            arch,
            weights,
            settings=cache_settings(offline, mirror),
            on_progress=on_progress,
            trust_checkpoint=trust_checkpoint,
        )
    for note in loaded.notes:
        warn(note)
    fmt = choose_format(output_format, sys.stdout)
    failed: list[str] = []

    def on_error(message: str) -> None:
        failed.append(message)
        say(f"error: {message}")

    # Per-image formats stream one row per image; json and table are written once the scores are known.
    writer = (
        RecordWriter(fmt, EVAL_COLUMNS, stream=sys.stdout)
        if fmt not in (OutputFormat.json, OutputFormat.table)
        else None
    )
    classifier = torch_classifier(
        loaded,
        transforms=choose_transforms(loaded),
        device=chosen_device,
        batch_size=batch_size,
        expected_count=len(samples),
    )
    try:
        evaluation = evaluate(
            classifier,
            samples,
            batch_size=batch_size,
            workers=workers,
            strict=strict,
            on_error=on_error,
            on_result=(lambda result: writer.write(result.record())) if writer else (lambda result: None),
        )
    finally:
        if writer is not None:
            writer.close()
    if fmt is OutputFormat.json:
        import json

        sys.stdout.write(json.dumps(evaluation.record(), ensure_ascii=False, indent=2) + "\n")
    elif fmt is OutputFormat.table:
        _print_evaluation(evaluation)
    if plot is not None:
        plot_confusion(evaluation, plot)
        say(f"confusion matrix drawn in {plot}")
    if failed:
        raise typer.Exit(int(ExitStatus.INPUTS_FAILED))


def _print_evaluation(evaluation) -> None:
    title = f"{evaluation.arch} ({evaluation.weights}) on {len(evaluation.results)} images"
    print_table(
        ["top-1", "top-5", "images"],
        [{"top-1": evaluation.accuracy, "top-5": evaluation.top5, "images": len(evaluation.results)}],
        title,
        sys.stdout,
    )
    print_table(
        ["label", "precision", "recall", "f1", "support"],
        [m.record() for m in evaluation.per_class],
        "per class",
        sys.stdout,
    )
    columns = ["true \\ predicted", *evaluation.classes]
    rows = [
        {columns[0]: name, **dict(zip(evaluation.classes, row))}
        for name, row in zip(evaluation.classes, evaluation.confusion_matrix)
    ]
    print_table(columns, rows, "confusion matrix", sys.stdout)
    if evaluation.errors:
        print_table(
            ["input", "label", "predicted", "prob"],
            [e.record() for e in evaluation.errors],
            "misclassified",
            sys.stdout,
        )
