"""pt2: torch.export + AOTInductor packages, the aoti runtime, Triton's torch_aoti models, the NGC release choice.

One package is compiled per module (AOTInductor's C++ compile is the cost: 20-50 s on 2 cores) from
the session's 32 px tiny run and shared read-only by the slow tests; the quick ones need no package.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from google.protobuf import text_format
from support import matches_golden, need_triton
from tritonclient.grpc import model_config_pb2

from cnnpack.errors import StageFailed, UserInputError
from cnnpack.export import EXPORTERS, ExportConfig, export
from cnnpack.rundir import Run, sha256
from cnnpack.spec import ModelSpec

MAX_BATCH = 8
CLI = [sys.executable, "-m", "cnnpack"]


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=env, timeout=600)


def _one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip() and not ln.startswith("export: ")]  # progress
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def pt2_run(tiny_run, tmp_path_factory) -> Path:
    """The tiny run with its pt2 package (batch 1..8) and the fp32 ONNX file; read-only."""
    run = tmp_path_factory.mktemp("pt2") / "run"
    shutil.copytree(tiny_run, run)
    export(run, ExportConfig(formats=("onnx", "pt2"), max_batch_size=MAX_BATCH))
    return run


@pytest.fixture
def run_copy(pt2_run, tmp_path) -> Path:
    dest = tmp_path / "run"
    shutil.copytree(pt2_run, dest)
    return dest


# -- quick: no package needed ---------------------------------------------------------------------------
@pytest.mark.parametrize("env", [{"CXX": "/nonexistent/g++"}, {"PATH": "/nonexistent-bin"},
                                 {"CXX": ""}])  # set but empty: inductor took "" (exit 1 and its own error)
def test_no_compiler_is_one_line_and_the_other_formats_are_written(tiny_run, tmp_path, env):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    child = {k: v for k, v in os.environ.items() if k != "CXX"} | env
    proc = _cli("export", "--run", str(run), "--format", "torchscript,pt2", env=child)
    what = {"/nonexistent/g++": "CXX=/nonexistent/g++ is not an executable", "": "CXX is set but empty (unset it)",
            None: "g++ is not on PATH and CXX is not set"}[env.get("CXX")]
    _one_error_line(proc, "--format pt2 needs a C++ compiler", what, "apt-get install g++", "set CXX",
                    "written: export/model.pt (torchscript)")
    arts = Run.open(run).read()["stages"]["export"]["artifacts"]
    assert set(arts) == {"torchscript"} and arts["torchscript"]["sha256"] == sha256(run / "export/model.pt")
    assert not (run / "export/model.pt2").exists()
    assert "--format torchscript" in (run / "export/reproduce.sh").read_text()
    assert not [p for p in (run / "export").iterdir() if p.name.startswith(".")]  # no temp file left


@pytest.mark.cxx
def test_a_compiler_that_writes_nothing_is_named_not_inductors_index_error(monkeypatch):
    """CXX=/bin/true answers --version and exits 0 on every compile: the export failed with "AOTInductor could not
    compile the exported model: IndexError: list index out of range". compile_package's failure path now probes the
    compiler and says what it did; a working one passes the probe."""
    from cnnpack.pt2 import compiler_fails

    assert compiler_fails() is None  # g++ is here
    true = shutil.which("true")
    monkeypatch.setenv("CXX", true)
    assert compiler_fails() == f"{true} -c probe.cpp exited 0 but wrote no object file"
    monkeypatch.setenv("CXX", f"{shutil.which('g++')} -Werror=nonexistent-warning-flag")
    assert " -c probe.cpp exited 1 (" in compiler_fails()


def test_the_package_is_compiled_and_checked_under_a_name_ending_in_pt2(tiny_run, tmp_path, monkeypatch):
    """torch's pt2 loader warns ("Unable to load package. f must be ... a file ending in .pt2", a TODO to make it an
    error) of the `.tmp` name the package was checked under before it was put in place."""
    import cnnpack.pt2

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    seen = []

    def record(model, x, dest, **kwargs):
        seen.append(Path(dest))
        raise StageFailed("stopped by the test")

    monkeypatch.setattr(cnnpack.pt2, "export_pt2", record)
    with pytest.raises(StageFailed, match="stopped by the test"):
        export(run, ExportConfig(formats=("pt2",)))
    assert seen[0].name.endswith(".pt2") and seen[0].name.startswith(".model.pt2.") and seen[0].parent == run / "export"
    assert not seen[0].exists()  # the scratch file is removed after a failure


@pytest.mark.cxx
def test_the_pipeline_takes_pt2_where_a_compiler_is_found(monkeypatch):
    from cnnpack.pipeline import PipelineConfig

    assert PipelineConfig().with_pt2().pt2 == "no"  # opt-in: the main job's 150 s (README)
    on = PipelineConfig(pt2="auto").with_pt2()  # g++ is here
    assert on.pt2 == "yes" and "pt2" in on.formats and "aoti" in on.runtimes()
    assert PipelineConfig(pt2="no").with_pt2().formats == ("onnx", "torchscript")
    if importlib.util.find_spec("openvino"):  # with OpenVINO on too, aoti was left out of the bench
        both = PipelineConfig(pt2="yes", openvino="yes").with_openvino().with_pt2()
        assert {"aoti", "openvino", "onnxruntime"} <= set(both.runtimes())
        picked = PipelineConfig(pt2="yes", openvino="yes", bench_runtimes=("eager",)).with_openvino().with_pt2()
        assert picked.runtimes() == ("eager",) and {"pt2", "openvino"} <= set(picked.formats)  # --runtimes: as listed
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    off = PipelineConfig(pt2="auto").with_pt2()
    assert off.pt2 == "no" and "pt2" not in off.formats and "aoti" not in off.runtimes()
    for cfg in (PipelineConfig(pt2="yes"), PipelineConfig(formats=("onnx", "pt2"))):
        with pytest.raises(UserInputError, match="needs a C.. compiler.*CXX=/nonexistent/g.. is not an executable"):
            cfg.with_pt2()


class Branchy(torch.nn.Module):
    """Data-dependent control flow: TorchScript's trace takes one branch, torch.export refuses."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Conv2d(3, 2, 1), torch.nn.Conv2d(3, 2, 1)

    def forward(self, x):
        if x.mean() > 100:
            return self.a(x).mean((2, 3))
        return self.b(x).mean((2, 3))


