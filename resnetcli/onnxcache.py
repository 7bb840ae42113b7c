"""ONNX exports kept in the weight cache, found again without importing torch.

An export is cached in the weight cache folder beside the weights it was made from, under the same
lock, temporary file, rename and sha256 record as a download (`cache list`, `verify` and `rm` see
it as one more cached file). Its name holds the key, so that a later run finds it from the command
line alone:

    ARCH.WEIGHTS.SOURCE_SHA256[:16].EXPORTER_opsetN.onnx
    e.g. resnet50.IMAGENET1K_V2.11ad3fa6a8d1b7f0.dynamo_opset18.onnx

where WEIGHTS is the torchvision weights name, `file` for a checkpoint file or `url` for a URL.
(No `-<hex>.` in it: that would read as torch.hub's hash prefix of the file itself.) A pretrained
name is matched case-insensitively against the names file shell completion keeps
(`resnetcli.names`); DEFAULT is mapped through a small alias file in the cache's record folder,
written when an export of DEFAULT is made (the names file lists weights, not which is DEFAULT).
A checkpoint file is hashed (no torch needed), a URL's download is looked up by its record.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from resnetcli import cache, names
from resnetcli.errors import UsageError
from resnetcli.onnxmeta import DEFAULT_OPSET

log = logging.getLogger(__name__)

#: The exporter settings in a cached export's name (resnetcli.export.EXPORTER, opset appended).
EXPORTER_TAG = "dynamo"
SUFFIX = ".onnx"


def export_file_name(arch: str, label: str, source_sha256: str, opset: int = DEFAULT_OPSET) -> str:
    """The cache file name of an export (see the module docstring)."""
    return f"{arch}.{label}.{source_sha256[:16]}.{EXPORTER_TAG}_opset{opset}{SUFFIX}"


def _defaults_file() -> Path:
    try:
        torchvision_version = version("torchvision")
    except PackageNotFoundError:
        torchvision_version = "unknown"
    return cache.checkpoint_dir() / cache.RECORD_DIR / f"onnx-defaults-{torchvision_version}.json"


def _read_defaults() -> dict[str, str]:
    try:
        data = json.loads(_defaults_file().read_text())
    except (OSError, ValueError):
        return {}
    return (
        {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, str)} if isinstance(data, dict) else {}
    )


def _remember_default(arch: str, weights_name: str) -> None:
    path = _defaults_file()
    defaults = {**_read_defaults(), arch: weights_name}
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}{cache.PARTIAL_SUFFIX}")
    try:
        temporary.write_text(json.dumps(defaults, indent=0, sort_keys=True))
        os.replace(temporary, path)
    except OSError as error:
        log.debug("cannot record %s's DEFAULT weights in %s: %s", arch, path, error)
    finally:
        temporary.unlink(missing_ok=True)


def _pretrained_label(arch: str, spec: str | None) -> str | None:
    """The weights name a pretrained `--weights` value means, without torchvision, or None if unknown."""
    if spec is None or spec.strip().upper() == "DEFAULT":
        label = _read_defaults().get(arch)
        if label is None:
            log.debug("no cached export is known for %s's DEFAULT weights", arch)
        return label
    text = spec.strip()
    label = (text.rpartition(".")[2] if "_Weights." in text else text).upper()
    if names.names_file().is_file():
        known = names.load().get(arch)
        if known is not None and label not in known:
            log.debug("%s is not a weights name of %s in %s", spec, arch, names.names_file())
            return None
    return label


def find_export(arch: str, weights: str | None = None, opset: int = DEFAULT_OPSET) -> Path | None:
    """The cached export for ARCH and a `--weights` value, found without importing torch, or None.

    The export found is checked like any cached file (size against its record, hash if it moved):
    a damaged one raises WeightsUnavailable naming `resnet cache rm`.
    """
    arch = arch.strip().lower()
    folder = cache.checkpoint_dir()
    tag = f"{EXPORTER_TAG}_opset{opset}{SUFFIX}"
    spec = weights.strip() if weights is not None else None
    if spec is not None and spec.lower() == "none":
        return None
    if spec is not None and spec.lower().startswith(("http://", "https://")):
        record = cache.read_record(folder / cache.file_name_of(spec))
        if record is None:
            return None
        candidates = [folder / export_file_name(arch, "url", record["sha256"], opset)]
    elif spec is not None and Path(spec).expanduser().is_file():
        candidates = [folder / export_file_name(arch, "file", cache.sha256_of(Path(spec).expanduser()), opset)]
    else:
        label = _pretrained_label(arch, spec)
        if label is None:
            return None
        candidates = sorted(folder.glob(f"{arch}.{label}.*.{tag}")) if folder.is_dir() else []
    found = [path for path in candidates if path.is_file()]
    if len(found) != 1:
        if len(found) > 1:
            log.debug("several cached exports match %s %s: %s; exporting again", arch, weights, found)
        return None
    cache.check_cached_file(found[0])
    return found[0]


def produce(file_name: str, write: Callable[[Path], None]) -> Path:
    """Make a file in the weight cache with a download's discipline: under the file's lock, written
    by `write` to a unique partial file, hashed, recorded and renamed into place; another process
    that made it meanwhile is reused. (Built on resnetcli.cache's lock and install steps; the
    store's public version of this goes in with the predict wiring.)"""
    folder = cache.checkpoint_dir()
    cache._cache_folder_ready(folder)
    target = folder / file_name
    with cache._file_lock(folder, file_name):
        if target.is_file():
            cache.check_cached_file(target)
            return target
        cache._remove_stale_partials(folder, file_name)
        partial = cache._new_partial(folder, file_name)
        try:
            write(partial)
            cache._install(partial, target, cache.sha256_of(partial), None)
        finally:
            partial.unlink(missing_ok=True)
    return target


def ensure_export(
    arch: str,
    weights: str | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    images: Sequence[Path] | None = None,
    settings=None,
    on_progress=None,
) -> Path:
    """The cached export of ARCH with `weights`: found without torch, or exported now (imports torch)."""
    found = find_export(arch, weights, opset)
    if found is not None:
        return found
    from resnetcli import export, factory

    choice = factory.resolve_weights(arch, weights)
    if choice.kind == "none":
        raise UsageError(
            "--runtime onnxruntime: random weights (--weights none) are not cached as an export; "
            "write one with `resnet export ARCH --weights none -o FILE.onnx` and pass that file"
        )
    # Exported with the model's own class names: --labels apply when the export is opened.
    loaded = factory.load_model(arch, weights, settings=settings, on_progress=on_progress)
    source = export.source_sha256(loaded.weights)
    label = {"checkpoint": "file", "url": "url"}.get(loaded.weights.kind, loaded.weights.name)
    names.remember()
    path = produce(
        export_file_name(loaded.arch, label, source, opset),
        lambda partial: export.export_loaded(loaded, partial, source_sha=source, opset=opset, images=images),
    )
    if loaded.weights.kind == "pretrained" and (weights is None or weights.strip().upper() == "DEFAULT"):
        _remember_default(loaded.arch, loaded.weights.name)
    return path
