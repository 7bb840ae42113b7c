"""Benchmark `resnet` against the tutorial script and ONNX Runtime, and measure each fast-path lever.

    python bench/bench_predict.py            # the full run (about 8 minutes on 2 cores)
    python bench/bench_predict.py --quick    # fewer photos and repetitions, for development

Needs `pip install -e '.[bench]'` (onnxruntime, onnx, onnxscript). Builds its own workload in a
temporary folder (no network): random-init resnet18/resnet50 checkpoints saved as NAME-<sha256
prefix>.pth, and photos of mixed sizes (up to several megapixels) made from sample_images/ with
Pillow. Every pair of figures is measured side by side in the same run, alternating, and the
medians are reported. Prints Markdown tables and writes bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
SAMPLES = sorted((REPO / "sample_images").glob("*.jpg"))
#: Upscaling factors of the photo workload: the sample photos are 0.1-0.3 megapixels, so the
#: largest of these are 3.5-10 megapixels, like a phone's.
SCALES = (1, 1.5, 2.5, 4, 6)
PYTHON = sys.executable
GNU_TIME = shutil.which("time", path="/usr/bin:/bin")
#: The installed console script, as users run it (`python -m resnetcli` when it is not installed).
RESNET = (
    [str(Path(PYTHON).with_name("resnet"))]
    if Path(PYTHON).with_name("resnet").exists()
    else [PYTHON, "-m", "resnetcli"]
)


# ---------------------------------------------------------------------------------------------
# Workload


def sha256_prefix(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:8]


def make_checkpoint(arch: str, folder: Path) -> Path:
    """A random-init checkpoint named like torchvision's files: ARCH-<sha256 prefix>.pth."""
    import torch
    from torchvision import models

    torch.manual_seed(0)
    temporary = folder / f"{arch}.tmp"
    torch.save(models.get_model(arch, weights=None).state_dict(), temporary)
    final = folder / f"{arch}-{sha256_prefix(temporary)}.pth"
    temporary.rename(final)
    return final


def naive_command(arch: str, checkpoint, images) -> list[str]:
    """The tutorial baseline (bench/naive_predict.py) on `checkpoint` and `images`."""
    return [PYTHON, str(BENCH / "naive_predict.py"), "--arch", arch, "--weights", str(checkpoint), *map(str, images)]


def make_photos(folder: Path, count: int) -> list[Path]:
    """`count` JPEGs cycling through the sample photos and the upscaling factors in SCALES."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    variants: dict[tuple[int, float], Path] = {}
    photos = []
    for i in range(count):
        sample_index, scale = i % len(SAMPLES), SCALES[(i // len(SAMPLES)) % len(SCALES)]
        key = (sample_index, scale)
        target = folder / f"{i:04d}-{SAMPLES[sample_index].stem}-x{scale}.jpg"
        if key in variants:
            shutil.copyfile(variants[key], target)
        else:
            with Image.open(SAMPLES[sample_index]) as image:
                size = (round(image.width * scale), round(image.height * scale))
                image.convert("RGB").resize(size, Image.Resampling.BICUBIC).save(target, quality=90)
            variants[key] = target
        photos.append(target)
    return photos


# ---------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Row:
    """One benchmarked thing: medians of its repetitions."""

    group: str
    name: str
    wall_s: float
    images: int | None = None
    peak_rss_mb: float | None = None
    samples_s: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def images_per_s(self) -> float | None:
        return self.images / self.wall_s if self.images else None


class CommandFailed(Exception):
    """A benchmarked command did not succeed; its row reports the error instead of figures."""


def run_process(argv: list[str], env: dict) -> tuple[float, float | None]:
    """Wall time (s) and peak RSS (MB) of a process, which must succeed; its stdout is discarded.

    The peak RSS comes from GNU time (/usr/bin/time), which forks the command from a small
    process: the rusage of a child forked from this one would count this process's own memory,
    torch included. Without GNU time there is no RSS figure.
    """
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss_file:
        prefix = [GNU_TIME, "-f", "%M", "-o", rss_file.name] if GNU_TIME else []
        start = time.perf_counter()
        done = subprocess.run(prefix + argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            lines = done.stderr.decode(errors="replace").strip().splitlines() or ["(no message)"]
            raise CommandFailed(f"exited {done.returncode}: {lines[-1]}")
        kib = rss_file.read().strip().splitlines()[-1] if GNU_TIME else ""
    return wall, (int(kib) / 1024 if kib else None)


def compare_processes(
    group: str, commands: dict[str, list[str]], repeats: int, env: dict, images: int | None = None
) -> list[Row]:
    """Run the commands alternately (order reversed every other round) and keep medians."""
    walls: dict[str, list[float]] = {name: [] for name in commands}
    rss: dict[str, list[float | None]] = {name: [] for name in commands}
    names = list(commands)
    failures: dict[str, str] = {}
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else reversed(names):
            if name in failures:
                continue
            try:
                wall, peak = run_process(commands[name], env)
            except CommandFailed as error:
                failures[name] = str(error)
                print(f"  {group}: {name}: {error}", file=sys.stderr, flush=True)
                continue
            walls[name].append(wall)
            rss[name].append(peak)
            print(f"  {group}: {name}: {wall:.2f} s, {peak or 0:.0f} MB", file=sys.stderr, flush=True)
    return [
        Row(group, name, float("nan"), None, None, [], f"failed: {failures[name]}")
        if name in failures
        else Row(
            group,
            name,
            statistics.median(walls[name]),
            images,
            statistics.median(rss[name]) if None not in rss[name] else None,
            walls[name],
        )
        for name in names
    ]


def compare_in_process(group: str, runs: dict[str, callable], repeats: int, images: int | None = None) -> list[Row]:
    """Time callables alternately in this process (order reversed every other round); medians."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for round_index in range(repeats):
        for name in names if round_index % 2 == 0 else reversed(names):
            start = time.perf_counter()
            runs[name]()
            times[name].append(time.perf_counter() - start)
            print(f"  {group}: {name}: {times[name][-1]:.2f} s", file=sys.stderr, flush=True)
    return [Row(group, name, statistics.median(times[name]), images, None, times[name]) for name in names]


