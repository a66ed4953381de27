"""The run directory's atomic writes."""

from __future__ import annotations

import os
import re
import stat

import pytest

from cnnpack.rundir import atomic_path, atomic_write_text


def test_atomic_files_get_the_usual_permissions(tmp_path):
    """Not mkstemp's 0600: a Triton container running as another user must read the models."""
    dest = tmp_path / "model.onnx"
    atomic_write_text(dest, "x")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o666 & ~mask


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    dest = tmp_path / "cnnpack.json"
    dest.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer died")
    assert dest.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["cnnpack.json"]


_ART = {"path": "export/model.onnx", "sha256": "0" * 64, "max_batch_size": 64,
        "input": {"name": "input", "dtype": "float32", "shape": [-1, 3, 32, 32]},
        "output": {"name": "logits", "dtype": "float32", "shape": [-1, 2]}}


@pytest.mark.parametrize(("edit", "says"), [
    (lambda m: m.update(stages=[]), "`stages` is not an object of objects"),
    (lambda m: m.update(model="x"), "`model` is not an object"),
    (lambda m: m["model"].pop("classes"), "`model.classes` is missing"),
    (lambda m: m["model"].update(image_size="64"), "`model.image_size` is not an integer"),
    (lambda m: m["stages"].update(export={"artifacts": {"onnx": {"sha256": "0"}}}),
     "`stages.export.artifacts.onnx` lacks its path or sha256"),
    (lambda m: m["stages"].update(export={"artifacts": "x"}), "`stages.export.artifacts` is not an object"),
    (lambda m: m["stages"].update(export={"artifacts": {"onnx": {**_ART, "max_batch_size": "big"}}}),
     "`stages.export.artifacts.onnx.max_batch_size` is not an integer"),
    (lambda m: m["stages"].update(export={"artifacts": {"onnx": {**_ART, "input": None}}}),
     "`stages.export.artifacts.onnx.input` is not a tensor (name, dtype, shape of integers)"),
    (lambda m: m["stages"].update(export={"artifacts": {"onnx": {**_ART, "output": {**_ART["output"], "shape": ["N"]}}}}),
     "`stages.export.artifacts.onnx.output` is not a tensor (name, dtype, shape of integers)"),
    (lambda m: m.update(schema_version="1"), "`schema_version` is '1', not an integer (this cnnpack reads 1)"),
])
def test_a_damaged_manifest_is_one_error_naming_the_damage(tmp_path, edit, says):
    import json

    from cnnpack.errors import UserInputError
    from cnnpack.rundir import Run

    run = Run.create(tmp_path / "run", {"arch": "cnn", "num_classes": 2, "classes": ["a", "b"], "image_size": 32})
    m = run.read()
    edit(m)
    run.manifest_path.write_text(json.dumps(m))
    with pytest.raises(UserInputError, match=f"cnnpack.json is damaged: {re.escape(says)}; restore it"):
        Run.open(run.path).read()


@pytest.mark.parametrize(("make", "says"), [
    (lambda p: p.write_bytes(b"\xff\xfe{}"), "cannot read manifest .*cnnpack.json: not UTF-8 text \\(byte 0\\)"),
    (lambda p: p.mkdir(), "cnnpack.json is a folder, not a cnnpack manifest"),
])
def test_a_manifest_that_is_not_text_or_not_a_file_is_one_error(tmp_path, make, says):
    from cnnpack.errors import UserInputError
    from cnnpack.rundir import Run

    (tmp_path / "run").mkdir()
    make(tmp_path / "run" / "cnnpack.json")
    with pytest.raises(UserInputError, match=says):
        Run.open(tmp_path / "run")


def _stamp_stages(path: str, prefix: str, n: int, start) -> None:
    from cnnpack.rundir import Run

    run = Run(path)
    start.wait(30)  # both processes write at the same time
    for i in range(n):
        run.set_stage(f"{prefix}{i}", {"status": "ok"})


def test_two_commands_on_one_run_never_write_over_each_others_stage(tmp_path):
    """Two processes updating one manifest (a bench while a tune runs): every stage either wrote is there."""
    import multiprocessing

    from cnnpack.rundir import Run

    run = Run.create(tmp_path / "run", {"arch": "cnn", "num_classes": 2, "classes": ["a", "b"], "image_size": 32})
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Barrier(2)
    procs = [ctx.Process(target=_stamp_stages, args=(str(run.path), p, 150, start)) for p in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    stages = run.read()["stages"]
    assert {f"{p}{i}" for p in "ab" for i in range(150)} <= set(stages)  # none lost to the other's read-modify-write


def test_a_commit_whose_record_fails_puts_back_what_stood_there(tmp_path):
    """A file put in place beside the record of the one it replaced is refused by every later command: where the
    record fails (a disk that filled since the work began), the earlier file and folder come back."""
    import errno

    from cnnpack.rundir import Run, staged_beside

    run = Run.create(tmp_path / "run", {"arch": "cnn", "num_classes": 2, "classes": ["a", "b"], "image_size": 32})
    dest, folder = run.file("export/model.onnx"), run.file("export/openvino")
    atomic_write_text(dest, "old")
    (folder / "model.xml").parent.mkdir(parents=True)
    (folder / "model.xml").write_text("old ir")
    staged, staged_dir = staged_beside(dest), staged_beside(folder, folder=True)
    staged.write_text("new")
    (staged_dir / "model.xml").write_text("new ir")

    def full(m: dict) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(run.manifest_path))

    with pytest.raises(OSError, match="No space left"):
        run.commit([(staged, dest), (staged_dir, folder)], full)
    assert dest.read_text() == "old" and (folder / "model.xml").read_text() == "old ir"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model.onnx", "openvino"]  # nothing aside left
    staged = staged_beside(dest)
    staged.write_text("new")
    run.commit([(staged, dest)], lambda m: m.setdefault("stages", {}).update(export={"status": "ok"}))
    assert dest.read_text() == "new" and not staged.exists() and run.read()["stages"]["export"] == {"status": "ok"}
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model.onnx", "openvino"]
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o666 & ~mask  # as atomic files get them
