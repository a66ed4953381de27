"""cnnpack verify (and evaluate on artifacts): real exports, real ONNX Runtime and TorchScript, no mocks."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from support import record_new_weights

from cnnpack.errors import MissingStageError, ParityError, UserInputError
from cnnpack.evaluate import evaluate
from cnnpack.export import ExportConfig, create_run, export
from cnnpack.rundir import Run, sha256
from cnnpack.runtimes import RUNTIMES
from cnnpack.verify import VerifyConfig, tensor_stats, verify

MAX_BATCH = 16
QUICK = VerifyConfig(batch_sizes=(1, 8), samples=8)


def _copy(src, tmp_path, name="run"):
    dest = tmp_path / name
    shutil.copytree(src, dest)
    return dest


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "120"}
    return subprocess.run([sys.executable, "-m", "cnnpack", *args], capture_output=True, text=True, timeout=300,
                          env=env)


def _rehash(run_dir, fmt: str) -> None:
    """Records the artifact's current sha256, so that only its numbers differ from the export."""
    def fix(m):
        rec = m["stages"]["export"]["artifacts"][fmt]
        rec["sha256"] = sha256(run_dir / rec["path"])

    Run(run_dir).update(fix)


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    """tiny_run exported to ONNX and TorchScript (max batch 16); read-only, copy it to modify."""
    run_dir = _copy(tiny_run, tmp_path_factory.mktemp("verify"), "exported")
    export(run_dir, ExportConfig(max_batch_size=MAX_BATCH))
    return run_dir


# -- the statistics ------------------------------------------------------------------------------
def test_an_element_passes_within_atol_or_rtol_and_the_needed_tolerances_are_exact():
    want = np.array([[1.0, 100.0, 0.0, -2.0]], np.float32)
    got = np.array([[1.0 + 5e-4, 100.05, 2e-5, -2.0]], np.float32)  # abs 5e-4 (rel 5e-4), abs 0.05 (rel 5e-4)
    s = tensor_stats(got, want, atol=1e-4, rtol=1e-3)
    assert s["outside_tolerance"] == 0  # the first two pass by rtol, the zero by atol
    assert s["max_abs_err"] == pytest.approx(0.05, rel=1e-3)
    assert s["max_rel_err"] is None  # 2e-5 against an exact 0 is infinitely relative: recorded as null
    strict = tensor_stats(got, want, atol=1e-5, rtol=1e-4)
    assert strict["outside_tolerance"] == 3
    assert strict["min_atol_to_pass"] == pytest.approx(0.05, rel=1e-3)  # with rtol 1e-4 fixed
    assert strict["min_rtol_to_pass"] is None  # with atol 1e-5 fixed the zero can never pass by rtol
    got[0, 3] = np.nan
    s = tensor_stats(got, want, atol=1e-4, rtol=1e-3)
    assert s["nonfinite"] == 1 and s["outside_tolerance"] == 1


# -- good artifacts pass ---------------------------------------------------------------------------
def test_a_damaged_recorded_gate_is_one_error_line():
    """A cnnpack.json edited by hand ("min_agreement": "0.99") was a TypeError's traceback from verify."""
    from cnnpack.contracts import int8_contract
    from cnnpack.errors import UserInputError
    from cnnpack.verify_kept import _still_holds

    assert int8_contract(None, 0.5, 0.99) == (0.99, 0.5, "the quantize gate")
    assert int8_contract(None, 150, 0.9) == (0.9, 150, "the quantize gate")  # an earlier cnnpack took any drop >= 0
    kept = {"precision": "int8", "passed": True, "tolerance": {"min_agreement": 0.9, "max_drop_pt": 150}}
    assert _still_holds(kept, {}, {"int8_min_agreement": None}, {"gate": {"max_drop_pt": 150, "min_agreement": 0.9}})
    assert not _still_holds(kept, {}, {"int8_min_agreement": None}, {"gate": {"max_drop_pt": "x"}})  # checked again
    for drop, agreement, said in ((0.5, "0.99", "min_agreement '0.99'"), (-1, 0.99, "max_drop_pt -1"),
                                  (0.5, True, "min_agreement True"), (float("nan"), 0.99, "max_drop_pt nan"),
                                  (0.5, 1.5, "min_agreement 1.5")):
        with pytest.raises(UserInputError, match=rf"recorded quantize gate is damaged \({said}, expected a number"):
            int8_contract(None, drop, agreement)


