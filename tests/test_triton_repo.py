"""cnnpack triton: config.pbtxt against golden files, versioning, refusals and the ensemble layout.

The configs are checked by parsing them back into tritonclient's ModelConfig; the `triton`-marked
test at the end loads the repository in a real Triton server (the nvidia-pytriton wheel).
Set CNNPACK_UPDATE_GOLDEN=1 to rewrite tests/assets/*.pbtxt after an intended change.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import json_format, text_format
from PIL import Image
from support import broken_chunk_png, matches_golden, record_fails
from tritonclient.grpc import model_config_pb2
from typer.testing import CliRunner

from cnnpack.atomic import atomic_write_json
from cnnpack.cli import app
from cnnpack.errors import StageFailed, UserInputError
from cnnpack.export import ExportConfig, create_run, export
from cnnpack.rundir import Run
from cnnpack.triton_repo import ModelIO, Tensor, TritonConfig, batch_limits, build, classifier_config, render

ASSETS = Path(__file__).parent / "assets"
CLASSES = ["circle", "square", "star"]
MAX_BATCH = 16


def _make_run(path: Path, seed: int = 0, formats=("onnx", "torchscript")) -> Path:
    create_run(path, arch="cnn", num_classes=3, image_size=32, classes=CLASSES, seed=seed, force=True)
    export(path, ExportConfig(formats=formats, max_batch_size=MAX_BATCH))
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A run with both artifacts, no training (read-only: copy it to modify)."""
    return _make_run(tmp_path_factory.mktemp("triton") / "run")


