"""Model inspection without weights: layer summaries, parameter lists and feature maps.

Models are built on PyTorch's meta device, so shapes and counts come without allocating memory
or paying for random initialisation.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Sequence

from resnetcli.errors import UsageError
from resnetcli.registry import build_meta_model, resolve_architecture

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
    from resnetcli.registry import weights_enum

    transforms = weights_enum(arch).DEFAULT.transforms()
    crop = getattr(transforms, "crop_size", None)
    if crop:
        return int(crop[0])
    return int(weights_enum(arch).DEFAULT.meta.get("min_size", (224, 224))[0])


def _meta_model(arch: str, state_dict: Mapping[str, "torch.Tensor"] | None):
    from resnetcli.registry import checkpoint_class_count

    num_classes = checkpoint_class_count(arch, state_dict) if state_dict is not None else None
    return build_meta_model(arch, num_classes=num_classes)


def summarize(
    arch: str,
    *,
    input_size: Sequence[int] | None = None,
    batch: int = 1,
    depth: int = 3,
    state_dict: Mapping[str, "torch.Tensor"] | None = None,
    name_filter: str | None = None,
) -> Summary:
    """The torchinfo layer tree, totals and parameter list of an architecture, on the meta device."""
    from torchinfo import summary as torchinfo_summary

    arch = resolve_architecture(arch)
    height, width = parse_input_size(input_size, default_input_size(arch))
    model = _meta_model(arch, state_dict)
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
        raise _input_too_small(arch, height, width, error) from None
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


def _input_too_small(arch: str, height: int, width: int, error: Exception) -> UsageError:
    cause = error
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
    smallest = smallest_input_size(arch)
    hint = f"; the smallest size that works is {smallest}" if smallest else ""
    text = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return UsageError(f"{arch} cannot run on a {height}x{width} input ({text}){hint}")


def _runs_at(arch: str, model, size: int) -> bool:
    import torch

    try:
        with torch.inference_mode():
            model(torch.empty(1, 3, size, size, device="meta"))
        return True
    except Exception:
        return False


def smallest_input_size(arch: str) -> int | None:
    """The smallest square input an architecture accepts, by bisection on the meta device."""
    model = build_meta_model(arch)
    low, high = 1, 1024
    if not _runs_at(arch, model, high):
        return None
    while low < high:
        middle = (low + high) // 2
        if _runs_at(arch, model, middle):
            high = middle
        else:
            low = middle + 1
    return low


# ---------------------------------------------------------------------------------------------
# Feature maps


@dataclass(frozen=True)
class FeatureMap:
    """One feature map of a backbone: where it is taken and what it looks like."""

    name: str
    node: str
    shape: list[int]
    channels: int
    stride: int


def _module_outputs(model, height: int, width: int) -> list[tuple[str, object, int]]:
    """Run a meta forward pass and record (module name, output, number of children) in completion order."""
    import torch

    records: list[tuple[str, object, int]] = []
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(module, inputs, output, name=name):
            records.append((name, output, len(list(module.children()))))

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.inference_mode():
            model(torch.empty(1, 3, height, width, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return records


def natural_stages(arch: str, height: int, width: int) -> list[FeatureMap]:
    """The multi-scale stages of a backbone, found from its structure.

    Modules are taken at the coarsest level that does not hide a change of resolution (a unit
    whose insides span more than two strides is opened up); the stage at each stride is the last
    such unit at that stride, and the stem is the last plain layer before the first block.
    """
    import torch

    model = build_meta_model(arch)
    records = [
        (name, output, children)
        for name, output, children in _module_outputs(model, height, width)
        if isinstance(output, torch.Tensor) and output.ndim == 4
    ]
    stride_of = {name: height // output.shape[2] if output.shape[2] else 0 for name, output, _ in records}
    strides_inside: dict[str, set[int]] = {}
    for name in stride_of:
        for ancestor in _ancestors(name):
            strides_inside.setdefault(ancestor, set()).add(stride_of[name])

    def opened(name: str) -> bool:
        return len(strides_inside.get(name, set())) > 2

    units: list[tuple[str, object, int]] = []
    for name, output, children in records:
        if any(opened(ancestor) is False and ancestor in stride_of for ancestor in _ancestors(name)):
            continue  # Shown as part of an enclosing unit.
        if opened(name):
            continue
        units.append((name, output, children))
    units = [u for u in units if u[1].shape[2] * u[1].shape[3] > 1 or height * width == 1]

    stages: list[FeatureMap] = []
    first_block = next((i for i, unit in enumerate(units) if unit[2] > 0), None)
    if first_block:
        stem_name, stem_output, _ = units[first_block - 1]
        stages.append(_feature("stem", stem_name, stem_output, height))
    for index, (name, output, _) in enumerate(units):
        next_stride = stride_of[units[index + 1][0]] if index + 1 < len(units) else None
        if first_block is not None and index < first_block:
            continue
        if next_stride != stride_of[name]:
            stages.append(_feature(name, name, output, height))
    return stages


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _feature(label: str, node: str, output, height: int) -> FeatureMap:
    shape = list(output.shape)
    return FeatureMap(label, node, shape, shape[1], height // shape[2])


def feature_maps(arch: str, *, input_size: Sequence[int] | None = None) -> list[FeatureMap]:
    """The natural multi-scale feature maps of an architecture at an input size."""
    arch = resolve_architecture(arch)
    height, width = parse_input_size(input_size, default_input_size(arch))
    try:
        return natural_stages(arch, height, width)
    except Exception as error:
        raise _input_too_small(arch, height, width, error) from None
