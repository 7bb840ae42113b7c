"""Example inputs for any model: `--input-shape N,C,H,W` and `--input NAME=SHAPE[:DTYPE]`.

An example is what a model is called with: one tensor, or named tensors passed as keyword
arguments (`forward(tokens, mask)`) or as one dict (`forward(batch)` reading `batch["tokens"]`).
On the meta device the tensors cost nothing; for a model built on the CPU they are zeros.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

from resnetcli.errors import UsageError

log = logging.getLogger(__name__)

#: The name of the single input that --input-shape and --input-size give.
POSITIONAL = "input"
#: Sizes tried, smallest first, when an input does not fit: every size to 64, then every 8th to 1024.
SEARCH_SIZES = [*range(1, 65), *range(72, 1025, 8)]


@dataclass(frozen=True)
class InputSpec:
    """One example input: its name, shape and dtype (a torch dtype name such as float32, long or bool)."""

    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def record(self) -> dict:
        return {**asdict(self), "shape": list(self.shape)}

    def resized(self, size: int) -> InputSpec:
        """The same input with its trailing size dimensions (H and W of an image, L of a sequence) set to `size`."""
        dims = list(self.shape)
        for axis in size_axes(self.shape):
            dims[axis] = size
        return InputSpec(self.name, tuple(dims), self.dtype)


def size_axes(shape: Sequence[int]) -> list[int]:
    """The axes an input's size is searched along: H and W of N,C,H,W, L of N,L or N,C,L."""
    if len(shape) >= 4:
        return [len(shape) - 2, len(shape) - 1]
    return [len(shape) - 1] if len(shape) >= 2 else []


def parse_shape(text: str, option: str) -> tuple[int, ...]:
    """`1,3,224,224` (or 1x3x224x224) as a tuple of positive ints."""
    try:
        dims = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise UsageError(f"{option} {text}: expected a shape such as 1,3,224,224") from None
    if not dims or any(d < 1 for d in dims):
        raise UsageError(f"{option} {text}: expected a shape of positive sizes such as 1,3,224,224")
    return dims


def parse_input(text: str) -> InputSpec:
    """`NAME=SHAPE[:DTYPE]`, e.g. `tokens=1,16:long` or `mask=1,16:bool`."""
    name, equals, rest = text.partition("=")
    if not equals or not name.strip().isidentifier():
        raise UsageError(f"--input {text}: expected NAME=SHAPE[:DTYPE], e.g. tokens=1,16:long")
    shape, _, dtype = rest.partition(":")
    dtype = dtype.strip() or "float32"
    _dtype(dtype, f"--input {text}")
    return InputSpec(name.strip(), parse_shape(shape, f"--input {text}"), dtype)


def _dtype(name: str, option: str):
    import torch

    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise UsageError(f"{option}: unknown dtype {name!r} (float32, float16, long, int32, bool, ...)")
    return dtype


def tensors(inputs: Sequence[InputSpec], device) -> dict[str, Any]:
    import torch

    return {i.name: torch.zeros(i.shape, dtype=_dtype(i.dtype, f"--input {i.name}"), device=device) for i in inputs}


def example(model, inputs: Sequence[InputSpec], device) -> Any:
    """What to call `model` with: one tensor, keyword tensors, or a dict, as its forward's signature asks."""
    values = tensors(inputs, device)
    if len(inputs) == 1 and inputs[0].name == POSITIONAL:
        return values[POSITIONAL]
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # a forward without a signature: keywords are the best guess
        log.debug("no signature for %s.forward; passing the inputs as keywords", type(model).__name__)
        return values
    takes_keywords = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    if takes_keywords or all(name in parameters for name in values):
        return values
    positional = [p for p in parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) == 1:
        return (values,)  # forward(batch) with batch["tokens"], batch["mask"]
    return tuple(values.values())


def runs(call: Callable[[Sequence[InputSpec]], Any], inputs: Sequence[InputSpec]) -> bool:
    """Whether `call` (a forward pass on these inputs) succeeds."""
    try:
        call(inputs)
        return True
    except Exception as error:  # any failure means "not with these inputs"; the cause is logged
        log.debug("%s does not run: %s", [i.shape for i in inputs], error)
        return False


def smallest_fitting(
    call: Callable[[Sequence[InputSpec]], Any], inputs: Sequence[InputSpec]
) -> tuple[int, list[InputSpec]] | None:
    """The smallest size (see `size_axes`) of the first input that runs, and the inputs at that size.

    Sizes are tried upwards (every size to 64, then every 8th to 1024, then back down to the first
    size that works), because a model with a fixed-size head, such as LeNet's 16x5x5 flatten, runs
    at a narrow range of sizes only; a bisection would miss it.
    """
    if not inputs or not size_axes(inputs[0].shape):
        return None

    def at(size: int) -> list[InputSpec]:
        # Inputs shaped like the first (a mask beside its tokens) follow it.
        return [i.resized(size) if i.shape == inputs[0].shape else i for i in inputs]

    previous = 0
    for size in SEARCH_SIZES:
        if runs(call, at(size)):
            for smaller in range(previous + 1, size):
                if runs(call, at(smaller)):
                    return smaller, at(smaller)
            return size, at(size)
        previous = size
    return None
