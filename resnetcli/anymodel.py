"""`summary` and `features` of any model spec: a user's nn.Module (file or module) or a timm model.

The model is built by resnetcli.specs (meta device first, the CPU when it must), run on example
inputs (resnetcli.examples), and summarised by the same code as torchvision's models. An input that
does not fit is reported with the smallest size that does.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

from resnetcli import examples, specs
from resnetcli.errors import UsageError
from resnetcli.examples import InputSpec
from resnetcli.features import FeatureMap, FeatureReport, _map_layout, natural_stages
from resnetcli.shapes import root_cause
from resnetcli.summary import InputTensor, Summary, call_model, model_summary

log = logging.getLogger(__name__)

#: What the weights column says for models built here: their own initialisation, nothing loaded.
AS_BUILT = {specs.TIMM: "none (random init; nothing downloaded)", specs.PYTHON: "as built"}


@contextmanager
def plain_attention() -> Iterator[None]:
    """nn.TransformerEncoder and nn.MultiheadAttention without their inference fast path, for this block only.

    The fast path packs a padded batch into a nested tensor, which has no meta kernel and no sizes for
    torchinfo's hooks to read; the plain path computes the same shapes. The switch is restored after.
    """
    import torch

    before = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(before)


def _device(model) -> Any:
    import torch

    return next((t.device for t in [*model.parameters(), *model.buffers()]), torch.device("meta"))


def _resolver(spec: specs.ModelSpec, given: Sequence[InputSpec], input_size: Sequence[int] | None, batch: int):
    """The example inputs for a built model: those given, or a timm model's own image size."""

    def resolve(model) -> list[InputSpec]:
        if given:
            return list(given)
        config = specs._config(model) if spec.kind == specs.TIMM else {}
        channels, height, width = config.get("input_size", (3, 224, 224))
        if input_size:
            height, width = input_size[0], input_size[-1]
        elif spec.kind != specs.TIMM:
            raise UsageError(
                f"{spec.text}: give an example input: --input-shape N,C,H,W, or --input NAME=SHAPE[:DTYPE] (repeatable)"
            )
        return [InputSpec(examples.POSITIONAL, (batch, channels, height, width))]

    return resolve


def _describe(inputs: Sequence[InputSpec]) -> str:
    return ", ".join(f"{i.name} {'x'.join(map(str, i.shape))}" for i in inputs)


def _size_error(title: str, call: Callable, inputs: Sequence[InputSpec], error: BaseException) -> UsageError:
    found = examples.smallest_fitting(call, inputs)
    hint = f"; the smallest size that works is {found[0]} ({_describe(found[1])})" if found else ""
    return UsageError(f"{title} cannot run on {_describe(inputs)} ({root_cause(error)}){hint}")


def _checked(spec, given, input_size, batch, kwargs):
    """Build a spec and run it once on its inputs: (built, inputs, forward), or the usage error of an input misfit."""
    import torch

    resolve = _resolver(spec, given, input_size, batch)

    def forward_on(model) -> Callable[[Sequence[InputSpec]], Any]:
        def forward(inputs: Sequence[InputSpec]) -> Any:
            with torch.inference_mode():
                return call_model(model, examples.example(model, inputs, _device(model)))

        return forward

    def probe(model) -> None:
        inputs = resolve(model)
        try:
            forward_on(model)(inputs)
        except Exception as error:
            if examples.smallest_fitting(forward_on(model), inputs) is not None:  # a misfit, not the meta device
                raise _size_error(spec.text, forward_on(model), inputs, error) from error
            raise

    built = specs.build(spec, kwargs, probe)
    inputs = resolve(built.model)
    if built.build != "meta":
        try:
            forward_on(built.model)(inputs)
        except Exception as error:  # the model's own error on real tensors
            raise _size_error(spec.text, forward_on(built.model), inputs, error) from error
    return built, inputs


def summarize_spec(
    text: str,
    *,
    kwargs: dict | None = None,
    inputs: Sequence[InputSpec] = (),
    input_size: Sequence[int] | None = None,
    batch: int = 1,
    depth: int = 3,
    name_filter: str | None = None,
) -> Summary:
    """The summary of a python or timm model spec (see resnetcli.specs) on its example inputs."""
    spec = specs.parse_spec(text)
    with plain_attention():
        return _summarize(spec, kwargs, inputs, input_size, batch, depth, name_filter)


