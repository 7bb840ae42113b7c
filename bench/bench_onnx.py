"""Benchmark the ONNX Runtime path against the tutorial script: the targets of issue 12, in one run.

    python bench/bench_onnx.py            # the full run
    python bench/bench_onnx.py --quick    # fewer photos and repetitions, for development

Builds its workload in a temporary folder (no network): random-init resnet18/resnet50 checkpoints
(timing does not depend on the weights' values), their ONNX exports made with `resnetcli.export`,
and photos of 0.1-10 megapixels made from sample_images/ (bench_predict's workload). Every pair is
measured in the same run, alternating (order reversed every other round); medians are reported.
Prints Markdown tables and writes bench/results/onnx-latest.json.

The ONNX Runtime side runs `resnet predict --weights MODEL.onnx` once predict takes an ONNX file
(detected from `resnet predict --help` offering --runtime); until then it runs this file's
`--direct` mode: the same torch-free classifier (`resnetcli.onnxrt`) with one decoding thread per
core, in a fresh process, printing the same JSONL records.

Targets: cat.jpg from a cold process with resnet50 <= 0.3x the naive script's wall time; 64 photos
with resnet18 >= 2x its images/s; 256 photos with resnet50 >= 2x, and within 15% of the physical
limit ((decode+preprocess core-s + inference core-s) / cores + start-up, each part measured here);
raw inference ONNX Runtime vs the traced torch graph; `resnet --help` <= 0.15x `import torch`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_predict import (
    PYTHON,
    REPO,
    RESNET,
    SAMPLES,
    Row,
    Target,
    compare_in_process,
    compare_processes,
    make_checkpoint,
    make_photos,
    markdown,
    markdown_targets,
    naive_command,
)

HERE = Path(__file__).resolve()


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# --direct: the torch-free classifier in a process of its own (until predict is wired)


def direct(model: str, images: list[str], batch_size: int) -> None:
    """Classify `images` with resnetcli.onnxrt, decoding on one thread per core; JSONL on stdout."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from resnetcli.images import load_image
    from resnetcli.onnxrt import open_classifier

    classifier = open_classifier(Path(model), threads=cores())

    def prepare(path: str):
        return classifier.preprocess(load_image(path))

    out = sys.stdout
    with ThreadPoolExecutor(cores()) as pool:
        arrays = pool.map(prepare, images)
        pending: list = []
        names = iter(images)

        def flush() -> None:
            probabilities = classifier.classify(np.stack(pending))
            for row in probabilities:
                top = np.argsort(-row)[:5]
                scores = [{"index": int(i), "label": classifier.categories[i], "prob": float(row[i])} for i in top]
                out.write(json.dumps({"input": next(names), "arch": classifier.arch, "top": scores}) + "\n")
            pending.clear()

        for array in arrays:
            pending.append(array)
            if len(pending) == batch_size:
                flush()
        if pending:
            flush()
    assert not any(m.split(".")[0] in ("torch", "torchvision") for m in sys.modules), "torch was imported"


def predict_takes_onnx(env: dict) -> bool:
    done = subprocess.run([*RESNET, "predict", "--help"], env=env, capture_output=True, text=True)
    return "--runtime" in done.stdout


def onnx_command(model: Path, photos: list[Path], wired: bool, batch_size: int = 16) -> list[str]:
    if wired:
        return [
            *RESNET,
            "predict",
            "--weights",
            str(model),
            "--batch-size",
            str(batch_size),
            "-f",
            "jsonl",
            *map(str, photos),
        ]
    return [PYTHON, str(HERE), "--direct", str(model), "--batch-size", str(batch_size), *map(str, photos)]


# ---------------------------------------------------------------------------------------------
# The parts of the physical limit, in process


def decode_core_seconds(photos: list[Path], spec) -> float:
    """Single-thread seconds to decode and preprocess every photo (= core-seconds)."""
    from resnetcli.images import load_image
    from resnetcli.onnxrt import preprocess

    start = time.process_time()
    for path in photos:
        preprocess(load_image(path), spec)
    return time.process_time() - start


