"""`resnet fetch` and `resnet cache list|verify|rm`: fill, inspect and clean the weight cache."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import typer
from typing_extensions import Annotated

from resnetcli.cli.app import FormatOption, MirrorOption, OfflineOption, app, download_progress, report_error, say, warn
from resnetcli.cli.output import OutputFormat, RecordWriter, choose_format
from resnetcli.errors import ExitStatus, one_line

FETCH_COLUMNS = ["name", "file", "size", "sha256", "path", "status", "error"]
LIST_COLUMNS = ["file", "size", "weights", "sha256", "source", "path"]
VERIFY_COLUMNS = ["file", "size", "sha256", "status", "problem", "path"]
RM_COLUMNS = ["file", "size", "status", "path"]

TimeoutOption = Annotated[
    Optional[float],
    typer.Option(
        "--timeout",
        metavar="SECONDS",
        help="Give up on a server that sends nothing for this long (also RESNET_TIMEOUT; default 30).",
    ),
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
        typer.Argument(
            help="ARCH or ARCH:WEIGHTS (resnet50, resnet18:IMAGENET1K_V1).",
            metavar="ARCH[:WEIGHTS]",
            show_default=False,
        ),
    ] = None,
    url: Annotated[
        Optional[str],
        typer.Option(
            "--url",
            help="Fetch your own checkpoint from this URL (http or https); its hash is --sha256 or the one in a "
            "NAME-<sha256 prefix>.pth name.",
        ),
    ] = None,
    sha256: Annotated[
        Optional[str],
        typer.Option(
            "--sha256",
            metavar="HEX",
            help="The sha256 (full, or at least 8 leading hex digits) the --url or --from-file file must have.",
        ),
    ] = None,
    size: Annotated[
        Optional[str],
        typer.Option(
            "--size",
            metavar="BYTES",
            help="The --url file's size (e.g. 102400000 or 98MiB): the download stops beyond it (default cap: "
            "RESNET_MAX_DOWNLOAD, 4GiB).",
        ),
    ] = None,
    from_file: Annotated[
        Optional[Path],
        typer.Option(
            "--from-file",
            metavar="PATH",
            help="Import a file copied in by hand instead of downloading: as ARCH[:WEIGHTS], as the --url file, "
            "or under its own name.",
        ),
    ] = None,
    onnx: Annotated[
        bool,
        typer.Option(
            "--onnx",
            help="Also export each model to ONNX into the cache, so that `predict` runs it on ONNX Runtime "
            "without importing torch.",
        ),
    ] = False,
    output_format: FormatOption = None,
    offline: OfflineOption = False,
    mirror: MirrorOption = None,
    timeout: TimeoutOption = None,
) -> None:
    """Fill the weight cache ($TORCH_HOME/hub/checkpoints) with files verified by sha256, so later runs work offline."""
    from resnetcli import download
    from resnetcli.errors import CacheError, UsageError, WeightsUnavailable
    from resnetcli.store import checkpoint_dir
    from resnetcli.urls import redact_url

    models = models or []
    if not (models or url or from_file):
        raise UsageError("nothing to fetch: give ARCH[:WEIGHTS]..., --url URL or --from-file PATH")
    if from_file is not None:
        if len(models) + (url is not None) > 1:
            raise UsageError("--from-file imports one file: give it one ARCH[:WEIGHTS] or one --url, or neither")
        if not from_file.is_file():
            raise UsageError(f"--from-file {from_file}: no such file")
    if url is not None:
        download.check_url(url)
    expected = download.parse_sha256(sha256) if sha256 is not None else None
    cap = download.parse_size(size, "--size") if size is not None else None
    if cap is not None and url is None:
        raise UsageError("--size is for --url files; torchvision's weights are capped at their published size")
    if expected and not (url or (from_file and not models)):
        raise UsageError(
            "--sha256 is for --url and --from-file files; "
            "torchvision's weights are checked against the hash in their file name"
        )
    settings = download.CacheSettings.from_env(offline=offline, mirror=mirror, timeout=timeout)

    if onnx:
        from resnetcli.onnxrt import require_onnxruntime

        require_onnxruntime("--onnx")
    wanted = [
        _Wanted(
            spec,
            choice.pretrained.url,
            None,
            True,
            f"resnet fetch {spec}",
            download.size_of_mib(choice.pretrained.meta.get("_file_size")),
        )
        for spec, choice in _torchvision_weights(models)
    ]
    if url is not None:
        hint = f"resnet fetch --url {redact_url(url)}" + (f" --sha256 {expected}" if expected else "")
        wanted.append(_Wanted(redact_url(url), url, expected, False, hint, cap))
    elif from_file is not None and not models:
        wanted.append(_Wanted(str(from_file), None, expected, False, ""))

    failed = False
    fmt = choose_format(output_format, sys.stdout)
    with (
        download_progress() as on_progress,
        RecordWriter(fmt, FETCH_COLUMNS, title=f"weight cache {checkpoint_dir()}") as writer,
    ):
        for item in wanted:
            try:
                cached = _obtain(item, from_file, settings, on_progress)
            except CacheError:
                raise  # The folder itself is unusable: the other files would fail the same way.
            except WeightsUnavailable as error:
                failed = True
                report_error(error)
                writer.write({"name": item.name, "error": one_line(error)})
                continue
            say(f"{cached.status}: {item.name} -> {cached.path}")
            writer.write(_fetched(item.name, cached))
            if onnx:  # --onnx: the export of what was just fetched, made once (`predict --runtime auto` finds it)
                from resnetcli.onnxcache import cache_export

                arch, source = _export_source(item, cached)
                try:
                    made = cache_export(arch, source, settings=settings, on_progress=on_progress)
                except WeightsUnavailable as error:
                    failed = True
                    report_error(error)
                    writer.write({"name": f"{item.name} (ONNX)", "error": one_line(error)})
                    continue
                say(f"{made.status}: {item.name} (ONNX) -> {made.path}")
                writer.write(_fetched(f"{item.name} (ONNX)", made))
    if failed:
        raise typer.Exit(int(ExitStatus.WEIGHTS_UNAVAILABLE))


def _fetched(name: str, cached) -> dict:
    return {
        "name": name,
        "file": cached.name,
        "size": cached.size,
        "sha256": cached.sha256,
        "path": str(cached.path),
        "status": cached.status,
    }


def _export_source(item: _Wanted, cached) -> tuple[Optional[str], str]:
    """(ARCH, --weights value) to export for a fetched item: ARCH:WEIGHTS as named, a URL's or an
    imported file's checkpoint with its own architecture (else resnet50, as `predict` takes it)."""
    if item.mirrored:
        arch, _, weights = item.name.partition(":")
        return arch, weights
    return None, item.url if item.url is not None else cached.name


