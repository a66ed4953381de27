"""`cnnpack bench` on a real (tiny) run: real runtimes, short time limits, every output checked."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from cnnpack.bench import BenchConfig, Window, agree, bench, default_runtimes
from cnnpack.errors import MissingStageError, RuntimeUnavailable, StageFailed, UserInputError
from cnnpack.export import ExportConfig, export
from cnnpack.rundir import Run, sha256

RESULT_KEYS = {"runtime", "batch_size", "latency_ms_p50", "latency_ms_p99", "throughput_ips", "gflops"}


@pytest.fixture(scope="module")
def exported(tiny_run, tmp_path_factory):
    """A copy of tiny_run with ONNX and TorchScript exports that take at most 8 images."""
    run_dir = tmp_path_factory.mktemp("bench") / "run"
    shutil.copytree(tiny_run, run_dir)
    export(run_dir, ExportConfig(max_batch_size=8))
    return run_dir


@pytest.fixture(scope="module")
def benched(exported):
    cfg = BenchConfig(runtimes=("eager", "torchscript", "onnxruntime"), batch_sizes=(1, 8), threads=1,
                      max_seconds=0.3, warmup_s=0.05, matmul_n=512, matmul_s=0.1)
    return bench(exported, cfg)


@pytest.mark.slow
def test_bench_measures_every_runtime_and_batch_size(benched):
    rows = {(r["runtime"], r["batch_size"]): r for r in benched["results"]}
    assert set(rows) == {(n, b) for n in ("eager", "torchscript", "onnxruntime") for b in (1, 8)}
    for r in rows.values():
        assert RESULT_KEYS <= set(r)
        assert 0 < r["latency_ms_p50"] <= r["latency_ms_p90"] <= r["latency_ms_p99"]
        # throughput comes from wall time, latency from single calls: they must describe the same runs
        assert r["throughput_ips"] == pytest.approx(1e3 * r["batch_size"] / r["latency_ms_mean"], rel=0.5)
        assert r["gflops"] == pytest.approx(r["throughput_ips"] * benched["model_gflops_per_image"])
        assert r["matmul_share"] == pytest.approx(r["gflops"] / r["matmul_gflops"])
        assert r["requests"] >= 3 and r["peak_rss_mb"] is not None
        assert r["load_s"] > 0 and r["first_call_s"] > 0
    for name in ("eager", "torchscript", "onnxruntime"):  # one load per runtime, a first call per batch size
        assert rows[(name, 1)]["load_s"] == rows[(name, 8)]["load_s"]
    assert rows[("eager", 1)]["speedup_vs_eager"] == 1.0
    assert rows[("onnxruntime", 8)]["speedup_vs_eager"] == pytest.approx(
        rows[("eager", 8)]["latency_ms_p50"] / rows[("onnxruntime", 8)]["latency_ms_p50"])
    assert rows[("onnxruntime", 1)]["info"]["threads"] == 1


@pytest.mark.slow
def test_bench_records_machine_limit_and_outputs(benched, exported):
    section = Run.open(exported).read()["stages"]["bench"]
    assert section["status"] == "ok" and section["threads"] == 1
    assert section["matmul"]["threads"] == 1 and len(section["matmul"]["samples_gflops"]) == 4  # before + 3 runtimes
    fp32 = section["ceilings"]["fp32"]  # the best of several multiplies, raised by any faster sample
    assert section["machine_peak_gflops"] == max([*section["matmul"]["samples_gflops"], fp32["gflops"]]) > 1
    assert len(fp32["samples"]) >= 6 and fp32["theoretical_gflops"]["gflops"] > 0
    engines = {s["engine"].split()[0] for s in fp32["samples"]}  # every engine that runs fp32 rows, matmul and conv
    assert {"torch.matmul", "torch", "onnxruntime"} <= engines and any("conv" in s["shape"] for s in fp32["samples"])
    assert fp32["matrix_engine"] and section["ceilings_cache"]["path"].startswith(os.environ["CNNPACK_CACHE"])
    assert all(r["precision"] == "fp32" and r["matmul_gflops"] == fp32["gflops"] for r in section["results"])
    assert {"torch", "onnxruntime-gpu", "numpy"} & set(section["libraries"])
    assert section["machine"]["cpus_usable"] >= 1
    assert set(section["outputs"]) == {"bench.json", "bench.csv", "bench.png"}
    assert json.loads((exported / "bench.json").read_text())["results"] == section["results"]
    rows = list(csv.DictReader((exported / "bench.csv").open()))
    assert len(rows) == 6 and float(rows[0]["latency_ms_p50"]) > 0
    assert (exported / "bench.png").read_bytes()[:4] == b"\x89PNG"


def test_windows_must_agree_to_be_stable():
    steady = [Window([0.010] * 10, 0.100), Window([0.0104] * 10, 0.104), Window([0.0098] * 10, 0.098)]
    assert agree(steady, 0.10)
    jumpy = steady[:2] + [Window([0.013] * 10, 0.130)]
    assert not agree(jumpy, 0.10)


def test_a_concurrent_load_warms_up_under_that_load_not_one_request_at_a_time():
    """A load generator that passes its own window (several requests in flight) gets its warm-up as one such window
    of warmup_s: single requests would warm Triton's batcher for batches of one and count in its statistics."""
    from cnnpack.measure import WindowPolicy, measure

    asked = []

    def window(request, policy, sync):
        asked.append(policy.window_s)
        return Window([0.001] * 16, 0.001)

    def alone():
        raise AssertionError("a single request during the warm-up of a concurrent load")

    m = measure(alone, WindowPolicy(window_s=0.2, max_s=1.0, warmup_s=0.7), window=window)
    assert asked == [0.7, 0.2, 0.2, 0.2] and m.stable and m.all_windows == 3
    calls = []
    measure(lambda: calls.append(1), WindowPolicy(window_s=0.01, max_s=0.1, warmup_s=0.0))  # local: single calls
    assert len(calls) >= 3 + 3 * 3  # min_requests of warm-up, then three windows of at least min_requests