def inference_core_seconds(model: Path, count: int, batch_size: int) -> float:
    """Seconds for ONNX Runtime on one thread to classify `count` images (= core-seconds)."""
    import numpy as np

    from resnetcli.onnxrt import open_classifier

    classifier = open_classifier(model, threads=1)
    batch = np.random.default_rng(0).standard_normal((batch_size, 3, 224, 224), dtype=np.float32)
    classifier.classify(batch)  # warm-up
    sizes = [batch_size] * (count // batch_size) + ([count % batch_size] if count % batch_size else [])
    start = time.perf_counter()
    for size in sizes:
        classifier.classify(batch[:size])
    return time.perf_counter() - start


def startup_seconds(model: Path, env: dict, repeats: int) -> float:
    """Wall time of a process that imports onnxruntime, opens the model and classifies nothing."""
    code = f"from resnetcli.onnxrt import open_classifier; open_classifier({str(model)!r})"
    walls = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run([PYTHON, "-c", code], env=env, check=True)
        walls.append(time.perf_counter() - start)
    return statistics.median(walls)


def raw_inference(checkpoint: Path, model: Path, arch: str, images: int, batch_size: int, repeats: int) -> list[Row]:
    """ONNX Runtime against the traced torch graph (resnetcli.fastpath for many images), same threads."""
    import numpy as np
    import torch

    from resnetcli import fastpath
    from resnetcli.factory import load_model
    from resnetcli.onnxrt import open_classifier

    threads = cores()
    fastpath.configure_threads(threads)
    base = load_model(arch, str(checkpoint)).model
    traced = fastpath.optimize_for_inference(base, example_shape=(batch_size, 3, 224, 224), images=images)
    classifier = open_classifier(model, threads=threads)
    batches = [
        torch.randn(batch_size, 3, 224, 224, generator=torch.Generator().manual_seed(i))
        for i in range(images // batch_size)
    ]
    arrays = [np.ascontiguousarray(b.numpy()) for b in batches]

    def run_torch() -> None:
        with torch.inference_mode():
            for batch in batches:
                torch.softmax(traced(batch), dim=1)

    def run_ort() -> None:
        for array in arrays:
            classifier.classify(array)

    for warm in (run_torch, run_ort):
        warm()
    return compare_in_process(
        f"raw inference {arch}, batch {batch_size}, {threads} threads",
        {"traced torch graph (fast path)": run_torch, "ONNX Runtime": run_ort},
        repeats,
        images,
    )


def runtimes(count: int, repeats: int) -> None:
    """The large job on both runtimes of `resnet predict`, with the physical limit's parts (see --runtimes)."""
    from resnetcli.export import export
    from resnetcli.onnxrt import open_classifier

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        folder = Path(tmp)
        env["TORCH_HOME"] = str(folder / "torch")
        checkpoint = make_checkpoint("resnet50", folder)
        model = export("resnet50", str(checkpoint), folder / "resnet50.onnx").path
        photos = make_photos(folder / "photos", count)
        common = ["-f", "jsonl", "--batch-size", "16", *map(str, photos)]
        group = f"{count} mixed photos (0.1-10 MP), resnet50"
        rows = compare_processes(
            group,
            {
                "resnet predict, torch (traced graph)": [
                    *RESNET, "predict", "--arch", "resnet50", "--weights", str(checkpoint), "--runtime", "torch",
                    *common,
                ],
                "resnet predict --weights MODEL.onnx": [*RESNET, "predict", "--weights", str(model), *common],
            },
            repeats,
            env,
            images=count,
        )  # fmt: skip
        rows += raw_inference(checkpoint, model, "resnet50", 64, 16, repeats)
        spec = open_classifier(model).info.preprocessing
        decode_cs = decode_core_seconds(photos, spec)
        infer_cs = inference_core_seconds(model, count, 16)
        startup = startup_seconds(model, env, repeats)
    limit = (decode_cs + infer_cs) / cores() + startup
    measured = next(r.wall_s for r in rows if r.name == "resnet predict --weights MODEL.onnx")
    print(markdown(rows))
    print()
    print(
        f"physical limit = (decode+preprocess {decode_cs:.2f} core-s + inference {infer_cs:.2f} core-s)"
        f" / {cores()} cores + start-up {startup:.2f} s = {limit:.2f} s; measured {measured:.2f} s"
        f" = {measured / limit:.2f}x the limit"
    )
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cores": cores(),
        "load_average": os.getloadavg(),
        "rows": [asdict(r) for r in rows],
        "physical_limit": {"decode_core_s": decode_cs, "inference_core_s": infer_cs, "startup_s": startup,
                           "limit_s": limit, "measured_s": measured},
    }  # fmt: skip
    (REPO / "bench" / "results" / "onnx-runtimes.json").write_text(json.dumps(result, indent=1))


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer photos and repetitions")
    parser.add_argument("--smoke", action="store_true", help="one repetition of a few photos: checks the script runs")
    parser.add_argument("--direct", metavar="MODEL", help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, help="rounds per pair (default 7; 3 with --quick)")
    parser.add_argument(
        "--runtimes",
        metavar="N",
        type=int,
        help="only the large job on N photos, resnet50: `resnet predict` on torch vs on ONNX Runtime (paired, "
        "alternating), raw inference, and the physical-limit parts (no naive script: for a loaded machine)",
    )
    parser.add_argument("images", nargs="*")
    args = parser.parse_args()
    if args.direct:
        direct(args.direct, args.images, args.batch_size)
        return
    if args.runtimes:
        runtimes(args.runtimes, args.repeats or 3)
        return

    from resnetcli.export import export

    repeats = args.repeats or (1 if args.smoke else 3 if args.quick else 7)
    big_count = 8 if args.smoke else 64 if args.quick else 256
    small_count = 8 if args.smoke else 64
    small = f"{small_count} mixed photos, resnet18"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        folder = Path(tmp)
        env["TORCH_HOME"] = str(folder / "torch")
        checkpoints = {arch: make_checkpoint(arch, folder) for arch in ("resnet18", "resnet50")}
        models = {}
        for arch, checkpoint in checkpoints.items():
            print(f"exporting {arch}", file=sys.stderr, flush=True)
            models[arch] = export(arch, str(checkpoint), folder / f"{arch}.onnx").path
        photos64 = make_photos(folder / "photos64", small_count)
        photos_big = make_photos(folder / "photos_big", big_count)
        cat = REPO / "sample_images" / "cat.jpg"
        wired = predict_takes_onnx(env)
        ort_name = "resnet predict --weights MODEL.onnx" if wired else "ONNX Runtime, torch-free (bench --direct)"

        rows += compare_processes(
            "cat.jpg, cold process, resnet50",
            {
                "naive script": naive_command("resnet50", checkpoints["resnet50"], [cat]),
                ort_name: onnx_command(models["resnet50"], [cat], wired),
            },
            repeats,
            env,
            images=1,
        )
        rows += compare_processes(
            small,
            {
                "naive script": naive_command("resnet18", checkpoints["resnet18"], photos64),
                ort_name: onnx_command(models["resnet18"], photos64, wired),
            },
            repeats,
            env,
            images=small_count,
        )
        big = f"{big_count} mixed photos (0.1-10 MP), resnet50"
        rows += compare_processes(
            big,
            {
                "naive script": naive_command("resnet50", checkpoints["resnet50"], photos_big),
                ort_name: onnx_command(models["resnet50"], photos_big, wired),
            },
            max(3, repeats // 2),  # a median of at least 3
            env,
            images=big_count,
        )
        rows += compare_processes(
            "start-up",
            {"resnet --help": [*RESNET, "--help"], "python -c 'import torch'": [PYTHON, "-c", "import torch"]},
            repeats,
            env,
        )
        rows += raw_inference(
            checkpoints["resnet50"],
            models["resnet50"],
            "resnet50",
            16 if args.smoke else 64 if args.quick else 128,
            16,
            repeats,
        )

        from resnetcli.onnxrt import open_classifier

        spec = open_classifier(models["resnet50"]).info.preprocessing
        decode_cs = decode_core_seconds(photos_big, spec)
        infer_cs = inference_core_seconds(models["resnet50"], big_count, 16)
        startup = startup_seconds(models["resnet50"], env, repeats)
    limit = (decode_cs + infer_cs) / cores() + startup
    measured = next(r.wall_s for r in rows if r.group == big and r.name == ort_name)
    arithmetic = (
        f"physical limit = (decode+preprocess {decode_cs:.2f} core-s + inference {infer_cs:.2f} core-s)"
        f" / {cores()} cores "
        f"+ start-up {startup:.2f} s = {limit:.2f} s; measured {measured:.2f} s = {measured / limit:.2f}x the limit"
    )

    def by(group: str, name: str) -> Row:
        return next(r for r in rows if r.group == group and r.name == name)

    def rate_ratio(group: str) -> float:
        ort, naive = by(group, ort_name), by(group, "naive script")
        return naive.wall_s / ort.wall_s if ort.wall_s == ort.wall_s else float("nan")

    raw_group = next(r.group for r in rows if r.group.startswith("raw inference"))
    raw = by(raw_group, "traced torch graph (fast path)").wall_s / by(raw_group, "ONNX Runtime").wall_s
    targets = [
        Target(
            "cat.jpg cold, resnet50: ORT wall / naive wall",
            by("cat.jpg, cold process, resnet50", ort_name).wall_s
            / by("cat.jpg, cold process, resnet50", "naive script").wall_s,
            "<= 0.3",
            False,
        ),
        Target(f"{small}: ORT images/s / naive", rate_ratio(small), ">= 2", False),
        Target(f"{big_count} photos, resnet50: ORT images/s / naive", rate_ratio(big), ">= 2", False),
        Target(f"{big_count} photos, resnet50: wall / physical limit", measured / limit, "<= 1.15", False),
        Target("raw inference: traced torch time / ORT time", raw, "> 1 means ORT faster", False),
        Target(
            "resnet --help / import torch",
            by("start-up", "resnet --help").wall_s / by("start-up", "python -c 'import torch'").wall_s,
            "<= 0.15",
            False,
        ),
    ]
    goals = {
        "<= 0.3": lambda v: v <= 0.3,
        ">= 2": lambda v: v >= 2,
        "<= 1.15": lambda v: v <= 1.15,
        "<= 0.15": lambda v: v <= 0.15,
    }
    targets = [Target(t.name, t.value, t.goal, goals.get(t.goal, lambda v: v > 1)(t.value)) for t in targets]
    print(markdown(rows))
    print()
    print(markdown_targets(targets))
    print()
    print(arithmetic)
    naive_big = by(big, "naive script").wall_s
    ceiling = naive_big / limit
    print(
        f"ceiling: a pipeline at exactly the physical limit would run the {big_count}-photo job at"
        f" {ceiling:.2f}x the naive loop's images/s (naive {naive_big:.2f} s / limit {limit:.2f} s)"
    )
    print(
        f"default runtime for large jobs: {'ONNX Runtime' if raw > 1 else 'the traced torch graph'}"
        f" (raw inference {raw:.2f}x)"
    )
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cores": cores(),
        "ort_side": ort_name,
        "rows": [asdict(r) for r in rows],
        "targets": [asdict(t) for t in targets],
        "physical_limit": {
            "decode_core_s": decode_cs,
            "inference_core_s": infer_cs,
            "startup_s": startup,
            "limit_s": limit,
            "measured_s": measured,
            "ceiling_vs_naive": ceiling,
        },
        "samples": [p.name for p in SAMPLES],
    }
    out = (
        REPO
        / "bench"
        / "results"
        / ("onnx-smoke.json" if args.smoke else "onnx-quick.json" if args.quick else "onnx-latest.json")
    )
    out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