def test_cnn_artifacts_pass_on_every_usable_runtime_and_unusable_ones_say_why(exported, tmp_path):
    run_dir = _copy(exported, tmp_path)
    result = verify(run_dir, VerifyConfig(samples=16))
    assert result["passed"] and result["failures"] == []
    checked = {(r["format"], r["runtime"]) for r in result["results"]}
    skipped = {(s["format"], s["runtime"]): s["reason"] for s in result["skipped"]}
    assert {("onnx", "onnxruntime"), ("torchscript", "torchscript")} <= checked
    for name in RUNTIMES:  # every runtime of an exported format is either checked or skipped with a reason
        fmt = RUNTIMES.get(name).format
        if fmt in ("onnx", "torchscript"):
            assert (fmt, name) in checked or skipped[(fmt, name)].startswith(name)
    for r in result["results"]:
        assert r["batch_sizes"] == [1, 8, MAX_BATCH]  # the default 32 is clipped to the export's max batch
        assert r["tensor"]["max_abs_err"] < 1e-4 and r["tensor"]["nonfinite"] == 0
        assert set(r["tensor"]["max_abs_err_by_input"]) == {"random_b1", "random_b8", "random_b16", "val"}
        assert r["task"]["images"] == 90 and r["task"]["top1_agreement"] >= 0.999
    section = Run.open(run_dir).read()["stages"]["verify"]
    assert section["status"] == "ok" and section["passed"] is True
    assert set(section["formats"]) == {"onnx", "torchscript"}
    assert section["formats"]["onnx"]["accuracy"] == result["reference"]["accuracy"]
    assert json.loads((run_dir / "verify.json").read_text()) == result
    assert section["outputs"]["verify_json"]["sha256"] == sha256(run_dir / "verify.json")


def test_resnet18_without_data_checks_tensor_parity_only_and_says_so(tmp_path):
    run_dir = tmp_path / "r18"
    create_run(run_dir, arch="resnet18", num_classes=3, image_size=64)
    export(run_dir, ExportConfig(max_batch_size=4))
    result = verify(run_dir, VerifyConfig(batch_sizes=(1, 4), samples=4))
    assert result["passed"]
    assert result["data"] is None and "random inputs only" in result["note"]
    for r in result["results"]:
        assert r["task"] is None and r["tensor"]["max_abs_err"] < 1e-4
    formats = Run.open(run_dir).read()["stages"]["verify"]["formats"]
    assert formats["onnx"]["top1_agreement"] is None and formats["onnx"]["max_abs_err"] < 1e-4


def test_static_batch_and_normalized_input_artifacts_are_fed_what_they_take(tiny_run, tmp_path):
    run_dir = _copy(tiny_run, tmp_path)
    export(run_dir, ExportConfig(formats=("torchscript",), static_batch=4, input="normalized"))
    result = verify(run_dir, VerifyConfig(samples=4))  # 90 validation images: the last batch is padded
    assert result["passed"], result["failures"]
    assert result["results"][0]["batch_sizes"] == [4] and result["results"][0]["task"]["images"] == 90
    with pytest.raises(UserInputError, match="static batch of 4; use --batch-sizes 4"):
        verify(run_dir, VerifyConfig(batch_sizes=(1, 4)))
    with pytest.raises(UserInputError, match="has no onnx artifact"):
        verify(run_dir, VerifyConfig(formats=("onnx",)))
    ev = evaluate(run_dir, fmt="torchscript", device="cpu")
    assert ev["images"] == 90 and ev["accuracy"] == result["results"][0]["task"]["accuracy"]


# -- a changed weight fails -----------------------------------------------------------------------
def _perturb_one_onnx_weight(path) -> str:
    """Adds 0.5 to one element of the first convolution weight; returns the initializer's name."""
    model = onnx.load(str(path))
    init = next(t for t in model.graph.initializer if len(t.dims) == 4)
    w = numpy_helper.to_array(init).copy()
    w.flat[0] += 0.5
    init.CopyFrom(numpy_helper.from_array(w, init.name))
    onnx.save(model, str(path))
    return init.name


