"""`cnnpack pipeline` end to end on tiny real data: every stage, the report, skipping, --force, failure."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from support import ctrl_c_after_first_epoch, ctrl_c_at, killed_at
from typer.testing import CliRunner

from cnnpack.cli import app
from cnnpack.errors import UserInputError

TINY = ["--image-size", "32", "--epochs", "1", "--batch-size", "32", "--runtimes", "eager,onnxruntime",
        "--batch-sizes", "1,4", "--max-seconds", "0.3", "--max-batch-size", "8", "--threads", "1",
        "--concurrency", "1,4", "--infer-images", "6",
        # The int8 gate, set for a test of the plumbing: the tiny model is barely trained (top-1 near chance, logits
        # near ties), so whether int8 flips one of its 90 validation images depends on the kernels the host picks
        # (AMX, VNNI, AVX2). The gate's own behaviour is tested on a planted case in test_quantize.py.
        "--max-drop", "100", "--min-agreement", "0.5",
        "--openvino", "no",  # the OpenVINO stages have a test of their own below
        "--pt2", "no"]  # the pt2 package (a C++ compile) joins the `first` run only, by --pt2 auto


def _can_serve() -> bool:
    from cnnpack.pipeline import serve_available

    return serve_available()[0]


SERVED = "ran" if _can_serve() else "off"  # the local Triton server runs wherever the serve extra does


def _has_compiler() -> bool:
    from cnnpack.pt2 import compiler_available

    return compiler_available()[0]


PT2 = _has_compiler()  # `first` runs --pt2 auto: the package joins every stage where a C++ compiler is found


def _pipeline(*args: str):
    result = CliRunner().invoke(app, ["pipeline", "--no-progress", *args])
    return result.exit_code, result.stdout, result.stderr


def _statuses(out: dict) -> dict[str, str]:
    return {s["name"]: s["status"] for s in out["stages"]}


@pytest.fixture(scope="module")
def first(tiny_data, tmp_path_factory):
    """One full pipeline run, with the served stage when the local Triton server can run here."""
    tmp = tmp_path_factory.mktemp("pipeline")
    run, repo = tmp / "run", tmp / "repo"
    args = ["--data", str(tiny_data), "--run", str(run), "--repository", str(repo), *TINY]
    args[args.index("--pt2") + 1] = "auto"
    if PT2:  # --runtimes measures what it lists: the package's own runtime named with it
        args[args.index("--runtimes") + 1] += ",aoti"
    code, out, err = _pipeline(*args, "--json")
    assert code == 0, err[-3000:]
    return {"run": run, "repo": repo, "args": args, "out": json.loads(out), "err": err}


@pytest.mark.slow
def test_every_stage_runs_and_the_manifest_records_it(first):
    out = first["out"]
    assert _statuses(out) == {"train": "ran", "export": "ran", "quantize": "ran", "verify": "ran", "bench": "ran",
                              "triton": "ran", "served": SERVED}
    m = json.loads((first["run"] / "cnnpack.json").read_text())
    for name in ("train", "export", "quantize", "verify", "bench", "triton") + (("served",) if SERVED == "ran" else ()):
        assert m["stages"][name]["status"] == "ok"
        assert re.fullmatch(r"[0-9a-f]{64}", m["stages"][name]["inputs_sha256"])
    assert m["stages"]["pipeline"]["status"] == "ok"
    assert out["parity_passed"] is True and 0 < out["accuracy"] <= 1
    local = [r for r in m["stages"]["bench"]["results"] if r["runtime"] not in ("eager", "triton")]
    fastest = max(local, key=lambda r: r["speedup_vs_eager"])  # ONNX Runtime's or the pt2 package's: a race
    assert fastest["runtime"] in ("onnxruntime", "aoti", "compiled") and fastest["speedup_vs_eager"] > 1
    assert (out["best_runtime"]["runtime"], out["best_runtime"]["batch_size"]) == (fastest["runtime"],
                                                                                   fastest["batch_size"])
    assert set(out["models"]) == {"cnn_onnx", "cnn_onnx_image", "cnn_torchscript", "cnn_onnx_int8",
                                  *(["cnn_pt2"] if PT2 else [])}
    assert m["stages"]["export"]["artifacts"]["onnx_int8"]["precision"] == "int8"
    assert m["stages"]["verify"]["formats"]["onnx_int8"]["passed"]  # held to the int8 contract
    assert {(r["runtime"], r["precision"]) for r in m["stages"]["bench"]["results"] if r["runtime"] != "triton"} >= {
        ("onnxruntime", "fp32"), ("onnxruntime", "int8")}
    table = {r["artifact"]: r for r in out["precision"]}
    assert set(table) == {"onnx", "torchscript", "onnx_int8", *(["pt2"] if PT2 else [])}
    assert table["onnx_int8"]["precision"] == "int8"
    if PT2:  # the package in every stage: exported, held to fp32 parity, benched in aoti, laid out as torch_aoti
        assert m["stages"]["export"]["artifacts"]["pt2"]["compile_s"] > 0
        assert m["stages"]["verify"]["formats"]["pt2"]["passed"] and table["pt2"]["runtime"] == "aoti"
        assert {r["batch_size"] for r in m["stages"]["bench"]["results"] if r["runtime"] == "aoti"} == {1, 4}
        assert 'platform: "torch_aoti"' in (first["repo"] / "cnn_pt2" / "config.pbtxt").read_text()
    assert table["onnx_int8"]["speedup_vs_fp32"] > 0 and table["onnx_int8"]["size_mb"] < table["onnx"]["size_mb"]
    if SERVED == "ran":  # the served int8 model was verified and put under load
        served = m["stages"]["served"]
        assert served["parity"]["triton:cnn_onnx_int8"]["passed"]
        assert {r["format"] for r in served["load"]} == {"triton:cnn_onnx", "triton:cnn_onnx_int8"}
    for model in out["models"]:
        assert (first["repo"] / model / "config.pbtxt").is_file()


@pytest.mark.slow
def test_report_has_every_section_and_inlines_its_images(first):
    md = (first["run"] / "report.md").read_text()
    for heading in ("## Data", "## Training", "## Exported artifacts", "## Parity against eager PyTorch",
                    "## Latency and throughput", "## Precisions", "## Triton model repository"):
        assert heading in md
    for png in ("curves.png", "confusion.png", "samples.png", "bench.png", "speedup.png", "precision.png"):
        assert f"]({png})" in md and (first["run"] / png).is_file()
    assert "cnnpack serve --repository" in md and "nvcr.io/nvidia/tritonserver" in md
    # written as the pipeline ends: its section says ok by then (it said "running", and the report "did not finish")
    assert "did not finish" not in md and "Not every stage finished" not in md
    cold = next(ln for ln in md.splitlines() if ln.startswith("**Cold start**"))  # every locally benched runtime
    bench = json.loads((first["run"] / "bench.json").read_text())
    assert all(f"{r['runtime']}: load " in cold for r in bench["results"] if r["runtime"] != "triton")
    html = (first["run"] / "report.html").read_text()
    assert html.count("src='data:image/png;base64,") == 6
    assert not re.search(r"src=['\"](?!data:)", html)  # self-contained: nothing linked
    # every table scrolls inside the page: the artifacts table (8 columns) had run past its right edge
    assert html.count("<table>") == html.count("<div class='wide'><table>") >= 5


@pytest.mark.slow
def test_rerun_skips_every_stage(first):
    code, out, err = _pipeline(*first["args"], "--json")
    assert code == 0, err[-3000:]
    assert set(_statuses(json.loads(out)).values()) <= {"skipped", "off"}
    assert err.count("skipped: inputs unchanged") == 6 + (SERVED == "ran")


@pytest.mark.slow
def test_a_training_option_refused_over_a_finished_run_leaves_it_as_it_was(first):
    """`--pretrained` of the built-in cnn (or `--device cuda` without a GPU), given to a finished run's pipeline: the
    train stage refused it and marked the finished training "failed"; export then warned the training had not
    finished, and the next run said it resumed an interrupted one. Now one line, exit 2, nothing written."""
    before = (first["run"] / "cnnpack.json").read_bytes()
    code, out, err = _pipeline(*first["args"], "--pretrained")
    assert code == 2 and err.strip().splitlines() == ["error: --pretrained: the built-in `cnn` has no pretrained "
                                                      "weights"] and "[train]" not in out + err, err
    assert (first["run"] / "cnnpack.json").read_bytes() == before


@pytest.mark.slow
def test_a_changed_option_reruns_only_the_stages_it_feeds(first):
    args = [*first["args"]]
    args[args.index("--batch-sizes") + 1] = "1,2"  # feeds the local bench only
    code, out, err = _pipeline(*args, "--json")
    assert code == 0, err[-3000:]
    assert _statuses(json.loads(out)) == {"train": "skipped", "export": "skipped", "quantize": "skipped",
                                          "verify": "skipped", "bench": "ran", "triton": "skipped", "served": SERVED.replace("ran", "skipped")}
    if SERVED == "ran":  # bench kept the served rows
        rows = json.loads((first["run"] / "cnnpack.json").read_text())["stages"]["bench"]["results"]
        assert {r["concurrency"] for r in rows if r["runtime"] == "triton"} == {1, 4}


@pytest.mark.slow
def test_another_max_drop_verifies_the_int8_model_under_its_new_gate(first):
    """quantize under another --max-drop may write the same bytes; verify holds int8 to the gate it was made under, so
    it runs again (it was skipped, and verify.json kept the old gate)."""
    args = [*first["args"]]
    args[args.index("--max-drop") + 1] = "99"
    before = json.loads((first["run"] / "cnnpack.json").read_text())["stages"]["export"]["artifacts"]["onnx_int8"]
    before = before["sha256"]
    try:
        code, out, err = _pipeline(*args, "--json")
        assert code == 0, err[-3000:]
        ran = {k for k, v in _statuses(json.loads(out)).items() if v == "ran"}
        assert {"quantize", "verify"} <= ran and "train" not in ran
        int8 = [r for r in json.loads((first["run"] / "verify.json").read_text())["results"]
                if r["format"] == "onnx_int8"]
        assert int8 and all(r["tolerance"]["max_drop_pt"] == 99 for r in int8)
        artifact = json.loads((first["run"] / "cnnpack.json").read_text())["stages"]["export"]["artifacts"]["onnx_int8"]
        assert artifact["sha256"] == before  # the same bytes: only the gate tells verify to run again
    finally:
        code, _, err = _pipeline(*first["args"])  # back to the module's options for the tests after this one
        assert code == 0, err[-3000:]


@pytest.mark.slow
def test_a_deleted_or_changed_output_is_made_again(first):
    (first["run"] / "bench.csv").unlink()
    (first["run"] / "export" / "reproduce.sh").write_text("edited")
    code, out, err = _pipeline(*first["args"], "--json")
    assert code == 0, err[-3000:]
    ran = {k for k, v in _statuses(json.loads(out)).items() if v == "ran"}
    assert ran == {"bench"}  # reproduce.sh is not a recorded output: export's artifacts are unchanged
    assert (first["run"] / "bench.csv").is_file()


@pytest.mark.slow
def test_force_reruns_from_training(first, tmp_path):
    code, out, err = _pipeline(*first["args"], "--force", "--json")
    assert code == 0, err[-3000:]
    assert all(s in ("ran", "off") for s in _statuses(json.loads(out)).values())
    assert "[train] --force: training again" in err  # not a guess ("the run's files are gone or changed")


@pytest.mark.slow
def test_a_run_replaced_during_the_pipeline_gets_none_of_its_records(first, tmp_path, monkeypatch):
    """`train --force` by another command while the pipeline ran (after its own training): the pipeline marked its
    stages and itself in the new run's manifest. Now it stops, exit 1, and the new run holds nothing of it."""
    from cnnpack.pipeline import Stages
    from cnnpack.rundir import Run

    run = tmp_path / "run"
    shutil.copytree(first["run"], run)
    args = [*first["args"]]
    args[args.index("--run") + 1] = str(run)
    args[args.index("--batch-sizes") + 1] = "1,2"  # reruns the local bench only
    bench = Stages.run_bench

    def bench_then_replaced(self, r):
        summary = bench(self, r)
        Run.create(run, Run.open(run).model_spec, force=True)  # what `cnnpack train --run R --force` writes first
        return summary

    monkeypatch.setattr(Stages, "run_bench", bench_then_replaced)
    code, _, err = _pipeline(*args)
    assert code == 1, err[-3000:]
    assert "was replaced by a new run (trained again with --force)" in err.strip().splitlines()[-1]
    assert json.loads((run / "cnnpack.json").read_text())["stages"] == {}


