"""The baseline: image classification the way the tutorials write it.

One image at a time, the model built with random init and then loaded from a checkpoint, the
weights' own preprocessing, `torch.no_grad()`, softmax and top-5, printed. `bench_predict.py`
runs it side by side with `resnet predict` on the same checkpoint and photos.

    python bench/naive_predict.py --arch resnet50 --weights resnet50-1234abcd.pth photo.jpg...
"""

import argparse

import torch
from PIL import Image
from torchvision import models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--weights", required=True, help="a state-dict checkpoint file")
    parser.add_argument("images", nargs="+")
    args = parser.parse_args()

    weights = models.get_model_weights(args.arch).DEFAULT
    model = models.get_model(args.arch, weights=None)
    model.load_state_dict(torch.load(args.weights, weights_only=True))
    model.eval()
    preprocess = weights.transforms()
    categories = weights.meta["categories"]

    for path in args.images:
        image = Image.open(path).convert("RGB")
        batch = preprocess(image).unsqueeze(0)
        with torch.no_grad():
            probabilities = model(batch).softmax(dim=1)[0]
        top = probabilities.topk(5)
        print(path, ", ".join(f"{categories[i]} {p:.4f}" for p, i in zip(top.values.tolist(), top.indices.tolist())))


if __name__ == "__main__":
    main()
