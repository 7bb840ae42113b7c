"""The examples that end each command's `--help`, in one place.

Keys are command paths as typed after `resnet` ("predict", "cache list"; "" is `resnet --help`
itself). Each example is one literal command line, optionally followed by `  # what it does`;
ResnetGroup attaches them to the commands as their epilog, and tests/test_help.py parses every
line against the real parser (and runs the ones that need no weights). A command registered by a
new module gets its entry here; entries for commands that are not registered are ignored.
Paths are those of the repository (sample_images/...) or obviously the user's own (photo.jpg).
"""

from __future__ import annotations

EXAMPLES: dict[str, list[str]] = {
    "": [
        "resnet summary resnet50  # the layer tree, no weights needed",
        "resnet predict sample_images/cat.jpg --arch resnet50",
        "resnet list 'resnet*' --sort acc@1",
        "resnet fetch resnet50  # weights into the cache, for offline use",
    ],
    "predict": [
        "resnet predict sample_images/cat.jpg --arch resnet50",
        "resnet predict sample_images/ --arch resnet18 --top 3 --format csv",
        "find photos -name '*.jpg' -print0 | resnet predict - --null -o labels.jsonl",
        "resnet predict photos/ --offline --shard 2/8 -o part-2.jsonl",
        "resnet predict photo.jpg --arch resnet18 --weights ft.pth --labels classes.txt",
    ],
    "summary": [
        "resnet summary resnet18  # layer tree to depth 3, totals",
        "resnet summary resnet50 --depth 1 --input-size 512,384",
        "resnet summary resnet18 --params --filter layer4",
        "resnet summary vit_b_16 --format json",
    ],
    "features": [
        "resnet features resnet18 --input-size 640",
        "resnet features resnet50 --nodes layer2,layer3,fc",
        "resnet features resnet50 --list-nodes",
        "resnet features resnet50 --image photo.jpg --save features.npz",
    ],
    "list": [
        "resnet list",
        "resnet list 'resnet*' --sort acc@1  # best first",
        "resnet list '*vit*' --sort gflops --format csv",
    ],
    "fetch": [
        "resnet fetch resnet50 resnet18:IMAGENET1K_V1",
        "resnet fetch --from-file resnet50-11ad3fa6.pth resnet50  # a file carried in",
        "resnet fetch --url https://host.example/ft-3f2a9c1e.pth",
        "resnet fetch resnet50 --mirror https://mirror.example/weights",
        "resnet fetch resnet50 --onnx  # and its ONNX export, for torch-free runs",
    ],
    "cache": [
        "resnet cache list",
        "resnet cache verify",
        "resnet cache rm resnet50-11ad3fa6.pth",
    ],
    "cache list": [
        "resnet cache list",
        "resnet cache list --format json",
        "resnet cache list --format csv",
    ],
    "cache verify": [
        "resnet cache verify  # hash every file in full",
        "resnet cache verify resnet50-11ad3fa6.pth",
        "resnet cache verify --format jsonl",
    ],
    "cache rm": [
        "resnet cache rm resnet50-11ad3fa6.pth",
        "resnet cache rm resnet18-f37072fd.pth resnet50-11ad3fa6.pth",
        "resnet cache rm --all  # every file, record and abandoned download",
    ],
    "export": [
        "resnet export resnet50 -o resnet50.onnx",
        "resnet export resnet18:IMAGENET1K_V1 --opset 18 -o resnet18.onnx",
        "resnet export resnet18 --weights ft.pth -o ft.onnx  # a fine-tuned checkpoint",
        "resnet export resnet18 --weights none --check-with photo.jpg -o random.onnx",
    ],
    # Commands of another branch (issue 11); checked by the tests once they are registered.
    "finetune": [
        "resnet finetune photos/ --arch resnet50 -o pets.pth  # frozen backbone",
        "resnet finetune photos/ -a resnet18 --train last-stage -e 5 -o pets.pth",
        "resnet finetune pets.csv --val-split 0.2 --input-size 160 -o pets.pth",
        "resnet finetune photos/ --resume pets.pth -o pets.pth  # after Ctrl-C",
    ],
    "eval": [
        "resnet eval photos/ --weights pets.pth  # OUT.pth names its classes",
        "resnet eval photos/ --weights pets.pth --format json",
        "resnet eval photos/ --weights pets.pth --plot confusion.png",
        "resnet eval imagenet-val/ --arch resnet50  # folders named as its classes",
    ],
}


def epilog(path: str) -> str | None:
    """The `--help` epilog of a command: its examples, one per line, or None without an entry.

    Typer's rich help keeps the line breaks; the brackets rich would read as markup are escaped.
    """
    lines = EXAMPLES.get(path)
    if not lines:
        return None
    from rich.markup import escape

    return "\n".join(["[bold]Examples[/bold]", *(f"  {escape(line)}" for line in lines)])
