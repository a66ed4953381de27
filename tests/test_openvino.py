"""OpenVINO: the IR artifact, the f32/bf16 runtimes held to their contracts, NNCF int8, Triton layout and serving.

Real OpenVINO and NNCF (the openvino extra); skipped with the install command when it is absent.
"""

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
from support import need_triton, record_new_weights

pytest.importorskip("openvino", reason="the openvino extra: pip install 'cnnpack[openvino]'")

from cnnpack import openvino as ov  # noqa: E402
from cnnpack.errors import MissingStageError, RuntimeUnavailable, UserInputError  # noqa: E402
from cnnpack.export import ExportConfig, export  # noqa: E402


@pytest.fixture(scope="module")
def ir_run(tiny_run, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("openvino") / "run"
    shutil.copytree(tiny_run, run)
    export(run, ExportConfig(formats=("onnx", "openvino"), max_batch_size=16))
    return run


def _manifest(run: Path) -> dict:
    return json.loads((run / "cnnpack.json").read_text())


def test_the_ir_keeps_the_artifact_contract(ir_run):
    rec = _manifest(ir_run)["stages"]["export"]["artifacts"]["openvino"]
    assert rec["path"] == "export/openvino/model.xml" and rec["weights"]["path"] == "export/openvino/model.bin"
    assert rec["precision"] == "fp32" and rec["input"]["name"] == "input" and rec["output"]["name"] == "logits"
    assert rec["input"]["shape"] == [-1, 3, 32, 32]  # dynamic batch, raw pixels in
    model = ov.read(ir_run / rec["path"])
    assert ov.classes_of(model) == _manifest(ir_run)["model"]["classes"]
    # fp32 weights: OpenVINO's default fp16 compression would halve the .bin and break fp32 parity
    types = {str(op.get_element_type()) for op in model.get_ordered_ops() if op.get_type_name() == "Constant"}
    assert not any("f16" in t for t in types)
    assert "openvino" in (ir_run / "export/reproduce.sh").read_text()


def test_verify_holds_f32_to_fp32_and_bf16_to_its_own_contract(ir_run, tmp_path):
    from cnnpack.verify import VerifyConfig, verify

    # The tiny run's closest top-2 logit margin is ~1 % of its logits, bf16's rounding ~0.3 %: whether one of the 90
    # images flips depends on the host's bf16 kernels, so agreement is set below one flip; the contract's tensor
    # tolerances (what this test is about) are bf16's own.
    result = verify(ir_run, VerifyConfig(formats=("openvino",), batch_sizes=(1, 4), min_agreement=0.95))
    rows = {r["runtime"]: r for r in result["results"]}
    assert rows["openvino"]["precision"] == "fp32" and rows["openvino"]["tensor"]["max_abs_err"] <= 1e-4
    if ov.has_bf16():
        bf16 = rows["openvino-bf16"]
        assert bf16["precision"] == "bf16" and bf16["passed"] and bf16["tolerance"]["contract"] == "bf16"
        assert bf16["tolerance"]["min_agreement"] == 0.95 and bf16["tolerance"]["atol"] > 1e-4
        assert bf16["tensor"]["max_abs_err"] > 1e-4  # really computed in bf16, not fp32
    else:
        assert any(s["runtime"] == "openvino-bf16" and "no native bf16" in s["reason"] for s in result["skipped"])


def test_nncf_int8_is_an_int8_ir_under_the_gate(ir_run, tmp_path, capfd):
    from cnnpack.quantize import QuantizeConfig, quantize

    run = tmp_path / "run"
    shutil.copytree(ir_run, run)
    section = quantize(run, QuantizeConfig(format="openvino_int8", calibration_images=64, max_drop=100,
                                           min_agreement=0.5))
    rec = _manifest(run)["stages"]["export"]["artifacts"]["openvino_int8"]
    assert rec["precision"] == "int8" and rec["path"] == "export/openvino_int8/model.xml"
    assert _manifest(run)["stages"]["quantize_openvino"]["status"] == "ok" and section["gate"]["val_images"] == 90
    model = ov.read(run / rec["path"])
    assert "FakeQuantize" in {op.get_type_name() for op in model.get_ordered_ops()}
    assert len(ov.float_compute_nodes(model)) < 5  # some convolutions really run in int8
    assert "--backend openvino" in (run / "export/reproduce.sh").read_text()
    said = capfd.readouterr()  # NNCF's progress bars: on a terminal only, not a line of dashes in a log
    assert "Statistics collection" not in said.err + said.out and "━" not in said.err + said.out


def test_nncf_int8_gets_the_same_ranked_fallback_as_onnx_runtime(tiny_run, tmp_path):
    """The planted outlier activation (tests/support.py): plain NNCF int8 misses the gate, the ranked fallback
    keeps the layers around it in float, and the saved IR really computes them in float."""
    from support import outlier_channel

    from cnnpack.quantize import QuantizeConfig, quantize

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    outlier_channel(run)
    export(run, ExportConfig(formats=("onnx", "openvino"), max_batch_size=16))
    section = quantize(run, QuantizeConfig(format="openvino_int8", calibration_images=64, max_drop=2.5,
                                           min_agreement=0.95))
    first, last = section["attempts"][0], section["attempts"][-1]
    assert first["top1_agreement_vs_fp32"] < 0.95 and first["kept_float"] == []  # plain int8 misses the gate ...
    assert last["top1_agreement_vs_fp32"] >= 0.95 and last["drop_pt"] <= 2.5 and not last["all_float"]  # ... not now
    assert section["ranking"] and section["ranking"][0]["node"] in section["kept_float"]
    assert section["quantizable_nodes"] > len(section["kept_float"]) >= 1
    rec = _manifest(run)["stages"]["export"]["artifacts"]["openvino_int8"]
    assert rec["kept_float"] == section["kept_float"]
    saved = ov.read(run / rec["path"])
    assert set(ov.float_compute_nodes(saved)) == set(rec["kept_float"])  # in float in the file, the rest int8


def _nncf_inputs(run: Path):
    """What quantize --backend openvino starts from: the gate's config, the run's images, the fp32 IR and the
    calibration batches."""
    from cnnpack.int8_gate import QuantizeConfig, load_quant_data
    from cnnpack.int8_openvino import calibration_batches
    from cnnpack.rundir import Run

    cfg = QuantizeConfig(calibration_images=64)
    data = load_quant_data(Run.open(run), cfg)
    return cfg, data, ov.read(run / "export/openvino/model.xml"), calibration_batches(data)


def test_every_layer_put_back_in_float_gives_back_the_fp32_model(ir_run):
    """The fallback's models are cut from one NNCF model: a layer kept in float gets back its fp32 weights, its fp32
    bias (NNCF's bias correction changed it) and an unquantized input also where a MaxPool or the pooled head's
    Concat sits between it and its FakeQuantize. With every layer kept, that is the fp32 IR: any residue of int8
    shows as an error far above fp32 noise (before both fixes: 0.39 on logits up to 7.8)."""
    from cnnpack.int8_openvino import OvInt8, _logits

    _, data, fp32, calibration = _nncf_inputs(ir_run)
    c = OvInt8(fp32, ov.nncf_quantize(fp32, calibration, subset_size=len(calibration)))
    assert len(c.nodes) >= 3 and any(op.get_type_name() == "MaxPool" for op in fp32.get_ordered_ops())
    want = _logits(ov.compile_cpu(fp32, threads=1), data.val_images)
    got = c.runner(c.build(c.nodes))(data.val_images)
    assert np.abs(got - want).max() <= 1e-4 * max(1.0, np.abs(want).max())
    assert np.abs(c.runner(c.quantized)(data.val_images) - want).max() > 1e-3  # the plain int8 model is not it


def test_nncf_accuracy_control_stops_at_the_time_limit(ir_run):
    """NNCF's own loop has no limit (340 s for resnet18@224 on 2 cores): cnnpack's validation callback ends it once
    the quantize deadline has passed."""
    import time

    from cnnpack.int8_gate import Clock
    from cnnpack.int8_openvino import _accuracy_control, _logits, _OutOfTime

    cfg, data, fp32, calibration = _nncf_inputs(ir_run)
    ref = _logits(ov.compile_cpu(fp32, threads=1), data.val_images)
    clock = Clock(0.0, lambda line: None)
    t0 = time.perf_counter()
    with pytest.raises(_OutOfTime):
        _accuracy_control(ov, fp32, calibration, ref, data, cfg, clock)
    assert clock.stopped == "NNCF accuracy control" and time.perf_counter() - t0 < 60


def test_triton_lays_out_the_ir_and_the_local_server_serves_it(ir_run, tmp_path):
    serve = pytest.importorskip("cnnpack.serve")
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    from cnnpack.triton_repo import TritonConfig, build
    from cnnpack.verify import VerifyConfig, served_target, verify

    need_triton()
    run, repo = tmp_path / "run", tmp_path / "repo"
    shutil.copytree(ir_run, run)
    section = build(run, TritonConfig(repository=str(repo), format="openvino", threads=1))
    folder = repo / section["name"]
    assert section["name"] == "cnn_openvino" and {p.name for p in (folder / "1").iterdir()} == {"model.xml", "model.bin"}
    mc = text_format.Parse((folder / "config.pbtxt").read_text(), pb.ModelConfig())
    assert mc.backend == "openvino" and not mc.platform
    assert mc.parameters["INFERENCE_NUM_THREADS"].string_value == "1" and mc.parameters["NUM_STREAMS"].string_value == "1"
    with serve.TritonServer(serve.ServeConfig(repository=str(repo))) as server:
        assert {m.name: m.served_by for m in server.models}["cnn_openvino"] == "cnnpack's Python-based openvino backend"
        target = served_target(run, server.grpc_address, "cnn_openvino", "grpc")
        result = verify(run, VerifyConfig(formats=(), batch_sizes=(1, 4)), targets=(target,))
    served = result["results"][0]
    assert served["passed"] and served["tensor"]["max_abs_err"] <= 1e-4


# -- bad input: one line, exit 2, nothing overwritten ----------------------------------------------------
def test_a_missing_or_truncated_bin_is_a_clear_error(ir_run, tmp_path):
    from cnnpack.rundir import Run
    from cnnpack.runtimes import load_runtime

    run = tmp_path / "run"
    shutil.copytree(ir_run, run)
    weights = run / "export/openvino/model.bin"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserInputError, match=r"model.bin changed since export .*truncated"):
        load_runtime(Run.open(run), "openvino")
    weights.unlink()
    with pytest.raises(UserInputError, match=r"model.bin is missing; re-run `cnnpack export"):
        load_runtime(Run.open(run), "openvino")


