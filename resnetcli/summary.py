"""`resnet summary`: a model's layer tree, totals, operation count and parameter list, without weights.

Models are built on PyTorch's meta device, so shapes and counts come without allocating memory or
paying for random initialisation. The layer tree is torchinfo's; the operation count is PyTorch's
own `torch.utils.flop_counter`, which also counts the matrix products that torchinfo's module
hooks cannot see (attention's `q @ k`, functional `linear` calls).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from resnetcli.shapes import default_input_size, input_hw, input_size_error, inspection_model

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)

MEGABYTE = 1e6

#: What the two operation counts mean; shown with the totals.
GFLOPS_NOTE = (
    "gflops: every operation (torch.utils.flop_counter) in multiply-adds, as torchvision's meta['_ops']; "
    "mult_adds: torchinfo's count of module calls only, without functional matrix products such as attention's"
)


@dataclass(frozen=True)
class LayerRow:
    """One row of the layer tree; `name` is the module's qualified name (`layer1.0.conv1`), the root's the model's."""

    depth: int
    name: str
    type: str
    output_shape: list[int] | None
    params: int
    kernel_size: list[int] | None = None
    mult_adds: int | None = None

    def record(self) -> dict:
        return {
            "depth": self.depth,
            "layer": self.name,
            "type": self.type,
            "output_shape": self.output_shape,
            "params": self.params,
            "kernel_size": self.kernel_size,
            "mult_adds": self.mult_adds,
        }


