"""`resnet predict` for batch jobs: inputs, decoding, streaming, fine-tuned checkpoints, preprocessing, scale.

Every test drives the CLI on real image files generated with Pillow from sample_images/. The
checkpoint `soft_steered` has a head steered so that each sample photo, and the cat photo turned
on its side, land on their own class, with probabilities soft enough (not saturated at 1.0) that
they also fingerprint the exact pixels the model saw.
"""

from __future__ import annotations

import csv
import io
import json
import select
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import REPO, STEERED_CLASSES, env_without_resnet, penultimate_features, steer_head
from helpers import jsonl, run_on_terminal
from predict_cli import command, run

#: The class the cat photo lands on when its pixels are turned 90 degrees (stored sideways).
SIDEWAYS_CAT_CLASS = 282
#: Shrinks the steered head's logits so probabilities stay between 0 and 1 instead of saturating.
SOFTENING = 0.03


def top1(record: dict) -> int:
    return record["top"][0]["index"]


@dataclass
class SteeredModel:
    path: Path
    model: object  # the same network, in memory, for reference predictions

    @property
    def args(self) -> list[str]:
        return ["--arch", "resnet18", "--weights", str(self.path)]


def rgb(path: Path):
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB")


def turned_sideways(image):
    """The pixels a camera stores when the photo needs a 90-degree clockwise turn to be upright (EXIF 6)."""
    from PIL import Image

    return image.transpose(Image.Transpose.ROTATE_90)


@pytest.fixture(scope="module")
def soft_steered(tmp_path_factory, sample_images) -> SteeredModel:
    import torch
    from torchvision import models

    folder = tmp_path_factory.mktemp("soft")
    sideways = folder / "cat-sideways.png"
    turned_sideways(rgb(sample_images[1])).save(sideways)
    assert sample_images[1].name == "cat.jpg"
    torch.manual_seed(0)
    model = models.resnet18(weights=None).eval()
    images = [*sample_images, sideways]
    features = penultimate_features(model, images, models.ResNet18_Weights.DEFAULT.transforms())
    steer_head(model, features, [STEERED_CLASSES[p.name] for p in sample_images] + [SIDEWAYS_CAT_CLASS])
    with torch.no_grad():
        model.fc.weight.mul_(SOFTENING)
        model.fc.bias.mul_(SOFTENING)
    path = folder / "resnet18-soft.pth"
    torch.save(model.state_dict(), path)
    return SteeredModel(path, model)


def reference(model, images, k: int = 3, transforms=None) -> list[list[tuple[int, float]]]:
    """torchvision's own pipeline on PIL RGB images: the (index, prob) of the top k classes."""
    import torch
    from torchvision import models

    transforms = transforms or models.ResNet18_Weights.DEFAULT.transforms()
    with torch.no_grad():
        probabilities = torch.softmax(model(torch.stack([transforms(image) for image in images])), dim=1)
    values, indices = probabilities.topk(k, dim=1)
    return [list(zip(i.tolist(), v.tolist())) for i, v in zip(indices, values)]


def assert_top_matches(record: dict, expected: list[tuple[int, float]]) -> None:
    assert [s["index"] for s in record["top"]] == [index for index, _ in expected], record["input"]
    for score, (_, prob) in zip(record["top"], expected):
        assert score["prob"] == pytest.approx(prob, abs=1e-4), record["input"]


@pytest.fixture
def photos(sample_images) -> dict[str, Path]:
    """The sample photos by short name: astronaut, cat, coffee, rocket."""
    return {p.stem: p for p in sample_images}


def expected_class(path: Path) -> int:
    return STEERED_CLASSES[path.name]


# ---------------------------------------------------------------------------------------------
# Inputs


@pytest.fixture
def photo_tree(tmp_path, photos) -> Path:
    """photos/ with a JPEG, a PNG in a sub-folder, a JPEG named .dat deeper down, a text file named
    .jpg, a text file, a hidden image and an empty sub-folder."""
    root = tmp_path / "photos"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "empty").mkdir()
    (root / "a.jpg").write_bytes(photos["cat"].read_bytes())
    rgb(photos["coffee"]).save(root / "sub" / "b.png")
    (root / "sub" / "deeper" / "c.dat").write_bytes(photos["rocket"].read_bytes())
    (root / "fake.jpg").write_text("not a JPEG at all\n")
    (root / "notes.txt").write_text("just notes\n")
    (root / ".hidden.jpg").write_bytes(photos["astronaut"].read_bytes())
    return root


