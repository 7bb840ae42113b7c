"""The fine-tuned checkpoint format "resnetcli.finetune/1" (see TEAM.md): writing it atomically, reading it
safely (weights_only=True), and the preprocessing and base-weights entries it records.

Nothing here imports torch at module level.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from resnetcli import factory
from resnetcli.errors import CheckpointError, UsageError

log = logging.getLogger(__name__)

FORMAT = "resnetcli.finetune/1"


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


def base_weights_name(choice: factory.WeightsChoice) -> str:
    """ "ResNet18_Weights.IMAGENET1K_V1", "none", a checkpoint file's sha256, or a URL."""
    if choice.pretrained is not None:
        return f"{type(choice.pretrained).__name__}.{choice.pretrained.name}"
    if choice.path is not None:
        digest = hashlib.sha256()
        with open(choice.path, "rb") as stream:
            for chunk in iter(lambda: stream.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    return choice.url or factory.NO_WEIGHTS


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
        with open(temporary, "wb") as stream, deferred_interrupt():
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
    except Exception:
        log.debug("%s is not a fine-tuned checkpoint", path, exc_info=True)
        return False
    return isinstance(payload, dict) and payload.get("format") == FORMAT


# TEMPORARY (finetune branch): the lead replaces this with the factory's fine-tuned checkpoint
# reader at merge time; until then eval (and tests) load OUT.pth through it.
def load_finetuned(path: Path, payload: dict | None = None) -> factory.LoadedModel:
    """Build the model of a fine-tuned checkpoint: its architecture, head, classes and preprocessing."""
    payload = payload if payload is not None else read_checkpoint(path)
    arch = factory.resolve_architecture(payload["arch"])
    choice = factory.WeightsChoice(arch, "checkpoint", path=Path(path))
    loaded = factory.build_model(choice, state_dict=payload["state_dict"], labels=list(payload["classes"]))
    loaded.transforms = transforms_from(payload["preprocessing"])
    return loaded
