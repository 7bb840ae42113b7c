"""Model specs: which model a command is about, and building it on the meta device or, failing that, the CPU.

A spec is one of
- a torchvision architecture name (`resnet50`), handled by the registry as before;
- `path/to/file.py:Name` or `package.module:Name`: a user's `nn.Module` class, a function that
  returns a module, or a module-level instance. Importing a user's file runs it, as the user asked;
- `timm:NAME` (`timm:convnext_tiny`, `timm:resnet50d.ra2_in1k`) when timm is installed
  (`pip install resnetcli[timm]`); built with `pretrained=False`, so nothing is ever downloaded;
- a `.onnx` file (summary only; see resnetcli.onnxinfo).

Nothing here imports torch at module level: parsing a spec stays cheap. `predict`, `export` and
`finetune` build from the same specs through resnetcli.foreign (`make_module`, weights, preprocessing).
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import logging
import re
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from resnetcli.errors import UsageError, did_you_mean

log = logging.getLogger(__name__)

TORCHVISION, PYTHON, TIMM, ONNX = "torchvision", "python", "timm", "onnx"
_PYTHON_SPEC = re.compile(r"^(?P<source>.+):(?P<name>[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)$")
_MODULE_PATH = re.compile(r"^[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*$")


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec: its kind, the text the user gave, and its parts (file or module, and name)."""

    kind: str
    text: str
    source: str = ""
    name: str = ""


def parse_spec(text: str) -> ModelSpec:
    """Tell the kind of a model spec from its text alone (nothing is imported or opened)."""
    if text.startswith("timm:"):
        name = text.removeprefix("timm:").strip()
        if not name:
            raise UsageError(f"model spec {text!r}: expected timm:NAME (`resnet list 'timm:*'` lists them)")
        return ModelSpec(TIMM, text, "timm", name)
    if text.lower().endswith(".onnx"):
        return ModelSpec(ONNX, text, text)
    match = _PYTHON_SPEC.match(text)
    if match:
        source = match["source"]
        if source.endswith(".py") or _MODULE_PATH.match(source):
            return ModelSpec(PYTHON, text, source, match["name"])
        raise UsageError(f"model spec {text!r}: expected path/to/file.py:Name or package.module:Name")
    return ModelSpec(TORCHVISION, text, text)


@contextmanager
def _on_path(*folders: str) -> Iterator[None]:
    """Folders first on sys.path while a user's module is imported (the current one, the file's own)."""
    added = [folder for folder in folders if folder not in sys.path]
    sys.path[:0] = added
    try:
        yield
    finally:
        for folder in added:
            if folder in sys.path:
                sys.path.remove(folder)


def _import_file(spec: ModelSpec):
    path = Path(spec.source).expanduser()
    if not path.is_file():
        raise UsageError(f"model spec {spec.text}: no such file {spec.source}")
    resolved = path.resolve()
    module_name = f"resnetcli_user_{resolved.stem}_{hashlib.sha256(str(resolved).encode()).hexdigest()[:8]}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    loader_spec = importlib.util.spec_from_file_location(module_name, resolved)
    if loader_spec is None or loader_spec.loader is None:
        raise UsageError(f"model spec {spec.text}: {spec.source} cannot be imported as Python")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up while it runs
    try:
        with _on_path(str(Path.cwd()), str(resolved.parent)):
            loader_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    return module


def load_object(spec: ModelSpec) -> Any:
    """Import a python spec's file or module and return the named object; UsageError (exit 2) on any failure."""
    try:
        if spec.source.endswith(".py"):
            module = _import_file(spec)
        else:
            with _on_path(str(Path.cwd())):
                module = importlib.import_module(spec.source)
    except UsageError:
        raise
    except Exception as error:  # the user's code: any error it raises is the message
        raise UsageError(
            f"model spec {spec.text}: cannot import {spec.source}: {type(error).__name__}: {error}"
        ) from error
    target: Any = module
    for part in spec.name.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as error:
            raise UsageError(f"model spec {spec.text}: {error}") from error
    return target


@dataclass(frozen=True)
class Built:
    """A model built from a spec: where it lives, and what the build had to say."""

    model: Any  # torch.nn.Module
    build: str  # "meta" or "cpu"
    notes: tuple[str, ...] = ()
    config: dict = field(default_factory=dict)  # timm's pretrained_cfg (input_size, mean, std, ...)