def test_one_changed_onnx_weight_fails_verify_naming_onnx_and_the_check(exported, tmp_path):
    run_dir = _copy(exported, tmp_path)
    _perturb_one_onnx_weight(run_dir / "export/model.onnx")
    _rehash(run_dir, "onnx")
    out = _cli("verify", "--run", str(run_dir), "--batch-sizes", "1,8", "--samples", "8")
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 1, out.stderr[-2000:]
    assert len(errors) == 1 and "Traceback" not in out.stderr
    assert "onnx (onnxruntime): max_abs_err" in errors[0] and "> atol 1e-04" in errors[0]
    assert "torchscript" not in errors[0]  # the untouched artifact passes
    assert "FAIL" in out.stdout and "max abs err" in out.stdout  # the table is shown before the error
    section = Run.open(run_dir).read()["stages"]["verify"]
    assert section["status"] == "failed" and section["passed"] is False
    assert section["formats"]["onnx"]["passed"] is False and section["formats"]["torchscript"]["passed"] is True
    assert section["formats"]["onnx"]["max_abs_err"] > 1e-2
    saved = json.loads((run_dir / "verify.json").read_text())
    assert saved["passed"] is False and saved["failures"] == section["failures"]
    with pytest.raises(ParityError, match=r"onnx \(onnxruntime\): max_abs_err .* > atol"):
        verify(run_dir, QUICK)
    # the same artifact passes when the user accepts the error it has
    loose = saved["results"][0]["tensor"]["min_atol_to_pass"] * 1.01
    subset = verify(run_dir, VerifyConfig(batch_sizes=(1, 8), samples=8, atol=loose, min_agreement=0.5,
                                          formats=("onnx",)))
    # the formats not checked again keep their verdicts (their artifacts are unchanged), so the run stays verified
    others = sorted(set(section["formats"]) - {"onnx"})
    assert subset["passed"] and subset["kept"] == others
    from cnnpack.cli.verify_cmd import parity_table  # its caption said the kept verdicts' batch sizes as this run's

    caption = parity_table(json.loads((run_dir / "verify.json").read_text())).caption
    assert "8 random raw-pixel images per batch size, at batch 1, 8 " in caption
    assert f"; {', '.join(others)}: kept from the earlier verify, with its own images and batch sizes." in caption
    assert set(Run.open(run_dir).read()["stages"]["verify"]["formats"]) == set(section["formats"])
    # a failure under tolerances stricter than a later subset's is not that subset's verdict
    with pytest.raises(ParityError):
        verify(run_dir, VerifyConfig(batch_sizes=(1,), samples=8, atol=1e-12, rtol=1e-12, min_agreement=0.9999,
                                     formats=("onnx",)))
    again = verify(run_dir, VerifyConfig(batch_sizes=(1, 8), samples=8, formats=("torchscript",)))
    assert again["passed"] and "onnx" not in again.get("kept", [])
    assert {"format": "onnx", "runtime": "onnxruntime", "reason": "judged under another contract"} in again["dropped"]  # said, not lost unseen


# -- bad input -------------------------------------------------------------------------------------
def test_a_run_without_exports_says_to_export_first(tiny_run):
    with pytest.raises(MissingStageError, match=rf"run `cnnpack export --run {tiny_run}` first"):
        verify(tiny_run, QUICK)


