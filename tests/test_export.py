"""cnnpack export: real ONNX Runtime and TorchScript, checked against eager on raw pixels."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from support import forked_cli

from cnnpack.errors import UserInputError
from cnnpack.export import ExportConfig, create_run, export
from cnnpack.rundir import Run, sha256
from cnnpack.runtimes import load_runtime

MAX_BATCH = 16


def _pixels(n: int, size: int, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, 3, size, size)) * 255).astype(np.float32)


def _check_artifacts(run_dir, size: int, tmp_path) -> None:
    """ONNX at batch 1, 7 and max; TorchScript in a fresh process; both equal eager within 1e-4."""
    run = Run.open(run_dir)
    eager = load_runtime(run, "eager")
    sess = ort.InferenceSession(str(run_dir / "export/model.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 7, MAX_BATCH):
        x = _pixels(n, size, seed=n)
        got = sess.run(None, {"input": x})[0]
        assert got.shape == (n, run.model_spec["num_classes"])
        np.testing.assert_allclose(got, eager.predict(x), atol=1e-4, rtol=0)
    x = _pixels(7, size, seed=99)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "ref.npy", eager.predict(x))
    code = (
        "import sys, numpy as np, torch, json\n"
        f"m = torch.jit.load({str(run_dir / 'export/model.pt')!r}, _extra_files=(ex := {{'cnnpack.json': ''}}))\n"
        f"x = np.load({str(tmp_path / 'x.npy')!r}); ref = np.load({str(tmp_path / 'ref.npy')!r})\n"
        "y = m(torch.from_numpy(x)).detach().numpy()\n"
        "print(json.dumps({'err': float(np.abs(y - ref).max()), 'classes': json.loads(json.loads(ex['cnnpack.json'])['classes'])}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["err"] <= 1e-4
    assert res["classes"] == run.model_spec["classes"]


@pytest.mark.slow
def test_cnn_export_matches_eager(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    section = export(run_dir, ExportConfig(max_batch_size=MAX_BATCH))
    assert set(section["artifacts"]) == {"onnx", "torchscript"}
    onnx_rec = section["artifacts"]["onnx"]
    assert onnx_rec["input"] == {"name": "input", "dtype": "float32", "shape": [-1, 3, 32, 32]}
    assert onnx_rec["output"]["name"] == "logits"
    assert onnx_rec["opset"] == 18 and onnx_rec["ir_version"] >= 8
    assert onnx_rec["sha256"] == sha256(run_dir / "export/model.onnx")
    assert section["artifacts"]["torchscript"]["input"]["name"] == "INPUT__0"
    _check_artifacts(run_dir, 32, tmp_path)
    script = (run_dir / "export/reproduce.sh").read_text()
    assert "--format onnx" in script and "--format torchscript" in script
    assert str(run_dir) not in script and script.count('--run "$RUN"') == 2  # the run it sits in, from any folder
    moved = tmp_path / "a copy"
    shutil.copytree(run_dir, moved)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    again = subprocess.run(["bash", str(moved / "export/reproduce.sh")], cwd="/", env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert sha256(moved / "export/model.onnx") == onnx_rec["sha256"]  # made again, the same bytes
    assert Run.open(moved).read()["stages"]["export"]["artifacts"]["onnx"]["sha256"] == onnx_rec["sha256"]


def test_a_torch_without_adaptive_max_pool_s_decomposition_still_exports_the_cnn(tiny_run, tmp_path, monkeypatch):
    """torch before 2.13 (2.11 on the GPU machine) has none, and the built-in cnn's global max pool failed to export
    to ONNX: cnnpack translates it as ReduceMax over height and width."""
    from torch._decomp import decompositions

    from cnnpack import export_onnx

    monkeypatch.delattr(decompositions, "adaptive_max_pool2d", raising=False)  # as in torch 2.11
    translations, pooled = export_onnx._older_torch_translations, []

    def counted():  # the translation, counting the pools it took (torch 2.14 would also decompose them itself)
        ((op, translate),) = translations()["custom_translation_table"].items()
        return {"custom_translation_table": {op: lambda x, size: pooled.append(list(size)) or translate(x, size)}}

    monkeypatch.setattr(export_onnx, "_older_torch_translations", counted)
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    export(run_dir, ExportConfig(formats=("onnx",), max_batch_size=MAX_BATCH))
    assert pooled == [[1, 1]]
    eager = load_runtime(Run.open(run_dir), "eager")
    sess = ort.InferenceSession(str(run_dir / "export/model.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        x = _pixels(n, 32, seed=n)
        np.testing.assert_allclose(sess.run(None, {"input": x})[0], eager.predict(x), atol=1e-4, rtol=0)


def test_onnx_metadata_carries_the_model_spec(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    export(run_dir, ExportConfig(formats=("onnx",)))
    props = {p.key: p.value for p in onnx.load(str(run_dir / "export/model.onnx")).metadata_props}
    spec = Run.open(run_dir).model_spec
    assert json.loads(props["classes"]) == spec["classes"] == ["circle", "crescent", "cross", "square", "star", "triangle"]
    assert json.loads(props["mean"]) == spec["mean"]
    assert props["image_size"] == "32" and props["arch"] == "cnn" and props["cnnpack_version"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v3_small"])
def test_torchvision_export_without_training(arch, tmp_path):
    run_dir = tmp_path / arch
    create_run(run_dir, arch=arch, num_classes=5, image_size=64)
    export(run_dir, ExportConfig(max_batch_size=MAX_BATCH))
    _check_artifacts(run_dir, 64, tmp_path)


def test_a_run_whose_training_has_not_finished_is_exported_with_a_warning(tiny_run, tmp_path, caplog):
    """Its best epoch so far is what a user may want to try, but not without a word (it was exported silently)."""
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    Run.open(run).update(lambda m: m["stages"]["train"].update(status="interrupted"))
    export(run, ExportConfig(formats=("onnx",)))
    assert (f"warning: {run}'s training has not finished (train interrupted): exporting its best epoch so far; "
            f"`cnnpack train --run {run} --resume` continues it") in caplog.text


def test_legacy_exporter_and_static_batch(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    rec = export(run_dir, ExportConfig(formats=("onnx",), exporter="legacy", opset=17, static_batch=4))["artifacts"]["onnx"]
    assert rec["opset"] == 17 and rec["input"]["shape"] == [4, 3, 32, 32] and rec["max_batch_size"] == 4
    dims = onnx.load(str(run_dir / "export/model.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [4, 3, 32, 32]


def test_normalized_input_exports_the_bare_network(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    export(run_dir, ExportConfig(formats=("onnx",), input="normalized"))
    spec = Run.open(run_dir).model_spec
    x = _pixels(3, 32)
    mean = np.array(spec["mean"], np.float32).reshape(1, 3, 1, 1)
    std = np.array(spec["std"], np.float32).reshape(1, 3, 1, 1)
    sess = ort.InferenceSession(str(run_dir / "export/model.onnx"), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": (x / 255 - mean) / std})[0]
    np.testing.assert_allclose(got, load_runtime(Run.open(run_dir), "eager").predict(x), atol=1e-4)


def test_failed_export_keeps_previous_artifact_and_manifest(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    export(run_dir, ExportConfig(formats=("onnx",)))
    before_file = (run_dir / "export/model.onnx").read_bytes()
    before_manifest = (run_dir / "cnnpack.json").read_text()
    # the compact CNN's adaptive max pool has no opset-7 form: the exporter refuses
    with pytest.raises(UserInputError, match="adaptive_max_pool2d.*opset 7"):
        export(run_dir, ExportConfig(formats=("onnx",), exporter="legacy", opset=7))
    assert (run_dir / "export/model.onnx").read_bytes() == before_file
    assert (run_dir / "cnnpack.json").read_text() == before_manifest
    assert not [p for p in (run_dir / "export").iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    "cfg, message",
    [
        (ExportConfig(formats=("tflite",)), "unknown format 'tflite'; valid: onnx, torchscript"),
        (ExportConfig(opset=12), "opsets 18..23"),
        (ExportConfig(exporter="legacy", opset=30), "opsets 7..20"),
        (ExportConfig(max_batch_size=0), "--max-batch-size must be >= 2"),
        (ExportConfig(max_batch_size=1), "for a batch of one only, export --static-batch 1"),
        (ExportConfig(max_batch_size=10**10), "--max-batch-size must be at most 2,147,483,647"),  # Triton's int32
        (ExportConfig(half=True), "--half"),
    ],
)
def test_bad_export_options(tiny_run, cfg, message):
    with pytest.raises(UserInputError, match=message.replace("(", r"\(").replace(".", r"\.")):
        export(tiny_run, cfg)


def test_missing_run_and_missing_checkpoint(tmp_path, tiny_run):
    with pytest.raises(UserInputError, match="no such run directory"):
        export(tmp_path / "nope")
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    (run_dir / "checkpoint.pt").unlink()
    with pytest.raises(UserInputError, match="checkpoint.pt is missing: the run.s weights are gone"):
        export(run_dir)


def test_foreign_weights_are_refused_before_anything_is_written(tmp_path):
    wrong = tmp_path / "wrong.pt"
    torch.save({"fc.weight": torch.zeros(3, 3)}, wrong)
    with pytest.raises(UserInputError, match="not a state dict for this model"):
        create_run(tmp_path / "r", arch="resnet18", num_classes=3, image_size=64, weights=str(wrong))
    assert not (tmp_path / "r").exists()
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(UserInputError, match="not a loadable weights file"):
        create_run(tmp_path / "r", arch="resnet18", num_classes=3, image_size=64, weights=str(tmp_path / "junk.pt"))


def test_an_arch_that_cannot_take_the_size_is_refused_before_a_run_is_made(tmp_path):
    """export --arch alexnet at 32 px: torch.onnx's boilerplate first line ("Failed to export the model with
    torch.export...") hid the reason, and the run it had made needed --force before a larger size could be tried."""
    with pytest.raises(UserInputError, match=r"--arch alexnet cannot classify 32px images \(.*\); try a larger"):
        create_run(tmp_path / "r", arch="alexnet", num_classes=3, image_size=32)
    assert not (tmp_path / "r").exists()


