"""`resnet summary model.onnx`: what an exported ONNX file holds, read with the `onnx` package only.

Graph inputs and outputs (shapes, with symbolic dimensions by name, and dtypes), an operator
histogram, the parameter count and size (the graph's initializers), and the metadata_props that
`resnet export` writes (arch, weights, classes, preprocessing). Never imports torch.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from resnetcli.errors import UsageError

MEGABYTE = 1e6


@dataclass(frozen=True)
class OnnxTensor:
    """A graph input or output: name, shape (ints, or names of symbolic dimensions such as `batch`) and dtype."""

    name: str
    shape: list
    dtype: str
    kind: str  # "input" or "output"

    def record(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class OnnxSummary:
    """What `resnet summary` reports about an ONNX file."""

    path: str
    ir_version: int
    opsets: dict[str, int]
    producer: str
    tensors: list[OnnxTensor]
    operators: dict[str, int]
    total_params: int
    params_size_mb: float
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def totals(self) -> dict:
        return {
            "total_params": self.total_params,
            "params_size_mb": round(self.params_size_mb, 2),
            "nodes": sum(self.operators.values()),
            "operator_types": len(self.operators),
        }

    def record(self) -> dict:
        return {
            "model": self.path,
            "format": "onnx",
            "ir_version": self.ir_version,
            "opsets": self.opsets,
            "producer": self.producer,
            "inputs": [t.record() for t in self.tensors if t.kind == "input"],
            "outputs": [t.record() for t in self.tensors if t.kind == "output"],
            "operators": [{"op_type": op, "count": count} for op, count in self.operators.items()],
            "totals": self.totals,
            "metadata": self.metadata,
        }


def _dtype_name(elem_type: int) -> str:
    import onnx

    return onnx.TensorProto.DataType.Name(elem_type).lower() if elem_type else "unknown"


def _shape(value) -> list:
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return []
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tensor_type.shape.dim]


def _itemsize(data_type: int) -> int:
    import onnx.helper

    try:
        return onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize
    except (KeyError, TypeError, ValueError):  # a dtype numpy has no counterpart for (e.g. 4-bit types)
        return 1


def summarize_onnx(path) -> OnnxSummary:
    """Read an ONNX file's graph without its external data; a file that is not ONNX is a usage error."""
    try:
        import onnx
    except ImportError as error:
        raise UsageError("reading .onnx files needs the onnx package: pip install onnx") from error
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # protobuf's DecodeError and friends: the file is not a model
        raise UsageError(f"{path}: not an ONNX model ({type(error).__name__}: {error})") from error
    graph = model.graph
    initializers = {init.name for init in graph.initializer}
    tensors = [
        OnnxTensor(v.name, _shape(v), _dtype_name(v.type.tensor_type.elem_type), "input")
        for v in graph.input
        if v.name not in initializers
    ]
    tensors += [
        OnnxTensor(v.name, _shape(v), _dtype_name(v.type.tensor_type.elem_type), "output") for v in graph.output
    ]
    operators = Counter(node.op_type for node in graph.node)
    total = sum(math.prod(init.dims) for init in graph.initializer)
    size = sum(math.prod(init.dims) * _itemsize(init.data_type) for init in graph.initializer)
    return OnnxSummary(
        path=str(path),
        ir_version=model.ir_version,
        opsets={(o.domain or "ai.onnx"): o.version for o in model.opset_import},
        producer=" ".join(p for p in (model.producer_name, model.producer_version) if p),
        tensors=tensors,
        operators=dict(sorted(operators.items(), key=lambda item: (-item[1], item[0]))),
        total_params=total,
        params_size_mb=size / MEGABYTE,
        metadata={prop.key: prop.value for prop in model.metadata_props},
    )