def test_an_artifact_changed_since_export_is_refused(exported, tmp_path):
    run_dir = _copy(exported, tmp_path)
    with open(run_dir / "export/model.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(UserInputError, match="changed since export"):
        verify(run_dir, QUICK)
    assert "verify" not in Run.open(run_dir).read()["stages"]


def test_a_verdict_is_not_kept_for_a_file_changed_or_deleted_since_and_the_report_says_so(exported, tmp_path):
    """`verify --formats torchscript` kept onnx's pass for a model.onnx swapped or deleted after it was checked,
    and the report showed it as pass, the new file's size beside the old sha256."""
    from cnnpack.report import write_report

    run_dir = _copy(exported, tmp_path)
    verify(run_dir, QUICK)
    onnx = run_dir / "export" / "model.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"\0")  # changed on disk, the manifest not told
    again = verify(run_dir, VerifyConfig(batch_sizes=(1,), samples=8, formats=("torchscript",)))
    assert "onnx" not in again.get("kept", []) and "onnx" not in Run.open(run_dir).read()["stages"]["verify"]["formats"]
    assert again["dropped"] == [{"format": "onnx", "runtime": "onnxruntime",
                                 "reason": f"{onnx} changed since export (its sha256 differs from the manifest's, "
                                           "truncated?)"}]
    write_report(run_dir)
    md = (run_dir / "report.md").read_text()
    assert f"**Changed on disk**: {onnx} changed since export" in md and "| changed on disk |" in md
    onnx.unlink()
    write_report(run_dir)
    assert f"**Changed on disk**: {onnx} is missing" in (run_dir / "report.md").read_text()


@pytest.mark.parametrize("fmt,needle", [("onnx", "ONNX Runtime cannot load"), ("torchscript", "cannot load")])
def test_an_artifact_that_fails_to_load_is_named(exported, tmp_path, fmt, needle):
    run_dir = _copy(exported, tmp_path)
    path = run_dir / ("export/model.onnx" if fmt == "onnx" else "export/model.pt")
    path.write_bytes(path.read_bytes()[:2000])  # truncated, then recorded as if exported so
    _rehash(run_dir, fmt)
    with pytest.raises(UserInputError, match=needle) as e:
        verify(run_dir, QUICK)
    assert path.name in str(e.value)


def test_a_checkpoint_changed_since_export_is_named(exported, tmp_path):
    run_dir = _copy(exported, tmp_path)
    with open(run_dir / "checkpoint.pt", "ab") as f:
        f.write(b"\0")
    record_new_weights(run_dir)  # (a training since; weights the run never recorded are refused before)
    with pytest.raises(UserInputError, match="checkpoint.pt changed since the artifacts were exported"):
        verify(run_dir, QUICK)
    (run_dir / "checkpoint.pt").write_bytes((run_dir / "checkpoint.pt").read_bytes()[:5000])  # truncated: export
    with pytest.raises(UserInputError, match=r"checkpoint.pt is not a readable cnnpack checkpoint \(.*truncated or "
                                             r"replaced\?\); restore the file, or train the run again"):  # can't mend it
        verify(run_dir, QUICK)


def test_export_records_the_checkpoint_it_loaded_when_a_training_replaces_it_meanwhile(exported, tmp_path,
                                                                                        monkeypatch):
    """A `cnnpack train` in another terminal saved a new best epoch while export ran: the artifacts hold the weights
    export loaded, and the record said the new file's sha256, so verify failed them on parity (exit 1) instead of
    naming the checkpoint that changed."""
    import torch

    import cnnpack.export
    import cnnpack.train

    run_dir = _copy(exported, tmp_path)
    loaded = sha256(run_dir / "checkpoint.pt")
    real = cnnpack.train.load_checkpoint

    def then_a_new_best_epoch(run, **kw):
        out = real(run, **kw)
        ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
        ckpt["state_dict"] = {k: v + 0.5 if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
        torch.save(ckpt, run_dir / "checkpoint.pt")
        record_new_weights(run_dir)
        return out

    monkeypatch.setattr(cnnpack.export, "load_checkpoint", then_a_new_best_epoch)
    export(run_dir, ExportConfig(formats=("onnx",), max_batch_size=MAX_BATCH))
    assert Run.open(run_dir).read()["stages"]["export"]["source"]["sha256"] == loaded != sha256(run_dir / "checkpoint.pt")
    with pytest.raises(UserInputError, match="checkpoint.pt changed since the artifacts were exported"):
        verify(run_dir, QUICK)


def test_an_artifact_made_from_earlier_weights_than_another_format_is_named(exported, tmp_path):
    """export --format onnx, a training saves new weights, export --format torchscript: the export's one source
    said the new checkpoint, so the ONNX file of the old weights failed on parity instead."""
    import torch

    run_dir = _copy(exported, tmp_path)
    assert verify(run_dir, QUICK)["passed"]  # both verdicts recorded, of the old weights
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    ckpt["state_dict"] = {k: v * 1.5 if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, run_dir / "checkpoint.pt")
    record_new_weights(run_dir)
    export(run_dir, ExportConfig(formats=("torchscript",), max_batch_size=MAX_BATCH))
    # the new torchscript alone: onnx's pass was of the old weights, and is not kept beside it
    newer = verify(run_dir, replace(QUICK, formats=("torchscript",)))
    assert "onnx" not in newer.get("kept", []) and newer["dropped"] == [
        {"format": "onnx", "runtime": "onnxruntime", "reason": "made from other weights than the run's checkpoint"}]
    with pytest.raises(UserInputError, match=r"onnx \(export/model.onnx\) was made from another checkpoint.pt than "
                                             r"the run holds now .*make it again: `cnnpack export --run .* --format onnx`"):
        verify(run_dir, QUICK)
    # triton, bench and evaluate served, measured and scored it as the run's model without a word (verify alone said)
    from cnnpack.bench import BenchConfig, bench
    from cnnpack.evaluate import evaluate
    from cnnpack.triton_repo import TritonConfig, build

    for use in (lambda: build(run_dir, TritonConfig(repository=str(tmp_path / "repo"), format="onnx")),
                lambda: bench(run_dir, BenchConfig(runtimes=("onnxruntime",), batch_sizes=(1,))),
                lambda: evaluate(run_dir, fmt="onnx")):
        with pytest.raises(UserInputError, match=r"onnx \(export/model.onnx\) was made from another checkpoint.pt"):
            use()
    assert not (tmp_path / "repo" / "cnn_onnx").exists()
    build(run_dir, TritonConfig(repository=str(tmp_path / "repo"), format="torchscript"))  # the current one lays out
    from cnnpack.report import write_report

    md = Path(write_report(run_dir)["markdown"]).read_text()
    assert "**Of older weights**: onnx (export/model.onnx) was made from another checkpoint.pt" in md
    assert "(older weights)" in md and "torchscript (export/model.pt) was made" not in md


def test_a_reference_that_answers_the_same_for_every_input_is_said(tmp_path):
    """A randomly initialised squeezenet's logits are all 0: verify said PASSED, max abs err 0, cosine 1, while an
    artifact that answered 0 to everything would pass as well."""
    import torch

    from cnnpack.export import create_run
    from cnnpack.models import build_model
    from cnnpack.spec import ModelSpec

    model = build_model(ModelSpec(arch="cnn", num_classes=3, classes=("a", "b", "c"), image_size=32))
    weights = {k: (torch.zeros_like(v) if k.startswith("head.2.") else v) for k, v in model.state_dict().items()}
    torch.save(weights, tmp_path / "dead.pt")
    run = create_run(tmp_path / "r", arch="cnn", num_classes=3, image_size=32, weights=str(tmp_path / "dead.pt"))
    export(run.path, ExportConfig(formats=("onnx",), max_batch_size=8))
    result = verify(run.path, QUICK)
    assert result["passed"] and result["reference_spread"] == 0.0
    assert "eager's logits hardly change with the input (no logit moves more than 0.0e+00 over" in result["note"]
    assert "no validation data" in result["note"]  # both notes
    live = create_run(tmp_path / "live", arch="cnn", num_classes=3, image_size=32)
    export(live.path, ExportConfig(formats=("onnx",), max_batch_size=8))
    assert "hardly change" not in (verify(live.path, QUICK)["note"] or "")


@pytest.mark.parametrize("cfg,needle", [
    (VerifyConfig(batch_sizes=(1, 32)), "--batch-sizes 32 exceeds the max batch size 16"),
    (VerifyConfig(atol=0), "--atol must be > 0"),
    (VerifyConfig(rtol=-1e-3), "--rtol must be > 0"),
    (VerifyConfig(atol=float("nan")), "--atol must be > 0"),
    (VerifyConfig(min_agreement=1.5), "--min-agreement"),
    (VerifyConfig(formats=("tflite",)), "unknown format 'tflite'; valid: onnx, onnx_int8, pt2, torchscript"),
    (VerifyConfig(formats=("onnx_int8",)), "has no onnx_int8 artifact (has: onnx, torchscript); run `cnnpack quantize"),
    (VerifyConfig(seed=-1), "--seed must be >= 0, got -1"),  # a numpy traceback
    (VerifyConfig(samples=100_000_000), "--samples must be in 1..4096"),  # the kernel's OOM kill after 52 s
])
def test_bad_options_are_refused_before_any_work(exported, cfg, needle):
    with pytest.raises(UserInputError, match=re.escape(needle)):
        verify(exported, cfg)


def test_cli_bad_input_is_one_error_line_and_exit_2(exported):
    out = _cli("verify", "--run", str(exported), "--batch-sizes", "64")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().splitlines() == [
        "error: --batch-sizes 64 exceeds the max batch size 16 that onnx (export/model.onnx) was exported with; "
        "use sizes <= 16 or re-export with --max-batch-size 64"]


def test_an_artifact_exported_again_while_verify_ran_is_not_recorded_as_verified(exported, tmp_path, monkeypatch):
    """`verify` beside `export`: the new file's digest was recorded as verified, though verify had checked the old
    one. And a record that fails (a full disk) puts the earlier verify.json back, beside its own record."""
    import errno

    import cnnpack.verify as v
    from cnnpack.errors import StageFailed
    from cnnpack.rundir import Run

    run_dir = _copy(exported, tmp_path, "run")
    verify(run_dir, VerifyConfig(formats=("onnx",), batch_sizes=(1,)))
    before = (run_dir / "verify.json").read_bytes(), json.loads((run_dir / "cnnpack.json").read_text())["stages"]
    checked = v._check_plan

    def meanwhile(run, *args):  # an export that finished while the checks ran
        out = checked(run, *args)
        run.update(lambda m: m["stages"]["export"]["artifacts"]["onnx"].update(sha256="0" * 64))
        return out

    monkeypatch.setattr(v, "_check_plan", meanwhile)
    with pytest.raises(StageFailed, match=r"^export/model.onnx changed while verify ran \(exported again\?\); nothing "
                                          r"was recorded: run `cnnpack verify --run .*` again$"):
        verify(run_dir, VerifyConfig(formats=("onnx",), batch_sizes=(1, 2)))
    after = json.loads((run_dir / "cnnpack.json").read_text())["stages"]
    assert (run_dir / "verify.json").read_bytes() == before[0] and after["verify"] == before[1]["verify"]
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".verify")]
    monkeypatch.setattr(v, "_check_plan", checked)

    def full(self, fn):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.manifest_path))

    monkeypatch.setattr(Run, "update", full)
    with pytest.raises(OSError, match="No space left"):
        verify(run_dir, VerifyConfig(formats=("torchscript",), batch_sizes=(1,)))
    assert (run_dir / "verify.json").read_bytes() == before[0]  # it was the new one, beside the old record


