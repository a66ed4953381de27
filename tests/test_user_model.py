"""Your own network (`--arch FILE.py:NAME`, `--arch package.module:NAME`): built from your file at every stage,
recorded with its sha256, said where it changed or is gone, and never needed by the exported files."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
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
    for name in ("blocks",):  # (another test's folder's, imported by name)
        monkeypatch.delitem(sys.modules, name, raising=False)
    return folder


def test_a_file_class_is_built_with_the_run_s_classes_and_recorded_absolute(code, tmp_path, monkeypatch):
    spec = _spec("CNN.py:CNN", k=6)
    assert spec.arch == f"{code / 'CNN.py'}:CNN"  # absolute: the later stages run from any folder
    assert spec.arch_source == {"path": str(code / "CNN.py"), "imports": [],
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
     r"make\(num_classes=6\) gave an int, not an nn.Module"),
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
    out = cli.invoke(app, ["triton", "--run", str(run), "--repository", str(tmp_path / "repo")])
    assert out.exit_code == 0, out.output  # the model by its file's name: the same model from another checkout
    side = json.loads((tmp_path / "repo" / "cnn_onnx" / "cnnpack-model.json").read_text())
    assert side["identity"]["arch"] == "CNN.py:CNN"
    os.replace(code / "CNN.py", code / "CNN.moved")
    out = cli.invoke(app, ["evaluate", "--run", str(run)])
    assert out.exit_code == 2 and "put it back, or use the run's exported files" in out.stderr
    out = cli.invoke(app, ["evaluate", "--run", str(run), "--format", "onnx"])  # the artifact needs no file
    assert out.exit_code == 0, out.output
    assert json.loads((run / "eval-onnx.json").read_text())["images"] > 0
    # bench too: what the artifacts run, with the model's FLOPs export counted; eager and compiled said skipped
    arts = json.loads((run / "cnnpack.json").read_text())["stages"]["export"]["artifacts"]
    assert arts["onnx"]["flops_per_image"] > 0
    out = cli.invoke(app, ["bench", "--run", str(run), "--batch-sizes", "2", "--max-seconds", "0.1", "--no-plot"])
    assert out.exit_code == 0, out.output
    section = json.loads((run / "cnnpack.json").read_text())["stages"]["bench"]
    assert {r["runtime"] for r in section["results"]} == {"onnxruntime"}
    assert section["model_gflops_per_image"] == arts["onnx"]["flops_per_image"] / 1e9
    assert "CNN.py is not a file (not found): the eager model is built" in section["skipped"]["eager"]
    assert section["skipped"]["compiled"] == section["skipped"]["eager"]
    out = cli.invoke(app, ["bench", "--run", str(run), "--runtimes", "eager", "--max-seconds", "0.1"])
    assert out.exit_code == 2 and "put it back" in out.stderr  # asked for by name: refused, one line


# the kinds of code a user's CNN.py holds, from a review of this feature
VIEW = """\
import torch.nn as nn
import torch.nn.functional as F


class CNN(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 8 * 8, num_classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv(x)), 4)
        return self.fc(x.view(x.size(0), -1))  # the tutorials' flatten: NCHW only
"""
LAZY = """\
from torch import nn


def build(num_classes):
    from blocks import stem  # imported when called, not at import

    return nn.Sequential(stem(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))
"""
ODD = """\
import argparse
from torch import nn

Net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


class PosOnly(nn.Module):
    def __init__(self, num_classes, /):
        super().__init__()
        self.fc = nn.Linear(3, num_classes)

    def forward(self, x):
        return self.fc(x.mean((2, 3)))


