"""The model factory: the one place that resolves architecture and weights names and builds models.

Everything comes from torchvision's own registry (`list_models`, `get_model_builder`,
`get_model_weights`): architecture names, weights names, download URLs, preprocessing
(`weights.transforms()`) and labels (`weights.meta["categories"]`). torch and torchvision are
imported inside the functions so that importing this module stays cheap.
"""

from __future__ import annotations

import difflib
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from resnetcli.errors import CheckpointError, UnknownArchitecture, UnknownWeights, UsageError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torchvision.models import WeightsEnum

#: The `--weights` value that means "random initialisation".
NO_WEIGHTS = "none"
#: The `--weights` value that means "the architecture's recommended weights".
DEFAULT_WEIGHTS = "DEFAULT"


@lru_cache(maxsize=1)
def architecture_names() -> tuple[str, ...]:
    """Every image-classification architecture torchvision registers, sorted."""
    from torchvision import models

    # module=models keeps the classifiers only: detection, segmentation, video and quantized
    # builders live in sub-packages of torchvision.models.
    return tuple(models.list_models(module=models))


def resolve_architecture(name: str) -> str:
    """Return the registered architecture called `name` (case-insensitive), or raise with suggestions."""
    names = architecture_names()
    wanted = name.strip().lower()
    if wanted in names:
        return wanted
    raise UnknownArchitecture(f"unknown architecture {name!r}{_did_you_mean(wanted, names)}")


def weights_enum(arch: str) -> type[WeightsEnum]:
    """The torchvision weights enum of a registered architecture."""
    from torchvision import models

    return models.get_model_weights(resolve_architecture(arch))


def _did_you_mean(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=3, cutoff=0.6)
    if not close:
        return " (`resnet list` shows them all)"
    return "; did you mean " + ", ".join(repr(c) for c in close) + "?"


@dataclass(frozen=True)
class WeightsChoice:
    """What `--weights` resolved to for one architecture.

    `kind` is "pretrained" (a torchvision weights enum member), "none" (random init),
    "checkpoint" (a local file) or "url" (a checkpoint to fetch into the cache).
    """

    arch: str
    kind: str
    pretrained: WeightsEnum | None = None
    path: Path | None = None
    url: str | None = None

    @property
    def name(self) -> str:
        """The name shown in output records: `IMAGENET1K_V2`, `none`, a path or a URL."""
        if self.pretrained is not None:
            return self.pretrained.name
        if self.path is not None:
            return str(self.path)
        return self.url or NO_WEIGHTS

    @property
    def reference(self) -> WeightsEnum:
        """The torchvision weights whose preprocessing and labels apply: the chosen ones, or the default."""
        return self.pretrained if self.pretrained is not None else weights_enum(self.arch).DEFAULT


def resolve_weights(arch: str, spec: str | None = None) -> WeightsChoice:
    """Resolve a `--weights` value for `arch`: a weights name, `DEFAULT`, `none`, a URL or a file path."""
    arch = resolve_architecture(arch)
    enum = weights_enum(arch)
    if spec is None or spec.strip().upper() == DEFAULT_WEIGHTS:
        return WeightsChoice(arch, "pretrained", pretrained=enum.DEFAULT)
    spec = spec.strip()
    if spec.lower() == NO_WEIGHTS:
        return WeightsChoice(arch, "none")
    if spec.lower().startswith(("http://", "https://")):
        return WeightsChoice(arch, "url", url=spec)
    member = spec.split(".")[-1].upper() if spec.startswith(enum.__name__ + ".") else spec.upper()
    if member in enum.__members__:
        return WeightsChoice(arch, "pretrained", pretrained=enum[member])
    path = Path(spec).expanduser()
    if path.is_file():
        return WeightsChoice(arch, "checkpoint", path=path)
    if path.exists():
        raise UsageError(f"--weights {spec}: is a directory, not a checkpoint file")
    names = list(enum.__members__) + [DEFAULT_WEIGHTS, NO_WEIGHTS]
    if "/" in spec or "\\" in spec or path.suffix:
        raise UsageError(f"--weights {spec}: no such checkpoint file")
    raise UnknownWeights(
        f"unknown weights {spec!r} for {arch}: choose one of {', '.join(names)}, a checkpoint path or a URL"
        + (_did_you_mean(member, names) if difflib.get_close_matches(member, names, n=1) else "")
    )


