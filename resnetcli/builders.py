"""Building torchvision models without random initialisation and without patching anything.

Models are built on the meta device and the loaded tensors assigned (`load_state_dict(assign=True)`).
To let a builder configure a model as some weights do (class count, ViT image size, googlenet's and
inception's input transform, googlenet's dropped aux heads), it is called with `_Configured`
weights: a stand-in for the enum member that answers `get_state_dict` with meta copies of the
tensors resnetcli has loaded. torchvision configures the model and checks names and shapes strictly,
copying nothing. Neither torch.nn.Module nor torchvision's enums are modified, so threads can build
models at the same time. Architectures that compute with torch while being built (RegNet) are built
on the CPU instead (logged).
"""

from __future__ import annotations

import logging
import re
import warnings
from functools import cache, lru_cache
from typing import TYPE_CHECKING, Any, Mapping

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torchvision.models import WeightsEnum

from resnetcli.catalogue import resolve_architecture

log = logging.getLogger(__name__)


class _Configured:
    """Weights as a torchvision builder sees them, with resnetcli's tensors and class count.

    Passes the builder's `isinstance(weights, XWeights)` check through `__class__` (Python's
    documented isinstance fallback, the one `unittest.mock`'s spec uses); `meta` is the member's,
    with `categories` of `num_classes` entries when given; `get_state_dict` returns the tensors
    resnetcli hands over. The enum member itself is never touched.
    """

    def __init__(self, weights: WeightsEnum, tensors: Mapping[str, torch.Tensor], num_classes: int | None) -> None:
        self._weights = weights
        self._tensors = tensors
        meta = dict(weights.meta)
        if num_classes is not None and num_classes != len(meta.get("categories") or []):
            meta["categories"] = [f"class_{i}" for i in range(num_classes)]
        self._meta = meta

    @property  # type: ignore[misc]
    def __class__(self):
        return type(self._weights)

    @property
    def meta(self) -> dict:
        return self._meta

    def get_state_dict(self, *args: Any, **kwargs: Any) -> Mapping[str, torch.Tensor]:
        return self._tensors

    def __getattr__(self, name: str) -> Any:
        return getattr(self._weights, name)


@cache
def meta_buildable(arch: str) -> bool:
    """Whether `arch` can be built on the meta device. RegNet computes its widths with torch, which
    fails there ("Cannot copy out of meta tensor"); such architectures are built on the CPU."""
    import torch

    try:
        with torch.device("meta"):
            _plain(arch, None)
    except NotImplementedError as error:
        log.debug("%s cannot be built on the meta device (%s): it is built on the CPU", arch, error)
        return False
    return True


def _plain(arch: str, num_classes: int | None) -> torch.nn.Module:
    from torchvision import models

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # googlenet/inception's notes about future init changes
        return models.get_model_builder(arch)(weights=None, **({"num_classes": num_classes} if num_classes else {}))


_SIZE_MISMATCH = re.compile(
    r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[([\d, ]*)\]\) from "
    r"checkpoint, the shape in current model is torch\.Size\(\[([\d, ]*)\]\)"
)
_UNEXPECTED = re.compile(r'Unexpected key\(s\) in state_dict: ((?:"[^"]+"(?:, )?)+)')


def _configure(
    arch: str,
    pretrained: WeightsEnum,
    device: str,
    num_classes: int | None,
    tensors: Mapping[str, torch.Tensor] | None,
    initialise: bool,
) -> torch.nn.Module:
    """Run the builder with `pretrained`'s configuration. With `tensors` (a checkpoint), the builder
    checks them strictly (RuntimeError if they do not fit); the keys they lack (aux heads a recipe
    dropped) are filled from the plain architecture. Without, the model's own shapes are learnt
    from the builder's check of the plain architecture's shapes (a ViT's position embedding at 384).
    `initialise`: a CPU model without `tensors` gets the plain architecture's random values; a CPU
    build standing in for a meta one does not (regnet_y_128gf: 2.6 GB that took 6.5 s to fill)."""
    import torch
    from torchvision import models

    builder = models.get_model_builder(arch)
    count = num_classes or len(pretrained.meta["categories"])
    given = {k: v.to(device) if device == "meta" else v for k, v in (tensors or {}).items()}
    if tensors is None and device == "cpu" and initialise:  # a real model: random as the plain architecture
        given = dict(_plain(arch, count).state_dict())
    given = with_module_versions(arch, given, tensors)
    for key, shape in _expected_shapes(arch, count):
        if key not in given:
            given[key] = torch.empty(shape, device=device)  # uninitialised: the builder only checks shapes
    for _ in range(3):
        try:
            with torch.device(device):
                return builder(weights=_Configured(pretrained, given, num_classes), progress=False)
        except RuntimeError as error:
            if tensors is not None:
                raise
            fixes = _SIZE_MISMATCH.findall(str(error))
            unexpected = _UNEXPECTED.search(str(error))
            if not fixes and not unexpected:
                raise
            log.debug("%s as %s configures it: learning its shapes from the builder's check", arch, pretrained)
            for key, _, shape in fixes:
                given[key] = torch.nn.init.trunc_normal_(
                    torch.empty([int(x) for x in shape.split(",")], device=device), std=0.02
                )
            for key in re.findall(r'"([^"]+)"', unexpected.group(1)) if unexpected else []:
                given.pop(key, None)
    raise RuntimeError(f"{arch}: cannot learn the shapes {pretrained} configures")


