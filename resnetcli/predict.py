"""Top-k classification of images: plain data in, plain data out, whatever runs the model.

The pipeline: a feeder thread walks the (lazy) inputs and hands each to a few decoder threads
(Pillow decoding and preprocessing release the GIL); the caller's thread takes the results in
input order, runs the classifier on batches and yields one Prediction per input.

The model side is a `Classifier`, settled before the pipeline starts: a `preprocess` step (an RGB
`PIL.Image` to one array) and a `classify` step (a list of those to a (batch, classes) array of
probabilities). `resnetcli.inference.torch_classifier` makes one from a torchvision model; any
other runtime (ONNX Runtime, a remote service) plugs in the same way. Nothing here imports torch.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence, Union

from resnetcli.errors import InputError
from resnetcli.fastpath import usable_cpu_count
from resnetcli.images import ImageRefused, load_image
from resnetcli.inputs import Input
from resnetcli.urls import is_url, redact_url

log = logging.getLogger(__name__)

#: A partial batch is run when no further input has arrived for this long (seconds), so records
#: keep streaming when inputs trickle in (a slow `find | resnet predict -`).
FLUSH_AFTER = 0.1
#: How often (seconds) a thread waiting for room or for input checks whether the pipeline was closed.
POLL = 0.1
#: The error of an input whose scores are not finite numbers (NaN or infinite weights, an overflow).
NON_FINITE = "the model produced non-finite scores"


@dataclass(frozen=True)
class ClassScore:
    """One ranked class of a prediction."""

    rank: int
    index: int
    label: str
    prob: float


@dataclass(frozen=True)
class Prediction:
    """The outcome for one input: its top classes, or the error that stopped it."""

    input: str
    arch: str
    weights: str
    top: tuple[ClassScore, ...] = ()
    error: str | None = None

    def record(self) -> dict:
        """The JSON record: `{input, arch, weights, top}` or `{input, error}` for a failed input."""
        if self.error is not None:
            return {"input": self.input, "error": self.error}
        top = [{"rank": s.rank, "index": s.index, "label": s.label, "prob": s.prob} for s in self.top]
        return {"input": self.input, "arch": self.arch, "weights": self.weights, "top": top}


@dataclass(frozen=True)
class Classifier:
    """The model side of the pipeline, settled before it starts and never changed by it.

    `preprocess(image)` turns an RGB `PIL.Image` into one model input (it runs in the decoder
    threads; it may raise `images.ImageRefused`); `classify(inputs)` turns a list of those into a
    (len(inputs), len(categories)) array-like of probabilities (it runs in the caller's thread);
    `rank`, if given, is the runtime's top-k over that array (see `top_classes`).
    """

    arch: str
    weights: str
    categories: tuple[str, ...]
    preprocess: Callable[[Any], Any]
    classify: Callable[[Sequence[Any]], Any]
    rank: Callable[[Any, int], tuple[Any, Any]] | None = None
    details: dict = field(default_factory=dict)


def top_classes(
    probabilities,
    categories: Sequence[str],
    k: int,
    threshold: float = 0.0,
    rank: Callable[[Any, int], tuple[Any, Any]] | None = None,
) -> list[tuple[ClassScore, ...] | None]:
    """The k most probable classes of each row of a (batch, classes) probability array (numpy, or
    anything `numpy.asarray` takes); None for a row holding a NaN or an infinity.

    `rank(probabilities, k)` gives the (values, indices) of each row's k largest, largest first;
    by default numpy's stable sort (ties in index order). A runtime passes its own top-k so that
    ties (exact zeros far down a saturated softmax) come out in the order its users expect.
    """
    import numpy as np

    rows = np.asarray(probabilities)
    k = min(k, rows.shape[1])
    finite = np.isfinite(rows).all(axis=1)
    if rank is not None:
        values, indices = rank(probabilities, k)
    else:
        indices = np.argsort(-rows, axis=1, kind="stable")[:, :k]
        values = np.take_along_axis(rows, indices, axis=1)
    ranked: list[tuple[ClassScore, ...] | None] = []
    for ok, row_values, row_indices in zip(finite, np.asarray(values).tolist(), np.asarray(indices).tolist()):
        ranked.append(
            tuple(
                ClassScore(position, index, categories[index], round(prob, 6))
                for position, (prob, index) in enumerate(zip(row_values, row_indices), start=1)
                if prob >= threshold
            )
            if ok
            else None
        )
    return ranked


def batch_predictions(
    classifier: Classifier, names: Sequence[str], outcomes: Sequence[Any], *, top: int = 5, threshold: float = 0.0
) -> list[Prediction]:
    """One Prediction per input of a batch, in order. `outcomes` holds each input's preprocessed image,
    or the message (a str) of the error that stopped it; the images are classified together. Also
    used by `resnetcli.ray.Classifier`, so that both engines make the same records."""
    images = [o for o in outcomes if not isinstance(o, str)]
    ranked = iter(
        top_classes(classifier.classify(images), classifier.categories, top, threshold, classifier.rank)
        if images
        else []
    )
    predictions = []
    for name, result in zip(names, outcomes):
        if not isinstance(result, str):
            scores = next(ranked)
            result = scores if scores is not None else str(InputError(name, NON_FINITE))
        if isinstance(result, str):
            predictions.append(Prediction(name, classifier.arch, classifier.weights, error=result))
        else:
            predictions.append(Prediction(name, classifier.arch, classifier.weights, top=result))
    return predictions


def default_workers() -> int:
    """Decoder threads when `--workers` is not given: one per CPU this process may run on, at most 8.

    The CPUs are counted as for torch's threads (`fastpath.usable_cpu_count`: the affinity mask and
    the cgroup CPU quota), so a job confined to a share of the machine does not oversubscribe it.
    """
    return max(1, min(8, usable_cpu_count()))


def shown(source: str) -> str:
    """An input as records and messages show it: a URL without its user name and password."""
    return redact_url(source) if is_url(source) else source


# ---------------------------------------------------------------------------------------------
# The pipeline


class _Decoders:
    """A few daemon threads running submitted calls. Daemon threads, unlike ThreadPoolExecutor's,
    are not joined when the interpreter exits: one blocked on a slow disk or server cannot hold
    the process after Ctrl-C."""

    def __init__(self, count: int) -> None:
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.threads = [
            threading.Thread(target=self._work, name=f"resnet-decode-{i}", daemon=True) for i in range(count)
        ]
        for thread in self.threads:
            thread.start()

    def submit(self, function: Callable, *args: Any) -> Future:
        future: Future = Future()
        self._tasks.put((future, function, args))
        return future

    def _work(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None:
                return
            future, function, args = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(function(*args))
            except BaseException as error:
                future.set_exception(error)

    def shutdown(self, wait: float) -> None:
        """Cancel what has not started, stop every thread once its current call returns, and wait
        up to `wait` seconds in all for them."""
        while True:
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                break
            if task is not None:
                task[0].cancel()
        for _ in self.threads:
            self._tasks.put(None)
        _join_all(self.threads, wait)


def _join_all(threads: Sequence[threading.Thread], wait: float) -> None:
    import time

    deadline = time.monotonic() + wait
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))


_END = object()


def predict(
    classifier: Classifier,
    inputs: Iterable[Union[Input, str]],
    *,
    top: int = 5,
    batch_size: int = 16,
    threshold: float = 0.0,
    workers: int | None = None,
    offline: bool = False,
    timeout: float = 30.0,
    cancel: threading.Event | None = None,
) -> Iterator[Prediction]:
    """Classify each input, yielding one Prediction per input in input order as soon as its batch is done.

    Inputs are decoded and preprocessed by `workers` threads while the classifier runs on batches
    of up to `batch_size`; a partial batch runs when no input arrives for FLUSH_AFTER seconds. At
    most `batch_size + 2 * workers` inputs are in flight (submitted for decoding and not yet
    yielded). `offline` and `timeout` apply to image URLs.

    Closing the iterator early (or `cancel` being set) stops the feeder and the decoder threads;
    give the same `cancel` event to `inputs.expand_inputs` so that a feeder blocked reading stdin
    or walking a folder stops too.
    """
    workers = workers or default_workers()
    log.debug("%d decoder thread(s)", workers)
    cancel = cancel if cancel is not None else threading.Event()
    slots = threading.Semaphore(batch_size + 2 * workers)
    ready: queue.SimpleQueue = queue.SimpleQueue()
    decoders = _Decoders(workers)

    def prepare(source: str) -> Any:
        image = load_image(source, offline=offline, timeout=timeout)
        try:
            return classifier.preprocess(image)
        except ImageRefused as refused:
            raise InputError(shown(source), str(refused)) from None

    def take_slot() -> bool:
        while not cancel.is_set():
            if slots.acquire(timeout=POLL):
                return True
        return False

    def feed() -> None:
        try:
            for item in inputs:
                item = item if isinstance(item, Input) else Input(str(item))
                if not take_slot():
                    return
                ready.put((item, None if item.error is not None else decoders.submit(prepare, item.source)))
                if cancel.is_set():
                    return
        except BaseException as error:
            ready.put(error)
        ready.put(_END)

    def outcome(item: Input, future: Future | None) -> Any:
        if future is None:
            return str(InputError(shown(item.source), item.error or ""))
        try:
            return future.result()
        except InputError as error:
            return str(error)

    def run(batch: list[tuple[Input, Future | None]]) -> Iterator[Prediction]:
        names = [shown(item.source) for item, _ in batch]
        outcomes = [outcome(item, future) for item, future in batch]
        for prediction in batch_predictions(classifier, names, outcomes, top=top, threshold=threshold):
            yield prediction
            slots.release()

    feeder = threading.Thread(target=feed, name="resnet-inputs", daemon=True)
    feeder.start()
    try:
        batch: list[tuple[Input, Future | None]] = []
        while True:
            try:
                # Waiting in short steps keeps the wait interruptible (Ctrl-C) whatever the platform.
                entry = ready.get(timeout=FLUSH_AFTER if batch else 5 * POLL)
            except queue.Empty:
                if batch:
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
        cancel.set()
        decoders.shutdown(wait=1.0)
        _join_all([feeder], 1.0)
        if feeder.is_alive():
            log.debug("the input feeder is still blocked after the pipeline closed; it stops at its next poll")