# ---------------------------------------------------------------------------------------------
# The levers, in process


def inference_levers(
    checkpoint: Path,
    arch: str,
    images: int,
    batch_size: int,
    threads: int,
    repeats: int,
    with_compile: bool,
    onnx_path: Path,
) -> list[Row]:
    """Raw inference throughput (decoding excluded) of each lever and of ONNX Runtime, same threads and batches."""
    import numpy as np
    import onnxruntime
    import torch

    from resnetcli import fastpath
    from resnetcli.factory import load_model

    fastpath.configure_threads(threads)
    base = load_model(arch, str(checkpoint)).model
    crop = 224
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(batch_size, 3, crop, crop, generator=generator) for _ in range(images // batch_size)]

    variants: dict[str, callable] = {}
    variants["eager, no_grad (as the naive script)"] = _under(torch.no_grad, base)
    variants["eager, inference_mode"] = _under(torch.inference_mode, base)
    plain = fastpath.InferencePlan("cpu", channels_last=True, torchscript_onednn=False)
    variants["channels_last"] = _under(
        torch.inference_mode, fastpath.optimize_for_inference(copy.deepcopy(base), plan=plain)
    )
    folded = fastpath.InferencePlan("cpu", channels_last=True, torchscript_onednn=False, fold_batchnorm=True)
    variants["channels_last + fold BN (torch.fx)"] = _under(
        torch.inference_mode, fastpath.optimize_for_inference(copy.deepcopy(base), plan=folded)
    )
    variants["jit.freeze + optimize_for_inference"] = _without_onednn_fusion(
        _under(torch.no_grad, _jit_optimize_for_inference(copy.deepcopy(base), crop))
    )
    fast = fastpath.optimize_for_inference(
        copy.deepcopy(base), example_shape=(batch_size, 3, crop, crop), images=images
    )
    variants["fast path (torchscript_onednn)"] = _under(torch.inference_mode, fast)
    compile_note = ""
    if with_compile:
        import torch._inductor.config as inductor_config

        inductor_config.freezing = True
        compiled = torch.compile(copy.deepcopy(base).to(memory_format=torch.channels_last))
        start = time.perf_counter()
        with torch.inference_mode():
            compiled(batches[0].contiguous(memory_format=torch.channels_last))
        compile_note = f"first call (compilation) {time.perf_counter() - start:.1f} s"
        variants["torch.compile (inductor, freezing)"] = _under(
            torch.inference_mode, lambda x: compiled(x.contiguous(memory_format=torch.channels_last))
        )
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    arrays = [np.ascontiguousarray(batch.numpy()) for batch in batches]
    input_name = session.get_inputs()[0].name
    variants["ONNX Runtime (CPU)"] = lambda: [session.run(None, {input_name: array}) for array in arrays]

    def over_batches(run):
        return lambda: [run(batch) for batch in batches]

    runs = {name: (fn if name.startswith("ONNX") else over_batches(fn)) for name, fn in variants.items()}
    for name, run in runs.items():  # warm-up: the graph is checked, then profiled, then fused
        print(f"  warm-up: {name}", file=sys.stderr, flush=True)
        run() if name.startswith("ONNX") else [variants[name](batches[0]) for _ in range(3)]
    rows = compare_in_process(f"raw inference {arch}, batch {batch_size}, {threads} threads", runs, repeats, images)
    for row in rows:
        if row.name.startswith("torch.compile"):
            row.note = compile_note
    return rows


def _under(context, model):
    def run(batch):
        with context():
            return model(batch)

    return run


def _without_onednn_fusion(run):
    """The fast path turns oneDNN Graph fusion on for the process; optimize_for_inference's graph breaks under it."""
    import torch

    def without(batch):
        torch.jit.enable_onednn_fusion(False)
        try:
            return run(batch)
        finally:
            torch.jit.enable_onednn_fusion(True)

    return without


def _jit_optimize_for_inference(model, crop: int):
    import warnings

    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        return torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model, torch.zeros(1, 3, crop, crop))))


