"""Classification on ONNX Runtime without torch: a model file, Pillow and numpy.

An `OnnxClassifier` has the shape the predict pipeline's model side takes:
`preprocess(PIL image) -> np.ndarray` (3, H, W) float32, `classify(np.ndarray (N, 3, H, W)) ->
np.ndarray (N, classes)` probabilities, `categories`, and `description` for records. Everything it
needs comes from the file's metadata (`resnetcli.onnxmeta`), or from explicit options for a
foreign ONNX model. This module never imports torch or torchvision (tests/test_onnx.py checks
`sys.modules` in a fresh process).

The preprocessing reproduces torchvision's `ImageClassification` transform on PIL images exactly:
its resize and crop run in Pillow there too, and the float arithmetic is done in float32 in the
same order (x / 255, then (x - mean) / std), so the tensors are bit-identical on the sample photos.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from resnetcli.errors import CheckpointError, UsageError, one_line
from resnetcli.onnxmeta import ModelInfo, Preprocessing

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from resnetcli.predict import Classifier as PipelineClassifier

log = logging.getLogger(__name__)

#: What to tell a user whose Python has no onnxruntime (the CPU wheel, about 17 MB).
INSTALL_COMMAND = "pip install onnxruntime"


def require_onnxruntime(option: str = "--runtime onnxruntime"):
    """The onnxruntime module, or UsageError (exit 2) with the install command."""
    try:
        import onnxruntime
    except ImportError:
        raise UsageError(f"{option}: onnxruntime is not installed; install it with: {INSTALL_COMMAND}") from None
    return onnxruntime


def open_session(path: Path, threads: int | None = None, option: str = "--weights"):
    """An ONNX Runtime CPU session on `path`, or CheckpointError (exit 3) for a file it cannot load.

    Its intra-op threads sleep instead of spinning between operators (ONNX Runtime spins by
    default): in predict they share the cores with the decoder threads, and in batch jobs with
    other processes. Measured on 256 photos of 0.1-10 MP with resnet50 on 2 cores, spinning cost
    2.6 core-s of 29 on a loaded machine and 0.8 of 26 on a quiet one (wall time 2% longer there)
    (bench/README.md, "ONNX Runtime").
    """
    ort = require_onnxruntime(f"{option} {path}")
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: ORT's warnings would be unformatted stderr lines
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as error:
        log.debug("onnxruntime could not open %s", path, exc_info=True)
        text = one_line(error)
        text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
        raise CheckpointError(f"{path}: not a readable ONNX model ({text[:200] or type(error).__name__})") from None


def preprocessing_with_sizes(
    base: Preprocessing, input_size: int | None = None, resize: int | None = None
) -> Preprocessing:
    """`base` with another crop and/or resize size, as `predict.set_preprocessing` does on the torch
    side: given only `input_size`, the resize keeps the resize-to-crop ratio."""
    if input_size is None and resize is None:
        return base
    crop = input_size if input_size is not None else base.crop_size[0]
    if resize is None:
        resize = round(crop * base.resize_size[0] / base.crop_size[0])
    return replace(base, crop_size=(crop,), resize_size=(resize,))


def resized_size(width: int, height: int, resize_size: Sequence[int]) -> tuple[int, int]:
    """(width, height) after torchvision's Resize: the short side to `resize_size[0]`, the long side
    truncated as `torchvision.transforms.functional._compute_resized_output_size` does, or exactly
    (h, w) when two sizes are given."""
    if len(resize_size) == 2:
        return resize_size[1], resize_size[0]
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resize_size[0], int(resize_size[0] * long / short)
    return (new_short, new_long) if width <= height else (new_long, new_short)


def _pil_filter(name: str) -> int:
    from PIL import Image

    # torchvision's pil_modes_mapping: nearest-exact is Pillow's NEAREST too.
    return {
        "nearest": Image.NEAREST,
        "nearest-exact": Image.NEAREST,
        "bilinear": Image.BILINEAR,
        "bicubic": Image.BICUBIC,
        "box": Image.BOX,
        "hamming": Image.HAMMING,
        "lanczos": Image.LANCZOS,
    }[name]


def preprocess(image, spec: Preprocessing) -> np.ndarray:
    """A (3, H, W) float32 array from an RGB PIL image: resize, centre crop, scale, normalise."""
    import numpy as np

    width, height = image.size
    size = resized_size(width, height, spec.resize_size)
    if size != image.size:
        image = image.resize(size, _pil_filter(spec.interpolation))
    pixels = np.asarray(image, dtype=np.uint8)
    crop_h, crop_w = (spec.crop_size[0], spec.crop_size[-1])
    height, width = pixels.shape[:2]
    if crop_w > width or crop_h > height:  # torchvision pads with zeros, then crops
        pad_w, pad_h = max(crop_w - width, 0), max(crop_h - height, 0)
        pixels = np.pad(pixels, ((pad_h // 2, (pad_h + 1) // 2), (pad_w // 2, (pad_w + 1) // 2), (0, 0)))
        height, width = pixels.shape[:2]
    top, left = int(round((height - crop_h) / 2.0)), int(round((width - crop_w) / 2.0))
    pixels = pixels[top : top + crop_h, left : left + crop_w]
    array = pixels.transpose(2, 0, 1).astype(np.float32) / np.float32(255)
    mean = np.asarray(spec.mean, dtype=np.float32).reshape(3, 1, 1)
    std = np.asarray(spec.std, dtype=np.float32).reshape(3, 1, 1)
    return np.ascontiguousarray((array - mean) / std)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float32, shifted by the row maximum (as torch.softmax)."""
    import numpy as np

    logits = logits.astype(np.float32, copy=False)
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class OnnxClassifier:
    """A classifier on ONNX Runtime, ready for the predict pipeline."""

    path: Path
    info: ModelInfo
    session: Any
    input_name: str
    output_name: str
    fixed_batch: int | None  # a model exported for one batch size is fed that many images at a time

    @property
    def categories(self) -> list[str]:
        return list(self.info.classes)

    @property
    def arch(self) -> str:
        return self.info.arch

    @property
    def weights_name(self) -> str:
        """What the records' `weights` field shows: the model file, as given to `--weights`."""
        return str(self.path)

    @property
    def description(self) -> str:
        from importlib.metadata import version

        return f"onnxruntime {version('onnxruntime')} ({', '.join(self.session.get_providers())})"

    def preprocess(self, image) -> np.ndarray:
        return preprocess(image, self.info.preprocessing)

    def classify(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities (N, classes) for a preprocessed (N, 3, H, W) float32 batch."""
        import numpy as np

        batch = np.ascontiguousarray(batch, dtype=np.float32)
        step = self.fixed_batch or len(batch)
        parts = []
        for start in range(0, len(batch), step):
            chunk = batch[start : start + step]
            if len(chunk) < step:  # a model exported for a fixed batch size: pad the last chunk with zeros
                chunk = np.concatenate([chunk, np.zeros((step - len(chunk), *chunk.shape[1:]), np.float32)])
            parts.append(self.session.run([self.output_name], {self.input_name: chunk})[0][: len(batch) - start])
        return softmax(np.concatenate(parts) if len(parts) != 1 else parts[0])

    def record(self) -> dict:
        return {"path": str(self.path), **{k.removeprefix("resnetcli."): v for k, v in self.info.metadata().items()}}


def _check_input(path: Path, session, crop_size: Sequence[int]) -> tuple[str, int | None]:
    """The input's name and fixed batch size (None if dynamic); CheckpointError unless N x 3 x H x W float."""
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise CheckpointError(
            f"{path}: the model takes {len(inputs)} inputs; an image classifier takes one, N x 3 x H x W float"
        )
    (model_input,) = inputs
    shape = list(model_input.shape)
    if model_input.type != "tensor(float)" or len(shape) != 4 or shape[1] != 3:
        shown = " x ".join(str(d) if d is not None else "?" for d in shape)
        raise CheckpointError(
            f"{path}: the model's input is {model_input.type} {shown}; an image classifier takes N x 3 x H x W float"
        )
    crop = (crop_size[0], crop_size[-1])
    for dim, wanted, what in zip(shape[2:], crop, ("height", "width"), strict=False):
        if isinstance(dim, int) and dim != wanted:
            raise CheckpointError(
                f"{path}: the model takes images of {what} {dim}, but the preprocessing crops {crop[0]}x{crop[1]}"
            )
    return model_input.name, shape[0] if isinstance(shape[0], int) else None


def open_classifier(
    path: Path,
    *,
    labels: Sequence[str] | None = None,
    preprocessing: Preprocessing | None = None,
    input_size: int | None = None,
    resize: int | None = None,
    threads: int | None = None,
) -> OnnxClassifier:
    """Open an ONNX model for classification.

    The class names and preprocessing come from resnetcli's metadata; `labels` and `preprocessing`
    (all of resize and crop size, mean, std and interpolation) replace them, and make a model
    without that metadata usable. `input_size`/`resize` change the sizes as `--input-size` and
    `--resize` do. CheckpointError (exit 3) names what is missing or wrong.
    """
    path = Path(path)
    session = open_session(path, threads)
    props = dict(session.get_modelmeta().custom_metadata_map or {})
    info, problems = ModelInfo.from_metadata(props)
    if info is None:
        problems = [
            p
            for p in problems
            if not (p == "class names" and labels) and not (p.startswith("preprocessing") and preprocessing)
        ]
        if problems:
            raise CheckpointError(
                f"{path}: the model has no resnetcli metadata ({', '.join(problems)} missing); export it with "
                "`resnet export`, or give --labels and every preprocessing option (--resize, --input-size, "
                "--mean, --std, --interpolation)"
            )
        info = ModelInfo(
            arch=props.get("resnetcli.arch") or path.stem,
            weights=path.name,
            source_sha256="",
            classes=tuple(labels or ()),
            preprocessing=preprocessing,
            opset=0,
            exporter="",  # type: ignore[arg-type]
        )
    if labels is not None:
        info = replace(info, classes=tuple(labels))
    if preprocessing is not None:
        info = replace(info, preprocessing=preprocessing)
    info = replace(info, preprocessing=preprocessing_with_sizes(info.preprocessing, input_size, resize))
    input_name, fixed_batch = _check_input(path, session, info.preprocessing.crop_size)
    outputs = session.get_outputs()
    classes = outputs[0].shape[-1] if outputs and len(outputs[0].shape) == 2 else None
    if len(outputs) < 1 or len(outputs[0].shape) != 2:
        raise CheckpointError(f"{path}: the model's output is not N x classes")
    if isinstance(classes, int) and classes != len(info.classes):
        source = "the labels" if labels is not None else "its metadata"
        raise CheckpointError(f"{path}: the model predicts {classes} classes but {source} name {len(info.classes)}")
    return OnnxClassifier(path, info, session, input_name, outputs[0].name, fixed_batch)


def pipeline_classifier(classifier: OnnxClassifier, *, weights: str | None = None) -> PipelineClassifier:
    """The predict pipeline's `Classifier` for an ONNX Runtime classifier: Pillow+numpy preprocessing
    in the decoder threads, batches stacked with numpy, the pipeline's numpy top-k (stable: ties in
    index order). `weights` is what records show (default: the model file's path).

    Images whose resize step would exceed Pillow's pixel limit are refused, as on the torch path.
    """
    import numpy as np

    from resnetcli.images import check_resize
    from resnetcli.predict import Classifier

    spec = classifier.info.preprocessing
    short_side = min(spec.resize_size)  # as the torch path checks it

    def preprocess(image) -> np.ndarray:
        if short_side is not None:
            check_resize(image.size, short_side)
        return classifier.preprocess(image)

    def classify(arrays: Sequence[np.ndarray]) -> np.ndarray:
        return classifier.classify(np.stack(list(arrays)))

    return Classifier(
        arch=classifier.arch,
        weights=weights if weights is not None else classifier.weights_name,
        categories=tuple(classifier.categories),
        preprocess=preprocess,
        classify=classify,
        details={"runtime": classifier.description, "model": str(classifier.path)},
    )
