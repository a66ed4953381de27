"""The run directory's atomic writes."""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path

import pytest

from cnnpack.atomic import atomic_path, atomic_write_text


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


def test_what_a_killed_process_staged_is_removed_by_the_next_write_beside_it(tmp_path):
    """SIGKILL during `cnnpack export` left export/.model.onnx.<random>.tmp (a partial model) for good, a rerun's
    success included. A live process's staged file stays (another command at work), and so does one not named by
    cnnpack."""
    import subprocess
    import sys

    from cnnpack.atomic import owner_tag, staged_beside

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid is free now (reused in the instant between: then kept, as any live one's)
    host = owner_tag().split("_")[0]
    killed = tmp_path / f".model.onnx.{host}_{dead.pid}_k1ll3d.tmp"
    killed.write_bytes(b"half a model")
    folder = tmp_path / f".model.onnx.{host}_{dead.pid}_f0ld3r.staged"
    (folder / "1").mkdir(parents=True)
    live = tmp_path / f".model.onnx.{host}_{os.getppid()}_al1ve.tmp"
    live.write_bytes(b"at work")
    other = tmp_path / ".model.onnx.user.tmp"
    other.write_bytes(b"not ours")
    elsewhere = f"{int(host, 16) ^ 1:08x}"  # another boot's or host's tag: its pid says nothing here
    young, old = (tmp_path / f".model.onnx.{elsewhere}_{dead.pid}_{n}.tmp" for n in ("y0ung", "0ld"))
    for p in (young, old):
        p.write_bytes(b"from before a reboot")
    os.utime(old, (time.time() - 90_000, time.time() - 90_000))  # a day old: left over
    with atomic_path(tmp_path / "model.onnx") as tmp:
        assert tmp.name.startswith(f".model.onnx.{owner_tag()}")
        tmp.write_text("the model")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.onnx", live.name, other.name, young.name])
    staged_beside(tmp_path / "model.onnx").unlink()


def test_a_file_a_killed_commit_set_aside_is_put_back_when_the_run_is_opened(tmp_path):
    """SIGKILL between a commit's two renames left model.onnx hidden as .model.onnx.old-<pid>, its record naming a
    file that was gone for good."""
    import subprocess
    import sys

    from cnnpack.atomic import owner_tag
    from cnnpack.rundir import Run

    run = Run.create(tmp_path / "run", {"arch": "cnn", "num_classes": 2, "classes": ["a", "b"], "image_size": 32})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    here = owner_tag().split("_")[0]
    export = run.path / "export"
    export.mkdir()
    (export / f".model.onnx.old-{here}_{dead.pid}_").write_bytes(b"the model")  # hidden, nothing in its place
    (export / "model.pt").write_bytes(b"the new one")  # a file in place again: the one set aside goes
    (export / f".model.pt.old-{here}_{dead.pid}_").write_bytes(b"the old one")
    (export / f".report.md.old-{here}_{os.getpid()}_").write_bytes(b"a live commit's")  # its owner is at work
    # killed after placing the new file but before recording it: the set-aside one is what the manifest names
    (run.path / "bench.json").write_bytes(b"never recorded")
    (run.path / f".bench.json.old-{here}_{dead.pid}_").write_bytes(b"recorded")
    from cnnpack.rundir import sha256

    run.update(lambda m: m["stages"].__setitem__("bench", {"outputs": {"json": {
        "path": "bench.json", "sha256": sha256(run.path / f".bench.json.old-{here}_{dead.pid}_")}}}))
    Run.open(run.path)
    live = f".report.md.old-{here}_{os.getpid()}_"
    assert sorted(p.name for p in export.iterdir()) == sorted(["model.onnx", "model.pt", live])
    assert (export / "model.onnx").read_bytes() == b"the model" and (export / "model.pt").read_bytes() == b"the new one"
    assert (run.path / "bench.json").read_bytes() == b"recorded" and not list(run.path.glob(".bench.json.old-*"))


_ART = {"path": "export/model.onnx", "sha256": "0" * 64, "max_batch_size": 64,
        "input": {"name": "input", "dtype": "float32", "shape": [-1, 3, 32, 32]},
        "output": {"name": "logits", "dtype": "float32", "shape": [-1, 2]}}


@pytest.mark.parametrize(("edit", "says"), [
    (lambda m: m.update(stages=[]), "`stages` is not an object"),
    (lambda m: m["stages"].update(other=[]), "`stages` is not an object of objects"),
    (lambda m: m.update(model="x"), "`model` is not an object"),
    (lambda m: m["model"].pop("classes"), "`model.classes` is missing"),
    (lambda m: m["model"].update(image_size="64"), "`model.image_size` is not an integer"),
    (lambda m: m["stages"].update(export={"artifacts": {"onnx": {"sha256": "0"}}}),
     "`stages.export.artifacts.onnx.path` is missing"),
    (lambda m: m["stages"].update(export={"artifacts": "x"}), "`stages.export.artifacts` is not an object"),
    (lambda m: m["stages"].update(export={"artifacts": {"onnx": {**_ART, "max_batch_size": "big"}}}),
     "`stages.export.artifacts.onnx.max_batch_size` is not an integer"),
    (lambda m: m["stages"].update(export={"artifacts": {"onnx": {**_ART, "input": None}}}),
     "`stages.export.artifacts.onnx.input` is not an object"),
    (lambda m: m["stages"].update(export={"artifacts": {"onnx": {**_ART, "output": {**_ART["output"], "shape": ["N"]}}}}),
     "`stages.export.artifacts.onnx.output.shape[0]` is not an integer"),
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


_STAGES = {"quantize": {"status": "ok", "gate": {"max_drop_pt": 0.5, "drop_pt": 0.0, "top1_agreement_vs_fp32": 1.0,
                                                  "steps": 0}, "calibration": {"images": 8, "method": "minmax", "seed": 0}},
           "bench": {"status": "ok", "results": [{"runtime": "eager", "format": "checkpoint", "batch_size": 1,
                                                  "latency_ms_p50": 1.0, "latency_ms_p99": 2.0, "throughput_ips": 9.0}]},
           "verify": {"status": "ok", "passed": True, "formats": {"onnx": {"max_abs_err": 1e-6, "precision": "fp32"}}},
           "triton": {"status": "ok", "repository": "/r", "name": "cnn_onnx", "version": 1, "format": "onnx"}}


@pytest.mark.parametrize(("edit", "says"), [
    (lambda m: m["stages"].update(quantize={"status": "ok"}), "`stages.quantize.gate` is missing"),
    (lambda m: m["stages"].update(triton={"status": "ok"}), "`stages.triton.repository` is missing"),
    (lambda m: m["stages"].update(deploy={"status": "ok"}), "`stages.deploy.figures` is missing"),
    (lambda m: m["stages"].update(tune={"status": "ok", "points": [{"label": "x"}]}),
     "`stages.tune.points[0].model` is missing"),
    (lambda m: m["stages"].update(served={"status": "ok", "predictions": ["circle"]}),
     "`stages.served.predictions[0]` is not an object"),
    (lambda m: m["stages"]["quantize"]["gate"].update(max_drop_pt="0.5"), "`stages.quantize.gate.max_drop_pt` is not a number"),
    (lambda m: m["stages"]["bench"]["results"][0].pop("throughput_ips"),
     "`stages.bench.results[0].throughput_ips` is missing"),
    (lambda m: m["stages"]["bench"].update(results={}), "`stages.bench.results` is not a list"),
    (lambda m: m["stages"]["verify"].update(formats=[]), "`stages.verify.formats` is not an object"),
    (lambda m: m["stages"]["verify"]["formats"]["onnx"].update(max_abs_err="1e-6"),
     "`stages.verify.formats.onnx.max_abs_err` is not a number"),
    (lambda m: m["stages"].update(export={"status": "ok", "artifacts": {"onnx": {**_ART, "precision": "fp99"}}}),
     "`stages.export.artifacts.onnx.precision` is not one of fp32, fp16, bf16, int8"),
    (lambda m: m["model"].update(classes=[1, 2]), "`model.classes[0]` is not a string"),
    (lambda m: m["model"].update(classes=["a", "b", "c"]), "`model.classes` names 3 classes, `model.num_classes` says 2"),
    (lambda m: m["model"].update(image_size=0), "`model.image_size` is not an integer >= 8"),
    (lambda m: m.pop("tool"), "`tool` is missing"),
    (lambda m: m["model"].update(std=[0.2, 0, 0.2]), "`model.std` holds a 0 (it divides)"),
    (lambda m: m["model"].update(mean=[0.5]), "`model.mean` holds 1 numbers for 3 channels"),
    (lambda m: m["stages"]["triton"].update(repository=""), "`stages.triton.repository` is empty"),
    (lambda m: m.pop("machine"), "`machine` is missing"),
    (lambda m: m["stages"]["bench"].update(status=1), "`stages.bench.status` is not one of ok, failed, running, interrupted"),
    (lambda m: m["model"].update(mean="0.5"), "`model.mean` is not a list"),
    (lambda m: m["stages"]["triton"].pop("version"), "`stages.triton.version` is missing"),
    (lambda m: m["stages"]["bench"]["results"].append({**m["stages"]["bench"]["results"][0], "runtime": "triton"}),
     "`stages.bench.results[1]` is a served row without its concurrency"),
    (lambda m: m["stages"]["bench"].update(skipped=["x"]), "`stages.bench.skipped` is not an object"),
    (lambda m: m["stages"]["bench"].update(over_ceiling="eager b1"), "`stages.bench.over_ceiling` is not a list"),
    (lambda m: m["stages"].update(export={"status": "ok", "artifacts": {"tflite": _ART}}),
     "`stages.export.artifacts` names a format that is none of onnx, onnx_int8, pt2, torchscript, openvino, "
     "openvino_int8"),
])
def test_a_manifest_whose_stages_lack_what_the_commands_read_is_refused_in_one_line(tmp_path, edit, says):
    """Each of these was a traceback in report, deploy, triton or bench (a helper's hand edits of a real run)."""
    import json

    from cnnpack.errors import UserInputError
    from cnnpack.rundir import Run

    run = Run.create(tmp_path / "run", {"arch": "cnn", "num_classes": 2, "classes": ["a", "b"], "image_size": 32})
    m = run.read()
    m["stages"].update(json.loads(json.dumps(_STAGES)))
    run.manifest_path.write_text(json.dumps(m))
    Run.open(run.path).read()  # as written, it is whole
    edit(m)
    run.manifest_path.write_text(json.dumps(m))
    with pytest.raises(UserInputError, match=f"cnnpack.json is damaged: {re.escape(says)}; restore it"):
        Run.open(run.path).read()


def test_what_cnnpack_writes_in_its_rarer_cases_is_not_damage():
    """A review traced these writers: a tune whose default point was not measured (verdict default None), an int8
    artifact made from a record older than checkpoint digests, a served model whose config names its own precision."""
    from cnnpack.manifest_shape import manifest_problem

    m = {"model": {"arch": "cnn", "num_classes": 2, "classes": ["a", "b"], "image_size": 32},
         "tool": {"name": "cnnpack", "version": "0"}, "machine": {}, "libraries": {}, "stages": {
             "export": {"status": "ok", "artifacts": {"onnx_int8": {**_ART, "checkpoint_sha256": None}}},
             "verify": {"status": "ok", "passed": True, "formats": {"triton:m": {"precision": "FP16"}}},
             "tune": {"status": "ok", "points": [], "config": {"latency_budget_ms": 50.0}, "winner": None,
                      "verdict": {"default": None, "gain": None, "noise": None, "as_good": False}}}}
    assert manifest_problem(m) is None


def test_the_manifest_shape_knows_every_format():
    from cnnpack.manifest_shape import FORMATS
    from cnnpack.runtimes import FORMAT_RUNTIME

    assert set(FORMATS) == set(FORMAT_RUNTIME) - {"checkpoint"}


def test_a_stage_that_did_not_finish_records_less_and_is_not_damaged(tmp_path):
    from cnnpack.rundir import Run

    run = Run.create(tmp_path / "run", {"arch": "cnn", "num_classes": 2, "classes": ["a", "b"], "image_size": 32})
    for status in ("failed", "running", "interrupted"):
        run.update(lambda m, s=status: m["stages"].update(quantize={"status": s}, bench={"status": s}))
        assert Run.open(run.path).read()["stages"]["quantize"]["status"] == status


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

    from cnnpack.atomic import staged_beside
    from cnnpack.rundir import Run

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
    run.commit([(staged, dest)], lambda m: m.setdefault("stages", {}).update(export={"status": "ok", "artifacts": {}}))
    assert dest.read_text() == "new" and not staged.exists() and run.read()["stages"]["export"]["status"] == "ok"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model.onnx", "openvino"]
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o666 & ~mask  # as atomic files get them


def test_a_commit_refuses_a_folder_where_a_file_goes_and_removes_nothing(tmp_path):
    """Run.commit set what stood at a file's place aside and removed it: a folder of the user's named tune.json went,
    with its contents, without a word (bench and tune put their outputs in place through it)."""
    from cnnpack.atomic import staged_beside
    from cnnpack.rundir import Run

    run = Run.create(tmp_path / "run", {"arch": "cnn", "num_classes": 2, "classes": ["a", "b"], "image_size": 32})
    mine = run.file("tune.json")
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    staged = staged_beside(mine)
    before = run.manifest_path.read_bytes()
    with pytest.raises(IsADirectoryError) as e:
        run.commit([(staged, mine)], lambda m: m.setdefault("stages", {}).update(tune={"status": "ok"}))
    assert e.value.filename == str(mine) and (mine / "notes.txt").read_text() == "mine"
    assert run.manifest_path.read_bytes() == before
    folder = staged_beside(run.file("openvino"), folder=True)
    run.file("openvino").write_text("a file where a folder goes")
    with pytest.raises(NotADirectoryError):
        run.commit([(folder, run.file("openvino"))], lambda m: None)
    assert run.file("openvino").read_text() == "a file where a folder goes"


def test_an_owner_killed_but_not_yet_waited_for_is_gone(tmp_path):
    """A zombie answers kill(pid, 0): a run a SIGKILLed `train --force` set aside stayed hidden while its parent (a
    container's pid 1, a `timeout` that was killed with it) had not waited for it."""
    import subprocess
    import sys
    import time

    from cnnpack.atomic import owner_gone, owner_tag

    child = subprocess.Popen([sys.executable, "-c", "pass"])
    name = f".replaced-{owner_tag().split('_')[0]}_{child.pid}_"
    deadline = time.monotonic() + 30
    while Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.05)
    assert owner_gone(name, ".replaced-")  # exited, not yet waited for
    child.wait()
    assert owner_gone(name, ".replaced-") and not owner_gone(f".replaced-{owner_tag()}", ".replaced-")


def test_a_folder_swap_killed_or_interrupted_part_way_leaves_the_old_folder_in_place(tmp_path, monkeypatch):
    """A Ctrl-C between deploy's two renames left --out hidden as .out.old-<random> with the user's own files in it,
    and the next deploy wrote a fresh folder without them; a SIGKILL did the same."""
    import subprocess
    import sys

    import cnnpack.atomic as atomic

    def folder(path: Path, text: str) -> Path:
        path.mkdir()
        (path / "NOTES.md").write_text(text)
        return path

    out = folder(tmp_path / "out", "mine")
    real = os.replace
    calls = []

    def second_interrupted(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", second_interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic.swap_dir(folder(tmp_path / "new", "new"), out)
    monkeypatch.setattr(atomic.os, "replace", real)
    assert (out / "NOTES.md").read_text() == "mine" and (tmp_path / "new").is_dir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tag = f"{atomic.owner_tag().split('_')[0]}_{dead.pid}_"
    os.replace(out, tmp_path / f".out.old-{tag}x1")  # killed between the two renames: nothing in its place
    folder(tmp_path / f".out.new-{tag}x2", "a stage")  # killed while it staged the new one
    atomic.recover_swap(out)
    assert (out / "NOTES.md").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["new", "out"]
    folder(tmp_path / f".out.old-{tag}x3", "the old one")  # killed after the new one was in place: removed
    live = folder(tmp_path / f".out.old-{atomic.owner_tag()}x4", "a swap at work")
    atomic.recover_swap(out)
    assert (out / "NOTES.md").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["new", "out", live.name])


_SPEC = {"arch": "cnn", "num_classes": 2, "classes": ["a", "b"], "image_size": 32}
_NAMES = ("cnnpack.json", "checkpoint.pt", "last.pt", "export")


def _finished_run(path: Path):
    from cnnpack.rundir import Run

    run = Run.create(path, _SPEC)
    (path / "checkpoint.pt").write_bytes(b"the old weights")
    (path / "export").mkdir()
    (path / "export" / "model.onnx").write_bytes(b"the old model")
    (path / "notes.txt").write_text("mine")
    return run, run.manifest_path.read_bytes()


def _as_before(path: Path, manifest: bytes) -> bool:
    return ((path / "cnnpack.json").read_bytes() == manifest and (path / "checkpoint.pt").read_bytes() == b"the old "
            b"weights" and (path / "export" / "model.onnx").read_bytes() == b"the old model"
            and not (path / "last.pt").exists() and (path / "notes.txt").is_file()
            and not [p.name for p in path.iterdir() if p.name.startswith(".replaced")])


@pytest.mark.parametrize("killed", ["before the new manifest", "in the first epoch", "after the first epoch"])
def test_a_run_a_killed_replacement_set_aside_is_put_back_when_the_run_is_opened(tmp_path, killed):
    """SIGKILL (out of memory) in the first epoch of `train --force` left the old run hidden in .replaced-*: the next
    command that opens the run puts it back (its owner lock is free once the process is gone); after the new run
    kept an epoch (killed before it removed the old one), the new run stays."""
    from cnnpack.run_replace import Replacing
    from cnnpack.rundir import Run

    run, manifest = _finished_run(tmp_path / "run")
    rep = Replacing(run.path, _NAMES, lock=run.locked)
    if killed != "before the new manifest":
        new = Run.create(run.path, _SPEC, force=True, run_id=rep.run_id)
        (run.path / "export").mkdir()  # written by the new run: goes with it
    if killed == "after the first epoch":
        (run.path / "last.pt").write_bytes(b"the new run's first epoch")
    rep._release()  # the process is gone: the kernel let go of its lock
    finished = run.path / ".replaced-done-x1"  # killed while it removed a replaced run: removed
    (finished / "export").mkdir(parents=True)
    Run.open(run.path)
    if killed == "after the first epoch":
        assert Run.open(run.path).opened_as == new.opened_as and (run.path / "last.pt").is_file()
        assert not [p.name for p in run.path.iterdir() if p.name.startswith(".replaced")]
    else:
        assert _as_before(run.path, manifest)


def test_one_replacement_at_a_time_and_a_set_aside_cut_short_moves_back_only_what_it_moved(tmp_path, monkeypatch):
    """A set-aside that failed part way (a folder it could not move) removed every later output as if the new run had
    written it; a second --force while one was at work stacked the two, and a kill of both lost the original."""
    import cnnpack.run_replace as rr
    from cnnpack.errors import UserInputError
    from cnnpack.rundir import Run

    run, manifest = _finished_run(tmp_path / "run")
    (run.path / "last.pt").write_bytes(b"the old run's last epoch")
    real, failed = os.replace, []

    def second_fails(src, dst):  # the manifest moved first, then the checkpoint cannot be (once)
        if Path(src).name == "checkpoint.pt" and not failed:
            failed.append(src)
            raise PermissionError(13, "Permission denied", str(src))
        real(src, dst)

    monkeypatch.setattr(rr.os, "replace", second_fails)
    with pytest.raises(PermissionError):
        rr.Replacing(run.path, _NAMES, lock=run.locked)
    monkeypatch.undo()
    assert run.manifest_path.read_bytes() == manifest and (run.path / "last.pt").is_file()
    (run.path / "last.pt").unlink()
    assert _as_before(run.path, manifest)
    first = rr.Replacing(run.path, _NAMES, lock=run.locked)
    with pytest.raises(UserInputError, match=r"is being replaced already: .* still at work; wait for it to finish$"):
        rr.Replacing(run.path, _NAMES, lock=run.locked)
    Run.create(run.path, _SPEC, force=True)  # another run, made without a set-aside, then the first's process died
    first._release()
    with pytest.raises(UserInputError, match=r"its command is gone, and the run folder now holds another run\); "
                                             r"move it out \(it is that run as it was\) or delete it"):
        rr.Replacing(run.path, _NAMES, lock=run.locked)
    assert (first.folder / "cnnpack.json").read_bytes() == manifest  # left where it is, named


def test_the_old_run_goes_back_only_over_the_run_that_replaced_it_and_a_put_back_taken_up_again_loses_nothing(
        tmp_path, monkeypatch):
    """Two `train --force` at once: the first, replaced by the second, put the original back over the second's run,
    and the second's put-back then removed it all; a kill in a put-back had the next opener remove what it had put
    back already; a folder whose owner's pid looked alive (another container's) was never judged."""
    import fcntl

    import cnnpack.run_replace as rr
    from cnnpack.rundir import Run

    run, manifest = _finished_run(tmp_path / "run")
    path = run.path
    first = rr.Replacing(path, _NAMES, lock=run.locked)
    Run.create(path, _SPEC, force=True, run_id=first.run_id)
    firsts = run.manifest_path.read_bytes()
    second = Run.create(path, _SPEC, force=True)  # another --force since (its own set-aside: another process's)
    assert first.put_back() is False and first.folder.is_dir()  # not over the second's run: left to `recover`
    live = Path(tempfile.mkdtemp(prefix=".replaced-", dir=path))  # a replacement at work: nothing is judged
    fd = os.open(live / ".owner.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        Run.open(path)
        assert first.folder.is_dir() and Run.open(path).opened_as == second.opened_as
    finally:
        os.close(fd)
        shutil.rmtree(live)
    run.manifest_path.write_bytes(firsts)  # the second failed and put the first's run back: the original goes back
    Run.open(path)
    assert _as_before(path, manifest)
    third = rr.Replacing(path, _NAMES, lock=run.locked)
    Run.create(path, _SPEC, force=True, run_id=third.run_id)
    (path / "last.pt").write_bytes(b"the new run's")
    moved = []

    class Killed(BaseException):
        pass

    def killed_after_two(src, dst):
        if len(moved) == 2:
            raise Killed
        moved.append(dst)
        os.rename(src, dst)

    monkeypatch.setattr(rr.os, "replace", killed_after_two)
    with pytest.raises(Killed):
        third.put_back()
    monkeypatch.undo()
    assert len(moved) == 2 and (path / "cnnpack.json").read_bytes() != manifest  # part-way, the manifest last
    Run.open(path)
    assert _as_before(path, manifest)
    fourth = rr.Replacing(path, _NAMES, lock=run.locked)
    took = Run.create(path, _SPEC, force=True, run_id=fourth.run_id)
    fourth.keep_new()
    assert Run.open(path).opened_as == took.opened_as and not (path / "checkpoint.pt").exists()