@pytest.mark.slow
def test_a_failed_stage_stops_with_its_exit_code_and_a_pointer(first, tmp_path):
    repo = tmp_path / "repo"  # (a file there is refused up front: test_cli) its model's folder is another run's
    blocker = repo / "cnn_onnx" / "1" / "model.onnx"  # a model of other classes (a folder cnnpack did not make at
    blocker.parent.mkdir(parents=True)  # all is refused before training: test_a_model_folder_cnnpack_did_not_make...)
    blocker.write_text("a model cnnpack did not make")
    (repo / "cnn_onnx" / "config.pbtxt").write_text('name: "cnn_onnx"\nbackend: "onnxruntime"\n')
    (repo / "cnn_onnx" / "cnnpack-model.json").write_text(json.dumps({
        "identity": {"kind": "classifier", "arch": "cnn", "classes": ["other"]},
        "versions": {"1": {"run": str(tmp_path / "another-run")}}}))
    args = [*first["args"]]
    args[args.index("--repository") + 1] = str(repo)
    code, _, err = _pipeline(*args)
    assert code == 2  # bad input (the repository holds another model), as from `cnnpack triton` itself
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: pipeline stopped: stage triton failed") and "it holds a different model" in line
    assert f"--repository {repo}: " in line and "give this run a repository of its own (--repository)" in line
    m = json.loads((first["run"] / "cnnpack.json").read_text())
    assert m["stages"]["triton"]["status"] == "failed" and m["stages"]["pipeline"]["status"] == "failed"
    assert sorted(p.name for p in repo.rglob("*")) == ["1", "cnn_onnx", "cnnpack-model.json", "config.pbtxt",
                                                       "model.onnx"]  # nothing beside
    assert blocker.read_text() == "a model cnnpack did not make"  # nor overwritten


def test_the_default_runtimes_are_those_of_the_exported_formats():
    """--formats onnx with the default runtimes stopped at bench: torchscript was among them whatever was exported."""
    from cnnpack.pipeline_config import PipelineConfig

    assert PipelineConfig().runtimes() == ("eager", "compiled", "torchscript", "onnxruntime")  # as before
    assert PipelineConfig(formats=("onnx",)).runtimes() == ("eager", "compiled", "onnxruntime")
    assert PipelineConfig(bench_runtimes=("onnxruntime",)).runtimes() == ("onnxruntime",)
    PipelineConfig(formats=("onnx",)).validate()
    # --runtimes is what is measured: a format switched on adds its runtime only to the default list (--runtimes
    # eager measured openvino and openvino-bf16 too)
    assert PipelineConfig(bench_runtimes=("eager",), formats=("onnx", "pt2", "openvino")).runtimes() == ("eager",)
    assert PipelineConfig(formats=("onnx", "torchscript", "pt2")).runtimes() == (
        "eager", "compiled", "torchscript", "onnxruntime", "aoti")
    from cnnpack.pipeline_stage import again_hint

    assert again_hint(True) == "run the same `cnnpack pipeline` command again without --force to continue"


def test_a_training_refused_before_it_began_keeps_the_finished_one_s_record(tmp_path):
    """torchvision's weights not to be had (no network) are refused by the train stage itself, before it writes: the
    finished training's record stays (its status and fingerprint); a training that began and failed is marked."""
    from cnnpack.errors import StageFailed
    from cnnpack.pipeline_stage import Stage, run_stage
    from cnnpack.rundir import Run

    run = Run.create(tmp_path / "run", {"arch": "cnn", "classes": ["a", "b"], "num_classes": 2, "image_size": 32})
    finished = {"status": "ok", "config": {"epochs": 1}, "metrics": {"best_val_acc": 0.9}, "inputs_sha256": "x"}

    def refuse(_run):
        raise UserInputError("--pretrained: cannot get torchvision weights for resnet18 (URLError)")

    def begin_then_fail(r):
        r.set_stage("train", {"status": "running"})
        raise UserInputError("a class folder of the data became empty")

    for stage, status in ((refuse, "ok"), (begin_then_fail, "failed")):
        run.update(lambda m: m["stages"].update({"train": dict(finished)}))
        with pytest.raises(StageFailed, match="pipeline stopped: stage train failed"):
            run_stage(run, Stage("train", lambda _: {"n": 1}, stage, lambda _: ""), force=True, say=print)
        assert run.read()["stages"]["train"]["status"] == status
        assert ("inputs_sha256" in run.read()["stages"]["train"]) == (status == "ok")


