"""The model factory: resolve `--arch`/`--weights`, fetch the tensors (through the cache) and build.

Names come from the catalogue (torchvision's registry), tensors from the store (verified cache)
or a checkpoint file (resnetcli.checkpoints), and models from torchvision's own builders:
preprocessing is `weights.transforms()`, labels `weights.meta["categories"]`.

Building without random initialisation and without patching anything: models are built on the
meta device and the loaded tensors assigned (`load_state_dict(assign=True)`). To let a builder
configure a model as some weights do (class count, ViT image size, googlenet's input transform and
dropped aux heads), it is called with `_Configured` weights, a stand-in for the enum member that
answers `get_state_dict` with meta copies of resnetcli's tensors: torchvision configures the model
and checks names and shapes, copying nothing. Nothing of torch or torchvision is modified, so
threads can build models at the same time.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from resnetcli import checkpoints
from resnetcli.catalogue import (  # noqa: F401 - re-exported: the factory is where callers find names
    DEFAULT_WEIGHTS,
    NO_WEIGHTS,
    architecture_names,
    did_you_mean,
    resolve_architecture,
    weights_enum,
    weights_file_name,
    weights_names,
)
from resnetcli.checkpoints import Checkpoint, load_state_dict, read_checkpoint  # noqa: F401 - re-exported
from resnetcli.errors import CheckpointError, UnknownWeights, UsageError

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torchvision.models import WeightsEnum

log = logging.getLogger(__name__)

#: The architecture used when neither `--arch` nor the checkpoint names one (the CLI's default).
DEFAULT_ARCH = "resnet50"


@dataclass(frozen=True)
class WeightsChoice:
    """What `--weights` resolved to for one architecture.

    `kind` is "pretrained" (a torchvision weights enum member), "none" (random init),
    "checkpoint" (a local file, or a file in the weight cache named by its file name) or "url"
    (a checkpoint to fetch into the cache).
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


def _cached_checkpoint(spec: str) -> Path | None:
    """The weight-cache file called `spec` (a bare file name such as `ft-2935208e.pth`), if there is one."""
    from resnetcli.cache import checkpoint_dir

    if not spec or spec != Path(spec).name or spec.startswith("."):
        return None
    candidate = checkpoint_dir() / spec
    return candidate if candidate.is_file() else None


def resolve_weights(arch: str, spec: str | None = None) -> WeightsChoice:
    """Resolve a `--weights` value for `arch`: a weights name, `DEFAULT`, `none`, a URL or a checkpoint.

    A checkpoint is an existing local path first; otherwise a bare file name in the weight cache
    (what `resnet fetch --from-file` imported), usable from any folder. A local file wins over a
    cache entry of the same name.
    """
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
    if path.exists() or path.is_symlink():
        checkpoints.check_regular_file(path)
        return WeightsChoice(arch, "checkpoint", path=path)
    cached = _cached_checkpoint(spec)
    if cached is not None:
        return WeightsChoice(arch, "checkpoint", path=cached)
    if "/" in spec or "\\" in spec or path.suffix:
        raise UsageError(f"--weights {checkpoints.shown(spec)}: no such checkpoint file (here or in the weight cache)")
    names = weights_names(arch)
    raise UnknownWeights(
        f"unknown weights {spec!r} for {arch}: choose one of {', '.join(names)}, a checkpoint path or a URL"
        + did_you_mean(member, names)
    )


# ---------------------------------------------------------------------------------------------
# Building


@dataclass
class LoadedModel:
    """A model ready for inference with what it takes to feed it and read its output."""

    arch: str
    weights: WeightsChoice
    model: torch.nn.Module
    categories: list[str]
    transforms: Callable[[Any], torch.Tensor]
    notes: list[str] = field(default_factory=list)


