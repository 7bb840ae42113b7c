"""Classifiers named by a model spec instead of a torchvision architecture: `timm:NAME[.TAG]`,
`path/to/file.py:Name` and `package.module:Name` (see resnetcli.specs), for predict, export and finetune.

The factory (`factory.load_model`) hands such a spec here, gets the weights the way it gets any
checkpoint (`weights_source`, then `factory.checkpoint_for`: a local file or a cache file name read
with `weights_only`, a URL through the verified cache), and builds with `build`. What each part
comes from:

- weights: `--weights FILE` (.pth/.pt state dict, resnetcli's fine-tuned format or .safetensors), a
  URL, or `none`. For `timm:NAME[.TAG]` without `--weights`, the files timm's Hugging Face repository
  for that tag already has in the local Hugging Face cache (`huggingface_hub.try_to_load_from_cache`,
  which never touches the network), else the same file name in the torch hub cache; nothing is ever
  downloaded from the Hub, offline or not: a clear error says how to pass `--weights FILE`.
- preprocessing: a checkpoint's stored one (resnetcli's fine-tuned format), else timm's data config
  for the model (`timm.data.resolve_model_data_config` + `timm.data.create_transform`), which also
  serves a user's module that carries a timm-style `pretrained_cfg` (input_size, mean, std,
  crop_pct, interpolation). A user's module without either is refused with what is missing.
- class names: the checkpoint's classes, `--labels`, timm's own label names for the model's
  pretrained dataset (`pretrained_cfg["label_names"]`, or `timm.data.ImageNetInfo` for the
  ImageNet subset timm infers), else numbered `class_0`, `class_1`, ...

Nothing here imports the factory (the factory imports this module).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from resnetcli import checkpoints, specs
from resnetcli.errors import CheckpointError, UsageError, WeightsUnavailable
from resnetcli.heads import output_count
from resnetcli.urls import is_url

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from resnetcli.checkpoints import Checkpoint

log = logging.getLogger(__name__)

#: The files timm reads from a model's Hugging Face repository, in its own order of preference.
HUB_FILES = ("HF_SAFE_WEIGHTS_NAME", "HF_WEIGHTS_NAME")


def is_spec(arch: str | None) -> bool:
    """Whether `--arch` names a timm model or a user's module (rather than a torchvision architecture)."""
    if not arch:
        return False
    try:
        return specs.parse_spec(arch.strip()).kind in (specs.TIMM, specs.PYTHON)
    except UsageError:
        return True  # a malformed spec of these kinds: parse_spec says what is wrong when it is loaded


def _spec(text: str) -> specs.ModelSpec:
    spec = specs.parse_spec(text.strip())
    if spec.kind not in (specs.TIMM, specs.PYTHON):
        raise UsageError(f"{text}: predict, export and finetune take timm:NAME, file.py:Name or package.module:Name")
    return spec


@dataclass(frozen=True)
class Source:
    """Where a spec's weights are: kind "checkpoint" (path), "url" or "none" (as `WeightsChoice` has them)."""

    kind: str
    path: Path | None = None
    url: str | None = None


def weights_source(text: str, weights: str | None, cached: Path | None = None) -> Source:
    """Resolve `--weights` for a spec. `cached` is the weight-cache file of that name, when there is one."""
    spec = _spec(text)
    value = (weights or "").strip()
    if value.lower() == "none":
        return Source("none")
    if is_url(value):
        return Source("url", url=value)
    if value and value.upper() != "DEFAULT":
        path = Path(value).expanduser()
        if path.exists() or path.is_symlink():
            checkpoints.check_regular_file(path)
            return Source("checkpoint", path=path)
        if cached is not None:
            return Source("checkpoint", path=cached)
        raise UsageError(
            f"--weights {checkpoints.shown(value)}: no such weights file for {text} (a .pth/.safetensors file, "
            "a URL or `none`)" + ("; for a timm tag write timm:NAME.TAG" if spec.kind == specs.TIMM else "")
        )
    if spec.kind == specs.PYTHON:
        raise UsageError(
            f"{text}: give its weights: --weights FILE (a state dict of {spec.name}: .pth or .safetensors), "
            "or --weights none for the model as your code builds it"
        )
    return Source("checkpoint", path=hub_file(spec))