class PerImage(nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        self.fc = nn.Linear(3, num_classes)

    def forward(self, x):  # one image at a time: the exported graph would fix the batch
        import torch

        return torch.cat([self.fc(x[i:i + 1].mean((2, 3))) for i in range(x.size(0))])
"""


def test_a_view_flatten_trains_without_channels_last_and_says_so(code, tiny_data, caplog):
    """`x.view(x.size(0), -1)` after a convolution fails on channels-last tensors, which training uses by default:
    it stopped every training with a traceback."""
    from cnnpack.train import TrainConfig, train

    (code / "view.py").write_text(VIEW)
    with caplog.at_level(logging.WARNING):
        done = train(code / "r", TrainConfig(data=str(tiny_data), arch="view.py:CNN", image_size=32, epochs=1,
                                             batch_size=32), progress=False)
    assert done["status"] == "ok"
    assert any("cannot run on channels-last tensors" in r.getMessage() and "torch.flatten(x, 1)" in r.getMessage()
               for r in caplog.records)
    with pytest.raises(UserInputError, match=r"--channels-last: --arch .*view.py:CNN cannot run on channels-last"):
        train(code / "r2", TrainConfig(data=str(tiny_data), arch="view.py:CNN", image_size=32, epochs=1,
                                       channels_last=True), progress=False)
    assert not (code / "r2").exists()


def test_odd_but_real_files_build_or_say_why(code):
    (code / "lazy.py").write_text(LAZY)
    (code / "odd.py").write_text(ODD)
    (code / "exits.py").write_text("import sys\nsys.exit(3)\n")
    assert build_model(_spec("lazy.py:build", k=5)) is not None  # its neighbour imported when called
    assert build_model(_spec("odd.py:PosOnly", k=5)).fc.out_features == 5  # num_classes positional-only
    with pytest.raises(UserInputError, match=r"Net is a model \(a Sequential object\), not its class"):
        build_model(_spec("odd.py:Net"))
    with pytest.raises(UserInputError, match=r"importing .*exits.py exited \(SystemExit 3\).*if __name__ =="):
        build_model(_spec("exits.py:Net"))
    with pytest.raises(UserInputError, match=r"--arch CNN.py: name the model in it too: --arch CNN.py:NAME"):
        check_arch("CNN.py")


def test_an_edit_of_a_file_it_imports_is_an_edit_of_the_model(code):
    before = user_model.source_record("nets.py:make")
    assert before["imports"] == ["blocks.py"]
    (code / "blocks.py").write_text(BLOCKS.replace("nn.ReLU()", "nn.Tanh()"))
    assert user_model.source_record("nets.py:make")["sha256"] != before["sha256"]
    # read from the code, not from what the process imported: inside a function too, and the same in every process
    (code / "lazy.py").write_text(LAZY)
    build_model(_spec("nets.py:make", k=4))  # (blocks imported by now: no matter)
    assert user_model.source_record("lazy.py:build")["imports"] == ["blocks.py"]
    assert user_model.source_record("CNN.py:CNN")["imports"] == []  # torch's files are not of this folder


def test_a_module_of_the_current_folder_is_recorded_by_its_file(code, monkeypatch):
    monkeypatch.syspath_prepend(str(code))  # as `python -m cnnpack` has it
    assert user_model.recorded("CNN:CNN") == f"{code / 'CNN.py'}:CNN"
    assert user_model.source_record("CNN:CNN") == user_model.source_record("CNN.py:CNN")


def test_an_export_whose_graph_fixed_the_batch_is_refused(code, tmp_path):
    (code / "odd.py").write_text(ODD)
    out = CliRunner().invoke(app, ["export", "--arch", "odd.py:PerImage", "--classes", "a,b,c", "--image-size", "16",
                                   "--format", "onnx", "--run", str(tmp_path / "r")])
    assert out.exit_code == 1 and "fixed the batch at 2" in out.stderr, out.output


def test_another_arch_under_this_run_s_model_name_is_refused_before_training(code, tmp_path, monkeypatch):
    from cnnpack.pipeline_rundir import check_foreign_models

    folder = tmp_path / "repo" / "cnn_onnx"  # the built-in cnn's, laid out by another run
    folder.mkdir(parents=True)
    (folder / "cnnpack-model.json").write_text(json.dumps({"identity": {"kind": "classifier", "arch": "cnn"}}))
    (folder / "config.pbtxt").write_text('name: "cnn_onnx"\n')
    (folder / "1").mkdir()
    cfg = PipelineConfig(arch="CNN.py:CNN", repository=str(tmp_path / "repo"))
    with pytest.raises(UserInputError, match=r"holds another run's model of another arch \(cnn, this run's: "
                                             r"CNN.py:CNN\).*a repository of its own"):
        check_foreign_models(cfg)
    check_foreign_models(PipelineConfig(repository=str(tmp_path / "repo")))  # the built-in cnn's own: judged later
    # this run's own model, as the triton stage recorded it, given as a module of the current folder: not another
    (folder / "cnnpack-model.json").write_text(json.dumps({"identity": {"kind": "classifier", "arch": "CNN.py:CNN"}}))
    monkeypatch.syspath_prepend(str(code))
    check_foreign_models(PipelineConfig(arch="CNN:CNN", repository=str(tmp_path / "repo")))


def test_resume_takes_the_arch_as_given_or_as_recorded(code, tmp_path, monkeypatch):
    from cnnpack import train_resume
    from cnnpack.train_config import TrainConfig

    monkeypatch.setattr(train_resume, "recorded_config", lambda _: TrainConfig(arch=f"{code / 'CNN.py'}:CNN"))
    assert "arch" not in train_resume.resume_conflicts(tmp_path, {"arch": "CNN.py:CNN"})
    assert "arch" in train_resume.resume_conflicts(tmp_path, {"arch": "nets.py:make"})


LAZY_LAYERS = """\
from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        self.conv = nn.LazyConv2d(4, 3)
        self.bn = nn.LazyBatchNorm2d()  # (lazy buffers too)
        self.fc = nn.LazyLinear(num_classes)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean((2, 3)))


class Picky(nn.Module):
    def __init__(self, num_classes=3):
        super().__init__()
        self.fc = nn.LazyLinear(num_classes)

    def forward(self, x):
        assert x.abs().sum() > 0, "a blank image"
        return self.fc(x.mean((2, 3)))
