"""`resnet predict --engine ray`: the same predictions, run by Ray Data on a local instance or a cluster.

`run_on_ray(inputs, ...)` expands the inputs on the driver (local ones as `resnet predict` does,
object-store URIs through pyarrow's filesystems), classifies them with `resnetcli.ray.Classifier`
actors and either streams the records back in input order or has Ray write them as sharded JSONL
files. Without an address it starts a Ray instance sized to this machine and always shuts down what
it started, also on Ctrl-C.

Nothing here imports Ray or torch at module level: without the `resnetcli[ray]` extra the CLI still
starts, and `--engine ray` is a usage error naming the extra.
"""

from __future__ import annotations

import json
import logging
import os
import re
import warnings
from contextlib import contextmanager
from typing import BinaryIO, Callable, Iterable, Iterator, Sequence

from resnetcli.errors import UsageError
from resnetcli.inputs import Input, expand_inputs, take_shard

log = logging.getLogger(__name__)

#: Names of sharded output files: Ray's `<dataset uuid>_<task>...` with this extension.
OUTPUT_FORMAT = "jsonl"


def require_ray():
    """The `resnetcli.ray` module, or UsageError (exit 2) naming the extra when Ray Data is missing."""
    try:
        import resnetcli.ray as ray_api
    except ImportError as error:
        raise UsageError(
            f"--engine ray needs Ray Data: pip install 'resnetcli[ray]' ({error.__cause__ or error})"
        ) from None
    return ray_api