def hub_file(spec: specs.ModelSpec) -> Path:
    """The weights file of a timm model's pretrained tag, if the Hugging Face cache (or the torch hub
    cache, for timm's older URL weights) already has it; WeightsUnavailable saying how to pass a file."""
    timm = specs.timm_module()
    try:
        config = timm.models.get_pretrained_cfg(spec.name)
    except RuntimeError:
        config = None
    if config is None:
        specs.build(spec)  # an unknown model: the same message (and close names) as summary gives
        raise UsageError(f"{spec.text}: timm has no pretrained weights for it; pass --weights FILE or --weights none")
    repo = getattr(config, "hf_hub_id", None)
    tag = f"{config.architecture}.{config.tag}" if config.tag else config.architecture
    if repo:
        from huggingface_hub import constants, try_to_load_from_cache
        from timm.models import _hub

        names = [getattr(_hub, constant) for constant in HUB_FILES]
        if getattr(config, "hf_hub_filename", None):  # a repository with its own file name (open_clip's)
            names.insert(0, config.hf_hub_filename)
        for name in names:
            found = try_to_load_from_cache(repo, name)
            if isinstance(found, str):
                log.debug("%s: weights from the Hugging Face cache: %s", spec.text, found)
                return Path(found)
        where = f"the Hugging Face cache ({constants.HF_HUB_CACHE}) has no {repo}"
    else:
        where = f"timm keeps {tag}'s weights at {config.url or 'no known place'}"
    if config.url:
        from resnetcli.cache import checkpoint_dir

        candidate = checkpoint_dir() / config.url.rsplit("/", 1)[-1]
        if candidate.is_file():
            log.debug("%s: weights from the torch hub cache: %s", spec.text, candidate)
            return candidate
    raise WeightsUnavailable(
        f"timm:{tag}: pretrained weights not found locally ({where}), and resnetcli never downloads them "
        "from the Hub: pass --weights FILE (a .safetensors or .pth state dict of the model), or --weights none"
    )


# ---------------------------------------------------------------------------------------------
# Preprocessing