def test_bad_options_exit_2_before_any_work(tmp_path):
    run = tmp_path / "run"
    for args, msg in ((["--serve", "maybe"], "--serve 'maybe'"), (["--concurrency", "0"], "--concurrency"),
                      (["--formats", "torchscript"], "must include onnx"), (["--epochs", "0"], "--epochs"),
                      (["--runtimes", "nope"], "nope"), (["--batch-sizes", "1,128"], "--max-batch-size"),
                      (["--tune-budget-ms", "0"], "--tune-budget-ms must be > 0"),
                      (["--serve", "no", "--tune-budget-ms", "5"], "it needs the served stage"),
                      (["--no-int8", "--max-drop", "2"], "--max-drop sets the int8 gate, which --no-int8 leaves out"),
                      (["--formats", ""], "--formats names no format; valid: onnx,"),
                      (["--data", "torchvision:NOPE"], "torchvision has no dataset 'NOPE'"),
                      (["--openvino", "maybe"], "--openvino 'maybe'"), (["--pt2", "maybe"], "--pt2 'maybe'"),
                      (["--formats", "onnx,pt2", "--pt2", "no"], "--formats names pt2 and --pt2 is no"),
                      (["--verify-min-agreement", "1.5"], "--verify-min-agreement is a fraction in (0, 1], got 1.5"),
                      (["--val-fraction", "1.5"], "--val-fraction must be in (0, 1), got 1.5"),
                      (["--val-fraction", "0.5"],  # (split nothing, and the run recorded it)
                       "--val-fraction splits a folder of class folders, and --data shapes comes with its own train/"),
                      (["--patience", "0"], "--patience must be >= 1"),
                      (["--download"], "--download is for torchvision:NAME data sets, and --data is 'shapes'"),
                      (["--calibration-images", "3601"], "more than the 3600 images of shapes's training split"),
                      # found at the bench stage after training, and again at each rerun
                      (["--formats", "onnx", "--runtimes", "eager,torchscript"],
                       "--runtimes torchscript runs the torchscript artifact, which this pipeline does not make"),
                      (["--runtimes", "eager,triton"], "--runtimes triton: the pipeline's served stage measures"),
                      (["--openvino", "no", "--runtimes", "openvino"], "which --openvino no leaves out"),
                      (["--repository", str(tmp_path / "afile" / "sub")],  # found after train..bench, uncaught
                       f"--repository {tmp_path / 'afile' / 'sub'}: {tmp_path / 'afile'} is a file, not a folder")):
        (tmp_path / "afile").write_text("")
        code, _, err = _pipeline("--run", str(run), *args)
        assert code == 2, (args, err)
        assert msg in err and len(err.strip().splitlines()) == 1, err
    assert not run.exists()


def test_train_s_options_pass_through_and_their_defaults_leave_the_fingerprint_as_it_was():
    """`cnnpack pipeline --val-fraction/--no-amp/--download` were in the README but only train took them; given, they
    reach training; not given, a finished run's train fingerprint is the one it recorded (not trained again)."""
    from dataclasses import asdict

    from cnnpack.pipeline import PipelineConfig, Stages
    from cnnpack.pipeline_stage import fingerprint
    from cnnpack.train_config import TrainConfig

    assert asdict(PipelineConfig().train_config()) == asdict(TrainConfig())
    given = PipelineConfig(data=".", val_fraction=0.3, amp=False, channels_last=False, lr=0.05,
                           patience=2).train_config()
    assert (given.val_fraction, given.amp, given.channels_last, given.lr, given.patience) == (0.3, False, False, 0.05, 2)
    # what the defaults come to, a --val-fraction the data's own split ignores, and --download (no part of training)
    # are the same training: given, a finished run was trained again
    def train_print(**options):
        return fingerprint(Stages(PipelineConfig(**options), progress=False, say=print).train_inputs(None))

    same = train_print()
    for options in ({"channels_last": True}, {"lr": 0.01}, {"val_fraction": 0.3}, {"download": True}, {"amp": True}):
        assert train_print(**options) == same, options
    assert train_print(lr=0.02) != same and train_print(amp=False) != same


def test_a_run_made_by_another_command_is_not_retrained_without_force(tiny_run, tmp_path):
    code, _, err = _pipeline("--run", str(tiny_run), "--serve", "no")
    assert code == 2 and "not made by `cnnpack pipeline`" in err


def test_two_data_folders_of_one_name_get_runs_of_their_own(tmp_path, monkeypatch):
    """runs/pipeline-data-cnn-32px was the default of every folder named `data`: the second pipeline trained over
    the first's run without a word. The default moves on to -2; a --run of other data needs --force."""
    from cnnpack.pipeline import PipelineConfig
    from cnnpack.pipeline_rundir import check_run_dir, default_run_dir
    from cnnpack.rundir import Run

    monkeypatch.chdir(tmp_path)
    a, b = tmp_path / "a" / "data", tmp_path / "b" / "data"
    for folder in (a, b):
        folder.mkdir(parents=True)
    first = default_run_dir(PipelineConfig(data=str(a), image_size=32))
    assert first == Path("runs/pipeline-data-cnn-32px")
    run = Run.create(first, {"arch": "cnn", "num_classes": 2, "classes": ["x", "y"], "image_size": 32})
    run.update(lambda m: m["stages"].update(train={"status": "running", "config": {"data": str(a)}},
                                            pipeline={"status": "ok"}))
    assert default_run_dir(PipelineConfig(data=str(a), image_size=32)) == first  # the same data: its own run again
    assert default_run_dir(PipelineConfig(data=str(b), image_size=32)) == Path("runs/pipeline-data-cnn-32px-2")
    with pytest.raises(UserInputError, match=rf"holds a pipeline run trained on {a}, not on {b}; choose another"):
        check_run_dir(run, False, str(b))
    check_run_dir(run, True, str(b))  # --force: trained again there
    check_run_dir(run, False, str(a))


@pytest.mark.slow
@pytest.mark.triton
@pytest.mark.skipif(SERVED == "off", reason="the local Triton server cannot run here")
def test_the_served_stage_classifies_verifies_and_loads_the_served_model(first):
    m = json.loads((first["run"] / "cnnpack.json").read_text())
    s = m["stages"]["served"]
    assert len(s["predictions"]) == 6
    assert {p["true"] for p in s["predictions"]} == set(m["model"]["classes"])  # one per class
    assert all(p["image"].startswith(f"{p['true']}/") for p in s["predictions"])  # its folder: findable
    assert all(p["ensemble_label"] == p["label"] for p in s["predictions"])  # PNG bytes and pixels agree
    assert set(s["parity"]) == {"triton:cnn_onnx", "triton:cnn_torchscript", "triton:cnn_onnx_int8",
                                *(["triton:cnn_pt2"] if PT2 else [])}
    assert all(p["passed"] for p in s["parity"].values())
    assert all(p["max_abs_err"] <= 1e-4 for f, p in s["parity"].items() if not f.endswith("_int8"))  # fp32 contract
    assert [(r["format"], r["concurrency"]) for r in s["load"]] == [
        ("triton:cnn_onnx", 1), ("triton:cnn_onnx", 4), ("triton:cnn_onnx_int8", 4)]
    assert all(r["errors"] == 0 for r in s["load"])
    assert set(m["stages"]["verify"]["formats"]) >= {"onnx", "torchscript", "triton:cnn_onnx"}
    assert s["repository"] == m["stages"]["triton"]["repository"] and s["versions"]["cnn_onnx"] == "1"
    assert f"The repository above, `{s['repository']}` (" in (first["run"] / "report.md").read_text()
    assert "## Served by Triton" in (first["run"] / "report.md").read_text()
    assert (first["run"] / "served" / "server.log").is_file()
    assert s["server_load_s"] > 0 and s["server_peak_rss_bytes"] > 50 << 20  # what deploy sizes the pod from


@pytest.mark.slow
def test_a_served_file_changed_by_hand_is_laid_out_and_served_again(first):
    """The served model's file corrupted in its version folder, another model's labels edited: the rerun lays the
    repository out again (the model as a new version, the labels in place) and serves what it laid out."""
    repo = first["repo"]
    onnx = sorted((repo / "cnn_onnx").glob("[0-9]*"))[-1]
    (onnx / "model.onnx").write_bytes(b"junk")
    torchscript = sorted(p.name for p in (repo / "cnn_torchscript").glob("[0-9]*"))
    labels = repo / "cnn_torchscript" / "labels.txt"
    labels.write_text(labels.read_text().replace("\n", "!\n", 1))
    code, out, err = _pipeline(*first["args"], "--json")
    assert code == 0, err[-3000:]
    ran = {k for k, v in _statuses(json.loads(out)).items() if v == "ran"}
    assert ran == {"triton", *(["served"] if SERVED == "ran" else [])}
    m = json.loads((first["run"] / "cnnpack.json").read_text())["stages"]
    new = str(int(onnx.name) + 1)
    assert m["triton"]["files"]["model"]["path"] == f"cnn_onnx/{new}/model.onnx"
    assert (repo / "cnn_onnx" / new / "model.onnx").read_bytes() == (first["run"] / "export/model.onnx").read_bytes()
    assert "!" not in labels.read_text()
    assert sorted(p.name for p in (repo / "cnn_torchscript").glob("[0-9]*")) == torchscript  # mended in place
    if SERVED == "ran":
        assert m["served"]["versions"]["cnn_onnx"] == new