class _Configured:
    """Weights as a torchvision builder sees them, with resnetcli's tensors and class count.

    Passes the builder's `isinstance(weights, XWeights)` check through `__class__` (Python's
    documented isinstance fallback, the one `unittest.mock`'s spec uses); `meta` is the member's,
    with `categories` of `num_classes` entries when given; `get_state_dict` returns the tensors
    resnetcli hands over. The enum member itself is never touched.
    """

    def __init__(self, weights: WeightsEnum, tensors: Mapping[str, torch.Tensor], num_classes: int | None) -> None:
        self._weights = weights
        self._tensors = tensors
        meta = dict(weights.meta)
        if num_classes is not None and num_classes != len(meta.get("categories") or []):
            meta["categories"] = [f"class_{i}" for i in range(num_classes)]
        self._meta = meta

    @property  # type: ignore[misc]
    def __class__(self):  # noqa: D105
        return type(self._weights)

    @property
    def meta(self) -> dict:
        return self._meta

    def get_state_dict(self, *args: Any, **kwargs: Any) -> Mapping[str, torch.Tensor]:
        return self._tensors

    def __getattr__(self, name: str) -> Any:
        return getattr(self._weights, name)


@lru_cache(maxsize=None)
def _meta_buildable(arch: str) -> bool:
    """Whether `arch` can be built on the meta device. RegNet computes its widths with torch, which
    fails there ("Cannot copy out of meta tensor"); such architectures are built on the CPU."""
    import torch

    try:
        with torch.device("meta"):
            _plain(arch, None)
    except NotImplementedError as error:
        log.debug("%s cannot be built on the meta device (%s): it is built on the CPU", arch, error)
        return False
    return True


def _plain(arch: str, num_classes: int | None) -> torch.nn.Module:
    from torchvision import models

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # googlenet/inception's notes about future init changes
        return models.get_model_builder(arch)(weights=None, **({"num_classes": num_classes} if num_classes else {}))


_SIZE_MISMATCH = re.compile(r"size mismatch for (\S+): copying a param with shape torch\.Size\(\[([\d, ]*)\]\) from "
                            r"checkpoint, the shape in current model is torch\.Size\(\[([\d, ]*)\]\)")
_UNEXPECTED = re.compile(r'Unexpected key\(s\) in state_dict: ((?:"[^"]+"(?:, )?)+)')


def _configure(arch: str, pretrained: WeightsEnum, device: str, num_classes: int | None,
               tensors: Mapping[str, torch.Tensor] | None) -> torch.nn.Module:
    """Run the builder with `pretrained`'s configuration. With `tensors` (a checkpoint), the builder
    checks them strictly (RuntimeError if they do not fit); the keys they lack (aux heads a recipe
    dropped) are filled from the plain architecture. Without, the model's own shapes are learnt
    from the builder's check of the plain architecture's shapes (a ViT's position embedding at 384)."""
    import torch
    from torchvision import models

    builder = models.get_model_builder(arch)
    count = num_classes or len(pretrained.meta["categories"])
    given = {k: v.to(device) if device == "meta" else v for k, v in (tensors or {}).items()}
    if tensors is None and device == "cpu":  # a real model: randomly initialised as the plain architecture
        given = dict(_plain(arch, count).state_dict())
    given = with_module_versions(arch, given, tensors)
    for key, shape in _expected_shapes(arch, count):
        if key not in given:
            given[key] = torch.empty(shape, device=device)  # uninitialised: the builder only checks shapes
    for _ in range(3):
        try:
            with torch.device(device):
                return builder(weights=_Configured(pretrained, given, num_classes), progress=False)
        except RuntimeError as error:
            if tensors is not None:
                raise
            fixes = _SIZE_MISMATCH.findall(str(error))
            unexpected = _UNEXPECTED.search(str(error))
            if not fixes and not unexpected:
                raise
            log.debug("%s as %s configures it: learning its shapes from the builder's check", arch, pretrained)
            for key, _, shape in fixes:
                given[key] = torch.nn.init.trunc_normal_(torch.empty([int(x) for x in shape.split(",")], device=device), std=0.02)
            for key in re.findall(r'"([^"]+)"', unexpected.group(1)) if unexpected else []:
                given.pop(key, None)
    raise RuntimeError(f"{arch}: cannot learn the shapes {pretrained} configures")


def _construct(arch: str, pretrained: WeightsEnum | None, *, on_meta: bool = True, num_classes: int | None = None,
               tensors: Mapping[str, torch.Tensor] | None = None) -> torch.nn.Module:
    """Run the architecture's builder, configured by `pretrained` (or plain with `num_classes`), on
    the meta device when `on_meta` and the architecture allows it (nothing allocated or initialised)."""
    import torch

    device = "meta" if on_meta and _meta_buildable(arch) else "cpu"
    if pretrained is not None:
        return _configure(arch, pretrained, device, num_classes, tensors)
    with torch.device(device):
        return _plain(arch, num_classes)