def test_openvino_needs_the_onnx_artifact_and_int8_needs_the_ir(tiny_run, tmp_path):
    from cnnpack.quantize import QuantizeConfig, quantize

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    with pytest.raises(MissingStageError, match="converted from the ONNX artifact"):
        export(run, ExportConfig(formats=("openvino",)))
    export(run, ExportConfig(formats=("onnx",)))
    with pytest.raises(MissingStageError, match="no OpenVINO IR to quantize"):
        quantize(run, QuantizeConfig(format="openvino_int8"))
    assert "openvino" not in _manifest(run)["stages"]["export"]["artifacts"]
    # a static batch: ONNX Runtime's backend refused it in one line, NNCF's ended in a traceback (batches of 64)
    export(run, ExportConfig(formats=("onnx", "openvino"), static_batch=4))
    with pytest.raises(UserInputError, match=r"model.xml has a static batch of 4; int8 calibration needs the "
                                             r"dynamic-batch export \(`cnnpack export --run .* --format onnx,openvino` "
                                             r"without --static-batch\)"):
        quantize(run, QuantizeConfig(format="openvino_int8"))


def test_a_full_disk_under_openvino_s_writer_is_said_as_such(tmp_path, monkeypatch):
    """A full disk as OpenVINO writes an IR: "RuntimeError: basic_ios::clear: iostream error", with a traceback."""
    import errno
    import shutil as sh

    import openvino

    from cnnpack import openvino as ov

    def full(*args, **kwargs):
        raise RuntimeError("basic_ios::clear: iostream error")

    monkeypatch.setattr(openvino, "save_model", full)
    real = sh.disk_usage
    monkeypatch.setattr(sh, "disk_usage", lambda p: real(p)._replace(free=150 << 10))
    with pytest.raises(OSError) as e:
        ov.save(object(), tmp_path / "ir")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "ir") and "0.1 MiB free" in str(e.value)
    monkeypatch.setattr(sh, "disk_usage", real)
    with pytest.raises(RuntimeError, match="iostream error"):  # room enough: not the disk, said as it is
        ov.save(object(), tmp_path / "ir")