def test_folder_is_searched_recursively_and_images_are_recognised_by_content(
    runner, app, soft_steered, photo_tree, photos
):
    result = run(runner, app, photo_tree, *soft_steered.args, "--format", "jsonl")
    assert result.exit_code == 1, result.stderr
    records = jsonl(result.stdout)
    assert [r["input"] for r in records] == [
        f"{photo_tree}/a.jpg",
        f"{photo_tree}/fake.jpg",
        f"{photo_tree}/sub/b.png",
        f"{photo_tree}/sub/deeper/c.dat",
    ]
    assert top1(records[0]) == expected_class(photos["cat"])
    assert records[1]["error"] == f"{photo_tree}/fake.jpg: not an image (unrecognised format)"
    assert top1(records[2]) == expected_class(photos["coffee"])
    assert top1(records[3]) == expected_class(photos["rocket"])
    assert result.stderr == f"resnet: error: {photo_tree}/fake.jpg: not an image (unrecognised format)\n"


def test_no_recursive_stays_at_the_top_and_an_imageless_folder_is_an_error(runner, app, soft_steered, photo_tree):
    result = run(
        runner, app, photo_tree, photo_tree / "empty", *soft_steered.args, "--no-recursive", "--format", "jsonl"
    )
    assert result.exit_code == 1
    records = jsonl(result.stdout)
    assert [r["input"] for r in records] == [f"{photo_tree}/a.jpg", f"{photo_tree}/fake.jpg", f"{photo_tree}/empty"]
    assert "is a directory with no image files" in records[2]["error"]


def test_glob_patterns_expand_sorted_and_a_pattern_without_match_is_an_error(runner, app, soft_steered, photo_tree):
    result = run(
        runner,
        app,
        f"{photo_tree}/**/*.png",
        f"{photo_tree}/*.jpg",
        f"{photo_tree}/*.gif",
        *soft_steered.args,
        "--format",
        "jsonl",
    )
    assert result.exit_code == 1
    records = jsonl(result.stdout)
    assert [r["input"] for r in records] == [
        f"{photo_tree}/sub/b.png",
        f"{photo_tree}/a.jpg",
        f"{photo_tree}/fake.jpg",
        f"{photo_tree}/*.gif",
    ]
    assert records[3]["error"] == f"{photo_tree}/*.gif: no files match this pattern"


def test_stdin_paths_newline_or_nul_separated_mixed_with_arguments(runner, app, soft_steered, photo_tree, photos):
    listed = [photo_tree / "sub" / "deeper" / "c.dat", photos["astronaut"], photo_tree / "sub"]
    result = run(
        runner,
        app,
        photos["cat"],
        "-",
        *soft_steered.args,
        "--format",
        "jsonl",
        input="".join(f"{p}\n" for p in listed),
    )
    assert result.exit_code == 0, result.stderr
    records = jsonl(result.stdout)
    assert [r["input"] for r in records] == [
        str(photos["cat"]),
        str(listed[0]),
        str(photos["astronaut"]),
        f"{photo_tree}/sub/b.png",
        f"{photo_tree}/sub/deeper/c.dat",
    ]
    assert [top1(r) for r in records] == [281, 812, 0, 967, 812]

    spaced = photo_tree / "with space\nand newline.jpg"
    spaced.write_bytes(photos["coffee"].read_bytes())
    gone = photo_tree / "gone\nmissing.jpg"
    result = run(
        runner,
        app,
        "-",
        "--null",
        *soft_steered.args,
        "--format",
        "jsonl",
        input=f"{spaced}\0{photos['rocket']}\0{gone}\0",
    )
    assert result.exit_code == 1
    records = jsonl(result.stdout)
    assert [(r["input"], top1(r)) for r in records[:2]] == [(str(spaced), 967), (str(photos["rocket"]), 812)]
    assert records[2] == {"input": str(gone), "error": f"{gone}: no such file"}
    # The line break in the name is escaped: still one line on stderr.
    assert result.stderr == f"resnet: error: {photo_tree}/gone\\nmissing.jpg: no such file\n"


