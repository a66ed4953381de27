"""Your own network (`--arch FILE.py:NAME`, `--arch package.module:NAME`): built from your file at every stage,
recorded with its sha256, said where it changed or is gone, and never needed by the exported files."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cnnpack import user_model
from cnnpack.cli import app
from cnnpack.errors import UserInputError
from cnnpack.models import build_model, check_arch, check_input_size
from cnnpack.pipeline import Stages
from cnnpack.pipeline_config import PipelineConfig
from cnnpack.pipeline_rundir import default_run_dir
from cnnpack.spec import ModelSpec
from cnnpack.triton_repo import default_name

# the ancestor tutorial's CNN.py, as a user has it: the number of classes a constructor argument
TUTORIAL = """\
import torch
from torch import nn
import torch.nn.functional as F


class CNN(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.gap = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16 * 2 * 2, num_classes)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        return self.fc(torch.flatten(self.gap(x), 1))
"""
# a factory without num_classes, its blocks in a file beside it
FACTORY = """\
from torch import nn
from blocks import stem


def make():
    return nn.Sequential(stem(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 4))
"""
BLOCKS = "from torch import nn\n\n\ndef stem():\n    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())\n"


def _spec(arch: str, k: int = 6, size: int = 32) -> ModelSpec:
    return ModelSpec(**user_model.spec_fields(arch), num_classes=k, classes=tuple(f"c{i}" for i in range(k)),
                     image_size=size)


@pytest.fixture()
def code(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "proj"
    folder.mkdir()
    (folder / "CNN.py").write_text(TUTORIAL)
    (folder / "nets.py").write_text(FACTORY)
    (folder / "blocks.py").write_text(BLOCKS)
    monkeypatch.chdir(folder)
    return folder


def test_a_file_class_is_built_with_the_run_s_classes_and_recorded_absolute(code, tmp_path, monkeypatch):
    spec = _spec("CNN.py:CNN", k=6)
    assert spec.arch == f"{code / 'CNN.py'}:CNN"  # absolute: the later stages run from any folder
    assert spec.arch_source == {"path": str(code / "CNN.py"),
                                "sha256": user_model.source_record("CNN.py:CNN")["sha256"]}
    monkeypatch.chdir(tmp_path)  # rebuilt from elsewhere, as evaluate and export do from the record
    model = build_model(ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))))
    check_input_size(model, spec)
    assert type(model).__name__ == "CNN" and model.fc.out_features == 6
    # a built-in model's spec records what it always did (no arch_source key: its fingerprints do not move)
    assert "arch_source" not in ModelSpec(arch="cnn", num_classes=2, classes=("a", "b"), image_size=32).to_dict()


def test_a_factory_without_num_classes_imports_its_neighbours_and_its_output_is_checked(code):
    model = build_model(_spec("nets.py:make", k=4))
    check_input_size(model, _spec("nets.py:make", k=4))
    with pytest.raises(UserInputError, match=r"cannot classify 32px RGB images into 6 classes \(its forward gives "
                                             r"\(2, 4\).*give it a num_classes argument"):
        check_input_size(build_model(_spec("nets.py:make", k=6)), _spec("nets.py:make", k=6))


def test_a_module_path_names_an_importable_model():
    model = build_model(_spec("torchvision.models:resnet18", k=3, size=64))
    assert model.fc.out_features == 3
    assert user_model.recorded("torchvision.models:resnet18") == "torchvision.models:resnet18"


@pytest.mark.parametrize(("arch", "files", "said"), [
    ("gone.py:CNN", {}, r"--arch gone.py:CNN: gone.py is not a file \(not found\)"),
    ("CNN.py:Net", {}, r"has no Net \(its nn.Module classes: CNN\)"),
    ("CNN.py:torch", {}, r"torch is a module, not a class or function that returns an nn.Module"),
    ("bad.py:CNN", {"bad.py": "def CNN(:\n"}, r"bad.py is not valid Python \(.*line 1\)"),
    ("boom.py:CNN", {"boom.py": "import no_such_package_here\n"},
     r"importing .*boom.py failed \(ModuleNotFoundError: No module named 'no_such_package_here'\)"),
    ("num.py:make", {"num.py": "def make(num_classes):\n    return num_classes\n"},
     r"make\(num_classes=6\) gave a int, not an nn.Module"),
    ("init.py:Net", {"init.py": "from torch import nn\nclass Net(nn.Module):\n    def __init__(self, num_classes):\n"
                                "        raise ValueError('no GPU here')\n"},
     r"Net\(num_classes=6\) failed \(ValueError: no GPU here\)"),
    ("empty.py:Net", {"empty.py": "from torch import nn\nclass Net(nn.Module):\n    def forward(self, x):\n"
                                  "        return x\n"}, r"Net\(\) has no parameters"),
    ("CNN.py:", {}, r"your own model is named FILE.py:NAME or package.module:NAME"),
    ("a b:CNN", {}, r"'a b' is neither a .py file nor a module path"),
    ("no_such_package_here.sub:Net", {}, r"cannot import no_such_package_here.sub"),
])
def test_each_bad_model_of_your_own_is_one_line_saying_what_is_wrong(code, arch, files, said):
    for name, text in files.items():
        (code / name).write_text(text)
    with pytest.raises(UserInputError, match=said) as caught:
        check_arch(arch)
        build_model(_spec(arch))
    assert "\n" not in str(caught.value)


def test_a_changed_file_is_said_once_and_the_pipeline_trains_again(code, tiny_data, caplog):
    spec = _spec("CNN.py:CNN")
    cfg = PipelineConfig(data=str(tiny_data), arch="CNN.py:CNN", image_size=32, epochs=1)
    stages = Stages(cfg, progress=False, say=lambda _: None)
    before = stages.train_inputs(None)
    (code / "CNN.py").write_text(TUTORIAL + "\n# wider later\n")
    with caplog.at_level(logging.WARNING):
        build_model(spec)
        build_model(spec)
    said = [r.getMessage() for r in caplog.records if "changed since the run recorded its model" in r.getMessage()]
    assert len(said) == 1 and str(code / "CNN.py") in said[0]
    assert stages.train_inputs(None) != before  # the pipeline's train stage runs again
    # a built-in model's train fingerprint has no such key (finished runs are not trained again after the update)
    builtin = Stages(PipelineConfig(data=str(tiny_data), image_size=32, epochs=1), progress=False, say=print)
    assert "arch_source" not in builtin.train_inputs(None)


def test_names_leave_out_the_folders_and_a_run_of_the_built_in_cnn_is_not_reused(code, tiny_run):
    arch = user_model.recorded("CNN.py:CNN")
    assert default_name(arch, "onnx") == "cnn_onnx" and user_model.display(arch) == "CNN.py:CNN"
    assert default_name("resnet18", "onnx") == "resnet18_onnx"
    cfg = PipelineConfig(data="shapes", arch="CNN.py:CNN", image_size=32)
    first = default_run_dir(cfg)
    assert first == Path("runs/pipeline-shapes-cnn-32px")
    shutil.copytree(tiny_run, first)  # the built-in cnn's run of other data... and of this data:
    manifest = json.loads((first / "cnnpack.json").read_text())
    manifest["stages"]["train"]["config"]["data"] = "shapes"
    (first / "cnnpack.json").write_text(json.dumps(manifest))
    assert default_run_dir(cfg) == Path("runs/pipeline-shapes-cnn-32px-2")  # not the built-in cnn's folder
    assert default_run_dir(PipelineConfig(data="shapes", image_size=32)) == first


def test_trained_exported_verified_and_evaluated_from_elsewhere_without_the_file(code, tiny_data, tmp_path,
                                                                                   monkeypatch):
    run = code / "runs" / "mine"
    cli = CliRunner()
    out = cli.invoke(app, ["train", "--data", str(tiny_data), "--arch", "CNN.py:CNN", "--image-size", "32",
                           "--epochs", "1", "--run", str(run), "--no-progress"])
    assert out.exit_code == 0, out.output
    manifest = json.loads((run / "cnnpack.json").read_text())
    assert manifest["model"]["arch"] == f"{code / 'CNN.py'}:CNN"
    assert manifest["stages"]["train"]["config"]["arch"] == manifest["model"]["arch"]
    monkeypatch.chdir(tmp_path)
    for args in (["export", "--run", str(run), "--format", "onnx"], ["verify", "--run", str(run)],
                 ["evaluate", "--run", str(run)]):
        out = cli.invoke(app, args)
        assert out.exit_code == 0, (args, out.output)
    import onnx

    meta = {p.key: p.value for p in onnx.load(run / "export" / "model.onnx").metadata_props}
    assert meta["arch"] == "CNN.py:CNN"  # no folder of this machine inside the artifact
    os.replace(code / "CNN.py", code / "CNN.moved")
    out = cli.invoke(app, ["evaluate", "--run", str(run)])
    assert out.exit_code == 2 and "put it back, or use the run's exported files" in out.stderr
    out = cli.invoke(app, ["evaluate", "--run", str(run), "--format", "onnx"])  # the artifact needs no file
    assert out.exit_code == 0, out.output
    assert json.loads((run / "eval-onnx.json").read_text())["images"] > 0
