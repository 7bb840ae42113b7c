"""Checkpoint files: reading them safely, saying what a file is when it is not one, and fitting them.

Formats read, all without running code from the file (`torch.load(weights_only=True)`):

- a bare state dict, or one under "model" / "model_state_dict" (DataParallel's "module." prefix is
  stripped);
- torchvision's reference `train.py` checkpoints `{"model", "optimizer", "lr_scheduler", "epoch",
  "args"}`, whose `args` is an `argparse.Namespace` (allowed explicitly); `args.model` names the
  architecture;
- Lightning-style `{"state_dict": ...}` whose keys carry the LightningModule's "model." prefix;
- `.safetensors` files (timm, Hugging Face), whose declared shapes are read before any tensor;
- resnetcli's fine-tuned format `"format": "resnetcli.finetune/1"` (see docs/finetune.md): its
  architecture, class names and preprocessing come with it.

A file that needs arbitrary code to unpickle is refused in one line naming the file; only
`trust=True` (the CLI's `--trust-checkpoint`) loads it with `weights_only=False`, which runs the
file's code. Nothing here imports torch at module level.
"""

from __future__ import annotations

import logging
import os
import re
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from resnetcli.errors import CheckpointError, UsageError

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

#: The `format` value of a checkpoint written by `resnet finetune`.
FINETUNE_FORMAT = "resnetcli.finetune/1"
#: Largest class count a checkpoint's head may declare. ImageNet-21k, the largest label set
#: torchvision-style backbones are commonly trained on, has 21,843 classes; a 1e6-row head of
#: resnet18 alone would take 2 GB, and a hostile file can declare one with a zero stride for free.
MAX_CLASSES = 100_000
#: Bytes read to tell what a file that is not a checkpoint is.
SNIFF_BYTES = 512
#: torch's list of globals allowed under weights_only is process-wide; entering
#: `torch.serialization.safe_globals` in two threads at once could drop one's allowance, so the
#: (memory-mapped, hence quick) loads that use it take turns.
_SAFE_GLOBALS_LOCK = threading.Lock()
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def shown(text: object) -> str:
    """Text safe for a one-line message: control characters (terminal escapes, newlines) as \\xNN."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", str(text))


@dataclass(frozen=True)
class Checkpoint:
    """What a checkpoint file holds: its tensors and what it says about itself.

    `arch`, `classes` and `preprocessing` are set by formats that store them (resnetcli's
    fine-tuned format; `arch` also from torchvision's reference `train.py` args).
    """

    source: str
    state_dict: dict[str, torch.Tensor]
    kind: str
    arch: str | None = None
    classes: list[str] | None = None
    preprocessing: dict[str, Any] | None = None
    base_weights: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# What a file is


def check_regular_file(path: Path, option: str = "--weights") -> None:
    """UsageError unless `path` is a regular file (checked before opening: a FIFO would block)."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        raise UsageError(f"{option} {shown(path)}: cannot read: {error.strerror or error}") from None
    if stat.S_ISDIR(mode):
        raise UsageError(f"{option} {shown(path)}: is a directory, not a checkpoint file")
    if not stat.S_ISREG(mode):
        what = (
            "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket"
        )
        raise UsageError(f"{option} {shown(path)}: not a regular file ({what}), not a checkpoint file")


def describe_content(head: bytes, size: int, suffix: str = "") -> str:
    """What a file that torch cannot read as a checkpoint looks like, from its first bytes."""
    stripped = head.lstrip()
    lowered = stripped[:64].lower()
    if size == 0:
        return "an empty file"
    if head.startswith(b"version https://git-lfs"):
        return "a Git LFS pointer, not the file itself (run `git lfs pull`)"
    if lowered.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "an HTML page (an error page saved in place of the file?)"
    if head.startswith((b"\x89PNG", b"\xff\xd8\xff", b"GIF87a", b"GIF89a")):
        return "an image"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "an image"
    if suffix == ".onnx" or (len(head) > 2 and head[0] == 0x08 and head[1] < 0x20 and b"\x12" in head[2:4]):
        return "an ONNX model (run it with ONNX Runtime, or give the PyTorch checkpoint)"
    if len(head) >= 10 and head[8:10] == b'{"':
        return "a safetensors file"
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive that is not a readable PyTorch checkpoint"
    if stripped[:1] in (b"{", b"["):
        return "a JSON or text document"
    if head.startswith(b"\x80") and len(head) > 1 and head[1] <= 5:
        return "a Python pickle that is not a PyTorch checkpoint"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is not None and all(ch.isprintable() or ch in "\t\r\n" for ch in text):
        return "a text file"
    return "unrecognised binary data"


def _describe_file(path: Path) -> str:
    try:
        with open(path, "rb") as handle:
            head = handle.read(SNIFF_BYTES)
        size = path.stat().st_size
    except OSError as error:
        return f"cannot be read ({error.strerror or error})"
    return describe_content(head, size, path.suffix.lower())


def _not_a_checkpoint(path: Path, detail: str | None = None) -> CheckpointError:
    what = _describe_file(path)
    tail = f" ({shown(detail)})" if detail and what.startswith(("a zip", "a Python pickle")) else ""
    return CheckpointError(f"{shown(path)}: not a PyTorch checkpoint: {what}{tail}")


# ---------------------------------------------------------------------------------------------
# Reading


def _one_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def _needs_code(error: BaseException) -> str | None:
    """The global a weights-only load refused ("__main__.Net"), or None if `error` is not that (garbage
    bytes fail with other messages, such as "Unsupported operand")."""
    text = str(error)
    if "Weights only load failed" not in text:
        return None
    found = re.search(r"GLOBAL ([\w.]+)", text)
    return None if found is None else found.group(1)


def _torch_load(path: Path, trust: bool) -> Any:
    import argparse
    import pickle

    import torch

    if trust:
        log.debug("%s: loading with weights_only=False (--trust-checkpoint): the file's code runs", path)
        try:
            return torch.load(path, map_location="cpu", weights_only=False)  # behind --trust-checkpoint only
        except Exception as error:
            log.debug("trusted load of %s failed", path, exc_info=True)
            raise _not_a_checkpoint(path, _one_line(error)) from None
    try:
        with _SAFE_GLOBALS_LOCK, torch.serialization.safe_globals([argparse.Namespace]):
            try:
                return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as error:
                # torch's legacy (pre-1.6, non-zip) format cannot be memory-mapped.
                if "mmap" not in str(error) and "zip" not in str(error):
                    raise
                log.debug("%s: not memory-mappable (%s), loading it whole", path, _one_line(error))
                return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = _needs_code(error)
        if refused is None:
            log.debug("%s: unpickling failed", path, exc_info=True)
            raise _not_a_checkpoint(path, _one_line(error)) from None
        raise CheckpointError(
            f"{shown(path)}: refused to load: the file needs to run code to be read (it holds {shown(refused)}); "
            "if you trust its source, --trust-checkpoint loads it and runs that code"
        ) from None
    except Exception as error:  # torch raises KeyError, IndexError, EOFError, ... on files that are not its own.
        log.debug("%s: torch.load failed", path, exc_info=True)
        raise _not_a_checkpoint(path, _one_line(error)) from None


def _read_safetensors(path: Path, max_elements: int | None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError:
        raise CheckpointError(
            f"{shown(path)}: a safetensors file, and the safetensors package is not installed"
        ) from None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            keys = list(handle.keys())
            for key in keys:
                shape = handle.get_slice(key).get_shape()
                if max_elements is not None and _product(shape) > max_elements:
                    raise CheckpointError(f"{shown(path)}: {shown(key)} declares an implausible shape {list(shape)}")
            metadata = dict(handle.metadata() or {})
            return {key: handle.get_tensor(key) for key in keys}, metadata
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{shown(path)}: not a readable safetensors file ({shown(_one_line(error))})") from None


def _product(shape: Sequence[int]) -> int:
    total = 1
    for size in shape:
        total *= int(size)
    return total


def _is_safetensors(path: Path) -> bool:
    if path.suffix.lower() == ".safetensors":
        return True
    try:
        with open(path, "rb") as handle:
            head = handle.read(10)
    except OSError:
        return False
    return len(head) == 10 and head[8:10] == b'{"' and not head.startswith(b"PK")


def read_checkpoint(path: Path, *, trust: bool = False) -> Checkpoint:
    """Read a checkpoint file in any supported format; CheckpointError in one line otherwise."""
    path = Path(path)
    check_regular_file(path)
    if _is_safetensors(path):
        state_dict, metadata = _read_safetensors(path, max_elements=None)
        return Checkpoint(str(path), _strip_prefixes(state_dict), "safetensors", extra={"metadata": metadata})
    return interpret(str(path), _torch_load(path, trust))


def load_state_dict(path: Path, *, trust: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint file (see `read_checkpoint`)."""
    return read_checkpoint(path, trust=trust).state_dict


def interpret(source: str, loaded: Any) -> Checkpoint:
    """Recognise the format of a loaded checkpoint object and take its tensors and descriptions."""
    import argparse

    if isinstance(loaded, Mapping) and loaded.get("format") == FINETUNE_FORMAT:
        return _fine_tuned(source, loaded)
    kind, arch, base = "state dict", None, None
    if isinstance(loaded, Mapping):
        if isinstance(loaded.get("model"), Mapping) and isinstance(loaded.get("args"), argparse.Namespace):
            kind, arch = "torchvision reference", getattr(loaded["args"], "model", None)
            started_from = getattr(loaded["args"], "weights", None)
            base = started_from if isinstance(started_from, str) else "none"
            loaded = loaded["model"]
        else:
            for key, label in (("state_dict", "state_dict"), ("model", "model"), ("model_state_dict", "model")):
                if isinstance(loaded.get(key), Mapping):
                    kind, loaded = label, loaded[key]
                    break
    state_dict = _tensors_only(source, loaded)
    arch = arch if isinstance(arch, str) else None
    return Checkpoint(source, _strip_prefixes(state_dict), kind, arch=arch, base_weights=base)


def _tensors_only(source: str, loaded: Any) -> dict[str, torch.Tensor]:
    import torch

    if (
        isinstance(loaded, Mapping)
        and loaded
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in loaded.items())
    ):
        return _keeping_versions(dict(loaded), getattr(loaded, "_metadata", None))
    held = "" if isinstance(loaded, Mapping) else f"; it holds a {type(loaded).__name__}"
    raise CheckpointError(f"{shown(source)}: not a state dict (expected a mapping of names to tensors{held})")


def _strip_prefixes(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip DataParallel's "module." and a LightningModule's "model." prefix when every key has it."""
    for prefix in ("module.", "model."):
        if state_dict and all(key.startswith(prefix) for key in state_dict):
            versions = getattr(state_dict, "_metadata", None)
            state_dict = {key[len(prefix) :]: value for key, value in state_dict.items()}
            if versions is not None:
                name = prefix[:-1]  # the wrapped module becomes the root
                versions = {
                    ("" if k == name else k[len(prefix) :]): v
                    for k, v in versions.items()
                    if k == name or k.startswith(prefix)
                }
            state_dict = _keeping_versions(state_dict, versions)
    return state_dict


def _keeping_versions(state_dict: dict, versions: Any) -> dict:
    """`state_dict` as an OrderedDict carrying module versions (a state dict's `_metadata`), if any:
    modules such as MNASNet read them while loading."""
    from collections import OrderedDict

    if versions is None:
        return state_dict
    result = OrderedDict(state_dict)
    result._metadata = versions  # type: ignore[attr-defined]
    return result


def _fine_tuned(source: str, loaded: Mapping) -> Checkpoint:
    """resnetcli's own format (written by `resnet finetune`), checked field by field."""
    state_dict = _tensors_only(source, loaded.get("state_dict"))
    arch, classes, preprocessing = loaded.get("arch"), loaded.get("classes"), loaded.get("preprocessing")
    problems = []
    if not isinstance(arch, str):
        problems.append("no architecture name")
    if not isinstance(classes, list) or not classes or not all(isinstance(c, str) for c in classes):
        problems.append("no list of class names")
    if preprocessing is not None and not _valid_preprocessing(preprocessing):
        problems.append("a malformed preprocessing entry")
    if problems:
        raise CheckpointError(f"{shown(source)}: a {FINETUNE_FORMAT} checkpoint with {' and '.join(problems)}")
    base = loaded.get("base_weights")
    return Checkpoint(
        source,
        _strip_prefixes(state_dict),
        "fine-tuned",
        arch=arch,
        classes=list(classes),
        preprocessing=dict(preprocessing) if preprocessing is not None else None,
        base_weights=base if isinstance(base, str) else None,
    )


def _valid_preprocessing(entry: Any) -> bool:
    if not isinstance(entry, Mapping):
        return False
    sizes_ok = all(isinstance(entry.get(k), int) and entry.get(k) > 0 for k in ("resize_size", "crop_size"))
    stats_ok = all(
        isinstance(entry.get(k), (list, tuple))
        and len(entry[k]) == 3
        and all(isinstance(x, (int, float)) for x in entry[k])
        for k in ("mean", "std")
    )
    return sizes_ok and stats_ok and isinstance(entry.get("interpolation", "bilinear"), str)


def transforms_for(preprocessing: Mapping[str, Any], like) -> Any:
    """The stored preprocessing as a transforms object of the same class as `like` (a weights' transforms)."""
    from torchvision.transforms import InterpolationMode

    try:
        interpolation = InterpolationMode(str(preprocessing.get("interpolation", "bilinear")).lower())
    except ValueError:
        raise CheckpointError(
            f"unknown interpolation {shown(preprocessing.get('interpolation'))!r} in the checkpoint"
        ) from None
    return type(like)(
        crop_size=int(preprocessing["crop_size"]),
        resize_size=int(preprocessing["resize_size"]),
        mean=[float(x) for x in preprocessing["mean"]],
        std=[float(x) for x in preprocessing["std"]],
        interpolation=interpolation,
    )


# ---------------------------------------------------------------------------------------------
# Fitting a checkpoint to an architecture


def declared_size_problems(state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, Sequence[int]]) -> list[str]:
    """Tensors whose declared size is implausible, checked before anything is materialised.

    A tensor may differ from the architecture's only in its first dimension (a resized head), and
    then by at most MAX_CLASSES rows; no tensor may declare more elements than its storage holds
    (a zero-stride tensor claiming 2e8 x 512 on 4 bytes).
    """
    problems = []
    for key, tensor in state_dict.items():
        shape = list(tensor.shape)
        declared = tensor.numel() * tensor.element_size()
        if tensor.device.type != "meta" and declared > tensor.untyped_storage().nbytes():
            problems.append(f"{key} declares {shape} but its data holds only {tensor.untyped_storage().nbytes()} bytes")
            continue
        want = expected.get(key)
        if want is None:
            continue
        want = list(want)
        if len(shape) != len(want) or shape[1:] != want[1:]:
            continue  # a plain mismatch, reported by the fit check
        if shape and shape[0] != want[0] and shape[0] > MAX_CLASSES:
            problems.append(f"{key} declares {shape[0]} classes (more than {MAX_CLASSES:,})")
    return problems


def fit_problems(arch: str, expected: Mapping[str, Sequence[int]], state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Why a checkpoint does not fit a model's tensors: missing, unexpected and misshapen keys."""
    problems = [f'missing "{key}"' for key in expected if key not in state_dict]
    problems += [f'unexpected "{key}"' for key in state_dict if key not in expected]
    problems += [
        f"{key} is {list(state_dict[key].shape)} where {arch} has {list(shape)}"
        for key, shape in expected.items()
        if key in state_dict and list(state_dict[key].shape) != list(shape)
    ]
    return problems


def fit_message(source: str, arch: str, problems: Sequence[str], looks_like: str | None = None) -> str:
    """The one line saying a checkpoint does not fit `arch` (predict, summary, features, eval): the
    first three problems and a count of the rest, and the torchvision architecture it seems made
    for, when one was found."""
    more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
    guess = f"; this looks like a {looks_like} checkpoint (--arch {looks_like})" if looks_like else ""
    return f"{shown(source)}: does not fit {arch}: {'; '.join(problems[:3])}{more}{guess}"


def shapes_match(expected: Mapping[str, Sequence[int]], state_dict: Mapping[str, torch.Tensor]) -> bool:
    """True if the checkpoint has the model's keys, with its shapes except possibly the head's class count."""
    if set(expected) != set(state_dict):
        return False
    for key, shape in expected.items():
        have = list(state_dict[key].shape)
        if have != list(shape) and (len(have) != len(shape) or have[1:] != list(shape)[1:]):
            return False
    return True


def class_count(
    state_dict: Mapping[str, torch.Tensor], expected: Mapping[str, Sequence[int]], default_count: int
) -> int:
    """The number of classes a checkpoint's head was trained for: the first dimension of the tensors
    whose shape in the architecture starts with `default_count` and differs only there."""
    counts = {
        int(tensor.shape[0])
        for key, tensor in state_dict.items()
        if key in expected
        and tensor.ndim >= 1
        and list(expected[key])[:1] == [default_count]
        and list(tensor.shape)[1:] == list(expected[key])[1:]
    }
    return counts.pop() if len(counts) == 1 else default_count