@pytest.mark.cxx
def test_a_model_torch_export_cannot_capture_names_the_construct(tmp_path):
    spec = ModelSpec(arch="branchy", num_classes=2, classes=("a", "b"), image_size=8)
    with pytest.raises(UserInputError, match=r"torch.export cannot capture this model: Could not guard on "
                                             r"data-dependent expression .* at `if x.mean\(\) > 100:` "
                                             r"\(test_pt2.py:\d+ in forward\)"):
        EXPORTERS.get("pt2")(Branchy().eval(), spec, ExportConfig(formats=("pt2",)), tmp_path / "model.pt2")
    assert not (tmp_path / "model.pt2").exists()


def test_the_torch_aoti_config_matches_its_golden_file():
    """What `cnnpack triton --format pt2 --threads 2 --warmup` writes (tests/assets/config_pt2_cpu.pbtxt)."""
    from cnnpack.triton_repo import ModelIO, Tensor, TritonConfig, classifier_config, render

    io = ModelIO(Tensor("INPUT__0", "float32", (-1, 3, 32, 32)), Tensor("OUTPUT__0", "float32", (-1, 3)), 16, "raw")
    got = render(classifier_config("classifier", io, TritonConfig(format="pt2", threads=2, warmup=True)))
    golden = Path(__file__).parent / "assets" / "config_pt2_cpu.pbtxt"
    matches_golden(got, golden)
    mc = text_format.Parse(got, model_config_pb2.ModelConfig())
    assert (mc.backend, mc.platform, mc.default_model_filename) == ("pytorch", "torch_aoti", "model.pt2")
    assert mc.parameters["INTRA_OP_THREAD_COUNT"].string_value == "2"


def _configs(tmp_path: Path, platforms: dict[str, tuple[str, str]]) -> Path:
    """A repository of bare configs: name -> (platform, backend)."""
    pb = model_config_pb2
    for name, (platform, backend) in platforms.items():
        (tmp_path / "repo" / name / "1").mkdir(parents=True)
        mc = pb.ModelConfig(name=name, platform=platform, backend=backend, max_batch_size=4)
        (tmp_path / "repo" / name / "config.pbtxt").write_text(text_format.MessageToString(mc))
    return tmp_path / "repo"