def meta_model(arch: str, choice: WeightsChoice | None = None, num_classes: int | None = None) -> torch.nn.Module:
    """Build an architecture on the meta device, in eval mode, without weights or random init.

    The model is configured as the pretrained weights of `choice` configure it (image size, class
    count, input transform; by default the architecture's DEFAULT weights, e.g. `vit_h_14` for
    518-pixel inputs), so its shapes and parameter count are those of the published model. Any
    other choice (a checkpoint, `none`) gives the plain architecture with `num_classes` outputs.
    An architecture that cannot be built on the meta device is built on the CPU and moved there.
    """
    arch = resolve_architecture(arch)
    pretrained = weights_enum(arch).DEFAULT if choice is None else choice.pretrained
    model = _construct(arch, pretrained, num_classes=num_classes if pretrained is None else None)
    if not _meta_buildable(arch):
        model = model.to("meta")
    return model.eval()


def _has_meta_tensors(model: torch.nn.Module) -> bool:
    return any(t.is_meta for t in model.parameters()) or any(t.is_meta for t in model.buffers())


def _build_with_state_dict(arch: str, pretrained: WeightsEnum | None, state_dict: Mapping[str, torch.Tensor],
                           num_classes: int | None = None) -> torch.nn.Module:
    """Build configured by `pretrained` (or plain) with `num_classes` outputs and assign the tensors.

    RuntimeError (the builder's or load_state_dict's strict check) when they do not fit. Falls
    back to a CPU build when the architecture keeps state outside its state dict, which the meta
    device cannot produce.
    """
    for on_meta in (True, False):
        model = _construct(arch, pretrained, on_meta=on_meta, num_classes=num_classes,
                           tensors=with_module_versions(arch, state_dict))
        tensors = with_module_versions(arch, state_dict)
        model.load_state_dict(tensors, strict=True, assign=any(t.is_meta for t in model.parameters()))
        if not _has_meta_tensors(model):
            return model.eval()
        log.debug("%s keeps state outside its state dict: building it on the CPU", arch)
    raise AssertionError("unreachable: a CPU build has no meta tensors")


def with_module_versions(arch: str, state_dict: Mapping[str, torch.Tensor],
                         source: Mapping[str, torch.Tensor] | None = None) -> Mapping[str, torch.Tensor]:
    """`state_dict` with the module versions (`_metadata`) of `source` (a checkpoint), or, when it has
    none (safetensors, hand-made dicts), those of the installed architecture. Modules such as MNASNet
    read their version while loading."""
    from collections import OrderedDict

    metadata = getattr(source if source is not None else state_dict, "_metadata", None)
    if metadata is None:
        metadata = _plain_metadata(arch)
    result = OrderedDict(state_dict)
    result._metadata = metadata  # type: ignore[attr-defined]
    return result


@lru_cache(maxsize=None)
def _plain_metadata(arch: str) -> Any:
    return getattr(_construct(arch, None).state_dict(), "_metadata", None)


def expected_shapes(arch: str, num_classes: int | None = None) -> dict[str, list[int]]:
    """The plain architecture's tensor names and shapes (meta device; cached per architecture and count)."""
    return dict(_expected_shapes(resolve_architecture(arch), num_classes))


@lru_cache(maxsize=64)
def _expected_shapes(arch: str, num_classes: int | None) -> tuple[tuple[str, list[int]], ...]:
    model = _construct(arch, None, num_classes=num_classes)
    return tuple((key, list(tensor.shape)) for key, tensor in model.state_dict().items())


def checkpoint_class_count(arch: str, state_dict: Mapping[str, torch.Tensor], reference: torch.nn.Module | None = None) -> int:
    """The number of classes a checkpoint's classifier head was trained for (fc.weight,
    classifier.1.weight, head.weight, ... differing from the architecture's only in their first
    dimension). `reference` is the architecture with the default head, when the caller has it."""
    default_count = len(weights_enum(arch).DEFAULT.meta["categories"])
    if reference is not None:
        expected = {key: list(tensor.shape) for key, tensor in reference.state_dict().items()}
    else:
        expected = expected_shapes(arch, default_count)
    return checkpoints.class_count(state_dict, expected, default_count)