def test_a_served_model_s_batch_limit_names_triton_not_a_re_export():
    """It said to re-export with --max-batch-size: the limit was `cnnpack triton --max-batch-size 1`'s (the export
    took 64), so re-exporting changed nothing."""
    from cnnpack.verify import Target, batch_plan

    served = Target("triton:cnn_mb1", "triton", lambda: None, "grpc://127.0.0.1:8001 model cnn_mb1", max_batch_size=1)
    with pytest.raises(UserInputError, match=r"^--batch-sizes 8 exceeds the max batch size 1 that triton:cnn_mb1 "
                                             r"\(grpc://127.0.0.1:8001 model cnn_mb1\) is served with \(its "
                                             r"config.pbtxt\); use sizes <= 1 or lay it out again with `cnnpack "
                                             r"triton --max-batch-size 8` and restart the server$"):
        batch_plan(served, (1, 8))
    assert batch_plan(served, (1,)) == [1]


# -- evaluate on artifacts -------------------------------------------------------------------------
def test_evaluate_artifacts_through_the_runtimes_matches_the_checkpoint(exported, tmp_path):
    run_dir = _copy(exported, tmp_path)
    ref = evaluate(run_dir, fmt="checkpoint", device="cpu")
    for fmt, runtime in (("onnx", "onnxruntime"), ("torchscript", "torchscript")):
        ev = evaluate(run_dir, fmt=fmt, device="cpu")
        assert ev["runtime"] == runtime and ev["images"] == ref["images"] == 90
        assert ev["accuracy"] == ref["accuracy"] and ev["confusion_matrix"] == ref["confusion_matrix"]
        assert json.loads((run_dir / f"eval-{fmt}.json").read_text())["accuracy"] == ev["accuracy"]
    # a folder of <class>/<images> it was not trained on: every image scored, in a file of its own
    flat = tmp_path / "flat"
    for c in ref["classes"]:
        shutil.copytree(Path(ref["data"]) / "val" / c, flat / c)
    other = evaluate(run_dir, fmt="onnx", data=str(flat), device="cpu")
    assert other["split"] == "all" and other["images"] == 90 and other["accuracy"] == ref["accuracy"]
    assert Path(other["output"]).name.startswith("eval-onnx-flat-")
    assert json.loads((run_dir / "eval-onnx.json").read_text())["split"] == "validation"  # the run's own: kept
    # other data with a split of its own (train/ and val/), one class absent from its val/: its validation split,
    # in a file of its own, that class's accuracy unknown (None), not 0
    split = tmp_path / "split"
    shutil.copytree(Path(ref["data"]), split)
    shutil.rmtree(split / "val" / ref["classes"][0])
    theirs = evaluate(run_dir, fmt="onnx", data=str(split), device="cpu")
    assert theirs["split"] == "validation" and Path(theirs["output"]).name.startswith("eval-onnx-split-")
    assert theirs["per_class_acc"][0] is None and None not in theirs["per_class_acc"][1:]
    assert json.loads((run_dir / "eval-onnx.json").read_text())["images"] == ref["images"]  # the run's own: kept
    _perturb_one_onnx_weight(run_dir / "export/model.onnx")
    with pytest.raises(UserInputError, match="changed since export"):
        evaluate(run_dir, fmt="onnx")