def test_the_ngc_release_serves_every_model_of_the_repository(tmp_path):
    from cnnpack.triton_dist import docker_line, ngc_image

    plain = _configs(tmp_path / "a", {"m_onnx": ("onnxruntime_onnx", ""), "m_ts": ("pytorch_libtorch", ""),
                                      "m_ov": ("", "openvino")})
    assert ngc_image(plain) == "nvcr.io/nvidia/tritonserver:24.10-py3"
    with_pt2 = _configs(tmp_path / "b", {"m_onnx": ("onnxruntime_onnx", ""), "m_pt2": ("torch_aoti", "pytorch")})
    assert ngc_image(with_pt2) == "nvcr.io/nvidia/tritonserver:26.06-py3"
    assert "tritonserver:26.06-py3 tritonserver --model-repository=/models" in docker_line(with_pt2)
    assert ngc_image(tmp_path / "missing") == "nvcr.io/nvidia/tritonserver:24.10-py3"


def test_the_local_copy_differs_only_in_the_platform_line(tmp_path):
    from cnnpack.triton_release import local_repository, read_configs

    repo = _configs(tmp_path, {"m_onnx": ("onnxruntime_onnx", ""), "m_pt2": ("torch_aoti", "pytorch")})
    (repo / "m_pt2" / "1" / "model.pt2").write_bytes(b"package")
    assert local_repository(_configs(tmp_path / "plain", {"x": ("onnxruntime_onnx", "")}),
                            tmp_path / "unused") == tmp_path / "plain" / "repo"
    local = local_repository(repo, tmp_path / "local")
    ours, theirs = read_configs(local)["m_pt2"], read_configs(repo)["m_pt2"]
    assert ours.platform == "" and theirs.platform == "torch_aoti"
    theirs.ClearField("platform")
    assert ours == theirs
    assert (local / "m_pt2" / "1" / "model.pt2").resolve() == (repo / "m_pt2" / "1" / "model.pt2").resolve()
    assert (local / "m_onnx").resolve() == (repo / "m_onnx").resolve()
    assert "torch_aoti" in (repo / "m_pt2" / "config.pbtxt").read_text()  # the repository itself is untouched


@pytest.mark.parametrize("child, says", [
    ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "crashed PyTorch's loader (SIGSEGV, torch "),
    ("raise RuntimeError('PytorchStreamReader failed reading zip archive')", "failed to load: RuntimeError: Pytorch"),
    ("import sys; print('loaded'); print('(2, 5) True'); sys.exit(3)",
     "answers (2, 5) True (shape, finite), expected finite logits"),
    ("import os; os.kill(os.getpid(), 40)", "crashed PyTorch's loader (signal 40, torch "),
])
def test_a_package_checked_in_a_child_says_how_it_failed(monkeypatch, tmp_path, child, says):
    """A CUDA package is loaded and run once in a fresh process (on an H200, torch 2.11's loader crashed the export
    itself with SIGSEGV): a crash, a load error and a wrong answer are each the stage's one line."""
    from cnnpack import pt2

    monkeypatch.setattr(pt2, "_CHILD_CHECK", child)
    with pytest.raises(StageFailed) as e:
        pt2._check_in_child(tmp_path / "model.pt2", torch.zeros(2, 3, 32, 32), 6, "cuda")
    assert says in str(e.value) and str(e.value).endswith("in a fresh process; not recorded"), str(e.value)


# -- the shared package ------------------------------------------------------------------------------------
@pytest.mark.slow
def test_the_manifest_and_the_package_carry_the_model_spec(pt2_run):
    from cnnpack import pt2

    rec = Run.open(pt2_run).read()["stages"]["export"]["artifacts"]["pt2"]
    spec = Run.open(pt2_run).model_spec
    assert rec["path"] == "export/model.pt2" and rec["sha256"] == sha256(pt2_run / rec["path"])
    assert rec["precision"] == "fp32" and rec["device"] == "cpu" and rec["torch_version"] == torch.__version__
    assert rec["compile_s"] > 0 and rec["max_batch_size"] == MAX_BATCH
    assert rec["input"] == {"name": "INPUT__0", "dtype": "float32", "shape": [-1, 3, 32, 32]}
    assert rec["output"] == {"name": "OUTPUT__0", "dtype": "float32", "shape": [-1, 6]}
    inside = pt2.package_metadata(pt2_run / rec["path"])  # read from the zip, without torch
    loaded = pt2.load(pt2_run / rec["path"], "cpu").get_metadata()  # what the C++ loader's get_metadata() gives
    for meta in (inside, loaded):
        assert json.loads(meta["classes"]) == spec["classes"] and meta["image_size"] == "32"
        assert meta["precision"] == "fp32" and meta["cnnpack_version"] and meta["max_batch_size"] == str(MAX_BATCH)


