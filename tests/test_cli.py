"""The command line as a user runs it: a process per call, `python -m cnnpack` (the bad inputs: forked from one
that imported the CLI and torch once, `support.forked_cli`, named `cnnpack` as the console script names itself)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import typer
from support import ctrl_c_after_first_epoch, forked_cli

from cnnpack.cli import app

COMMANDS = sorted(typer.main.get_command(app).commands)
HEAVY = ("torch", "torchvision", "onnxruntime", "onnx", "tritonclient", "matplotlib")


def _cnnpack(*args: str, importtime: bool = False, timeout: float = 300, columns: int = 100) -> subprocess.CompletedProcess:
    py = [sys.executable, "-X", "importtime"] if importtime else [sys.executable]
    env = {**os.environ, "COLUMNS": str(columns)}
    return subprocess.run([*py, "-m", "cnnpack", *args], capture_output=True, text=True, timeout=timeout, env=env)


def _imported(importtime_stderr: str) -> set[str]:
    """Top-level packages named in `python -X importtime` output."""
    names = set()
    for line in importtime_stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            names.add(line.rsplit("|", 1)[1].strip().split(".")[0])
    return names


def test_every_command_is_listed_and_the_version_is_said():
    assert {"train", "evaluate"} <= set(COMMANDS)
    from importlib.metadata import version

    out = _cnnpack("--version")
    assert (out.returncode, out.stdout, out.stderr) == (0, f"cnnpack {version('cnnpack')}\n", "")


@pytest.mark.parametrize("command", ["", *COMMANDS])
def test_help_answers_with_an_example_without_heavy_imports(command):
    out = _cnnpack(*filter(None, [command]), "--help", importtime=True, columns=80)  # a terminal's narrowest
    assert out.returncode == 0, out.stderr[-2000:]
    # rich's table cut or split names that did not fit (`--latency-budget-…`, `--credentials-secr` + `et`)
    cmd = typer.main.get_command(app)
    cmd = cmd.commands[command] if command else cmd
    names = [o for p in cmd.params for o in (*p.opts, *p.secondary_opts) if o.startswith("--")]
    words = set(out.stdout.replace(",", " ").replace("/", " ").split())
    assert names and not [n for n in names if n not in words], out.stdout
    assert "Example" in out.stdout
    imported = _imported(out.stderr)
    assert "typer" in imported  # the parse worked: the list is real
    assert not imported & set(HEAVY), f"`cnnpack {command} --help` imported {sorted(imported & set(HEAVY))}"
    assert "<bool>" not in out.stdout  # a flag takes no value: typer's type label beside it would say it did


@pytest.mark.parametrize(("command", "firsts"), [("evaluate", ["checkpoint"]), ("verify", []), ("triton", [])])
def test_format_help_names_every_format_the_command_reads(command, firsts):
    from cnnpack.runtimes import FORMAT_RUNTIME

    out = _cnnpack(command, "--help")
    words = set(out.stdout.replace(",", " ").replace("|", " ").replace(":", " ").split())
    assert set(FORMAT_RUNTIME) - {"checkpoint"} | set(firsts) <= words


@pytest.fixture(scope="module")
def bad_runs(tiny_run, tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every bad input, each in a process of its own (forked from one that imported torch once)."""
    tmp = tmp_path_factory.mktemp("cli")
    existing = tmp / "existing"
    shutil.copytree(tiny_run, existing)
    (tmp / "plain").mkdir()
    (tmp / "afile").write_text("not a folder")
    from PIL import Image

    for cls in ("a", "b"):  # one image a class: none to hold out for validation
        (tmp / "few" / cls).mkdir(parents=True)
        Image.new("RGB", (20, 20), (200, 0, 0) if cls == "a" else (0, 0, 200)).save(tmp / "few" / cls / "1.png")
    broken = tmp / "broken"
    shutil.copytree(tiny_run, broken)
    (broken / "last.pt").write_bytes((broken / "last.pt").read_bytes()[:1000])
    manifest = json.loads((broken / "cnnpack.json").read_text())
    manifest["stages"]["train"]["status"] = "interrupted"  # (a finished run has nothing to resume)
    (broken / "cnnpack.json").write_text(json.dumps(manifest))
    data = json.loads((tiny_run / "cnnpack.json").read_text())["stages"]["train"]["config"]["data"]
    (tmp / "listrun").mkdir()
    (tmp / "listrun" / "cnnpack.json").write_text("[]")
    pipe = ["pipeline", "--run", str(tmp / "p"), "--serve", "no"]
    cases = {
        "unknown-arch": ["train", "--arch", "resnet19", "--run", str(tmp / "a")],
        "missing-data": ["train", "--data", str(tmp / "no-such-folder"), "--run", str(tmp / "b")],
        "existing-run": ["train", "--data", data, "--image-size", "32", "--epochs", "1", "--run", str(existing)],
        "resume-without-run": ["train", "--run", str(tmp / "plain"), "--resume"],
        "resume-missing-dir": ["train", "--run", str(tmp / "nope"), "--resume"],
        "resume-truncated": ["train", "--run", str(broken), "--resume"],
        "evaluate-no-run": ["evaluate", "--run", str(tmp / "nope")],
        "resume-changed-options": ["train", "--run", str(existing), "--resume", "--epochs", "5", "--lr", "0.1",
                                   "--no-amp", "--channels-last"],  # (the latter as the default came to: no change)
        "resume-and-force": ["train", "--run", str(existing), "--resume", "--force"],
        "existing-run-bad-option": ["train", "--run", str(existing), "--optimizer", "adam"],  # said after --force
        "export-half-on-cpu": ["export", "--run", str(existing), "--half"],
        "repeated-option": ["export", "--run", str(existing), "--format", "onnx", "--format=torchscript"],
        "option-under-two-names": ["train", "--run", str(tmp / "c1"), "--run-dir", str(tmp / "c2")],
        "option-on-and-off": ["train", "--run", str(existing), "--force", "--no-force"],
        "val-fraction-of-split-data": ["train", "--data", data, "--val-fraction", "0.3", "--run", str(tmp / "d")],
        "run-under-a-file": ["train", "--data", data, "--epochs", "1", "--run", str(tmp / "afile" / "run")],
        "run-is-a-file": ["evaluate", "--run", str(tmp / "afile")],
        "manifest-not-an-object": ["evaluate", "--run", str(tmp / "listrun")],
        "resume-finished": ["train", "--run", str(existing), "--resume"],
        "export-empty-format": ["export", "--run", str(existing), "--format", " , "],
        "export-unknown-format": ["export", "--run", str(existing), "--format", "onnx,tflite"],
        "export-device-tpu": ["export", "--run", str(existing), "--device", "tpu"],
        "bench-device-tpu": ["bench", "--run", str(existing), "--device", "tpu"],
        "bench-served-device": ["bench", "--run", str(existing), "--triton-url", "127.0.0.1:9", "--model", "m",
                                "--device", "cuda"],
        "bench-huge-batch": ["bench", "--run", str(existing), "--runtimes", "eager", "--batch-sizes", "100000000"],
        "bench-bad-triton-url": ["bench", "--run", str(existing), "--triton-url", "ftp://h", "--model", "m"],
        "bench-served-option-alone": ["bench", "--run", str(existing), "--concurrency", "0"],
        "verify-empty-batch-sizes": ["verify", "--run", str(existing), "--batch-sizes", ""],
        "train-data-root-with-shapes": ["train", "--data", "shapes", "--data-root", str(tmp), "--run",
                                        str(tmp / "dr")],
        "evaluate-download-with-folder": ["evaluate", "--run", str(existing), "--download"],
        "evaluate-root-with-other-folder": ["evaluate", "--run", str(existing), "--data", str(tmp / "few"),
                                            "--data-root", str(tmp)],
        "tune-undo-with-budget": ["tune", "--run", str(existing), "--undo", "--latency-budget-ms", "-1"],
        "bench-empty-batch-size": ["bench", "--run", str(existing), "--batch-sizes", "1,,32"],
        "quantize-max-drop-over-100": ["quantize", "--run", str(existing), "--max-drop", "101"],
        "evaluate-empty-data": ["evaluate", "--run", str(existing), "--data", " "],
        "export-flag-without-arch": ["export", "--run", str(existing), "--num-classes", "3"],
        "evaluate-without-export": ["evaluate", "--run", str(existing), "--format", "onnx"],
        "pipeline-missing-data": [*pipe, "--data", str(tmp / "no-such-folder")],
        "pipeline-tiny-image": [*pipe, "--image-size", "4"],
        "pipeline-repository-file": [*pipe, "--repository", str(tmp / "afile")],
        "pipeline-unknown-format": [*pipe, "--formats", "onnx,bogus"],
        "pipeline-openvino-conflict": [*pipe, "--formats", "onnx,openvino", "--openvino", "no"],
        "pipeline-too-few-images": [*pipe, "--data", str(tmp / "few")],  # found by the train stage: still exit 2
        "tune-empty-models": ["tune", "--run", str(existing), "--models", " "],  # it swept every model
        "tune-huge-delay": ["tune", "--run", str(existing), "--queue-delays-us", "99999999999999999999"],  # a traceback
        "tune-huge-instances": ["tune", "--run", str(existing), "--instances", "99999999999", "--oversubscribe"],
        "export-huge-static-batch": ["export", "--run", str(existing), "--static-batch", "100000000"],
        "export-static-and-max-batch": ["export", "--run", str(existing), "--static-batch", "4", "--max-batch-size",
                                        "8"],  # the second was ignored without a word
        "bench-served-with-runtimes": ["bench", "--run", str(existing), "--triton-url", "127.0.0.1:9", "--model", "m",
                                       "--runtimes", "onnxruntime"],  # ignored without a word
    }
    if not _cuda_available():
        cases["device-cuda"] = ["train", "--device", "cuda", "--run", str(tmp / "c")]
    results: dict = forked_cli(cases, tmp=tmp)
    results["_existing_before"] = {f.name: f.read_bytes() for f in tiny_run.iterdir()}
    results["_existing_after"] = {f.name: f.read_bytes() for f in existing.iterdir()}
    results["_tmp"] = tmp
    return results


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


