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
import re
import time
from collections.abc import Callable, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from resnetcli import names, store
from resnetcli.download import file_name_of
from resnetcli.errors import UsageError
from resnetcli.onnxmeta import DEFAULT_OPSET
from resnetcli.urls import is_url

log = logging.getLogger(__name__)

#: The exporter settings in a cached export's name (resnetcli.export.EXPORTER, opset appended).
EXPORTER_TAG = "dynamo"
SUFFIX = ".onnx"
#: `factory.DEFAULT_ARCH` (the factory imports torch): the architecture of `--weights NAME` without
#: `--arch`. tests/test_onnx_predict.py checks that the two agree.
DEFAULT_ARCH = "resnet50"


def export_file_name(arch: str, label: str, source_sha256: str, opset: int = DEFAULT_OPSET) -> str:
    """The cache file name of an export (see the module docstring)."""
    return f"{arch}.{label}.{source_sha256[:16]}.{EXPORTER_TAG}_opset{opset}{SUFFIX}"


def _defaults_file() -> Path:
    try:
        torchvision_version = version("torchvision")
    except PackageNotFoundError:
        torchvision_version = "unknown"
    return store.checkpoint_dir() / store.RECORD_DIR / f"onnx-defaults-{torchvision_version}.json"


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
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}{store.PARTIAL_SUFFIX}")
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


