"""`resnet predict`: top-k classification of images."""

from __future__ import annotations

import sys
import time
from contextlib import closing
from pathlib import Path
from typing import List, Optional

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
from resnetcli.cli.predict_onnx import (  # --runtime, ONNX models
    InterpolationOption,
    MeanOption,
    Runtime,
    RuntimeOption,
    StdOption,
)
from resnetcli.cli.predict_ray import (  # --engine ray
    ActorsOption,
    AddressOption,
    CpusPerActorOption,
    Engine,
    EngineOption,
    GpusPerActorOption,
    OutputDirOption,
)  # fmt: skip
from resnetcli.cli.predict_records import (
    PREDICT_COLUMNS,
    SUFFIX_FORMATS,
    one_line,
    prediction_rows,
    read_labels,
)
from resnetcli.errors import ExitStatus
from resnetcli.urls import is_url


class ProgressReport:
    """Counts finished inputs; once there are many and stderr is a terminal, shows a rich progress line there.

    The total is unknown (inputs are expanded lazily), so the line shows counts, failures, elapsed
    time and rate rather than a percentage.
    """

    #: Inputs finished before the progress line appears: a handful of images needs none.
    SHOW_AFTER = 20

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.done = 0
        self.failed = 0
        self.started = time.monotonic()
        self._progress = None
        self._task = None

    def update(self, failed: bool) -> None:
        """Count one finished input."""
        self.done += 1
        self.failed += int(failed)
        if not self.enabled:
            return
        if self._progress is None and self.done >= self.SHOW_AFTER:
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("{task.completed} inputs, {task.fields[failed]} failed, {task.fields[rate]}/s"),
                TimeElapsedColumn(),
                console=Console(stderr=True),
            )
            # The task gets its counts before the line starts, so its first frame already has them.
            self._task = self._progress.add_task(
                "predict", total=None, completed=self.done, failed=self.failed, rate=self._rate()
            )
            self._progress.start()
        elif self._progress is not None:
            self._progress.update(self._task, completed=self.done, failed=self.failed, rate=self._rate())

    def _rate(self) -> str:
        return f"{self.done / max(time.monotonic() - self.started, 1e-9):.1f}"

    def __enter__(self) -> ProgressReport:
        return self

    def __exit__(self, *exc: object) -> None:
        """Stop the progress line (it stays on screen with the final counts)."""
        if self._progress is not None:
            self._progress.stop()


def counted_inputs(inputs: List[str], shard_spec: Optional[tuple[int, int]]) -> Optional[int]:
    """How many images the command line names, when it names them one by one (files and URLs);
    None when a folder, glob or stdin makes the count unknown before they are read."""
    if not all(is_url(text) or Path(text).is_file() for text in inputs):
        return None
    if shard_spec is None:
        return len(inputs)
    index, count = shard_spec
    return len(range(index - 1, len(inputs), count))