EXPECTED = {
    "unknown-arch": "unknown arch 'resnet19' (closest: resnet18",
    "missing-data": "data folder not found",
    "existing-run": "already holds a run; pass --force",
    "resume-without-run": "is not a cnnpack run",
    "resume-missing-dir": "no such run directory",
    "resume-truncated": "last.pt is truncated or not a cnnpack resume state",
    "evaluate-no-run": "no such run directory",
    "resume-changed-options": "--resume continues",  # (the whole line is checked below)
    "resume-and-force": "--resume continues the run in --run, --force replaces it",
    "existing-run-bad-option": "--optimizer 'adam'; valid: adamw, sgd",
    "export-half-on-cpu": "--half makes fp16 artifacts for GPU targets; add --device cuda",
    "device-cuda": "--device cuda: no CUDA GPU",
    "repeated-option": "--format is given more than once: give it once (where it takes a list, as one comma list)",
    "option-under-two-names": "--run and --run-dir set one option: give one of them",  # (trained into c2)
    "option-on-and-off": "--force and --no-force set one option: give one of them",  # (--no-force won, silently)
    "val-fraction-of-split-data": "--val-fraction splits a folder of class folders, and",  # (recorded, unused)
    "run-under-a-file": "afile is a file, not a folder",  # found before the data is loaded
    "run-is-a-file": "afile is a file, not a run directory",
    "manifest-not-an-object": "holds a JSON list, not a cnnpack manifest",
    "resume-finished": "finished training (2 epochs",
    "export-empty-format": "--format ' , '; valid: onnx,",
    "export-unknown-format": "--format 'tflite'; valid: onnx,",
    "export-device-tpu": "--device 'tpu'; valid: cpu, cuda",
    "bench-device-tpu": "--device 'tpu'; valid: auto, cpu, cuda",
    "bench-served-device": "--device cuda is for a local bench; with --triton-url the server runs the model on",
    "bench-huge-batch": "--batch-sizes must be at most 4,096 (a batch is held in memory",
    "bench-bad-triton-url": "--triton-url 'ftp://h': scheme 'ftp'",  # the option as bench names it
    "bench-served-option-alone": "--concurrency is for a served model: give the server with --triton-url",
    "verify-empty-batch-sizes": "--batch-sizes is empty",
    "train-data-root-with-shapes": "--data-root is for torchvision:NAME data sets, and --data is 'shapes'; drop",
    "evaluate-download-with-folder": "--download is for torchvision:NAME data sets, and the run's data is '/",
    "evaluate-root-with-other-folder": "--data-root is for torchvision:NAME data sets, and --data is '",
    "tune-undo-with-budget": "--undo restores the configs before any tune and stops; it takes no sweep options "
                             "(drop --latency-budget-ms)",
    "bench-empty-batch-size": "--batch-sizes takes comma-separated integers, got '1,,32'",
    "quantize-max-drop-over-100": "--max-drop is in percentage points of top-1 and must be >= 0 and <= 100, got 101",
    "evaluate-empty-data": "--data is empty; give shapes, a folder",
    "export-flag-without-arch": "--num-classes goes with --arch",
    "evaluate-without-export": "has no successful `export` stage; run `cnnpack export --run",
    "pipeline-missing-data": "data folder not found",
    "pipeline-tiny-image": "--image-size 4 is too small (minimum 8)",
    "pipeline-repository-file": "afile is a file, not a folder; choose another --repository",
    "pipeline-unknown-format": "unknown format 'bogus'",
    "pipeline-openvino-conflict": "--formats names openvino and --openvino is no",
    "pipeline-too-few-images": "pipeline stopped: stage train failed: ",
    "tune-empty-models": "--models is empty; name at least one served model",
    "tune-huge-delay": "--queue-delays-us must be in 0..60,000,000 (a minute;",
    "tune-huge-instances": "--instances must be at most 1024, got 99999999999",
    "export-huge-static-batch": "--static-batch must be in 1..4,096 (the export traces a batch of that many images",
    "bench-served-with-runtimes": "--runtimes is for a local bench; with --triton-url the served model is --model",
    "export-static-and-max-batch": "--max-batch-size bounds the dynamic batch dimension, which --static-batch "
                                   "replaces; give one of them",
}


