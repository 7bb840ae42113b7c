"""Top-k classification of images: plain data in, plain data out.

The pipeline: a feeder thread walks the (lazy) inputs and hands each to a pool of decoder threads
(Pillow decoding and torchvision preprocessing release the GIL); the caller's thread takes the
results in input order, runs the model on batches and yields one Prediction per input. A bounded
queue between them keeps memory flat however many inputs there are.
"""

from __future__ import annotations

import os
import queue
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Union

from resnetcli.errors import InputError, UsageError
from resnetcli.images import load_image
from resnetcli.inputs import Input

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from resnetcli.factory import LoadedModel

#: A partial batch is run when no further input has arrived for this long (seconds), so records
#: keep streaming when inputs trickle in (a slow `find | resnet predict -`).
FLUSH_AFTER = 0.1


@dataclass(frozen=True)
class ClassScore:
    """One ranked class of a prediction."""

    rank: int
    index: int
    label: str
    prob: float


@dataclass
class Prediction:
    """The outcome for one input: its top classes, or the error that stopped it."""

    input: str
    arch: str
    weights: str
    top: list[ClassScore] = field(default_factory=list)
    error: str | None = None

    def record(self) -> dict:
        """The JSON record: `{input, arch, weights, top}` or `{input, error}` for a failed input."""
        if self.error is not None:
            return {"input": self.input, "error": self.error}
        return {"input": self.input, "arch": self.arch, "weights": self.weights, "top": [asdict(s) for s in self.top]}


def top_classes(probabilities, categories: list[str], k: int, threshold: float = 0.0) -> list[list[ClassScore]]:
    """The k most probable classes of each row of a (batch, classes) probability tensor."""
    import torch

    k = min(k, probabilities.shape[1])
    values, indices = torch.topk(probabilities, k, dim=1)
    batches = []
    for row_values, row_indices in zip(values.tolist(), indices.tolist()):
        batches.append(
            [
                ClassScore(rank, index, categories[index], round(prob, 6))
                for rank, (prob, index) in enumerate(zip(row_values, row_indices), start=1)
                if prob >= threshold
            ]
        )
    return batches


def classify(model: Callable[[torch.Tensor], torch.Tensor], batch: torch.Tensor) -> torch.Tensor:
    """Class probabilities (on the CPU) for a preprocessed (N, 3, H, W) batch: the one model call.

    `model` is what `fastpath.optimize_for_inference` returns: it moves the batch to its device.
    """
    import torch

    with torch.inference_mode():
        logits = model(batch)
        return torch.softmax(logits.float(), dim=1).cpu()


# ---------------------------------------------------------------------------------------------
# Device, threads, preprocessing


def resolve_device(spec: str) -> str:
    """A torch device name for `--device`: auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps.

    Raises UsageError for a device this machine does not have.
    """
    import torch

    wanted = spec.strip().lower()
    mps_available = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())
    if wanted == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if mps_available else "cpu"
    if wanted == "cpu":
        return "cpu"
    if wanted == "mps":
        if not mps_available:
            raise UsageError("--device mps: Apple's MPS backend is not available on this machine")
        return "mps"
    if wanted == "cuda" or wanted.startswith("cuda:"):
        index_text = wanted.partition(":")[2]
        if index_text and not index_text.isdigit():
            raise UsageError(f"--device {spec}: expected cuda or cuda:N")
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(index_text) if index_text else 0
        if index >= count:
            seen = "no CUDA device" if count == 0 else f"{count} CUDA device(s), cuda:0 to cuda:{count - 1}"
            raise UsageError(f"--device {spec}: not available (torch sees {seen})")
        return wanted
    raise UsageError(f"--device {spec}: choose auto, cpu, cuda, cuda:N or mps")


