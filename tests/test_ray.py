"""`resnet predict --engine ray` and `resnetcli.ray.Classifier`: the local path's answers, on Ray.

The tests marked `ray` start Ray (2 CPUs, a small object store, no dashboard) and are deselected by
default; run them with `pytest -m ray`. Every Ray process they start carries a marker in its
environment, and is killed at the end of the test if it is still there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import REPO, STEERED_CLASSES, save_hub_style

TOLERANCE = 1e-3
#: Scales the steered head's logits down so that the top classes share the probability mass, as in
#: test_fastpath; a ramp of 1e-4 per class index on the bias (at most 0.1, against logit gaps of
#: several units between a photo's class and the next) then orders the classes whose head rows are
#: zero, so that rank 5 is no tie between exactly equal logits.
SOFTENING = 0.02
BIAS_RAMP = 1e-4
#: Ray on 2 busy cores: one Ray start, one model load per actor and a few dozen images take
#: 30-60 s here; generous bounds so that only a hang fails a test.
RUN_TIMEOUT = 400
OBJECT_STORE = 200 * 1024 * 1024


@pytest.fixture(scope="module")
def discriminating(steered_resnet18, tmp_path_factory) -> Path:
    """The steered resnet18, softened, with every class's logit distinct."""
    import torch

    state_dict = dict(steered_resnet18.state_dict)
    state_dict["fc.weight"] = state_dict["fc.weight"] * SOFTENING
    state_dict["fc.bias"] = state_dict["fc.bias"] * SOFTENING + torch.arange(1000, dtype=torch.float32) * BIAS_RAMP
    return save_hub_style(state_dict, tmp_path_factory.mktemp("ray_ckpt"), "resnet18-ray")


