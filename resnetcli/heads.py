"""Finding and replacing the classifier head of any torchvision classifier, and choosing what to train.

torchvision's families put the head in different places: `fc` (ResNet, ResNeXt, Wide ResNet,
RegNet, GoogLeNet, Inception, ShuffleNet), `classifier[-1]` (AlexNet, VGG, MobileNet, EfficientNet,
MNASNet, ConvNeXt, MaxViT), `classifier` (DenseNet), `classifier[1]` as a 1x1 convolution
(SqueezeNet), `heads.head` (ViT), `head` (Swin). Rather than a table of attribute names, the head is
found by what it is: the last Linear or Conv2d layer (in registration order, which for every
torchvision classifier is forward order) whose output count is the model's class count. A test
checks the rule over the whole registry on the meta device.

Auxiliary classifiers (GoogLeNet's aux1/aux2, Inception v3's AuxLogits) are dropped: they only
serve ImageNet training, and the pretrained weights of torchvision drop them too.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

from resnetcli.errors import UsageError

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)


class TrainMode(str, Enum):
    """What `--train` unfreezes."""

    head = "head"
    last_stage = "last-stage"
    all = "all"


@dataclass(frozen=True)
class Head:
    """Where a model's classifier head is: its dotted module name and its output count."""

    name: str
    outputs: int


def _outputs(module) -> int | None:
    import torch

    if isinstance(module, torch.nn.Linear):
        return module.out_features
    if isinstance(module, torch.nn.Conv2d):
        return module.out_channels
    return None


def output_count(model: torch.nn.Module) -> int | None:
    """How many classes a model predicts: its `num_classes` when it says (timm's models, most of
    torchvision's), else the outputs of its last Linear or Conv2d layer; None when it has neither."""
    count = getattr(model, "num_classes", None)
    if isinstance(count, int):
        return count
    counts = [outputs for outputs in map(_outputs, model.modules()) if outputs is not None]
    return counts[-1] if counts else None


def find_head(model: torch.nn.Module, num_classes: int) -> Head:
    """The last Linear/Conv2d layer with `num_classes` outputs: the layer that produces the logits."""
    found = None
    for name, module in model.named_modules():
        if name and _outputs(module) == num_classes and not _is_auxiliary(name):
            found = Head(name, num_classes)
    if found is None:
        raise UsageError(f"{type(model).__name__}: no Linear or Conv2d layer with {num_classes} outputs to replace")
    return found


_AUXILIARY = ("aux1", "aux2", "AuxLogits")


def _is_auxiliary(name: str) -> bool:
    return name.split(".")[0] in _AUXILIARY


def drop_auxiliary_heads(model: torch.nn.Module) -> None:
    """Remove GoogLeNet's and Inception v3's auxiliary classifiers, as their pretrained builders do."""
    if getattr(model, "aux_logits", False):
        model.aux_logits = False
        for name in _AUXILIARY:
            if hasattr(model, name):
                setattr(model, name, None)
        log.debug("dropped the auxiliary classifiers of %s", type(model).__name__)


def replace_head(model: torch.nn.Module, current_classes: int, num_classes: int, seed: int = 0) -> Head:
    """Give `model` a freshly initialised head with `num_classes` outputs, in place; returns where it is.

    The new layer has the old one's input size, kernel, bias and device (meta stays meta); its
    initial weights are torch's default for the layer, drawn from a generator seeded with `seed`.
    """
    import torch

    drop_auxiliary_heads(model)
    head = find_head(model, current_classes)
    parent_name, _, attribute = head.name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, attribute) if not attribute.isdigit() else parent[int(attribute)]
    device, dtype = old.weight.device, old.weight.dtype
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if isinstance(old, torch.nn.Linear):
            new = torch.nn.Linear(old.in_features, num_classes, bias=old.bias is not None, device=device, dtype=dtype)
        else:
            new = torch.nn.Conv2d(
                old.in_channels,
                num_classes,
                kernel_size=old.kernel_size,
                stride=old.stride,
                padding=old.padding,
                bias=old.bias is not None,
                device=device,
                dtype=dtype,
            )
    setattr(parent, attribute, new)
    if isinstance(getattr(model, "num_classes", None), int):
        model.num_classes = num_classes
    return Head(head.name, num_classes)


def _has_parameters(module) -> bool:
    return next(module.parameters(), None) is not None


def _blocks(module, prefix: str, head: str) -> list[tuple[str, object]]:
    """The parametrised children of `module` in order, the head left out and its container opened."""
    blocks = []
    for name, child in module.named_children():
        full = f"{prefix}{name}"
        if full == head or not _has_parameters(child):
            continue
        if head.startswith(full + "."):
            blocks.extend(_blocks(child, full + ".", head))
        else:
            blocks.append((full, child))
    return blocks


def _size(module) -> int:
    return sum(p.numel() for p in module.parameters())


#: A block holding more than this share of its level's parameters is the trunk (VGG's `features`,
#: ViT's `encoder`), not a stage: the search goes down into it.
TRUNK_SHARE = 0.9


def last_stage(model: torch.nn.Module, head: str) -> str:
    """The dotted name of the network's last stage in front of the head (ResNet's layer4, Swin's
    features.7, ViT's last encoder layer, DenseNet's denseblock4, ...).

    At each level, the parametrised blocks are listed (the head's container opened up); one block
    holding nearly all of them is a trunk to search inside; otherwise the stage is the last block at
    least half the average block size (so a final norm or a small projection is not taken for one).
    """
    module, prefix = model, ""
    while True:
        blocks = _blocks(module, prefix, head)
        if not blocks:
            raise UsageError(f"{type(model).__name__}: no stage in front of the head")
        sizes = [_size(block) for _, block in blocks]
        total = sum(sizes)
        if len(blocks) == 1 or max(sizes) > TRUNK_SHARE * total:
            name, module = blocks[sizes.index(max(sizes))]
            if not list(_blocks(module, name + ".", head)):
                return name
            prefix = name + "."
            continue
        average = total / len(blocks)
        for (name, _), size in reversed(list(zip(blocks, sizes))):
            if size >= average / 2:
                return name


def trainable_names(model: torch.nn.Module, head: str, mode: TrainMode) -> list[str]:
    """The parameter names `--train` leaves trainable: the head's; from the last stage on; or all."""
    names = [name for name, _ in model.named_parameters()]
    if mode is TrainMode.all:
        return names
    if mode is TrainMode.head:
        return [name for name in names if name.startswith(head + ".")]
    stage = last_stage(model, head)
    first = next(i for i, name in enumerate(names) if name.startswith(stage + "."))
    return names[first:]


def set_trainable(model: torch.nn.Module, names: list[str]) -> None:
    """Freeze every parameter but `names`. With everything trained the model is in train mode; otherwise
    only the layers whose own parameters are trained are (frozen batch norms keep their statistics,
    dropout stays off, so the cached-feature path and the full forward pass compute the same thing)."""
    wanted = set(names)
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in wanted)
    if len(wanted) == len(list(model.parameters())):
        model.train()
        return
    for module in model.modules():
        own = list(module.parameters(recurse=False))
        module.training = bool(own) and all(p.requires_grad for p in own)