def test_the_ir_takes_what_its_onnx_file_takes_and_other_options_are_refused(ir_run, tmp_path):
    """The IR is converted from the ONNX file: --input raw over a normalised ONNX file (and --static-batch over a
    dynamic one) were recorded as the IR's, verify failed it, and its Triton config said raw pixels."""
    run = tmp_path / "run"
    shutil.copytree(ir_run, run)
    before = (run / "cnnpack.json").read_bytes(), (run / "export/openvino/model.xml").read_bytes()
    # refused before any format: torchscript beside it was replaced (exit 2 and a changed model.pt)
    for cfg, says in ((ExportConfig(formats=("torchscript", "openvino"), input="normalized"),
                       "--input normalized: the openvino model is converted from export/model.onnx, which takes raw "
                       "pixels; pass --input raw, or export both"),
                      (ExportConfig(formats=("openvino",), static_batch=4),
                       "--static-batch 4: the openvino model is converted from export/model.onnx, which has a "
                       "dynamic batch; drop --static-batch, or export both")):
        with pytest.raises(UserInputError, match=re.escape(says)):
            export(run, cfg)
    assert ((run / "cnnpack.json").read_bytes(), (run / "export/openvino/model.xml").read_bytes()) == before
    assert not (run / "export/model.pt").exists()
    export(run, ExportConfig(formats=("onnx", "openvino"), input="normalized", max_batch_size=16))  # both: as asked
    arts = _manifest(run)["stages"]["export"]["artifacts"]
    assert arts["openvino"]["input_kind"] == arts["onnx"]["input_kind"] == "normalized"
    # options of the ONNX exporter do not apply to the conversion: the IR records its ONNX file's (it recorded
    # --opset 17 for an IR of an opset-18 file, and reproduce.sh re-created its source with opset 17)
    export(run, ExportConfig(formats=("openvino",), input="normalized", opset=17, max_batch_size=16))
    arts = _manifest(run)["stages"]["export"]["artifacts"]
    assert arts["openvino"]["config"]["opset"] == arts["onnx"]["config"]["opset"] != 17
    # the ONNX file's bytes depend on its largest batch: an IR recorded with another one had reproduce.sh re-create
    # its source with that, other bytes, and stop
    with pytest.raises(UserInputError, match=re.escape(
            "--max-batch-size 64: the openvino model is converted from export/model.onnx, exported with "
            "--max-batch-size 16 (its bytes depend on it); pass --max-batch-size 16, or export both")):
        export(run, ExportConfig(formats=("openvino",), input="normalized"))
    assert _manifest(run)["stages"]["export"]["artifacts"]["openvino"]["max_batch_size"] == 16