@contextmanager
def ray_session(address: str | None = None, *, num_cpus: int | None = None, object_store_memory: int | None = None):
    """Connect to the Ray cluster at `address` (auto, HOST:PORT, ray://HOST:PORT), or start a local
    instance with `num_cpus` (default: the CPUs this process may use) when `address` is None; shut
    down whatever was started when done, interrupted or failed. A session already open in this
    process (a user's own `ray.init`) is used as it is and left open."""
    require_ray()
    import ray

    from resnetcli.fastpath import usable_cpu_count

    if ray.is_initialized():
        yield ray
        return
    # Ray's notices (token authentication, deprecations, progress) would bury the per-input lines on
    # stderr; with resnetcli's debug logging on (--debug) they are shown.
    quiet = not log.isEnabledFor(logging.DEBUG)
    options: dict = {
        "include_dashboard": False,
        "logging_level": logging.ERROR if quiet else logging.INFO,
        "log_to_driver": not quiet,
    }
    if address is None:
        options["num_cpus"] = num_cpus or usable_cpu_count()
        if object_store_memory:
            options["object_store_memory"] = object_store_memory
    else:
        options["address"] = address
    try:
        ray.init(**options)
    except (ConnectionError, ValueError, RuntimeError) as error:
        ray.shutdown()
        where = f"--address {address}" if address else "a local Ray instance"
        raise UsageError(f"{where}: cannot start Ray: {' '.join(str(error).split())}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


def expand_sources(
    inputs: Iterable[str], *, recursive: bool = True, stdin: BinaryIO | None = None, null: bool = False
) -> Iterator[Input]:
    """The inputs of `resnet predict`, in order: local ones expanded by `resnetcli.inputs`, object-store
    URIs (s3://bucket/prefix/, gs://..., file://...) listed through pyarrow's filesystems."""
    from resnetcli.ray import is_object_uri

    local: list[str] = []
    for spec in inputs:
        if is_object_uri(spec):
            yield from expand_inputs(local, recursive=recursive, stdin=stdin, null=null)
            local = []
            yield from expand_uri(spec, recursive=recursive)
        else:
            local.append(spec)
    yield from expand_inputs(local, recursive=recursive, stdin=stdin, null=null)


def expand_uri(uri: str, *, recursive: bool = True) -> Iterator[Input]:
    """One object, or the objects with an image file extension under a prefix (sorted, hidden names
    skipped); an error Input when the URI names nothing or cannot be listed."""
    import pyarrow
    import pyarrow.fs

    from resnetcli.images import image_extensions

    try:
        filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
        info = filesystem.get_file_info(path)
        if info.type == pyarrow.fs.FileType.File:
            yield Input(uri)
            return
        if info.type != pyarrow.fs.FileType.Directory:
            yield Input(uri, "no such object or prefix")
            return
        found = filesystem.get_file_info(pyarrow.fs.FileSelector(path, recursive=recursive))
    except (OSError, ValueError, pyarrow.ArrowException) as error:
        yield Input(uri, f"cannot list: {' '.join(str(error).split())}")
        return
    base, stem = uri.rstrip("/"), path.rstrip("/")
    prefix = base[: len(base) - len(stem)] if stem and base.endswith(stem) else uri.partition("://")[0] + "://"
    images = sorted(
        entry.path
        for entry in found
        if entry.type == pyarrow.fs.FileType.File
        and not any(part.startswith(".") for part in entry.path[len(stem) :].split("/"))
        and os.path.splitext(entry.base_name)[1].lower() in image_extensions()
    )
    if not images:
        yield Input(uri, "no image objects under this prefix")
    for image in images:
        yield Input(prefix + image)


def default_actors(ray, cpus_per_actor: float, gpus_per_actor: float) -> int:
    """One actor per `cpus_per_actor` CPUs of the cluster (per `gpus_per_actor` GPUs when GPUs are asked for)."""
    resources = ray.cluster_resources()
    if gpus_per_actor:
        return max(1, int(resources.get("GPU", 0) // gpus_per_actor))
    return max(1, int(resources.get("CPU", 1) // cpus_per_actor))


def run_on_ray(
    inputs: Sequence[str],
    *,
    arch: str | None = None,
    weights: str = "DEFAULT",
    top: int = 5,
    threshold: float = 0.0,
    labels: Sequence[str] | None = None,
    preprocess: str | None = None,
    input_size: int | None = None,
    resize: int | None = None,
    batch_size: int = 16,
    workers: int | None = None,
    threads: int | None = None,
    device: str = "auto",
    offline: bool = False,
    mirror: str | None = None,
    trust_checkpoint: bool = False,
    recursive: bool = True,
    stdin: BinaryIO | None = None,
    null: bool = False,
    shard: tuple[int, int] | None = None,
    screen: Callable[[Iterable[Input]], Iterable[Input]] | None = None,
    address: str | None = None,
    actors: int | None = None,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    output_dir: str | None = None,
    num_cpus: int | None = None,
    object_store_memory: int | None = None,
) -> Iterator[dict]:
    """Classify `inputs` on Ray and yield the `resnet predict` records in input order.

    With `output_dir`, Ray writes the records itself as sharded JSONL files there (every input in
    exactly one line of one `*.jsonl` file) and only the records of failed inputs are yielded,
    once the files are complete. The options are those of `resnet predict` and `resnetcli.ray.Classifier`;
    `screen` filters the expanded inputs (the CLI's `RecordsOutput.screen`: the output file is no
    input); `num_cpus` and `object_store_memory` size a local instance (default: the CPUs this
    process may use, and Ray's own default share of memory).
    """
    # Checked when called, not when first iterated: usage errors come before any Ray process starts.
    ray_api = require_ray()
    if ray_api.is_onnx(weights):
        from resnetcli.onnxrt import require_onnxruntime

        require_onnxruntime(f"--weights {weights}")
    else:
        check_weights(arch, weights, preprocess=preprocess, local=address is None, offline=offline, mirror=mirror,
                      trust_checkpoint=trust_checkpoint)  # fmt: skip
    if output_dir is not None:
        check_output_dir(output_dir)
    constructor = {
        "arch": arch, "weights": weights, "top": top, "threshold": threshold,
        "labels": list(labels) if labels else None, "preprocess": preprocess, "input_size": input_size,
        "resize": resize, "device": device, "threads": threads, "workers": workers, "offline": offline,
        "mirror": mirror, "trust_checkpoint": trust_checkpoint, "batch_size": batch_size,
    }  # fmt: skip
    items = expand_sources(inputs, recursive=recursive, stdin=stdin, null=null)
    if shard is not None:
        items = take_shard(items, *shard)
    if screen is not None:
        items = screen(items)
    session = {"address": address, "num_cpus": num_cpus, "object_store_memory": object_store_memory}
    pool = {"actors": actors, "cpus_per_actor": cpus_per_actor, "gpus_per_actor": gpus_per_actor}
    return _run(items, constructor, session, pool, batch_size=batch_size, output_dir=output_dir)


def check_weights(
    arch: str | None,
    weights: str,
    *,
    preprocess: str | None,
    local: bool,
    offline: bool,
    mirror: str | None,
    trust_checkpoint: bool,
) -> None:
    """Name problems with the weights on the driver, before Ray starts: unknown names and `--preprocess`
    values are usage errors; for a local instance (whose actors share this machine's weight cache)
    the weights are fetched here, once, so that missing weights are exit code 3 and no actor downloads them."""
    from resnetcli.factory import DEFAULT_ARCH, checkpoint_for, resolve_weights
    from resnetcli.foreign import is_spec
    from resnetcli.inference import preprocessing_weights

    if is_spec(arch):
        # timm or a user's module: the actors build it through load_model, as the local path does.
        if preprocess is not None:
            raise UsageError(
                f"--preprocess names torchvision weights; {arch} uses timm's data config or its checkpoint's"
            )
        return
    choice = resolve_weights(arch or DEFAULT_ARCH, weights)
    if preprocess is not None and arch is not None:
        preprocessing_weights(arch, preprocess)
    if local and choice.kind in ("pretrained", "url"):
        from resnetcli.cache import CacheSettings

        checkpoint_for(choice, CacheSettings.from_env(offline=offline, mirror=mirror), trust=trust_checkpoint)


def _run(
    items: Iterable[Input], constructor: dict, session: dict, pool: dict, *, batch_size: int, output_dir: str | None
):
    rows = [{"path": item.source, "error": item.error} for item in items]
    if not rows:
        return
    with ray_session(**session) as ray:
        from resnetcli.ray import Classifier, record

        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True
        context.enable_progress_bars = False
        context.print_on_execution_start = False
        if not log.isEnabledFor(logging.DEBUG):
            # Failures are re-raised to the caller, which reports them; Ray Data would log each one
            # with its stack trace first.
            logging.getLogger("ray.data").setLevel(logging.CRITICAL)
        actors = pool["actors"] or default_actors(ray, pool["cpus_per_actor"], pool["gpus_per_actor"])
        dataset = ray.data.from_items(rows, override_num_blocks=max(1, min(len(rows) // batch_size, 10_000)))
        del rows
        predictions = dataset.map_batches(
            Classifier,
            fn_constructor_kwargs=constructor,
            compute=ray.data.ActorPoolStrategy(size=actors),
            batch_size=batch_size,
            batch_format="numpy",
            num_cpus=pool["cpus_per_actor"],
            num_gpus=pool["gpus_per_actor"] or None,
            runtime_env=actor_environment(),
        )
        with warnings.catch_warnings(), actor_errors(ray):
            # Ray Data warns when a pool has more actors than a small job has blocks: expected here.
            warnings.filterwarnings("ignore", category=UserWarning, module=r"ray\.data\..*")
            if output_dir is None:
                for row in predictions.iter_rows():
                    yield record(row)
                return
            sink = jsonl_sink(output_dir)
            # Writers need no CPU of their own (the actors hold them all, and writing is I/O), and as
            # many of them as actors keep up: more would only start idle Python workers.
            predictions.write_datasink(sink, ray_remote_args={"num_cpus": 0}, concurrency=actors)
        yield from sink.failures


@contextmanager
def actor_errors(ray):
    """Turn an actor that died of a resnetcli error (weights it cannot get, a checkpoint that does not
    fit) into that error, with its exit code, instead of Ray's remote traceback."""
    import resnetcli.errors

    try:
        yield
    except ray.exceptions.RayError as error:
        # Ray keeps only the text of an actor's creation error: its last line names the class.
        found = re.findall(r"^resnetcli\.errors\.(\w+): (.+)$", str(error), flags=re.MULTILINE)
        kind = getattr(resnetcli.errors, found[-1][0], None) if found else None
        if not (isinstance(kind, type) and issubclass(kind, resnetcli.errors.ResnetError)):
            raise
        log.debug("actor failed", exc_info=True)
        failure = kind.__new__(kind)
        Exception.__init__(failure, found[-1][1])
        raise failure from None


def actor_environment() -> dict | None:
    """The runtime environment of the actors: this process's TORCH_HOME (where the weights were
    fetched, e.g. a shared folder) and RESNET_* settings (offline, mirror, timeout), when set."""
    names = [name for name in os.environ if name == "TORCH_HOME" or name.startswith("RESNET_")]
    return {"env_vars": {name: os.environ[name] for name in names}} if names else None


def check_output_dir(path: str) -> None:
    """Refuse an output folder that already holds files: `cat DIR/*.jsonl` must list each input once."""
    from resnetcli.ray import is_object_uri

    if is_object_uri(path):
        return
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise UsageError(f"--output-dir {path}: must be a new or empty folder")


def jsonl_sink(path: str):
    """A Ray Data sink writing the records of each block to its own `*.jsonl` file under `path`;
    after the write, `.failures` holds the records of the failed inputs."""
    from ray.data import BlockBasedFileDatasink
    from ray.data.block import BlockAccessor

    from resnetcli.ray import record

    class RecordSink(BlockBasedFileDatasink):
        def __init__(self) -> None:
            super().__init__(path, file_format=OUTPUT_FORMAT)
            self.failures: list[dict] = []

        def write_block_to_file(self, block, file) -> None:
            lines = (
                json.dumps(record(row), ensure_ascii=False) + "\n" for row in block.iter_rows(public_row_format=True)
            )
            file.write("".join(lines).encode("utf-8"))

        def write(self, blocks, ctx) -> list[dict]:
            blocks = list(blocks)
            super().write(blocks, ctx)
            failed = []
            for block in blocks:
                for row in BlockAccessor.for_block(block).iter_rows(public_row_format=True):
                    if row.get("error") is not None:
                        failed.append(record(row))
            return failed

        def on_write_complete(self, write_result) -> None:
            super().on_write_complete(write_result)
            self.failures = [entry for returned in write_result.write_returns for entry in (returned or [])]

    return RecordSink()
