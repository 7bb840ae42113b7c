"""Small labelled image folders made from the sample photos, for the fine-tuning tests and
bench/bench_finetune.py: no download, and the same images on every run (seeded by class and split).

Imports nothing from the tests (no conftest), so that the benchmark can import it too.
"""

from __future__ import annotations

import random
from pathlib import Path


def make_photo_set(
    root: Path, photos: list[Path], per_split: int, size: int, *, source_size: int = 160, brightness: bool = True
) -> Path:
    """train/ and val/ folders with one class per photo (named by its stem), each holding `per_split`
    variants of it, `size` pixels square: a crop of 60-100 % of the photo (shrunk first to fit
    `source_size` pixels), a flip half the time, a colour change and (with `brightness`) a
    brightness change. Returns `root`."""
    from PIL import Image, ImageEnhance, ImageOps

    for photo in photos:
        label = photo.stem
        source = Image.open(photo).convert("RGB")
        source.thumbnail((source_size, source_size))
        for split in ("train", "val"):
            folder = root / split / label
            folder.mkdir(parents=True, exist_ok=True)
            rng = random.Random(f"{label}/{split}")
            for i in range(per_split):
                width, height = source.size
                scale = rng.uniform(0.6, 1.0)
                w, h = int(width * scale), int(height * scale)
                x, y = rng.randint(0, width - w), rng.randint(0, height - h)
                image = source.crop((x, y, x + w, y + h)).resize((size, size))
                if rng.random() < 0.5:
                    image = ImageOps.mirror(image)
                image = ImageEnhance.Color(image).enhance(rng.uniform(0.5, 1.5))
                if brightness:
                    image = ImageEnhance.Brightness(image).enhance(rng.uniform(0.7, 1.3))
                image.save(folder / f"{label}_{i}.jpg")
    return root