# -- fp16 artifacts (export --half): tolerance selection, on the CPU ------------------------------------
class _Linear:
    """Stands in for eager: (N, 3, 4, 4) raw pixels -> (N, 5) logits of magnitude ~10-50."""

    info: dict = {}

    def __init__(self) -> None:
        self.w = np.random.default_rng(0).normal(size=(48, 5)) / 40

    def predict(self, x: np.ndarray) -> np.ndarray:
        return (x.reshape(len(x), -1) @ self.w).astype(np.float32)


class _Half(_Linear):
    """The same model computed in fp16, as an fp16 artifact would be."""

    def predict(self, x: np.ndarray) -> np.ndarray:
        return (x.astype(np.float16).reshape(len(x), -1) @ self.w.astype(np.float16)).astype(np.float32)


def test_fp16_tolerances_scale_with_the_logits_and_never_tighten_the_config():
    from cnnpack.verify import tolerances

    cfg = VerifyConfig()
    fp32 = tolerances(cfg, "float32", np.array([[40.0, -3.0]]))
    assert (fp32.atol, fp32.rtol, fp32.min_agreement) == (cfg.atol, cfg.rtol, cfg.min_agreement)
    big = tolerances(cfg, "float16", np.array([[12.0, -40.0, np.inf]]))  # a non-finite logit is not a scale
    assert (big.atol, big.rtol, big.min_agreement) == (pytest.approx(0.4), 1e-2, 0.995)
    assert tolerances(cfg, "float16", np.array([[0.3, -0.2]])).atol == pytest.approx(1e-2)  # small logits: 1e-2
    loose = VerifyConfig(atol=1.0, rtol=0.1, min_agreement=0.9)
    t = tolerances(loose, "float16", np.array([[12.0]]))
    assert (t.atol, t.rtol, t.min_agreement) == (1.0, 0.1, 0.9)


@pytest.mark.parametrize("dtype, passes", [("float16", True), ("float32", False)])
def test_an_fp16_target_is_held_to_fp16_tolerances(dtype, passes):
    """fp16 rounding (errors ~1e-2 on logits ~30) passes as an fp16 artifact and fails the fp32 contract."""
    from cnnpack.verify import Reference, Target, check_target

    cfg = VerifyConfig()
    ref = Reference(_Linear(), (3, 4, 4), cfg)
    target = Target("onnx", "fake", lambda: None, "model.onnx", dtype=dtype)
    result = check_target(target, _Half(), [1, 8], ref, None, cfg, lambda _: None)
    assert result["passed"] is passes, result["failures"]
    assert result["tensor"]["max_abs_err"] > 1e-3  # really rounded
    if passes:
        assert result["tolerance"]["atol"] > 1e-2 and "fp16" in result["tolerance"]["basis"]
    else:
        assert "max_abs_err" in result["failures"][0] and "atol 1e-04" in result["failures"][0]