def looks_like(state_dict: Mapping[str, torch.Tensor], exclude: str, hint: str | None = None) -> str | None:
    """A torchvision architecture whose tensors the checkpoint has (head size aside), or None.

    Kept cheap: only architectures whose published parameter count is within 10% of the
    checkpoint's element count are built (on the meta device) and compared; `hint` (an
    architecture the checkpoint names) is tried first.
    """
    from resnetcli.catalogue import entries

    total = sum(t.numel() for t in state_dict.values() if t.is_floating_point())
    candidates = [hint] if hint else []
    for entry in entries():
        counts = [member.meta.get("num_params") or 0 for member in entry.weights]
        if any(0.9 * total <= count <= 1.1 * total for count in counts) and _meta_buildable(entry.arch):
            candidates.append(entry.arch)
    for arch in dict.fromkeys(candidates):
        if arch != exclude and arch in architecture_names():
            if checkpoints.shapes_match(expected_shapes(arch), state_dict):
                return arch
    return None


def _build_checkpoint(arch: str, checkpoint: Checkpoint, num_classes: int) -> tuple[torch.nn.Module, WeightsEnum | None]:
    """Build a checkpoint's model as the first of the architecture's pretrained weights that fits
    configures it (what fine-tuning from those weights produces: googlenet's and inception's input
    transform, googlenet without aux heads, ViT at 384 pixels, ...), else the plain architecture.
    The weights the checkpoint names as its base come first (the plain architecture for a
    from-scratch torchvision reference run); then DEFAULT, the other weights, the plain one.

    Returns the model and the weights whose configuration it has (None for the plain one).
    """
    enum = weights_enum(arch)
    configurations: list[WeightsEnum | None] = [enum.DEFAULT, *enum, None]
    base = (checkpoint.base_weights or "").rpartition(".")[2]
    if base in enum.__members__:
        configurations.insert(0, enum[base])
    elif base.lower() == NO_WEIGHTS:  # trained from scratch: the plain architecture first
        configurations.insert(0, None)
    state_dict = checkpoint.state_dict
    for pretrained in dict.fromkeys(configurations):
        try:
            return _build_with_state_dict(arch, pretrained, state_dict, num_classes), pretrained
        except RuntimeError as error:
            log.debug("%s does not fit %s configured by %s: %s", checkpoint.source, arch, pretrained, str(error)[:200])
    problems = checkpoints.fit_problems(arch, expected_shapes(arch, num_classes), state_dict)
    guess = looks_like(state_dict, arch, checkpoint.arch)
    raise CheckpointError(checkpoints.fit_message(checkpoint.source, arch, problems, guess))


def _check_sizes(arch: str, checkpoint: Checkpoint) -> None:
    """Refuse implausible declared sizes before anything is materialised (issue: a 2e8-row head)."""
    default_count = len(weights_enum(arch).DEFAULT.meta["categories"])
    problems = checkpoints.declared_size_problems(checkpoint.state_dict, expected_shapes(arch, default_count))
    if problems:
        raise CheckpointError(f"{checkpoints.shown(checkpoint.source)}: refused: {problems[0]}")