@pytest.mark.slow
@pytest.mark.parametrize("case", EXPECTED)
def test_bad_input_is_one_error_line_and_exit_2(bad_runs, case):
    if case not in bad_runs:
        pytest.skip("this machine has a CUDA GPU")
    out = bad_runs[case]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert out.returncode == 2, out.stderr[-2000:]
    assert len(errors) == 1, out.stderr
    assert EXPECTED[case] in errors[0]
    assert "Traceback" not in out.stderr and out.stdout == ""
    if case.startswith("pipeline"):
        assert not (bad_runs["_tmp"] / "p").exists()  # refused before any stage ran


USAGE_ERRORS = {
    ("bench", "--run", "r", "--no-such"): "error: cnnpack bench: no such option: --no-such (see `cnnpack bench -h`)",
    ("bench",): "error: cnnpack bench: missing option '--run' (see `cnnpack bench -h`)",
    ("trian",): "error: cnnpack: no such command 'trian'",
    ("train", "--epochs", "two"): "error: cnnpack train: invalid value for '--epochs'",
}


def test_a_usage_error_is_one_line_too_not_clicks_usage_box(tmp_path):
    """An unknown option or command, a missing or malformed one: one line naming the command, exit 2, as for every
    other bad input (click's default is a four-line box), and nothing written."""
    procs = {a: subprocess.Popen([sys.executable, "-m", "cnnpack", *a], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                 text=True, cwd=tmp_path) for a in USAGE_ERRORS}
    for args, p in procs.items():
        stdout, stderr = p.communicate(timeout=120)
        stderr = stderr.replace("python -m cnnpack", "cnnpack")  # click names the program as it was started
        assert p.returncode == 2, (args, stderr)
        assert stderr.count("\n") == 1 and stderr.startswith(USAGE_ERRORS[args]), (args, stderr)
        assert stdout == ""
    assert list(tmp_path.iterdir()) == []
    bare = subprocess.run([sys.executable, "-m", "cnnpack"], capture_output=True, text=True)
    assert "Example: cnnpack pipeline" in bare.stdout + bare.stderr  # `cnnpack` alone still shows the help