@pytest.mark.slow
def test_a_package_that_loads_in_a_fresh_process_passes_the_child_check(pt2_run):
    from cnnpack import pt2

    pt2._check_in_child(pt2_run / "export" / "model.pt2", torch.rand(2, 3, 32, 32) * 255, 6, "cpu")  # raises if not


@pytest.mark.slow
def test_verify_holds_pt2_to_the_fp32_contract(run_copy):
    proc = _cli("verify", "--run", str(run_copy), "--formats", "pt2", "--batch-sizes", "1,5,8", "--json")
    assert proc.returncode == 0, proc.stderr
    (r,) = json.loads(proc.stdout)["results"]
    assert r["runtime"] == "aoti" and r["precision"] == "fp32" and r["passed"]
    assert r["tensor"]["max_abs_err"] <= 1e-4 and r["task"]["top1_agreement"] == 1.0
    assert set(r["tensor"]["max_abs_err_by_input"]) == {"random_b1", "random_b5", "random_b8", "val"}


@pytest.mark.slow
def test_evaluate_and_bench_run_the_package(run_copy):
    from cnnpack.bench import BenchConfig, bench
    from cnnpack.evaluate import evaluate

    assert evaluate(run_copy, fmt="pt2")["accuracy"] == evaluate(run_copy, fmt="checkpoint")["accuracy"]
    section = bench(run_copy, BenchConfig(runtimes=("eager", "aoti"), batch_sizes=(1, 4), max_seconds=0.3,
                                          warmup_s=0.05, matmul_n=256, matmul_s=0.05, plot=False))
    rows = {(r["runtime"], r["batch_size"]): r for r in section["results"]}
    assert set(rows) == {("eager", 1), ("eager", 4), ("aoti", 1), ("aoti", 4)}
    assert rows[("aoti", 4)]["artifact"] == "pt2" and rows[("aoti", 4)]["speedup_vs_eager"] > 0


@pytest.mark.slow
def test_a_batch_above_the_exported_maximum_is_refused(run_copy):
    from cnnpack.runtimes import load_runtime

    rt = load_runtime(Run.open(run_copy), "aoti")
    with pytest.raises(UserInputError, match=r"a batch of 9 is outside 1..8.*re-export with --max-batch-size 9"):
        rt.predict(np.zeros((9, 3, 32, 32), np.float32))
    with pytest.raises(UserInputError, match=r"takes \(N, 3, 32, 32\)"):
        rt.predict(np.zeros((2, 3, 31, 32), np.float32))
    _one_error_line(_cli("verify", "--run", str(run_copy), "--formats", "pt2", "--batch-sizes", "16"),
                    "exceeds the max batch size 8")
    _one_error_line(_cli("bench", "--run", str(run_copy), "--runtimes", "aoti", "--batch-sizes", "16"),
                    "exceeds the max batch size 8")


@pytest.mark.slow
def test_the_packages_own_input_checks_accept_the_exported_batch_range(pt2_run):
    """With AOTI_RUNTIME_CHECK_INPUTS=1 (what the README tells a caller of the package to run with) the package
    refused batch 1 (inductor's lower bound of 2), and for the default CNN at 64 px also 16..64 (a guard taken on
    the example batch): the checks now take 1..max, which the record says."""
    from cnnpack import pt2

    path = pt2_run / "export" / "model.pt2"
    assert Run.open(pt2_run).read()["stages"]["export"]["artifacts"]["pt2"]["extra"]["checked_batch"] == [0, MAX_BATCH]
    assert pt2.checked_batch(path) == (0, MAX_BATCH)  # no lower bound checked (inductor's was 2)
    code = ("import sys, torch\nm = torch._inductor.aoti_load_package(sys.argv[1])\n"
            "for n in (1, int(sys.argv[2]), int(sys.argv[2]) + 1):\n"
            "    try:\n        m(torch.rand(n, 3, 32, 32) * 255); print(n, 'ran')\n"
            "    except RuntimeError as e:\n        print(n, 'refused', str(e).splitlines()[0])\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path), str(MAX_BATCH)], capture_output=True, text=True,
                          env={**os.environ, "AOTI_RUNTIME_CHECK_INPUTS": "1"}, timeout=300)
    lines = [ln for ln in proc.stdout.splitlines() if ln[:1].isdigit()]
    assert lines[:2] == ["1 ran", f"{MAX_BATCH} ran"], proc.stdout + proc.stderr[-2000:]
    # (torch 2.14 names the bound in the error's first line; 2.11 says only "run_func_( ... ) API call failed")
    assert lines[2].startswith(f"{MAX_BATCH + 1} refused") and (f"<= {MAX_BATCH}" in lines[2]
                                                                or "API call failed" in lines[2]), lines[2]


