"""Transfer learning: a torchvision backbone, a new head for the user's classes, a few epochs of training.

With the backbone frozen (`--train head`, no augmentation) the backbone's output for each image
never changes, so it is computed once (the input of the head, captured by a hook) and the head is
trained on those cached features: each epoch then costs a few matrix products instead of a forward
pass through the network per image (bench/bench_finetune.py measures the speed-up). Otherwise each
epoch decodes and forwards every image.

Every random choice is drawn from generators seeded by (`seed`, epoch): the same seed on the same
machine gives the same weights, and a run resumed from its checkpoint ends exactly where the
uninterrupted run would have. The checkpoint (format "resnetcli.finetune/1", see TEAM.md) is
written after every epoch to a temporary file that is then renamed over OUT.pth.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from resnetcli import __version__, registry
from resnetcli.datasets import Sample, Split
from resnetcli.errors import CheckpointError, InputError, UsageError
from resnetcli.heads import Head, TrainMode, find_head, replace_head, set_trainable, trainable_names
from resnetcli.images import load_image

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

FORMAT = "resnetcli.finetune/1"


@dataclass(frozen=True)
class FinetuneConfig:
    """The choices of one `resnet finetune` run."""

    arch: str
    weights: str = registry.DEFAULT_WEIGHTS
    train: TrainMode = TrainMode.head
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 32
    workers: int = 2
    device: str = "cpu"
    seed: int = 0
    augment: bool = False
    strict: bool = False


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


# ---------------------------------------------------------------------------------------------
# Checkpoint format


def preprocessing_record(transforms) -> dict:
    """The checkpoint's "preprocessing" entry, read from the weights' transforms object."""
    interpolation = getattr(transforms, "interpolation", None)
    return {
        "resize_size": int(transforms.resize_size[0]),
        "crop_size": int(transforms.crop_size[0]),
        "mean": [float(v) for v in transforms.mean],
        "std": [float(v) for v in transforms.std],
        "interpolation": getattr(interpolation, "value", str(interpolation)),
    }


def transforms_from(record: dict):
    """torchvision's ImageClassification preprocessing from a checkpoint's "preprocessing" entry."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms._presets import ImageClassification

    return ImageClassification(
        crop_size=record["crop_size"],
        resize_size=record["resize_size"],
        mean=tuple(record["mean"]),
        std=tuple(record["std"]),
        interpolation=InterpolationMode(record["interpolation"]),
    )


def base_weights_name(choice: registry.WeightsChoice) -> str:
    """"ResNet18_Weights.IMAGENET1K_V1", "none", a checkpoint file's sha256, or a URL."""
    if choice.pretrained is not None:
        return f"{type(choice.pretrained).__name__}.{choice.pretrained.name}"
    if choice.path is not None:
        digest = hashlib.sha256()
        with open(choice.path, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    return choice.url or registry.NO_WEIGHTS


@contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) back until the block is done, then raise KeyboardInterrupt.

    An interrupt inside torch.save can surface as another error raised while its zip writer
    unwinds; deferring it keeps the save whole and the exit code 130. Only the main thread can
    handle signals: elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        log.debug("Ctrl-C held back until the checkpoint was written")
        raise KeyboardInterrupt


def save_checkpoint(path: Path, payload: dict) -> None:
    """torch.save to a temporary file next to `path`, flushed to disk, then renamed over it: a reader
    (or an interrupted run) only ever sees the previous complete file or the new complete one."""
    import torch

    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "wb") as stream:
            with deferred_interrupt():
                torch.save(payload, stream)
                stream.flush()
                os.fsync(stream.fileno())
                os.replace(temporary, path)
    except OSError as error:
        raise UsageError(f"{path}: cannot write the checkpoint: {error.strerror or error}") from None
    finally:
        if temporary.exists():
            temporary.unlink()