"""


def test_lazy_layers_take_their_shapes_before_weights_load_and_export_takes_its_normalisation(code, tmp_path):
    """nn.LazyLinear's weights have no shape until a forward: loading a checkpoint into them was a traceback."""
    (code / "lazy_layers.py").write_text(LAZY_LAYERS)
    spec = _spec("lazy_layers.py:Net", k=3)
    trained = build_model(spec)
    weights = tmp_path / "w.pt"
    torch.save(trained.state_dict(), weights)
    out = CliRunner().invoke(app, ["export", "--arch", "lazy_layers.py:Net", "--weights", str(weights), "--classes",
                                   "a,b,c", "--image-size", "32", "--format", "onnx", "--run", str(tmp_path / "r"),
                                   "--mean", "0.5,0.5,0.5", "--std", "0.5,0.5,0.5"])
    assert out.exit_code == 0, out.output
    model = json.loads((tmp_path / "r" / "cnnpack.json").read_text())["model"]
    assert model["mean"] == [0.5, 0.5, 0.5] and model["std"] == [0.5, 0.5, 0.5]  # what the weights were trained with
    x = torch.rand(2, 3, 32, 32) * 255
    import onnxruntime as ort

    got = ort.InferenceSession(str(tmp_path / "r" / "export" / "model.onnx")).run(None, {"input": x.numpy()})[0]
    want = trained.eval()(x / 255 / 0.5 - 1).detach().numpy()  # Normalize((0.5,)*3, (0.5,)*3) of the tutorials
    assert abs(got - want).max() < 1e-4
    out = CliRunner().invoke(app, ["report", "--run", str(tmp_path / "r")])
    assert out.exit_code == 0, out.output  # the report names what the graph does: not ImageNet's figures
    said = (tmp_path / "r" / "report.md").read_text()
    assert "Inputs are raw RGB pixels 0–255; scaling to 0–1 and normalisation with mean 0.5, 0.5, 0.5 and std 0.5, " \
           "0.5, 0.5 happen inside the graph." in said
    with pytest.raises(UserInputError, match=r"lazy_layers.py:Picky: its lazy layers could not take their shapes "
                                             r"from a 32px image \(a blank image\)"):
        build_model(_spec("lazy_layers.py:Picky"))
    out = CliRunner().invoke(app, ["export", "--arch", "lazy_layers.py:Net", "--classes", "a,b,c", "--format", "onnx",
                                   "--mean", "0.1307", "--std", "0.3081", "--run", str(tmp_path / "gray")])
    assert out.exit_code == 0, out.output  # one number for all three channels, as a grayscale set's Normalize has it
    assert json.loads((tmp_path / "gray" / "cnnpack.json").read_text())["model"]["std"] == [0.3081] * 3
    for bad in ("0.5,0.5", "a,b,c", "0.5,0.5,300", "0,0.5,0.5"):
        out = CliRunner().invoke(app, ["export", "--arch", "lazy_layers.py:Net", "--classes", "a,b,c", "--std", bad,
                                       "--run", str(tmp_path / "bad")])
        assert out.exit_code == 2 and "--std" in out.stderr and not (tmp_path / "bad").exists()


def test_resume_of_a_network_whose_code_changed_is_refused_and_the_pipeline_trains_again(code, tiny_data, tmp_path):
    from cnnpack.rundir import Run
    from cnnpack.train_resume import check_same_code

    run = tmp_path / "r"
    out = CliRunner().invoke(app, ["train", "--data", str(tiny_data), "--arch", "CNN.py:CNN", "--image-size", "32",
                                   "--epochs", "1", "--run", str(run), "--no-progress"])
    assert out.exit_code == 0, out.output
    check_same_code(Run.open(run), _spec("CNN.py:CNN").to_dict())  # unchanged: goes on
    (code / "CNN.py").write_text(TUTORIAL.replace("nn.Conv2d(8, 16, 3, padding=1)", "nn.Conv2d(8, 16, 5, padding=2)"))
    with pytest.raises(UserInputError, match=r"--resume: the network's code \(.*CNN.py or a file it imports\) has "
                                             r"changed since the training began.*--force"):
        check_same_code(Run.open(run), _spec("CNN.py:CNN").to_dict())
    stages = Stages(PipelineConfig(data=str(tiny_data), arch="CNN.py:CNN", image_size=32, epochs=1), progress=False,
                    say=print)
    assert not stages._same_code(Run.open(run))


def test_the_cnnpack_script_finds_a_module_of_the_current_folder(code, monkeypatch):
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(code))])  # (the console script's)
    assert user_model.recorded("CNN:CNN") == f"{code / 'CNN.py'}:CNN"
    assert user_model.source_record("CNN:CNN")["path"] == str(code / "CNN.py")
    (code / "mypkg").mkdir()  # a package's module with a relative import: found as `python -m` finds it
    (code / "mypkg" / "__init__.py").write_text("")
    (code / "mypkg" / "mod.py").write_text("from . import helper\n" + TUTORIAL)
    (code / "mypkg" / "helper.py").write_text("")
    monkeypatch.delitem(sys.modules, "mypkg", raising=False)
    assert user_model.recorded("mypkg.mod:CNN") == "mypkg.mod:CNN"
    assert build_model(_spec("mypkg.mod:CNN", k=3)).fc.out_features == 3