def test_an_onnx_export_failure_names_the_error_torch_onnx_wraps():
    from cnnpack.export_onnx import first_line

    try:
        try:
            raise RuntimeError("Given input size: (256x1x1). Calculated output size: (256x0x0). Output size is too small")
        except RuntimeError as inner:
            raise RuntimeError("Failed to export the model with torch.export. This is step 1/3 of exporting\nmore") \
                from inner
    except RuntimeError as e:
        assert first_line(e).startswith("Given input size: (256x1x1)")
    assert first_line(ValueError()) == "ValueError"


def test_a_ctrl_c_inside_torch_s_lazy_import_is_an_interrupt_not_a_failed_export(tiny_run, tmp_path, monkeypatch):
    """SIGINT during `cnnpack export` came out as "ONNX export (dynamo, opset 18) failed: module 'torch._dynamo' has
    no attribute 'exc'", exit 1: the KeyboardInterrupt was the context of the AttributeError torch then raised."""
    import cnnpack.export_onnx as ex

    def interrupted_import(*args, **kwargs):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise AttributeError("module 'torch._dynamo' has no attribute 'exc'") from None  # a context, not a cause

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = (run / "cnnpack.json").read_bytes()
    monkeypatch.setattr(ex, "_onnx_export", interrupted_import)
    with pytest.raises(KeyboardInterrupt):
        export(run, ExportConfig(formats=("onnx",)))
    assert (run / "cnnpack.json").read_bytes() == before and not list(run.glob("export/*.onnx"))