def export_onnx(checkpoint: Path, arch: str, folder: Path) -> Path:
    """The same model as an ONNX file with a dynamic batch dimension."""
    import warnings

    import torch

    from resnetcli.factory import load_model

    model = load_model(arch, str(checkpoint)).model
    target = folder / f"{arch}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, 224, 224),),
            str(target),
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}},
            dynamo=False,
        )
    return target


def loading_levers(checkpoint: Path, arch: str, repeats: int) -> list[Row]:
    """Building a model from a checkpoint: random init + load_state_dict vs meta device + mmap + assign."""
    import torch
    from torchvision import models

    from resnetcli.factory import load_model

    def naive():
        model = models.get_model(arch, weights=None)
        model.load_state_dict(torch.load(checkpoint, weights_only=True))

    runs = {
        "random init + load_state_dict": naive,
        "meta device + mmap + assign (registry)": lambda: load_model(arch, str(checkpoint)),
    }
    return compare_in_process(f"build {arch} from a checkpoint", runs, repeats)


def decoding_levers(photos: list[Path], repeats: int) -> list[Row]:
    """Decode + preprocess the photo workload: full decoding vs JPEG draft mode."""
    from torchvision import models

    from resnetcli import fastpath
    from resnetcli.images import load_image

    transforms = models.ResNet50_Weights.DEFAULT.transforms()
    short_side = fastpath.draft_short_side(transforms)
    runs = {
        "full decode (Image.open + convert)": lambda: [transforms(load_image(p)) for p in photos],
        f"draft decode (short side >= {short_side})": lambda: [
            transforms(load_image(p, draft_short_side=short_side)) for p in photos
        ],
    }
    return compare_in_process("decode + preprocess", runs, repeats, len(photos))


# ---------------------------------------------------------------------------------------------
# Report


@dataclass
class Target:
    name: str
    value: float
    goal: str
    met: bool


def ratio(rows: list[Row], group: str, numerator: str, denominator: str, attribute: str = "wall_s") -> float:
    """numerator / denominator of one attribute within a group; NaN when either failed."""
    by_name = {row.name: row for row in rows if row.group == group}
    top, bottom = getattr(by_name[numerator], attribute), getattr(by_name[denominator], attribute)
    return top / bottom if top and bottom else float("nan")


def markdown(rows: list[Row]) -> str:
    lines = [
        "| workload | run | wall s (median) | images/s | peak RSS MB | note |",
        "| --- | --- | ---: | ---: | ---: | --- |",
    ]
    for row in rows:
        rate = f"{row.images_per_s:.1f}" if row.images_per_s else ""
        wall = f"{row.wall_s:.2f}" if row.wall_s == row.wall_s else "n/a"
        rss = f"{row.peak_rss_mb:.0f}" if row.peak_rss_mb else ""
        lines.append(f"| {row.group} | {row.name} | {wall} | {rate} | {rss} | {row.note} |")
    return "\n".join(lines)