def test_a_system_error_names_the_users_path_not_cnnpacks_temporary_sibling():
    from cnnpack.errors import file_error

    assert file_error(OSError(errno.ENOSPC, "No space left on device", "/m/.model.onnx.k2_x9a.tmp")) == \
        "/m/model.onnx: No space left on device"
    assert file_error(OSError(errno.EROFS, "Read-only file system", "/m/.deploy.new-3fz_q1")) == \
        "/m/deploy: Read-only file system"
    assert file_error(OSError(errno.EIO, "Input/output error", "/m/.deploy.new-3fz_q1/kubernetes/a.yaml")) == \
        "/m/deploy/kubernetes/a.yaml: Input/output error"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full")
def test_a_full_disk_names_the_output_that_could_not_be_written(tmp_path):
    """A write, flush or fsync that fails for want of space raises without a file name; the output is named."""
    from cnnpack.atomic import atomic_path
    from cnnpack.errors import file_error

    with pytest.raises(OSError) as e, atomic_path(tmp_path / "model.onnx"), open("/dev/full", "wb") as full:
        full.write(b"weights")
        full.flush()
    assert file_error(e.value) == f"{tmp_path / 'model.onnx'}: No space left on device"
    assert list(tmp_path.iterdir()) == []  # neither the output nor its temporary sibling