@dataclass(frozen=True)
class ParamRow:
    """One parameter or buffer of a model's state."""

    name: str
    shape: list[int]
    dtype: str
    kind: str  # "parameter" or "buffer"
    trainable: bool

    def record(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class InputTensor:
    """One example input a model was run on."""

    name: str
    shape: list[int]
    dtype: str

    def record(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Summary:
    """What `resnet summary` reports about a torch model."""

    arch: str
    weights: str
    input_size: list[int]
    layers: list[LayerRow]
    total_params: int
    trainable_params: int
    mult_adds: int
    gflops: float | None
    params_size_mb: float
    forward_size_mb: float
    input_size_mb: float
    parameters: list[ParamRow] = field(default_factory=list)
    inputs: list[InputTensor] = field(default_factory=list)
    build: str = "meta"  # where the model was built: "meta" (no memory) or "cpu" (a real build)
    notes: list[str] = field(default_factory=list)

    @property
    def totals(self) -> dict:
        """Totals as a record."""
        return {
            "total_params": self.total_params,
            "trainable_params": self.trainable_params,
            "non_trainable_params": self.total_params - self.trainable_params,
            "gflops": float(f"{self.gflops:.6g}") if self.gflops is not None else None,
            "mult_adds": self.mult_adds,
            "input_size_mb": round(self.input_size_mb, 2),
            "forward_size_mb": round(self.forward_size_mb, 2),
            "params_size_mb": round(self.params_size_mb, 2),
            "estimated_total_size_mb": round(self.input_size_mb + self.forward_size_mb + self.params_size_mb, 2),
        }

    def record(self) -> dict:
        """The whole report as one JSON-ready document."""
        return {
            "arch": self.arch,
            "weights": self.weights,
            "input_size": self.input_size,
            "inputs": [i.record() for i in self.inputs],
            "build": self.build,
            "totals": self.totals,
            "notes": [GFLOPS_NOTE, *self.notes],
            "layers": [row.record() for row in self.layers],
            "parameters": [row.record() for row in self.parameters],
        }


def parameter_rows(
    model: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    name_filter: str | None = None,
) -> list[ParamRow]:
    """Every parameter and buffer of a model with shape, dtype and whether it is trainable.

    With `state_dict` (a checkpoint that fits the model) shapes and dtypes are the checkpoint's own
    (a half-precision checkpoint shows float16).
    """
    parameters = dict(model.named_parameters())
    rows: list[ParamRow] = []
    for key, tensor in model.state_dict(keep_vars=True).items():
        if state_dict is not None and key in state_dict:
            tensor = state_dict[key]
        kind = "parameter" if key in parameters else "buffer"
        trainable = bool(kind == "parameter" and parameters[key].requires_grad)
        rows.append(ParamRow(key, list(tensor.shape), str(tensor.dtype).removeprefix("torch."), kind, trainable))
    if name_filter:
        rows = [row for row in rows if name_filter in row.name]
    return rows


def count_gflops(model: torch.nn.Module, example: Any) -> float:
    """Multiply-adds of one forward pass, in billions, from torch's own operator-level counter.

    torch counts a multiply-add as 2 FLOPs; torchvision's `meta["_ops"]` (its "GFLOPS") counts it
    as one, so the total is halved to agree with it (resnet50 at 224: 4.089, vit_b_16: 17.564).
    """
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        call_model(model, example)
    return counter.get_total_flops() / 2e9


def call_model(model: torch.nn.Module, example: Any) -> Any:
    """Run a model on an example: a tensor, a tuple of positional tensors, or a dict of keyword tensors."""
    if isinstance(example, dict):
        return model(**example)
    if isinstance(example, tuple):
        return model(*example)
    return model(example)


def _device_of(model: torch.nn.Module, example: Any):
    """Where a model and its example live (torchinfo would otherwise move both to its own pick)."""
    import torch

    for tensor in [*model.parameters(), *model.buffers()]:
        return tensor.device
    values = example.values() if isinstance(example, dict) else example if isinstance(example, tuple) else [example]
    return next((v.device for v in values if isinstance(v, torch.Tensor)), torch.device("cpu"))


def _as_list(value) -> list[int] | None:
    if value is None or value == []:
        return None
    return [value] if isinstance(value, int) else list(value)


def model_summary(
    title: str,
    model: torch.nn.Module,
    example: Any,
    *,
    depth: int,
    weights: str,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    name_filter: str | None = None,
    inputs: Sequence[InputTensor] = (),
    build: str = "meta",
) -> Summary:
    """torchinfo's layer tree and totals, torch's operation count and the parameter list of a built model.

    `example` is what the model is called with (see `call_model`); errors are the model's own, raised as they come.
    """
    from torchinfo import summary as torchinfo_summary

    stats = torchinfo_summary(
        model,
        input_data=list(example) if isinstance(example, tuple) else example,
        device=_device_of(model, example),
        depth=depth,
        verbose=0,
        col_names=("output_size", "num_params", "kernel_size", "mult_adds"),
    )
    qualified_names = {id(module): name for name, module in model.named_modules()}
    layers = [
        LayerRow(
            depth=layer.depth,
            name=qualified_names.get(layer.layer_id, layer.var_name) if layer.depth else title,
            type=layer.class_name,
            output_shape=list(layer.output_size) if layer.output_size else None,
            params=layer.num_params if layer.depth else stats.total_params,
            kernel_size=_as_list(layer.kernel_size),
            mult_adds=(layer.macs if layer.depth else stats.total_mult_adds) or None,
        )
        for layer in stats.summary_list
        if layer.depth <= depth
    ]
    try:
        gflops: float | None = count_gflops(model, example)
    except Exception as error:  # an operator the counter cannot run; torchinfo's figures stand
        log.debug("flop counting failed for %s: %s", title, error)
        gflops = None
    first = inputs[0].shape if inputs else list(getattr(example, "shape", []))
    return Summary(
        arch=title,
        weights=weights,
        input_size=first,
        layers=layers,
        total_params=stats.total_params,
        trainable_params=stats.trainable_params,
        mult_adds=stats.total_mult_adds,
        gflops=gflops,
        params_size_mb=stats.total_param_bytes / MEGABYTE,
        forward_size_mb=stats.total_output_bytes / MEGABYTE,
        input_size_mb=stats.total_input / MEGABYTE,
        parameters=parameter_rows(model, state_dict, name_filter),
        inputs=list(inputs),
        build=build,
    )


def summarize(
    arch: str,
    *,
    weights: str | None = None,
    input_size: Sequence[int] | None = None,
    batch: int = 1,
    depth: int = 3,
    name_filter: str | None = None,
    trust_checkpoint: bool = False,
) -> Summary:
    """The summary of a torchvision architecture, on the meta device.

    `weights` is a weights name, `none` or a checkpoint file (see `shapes.inspection_model`); with a
    checkpoint, the parameter list shows the checkpoint's own shapes and dtypes (a fine-tuned `fc.weight`).
    """
    import torch

    choice, model, state_dict = inspection_model(arch, weights, trust_checkpoint)
    arch = choice.arch
    height, width = input_hw(input_size, default_input_size(arch, model, choice))
    shape = [batch, 3, height, width]
    example = torch.empty(*shape, device="meta")
    try:
        return model_summary(
            arch,
            model,
            example,
            depth=depth,
            weights=choice.name,
            state_dict=state_dict,
            name_filter=name_filter,
            inputs=[InputTensor("input", shape, "float32")],
        )
    except Exception as error:  # torchinfo wraps the model's own error; find its cause.
        raise input_size_error(arch, model, height, width, error) from None
