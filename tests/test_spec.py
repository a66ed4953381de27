"""The one rule for class names, and that every entry point applies it before any work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from cnnpack.errors import UserInputError
from cnnpack.spec import check_class_names, class_name_problem, suggest_class_name

GOOD = ["grand piano", 'say "cheese"', "it's", "café", "日本語", "a/b", "x,y", "100%"]
BAD = {"new\nline": "'\\n'", "tab\there": "'\\t'", "a:b:c": "':'", "": "empty", "  ": "empty",
       " padded": "whitespace", "zero\u200bwidth": "'\\u200b'", "line\u2028sep": "'\\u2028'"}


@pytest.mark.parametrize("name", GOOD)
def test_names_triton_can_carry_pass(name):
    assert class_name_problem(name) is None


@pytest.mark.parametrize(("name", "says"), BAD.items())
def test_names_triton_cannot_carry_are_refused_with_the_reason_and_a_valid_rename(name, says):
    with pytest.raises(UserInputError) as err:
        check_class_names(["ok", name], where=lambda i, c: f"class {i} {c!r}", fix="rename it")
    message = str(err.value)
    assert message.startswith("class 1 ") and says in message and "\n" not in message
    assert class_name_problem(suggest_class_name(name)) is None


def test_duplicate_names_are_refused():
    with pytest.raises(UserInputError, match="given twice"):
        check_class_names(["a", "b", "a"], where=lambda i, c: f"class {i}", fix="rename it")


def test_names_that_differ_only_in_how_their_accents_are_encoded_are_refused(tmp_path):
    """`café` composed (NFC, as typed on Linux) and decomposed (NFD, as macOS writes file names) are two folders
    that look like one class: two labels would print the same."""
    from cnnpack.data import load_data

    composed, decomposed = "caf\u00e9", "cafe\u0301"
    with pytest.raises(UserInputError, match="reads the same as 'café'"):
        check_class_names([composed, "tea", decomposed], where=lambda i, c: f"class {i}", fix="rename it")
    check_class_names([composed, "cafe"], where=lambda i, c: f"class {i}", fix="rename it")  # another name
    with pytest.raises(UserInputError, match="rename the folder so they differ"):
        load_data(str(_image_folder(tmp_path / "d", [composed, decomposed, "tea"])), image_size=16)


# -- every entry point, as a user runs it: exit 2, one line, before any work, nothing written --------
def _image_folder(root: Path, names: list[str]) -> Path:
    for i, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for k in range(4):
            Image.new("RGB", (16, 16), (40 * i, 200 - 40 * i, 10 * k)).save(root / name / f"{k}.png")
    return root


def _cnnpack(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnpack", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, "COLUMNS": "200"}, timeout=120)


@pytest.mark.parametrize("command", ["train", "pipeline"])
@pytest.mark.parametrize("bad", ["new\nline", "a:b:c"])
def test_train_and_pipeline_refuse_a_bad_class_folder_before_any_work(tmp_path, command, bad):
    data = _image_folder(tmp_path / "data", ["cat", bad])
    p = _cnnpack(tmp_path, command, "--data", str(data), "--image-size", "16", "--epochs", "1",
                 "--run", str(tmp_path / "run"))
    assert p.returncode == 2, p.stderr
    line = p.stderr.strip()
    assert "\n" not in line and f"class folder {bad!r} in {data}" in line and "rename the folder" in line
    assert "Traceback" not in p.stderr and not (tmp_path / "run").exists()


def test_export_arch_refuses_a_bad_class_name(tmp_path):
    p = _cnnpack(tmp_path, "export", "--arch", "cnn", "--num-classes", "2", "--classes", "ok,a:b",
                 "--image-size", "32", "--run", str(tmp_path / "run"))
    assert p.returncode == 2 and "--classes: class 1 'a:b'" in p.stderr and "'a_b'" in p.stderr
    assert not (tmp_path / "run").exists()


def test_a_run_recorded_before_the_rule_still_loads_and_triton_refuses_it(tiny_run, tmp_path):
    import json
    import shutil

    from cnnpack.rundir import Run
    from cnnpack.triton_repo import TritonConfig, build

    run_dir = tmp_path / "old"
    shutil.copytree(tiny_run, run_dir)
    manifest = json.loads((run_dir / "cnnpack.json").read_text())
    manifest["model"]["classes"][0] = "ci:rcle"
    (run_dir / "cnnpack.json").write_text(json.dumps(manifest))
    assert Run.open(run_dir).read()["model"]["classes"][0] == "ci:rcle"
    with pytest.raises(UserInputError, match="class 0 'ci:rcle' of the run's model.classes"):
        build(run_dir, TritonConfig(repository=str(tmp_path / "repo")))
    assert not (tmp_path / "repo" / "cnn_onnx").exists()