def test_resume_with_a_changed_option_names_it(bad_runs):
    """--resume always continues the recorded config: a different --epochs would be silently ignored."""
    error = bad_runs["resume-changed-options"].stderr.strip()
    assert ("but --epochs 5 (recorded: --epochs 2), --lr 0.1 (recorded: the default), --no-amp (recorded: --amp): "
            "drop the option") in error


def test_bad_input_loses_nothing(bad_runs):
    assert bad_runs["_existing_after"] == bad_runs["_existing_before"]
    tmp = bad_runs["_tmp"]
    assert not (tmp / "a").exists() and not (tmp / "b").exists() and not (tmp / "c").exists()
    assert [p.name for p in (tmp / "plain").iterdir()] == []


def test_debug_shows_the_traceback(tmp_path):
    out = _cnnpack("--debug", "train", "--data", str(tmp_path / "missing"), "--run", str(tmp_path / "r"))
    assert out.returncode == 2 and "Traceback" in out.stderr and "UserInputError" in out.stderr  # the same exit code


@pytest.mark.slow
def test_ctrl_c_keeps_the_last_epoch_and_resume_finishes(tiny_data, tmp_path):
    run = tmp_path / "run"
    args = ["train", "--data", str(tiny_data), "--image-size", "32", "--epochs", "3", "--batch-size", "32",
            "--no-progress", "--run", str(run)]
    code, stderr = ctrl_c_after_first_epoch(args)
    assert code == 130, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    # the Ctrl-C came while epoch 1's files were written: held back until they were whole, then raised
    assert "interrupted after epoch 1; epoch 1 is kept in" in errors[0], stderr
    assert "Warning" not in stderr, stderr  # no library warnings in a plain `cnnpack train`
    manifest = json.loads((run / "cnnpack.json").read_text())
    assert manifest["stages"]["train"]["status"] == "interrupted"
    kept = json.loads((run / "history.json").read_text())
    assert len(kept) >= 1 and not list(run.glob(".*.tmp"))

    # the same command line plus --resume is accepted (its options repeat the recorded ones)
    out = _cnnpack(*args, "--resume", "--json")
    assert out.returncode == 0 and "Warning" not in out.stderr, out.stderr[-2000:]
    section = json.loads(out.stdout)
    assert section["status"] == "ok" and section["resumed"] is True and section["metrics"]["epochs"] == 3
    assert [h["epoch"] for h in json.loads((run / "history.json").read_text())] == [1, 2, 3]


def test_report_brings_a_run_made_stage_by_stage_up_to_date(tiny_run, tmp_path):
    run = tmp_path / "my run"
    shutil.copytree(tiny_run, run)
    out = _cnnpack("report", "--run", str(run))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == [str(run / "report.html"), str(run / "report.md")]
    md = (run / "report.md").read_text()
    assert "## Training" in md and "## Exported artifacts" not in md  # what the run has, nothing it lacks
