"""Transfer learning: a torchvision backbone, a new head for the user's classes, a few epochs of training.

With the backbone frozen (`--train head`, no augmentation) the backbone's output for each image
never changes, so it is computed once (the input of the head, captured by a hook) and the head is
trained on those cached features: each epoch then costs a few matrix products instead of a forward
pass through the network per image (bench/bench_finetune.py measures the speed-up). Otherwise each
epoch decodes and forwards every image.

Every random choice is drawn from generators seeded by (`seed`, epoch): the same seed on the same
machine gives the same weights, and a run resumed from its checkpoint ends exactly where the
uninterrupted run would have. The checkpoint (format "resnetcli.finetune/1", see docs/finetune.md) is
written after every epoch to a temporary file that is then renamed over OUT.pth.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

from resnetcli import __version__, factory
from resnetcli.datasets import ImageReader, Sample, Split, augmentation
from resnetcli.errors import UsageError
from resnetcli.finetuned import FORMAT, base_weights_name, preprocessing_record, read_checkpoint, save_checkpoint
from resnetcli.foreign import is_spec
from resnetcli.heads import TrainMode, find_head, replace_head, set_trainable, trainable_names
from resnetcli.inference import choose_transforms

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneConfig:
    """The choices of one `resnet finetune` run. `arch` None: the --weights checkpoint's own architecture
    (a fine-tuned or torchvision-reference checkpoint), else factory.DEFAULT_ARCH. `input_size` trains (and
    records for predict and eval) another centre-crop size than the weights' (`inference.choose_transforms`)."""

    arch: str | None
    weights: str = factory.DEFAULT_WEIGHTS
    train: TrainMode = TrainMode.head
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 32
    workers: int = 2
    device: str = "cpu"
    seed: int = 0
    augment: bool = False
    strict: bool = False
    input_size: int | None = None
    trust_checkpoint: bool = False


