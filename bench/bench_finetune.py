"""How much faster `resnet finetune --train head` is on cached features than the naive loop.

Both train the same new head of a frozen backbone (random init: no pretrained weights here) on the
same generated data set, in one process (imports and the model build excluded from the timings):
- cached: one forward pass per image to compute the backbone's features, then every epoch trains
  the head on those features (what `resnet finetune` does);
- naive: every epoch decodes, preprocesses and forwards every image through the whole network,
  then updates the head (the textbook loop with a frozen backbone).
Checkpoints are written after every epoch in both. Prints each one's wall time, the ratio, and
the final val top-1 of each.

    python bench/bench_finetune.py [--arch resnet18] [--epochs 10] [--per-class 16] [--classes 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.photo_sets import make_photo_set  # noqa: E402 - the fine-tuning tests' data sets, at bench size


def train(data: Path, out: Path, args, cached: bool) -> tuple[float, float]:
    from resnetcli.datasets import load_split
    from resnetcli.finetune import FinetuneConfig, Trainer

    config = FinetuneConfig(args.arch, "none", epochs=args.epochs, batch_size=args.batch_size, workers=2, device="cpu")
    trainer = Trainer(config, load_split(data), out)
    trainer.cached = cached
    started = time.perf_counter()
    result = trainer.run(lambda epoch: None, lambda name, total: lambda done: None)
    return time.perf_counter() - started, result.epochs[-1].val_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--per-class", type=int, default=16, help="images per class and split")
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    import torch

    with tempfile.TemporaryDirectory() as folder:
        data = Path(folder) / "data"
        photos = sorted((REPO / "sample_images").glob("*.jpg"))[: args.classes]
        make_photo_set(data, photos, args.per_class, 160, source_size=320, brightness=False)
        train(data, Path(folder) / "warm.pth", argparse.Namespace(**{**vars(args), "epochs": 1}), True)  # warm-up
        cached_time, cached_accuracy = train(data, Path(folder) / "cached.pth", args, True)
        naive_time, naive_accuracy = train(data, Path(folder) / "naive.pth", args, False)
    images = 2 * args.classes * args.per_class
    print(f"{args.arch}, {images} images, {args.epochs} epochs, {torch.get_num_threads()} threads")
    print(f"cached features: {cached_time:7.1f} s  (val top-1 {cached_accuracy:.3f})")
    print(f"naive loop:      {naive_time:7.1f} s  (val top-1 {naive_accuracy:.3f})")
    print(f"speed-up:        {naive_time / cached_time:7.1f}x")


if __name__ == "__main__":
    main()