def weights_file_name(weights: WeightsEnum) -> str:
    """The file name torchvision (and torch.hub's cache) uses for these weights."""
    from urllib.parse import urlparse

    return Path(urlparse(weights.url).path).name


# ---------------------------------------------------------------------------------------------
# Checkpoints


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Load a state dict from a checkpoint file safely (`weights_only=True`, memory-mapped when possible).

    Accepts a bare state dict, or one saved under "state_dict" or "model" (training scripts and
    torchvision's references), and strips the "module." prefix that DataParallel adds.
    """
    import pickle
    import zipfile

    import torch

    try:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            # Files in torch's legacy (pre-1.6, non-zip) format cannot be memory-mapped.
            if "mmap" not in str(error) and "zip" not in str(error):
                raise
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else "unsupported content"
        raise CheckpointError(
            f"{path}: refused to load: the file holds more than tensors (it would need to run code "
            f"to unpickle: {first_line})"
        ) from None
    except (EOFError, zipfile.BadZipFile, RuntimeError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint ({_one_line(error)})") from None
    return _unwrap_state_dict(path, loaded)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def _unwrap_state_dict(path: Path, loaded: Any) -> dict[str, torch.Tensor]:
    import torch

    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(loaded, Mapping) and isinstance(loaded.get(key), Mapping):
            loaded = loaded[key]
            break
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise CheckpointError(f"{path}: not a state dict (expected a mapping of names to tensors)")
    if loaded and all(k.startswith("module.") for k in loaded):
        loaded = {k[len("module."):]: v for k, v in loaded.items()}
    return dict(loaded)


# ---------------------------------------------------------------------------------------------
# Building models


@dataclass
class LoadedModel:
    """A model ready for inference with what it takes to feed it and read its output."""

    arch: str
    weights: WeightsChoice
    model: torch.nn.Module
    categories: list[str]
    transforms: Callable[[Any], torch.Tensor]
    notes: list[str] = field(default_factory=list)


@contextmanager
def _configured_by(weights: WeightsEnum) -> Iterator[None]:
    """Let torchvision's builder configure a model for `weights` without loading anything.

    torchvision's builders set constructor arguments from the weights (num_classes, image_size,
    transform_input, aux_logits, ...), load the file through torch.hub, which unpickles it
    unrestricted (not weights-only) and trusts a cached file blindly, and then adjust the model
    (googlenet and inception drop their auxiliary heads). Calling the builder with the real weights
    member keeps that logic exact for every architecture, current and future; the loading step is
    skipped, and resnetcli assigns tensors from its verified cache and safe loader afterwards.
    """
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


def _construct(
    arch: str,
    pretrained: WeightsEnum | None,
    *,
    on_meta: bool = True,
    num_classes: int | None = None,
) -> torch.nn.Module:
    """Run the architecture's builder, configured by `pretrained` (or plain with `num_classes`).

    On the meta device nothing is allocated or randomly initialised.
    """
    import torch
    from torchvision import models

    builder = models.get_model_builder(arch)

    def build() -> torch.nn.Module:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torchvision's notes about future init changes
            if pretrained is None:
                return builder(weights=None, **({"num_classes": num_classes} if num_classes else {}))
            with _configured_by(pretrained):
                return builder(weights=pretrained)

    if not on_meta:
        return build()
    try:
        with torch.device("meta"):
            return build()
    except NotImplementedError:  # The builder needs real numbers ("Cannot copy out of meta tensor").
        with _parameters_on_meta():
            return build()


def meta_model(arch: str, choice: WeightsChoice | None = None, num_classes: int | None = None) -> torch.nn.Module:
    """Build an architecture on the meta device, in eval mode, without weights or random init.

    The model is configured as the pretrained weights of `choice` configure it (image size, class
    count, input transform; by default the architecture's DEFAULT weights, e.g. `vit_h_14` for
    518-pixel inputs), so its shapes and parameter count are those of the published model. Any
    other choice (a checkpoint, `none`) gives the plain architecture with `num_classes` outputs.
    """
    arch = resolve_architecture(arch)
    pretrained = weights_enum(arch).DEFAULT if choice is None else choice.pretrained
    return _construct(arch, pretrained, num_classes=num_classes).eval()


def _has_meta_tensors(model: torch.nn.Module) -> bool:
    return any(t.is_meta for t in model.parameters()) or any(t.is_meta for t in model.buffers())


def _build_with_state_dict(
    arch: str,
    pretrained: WeightsEnum | None,
    state_dict: Mapping[str, torch.Tensor],
    source: str,
    num_classes: int | None = None,
) -> torch.nn.Module:
    """Build on the meta device (no random init) and assign the loaded tensors.

    With `pretrained`, the model is configured by those weights and its classifier head resized to
    `num_classes` when they differ (a fine-tuned checkpoint). Falls back to a normal CPU build when
    the architecture keeps state outside its state dict (non-persistent buffers), which the meta
    device cannot produce.
    """
    for on_meta in (True, False):
        model = _construct(arch, pretrained, on_meta=on_meta, num_classes=num_classes)
        if pretrained is not None and num_classes is not None:
            _resize_head(model, state_dict, num_classes)
        try:
            model.load_state_dict(state_dict, strict=True, assign=on_meta)
        except RuntimeError as error:
            raise CheckpointError(f"{source}: does not fit the architecture: {_mismatch_summary(error)}") from None
        if not _has_meta_tensors(model):
            return model.eval()
    raise AssertionError("unreachable: a CPU build has no meta tensors")


def _resize_head(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], num_classes: int) -> None:
    """Give the Linear/Conv2d layers whose checkpoint tensors differ from the model's only in their
    first dimension (the class count) that many outputs: the head a fine-tuning recipe swapped in."""
    import torch

    current = model.state_dict()
    for key, tensor in state_dict.items():
        if key not in current or tuple(tensor.shape) == tuple(current[key].shape):
            continue
        if tensor.ndim < 1 or tensor.shape[0] != num_classes or tuple(tensor.shape)[1:] != tuple(current[key].shape)[1:]:
            continue
        module_name, _, param_name = key.rpartition(".")
        module = model.get_submodule(module_name)
        if isinstance(module, torch.nn.Linear):
            module.out_features = num_classes
        elif isinstance(module, torch.nn.Conv2d):
            module.out_channels = num_classes
        else:
            continue
        old = getattr(module, param_name)
        setattr(module, param_name, torch.nn.Parameter(torch.empty(tensor.shape, device=old.device, dtype=old.dtype)))


def _build_checkpoint(arch: str, state_dict: Mapping[str, torch.Tensor], source: str, num_classes: int) -> tuple[torch.nn.Module, WeightsEnum | None]:
    """Build a checkpoint's model: the plain architecture, or, when the checkpoint does not fit it,
    the architecture as one of its pretrained weights configures it (what fine-tuning from those
    weights produces: googlenet's input transform without aux heads, ViT at 384 pixels, ...).

    Returns the model and the weights whose configuration it has (None for the plain one).
    """
    try:
        return _build_with_state_dict(arch, None, state_dict, source, num_classes=num_classes), None
    except CheckpointError as plain_error:
        for pretrained in weights_enum(arch):
            try:
                return _build_with_state_dict(arch, pretrained, state_dict, source, num_classes=num_classes), pretrained
            except CheckpointError:
                continue
        raise plain_error from None


def _mismatch_summary(error: RuntimeError) -> str:
    lines = [line.strip() for line in str(error).splitlines()[1:] if line.strip()]
    return "; ".join(lines) if lines else _one_line(error)


def checkpoint_class_count(arch: str, state_dict: Mapping[str, torch.Tensor], reference: torch.nn.Module | None = None) -> int:
    """The number of classes a checkpoint's classifier head was trained for.

    Reads it from the tensors whose shape in the architecture starts with the default class count
    (fc.weight, classifier.1.weight, head.weight, ...) and differs only there in the checkpoint.
    `reference` is the architecture with the default head, when the caller has built it already.
    """
    default_count = len(weights_enum(arch).DEFAULT.meta["categories"])
    if reference is None:
        reference = meta_model(arch, WeightsChoice(arch, "none"), num_classes=default_count)
    expected = reference.state_dict()
    counts = {
        tuple(tensor.shape)[0]
        for key, tensor in state_dict.items()
        if key in expected
        and tensor.ndim >= 1
        and tuple(expected[key].shape)[:1] == (default_count,)
        and tuple(tensor.shape)[1:] == tuple(expected[key].shape)[1:]
    }
    if len(counts) == 1:
        return counts.pop()
    return default_count


def build_model(
    choice: WeightsChoice,
    *,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    labels: Sequence[str] | None = None,
) -> LoadedModel:
    """Build `choice.arch` in eval mode with the chosen weights.

    `state_dict` carries the tensors for "pretrained", "checkpoint" and "url" choices (the caller
    gets them from the cache or from `load_state_dict`); "none" gives a random initialisation.
    `labels` names the classes of a checkpoint whose head differs from the weights' categories.
    """
    arch = choice.arch
    reference = choice.reference
    categories = list(reference.meta.get("categories") or [])
    transforms = reference.transforms()
    source = choice.name
    notes: list[str] = []

    if choice.kind == "pretrained":
        if state_dict is None:
            raise ValueError("pretrained weights need their state dict")
        model = _build_with_state_dict(arch, choice.pretrained, state_dict, source)
    elif choice.kind == "none":
        model = _construct(arch, None, on_meta=False, num_classes=len(labels) if labels else len(categories)).eval()
        notes.append(f"{arch} has random weights (--weights none): its labels are meaningless")
    else:
        if state_dict is None:
            raise ValueError("checkpoints need their state dict")
        class_count = checkpoint_class_count(arch, state_dict)
        model, configured_by = _build_checkpoint(arch, state_dict, source, class_count)
        if configured_by is not None:
            transforms = configured_by.transforms()
        if class_count != len(categories):
            # A fine-tuned head: without --labels the classes can only be numbered.
            categories = [f"class_{i}" for i in range(class_count)]
    if labels is not None:
        output_count = _output_count(model, len(categories))
        if len(labels) != output_count:
            raise UsageError(
                f"the labels name {len(labels)} classes but the model {source} predicts {output_count}"
            )
        categories = list(labels)
    return LoadedModel(arch, choice, model, categories, transforms, notes)


def _output_count(model: torch.nn.Module, fallback: int) -> int:
    num_classes = getattr(model, "num_classes", None)
    if isinstance(num_classes, int):
        return num_classes
    last_linear = None
    import torch

    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            last_linear = module
    if isinstance(last_linear, torch.nn.Linear):
        return last_linear.out_features
    if isinstance(last_linear, torch.nn.Conv2d):
        return last_linear.out_channels
    return fallback


# ---------------------------------------------------------------------------------------------
# Weights from the cache


def state_dict_for(choice: WeightsChoice, settings=None, on_progress=None) -> dict[str, torch.Tensor] | None:
    """The tensors of a weights choice: from the verified cache (downloading when allowed) or a file."""
    from resnetcli import cache

    if choice.kind == "none":
        return None
    if choice.kind == "checkpoint":
        assert choice.path is not None
        return load_state_dict(choice.path)
    if choice.kind == "url":
        url, hint = choice.url, f"resnet fetch --url {choice.url}"
    else:
        url, hint = choice.pretrained.url, f"resnet fetch {choice.arch}:{choice.name}"  # type: ignore[union-attr]
    settings = settings or cache.CacheSettings.from_env()
    # The mirror stands in for torchvision's host only; a user's own URL is fetched as given.
    cached = cache.download(url, settings=settings, on_progress=on_progress, fetch_hint=hint, mirrored=choice.kind == "pretrained")
    return load_state_dict(cached.path)


def load_model(
    arch: str,
    weights: str | None = None,
    *,
    labels: Sequence[str] | None = None,
    settings=None,
    on_progress=None,
) -> LoadedModel:
    """Resolve names, get the weights (cache, download, file) and build the model: the one entry point."""
    choice = resolve_weights(arch, weights)
    return build_model(choice, state_dict=state_dict_for(choice, settings, on_progress), labels=labels)