def _callable_for(spec: ModelSpec, kwargs: dict) -> Callable[[], Any]:
    """What builds the module of a spec: calling a class or factory with kwargs, or taking an instance."""
    import torch

    if spec.kind == TIMM:
        return lambda: _create_timm(spec, kwargs)
    target = load_object(spec)
    if isinstance(target, torch.nn.Module):
        if kwargs:
            raise UsageError(
                f"model spec {spec.text}: {spec.name} is a model instance; --kwargs needs a class or function"
            )
        return lambda: target
    if inspect.isclass(target) and not issubclass(target, torch.nn.Module):
        raise UsageError(f"model spec {spec.text}: {spec.name} is the class {target.__name__}, not an nn.Module")
    if not callable(target):
        raise UsageError(
            f"model spec {spec.text}: {spec.name} is a {type(target).__name__}, not an nn.Module, a class or a function"
        )
    return lambda: target(**kwargs)


def timm_module():
    """timm, or a usage error that says how to get it."""
    try:
        import timm
    except ImportError as error:
        raise UsageError("timm is not installed: pip install 'resnetcli[timm]'") from error
    return timm


def _create_timm(spec: ModelSpec, kwargs: dict):
    timm = timm_module()
    try:
        return timm.create_model(spec.name, pretrained=False, **kwargs)
    except RuntimeError as error:
        if "Unknown model" not in str(error):
            raise
        base = spec.name.split(".")[0]
        hint = did_you_mean(base, timm.list_models(), fallback=" (`resnet list 'timm:*'` lists them)")
        raise UsageError(f"model spec {spec.text}: timm has no model {spec.name!r}{hint}") from error


def _check_module(spec: ModelSpec, model: Any) -> Any:
    import torch

    if not isinstance(model, torch.nn.Module):
        raise UsageError(f"model spec {spec.text}: {spec.name} returned a {type(model).__name__}, not an nn.Module")
    return model.eval()


def make_module(spec: ModelSpec, kwargs: dict | None = None) -> Any:
    """Build a python or timm spec on the CPU, in eval mode, as its code builds it (for predict, export, finetune)."""
    make = _callable_for(spec, dict(kwargs or {}))
    try:
        return _check_module(spec, make())
    except UsageError:
        raise
    except Exception as error:  # the user's constructor: its error is the message
        raise UsageError(f"model spec {spec.text}: cannot build it: {type(error).__name__}: {error}") from error


def build(spec: ModelSpec, kwargs: dict | None = None, probe: Callable[[Any], None] | None = None) -> Built:
    """Build a python or timm spec on the meta device, or on the CPU when it cannot be built or run there.

    `probe` runs the model once on meta inputs; a model whose code needs real numbers (`.item()`,
    data-dependent shapes, in-place initialisation from data) fails there and is built again on the
    CPU, with a note saying so. A model instance is used as it is, moved to meta for the probe.
    """
    import copy

    import torch

    kwargs = dict(kwargs or {})
    make = _callable_for(spec, kwargs)
    try:
        with torch.device("meta"):
            model = _check_module(spec, make())
        if any(not t.is_meta for t in [*model.parameters(), *model.buffers()]):
            model = copy.deepcopy(model).to("meta")  # a module-level instance, made before we were called
        if probe is not None:
            probe(model)
        return Built(model, "meta", (), _config(model))
    except UsageError:
        raise
    except Exception as error:  # whatever the model's code does on meta tensors; the CPU build decides
        reason = _first_line(error)
        log.debug("%s on the meta device failed", spec.text, exc_info=True)
    try:
        model = _check_module(spec, make())
    except UsageError:
        raise
    except Exception as error:  # the user's constructor: its error is the message
        raise UsageError(f"model spec {spec.text}: cannot build it: {type(error).__name__}: {error}") from error
    note = f"{spec.text} cannot run on the meta device ({reason}); built on the CPU instead"
    return Built(model, "cpu", (note,), _config(model))


def _config(model: Any) -> dict:
    config = getattr(model, "pretrained_cfg", None)
    return dict(config) if isinstance(config, dict) else {}


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0].split('. ')[0]}" if text else type(error).__name__