@pytest.fixture
def run(exported, tmp_path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(exported, dest)
    return dest


def _tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under root (hidden staging folders included)."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _parse(path: Path) -> model_config_pb2.ModelConfig:
    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def _cli(*args: str):
    return CliRunner().invoke(app, ["triton", *args])


# -- golden configs ---------------------------------------------------------------------------
GOLDEN = {
    "onnx_cpu": TritonConfig(format="onnx", instances=2, threads=4, preferred_batch_sizes=(4, 8), warmup=True),
    "torchscript_cpu": TritonConfig(format="torchscript", threads=2),
    "onnx_gpu_tensorrt": TritonConfig(format="onnx", device="gpu", tensorrt_fp16=True, warmup=True,
                                      preferred_batch_sizes=(8, 16)),
}


@pytest.mark.parametrize("case", list(GOLDEN))
def test_config_matches_golden_and_parses(run, tmp_path, case):
    cfg = GOLDEN[case]
    repo = tmp_path / "repo"
    section = build(run, TritonConfig(**{**cfg.__dict__, "repository": str(repo), "name": "classifier"}))
    got = (repo / "classifier/config.pbtxt").read_text()
    golden = ASSETS / f"config_{case}.pbtxt"
    matches_golden(got, golden)
    mc = _parse(repo / "classifier/config.pbtxt")
    assert mc.name == "classifier" and mc.max_batch_size == MAX_BATCH
    assert list(mc.input[0].dims) == [3, 32, 32] and list(mc.output[0].dims) == [3]
    assert mc.output[0].label_filename == "labels.txt"
    assert (repo / "classifier/labels.txt").read_text().splitlines() == CLASSES
    assert section["version"] == 1 and section["platform"] == mc.platform


def test_golden_files_parse():
    for path in sorted(ASSETS.glob("config_*.pbtxt")):
        assert _parse(path).platform in ("onnxruntime_onnx", "pytorch_libtorch", "torch_aoti"), path


def test_gpu_tensorrt_config_names():
    mc = _parse(ASSETS / "config_onnx_gpu_tensorrt.pbtxt")
    assert mc.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    (trt,) = mc.optimization.execution_accelerators.gpu_execution_accelerator
    assert trt.name == "tensorrt" and trt.parameters["precision_mode"] == "FP16"
    assert [(w.batch_size, w.inputs["input"].zero_data) for w in mc.model_warmup] == [(1, True), (MAX_BATCH, False)]
    cpu = _parse(ASSETS / "config_onnx_cpu.pbtxt")
    assert dict(cpu.parameters)["intra_op_thread_count"].string_value == "4"
    ts = _parse(ASSETS / "config_torchscript_cpu.pbtxt")
    assert ts.input[0].name == "INPUT__0" and dict(ts.parameters)["INTRA_OP_THREAD_COUNT"].string_value == "2"


def test_static_batch_artifact_gets_max_batch_size_zero():
    rec = {"format": "onnx", "max_batch_size": 8, "static_batch": 8}
    assert batch_limits(rec, TritonConfig(), Path("m.onnx")) == 0
    with pytest.raises(UserInputError, match="static batch of 8"):
        batch_limits(rec, TritonConfig(max_batch_size=8), Path("m.onnx"))
    io_ = ModelIO(Tensor("input", "float32", (8, 3, 32, 32)), Tensor("logits", "float32", (8, 3)), 0, "raw")
    mc = text_format.Parse(render(classifier_config("m", io_, TritonConfig(warmup=True))), model_config_pb2.ModelConfig())
    assert mc.max_batch_size == 0 and list(mc.input[0].dims) == [8, 3, 32, 32]
    assert not mc.HasField("dynamic_batching")
    assert mc.input[0].format == model_config_pb2.ModelInput.FORMAT_NONE  # Triton: NCHW needs exactly 3 dims


# -- versions -----------------------------------------------------------------------------------
def test_two_exports_give_versions_1_and_2(run, tmp_path):
    repo = tmp_path / "repo"
    cfg = TritonConfig(repository=str(repo), name="clf")
    assert build(run, cfg)["version"] == 1
    v1 = _tree(repo / "clf/1")
    stat1 = (repo / "clf/1/model.onnx").stat()

    again = build(run, TritonConfig(repository=str(repo), name="clf", instances=3))  # same artifact
    assert (again["version"], again["new_version"]) == (1, False)
    assert not (repo / "clf/2").exists()
    assert _parse(repo / "clf/config.pbtxt").instance_group[0].count == 3  # config still updated

    _make_run(run, seed=1, formats=("onnx",))  # retrained: same model, new weights
    second = build(run, cfg)
    assert (second["version"], second["new_version"], second["versions"]) == (2, True, [1, 2])
    assert _tree(repo / "clf/1") == v1
    assert (repo / "clf/1/model.onnx").stat().st_mtime_ns == stat1.st_mtime_ns
    assert _tree(repo / "clf/2") != v1
    side = json.loads((repo / "clf/cnnpack-model.json").read_text())
    assert set(side["versions"]) == {"1", "2"}
    assert not [p for p in (repo / "clf").iterdir() if p.name.startswith(".")]
    m = Run(run).read()["stages"]["triton"]
    assert (m["status"], m["name"], m["version"], m["format"]) == ("ok", "clf", 2, "onnx")
    assert m["repository"] == str(repo.resolve())


def test_laid_out_holds_while_the_repository_is_as_built_or_as_tune_left_it(run, tmp_path):
    """What the pipeline asks before it skips its triton stage: a file edited by hand is not what was laid out, a
    config.pbtxt `cnnpack tune` wrote (its digest in the manifest) is, and another run's later version is not (Triton
    serves the latest)."""
    from cnnpack.triton_repo import laid_out
    from cnnpack.tune_handover import write_winner

    repo = tmp_path / "repo"
    cfg = TritonConfig(repository=str(repo), name="clf", ensemble=True)
    assert not laid_out(Run(run), cfg)  # nothing there yet
    build(run, cfg)
    assert laid_out(Run(run), cfg)
    cache = repo / "clf_preprocess/1/__pycache__"  # what serving it leaves: Python's import of model.py
    cache.mkdir()
    (cache / "model.cpython-311.pyc").write_bytes(b"compiled")
    build(run, cfg)
    assert laid_out(Run(run), cfg) and not (repo / "clf_preprocess/2").exists()  # no copy of an unchanged model.py

    model = repo / "clf/1/model.onnx"
    good = model.read_bytes()
    model.write_bytes(good + b"junk")
    assert not laid_out(Run(run), cfg)
    model.write_bytes(good)
    labels = repo / "clf_image/labels.txt"
    labels.write_text(labels.read_text().replace("circle", "CIRCLE"))
    assert not laid_out(Run(run), cfg)
    build(run, cfg)  # mended in place: same artifact, no new version
    assert laid_out(Run(run), cfg) and not (repo / "clf/2").exists()

    r = Run(run)
    w = write_winner(r, "clf", (repo / "clf/config.pbtxt").read_text().replace("max_queue_delay_microseconds: 100",
                                                                                "max_queue_delay_microseconds: 500"))
    r.set_stage("tune", {"status": "ok", "points": [], "config": {"latency_budget_ms": 10.0}, "verdict": None,
                         "winner": None, "written": w,
                         "tuned": {w["config"]: {"previous": w["previous"], "sha256": w["sha256"]}}})
    assert laid_out(Run(run), cfg)  # tune's config stands
    Path(w["config"]).write_text(Path(w["config"]).read_text() + "\n# edited by hand\n")
    assert not laid_out(Run(run), cfg)

    other = _make_run(tmp_path / "other", seed=1, formats=("onnx",))  # the same model retrained, same repository
    build(other, TritonConfig(repository=str(repo), name="clf"))  # (its config.pbtxt over the edited one)
    assert (repo / "clf/2").is_dir() and laid_out(Run(other), TritonConfig(repository=str(repo), name="clf"))
    assert not laid_out(Run(run), cfg)  # Triton serves version 2, the other run's: this run's is laid out again
    build(run, cfg)
    assert laid_out(Run(run), cfg) and (repo / "clf/3").is_dir()


def test_a_model_laid_out_again_without_ensemble_keeps_its_image_ensemble_in_step(run, tmp_path):
    """`triton --max-batch-size 8` after `triton --ensemble` left the ensemble at 16 with a step that takes 8: Triton
    refused to load it. Its ensemble is now laid out with the model."""
    repo = tmp_path / "repo"
    build(run, TritonConfig(repository=str(repo), name="clf", ensemble=True))
    section = build(run, TritonConfig(repository=str(repo), name="clf", max_batch_size=8))
    assert section["ensemble"]["name"] == "clf_image"
    for model in ("clf", "clf_preprocess", "clf_image"):
        assert _parse(repo / model / "config.pbtxt").max_batch_size == 8, model
    other = build(run, TritonConfig(repository=str(repo), name="plain"))  # no ensemble there: none is made
    assert "ensemble" not in other and not (repo / "plain_image").exists()
    export(run, ExportConfig(formats=("onnx",), max_batch_size=4, static_batch=4))  # an ensemble cannot serve it
    before = _tree(repo)
    with pytest.raises(UserInputError, match=r"clf_image is clf's image ensemble, which needs a dynamic-batch export "
                                             r"\(this one has --static-batch 4\); re-export without --static-batch, or"):
        build(run, TritonConfig(repository=str(repo), name="clf", max_batch_size=4))
    assert _tree(repo) == before


def test_failed_version_leaves_nothing(run, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    build(run, TritonConfig(repository=str(repo), name="clf"))
    before = _tree(repo)
    _make_run(run, seed=1, formats=("onnx",))

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("cnnpack.triton_publish.shutil.copyfile", full_disk)
    with pytest.raises(StageFailed):
        build(run, TritonConfig(repository=str(repo), name="clf", instances=2))
    assert _tree(repo) == before  # no 2/, no staging folder, config untouched
    with pytest.raises(StageFailed):
        build(run, TritonConfig(repository=str(repo), name="fresh"))
    assert not (repo / "fresh").exists() and not list(tmp_path.glob(".cnnpack-staging-*"))


# -- refusals --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["../x", "/abs", "..", ".hidden", "a b", "a/b", "naïve"])
def test_bad_names_refused(run, tmp_path, name):
    r = _cli("--run", str(run), "--repository", str(tmp_path / "repo"), "--name", name)
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "model name" in r.stderr
    assert not (tmp_path / "repo").exists() and not (tmp_path / "x").exists()


def test_symlink_out_of_repository_refused(run, tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "link").symlink_to(tmp_path)
    r = _cli("--run", str(run), "--repository", str(repo), "--name", "link")
    assert r.exit_code == 2 and "outside the repository" in r.stderr


@pytest.mark.parametrize("bad", ["two\nlines", "tab\there", "nul\x00", ""])
def test_bad_class_names_refused(run, tmp_path, bad):
    m = Run(run).read()
    m["model"]["classes"][1] = bad
    atomic_write_json(Run(run).manifest_path, m)
    r = _cli("--run", str(run), "--repository", str(tmp_path / "repo"))
    assert r.exit_code == 2 and r.stderr.startswith("error: class 1") and r.stderr.count("\n") == 1
    assert not (tmp_path / "repo").exists()


def test_repository_that_is_a_file_refused(run, tmp_path):
    (tmp_path / "repo").write_text("not a folder")
    r = _cli("--run", str(run), "--repository", str(tmp_path / "repo"))
    assert r.exit_code == 2 and "is a file" in r.stderr


def test_a_model_folder_or_a_run_directory_is_not_a_repository(run, tmp_path):
    """A model folder given as the repository nested a model in it (repo/clf/clf/1); a run directory took the models
    among its own files, and serve then refused it as a run directory."""
    repo = tmp_path / "repo"
    assert _cli("--run", str(run), "--repository", str(repo), "--name", "clf").exit_code == 0
    before = _tree(repo)
    r = _cli("--run", str(run), "--repository", str(repo / "clf"))
    assert r.exit_code == 2 and f"--repository {repo / 'clf'} is a model folder; pass the repository that holds " \
        f"it, {repo}" in r.stderr and _tree(repo) == before
    r = _cli("--run", str(run), "--repository", str(run))
    assert r.exit_code == 2 and "is a run directory" in r.stderr and not (run / "cnn_onnx").exists()


def test_name_taken_by_another_model_needs_force(run, tmp_path):
    repo = tmp_path / "repo"
    assert _cli("--run", str(run), "--repository", str(repo), "--name", "m").exit_code == 0
    before = _tree(repo)
    r = _cli("--run", str(run), "--repository", str(repo), "--name", "m", "--format", "torchscript")
    assert r.exit_code == 2 and "different model" in r.stderr and "format" in r.stderr
    assert _tree(repo) == before
    (repo / "handmade").mkdir()
    (repo / "handmade/config.pbtxt").write_text('name: "handmade"')
    r = _cli("--run", str(run), "--repository", str(repo), "--name", "handmade")
    assert r.exit_code == 2 and "not made by cnnpack" in r.stderr
    for sidecar in (b"\xff", b"[]"):  # not UTF-8, not an object: not made by cnnpack either
        (repo / "handmade/cnnpack-model.json").write_bytes(sidecar)
        r = _cli("--run", str(run), "--repository", str(repo), "--name", "handmade")
        assert r.exit_code == 2 and "not made by cnnpack (no readable cnnpack-model.json)" in r.stderr, r.stderr
    (repo / "m/configs").mkdir()  # what deploy and tune leave for the old model: they do not fit the new one
    (repo / "m/configs/gpu.pbtxt").write_text('name: "m"\nplatform: "onnxruntime_onnx"')
    (repo / "m/config.pbtxt.prev").write_text('name: "m"')
    r = _cli("--run", str(run), "--repository", str(repo), "--name", "m", "--format", "torchscript", "--force")
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in (repo / "m").iterdir()) == ["2", "cnnpack-model.json", "config.pbtxt", "labels.txt"]
    assert _parse(repo / "m/config.pbtxt").platform == "pytorch_libtorch"


def test_a_run_whose_manifest_cannot_be_written_leaves_the_repository_alone(run, tmp_path, monkeypatch):
    import errno
    import tempfile

    real = tempfile.mkstemp

    def read_only_run(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == Path(run):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", read_only_run)
    r = _cli("--run", str(run), "--repository", str(tmp_path / "repo"))
    assert r.exit_code == 2 and "cnnpack.json: Read-only file system" in r.stderr, r.stderr
    assert not (tmp_path / "repo").exists()


def test_versions_the_manifest_could_not_record_are_taken_out_again(run, tmp_path, monkeypatch, capsys):
    """The disk filled between the check and the record: Triton serves the latest version, so one left there
    unrecorded would be served unverified."""
    repo = tmp_path / "repo"
    build(run, TritonConfig(repository=str(repo), name="clf"))
    before = _tree(repo)
    export(run, ExportConfig(formats=("onnx",), max_batch_size=8))  # another file: a version 2 to lay out
    record_fails(monkeypatch, "triton")
    for name in ("clf", "fresh"):  # a new version of a model, and a model made now
        with pytest.raises(OSError, match="No space left"):
            build(run, TritonConfig(repository=str(repo), name=name, max_batch_size=8))
    assert sorted(p.name for p in repo.iterdir()) == ["clf"] and _tree(repo) == before
    monkeypatch.undo()
    import cnnpack.triton_repo as tr

    real_publish = tr.publish

    def second_fails(root, draft, **kw):  # the classifier published, then its ensemble's preprocessing fails
        if draft.name.endswith("_preprocess"):
            raise StageFailed(f"could not write {root / draft.name}: [Errno 28] No space left on device")
        return real_publish(root, draft, **kw)

    monkeypatch.setattr(tr, "publish", second_fails)
    with pytest.raises(StageFailed, match="No space left"):
        build(run, TritonConfig(repository=str(repo), name="clf", max_batch_size=8, ensemble=True))
    assert _tree(repo) == before

    def read_only(root, draft, **kw):
        raise StageFailed(f"{root / draft.name}: Read-only file system")

    def cannot_write(path, data):
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(tr, "publish", read_only)
    monkeypatch.setattr(tr, "atomic_write_bytes", cannot_write)
    with pytest.raises(StageFailed, match="Read-only file system"):
        build(run, TritonConfig(repository=str(repo), name="clf", max_batch_size=8, ensemble=True))
    assert "could not put back" not in capsys.readouterr().err  # nothing had changed: said as if it had
    assert _tree(repo) == before


def test_a_force_that_cannot_be_recorded_gives_the_replaced_model_back(run, tmp_path, monkeypatch):
    """--force over another model of that name, then a full disk at the record, or in its own publish after the old
    versions went aside: the old model comes back whole (versions, deploy's GPU config, tune's undo copy)."""
    import errno

    import cnnpack.triton_publish as tp

    repo = tmp_path / "repo"
    build(run, TritonConfig(repository=str(repo), name="m"))
    (repo / "m/configs").mkdir()
    (repo / "m/configs/gpu.pbtxt").write_text('name: "m"\nplatform: "onnxruntime_onnx"')
    (repo / "m/config.pbtxt.prev").write_text('name: "m"')
    before = _tree(repo)
    forced = TritonConfig(repository=str(repo), name="m", format="torchscript", force=True)
    record_fails(monkeypatch, "triton")
    with pytest.raises(OSError, match="No space left"):
        build(run, forced)
    assert _tree(repo) == before and sorted(p.name for p in (repo / "m").iterdir()) == [
        "1", "cnnpack-model.json", "config.pbtxt", "config.pbtxt.prev", "configs", "labels.txt"]
    monkeypatch.undo()
    real_top = tp._write_top

    def sidecar_fails(folder, top):  # the new version is in place and the old ones aside: then the disk fills
        if tp.SIDECAR in top:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_top(folder, top)

    monkeypatch.setattr(tp, "_write_top", sidecar_fails)
    with pytest.raises(StageFailed, match="No space left"):
        build(run, forced)
    assert _tree(repo) == before
    monkeypatch.undo()
    build(run, forced)  # and once it is recorded, what was set aside is gone
    assert sorted(p.name for p in (repo / "m").iterdir()) == ["2", "cnnpack-model.json", "config.pbtxt", "labels.txt"]


def test_manifest_and_graph_must_agree(run, tmp_path):
    m = Run(run).read()
    m["stages"]["export"]["artifacts"]["onnx"]["input"]["name"] = "images"
    atomic_write_json(Run(run).manifest_path, m)
    r = _cli("--run", str(run), "--repository", str(tmp_path / "repo"))
    assert r.exit_code == 2 and "disagree" in r.stderr and not (tmp_path / "repo").exists()


@pytest.mark.parametrize("args, msg", [
    (["--max-batch-size", "17"], "1..16"),
    (["--preferred-batch-sizes", "4,32"], "outside 1..16"),
    (["--tensorrt-fp16"], "--device gpu"),
    (["--format", "torchscript", "--device", "gpu", "--tensorrt"], "--format onnx"),
    (["--device", "gpu", "--threads", "2"], "--device cpu"),
    (["--format", "tflite"], "valid: onnx, onnx_int8, pt2, torchscript"),
    (["--instances", "99999999999999999999"], "--instances must be >= 1 and <= 1,024"),
    (["--max-queue-delay-us", "99999999999999999999"], "--max-queue-delay-us must be >= 0 and <= 60,000,000"),
    (["--no-dynamic-batching", "--max-queue-delay-us", "500"], "--max-queue-delay-us configures the dynamic batcher"),
])
def test_bad_options_refused(run, tmp_path, args, msg):
    r = _cli("--run", str(run), "--repository", str(tmp_path / "repo"), *args)
    assert r.exit_code == 2 and msg in r.stderr, r.stderr
    assert not (tmp_path / "repo").exists()


# -- ensemble ------------------------------------------------------------------------------------------
def test_ensemble_layout(run, tmp_path):
    repo = tmp_path / "repo"
    r = _cli("--run", str(run), "--repository", str(repo), "--name", "clf", "--ensemble", "--json")
    assert r.exit_code == 0, r.stderr
    section = json.loads(r.stdout)
    assert section["ensemble"] == {"name": "clf_image", "version": 1, "preprocess": "clf_preprocess",
                                   "preprocess_version": 1, "input": "image", "output": "logits"}
    assert sorted(p.name for p in repo.iterdir()) == ["clf", "clf_image", "clf_preprocess"]
    for cfg in repo.glob("*/config.pbtxt"):
        assert _parse(cfg).name == cfg.parent.name
    shipped = Path(__file__).parents[1] / "cnnpack/backends/preprocess/model.py"
    assert (repo / "clf_preprocess/1/model.py").read_bytes() == shipped.read_bytes()
    pre = _parse(repo / "clf_preprocess/config.pbtxt")
    assert pre.backend == "python" and list(pre.output[0].dims) == [3, 32, 32]
    from cnnpack.report_serving import _release_note  # the report's docker line says the stock image lacks Pillow

    assert "`clf_preprocess` runs in its Python backend and imports Pillow" in _release_note(repo)
    ens = _parse(repo / "clf_image/config.pbtxt")
    assert ens.platform == "ensemble" and ens.input[0].data_type == model_config_pb2.TYPE_STRING
    assert [s.model_name for s in ens.ensemble_scheduling.step] == ["clf_preprocess", "clf"]
    assert dict(ens.ensemble_scheduling.step[1].input_map) == {"input": "pixels"}
    assert (repo / "clf_image/1").is_dir() and (repo / "clf_image/labels.txt").read_text().split() == CLASSES
    before = _tree(repo)
    assert _cli("--run", str(run), "--repository", str(repo), "--name", "clf", "--ensemble").exit_code == 0
    assert _tree(repo) == before  # nothing changed: no new versions anywhere

    # a repository laid out by another cnnpack keeps that one's preprocessing: serve names it and the command
    from cnnpack.triton_publish import stale_preprocessing

    served = [("clf", "1"), ("clf_preprocess", "1"), ("clf_image", "1")]
    assert stale_preprocessing(repo, served) == []
    (repo / "clf_preprocess/1/model.py").write_bytes(shipped.read_bytes() + b"# an older cnnpack's\n")
    (note,) = stale_preprocessing(repo, served)
    assert note.startswith("clf_preprocess v1 runs the image preprocessing of another cnnpack version")
    command = note.split("`")[1].split()
    assert command[:2] == ["cnnpack", "triton"] and "--name" in command
    assert _cli(*command[2:]).exit_code == 0
    assert (repo / "clf_preprocess/2/model.py").read_bytes() == shipped.read_bytes()
    assert stale_preprocessing(repo, [("clf_preprocess", "2")]) == []


class _Req(dict):
    pass


def _fake_pb_utils() -> types.ModuleType:
    """Just enough of triton_python_backend_utils to run the shipped model.py in-process."""
    pb = types.ModuleType("triton_python_backend_utils")
    pb.get_output_config_by_name = lambda cfg, name: next(o for o in cfg["output"] if o["name"] == name)
    pb.triton_string_to_numpy = lambda s: {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16}[s]
    pb.get_input_tensor_by_name = lambda req, name: types.SimpleNamespace(as_numpy=lambda: req[name])
    pb.Tensor = lambda name, arr: (name, arr)
    pb.TritonError = lambda msg: msg
    pb.InferenceResponse = lambda output_tensors, error=None: types.SimpleNamespace(out=output_tensors, error=error)
    return pb


def test_preprocess_matches_training_pipeline(run, tmp_path, monkeypatch):
    from cnnpack.images import read_image

    repo = tmp_path / "repo"
    build(run, TritonConfig(repository=str(repo), name="clf", ensemble=True))
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", _fake_pb_utils())
    spec = importlib.util.spec_from_file_location("pre_model", repo / "clf_preprocess/1/model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mc = json_format.MessageToDict(_parse(repo / "clf_preprocess/config.pbtxt"), preserving_proto_field_name=True)
    model = mod.TritonPythonModel()
    model.initialize({"model_config": json.dumps(mc)})

    rgba = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 4), dtype=np.uint8), "RGBA")
    rgba.save(tmp_path / "a.png")
    Image.new("L", (20, 64), 90).save(tmp_path / "b.png")
    ramp = np.linspace(0, 65535, 36 * 36).reshape(36, 36).astype(np.uint16)  # 16-bit grey: scaled, not clipped
    Image.fromarray(ramp).save(tmp_path / "c.png")
    thin = np.linspace(0, 255, 3000).astype(np.uint8)[None, :, None].repeat(3, 2)  # 1 x 3000: resampled in place
    Image.fromarray(thin).save(tmp_path / "d.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # a phone's photo: turned upright, as in training
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (20, 40, 3), dtype=np.uint8)).save(
        tmp_path / "e.jpg", exif=exif)
    Image.fromarray(np.linspace(0, 1, 30 * 30, dtype=np.float32).reshape(30, 30)).save(tmp_path / "f.tif")
    keyed = np.random.default_rng(2).integers(0, 4, (24, 24, 3), dtype=np.uint8) * 60
    Image.fromarray(keyed).save(tmp_path / "g.png", transparency=(0, 0, 0))  # a tRNS colour key: over white too
    Image.fromarray(keyed[:, :, 0].astype(np.uint16) * 257).save(tmp_path / "h.png", transparency=0)  # 16-bit key
    photo = np.random.default_rng(3).integers(0, 255, (300, 420, 3), dtype=np.uint8)  # decoded at 1/4 (105x75)
    Image.fromarray(photo).save(tmp_path / "i.jpg", quality=90, exif=exif)
    Image.fromarray(photo).convert("CMYK").save(tmp_path / "j.jpg")
    names = ("a.png", "b.png", "c.png", "d.png", "e.jpg", "f.tif", "g.png", "h.png", "i.jpg", "j.jpg")
    blobs = [[(tmp_path / n).read_bytes()] for n in names]
    good = _Req(image=np.array(blobs, dtype=object))
    bad = _Req(image=np.array([[b"not an image"]], dtype=object))
    broken = _Req(image=np.array([[broken_chunk_png()]], dtype=object))  # SyntaxError from Pillow
    ok, err, err2 = model.execute([good, bad, broken])  # requests in one call, as the dynamic batcher sends them
    (name, pixels), = ok.out
    assert name == "pixels" and pixels.dtype == np.float32 and pixels.shape == (10, 3, 32, 32)
    for i, n in enumerate(names):
        np.testing.assert_array_equal(pixels[i], read_image(tmp_path / n, 32).astype(np.float32))
    assert err.out == [] and "cannot decode image" in err.error and "BytesIO" not in err.error
    assert err2.out == [] and "cannot decode image: SyntaxError: broken PNG file" in err2.error


