"""Example inputs and input sizes: parsing them, probing which sizes a model takes, and the model to inspect.

Shared by `summary` and `features`. Models are probed on PyTorch's meta device, so a probe costs
no memory and no arithmetic.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

from resnetcli import checkpoints
from resnetcli.errors import CheckpointError, UsageError
from resnetcli.factory import (
    WeightsChoice,
    looks_like,
    meta_model,
    resolve_architecture,
    resolve_weights,
    weights_enum,
)

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

#: File suffixes `features --save` writes: numpy's archive and a torch.save'd dict of tensors.
SAVE_SUFFIXES = (".npz", ".pt")


def parse_size(text: str | None, option: str = "--input-size") -> list[int] | None:
    """`640`, `480,640` or `480x640` as a list of one or two positive ints (None stays None)."""
    if text is None:
        return None
    try:
        values = [int(part) for part in text.replace("x", ",").split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"{option} {text}: expected H or H,W in pixels") from None
    if not 1 <= len(values) <= 2 or any(v < 1 for v in values):
        raise UsageError(f"{option} {text}: expected H or H,W in pixels")
    return values


def input_hw(values: Sequence[int] | None, default: int) -> tuple[int, int]:
    """A parsed `--input-size` (or none) as (H, W)."""
    if not values:
        return default, default
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise UsageError("--input-size takes H or H,W")


def check_save_path(path) -> Path:
    """The `--save` file, checked once: its suffix says how it is written."""
    path = Path(path)
    if path.suffix.lower() not in SAVE_SUFFIXES:
        raise UsageError(f"--save {path}: the file name must end in {' or '.join(SAVE_SUFFIXES)}")
    return path


def root_cause(error: BaseException) -> str:
    """The first line of the innermost error of a chain (torchinfo and fx wrap the model's own)."""
    cause = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    text = str(cause).strip().splitlines()
    return text[0] if text else type(cause).__name__


def _crop_size(weights) -> int:
    crop = getattr(weights.transforms(), "crop_size", None)
    return int(crop[0]) if crop else int(weights.meta.get("min_size", (224, 224))[0])


def runs_at(model: torch.nn.Module, height: int, width: int) -> bool:
    """Whether a meta model takes a 1x3xHxW image."""
    import torch

    try:
        with torch.inference_mode():
            model(torch.empty(1, 3, height, width, device="meta"))
        return True
    except Exception as error:  # any failure means "not at this size"; the cause is logged
        log.debug("%dx%d does not run: %s", height, width, root_cause(error))
        return False


def default_input_size(arch: str, model: torch.nn.Module | None = None, choice: WeightsChoice | None = None) -> int:
    """The input size to show a model at when none is given: the crop size of its weights' preprocessing.

    For a model not configured by pretrained weights (a checkpoint, `none`) whose default weights'
    size it cannot take (`vit_h_14` is built for 224 pixels, its DEFAULT weights use 518), the
    first crop size among the architecture's other weights that it runs at.
    """
    arch = resolve_architecture(arch)
    reference = choice.reference if choice is not None else weights_enum(arch).DEFAULT
    preferred = _crop_size(reference)
    if model is None or (choice is not None and choice.pretrained is not None) or runs_at(model, preferred, preferred):
        return preferred
    for size in dict.fromkeys(_crop_size(w) for w in weights_enum(arch)):
        if runs_at(model, size, size):
            return size
    return preferred


def smallest_input_size(arch: str, model: torch.nn.Module | None = None) -> int | None:
    """The smallest square input a model runs on, by bisection on the meta device.

    The search runs between 1 pixel and the default input size; it returns a size that was seen
    to work, or None when not even the default size runs.
    """
    arch = resolve_architecture(arch)
    model = model if model is not None else meta_model(arch)
    high = default_input_size(arch, model, WeightsChoice(arch, "none"))
    if not runs_at(model, high, high):
        return None
    low = 1
    while low < high:
        middle = (low + high) // 2
        if runs_at(model, middle, middle):
            high = middle
        else:
            low = middle + 1
    return high


def input_size_error(arch: str, model: torch.nn.Module, height: int, width: int, error: BaseException) -> UsageError:
    """The usage error for an input the model cannot take: its own reason and the smallest size that works."""
    smallest = smallest_input_size(arch, model)
    hint = f"; the smallest size that works is {smallest}" if smallest else ""
    return UsageError(f"{arch} cannot run on a {height}x{width} input ({root_cause(error)}){hint}")


def check_fit(arch: str, model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError unless a checkpoint has exactly the model's tensor names and shapes.

    The message is `predict`'s (checkpoints.fit_message), with the architecture the tensors seem
    made for when there is one."""
    expected = {key: list(tensor.shape) for key, tensor in model.state_dict().items()}
    problems = checkpoints.fit_problems(arch, expected, state_dict)
    if problems:
        raise CheckpointError(checkpoints.fit_message(source, arch, problems, looks_like(state_dict, arch)))


def inspection_model(
    arch: str, weights: str | None = None, trust_checkpoint: bool = False
) -> tuple[WeightsChoice, torch.nn.Module, dict | None]:
    """The meta model that `--weights` describes, without downloading anything.

    A weights name configures the model as those weights do; `none` gives the plain architecture;
    a checkpoint file is read (tensors only) so that the model takes its head and is checked against
    it. Returns the choice, the model and the checkpoint's tensors (None unless a file was given).
    """
    from resnetcli.factory import checkpoint_class_count, load_state_dict

    choice = resolve_weights(arch, weights)
    if choice.kind == "url":
        raise UsageError(
            f"--weights {weights}: inspection takes a weights name, `none` or a checkpoint file, not a URL"
        )
    if choice.kind != "checkpoint":
        return choice, meta_model(choice.arch, choice), None
    if choice.path is None:
        raise CheckpointError(f"--weights {weights}: no checkpoint file")
    state_dict = load_state_dict(choice.path, trust=trust_checkpoint)
    default_head = meta_model(choice.arch, choice, num_classes=len(choice.reference.meta["categories"]))
    model = meta_model(choice.arch, choice, num_classes=checkpoint_class_count(choice.arch, state_dict, default_head))
    check_fit(choice.arch, model, state_dict, str(choice.path))
    return choice, model, state_dict