def _torchvision_weights(specs: list[str]):
    """(spec, WeightsChoice) for each ARCH[:WEIGHTS], all resolved before anything is fetched."""
    from resnetcli.errors import UsageError
    from resnetcli.factory import resolve_weights

    resolved = []
    for spec in specs:
        arch, _, weights = spec.partition(":")
        choice = resolve_weights(arch, weights or None)
        if choice.kind != "pretrained":
            raise UsageError(
                f"{spec}: fetch takes torchvision weights names (ARCH or ARCH:WEIGHTS); use --url for a URL"
            )
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
    size: Optional[int] = None  # the most bytes the download may have


def _obtain(wanted: _Wanted, from_file: Optional[Path], settings, on_progress):
    """Import `from_file` as the wanted file, or download it; either way verified before it is cached."""
    from resnetcli import download

    if from_file is not None:
        file_name = download.file_name_of(wanted.url) if wanted.url else None
        return download.import_file(from_file, file_name, sha256=wanted.sha256)
    assert wanted.url is not None
    return download.download(
        wanted.url,
        sha256=wanted.sha256,
        size=wanted.size,
        settings=settings,
        on_progress=on_progress,
        fetch_hint=wanted.fetch_hint,
        mirrored=wanted.mirrored,
        on_wait=lambda name: say(f"waiting for another process that is downloading {name}"),
    )


