"""Scoring a classifier on a labelled image set: top-1/top-5, per-class metrics, confusion matrix, errors.

The images go through `resnetcli.predict.predict` with a `predict.Classifier` made as `resnet predict`
makes it (`inference.torch_classifier`: same decoder, preprocessing, batching and fast path), so
eval's predictions are exactly predict's for the same files. Class folder names are matched to the
model's class names (a 1000-class ImageNet model's category names, a fine-tuned checkpoint's stored
classes).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

from resnetcli.datasets import Sample
from resnetcli.errors import InputError, UsageError, did_you_mean

if TYPE_CHECKING:  # pragma: no cover
    from resnetcli.predict import Classifier

log = logging.getLogger(__name__)

#: How many classes count for top-5 accuracy.
TOP_K = 5


def _normalised(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().casefold())


def match_classes(labels: Sequence[str], categories: Sequence[str], model_name: str) -> dict[str, int]:
    """The model's class index of each data class name: exact match first, then ignoring case and
    treating `_`, `-` and spaces alike (a folder `golden_retriever` is ImageNet's "golden retriever")."""
    exact = {name: index for index, name in enumerate(categories)}
    loose: dict[str, int] = {}
    for index, name in enumerate(categories):
        loose.setdefault(_normalised(name), index)
    matched: dict[str, int] = {}
    for label in sorted(set(labels)):
        index = exact.get(label, loose.get(_normalised(label)))
        if index is None:
            hint = did_you_mean(label, categories)
            shown = ", ".join(categories[:6]) + (", ..." if len(categories) > 6 else "")
            raise UsageError(f"class {label!r} of DATA is not a class of {model_name} ({shown}){hint}")
        matched[label] = index
    return matched


@dataclass(frozen=True)
class InputResult:
    """One scored image: its true class, the predicted one, and whether the true one is in the top 5."""

    input: str
    label: str
    predicted: str
    prob: float
    correct: bool
    in_top5: bool

    def record(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ClassMetrics:
    """Precision, recall, F1 and support (true images) of one class."""

    label: str
    precision: float
    recall: float
    f1: float
    support: int

    def record(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Evaluation:
    """The scores of a model on a data set. `classes` are the data's classes (in the model's index
    order) followed by any other class the model predicted; the confusion matrix is square over them,
    rows the true class, columns the predicted one."""

    arch: str
    weights: str
    classes: tuple[str, ...]
    accuracy: float
    top5: float
    per_class: tuple[ClassMetrics, ...]
    confusion_matrix: tuple[tuple[int, ...], ...]
    results: tuple[InputResult, ...]
    skipped: tuple[str, ...]

    @property
    def errors(self) -> list[InputResult]:
        return [result for result in self.results if not result.correct]

    def record(self) -> dict:
        return {
            "arch": self.arch,
            "weights": self.weights,
            "images": len(self.results),
            "accuracy": self.accuracy,
            "top5": self.top5,
            "classes": list(self.classes),
            "per_class": [metrics.record() for metrics in self.per_class],
            "confusion_matrix": [list(row) for row in self.confusion_matrix],
            "errors": [
                {"input": r.input, "label": r.label, "predicted": r.predicted, "prob": r.prob} for r in self.errors
            ],
            "skipped": list(self.skipped),
        }


def score(
    arch: str, weights: str, results: Sequence[InputResult], order: Sequence[str], skipped: Sequence[str]
) -> Evaluation:
    """Metrics from per-input results; `order` lists every class name in the model's index order."""
    present = {r.label for r in results} | {r.predicted for r in results}
    classes = tuple(name for name in order if name in present)
    position = {name: i for i, name in enumerate(classes)}
    matrix = [[0] * len(classes) for _ in classes]
    for r in results:
        matrix[position[r.label]][position[r.predicted]] += 1
    per_class = []
    for i, name in enumerate(classes):
        true_positive = matrix[i][i]
        support = sum(matrix[i])
        predicted = sum(row[i] for row in matrix)
        precision = true_positive / predicted if predicted else 0.0
        recall = true_positive / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class.append(ClassMetrics(name, precision, recall, f1, support))
    count = len(results)
    return Evaluation(
        arch=arch,
        weights=weights,
        classes=classes,
        accuracy=sum(r.correct for r in results) / count if count else 0.0,
        top5=sum(r.in_top5 for r in results) / count if count else 0.0,
        per_class=tuple(per_class),
        confusion_matrix=tuple(tuple(row) for row in matrix),
        results=tuple(results),
        skipped=tuple(skipped),
    )


def evaluate(
    classifier: Classifier,
    samples: Sequence[Sample],
    *,
    batch_size: int = 16,
    workers: int | None = None,
    strict: bool = False,
    on_error: Callable[[str], None] = lambda message: None,
    on_result: Callable[[InputResult], None] = lambda result: None,
) -> Evaluation:
    """Classify every sample with predict's pipeline and score the predictions against their classes.

    `classifier` comes from `inference.torch_classifier` (or any other runtime's) as for `resnet predict`.

    An unreadable image is reported through `on_error` and left out of the scores (with `strict`,
    it stops the evaluation with InputError).
    """
    from resnetcli.inputs import Input
    from resnetcli.predict import predict

    if not samples:
        raise UsageError("no images to evaluate")
    categories = classifier.categories
    indices = match_classes([s.label for s in samples], categories, f"{classifier.arch} ({classifier.weights})")
    by_path = {s.path: s for s in samples}
    results: list[InputResult] = []
    skipped: list[str] = []
    predictions = predict(
        classifier,
        (Input(s.path) for s in samples),
        top=min(TOP_K, len(categories)),
        batch_size=batch_size,
        workers=workers,
        offline=True,
    )
    try:
        for prediction in predictions:
            if prediction.error is not None:
                if strict:
                    raise InputError(prediction.input, prediction.error.partition(": ")[2] or prediction.error)
                on_error(prediction.error)
                skipped.append(prediction.input)
                continue
            sample = by_path[prediction.input]
            true_index = indices[sample.label]
            best = prediction.top[0]
            result = InputResult(
                input=prediction.input,
                label=categories[true_index],
                predicted=best.label,
                prob=best.prob,
                correct=best.index == true_index,
                in_top5=any(s.index == true_index for s in prediction.top[:TOP_K]),
            )
            results.append(result)
            on_result(result)
    finally:
        predictions.close()
    return score(classifier.arch, classifier.weights, results, categories, skipped)


def plot_confusion(evaluation: Evaluation, path: Path) -> None:
    """Draw the confusion matrix as a PNG (written to a temporary file, then renamed into place).

    matplotlib is an optional extra (`pip install 'resnetcli[plot]'`); UsageError when it is missing.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'resnetcli[plot]'") from None
    classes = evaluation.classes
    size = max(4.0, 0.5 * len(classes) + 2)
    figure = Figure(figsize=(size, size), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(evaluation.confusion_matrix, cmap="Blues")
    figure.colorbar(image, ax=axes, shrink=0.8)
    axes.set_xticks(range(len(classes)), labels=classes, rotation=45, ha="right")
    axes.set_yticks(range(len(classes)), labels=classes)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(f"{evaluation.arch}: top-1 {evaluation.accuracy:.1%}")
    peak = max((max(row) for row in evaluation.confusion_matrix), default=0)
    for i, row in enumerate(evaluation.confusion_matrix):
        for j, count in enumerate(row):
            if count:
                axes.text(j, i, str(count), ha="center", va="center", color="white" if count > peak / 2 else "black")
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        figure.savefig(temporary, format="png")
        os.replace(temporary, path)
    except OSError as error:
        raise UsageError(f"--plot {path}: cannot write: {error.strerror or error}") from None
    finally:
        if temporary.exists():
            temporary.unlink()