@pytest.fixture(scope="module")
def photo_folder(sample_images, tmp_path_factory) -> Path:
    """30 inputs: each photo as JPEG, PNG, greyscale, rotated, small and cropped, plus broken files."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("ray_photos")
    for path in sample_images:
        with Image.open(path) as image:
            image = image.convert("RGB")
            stem = path.stem
            image.save(folder / f"{stem}_0.jpg", quality=90)
            image.save(folder / f"{stem}_1.png")
            image.convert("L").save(folder / f"{stem}_2.jpg")
            image.rotate(90, expand=True).save(folder / f"{stem}_3.jpg")
            image.resize((120, 90)).save(folder / f"{stem}_4.webp")
            image.crop((0, 0, image.width * 3 // 4, image.height * 3 // 4)).save(folder / f"{stem}_5.jpg")
    truncated = (folder / "cat_0.jpg").read_bytes()
    (folder / "broken_truncated.jpg").write_bytes(truncated[: len(truncated) // 3])
    (folder / "broken_text.jpg").write_text("not an image\n")
    (folder / "broken_empty.png").write_bytes(b"")
    (folder / "broken_header.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (folder / "broken_garbage.gif").write_bytes(os.urandom(2000))
    (folder / "broken_zero.bmp").write_bytes(b"BM" + b"\0" * 10)
    return folder


def steered_class(input_name: str) -> int | None:
    """The class a photo's head row steers it to, for the copies with the photo's own pixels (JPEG, PNG)."""
    stem, _, variant = Path(input_name).stem.partition("_")
    return STEERED_CLASSES.get(f"{stem}.jpg") if variant in ("0", "1") else None


# ---------------------------------------------------------------------------------------------
# Running the CLI in a subprocess, and finding the Ray processes it left


def marked_processes(marker: str) -> list[int]:
    """Processes (of this user) whose environment holds RESNET_TEST_MARKER=marker."""
    needle = f"RESNET_TEST_MARKER={marker}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry))
    return found


def wait_for_no_processes(marker: str, within: float) -> list[str]:
    """The command lines of the marked processes still there after `within` seconds (workers exit on
    their own once their raylet is gone, which takes a while on a loaded machine)."""
    deadline = time.monotonic() + within
    while (left := marked_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    commands = []
    for pid in left:
        try:
            commands.append(f"{pid}: " + Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            pass  # exited meanwhile
    return commands


@pytest.fixture
def cli_env(tmp_path):
    """The environment of a CLI subprocess, with a marker every Ray process it starts inherits; at
    the end, whatever still carries the marker is killed (the test has already judged it)."""
    marker = uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESNET_")}
    env.update(
        RESNET_TEST_MARKER=marker,
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        OMP_NUM_THREADS="1",
        # A local instance takes this share of memory for its object store (Ray's own setting):
        # about 240 MB here instead of 30 %.
        RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION="0.01",
    )
    yield env
    for pid in marked_processes(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def resnet(*args: str, env: dict, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "resnetcli", *args],
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )


def records_of(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def assert_same_records(got: list[dict], expected: list[dict]) -> None:
    """Same inputs in the same order, same errors, same top-5 classes, probabilities within 1e-3."""
    assert [r["input"] for r in got] == [r["input"] for r in expected]
    for mine, theirs in zip(got, expected):
        if "error" in theirs:
            assert mine == theirs
            continue
        assert set(mine) == {"input", "arch", "weights", "top"}
        assert (mine["arch"], mine["weights"]) == (theirs["arch"], theirs["weights"])
        assert [(s["rank"], s["index"], s["label"]) for s in mine["top"]] == [
            (s["rank"], s["index"], s["label"]) for s in theirs["top"]
        ]
        assert [s["prob"] for s in mine["top"]] == pytest.approx([s["prob"] for s in theirs["top"]], abs=TOLERANCE)


# ---------------------------------------------------------------------------------------------
# The CLI


@pytest.mark.ray
def test_engine_ray_gives_the_local_records(discriminating, photo_folder, cli_env, runner, app):
    """A folder of 30 inputs (6 broken) and a missing file: the same records, in the same order, exit 1."""
    args = [
        "predict",
        str(photo_folder),
        str(photo_folder / "missing.jpg"),
        "-a",
        "resnet18",
        "-w",
        str(discriminating),
    ]
    local = runner.invoke(app, [*args, "-k", "5", "-f", "jsonl", "-b", "4"])
    assert local.exit_code == 1, local.stderr
    expected = records_of(local.stdout)
    assert len(expected) == 31 and sum("error" in r for r in expected) == 7

    result = resnet(*args, "-k", "5", "-f", "jsonl", "-b", "4", "--engine", "ray", "--actors", "2", env=cli_env)
    assert result.returncode == 1, result.stderr
    got = records_of(result.stdout)
    assert_same_records(got, expected)
    steered = [r for r in got if steered_class(r["input"]) is not None]
    assert len(steered) == 8
    assert all(r["top"][0]["index"] == steered_class(r["input"]) for r in steered)
    errors = [line for line in result.stderr.splitlines() if line.startswith("resnet: error: ")]
    assert errors == [f"resnet: error: {r['error']}" for r in expected if "error" in r]
    assert wait_for_no_processes(cli_env["RESNET_TEST_MARKER"], within=90) == []


@pytest.mark.ray
def test_output_dir_has_every_input_once_and_uri_prefixes(discriminating, photo_folder, cli_env, runner, app, tmp_path):
    """--output-dir: Ray's sharded *.jsonl files hold each input exactly once, as the records predict
    prints; a file:// prefix (read through pyarrow's filesystems) gives the same answers as the folder."""
    base = ["-a", "resnet18", "-w", str(discriminating), "-k", "3", "-b", "4"]
    local = runner.invoke(app, ["predict", str(photo_folder), *base, "-f", "jsonl"])
    expected = {r["input"]: r for r in records_of(local.stdout)}
    uri = photo_folder.as_uri() + "/"
    out = tmp_path / "out"
    result = resnet("predict", str(photo_folder), uri, *base, "--engine", "ray", "--output-dir", str(out), env=cli_env)
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    files = sorted(out.iterdir())
    assert files and all(path.suffix == ".jsonl" for path in files)
    written = [record for path in files for record in records_of(path.read_text())]
    names = [r["input"] for r in written]
    assert len(names) == len(set(names)) == 2 * len(expected)
    by_name = {r["input"]: r for r in written}
    assert_same_records([by_name[name] for name in expected], list(expected.values()))
    from_uri = [dict(by_name["file://" + name], input=name) for name in expected]
    for record, reference in zip(from_uri, expected.values()):
        if "error" in reference:
            # The same failure, named by its URI.
            assert record["error"].split(": ", 1)[1] == reference["error"].split(": ", 1)[1]
            record["error"] = reference["error"]
    assert_same_records(from_uri, list(expected.values()))
    failed = [line for line in result.stderr.splitlines() if line.startswith("resnet: error: ")]
    assert len(failed) == 2 * sum("error" in r for r in expected.values())

    again = resnet("predict", str(photo_folder), *base, "--engine", "ray", "--output-dir", str(out), env=cli_env)
    assert again.returncode == 2
    assert f"--output-dir {out}: must be a new or empty folder" in again.stderr


