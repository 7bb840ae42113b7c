"""Classify images on a Ray cluster: `Classifier`, a callable class for Ray Data's `Dataset.map_batches`.

    import ray
    from resnetcli.ray import Classifier

    ds = ray.data.from_items([{"path": p} for p in paths])
    predictions = ds.map_batches(
        Classifier, fn_constructor_kwargs={"arch": "resnet50", "weights": "DEFAULT", "top": 5},
        concurrency=4, batch_size=32,
    )

Each actor builds its model side once, with the function `resnet predict` builds it with
(`inference.load_torch_classifier`: the factory, the preprocessing choice, the inference plan; a
`.onnx` file through `onnxrt`, without torch), and makes its records with predict's own
`predict.batch_predictions`. A row answers with the fields of a predict record: `input`, `arch`,
`weights`, `top` (a list of {rank, index, label, prob}) and `error`, which is set (and the others
are null) for an input that could not be read or decoded. A bad image never fails a block.
`record(row)` turns a row back into the exact record `resnet predict` prints.

Needs the `resnetcli[ray]` extra (Ray Data); importing this module without it raises ImportError
saying so.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

from resnetcli.errors import InputError

#: The extra that installs what this module needs.
EXTRA = "resnetcli[ray]"

try:
    import ray
    import ray.data
except ImportError as _missing:  # pragma: no cover - exercised in a subprocess without Ray
    raise ImportError(f"resnetcli.ray needs Ray Data, which is not installed: pip install '{EXTRA}'") from _missing

log = logging.getLogger(__name__)

#: Input columns the classifier reads, in order of preference: encoded image bytes (named by
#: `path` when there is one, as `ray.data.read_binary_files(..., include_paths=True)` gives them),
#: a path or URI (`from_items([{"path": ...}])`), a bare item (`from_items([...])`), or a decoded
#: HWC uint8 array (`ray.data.read_images`).
SOURCE_COLUMNS = ("bytes", "path", "item", "image")
#: The columns added to every batch, those of a predict record.
RECORD_COLUMNS = ("input", "arch", "weights", "top", "error")


class Classifier:
    """A callable class for `Dataset.map_batches`: top-k classes of each image in a batch.

    The constructor takes the options of `resnet predict`: `arch` (None: the checkpoint's own, else
    resnet50), `weights` (DEFAULT, a weights name, `none`, a checkpoint file or URL, or a `.onnx`
    file run by ONNX Runtime without torch), `top`, `threshold`, `labels` (class names for a
    checkpoint), `preprocess`/`input_size`/`resize`, `device` (auto uses the GPU Ray assigned to
    the actor, if any), `threads` (model threads; default: the CPUs Ray assigned to the actor),
    `workers` (decoding threads), `offline`/`mirror` for the weight cache and image URLs,
    `trust_checkpoint`, and `batch_size`, the batches the fast path is prepared for (pass the same
    as map_batches').
    """

    def __init__(
        self,
        arch: str | None = None,
        weights: str = "DEFAULT",
        top: int = 5,
        *,
        threshold: float = 0.0,
        labels: Sequence[str] | None = None,
        preprocess: str | None = None,
        input_size: int | None = None,
        resize: int | None = None,
        device: str = "auto",
        threads: int | None = None,
        workers: int | None = None,
        offline: bool = False,
        mirror: str | None = None,
        trust_checkpoint: bool = False,
        batch_size: int = 16,
    ) -> None:
        from resnetcli.cache import CacheSettings

        self.top = top
        self.threshold = threshold
        self.settings = CacheSettings.from_env(offline=offline, mirror=mirror)
        threads = threads or assigned_cpus()
        labels = list(labels) if labels else None
        if is_onnx(weights):
            self.classifier = onnx_classifier(
                weights, labels=labels, preprocess=preprocess, input_size=input_size, resize=resize,
                device=device, threads=threads,
            )  # fmt: skip
        else:
            from resnetcli.inference import load_torch_classifier

            # expected_count None: an actor classifies many images, so a plan with set-up costs pays back.
            self.classifier = load_torch_classifier(
                arch, weights, labels=labels, preprocess=preprocess, input_size=input_size, resize=resize,
                device=device, threads=threads, settings=self.settings, trust_checkpoint=trust_checkpoint,
                batch_size=batch_size, expected_count=None, note=lambda text: log.warning("%s", text),
            )  # fmt: skip
        from resnetcli.predict import default_workers

        # Decoding threads: as many as the actor's CPUs, as the local engine has one per usable CPU.
        decoders = workers or threads or default_workers()
        self.pool = ThreadPoolExecutor(max_workers=decoders, thread_name_prefix="resnet-decode")
        log.debug("Classifier ready: %s (%s)", self.classifier.arch, self.classifier.weights)

    def __call__(self, batch: Any) -> dict:
        """Classify a batch (a dict of numpy arrays, or a pandas DataFrame) and return it as a dict of
        numpy arrays: its columns other than the image's, plus the record columns."""
        import numpy as np

        from resnetcli.predict import batch_predictions

        columns = _as_columns(batch)
        names, loaders = _sources(columns, offline=self.settings.offline, timeout=self.settings.timeout)
        failures = columns.get("error")
        outcomes: list = [None] * len(names)
        pending = []
        for position, (name, load) in enumerate(zip(names, loaders)):
            failure = failures[position] if failures is not None else None
            if _present(failure):
                outcomes[position] = str(InputError(name, str(failure)))
            else:
                pending.append((position, self.pool.submit(self._prepare, name, load)))
        for position, future in pending:
            try:
                outcomes[position] = future.result()
            except InputError as error:
                outcomes[position] = str(error)
        predictions = batch_predictions(self.classifier, names, outcomes, top=self.top, threshold=self.threshold)
        records = [prediction.record() for prediction in predictions]
        out = {key: value for key, value in columns.items() if key not in (*SOURCE_COLUMNS, *RECORD_COLUMNS)}
        for key in RECORD_COLUMNS:
            column = np.empty(len(records), dtype=object)  # element by element: `top` holds lists
            for row, entry in enumerate(records):
                column[row] = entry.get(key)
            out[key] = column
        return out

    def _prepare(self, name: str, load: Callable[[], Any]):
        from resnetcli.images import ImageRefused

        image = load()
        try:
            return self.classifier.preprocess(image)
        except ImageRefused as refused:
            raise InputError(name, str(refused)) from None


def is_onnx(weights: str | None) -> bool:
    """Whether `--weights` names an ONNX model file (by its suffix), which ONNX Runtime runs."""
    return bool(weights) and str(weights).lower().endswith(".onnx")


def onnx_classifier(
    path: str,
    *,
    labels: list[str] | None,
    preprocess: str | None,
    input_size: int | None,
    resize: int | None,
    device: str,
    threads: int | None,
):
    """The `predict.Classifier` of an ONNX model file on ONNX Runtime's CPU provider; never imports torch."""
    from pathlib import Path

    from resnetcli.errors import UsageError
    from resnetcli.onnxrt import open_classifier
    from resnetcli.predict import Classifier as Pipeline

    if preprocess is not None:
        raise UsageError(f"--preprocess {preprocess}: takes torchvision weights; an ONNX model brings its own")
    if device.strip().lower() not in ("auto", "cpu"):
        raise UsageError(f"--device {device}: an ONNX model runs on the CPU here")
    model = open_classifier(Path(path), labels=labels, input_size=input_size, resize=resize, threads=threads)

    def classify(images: Sequence[Any]):
        import numpy as np

        return model.classify(np.stack(images))

    return Pipeline(
        arch=model.arch,
        weights=model.weights_name,
        categories=tuple(model.categories),
        preprocess=model.preprocess,
        classify=classify,
        details={"runtime": model.description},
    )


def prediction(row: dict):
    """The `predict.Prediction` of an output row (a dict, as Ray Data gives rows back)."""
    from resnetcli.predict import ClassScore, Prediction

    name = str(row["input"])
    if _present(row.get("error")):
        return Prediction(name, str(row.get("arch") or ""), str(row.get("weights") or ""), error=str(row["error"]))
    top = tuple(
        ClassScore(int(s["rank"]), int(s["index"]), str(s["label"]), float(s["prob"]))
        for s in (row.get("top") if row.get("top") is not None else [])
    )
    return Prediction(name, str(row["arch"]), str(row["weights"]), top=top)


def record(row: dict) -> dict:
    """The `resnet predict` record of an output row: `{input, arch, weights, top}` or `{input, error}`."""
    return prediction(row).record()


def assigned_cpus() -> int | None:
    """The CPUs Ray assigned to this worker (rounded down, at least 1), or None outside a Ray worker."""
    if not ray.is_initialized():
        return None
    try:
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:
        log.debug("no CPU assignment from Ray", exc_info=True)
        return None
    return max(1, int(cpus)) if cpus else None


def read_uri(uri: str, limit: int) -> bytes:
    """The content of an object-store URI (s3://, gs://, hdfs://, file://, ...) through pyarrow's
    filesystems, or InputError; at most `limit` bytes."""
    import pyarrow.fs

    try:
        filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
        with filesystem.open_input_stream(path) as stream:
            data = stream.read(limit + 1)
    except FileNotFoundError:
        raise InputError(uri, "no such object") from None
    except (OSError, ValueError, pyarrow.ArrowException) as error:
        raise InputError(uri, f"cannot read: {' '.join(str(error).split())}") from None
    if len(data) > limit:
        raise InputError(uri, f"refused: larger than {limit // (1024 * 1024)} MiB")
    return data


def is_object_uri(source: str) -> bool:
    """Whether a source is a URI for pyarrow's filesystems (scheme://...) rather than a path or http(s) URL."""
    from resnetcli.images import is_url

    scheme, separator, _ = source.partition("://")
    return bool(separator) and scheme.isidentifier() and not is_url(source)


def _as_columns(batch: Any) -> dict:
    if hasattr(batch, "to_dict") and hasattr(batch, "columns"):  # a pandas DataFrame
        return {name: batch[name].to_numpy() for name in batch.columns}
    return dict(batch)


def _present(value: Any) -> bool:
    """Whether an error cell holds a message: missing values come as None, or as NaN (of any float
    type) from a column Arrow saw only nulls in."""
    return isinstance(value, str)


def _sources(
    columns: dict, *, offline: bool = False, timeout: float = 30.0
) -> tuple[list[str], list[Callable[[], Any]]]:
    """The name of each row's image and a function decoding it."""
    from resnetcli.images import MAX_DOWNLOAD_BYTES, decode_bytes, load_image
    from resnetcli.predict import shown

    found = [name for name in SOURCE_COLUMNS if name in columns]
    if not found:
        raise ValueError(
            f"Classifier: a batch needs one of the columns {', '.join(SOURCE_COLUMNS)}; got {', '.join(columns)}"
        )
    column = found[0]
    values = list(columns[column])
    if column == "bytes":
        paths = columns.get("path")
        names = [str(paths[i]) if paths is not None else f"<bytes #{i}>" for i in range(len(values))]
        return names, [_bytes_loader(name, data) for name, data in zip(names, values)]
    if column == "image":
        paths = columns.get("path")
        names = [str(paths[i]) if paths is not None else f"<image #{i}>" for i in range(len(values))]
        return names, [_array_loader(array) for array in values]
    names, loaders = [], []
    for value in values:
        if isinstance(value, (bytes, bytearray)):
            name = f"<bytes #{len(names)}>"
            names.append(name)
            loaders.append(_bytes_loader(name, bytes(value)))
            continue
        source = str(value)
        names.append(shown(source))  # a URL without its password, as predict names it
        if is_object_uri(source):
            loaders.append(lambda source=source: decode_bytes(source, read_uri(source, MAX_DOWNLOAD_BYTES)))
        else:
            loaders.append(lambda source=source: load_image(source, offline=offline, timeout=timeout))
    return names, loaders


def _bytes_loader(name: str, data: Any) -> Callable[[], Any]:
    from resnetcli.images import decode_bytes

    return lambda: decode_bytes(name, bytes(data))


def _array_loader(array: Any) -> Callable[[], Any]:
    def load():
        from PIL import Image

        from resnetcli.images import to_rgb

        return to_rgb(Image.fromarray(array))

    return load