# -- a real Triton server ---------------------------------------------------------------------------------
@pytest.mark.triton
@pytest.mark.slow
def test_served_repository_classifies_png(run, tmp_path):
    serve = pytest.importorskip("cnnpack.serve")
    import tritonclient.http as http

    from cnnpack.images import read_image
    from cnnpack.rundir import Run
    from cnnpack.runtimes import load_runtime

    repo = tmp_path / "repo"
    build(run, TritonConfig(repository=str(repo), name="clf", ensemble=True, warmup=True))
    png = tmp_path / "photo.png"
    pixels = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)  # not square: resized, cropped
    Image.fromarray(pixels).save(png)
    eager = load_runtime(Run.open(run), "eager").predict(read_image(png, 32)[None].astype(np.float32))[0]
    with serve.TritonServer(repo) as server:
        client = http.InferenceServerClient(server.http_url.removeprefix("http://"))
        data = np.array([[png.read_bytes()]], dtype=object)
        inp = http.InferInput("image", data.shape, "BYTES")
        inp.set_data_from_numpy(data)
        logits = client.infer("clf_image", [inp]).as_numpy("logits")[0]
        np.testing.assert_allclose(logits, eager, atol=1e-4)  # decoded, resized and cropped as cnnpack reads it
        res = client.infer("clf_image", [inp], outputs=[http.InferRequestedOutput("logits", class_count=1)])
        assert res.as_numpy("logits")[0][0].decode().split(":")[2] == CLASSES[int(eager.argmax())]


