"""Model inspection without weights: layer summaries, parameter lists and feature maps.

Models are built on PyTorch's meta device, so shapes and counts come without allocating memory
or paying for random initialisation. Nothing here knows a particular architecture: stages, layouts
and strides are read from what a model's modules output.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Sequence

from resnetcli.errors import CheckpointError, UsageError
from resnetcli.registry import resolve_architecture, weights_enum

if TYPE_CHECKING:  # pragma: no cover
    import torch


@dataclass(frozen=True)
class LayerRow:
    """One row of the layer tree."""

    depth: int
    name: str
    type: str
    output_shape: list[int] | None
    params: int
    kernel_size: list[int] | None = None
    mult_adds: int | None = None


@dataclass(frozen=True)
class ParamRow:
    """One parameter or buffer of a model's state."""

    name: str
    shape: list[int]
    dtype: str
    kind: str  # "parameter" or "buffer"
    trainable: bool


@dataclass
class Summary:
    """What `resnet summary` reports."""

    arch: str
    input_size: list[int]
    layers: list[LayerRow]
    total_params: int
    trainable_params: int
    mult_adds: int
    params_size_mb: float
    forward_size_mb: float
    input_size_mb: float
    parameters: list[ParamRow] = field(default_factory=list)

    @property
    def totals(self) -> dict:
        """Totals as a record."""
        return {
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "non_trainable_params": self.total_params - self.trainable_params,
            "mult_adds": self.mult_adds,
            "input_size_mb": round(self.input_size_mb, 2),
            "forward_size_mb": round(self.forward_size_mb, 2),
            "params_size_mb": round(self.params_size_mb, 2),
            "estimated_total_size_mb": round(self.input_size_mb + self.forward_size_mb + self.params_size_mb, 2),
        }


# ---------------------------------------------------------------------------------------------
# Building models on the meta device


@contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Move every parameter and buffer to the meta device as a module registers it.

    For builders that compute their widths with torch (RegNet's `BlockParams`), under which a
    plain `torch.device("meta")` fails: their arithmetic stays on the CPU, the model's tensors
    still end up on meta (each is allocated uninitialised for a moment, one at a time).
    """
    import torch

    module_class = torch.nn.Module
    register_parameter, register_buffer = module_class.register_parameter, module_class.register_buffer

    def parameter_on_meta(self, name, param):
        if param is not None and not param.is_meta:
            param = type(param)(param.to("meta"), requires_grad=param.requires_grad)
        register_parameter(self, name, param)

    def buffer_on_meta(self, name, tensor, persistent=True):
        register_buffer(self, name, tensor.to("meta") if tensor is not None else None, persistent)

    module_class.register_parameter, module_class.register_buffer = parameter_on_meta, buffer_on_meta
    try:
        yield
    finally:
        module_class.register_parameter, module_class.register_buffer = register_parameter, register_buffer


@contextmanager
def _without_loading(weights) -> Iterator[None]:
    """Let a builder configure a model for `weights` (image size, class count, input transform)
    without reading the weights file: `get_state_dict` serves nothing and loading is skipped."""
    import torch

    module_class = torch.nn.Module
    load_state_dict = module_class.load_state_dict
    weights.__dict__["get_state_dict"] = lambda *args, **kwargs: {}
    module_class.load_state_dict = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        module_class.load_state_dict = load_state_dict
        weights.__dict__.pop("get_state_dict", None)


def meta_model(arch: str, num_classes: int | None = None) -> "torch.nn.Module":
    """Build an architecture on the meta device, in eval mode, without weights or random init.

    Without `num_classes` the model is configured as its default pretrained weights configure it
    (e.g. `vit_h_14` for 518-pixel inputs, 1000 classes), so its shapes and parameter count are those
    of the published model; with `num_classes` it is the plain architecture with that head.
    """
    import torch
    from torchvision import models

    arch = resolve_architecture(arch)
    builder = models.get_model_builder(arch)
    default = weights_enum(arch).DEFAULT

    def build() -> "torch.nn.Module":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchvision's notes about future init changes
            if num_classes is not None:
                return builder(weights=None, num_classes=num_classes)
            with _without_loading(default):
                return builder(weights=default)

    try:
        with torch.device("meta"):
            model = build()
    except NotImplementedError:  # The builder needs real numbers ("Cannot copy out of meta tensor").
        with _parameters_on_meta():
            model = build()
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Summary


def parameter_rows(state: "torch.nn.Module | Mapping[str, torch.Tensor]", name_filter: str | None = None) -> list[ParamRow]:
    """Every parameter and buffer of a model (or the tensors of a state dict) with shape and dtype."""
    import torch

    rows: list[ParamRow] = []
    if isinstance(state, torch.nn.Module):
        parameters = dict(state.named_parameters())
        for key, tensor in state.state_dict(keep_vars=True).items():
            kind = "parameter" if key in parameters else "buffer"
            trainable = bool(kind == "parameter" and tensor.requires_grad)
            rows.append(ParamRow(key, list(tensor.shape), str(tensor.dtype).removeprefix("torch."), kind, trainable))
    else:
        for key, tensor in state.items():
            floating = tensor.is_floating_point() and not key.endswith(("running_mean", "running_var"))
            rows.append(ParamRow(key, list(tensor.shape), str(tensor.dtype).removeprefix("torch."), "parameter" if floating else "buffer", floating))
    if name_filter:
        rows = [row for row in rows if name_filter in row.name]
    return rows


def parse_input_size(values: Sequence[int] | None, default: int) -> tuple[int, int]:
    """`--input-size H[,W]` as (H, W)."""
    if not values:
        return default, default
    if len(values) == 1:
        return values[0], values[0]
    if len(values) == 2:
        return values[0], values[1]
    raise UsageError("--input-size takes H or H,W")


def default_input_size(arch: str) -> int:
    """The input size the architecture's default weights were evaluated at (crop size of its transforms)."""
    default = weights_enum(arch).DEFAULT
    crop = getattr(default.transforms(), "crop_size", None)
    if crop:
        return int(crop[0])
    return int(default.meta.get("min_size", (224, 224))[0])


def _check_fit(arch: str, model: "torch.nn.Module", state_dict: Mapping[str, "torch.Tensor"], source: str) -> None:
    """Raise CheckpointError unless the checkpoint has exactly the model's tensor names and shapes."""
    expected = {key: list(tensor.shape) for key, tensor in model.state_dict().items()}
    problems = [f"missing {key}" for key in expected if key not in state_dict]
    problems += [f"unexpected {key}" for key in state_dict if key not in expected]
    problems += [
        f"{key} is {list(state_dict[key].shape)}, {arch} has {shape}"
        for key, shape in expected.items()
        if key in state_dict and list(state_dict[key].shape) != shape
    ]
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"{source}: does not fit {arch}: {'; '.join(problems[:3])}{more}")