class TimmPreprocessing:
    """timm's eval preprocessing for a data config (`timm.data.create_transform`), described with the
    attributes of torchvision's ImageClassification (resize_size, crop_size, mean, std, interpolation),
    so that `--input-size`/`--resize`, export's metadata and finetune's stored record read it alike.

    Built from a data config (`from_config`), or, like ImageClassification, from sizes (what
    `inference.choose_transforms` and `checkpoints.transforms_for` do): then the crop fraction is
    chosen so that timm's `floor(crop / crop_pct)` gives exactly the resize size asked for. A crop
    mode other than "center" (squash, border) has no single resize size: `resize_size` is absent.
    """

    def __init__(self, *, crop_size, resize_size, mean, std, interpolation="bilinear", antialias: bool = True):
        crop = int(crop_size if isinstance(crop_size, int) else crop_size[0])
        resize = int(resize_size if isinstance(resize_size, int) else resize_size[0])
        self._configure(
            {
                "input_size": (3, crop, crop),
                "interpolation": str(getattr(interpolation, "value", interpolation)),
                "mean": tuple(float(v) for v in mean),
                "std": tuple(float(v) for v in std),
                "crop_pct": crop / (resize + 0.5),
                "crop_mode": "center",
            }
        )
        if self.resize_size != [resize]:  # pragma: no cover - the arithmetic above rules it out
            raise UsageError(f"timm resizes to {self.resize_size}, not {resize}")

    @classmethod
    def from_config(cls, config: dict) -> TimmPreprocessing:
        made = cls.__new__(cls)
        made._configure(config)
        return made

    def _configure(self, config: dict) -> None:
        from torchvision.transforms import CenterCrop, InterpolationMode, Resize

        timm = specs.timm_module()
        self.config = dict(config)
        self.transform = timm.data.create_transform(**self.config, is_training=False)
        steps = list(getattr(self.transform, "transforms", []))
        crops = [step.size for step in steps if isinstance(step, CenterCrop)]
        sizes = [step.size for step in steps if isinstance(step, Resize)]
        height, width = config["input_size"][-2:]
        self.crop_size = [int(v) for v in (crops[0] if crops else (height, width))]
        if self.crop_size[0] == self.crop_size[-1]:
            self.crop_size = self.crop_size[:1]
        if config.get("crop_mode", "center") == "center" and sizes and isinstance(sizes[0], int):
            self.resize_size = [int(sizes[0])]
        elif sizes and isinstance(sizes[0], (list, tuple)) and len(sizes[0]) == 1:
            self.resize_size = [int(sizes[0][0])]
        self.mean = [float(v) for v in config["mean"]]
        self.std = [float(v) for v in config["std"]]
        self.interpolation = InterpolationMode(str(config.get("interpolation", "bilinear")))
        self.antialias = True

    def __call__(self, image) -> torch.Tensor:
        return self.transform(image)

    def describe(self) -> str:
        resize = getattr(self, "resize_size", None)
        return (
            f"resize {resize[0] if resize else 'n/a'}, crop {'x'.join(map(str, self.crop_size))}, mean {self.mean}, "
            f"std {self.std}, interpolation {self.interpolation.value}, crop_mode {self.config.get('crop_mode')}"
        )

    def __repr__(self) -> str:
        return f"TimmPreprocessing({self.describe()})"


def _stored_preprocessing(record: dict, spec: specs.ModelSpec):
    """A checkpoint's stored preprocessing: timm's transform for timm models, torchvision's otherwise."""
    if spec.kind == specs.TIMM:
        return TimmPreprocessing(
            crop_size=record["crop_size"],
            resize_size=record["resize_size"],
            mean=record["mean"],
            std=record["std"],
            interpolation=str(record.get("interpolation", "bilinear")).lower(),
        )
    from torchvision.transforms._presets import ImageClassification

    return checkpoints.transforms_for(record, ImageClassification(crop_size=1))


def _preprocessing(spec: specs.ModelSpec, model, checkpoint: Checkpoint | None):
    if checkpoint is not None and checkpoint.preprocessing is not None:
        log.debug("%s: preprocessing stored in %s: %s", spec.text, checkpoint.source, checkpoint.preprocessing)
        return _stored_preprocessing(checkpoint.preprocessing, spec)
    config = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if spec.kind == specs.PYTHON and not isinstance(config, dict):
        raise UsageError(
            f"{spec.text}: no preprocessing known for {spec.name}: use a checkpoint that stores it "
            "(`resnet finetune` writes one), or give the module a timm-style pretrained_cfg dict "
            "(input_size, mean, std, crop_pct, interpolation)"
        )
    timm = specs.timm_module()
    data_config = timm.data.resolve_model_data_config(model)
    transforms = TimmPreprocessing.from_config(data_config)
    log.debug("%s: preprocessing from timm's data config %s: %s", spec.text, data_config, transforms.describe())
    return transforms


# ---------------------------------------------------------------------------------------------
# Building


@dataclass
class Loaded:
    """A spec's model, ready for inference (the factory wraps it in its LoadedModel)."""

    model: Any  # torch.nn.Module
    categories: list[str]
    transforms: Any
    notes: list[str] = field(default_factory=list)


def _head_count(model, state_dict: dict) -> int | None:
    """The classes a timm checkpoint's classifier (named by the model's pretrained_cfg) was trained for."""
    name = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    name = name[0] if isinstance(name, (list, tuple)) else name
    tensor = state_dict.get(f"{name}.weight") if name else None
    return int(tensor.shape[0]) if tensor is not None and tensor.dim() >= 1 else None