def test_every_runtime_of_an_artifact_keeps_its_own_parity_row():
    """openvino-bf16 on the fp32 IR is a bf16 row beside the IR's fp32 row, each with its own contract and error
    (issue 21: the bf16 error once showed under the fp32 label, marked pass)."""
    from dataclasses import asdict

    import numpy as np

    from cnnpack.precision import parity_line, parity_table
    from cnnpack.report import _verify
    from cnnpack.verify import VerifyConfig, by_format, tolerances

    ref = np.full((4, 3), 10.0, np.float32)

    def result(runtime, precision, err):
        tol = asdict(tolerances(VerifyConfig(), "float32", ref, precision))
        return {"format": "openvino", "runtime": runtime, "precision": precision, "tolerance": tol, "passed": True,
                "tensor": {"max_abs_err": err}, "task": {"accuracy": 0.9, "top1_agreement": 1.0}}

    stages = {"verify": {"passed": True, "formats": by_format([result("openvino", "fp32", 4.3e-6),
                                                               result("openvino-bf16", "bf16", 2.55e-2)])}}
    own = stages["verify"]["formats"]["openvino"]  # the manifest's fixed keys: the fp32 line holds fp32 figures
    assert (own["precision"], own["max_abs_err"], own["passed"]) == ("fp32", 4.3e-6, True)
    rows = {r["runtime"]: r for r in parity_table(stages)}
    assert rows["openvino"]["precision"] == "fp32" and rows["openvino"]["max_abs_err"] == 4.3e-6
    assert rows["openvino"]["contract"].startswith("fp32: atol 1e-04")
    assert rows["openvino-bf16"]["precision"] == "bf16" and rows["openvino-bf16"]["max_abs_err"] == 2.55e-2
    assert rows["openvino-bf16"]["contract"].startswith("bf16: ")
    from cnnpack.contracts import contract_line  # a tolerance scaled to the logits (0.02 x 15.8) to two figures

    assert contract_line({"contract": "bf16", "atol": 0.315, "rtol": 0.05, "min_agreement": 0.995}) == (
        "bf16: atol 0.32, rtol 5e-02, agreement >= 99.5%")  # it said "atol 3e-01"
    table = _verify({"stages": stages})[-1].rows
    assert [r[:4] for r in table[1:]] == [["openvino", "openvino", "fp32", "4.30e-06"],
                                           ["openvino", "openvino-bf16", "bf16", "2.55e-02"]]
    assert parity_line(list(rows.values())).endswith("(fp32 max abs err 4.3e-06; bf16 max abs err 2.5e-02)")


def test_the_report_says_which_verdicts_are_an_earlier_files_and_which_artifacts_were_never_verified(exported, tmp_path):
    from cnnpack.precision import stale, unverified
    from cnnpack.report import write_report

    run_dir = _copy(exported, tmp_path)
    verify(run_dir, VerifyConfig(batch_sizes=(1,), samples=4, formats=("onnx",)))
    export(run_dir, ExportConfig(formats=("onnx",), max_batch_size=MAX_BATCH - 1))  # another file: its sha256 differs
    stages = Run.open(run_dir).read()["stages"]
    assert stale(stages, "verify") == ["onnx"] and unverified(stages) == ["torchscript"]
    write_report(run_dir)
    md = (run_dir / "report.md").read_text()
    assert "but not every current artifact was checked" in md and "every artifact x runtime pair is within" not in md
    assert "**Stale**: onnx was exported again after verify checked it" in md and "pass (an earlier file)" in md
    assert "**Not verified**: torchscript" in md
    # a record from before the weights were part of an artifact's identity is not called stale for lacking them
    legacy = {"export": {"artifacts": {"openvino": {"sha256": "a", "weights": {"sha256": "b"}}}},
              "verify": {"artifacts": {"openvino": {"sha256": "a"}}}, "bench": {"inputs": {"openvino": "a+c"}}}
    assert stale(legacy, "verify") == [] and stale(legacy, "bench") == ["openvino"]


def test_the_tolerance_said_to_pass_is_rounded_up_so_it_passes():
    from cnnpack.contracts import at_least

    assert at_least(1.24e-2) == "1.3e-02"  # to nearest it read 1.2e-02, which still failed
    assert at_least(1.2e-2) == "1.2e-02" and at_least(9.95e-3) == "1.0e-02" and at_least(1e-4) == "1.0e-04"
    for x in (1.24e-2, 3.01e-7, 9.99e-1, 4.2e5):
        assert float(at_least(x)) >= x