def summarize(
    arch: str,
    *,
    input_size: Sequence[int] | None = None,
    batch: int = 1,
    depth: int = 3,
    state_dict: Mapping[str, "torch.Tensor"] | None = None,
    source: str = "checkpoint",
    name_filter: str | None = None,
) -> Summary:
    """The torchinfo layer tree, totals and parameter list of an architecture, on the meta device.

    With `state_dict` (a fine-tuned checkpoint, named `source` in errors) the model takes the
    checkpoint's head, is checked against it, and the parameter list shows the checkpoint's tensors.
    """
    from torchinfo import summary as torchinfo_summary

    from resnetcli.registry import checkpoint_class_count

    arch = resolve_architecture(arch)
    height, width = parse_input_size(input_size, default_input_size(arch))
    if state_dict is not None:
        model = meta_model(arch, num_classes=checkpoint_class_count(arch, state_dict))
        _check_fit(arch, model, state_dict, source)
    else:
        model = meta_model(arch)
    shape = [batch, 3, height, width]
    try:
        stats = torchinfo_summary(
            model,
            input_size=tuple(shape),
            device="meta",
            depth=depth,
            verbose=0,
            col_names=("output_size", "num_params", "kernel_size", "mult_adds"),
        )
    except Exception as error:  # torchinfo wraps the model's own error; find its cause.
        raise input_size_error(arch, model, height, width, error) from None
    layers = [
        LayerRow(
            depth=layer.depth,
            name=layer.var_name if layer.depth else arch,
            type=layer.class_name,
            output_shape=list(layer.output_size) if layer.output_size else None,
            params=layer.num_params if layer.depth else stats.total_params,
            kernel_size=_as_list(layer.kernel_size),
            mult_adds=layer.macs or None,
        )
        for layer in stats.summary_list
        if layer.depth <= depth
    ]
    megabyte = 1e6
    return Summary(
        arch=arch,
        input_size=shape,
        layers=layers,
        total_params=stats.total_params,
        trainable_params=stats.trainable_params,
        mult_adds=stats.total_mult_adds,
        params_size_mb=stats.total_param_bytes / megabyte,
        forward_size_mb=stats.total_output_bytes / megabyte,
        input_size_mb=stats.total_input / megabyte,
        parameters=parameter_rows(state_dict if state_dict is not None else model, name_filter),
    )


def _as_list(value) -> list[int] | None:
    if value is None or value == []:
        return None
    return [value] if isinstance(value, int) else list(value)


# ---------------------------------------------------------------------------------------------
# Input sizes


def _root_cause(error: BaseException) -> str:
    cause = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    text = str(cause).strip().splitlines()
    return text[0] if text else type(cause).__name__


def _runs_at(model: "torch.nn.Module", height: int, width: int) -> bool:
    import torch

    try:
        with torch.inference_mode():
            model(torch.empty(1, 3, height, width, device="meta"))
        return True
    except Exception:
        return False


