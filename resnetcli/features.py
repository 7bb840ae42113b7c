"""`resnet features`: the multi-scale feature maps of a backbone, found from its own structure.

Nothing here knows a particular architecture: stages, layouts and strides are read from what a
model's modules output on the meta device, at the requested size and (when the model allows) at
twice it.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import asdict, dataclass
from functools import cache
from typing import TYPE_CHECKING, Mapping, Sequence

from resnetcli.errors import UsageError, did_you_mean
from resnetcli.factory import meta_model
from resnetcli.shapes import check_save_path, default_input_size, input_hw, input_size_error, inspection_model

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

#: Layouts of the tensors a feature map can be read from.
NCHW, NHWC, TOKENS = "NCHW", "NHWC", "NLC"


@dataclass(frozen=True)
class FeatureMap:
    """One feature map of a backbone: where it is taken and what it looks like.

    `layout` says how `shape` is ordered: NCHW (convolutional), NHWC (channels last, e.g. Swin) or
    NLC (a sequence of patch tokens, e.g. ViT); `channels` and `stride` (input pixels per output
    pixel, rounded as `stride_of` explains) are read accordingly. Outputs that are not maps (logits,
    pooled vectors) have no layout, channels or stride.
    """

    name: str
    node: str
    shape: list[int]
    layout: str | None
    channels: int | None
    stride: int | None

    def record(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class _Output:
    """What one call of a module returned, at the requested size and (when the model allows) at twice it."""

    module: str
    shape: tuple[int, ...]
    other: tuple[int, ...] | None
    is_block: bool  # a module with children: a stage, block or layer group rather than one op


def stride_of(ratio: float) -> int:
    """A reduction factor as an integer: the nearest power of two when within 10% of one, else the nearest integer.

    Convolutions without padding lose a few pixels (inception_v3 at 299 gives 17x17 maps at
    reduction 16, where 299 / 17 is 17.6); patch sizes that are no power of two stay exact
    (vit_h_14's 14-pixel patches).
    """
    if ratio <= 0:
        return 0
    power = 2 ** round(math.log2(ratio))
    return power if abs(ratio / power - 1) <= 0.1 else max(1, round(ratio))


def _map_layout(shape: Sequence[int], other: Sequence[int] | None) -> str | None:
    """Which of NCHW, NHWC or NLC a module output is in, or None if it is no map of the input.

    With a second forward pass at another size the spatial dimensions are those that scaled. Models
    that take one size only (ViT, MaxViT) are read by shape: a square input gives square maps.
    """
    if other is not None and len(other) == len(shape):
        scaled = tuple(d for d in range(1, len(shape)) if shape[d] != other[d])
        return {(2, 3): NCHW, (1, 2): NHWC, (1,): TOKENS}.get(scaled) if len(shape) in (3, 4) else None
    if len(shape) == 4 and shape[2] == shape[3] > 1:
        return NCHW
    if len(shape) == 4 and shape[1] == shape[2] > 1:
        return NHWC
    if len(shape) == 3 and shape[1] > 1:
        return TOKENS
    return None


def _describe(
    shape: Sequence[int],
    other: Sequence[int] | None,
    layout: str | None,
    size: tuple[int, int],
    other_size: tuple[int, int] | None,
    token_stride: int | None,
) -> tuple[int | None, int | None]:
    """(channels, stride) of a module output in a given layout."""
    if layout is None:
        return None, None
    if layout == TOKENS:
        return shape[2], token_stride
    height = shape[2] if layout == NCHW else shape[1]
    if other is not None and other_size is not None:
        other_height = other[2] if layout == NCHW else other[1]
        ratio = (other_size[0] - size[0]) / (other_height - height)
    else:
        ratio = size[0] / height
    return (shape[1] if layout == NCHW else shape[3]), stride_of(ratio)


def _image(model: torch.nn.Module, height: int, width: int, channels: int = 3) -> torch.Tensor:
    """An empty image batch where the model lives: meta, or the CPU for a model that had to be built there."""
    import torch

    device = next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("meta"))
    return torch.empty(1, channels, height, width, device=device)


def _forward_shapes(
    model: torch.nn.Module, height: int, width: int, channels: int = 3
) -> list[tuple[str, tuple[int, ...] | None, bool]]:
    """Run a forward pass; (module name, output shape or None, has children) per call, in completion order."""
    import torch

    calls: list[tuple[str, tuple[int, ...] | None, bool]] = []
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def record(module, inputs, output, name=name, is_block=any(True for _ in module.children())):
            calls.append((name, tuple(output.shape) if isinstance(output, torch.Tensor) else None, is_block))

        handles.append(module.register_forward_hook(record))
    try:
        with torch.inference_mode():
            model(_image(model, height, width, channels))
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _module_outputs(
    arch: str, model: torch.nn.Module, height: int, width: int, channels: int = 3
) -> tuple[list[_Output], tuple[int, int] | None]:
    """Every module call's output at (height, width), with its shape at twice the size if the model runs there."""
    try:
        calls = _forward_shapes(model, height, width, channels)
    except Exception as error:
        raise input_size_error(arch, model, height, width, error) from None
    other_size: tuple[int, int] | None = (2 * height, 2 * width)
    try:
        other_calls = _forward_shapes(model, *other_size, channels)
    except Exception as error:  # A model built for one input size only.
        log.debug("%s does not run at twice the size: %s", arch, error)
        other_calls, other_size = [], None
    same_flow = [name for name, _, _ in calls] == [name for name, _, _ in other_calls]
    outputs = [
        _Output(name, shape, other_calls[i][1] if same_flow else None, is_block)
        for i, (name, shape, is_block) in enumerate(calls)
        if shape is not None
    ]
    return outputs, other_size if same_flow else None


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _maps_in_flow(
    outputs: list[_Output], size: tuple[int, int], other_size: tuple[int, int] | None
) -> list[tuple[_Output, FeatureMap]]:
    """The module outputs that are maps of the input, each described as a FeatureMap named after its module."""
    maps: list[tuple[_Output, FeatureMap]] = []
    grids: list[tuple[int, int]] = []  # (positions, stride) of the spatial maps so far
    for output in outputs:
        feature = _feature(output.module, output.module, output.shape, output.other, size, other_size, grids)
        if feature is not None:
            maps.append((output, feature))
    return maps


def _feature(
    name: str,
    node: str,
    shape: Sequence[int],
    other: Sequence[int] | None,
    size: tuple[int, int],
    other_size: tuple[int, int] | None,
    grids: list[tuple[int, int]],
) -> FeatureMap | None:
    """Describe one output as a feature map, or None if it is no map of the input.

    A token sequence takes the stride of the latest grid it continues: one holding the sequence's
    positions plus fewer extra tokens (class, register) than a row. Spatial maps are added to `grids`.
    """
    layout = _map_layout(shape, other)
    token_stride = None
    if layout == TOKENS:
        fitting = [
            stride for positions, stride in grids if positions <= shape[1] < positions + max(2, math.isqrt(positions))
        ]
        if not fitting:
            return None
        token_stride = fitting[-1]
    channels, stride = _describe(shape, other, layout, size, other_size, token_stride)
    if layout is None or not stride:
        return None
    if layout != TOKENS:
        spatial = shape[2:] if layout == NCHW else shape[1:3]
        grids.append((spatial[0] * spatial[1], stride))
    return FeatureMap(name, node, list(shape), layout, channels, stride)


def natural_stages(arch: str, model: torch.nn.Module, height: int, width: int, channels: int = 3) -> list[FeatureMap]:
    """The multi-scale stages of a backbone, found from its own structure.

    Every module output that is a map of the input (see `_map_layout`) gets a stride. A module is
    a unit when everything inside it spans at most one reduction and ends at its own output's
    stride (ResNet's `layer2`, EfficientNet's `features.2`, Swin's patch merging); units are taken
    at the coarsest level, in order. The stage of each stride is the last unit at that stride,
    preferring blocks (modules with children) over single layers, and the stem is the last single
    layer before the first block (ResNet's `maxpool`, ViT's `conv_proj`). Stage nodes are module
    names, which `create_feature_extractor` takes as return nodes.
    """
    outputs, other_size = _module_outputs(arch, model, height, width, channels)
    maps = _maps_in_flow(outputs, (height, width), other_size)

    strides_within: dict[str, set[int]] = {}
    own_stride: dict[str, int] = {}
    for output, feature in maps:
        own_stride[output.module] = feature.stride  # the last call's output is the module's output
        for name in [output.module, *_ancestors(output.module)]:
            strides_within.setdefault(name, set()).add(feature.stride)

    @cache
    def is_unit(name: str) -> bool:
        spanned = strides_within.get(name, set())
        return name in own_stride and len(spanned) <= 2 and max(spanned) == own_stride[name]

    units: dict[str, tuple[_Output, FeatureMap]] = {}
    for output, feature in maps:
        if is_unit(output.module) and not any(is_unit(a) for a in _ancestors(output.module)):
            units.pop(output.module, None)  # a module called again: its last call counts
            units[output.module] = (output, feature)

    ordered = list(units.values())
    stages: list[FeatureMap] = []
    first_block = next((i for i, (output, _) in enumerate(ordered) if output.is_block), None)
    if first_block:
        stem = ordered[first_block - 1][1]
        stages.append(FeatureMap("stem", stem.node, stem.shape, stem.layout, stem.channels, stem.stride))
    by_stride: dict[int, FeatureMap] = {}
    has_block: set[int] = set()
    for output, feature in ordered[first_block or 0 :]:
        if output.is_block or feature.stride not in has_block:
            by_stride[feature.stride] = feature
        if output.is_block:
            has_block.add(feature.stride)
    for feature in sorted(by_stride.values(), key=lambda f: list(units).index(f.node)):
        if not stages or feature.stride >= stages[-1].stride:
            stages.append(feature)
    return stages


def graph_nodes(model: torch.nn.Module) -> list[str]:
    """The names of a model's graph nodes in eval mode (torch.fx), as `create_feature_extractor` takes them."""
    from torchvision.models.feature_extraction import get_graph_node_names

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.fx's notes on modules it traces through
        return get_graph_node_names(model)[1]


def _node_extractor(arch: str, model: torch.nn.Module, nodes: Mapping[str, str]):
    from torchvision.models.feature_extraction import create_feature_extractor

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return create_feature_extractor(model, return_nodes=dict(nodes))
    except ValueError as error:
        log.debug("create_feature_extractor refused %s: %s", list(nodes), error)
        available = graph_nodes(model)
        unknown = [node for node in nodes if not any(n == node or n.startswith(node + ".") for n in available)]
        suggestion = did_you_mean(unknown[0], available) if unknown else ""
        raise UsageError(
            f"{arch} has no graph node {', '.join(unknown) or ', '.join(nodes)}{suggestion} "
            f"(`resnet features {arch} --list-nodes` lists them)"
        ) from None


def _node_shapes(extractor, height: int, width: int) -> dict[str, tuple[int, ...] | None]:
    import torch

    with torch.inference_mode():
        outputs = extractor(torch.empty(1, 3, height, width, device="meta"))
    return {name: tuple(t.shape) if isinstance(t, torch.Tensor) else None for name, t in outputs.items()}


def node_maps(arch: str, model: torch.nn.Module, nodes: Sequence[str], height: int, width: int) -> list[FeatureMap]:
    """Shapes, layouts, channels and strides of any graph nodes (or module names) of a model."""
    extractor = _node_extractor(arch, model, {node: node for node in nodes})
    try:
        shapes = _node_shapes(extractor, height, width)
    except Exception as error:
        raise input_size_error(arch, model, height, width, error) from None
    other_size: tuple[int, int] | None = (2 * height, 2 * width)
    try:
        other_shapes = _node_shapes(extractor, *other_size)
    except Exception as error:  # A model built for one input size only.
        log.debug("%s does not run at twice the size: %s", arch, error)
        other_shapes, other_size = {}, None
    grids: list[tuple[int, int]] = []
    if any(shape is not None and len(shape) == 3 for shape in shapes.values()):
        # Token sequences take their stride from the grids of the model's spatial maps.
        outputs, flow_other_size = _module_outputs(arch, model, height, width)
        grids = [
            (
                feature.shape[2] * feature.shape[3] if feature.layout == NCHW else feature.shape[1] * feature.shape[2],
                feature.stride,
            )
            for _, feature in _maps_in_flow(outputs, (height, width), flow_other_size)
            if feature.layout != TOKENS
        ]
    maps = []
    for node in dict.fromkeys(nodes):
        shape = shapes[node]
        if shape is None:
            raise UsageError(f"{arch}: graph node {node} does not output a tensor")
        feature = _feature(node, node, shape, other_shapes.get(node), (height, width), other_size, list(grids))
        maps.append(feature or FeatureMap(node, node, list(shape), None, None, None))
    return maps


@dataclass(frozen=True)
class FeatureReport:
    """What `resnet features` reports: the maps of one architecture at one input size."""

    arch: str
    weights: str
    input_size: list[int]
    maps: list[FeatureMap]
    build: str = "meta"

    def record(self) -> dict:
        return {
            "arch": self.arch,
            "weights": self.weights,
            "input_size": self.input_size,
            "build": self.build,
            "maps": [m.record() for m in self.maps],
        }


def feature_maps(
    arch: str,
    *,
    weights: str | None = None,
    input_size: Sequence[int] | None = None,
    nodes: Sequence[str] | None = None,
    trust_checkpoint: bool = False,
) -> FeatureReport:
    """The natural multi-scale feature maps of an architecture (or the given graph nodes), on the meta device."""
    choice, model, _ = inspection_model(arch, weights, trust_checkpoint)
    height, width = input_hw(input_size, default_input_size(choice.arch, model, choice))
    maps = (
        node_maps(choice.arch, model, nodes, height, width)
        if nodes
        else natural_stages(choice.arch, model, height, width)
    )
    return FeatureReport(choice.arch, choice.name, [1, 3, height, width], maps)


def list_graph_nodes(arch: str, weights: str | None = None, trust_checkpoint: bool = False) -> list[str]:
    """The graph nodes of an architecture a user can pick with `--nodes`."""
    _, model, _ = inspection_model(arch, weights, trust_checkpoint)
    return graph_nodes(model)


def extract_features(
    arch: str,
    image_path: str,
    *,
    weights: str | None = None,
    nodes: Sequence[str] | None = None,
    settings=None,
    on_progress=None,
    trust_checkpoint: bool = False,
) -> tuple[FeatureReport, dict[str, torch.Tensor], list[str]]:
    """Run a real image through the model with its weights and return the feature tensors.

    The weights come through `factory.load_model` (cache, download, mirror, offline, checkpoint);
    the image through the weights' own preprocessing, which sets the input size. Maps are the
    natural stages (or `nodes`), keyed by name. Also returns the model's notes (warnings).
    """
    import torch

    from resnetcli.factory import load_model
    from resnetcli.images import load_image

    image = load_image(image_path)  # a bad image fails before any download
    loaded = load_model(arch, weights, settings=settings, on_progress=on_progress, trust_checkpoint=trust_checkpoint)
    batch = loaded.transforms(image).unsqueeze(0)
    height, width = batch.shape[-2:]
    plan = meta_model(
        loaded.arch, loaded.weights, num_classes=None if loaded.weights.pretrained else len(loaded.categories)
    )
    maps = (
        node_maps(loaded.arch, plan, nodes, height, width)
        if nodes
        else natural_stages(loaded.arch, plan, height, width)
    )
    extractor = _node_extractor(loaded.arch, loaded.model, {feature.node: feature.name for feature in maps})
    with torch.inference_mode():
        tensors = extractor(batch)
    maps = [FeatureMap(f.name, f.node, list(tensors[f.name].shape), f.layout, f.channels, f.stride) for f in maps]
    return FeatureReport(loaded.arch, loaded.weights.name, list(batch.shape), maps), dict(tensors), loaded.notes


def save_features(tensors: Mapping[str, torch.Tensor], path) -> None:
    """Save feature tensors by name: `.npz` through numpy, `.pt` as a dict of tensors through torch.save."""
    import torch

    path = check_save_path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            import numpy

            numpy.savez(path, **{name: tensor.detach().cpu().numpy() for name, tensor in tensors.items()})
        else:
            torch.save({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}, path)
    except OSError as error:
        raise UsageError(f"--save {path}: cannot write: {error.strerror or error}") from None