def test_inductor_trusts_the_cpu_flags_unless_the_user_chose(monkeypatch):
    """torch.compile and the pt2 export skip inductor's per-ISA probe builds, but a TORCHINDUCTOR_VEC_ISA_OK the user
    set (read by torch at import, or set later) is left as it is. (config.patch, not monkeypatch.setattr: undoing
    the latter deletes the option from inductor's config, and every later compile in the process fails.)"""
    from torch._inductor import config

    from cnnpack.host import prepare_inductor

    monkeypatch.delenv("TORCHINDUCTOR_VEC_ISA_OK", raising=False)
    with config.patch({"cpp.vec_isa_ok": None}):
        prepare_inductor()
        assert config.cpp.vec_isa_ok is True
    with config.patch({"cpp.vec_isa_ok": False}):  # the user's 0, as torch read it at import
        prepare_inductor()
        assert config.cpp.vec_isa_ok is False
    monkeypatch.setenv("TORCHINDUCTOR_VEC_ISA_OK", "0")
    with config.patch({"cpp.vec_isa_ok": None}):  # set after torch's import
        prepare_inductor()
        assert config.cpp.vec_isa_ok is None
    assert hasattr(config.cpp, "vec_isa_ok")


HEADER_BUILD = """
import glob, os, sys, torch
from torch._inductor.codecache import _HEADER_DIR
from cnnpack.host import prepare_inductor, start_header_build
prepare_inductor()
thread = start_header_build()
before = set(sys.modules)
thread.join()
assert set(sys.modules) == before, sorted(set(sys.modules) - before)  # the thread imported nothing
built = sorted(glob.glob(os.path.join(_HEADER_DIR, "*.gch")))
assert len(built) == 1, built
torch.compile(lambda x: (x * 2).relu().sum(1), dynamic=False)(torch.rand(4, 8))
assert sorted(glob.glob(os.path.join(_HEADER_DIR, "*.gch"))) == built, "inductor built another header"
print("ok", built[0])
"""