def test_a_new_best_epoch_saved_during_the_export_does_not_refuse_its_own_onnx_file(tiny_run, tmp_path, monkeypatch):
    """Exporting while training runs is allowed: a checkpoint saved between the ONNX step and the IR made the IR
    refuse the ONNX file just written as "made from another checkpoint.pt"; it is of the bytes this export loaded."""
    import torch

    import cnnpack.export

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    real = cnnpack.export._export_file

    def then_a_new_best_epoch(*args, **kwargs):
        out = real(*args, **kwargs)
        ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
        ckpt["epoch"] = 99
        torch.save(ckpt, run / "checkpoint.pt")
        record_new_weights(run)
        return out

    monkeypatch.setattr(cnnpack.export, "_export_file", then_a_new_best_epoch)
    export(run, ExportConfig(formats=("onnx", "openvino")))
    arts = _manifest(run)["stages"]["export"]["artifacts"]
    assert arts["openvino"]["checkpoint_sha256"] == arts["onnx"]["checkpoint_sha256"]


def test_a_failed_conversion_keeps_the_previous_ir(ir_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ir_run, run)
    before = (run / "export/openvino/model.xml").read_bytes()
    (run / "export/model.onnx").write_bytes(b"not onnx")  # the artifact changed behind the manifest's back
    with pytest.raises(UserInputError):
        export(run, ExportConfig(formats=("openvino",)))
    assert (run / "export/openvino/model.xml").read_bytes() == before
    assert not [p for p in (run / "export").iterdir() if p.name.startswith(".openvino")]


