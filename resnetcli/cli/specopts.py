"""Options and parsing shared by `summary` and `features` for any model spec, and the ONNX summary's output."""

from __future__ import annotations

import sys
from typing import Optional

import typer
from typing_extensions import Annotated

from resnetcli.cli.output import OutputFormat, RecordWriter
from resnetcli.cli.tables import display, print_fitted
from resnetcli.errors import UsageError

InputShapeOption = Annotated[
    Optional[str],
    typer.Option("--input-shape", metavar="N,C,H,W", help="The whole shape of the example input (any model)."),
]
InputOption = Annotated[
    Optional[list[str]],
    typer.Option(
        "--input",
        metavar="NAME=SHAPE[:DTYPE]",
        help="A named example input, repeatable: --input tokens=1,16:long --input mask=1,16:bool "
        "(passed as keywords, or as one dict when forward takes one argument).",
    ),
]
KwargsOption = Annotated[
    Optional[str],
    typer.Option(
        "--kwargs", metavar="JSON", help="Keyword arguments for a model class or function: '{\"num_classes\": 10}'."
    ),
]
InputSizeOption = Annotated[
    Optional[str],
    typer.Option(
        "--input-size",
        "-s",
        metavar="H[,W]",
        help="Input height and width (default: the crop size of the weights' preprocessing).",
    ),
]


def parse_kwargs(text: Optional[str]) -> dict:
    import json

    if text is None:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(f"--kwargs {text}: not JSON ({error})") from None
    if not isinstance(value, dict):
        raise UsageError(f"--kwargs {text}: expected a JSON object such as '{{\"num_classes\": 10}}'")
    return value


def parse_inputs(input_shape: Optional[str], inputs: Optional[list[str]]) -> list:
    from resnetcli.examples import POSITIONAL, InputSpec, parse_input, parse_shape

    if input_shape and inputs:
        raise UsageError("--input-shape and --input do not go together: name every input with --input")
    if input_shape:
        return [InputSpec(POSITIONAL, parse_shape(input_shape, "--input-shape"))]
    return [parse_input(text) for text in inputs or []]


def no_weights_for_specs(weights: Optional[str]) -> None:
    if weights is not None:
        raise UsageError("--weights applies to torchvision architectures; a model spec is shown as it is built")


def torchvision_shape(input_shape, inputs, kwargs, batch: int, size):
    """A torchvision architecture takes --input-size and --batch, or --input-shape N,3,H,W."""
    from resnetcli.examples import parse_shape

    if inputs or kwargs:
        raise UsageError("--input and --kwargs apply to model specs (file.py:Name, module:Name, timm:NAME)")
    if input_shape is None:
        return batch, size
    shape = parse_shape(input_shape, "--input-shape")
    if len(shape) != 4 or shape[1] != 3:
        raise UsageError(f"--input-shape {input_shape}: torchvision classifiers take N,3,H,W")
    return shape[0], [shape[2], shape[3]]


def write_onnx_summary(fmt: OutputFormat, document: dict) -> None:
    import json

    tensors = [{"kind": kind, **t} for kind in ("inputs", "outputs") for t in document[kind]]
    if fmt is OutputFormat.json:
        sys.stdout.write(json.dumps(document, ensure_ascii=False, indent=2) + "\n")
    elif fmt is OutputFormat.table:
        tensors = [{**t, "kind": t["kind"].rstrip("s")} for t in tensors]
        print_fitted(
            ["kind", "name", "shape", "dtype"], tensors, f"{document['model']} ({document['producer']})", sys.stdout
        )
        print_fitted(["op_type", "count"], document["operators"], "operators", sys.stdout)
        totals = [{"total": key, "value": display(key, value)} for key, value in document["totals"].items()]
        print_fitted(["total", "value"], totals, "totals", sys.stdout)
        metadata = [{"key": key, "value": value} for key, value in document["metadata"].items()]
        if metadata:
            print_fitted(["key", "value"], metadata, "metadata", sys.stdout)
    else:
        with RecordWriter(fmt, ["kind", "name", "shape", "dtype"]) as writer:
            for row in tensors:
                writer.write({**row, "kind": row["kind"].rstrip("s")})
    sys.stdout.flush()