@pytest.mark.slow
def test_an_unchanged_package_is_kept_not_compiled_again_into_new_bytes(run_copy, tmp_path, monkeypatch):
    """A compile gives new bytes every time (kernel names, a serialization id): export compiled the same model
    again, and `cnnpack triton` laid it out as version 2."""
    from cnnpack.export import _same_pt2
    from cnnpack.triton_repo import TritonConfig, build

    rec = Run.open(run_copy).read()["stages"]["export"]["artifacts"]["pt2"]
    repo = str(tmp_path / "repo")
    assert build(run_copy, TritonConfig(repository=repo, format="pt2"))["version"] == 1
    proc = _cli("export", "--run", str(run_copy), "--format", "pt2", "--max-batch-size", str(MAX_BATCH))
    assert proc.returncode == 0 and "export/model.pt2 kept: compiled from the same checkpoint" in proc.stderr
    assert "(kept: unchanged)" in proc.stdout  # not the first compile's seconds
    assert Run.open(run_copy).read()["stages"]["export"]["artifacts"]["pt2"] == rec  # the same bytes, the same record
    assert build(run_copy, TritonConfig(repository=repo, format="pt2"))["version"] == 1
    cfg = ExportConfig(formats=("pt2",), max_batch_size=MAX_BATCH)
    dest, source = run_copy / rec["path"], rec["checkpoint_sha256"]
    assert _same_pt2(Run.open(run_copy), cfg, source, dest) == rec
    assert _same_pt2(Run.open(run_copy), ExportConfig(formats=("pt2",), max_batch_size=MAX_BATCH + 1), source, dest) is None
    assert _same_pt2(Run.open(run_copy), cfg, "0" * 64, dest) is None  # another checkpoint
    import torch._inductor.codecache as codecache

    real = codecache.get_device_information
    other = "AVX512" if real("cpu").get("AOTI_CPU_ISA") == "AVX2" else "AVX2"  # (on an AVX2 host, AVX2 was this one)
    monkeypatch.setattr(codecache, "get_device_information", lambda d: {**real(d), "AOTI_CPU_ISA": other})
    assert _same_pt2(Run.open(run_copy), cfg, source, dest) is None  # compiled for another CPU's instruction set
    monkeypatch.undo()
    assert _same_pt2(Run.open(run_copy), cfg, source, dest) == rec
    dest.write_bytes(dest.read_bytes()[:-1])
    assert _same_pt2(Run.open(run_copy), cfg, source, dest) is None  # a damaged file is compiled again