def test_the_docker_line_gives_the_container_the_gpus_a_gpu_config_asks_for(tmp_path):
    from cnnpack.triton_dist import docker_line

    for name, kind in (("cnn_onnx", "KIND_CPU"), ("cnn_torchscript", "KIND_CPU")):
        (tmp_path / "cpu" / name).mkdir(parents=True)
        (tmp_path / "cpu" / name / "config.pbtxt").write_text(f'name: "{name}"\ninstance_group {{ kind: {kind} }}\n')
    assert "--gpus" not in docker_line(tmp_path / "cpu")
    (tmp_path / "cpu" / "cnn_onnx" / "config.pbtxt").write_text('name: "cnn_onnx"\ninstance_group { kind: KIND_GPU }\n')
    assert docker_line(tmp_path / "cpu").startswith("docker run --rm --gpus all -p8000:8000")  # else it fails to load


def test_without_repository_a_run_laid_out_before_is_added_to_where_it_was_from_any_folder(run, tmp_path, monkeypatch):
    """`cnnpack triton --run ../run` from another folder started a ./model_repository there and moved the run's
    triton stage to it; a following deploy shipped that one model alone."""
    first = tmp_path / "repo"
    assert _cli("--run", str(run), "--repository", str(first), "--format", "onnx").exit_code == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    res = _cli("--run", str(run), "--format", "torchscript")
    assert res.exit_code == 0, res.output
    assert not (elsewhere / "model_repository").exists()
    assert {p.name for p in first.iterdir() if p.is_dir()} >= {"cnn_onnx", "cnn_torchscript"}
    assert Run.open(run).read()["stages"]["triton"]["repository"] == str(first.resolve())
    fresh = tmp_path / "fresh"  # a run never laid out: ./model_repository, as before
    shutil.copytree(run, fresh)
    Run.open(fresh).update(lambda m: m["stages"].pop("triton"))
    assert _cli("--run", str(fresh), "--format", "onnx").exit_code == 0 and (elsewhere / "model_repository/cnn_onnx").is_dir()