@dataclass(frozen=True)
class EpochResult:
    """One finished epoch: mean training loss, validation top-1 (None without a validation set), time."""

    epoch: int
    train_loss: float
    val_accuracy: float | None
    seconds: float

    def record(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class FinetuneResult:
    """A whole run: what was trained, every epoch, the best one, and the images skipped."""

    output: str
    arch: str
    classes: tuple[str, ...]
    base_weights: str
    train: str
    cached_features: bool
    epochs: tuple[EpochResult, ...]
    best_epoch: int
    best_val_accuracy: float | None
    seconds: float
    train_images: int
    val_images: int
    skipped: tuple[str, ...] = field(default_factory=tuple)

    def record(self) -> dict:
        record = asdict(self)
        record["classes"] = list(self.classes)
        record["skipped"] = list(self.skipped)
        record["epochs"] = [epoch.record() for epoch in self.epochs]
        return record


def best_epoch(epochs: Sequence[EpochResult]) -> EpochResult:
    """The epoch with the highest val top-1 (the lowest training loss without a validation set); first wins ties."""
    if all(epoch.val_accuracy is not None for epoch in epochs):
        return max(epochs, key=lambda e: (e.val_accuracy, -e.epoch))
    return min(epochs, key=lambda e: (e.train_loss, e.epoch))


def check_input_size(arch: str, size: int, model=None) -> None:
    """UsageError unless `arch` takes `size`-pixel inputs (a forward pass on the meta device: no memory, no
    time); ViT's position embeddings, for one, fix its size. A model spec (timm, a user's module) is
    checked on its loaded `model` with one small real batch instead."""
    import torch

    device = "meta" if model is None else next(model.parameters()).device
    model = factory.meta_model(arch) if model is None else model
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size, device=device))
    except (RuntimeError, ValueError, AssertionError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise UsageError(f"--input-size {size}: {arch} cannot take {size}-pixel images ({first[:160]})") from None


def _logits(output):
    return output[0] if isinstance(output, tuple) else output


# ---------------------------------------------------------------------------------------------
# Training


class Trainer:
    """One run: the model with its new head, the data, the optimiser and the per-epoch checkpoint."""

    def __init__(
        self,
        config: FinetuneConfig,
        split: Split,
        output: Path,
        *,
        resume: Path | None = None,
        settings=None,
        on_progress=None,
        on_skip: Callable[[str], None] = lambda message: None,
    ) -> None:
        import torch

        self.config, self.split, self.output = config, split, output
        self.classes = tuple(split.classes)
        self.history: list[EpochResult] = []
        self.elapsed = 0.0
        payload = read_checkpoint(resume) if resume is not None else None
        if payload is not None:
            if tuple(payload["classes"]) != self.classes:
                raise UsageError(f"--resume {resume}: trained on {payload['classes']}, DATA has {list(self.classes)}")
            self.config = config = FinetuneConfig(
                **{
                    **asdict(config),
                    "arch": payload["arch"],
                    "train": TrainMode(payload["train"]),
                    "seed": int(payload["seed"]),
                }
            )
            loaded = factory.load_model(None, str(resume))
            self.base_weights = payload["base_weights"]
            self.history = [EpochResult(**epoch) for epoch in payload["metrics"]["epochs"]]
            self.elapsed = float(payload["metrics"]["seconds"])
            self.head = find_head(loaded.model, len(self.classes))
        else:
            if config.input_size is not None and config.arch is not None and not is_spec(config.arch):
                check_input_size(factory.resolve_architecture(config.arch), config.input_size)  # before any load
            torch.manual_seed(config.seed)
            loaded = factory.load_model(
                config.arch,
                config.weights,
                settings=settings,
                on_progress=on_progress,
                trust_checkpoint=config.trust_checkpoint,
            )
            self.base_weights = base_weights_name(loaded.weights)
            self.head = replace_head(loaded.model, len(loaded.categories), len(self.classes), seed=config.seed)
            if config.input_size is not None:
                check_input_size(loaded.arch, config.input_size, loaded.model if is_spec(loaded.arch) else None)
                loaded.transforms = choose_transforms(loaded, input_size=config.input_size)
        self.arch = loaded.arch
        self.transforms = loaded.transforms
        self.model = loaded.model.to(config.device)
        self.trainable = trainable_names(self.model, self.head.name, config.train)
        set_trainable(self.model, self.trainable)
        self.optimizer_state = payload.get("optimizer") if payload is not None else None
        self.optimizer = None
        self.standardised = None
        self.reader = ImageReader(self.transforms, config.workers, config.strict, on_skip)
        self.cached = config.train is TrainMode.head and not config.augment

    @property
    def head_module(self):
        return self.model.get_submodule(self.head.name)

    def _generator(self, epoch: int):
        import torch

        return torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)

    # -- cached features -------------------------------------------------------------------------

    def _features(self, samples: Sequence[Sample], on_step) -> tuple[Any, Any]:
        """The head's input for every readable sample, and their class indices."""
        import torch

        captured: dict[str, torch.Tensor] = {}
        head = self.head_module
        hooks = [
            head.register_forward_pre_hook(lambda module, args: captured.__setitem__("x", args[0].detach())),
            head.register_forward_hook(lambda module, args, output: captured.__setitem__("y", output.detach())),
        ]
        features, labels, done = [], [], 0
        try:
            with torch.no_grad():
                for batch, kept in self.reader.batches(samples, self.config.batch_size):
                    output = _logits(self.model(batch.to(self.config.device)))
                    if captured["y"].shape != output.shape or not torch.equal(captured["y"], output):
                        return None, None  # something runs after the head (SqueezeNet's pooling)
                    features.append(captured["x"])
                    labels.extend(self.split.index(sample.label) for sample in kept)
                    done += len(kept)
                    on_step(done)
        finally:
            for hook in hooks:
                hook.remove()
        if not features:
            return torch.empty(0), torch.empty(0, dtype=torch.long)
        return torch.cat(features), torch.tensor(labels, dtype=torch.long)

    # -- the loop --------------------------------------------------------------------------------

    def run(
        self, on_epoch: Callable[[EpochResult], None], on_phase: Callable[[str, int], Callable[[int], None]]
    ) -> FinetuneResult:
        """Train the remaining epochs, checkpointing after each; returns the whole run."""
        import torch

        config = self.config
        train, val = list(self.split.train), list(self.split.val)
        cache = None
        started = time.monotonic()
        try:
            if self.cached:
                train_x, train_y = self._features(train, on_phase("features (train)", len(train)))
                if train_x is None:
                    log.debug("%s: the head is not the last layer; training with full forward passes", self.arch)
                    self.cached = False
                else:
                    val_x, val_y = self._features(val, on_phase("features (val)", len(val)))
                    cache = (self._standardise(train_x), train_y, val_x, val_y)
            parameters = (
                self.standardised[2:] if self.standardised else [p for p in self.model.parameters() if p.requires_grad]
            )
            self.optimizer = torch.optim.Adam(parameters, lr=config.lr)
            if self.optimizer_state is not None:
                self.optimizer.load_state_dict(self.optimizer_state)
            if cache is not None and len(cache[0]) == 0 or not train:
                raise UsageError("no readable training images")
            for epoch in range(len(self.history) + 1, config.epochs + 1):
                epoch_started = time.monotonic()
                torch.manual_seed(config.seed * 1_000_003 + epoch)
                step = on_phase(f"epoch {epoch}/{config.epochs}", len(train))
                if cache is not None:
                    loss = self._epoch_cached(cache[0], cache[1], self._generator(epoch), step)
                    accuracy = self._accuracy_cached(cache[2], cache[3])
                else:
                    loss = self._epoch_full(train, self._generator(epoch), step)
                    accuracy = self._accuracy_full(val)
                self.history.append(EpochResult(epoch, loss, accuracy, round(time.monotonic() - epoch_started, 3)))
                self._save(self.elapsed + time.monotonic() - started)
                on_epoch(self.history[-1])
        finally:
            self.reader.close()
        self.elapsed += time.monotonic() - started
        return self.result()

    def _standardise(self, features):
        """Train a Linear head on standardised features: its weight and bias are re-expressed for
        inputs (x - mean) / std and folded back after every epoch. The same model, but Adam's steps no
        longer depend on the backbone's feature scale (a random-init ResNet's features share one large
        offset: without this, training on them stalls near chance)."""
        import torch

        head = self.head_module
        if not isinstance(head, torch.nn.Linear) or head.bias is None or len(features) < 2:
            log.debug("head trained on raw cached features")
            return features
        mean, std = features.mean(0), features.std(0).clamp_min(1e-6)
        with torch.no_grad():
            weight = (head.weight * std).clone().requires_grad_(True)
            bias = (head.bias + head.weight @ mean).clone().requires_grad_(True)
        self.standardised = (mean, std, weight, bias)
        return (features - mean) / std

    def _fold(self) -> None:
        import torch

        mean, std, weight, bias = self.standardised
        head = self.head_module
        with torch.no_grad():
            head.weight.copy_(weight / std)
            head.bias.copy_(bias - (weight / std) @ mean)

    def _epoch_cached(self, features, labels, generator, step) -> float:
        import torch

        if self.standardised:
            mean, std, weight, bias = self.standardised
            module = self.head_module
            with torch.no_grad():
                # Re-derived from the head at every epoch, so that a resumed run (which only has the
                # head) continues bit for bit as the uninterrupted one.
                weight.copy_(module.weight * std)
                bias.copy_(module.bias + module.weight @ mean)
            head = lambda x: torch.nn.functional.linear(x, weight, bias)  # noqa: E731
        else:
            head = self.head_module
        order = torch.randperm(len(features), generator=generator)
        total = 0.0
        for start in range(0, len(order), self.config.batch_size):
            index = order[start : start + self.config.batch_size]
            loss = torch.nn.functional.cross_entropy(head(features[index]), labels[index].to(features.device))
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            total += float(loss.detach()) * len(index)
            step(start + len(index))
        if self.standardised:
            self._fold()
        return total / len(order)

    def _accuracy_cached(self, features, labels) -> float | None:
        import torch

        if len(features) == 0:
            return None
        with torch.no_grad():
            predicted = self.head_module(features).argmax(1).cpu()
        return float((predicted == labels).float().mean())

    def _epoch_full(self, samples: list[Sample], generator, step) -> float:
        import torch

        order = torch.randperm(len(samples), generator=generator).tolist()
        shuffled = [samples[i] for i in order]
        augment = augmentation(self.transforms) if self.config.augment else None
        total, count = 0.0, 0
        for batch, kept in self.reader.batches(shuffled, self.config.batch_size, augment):
            labels = torch.tensor([self.split.index(s.label) for s in kept], device=self.config.device)
            loss = torch.nn.functional.cross_entropy(_logits(self.model(batch.to(self.config.device))), labels)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()
            total += float(loss.detach()) * len(kept)
            count += len(kept)
            step(count)
        if count == 0:
            raise UsageError("no readable training images")
        return total / count

    def _accuracy_full(self, samples: list[Sample]) -> float | None:
        import torch

        correct = count = 0
        self.model.eval()
        try:
            with torch.no_grad():
                for batch, kept in self.reader.batches(samples, self.config.batch_size):
                    predicted = _logits(self.model(batch.to(self.config.device))).argmax(1).cpu().tolist()
                    correct += sum(p == self.split.index(s.label) for p, s in zip(predicted, kept))
                    count += len(kept)
        finally:
            set_trainable(self.model, self.trainable)
        return correct / count if count else None

    # -- output ----------------------------------------------------------------------------------

    def metrics(self, seconds: float) -> dict:
        best = best_epoch(self.history)
        return {
            "epochs": [epoch.record() for epoch in self.history],
            "best_epoch": best.epoch,
            "val_accuracy": best.val_accuracy,
            "train_loss": self.history[-1].train_loss,
            "seconds": round(seconds, 3),
        }

    def _save(self, seconds: float) -> None:
        state_dict = {name: tensor.detach().cpu().clone() for name, tensor in self.model.state_dict().items()}
        save_checkpoint(
            self.output,
            {
                "format": FORMAT,
                "state_dict": state_dict,
                "arch": self.arch,
                "classes": list(self.classes),
                "preprocessing": preprocessing_record(self.transforms),
                "base_weights": self.base_weights,
                "metrics": self.metrics(seconds),
                "resnetcli_version": __version__,
                "optimizer": self.optimizer.state_dict(),
                "epoch": self.history[-1].epoch,
                "train": self.config.train.value,
                "seed": self.config.seed,
            },
        )

    def result(self) -> FinetuneResult:
        if not self.history:
            raise UsageError(f"nothing to do: the checkpoint has {self.config.epochs} epochs already")
        best = best_epoch(self.history)
        return FinetuneResult(
            output=str(self.output),
            arch=self.arch,
            classes=self.classes,
            base_weights=self.base_weights,
            train=self.config.train.value,
            cached_features=self.cached,
            epochs=tuple(self.history),
            best_epoch=best.epoch,
            best_val_accuracy=best.val_accuracy,
            seconds=round(self.elapsed, 3),
            train_images=len(self.split.train) - sum(s.path in self.reader.skipped for s in self.split.train),
            val_images=len(self.split.val) - sum(s.path in self.reader.skipped for s in self.split.val),
            skipped=tuple(self.reader.skipped),
        )