@pytest.mark.ray
def test_interrupt_exits_130_and_leaves_no_ray_processes(photo_folder, cli_env, tmp_path):
    """SIGINT while records stream: exit 130 within a bounded time, no process of the run left."""
    listing = "\n".join(str(p) for p in sorted(photo_folder.glob("*_*")) * 40) + "\n"
    process = subprocess.Popen(
        [sys.executable, "-m", "resnetcli", "predict", "-", "-a", "resnet18", "-w", "none", "-b", "2",
         "--engine", "ray", "--actors", "1", "-f", "jsonl"],
        env=cli_env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        process.stdin.write(listing)
        process.stdin.close()
        first = process.stdout.readline()  # blocks until the actors answer
        assert json.loads(first)["arch"] == "resnet18"
        assert marked_processes(cli_env["RESNET_TEST_MARKER"]), "Ray processes carry the marker"
        process.send_signal(signal.SIGINT)
        remaining_stdout = process.stdout.read()
        code = process.wait(timeout=60)
        stderr = process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)
    assert code == 130, stderr
    assert "resnet: interrupted" in stderr
    assert "Traceback" not in stderr
    assert len(records_of(first + remaining_stdout)) < listing.count("\n")
    assert wait_for_no_processes(cli_env["RESNET_TEST_MARKER"], within=90) == []


def test_engine_ray_without_ray_is_a_usage_error_naming_the_extra(sample_images, tmp_path):
    """In a subprocess whose imports of ray fail (a meta path finder), --engine ray exits 2 naming the extra."""
    blocker = (
        "import sys\n"
        "class BlockRay:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'ray' or name.startswith('ray.'):\n"
        "            raise ModuleNotFoundError(\"No module named 'ray'\", name=name)\n"
        "sys.meta_path.insert(0, BlockRay())\n"
        "from resnetcli.cli import main\n"
        "sys.argv[0] = 'resnet'\n"
        "main()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESNET_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    output = tmp_path / "out.jsonl"
    result = subprocess.run(
        [sys.executable, "-c", blocker, "predict", str(sample_images[0]), "-a", "resnet18", "-w", "none",
         "--engine", "ray", "-o", str(output)],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "resnet: error: --engine ray needs Ray Data: pip install 'resnetcli[ray]'"
    )
    assert result.stdout == "" and not output.exists()

    importer = blocker.replace("from resnetcli.cli import main", "import resnetcli.ray").replace("main()", "")
    plain = subprocess.run(
        [sys.executable, "-c", importer],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert plain.returncode == 1
    assert (
        "ImportError: resnetcli.ray needs Ray Data, which is not installed: pip install 'resnetcli[ray]'"
        in plain.stderr
    )


def test_ray_options_need_engine_ray(sample_images, runner, app):
    result = runner.invoke(app, ["predict", str(sample_images[0]), "-w", "none", "--actors", "2"])
    assert result.exit_code == 2
    assert "--address, --actors and --output-dir need --engine ray" in result.stderr


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (
            ["--runtime", "onnxruntime"],
            "--runtime onnxruntime is for the local engine; with --engine ray, give the ONNX model "
            "itself: --weights FILE.onnx (`resnet export` makes one)",
        ),
        (
            ["--mean", "0.5,0.5,0.5"],
            "--mean, --std and --interpolation are for the local engine; with --engine ray, give an "
            "ONNX model with resnetcli's metadata (`resnet export`)",
        ),
        (
            ["--interpolation", "bicubic"],
            "--mean, --std and --interpolation are for the local engine; with --engine ray, give an "
            "ONNX model with resnetcli's metadata (`resnet export`)",
        ),
    ],
)
def test_local_engine_options_with_engine_ray_are_refused_not_ignored(sample_images, runner, app, option, message):
    """The Ray engine runs an ONNX model given as --weights FILE.onnx, with its own metadata; the local
    engine's cached export and preprocessing options must not be quietly dropped (torch running instead)."""
    result = runner.invoke(app, ["predict", str(sample_images[0]), "-w", "none", "--engine", "ray", *option])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [f"resnet: error: {message}"]