@pytest.mark.slow
def test_ctrl_c_in_training_exits_130_and_the_next_run_resumes_it(tiny_data, tmp_path):
    run = tmp_path / "run"
    args = ["pipeline", "--data", str(tiny_data), "--run", str(run), "--repository", str(tmp_path / "repo"),
            "--serve", "no", "--no-progress", *TINY]
    args[args.index("--epochs") + 1] = "3"
    code, stderr = ctrl_c_after_first_epoch(args)
    assert code == 130, stderr
    line = stderr.strip().splitlines()[-1]
    assert line.startswith("error: pipeline interrupted in stage train") and "again to continue" in line
    m = json.loads((run / "cnnpack.json").read_text())
    assert m["stages"]["pipeline"]["status"] == "interrupted"
    report = CliRunner().invoke(app, ["report", "--run", str(run)])  # of the run as it stands
    assert report.exit_code == 0, report.stderr
    text = (run / "report.md").read_text()
    assert "training has not finished (status `interrupted`)" in text and "None" not in text

    code, out, err = _pipeline(*args[1:], "--json")  # the same command: accepted as the pipeline's run
    assert code == 0, err[-3000:]
    assert "[train] resuming the interrupted training" in err
    train = json.loads((run / "cnnpack.json").read_text())["stages"]["train"]
    assert train["resumed"] is True and train["metrics"]["epochs"] == 3


@pytest.mark.slow
def test_ctrl_c_after_training_exits_130_and_the_next_run_continues_from_the_stage_it_stopped(tiny_data, tmp_path,
                                                                                               monkeypatch):
    """Outside a training epoch the Ctrl-C is a KeyboardInterrupt of the stage itself: the run stays the pipeline's
    (it was refused as 'not made by cnnpack pipeline'), and the stages that finished are not done again."""
    run = tmp_path / "run"
    args = ["pipeline", "--data", str(tiny_data), "--run", str(run), "--repository", str(tmp_path / "repo"),
            "--serve", "no", "--no-progress", *TINY]
    code, stderr = ctrl_c_at("cnnpack.verify:verify", args)
    assert code == 130, stderr
    assert stderr.strip().splitlines()[-1] == ("error: pipeline interrupted in stage verify; run the same "
                                               "`cnnpack pipeline` command again to continue")
    stages = json.loads((run / "cnnpack.json").read_text())["stages"]
    assert stages["pipeline"]["status"] == "interrupted" and stages["verify"]["status"] == "interrupted"

    code, out, err = _pipeline(*args[1:], "--json")
    assert code == 0, err[-3000:]
    assert _statuses(json.loads(out)) == {"train": "skipped", "export": "skipped", "quantize": "skipped",
                                          "verify": "ran", "bench": "ran", "triton": "ran", "served": "off"}

    import cnnpack.bench  # a bug of ours (a traceback) in a stage: the run stays the pipeline's all the same

    def bug(*_a, **_k):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cnnpack.bench, "bench", bug)
    code, _, _ = _pipeline(*args[1:], "--batch-sizes", "1")
    assert code == 1 and json.loads((run / "cnnpack.json").read_text())["stages"]["pipeline"]["status"] == "failed"
    monkeypatch.undo()
    code, out, err = _pipeline(*args[1:], "--batch-sizes", "1", "--json")
    assert code == 0, err[-3000:]
    assert _statuses(json.loads(out))["train"] == "skipped" and _statuses(json.loads(out))["bench"] == "ran"

    # killed outright (out of memory, a container stopped): the same command continues where it stopped (the run was
    # refused as "not made by `cnnpack pipeline`", and the --force it offered trained again)
    other = [*args[:args.index("--batch-sizes")], "--batch-sizes", "2", *args[args.index("--batch-sizes") + 2:]]
    code, stderr = killed_at("cnnpack.bench:bench", other)  # (a real command line: an option given once)
    assert code == -9, stderr
    p = json.loads((run / "cnnpack.json").read_text())["stages"]["pipeline"]
    assert p["status"] == "running" and p["process"]["pid"] > 0 and [s["name"] for s in p["stages"]][-1] == "verify"
    code, out, err = _pipeline(*other[1:], "--json")
    assert code == 0, err[-3000:]
    assert _statuses(json.loads(out))["train"] == "skipped" and _statuses(json.loads(out))["bench"] == "ran"


@pytest.mark.slow
def test_openvino_joins_every_stage_when_installed(tiny_data, tmp_path):
    pytest.importorskip("openvino", reason="the openvino extra: pip install 'cnnpack[openvino]'")
    from cnnpack.openvino import has_bf16

    run = tmp_path / "run"
    args = ["--data", str(tiny_data), "--run", str(run), "--repository", str(tmp_path / "repo"), *TINY]
    args[args.index("--openvino") + 1] = "auto"
    args[args.index("--runtimes") + 1] = "onnxruntime,openvino" + (",openvino-bf16" if has_bf16() else "")
    # bf16 (on hosts with it) rounds logits by ~0.3 %; the one-epoch model's closest top-2 margin is ~0.4 %, so a
    # flip would depend on the host's kernels: this test of the plumbing sets verify's agreement below one flip
    args += ["--verify-min-agreement", "0.9"]
    code, out, err = _pipeline(*args, "--serve", "no", "--json")
    assert code == 0, err[-3000:]
    summary = json.loads(out)
    assert _statuses(summary)["quantize_openvino"] == "ran"
    m = json.loads((run / "cnnpack.json").read_text())
    assert {"openvino", "openvino_int8"} <= set(m["stages"]["export"]["artifacts"])
    assert m["stages"]["pipeline"]["config"]["openvino"] == "yes"
    runtimes = {r["runtime"] for r in m["stages"]["bench"]["results"]}
    assert {"openvino", *(["openvino-bf16"] if has_bf16() else [])} <= runtimes
    assert {"cnn_openvino", "cnn_openvino_int8"} <= set(summary["models"])
    precisions = {(r["artifact"], r["precision"]) for r in summary["precision"]}
    assert {("openvino", "fp32"), ("openvino_int8", "int8")} <= precisions
    assert ("openvino", "bf16") in precisions or not has_bf16()


def test_the_summary_no_longer_claims_a_tuned_config_that_was_replaced(tmp_path):
    from cnnpack.pipeline_summary import tuned_line
    from cnnpack.rundir import sha256

    config = tmp_path / "cnn_onnx" / "config.pbtxt"
    config.parent.mkdir()
    config.write_text("tuned")
    written = {"model": "cnn_onnx", "config": str(config), "previous": str(config) + ".prev", "sha256": sha256(config)}
    tune = {"status": "ok", "written": written, "verdict": {"gain": 1.5, "default": "cnn_onnx (its config.pbtxt)",
                                                             "noise": 0.05},
            "winner": {"label": "cnn_onnx x2 1t", "model": "cnn_onnx", "concurrency": 16, "throughput_ips": 3000.0,
                       "latency_ms_p99": 9.0}}
    assert tuned_line({"tune": tune}).endswith(f"written to {config} (previous: config.pbtxt.prev)")
    config.write_text("laid out again by triton")
    assert tuned_line({"tune": tune}).endswith(f"since replaced: {config} no longer holds it "
                                               "(laid out again, undone or edited)")


def test_the_summary_says_a_tuned_winner_was_undone():
    """`cnnpack tune --undo` clears `written`: the summary printed "winner: cnn_openvino_int8 ... 989 images/s" as in
    effect, while the report said its config.pbtxt no longer holds it."""
    from cnnpack.pipeline_summary import tuned_line

    winner = {"label": "cnn_openvino_int8 x1 1t no batching", "model": "cnn_openvino_int8", "concurrency": 1,
              "throughput_ips": 989.0, "latency_ms_p99": 2.0}
    tune = {"status": "ok", "written": None, "winner": winner, "undone": [
        {"config": "/r/cnn_openvino_int8/config.pbtxt", "previous": "/r/cnn_openvino_int8/config.pbtxt.prev"}],
            "verdict": {"gain": 1.3, "default": "cnn_openvino_int8 (its config.pbtxt)", "noise": 0.05}}
    assert tuned_line({"tune": tune}).endswith("; 1.30x the default (cnn_openvino_int8 (its config.pbtxt), noise 5 %); "
                                               "undone since: `cnnpack tune --undo` put back cnn_openvino_int8's "
                                               "config.pbtxt from before any tune")
    assert "undone" not in tuned_line({"tune": {**tune, "undone": None}})