@pytest.mark.slow
def test_cli_export_and_bench_rows(ir_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(ir_run, run)
    env = {**os.environ, "COLUMNS": "200"}
    p = subprocess.run([sys.executable, "-m", "cnnpack", "bench", "--run", str(run), "--runtimes",
                        "onnxruntime,openvino,openvino-bf16", "--batch-sizes", "2", "--max-seconds", "0.2",
                        "--threads", "1", "--no-plot", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    section = json.loads(p.stdout)
    rows = {(r["runtime"], r["artifact"]): r for r in section["results"]}
    assert rows[("openvino", "openvino")]["precision"] == "fp32"
    if ov.has_bf16():
        bf16 = rows[("openvino-bf16", "openvino")]
        assert bf16["precision"] == "bf16" and bf16["matmul_gflops"] == section["ceilings"]["bf16"]["gflops"]
    bad = subprocess.run([sys.executable, "-m", "cnnpack", "triton", "--run", str(run), "--format", "openvino",
                          "--device", "gpu"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "is served on the CPU" in bad.stderr and bad.stderr.count("\n") == 1


def test_bf16_asked_for_on_a_cpu_without_it_is_skipped_with_the_reason(monkeypatch, ir_run):
    from cnnpack.runtimes import RUNTIMES

    monkeypatch.setattr(ov, "has_bf16", lambda: False)  # the CPU flag, not the runtime, is what is replaced
    with pytest.raises(RuntimeUnavailable, match="this CPU has no native bf16"):
        RUNTIMES.get("openvino-bf16").precheck()


def test_without_the_extra_the_error_names_the_install_command(monkeypatch):
    import builtins

    real = builtins.__import__

    def no_openvino(name, *args, **kwargs):
        if name == "openvino" or name.startswith("openvino."):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_openvino)
    with pytest.raises(RuntimeUnavailable, match=r"pip install 'cnnpack\[openvino\]'"):
        ExportConfig(formats=("onnx", "openvino")).validate()
    assert np  # numpy stays importable


def test_other_weights_under_the_same_xml_are_another_artifact(ir_run, tmp_path):
    """The IR's .xml is byte-identical for other weights of the same graph: an earlier verdict is kept only while
    the .bin is the one verify checked, and the pipeline's fingerprints see the .bin too."""
    from cnnpack.pipeline import _artifacts
    from cnnpack.rundir import Run, sha256
    from cnnpack.verify import VerifyConfig, verify

    run = tmp_path / "run"
    shutil.copytree(ir_run, run)
    quick = dict(batch_sizes=(1,), samples=4, min_agreement=0.5)
    verify(run, VerifyConfig(formats=("onnx", "openvino"), **quick))
    before = _artifacts(Run.open(run))
    weights = run / "export/openvino/model.bin"
    blob = bytearray(weights.read_bytes())
    blob[-4:] = np.float32(0.25).tobytes()  # one weight changed, as a re-export from other weights would
    weights.write_bytes(bytes(blob))
    Run.open(run).update(lambda m: m["stages"]["export"]["artifacts"]["openvino"]["weights"].update(sha256=sha256(weights)))
    assert _artifacts(Run.open(run))["openvino"] != before["openvino"]  # the stages fed by the IR run again
    result = verify(run, VerifyConfig(formats=("onnx",), **quick))
    assert "openvino" not in result.get("kept", [])  # its earlier verdict was another model's


def test_a_failed_swap_puts_the_previous_folder_back(tmp_path, monkeypatch):
    """The new IR folder could not take the old one's place: the old one is back under its name, not left hidden
    with the manifest pointing at nothing."""
    from cnnpack.atomic import swap_dir

    dest, new = tmp_path / "openvino_int8", tmp_path / ".openvino_int8-new"
    dest.mkdir()
    (dest / "model.xml").write_text("old")
    new.mkdir()
    real = os.replace

    def replace(src, dst):
        if Path(src) == new:
            raise OSError(18, "Invalid cross-device link")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        swap_dir(new, dest)
    assert (dest / "model.xml").read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == [
        ".openvino_int8-new", "openvino_int8"]


def test_openvino_s_telemetry_is_off_unless_its_user_opted_in(tmp_path):
    """`import openvino` and its converter send usage data to Google Analytics when no consent file says no;
    through cnnpack they send nothing, and write nothing under ~/intel, unless the consent file says yes."""
    probe = ("from cnnpack import openvino as ov; ov.require(); import openvino; "
             "from openvino_telemetry import Telemetry; print(Telemetry().consent)")
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "TF_BUILD", "JENKINS_URL")} | {"HOME": str(tmp_path)}
    said = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert said.stdout.split() == ["False"], said.stderr[-2000:]
    assert not (tmp_path / "intel").exists()
    (tmp_path / "intel").mkdir()
    (tmp_path / "intel" / "openvino_telemetry").write_text("1")  # opt_in_out --opt_in
    said = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert said.stdout.split() == ["True"], said.stderr[-2000:]


def test_nncf_s_warnings_go_to_stderr_not_into_the_json_result():
    """NNCF's logger writes to the stdout it found at import; `--json` prints the result there."""
    code = ("import nncf; from cnnpack import openvino; openvino._nncf(); "
            "from nncf.common.logging import nncf_logger; nncf_logger.warning('nncf says so')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "" and "nncf says so" in out.stderr