def read_checkpoint(path: Path) -> dict:
    """A fine-tuned checkpoint's dict, loaded with weights_only=True; CheckpointError if it is not one."""
    import pickle

    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable fine-tuned checkpoint ({str(error).splitlines()[0]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint written by `resnet finetune`")
    return payload


def is_finetuned_checkpoint(path: Path) -> bool:
    """Whether a file is a fine-tuned checkpoint (memory-mapped: cheap however large the file)."""
    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - anything unreadable is simply not one
        log.debug("%s is not a fine-tuned checkpoint", path, exc_info=True)
        return False
    return isinstance(payload, dict) and payload.get("format") == FORMAT


# TEMPORARY (finetune branch): the lead replaces this with the factory's fine-tuned checkpoint
# reader at merge time; until then eval (and tests) load OUT.pth through it.
def load_finetuned(path: Path, payload: dict | None = None) -> registry.LoadedModel:
    """Build the model of a fine-tuned checkpoint: its architecture, head, classes and preprocessing."""
    payload = payload if payload is not None else read_checkpoint(path)
    arch = registry.resolve_architecture(payload["arch"])
    choice = registry.WeightsChoice(arch, "checkpoint", path=Path(path))
    loaded = registry.build_model(choice, state_dict=payload["state_dict"], labels=list(payload["classes"]))
    loaded.transforms = transforms_from(payload["preprocessing"])
    return loaded


# ---------------------------------------------------------------------------------------------
# Reading images


class ImageReader:
    """Decodes samples with predict's decoder; a bad image is reported once (`on_skip`) and skipped,
    or stops the run with `strict`."""

    def __init__(self, transforms, workers: int, strict: bool, on_skip: Callable[[str], None]) -> None:
        self.transforms = transforms
        self.strict = strict
        self.on_skip = on_skip
        self.skipped: dict[str, str] = {}
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="resnet-finetune")

    def _load(self, sample: Sample, augment):
        if sample.path in self.skipped:
            return None
        try:
            image = load_image(sample.path, offline=True)
            return image if augment else self.transforms(image)
        except InputError as error:
            return error

    def batches(self, samples: Sequence[Sample], batch_size: int, augment=None):
        """(tensor batch, samples kept) for consecutive slices of `samples`; decoding runs ahead in the pool."""
        import torch

        for start in range(0, len(samples), batch_size):
            chunk = samples[start:start + batch_size]
            outcomes = list(self.pool.map(lambda s: self._load(s, augment), chunk))
            kept, tensors = [], []
            for sample, outcome in zip(chunk, outcomes):
                if isinstance(outcome, InputError):
                    if self.strict:
                        raise outcome
                    self.skipped[sample.path] = str(outcome)
                    self.on_skip(str(outcome))
                elif outcome is not None:
                    kept.append(sample)
                    tensors.append(augment(outcome) if augment is not None else outcome)
            if tensors:
                yield torch.stack(tensors), kept

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def augmentation(transforms):
    """Light augmentation for `--augment`: a random crop of 60-100% of the image and a horizontal flip,
    then the weights' own normalisation; drawn from torch's generator, seeded per epoch."""
    from torchvision import transforms as T

    crop = transforms.crop_size[0]
    return T.Compose(
        [
            T.RandomResizedCrop(crop, scale=(0.6, 1.0), interpolation=transforms.interpolation, antialias=True),
            T.RandomHorizontalFlip(),
            T.PILToTensor(),
            T.ConvertImageDtype(__import__("torch").float32),
            T.Normalize(transforms.mean, transforms.std),
        ]
    )


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
            self.config = config = FinetuneConfig(**{**asdict(config), "arch": payload["arch"], "train": TrainMode(
                payload["train"]), "seed": int(payload["seed"])})
            loaded = load_finetuned(resume, payload)
            self.base_weights = payload["base_weights"]
            self.history = [EpochResult(**epoch) for epoch in payload["metrics"]["epochs"]]
            self.elapsed = float(payload["metrics"]["seconds"])
            self.head = find_head(loaded.model, len(self.classes))
        else:
            torch.manual_seed(config.seed)
            loaded = registry.load_model(config.arch, config.weights, settings=settings, on_progress=on_progress)
            self.base_weights = base_weights_name(loaded.weights)
            self.head = replace_head(loaded.model, len(loaded.categories), len(self.classes), seed=config.seed)
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

    def run(self, on_epoch: Callable[[EpochResult], None], on_phase: Callable[[str, int], Callable[[int], None]]) -> FinetuneResult:
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
            parameters = self.standardised[2:] if self.standardised else [p for p in self.model.parameters() if p.requires_grad]
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
            index = order[start:start + self.config.batch_size]
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