def test_the_artifacts_table_shows_an_exporters_release_without_its_build_suffix():
    from cnnpack.report import exporter_label

    assert exporter_label("openvino.convert_model 2026.4.1-22982-e213a147257-releases/2026/4") == \
        "openvino.convert_model 2026.4.1"
    for kept in ("nncf 3.4.0", "dynamo", "torch.export + AOTInductor (torch 2.14.1+cu130)", "onnxruntime.quantization"):
        assert exporter_label(kept) == kept


def test_the_report_says_an_export_was_never_verified():
    from cnnpack.report import _verify

    blocks = _verify({"stages": {"export": {"artifacts": {"onnx": {"path": "export/model.onnx"}}}}})
    assert [b.text for b in blocks][0] == "Parity against eager PyTorch" and "**Not verified**" in blocks[1].text
    assert _verify({"stages": {}}) == []  # nothing exported: nothing to verify
    stopped = {"export": {"artifacts": {"onnx": {}}}, "verify": {"status": "interrupted", "error": "interrupted"}}
    assert "**Not verified**: verify stopped (interrupted) before its verdict" in _verify({"stages": stopped})[1].text


def test_the_report_says_the_checkpoint_is_missing_or_changed(tmp_path):
    """A deleted checkpoint.pt: the report said nothing (a deleted export is "missing"), while export, verify and
    bench refuse the run."""
    from cnnpack.report import _checkpoint_note
    from cnnpack.rundir import Run, sha256

    run = Run(tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"weights")
    train = {"outputs": {"checkpoint": {"path": "checkpoint.pt", "sha256": sha256(tmp_path / "checkpoint.pt")}}}
    assert _checkpoint_note(train, run) == []
    (tmp_path / "checkpoint.pt").write_bytes(b"other weights")
    assert "`checkpoint.pt` is not the one training wrote" in _checkpoint_note(train, run)[0].text
    (tmp_path / "checkpoint.pt").unlink()
    assert _checkpoint_note(train, run)[0].text.startswith("**Checkpoint changed on disk**: `checkpoint.pt` is missing")


def test_the_report_says_how_an_unfinished_training_goes_on_and_when_one_stopped_early(tmp_path):
    """It said "continue it with `cnnpack train --resume`" for a run with no finished epoch, or one that diverged
    (both refused by --resume), and without --run; an early stop was shown as 'epoch 1 of 2' of 6 asked."""
    from cnnpack.report import _how_to_go_on, stopped_early
    from cnnpack.rundir import Run

    run = Run(tmp_path)
    diverged = {"status": "failed", "error": "training diverged: the weights or the loss became NaN"}
    assert _how_to_go_on(diverged, run) == (f"it diverged: start it again with `cnnpack train --run {tmp_path} "
                                            "--force` and a lower --lr")
    assert _how_to_go_on({"status": "interrupted"}, run).startswith("no epoch finished: start it again with "
                                                                   f"`cnnpack train --run {tmp_path} --force`")
    (tmp_path / "last.pt").write_bytes(b"an epoch")
    assert _how_to_go_on({"status": "interrupted"}, run).startswith(f"continue it with `cnnpack train --run "
                                                                   f"{tmp_path} --resume`")
    early = {"status": "ok", "config": {"epochs": 6, "patience": 1}, "metrics": {"epochs": 2}}
    assert stopped_early(early) == "stopped early: no validation gain for --patience 1 epoch, of 6 asked"
    assert stopped_early({**early, "metrics": {"epochs": 6}}) == ""


def test_the_report_leaves_out_a_triton_or_served_stage_that_failed():
    """A pipeline that failed at triton records {status, error} alone: the report read its repository (KeyError)."""
    from cnnpack.report_serving import served_section, triton_section

    failed = {"status": "failed", "error": "could not write /r/cnn_onnx: [Errno 28] No space left on device"}
    assert triton_section({"stages": {"triton": failed}}, None) == []
    assert served_section({"stages": {"served": failed}}) == []


def test_the_report_says_first_which_stage_stopped_a_failed_pipeline():
    """A pipeline that failed at its quantize gate: its report read like a finished run's, no word of the failure."""
    from cnnpack.report import _unfinished

    gate = "no int8 model within --max-drop 0 pt and --min-agreement 100%: --max-steps 8 was spent"
    stages = {"train": {"status": "ok"}, "export": {"status": "ok"}, "quantize": {"status": "failed", "error": gate},
              "pipeline": {"status": "failed"}}
    assert _unfinished({"stages": stages})[0].text == (
        f"**The last `cnnpack pipeline` failed** at its quantize stage: `quantize` failed ({gate}). What follows is "
        "what the run holds.")
    stages.pop("pipeline")
    stages["bench"] = {"status": "interrupted"}
    assert _unfinished({"stages": stages})[0].text.startswith(
        "**Not every stage finished**: `quantize` failed (no int8 model within --max-drop 0 pt")
    assert "; `bench` interrupted. What follows" in _unfinished({"stages": stages})[0].text
    assert _unfinished({"stages": {"train": {"status": "ok"}, "pipeline": {"status": "ok"}}}) == []
    assert _unfinished({"stages": {"train": {"status": "ok"}, "pipeline": {"status": "running"}}})[0].text == (
        "**The last `cnnpack pipeline` did not finish** (killed, or at work now). What follows is what the run holds.")
    # a tune that found nothing within its budget is recorded failed, with no error: its own section says why
    assert _unfinished({"stages": {"tune": {"status": "failed"}, "pipeline": {"status": "ok"}}}) == []

    # `cnnpack quantize` alone, its gate missed (recorded with its figures, no error), no int8 model from before: the
    # report had no word of int8; with an earlier model, the precision section says it is that one
    gate = {"max_drop_pt": 0.0, "min_agreement": 1.0, "drop_pt": 0.0, "top1_agreement_vs_fp32": 0.99554,
            "int8_images": 224, "val_images": 900, "steps": 0}
    stages = {"export": {"status": "ok", "artifacts": {"onnx": {}}}, "quantize": {"status": "failed", "gate": gate}}
    assert _unfinished({"stages": stages})[0].text == (
        "**Not every stage finished**: `quantize` found no onnx_int8 model within its gate (top-1 drop ≤ 0 pt, "
        "agreement ≥ 100%): its best attempt reached +0.00 pt and 99.55% on 224 of 900 validation images after 0 "
        "fallback step(s), and this run has no onnx_int8 model. What follows is what the run holds.")
    stages["export"]["artifacts"]["onnx_int8"] = {}
    assert _unfinished({"stages": stages}) == []


def test_the_report_names_the_artifacts_that_take_normalised_tensors():
    """An int8 model quantized from a `--input normalized` export takes normalised tensors too (it records
    input_kind, not the export's config): the report said it took raw pixels."""
    from cnnpack.report import _inputs

    arts = {"onnx": {"config": {"input": "normalized"}}, "onnx_int8": {"input_kind": "normalized"},
            "torchscript": {"config": {"input": "raw"}}}
    said = _inputs({"channels": 1, "mean": [0.5], "std": [0.5]}, {"artifacts": arts})
    assert said == ("Inputs are raw grayscale pixels 0–255; scaling to 0–1 and normalisation with mean 0.5 and std 0.5 "
                    "happen inside the graph, except in `onnx`, `onnx_int8`, exported with `--input normalized`: they "
                    "take tensors normalised so.")


def test_a_ratio_far_below_one_keeps_its_figures():
    """TorchScript at a 200th of the fastest runtime read 0.00× in the report's tables."""
    from cnnpack.report_render import times

    assert [times(x) for x in (None, 0.0048, 0.096, 0.1, 1.734)] == ["–", "0.0048×", "0.096×", "0.10×", "1.73×"]


def test_the_report_marks_a_served_row_whose_windows_did_not_agree():
    """bench.json marked a served row `stable: false`; the served table and its note said nothing (local rows did)."""
    from cnnpack.report_render import to_markdown
    from cnnpack.report_serving import served_section
    from cnnpack.served import _unstable

    row = {"runtime": "triton", "format": "triton:cnn_onnx", "protocol": "http", "concurrency": 16,
           "latency_ms_p50": 6.1, "latency_ms_p99": 9.0, "throughput_ips": 1674.0, "errors": 0}
    steady = to_markdown("t", served_section({"stages": {"bench": {"results": [{**row, "stable": True}]}}}))
    shaky = to_markdown("t", served_section({"stages": {"bench": {"results": [{**row, "stable": False}]}}}))
    assert "| **no** |" in shaky and "**Unstable**: the measurement windows of cnn_onnx at 16 did not agree" in shaky
    assert "| yes |" in steady and "Unstable" not in steady
    assert "Batch-1 requests over HTTP" in steady and "| cnn_onnx | HTTP | 1 | 16 |" in steady
    # requests of 4 images: said in their own column and in the text (it said "Batch-1 requests", two rows alike)
    both = to_markdown("t", served_section({"stages": {"bench": {"results": [
        {**row, "stable": True}, {**row, "batch_size": 4, "stable": False}]}}}))
    assert "Requests of 1, 4 images (the images-per-request column) over HTTP" in both and "Batch-1" not in both
    assert "| cnn_onnx | HTTP | 4 | 16 |" in both and "windows of cnn_onnx at 16 x 4 images did not agree" in both
    assert _unstable({**row, "stable": False}) == " (unstable: its windows did not agree)" and _unstable(row) == ""