def _empty_cache(fmt, columns: list[str]) -> bool:
    """Say so when the cache holds no file, before anything heavy is imported; machine formats stay valid."""
    from resnetcli.inventory import cached_files
    from resnetcli.store import checkpoint_dir

    if cached_files():
        return False
    say(f"the cache is empty ({checkpoint_dir()})")
    if fmt is not OutputFormat.table:
        with RecordWriter(fmt, columns):
            pass  # JSON: [], CSV/TSV: the header, JSONL: nothing
    return True


def _weights_labels() -> dict[str, list[str]]:
    """Which torchvision ARCH:WEIGHTS each weights file name belongs to (the catalogue's one walk),
    and what each cached ONNX export was made from (its name says: `resnet50:IMAGENET1K_V2 (ONNX, opset 18)`)."""
    from resnetcli.catalogue import weights_by_file_name
    from resnetcli.inventory import cached_files
    from resnetcli.onnxcache import describe_export

    labels = dict(weights_by_file_name())
    for path in cached_files():
        if (described := describe_export(path.name)) is not None:
            labels[path.name] = [described]
    return labels


def _megabytes(size: int) -> str:
    return f"{size / (1 << 20):,.1f} MiB"  # MiB, as torchvision's file sizes (`list`)


def _print_list_table(listed: list) -> None:
    """The terminal view of `cache list`: name, size in MiB, owners, the hash's first 8 digits; the folder in the title.

    Numbers and hashes never wrap; a long file name or label is cut with an ellipsis rather than
    folded; the machine formats keep every field (full hash, source URL, path).
    """
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from resnetcli.store import checkpoint_dir

    sizes = [_megabytes(item.size) for item in listed]
    hashes = [(item.sha256[:8] + "\N{HORIZONTAL ELLIPSIS}") if item.sha256 else "" for item in listed]
    console = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 100_000)
    size_width = max(len("size"), *(len(text) for text in sizes))
    # What is left after the borders and padding (13), the size and the hash (9): the file name (what
    # `cache rm` takes) first, the weights the rest; either is cut with an ellipsis, never folded.
    free = max(console.width - 13 - size_width - 9, 24)
    name_width = min(max(len(item.name) for item in listed), free - 12)
    table = Table(title=f"weight cache {checkpoint_dir()}", title_justify="left", header_style="bold")
    table.add_column("file", overflow="ellipsis", no_wrap=True, max_width=name_width)
    table.add_column("size", justify="right", no_wrap=True, min_width=size_width)
    table.add_column("weights", overflow="ellipsis", no_wrap=True, max_width=free - name_width)
    table.add_column("sha256", no_wrap=True, min_width=9)
    for item, size, sha in zip(listed, sizes, hashes):
        table.add_row(Text(item.name), size, Text(", ".join(item.weights)), sha)
    console.print(table)
    mine = [item.name for item in listed if not item.weights]
    if mine:
        console.print(Text(f"Use a file that is not torchvision's by its name: --weights {mine[0]}"), soft_wrap=True)


@cache_app.command("list")
def list_cache(output_format: FormatOption = None) -> None:
    """The cached weight files: size, which ARCH:WEIGHTS each belongs to, recorded sha256 and source URL."""
    from resnetcli.inventory import listing

    fmt = choose_format(output_format, sys.stdout)
    if _empty_cache(fmt, LIST_COLUMNS):
        return
    listed = listing(_weights_labels())
    for item in listed:
        if item.problem:
            warn(f"{item.path}: {item.problem}; `resnet cache verify {item.name}` checks the file and rewrites it")
    if fmt is OutputFormat.table:
        _print_list_table(listed)
        return
    with RecordWriter(fmt, LIST_COLUMNS) as writer:
        for item in listed:
            writer.write(item.record())


