"""How much faster `resnet summary vit_h_14` is than building vit_h_14 with random initialisation.

Runs, alternately and in one process (imports done once), `resnetcli.summary.summarize("vit_h_14")`
(the model built on the meta device as its DEFAULT weights configure it, 518-pixel inputs, then the
torchinfo layer tree) and `torchvision.models.vit_h_14(weights=None, image_size=518)` (the same
model with random init on the CPU), and prints each one's median wall time and their ratio. Then
times the whole command, `resnet summary vit_h_14`, in a fresh process (Python and torch import
included), once.

    python bench/bench_summary.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeat", type=int, default=3, help="runs of each (alternating); random init takes ~20 s a run"
    )
    parser.add_argument("--arch", default="vit_h_14")
    args = parser.parse_args()

    import torch
    from torchvision import models

    from resnetcli.summary import summarize

    default = models.get_model_weights(args.arch).DEFAULT
    builder_kwargs = {"image_size": default.transforms().crop_size[0]} if args.arch.startswith("vit_") else {}
    summarize(args.arch, depth=1)  # warm-up: first-call costs of torchinfo and the meta kernels

    summary_times: list[float] = []
    build_times: list[float] = []
    for run in range(1, args.repeat + 1):
        started = time.perf_counter()
        report = summarize(args.arch)
        summary_times.append(time.perf_counter() - started)

        started = time.perf_counter()
        model = models.get_model_builder(args.arch)(weights=None, **builder_kwargs)
        build_times.append(time.perf_counter() - started)
        built_params = sum(p.numel() for p in model.parameters())
        del model
        print(
            f"run {run}: summary {summary_times[-1]:.3f} s, random-init build {build_times[-1]:.2f} s", file=sys.stderr
        )
        if built_params != report.total_params:
            raise SystemExit(f"the two models differ: {built_params} vs {report.total_params} parameters")

    summary_median = statistics.median(summary_times)
    build_median = statistics.median(build_times)
    print(
        f"{args.arch}: {report.total_params:,} parameters, input {report.input_size}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(f"summary (meta device, torchinfo)  median {summary_median:8.3f} s  over {args.repeat} runs")
    print(f"build with random init (CPU)      median {build_median:8.3f} s  over {args.repeat} runs")
    print(f"ratio build / summary             {build_median / summary_median:8.1f}x")

    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "resnetcli", "summary", args.arch, "--format", "json"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    print(f"`resnet summary {args.arch}` in a fresh process (imports included): {time.perf_counter() - started:.2f} s")


if __name__ == "__main__":
    main()
