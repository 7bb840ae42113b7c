"""Export a classifier to an ONNX file that describes itself, checked against torch before it is kept.

The exporter is `torch.onnx.export(..., dynamo=True)` (torch.export + onnxscript), the one torch
supports and develops: torch 2.14's TorchScript exporter (`dynamo=False`) still works but warns on
every call that it "will be removed". Both were tried on resnet18, efficientnet_b0, vit_b_16, swin_t,
convnext_tiny, googlenet and regnet_y_400mf: every family exported with both, with ONNX Runtime's
logits within 3e-6 of eager torch. The dynamo exporter takes 3-20 s against 0.5-12 s, a one-off cost
of `resnet export` and of the first `--runtime onnxruntime` run, which the export cache then saves.

The file's `metadata_props` (see `resnetcli.onnxmeta`) hold the architecture, the weights name, the
sha256 of the source weights, the class names, the preprocessing read from the weights' transforms
object, the exporter settings and the resnetcli version, so the ONNX Runtime path
(`resnetcli.onnxrt`) needs nothing else, and no torch.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from resnetcli.errors import CheckpointError, UsageError, WeightsUnavailable
from resnetcli.onnxmeta import DEFAULT_OPSET, EXPORTER, INPUT_NAME, OUTPUT_NAME, ModelInfo, Preprocessing

if TYPE_CHECKING:  # pragma: no cover
    from resnetcli.factory import LoadedModel, WeightsChoice

log = logging.getLogger(__name__)

#: ONNX Runtime's logits must lie within ATOL + RTOL * max|logit| of eager torch's. Measured
#: differences are 3e-6 on random-init resnet18 (logits ~1) and ~2e-5 on a steered head
#: (logits ~50): float32 reassociation. A wrong graph differs by whole units.
ATOL = 1e-4
RTOL = 1e-4
#: Batch size of the example input traced for export. It is not 1 (torch.export would specialise
#: the batch dimension to a constant) and differs from the check batches below.
EXAMPLE_BATCH = 2
#: The sample photos shipped with the package (the repository's `sample_images/` links here): the
#: real batch an export is checked on when no `--check-with` photos are given.
SAMPLE_IMAGES = Path(__file__).resolve().parent / "sample_images"


@dataclass(frozen=True)
class ExportResult:
    """A finished, checked export."""

    path: Path
    info: ModelInfo
    size: int
    checked_on: tuple[str, ...]
    max_abs_diff: float
    tolerance: float
    seconds: float

    def record(self) -> dict:
        return {
            "path": str(self.path),
            "arch": self.info.arch,
            "weights": self.info.weights,
            "source_sha256": self.info.source_sha256,
            "opset": self.info.opset,
            "exporter": self.info.exporter,
            "classes": len(self.info.classes),
            "size": self.size,
            "checked_on": list(self.checked_on),
            "max_abs_diff": self.max_abs_diff,
            "tolerance": self.tolerance,
            "seconds": round(self.seconds, 2),
        }


def preprocessing_of(transforms) -> Preprocessing:
    """The preprocessing a weights' transforms object (torchvision's ImageClassification) applies."""
    missing = [
        name for name in ("resize_size", "crop_size", "mean", "std", "interpolation") if not hasattr(transforms, name)
    ]
    if missing:
        raise UsageError(
            f"the model's preprocessing ({type(transforms).__name__}) has no {', '.join(missing)} to export"
        )
    interpolation = getattr(transforms.interpolation, "value", transforms.interpolation)
    return Preprocessing(
        resize_size=tuple(int(v) for v in transforms.resize_size),
        crop_size=tuple(int(v) for v in transforms.crop_size),
        mean=tuple(float(v) for v in transforms.mean),
        std=tuple(float(v) for v in transforms.std),
        interpolation=str(interpolation),
    )


def source_sha256(choice: WeightsChoice) -> str:
    """The full sha256 of the weights file the model was built from ("none" for random init).

    Read from the cache's record of a pretrained or URL download (state_dict_for has just verified
    it), or hashed for a checkpoint file.
    """
    from resnetcli import cache

    if choice.kind == "none":
        return "none"
    if choice.kind == "checkpoint":
        assert choice.path is not None
        return cache.sha256_of(choice.path)
    if choice.kind == "url":
        name = cache.file_name_of(choice.url or "")
    else:
        from resnetcli.factory import weights_file_name

        name = weights_file_name(choice.pretrained)
    path = cache.checkpoint_dir() / name
    return cache.check_cached_file(path)


def check_images(paths: Sequence[Path] | None = None) -> list[Path]:
    """The photos an export is checked on: those given, or the repository's sample photos."""
    if paths:
        return list(paths)
    found = sorted(SAMPLE_IMAGES.glob("*.jpg")) if SAMPLE_IMAGES.is_dir() else []
    if not found:
        raise UsageError("no photos to check the export on: pass --check-with IMAGE (one or more)")
    return found