def _fit(spec: specs.ModelSpec, model, checkpoint: Checkpoint) -> None:
    """Load a checkpoint's tensors into the model, all of them (strict); CheckpointError listing misfits."""
    try:
        model.load_state_dict(checkpoint.state_dict, strict=True)
    except RuntimeError as error:
        log.debug("%s does not fit %s: %s", checkpoint.source, spec.text, str(error)[:500])
        expected = {key: list(tensor.shape) for key, tensor in model.state_dict().items()}
        problems = checkpoints.fit_problems(spec.text, expected, checkpoint.state_dict)
        raise CheckpointError(checkpoints.fit_message(checkpoint.source, spec.text, problems)) from None


def _timm_model(spec: specs.ModelSpec, checkpoint: Checkpoint | None, from_hub: bool):
    timm = specs.timm_module()
    default = specs.build(spec).model  # on the meta device: the default head and pretrained_cfg
    if checkpoint is None:
        return timm.create_model(spec.name, pretrained=False).eval()
    if from_hub:
        # timm's own loader (its filter_fn, label offsets) on tensors read safely here; no download.
        overlay = {"state_dict": dict(checkpoint.state_dict), "source": "timm"}
        try:
            return timm.create_model(spec.name, pretrained=True, pretrained_cfg_overlay=overlay).eval()
        except RuntimeError as error:
            raise CheckpointError(f"{checkpoints.shown(checkpoint.source)}: timm cannot load it: {error}") from None
    count = _head_count(default, checkpoint.state_dict)
    extra = {"num_classes": count} if count is not None and count != default.num_classes else {}
    model = timm.create_model(spec.name, pretrained=False, **extra).eval()
    _fit(spec, model, checkpoint)
    return model


def _timm_label_names(model, count: int) -> list[str] | None:
    """timm's names for the classes of the model's pretrained dataset, when the head has that many."""
    config = getattr(model, "pretrained_cfg", None) or {}
    names = config.get("label_names") or config.get("label_descriptions")
    if not names:
        timm = specs.timm_module()
        subset = timm.data.infer_imagenet_subset(model)
        if subset is None:
            return None
        # "tench, Tinca tinca": the first name, as torchvision's categories have it.
        names = [text.split(",")[0].strip() for text in timm.data.ImageNetInfo(subset).label_descriptions()]
    names = list(names.values()) if isinstance(names, dict) else list(names)
    return [str(name) for name in names] if len(names) == count else None


def build(
    text: str,
    checkpoint: Checkpoint | None,
    *,
    labels: Sequence[str] | None = None,
    from_hub: bool = False,
) -> Loaded:
    """Build a spec's model in eval mode on the CPU with the checkpoint's tensors (None: as built)."""
    spec = _spec(text)
    notes: list[str] = []
    if spec.kind == specs.TIMM:
        model = _timm_model(spec, checkpoint, from_hub)
        if checkpoint is None:
            notes.append(f"{text} has random weights (--weights none): its labels are meaningless")
    else:
        model = specs.make_module(spec)
        if checkpoint is not None:
            _fit(spec, model, checkpoint)
        else:
            notes.append(f"{text} is used as its code builds it (--weights none)")
    transforms = _preprocessing(spec, model, checkpoint)
    count = output_count(model)
    categories: list[str] | None = None
    if checkpoint is not None and checkpoint.classes is not None and len(checkpoint.classes) == count:
        categories = list(checkpoint.classes)
    elif spec.kind == specs.TIMM and count:
        categories = _timm_label_names(model, count)
    if labels is not None:
        if count is not None and len(labels) != count:
            raise UsageError(f"the labels name {len(labels)} classes but the model {text} predicts {count}")
        categories = list(labels)
    if categories is None:
        if count is None:
            raise UsageError(f"{text}: cannot tell how many classes it predicts; pass --labels FILE")
        categories = [f"class_{i}" for i in range(count)]
    return Loaded(model, categories, transforms, notes)
