"""Architecture and weights names for shell completion, answered without importing torch.

Completion runs the `resnet` program on every key press, and importing torch takes seconds. The
names come from torchvision's registry once and are kept in a small JSON file per torchvision
version, `$XDG_CACHE_HOME/resnetcli/names-<version>.json` (default `~/.cache/resnetcli`): written
by the commands that load the registry anyway (`summary`, `features`, `list`), and generated on the
first completion otherwise.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Sequence

from resnetcli.catalogue import GENERIC_WEIGHTS


def names_file() -> Path:
    """Where the names of the installed torchvision's registry are kept."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    try:
        torchvision_version = version("torchvision")
    except PackageNotFoundError:
        torchvision_version = "unknown"
    return Path(os.path.expanduser(cache)) / "resnetcli" / f"names-{torchvision_version}.json"


def registry_names() -> dict[str, list[str]]:
    """Every classification architecture torchvision registers, with its weights names (imports torchvision)."""
    from resnetcli.catalogue import completion_names

    return completion_names()


def save(names: dict[str, list[str]]) -> None:
    """Write the names file atomically; a cache folder that cannot be written only costs speed."""
    path = names_file()
    temporary = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(json.dumps(names, indent=0, sort_keys=True))
        os.replace(temporary, path)
    except OSError:
        temporary.unlink(missing_ok=True)


def remember() -> None:
    """Write the names file if it is missing; called by commands that have loaded the registry anyway."""
    if not names_file().is_file():
        save(registry_names())


@lru_cache(maxsize=1)
def load() -> dict[str, list[str]]:
    """Architecture -> weights names: from the names file, or from the registry (then saved) the first time."""
    try:
        names = json.loads(names_file().read_text())
        if isinstance(names, dict) and names and all(isinstance(v, list) for v in names.values()):
            return names
    except (OSError, ValueError):
        pass
    names = registry_names()
    save(names)
    return names


def complete_architecture(incomplete: str) -> list[str]:
    """Architecture names starting with `incomplete` (case-insensitive)."""
    prefix = incomplete.lower()
    return [arch for arch in load() if arch.startswith(prefix)]


def complete_weights(words: Sequence[object], incomplete: str) -> list[str]:
    """Weights names starting with `incomplete`, of the first architecture named among `words` (the
    command line so far), or of every architecture when none is named yet."""
    names = load()
    arch = next((word.lower() for word in words if isinstance(word, str) and word.lower() in names), None)
    candidates = names[arch] if arch is not None else sorted({name for weights in names.values() for name in weights})
    prefix = incomplete.upper()
    return [name for name in [*candidates, *GENERIC_WEIGHTS] if name.upper().startswith(prefix)]


def complete_model_spec(incomplete: str) -> list[str]:
    """`ARCH` or `ARCH:WEIGHTS` values (as `resnet fetch` takes them) starting with `incomplete`."""
    arch, colon, weights = incomplete.partition(":")
    if not colon:
        return complete_architecture(arch)
    return [f"{arch}:{name}" for name in complete_weights([arch], weights) if name != "none"]
