"""What a resnetcli ONNX file says about itself: its `metadata_props`, written by `resnetcli.export`
and read by `resnetcli.onnxrt`. Plain data; imports neither torch nor onnxruntime.

Keys (all strings; lists and mappings as JSON):
  resnetcli.format         "resnetcli.onnx/1"
  resnetcli.arch           torchvision architecture name
  resnetcli.weights        weights name (IMAGENET1K_V2, none, a checkpoint's file name or URL)
  resnetcli.source_sha256  full sha256 of the source weights file ("none" for random init)
  resnetcli.classes        JSON list of class names in index order
  resnetcli.preprocessing  JSON {resize_size, crop_size, mean, std, interpolation}, the keys of the
                           fine-tuned checkpoint format, read from the weights' transforms object
  resnetcli.opset, resnetcli.exporter, resnetcli.version
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from resnetcli import __version__

FORMAT = "resnetcli.onnx/1"
PREFIX = "resnetcli."
#: The exporter `resnetcli.export` uses (see its docstring for why): part of the export cache key.
EXPORTER = "torch.onnx.dynamo"
#: The opset written when `--opset` is not given, and the lowest accepted: the lowest the dynamo
#: exporter emits natively. Asked for 17, it runs the ONNX version converter, which failed on
#: resnet18 here ("axes_input_to_attribute ... failed") and left the model at 18.
DEFAULT_OPSET = 18
MIN_OPSET = 18
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
#: Interpolation names (torchvision's InterpolationMode values) the Pillow preprocessing supports.
INTERPOLATIONS = ("nearest", "nearest-exact", "bilinear", "bicubic", "box", "hamming", "lanczos")


@dataclass(frozen=True)
class Preprocessing:
    """Resize the short side to `resize_size` (or to exactly (h, w) when it has two values), centre
    crop `crop_size`, scale to [0, 1], subtract `mean` and divide by `std`, per RGB channel."""

    resize_size: tuple[int, ...]
    crop_size: tuple[int, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str

    def record(self) -> dict:
        return {
            "resize_size": list(self.resize_size),
            "crop_size": list(self.crop_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
        }

    @classmethod
    def from_record(cls, data: object) -> Preprocessing:
        """Parse the JSON form (sizes may be an int or a list of one or two ints); ValueError if malformed."""
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")

        def sizes(key: str) -> tuple[int, ...]:
            value = data.get(key)
            values = [value] if isinstance(value, int) else value
            if (
                not isinstance(values, list)
                or len(values) not in (1, 2)
                or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
            ):
                raise ValueError(f"{key} must be a positive integer or a list of one or two")
            return tuple(values)

        def channels(key: str) -> tuple[float, ...]:
            value = data.get(key)
            if not isinstance(value, list) or len(value) != 3 or not all(isinstance(v, (int, float)) for v in value):
                raise ValueError(f"{key} must be a list of 3 numbers")
            return tuple(float(v) for v in value)

        interpolation = data.get("interpolation")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}")
        std = channels("std")
        if any(v == 0 for v in std):
            raise ValueError("std must not be 0")
        return cls(sizes("resize_size"), sizes("crop_size"), channels("mean"), std, interpolation)


@dataclass(frozen=True)
class ModelInfo:
    """The description of an exported model."""

    arch: str
    weights: str
    source_sha256: str
    classes: tuple[str, ...]
    preprocessing: Preprocessing
    opset: int
    exporter: str
    version: str = __version__

    def metadata(self) -> dict[str, str]:
        """The `metadata_props` entries."""
        return {
            PREFIX + "format": FORMAT,
            PREFIX + "arch": self.arch,
            PREFIX + "weights": self.weights,
            PREFIX + "source_sha256": self.source_sha256,
            PREFIX + "classes": json.dumps(list(self.classes)),
            PREFIX + "preprocessing": json.dumps(self.preprocessing.record()),
            PREFIX + "opset": str(self.opset),
            PREFIX + "exporter": self.exporter,
            PREFIX + "version": self.version,
        }

    @classmethod
    def from_metadata(cls, props: dict[str, str]) -> tuple[ModelInfo | None, list[str]]:
        """Parse `metadata_props`; returns (info, []) or (None, the missing or malformed parts)."""
        problems: list[str] = []
        get = props.get
        try:
            classes = json.loads(get(PREFIX + "classes") or "null")
            if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
                raise ValueError
        except ValueError:
            classes = None
            problems.append("class names")
        try:
            preprocessing = Preprocessing.from_record(json.loads(get(PREFIX + "preprocessing") or "null"))
        except ValueError as error:
            preprocessing = None
            problems.append(f"preprocessing ({error})" if get(PREFIX + "preprocessing") else "preprocessing")
        if problems:
            return None, problems
        opset_text = get(PREFIX + "opset") or ""
        return cls(
            arch=get(PREFIX + "arch") or "onnx",
            weights=get(PREFIX + "weights") or "",
            source_sha256=get(PREFIX + "source_sha256") or "",
            classes=tuple(classes),  # type: ignore[arg-type]
            preprocessing=preprocessing,  # type: ignore[arg-type]
            opset=int(opset_text) if opset_text.isdigit() else 0,
            exporter=get(PREFIX + "exporter") or "",
            version=get(PREFIX + "version") or "",
        ), []
