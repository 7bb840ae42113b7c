"""The catalogue of torchvision's architectures and their pretrained weights, as `resnet list` shows it.

(The `factory` branch moves this walk into resnetcli/catalogue.py; the logic here is unchanged.)
"""

from __future__ import annotations

from dataclasses import dataclass

from resnetcli.errors import UsageError
from resnetcli.registry import weights_enum


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


def weights_catalogue(pattern: str | None = None) -> list[WeightsInfo]:
    """Every architecture whose name matches the shell-style `pattern` (case-insensitive), with its weights.

    Accuracies are those torchvision publishes (`meta["_metrics"]`, first dataset: ImageNet-1K);
    `cached` says whether the weights file is in resnetcli's (torch.hub's) checkpoint folder.
    """
    import fnmatch

    from resnetcli.cache import checkpoint_dir
    from resnetcli.registry import architecture_names, weights_file_name

    wanted = (pattern or "*").strip().lower()
    archs = [arch for arch in architecture_names() if fnmatch.fnmatchcase(arch, wanted)]
    if not archs:
        raise UsageError(f"no architecture matches {pattern!r} (`resnet list` shows them all)")
    folder = checkpoint_dir()
    rows: list[WeightsInfo] = []
    for arch in archs:
        enum = weights_enum(arch)
        for member in enum:
            meta = member.meta
            metrics = next(iter(meta.get("_metrics", {}).values()), {})
            file = weights_file_name(member)
            rows.append(
                WeightsInfo(
                    arch=arch,
                    weights=member.name,
                    default=member is enum.DEFAULT,
                    acc1=metrics.get("acc@1"),
                    acc5=metrics.get("acc@5"),
                    params=meta.get("num_params"),
                    gflops=meta.get("_ops"),
                    file_mb=meta.get("_file_size"),
                    file=file,
                    cached=(folder / file).is_file(),
                )
            )
    return rows
