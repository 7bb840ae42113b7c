"""summary and features of any model: a user's nn.Module (file or module spec), timm's zoo, an ONNX file.

The modules are real ones written here; expected counts are computed by hand (LeNet-5: 61,706) or by
the libraries themselves (sum(p.numel()) of the same module, timm's feature_info), never read back
from resnetcli.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import pytest
from conftest import REPO, env_without_resnet
from helpers import one_line_error, run_cli, run_json

NETS = textwrap.dedent(
    '''
    import torch
    from torch import nn


    class LeNet5(nn.Module):
        """LeCun et al. 1998: two 5x5 convolutions (6 and 16 channels), then 120, 84 and the classes."""

        def __init__(self, num_classes=10):
            super().__init__()
            self.features = nn.Sequential(
                nn.Conv2d(1, 6, 5), nn.Tanh(), nn.AvgPool2d(2), nn.Conv2d(6, 16, 5), nn.Tanh(), nn.AvgPool2d(2)
            )
            self.classifier = nn.Sequential(
                nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.Tanh(), nn.Linear(120, 84), nn.Tanh(),
                nn.Linear(84, num_classes),
            )

        def forward(self, x):
            return self.classifier(self.features(x))


    class TokenClassifier(nn.Module):
        """A small Transformer over token ids: embedding, 2 encoder layers, mean pooling, a linear head."""

        def __init__(self, vocab=1000, dim=64, classes=5):
            super().__init__()
            self.embed = nn.Embedding(vocab, dim)
            layer = nn.TransformerEncoderLayer(dim, nhead=4, dim_feedforward=128, batch_first=True)
            self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True)
            self.head = nn.Linear(dim, classes)

        def forward(self, tokens, mask=None):
            return self.head(self.encoder(self.embed(tokens), src_key_padding_mask=mask).mean(dim=1))


    class DictInput(nn.Module):
        """forward(batch) with batch["tokens"]: one dict argument."""

        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(50, 8)
            self.head = nn.Linear(8, 3)

        def forward(self, batch):
            return self.head(self.embed(batch["tokens"]).sum(dim=1))


    class NeedsRealNumbers(nn.Module):
        """Data-dependent code: .item() cannot run on the meta device."""

        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            return self.fc(x) * (1 + int(x.abs().sum().item() > 0))


    def small_cnn(width=8, classes=10):
        return nn.Sequential(
            nn.Conv2d(3, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes)
        )


    def not_a_model():
        return 42


    class NotAModule:
        pass


    lenet = LeNet5()
    number = 7
    '''
)


@pytest.fixture
def nets(tmp_path, monkeypatch):
    """nets.py in a fresh current directory (module specs resolve against it), and a file with a syntax error."""
    (tmp_path / "nets.py").write_text(NETS)
    (tmp_path / "broken.py").write_text("def oops(:\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path / "nets.py"


def load_nets(nets):
    import importlib.util

    spec = importlib.util.spec_from_file_location("nets_under_test", nets)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# Your own nn.Module


@pytest.mark.parametrize("spec", ["nets.py:LeNet5", "{path}:LeNet5", "nets:LeNet5", "nets:lenet"])
def test_lenet5_summary_exact(runner, app, nets, spec):
    document = run_json(
        runner,
        app,
        "summary",
        spec.format(path=nets),
        "--input-shape",
        "1,1,32,32",
        "--depth",
        "2",
        "--columns",
        "depth,layer,output_shape,params",
    )
    # conv 1*6*25+6, conv 6*16*25+16, 400*120+120, 120*84+84, 84*10+10
    assert document["totals"]["total_params"] == 156 + 2416 + 48120 + 10164 + 850 == 61706
    assert document["build"] == "meta"
    assert document["inputs"] == [{"name": "input", "shape": [1, 1, 32, 32], "dtype": "float32"}]
    shapes = {row["layer"]: row["output_shape"] for row in document["layers"] if row["depth"] == 2}
    assert shapes == {
        "features.0": [1, 6, 28, 28],
        "features.1": [1, 6, 28, 28],
        "features.2": [1, 6, 14, 14],
        "features.3": [1, 16, 10, 10],
        "features.4": [1, 16, 10, 10],
        "features.5": [1, 16, 5, 5],
        "classifier.0": [1, 400],
        "classifier.1": [1, 120],
        "classifier.2": [1, 120],
        "classifier.3": [1, 84],
        "classifier.4": [1, 84],
        "classifier.5": [1, 10],
    }
    params = {row["layer"]: row["params"] for row in document["layers"]}
    assert [params[f"classifier.{i}"] for i in (1, 3, 5)] == [48120, 10164, 850]
    # 6*28*28*25 + 16*10*10*150 + 400*120 + 120*84 + 84*10 multiply-adds
    assert document["totals"]["gflops"] == pytest.approx((117600 + 240000 + 48000 + 10080 + 840) / 1e9, rel=1e-6)


def test_lenet5_wrong_size_names_the_smallest_that_works(runner, app, nets):
    result = run_cli(runner, app, "summary", "nets.py:LeNet5", "--input-shape", "1,1,28,28")
    assert result.exit_code == 2
    line = one_line_error(result)
    assert "nets.py:LeNet5 cannot run on input 1x1x28x28" in line
    assert line.endswith("the smallest size that works is 32 (input 1x1x32x32)")
    assert run_cli(runner, app, "summary", "nets.py:LeNet5", "--input-shape", "1,1,31,31").exit_code == 2
    assert run_cli(runner, app, "summary", "nets.py:LeNet5", "--input-shape", "1,1,32,32", "-f", "json").exit_code == 0


def test_lenet5_features_and_an_instance(runner, app, nets):
    maps = run_json(runner, app, "features", "nets:lenet", "--input-shape", "1,1,32,32")
    assert [(m["node"], m["shape"], m["channels"]) for m in maps][-1] == ("features.5", [1, 16, 5, 5], 16)


def test_token_transformer_classifier_with_named_inputs(runner, app, nets):
    model = load_nets(nets).TokenClassifier()
    document = run_json(
        runner,
        app,
        "summary",
        "nets.py:TokenClassifier",
        "--input",
        "tokens=2,16:long",
        "--input",
        "mask=2,16:bool",
        "--depth",
        "2",
    )
    assert document["build"] == "meta"
    assert document["totals"]["total_params"] == sum(p.numel() for p in model.parameters())
    assert document["inputs"] == [
        {"name": "tokens", "shape": [2, 16], "dtype": "long"},
        {"name": "mask", "shape": [2, 16], "dtype": "bool"},
    ]
    shapes = {row["layer"]: row["output_shape"] for row in document["layers"]}
    assert shapes["nets.py:TokenClassifier"] == [2, 5]
    assert shapes["embed"] == [2, 16, 64] and shapes["encoder"] == [2, 16, 64]
    # attention's matrix products are counted: more than the linear layers alone
    linear = 2 * 16 * (2 * (64 * 3 * 64 + 64 * 64 + 64 * 128 + 128 * 64)) + 2 * 64 * 5
    assert document["totals"]["gflops"] * 1e9 > linear


def test_dict_input_and_sequence_too_short(runner, app, nets):
    document = run_json(runner, app, "summary", "nets:DictInput", "--input", "tokens=1,7:long")
    assert document["totals"]["total_params"] == 50 * 8 + 8 * 3 + 3
    assert document["layers"][0]["output_shape"] == [1, 3]


def test_meta_failure_falls_back_to_cpu_with_a_note(runner, app, nets):
    result = run_cli(runner, app, "summary", "nets.py:NeedsRealNumbers", "--input-shape", "3,4", "--format", "json")
    assert result.exit_code == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["build"] == "cpu"
    assert document["totals"]["total_params"] == 4 * 2 + 2
    assert document["layers"][0]["output_shape"] == [3, 2]
    notes = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(notes) == 1
    assert notes[0].startswith("resnet: note: nets.py:NeedsRealNumbers cannot run on the meta device (")
    assert notes[0].endswith("); built on the CPU instead") and "item()" in notes[0]


@pytest.mark.parametrize(
    "kwargs, expected", [('{"width": 12}', 3 * 12 * 9 + 12 + 12 * 10 + 10), ('{"classes": 2}', 224 + 18)]
)
def test_factory_with_kwargs(runner, app, nets, kwargs, expected):
    document = run_json(runner, app, "summary", "nets:small_cnn", "--kwargs", kwargs, "--input-shape", "1,3,16,16")
    assert document["totals"]["total_params"] == expected
    module = load_nets(nets).small_cnn(**json.loads(kwargs))
    assert expected == sum(p.numel() for p in module.parameters())


def test_class_with_kwargs(runner, app, nets):
    document = run_json(
        runner, app, "summary", "nets.py:LeNet5", "--kwargs", '{"num_classes": 3}', "--input-shape", "1,1,32,32"
    )
    assert document["totals"]["total_params"] == 61706 - 850 + 84 * 3 + 3
    assert document["layers"][0]["output_shape"] == [1, 3]


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.py:Net"], "model spec missing.py:Net: no such file missing.py"),
        (["broken.py:oops"], "model spec broken.py:oops: cannot import broken.py: SyntaxError: "),
        (
            ["no_such_package.models:Net"],
            "cannot import no_such_package.models: ModuleNotFoundError: No module named 'no_such_package'",
        ),
        (["nets.py:Missing"], "has no attribute 'Missing'"),
        (["nets:number"], "model spec nets:number: number is a int, not an nn.Module, a class or a function"),
        (["nets:NotAModule"], "NotAModule is the class NotAModule, not an nn.Module"),
        (["nets:not_a_model"], "not_a_model returned a int, not an nn.Module"),
        (["nets:LeNet5", "--kwargs", '{"width": 3}'], "cannot build it: TypeError: "),
        (["nets:LeNet5", "--kwargs", "[1, 2]"], "--kwargs [1, 2]: expected a JSON object"),
        (["nets:LeNet5", "--kwargs", "{width"], "--kwargs {width: not JSON"),
        (
            ["nets:lenet", "--kwargs", '{"num_classes": 3}'],
            "lenet is a model instance; --kwargs needs a class or function",
        ),
        (["nets:LeNet5"], "nets:LeNet5: give an example input: --input-shape N,C,H,W"),
        (["nets:LeNet5", "--input", "x=1,2:complex7"], "unknown dtype 'complex7'"),
        (["nets:LeNet5", "--input", "1,2"], "--input 1,2: expected NAME=SHAPE[:DTYPE]"),
        (["nets:LeNet5", "--input-shape", "1,a"], "--input-shape 1,a: expected a shape"),
    ],
)
def test_bad_specs_are_one_line_usage_errors(runner, app, nets, args, message):
    args = [*args, "--input-shape", "1,1,32,32"] if len(args) > 1 and "--kwargs" in args else args
    result = run_cli(runner, app, "summary", *args)
    assert result.exit_code == 2, result.stderr
    assert message in one_line_error(result)


# ---------------------------------------------------------------------------------------------
# timm

TIMM_MODELS = [
    "resnet50d.ra2_in1k",
    "convnext_tiny",
    "swin_tiny_patch4_window7_224",
    "vit_small_patch16_224",
    "efficientnet_b0",
    "regnety_002",
]


@pytest.fixture
def timm():
    return pytest.importorskip("timm", reason="timm is not installed (pip install 'resnetcli[timm]')")


@pytest.mark.parametrize("name", TIMM_MODELS)
def test_timm_params_and_stages(runner, app, timm, name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("RESNET_OFFLINE", "1")
    reference = timm.create_model(name, pretrained=False)
    document = run_json(runner, app, "summary", f"timm:{name}", "--depth", "1")
    assert document["totals"]["total_params"] == sum(p.numel() for p in reference.parameters())
    _, height, width = reference.pretrained_cfg["input_size"]
    assert document["input_size"] == [1, 3, height, width]
    assert document["build"] == "meta"
    maps = run_json(runner, app, "features", f"timm:{name}")
    info = reference.feature_info
    assert [(m["node"], m["channels"], m["stride"]) for m in maps] == [
        (i["module"], i["num_chs"], i["reduction"]) for i in info
    ]
    axis = {"NCHW": 1, "NHWC": 3, "NLC": 2}
    assert all(m["shape"][axis[m["layout"]]] == m["channels"] for m in maps), maps
    assert not (tmp_path / "hf").exists()  # nothing downloaded


def test_timm_list_and_unknown_name(runner, app, timm):
    rows = run_json(runner, app, "list", "timm:convnext_t*")
    expected = {tuple(name.split(".", 1)) for name in timm.list_pretrained("convnext_t*")}
    assert {(r["arch"].removeprefix("timm:"), r["weights"]) for r in rows if r["weights"]} == expected
    assert {r["arch"] for r in rows} == {f"timm:{n}" for n in timm.list_models("convnext_t*")}
    defaults = {r["arch"]: r["weights"] for r in rows if r["default"]}
    assert defaults["timm:convnext_tiny"] == timm.create_model("convnext_tiny").pretrained_cfg["tag"]
    unknown = run_cli(runner, app, "summary", "timm:convnxt_tiny")
    assert unknown.exit_code == 2
    assert "timm has no model 'convnxt_tiny'; did you mean 'convnext_tiny'" in one_line_error(unknown)


# ---------------------------------------------------------------------------------------------
# ONNX


@pytest.fixture
def lenet_onnx(nets, tmp_path):
    """LeNet-5 exported by torch's TorchScript exporter (enough for a tiny model), with resnetcli metadata."""
    import onnx
    import torch

    model = load_nets(nets).LeNet5().eval()
    path = tmp_path / "lenet.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter says it is legacy
        torch.onnx.export(
            model,
            (torch.zeros(1, 1, 32, 32),),
            str(path),
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )
    proto = onnx.load(str(path))
    onnx.helper.set_model_props(
        proto, {"resnetcli.arch": "lenet5", "resnetcli.classes": json.dumps(list("0123456789"))}
    )
    onnx.save(proto, str(path))
    return path