def build_model(
    choice: WeightsChoice,
    *,
    state_dict: Mapping[str, torch.Tensor] | None = None,
    labels: Sequence[str] | None = None,
    checkpoint: Checkpoint | None = None,
) -> LoadedModel:
    """Build `choice.arch` in eval mode with the chosen weights.

    `state_dict` (or `checkpoint`, which also carries class names and preprocessing) holds the
    tensors for "pretrained", "checkpoint" and "url" choices; "none" gives a random initialisation.
    `labels` names the classes of a checkpoint whose head differs from the weights' categories.
    """
    arch = choice.arch
    reference = choice.reference
    categories = list(reference.meta.get("categories") or [])
    transforms = reference.transforms()
    source = choice.name
    notes: list[str] = []
    if checkpoint is None and state_dict is not None:
        checkpoint = Checkpoint(source, dict(state_dict), "state dict")

    if choice.kind == "pretrained":
        if checkpoint is None:
            raise ValueError("pretrained weights need their state dict")
        _check_sizes(arch, checkpoint)
        try:
            model = _build_with_state_dict(arch, choice.pretrained, checkpoint.state_dict)
        except RuntimeError:
            problems = checkpoints.fit_problems(arch, expected_shapes(arch, len(categories)), checkpoint.state_dict)
            raise CheckpointError(checkpoints.fit_message(source, arch, problems)) from None
    elif choice.kind == "none":
        model = _construct(arch, None, on_meta=False, num_classes=len(labels) if labels else len(categories)).eval()
        notes.append(f"{arch} has random weights (--weights none): its labels are meaningless")
    else:
        if checkpoint is None:
            raise ValueError("checkpoints need their state dict")
        _check_sizes(arch, checkpoint)
        class_count = checkpoint_class_count(arch, checkpoint.state_dict)
        model, configured_by = _build_checkpoint(arch, checkpoint, class_count)
        if configured_by is not None:
            transforms = configured_by.transforms()
        if checkpoint.preprocessing is not None:
            transforms = checkpoints.transforms_for(checkpoint.preprocessing, transforms)
        if checkpoint.classes is not None and len(checkpoint.classes) == class_count:
            categories = list(checkpoint.classes)
        elif class_count != len(categories):
            # A fine-tuned head: without --labels the classes can only be numbered.
            categories = [f"class_{i}" for i in range(class_count)]
    if labels is not None:
        output_count = _output_count(model, len(categories))
        if len(labels) != output_count:
            raise UsageError(f"the labels name {len(labels)} classes but the model {source} predicts {output_count}")
        categories = list(labels)
    return LoadedModel(arch, choice, model, categories, transforms, notes)


def _output_count(model: torch.nn.Module, fallback: int) -> int:
    import torch

    num_classes = getattr(model, "num_classes", None)
    if isinstance(num_classes, int):
        return num_classes
    last = None
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            last = module
    if isinstance(last, torch.nn.Linear):
        return last.out_features
    if isinstance(last, torch.nn.Conv2d):
        return last.out_channels
    return fallback


# ---------------------------------------------------------------------------------------------
# Weights from the cache


def checkpoint_for(choice: WeightsChoice, settings=None, on_progress=None, *, trust: bool = False) -> Checkpoint | None:
    """The checkpoint of a weights choice: from the verified cache (downloading when allowed) or a file.

    `trust` (`--trust-checkpoint`) loads a file that needs to run code; see resnetcli.checkpoints.
    """
    from resnetcli import cache

    if choice.kind == "none":
        return None
    if choice.kind == "checkpoint":
        assert choice.path is not None
        return read_checkpoint(choice.path, trust=trust)
    if choice.kind == "url":
        url, hint = choice.url, f"resnet fetch --url {choice.url}"
    else:
        url, hint = choice.pretrained.url, f"resnet fetch {choice.arch}:{choice.name}"  # type: ignore[union-attr]
    settings = settings or cache.CacheSettings.from_env()
    # The mirror stands in for torchvision's host only; a user's own URL is fetched as given.
    cached = cache.download(url, settings=settings, on_progress=on_progress, fetch_hint=hint, mirrored=choice.kind == "pretrained")
    return read_checkpoint(cached.path, trust=trust and choice.kind == "url")


def state_dict_for(choice: WeightsChoice, settings=None, on_progress=None, *, trust: bool = False) -> dict[str, torch.Tensor] | None:
    """The tensors of a weights choice (see `checkpoint_for`)."""
    checkpoint = checkpoint_for(choice, settings, on_progress, trust=trust)
    return None if checkpoint is None else checkpoint.state_dict


def load_model(
    arch: str | None,
    weights: str | None = None,
    *,
    labels: Sequence[str] | None = None,
    settings=None,
    on_progress=None,
    trust_checkpoint: bool = False,
) -> LoadedModel:
    """Resolve names, get the weights (cache, download, file) and build the model: the one entry point.

    `arch` None means the checkpoint's own architecture (resnetcli's fine-tuned format, torchvision's
    reference train.py), else DEFAULT_ARCH.
    """
    choice = resolve_weights(arch or DEFAULT_ARCH, weights)
    checkpoint = checkpoint_for(choice, settings, on_progress, trust=trust_checkpoint)
    if arch is None and checkpoint is not None and checkpoint.arch:
        choice = replace(choice, arch=resolve_architecture(checkpoint.arch))
    return build_model(choice, labels=labels, checkpoint=checkpoint)
