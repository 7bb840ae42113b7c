"""The model factory: resolve `--arch`/`--weights`, fetch the tensors (through the cache) and build.

Names come from the catalogue (torchvision's registry), tensors from the store (verified cache)
or a checkpoint file (resnetcli.checkpoints), and models from torchvision's own builders without
random initialisation or patching (resnetcli.builders): preprocessing is `weights.transforms()`,
labels `weights.meta["categories"]`, or a fine-tuned checkpoint's own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from resnetcli import checkpoints
from resnetcli.builders import build_with_state_dict, construct, expected_shapes, meta_buildable
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
from resnetcli.heads import output_count
from resnetcli.urls import is_url

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
    if is_url(spec):
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
    model = construct(arch, pretrained, num_classes=num_classes if pretrained is None else None)
    if not meta_buildable(arch):
        model = model.to("meta")
    return model.eval()


def checkpoint_class_count(
    arch: str, state_dict: Mapping[str, torch.Tensor], reference: torch.nn.Module | None = None
) -> int:
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
        if any(0.9 * total <= count <= 1.1 * total for count in counts) and meta_buildable(entry.arch):
            candidates.append(entry.arch)
    for arch in dict.fromkeys(candidates):
        if (
            arch != exclude
            and arch in architecture_names()
            and checkpoints.shapes_match(expected_shapes(arch), state_dict)
        ):
            return arch
    return None


def _build_checkpoint(
    arch: str, checkpoint: Checkpoint, num_classes: int
) -> tuple[torch.nn.Module, WeightsEnum | None]:
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
            return build_with_state_dict(arch, pretrained, state_dict, num_classes), pretrained
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
            model = build_with_state_dict(arch, choice.pretrained, checkpoint.state_dict)
        except RuntimeError:
            problems = checkpoints.fit_problems(arch, expected_shapes(arch, len(categories)), checkpoint.state_dict)
            raise CheckpointError(checkpoints.fit_message(source, arch, problems)) from None
    elif choice.kind == "none":
        model = construct(arch, None, on_meta=False, num_classes=len(labels) if labels else len(categories)).eval()
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
        count = output_count(model)
        predicted = count if count is not None else len(categories)
        if len(labels) != predicted:
            raise UsageError(f"the labels name {len(labels)} classes but the model {source} predicts {predicted}")
        categories = list(labels)
    return LoadedModel(arch, choice, model, categories, transforms, notes)


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
    cached = cache.download(
        url, settings=settings, on_progress=on_progress, fetch_hint=hint, mirrored=choice.kind == "pretrained"
    )
    return read_checkpoint(cached.path, trust=trust and choice.kind == "url")


def state_dict_for(
    choice: WeightsChoice, settings=None, on_progress=None, *, trust: bool = False
) -> dict[str, torch.Tensor] | None:
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
    reference train.py), else DEFAULT_ARCH. A model spec (`timm:NAME`, `file.py:Name`, `pkg.mod:Name`),
    given or named by a fine-tuned checkpoint, is built by resnetcli.foreign.
    """
    from resnetcli import foreign

    if foreign.is_spec(arch):
        assert arch is not None
        source = foreign.weights_source(arch, weights, _cached_checkpoint((weights or "").strip()))
        choice = WeightsChoice(arch.strip(), source.kind, path=source.path, url=source.url)
        checkpoint = checkpoint_for(choice, settings, on_progress, trust=trust_checkpoint)
        return _load_spec(choice, checkpoint, labels, from_hub=weights is None or weights.upper() == DEFAULT_WEIGHTS)
    choice = resolve_weights(arch or DEFAULT_ARCH, weights)
    checkpoint = checkpoint_for(choice, settings, on_progress, trust=trust_checkpoint)
    if arch is None and checkpoint is not None and checkpoint.arch:
        if foreign.is_spec(checkpoint.arch):  # a fine-tuned timm or user model
            return _load_spec(replace(choice, arch=checkpoint.arch), checkpoint, labels, from_hub=False)
        choice = replace(choice, arch=resolve_architecture(checkpoint.arch))
    return build_model(choice, labels=labels, checkpoint=checkpoint)


def _load_spec(choice: WeightsChoice, checkpoint: Checkpoint | None, labels, *, from_hub: bool) -> LoadedModel:
    from resnetcli import foreign

    built = foreign.build(choice.arch, checkpoint, labels=labels, from_hub=from_hub)
    return LoadedModel(choice.arch, choice, built.model, built.categories, built.transforms, built.notes)