def test_what_a_killed_layout_left_in_a_model_folder_or_beside_the_repository_is_removed_by_the_next(run, tmp_path):
    """SIGKILL after `triton --force` put its version in place left the replaced model's versions hidden in a
    randomly named .cnnpack-staging-* folder for good (and a partial version where it was killed sooner)."""
    import subprocess

    from cnnpack.atomic import owner_tag
    from cnnpack.triton_publish import STAGING_PREFIX

    repo = tmp_path / "repo"
    build(run, TritonConfig(repository=str(repo), name="clf"))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    gone = f"{STAGING_PREFIX}{owner_tag().split('_')[0]}_{dead.pid}_"
    for place in (repo / "clf", tmp_path):
        (place / f"{gone}x1" / "1").mkdir(parents=True)
    live = repo / "clf" / f"{STAGING_PREFIX}{owner_tag()}x2"  # a layout at work
    live.mkdir()
    before = _tree(repo)
    build(run, TritonConfig(repository=str(repo), name="clf"))  # nothing new to lay out: the folder is tidied
    assert not (repo / "clf" / f"{gone}x1").exists() and live.is_dir() and (tmp_path / f"{gone}x1").is_dir()
    assert _tree(repo) == before  # (no file of the model's own changed)
    build(run, TritonConfig(repository=str(repo), name="other"))  # a new model, staged beside the repository
    assert not (tmp_path / f"{gone}x1").exists() and (repo / "other" / "1").is_dir()


