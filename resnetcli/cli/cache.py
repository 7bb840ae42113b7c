"""`resnet fetch` and `resnet cache list|verify|rm`: fill, inspect and clean the weight cache."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated

from resnetcli.cli.app import FormatOption, MirrorOption, OfflineOption, app, download_progress, report_error, say, warn
from resnetcli.cli.output import RecordWriter, choose_format
from resnetcli.errors import ExitStatus

FETCH_COLUMNS = ["name", "file", "size", "sha256", "path", "status", "error"]
LIST_COLUMNS = ["file", "size", "weights", "sha256", "source", "path"]
VERIFY_COLUMNS = ["file", "size", "sha256", "status", "problem", "path"]
RM_COLUMNS = ["file", "size", "status", "path"]

TimeoutOption = Annotated[
    Optional[float],
    typer.Option("--timeout", metavar="SECONDS", help="Give up on a server that sends nothing for this long (also RESNET_TIMEOUT; default 30)."),
]

cache_app = typer.Typer(
    name="cache",
    help="List, verify and remove the cached weight files ($TORCH_HOME/hub/checkpoints).",
    no_args_is_help=True,
)
app.add_typer(cache_app)


@app.command()
def fetch(
    models: Annotated[
        Optional[List[str]],
        typer.Argument(help="ARCH or ARCH:WEIGHTS (resnet50, resnet18:IMAGENET1K_V1).", metavar="ARCH[:WEIGHTS]", show_default=False),
    ] = None,
    url: Annotated[
        Optional[str],
        typer.Option("--url", help="Fetch your own checkpoint from this URL; its hash is --sha256 or the one in a NAME-<sha256 prefix>.pth name."),
    ] = None,
    sha256: Annotated[
        Optional[str],
        typer.Option("--sha256", metavar="HEX", help="The sha256 (full, or at least 8 leading hex digits) the --url or --from-file file must have."),
    ] = None,
    from_file: Annotated[
        Optional[Path],
        typer.Option(
            "--from-file",
            metavar="PATH",
            help="Import a file copied in by hand instead of downloading: as ARCH[:WEIGHTS], as the --url file, or under its own name.",
        ),
    ] = None,
    output_format: FormatOption = None,
    offline: OfflineOption = False,
    mirror: MirrorOption = None,
    timeout: TimeoutOption = None,
) -> None:
    """Fill the weight cache ($TORCH_HOME/hub/checkpoints) with files verified by sha256, so later runs work offline."""
    from resnetcli import cache
    from resnetcli.errors import CacheError, UsageError, WeightsUnavailable

    models = models or []
    if not (models or url or from_file):
        raise UsageError("nothing to fetch: give ARCH[:WEIGHTS]..., --url URL or --from-file PATH")
    if from_file is not None:
        if len(models) + (url is not None) > 1:
            raise UsageError("--from-file imports one file: give it one ARCH[:WEIGHTS] or one --url, or neither")
        if not from_file.is_file():
            raise UsageError(f"--from-file {from_file}: no such file")
    expected = cache.parse_sha256(sha256) if sha256 is not None else None
    if expected and not (url or (from_file and not models)):
        raise UsageError("--sha256 is for --url and --from-file files; torchvision's weights are checked against the hash in their file name")
    settings = cache.CacheSettings.from_env(offline=offline, mirror=mirror, timeout=timeout)

    wanted = [_Wanted(spec, choice.pretrained.url, None, True, f"resnet fetch {spec}") for spec, choice in _torchvision_weights(models)]
    if url is not None:
        wanted.append(_Wanted(url, url, expected, False, f"resnet fetch --url {url}" + (f" --sha256 {expected}" if expected else "")))
    elif from_file is not None and not models:
        wanted.append(_Wanted(str(from_file), None, expected, False, ""))

    failed = False
    fmt = choose_format(output_format, sys.stdout)
    with download_progress() as on_progress, RecordWriter(fmt, FETCH_COLUMNS, title=f"weight cache {cache.checkpoint_dir()}") as writer:
        for item in wanted:
            try:
                cached = _obtain(item, from_file, settings, on_progress)
            except CacheError:
                raise  # The folder itself is unusable: the other files would fail the same way.
            except WeightsUnavailable as error:
                failed = True
                report_error(error)
                writer.write({"name": item.name, "error": " ".join(str(error).split())})
                continue
            say(f"{cached.status}: {item.name} -> {cached.path}")
            writer.write({
                "name": item.name, "file": cached.name, "size": cached.size,
                "sha256": cached.sha256, "path": str(cached.path), "status": cached.status,
            })
    if failed:
        raise typer.Exit(int(ExitStatus.WEIGHTS_UNAVAILABLE))


def _torchvision_weights(specs: list[str]):
    """(spec, WeightsChoice) for each ARCH[:WEIGHTS], all resolved before anything is fetched."""
    from resnetcli.errors import UsageError
    from resnetcli.factory import resolve_weights

    resolved = []
    for spec in specs:
        arch, _, weights = spec.partition(":")
        choice = resolve_weights(arch, weights or None)
        if choice.kind != "pretrained":
            raise UsageError(f"{spec}: fetch takes torchvision weights names (ARCH or ARCH:WEIGHTS); use --url for a URL")
        resolved.append((f"{choice.arch}:{choice.name}", choice))
    return resolved


@dataclass(frozen=True)
class _Wanted:
    """One file `fetch` is asked for: its record's name, its URL, the hash it must have."""

    name: str
    url: Optional[str]  # None: a --from-file PATH cached under its own name
    sha256: Optional[str]  # None: the hash in the file name
    mirrored: bool  # torchvision's weights go to --mirror; a user's URL is fetched as given
    fetch_hint: str