def _summarize(spec, kwargs, inputs, input_size, batch, depth, name_filter) -> Summary:
    built, resolved = _checked(spec, inputs, input_size, batch, kwargs)
    model = built.model
    report = model_summary(
        spec.text,
        model,
        examples.example(model, resolved, _device(model)),
        depth=depth,
        weights=AS_BUILT[spec.kind],
        name_filter=name_filter,
        inputs=[InputTensor(i.name, list(i.shape), i.dtype) for i in resolved],
        build=built.build,
    )
    return dataclasses.replace(report, notes=list(built.notes))


def _timm_stages(model, inputs: Sequence[InputSpec]) -> list[FeatureMap]:
    """timm's own stages (feature_info: module, channels, reduction) with the shapes they output."""
    import torch

    info = [dict(entry) for entry in getattr(model, "feature_info", [])]
    modules = dict(model.named_modules())
    shapes: dict[str, tuple[int, ...]] = {}
    handles = [
        modules[entry["module"]].register_forward_hook(
            lambda m, i, output, name=entry["module"]: (
                shapes.__setitem__(name, tuple(output.shape)) if isinstance(output, torch.Tensor) else None
            )
        )
        for entry in info
        if entry.get("module") in modules
    ]
    try:
        with torch.inference_mode():
            call_model(model, examples.example(model, inputs, _device(model)))
    finally:
        for handle in handles:
            handle.remove()
    maps = []
    for entry in info:
        shape = shapes.get(entry.get("module"))
        if shape is None:
            log.debug("timm feature %s gave no tensor", entry)
            continue
        layout = _map_layout(shape, None)
        maps.append(
            FeatureMap(entry["module"], entry["module"], list(shape), layout, entry["num_chs"], entry["reduction"])
        )
    return maps


def spec_features(
    text: str,
    *,
    kwargs: dict | None = None,
    inputs: Sequence[InputSpec] = (),
    input_size: Sequence[int] | None = None,
) -> tuple[FeatureReport, list[str]]:
    """The stages of a python or timm model: timm's feature_info, or those found from the model's structure."""
    spec = specs.parse_spec(text)
    with plain_attention():
        return _features(spec, kwargs, inputs, input_size)


def _features(spec, kwargs, inputs, input_size) -> tuple[FeatureReport, list[str]]:
    built, resolved = _checked(spec, inputs, input_size, 1, kwargs)
    first = resolved[0]
    if spec.kind == specs.TIMM and getattr(built.model, "feature_info", None):
        maps = _timm_stages(built.model, resolved)
    elif len(resolved) == 1 and len(first.shape) == 4 and first.dtype.startswith("float"):
        _, channels, height, width = first.shape
        maps = natural_stages(spec.text, built.model, height, width, channels)
    else:
        raise UsageError(f"{spec.text}: feature maps need one image input (N,C,H,W); use `summary` for this model")
    report = FeatureReport(spec.text, AS_BUILT[spec.kind], list(first.shape), maps, built.build)
    return report, list(built.notes)


@dataclass(frozen=True)
class TimmInfo:
    """One timm model and one of its pretrained tags (`convnext_tiny`, `fb_in1k`); the first tag is timm's default."""

    arch: str
    weights: str
    default: bool

    def record(self) -> dict:
        return {"arch": f"timm:{self.arch}", "weights": self.weights, "default": self.default}


def timm_catalogue(pattern: str) -> list[TimmInfo]:
    """timm's models matching a shell-style pattern, one row per pretrained tag (nothing is downloaded)."""
    timm = specs.timm_module()
    wanted = pattern.strip() or "*"
    names = timm.list_models(wanted.split(".")[0])
    if not names:
        raise UsageError(f"no timm model matches {pattern!r} (`resnet list 'timm:*'` shows them all)")
    rows = []
    base_pattern = wanted.split(".")[0]
    for name in names:
        if not fnmatch.fnmatchcase(name, base_pattern):
            continue
        # In timm's registration order: the first tag is the one `timm.create_model(name)` configures.
        tags = [tagged.partition(".")[2] for tagged in timm.models.get_arch_pretrained_cfgs(name)]
        shown = [tag for tag in tags if "." not in wanted or fnmatch.fnmatchcase(f"{name}.{tag}", wanted)]
        rows += [TimmInfo(name, tag, tag == tags[0]) for tag in shown]
        if not tags:
            rows.append(TimmInfo(name, "", False))
    return rows
