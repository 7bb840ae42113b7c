"""Throughput of the Ray engine: one `resnetcli.ray.Classifier` (what one actor does), and whole runs.

    PYTHONPATH=. python bench/bench_ray.py [--arch resnet50] [--images 256] [--threads 1 2] [--actors 1 2]

Prints images per second for: the classifier called directly on batches of file paths (decode,
preprocess, fast-path model) with each thread count, i.e. one actor's throughput with that many
CPUs; and `run_on_ray` end to end on a local instance (Ray start, actors' model load, streaming)
with each actor count. Random-init weights: the arithmetic is that of the pretrained ones.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

SAMPLES = Path(__file__).resolve().parent.parent / "sample_images"


def photos(count: int, folder: Path) -> list[str]:
    """`count` copies of the sample photos (so decoding costs what real photos cost)."""
    samples = sorted(SAMPLES.glob("*.jpg"))
    paths = []
    for i in range(count):
        target = folder / f"{i:06d}_{samples[i % len(samples)].name}"
        shutil.copyfile(samples[i % len(samples)], target)
        paths.append(str(target))
    return paths


def per_actor(arch: str, paths: list[str], threads: int, batch_size: int) -> float:
    import numpy as np

    from resnetcli.ray import Classifier

    classifier = Classifier(arch, "none", 5, threads=threads, batch_size=batch_size)
    warm = np.array(paths[:batch_size], dtype=object)
    classifier({"path": warm})
    classifier({"path": warm[: batch_size // 2]})  # the batch that checks and adopts the traced graph
    started = time.perf_counter()
    for start in range(0, len(paths), batch_size):
        classifier({"path": np.array(paths[start : start + batch_size], dtype=object)})
    return len(paths) / (time.perf_counter() - started)


def end_to_end(arch: str, paths: list[str], actors: int, batch_size: int) -> tuple[float, float]:
    from resnetcli.ray_engine import run_on_ray

    started = time.perf_counter()
    first = None
    count = 0
    for _ in run_on_ray(paths, arch=arch, weights="none", batch_size=batch_size, actors=actors):
        count += 1
        first = first or time.perf_counter()
    assert count == len(paths)
    return count / (time.perf_counter() - started), (first or started) - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--actors", type=int, nargs="*", default=[1, 2])
    args = parser.parse_args()
    os.environ.setdefault("RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION", "0.02")
    with tempfile.TemporaryDirectory() as folder:
        paths = photos(args.images, Path(folder))
        for threads in args.threads:
            rate = per_actor(args.arch, paths, threads, args.batch_size)
            print(f"one Classifier, {threads} thread(s), {args.arch}, batch {args.batch_size}: {rate:.1f} images/s")
        for actors in args.actors:
            rate, first = end_to_end(args.arch, paths, actors, args.batch_size)
            print(f"run_on_ray, local instance, {actors} actor(s), {args.images} images: {rate:.1f} images/s "
                  f"overall, first record after {first:.1f} s")  # fmt: skip


if __name__ == "__main__":
    main()