def _image_files(folder: Path) -> list[Path]:
    """Files users have: rotated phone photos, CMYK, alpha, palette transparency, 16-bit, first frames, odd shapes, a
    large JPEG (decoded at a reduced scale)."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (90, 140, 3), dtype=np.uint8))
    folder.mkdir()
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    rgb.save(folder / "rotated.jpg", exif=exif)
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    rgb.save(folder / "progressive.jpg", progressive=True)
    rgba = rgb.convert("RGBA")
    rgba.putalpha(Image.fromarray(rng.integers(0, 256, (90, 140), dtype=np.uint8)))
    rgba.save(folder / "alpha.png")
    pal = rgb.convert("P", palette=Image.ADAPTIVE, colors=16)
    pal.info["transparency"] = 3
    pal.save(folder / "palette.png", transparency=3)
    Image.fromarray((rng.integers(0, 65536, (70, 50))).astype(np.uint16)).save(folder / "gray16.png")
    rgb.convert("LA").save(folder / "la.png")
    frames = [rgb.convert("P"), rgb.rotate(90).convert("P")]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    rgb.resize((1800, 400)).save(folder / "wide.jpg", quality=90)
    rgb.resize((30, 700)).save(folder / "tall.png")
    rgb.save(folder / "plain.webp")
    return sorted(folder.iterdir())


def test_the_ensemble_s_preprocessing_decodes_as_training_does(tmp_path, monkeypatch):
    """The ensemble's model.py carries its own copy of cnnpack.images' decoding (it runs in Triton without cnnpack):
    the same file must give the same pixels, or the served model classifies other images than it was trained on."""
    from cnnpack.images import read_image

    utils = types.ModuleType("triton_python_backend_utils")
    utils.get_output_config_by_name = lambda config, name: next(o for o in config["output"] if o["name"] == name)
    utils.triton_string_to_numpy = {"TYPE_FP32": np.float32}.get
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", utils)
    spec = importlib.util.spec_from_file_location("preprocess", Path(__file__).parents[1] /
                                                  "cnnpack/backends/preprocess/model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps({"output": [{"name": "pixels", "dims": [3, 48, 48],
                                                              "data_type": "TYPE_FP32"}]})})
    files = _image_files(tmp_path / "images")
    assert len(files) == 11
    for f in files:
        trained = read_image(f, 48).astype(np.float32)
        served = model.decode(f.read_bytes())
        assert served.shape == trained.shape == (3, 48, 48), f.name
        assert np.array_equal(served, trained), (f.name, float(np.abs(served - trained).max()))


def test_the_reports_repository_tree_shows_the_model_it_names_and_says_what_it_cut(tmp_path):
    """A repository of 7 formats with their image ensembles (105 entries): the report named cnn_torchscript above a tree
    cut at 60 lines, without a word, before that model's folder."""
    from cnnpack.report_serving import _tree

    for m in [f"m{i:02d}" for i in range(30)] + ["zz", "zz_image", "zz_int8", "zz_preprocess", "zzz"]:
        (tmp_path / m / "1").mkdir(parents=True)
        (tmp_path / m / "config.pbtxt").write_text("")
    lines = _tree(tmp_path, "zz").splitlines()
    assert lines[1:4] == ["  zz/", "    1/", "    config.pbtxt"] and "  zz_image/" in lines[:61]
    assert "  zz_preprocess/" in lines and "  zzz/" not in lines and "  zz_int8/" not in lines  # another model
    assert len(lines) == 62 and lines[-1] == f"  … {35 * 3 - 60} more (`find {tmp_path}` lists them)"
    assert "more" not in _tree(tmp_path / "m00", "m00")  # all of it fits: no line about a cut


def test_a_different_model_is_said_in_a_user_s_words_not_the_sidecar_s_keys(tmp_path):
    """Another run's ensemble part in the way was "(arch, classes, for, format, kind, output differ)": `for` and `kind`
    are keys of cnnpack-model.json."""
    import json

    from cnnpack.triton_publish import SIDECAR, Draft, conflict

    (tmp_path / SIDECAR).write_text(json.dumps({"identity": {"kind": "ensemble", "for": "cnn_onnx", "classes": ["a"]}}))
    draft = Draft("cnn_onnx_image", {"kind": "preprocess", "for": "other_onnx", "classes": ["a"]}, {}, {})
    assert conflict(tmp_path, draft) == ("it holds a different model (kind of model (classifier, preprocess, ensemble), "
                                         "model it is part of differ)")
