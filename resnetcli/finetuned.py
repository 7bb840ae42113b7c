"""The fine-tuned checkpoint format "resnetcli.finetune/1" (docs/finetune.md): writing it atomically, reading the
training state back for --resume (weights_only=True), and the preprocessing and base-weights entries it records.

The model itself is built from the file by the factory (`factory.load_model(None, path)`, which takes the
architecture, classes and preprocessing from it), as for every other command. Nothing here imports torch at
module level.
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
def interrupt_noted() -> Iterator[list[int]]:
    """Ctrl-C (SIGINT) raises KeyboardInterrupt at once, as usual, and is also noted in the list yielded.

    torch.save's zip writer, interrupted mid-write, can replace the KeyboardInterrupt with an error of
    its own while it unwinds; the note lets the caller turn that back into the interrupt (exit 130)
    instead of reporting a write error. Only the main thread can handle signals: elsewhere nothing is noted.
    """
    received: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield received
    finally:
        signal.signal(signal.SIGINT, previous)


def save_checkpoint(path: Path, payload: dict) -> None:
    """torch.save to a temporary file next to `path`, flushed to disk, then renamed over it: a reader
    (or an interrupted run) only ever sees the previous complete file or the new complete one.

    Ctrl-C is not held back while the file is written (a 100 MB write and fsync on a busy disk can take
    many seconds): it abandons the temporary file at once and OUT.pth stays the previous epoch's.
    """
    import torch

    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with interrupt_noted() as interrupted:
        try:
            with open(temporary, "wb") as stream:
                torch.save(payload, stream)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, path)
        except KeyboardInterrupt:
            raise
        except BaseException as error:
            if interrupted:
                log.debug("the interrupted checkpoint write ended with %r", error)
                raise KeyboardInterrupt from None
            if isinstance(error, OSError):
                raise UsageError(f"{path}: cannot write the checkpoint: {error.strerror or error}") from None
            raise
        finally:
            if temporary.exists():
                temporary.unlink()


def read_checkpoint(path: Path) -> dict:
    """A fine-tuned checkpoint's dict (its training state: optimizer, epoch, metrics, seed), loaded with
    weights_only=True; CheckpointError if it is not one."""
    import pickle

    import torch

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, RuntimeError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable fine-tuned checkpoint ({str(error).splitlines()[0]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a {FORMAT} checkpoint written by `resnet finetune`")
    return payload