def markdown_targets(targets: list[Target]) -> str:
    lines = ["| target | measured | goal | met |", "| --- | ---: | --- | --- |"]
    lines += [
        f"| {t.name} | {t.value:.2f} | {t.goal} | {'yes' if t.met else 'no'} |"
        if t.value == t.value
        else f"| {t.name} | n/a (a run failed) | {t.goal} | no |"
        for t in targets
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="32 photos, 2 repetitions, no torch.compile, no 2,000-photo run"
    )
    parser.add_argument("--repeats", type=int, help="repetitions of each measurement (default 3, or 2 with --quick)")
    parser.add_argument(
        "--photos", type=int, help="photos in the mixed-size workload (default 256, or 64 with --quick)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch/ONNX Runtime threads (default: the CPUs this process may use)"
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument(
        "--skip-vit", action="store_true", help="skip `resnet summary vit_h_14` vs building it (about 20 s per build)"
    )
    parser.add_argument(
        "--skip-compile", action="store_true", help="skip torch.compile (tens of seconds of compilation)"
    )
    parser.add_argument("--skip-rss", action="store_true", help="skip the 100 vs 2,000 photos peak-RSS comparison")
    parser.add_argument("--output", type=Path, default=BENCH / "results" / "latest.json")
    args = parser.parse_args()

    from resnetcli import fastpath

    repeats = args.repeats or (2 if args.quick else 3)
    photo_count = args.photos or (32 if args.quick else 256)
    threads = args.threads or fastpath.usable_cpu_count()
    started = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="resnet-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESNET_")}
    env.update(TORCH_HOME=str(work / "torch_home"), PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads))
    rows: list[Row] = []
    try:
        print(f"workload in {work}", file=sys.stderr)
        checkpoints = {arch: make_checkpoint(arch, work) for arch in ("resnet18", "resnet50")}
        photos = [str(p) for p in make_photos(work / "photos", photo_count)]
        cat = str(REPO / "sample_images" / "cat.jpg")

        rows += compare_processes(
            "startup",
            {"resnet --help": RESNET + ["--help"], 'python -c "import torch"': [PYTHON, "-c", "import torch"]},
            repeats + 2,
            env,
        )
        threads_option = ["--threads", str(threads)]
        # `resnet predict` gains --threads with its parallel rewrite; pass it once it has it.
        predict_help = subprocess.run(RESNET + ["predict", "--help"], env=env, capture_output=True, text=True).stdout
        predict_threads = threads_option if "--threads" in predict_help else []
        for arch in ("resnet50",):
            rows += compare_processes(
                f"cat.jpg, cold process, {arch}",
                {
                    "resnet predict": RESNET
                    + ["predict", cat, "--arch", arch, "--weights", str(checkpoints[arch]), *predict_threads],
                    "fast path preview": [
                        PYTHON,
                        str(BENCH / "fastpath_preview.py"),
                        "--arch",
                        arch,
                        "--weights",
                        str(checkpoints[arch]),
                        *threads_option,
                        cat,
                    ],
                    "naive script": naive_command(arch, checkpoints[arch], [cat]),
                },
                repeats,
                env,
                images=1,
            )
        for arch in ("resnet18", "resnet50"):
            weights = str(checkpoints[arch])
            preview = [
                PYTHON,
                str(BENCH / "fastpath_preview.py"),
                "--arch",
                arch,
                "--weights",
                weights,
                "--batch-size",
                str(args.batch_size),
                *threads_option,
            ]
            commands = {
                "resnet predict": RESNET
                + [
                    "predict",
                    *photos,
                    "--arch",
                    arch,
                    "--weights",
                    weights,
                    "--batch-size",
                    str(args.batch_size),
                    *predict_threads,
                ],
                "fast path preview": preview + photos,
                "naive script": naive_command(arch, weights, photos),
            }
            if arch == "resnet50":
                commands["fast path preview + draft decoding"] = preview + ["--draft"] + photos
            rows += compare_processes(f"{len(photos)} photos, {arch}", commands, repeats, env, images=len(photos))
        onnx_path = export_onnx(checkpoints["resnet50"], "resnet50", work)
        lever_images = max(args.batch_size * 2, min(len(photos), 96))
        rows += inference_levers(
            checkpoints["resnet50"],
            "resnet50",
            lever_images,
            args.batch_size,
            threads,
            repeats,
            not (args.quick or args.skip_compile),
            onnx_path,
        )
        rows += loading_levers(checkpoints["resnet50"], "resnet50", repeats + 2)
        rows += decoding_levers([Path(p) for p in photos], repeats)
        if not (args.quick or args.skip_rss):
            small = [str(REPO / "sample_images" / p.name) for p in SAMPLES]
            for count in (100, 2000):
                many = [small[i % len(small)] for i in range(count)]
                rows += compare_processes(
                    f"peak RSS, {count} photos, resnet18",
                    {
                        "resnet predict": RESNET
                        + ["predict", *many, "--arch", "resnet18", "--weights", str(checkpoints["resnet18"])]
                    },
                    1,
                    env,
                    images=count,
                )
        if not args.skip_vit:
            build_vit = "import torch\nfrom torchvision import models\nmodels.vit_h_14(weights=None)"
            rows += compare_processes(
                "vit_h_14",
                {
                    "resnet summary vit_h_14": RESNET + ["summary", "vit_h_14"],
                    "build vit_h_14 (random init)": [PYTHON, "-c", build_vit],
                },
                max(1, repeats - 1),
                env,
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    targets = targets_from(rows, photo_count)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "usable_cpus": fastpath.usable_cpu_count(),
            "load_average": os.getloadavg(),
        },
        "versions": versions(),
        "settings": {
            "repeats": repeats,
            "photos": photo_count,
            "threads": threads,
            "batch_size": args.batch_size,
            "quick": args.quick,
        },
        "rows": [{**asdict(row), "wall_s": finite(row.wall_s), "images_per_s": row.images_per_s} for row in rows],
        "targets": [{**asdict(t), "value": finite(t.value)} for t in targets],
        "duration_s": round(time.perf_counter() - started, 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(rows))
    print()
    print(markdown_targets(targets))
    print(f"\n{report['duration_s']} s; written to {args.output}", file=sys.stderr)