def _tied(flip: list[int], margin: float, shift: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """200 images, 3 classes, logits ~5; the images in `flip` have eager's top two classes `margin` apart, and the
    target moves each of them by `shift` the other way: the target picks the other class there, nowhere else."""
    want = np.tile(np.array([5.0, 1.0, -2.0], np.float32), (200, 1))
    got = want + np.random.default_rng(0).normal(0, 1e-6, want.shape).astype(np.float32)
    for i in flip:
        want[i, 1] = 5.0 - margin
        got[i, 0], got[i, 1] = 5.0 - shift, 5.0 - margin + shift
    return got, want, np.zeros(200, int)


@pytest.mark.parametrize("precision, margin, shift, passes", [
    ("bf16", 1e-2, 6e-3, True),  # ties: 2 classes 1e-2 apart, within one bf16 step (2^-7 x 5 = 3.9e-2)
    ("bf16", 0.1, 0.06, False),  # 0.1 apart: bf16 can tell them apart, though each logit is within the tensor band
    ("fp32", 1e-4, 6e-5, False),  # the same near-tie is no tie in fp32, whose step is 2^-23
])
def test_a_disagreement_within_one_step_of_the_precision_is_a_tie_not_counted_against_agreement(
        precision, margin, shift, passes):
    """A 2-epoch cnn (top-1 52 %) in OpenVINO bf16 differed from eager on 6 of 900 images, 5 of them where eager's two
    classes were 1e-4 to 2e-3 x the logits apart: bf16 cannot order values that close; the pipeline stopped at verify."""
    from dataclasses import asdict

    from cnnpack.contracts import failures, task_stats, tolerances
    from cnnpack.precision import parity_table
    from cnnpack.verify import by_format

    got, want, labels = _tied([3, 50, 120], margin, shift)  # 3 of 200: 98.5 % plain agreement, below every gate
    tol = tolerances(VerifyConfig(), "float32", want, precision)
    tensor = tensor_stats(got, want, atol=tol.atol, rtol=tol.rtol)
    assert tensor["outside_tolerance"] == 0  # the tensor contract holds in every case: the agreement gate decides
    task = task_stats(got, want, labels, tol.tie_eps)
    assert (task["top1_agreement"], task["top1_disagreements"]) == (0.985, 3)  # the plain figure stays as it is
    assert task["top1_tie_disagreements"] == (3 if passes else 0)
    failed = failures("openvino (openvino-bf16)", tensor, task, tol)
    assert not failed if passes else re.search(r"top1_agreement 98\.50% < 99\.[59]0% \(task parity: 3 of 200", failed[0])
    if passes:  # the ties reach the manifest and the report's row
        result = {"format": "openvino", "runtime": "openvino-bf16", "precision": precision, "tolerance": asdict(tol),
                  "passed": True, "tensor": tensor, "task": task}
        row = parity_table({"verify": {"formats": by_format([result])}})[0]
        assert (row["top1_agreement"], row["tie_disagreements"]) == (0.985, 3)


def test_a_tie_needs_eager_itself_to_be_tied_not_the_target():
    """Where eager decides clearly and the target's own logits are tied, the disagreement counts."""
    from cnnpack.contracts import task_stats

    want = np.array([[5.0, 1.0], [5.0, 1.0]], np.float32)
    got = np.array([[3.0, 3.0001], [5.0, 1.0]], np.float32)
    task = task_stats(got, want, np.zeros(2, int), 2.0 ** -7)
    assert (task["top1_tie_disagreements"], task["top1_agreement_gated"]) == (0, 0.5)


def test_a_formats_line_holds_the_artifacts_own_precision_whichever_runtime_ran_first():
    """The fp32 IR's line is fp32 also when its bf16 runtime's result comes first, and holds no figure at all (not
    a 0 error) when only the bf16 runtime ran it."""
    from cnnpack.verify import by_format

    def result(runtime, precision, err):
        return {"format": "openvino", "runtime": runtime, "precision": precision, "artifact_precision": "fp32",
                "passed": True, "tensor": {"max_abs_err": err}, "task": {"accuracy": 0.9, "top1_agreement": 0.99},
                "tolerance": None}

    both = by_format([result("openvino-bf16", "bf16", 2.5e-2), result("openvino", "fp32", 4e-6)])["openvino"]
    assert (both["precision"], both["max_abs_err"], both["runtimes"]) == ("fp32", 4e-6, ["openvino-bf16", "openvino"])
    alone = by_format([result("openvino-bf16", "bf16", 2.5e-2)])["openvino"]
    assert (alone["precision"], alone["max_abs_err"], alone["top1_agreement"]) == ("fp32", None, None)
    assert alone["by_runtime"]["openvino-bf16"]["max_abs_err"] == 2.5e-2
