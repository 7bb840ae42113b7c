"""`resnet predict` as it runs once resnetcli/fastpath.py is wired in: a preview for the benchmark.

Same model factory (meta device, memory-mapped checkpoint), same decoding and preprocessing and the
same JSON Lines records as `resnet predict --format jsonl`, plus the fast path: thread settings and
`optimize_for_inference`. Decoding and inference run one after the other. `--draft` adds draft-mode
JPEG decoding (opt-in: it changes probabilities by more than 1e-3).

    python bench/fastpath_preview.py --arch resnet50 --weights resnet50-1234abcd.pth photo.jpg...
"""

import argparse
import json
import sys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--weights", default="DEFAULT")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--draft", action="store_true", help="decode large JPEGs at a reduced scale")
    parser.add_argument("images", nargs="+")
    args = parser.parse_args()

    import torch

    from resnetcli import fastpath
    from resnetcli.factory import load_model
    from resnetcli.images import load_image

    fastpath.configure_threads(args.threads)
    loaded = load_model(args.arch, args.weights)
    crop = min(loaded.transforms.crop_size)
    model = fastpath.optimize_for_inference(
        loaded.model, example_shape=(args.batch_size, 3, crop, crop), images=len(args.images)
    )
    short_side = fastpath.draft_short_side(loaded.transforms)

    def decode(path):
        return load_image(path, draft_short_side=short_side) if args.draft else load_image(path)

    for start in range(0, len(args.images), args.batch_size):
        chunk = args.images[start : start + args.batch_size]
        batch = torch.stack([loaded.transforms(decode(path)) for path in chunk])
        with torch.inference_mode():
            values, indices = torch.softmax(model(batch), dim=1).topk(min(args.top, len(loaded.categories)), dim=1)
        for path, row_values, row_indices in zip(chunk, values.tolist(), indices.tolist()):
            top = [
                {"rank": rank, "index": index, "label": loaded.categories[index], "prob": round(prob, 6)}
                for rank, (prob, index) in enumerate(zip(row_values, row_indices), start=1)
            ]
            sys.stdout.write(
                json.dumps({"input": path, "arch": loaded.arch, "weights": loaded.weights.name, "top": top}) + "\n"
            )


if __name__ == "__main__":
    main()