@cache_app.command("verify")
def verify_cache(
    names: Annotated[
        Optional[List[str]], typer.Argument(help="Files to verify (default: all).", metavar="NAME", show_default=False)
    ] = None,
    output_format: FormatOption = None,
) -> None:
    """Hash cached files in full against their records (or file-name prefix); exit 3 if any is corrupt.

    Partial files left by interrupted downloads are reported too (`resnet cache rm --partials` removes them).
    """
    from resnetcli import inventory
    from resnetcli.store import checkpoint_dir

    fmt = choose_format(output_format, sys.stdout)
    stale = [] if names else inventory.stale_partials()
    if not names and not stale and _empty_cache(fmt, VERIFY_COLUMNS):
        return
    paths, missing = _cached_paths(names) if names else (inventory.cached_files(), 0)
    corrupt = 0
    results = []
    for path in paths:
        result = inventory.verify(path)
        if result.status == "corrupt":
            corrupt += 1
            say(
                f"error: {path}: corrupt ({result.problem}); remove it with `resnet cache rm {result.name}` "
                "and fetch it again"
            )
        elif result.status == "unverifiable":
            warn(f"{path}: cannot be verified ({result.problem})")
        elif result.problem:
            warn(f"{path}: {result.problem}")
        results.append(result)
    for result in stale:
        warn(f"{result.path}: stale partial file ({result.problem})")
    _write_records(fmt, VERIFY_COLUMNS, [r.record() for r in results + stale], f"weight cache {checkpoint_dir()}")
    if corrupt:
        raise typer.Exit(int(ExitStatus.WEIGHTS_UNAVAILABLE))
    if missing:
        raise typer.Exit(int(ExitStatus.INPUTS_FAILED))


@cache_app.command("rm")
def remove_cache(
    names: Annotated[
        Optional[List[str]],
        typer.Argument(help="Files to remove, as `resnet cache list` names them.", metavar="NAME", show_default=False),
    ] = None,
    all_files: Annotated[
        bool,
        typer.Option(
            "--all",
            help="Remove every cached weight file, record, lock and abandoned partial download "
            "(a download in progress is left alone).",
        ),
    ] = False,
    partials: Annotated[
        bool, typer.Option("--partials", help="Remove the partial files of interrupted downloads only.")
    ] = False,
    output_format: FormatOption = None,
) -> None:
    """Remove cached weight files and their records."""
    from resnetcli import inventory
    from resnetcli.errors import UsageError
    from resnetcli.store import checkpoint_dir

    if (all_files or partials) == bool(names) or (all_files and partials):
        raise UsageError("give the NAMEs of files to remove, or --all, or --partials (one of them)")
    fmt = choose_format(output_format, sys.stdout)
    missing = 0
    if partials:
        records = [_removed(item) for item in inventory.remove_partials()]
    else:
        paths, missing = (inventory.cached_files(), 0) if all_files else _cached_paths(names or [])
        records = [_removed(inventory.remove(path)) for path in paths]
        if all_files:
            inventory.remove_leftovers()
    if not records and fmt is OutputFormat.table and (all_files or partials):
        say(f"nothing to remove ({checkpoint_dir()})")
    _write_records(fmt, RM_COLUMNS, records, f"weight cache {checkpoint_dir()}")
    if missing:
        raise typer.Exit(int(ExitStatus.INPUTS_FAILED))


def _removed(item) -> dict:
    return {"file": item.name, "size": item.size, "status": item.status, "path": str(item.path)}


def _write_records(fmt, columns: list[str], records: list[dict], title: str) -> None:
    """Write the records; a table only when there is a row to show (an error alone needs no empty table)."""
    if fmt is OutputFormat.table and not records:
        return
    with RecordWriter(fmt, columns, title=title) as writer:
        for record in records:
            writer.write(record)


def _cached_paths(names: list[str]) -> tuple[list[Path], int]:
    """The cached files `names` name; each unknown name is reported on stderr and counted."""
    from resnetcli.errors import InputError
    from resnetcli.inventory import cached_file

    paths, missing = [], 0
    for name in names:
        try:
            paths.append(cached_file(name))
        except InputError as error:
            report_error(error)
            missing += 1
    return paths, missing