def export_loaded(
    loaded: LoadedModel,
    output: Path,
    *,
    source_sha: str,
    opset: int = DEFAULT_OPSET,
    images: Sequence[Path] | None = None,
) -> ExportResult:
    """Export `loaded` to `output` atomically, after ONNX Runtime matched eager torch on real photos.

    The file is written to a temporary name beside `output` and renamed into place only once the
    check passed; on any failure nothing is left behind.
    """
    started = time.monotonic()
    info = ModelInfo(
        arch=loaded.arch,
        weights=loaded.weights.name if loaded.weights.kind != "checkpoint" else Path(loaded.weights.name).name,
        source_sha256=source_sha,
        classes=tuple(loaded.categories),
        preprocessing=preprocessing_of(loaded.transforms),
        opset=opset,
        exporter=EXPORTER,
    )
    photos = check_images(images)
    batch = _preprocessed_batch(loaded, photos)
    output = Path(output)
    temporary = output.with_name(f".{output.name}.{os.getpid()}.{time.monotonic_ns()}.partial")
    try:
        _write_onnx(loaded.model, info, temporary, batch.shape[-2:])
        tolerance, difference = _check(loaded.model, temporary, batch, output)
        os.replace(temporary, output)
    except OSError as error:
        raise UsageError(f"-o {output}: cannot write: {error.strerror or error}") from None
    finally:
        temporary.unlink(missing_ok=True)
    log.debug("exported %s in %.1f s, max |logit difference| %.3g", output, time.monotonic() - started, difference)
    return ExportResult(
        output,
        info,
        output.stat().st_size,
        tuple(p.name for p in photos),
        difference,
        tolerance,
        time.monotonic() - started,
    )


def _preprocessed_batch(loaded: LoadedModel, photos: Sequence[Path]):
    import torch

    from resnetcli.images import load_image

    return torch.stack([loaded.transforms(load_image(path)) for path in photos])


def _write_onnx(model, info: ModelInfo, path: Path, image_size) -> None:
    """Run the dynamo exporter with a dynamic batch dimension and write the file with its metadata."""
    import torch

    example = torch.zeros(EXAMPLE_BATCH, 3, *image_size)
    # The forward's first parameter is named `x` in every torchvision classifier, but not
    # necessarily in a user's module: give the dynamic shape by position.
    batch = torch.export.Dim("batch", min=1)
    try:
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            verbose=False,
            opset_version=info.opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            external_data=False,
        )
    except Exception as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"{info.arch}: the ONNX exporter failed at opset {info.opset} ({first})") from error
    written = program.model.opset_imports.get("")
    if written != info.opset:
        # Below its native opset the exporter tries the ONNX version converter, and on failure keeps
        # its own opset (resnet18 at 17: "Failed to convert the model to the target version 17").
        raise CheckpointError(f"{info.arch}: the ONNX exporter cannot write opset {info.opset} (it wrote {written})")
    program.model.metadata_props.update(info.metadata())
    program.save(path, external_data=False)


def _check(model, path: Path, batch, output: Path) -> tuple[float, float]:
    """ONNX Runtime's logits against eager torch's on the whole batch and on its first image alone
    (the batch dimension is dynamic); returns (tolerance, largest absolute difference)."""
    import numpy as np
    import torch

    from resnetcli.onnxrt import open_session

    session = open_session(path)
    difference, tolerance = 0.0, 0.0
    with torch.inference_mode():
        for images in (batch, batch[:1]):
            expected = model(images).float().numpy()
            actual = session.run([OUTPUT_NAME], {INPUT_NAME: images.numpy()})[0]
            if actual.shape != expected.shape:
                raise WeightsUnavailable(
                    f"{output}: export check failed: ONNX output {actual.shape}, torch {expected.shape}"
                )
            difference = max(difference, float(np.abs(actual - expected).max()))
            tolerance = max(tolerance, ATOL + RTOL * float(np.abs(expected).max()))
    if not difference <= tolerance:
        raise WeightsUnavailable(
            f"{output}: not written: ONNX Runtime's logits differ from torch's by {difference:.3g} "
            f"(tolerance {tolerance:.3g})"
        )
    return tolerance, difference


def export(
    arch: str,
    weights: str | None,
    output: Path,
    *,
    opset: int = DEFAULT_OPSET,
    labels: Sequence[str] | None = None,
    images: Sequence[Path] | None = None,
    settings=None,
    on_progress=None,
) -> ExportResult:
    """`resnet export`: load a model through the factory (any torchvision classifier, pretrained
    weights, a checkpoint, a URL, `none`), and export it."""
    from resnetcli import factory

    loaded = factory.load_model(arch, weights, labels=labels, settings=settings, on_progress=on_progress)
    return export_loaded(loaded, output, source_sha=source_sha256(loaded.weights), opset=opset, images=images)