def smallest_input_size(arch: str, model: "torch.nn.Module | None" = None) -> int | None:
    """The smallest square input an architecture runs on, by bisection on the meta device.

    The search runs between the smallest size torchvision documents for the default weights
    (`meta["min_size"]`) and the default input size; it returns a size that was seen to work, or
    None when not even the default size runs.
    """
    arch = resolve_architecture(arch)
    model = model if model is not None else meta_model(arch)
    high = default_input_size(arch)
    if not _runs_at(model, high, high):
        return None
    low = max(1, min(int(weights_enum(arch).DEFAULT.meta.get("min_size", (1, 1))[0]), high))
    while low < high:
        middle = (low + high) // 2
        if _runs_at(model, middle, middle):
            high = middle
        else:
            low = middle + 1
    return high


def input_size_error(arch: str, model: "torch.nn.Module", height: int, width: int, error: BaseException) -> UsageError:
    """The usage error for an input the model cannot take: its own reason and the smallest size that works."""
    smallest = smallest_input_size(arch, model)
    hint = f"; the smallest size that works is {smallest}" if smallest else ""
    return UsageError(f"{arch} cannot run on a {height}x{width} input ({_root_cause(error)}){hint}")


# ---------------------------------------------------------------------------------------------
# Feature maps

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


def _describe(shape: Sequence[int], other: Sequence[int] | None, layout: str | None, size: tuple[int, int], other_size: tuple[int, int] | None, token_stride: int | None) -> tuple[int | None, int | None]:
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


def _forward_shapes(model: "torch.nn.Module", height: int, width: int) -> list[tuple[str, tuple[int, ...] | None, bool]]:
    """Run a meta forward pass; (module name, output shape or None, has children) per call, in completion order."""
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
            model(torch.empty(1, 3, height, width, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return calls


def _module_outputs(arch: str, model: "torch.nn.Module", height: int, width: int) -> tuple[list[_Output], tuple[int, int] | None]:
    """Every module call's output at (height, width), paired with its shape at twice the size if the model runs there."""
    try:
        calls = _forward_shapes(model, height, width)
    except Exception as error:
        raise input_size_error(arch, model, height, width, error) from None
    other_size: tuple[int, int] | None = (2 * height, 2 * width)
    try:
        other_calls = _forward_shapes(model, *other_size)
    except Exception:  # A model built for one input size only.
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


def natural_stages(arch: str, height: int, width: int, model: "torch.nn.Module | None" = None) -> list[FeatureMap]:
    """The multi-scale stages of a backbone, found from its own structure.

    Every module output that is a map of the input (see `_map_layout`) gets a stride. A module is
    a unit when everything inside it spans at most one reduction and ends at its own output's
    stride (ResNet's `layer2`, EfficientNet's `features.2`, Swin's patch merging); units are taken
    at the coarsest level, in order. The stage of each stride is the last unit at that stride,
    preferring blocks (modules with children) over single layers, and the stem is the last single
    layer before the first block (ResNet's `maxpool`, ViT's `conv_proj`).
    """
    arch = resolve_architecture(arch)
    model = model if model is not None else meta_model(arch)
    outputs, other_size = _module_outputs(arch, model, height, width)
    maps: list[tuple[_Output, FeatureMap]] = []
    last_grid: tuple[int, int] | None = None  # (positions, stride) of the latest spatial map
    for output in outputs:
        layout = _map_layout(output.shape, output.other)
        token_stride = None
        if layout == TOKENS:
            positions, grid_stride = last_grid or (0, None)
            # A token sequence continues the latest grid when it holds its positions plus fewer
            # extra tokens (class, register) than one row of it.
            if grid_stride is None or not positions <= output.shape[1] < positions + max(2, math.isqrt(positions)):
                continue
            token_stride = grid_stride
        channels, stride = _describe(output.shape, output.other, layout, (height, width), other_size, token_stride)
        if layout is None or not stride:
            continue
        if layout != TOKENS:
            spatial = output.shape[2:] if layout == NCHW else output.shape[1:3]
            last_grid = (spatial[0] * spatial[1], stride)
        maps.append((output, FeatureMap(output.module, output.module, list(output.shape), layout, channels, stride)))

    strides_within: dict[str, set[int]] = {}
    own_stride: dict[str, int] = {}
    for output, feature in maps:
        own_stride[output.module] = feature.stride  # the last call's output is the module's output
        for name in [output.module, *_ancestors(output.module)]:
            strides_within.setdefault(name, set()).add(feature.stride)

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
        stages.append(FeatureMap("stem", *_fields_after_name(ordered[first_block - 1][1])))
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


def _fields_after_name(feature: FeatureMap) -> tuple:
    return feature.node, feature.shape, feature.layout, feature.channels, feature.stride


def feature_maps(arch: str, *, input_size: Sequence[int] | None = None) -> list[FeatureMap]:
    """The natural multi-scale feature maps of an architecture at an input size."""
    arch = resolve_architecture(arch)
    height, width = parse_input_size(input_size, default_input_size(arch))
    return natural_stages(arch, height, width)