def test_a_static_batch_package_refuses_any_other_batch():
    """A static package read past the end of a smaller batch (logits near 1e35) or failed to broadcast a larger one:
    the runtime refuses both before they run."""
    from cnnpack.pt2 import AotiRuntime

    ran = []
    rt = AotiRuntime(lambda x: ran.append(x) or torch.zeros(len(x), 6), "cpu", (3, 32, 32), 4, False, "model.pt2",
                     static=True)
    for n in (1, 2, 5):
        with pytest.raises(UserInputError, match=rf"exactly 4 \(--static-batch\), got {n}"):
            rt.predict(np.zeros((n, 3, 32, 32), np.float32))
    assert rt.predict(np.zeros((4, 3, 32, 32), np.float32)).shape == (4, 6) and len(ran) == 1


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "swapped"])
def test_a_damaged_package_is_refused_by_its_sha256_before_loading(run_copy, damage):
    pkg = run_copy / "export/model.pt2"
    if damage == "truncated":
        pkg.write_bytes(pkg.read_bytes()[: pkg.stat().st_size // 2])
    else:  # another valid zip in its place
        shutil.copyfile(run_copy / "export/model.onnx", pkg)
    for args in (("verify", "--formats", "pt2"), ("evaluate", "--format", "pt2"),
                 ("triton", "--format", "pt2", "--repository", str(run_copy / "repo"))):
        _one_error_line(_cli(args[0], "--run", str(run_copy), *args[1:]), "model.pt2 changed since export",
                        "sha256 differs")
    assert not (run_copy / "repo").exists()


@pytest.mark.slow
def test_triton_lays_out_a_torch_aoti_model(run_copy, tmp_path):
    from cnnpack.triton_repo import TritonConfig, build

    repo = tmp_path / "repo"
    section = build(run_copy, TritonConfig(repository=str(repo), format="pt2", warmup=True))
    folder = repo / section["name"]
    mc = text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (mc.backend, mc.platform, mc.default_model_filename) == ("pytorch", "torch_aoti", "model.pt2")
    assert [i.name for i in mc.input] == ["INPUT__0"] and [o.name for o in mc.output] == ["OUTPUT__0"]
    assert mc.max_batch_size == MAX_BATCH and mc.HasField("dynamic_batching") and list(mc.input[0].dims) == [3, 32, 32]
    assert mc.output[0].label_filename == "labels.txt" and mc.instance_group[0].kind == mc.instance_group[0].KIND_CPU
    assert sha256(folder / "1" / "model.pt2") == sha256(run_copy / "export/model.pt2")
    with pytest.raises(UserInputError, match=r"is compiled for cpu and runs only there: use --device cpu, or re-export "
                                             rf"it with `cnnpack export --run {re.escape(str(run_copy))} --format pt2 "
                                             r"--device cuda`$"):
        build(run_copy, TritonConfig(repository=str(tmp_path / "gpu"), format="pt2", device="gpu"))


@pytest.mark.slow
@pytest.mark.triton
def test_the_served_package_passes_verify_and_the_repository_stays_as_ngc_reads_it(run_copy, tmp_path):
    need_triton()
    from cnnpack.serve import ServeConfig, TritonServer
    from cnnpack.triton_dist import ngc_image
    from cnnpack.triton_repo import TritonConfig, build

    repo = tmp_path / "repo"
    build(run_copy, TritonConfig(repository=str(repo), format="pt2", ensemble=True))
    files = lambda: {p: p.read_bytes() for p in repo.rglob("*") if p.is_file() and "__pycache__" not in p.parts}  # noqa: E731
    before = files()
    with TritonServer(ServeConfig(repository=str(repo))) as server:
        served = {m.name: m for m in server.models}
        assert served["cnn_pt2"].state == "READY" and "pytorch" in served["cnn_pt2"].served_by
        proc = _cli("verify", "--run", str(run_copy), "--formats", "pt2", "--triton-url", server.grpc_address,
                    "--protocol", "grpc", "--model", "cnn_pt2", "--json")
    assert proc.returncode == 0, proc.stderr
    (r,) = [r for r in json.loads(proc.stdout)["results"] if r["runtime"] == "triton"]
    assert r["format"] == "triton:cnn_pt2" and r["passed"] and r["tensor"]["max_abs_err"] <= 1e-4
    assert r["task"]["top1_agreement"] == 1.0
    assert files() == before  # the Python backend's own bytecode cache aside
    assert ngc_image(repo) == "nvcr.io/nvidia/tritonserver:26.06-py3"


@pytest.mark.slow
def test_the_report_names_the_release_and_says_torchscript_is_deprecated(run_copy, tmp_path):
    from cnnpack.report import write_report
    from cnnpack.triton_repo import TritonConfig, build

    export(run_copy, ExportConfig(formats=("torchscript",), max_batch_size=MAX_BATCH))
    build(run_copy, TritonConfig(repository=str(tmp_path / "repo"), format="pt2"))
    text = Path(write_report(run_copy)["markdown"]).read_text()
    assert "pt2: torch.export + AOTInductor package compiled for cpu" in text
    assert "**torchscript**: TorchScript (torch.jit) is deprecated upstream" in text
    assert "nvcr.io/nvidia/tritonserver:26.06-py3" in text and "batched since 26.06" in text


def test_deploy_says_which_cpus_and_torch_the_shipped_package_needs(run_copy, tmp_path):
    """A pt2 package runs only on CPUs with the ISA it was compiled for and under a torch not older: the deployment
    had no word of it (no nodeSelector, no note), and a pod on an AVX2 node never got ready."""
    from cnnpack.deploy import plan as plans
    from cnnpack.triton_repo import TritonConfig, build
    from cnnpack.verify import VerifyConfig, verify

    verify(run_copy, VerifyConfig(formats=("pt2",), batch_sizes=(1,)))
    build(run_copy, TritonConfig(repository=str(tmp_path / "repo"), format="pt2"))
    rec = json.loads((run_copy / "cnnpack.json").read_text())["stages"]["export"]["artifacts"]["pt2"]
    (note,) = [n for n in plans.make(run_copy).notes if "pt2 package" in n]
    assert f"cnn_pt2 is a pt2 package compiled for CPUs with {rec['extra']['cpu_isa']} by torch {rec['torch_version']}" in note
