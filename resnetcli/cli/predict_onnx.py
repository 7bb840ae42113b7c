"""`resnet predict` on ONNX Runtime: `--runtime`, the options of a foreign ONNX model, and the choice.

`resnetcli.cli.predict` declares these options (in a block of their own) and asks
`onnx_classifier(...)` first: it returns the pipeline's `predict.Classifier` on ONNX Runtime, or None
when torch runs the model. The whole ONNX path (an `.onnx` file, a cached export) imports neither
torch, torchvision, nor the torch side of resnetcli (factory, inference); only a miss with
`--runtime onnxruntime` exports, through the factory, once (`onnxcache.cache_export`).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import replace
from enum import Enum
from pathlib import Path
from typing import Optional, Sequence

import typer
from typing_extensions import Annotated

from resnetcli.errors import UsageError
from resnetcli.onnxmeta import INTERPOLATIONS
from resnetcli.urls import is_url

log = logging.getLogger(__name__)


class Runtime(str, Enum):
    """What runs a torchvision model or checkpoint: torch, or ONNX Runtime on its cached export."""

    auto = "auto"
    torch = "torch"
    onnxruntime = "onnxruntime"


Interpolation = Enum("Interpolation", {name: name for name in INTERPOLATIONS}, type=str)


def _channels(value: Optional[str]) -> Optional[tuple[float, float, float]]:
    if value is None:
        return None
    try:
        numbers = tuple(float(part) for part in value.split(","))
    except ValueError:
        numbers = ()
    if len(numbers) != 3:
        raise typer.BadParameter(f"{value!r}: expected three numbers R,G,B (0.485,0.456,0.406)")
    return numbers  # type: ignore[return-value]


RuntimeOption = Annotated[
    Runtime,
    typer.Option(
        "--runtime",
        rich_help_panel="Model",
        metavar="RUNTIME",
        case_sensitive=False,
        help="auto, torch or onnxruntime. auto: ONNX Runtime on a CPU when it is installed and the model's export "
        "is cached (`resnet fetch "
        "ARCH --onnx`), else torch. onnxruntime: export once into the weight cache, then run it there.",
    ),
]
MeanOption = Annotated[
    Optional[str],
    typer.Option(
        "--mean",
        rich_help_panel="Preprocessing",
        metavar="R,G,B",
        callback=_channels,
        help="Normalisation mean, for an ONNX model without metadata.",
    ),
]
StdOption = Annotated[
    Optional[str],
    typer.Option(
        "--std",
        rich_help_panel="Preprocessing",
        metavar="R,G,B",
        callback=_channels,
        help="Normalisation std, for an ONNX model without metadata.",
    ),
]
InterpolationOption = Annotated[
    Optional[Interpolation],
    typer.Option(
        "--interpolation", rich_help_panel="Preprocessing", help="Resize filter, for an ONNX model without metadata."
    ),
]

#: `--device` values that run on this machine's CPU without asking torch.
CPU_DEVICES = ("auto", "cpu")


def onnx_file(weights: str) -> Optional[Path]:
    """The ONNX model a `--weights` value names: an `.onnx` path, or an `.onnx` file name in the weight
    cache (a local file wins), else None. UsageError for an `.onnx` name found in neither place."""
    from resnetcli.store import checkpoint_dir

    text = weights.strip()
    if not text.lower().endswith(".onnx") or is_url(text):
        return None
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if text == path.name and not text.startswith("."):
        cached = checkpoint_dir() / text
        if cached.is_file():
            from resnetcli.store import check_cached_file

            check_cached_file(cached)
            return cached
    raise UsageError(f"--weights {text}: no such ONNX file (here or in the weight cache)")


def _gpu_visible() -> bool:
    """Whether `--device auto` could pick a GPU, judged without importing torch: an NVIDIA driver with
    a GPU, or Apple silicon (MPS). CUDA_VISIBLE_DEVICES set empty hides the NVIDIA GPUs."""
    import os
    import platform

    gpus = Path("/proc/driver/nvidia/gpus")
    nvidia = gpus.is_dir() and any(gpus.iterdir()) and os.environ.get("CUDA_VISIBLE_DEVICES", None) != ""
    apple = sys.platform == "darwin" and platform.machine() == "arm64"
    return nvidia or apple


def _explicit_preprocessing(mean, std, interpolation, resize, input_size):
    """The full preprocessing given on the command line, or None when none of its own options is."""
    from resnetcli.onnxmeta import Preprocessing

    given = {"--mean": mean, "--std": std, "--interpolation": interpolation}
    if all(value is None for value in given.values()):
        return None
    missing = [
        name for name, value in {**given, "--resize": resize, "--input-size": input_size}.items() if value is None
    ]
    if missing:
        raise UsageError(f"an ONNX model's preprocessing is given in full or not at all: {', '.join(missing)} missing")
    if any(value == 0 for value in std):
        raise UsageError("--std: a channel's std must not be 0")
    value = interpolation.value if isinstance(interpolation, Enum) else interpolation
    return Preprocessing((resize,), (input_size,), tuple(mean), tuple(std), value)


def onnx_classifier(
    runtime: Runtime,
    *,
    arch: Optional[str],
    weights: str,
    labels: Optional[Sequence[str]],
    preprocess: Optional[str],
    input_size: Optional[int],
    resize: Optional[int],
    device: str,
    threads: Optional[int],
    mean=None,
    std=None,
    interpolation=None,
    settings=None,
    on_progress=None,
):
    """The pipeline's Classifier on ONNX Runtime, or None when torch is to run the model (logged)."""
    from resnetcli.onnxrt import open_classifier, pipeline_classifier, require_onnxruntime

    model_file = onnx_file(weights)
    explicit = _explicit_preprocessing(mean, std, interpolation, resize, input_size)
    if model_file is None and explicit is not None:
        raise UsageError(
            "--mean, --std and --interpolation are for an ONNX model without metadata (--weights FILE.onnx)"
        )
    if model_file is None and runtime is Runtime.torch:
        log.debug("runtime: torch (--runtime torch)")
        return None
    on_cpu = device.strip().lower() in CPU_DEVICES
    if model_file is not None or runtime is Runtime.onnxruntime:
        what = f"--weights {weights}" if model_file is not None else "--runtime onnxruntime"
        if runtime is Runtime.torch:
            raise UsageError(f"{what}: an ONNX model runs on ONNX Runtime, not --runtime torch")
        if not on_cpu:
            raise UsageError(f"{what}: ONNX Runtime runs on the CPU here; --device {device} needs --runtime torch")
        if preprocess is not None:
            raise UsageError(f"{what}: --preprocess takes torchvision's transforms; use --runtime torch with it")
        require_onnxruntime(what)
    else:  # auto, for a name, checkpoint or URL: ONNX Runtime only when nothing needs torch
        import importlib.util

        reason = (
            "onnxruntime is not installed"
            if importlib.util.find_spec("onnxruntime") is None
            else f"--device {device}"
            if not on_cpu or (device.strip().lower() == "auto" and _gpu_visible())
            else "--preprocess needs torchvision"
            if preprocess is not None
            else None
        )
        if reason is not None:
            log.debug("runtime: torch (%s)", reason)
            return None
    threads = threads or _default_threads()
    if model_file is not None:
        classifier = open_classifier(
            model_file, labels=labels, preprocessing=explicit, input_size=input_size, resize=resize, threads=threads
        )
        log.debug("runtime: onnxruntime (%s, %d threads)", model_file, threads)
        return pipeline_classifier(classifier)

    from resnetcli import onnxcache

    found = onnxcache.lookup(arch, weights)
    if found is None and runtime is Runtime.auto:
        log.debug("runtime: torch (no cached ONNX export of %s %s; `resnet fetch --onnx` makes one)", arch, weights)
        return None
    if found is None:
        made = onnxcache.cache_export(arch, weights, settings=settings, on_progress=on_progress)
        from resnetcli.cli.app import say

        say(f"{made.status}: {made.path} (ONNX Runtime runs it from now on)")
        found = onnxcache.lookup(arch, weights)
        if found is None:  # several exports of one checkpoint under different architectures
            raise UsageError(f"--weights {weights}: several cached exports match; give --arch")
    path, shown = found
    classifier = open_classifier(path, labels=labels, threads=threads)
    crop = classifier.info.preprocessing.crop_size
    if input_size is not None and (input_size, input_size) != (crop[0], crop[-1]):
        if runtime is Runtime.auto:
            log.debug("runtime: torch (--input-size %d; the cached export takes %s)", input_size, crop)
            return None
        raise UsageError(
            f"--input-size {input_size}: the cached ONNX export takes {crop[0]}x{crop[-1]} images; "
            "use --runtime torch for other sizes"
        )
    if resize is not None or input_size is not None:
        from resnetcli.onnxrt import preprocessing_with_sizes

        sized = preprocessing_with_sizes(classifier.info.preprocessing, input_size, resize)
        classifier = replace(classifier, info=replace(classifier.info, preprocessing=sized))
    log.debug("runtime: onnxruntime (cached export %s, %d threads)", path, threads)
    return pipeline_classifier(classifier, weights=shown)


def _default_threads() -> int:
    """`--threads` when not given: the CPUs this process may run on, as on the torch path.
    (resnetcli.fastpath imports torch only inside its torch functions; this one reads /proc and cgroups.)"""
    from resnetcli.fastpath import usable_cpu_count

    return usable_cpu_count()