def test_weights_file_round_trip(tmp_path):
    """--weights FILE: the exported model computes with exactly those weights."""
    from cnnpack.models import build_model
    from cnnpack.spec import ModelSpec

    torch.manual_seed(123)
    model = build_model(ModelSpec(arch="cnn", num_classes=3, classes=("a", "b", "c"), image_size=32))
    torch.save(model.state_dict(), tmp_path / "w.pt")
    run = create_run(tmp_path / "r", arch="cnn", num_classes=3, image_size=32, classes=["a", "b", "c"],
                     weights=str(tmp_path / "w.pt"))
    loaded = torch.load(run.file("checkpoint.pt"), weights_only=True)["state_dict"]
    assert all(torch.equal(loaded[k], v) for k, v in model.state_dict().items())


def test_reproduce_sh_makes_what_came_from_an_earlier_onnx_export_before_exporting_it_again(tmp_path):
    """export all + quantize, then `export --format onnx --input normalized`: the script's OpenVINO line converted
    the new ONNX file (refused: it takes normalized pixels) and its quantize line quantized the new file. Now the IR's
    source is re-created first with the IR's own options, and what was made from the same file follows it; an artifact
    of a source the run cannot re-create is said, not made from another file."""
    from cnnpack.reproduce import write_reproduce
    from cnnpack.spec import ModelSpec

    run = Run.create(tmp_path / "run", ModelSpec(arch="cnn", num_classes=2, classes=("a", "b"), image_size=32).to_dict())
    raw = {"exporter": "dynamo", "opset": 18, "max_batch_size": 64, "static_batch": None, "torchscript_mode": "trace",
           "input": "raw", "device": "cpu"}
    io = {"input": {"name": "input", "dtype": "float32", "shape": [-1, 3, 32, 32]},
          "output": {"name": "logits", "dtype": "float32", "shape": [-1, 2]}, "max_batch_size": 64}
    arts = {"onnx": {"path": "export/model.onnx", "sha256": "b" * 64, "config": {**raw, "input": "normalized"}},
            "openvino": {"path": "export/openvino/model.xml", "sha256": "c" * 64, "config": raw,
                         "source": {"format": "onnx", "sha256": "a" * 64}},
            "onnx_int8": {"path": "export/model.int8.onnx", "sha256": "d" * 64, "command": "cnnpack quantize --run x",
                          "source": {"format": "onnx", "path": "export/model.onnx", "sha256": "a" * 64}},
            "openvino_int8": {"path": "export/openvino_int8/model.xml", "sha256": "e" * 64,
                              "command": "cnnpack quantize --run x --backend openvino",
                              "source": {"format": "openvino", "sha256": "c" * 64}}}
    arts = {fmt: {**io, **rec} for fmt, rec in arts.items()}
    run.update(lambda m: m["stages"].update(export={"status": "ok", "artifacts": arts}))
    (tmp_path / "run" / "export").mkdir()
    write_reproduce(run)
    commands = [line for line in (tmp_path / "run/export/reproduce.sh").read_text().splitlines()
                if line.startswith("cnnpack ")]
    assert [c.split(" --exporter")[0] for c in commands] == [
        'cnnpack export --run "$RUN" --format onnx', 'cnnpack export --run "$RUN" --format openvino',
        'cnnpack quantize --run "$RUN"', 'cnnpack export --run "$RUN" --format onnx',
        'cnnpack quantize --run "$RUN" --backend openvino']
    assert "--input raw" in commands[0] and "--input normalized" in commands[3]
    del arts["openvino"], arts["openvino_int8"]  # nothing re-creates the earlier ONNX file: the int8 one is said
    run.update(lambda m: m["stages"]["export"].update(artifacts=arts))
    write_reproduce(run)
    script = (tmp_path / "run/export/reproduce.sh").read_text()
    assert "cnnpack quantize" not in script and "exported again since with options this run does not record" in script