def _obtain(wanted: _Wanted, from_file: Optional[Path], settings, on_progress):
    """Import `from_file` as the wanted file, or download it; either way verified before it is cached."""
    from resnetcli import cache

    if from_file is not None:
        file_name = cache.file_name_of(wanted.url) if wanted.url else None
        return cache.import_file(from_file, file_name, sha256=wanted.sha256)
    assert wanted.url is not None
    return cache.download(
        wanted.url, sha256=wanted.sha256, settings=settings, on_progress=on_progress, fetch_hint=wanted.fetch_hint, mirrored=wanted.mirrored
    )


@cache_app.command("list")
def list_cache(output_format: FormatOption = None) -> None:
    """The cached weight files: size, which ARCH:WEIGHTS each belongs to, recorded sha256 and source URL."""
    from resnetcli import cache

    owners = cache.weights_by_file_name()
    fmt = choose_format(output_format, sys.stdout)
    with RecordWriter(fmt, LIST_COLUMNS, title=f"weight cache {cache.checkpoint_dir()}") as writer:
        for path in cache.cached_files():
            described, source = cache.describe(path)
            writer.write({
                "file": described.name, "size": described.size, "weights": owners.get(described.name, []),
                "sha256": described.sha256, "source": source, "path": str(path),
            })


@cache_app.command("verify")
def verify_cache(
    names: Annotated[Optional[List[str]], typer.Argument(help="Files to verify (default: all).", metavar="NAME", show_default=False)] = None,
    output_format: FormatOption = None,
) -> None:
    """Hash cached files in full against their records (or file-name prefix); exit 3 if any is corrupt."""
    from resnetcli import cache

    paths, missing = _cached_paths(names) if names else (cache.cached_files(), 0)
    corrupt = 0
    fmt = choose_format(output_format, sys.stdout)
    with RecordWriter(fmt, VERIFY_COLUMNS, title=f"weight cache {cache.checkpoint_dir()}") as writer:
        for path in paths:
            result = cache.verify(path)
            if result.status == "corrupt":
                corrupt += 1
                say(f"error: {path}: corrupt ({result.problem}); remove it with `resnet cache rm {result.name}` and fetch it again")
            elif result.status == "unverifiable":
                warn(f"{path}: cannot be verified ({result.problem})")
            writer.write({
                "file": result.name, "size": result.size, "sha256": result.sha256,
                "status": result.status, "problem": result.problem, "path": str(path),
            })
    if corrupt:
        raise typer.Exit(int(ExitStatus.WEIGHTS_UNAVAILABLE))
    if missing:
        raise typer.Exit(int(ExitStatus.INPUTS_FAILED))


@cache_app.command("rm")
def remove_cache(
    names: Annotated[Optional[List[str]], typer.Argument(help="Files to remove, as `resnet cache list` names them.", metavar="NAME", show_default=False)] = None,
    all_files: Annotated[bool, typer.Option("--all", help="Remove every cached weight file, record and abandoned partial download.")] = False,
    output_format: FormatOption = None,
) -> None:
    """Remove cached weight files and their records."""
    from resnetcli import cache
    from resnetcli.errors import UsageError

    if all_files == bool(names):
        raise UsageError("give the NAMEs of files to remove, or --all (not both)")
    paths, missing = (cache.cached_files(), 0) if all_files else _cached_paths(names or [])
    fmt = choose_format(output_format, sys.stdout)
    with RecordWriter(fmt, RM_COLUMNS, title=f"weight cache {cache.checkpoint_dir()}") as writer:
        for path in paths:
            removed = cache.remove(path)
            writer.write({"file": removed.name, "size": removed.size, "status": removed.status, "path": str(removed.path)})
    if all_files:
        cache.remove_leftovers()
    if missing:
        raise typer.Exit(int(ExitStatus.INPUTS_FAILED))


def _cached_paths(names: list[str]) -> tuple[list[Path], int]:
    """The cached files `names` name; each unknown name is reported on stderr and counted."""
    from resnetcli.cache import cached_file
    from resnetcli.errors import InputError

    paths, missing = [], 0
    for name in names:
        try:
            paths.append(cached_file(name))
        except InputError as error:
            report_error(error)
            missing += 1
    return paths, missing