def targets_from(rows: list[Row], photo_count: int) -> list[Target]:
    """The issue's targets, as ratios of this run's medians."""
    targets = []
    group = f"{photo_count} photos, resnet50"
    speedup = ratio(rows, group, "resnet predict", "naive script", "images_per_s")
    targets.append(Target("resnet predict / naive, images/s, resnet50", speedup, ">= 2", speedup >= 2))
    preview = ratio(rows, group, "fast path preview", "naive script", "images_per_s")
    targets.append(Target("fast path preview / naive, images/s, resnet50", preview, ">= 2", preview >= 2))
    ort = next(row for row in rows if row.name == "ONNX Runtime (CPU)")
    by_name = {row.name: row for row in rows if row.group == group}
    for name in ("resnet predict", "fast path preview"):
        rate = by_name[name].images_per_s
        value = rate / ort.images_per_s if rate else float("nan")
        targets.append(
            Target(f"{name} end to end / ONNX Runtime raw inference, images/s, resnet50", value, ">= 1", value >= 1)
        )
    for name in ("resnet predict", "fast path preview"):
        value = ratio(rows, "cat.jpg, cold process, resnet50", name, "naive script")
        targets.append(Target(f"{name} / naive, wall time, cat.jpg cold", value, "<= 0.6", value <= 0.6))
    value = ratio(rows, "startup", "resnet --help", 'python -c "import torch"')
    targets.append(Target('resnet --help / python -c "import torch", wall time', value, "<= 0.15", value <= 0.15))
    rss = {row.group: row.peak_rss_mb for row in rows if row.group.startswith("peak RSS")}
    if len(rss) == 2:
        value = rss["peak RSS, 2000 photos, resnet18"] / rss["peak RSS, 100 photos, resnet18"]
        targets.append(Target("peak RSS 2,000 photos / 100 photos", value, "<= 1.10", value <= 1.10))
    if any(row.group == "vit_h_14" for row in rows):
        value = ratio(rows, "vit_h_14", "resnet summary vit_h_14", "build vit_h_14 (random init)")
        targets.append(Target("resnet summary vit_h_14 / building it, wall time", value, "< 1", value < 1))
    return targets


def finite(value: float) -> float | None:
    """JSON has no NaN: a failed run's figure is null."""
    return value if value == value else None


def versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("torch", "torchvision", "onnxruntime", "pillow")} | {
        "python": platform.python_version()
    }


if __name__ == "__main__":
    main()