def _checkpoint_file(spec: str) -> Path | None:
    """The checkpoint file a `--weights` value names, as the factory resolves it: a local path
    first, else a bare file name in the weight cache (`resnet fetch --from-file`)."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if spec == Path(spec).name and not spec.startswith("."):
        cached = store.checkpoint_dir() / spec
        if cached.is_file() and not cached.name.endswith(SUFFIX):
            return cached
    return None


def lookup(arch: str | None, weights: str | None = None, opset: int = DEFAULT_OPSET) -> tuple[Path, str] | None:
    """The cached export for ARCH and a `--weights` value, and the `weights` the torch path's records
    would show (`factory.WeightsChoice.name`: the weights name, the checkpoint's path, the URL);
    found without importing torch, or None.

    `arch` None means what `load_model` does: the checkpoint's own architecture, which for a
    checkpoint or URL is the one its export was made with (the source's sha256 is in the name, the
    architecture is not needed to find it), and DEFAULT_ARCH for pretrained names. The export found
    is checked like any cached file (size against its record, hash if it moved): a damaged one
    raises WeightsUnavailable naming `resnet cache rm`.
    """
    folder = store.checkpoint_dir()
    tag = f"{EXPORTER_TAG}_opset{opset}{SUFFIX}"
    wanted = arch.strip().lower() if arch else "*"
    spec = weights.strip() if weights is not None else None
    if spec is not None and spec.lower() == "none":
        return None
    if spec is not None and is_url(spec):
        record = store.read_record(folder / file_name_of(spec))
        if record is None:
            return None
        shown, pattern = spec, f"{wanted}.url.{record['sha256'][:16]}.{tag}"
    elif spec is not None and (checkpoint := _checkpoint_file(spec)) is not None:
        record = store.read_record(checkpoint) if checkpoint.parent == folder else None
        sha = record["sha256"] if record is not None else store.sha256_of(checkpoint)
        shown, pattern = str(checkpoint), f"{wanted}.file.{sha[:16]}.{tag}"
    else:
        arch = (arch or DEFAULT_ARCH).strip().lower()
        label = _pretrained_label(arch, spec)
        if label is None:
            return None
        shown, pattern = label, f"{arch}.{label}.*.{tag}"
    found = sorted(path for path in folder.glob(pattern) if path.is_file()) if folder.is_dir() else []
    if len(found) != 1:
        if len(found) > 1:
            log.debug("several cached exports match %s %s: %s; exporting again", arch, weights, found)
        return None
    store.check_cached_file(found[0])
    return found[0], shown


def find_export(arch: str | None, weights: str | None = None, opset: int = DEFAULT_OPSET) -> Path | None:
    """The cached export for ARCH and a `--weights` value (see `lookup`), or None."""
    found = lookup(arch, weights, opset)
    return found[0] if found is not None else None


_EXPORT_NAME = re.compile(
    rf"^(?P<arch>[^.]+)\.(?P<label>[^.]+)\.[0-9a-f]{{16}}\.(?P<exporter>[a-z]+)_opset(?P<opset>\d+){re.escape(SUFFIX)}$"
)


def describe_export(file_name: str) -> str | None:
    """What `cache list` shows for a cached export's file name: `resnet50:IMAGENET1K_V2 (ONNX, opset 18)`,
    `resnet18:checkpoint file (ONNX, opset 18)`; None for any other file."""
    match = _EXPORT_NAME.match(file_name)
    if match is None:
        return None
    label = {"file": "checkpoint file", "url": "URL"}.get(match["label"], match["label"])
    return f"{match['arch']}:{label} (ONNX, opset {match['opset']})"


def produce(file_name: str, write: Callable[[Path], None]) -> store.CachedFile:
    """Make a file in the weight cache through the store's one verified-install path
    (`store.store_verified`): under the file's lock, `write` fills a scratch partial file in the
    cache folder, which is then copied to the store's own partial file, hashed, recorded and renamed
    into place; a file another process made meanwhile is checked and reused ("already cached").

    The copy costs one more write of the file (~0.1 s for resnet50's 100 MB here, against 3-20 s
    for an export) and keeps a single way into the cache. A scratch file left by a killed process
    is named like a partial of `file_name`, so the next holder of the lock removes it.
    """
    folder = store.checkpoint_dir()

    def open_source() -> store.Source:
        scratch = store.new_partial(folder, file_name)
        try:
            write(scratch)
            handle = open(scratch, "rb")  # noqa: SIM115 - closed by the Source's close()
        except BaseException:
            scratch.unlink(missing_ok=True)
            raise

        def close() -> None:
            handle.close()
            scratch.unlink(missing_ok=True)

        return store.Source(name=str(folder / file_name), read=handle.read, close=close)

    # No expected hash: the file is made here, not fetched; its sha256 is recorded as computed.
    return store.store_verified(file_name, "", open_source, status="exported")


def cache_export(
    arch: str | None,
    weights: str | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    images: Sequence[Path] | None = None,
    settings=None,
    on_progress=None,
) -> store.CachedFile:
    """The cached export of ARCH with `weights` ("already cached": found without torch), or made now
    ("exported": loads the model through the factory, which imports torch, and exports it).

    `arch` None is the checkpoint's own architecture, as for `load_model`.
    """
    found = find_export(arch, weights, opset)
    if found is not None:
        record = store.read_record(found)
        return store.CachedFile(
            found.name, found, found.stat().st_size, record["sha256"] if record else None, "already cached"
        )
    from resnetcli import export, factory

    choice = factory.resolve_weights(arch or factory.DEFAULT_ARCH, weights)
    if choice.kind == "none":
        raise UsageError(
            "random weights (--weights none) are not cached as an export; "
            "write one with `resnet export ARCH --weights none -o FILE.onnx` and pass that file"
        )
    # Exported with the model's own class names: --labels apply when the export is opened.
    loaded = factory.load_model(arch, weights, settings=settings, on_progress=on_progress)
    source = export.source_sha256(loaded.weights)
    label = {"checkpoint": "file", "url": "url"}.get(loaded.weights.kind, loaded.weights.name)
    names.remember()
    made = produce(
        export_file_name(loaded.arch, label, source, opset),
        lambda partial: export.export_loaded(loaded, partial, source_sha=source, opset=opset, images=images),
    )
    if loaded.weights.kind == "pretrained" and (weights is None or weights.strip().upper() == "DEFAULT"):
        _remember_default(loaded.arch, loaded.weights.name)
    return made


def ensure_export(arch: str | None, weights: str | None = None, **options) -> Path:
    """The path of `cache_export(arch, weights, **options)`."""
    return cache_export(arch, weights, **options).path