def construct(
    arch: str,
    pretrained: WeightsEnum | None,
    *,
    on_meta: bool = True,
    num_classes: int | None = None,
    tensors: Mapping[str, torch.Tensor] | None = None,
) -> torch.nn.Module:
    """Run the architecture's builder, configured by `pretrained` (or plain with `num_classes`), on
    the meta device when `on_meta` and the architecture allows it (nothing allocated or initialised)."""
    import torch

    device = "meta" if on_meta and meta_buildable(arch) else "cpu"
    if pretrained is not None:
        return _configure(arch, pretrained, device, num_classes, tensors, initialise=not on_meta)
    with torch.device(device):
        return _plain(arch, num_classes)


def _has_meta_tensors(model: torch.nn.Module) -> bool:
    return any(t.is_meta for t in model.parameters()) or any(t.is_meta for t in model.buffers())


def build_with_state_dict(
    arch: str, pretrained: WeightsEnum | None, state_dict: Mapping[str, torch.Tensor], num_classes: int | None = None
) -> torch.nn.Module:
    """Build configured by `pretrained` (or plain) with `num_classes` outputs and assign the tensors.

    RuntimeError (the builder's or load_state_dict's strict check) when they do not fit. Falls
    back to a CPU build when the architecture keeps state outside its state dict, which the meta
    device cannot produce.
    """
    for on_meta in (True, False):
        tensors = with_module_versions(arch, state_dict)
        model = construct(arch, pretrained, on_meta=on_meta, num_classes=num_classes, tensors=tensors)
        model.load_state_dict(tensors, strict=True, assign=any(t.is_meta for t in model.parameters()))
        if not _has_meta_tensors(model):
            return model.eval()
        log.debug("%s keeps state outside its state dict: building it on the CPU", arch)
    raise AssertionError("unreachable: a CPU build has no meta tensors")


def with_module_versions(
    arch: str, state_dict: Mapping[str, torch.Tensor], source: Mapping[str, torch.Tensor] | None = None
) -> Mapping[str, torch.Tensor]:
    """`state_dict` with the module versions (`_metadata`) of `source` (a checkpoint), or, when it has
    none (safetensors, hand-made dicts), those of the installed architecture. Modules such as MNASNet
    read their version while loading."""
    from collections import OrderedDict

    metadata = getattr(source if source is not None else state_dict, "_metadata", None)
    if metadata is None:
        metadata = _plain_metadata(arch)
    result = OrderedDict(state_dict)
    result._metadata = metadata  # type: ignore[attr-defined]
    return result


def _plain_metadata(arch: str) -> Any:
    return _plain_layout(arch, None)[1]


def expected_shapes(arch: str, num_classes: int | None = None) -> dict[str, list[int]]:
    """The plain architecture's tensor names and shapes (meta device; cached per architecture and count)."""
    return dict(_expected_shapes(resolve_architecture(arch), num_classes))


def _expected_shapes(arch: str, num_classes: int | None) -> tuple[tuple[str, list[int]], ...]:
    return _plain_layout(arch, num_classes)[0]


@lru_cache(maxsize=64)
def _plain_layout(arch: str, num_classes: int | None) -> tuple[tuple[tuple[str, list[int]], ...], Any]:
    """Shapes and module versions of the plain architecture; `num_classes` None is the builders'
    default (1000), normalised so that RegNet, built on the CPU, is built once per class count."""
    from resnetcli.catalogue import weights_enum

    if num_classes is None:
        return _plain_layout(arch, len(weights_enum(arch).DEFAULT.meta["categories"]))
    state = construct(arch, None, num_classes=num_classes).state_dict()
    shapes = tuple((key, list(tensor.shape)) for key, tensor in state.items())
    return shapes, getattr(state, "_metadata", None)