# ---------------------------------------------------------------------------------------------
# The Python API


@pytest.fixture(scope="module")
def ray_instance():
    """A Ray instance in this process for the API tests: 2 CPUs, a small object store, no dashboard."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, object_store_memory=OBJECT_STORE, include_dashboard=False, logging_level="ERROR")
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.mark.ray
def test_classifier_in_a_user_pipeline(ray_instance, discriminating, photo_folder, runner, app):
    """from_items -> map_batches(Classifier, concurrency=2) -> a user's own column kept, the records of predict."""
    from resnetcli.ray import Classifier, record

    paths = sorted(str(p) for p in photo_folder.iterdir())
    local = runner.invoke(
        app, ["predict", *paths, "-a", "resnet18", "-w", str(discriminating), "-k", "5", "-f", "jsonl"]
    )
    expected = records_of(local.stdout)

    ray = ray_instance
    ray.data.DataContext.get_current().execution_options.preserve_order = True
    dataset = ray.data.from_items([{"path": path, "id": number} for number, path in enumerate(paths)])
    predictions = dataset.map_batches(
        Classifier,
        fn_constructor_kwargs={"arch": "resnet18", "weights": str(discriminating), "top": 5},
        concurrency=2,
        batch_size=8,
    )
    rows = predictions.take_all()
    assert [row["id"] for row in rows] == list(range(len(paths)))
    assert all(set(row) == {"id", "input", "arch", "weights", "top", "error"} for row in rows)
    assert_same_records([record(row) for row in rows], expected)
    assert sum(row["error"] is not None for row in rows) == 6


@pytest.mark.ray
def test_classifier_takes_bytes_and_pandas_batches(discriminating, photo_folder):
    """Called directly on a pandas batch of encoded bytes named by `path` (read_binary_files' columns):
    a bad image is an error row, the others are classified."""
    import pandas as pd

    from resnetcli.ray import Classifier, record

    classifier = Classifier("resnet18", str(discriminating), top=2)
    names = ["cat_0.jpg", "broken_text.jpg", "rocket_1.png"]
    batch = pd.DataFrame({"bytes": [(photo_folder / n).read_bytes() for n in names], "path": names})
    out = classifier(batch)
    records = [record({key: out[key][i] for key in out}) for i in range(len(names))]
    assert [r["input"] for r in records] == names
    assert records[1] == {"input": "broken_text.jpg", "error": "broken_text.jpg: not an image (unrecognised format)"}
    assert records[0]["top"][0]["index"] == STEERED_CLASSES["cat.jpg"]
    assert records[2]["top"][0]["index"] == STEERED_CLASSES["rocket.jpg"]
    assert [len(r["top"]) for r in (records[0], records[2])] == [2, 2]


@pytest.mark.ray
def test_address_runs_on_an_existing_cluster_and_reports_actor_errors(ray_instance, photo_folder, cli_env, tmp_path):
    """--address HOST:PORT joins the test's own Ray instance (left running afterwards). Actors that
    cannot get their weights (offline, not in their cache) are exit code 3 with resnetcli's one line."""
    address = ray_instance.get_runtime_context().gcs_address
    env = dict(cli_env, TORCH_HOME=str(tmp_path / "empty_cache"))
    result = resnet(
        "predict", str(photo_folder / "cat_0.jpg"), "-a", "resnet18", "--offline", "--engine", "ray",
        "--address", address, "--actors", "1", env=env,
    )  # fmt: skip
    assert result.returncode == 3, result.stderr
    assert result.stdout == ""
    lines = [line for line in result.stderr.splitlines() if line.startswith("resnet: ")]
    assert lines == [
        f"resnet: error: resnet18-f37072fd.pth is not in the weight cache {tmp_path / 'empty_cache'}/hub/checkpoints "
        "and downloads are off (offline mode); get it with `resnet fetch resnet18:IMAGENET1K_V1` where the network "
        "is reachable, or copy it in with `resnet fetch --from-file PATH resnet18:IMAGENET1K_V1`"
    ]
    assert "Traceback" not in result.stderr
    assert ray_instance.is_initialized() and ray_instance.cluster_resources().get("CPU") == 2