def test_export_arch_with_force_replaces_the_trained_run_and_its_files(tiny_run, tmp_path):
    """export --arch --force over a trained run: the trained model's history, plots, exports and report went stale
    beside the new model's checkpoint; they go with the run they belonged to (a user's own file stays)."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    (run_dir / "export").mkdir()
    (run_dir / "export" / "model.onnx").write_bytes(b"old")
    (run_dir / "report.md").write_text("old")
    (run_dir / "notes.txt").write_text("mine")
    with pytest.raises(UserInputError, match="already holds a run; pass --force"):
        create_run(run_dir, arch="cnn", num_classes=3, image_size=32)
    assert (run_dir / "report.md").exists() and (run_dir / "history.json").exists()  # refused: nothing lost
    create_run(run_dir, arch="cnn", num_classes=3, image_size=32, force=True)
    left = sorted(p.name for p in run_dir.iterdir() if not p.name.startswith("."))
    assert left == ["checkpoint.pt", "cnnpack.json", "notes.txt"]


@pytest.mark.slow
def test_cli_export_and_errors(tiny_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    bad_cases = {("--run", str(run_dir), "--format", "tflite"): "valid: onnx, torchscript",
                 ("--run", str(tmp_path / "missing")): "no such run directory",
                 ("--run", str(run_dir), "--max-batch-size", "0"): "--max-batch-size",
                 ("--arch", "resnet1000", "--num-classes", "3", "--run", str(tmp_path / "x")): "unknown arch"}
    done = forked_cli({"ok": ["export", "--run", str(run_dir), "--format", "onnx", "--json"],
                       **{args: ["export", *args] for args in bad_cases}}, tmp=tmp_path, width=1)  # ok, then the rest
    ok = done.pop("ok")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["artifacts"]["onnx"]["path"] == "export/model.onnx"
    for args, bad in done.items():
        msg = bad_cases[args]
        assert bad.returncode == 2, (args, bad.stderr)
        lines = bad.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and msg in lines[0], bad.stderr


def test_the_formats_are_known_to_export_config_imported_alone():
    """The exporters register in cnnpack.export: `ExportConfig().validate()` with export_config alone imported said
    "unknown format 'onnx'; valid: " (the registry was read empty)."""
    code = ("from cnnpack.export_config import EXPORTERS, ExportConfig; ExportConfig().validate(); "
            "print(','.join(EXPORTERS.names()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "onnx,torchscript,pt2,openvino", out.stderr
