"""Labelled image sets for `resnet finetune` and `resnet eval`: folders and lists in, plain data out.

A DATA argument is one of
- a folder in torchvision's ImageFolder layout (one sub-folder per class), optionally split into
  `train/` and `val/` sub-folders, each in that layout;
- a CSV file (`path,label` rows, an optional header) or a JSONL file (`{"path": ..., "label": ...}`
  per line); relative paths are relative to the list's folder.

Listing is torch-free; `ImageReader` decodes with predict's decoder (`resnetcli.images.load_image`)
and preprocesses (torch imported when it runs). The order is deterministic: classes sorted by name,
files sorted by path.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from resnetcli.errors import InputError, UsageError
from resnetcli.images import is_image_file, load_image

log = logging.getLogger(__name__)

#: Names of the split sub-folders that make a folder "already split".
TRAIN_FOLDER, VAL_FOLDER = "train", "val"
#: Suffixes read as a CSV list (anything else that is a file is read as JSONL).
CSV_SUFFIXES = (".csv", ".tsv", ".txt")


@dataclass(frozen=True)
class Sample:
    """One labelled image: its path and its class name."""

    path: str
    label: str


@dataclass(frozen=True)
class Split:
    """A training set and a validation set over the same classes (sorted names, index order)."""

    classes: tuple[str, ...]
    train: tuple[Sample, ...]
    val: tuple[Sample, ...]
    source: str  # "folders", "split" (--val-split) or "list"

    def index(self, label: str) -> int:
        return self.classes.index(label)


def _folder_samples(root: Path) -> list[Sample]:
    """The images of an ImageFolder layout: each non-hidden sub-folder is a class (searched recursively)."""
    samples: list[Sample] = []
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise UsageError(f"{root}: no class folders (expected one sub-folder of images per class)")
    for label in classes:
        found = []
        for folder, subfolders, files in os.walk(root / label, followlinks=False):
            subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
            for name in sorted(files):
                path = os.path.join(folder, name)
                if not name.startswith(".") and is_image_file(path):
                    found.append(Sample(path, label))
        if not found:
            log.debug("class folder %s has no images", root / label)
        samples.extend(found)
    return samples


def _list_samples(path: Path) -> list[Sample]:
    """The rows of a CSV (`path,label`) or JSONL (`{"path", "label"}`) list."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{path}: cannot read the list: {error}") from None
    base = path.parent
    rows: list[tuple[str, str]] = []
    if path.suffix.lower() in CSV_SUFFIXES:
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        for number, row in enumerate(csv.reader(text.splitlines(), delimiter=delimiter), start=1):
            if not row or not "".join(row).strip():
                continue
            if number == 1 and [cell.strip().lower() for cell in row[:2]] == ["path", "label"]:
                continue
            if len(row) < 2:
                raise UsageError(f"{path}:{number}: expected path{delimiter}label")
            rows.append((row[0].strip(), row[1].strip()))
    else:
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                rows.append((str(record["path"]), str(record["label"])))
            except (ValueError, KeyError, TypeError):
                raise UsageError(f'{path}:{number}: expected a JSON object with "path" and "label"') from None
    if not rows:
        raise UsageError(f"{path}: the list is empty")
    return [Sample(str(base / item) if not os.path.isabs(item) else item, label) for item, label in rows]


def _classes(samples: list[Sample], where: Path) -> tuple[str, ...]:
    classes = tuple(sorted({sample.label for sample in samples}))
    if not samples:
        raise UsageError(f"{where}: no images found")
    return classes


def stratified_split(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Split each class's samples with a seeded shuffle: `round(n * fraction)` to val (with a fraction
    above 0, at least one, and at least one left to train, when a class has two or more)."""
    by_class: dict[str, list[Sample]] = {}
    for sample in samples:
        by_class.setdefault(sample.label, []).append(sample)
    train: list[Sample] = []
    val: list[Sample] = []
    for label in sorted(by_class):
        members = list(by_class[label])
        random.Random(f"{seed}:{label}").shuffle(members)
        count = round(len(members) * fraction)
        if fraction > 0 and len(members) >= 2:
            count = min(max(count, 1), len(members) - 1)
        elif len(members) < 2:
            count = 0
        val.extend(sorted(members[:count], key=lambda s: s.path))
        train.extend(sorted(members[count:], key=lambda s: s.path))
    return train, val


def load_split(data: Path, val_split: float = 0.2, seed: int = 0) -> Split:
    """The training and validation sets of DATA (see the module docstring)."""
    if not data.exists():
        raise UsageError(f"{data}: no such file or folder")
    if data.is_file():
        samples = _list_samples(data)
        train, val = stratified_split(samples, val_split, seed)
        return Split(_classes(samples, data), tuple(train), tuple(val), "list")
    if (data / TRAIN_FOLDER).is_dir() and (data / VAL_FOLDER).is_dir():
        train = _folder_samples(data / TRAIN_FOLDER)
        val = _folder_samples(data / VAL_FOLDER)
        classes = _classes(train, data / TRAIN_FOLDER)
        unknown = sorted({sample.label for sample in val} - set(classes))
        if unknown:
            raise UsageError(f"{data / VAL_FOLDER}: classes with no training images: {', '.join(unknown)}")
        return Split(classes, tuple(train), tuple(val), "folders")
    samples = _folder_samples(data)
    train, val = stratified_split(samples, val_split, seed)
    return Split(_classes(samples, data), tuple(train), tuple(val), "split")


def load_eval_set(data: Path) -> list[Sample]:
    """What `resnet eval` scores: `val/` when DATA has one, otherwise every image (folder or list)."""
    if not data.exists():
        raise UsageError(f"{data}: no such file or folder")
    if data.is_file():
        return _list_samples(data)
    root = data / VAL_FOLDER if (data / VAL_FOLDER).is_dir() else data
    samples = _folder_samples(root)
    _classes(samples, root)
    return samples


# ---------------------------------------------------------------------------------------------
# Reading the images


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
            chunk = samples[start : start + batch_size]
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