def test_url_inputs_and_a_404_is_an_error_of_that_input(runner, app, soft_steered, photos, weight_server, tmp_path):
    photo_url = weight_server.add(photos["cat"], "served-cat.jpg")
    text = tmp_path / "served.txt"
    text.write_text("hello\n")
    text_url = weight_server.add(text)
    missing_url = f"{weight_server.url}/no-such-photo.jpg"
    result = run(
        runner,
        app,
        photo_url,
        missing_url,
        text_url,
        photos["coffee"],
        *soft_steered.args,
        "--top",
        "3",
        "--format",
        "jsonl",
    )
    assert result.exit_code == 1
    records = jsonl(result.stdout)
    assert [r["input"] for r in records] == [photo_url, missing_url, text_url, str(photos["coffee"])]
    assert top1(records[0]) == expected_class(photos["cat"])
    assert_top_matches(records[0], reference(soft_steered.model, [rgb(photos["cat"])])[0])
    assert records[1]["error"] == f"{missing_url}: cannot fetch: HTTP 404 File not found"
    assert records[2]["error"] == f"{text_url}: not an image (unrecognised format)"
    assert top1(records[3]) == expected_class(photos["coffee"])
    assert result.stderr.splitlines() == [
        f"resnet: error: {records[1]['error']}",
        f"resnet: error: {records[2]['error']}",
    ]

    offline = run(runner, app, photo_url, *soft_steered.args, "--offline", "--format", "jsonl")
    assert offline.exit_code == 1
    assert jsonl(offline.stdout) == [
        {"input": photo_url, "error": f"{photo_url}: not fetched: downloads are off (offline mode)"}
    ]


# ---------------------------------------------------------------------------------------------
# Decoding


def test_exif_orientation_is_applied(runner, app, soft_steered, photos, tmp_path):
    from PIL import Image

    cat = rgb(photos["cat"])
    upright = tmp_path / "upright.jpg"
    cat.save(upright, quality=95)
    tagged = tmp_path / "sideways-tagged.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: turn 90 degrees clockwise to display
    turned_sideways(cat).save(tagged, quality=95, exif=exif)
    untagged = tmp_path / "sideways-untagged.jpg"
    turned_sideways(cat).save(untagged, quality=95)

    result = run(runner, app, upright, tagged, untagged, *soft_steered.args, "--format", "jsonl")
    assert result.exit_code == 0, result.stderr
    records = jsonl(result.stdout)
    assert [top1(r) for r in records] == [
        expected_class(photos["cat"]),
        expected_class(photos["cat"]),
        SIDEWAYS_CAT_CLASS,
    ]
    assert records[1]["top"][0]["prob"] == pytest.approx(records[0]["top"][0]["prob"], abs=0.03)


def test_image_modes_become_the_right_rgb(runner, app, soft_steered, photos, tmp_path):
    """Grayscale, 16-bit, palette, CMYK, transparency and animation: the model sees the right RGB pixels."""
    import numpy as np
    from PIL import Image

    gray = rgb(photos["coffee"]).convert("L")
    gray.save(tmp_path / "gray.png")
    Image.fromarray(np.asarray(gray).astype(np.uint16) * 257).save(tmp_path / "gray16.png")  # same grey, 16 bits
    palette = rgb(photos["rocket"]).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    palette.save(tmp_path / "palette.png")
    rgb(photos["astronaut"]).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    cat = rgb(photos["cat"])
    opaque = cat.copy()
    opaque.putalpha(255)
    opaque.save(tmp_path / "opaque.png")
    # Two images with the same visible pixels, and different colours under their transparent border.
    mask = Image.new("L", cat.size, 0)
    mask.paste(255, (40, 40, cat.width - 40, cat.height - 40))
    for name, hidden in (("black", (0, 0, 0)), ("magenta", (255, 0, 255))):
        layered = Image.new("RGB", cat.size, hidden)
        layered.paste(cat, mask=mask)
        layered.putalpha(mask)
        layered.save(tmp_path / f"transparent-{name}.png")
    frames = [rgb(photos["rocket"]), rgb(photos["coffee"]).resize(rgb(photos["rocket"]).size)]
    frames[0].save(tmp_path / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)

    names = [
        "gray.png",
        "gray16.png",
        "palette.png",
        "cmyk.jpg",
        "opaque.png",
        "transparent-black.png",
        "transparent-magenta.png",
        "animated.gif",
    ]
    result = run(runner, app, *[tmp_path / n for n in names], *soft_steered.args, "--top", "3", "--format", "jsonl")
    assert result.exit_code == 0, result.stderr
    records = dict(zip(names, jsonl(result.stdout)))
    with Image.open(tmp_path / "animated.gif") as animation:
        first_frame = animation.convert("RGB")
    with Image.open(tmp_path / "cmyk.jpg") as cmyk:
        assert cmyk.mode == "CMYK"
        cmyk_as_rgb = cmyk.convert("RGB")
    expected = dict(
        zip(
            ["gray.png", "gray16.png", "palette.png", "cmyk.jpg", "opaque.png", "animated.gif"],
            reference(
                soft_steered.model,
                [gray.convert("RGB"), gray.convert("RGB"), palette.convert("RGB"), cmyk_as_rgb, cat, first_frame],
            ),
        )
    )
    for name, top in expected.items():
        assert_top_matches(records[name], top)
    assert top1(records["animated.gif"]) == expected_class(photos["rocket"])
    assert top1(records["cmyk.jpg"]) == expected_class(photos["astronaut"])
    # What lies under transparent pixels does not matter: both are composited on the same background.
    assert records["transparent-black.png"]["top"] == records["transparent-magenta.png"]["top"]
    assert top1(records["transparent-black.png"]) == expected_class(photos["cat"])