def test_the_report_tells_a_verify_stopped_by_an_error_from_one_whose_parity_failed():
    """The pipeline marks a verify that stopped on an error `failed` over the earlier verdict (passed: true): the
    report said every pair was within the contract. A parity failure records its own rows, and says so."""
    from cnnpack.report import _verify

    fmt = {"onnx": {"passed": True, "precision": "fp32", "max_abs_err": 1e-6, "runtimes": ["onnxruntime"]}}
    stopped = {"status": "failed", "error": "a runtime crashed", "passed": True, "formats": fmt}
    text = " ".join(b.text or "" for b in _verify({"stages": {"verify": stopped}}))
    assert "**the last verify failed** (a runtime crashed); the rows below are of the verify before it" in text
    parity = {**stopped, "passed": False, "error": "onnx (onnxruntime): max_abs_err 1 > atol 1e-04"}
    text = " ".join(b.text or "" for b in _verify({"stages": {"verify": parity}}))
    assert "**parity FAILED**" in text and "the last verify" not in text


def test_the_report_says_when_the_served_figures_are_of_another_repository_or_version():
    from cnnpack.report_serving import _what_was_served

    served = {"repository": "/r/a", "versions": {"cnn_onnx": "1", "cnn_onnx_int8": "1"}}
    assert _what_was_served(served, {"repository": "/r/a", "name": "cnn_onnx", "version": 1}).startswith(
        "The repository above, `/r/a` (`cnn_onnx` v1, `cnn_onnx_int8` v1)")
    for later in ({"repository": "/r/gpu", "name": "cnn_onnx", "version": 1},  # laid out elsewhere since
                  {"repository": "/r/a", "name": "cnn_onnx", "version": 2}):  # a new version since
        line = _what_was_served(served, later)
        assert line.startswith("**Not the repository above**") and "these figures are of `/r/a`" in line


def test_the_report_marks_served_rows_of_a_version_the_repository_has_replaced(tmp_path):
    """A new int8 model laid out as cnn_onnx_int8 version 2 (pipeline --serve no): the report still called the
    repository the one served, with version 1's row in the load table and nothing said."""
    from cnnpack.report_serving import served_section

    repo = tmp_path / "repo"
    for model, versions in (("cnn_onnx", (1,)), ("cnn_onnx_int8", (1, 2))):
        for v in versions:
            (repo / model / str(v)).mkdir(parents=True)
    row = {"runtime": "triton", "batch_size": 1, "concurrency": 16, "latency_ms_p50": 1.0, "latency_ms_p99": 2.0,
           "throughput_ips": 900.0}
    m = {"stages": {"triton": {"repository": str(repo), "name": "cnn_onnx", "version": 1},
                    "served": {"status": "ok", "repository": str(repo), "versions": {"cnn_onnx": 1, "cnn_onnx_int8": 1}},
                    "bench": {"results": [{**row, "format": "triton:cnn_onnx"},
                                          {**row, "format": "triton:cnn_onnx_int8"},  # recorded before versions were
                                          {**row, "format": "triton:cnn_onnx_int8", "info": {"versions": ["2"]}}]}}}
    blocks = served_section(m)
    text = " ".join(b.text or "" for b in blocks)
    assert "laid out again since: `cnn_onnx_int8` is at version 2 now" in text
    assert "**Of an older version**: `cnn_onnx_int8` was measured at version 1, and" in text
    table = next(b.rows for b in blocks if b.kind == "table" and b.rows[0][0] == "model")
    assert [r[0] for r in table[1:]] == ["cnn_onnx", "cnn_onnx_int8 v1 (older)", "cnn_onnx_int8"]


def test_served_figures_of_another_repository_are_not_kept(tmp_path):
    """--repository changed on a finished run: triton laid out the new one, and the served stage said `skipped:
    inputs unchanged` with the old repository's figures in the summary (the report said they were of another)."""
    from cnnpack.pipeline import PipelineConfig, Stages
    from cnnpack.rundir import Run

    for repo in ("old", "new"):
        (tmp_path / repo / "cnn_onnx" / "1").mkdir(parents=True)
    run = Run.create(tmp_path / "run", {"arch": "cnn", "classes": ["a", "b"], "num_classes": 2, "image_size": 32})
    section = {"repository": str(tmp_path / "old"), "versions": {"cnn_onnx": "1"},
               "parity": {"triton:cnn_onnx": {"passed": True}}}
    row = {"runtime": "triton", "format": "triton:cnn_onnx", "batch_size": 1, "concurrency": 16,
           "latency_ms_p50": 1.0, "latency_ms_p99": 2.0, "throughput_ips": 900.0}
    run.update(lambda m: m["stages"].update(
        verify={"status": "ok", "passed": True, "formats": {"triton:cnn_onnx": {"passed": True}}},
        bench={"status": "ok", "results": [row]}, served={"status": "ok", **section}))
    stages = Stages(PipelineConfig(), progress=False, say=print)
    for repo, kept in (("old", True), ("new", False)):
        run.update(lambda m, repo=repo: m["stages"].update(triton={
            "status": "ok", "repository": str(tmp_path / repo), "name": "cnn_onnx", "version": 1, "format": "onnx"}))
        assert stages.served_rows_kept(run, section) is kept, repo


def test_a_stage_stopped_by_ctrl_c_or_a_disk_error_is_marked_so_over_its_earlier_ok(tmp_path):
    """Ctrl-C in the served stage left it `ok` with the earlier summary while verify.json and its log were rewritten;
    an OSError (a full disk) escaped unrecorded."""
    import errno

    from cnnpack.errors import StageFailed
    from cnnpack.pipeline_stage import Interrupted, Stage, run_stage
    from cnnpack.rundir import Run

    run = Run.create(tmp_path / "run", {"arch": "cnn", "classes": ["a", "b"], "num_classes": 2, "image_size": 32})

    def stop(what):
        def raise_(_run):
            raise what
        return raise_

    for name, what, err, status in (("served", KeyboardInterrupt(), Interrupted, "interrupted"),
                                    ("served", OSError(errno.ENOSPC, "No space left on device", str(run.path / "x")),
                                     StageFailed, "failed")):
        run.update(lambda m, name=name: m["stages"].update({name: {"status": "ok", "summary": "the earlier run"}}))
        with pytest.raises(err):
            run_stage(run, Stage(name, lambda _: {"n": 1}, stop(what), lambda _: ""), force=True, say=print)
        assert run.read()["stages"][name]["status"] == status, name


def test_the_summary_quotes_no_served_figures_when_this_run_left_the_stage_off(tmp_path):
    """--serve no on a run served before: the summary still printed the earlier run's `served 8/8 ...` line."""
    from cnnpack.pipeline_stage import Outcome
    from cnnpack.pipeline_summary import summary
    from cnnpack.rundir import Run

    run = Run.create(tmp_path / "run", {"arch": "cnn", "classes": ["a", "b"], "num_classes": 2, "image_size": 32})
    run.update(lambda m: m["stages"].update(served={"status": "ok", "summary": "8/8 validation images right"}))
    assert summary(run, [Outcome("served", "ran")], {}, 1.0)["served"] == "8/8 validation images right"
    assert summary(run, [Outcome("served", "off", summary="--serve no")], {}, 1.0)["served"] is None


