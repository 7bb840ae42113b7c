"""Top-k classification of images: plain data in, plain data out."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Iterable, Iterator

from resnetcli.errors import InputError
from resnetcli.images import load_image

if TYPE_CHECKING:  # pragma: no cover
    from resnetcli.registry import LoadedModel


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


def classify(loaded: LoadedModel, batch) -> "torch.Tensor":
    """Class probabilities for a preprocessed (N, 3, H, W) batch."""
    import torch

    with torch.inference_mode():
        logits = loaded.model(batch)
        return torch.softmax(logits.float(), dim=1)


def predict(
    loaded: LoadedModel,
    sources: Iterable[str],
    *,
    top: int = 5,
    batch_size: int = 16,
    threshold: float = 0.0,
) -> Iterator[Prediction]:
    """Classify each source in order, yielding one Prediction per source as soon as its batch is done."""
    import torch

    pending: list[tuple[str, object]] = []

    def flush() -> Iterator[Prediction]:
        good = [(source, tensor) for source, tensor in pending if not isinstance(tensor, InputError)]
        scores: dict[int, list[ClassScore]] = {}
        if good:
            probabilities = classify(loaded, torch.stack([tensor for _, tensor in good]))
            ranked = top_classes(probabilities, loaded.categories, top, threshold)
            good_ids = [id(tensor) for _, tensor in good]
            scores = dict(zip(good_ids, ranked))
        for source, tensor in pending:
            if isinstance(tensor, InputError):
                yield Prediction(source, loaded.arch, loaded.weights.name, error=str(tensor))
            else:
                yield Prediction(source, loaded.arch, loaded.weights.name, top=scores[id(tensor)])
        pending.clear()

    for source in sources:
        try:
            pending.append((source, loaded.transforms(load_image(source))))
        except InputError as error:
            pending.append((source, error))
        if len(pending) >= batch_size:
            yield from flush()
    yield from flush()