@pytest.fixture
def bad_batch(tmp_path, photos, monkeypatch) -> list[Path]:
    """Good photos around a truncated JPEG, text named .jpg, two decompression bombs, a folder named
    like an image and a missing file. Pillow's pixel limit is lowered so small files act as bombs."""
    from PIL import Image

    limit = max(w * h for w, h in (rgb(p).size for p in photos.values())) + 1000
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(photos["cat"].read_bytes()[:3000])
    text = tmp_path / "text.jpg"
    text.write_text("this is text\n")
    bomb = tmp_path / "bomb.png"
    Image.new("L", (3 * limit // 1000, 1000)).save(bomb)  # over twice the limit: Pillow's own refusal
    near_bomb = tmp_path / "near-bomb.png"
    Image.new("L", (3 * limit // 2000, 1000)).save(near_bomb)  # between one and two times the limit
    folder = tmp_path / "folder.jpg"
    folder.mkdir()
    missing = tmp_path / "missing.jpg"
    return [photos["astronaut"], truncated, text, bomb, near_bomb, folder, missing, photos["rocket"]]


def test_unreadable_inputs_give_one_error_each_and_the_batch_goes_on(runner, app, soft_steered, bad_batch):
    result = run(runner, app, *bad_batch, *soft_steered.args, "--format", "jsonl", "--batch-size", "3")
    assert result.exit_code == 1
    records = jsonl(result.stdout)
    assert [r["input"] for r in records] == [str(p) for p in bad_batch]
    assert top1(records[0]) == expected_class(bad_batch[0])
    assert top1(records[-1]) == expected_class(bad_batch[-1])
    errors = [r["error"] for r in records[1:-1]]
    assert all(set(r) == {"input", "error"} for r in records[1:-1])
    assert errors[0].startswith(f"{bad_batch[1]}: cannot decode image: ")
    assert errors[1] == f"{bad_batch[2]}: not an image (unrecognised format)"
    assert errors[2].startswith(f"{bad_batch[3]}: refused as a possible decompression bomb")
    assert errors[3].startswith(f"{bad_batch[4]}: refused as a possible decompression bomb")
    assert errors[4] == f"{bad_batch[5]}: is a directory with no image files in this folder or below"
    assert errors[5] == f"{bad_batch[6]}: no such file"
    assert result.stderr.splitlines() == [f"resnet: error: {e}" for e in errors]


def test_strict_stops_at_the_first_failure(runner, app, soft_steered, bad_batch):
    result = run(runner, app, *bad_batch, *soft_steered.args, "--format", "jsonl", "--strict")
    assert result.exit_code == 1
    records = jsonl(result.stdout)
    assert [r["input"] for r in records] == [str(bad_batch[0]), str(bad_batch[1])]
    assert "error" in records[1]
    assert result.stderr.splitlines()[0].startswith(f"resnet: error: {bad_batch[1]}: cannot decode image")


# ---------------------------------------------------------------------------------------------
# Output


def test_output_order_is_input_order_whatever_batch_size_and_workers(runner, app, soft_steered, photos, tmp_path):
    big = tmp_path / "big-coffee.png"  # slow to decode, so a later small image is ready first
    coffee = rgb(photos["coffee"])
    coffee.resize((coffee.width * 4, coffee.height * 4)).save(big)
    inputs = [big, photos["cat"], tmp_path / "missing.jpg", photos["rocket"], photos["astronaut"], big, photos["cat"]]
    expected = [
        (str(path), None if "missing" in path.name else expected_class(photos[path.stem.split("-")[-1]]))
        for path in inputs
    ]
    for batch_size, workers in (("1", "1"), ("3", "4"), ("16", "2")):
        result = run(
            runner,
            app,
            *inputs,
            *soft_steered.args,
            "--format",
            "jsonl",
            "--batch-size",
            batch_size,
            "--workers",
            workers,
        )
        assert result.exit_code == 1
        records = jsonl(result.stdout)
        assert [(r["input"], top1(r) if "top" in r else None) for r in records] == expected


def test_records_stream_while_inputs_are_still_arriving(tmp_path, soft_steered, photos):
    """The real command, read line by line: the first record comes out while stdin is still open."""
    env = env_without_resnet(TORCH_HOME=str(tmp_path))
    env.pop("PYTHONUNBUFFERED", None)  # stdout block-buffered as usual: PYTHONUNBUFFERED would hide a missing flush
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "resnetcli",
            "predict",
            "-",
            *soft_steered.args,
            "--format",
            "jsonl",
            "--batch-size",
            "4",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env,
    )
    try:
        process.stdin.write(f"{photos['cat']}\n")
        process.stdin.flush()
        ready, _, _ = select.select([process.stdout], [], [], 60)
        assert ready, "no record within 60 s"
        first = json.loads(process.stdout.readline())
        assert process.poll() is None  # still running: it is waiting for more paths
        assert (first["input"], top1(first)) == (str(photos["cat"]), 281)
        rest = [photos["coffee"], photos["rocket"], photos["astronaut"]] * 4
        process.stdin.write("".join(f"{p}\n" for p in rest))
        process.stdin.close()
        records = [json.loads(line) for line in process.stdout]
        assert process.wait(timeout=60) == 0
        assert [r["input"] for r in records] == [str(p) for p in rest]
        assert [top1(r) for r in records] == [967, 812, 0] * 4
        assert process.stderr.read() == ""
    finally:
        process.kill()
        process.wait()


def test_ctrl_c_while_waiting_for_stdin_exits_130(tmp_path, soft_steered, photos):
    import signal

    process = subprocess.Popen(
        [sys.executable, "-m", "resnetcli", "predict", "-", *soft_steered.args, "--format", "jsonl"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        env=env_without_resnet(TORCH_HOME=str(tmp_path)),
    )
    try:
        process.stdin.write(f"{photos['cat']}\n")
        process.stdin.flush()
        ready, _, _ = select.select([process.stdout], [], [], 60)
        assert ready, "no record within 60 s"
        assert json.loads(process.stdout.readline())["input"] == str(photos["cat"])
        process.send_signal(signal.SIGINT)  # while a thread is blocked reading stdin
        assert process.wait(timeout=30) == 130
        assert process.stderr.read() == "resnet: interrupted\n"
    finally:
        process.kill()
        process.wait()


def test_top_and_threshold(runner, app, soft_steered, photos):
    # One image per forward pass, so that probabilities are bit-identical between runs (a batch of
    # 2 and two of 1 differ in the 9th decimal, enough to move a rounded 6th one now and then).
    args = [photos["cat"], photos["coffee"], *soft_steered.args, "--top", "4", "--format", "jsonl", "--batch-size", "1"]
    full = run(runner, app, *args)
    assert full.exit_code == 0
    records = jsonl(full.stdout)
    assert [len(r["top"]) for r in records] == [4, 4]
    assert [s["rank"] for s in records[0]["top"]] == [1, 2, 3, 4]
    cut = (records[0]["top"][1]["prob"] + records[0]["top"][2]["prob"]) / 2
    kept = run(runner, app, *args, "--threshold", str(cut))
    assert kept.exit_code == 0
    for before, after in zip(records, jsonl(kept.stdout)):
        assert after["top"] == [s for s in before["top"] if s["prob"] >= cut]
    assert len(jsonl(kept.stdout)[0]["top"]) == 2


def test_output_file_gets_the_records_and_stdout_stays_empty(runner, app, soft_steered, photos, tmp_path):
    target = tmp_path / "out.jsonl"
    result = run(runner, app, photos["cat"], photos["rocket"], *soft_steered.args, "--top", "2", "--output", target)
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""
    records = jsonl(target.read_text())
    assert [(r["input"], top1(r)) for r in records] == [(str(photos["cat"]), 281), (str(photos["rocket"]), 812)]

    table = tmp_path / "out.csv"  # the suffix chooses the format when --format is not given
    result = run(runner, app, photos["cat"], *soft_steered.args, "--top", "2", "-o", table)
    assert result.exit_code == 0 and result.stdout == ""
    rows = list(csv.DictReader(io.StringIO(table.read_text())))
    assert [(r["input"], r["rank"], r["index"]) for r in rows] == [
        (str(photos["cat"]), "1", str(records[0]["top"][0]["index"])),
        (str(photos["cat"]), "2", str(records[0]["top"][1]["index"])),
    ]


def test_progress_line_on_a_terminal_stderr_and_records_on_stdout(tmp_path, soft_steered, photos):
    """With stderr on a terminal and many inputs, a progress line appears there; stdout holds only records."""
    done = run_on_terminal(
        command(*[photos["cat"]] * 24, *soft_steered.args, "--format", "jsonl", "--top", "1"),
        env_without_resnet(TORCH_HOME=str(tmp_path), TERM="xterm", COLUMNS="100"),
        streams=("stderr",),
    )
    assert done.returncode == 0
    assert [(r["input"], top1(r)) for r in jsonl(done.stdout)] == [(str(photos["cat"]), 281)] * 24
    assert "24 inputs, 0 failed" in done.terminal.decode(errors="replace")


def test_no_progress_when_stderr_is_not_a_terminal(runner, app, soft_steered, photos):
    result = run(runner, app, *[photos["rocket"]] * 24, *soft_steered.args, "--format", "jsonl", "--top", "1")
    assert result.exit_code == 0
    assert result.stderr == ""
    assert len(jsonl(result.stdout)) == 24


# ---------------------------------------------------------------------------------------------
# Fine-tuned checkpoints


@pytest.fixture(scope="module")
def three_class_state_dict(sample_images) -> dict:
    """resnet18 fine-tuned as the transfer-learning recipe does (fc = nn.Linear(512, 3)), with its 3
    rows steered to the astronaut, cat and coffee photos."""
    import torch
    from torchvision import models

    torch.manual_seed(1)
    model = models.resnet18(weights=None)
    model.fc = torch.nn.Linear(512, 3)
    model.eval()
    trio = sample_images[:3]
    assert [p.stem for p in trio] == ["astronaut", "cat", "coffee"]
    steer_head(model, penultimate_features(model, trio, models.ResNet18_Weights.DEFAULT.transforms()), [0, 1, 2])
    return {k: v.clone() for k, v in model.state_dict().items()}


LABELS = ["spacewalker", "feline", "espresso"]


@pytest.mark.parametrize(
    "wrapping, labels_text",
    [
        ("bare", "\n".join(LABELS) + "\n"),
        ("state_dict+module", json.dumps(LABELS)),
        ("model", json.dumps({"2": "espresso", "0": "spacewalker", "1": "feline"})),
    ],
)
def test_three_class_checkpoint_with_labels(
    runner, app, three_class_state_dict, photos, tmp_path, wrapping, labels_text
):
    import torch

    state = three_class_state_dict
    if wrapping == "state_dict+module":
        # DataParallel's prefix, inside a training script's checkpoint dictionary.
        saved = {"epoch": 7, "state_dict": {f"module.{k}": v for k, v in state.items()}}
    elif wrapping == "model":
        saved = {"model": state, "optimizer": {"lr": torch.tensor(0.1)}}
    else:
        saved = state
    checkpoint = tmp_path / "finetuned.pth"
    torch.save(saved, checkpoint)
    labels = tmp_path / "classes.txt"
    labels.write_text(labels_text)
    result = run(
        runner,
        app,
        photos["astronaut"],
        photos["cat"],
        photos["coffee"],
        "--arch",
        "resnet18",
        "--weights",
        checkpoint,
        "--labels",
        labels,
        "--format",
        "jsonl",
    )
    assert result.exit_code == 0, result.stderr
    records = jsonl(result.stdout)
    assert [r["top"][0]["label"] for r in records] == LABELS
    assert [[s["index"] for s in r["top"]][0] for r in records] == [0, 1, 2]
    assert all(len(r["top"]) == 3 for r in records)  # --top 5, but the head has 3 classes


def test_three_class_checkpoint_without_labels_numbers_the_classes(
    runner, app, three_class_state_dict, photos, tmp_path
):
    import torch

    checkpoint = tmp_path / "finetuned.pth"
    torch.save(three_class_state_dict, checkpoint)
    result = run(
        runner, app, photos["coffee"], "--arch", "resnet18", "--weights", checkpoint, "--top", "1", "--format", "jsonl"
    )
    assert result.exit_code == 0
    assert jsonl(result.stdout)[0]["top"][0]["label"] == "class_2"


def test_labels_that_do_not_match_the_class_count_exit_2(runner, app, three_class_state_dict, photos, tmp_path):
    import torch

    checkpoint = tmp_path / "finetuned.pth"
    torch.save(three_class_state_dict, checkpoint)
    labels = tmp_path / "classes.txt"
    labels.write_text("a\nb\nc\nd\n")
    result = run(runner, app, photos["cat"], "--arch", "resnet18", "--weights", checkpoint, "--labels", labels)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert result.stderr == f"resnet: error: the labels name 4 classes but the model {checkpoint} predicts 3\n"


def test_checkpoint_that_does_not_fit_lists_keys_and_shapes_exit_3(
    runner, app, three_class_state_dict, photos, tmp_path
):
    import torch

    broken = dict(three_class_state_dict)
    del broken["layer4.1.bn2.running_var"]
    broken["projection.weight"] = torch.zeros(2, 2)
    broken["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    checkpoint = tmp_path / "broken.pth"
    torch.save(broken, checkpoint)
    result = run(runner, app, photos["cat"], "--arch", "resnet18", "--weights", checkpoint)
    assert result.exit_code == 3
    assert result.stdout == ""
    # issue 13: the same message as `summary` ("does not fit resnet18: ..."), no longer "the architecture"
    assert result.stderr == (
        f'resnet: error: {checkpoint}: does not fit resnet18: missing "layer4.1.bn2.running_var"; '
        'unexpected "projection.weight"; conv1.weight is [64, 3, 5, 5] where resnet18 has [64, 3, 7, 7]\n'
    )


# ---------------------------------------------------------------------------------------------
# Preprocessing


def test_input_size_and_resize_follow_the_weights_transforms(runner, app, soft_steered, photos):
    from torchvision import models

    images = [photos["cat"], photos["rocket"]]
    sized = run(
        runner,
        app,
        *images,
        *soft_steered.args,
        "--top",
        "3",
        "--input-size",
        "160",
        "--resize",
        "180",
        "--format",
        "jsonl",
    )
    assert sized.exit_code == 0, sized.stderr
    transforms = models.ResNet18_Weights.DEFAULT.transforms(crop_size=160, resize_size=180)
    for record, expected in zip(
        jsonl(sized.stdout), reference(soft_steered.model, [rgb(p) for p in images], transforms=transforms)
    ):
        assert_top_matches(record, expected)
    default = run(runner, app, *images, *soft_steered.args, "--format", "jsonl")
    assert jsonl(default.stdout)[0]["top"][0]["prob"] != pytest.approx(
        jsonl(sized.stdout)[0]["top"][0]["prob"], abs=1e-3
    )
    # Only --input-size: the resize keeps resnet18's ratio of 256 to 224.
    # One image per forward pass, so that probabilities are bit-identical between runs.
    scaled = run(
        runner, app, *images, *soft_steered.args, "--input-size", "160", "--format", "jsonl", "--batch-size", "1"
    )
    explicit = run(
        runner,
        app,
        *images,
        *soft_steered.args,
        "--input-size",
        "160",
        "--resize",
        str(round(160 * 256 / 224)),
        "--format",
        "jsonl",
        "--batch-size",
        "1",
    )
    assert jsonl(scaled.stdout) == jsonl(explicit.stdout)


def test_preprocess_chooses_another_weights_preprocessing(runner, app, photos, tmp_path):
    """resnet50's DEFAULT (V2) weights resize to 232, its V1 weights to 256."""
    import torch
    from torchvision import models

    torch.manual_seed(0)
    model = models.resnet50(weights=None).eval()
    checkpoint = tmp_path / "resnet50.pth"
    torch.save(model.state_dict(), checkpoint)
    args = [photos["cat"], "--arch", "resnet50", "--weights", checkpoint, "--top", "3", "--format", "jsonl"]
    v1 = run(runner, app, *args, "--preprocess", "IMAGENET1K_V1")
    default = run(runner, app, *args)
    assert v1.exit_code == default.exit_code == 0
    for result, weights in ((v1, "IMAGENET1K_V1"), (default, "IMAGENET1K_V2")):
        expected = reference(model, [rgb(photos["cat"])], transforms=models.ResNet50_Weights[weights].transforms())[0]
        assert_top_matches(jsonl(result.stdout)[0], expected)
    assert jsonl(v1.stdout)[0]["top"] != jsonl(default.stdout)[0]["top"]
    bad = run(runner, app, *args, "--preprocess", "IMAGENET1K_V9")
    assert bad.exit_code == 2
    assert (
        bad.stderr == "resnet: error: --preprocess IMAGENET1K_V9: not a weights name of resnet50; "
        "choose one of IMAGENET1K_V1, IMAGENET1K_V2, DEFAULT\n"
    )


# ---------------------------------------------------------------------------------------------
# Speed and scale


def test_devices(runner, app, soft_steered, photos):
    import torch

    for device in ("cpu", "auto"):
        result = run(runner, app, photos["cat"], *soft_steered.args, "--device", device, "--format", "jsonl")
        assert result.exit_code == 0, result.stderr
        assert top1(jsonl(result.stdout)[0]) == 281
    missing_gpu = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU there is
    result = run(runner, app, photos["cat"], *soft_steered.args, "--device", missing_gpu)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith(f"resnet: error: --device {missing_gpu}: not available (torch sees ")
    result = run(runner, app, photos["cat"], *soft_steered.args, "--device", "tpu")
    assert result.exit_code == 2
    assert result.stderr == "resnet: error: --device tpu: choose auto, cpu, cuda, cuda:N or mps\n"


def test_threads_sets_torch_threads(runner, app, soft_steered, photos):
    import torch

    before = torch.get_num_threads()
    try:
        result = run(runner, app, photos["cat"], *soft_steered.args, "--threads", "1", "--format", "jsonl")
        assert result.exit_code == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_shards_partition_the_inputs_exactly(runner, app, soft_steered, photo_tree, photos):
    inputs = [photo_tree, photos["cat"], photos["rocket"], photo_tree / "missing.jpg", photos["coffee"]]
    # One image per forward pass, so that probabilities are bit-identical between runs.
    common = [*soft_steered.args, "--format", "jsonl", "--top", "1", "--batch-size", "1"]
    everything = run(runner, app, *inputs, *common)
    all_records = jsonl(everything.stdout)
    assert len(all_records) == 8
    shards = []
    for index in (1, 2, 3):
        result = run(runner, app, *inputs, *common, "--shard", f"{index}/3")
        assert result.exit_code == (1 if any("error" in r for r in all_records[index - 1 :: 3]) else 0)
        shards.append(jsonl(result.stdout))
    # Shard I gets the inputs at positions I-1, I-1+N, ... of the expanded stream.
    assert shards == [all_records[0::3], all_records[1::3], all_records[2::3]]
    assert sorted(json.dumps(r) for shard in shards for r in shard) == sorted(json.dumps(r) for r in all_records)


@pytest.mark.parametrize("value", ["0/3", "4/3", "1/0", "two/3", "1-3"])
def test_shard_values_are_validated(runner, app, soft_steered, photos, value):
    result = run(runner, app, photos["cat"], *soft_steered.args, "--shard", value)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"resnet: error: --shard {value}: ")