def test_the_triton_stage_replaces_its_own_run_s_models_and_names_repository_for_another_s(tiny_onnx_run, tmp_path):
    """A second pipeline into the same repository with other options (--image-size 40) trained, exported, verified and
    benched, then failed at the triton stage: "holds a different model ...; choose another --name or pass --force"
    (the pipeline has no --name; its --force trains again and fails the same way). A model this run laid out is its to
    replace; another run's is refused naming --repository. Also: a repository Triton could not serve is refused."""
    from cnnpack.errors import UserInputError
    from cnnpack.pipeline import PipelineConfig, Stages
    from cnnpack.rundir import Run
    from cnnpack.triton_repo import TritonConfig, build

    run_dir, repo = tmp_path / "run", tmp_path / "repo"
    shutil.copytree(tiny_onnx_run, run_dir)
    build(run_dir, TritonConfig(repository=str(repo), format="onnx"))
    side = repo / "cnn_onnx" / "cnnpack-model.json"
    planted = json.loads(side.read_text())
    planted["identity"]["input"] = "another image size"  # as the model laid out before the options changed
    side.write_text(json.dumps(planted))
    stages = Stages(PipelineConfig(repository=str(repo)), progress=lambda _: None, say=lambda _: None)
    cfg = TritonConfig(repository=str(repo), format="onnx")
    assert stages._over_its_own(Run.open(run_dir), cfg).force  # this run's: replaced
    for v in planted["versions"].values():
        v["run"] = "/elsewhere/run"
    side.write_text(json.dumps(planted))
    with pytest.raises(UserInputError, match=rf"--repository {repo}: {repo / 'cnn_onnx'}: it holds a different model "
                                             r"\(input differs\), laid out by another run or by hand; give this run a "
                                             r"repository of its own \(--repository\)"):
        stages._over_its_own(Run.open(run_dir), cfg)
    (repo / "notes").mkdir()  # not a model folder: `cnnpack serve` refuses the repository, so laying out does too
    with pytest.raises(UserInputError, match=r"holds notes, not model folders .*: Triton cannot serve a repository "
                                             r"with them in it"):
        build(run_dir, TritonConfig(repository=str(repo), format="onnx"))
    with pytest.raises(UserInputError, match="--repository is empty"):
        build(run_dir, TritonConfig(repository="", format="onnx"))


def test_the_triton_stage_says_which_settings_of_cnnpack_triton_it_replaced(tiny_onnx_run, tmp_path):
    """`cnnpack triton --threads 1 --instances 2` after a pipeline, then the pipeline again: its triton stage laid the
    model out with its own settings and said nothing of the user's."""
    from cnnpack.pipeline import PipelineConfig, Stages
    from cnnpack.rundir import Run
    from cnnpack.triton_repo import TritonConfig, build

    run_dir, repo = tmp_path / "run", tmp_path / "repo"
    shutil.copytree(tiny_onnx_run, run_dir)
    stages = Stages(PipelineConfig(repository=str(repo), formats=("onnx",), int8=False), progress=lambda _: None,
                    say=lambda _: None)
    assert "cnnpack triton`" not in stages.run_triton(Run.open(run_dir))  # its own settings: nothing to say
    assert "cnnpack triton`" not in stages.run_triton(Run.open(run_dir))
    build(run_dir, TritonConfig(repository=str(repo), format="onnx", threads=1, instances=2, max_batch_size=8,
                                dynamic_batching=False))
    said = stages.run_triton(Run.open(run_dir))
    assert said.endswith(f"; cnn_onnx had --instances 2 --max-batch-size 8 --no-dynamic-batching --threads 1 from "
                         f"`cnnpack triton`, now the pipeline's settings (`cnnpack triton --run {run_dir} --repository "
                         f"{repo.resolve()} --format onnx --ensemble --instances 2 --max-batch-size 8 "
                         "--no-dynamic-batching --threads 1` sets them again)"), said
    assert "instance_group" in (repo / "cnn_onnx" / "config.pbtxt").read_text()
    assert "count: 1" in (repo / "cnn_onnx" / "config.pbtxt").read_text()  # the pipeline's: one instance
    # a record of an older cnnpack without a setting: not a setting the user gave ("--no-dynamic-batching")
    Run.open(run_dir).update(lambda m: [m["stages"]["triton"]["config"].pop(k) for k in ("dynamic_batching", "threads")])
    assert "cnnpack triton`" not in stages.run_triton(Run.open(run_dir))


def test_an_interrupted_training_with_other_options_is_said_to_start_again(tiny_run, tmp_path, monkeypatch):
    """The pipeline again with another --epochs after a Ctrl-C in training trained from the first epoch without a
    word (the same options continue it)."""
    import cnnpack.train
    from cnnpack.pipeline import PipelineConfig, Stages
    from cnnpack.rundir import Run

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run, run_dir)
    Run.open(run_dir).update(lambda m: m["stages"]["train"].update(status="interrupted"))
    (run_dir / "last.pt").write_bytes(b"an epoch")
    calls, said = [], []
    monkeypatch.setattr(cnnpack.train, "train", lambda *a, **k: calls.append(k) or {"metrics": {
        "best_val_acc": 1.0, "best_epoch": 1, "epochs": 1, "train_images_per_s": 1.0}})
    recorded = Run.open(run_dir).read()["stages"]["train"]["config"]
    cfg = PipelineConfig(data=recorded["data"], image_size=recorded["image_size"], epochs=recorded["epochs"] + 1,
                         batch_size=recorded["batch_size"])
    Stages(cfg, progress=False, say=said.append).run_train(Run.open(run_dir))
    assert calls[-1]["resume"] is False and calls[-1]["force"] is True
    assert said == [f"[train] the interrupted training had other options (epochs {recorded['epochs']} -> "
                    f"{recorded['epochs'] + 1}): training again from the start (the pipeline with its options as "
                    "before continues it)"], said


def test_a_model_folder_cnnpack_did_not_make_is_refused_before_training(tmp_path):
    """It was refused at the triton stage, after training, export, quantize, verify and bench had run."""
    from cnnpack.errors import UserInputError
    from cnnpack.pipeline import PipelineConfig, pipeline

    repo = tmp_path / "repo"
    (repo / "cnn_onnx_preprocess" / "1").mkdir(parents=True)  # the image ensemble's part, laid out by hand
    (repo / "cnn_onnx_preprocess" / "config.pbtxt").write_text('backend: "python"\n')
    cfg = PipelineConfig(repository=str(repo), openvino="no", pt2="no", serve="no")
    with pytest.raises(UserInputError, match=rf"--repository {repo}: {repo / 'cnn_onnx_preprocess'}: it was not made "
                                             r"by cnnpack .*; give this run a repository of its own \(--repository\)"):
        pipeline(tmp_path / "run", cfg, progress=False, say=lambda _: None)
    assert not (tmp_path / "run").exists()  # nothing trained
    (repo / "cnn_onnx_preprocess" / "cnnpack-model.json").write_text('{"identity": {"kind": "preprocess"}}')
    from cnnpack.pipeline_rundir import check_foreign_models

    check_foreign_models(cfg)  # cnnpack's: the triton stage judges whether it is this run's model


def test_a_quantize_refusal_in_the_pipeline_names_the_command_that_takes_its_advice(tiny_onnx_run, tmp_path,
                                                                                    monkeypatch):
    """The refusal said "raise --max-steps": `cnnpack pipeline --max-steps` is no such option. (The refusal itself
    is planted: whether a gate holds depends on the host's kernels, tests/test_quantize.py has the real ones.)"""
    import cnnpack.quantize
    from cnnpack.int8_gate import GateMissed
    from cnnpack.pipeline import PipelineConfig, Stages
    from cnnpack.rundir import Run

    def refused(*args, **kwargs):
        raise GateMissed("no int8 model within --max-drop 0 pt: --max-steps 8 was spent; raise --max-steps", {})

    monkeypatch.setattr(cnnpack.quantize, "quantize", refused)
    stages = Stages(PipelineConfig(max_drop=0.0), progress=lambda _: None, say=lambda _: None)
    with pytest.raises(GateMissed, match=r"raise --max-steps; --max-steps, --rank-images and --time-limit are "
                                         r"`cnnpack quantize`'s options: `cnnpack quantize --run \S+ .*--max-drop 0 "
                                         r".*--max-steps 8 .*` with them changed, then this pipeline again$"):
        stages._quantized(Run.open(tiny_onnx_run), "onnx_int8", lambda _: None)


def test_a_run_whose_training_is_under_way_is_not_called_foreign(tmp_path):
    """While `pipeline --force` retrained a run, a second pipeline on it said "a run not made by cnnpack pipeline;
    pass --force", inviting two processes to write one run."""
    from cnnpack.errors import UserInputError
    from cnnpack.pipeline_rundir import check_run_dir
    from cnnpack.rundir import Run

    run = Run.create(tmp_path / "run", {"arch": "cnn", "classes": ["a", "b"], "num_classes": 2, "image_size": 32})
    run.set_stage("train", {"status": "running"})
    with pytest.raises(UserInputError, match="holds a training under way .*; wait for it to finish"):
        check_run_dir(run, False, "shapes")
    run.update(lambda m: m["stages"].pop("train"))  # a run of another command, at rest
    with pytest.raises(UserInputError, match="holds a run not made by `cnnpack pipeline`"):
        check_run_dir(run, False, "shapes")