def test_onnx_summary(runner, app, lenet_onnx):
    document = run_json(runner, app, "summary", lenet_onnx)
    assert document["inputs"] == [{"name": "image", "shape": ["batch", 1, 32, 32], "dtype": "float", "kind": "input"}]
    assert document["outputs"] == [{"name": "logits", "shape": ["batch", 10], "dtype": "float", "kind": "output"}]
    operators = {row["op_type"]: row["count"] for row in document["operators"]}
    assert (
        operators["Conv"] == 2 and operators["Gemm"] == 3 and operators["Tanh"] == 4 and operators["AveragePool"] == 2
    )
    assert document["totals"]["total_params"] == 61706
    assert document["totals"]["params_size_mb"] == round(61706 * 4 / 1e6, 2)
    assert document["metadata"] == {"resnetcli.arch": "lenet5", "resnetcli.classes": json.dumps(list("0123456789"))}
    table = runner.invoke(app, ["summary", str(lenet_onnx), "--format", "table"], env={"COLUMNS": "80"})
    assert table.exit_code == 0 and "61,706" in table.stdout and "resnetcli.arch" in table.stdout


def test_onnx_summary_never_imports_torch(lenet_onnx):
    code = (
        "import sys\nfrom resnetcli.cli import app\ntry:\n    app(prog_name='resnet')\nexcept SystemExit:\n    pass\n"
        "print('torch imported' if 'torch' in sys.modules else 'torch not imported', file=sys.stderr)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, "summary", str(lenet_onnx), "--format", "json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env_without_resnet(),
        timeout=120,
        check=True,
    )
    assert json.loads(done.stdout)["totals"]["total_params"] == 61706
    assert done.stderr.strip().splitlines()[-1] == "torch not imported"


def test_not_an_onnx_file(runner, app, tmp_path):
    fake = tmp_path / "model.onnx"
    fake.write_bytes(b"\xff\xfe not protobuf at all")
    result = run_cli(runner, app, "summary", fake)
    assert result.exit_code == 2
    assert f"{fake}: not an ONNX model" in one_line_error(result)