@pytest.mark.slow
@pytest.mark.cxx
def test_the_header_built_ahead_is_the_one_inductor_compiles_with(tmp_path):
    """start_header_build builds the precompiled header inductor's CPU kernels include, with their command line: a
    compile after it finds it and builds no other (a torch whose internals moved would build none, or a second, and
    the early start would only cost CPU). The thread imports no module: torch's imports from two threads at once broke
    one of the caller's (torch.compile's, once in a bench). A new process with its own TMPDIR: inductor keeps the headers there, not in its cache."""
    env = {**os.environ, "TMPDIR": str(tmp_path), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    out = subprocess.run([sys.executable, "-c", HEADER_BUILD], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.startswith("ok " + str(tmp_path)), out.stdout + out.stderr[-3000:]


def test_a_run_replaced_while_bench_measured_gets_none_of_its_rows(exported, tmp_path):
    """`train --force` while a bench measured the old model: the bench recorded the old model's rows in the new
    run's manifest (under the new checkpoint's digest) and report.md showed them. Now the bench records nothing."""
    run_dir = tmp_path / "run"
    shutil.copytree(exported, run_dir)
    out = run_dir / "bench.json"
    before = out.read_bytes() if out.exists() else None  # a module bench may have written one
    replaced = []

    def train_again(text: str) -> None:  # what `cnnpack train --run R --force` does, while bench measures
        if "batch 1" in text and not replaced:
            replaced.append(Run.create(run_dir, Run.open(run_dir).model_spec, force=True))

    cfg = BenchConfig(runtimes=("eager",), batch_sizes=(1,), threads=1, max_seconds=0.2, warmup_s=0.05,
                      matmul_s=0.05)
    with pytest.raises(StageFailed, match=r"was replaced by a new run \(trained again with --force\) while this "
                                          r"command ran on the old one; nothing was recorded"):
        bench(run_dir, cfg, progress=train_again)
    assert replaced and "bench" not in Run.open(run_dir).read()["stages"]
    assert (out.read_bytes() if out.exists() else None) == before
    with pytest.raises(StageFailed, match="was replaced"):  # any command's write: a stage record too
        stale = Run.open(tmp_path / "run")
        Run.create(run_dir, stale.model_spec, force=True)
        stale.set_stage("verify", {"status": "ok"})


@pytest.mark.parametrize("moment", ["set aside", "new run training"])
def test_a_command_that_fails_reading_a_run_replaced_meanwhile_says_it_was_replaced(exported, tmp_path, monkeypatch,
                                                                                     moment):
    """Another process's `train --force` sets the old run's files aside while bench reads them: bench failed on the
    first one gone, blaming the run ("its training did not finish an epoch; train it with --force", exit 2; 3 tries
    of 5 in a real race). Now it says the run was replaced meanwhile, exit 1, as its writes do."""
    from typer.testing import CliRunner

    from cnnpack.cli.common import app

    run_dir = tmp_path / "run"
    shutil.copytree(exported, run_dir)
    opened = Run.open

    def open_then_replaced(path):  # what another process's `train --run R --force` does right after bench opened R
        run = opened(path)
        aside = run_dir / ".replaced-other"
        aside.mkdir()
        (aside / ".replacing.json").write_text(json.dumps({"run_id": "another process's", "names": []}))
        old = json.loads((run_dir / "cnnpack.json").read_text())
        for name in ("cnnpack.json", "checkpoint.pt", "export"):
            (run_dir / name).rename(aside / name)
        if moment == "new run training":
            new = {**old, "run_id": "another process's", "created": "2026-12-08T00:00:00+00:00",
                   "stages": {"train": {"status": "running"}}}
            (run_dir / "cnnpack.json").write_text(json.dumps(new))
        return run

    monkeypatch.setattr(Run, "open", staticmethod(open_then_replaced))
    r = CliRunner().invoke(app, ["bench", "--run", str(run_dir), "--runtimes", "eager", "--batch-sizes", "1",
                                 "--max-seconds", "0.1", "--no-plot"])
    assert r.exit_code == 1 and r.output.strip().splitlines()[-1] == (
        f"error: {run_dir} was replaced by a new run (trained again with --force) while this command ran on the old "
        "one; nothing was recorded: run the command again"), r.output


@pytest.mark.parametrize("cfg, message", [
    (BenchConfig(runtimes=("eager", "tensorflow")), "valid: eager, (compiled, )?aoti, torchscript, onnxruntime"),
    (BenchConfig(runtimes=("onnxruntime",), batch_sizes=(1, 16)), "exceeds the max batch size 8"),
    (BenchConfig(threads=0), "--threads must be >= 1"),
    (BenchConfig(threads=100_000), "--threads 100000 is more than the"),  # a MemoryError
    (BenchConfig(batch_sizes=(0,)), "--batch-sizes"),
])
def test_bad_bench_input(exported, cfg, message):
    with pytest.raises(UserInputError, match=message):
        bench(exported, cfg)


def test_unknown_runtime_says_why_installed_ones_are_skipped(exported):
    import torch

    with pytest.raises(UserInputError) as e:
        bench(exported, BenchConfig(runtimes=("nope",)))
    if not torch.cuda.is_available():  # after compiled's reason, where no C++ compiler is found
        assert re.search(r"installed but unusable here: (compiled \(.*?\); )?onnxruntime-cuda \((no CUDA GPU|this "
                         r"onnxruntime build has no CUDAExecutionProvider)",  # (onnxruntime-gpu, or a CPU build)
                         str(e.value)), str(e.value)


def test_run_without_exports_is_refused_before_measuring(tiny_run):
    before = (tiny_run / "cnnpack.json").read_text()
    with pytest.raises(MissingStageError, match="has no exports.*cnnpack export --run"):
        bench(tiny_run, BenchConfig(runtimes=("eager", "onnxruntime")))
    assert (tiny_run / "cnnpack.json").read_text() == before


@pytest.mark.slow
def test_cli_bench_json_and_errors(benched, exported, tmp_path):  # benched: the ceilings it measured are reused
    exported = shutil.copytree(exported, tmp_path / "run")  # its own copy: others read the module's bench
    cli = [sys.executable, "-m", "cnnpack", "bench", "--run", str(exported)]
    ok = subprocess.run(cli + ["--runtimes", "onnxruntime", "--batch-sizes", "2", "--max-seconds", "0.1",
                               "--threads", "1", "--no-plot", "--json"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    section = json.loads(ok.stdout)
    assert [(r["runtime"], r["batch_size"]) for r in section["results"]] == [("onnxruntime", 2)]
    assert section["ceilings_cache"]["reused"] == ["fp32"]  # measured once per machine (the fixture's bench)
    assert "bench.png" not in section["outputs"]
    assert not (exported / "bench.png").exists()  # the earlier figure showed rows this bench replaced
    # a log file or a pipe gets a line per phase as it starts (a live status would leave it empty until the end)
    logged = subprocess.run(cli + ["--runtimes", "onnxruntime", "--batch-sizes", "2", "--max-seconds", "0.1",
                                   "--threads", "1", "--no-plot"], capture_output=True, text=True)
    assert logged.returncode == 0, logged.stderr
    assert "bench: measuring onnxruntime batch 2" in logged.stderr.splitlines(), logged.stderr
    cold = [ln for ln in logged.stdout.splitlines() if ln.startswith("cold start")]
    assert len(cold) == 1 and "onnxruntime: load " in cold[0] and " at batch 2" in cold[0], logged.stdout
    bad = subprocess.run(cli + ["--threads", "0"], capture_output=True, text=True)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and "--threads must be >= 1" in lines[0], bad.stderr


def test_a_ceiling_a_row_beats_is_measured_again_in_the_run(exported, tmp_path):
    """A ceiling measured low (a slower moment of a shared host; here planted at 1 GFLOP/s) is measured again, once,
    when a row beats it: the rows' shares are taken against the new one, and the cache keeps it."""
    import torch

    from cnnpack.bench import BenchContext
    from cnnpack.bench_ceilings import remeasure_beaten_ceilings
    from cnnpack.rundir import Run

    cache = tmp_path / "ceilings.json"
    cache.write_text(json.dumps({"key": {}, "ceilings": {"fp32": {"gflops": 1.0}}}))
    ctx = BenchContext(Run.open(exported), BenchConfig(threads=1), torch.device("cpu"), 1, lambda _: None)
    ctx.ceilings, ctx.ceilings_cache = {"fp32": {"gflops": 1.0}}, {"path": str(cache)}
    ctx.results = [{"precision": "fp32", "gflops": 2.0, "matmul_gflops": 1.0, "matmul_share": 2.0}]
    remeasure_beaten_ceilings(ctx)
    fp32 = ctx.ceilings["fp32"]
    assert fp32["remeasured"] and fp32["first_gflops"] == 1.0 and fp32["gflops"] > 2.0
    assert ctx.results[0]["matmul_gflops"] == fp32["gflops"] and ctx.results[0]["matmul_share"] < 1
    assert json.loads(cache.read_text())["ceilings"]["fp32"]["gflops"] == fp32["gflops"]  # stored for next time


def test_one_precision_is_held_to_one_ceiling_when_a_later_sample_raises_it():
    """A matmul sample taken after a runtime can beat the fp32 ceiling measured at the start (a shared host that got
    quieter): it raises the ceiling, and the rows measured before it are held to the raised one too."""
    import torch

    from cnnpack.bench import BenchContext

    ctx = BenchContext(None, BenchConfig(), torch.device("cpu"), 1, lambda _: None)
    ctx.ceilings = {"fp32": {"gflops": 100.0}, "int8": {"gflops": 400.0}}
    ctx.matmul = [{"gflops": 90.0}]
    first, second, int8 = {"gflops": 50.0}, {"gflops": 60.0}, {"gflops": 200.0}
    ctx.yardstick(first, "fp32", around=(90.0, 90.0))
    ctx.matmul.append({"gflops": 120.0})
    ctx.yardstick(second, "fp32", around=(90.0, 120.0))
    ctx.yardstick(int8, "int8", around=(90.0, 120.0))
    ctx.results = [first, second, int8]
    assert first["matmul_gflops"] == 100.0 and second["matmul_gflops"] == 120.0  # two yardsticks until settled
    ctx.settle()
    assert first["matmul_gflops"] == second["matmul_gflops"] == ctx.ceilings["fp32"]["gflops"] == 120.0
    assert first["matmul_share"] == pytest.approx(50 / 120) and second["matmul_share"] == pytest.approx(0.5)
    assert int8["matmul_gflops"] == 400.0 and int8["matmul_share"] == 0.5  # its own ceiling, untouched
    # the sample taken before the first runtime raises it too (only the latest did: the report's ceiling was under
    # bench.json's machine_peak_gflops, and every share 1.4x too high)
    ctx.ceilings, ctx.matmul = {"fp32": {"gflops": 100.0}}, [{"gflops": 288.0}, {"gflops": 200.0}]
    row = {"gflops": 144.0}
    ctx.yardstick(row, "fp32", around=(288.0, 200.0))
    assert row["matmul_gflops"] == ctx.ceilings["fp32"]["gflops"] == 288.0 and row["matmul_share"] == 0.5

    # a raised ceiling names the sample that raised it (it kept "openvino MatMul f32 n=1024", an engine that ran 150),
    # and the sample after the last runtime counts too: bench.json's peak and the rows' ceiling were 173 and 169.5
    theory = {"gflops": 156.5, "cores": 2, "ops_per_cycle": 32, "mhz": 2445.4}
    ctx.ceilings = {"fp32": {"gflops": 150.0, "best": "openvino MatMul f32 n=1024", "theoretical_gflops": theory}}
    ctx.matmul = [{"gflops": 142.0, "how": "torch.matmul (MKL)", "n": 512}, {"gflops": 169.5, "how": "torch.matmul (MKL)", "n": 512}]
    row = {"gflops": 30.0}
    ctx.yardstick(row, "fp32", around=(142.0, 169.5))
    ctx.matmul.append({"gflops": 173.0, "how": "torch.matmul (MKL)", "n": 512})
    ctx.results = [row]
    ctx.settle()
    fp32 = ctx.ceilings["fp32"]
    assert row["matmul_gflops"] == fp32["gflops"] == 173.0
    assert fp32["best"] == "torch.matmul (MKL) n=512, a sample of this bench"
    assert fp32["theoretical_gflops"]["note"].startswith("measured above it: the reported clock (2445 MHz")


def test_a_gpu_s_ceilings_are_its_own_kernels_per_precision(monkeypatch):
    """On a GPU the fp32 yardstick was one n = 1024 matmul, and an H200's resnet18 rows ran at 3.5-5.1x it: its
    ceilings are now cuBLAS/cuDNN matmuls and convolutions per precision (fp32 with TF32 off, fp16, bf16), each the
    best of its samples. The same code runs here on the CPU device, at small sizes."""
    import torch

    from cnnpack import kernels
    from cnnpack.peak import device_ceilings

    monkeypatch.setattr(kernels, "DEVICE_SIZES", (64, 128))
    monkeypatch.setattr(kernels, "DEVICE_CONV", (2, 16, 8, 8))
    found = device_ceilings(torch.device("cpu"), precisions={"fp32", "fp16", "int8"}, seconds=0.01)
    assert set(found) == {"fp32", "fp16"}  # int8 is no GPU kernel cnnpack samples: its rows fall back to fp32's
    for precision, c in found.items():
        engines = {s["engine"] for s in c["samples"]}
        assert engines == {f"torch.matmul {precision}", f"torch conv2d {precision}"}
        assert c["gflops"] == pytest.approx(max(s["gflops"] for s in c["samples"]), abs=0.05)  # samples: 0.1
    assert "TF32 off" in found["fp32"]["matrix_engine"] and "tensor cores" in found["fp16"]["matrix_engine"]
    from cnnpack.report_bench import _ceilings

    assert "fp16 on cpu tensor cores" in _ceilings({"ceilings": found}, 0.0)  # no ISA peak to name: still said


@pytest.mark.slow
@pytest.mark.cxx
def test_compiled_runtime_is_benched_frozen(exported, tmp_path):
    section = bench(shutil.copytree(exported, tmp_path / "run"), BenchConfig(runtimes=("eager", "compiled"), batch_sizes=(2,), threads=1,
                                          max_seconds=0.2, warmup_s=0.05, matmul_n=256, matmul_s=0.05, plot=False))
    compiled = next(r for r in section["results"] if r["runtime"] == "compiled")
    assert compiled["info"]["freezing"] is True and compiled["latency_ms_p50"] > 0
    # inductor compiles in the first call, which is timed alone as the cold start and kept out of the windows
    assert compiled["first_call_s"] > 20 * compiled["latency_ms_p50"] / 1e3
    eager = next(r for r in section["results"] if r["runtime"] == "eager")
    assert compiled["first_call_s"] > 10 * eager["first_call_s"]


@pytest.fixture(scope="module")
def onnx_only(tiny_run, tmp_path_factory):
    """A copy of tiny_run exported to ONNX alone (no TorchScript)."""
    run_dir = tmp_path_factory.mktemp("bench-onnx") / "run"
    shutil.copytree(tiny_run, run_dir)
    export(run_dir, ExportConfig(formats=("onnx",), max_batch_size=8))
    return run_dir


def test_bench_s_files_and_record_are_replaced_together_or_not_at_all(onnx_only, tmp_path, monkeypatch):
    """A bench.png that could not be written left the new bench.json and bench.csv beside the old record (the report,
    read from the record, disagreed with them); report.md was replaced where report.html could not be."""
    import cnnpack.bench_outputs as outputs
    from cnnpack.bench import BenchConfig, bench
    from cnnpack.report import write_report

    run = tmp_path / "run"
    shutil.copytree(onnx_only, run)
    cfg = BenchConfig(runtimes=("eager",), batch_sizes=(1,), threads=1, max_seconds=0.2, warmup_s=0.05,
                      matmul_n=256, matmul_s=0.05)
    first = bench(run, cfg)
    before = {n: (run / n).read_bytes() for n in ("bench.json", "bench.csv", "bench.png", "cnnpack.json")}
    assert first["outputs"]["bench.png"]["sha256"] == sha256(run / "bench.png")

    def broken(section, path):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(outputs, "plot_results", broken)
    with pytest.raises(OSError, match="No space left"):
        bench(run, cfg)
    assert {n: (run / n).read_bytes() for n in before} == before
    assert not [f for f in run.iterdir() if f.name.startswith(".bench")]  # nothing staged left
    monkeypatch.undo()
    (run / "bench.png").unlink()
    (run / "bench.png").mkdir()  # a folder in the way: refused before anything is replaced
    with pytest.raises(IsADirectoryError):
        bench(run, cfg)
    assert (run / "bench.json").read_bytes() == before["bench.json"] and (run / "bench.png").is_dir()
    write_report(run)
    md = (run / "report.md").read_bytes()
    (run / "report.html").unlink()
    (run / "report.html").mkdir()
    (run / "bench.png").rmdir()
    with pytest.raises(IsADirectoryError):
        write_report(run)
    assert (run / "report.md").read_bytes() == md


def test_default_runtimes_bench_what_the_run_has(onnx_only):
    from cnnpack.host import compiler_missing

    chosen, skipped = default_runtimes(Run.open(onnx_only))
    assert {"eager", "onnxruntime"} <= set(chosen) and "torchscript" not in chosen
    assert ("compiled" in chosen) == (compiler_missing() is None)  # the next test: skipped without a compiler
    assert "no torchscript artifact" in skipped["torchscript"] and "triton" not in skipped
    section = bench(onnx_only, BenchConfig(artifacts=("onnx",), batch_sizes=(1,), threads=1, max_seconds=0.2,
                                           warmup_s=0.05, matmul_n=256, matmul_s=0.05, plot=False))
    assert {r["runtime"] for r in section["results"]} == {"onnxruntime"}
    assert "no torchscript artifact" in section["skipped"]["torchscript"]
    again = bench(onnx_only, BenchConfig(runtimes=("eager",), batch_sizes=(1,), threads=1, max_seconds=0.2,
                                         warmup_s=0.05, matmul_n=256, matmul_s=0.05, plot=False))
    assert again["replaced"] == ["onnxruntime@1"]  # the earlier run's row is gone, and said so


@pytest.mark.parametrize("env", [{"CXX": "/nonexistent/g++"}, {"PATH": "/nonexistent-bin"}])
def test_without_a_cpp_compiler_the_compiled_runtime_is_skipped_saying_why(onnx_only, tmp_path, monkeypatch, env):
    """Inductor's CPU kernels are C++: on a machine without g++, torch.compile failed at the first call with inductor's
    InvalidCxxCompiler traceback, and the default bench (and so `cnnpack pipeline`) ended there."""
    run = tmp_path / "run"
    shutil.copytree(onnx_only, run)
    monkeypatch.delenv("CXX", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    chosen, skipped = default_runtimes(Run.open(run))
    why = ("CXX=/nonexistent/g++ is not an executable" if "CXX" in env else "g++ is not on PATH and CXX is not set")
    assert "compiled" not in chosen and "eager" in chosen
    assert skipped["compiled"] == (f"torch.compile needs a C++ compiler for its CPU kernels: {why}; install one "
                                   "(`apt-get install g++`) or set CXX to a C++ compiler")
    fast = dict(batch_sizes=(1,), threads=1, max_seconds=0.2, warmup_s=0.05, matmul_n=256, matmul_s=0.05, plot=False)
    section = bench(run, BenchConfig(runtimes=("eager", "compiled"), **fast))
    assert {r["runtime"] for r in section["results"]} == {"eager"}
    assert section["skipped"]["compiled"] == skipped["compiled"]  # said once, as `skipped compiled: <why>`
    with pytest.raises(RuntimeUnavailable, match=r"^no runtime could run here: compiled: torch.compile needs a C\+\+ "
                                                 r"compiler for its CPU kernels: "):
        bench(run, BenchConfig(runtimes=("compiled",), **fast))


def test_a_compiler_that_builds_nothing_skips_the_compiled_runtime_at_its_first_call(onnx_only, tmp_path):
    """CXX=true answers --version, so the runtime loads; its first call failed with inductor's IndexError. In a new
    process with its own inductor cache: inductor reads $CXX when imported, and a kernel an earlier test compiled
    would need no compiler (patching inductor's config in this process broke the later tests' compiles)."""
    run = tmp_path / "run"
    shutil.copytree(onnx_only, run)
    true = shutil.which("true")
    env = {**os.environ, "CXX": true, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    proc = subprocess.run([sys.executable, "-m", "cnnpack", "bench", "--run", str(run), "--runtimes", "eager,compiled",
                           "--batch-sizes", "1", "--threads", "1", "--max-seconds", "0.2", "--no-plot"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    why = (f"torch.compile could not build its CPU kernels: the C++ compiler does not work: {true} -c probe.cpp exited "
           "0 but wrote no object file; install one (`apt-get install g++`) or set CXX to a C++ compiler")
    assert f"skipped compiled: {why}\n" in proc.stderr and "Traceback" not in proc.stderr
    section = json.loads((run / "cnnpack.json").read_text())["stages"]["bench"]
    assert {r["runtime"] for r in section["results"]} == {"eager"} and section["skipped"]["compiled"] == why


def test_default_batch_sizes_fit_each_export_and_asked_ones_are_held_to_it(onnx_only):
    from types import SimpleNamespace

    from cnnpack.bench import fitted_batch_sizes

    capped = SimpleNamespace(record={"static_batch": None}, max_batch_size=8)
    assert fitted_batch_sizes(capped, (1, 8, 32)) == (1, 8)
    assert fitted_batch_sizes(SimpleNamespace(record={"static_batch": 4}, max_batch_size=4), (1, 8, 32)) == (4,)
    assert fitted_batch_sizes(SimpleNamespace(record={}, max_batch_size=None), (1, 8, 32)) == (1, 8, 32)
    fast = dict(threads=1, max_seconds=0.2, warmup_s=0.05, matmul_n=256, matmul_s=0.05, plot=False)
    section = bench(onnx_only, BenchConfig(runtimes=("onnxruntime", "eager"), batch_sizes=(1, 32), fit_batch_sizes=True,
                                           **fast))
    assert [(r["runtime"], r["batch_size"]) for r in section["results"]] == [  # eager at the sizes the file runs
        ("onnxruntime", 1), ("onnxruntime", 8), ("eager", 1), ("eager", 8)]
    with pytest.raises(UserInputError, match="batch size 32 exceeds the max batch size 8"):
        bench(onnx_only, BenchConfig(runtimes=("onnxruntime",), batch_sizes=(1, 32), **fast))


def test_lists_drop_repeats_and_no_number_option_takes_nan_or_inf():
    from typer.testing import CliRunner

    from cnnpack.cli.common import app, int_list, name_list

    assert int_list("1,1,8", "--batch-sizes") == (1, 8) and name_list("onnx, onnx,torchscript") == ("onnx", "torchscript")
    for args in (["bench", "--run", "x", "--max-seconds", "nan"], ["tune", "--run", "x", "--time-limit", "inf"]):
        r = CliRunner().invoke(app, args)
        assert r.exit_code == 2 and "must be a finite number, got" in r.output, r.output


def test_a_runtime_named_without_its_artifact_is_one_line_and_exit_2(onnx_only):
    bad = subprocess.run([sys.executable, "-m", "cnnpack", "bench", "--run", str(onnx_only), "--runtimes",
                          "onnxruntime,torchscript", "--max-seconds", "0.1"], capture_output=True, text=True)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and "no torchscript artifact (has: onnx)" in lines[0], bad.stderr


@pytest.mark.parametrize("flags, vendor, engines", [
    (["avx2", "fma"], "AuthenticAMD", ("AVX2 FMA", "AVX2 (no VNNI: int16 pairs)", "AVX2 (no native bf16: computed in fp32)")),
    (["avx2", "avx512_bf16", "avx512_vnni", "avx512f", "fma"], "AuthenticAMD",
     ("AVX-512 FMA", "AVX-512 VNNI", "AVX-512 BF16")),
    (["amx_bf16", "amx_int8", "amx_tile", "avx512_bf16", "avx512_vnni", "avx512f", "fma"], "GenuineIntel",
     ("AVX-512 FMA", "AMX (int8 tiles)", "AMX (bf16 tiles)")),
])
def test_each_precision_names_its_matrix_engine(flags, vendor, engines):
    from cnnpack.peak import matrix_engine

    info = {"flags": flags, "vendor": vendor}
    assert tuple(matrix_engine(p, info) for p in ("fp32", "int8", "bf16")) == engines


@pytest.mark.parametrize("name, family, model, expect", [
    ("AMD EPYC", 25, 1, "AMD EPYC (family 25, model 1: Zen 3)"),  # two hosts a VM names alike, told apart
    ("AMD EPYC", 25, 17, "AMD EPYC (family 25, model 17: Zen 4)"),
    ("AMD EPYC", 23, 49, "AMD EPYC (family 23, model 49: Zen 2)"),
    ("Intel Xeon Processor (Sapphire Rapids)", 6, 143, "Intel Xeon Processor (Sapphire Rapids) (family 6, model 143)"),
    ("Intel(R) Xeon(R) Processor", 6, 207, "Intel(R) Xeon(R) Processor (family 6, model 207: Emerald Rapids)"),
    ("Intel(R) Xeon(R) Processor", 6, 143, "Intel(R) Xeon(R) Processor (family 6, model 143: Sapphire Rapids)"),
    ("Intel(R) Xeon(R) Platinum 8488C", 6, 143, "Intel(R) Xeon(R) Platinum 8488C"),  # the name says it already
])
def test_the_cpu_is_named_with_its_family_and_model_where_its_name_does_not_tell(name, family, model, expect):
    from cnnpack.host import cpu_name

    assert cpu_name(f"processor\t: 0\nmodel name\t: {name}\ncpu family\t: {family}\nmodel\t\t: {model}\n") == expect


def test_the_cpu_of_this_process_s_own_children_is_not_counted_as_others():
    """inductor compiles in worker processes: their CPU is the row's own, not a disturbance."""
    import resource

    from cnnpack.host import cpu_ticks

    before, kids0 = cpu_ticks(), resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run([sys.executable, "-c", "import time\nend = time.process_time() + 0.5\nwhile time.process_time() < end: pass"],
                   check=True)
    after, kids1 = cpu_ticks(), resource.getrusage(resource.RUSAGE_CHILDREN)
    child_ticks = (kids1.ru_utime + kids1.ru_stime - kids0.ru_utime - kids0.ru_stime) * os.sysconf("SC_CLK_TCK")
    assert child_ticks >= 40 and after[2] - before[2] >= 0.8 * child_ticks


def test_what_disturbed_a_bench_is_said_in_one_sentence_each():
    from cnnpack.bench_outputs import disturbances

    row = {"runtime": "eager", "format": "checkpoint", "artifact": "checkpoint", "precision": "fp32", "batch_size": 1}
    quiet = {"results": [{**row, "stable": True, "cpu_others": 0.01}], "config": {"stability": 0.1},
             "matmul": {"samples_gflops": [100, 104], "spread": 0.04}}
    assert disturbances(quiet) == []
    busy = {**quiet, "results": [{**row, "stable": False, "cpu_others": 0.23}], "over_ceiling": ["eager@1"],
            "matmul": {"samples_gflops": [60, 104], "spread": 0.73}}
    said = disturbances(busy)
    assert len(said) == 4 and said[0].startswith("unstable") and "eager@1 23 %" in said[1]
    assert "varied from 60 to 104 GFLOP/s" in said[3]  # a record whose rows lack their two samples: the spread


def test_a_slower_machine_is_said_for_the_rows_it_slowed_not_for_one_sample_that_dipped():
    """Each row keeps the fp32 matmul samples before and after its runtime; the caution names the rows whose two
    samples both fell more than 10 % under the run's best. One sample that dipped (a 0.1 s matmul does, now and
    then, on a quiet shared host) cautioned nearly every pipeline run on a 2-core Zen 4 VM."""
    from cnnpack.bench_outputs import disturbances

    def said(samples, batch_sizes=(1,), served=False):
        """The caution of a bench whose runtimes (one between each two samples) were measured at `batch_sizes`."""
        runtimes = ("eager", "compiled", "torchscript", "onnxruntime", "openvino")[:len(samples) - 1]
        rows = [{"runtime": n, "format": "onnx", "artifact": "onnx", "precision": "fp32", "batch_size": b,
                 "stable": True, "cpu_others": 0.0, "matmul_before_gflops": samples[i],
                 "matmul_after_gflops": samples[i + 1]} for i, n in enumerate(runtimes) for b in batch_sizes]
        for r in rows if served else ():
            r.update(runtime="triton", format=f"triton:{r['runtime']}", concurrency=1)
        return disturbances({"results": rows, "config": {"stability": 0.1},
                             "matmul": {"samples_gflops": samples, "spread": max(samples) / min(samples) - 1}})

    def names(samples, served=False):
        out = said(samples, served=served)
        return re.split(" w(?:as|ere) measured", out[0])[0].removeprefix("the machine ran slower while ") if out else None

    # a pipeline's bench on a quiet Zen 4: one sample dipped
    assert said([196, 192, 192, 164, 195, 197], batch_sizes=(1, 32)) == []
    # another: the first runtime measured between two slow samples
    assert said([165, 174, 202, 200, 199, 200], batch_sizes=(1, 32)) == [
        "the machine ran slower while eager@1, eager@32 were measured (the fp32 matmul rate before and after each "
        "more than 10 % under its bench's best, 202 GFLOP/s, or one of the two under half of it): their figures may "
        "be low; rerun on a quiet machine"]
    assert names([200, 200, 100, 100, 100, 100]) == "torchscript@1, onnxruntime@1, openvino@1"  # slow from then on
    assert names([200, 100, 100]) == "compiled@1"  # the median would have been the slow rate
    assert names([200, 100, 200]) is None  # a dip between two runtimes
    # another process took the cores while eager ran: 203, then 18.6 (eager@1 ran 100x slower than its first call)
    assert names([203, 18.6, 200, 201]) == "eager@1, compiled@1"  # both beside the sample that fell under half
    from cnnpack.report_bench import _bench_warnings  # the report says it too (it said unstable and busy rows only)

    samples = [203, 18.6, 200, 201]
    rows = [{"runtime": n, "format": "onnx", "batch_size": 1, "stable": True, "cpu_others": 0.0,
             "matmul_before_gflops": samples[i], "matmul_after_gflops": samples[i + 1]}
            for i, n in enumerate(("eager", "compiled", "onnxruntime"))]
    assert [w for w in _bench_warnings({"results": rows, "matmul": {"samples_gflops": samples}}, rows)
            if w.startswith("**Slower machine**: The machine ran slower while eager@1, compiled@1 were measured")]
    # a served row measured while it ran slower: the summary named it, the report (its local rows alone) did not
    served = {"runtime": "triton", "format": "triton:cnn_onnx", "concurrency": 1, "batch_size": 1, "stable": True,
              "matmul_before_gflops": 100, "matmul_after_gflops": 100}
    said_all = _bench_warnings({"results": [*rows, served], "matmul": {"samples_gflops": samples}}, rows)
    assert [w for w in said_all if "eager@1, compiled@1, triton:cnn_onnx c1@1 were measured" in w], said_all
    assert names([200, 100]) == "the fp32 matmul rate varied from 100 to 200 GFLOP/s during the run: the machine was " \
        "busy or its speed changed; rerun on a quiet machine"  # one runtime: two samples cannot tell a dip
    assert names([200, 150, 140], served=True) == "triton:compiled c1@1"  # bench --triton-url alone
    # two served benches merged into one section, each steady at its own rate: each row judged by its own bench's best
    rows = [{"runtime": "triton", "format": f"triton:{m}", "concurrency": 1, "batch_size": 1, "stable": True,
             "matmul_before_gflops": rate, "matmul_after_gflops": rate, "matmul_best_gflops": rate}
            for m, rate in (("cnn_onnx", 200), ("cnn_torchscript", 170))]
    merged = {"results": rows, "config": {"stability": 0.1}, "matmul": {"samples_gflops": [200, 200, 200]}}
    assert disturbances(merged) == []  # against the first bench's samples the second's rows were called slow
    # a served bench that ran starved throughout (16.6 and 13.5 against the local bench's 203): its own best tells
    # nothing, the section's does
    local = [{"runtime": "onnxruntime", "format": "onnx", "batch_size": 1, "stable": True,
              "matmul_before_gflops": 203, "matmul_after_gflops": 200}]
    starved = {"runtime": "triton", "format": "triton:cnn_torchscript", "concurrency": 1, "batch_size": 1,
               "stable": True, "matmul_before_gflops": 16.6, "matmul_after_gflops": 13.5, "matmul_best_gflops": 16.6}
    assert disturbances({"results": [*local, starved], "config": {"stability": 0.1},
                         "matmul": {"samples_gflops": [203, 200, 201]}})[0].startswith(
        "the machine ran slower while triton:cnn_torchscript c1@1 was measured")
    rows[1].update(matmul_before_gflops=140, matmul_after_gflops=150)
    assert disturbances(merged)[0].startswith("the machine ran slower while triton:cnn_torchscript c1@1 was measured (the "
                                              "fp32 matmul rate before and after each more than 10 % under its bench's "
                                              "best, 170 GFLOP/s, or one")


def test_speedup_vs_fp32_is_the_fp32_twin_never_the_row_itself():
    from cnnpack.bench import speedups

    def row(runtime, fmt, precision, p50, bs=1):
        return {"runtime": runtime, "format": fmt, "precision": precision, "latency_ms_p50": p50, "batch_size": bs}

    rows = [row("eager", "checkpoint", "fp32", 2.0), row("openvino", "openvino", "fp32", 1.0),
            row("openvino-bf16", "openvino", "bf16", 0.5), row("openvino", "openvino_int8", "int8", 0.25),
            row("onnxruntime", "onnx_int8", "int8", 0.4)]  # no fp32 onnx row: no ratio, not one against itself
    speedups(rows)
    assert [r["speedup_vs_fp32"] for r in rows] == [None, None, 2.0, 4.0, None]
    assert [r["speedup_vs_eager"] for r in rows] == [1.0, 2.0, 4.0, 8.0, 5.0]


def test_a_bench_the_pipeline_marked_failed_keeps_its_rows_and_the_report_says_it_failed(benched, exported, tmp_path):
    """The pipeline marks a bench that failed `failed` over the rows of the bench before: the report printed
    "`None` on None" and an empty table, and the next bench dropped the served rows without a word."""
    from cnnpack.report import write_report
    from cnnpack.rundir import Run

    run = tmp_path / "run"
    shutil.copytree(exported, run)
    served = {"runtime": "triton", "format": "triton:cnn_onnx", "artifact": "triton:cnn_onnx", "precision": "fp32",
              "batch_size": 1, "concurrency": 1, "protocol": "http", "latency_ms_p50": 1.0, "latency_ms_p99": 1.5,
              "throughput_ips": 1000.0, "gflops": 1.0, "speedup_vs_eager": None, "speedup_vs_fp32": None,
              "matmul_share": 0.0, "matmul_gflops": 1.0}
    Run.open(run).update(lambda m: (m["stages"]["bench"]["results"].append(served),
                                    m["stages"]["bench"].update(status="failed", error="boom")))
    write_report(run)
    md = (run / "report.md").read_text()
    assert "**The last bench failed** (boom); the rows below are of the bench before it." in md
    assert "`None` on None" not in md
    section = bench(run, BenchConfig(runtimes=("eager",), batch_sizes=(1,), threads=1, max_seconds=0.1,
                                     warmup_s=0.05, plot=False))
    assert section["status"] == "ok" and [r["runtime"] for r in section["results"]].count("triton") == 1


def test_served_rows_kept_by_a_later_local_bench_are_compared_with_its_eager(benched, exported, tmp_path):
    """A served row (planted as `bench --triton-url` leaves it) stays through a local bench, its x eager taken
    against that bench's eager at its batch size (it kept the ratio, or None, of the bench before)."""
    from cnnpack.rundir import Run

    run = tmp_path / "run"
    shutil.copytree(exported, run)
    served = {"runtime": "triton", "format": "onnx", "artifact": "triton:cnn_onnx", "precision": "fp32",
              "batch_size": 1, "concurrency": 1, "protocol": "http", "latency_ms_p50": 1.0, "latency_ms_p99": 1.5,
              "throughput_ips": 1000.0, "gflops": 1.0, "speedup_vs_eager": 123.0, "speedup_vs_fp32": None, "matmul_share": 0.0, "matmul_gflops": 1.0}
    int8 = {**served, "artifact": "triton:cnn_onnx_int8", "format": "onnx_int8", "precision": "int8", "gflops": 4.0}
    int8_ceiling = None

    def plant(m):
        nonlocal int8_ceiling
        ceilings = m["stages"]["bench"]["ceilings"]
        int8_ceiling = {**ceilings["fp32"], "gflops": 800.0, "best": "onnxruntime MatMulInteger u8s8 n=1024"}
        m["stages"]["bench"]["results"] += [served, int8]
        ceilings["int8"] = int8_ceiling

    Run.open(run).update(plant)
    section = bench(run, BenchConfig(runtimes=("eager",), batch_sizes=(1,), threads=1, max_seconds=0.1,
                                     warmup_s=0.05, plot=False))
    eager = next(r for r in section["results"] if r["runtime"] == "eager")
    kept = next(r for r in section["results"] if r["artifact"] == "triton:cnn_onnx")
    assert kept["speedup_vs_eager"] == pytest.approx(eager["latency_ms_p50"] / 1.0)
    assert kept["matmul_gflops"] == section["ceilings"]["fp32"]["gflops"]
    # an fp32 bench measures no int8 ceiling: the kept int8 row stays held to the one it was measured against
    kept8 = next(r for r in section["results"] if r["artifact"] == "triton:cnn_onnx_int8")
    assert kept8["matmul_gflops"] == 800.0 and section["ceilings"]["int8"] == int8_ceiling


def test_a_served_bench_keeps_the_higher_of_each_ceiling_it_and_the_recorded_section_have():
    """The section on disk may have been raised by a local bench during the load, this bench's by its own matmul
    samples: each precision keeps the higher, and every row is held to it."""
    from types import SimpleNamespace

    from cnnpack.bench_served import ServedConfig, _merge_served

    def ceiling(gflops):
        return {"gflops": gflops, "engine": "torch", "kernel": "matmul"}

    def row(runtime, precision, gflops, **served):
        return {"runtime": runtime, "format": served.get("format", "onnx"), "precision": precision, "batch_size": 1,
                "gflops": gflops, "latency_ms_p50": 1.0, "throughput_ips": 100.0, "matmul_share": 0.0, **served}

    rt = SimpleNamespace(format="triton:cnn_onnx", client=SimpleNamespace(url="http://127.0.0.1:8000",
                                                                          address="127.0.0.1:8000"),
                         model=SimpleNamespace(describe=lambda: {"name": "cnn_onnx"}))
    old = {"device": "cpu", "machine_peak_gflops": 100.0, "ceilings": {"fp32": ceiling(100.0), "int8": ceiling(400.0)},
           "results": [row("onnxruntime", "fp32", 50.0)]}
    new = {"device": "cpu", "machine_peak_gflops": 130.0, "ceilings": {"fp32": ceiling(130.0), "int8": ceiling(300.0)},
           "machine": {}, "config": {}, "libraries": {},
           "results": [row("triton", "fp32", 65.0, format="triton:cnn_onnx", concurrency=1, protocol="http")]}
    merged = _merge_served(old, new, rt, ServedConfig(url="127.0.0.1:8000", model="cnn_onnx", protocol="http"))
    assert {p: c["gflops"] for p, c in merged["ceilings"].items()} == {"fp32": 130.0, "int8": 400.0}
    assert merged["machine_peak_gflops"] == 130.0
    assert [r["matmul_share"] for r in merged["results"]] == [50.0 / 130.0, 65.0 / 130.0]


def test_the_precision_table_marks_figures_from_doubtful_rows_and_names_what_was_not_benched(tmp_path):
    """The Precisions section put an unstable row's figure and ratios against a slowed baseline beside the others
    unmarked, and left a pt2 row of dashes unexplained."""
    from cnnpack.precision import precision_table
    from cnnpack.report import _precision
    from cnnpack.report_render import to_markdown
    from cnnpack.rundir import Run

    def row(runtime, fmt, precision, bs, ips, **kw):
        return {"runtime": runtime, "format": fmt, "precision": precision, "batch_size": bs, "throughput_ips": ips,
                "latency_ms_p50": 1000 * bs / ips, "stable": True, "cpu_others": 0.0, **kw}

    stages = {"export": {"artifacts": {"onnx": {"precision": "fp32"}, "onnx_int8": {"precision": "int8"},
                                       "pt2": {"precision": "fp32"}}},
              "verify": {"formats": {f: {"accuracy": 0.9, "passed": True} for f in ("onnx", "onnx_int8", "pt2")}},
              "bench": {"results": [row("onnxruntime", "onnx", "fp32", 1, 1000), row("onnxruntime", "onnx", "fp32", 32, 2000),
                                    row("onnxruntime", "onnx_int8", "int8", 1, 3000, stable=False),
                                    row("onnxruntime", "onnx_int8", "int8", 32, 6000)]}}
    got = {r["artifact"]: r["doubtful"] for r in precision_table(stages)}
    assert got == {"onnx": [], "onnx_int8": ["latency_ms_p50_b1"], "pt2": []}
    stages["bench"]["results"][1]["cpu_others"] = 0.3  # the fp32 baseline at 32, disturbed: every ratio to it
    got = {r["artifact"]: r["doubtful"] for r in precision_table(stages)}
    assert got["onnx"] == ["images_per_s", "speedup_vs_fp32"] and got["onnx_int8"] == ["latency_ms_p50_b1", "speedup_vs_fp32"]
    md = to_markdown("r", _precision({"stages": stages}, Run(tmp_path)))
    assert "| onnx_int8 | onnxruntime | int8 |" in md and "| 0.333 † | 6,000 | 3.00× † |" in md
    assert "| pt2 | aoti | fp32 | – | 90.00% | +0.00 | – | – | – |" in md  # no dagger on a dash
    assert "Not benchmarked: pt2 in aoti (`cnnpack bench --run " in md and "--runtimes onnxruntime,aoti`" in md


def test_served_rows_of_both_protocols_are_told_apart():
    """One model loaded over gRPC and then HTTP: two rows of one name in bench.csv (no protocol column), the table and
    the plot, which drew one bar for both."""
    from cnnpack.bench_outputs import CSV_COLUMNS, series

    row = {"runtime": "triton", "format": "triton:cnn_onnx_int8", "concurrency": 2, "batch_size": 1}
    assert series({**row, "protocol": "grpc"}) == "triton:cnn_onnx_int8 grpc c2"
    assert series({**row, "protocol": "http"}) == series(row) == "triton:cnn_onnx_int8 c2"  # (the default's name)
    assert "protocol" in CSV_COLUMNS