def test_a_rerun_with_formats_switched_off_benches_and_names_only_what_it_makes(tiny_onnx_run, tmp_path):
    """`--formats onnx --no-int8` after a default run benched the earlier run's int8 and TorchScript files ("best:
    onnxruntime int8") and said nothing of their models left in the repository, which deploy then shipped."""
    from cnnpack.pipeline import PipelineConfig, _earlier_models
    from cnnpack.rundir import Run
    from cnnpack.triton_repo import TritonConfig, build

    assert PipelineConfig(formats=("onnx",), int8=False).bench_config().artifacts == ("checkpoint", "onnx")
    assert PipelineConfig().bench_config().artifacts == ("checkpoint", "onnx", "torchscript", "onnx_int8")
    run, repo = tmp_path / "run", tmp_path / "repo"
    shutil.copytree(tiny_onnx_run, run)
    build(run, TritonConfig(repository=str(repo), format="onnx", ensemble=True))
    build(run, TritonConfig(repository=str(repo), format="onnx", name="older"))
    assert _earlier_models(Run.open(run), repo, ["cnn_onnx", "cnn_onnx_image"]) == ["older"]  # the ensemble's are its


def test_a_fastest_runtime_whose_speedup_rests_on_an_unsteady_row_is_marked():
    """On a busy machine the summary said `onnxruntime at batch 1: 1901.17x eager` (eager at batch 1 took 152 ms
    beside a test run) with no mark, unlike the precision table."""
    from cnnpack.pipeline_summary import best_runtime, shaky

    eager = {"runtime": "eager", "batch_size": 1, "stable": True, "cpu_others": 0.0}
    ort = {"runtime": "onnxruntime", "batch_size": 1, "stable": True, "cpu_others": 0.0, "speedup_vs_eager": 9.0}
    bench = {"results": [eager, ort, {**eager, "batch_size": 32, "stable": False}]}
    assert best_runtime(bench) is ort and not shaky(bench, ort)
    for changed in ({"stable": False}, {"cpu_others": 0.4}):
        assert shaky({"results": [{**eager, **changed}, ort]}, ort)
        assert shaky({"results": [eager, {**ort, **changed}]}, {**ort, **changed})


def test_a_pipeline_at_work_on_a_run_holds_it_and_a_killed_one_leaves_it_to_the_next(tmp_path):
    """Its section says "running" with its process while it runs: a second pipeline beside it was told "a run not made
    by `cnnpack pipeline`; pass --force" (which replaces the run the first one trains), and one killed outright left a
    run no pipeline would continue. A pid used again by another process is not the pipeline's."""
    import subprocess
    import sys

    from cnnpack.pipeline_rundir import _started, check_run_dir, this_process
    from cnnpack.rundir import Run

    run = Run.create(tmp_path / "run", {"arch": "cnn", "classes": ["a", "b"], "num_classes": 2, "image_size": 32})
    run.set_stage("train", {"status": "running", "config": {"data": "shapes"}})  # killed in training, or at work
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        at_work = {"pid": other.pid, "started": _started(other.pid)}
        run.set_stage("pipeline", {"status": "running", "process": at_work})
        for force in (False, True):  # --force too: it would replace the run that one trains
            with pytest.raises(UserInputError, match=rf"another `cnnpack pipeline` \(pid {other.pid}\) is working on "
                                                     "--run .*; wait for it to finish"):
                check_run_dir(run, force, "shapes")
        run.set_stage("pipeline", {"status": "running", "process": {**at_work, "started": at_work["started"] + 1}})
        check_run_dir(run, False, "shapes")  # its pid, another process: the pipeline was killed
    finally:
        other.kill()
        other.wait()
    for process in (at_work, this_process()):  # killed; or this very process (a pipeline it ran, cut short)
        run.set_stage("pipeline", {"status": "running", "process": process})
        check_run_dir(run, False, "shapes")  # the pipeline's to continue
    run.set_stage("pipeline", {"status": "ok", "process": at_work})  # (a finished one's record)
    check_run_dir(run, False, "shapes")


def test_a_data_file_replaced_with_its_size_and_mtime_is_new_data(tmp_path):
    """Files were known by name, size and whole-second mtime: one replaced by another of its size within the second,
    or given its old mtime back (`cp -p`, `rsync -t`), skipped every stage on the old images."""
    import os

    from cnnpack.data_change import data_identity

    for cls in ("red", "blue"):
        (tmp_path / cls).mkdir()
        (tmp_path / cls / "0.png").write_bytes(cls.encode() * 40)
    before = data_identity(str(tmp_path))
    assert data_identity(str(tmp_path)) == before  # read again: the same
    st = (tmp_path / "red" / "0.png").stat()
    (tmp_path / "red" / "0.png").write_bytes(b"blue" * 30)  # the same size
    os.utime(tmp_path / "red" / "0.png", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (tmp_path / "red" / "0.png").stat().st_mtime_ns == st.st_mtime_ns
    assert data_identity(str(tmp_path)) != before


def test_a_stage_says_why_it_runs_and_takes_an_earlier_cnnpack_s_fingerprint_as_unchanged(tmp_path):
    """An update that identifies the data more closely would train every finished pipeline run again; and a stage
    said only "running", whatever made it run."""
    from cnnpack.pipeline_stage import Stage, fingerprint, why_run
    from cnnpack.rundir import Run

    run = Run.create(tmp_path / "r", {"arch": "cnn", "num_classes": 2, "classes": ["a", "b"], "image_size": 32})
    stage = Stage("probe", lambda r: {"data": "now"}, None, None, earlier=lambda r: {"data": "then"})
    assert why_run(run, stage, fingerprint({"data": "now"})) == ""  # never ran
    run.set_stage("probe", {"status": "failed"})
    assert why_run(run, stage, fingerprint({"data": "now"})) == "its last run failed"
    for recorded in ({"data": "now"}, {"data": "then"}):
        run.set_stage("probe", {"status": "ok", "inputs_sha256": fingerprint(recorded)})
        assert why_run(run, stage, fingerprint({"data": "now"})) is None, recorded
    run.set_stage("probe", {"status": "ok", "inputs_sha256": fingerprint({"data": "other"})})
    assert why_run(run, stage, fingerprint({"data": "now"})) == "its inputs changed since its last successful run"
    run.set_stage("probe", {"status": "ok", "inputs_sha256": fingerprint({"data": "now"}),
                            "outputs": {"checkpoint": {"path": "checkpoint.pt", "sha256": "0" * 64}}})
    assert why_run(run, stage, fingerprint({"data": "now"})) == "what it wrote is gone or changed"


def test_a_finished_training_run_again_says_whether_its_data_or_its_files_changed(tiny_run, tmp_path, monkeypatch):
    """With the same options it said "trained with other options (its data changed)" also where checkpoint.pt was
    only deleted."""
    import cnnpack.train
    from cnnpack.pipeline import PipelineConfig, Stages
    from cnnpack.pipeline_stage import fingerprint
    from cnnpack.rundir import Run

    run_dir = shutil.copytree(tiny_run, tmp_path / "run")
    monkeypatch.setattr(cnnpack.train, "train", lambda *a, **k: {"metrics": {
        "best_val_acc": 1.0, "best_epoch": 1, "epochs": 1, "train_images_per_s": 1.0}})
    recorded = Run.open(run_dir).read()["stages"]["train"]["config"]
    cfg = PipelineConfig(data=recorded["data"], image_size=recorded["image_size"], epochs=recorded["epochs"],
                         batch_size=recorded["batch_size"])
    for inputs, why in ((None, "the run's data changed since it was trained"),
                        (fingerprint(Stages(cfg, progress=False, say=print).train_inputs(None)),
                         "the run's files are gone or changed")):
        Run.open(run_dir).update(lambda m, inputs=inputs: m["stages"]["train"].update(inputs_sha256=inputs))
        said = []
        Stages(cfg, progress=False, say=said.append).run_train(Run.open(run_dir))
        assert said and said[0].startswith(f"[train] {why}: training again"), said


def test_a_served_stage_cut_short_keeps_verify_s_and_bench_s_fingerprints(tiny_run, tmp_path, monkeypatch):
    """The served stage adds its rows to verify.json and bench.json (their records rewritten) and put their
    fingerprints back only when it finished: after a Ctrl-C in it, the next pipeline verified again ("its inputs
    changed")."""
    import cnnpack.served
    from cnnpack.pipeline import PipelineConfig, Stages
    from cnnpack.rundir import Run

    run = Run.open(shutil.copytree(tiny_run, tmp_path / "run"))
    run.update(lambda m: m["stages"].update(verify={"status": "ok", "passed": True, "formats": {}, "inputs_sha256": "v"},
                                            bench={"status": "ok", "results": [], "inputs_sha256": "b"}))

    def cut_short(run_dir, cfg, progress):
        Run.open(run_dir).update(lambda m: [m["stages"][s].pop("inputs_sha256") for s in ("verify", "bench")])
        raise KeyboardInterrupt

    monkeypatch.setattr(cnnpack.served, "served", cut_short)
    with pytest.raises(KeyboardInterrupt):
        Stages(PipelineConfig(), progress=False, say=print).run_served(run)
    stages = Run.open(run.path).read()["stages"]
    assert (stages["verify"]["inputs_sha256"], stages["bench"]["inputs_sha256"]) == ("v", "b")
