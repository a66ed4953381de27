"""cnnpack evaluate: the runtime --device picks, other data (any of the model's classes, every image scored),
unreadable files counted and reported. A real trained run, real ONNX Runtime, real image folders in tmp_path."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from support import forked_cli

from cnnpack.errors import RuntimeUnavailable, UserInputError
from cnnpack.evaluate import evaluate
from cnnpack.rundir import Run

CUDA = torch.cuda.is_available()


@pytest.fixture
def run_copy(tiny_run, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_run, tmp_path / "run"))


def _classes(run: Path) -> list[str]:
    return list(Run.open(run).model_spec["classes"])


def _folder(tiny_data: Path, dest: Path, classes: list[str], n: int | None = None) -> Path:
    """dest/<class>/ with the first `n` (default: all 15) validation images of each of `classes`."""
    for c in classes:
        (dest / c).mkdir(parents=True)
        for f in sorted((tiny_data / "val" / c).iterdir())[:n]:
            shutil.copy(f, dest / c)
    return dest


def _cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cnnpack", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "COLUMNS": "200"})


def test_training_data_changed_since_the_run_is_said(tiny_data, run_copy, tmp_path, caplog):
    """quantize's gate, verify and evaluate read the run's own data again: images added or taken out since
    training make its validation split another one, which they said nothing about."""
    from cnnpack.evaluate import dataset_of

    data = Path(shutil.copytree(tiny_data, tmp_path / "data"))
    Run.open(run_copy).update(lambda m: m["stages"]["train"]["config"].update(data=str(data)))
    dataset_of(Run.open(run_copy), None)
    assert "has changed" not in caplog.text
    next(p for p in sorted((data / "train").rglob("*.png"))).unlink()  # val/ is its own: what is scored is the same
    dataset_of(Run.open(run_copy), None)
    assert "has changed" not in caplog.text
    next(p for p in sorted((data / "val").rglob("*.png"))).unlink()
    dataset_of(Run.open(run_copy), None)
    assert f"warning: {data} has changed since the run was trained (its validation split: 90 images then, 89 images now)" \
        in caplog.text
    caplog.clear()
    dataset_of(Run.open(run_copy), str(tiny_data))  # other data, named: no comparison with the run's
    assert "has changed" not in caplog.text


# -- --device: ONNX on cuda runs in the CUDA provider, or is refused -----------------------------------
@pytest.mark.skipif(CUDA, reason="this machine has a CUDA GPU")
def test_onnx_on_cuda_without_a_gpu_is_refused_and_auto_runs_on_the_cpu(tiny_onnx_run, tmp_path):
    run = shutil.copytree(tiny_onnx_run, tmp_path / "run")
    with pytest.raises(RuntimeUnavailable, match=r"^--device cuda: onnxruntime-cuda: (no CUDA GPU is visible on this "
                                                 r"machine|this onnxruntime build has no CUDAExecutionProvider); use "
                                                 r"--device cpu$"):  # (onnxruntime-gpu, or a CPU build)
        evaluate(run, fmt="onnx", device="cuda")
    assert not (run / "eval-onnx.json").exists()
    result = evaluate(run, fmt="onnx")
    assert result["runtime"] == "onnxruntime"  # auto: the CPU where no GPU works
    from cnnpack.rundir import sha256

    assert result["artifact"] == {"path": "export/model.onnx", "sha256": sha256(run / "export/model.onnx")}


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_onnx_on_cuda_runs_in_the_cuda_provider(tiny_onnx_run, tmp_path):
    run = shutil.copytree(tiny_onnx_run, tmp_path / "run")
    cpu = evaluate(run, fmt="onnx", device="cpu")
    gpu = evaluate(run, fmt="onnx", device="cuda")
    assert (cpu["runtime"], gpu["runtime"]) == ("onnxruntime", "onnxruntime-cuda")
    assert abs(gpu["accuracy"] - cpu["accuracy"]) <= 1 / cpu["images"]  # TF32 may flip a near tie, no more
    assert evaluate(run, fmt="onnx")["runtime"] == "onnxruntime-cuda"  # auto: the GPU where it works


# -- other data: every image of PATH/<class>/*, any of the model's classes ------------------------------
def test_other_data_with_one_image_per_class_is_scored_whole(tiny_data, run_copy, tmp_path):
    classes = _classes(run_copy)
    r = evaluate(run_copy, data=str(_folder(tiny_data, tmp_path / "one", classes, n=1)), device="cpu")
    assert (r["split"], r["images"], r["classes"]) == ("all", len(classes), classes)
    assert np.array(r["confusion_matrix"]).sum(1).tolist() == [1] * len(classes)


def test_two_folders_of_one_relative_name_get_results_of_their_own(tiny_data, run_copy, tmp_path, monkeypatch):
    """`--data ev` typed in two folders: the second result replaced the first (one file name, hashed from the name as
    typed), and neither said which folder it scored; `ev`, `ev/` and its absolute path gave three files."""
    classes = _classes(run_copy)
    for where, n in (("x1", 1), ("x2", 2)):
        _folder(tiny_data, tmp_path / where / "ev", classes, n=n)
    monkeypatch.chdir(tmp_path / "x1")
    one = evaluate(run_copy, data="ev", device="cpu")
    assert evaluate(run_copy, data=str(tmp_path / "x1" / "ev") + "/", device="cpu")["output"] == one["output"]
    monkeypatch.chdir(tmp_path / "x2")
    two = evaluate(run_copy, data="ev", device="cpu")
    assert one["output"] != two["output"] and (one["images"], two["images"]) == (len(classes), 2 * len(classes))
    assert json.loads(Path(one["output"]).read_text())["data"] == str(tmp_path / "x1" / "ev")


def test_a_checkpoint_of_another_model_is_refused(tiny_run, run_copy, tmp_path):
    """Another run's checkpoint.pt copied in: evaluate scored it on this run's data as this run's result (a 32 px
    model on 64 px images); every other format was already refused as made from another checkpoint."""
    import torch

    from cnnpack.spec import ModelSpec

    ckpt = torch.load(run_copy / "checkpoint.pt", weights_only=True)
    spec = ModelSpec.from_dict(ckpt["spec"])
    ckpt["spec"] = {**spec.to_dict(), "image_size": spec.image_size * 2}
    torch.save(ckpt, run_copy / "checkpoint.pt")
    with pytest.raises(UserInputError, match=rf"checkpoint.pt holds another model \(cnn, {2 * spec.image_size} px, "
                                             rf"\d+ classes\) than .* records \(cnn, {spec.image_size} px"):
        evaluate(run_copy, device="cpu")
    assert not (run_copy / "eval-checkpoint.json").exists()


def test_other_data_may_hold_some_of_the_models_classes_or_one(tiny_data, run_copy, tmp_path):
    classes = _classes(run_copy)
    full = evaluate(run_copy, data=str(_folder(tiny_data, tmp_path / "all", classes)), device="cpu")
    pick = [classes[3], classes[1]]
    some = evaluate(run_copy, data=str(_folder(tiny_data, tmp_path / "some", pick)), device="cpu")
    assert some["classes"] == classes and some["images"] == 30
    for i, row in enumerate(some["confusion_matrix"]):  # labelled by the model's classes, not the folder's order
        assert row == (full["confusion_matrix"][i] if classes[i] in pick else [0] * len(classes))
    assert [a is None for a in some["per_class_acc"]] == [c not in pick for c in classes]
    one = evaluate(run_copy, data=str(_folder(tiny_data, tmp_path / "one", [classes[2]])), device="cpu")
    assert one["images"] == 15 and one["confusion_matrix"][2] == full["confusion_matrix"][2]


def test_a_val_folder_alone_is_scored_and_a_narrow_terminal_gets_accuracy_per_class(tiny_data, run_copy, tmp_path,
                                                                                      monkeypatch, capsys):
    """val/ alone was read as a class the model does not have; a confusion matrix wider than the terminal was
    squeezed to columns of a letter or two."""
    from cnnpack.cli.train_cmd import _print_eval

    classes = _classes(run_copy)
    _folder(tiny_data, tmp_path / "data" / "val", classes[:2])
    result = evaluate(run_copy, data=str(tmp_path / "data"), device="cpu")
    assert result["split"] == "validation" and result["images"] == 30
    from cnnpack.rundir import sha256

    assert result["artifact"] == {"path": "checkpoint.pt", "sha256": sha256(run_copy / "checkpoint.pt")}
    for columns, matrix in (("200", True), ("40", False)):
        monkeypatch.setenv("COLUMNS", columns)
        _print_eval(result)
        out = capsys.readouterr().out
        assert ("true \\ pred" in out) == matrix and ("per class (the confusion matrix is in the file" in out) != matrix
        table = [line for line in out.splitlines() if line[0] in "┏┃┡│└"]
        assert len(table) == 4 + len(classes) and max(map(len, table)) <= int(columns), out
        assert out.startswith(f"checkpoint: top-1 {100 * result['accuracy']:.2f}% on 30 validation images\n")


def test_a_class_folder_the_model_does_not_know_is_named(tiny_data, run_copy, tmp_path):
    data = _folder(tiny_data, tmp_path / "data", _classes(run_copy)[:2], n=2)
    (data / "dog").mkdir()
    Image.new("RGB", (32, 32), (90, 60, 30)).save(data / "dog" / "rex.png")
    with pytest.raises(UserInputError, match=re.escape(f"class folder {data / 'dog'} is not one of the model's "
                                                       "classes (")):
        evaluate(run_copy, data=str(data), device="cpu")


# -- unreadable files: skipped, counted, reported -------------------------------------------------------
@pytest.mark.slow
def test_unreadable_files_are_skipped_counted_and_reported(tiny_data, run_copy, tmp_path):
    classes = _classes(run_copy)
    data = _folder(tiny_data, tmp_path / "data", classes[:2], n=5)
    (data / classes[0] / "garbage.png").write_bytes(b"not an image")
    (data / classes[1] / "empty.jpg").write_bytes(b"")
    r = evaluate(run_copy, data=str(data), device="cpu")
    assert r["images"] == 10 and r["skipped_files"] == 2
    assert sorted(Path(e.split(": ")[0]).name for e in r["skipped_examples"]) == ["empty.jpg", "garbage.png"]
    assert json.loads(Path(r["output"]).read_text())["skipped_files"] == 2
    out = _cli("evaluate", "--run", str(run_copy), "--data", str(data), "--device", "cpu")
    stdout, stderr = out.communicate(timeout=300)
    assert out.returncode == 0, stderr
    line = " ".join(stdout.split())  # the table's title, however rich wraps it
    assert "on 10 images (all of" in line and "2 unreadable files skipped" in line
    assert "skipped 2 unreadable files, e.g. " in stdout


# -- the command line: bad input is one line and exit 2 ---------------------------------------------------
@pytest.mark.slow
def test_cli_bad_input_is_one_error_line_and_exit_2(tiny_data, tiny_onnx_run, tmp_path):
    unknown = _folder(tiny_data, tmp_path / "unknown", _classes(tiny_onnx_run)[:1], n=1)
    (tmp_path / "lone").mkdir()
    (tmp_path / "lone" / "train").symlink_to(unknown)  # train/ alone: read as a class of the model's
    shutil.copytree(unknown / _classes(tiny_onnx_run)[0], unknown / "dog")
    run = ["evaluate", "--run", str(tiny_onnx_run)]
    cases = {
        (*run, "--data", str(unknown)): f"class folder {unknown / 'dog'} is not one of the model's classes (",
        (*run, "--data", "torchvision:MNIST", "--data-root", str(tmp_path / "tv")):  # the hint names a real option
            f"torchvision:MNIST not found under {tmp_path / 'tv'}",
        (*run, "--data", "torchvision:NoSuchSet", "--download"): "torchvision has no dataset 'NoSuchSet'",
        (*run, "--format", "onnx", "--device", "tpu"): "--device 'tpu'; valid: auto, cpu, cuda",
        (*run, "--data", str(tmp_path / "lone")): f"--data {tmp_path / 'lone'} has train/ but no validation folder: ",
    }
    if not CUDA:
        cases[(*run, "--format", "onnx", "--device", "cuda")] = "--device cuda: onnxruntime-cuda: "
    done = forked_cli({args: list(args) for args in cases}, tmp=tmp_path, env={**os.environ, "COLUMNS": "200"})
    for args, p in done.items():
        stdout, stderr = p.stdout, p.stderr
        assert p.returncode == 2 and stdout == "", (args, stderr)
        assert stderr.count("\n") == 1 and stderr.startswith("error: ") and cases[args] in stderr, (args, stderr)
        assert ("`cnnpack evaluate --download` fetches it" in stderr) == ("torchvision:MNIST" in args), (args, stderr)
    assert not list(tiny_onnx_run.glob("eval-*.json"))


def test_the_run_s_own_data_counts_the_unreadable_files_of_its_validation_split_only(tmp_path):
    """evaluate scores the validation split: a broken file among the training images is not 'skipped' by it."""
    from cnnpack.data import load_data
    from cnnpack.evaluate import _val_skipped

    for split in ("train", "val"):
        for cls in ("a", "b"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (12, 12), (90 * i, 0, 0)).save(tmp_path / split / cls / f"{i}.png")
    (tmp_path / "train" / "a" / "broken.png").write_bytes(b"not an image")
    (tmp_path / "val" / "b" / "empty.png").write_bytes(b"")
    d = load_data(str(tmp_path), 12)
    assert len(d.skipped) == 2
    assert [Path(w.split(": ")[0]).name for w in _val_skipped(d)] == ["empty.png"]


def test_weights_edited_after_training_are_refused(run_copy):
    """checkpoint.pt with one class's bias raised by 50: evaluate (and infer --run) used it without a word, scoring
    every image as that class; the run records the sha256 training wrote."""
    import torch

    ckpt = torch.load(run_copy / "checkpoint.pt", weights_only=True)
    bias = [k for k in ckpt["state_dict"] if k.endswith("bias")][-1]
    ckpt["state_dict"][bias][0] += 50
    torch.save(ckpt, run_copy / "checkpoint.pt")
    with pytest.raises(UserInputError, match=r"checkpoint.pt is not the checkpoint the run recorded \(its sha256 "
                                             r"differs\): restore it, or train the run again with `cnnpack train"):
        evaluate(run_copy, device="cpu")
    assert not (run_copy / "eval-checkpoint.json").exists()