def default_workers() -> int:
    """Decoder threads when `--workers` is not given: one per core, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def preprocessing_weights(arch: str, name: str):
    """The weights of `arch` called `name` (`--preprocess`), whose transforms to use; UsageError if none is."""
    from resnetcli.factory import DEFAULT_WEIGHTS, resolve_architecture, weights_enum

    arch = resolve_architecture(arch)
    enum = weights_enum(arch)
    member = name.strip().upper()
    if member == DEFAULT_WEIGHTS:
        return enum.DEFAULT
    if member in enum.__members__:
        return enum[member]
    names = ", ".join(enum.__members__)  # the weights names and their DEFAULT alias
    raise UsageError(f"--preprocess {name}: not a weights name of {arch}; choose one of {names}")


def set_preprocessing(loaded: LoadedModel, weights=None, *, input_size: int | None = None, resize: int | None = None) -> None:
    """Replace `loaded.transforms` with another weights' preprocessing and/or other sizes.

    `weights` (from `preprocessing_weights`) supplies the transforms (default: those already
    chosen, i.e. the weights' own or, for a checkpoint, the architecture's default ones).
    `input_size` is the centre crop fed to the model; `resize` the size the shorter side is resized
    to first. Given only `input_size`, the resize keeps the weights' resize-to-crop ratio. Mean,
    std and interpolation always come from the weights' transforms object.
    """
    if weights is not None:
        loaded.transforms = weights.transforms()
    if input_size is None and resize is None:
        return
    base = loaded.transforms
    if not all(hasattr(base, name) for name in ("crop_size", "resize_size", "mean", "std")):
        raise UsageError(f"the preprocessing of {loaded.arch} has no crop and resize sizes to change")
    base_crop, base_resize = base.crop_size[0], base.resize_size[0]
    crop = input_size if input_size is not None else base_crop
    if resize is None:
        resize = round(crop * base_resize / base_crop)
    loaded.transforms = type(base)(
        crop_size=crop,
        resize_size=resize,
        mean=base.mean,
        std=base.std,
        interpolation=base.interpolation,
        antialias=base.antialias,
    )


# ---------------------------------------------------------------------------------------------
# The pipeline

_END = object()


def predict(
    loaded: LoadedModel,
    inputs: Iterable[Union[Input, str]],
    *,
    top: int = 5,
    batch_size: int = 16,
    threshold: float = 0.0,
    workers: int | None = None,
    device: str = "cpu",
    offline: bool = False,
    timeout: float = 30.0,
    expected_count: int | None = None,
) -> Iterator[Prediction]:
    """Classify each input, yielding one Prediction per input in input order as soon as its batch is done.

    Inputs are decoded and preprocessed by `workers` threads while the model runs on batches of
    up to `batch_size`; a partial batch runs when no input arrives for FLUSH_AFTER seconds. At
    most `batch_size + 2 * workers` inputs are in flight. `device` is where the model runs (it is
    moved there, through the fast path of `resnetcli.fastpath`, which `expected_count`, the number
    of inputs when it is known, helps choose); `offline` and `timeout` apply to image URLs.
    Closing the iterator early stops the workers.
    """
    import torch

    from resnetcli.fastpath import optimize_for_inference

    workers = workers or default_workers()
    crop = getattr(loaded.transforms, "crop_size", None) or [224]
    model = optimize_for_inference(
        loaded.model, device=device, example_shape=(batch_size, 3, crop[0], crop[-1]), images=expected_count
    )
    in_flight: queue.Queue = queue.Queue(maxsize=batch_size + 2 * workers)
    stop = threading.Event()
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="resnet-decode")

    def prepare(source: str) -> torch.Tensor:
        return loaded.transforms(load_image(source, offline=offline, timeout=timeout))

    def offer(entry: object) -> bool:
        while not stop.is_set():
            try:
                in_flight.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def feed() -> None:
        try:
            for item in inputs:
                item = item if isinstance(item, Input) else Input(str(item))
                future = None if item.error is not None else pool.submit(prepare, item.source)
                if not offer((item, future)):
                    return
        except BaseException as error:  # noqa: BLE001 - handed to the consuming thread to raise
            offer(error)
        offer(_END)

    def run(batch: list[tuple[Input, Future | None]]) -> Iterator[Prediction]:
        outcomes: list[Union[torch.Tensor, str]] = []
        for item, future in batch:
            if future is None:
                outcomes.append(str(InputError(item.source, item.error or "")))
                continue
            try:
                outcomes.append(future.result())
            except InputError as error:
                outcomes.append(str(error))
        tensors = [outcome for outcome in outcomes if not isinstance(outcome, str)]
        ranked = iter(top_classes(classify(model, torch.stack(tensors)), loaded.categories, top, threshold) if tensors else [])
        for (item, _), outcome in zip(batch, outcomes):
            if isinstance(outcome, str):
                yield Prediction(item.source, loaded.arch, loaded.weights.name, error=outcome)
            else:
                yield Prediction(item.source, loaded.arch, loaded.weights.name, top=next(ranked))

    feeder = threading.Thread(target=feed, name="resnet-inputs", daemon=True)
    with warnings.catch_warnings():
        # images.load_image refuses oversized images itself; Pillow's warning would only add a
        # second, unformatted line on stderr. Set here, before any thread starts, because the
        # warning filters are process-wide.
        from PIL import Image

        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        feeder.start()
        try:
            batch: list[tuple[Input, Future | None]] = []
            while True:
                try:
                    entry = in_flight.get(timeout=FLUSH_AFTER) if batch else in_flight.get()
                except queue.Empty:
                    entry = None
                if entry is None:
                    yield from run(batch)
                    batch = []
                    continue
                if entry is _END:
                    break
                if isinstance(entry, BaseException):
                    raise entry
                batch.append(entry)
                if len(batch) >= batch_size:
                    yield from run(batch)
                    batch = []
            yield from run(batch)
        finally:
            stop.set()
            pool.shutdown(wait=False, cancel_futures=True)
