"""The catalogue: torchvision's image-classification architectures and their weights, walked once.

Everything comes from torchvision's own registry: `list_models(module=torchvision.models)` for the
architecture names (the sub-packages hold detection, segmentation, video and quantized models),
`get_model_weights` for each one's weights enum, and the enum members for file names and metadata
(`meta["categories"]`, `meta["_metrics"]`, ...). Nothing here is a hand-written table.

Users of the walk: the factory (names), `resnet list` (`weights_catalogue`), `cache list`
(`weights_by_file_name`) and shell completion (`completion_names`). torch and torchvision are
imported inside the functions so that importing this module stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from resnetcli.errors import UnknownArchitecture, UsageError, did_you_mean

if TYPE_CHECKING:  # pragma: no cover
    from torchvision.models import WeightsEnum

#: The `--weights` value that means "random initialisation".
NO_WEIGHTS = "none"
#: The `--weights` value that means "the architecture's recommended weights".
DEFAULT_WEIGHTS = "DEFAULT"
#: `--weights` values every architecture accepts besides its weights names.
GENERIC_WEIGHTS = (DEFAULT_WEIGHTS, NO_WEIGHTS)


@dataclass(frozen=True)
class Entry:
    """One architecture of the catalogue with its weights enum."""

    arch: str
    enum: type[WeightsEnum]

    @property
    def weights(self) -> tuple[WeightsEnum, ...]:
        """The weights members, without the DEFAULT alias (iterating an enum skips aliases)."""
        return tuple(self.enum)


@lru_cache(maxsize=1)
def entries() -> tuple[Entry, ...]:
    """The one walk over torchvision's classification registry, sorted by architecture name."""
    from torchvision import models

    return tuple(Entry(arch, models.get_model_weights(arch)) for arch in models.list_models(module=models))


@lru_cache(maxsize=1)
def _by_arch() -> dict[str, Entry]:
    return {entry.arch: entry for entry in entries()}


def architecture_names() -> tuple[str, ...]:
    """Every image-classification architecture torchvision registers, sorted."""
    return tuple(entry.arch for entry in entries())


def resolve_architecture(name: str) -> str:
    """Return the registered architecture called `name` (case-insensitive), or raise with suggestions."""
    wanted = name.strip().lower()
    if wanted in _by_arch():
        return wanted
    tail = did_you_mean(wanted, architecture_names(), fallback=" (`resnet list` shows them all)")
    raise UnknownArchitecture(f"unknown architecture {name!r}{tail}")


def weights_enum(arch: str) -> type[WeightsEnum]:
    """The torchvision weights enum of a registered architecture."""
    return _by_arch()[resolve_architecture(arch)].enum


def weights_names(arch: str) -> list[str]:
    """The names `--weights` accepts for `arch`: its weights, then DEFAULT and none, each once."""
    return [member.name for member in weights_enum(arch)] + list(GENERIC_WEIGHTS)


def weights_file_name(weights: WeightsEnum) -> str:
    """The file name torchvision (and torch.hub's cache) uses for these weights."""
    from urllib.parse import urlparse

    return Path(urlparse(weights.url).path).name


def completion_names() -> dict[str, list[str]]:
    """Architecture -> its weights names, as shell completion keeps them (see resnetcli.names)."""
    return {entry.arch: [member.name for member in entry.weights] for entry in entries()}


def weights_by_file_name() -> dict[str, list[str]]:
    """Which torchvision ARCH:WEIGHTS each weights file name belongs to, from the weights' URLs."""
    owners: dict[str, list[str]] = {}
    for entry in entries():
        for member in entry.weights:
            owners.setdefault(weights_file_name(member), []).append(f"{entry.arch}:{member.name}")
    return owners


# ---------------------------------------------------------------------------------------------
# `resnet list`


@dataclass(frozen=True)
class WeightsInfo:
    """One pretrained weights set of an architecture, from torchvision's `weights.meta`."""

    arch: str
    weights: str
    default: bool
    acc1: float | None
    acc5: float | None
    params: int | None
    gflops: float | None
    file_mb: float | None
    file: str
    cached: bool

    def record(self) -> dict:
        """The row of `resnet list`, under its column names."""
        return {
            "arch": self.arch,
            "weights": self.weights,
            "default": self.default,
            "acc@1": self.acc1,
            "acc@5": self.acc5,
            "params": self.params,
            "gflops": self.gflops,
            "file_mb": self.file_mb,
            "file": self.file,
            "cached": self.cached,
        }


def weights_catalogue(pattern: str | None = None, cached_names: Sequence[str] | None = None) -> list[WeightsInfo]:
    """Every architecture whose name matches the shell-style `pattern` (case-insensitive), with its weights.

    Accuracies are those torchvision publishes (`meta["_metrics"]`, first dataset: ImageNet-1K);
    `cached` says whether the weights file is in resnetcli's (torch.hub's) checkpoint folder, or
    among `cached_names` when the caller gives them.
    """
    import fnmatch

    wanted = (pattern or "*").strip().lower()
    selected = [entry for entry in entries() if fnmatch.fnmatchcase(entry.arch, wanted)]
    if not selected:
        raise UsageError(f"no architecture matches {pattern!r} (`resnet list` shows them all)")
    if cached_names is None:
        from resnetcli.cache import checkpoint_dir

        folder = checkpoint_dir()
        is_cached = lambda file: (folder / file).is_file()  # noqa: E731
    else:
        names = set(cached_names)
        is_cached = names.__contains__
    rows: list[WeightsInfo] = []
    for entry in selected:
        for member in entry.weights:
            meta = member.meta
            metrics = next(iter(meta.get("_metrics", {}).values()), {})
            file = weights_file_name(member)
            rows.append(
                WeightsInfo(
                    arch=entry.arch,
                    weights=member.name,
                    default=member is entry.enum.DEFAULT,
                    acc1=metrics.get("acc@1"),
                    acc5=metrics.get("acc@5"),
                    params=meta.get("num_params"),
                    gflops=meta.get("_ops"),
                    file_mb=meta.get("_file_size"),
                    file=file,
                    cached=is_cached(file),
                )
            )
    return rows