@app.command()
def predict(
    inputs: Annotated[
        List[str],
        typer.Argument(
            help="Image files, folders (searched for images), quoted glob patterns, http(s) URLs, "
            "or - to read paths from stdin.",
            metavar="INPUT...",
        ),
    ],
    arch: Annotated[
        Optional[str],
        typer.Option(
            "--arch",
            "-a",
            rich_help_panel="Model",
            help="Architecture: any torchvision classifier (`resnet list`), or a model spec: timm:NAME[.TAG], "
            "file.py:Name, pkg.mod:Name (docs/models.md); default: the checkpoint's own, else resnet50.",
        ),
    ] = None,
    weights: Annotated[
        str,
        typer.Option(
            "--weights",
            "-w",
            rich_help_panel="Model",
            help="DEFAULT, a weights name (IMAGENET1K_V1, ...), `none` (random init), a checkpoint file (a path, or a "
            "file name in the weight cache; a local file wins) or a URL.",
        ),
    ] = "DEFAULT",
    trust_checkpoint: TrustCheckpointOption = False,
    top: Annotated[
        int, typer.Option("--top", "-k", rich_help_panel="Output", min=1, help="How many classes to report per image.")
    ] = 5,
    threshold: Annotated[
        float,
        typer.Option(
            "--threshold",
            rich_help_panel="Output",
            min=0.0,
            max=1.0,
            help="Drop classes whose probability is below this.",
        ),
    ] = 0.0,
    labels: Annotated[
        Optional[Path],
        typer.Option(
            "--labels",
            rich_help_panel="Model",
            exists=True,
            dir_okay=False,
            help="Class names for a fine-tuned checkpoint: text (one per line) or JSON.",
        ),
    ] = None,
    recursive: Annotated[
        bool,
        typer.Option("--recursive/--no-recursive", rich_help_panel="Inputs", help="Search folders' sub-folders too."),
    ] = True,
    null: Annotated[
        bool,
        typer.Option("--null", "-0", rich_help_panel="Inputs", help="Paths on stdin are NUL-separated (find -print0)."),
    ] = False,
    strict: Annotated[
        bool,
        typer.Option("--strict", rich_help_panel="Inputs", help="Stop at the first input that fails (exit code 1)."),
    ] = False,
    output: Annotated[
        Optional[Path],
        typer.Option(
            "--output",
            "-o",
            rich_help_panel="Output",
            dir_okay=False,
            help="Write the records to this file instead of stdout (format from --format or the suffix, else jsonl).",
        ),
    ] = None,
    shard: Annotated[
        Optional[str],
        typer.Option(
            "--shard",
            rich_help_panel="Inputs",
            metavar="I/N",
            help="Process only shard I of N (1 <= I <= N): the inputs at positions I-1, I-1+N, ...",
        ),
    ] = None,
    preprocess: Annotated[
        Optional[str],
        typer.Option(
            "--preprocess",
            rich_help_panel="Preprocessing",
            metavar="WEIGHTS",
            help="Use the preprocessing of this weights name of the architecture "
            "(default: the weights' own, or DEFAULT's for a checkpoint).",
        ),
    ] = None,
    input_size: Annotated[
        Optional[int],
        typer.Option("--input-size", rich_help_panel="Preprocessing", min=1, help="Centre-crop size fed to the model."),
    ] = None,
    resize: Annotated[
        Optional[int],
        typer.Option(
            "--resize", rich_help_panel="Preprocessing", min=1, help="Resize the shorter side to this before cropping."
        ),
    ] = None,
    batch_size: Annotated[
        int, typer.Option("--batch-size", "-b", rich_help_panel="Performance", min=1, help="Images per forward pass.")
    ] = 16,
    workers: Annotated[
        Optional[int],
        typer.Option(
            "--workers",
            "-j",
            rich_help_panel="Performance",
            min=1,
            help="Threads decoding and preprocessing images (default: one per CPU this process may run on, at most 8).",
        ),
    ] = None,
    device: Annotated[
        str,
        typer.Option(
            "--device",
            rich_help_panel="Performance",
            help="auto, cpu, cuda, cuda:N or mps. auto picks CUDA, then MPS, then the CPU.",
        ),
    ] = "auto",
    threads: Annotated[
        Optional[int],
        typer.Option(
            "--threads",
            rich_help_panel="Performance",
            min=1,
            help="Threads torch uses inside each operation (default: the CPUs this process may run on, "
            "from its affinity mask and CPU quota).",
        ),
    ] = None,
    output_format: FormatOption = None,
    offline: OfflineOption = False,
    mirror: MirrorOption = None,
    # --- runtime (resnetcli/cli/predict_onnx.py) ---
    runtime: RuntimeOption = Runtime.auto,
    mean: MeanOption = None,
    std: StdOption = None,
    interpolation: InterpolationOption = None,
    # --- end runtime ---
    # --- engine ray (resnetcli/cli/predict_ray.py) ---
    engine: EngineOption = Engine.local,
    address: AddressOption = None,
    actors: ActorsOption = None,
    cpus_per_actor: CpusPerActorOption = 1.0,
    gpus_per_actor: GpusPerActorOption = 0.0,
    output_dir: OutputDirOption = None,
    # --- end engine ray ---
) -> None:
    """Classify images: the top-k ImageNet classes (or a checkpoint's own classes) with probabilities."""
    # --- engine ray ---
    if engine is Engine.ray:
        from resnetcli.cli.predict_ray import predict_on_ray
        from resnetcli.errors import UsageError

        if runtime is Runtime.onnxruntime:
            raise UsageError(
                "--runtime onnxruntime is for the local engine; with --engine ray, give the ONNX model "
                "itself: --weights FILE.onnx (`resnet export` makes one)"
            )
        if mean is not None or std is not None or interpolation is not None:
            raise UsageError(
                "--mean, --std and --interpolation are for the local engine; with --engine ray, give an "
                "ONNX model with resnetcli's metadata (`resnet export`)"
            )

        return predict_on_ray(
            inputs, output=output, output_format=output_format, strict=strict, shard=shard, labels=labels,
            trust_checkpoint=trust_checkpoint, arch=arch, weights=weights, top=top, threshold=threshold,
            preprocess=preprocess, input_size=input_size, resize=resize, batch_size=batch_size, workers=workers,
            threads=threads, device=device, offline=offline, mirror=mirror, recursive=recursive, null=null,
            address=address, actors=actors, cpus_per_actor=cpus_per_actor, gpus_per_actor=gpus_per_actor,
            output_dir=output_dir,
        )  # fmt: skip
    if output_dir is not None or address is not None or actors is not None:
        from resnetcli.errors import UsageError

        raise UsageError("--address, --actors and --output-dir need --engine ray")
    # --- end engine ray ---
    import threading
    import warnings

    from PIL import Image

    from resnetcli.cli.outfile import RecordsOutput
    from resnetcli.cli.predict_table import print_predictions
    from resnetcli.foreign import is_spec
    from resnetcli.inputs import expand_inputs, parse_shard, take_shard
    from resnetcli.predict import predict as run_predictions

    if preprocess is not None and is_spec(arch):
        from resnetcli.errors import UsageError

        raise UsageError(f"--preprocess names torchvision weights; {arch} uses timm's data config or its checkpoint's")
    shard_spec = parse_shard(shard) if shard is not None else None
    stdin = sys.stdin.buffer if "-" in inputs else None
    target = RecordsOutput(output)
    try:
        target.refuse_inputs(inputs, stdin)
        settings = cache_settings(offline, mirror)
        # --- runtime: ONNX Runtime (resnetcli/cli/predict_onnx.py, never imports torch), else torch ---
        from resnetcli.cli.predict_onnx import onnx_classifier

        label_names = read_labels(labels) if labels else None
        with download_progress() as on_progress:
            classifier = onnx_classifier(
                runtime, arch=arch, weights=weights, labels=label_names, preprocess=preprocess,
                input_size=input_size, resize=resize, device=device, threads=threads, mean=mean, std=std,
                interpolation=interpolation, settings=settings, on_progress=on_progress,
            )  # fmt: skip
        if classifier is None:
            from resnetcli.inference import load_torch_classifier

            # The model side is settled here, once; the pipeline below only runs it.
            classifier = load_torch_classifier(
                arch, weights, labels=label_names, trust_checkpoint=trust_checkpoint, preprocess=preprocess,
                input_size=input_size, resize=resize, device=device, threads=threads, batch_size=batch_size,
                expected_count=counted_inputs(inputs, shard_spec), settings=settings,
                downloads=download_progress, note=warn,
            )  # fmt: skip
        # --- end runtime ---
        cancel = threading.Event()
        items = expand_inputs(inputs, recursive=recursive, stdin=stdin, null=null, cancel=cancel)
        if shard_spec is not None:
            items = take_shard(items, *shard_spec)
        stream = target.stream
        if output_format is None and output is not None:
            output_format = SUFFIX_FORMATS.get(output.suffix.lower(), OutputFormat.jsonl)
        fmt = choose_format(output_format, stream)
        # Records streaming to the same terminal would tear through a live progress line.
        streams_to_terminal = fmt not in (OutputFormat.table, OutputFormat.json) and stream.isatty()
        report = ProgressReport(enabled=sys.stderr.isatty() and not streams_to_terminal)
        predictions = run_predictions(
            classifier,
            target.screen(items),
            top=top,
            batch_size=batch_size,
            threshold=threshold,
            workers=workers,
            offline=settings.offline,
            timeout=settings.timeout,
            cancel=cancel,
        )
        title = f"{classifier.arch} ({classifier.weights})"
        writer = RecordWriter(
            fmt, PREDICT_COLUMNS, stream=stream, rows=prediction_rows, title=title, table=print_predictions
        )
        # Exits run inner first: the progress line stops before a table or JSON document is
        # written, and the workers stop last. images.load_image refuses oversized images itself:
        # Pillow's warning would only add a second, unformatted line on stderr. The filter is
        # scoped to this call, and no generator yields while it holds.
        with warnings.catch_warnings(), closing(predictions), writer, report:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            for prediction in predictions:
                writer.write(prediction.record())
                report.update(failed=prediction.error is not None)
                if prediction.error is not None:
                    say(f"error: {one_line(prediction.error)}")
                    if strict:
                        say("stopped at the first failure (--strict)")
                        break
        target.commit()
    except BaseException:
        target.abandon()
        raise
    if report.failed:
        raise typer.Exit(int(ExitStatus.INPUTS_FAILED))