def test_engine_ray_refuses_an_input_as_output(sample_images, runner, app, tmp_path):
    """-o with --engine ray goes through the local path's RecordsOutput: an input named as the output
    is refused (exit 2) before anything is read, written or started, and the image is left as it was."""
    image = tmp_path / "photo.jpg"
    image.write_bytes(sample_images[0].read_bytes())
    before = image.read_bytes()
    result = runner.invoke(app, ["predict", str(image), "-w", "none", "--engine", "ray", "-o", str(image)])
    assert result.exit_code == 2, result.stderr
    assert f"--output {image} is the input {image}; choose another file" in result.stderr
    assert image.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.jpg"]

    both = runner.invoke(
        app,
        ["predict", str(image), "-w", "none", "--engine", "ray", "-o", str(tmp_path / "o.jsonl"),
         "--output-dir", str(tmp_path / "dir")],
    )  # fmt: skip
    assert both.exit_code == 2
    assert "--output and --output-dir: choose one" in both.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photo.jpg"]


@pytest.mark.ray
def test_output_file_on_an_existing_cluster_is_written_whole(
    ray_instance, discriminating, photo_folder, cli_env, runner, app, tmp_path
):
    """-o FILE with --engine ray: FILE replaced whole (no temporary file left), the same records as
    the local engine's -o, the failed inputs on stderr and exit 1."""
    names = ["cat_0.jpg", "broken_text.jpg", "rocket_1.png", "missing.jpg", "coffee_3.jpg"]
    args = ["predict", *(str(photo_folder / n) for n in names), "-a", "resnet18", "-w", str(discriminating), "-k", "5"]
    local_out, ray_out = tmp_path / "local.jsonl", tmp_path / "ray.jsonl"
    local = runner.invoke(app, [*args, "-o", str(local_out)])
    assert local.exit_code == 1, local.stderr
    ray_out.write_text("an older result\n")
    address = ray_instance.get_runtime_context().gcs_address
    result = resnet(
        *args, "-o", str(ray_out), "--engine", "ray", "--address", address, "--actors", "1", env=cli_env
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    expected = records_of(local_out.read_text())
    assert_same_records(records_of(ray_out.read_text()), expected)
    assert [r["input"] for r in expected if "error" in r] == [str(photo_folder / n) for n in names[1:4:2]]
    errors = [line for line in result.stderr.splitlines() if line.startswith("resnet: error: ")]
    assert errors == [f"resnet: error: {r['error']}" for r in expected if "error" in r]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local.jsonl", "ray.jsonl"]


@pytest.mark.ray
def test_classifier_runs_an_onnx_file_without_torch(discriminating, photo_folder, runner, app, tmp_path):
    """weights=FILE.onnx: the Classifier runs `resnet export`'s file on ONNX Runtime, never importing
    torch, and classifies as the torch engine does with the checkpoint it was exported from."""
    model = tmp_path / "steered.onnx"
    exported = runner.invoke(app, ["export", "resnet18", "--weights", str(discriminating), "-o", str(model)])
    assert exported.exit_code == 0, exported.stderr
    names = ["cat_0.jpg", "rocket_1.png", "broken_text.jpg", "astronaut_5.jpg", "coffee_0.jpg"]
    paths = [str(photo_folder / n) for n in names]
    local = runner.invoke(app, ["predict", *paths, "-a", "resnet18", "-w", str(discriminating), "-f", "jsonl"])
    expected = [dict(r, weights=str(model)) if "error" not in r else r for r in records_of(local.stdout)]
    code = (
        "import json, sys\n"
        "from resnetcli.ray import Classifier, record\n"
        f"classifier = Classifier(weights={str(model)!r}, top=5, threads=1)\n"
        f"out = classifier({{'path': {paths!r}}})\n"
        "rows = [record({key: out[key][i] for key in out}) for i in range(len(out['input']))]\n"
        "torch = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision'))\n"
        "print(json.dumps([rows, torch]))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("RESNET_")}
    env.update(PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rows, torch_modules = json.loads(result.stdout)
    assert torch_modules == []
    assert_same_records(rows, expected)
    assert rows[0]["top"][0]["index"] == STEERED_CLASSES["cat.jpg"]
    assert rows[2] == {"input": paths[2], "error": f"{paths[2]}: not an image (unrecognised format)"}
