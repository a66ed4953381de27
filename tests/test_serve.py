"""cnnpack serve: the real tritonserver of the nvidia-pytriton wheel over a hand-made repository.

The repository is laid out by hand as DESIGN.md §5 fixes it (config.pbtxt printed from a
`ModelConfig` with protobuf text_format): a tiny conv net taking raw 0-255 pixels, once as ONNX
(`input` -> `logits`, platform onnxruntime_onnx) and once as TorchScript (`INPUT__0` -> `OUTPUT__0`,
platform pytorch_libtorch). The wheel has no native ONNX Runtime or libtorch backend, so both are
served by cnnpack's Python-based backends. One server is shared by the module (a start takes a few
seconds); the fault tests start their own.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from support import assert_gone, need_triton

from cnnpack.errors import MissingStageError, StageFailed, UserInputError

pytestmark = pytest.mark.triton

torch = pytest.importorskip("torch")
serve = pytest.importorskip("cnnpack.serve")

CLASSES = ["circle", "square", "triangle"]
MAX_BATCH = 8
MODELS = {  # name: (platform, file, input, output)
    "tiny_onnx": ("onnxruntime_onnx", "model.onnx", "input", "logits"),
    "tiny_torchscript": ("pytorch_libtorch", "model.pt", "INPUT__0", "OUTPUT__0"),
}


class TinyNet(torch.nn.Module):
    """Raw RGB 0-255 (N, 3, 32, 32) -> logits (N, 3); scaling and mean/std inside, as exports are."""

    def __init__(self):
        super().__init__()
        self.register_buffer("mean", torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.25, 0.2, 0.3]).view(1, 3, 1, 1))
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(8, len(CLASSES))

    def forward(self, x):
        x = (x / 255.0 - self.mean) / self.std
        return self.head(torch.relu(self.conv(x)).mean(dim=(2, 3)))  # (N, 8) -> (N, classes)


def write_config(folder: Path, name: str, platform: str, inp: str, out: str, *, queue_delay_us: int = 20000):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb

    mc = pb.ModelConfig(name=name, platform=platform, max_batch_size=MAX_BATCH)
    mc.input.add(name=inp, data_type=pb.TYPE_FP32, format=pb.ModelInput.FORMAT_NCHW, dims=[3, 32, 32])
    mc.output.add(name=out, data_type=pb.TYPE_FP32, dims=[len(CLASSES)], label_filename="labels.txt")
    mc.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    mc.instance_group.add(kind=pb.ModelInstanceGroup.KIND_CPU, count=1)
    intra, inter = ("intra_op_thread_count", "inter_op_thread_count") if platform.startswith("onnx") else \
        ("INTRA_OP_THREAD_COUNT", "INTER_OP_THREAD_COUNT")
    mc.parameters[intra].string_value = "1"
    mc.parameters[inter].string_value = "1"
    (folder / "config.pbtxt").write_text(text_format.MessageToString(mc, use_short_repeated_primitives=True))
    (folder / "labels.txt").write_text("\n".join(CLASSES) + "\n")


def add_model(repo: Path, name: str, net: torch.nn.Module) -> None:
    platform, file, inp, out = MODELS[name]
    (repo / name / "1").mkdir(parents=True)
    example = torch.rand(2, 3, 32, 32) * 255
    if file == "model.onnx":
        torch.onnx.export(net, (example,), str(repo / name / "1" / file), input_names=[inp], output_names=[out],
                          dynamic_axes={inp: {0: "N"}, out: {0: "N"}}, opset_version=17, dynamo=False)
    else:
        torch.jit.trace(net, example).save(str(repo / name / "1" / file))
    write_config(repo / name, name, platform, inp, out)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture(scope="module")
def server(tmp_path_factory, net):
    need_triton()
    repo = tmp_path_factory.mktemp("serve") / "model_repository"
    for name in MODELS:
        add_model(repo, name, net)
    srv = serve.TritonServer(serve.ServeConfig(repository=str(repo)))
    with srv:
        yield srv
    assert_gone(srv.pid)


def pixels(n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).random((n, 3, 32, 32)) * 255).astype(np.float32)  # raw 0-255


def eager(net, x: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(x)).numpy()


def infer(server, protocol: str, model: str, x: np.ndarray, class_count: int = 0) -> np.ndarray:
    import tritonclient.grpc as grpc
    import tritonclient.http as http

    _, _, inp, out = MODELS[model]
    lib, url = (http, server.http_address) if protocol == "http" else (grpc, server.grpc_address)
    client = lib.InferenceServerClient(url)
    tensor = lib.InferInput(inp, list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    result = client.infer(model, [tensor], outputs=[lib.InferRequestedOutput(out, class_count=class_count)])
    return result.as_numpy(out)


@pytest.fixture(scope="module")
def small_repo(tmp_path_factory, net) -> Path:
    repo = tmp_path_factory.mktemp("small") / "model_repository"
    add_model(repo, "tiny_onnx", net)
    return repo


def test_a_server_killed_at_its_stop_leaves_no_shared_memory(small_repo):
    """Its Python-based backends' regions stayed in /dev/shm (memory) for good: 449 of them, 451 MB, on the build
    machine after many test sessions."""
    need_triton()
    import mmap
    import uuid

    srv = serve.TritonServer(serve.ServeConfig(repository=str(small_repo))).start()
    pid = srv.pid
    # a region a backend makes after the stop listed the server's (a Ctrl-C of tune's while a model loads: 3 of 3
    # leaked), and another server's, mapped: only the first is the stop's to remove
    late, other = (Path(f"{serve.SHM_PREFIX}cnnpacktest_shm_region_{uuid.uuid4()}") for _ in range(2))
    for region in (late, other):
        region.write_bytes(b"\0" * 4096)
    try:
        with open(other, "r+b") as f, mmap.mmap(f.fileno(), 4096) as held:
            try:
                regions = srv._shm_regions()
                assert regions and all(r.exists() for r in regions), regions
            finally:
                srv.stop(grace_s=0)  # no time to stop in order: killed, as a hung one is
            assert_gone(pid)
            assert not [r for r in regions if r.exists()]
            assert not late.exists() and other.exists() and held[0] == 0
    finally:
        for region in (late, other):
            region.unlink(missing_ok=True)


def test_a_ctrl_c_stops_the_server_at_once_whatever_connection_is_open(small_repo):
    """A client's keep-alive connection held Triton in its exit timeout (20 s, nothing said) after a Ctrl-C in the
    served stage."""
    import socket
    import time

    need_triton()
    srv = serve.TritonServer(serve.ServeConfig(repository=str(small_repo))).start()
    pid, (host, port) = srv.pid, srv.http_address.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as conn:
        conn.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
        assert b"200 OK" in conn.recv(4096)
        t0 = time.monotonic()
        srv.__exit__(KeyboardInterrupt, KeyboardInterrupt(), None)
        took = time.monotonic() - t0
    assert_gone(pid)
    assert took < serve.INTERRUPTED_GRACE_S + 3, f"{took:.1f} s"


def test_a_killed_serve_s_scratch_folder_is_removed_by_the_next_one(tmp_path, monkeypatch):
    """SIGKILL of `cnnpack serve` (or of a pipeline in its served stage) left /tmp/cnnpack-serve-*/ for good, and its
    server's shared memory in /dev/shm."""
    import tempfile

    from cnnpack.atomic import owner_tag

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = owner_tag().split("_")[0]
    old, fresh, live = (tmp_path / f"{serve.SCRATCH_PREFIX}{host}_{pid}_{n}" for pid, n in
                        ((dead.pid, "old"), (dead.pid, "fresh"), (os.getppid(), "live")))
    import uuid

    from cnnpack import serve_leftovers

    regions, victim = {}, tmp_path / "not-shared-memory"
    victim.write_text("a file the list must not reach")
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked" / "victim").write_text("nor one through a linked folder")
    link = Path(f"{serve.SHM_PREFIX}cnnpacktest_{uuid.uuid4().hex}")
    link.symlink_to(tmp_path / "linked")
    for folder in (old, fresh, live):
        (folder / "backends").mkdir(parents=True)
        regions[folder] = Path(f"{serve.SHM_PREFIX}cnnpacktest_shm_region_{uuid.uuid4()}")  # its killed server's
        regions[folder].write_bytes(b"\0" * 64)
        tampered = [victim, f"{serve.SHM_PREFIX}x/../..{victim}", link / "victim"]  # (planted by another user)
        (folder / serve.SHM_LIST).write_text("\n".join(map(str, [regions[folder], *tampered])) + "\n")
    for folder in (old, live):
        os.utime(folder, (time.time() - 7200, time.time() - 7200))
    try:
        serve_leftovers.remove_dead_scratch()
        assert not old.exists() and fresh.exists() and live.exists()  # a fresh one's server may still be stopping
        assert not regions[old].exists() and regions[fresh].exists() and regions[live].exists()
        assert victim.exists() and (tmp_path / "linked" / "victim").exists()
    finally:
        link.unlink()
        for region in regions.values():
            region.unlink(missing_ok=True)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("model", list(MODELS))
def test_served_logits_equal_eager(server, net, model, protocol):
    x = pixels(5, seed=1)
    np.testing.assert_allclose(infer(server, protocol, model, x), eager(net, x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("model", list(MODELS))
def test_classification_extension_returns_score_index_label(server, net, model, protocol):
    x = pixels(3, seed=2)
    top = infer(server, protocol, model, x, class_count=2)  # (3, 2) of b"score:index:label"
    logits = eager(net, x)
    for row, ref in zip(top, logits):
        fields = [s.decode().split(":") for s in row]
        expected = np.argsort(-ref)[:2]
        assert [int(f[1]) for f in fields] == list(expected)
        assert [f[2] for f in fields] == [CLASSES[i] for i in expected]
        np.testing.assert_allclose([float(f[0]) for f in fields], ref[expected], atol=1e-4)


@pytest.mark.parametrize("model", list(MODELS))
def test_concurrent_requests_are_batched_and_split_back(server, net, model):
    """8 single-image requests at once: the dynamic batcher hands them to one execute call."""
    stats_before = _batch_counts(server, model)
    images = [pixels(1, seed=10 + i) for i in range(MAX_BATCH)]
    with ThreadPoolExecutor(MAX_BATCH) as pool:
        served = list(pool.map(lambda x: infer(server, "http", model, x), images))
    for x, y in zip(images, served):  # each request got its own row back
        np.testing.assert_allclose(y, eager(net, x), atol=1e-4, rtol=0)
    deadline = time.monotonic() + 1  # Triton counts a batch after its responses have left: allow it that moment
    while not _merged(stats_before, after := _batch_counts(server, model)) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _merged(stats_before, after), after


def _merged(before: dict[int, int], after: dict[int, int]) -> bool:
    return any(size > 1 and after[size] > before.get(size, 0) for size in after)


def _batch_counts(server, model) -> dict[int, int]:
    import tritonclient.http as http

    stats = http.InferenceServerClient(server.http_address).get_inference_statistics(model)
    return {int(b["batch_size"]): int(b["compute_infer"]["count"])
            for b in stats["model_stats"][0].get("batch_stats", [])}


def test_server_reports_which_backend_serves_each_model(server):
    by_name = {m.name: m for m in server.models}
    assert set(by_name) == set(MODELS)
    assert all(m.state == "READY" for m in by_name.values())
    assert by_name["tiny_onnx"].backend == "onnxruntime"
    assert "Python-based onnxruntime" in by_name["tiny_onnx"].served_by
    assert by_name["tiny_torchscript"].backend == "pytorch"
    assert "Python-based pytorch" in by_name["tiny_torchscript"].served_by
    assert server.version.startswith("2.")


def test_start_up_time_and_peak_memory_of_the_server_and_its_stubs_are_measured(server):
    """What `cnnpack deploy` sizes a pod from (recorded by the pipeline's served stage)."""
    import os

    assert 0 < server.load_s < server.cfg.ready_timeout_s
    peak = server.peak_rss_bytes()
    with open(f"/proc/{server.pid}/status") as f:  # the server's own peak, without its Python backend stubs
        own = int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) * 1024
    stubs = [p for p in os.listdir("/proc") if p.isdigit() and p != str(server.pid) and _pgid(int(p)) == server.pid]
    assert stubs and peak > own > 0  # the two models' stubs are in the sum
    server_cpu, stubs_cpu = server.cpu_seconds()  # what the served-load benchmark charges the server per request
    assert server_cpu > 0 and stubs_cpu > 0  # both started Python or loaded models: neither is idle from birth


def _pgid(pid: int) -> int | None:
    import os

    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def test_port_in_use_is_a_user_error(server, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = serve.ServeConfig(repository=server.cfg.repository, http_port=port)
        with pytest.raises(UserInputError, match=f"port {port}"):
            serve.TritonServer(cfg).start()
    with pytest.raises(UserInputError, match="already in use"):  # the shared server holds its own ports
        serve.TritonServer(serve.ServeConfig(repository=server.cfg.repository, grpc_port=server.ports.grpc)).start()


def test_a_server_that_loses_the_race_for_its_ports_says_so_not_that_it_serves(server, monkeypatch):
    """Two servers started at once on the same ports both pass the check that the ports are free; the one that
    cannot bind said it served every model (the other answered its readiness check), then exited."""
    monkeypatch.setattr(serve, "resolve_ports", lambda cfg: server.ports)  # as if checked a moment before
    loser = serve.TritonServer(serve.ServeConfig(repository=server.cfg.repository, ready_timeout_s=60))
    with pytest.raises(UserInputError, match=r"Triton could not listen: failed to start .* already in use"):
        loser.start()
    assert_gone(loser.pid)


def test_free_ports_another_process_took_before_triton_bound_them_are_chosen_again_once(server, monkeypatch):
    """free_ports binds, releases, and Triton binds them later: a connection may take one between."""
    real, calls = serve.resolve_ports, []

    def racing(cfg):
        calls.append(cfg)
        return server.ports if len(calls) == 1 else real(cfg)  # the first choice taken meanwhile

    monkeypatch.setattr(serve, "resolve_ports", racing)
    with serve.TritonServer(serve.ServeConfig(repository=server.cfg.repository, ready_timeout_s=60)) as srv:
        assert len(calls) == 2 and srv.ports != server.ports
        assert srv.models and all(m.state == "READY" for m in srv.models)
    assert_gone(srv.pid)


def test_a_repository_under_a_folder_with_a_space_is_served(server, tmp_path, net):
    """The Python backend's stub takes the model's path on a command line split at spaces: every model of a
    repository under `My Projects` died loading ("stol" in the log) and the start waited out its timeout."""
    repo = tmp_path / "My Projects" / "model repository"
    add_model(repo, "tiny_onnx", net)
    with serve.TritonServer(serve.ServeConfig(repository=str(repo), ready_timeout_s=60)) as srv:
        x = pixels(2, seed=3)
        np.testing.assert_allclose(infer(srv, "http", "tiny_onnx", x), eager(net, x), atol=1e-4)
    assert_gone(srv.pid)


def test_model_that_fails_to_load_gives_tritons_error_and_stops(server, tmp_path, net):
    repo = tmp_path / "repo"
    add_model(repo, "tiny_onnx", net)
    (repo / "tiny_onnx" / "1" / "model.onnx").write_bytes(b"not an onnx file")
    srv = serve.TritonServer(serve.ServeConfig(repository=str(repo)))
    with pytest.raises(StageFailed, match=r"tiny_onnx.*(?i:protobuf)"):
        srv.start()
    assert srv.pid is not None
    assert_gone(srv.pid)


def test_an_ensemble_its_step_refuses_gives_the_repository_managers_reason(server, tmp_path, net):
    """Triton leaves out an ensemble whose batch size its step cannot take (a model laid out again with a smaller
    --max-batch-size) and says why only in its log, as its repository manager's error."""
    repo = tmp_path / "repo"
    add_model(repo, "tiny_onnx", net)
    ens = repo / "tiny_image"
    (ens / "1").mkdir(parents=True)
    (ens / "config.pbtxt").write_text(f"""name: "tiny_image"
platform: "ensemble"
max_batch_size: {2 * MAX_BATCH}
input [{{ name: "IMAGE" data_type: TYPE_FP32 dims: [3, 32, 32] }}]
output [{{ name: "LOGITS" data_type: TYPE_FP32 dims: [{len(CLASSES)}] }}]
ensemble_scheduling {{ step [{{ model_name: "tiny_onnx" model_version: -1
  input_map {{ key: "input" value: "IMAGE" }} output_map {{ key: "logits" value: "LOGITS" }} }}] }}
""")
    srv = serve.TritonServer(serve.ServeConfig(repository=str(repo), ready_timeout_s=60))
    with pytest.raises(StageFailed, match=rf"'tiny_image': Invalid argument: ensemble tiny_image allows maximum batch "
                                          rf"size {2 * MAX_BATCH}, but it contains model tiny_onnx"):
        srv.start()
    assert_gone(srv.pid)


def test_a_config_triton_cannot_parse_is_its_error_not_a_server_ready_without_the_model(server, tmp_path, net):
    repo = tmp_path / "repo"
    add_model(repo, "tiny_onnx", net)
    (repo / "tiny_onnx" / "config.pbtxt").write_text("garbage {{{\n")  # Triton leaves the folder out, then says ready
    srv = serve.TritonServer(serve.ServeConfig(repository=str(repo), ready_timeout_s=60))
    with pytest.raises(StageFailed, match=r"could not load 1 model\(s\).*'tiny_onnx': failed to read text proto"):
        srv.start()
    assert_gone(srv.pid)
    shutil.rmtree(repo / "tiny_onnx")
    add_model(repo, "tiny_onnx", net)
    shutil.rmtree(repo / "tiny_onnx" / "1")  # a config without a version: never listed, the server never ready
    srv = serve.TritonServer(serve.ServeConfig(repository=str(repo), ready_timeout_s=60))
    t0 = time.monotonic()
    with pytest.raises(StageFailed, match=r"'tiny_onnx': at least one version must be available"):
        srv.start()
    assert time.monotonic() - t0 < 30  # said at once, not after the timeout


def test_a_host_name_is_served_on_its_address(server, tmp_path, net):
    """`--host localhost` bound Triton's HTTP to 255.255.255.255 and waited out the start's timeout."""
    srv = serve.TritonServer(serve.ServeConfig(repository=server.cfg.repository, host="localhost", ready_timeout_s=60))
    with srv:
        assert srv.cfg.host == "127.0.0.1" and srv.http_address.startswith("127.0.0.1:")
        x = pixels(2, seed=4)
        np.testing.assert_allclose(infer(srv, "http", "tiny_onnx", x), eager(net, x), atol=1e-4)
    assert_gone(srv.pid)


@pytest.mark.parametrize("cfg, message", [
    (dict(host="999.1.1.1"), "cannot listen on 999.1.1.1: "),
    (dict(host="192.0.2.1", http_port=18000), "cannot listen on 192.0.2.1:18000 for http: "),  # no interface's
    (dict(host="::1"), "--host ::1: the local Triton server binds IPv4 addresses only; use 127.0.0.1"),
    (dict(ready_timeout_s=-5), "--ready-timeout must be a number of seconds > 0, got -5"),
    (dict(ready_timeout_s=float("nan")), "--ready-timeout must be a number of seconds > 0, got nan"),
])
def test_an_address_or_timeout_it_cannot_use_is_refused_before_starting(server, cfg, message):
    srv = serve.TritonServer(serve.ServeConfig(repository=server.cfg.repository, **cfg))
    with pytest.raises(UserInputError, match=re.escape(message)):
        srv.start()
    assert srv.pid is None


def test_a_hangup_stops_it_in_order_and_an_existing_log_is_appended_to(server, tmp_path):
    """SIGHUP (the terminal closed) killed `cnnpack serve` without its orderly stop and left its temporary folder;
    --log emptied an existing file and made missing folders from the root down."""
    log = tmp_path / "triton.log"
    log.write_text("IMPORTANT: an earlier line of the user's\n")
    base = [sys.executable, "-m", "cnnpack", "serve", "--repository", server.cfg.repository, "--http-port", "0",
            "--grpc-port", "0", "--metrics-port", "0"]
    for where, says in ((tmp_path / "no" / "such" / "t.log", "no folder"), (tmp_path / "cnnpack.json", "manifest")):
        out = subprocess.run([*base, "--log", str(where)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and says in out.stderr and not (tmp_path / "no").exists(), out.stderr
    proc = subprocess.Popen([*base, "--log", str(log)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))  # (a CI runner's nohup)
    try:
        lines = [proc.stdout.readline() for _ in range(4 + len(MODELS))]
    finally:
        proc.send_signal(signal.SIGHUP)
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    pid = int("".join(lines).split("(pid ")[1].split(")")[0])
    assert_gone(pid)
    text = log.read_text()
    assert text.startswith("IMPORTANT: an earlier line") and "successfully loaded 'tiny_onnx'" in text


def test_cli_serves_until_sigterm(server, tmp_path):
    """`cnnpack serve` prints the URLs and backends, and SIGTERM stops it (and only its server) cleanly."""
    log = tmp_path / "triton.log"
    cmd = [sys.executable, "-m", "cnnpack", "serve", "--repository", server.cfg.repository, "--http-port", "0",
           "--grpc-port", "0", "--metrics-port", "0", "--log", str(log)]
    import socket
    import time

    proc, conn = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), None
    try:
        lines = [proc.stdout.readline() for _ in range(4 + len(MODELS))]
        host, port = "".join(lines).split("http://")[1].split()[0].rsplit(":", 1)
        # a client's keep-alive connection held Triton in its exit timeout: 20 s of "stopping Triton ..."
        conn = socket.create_connection((host, int(port)))
        conn.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
        assert b"200 OK" in conn.recv(4096)
    finally:
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - t0
        if conn is not None:
            conn.close()
    text = "".join(lines)
    assert proc.returncode == 0, err
    assert took < serve.INTERRUPTED_GRACE_S + 4, f"{took:.1f} s"
    assert "http://127.0.0.1:" in text and "grpc://127.0.0.1:" in text
    assert "tiny_onnx" in text and "Python-based onnxruntime" in text
    pid = int(text.split("(pid ")[1].split(")")[0])
    assert_gone(pid)
    served_log = log.read_text()
    assert "successfully loaded 'tiny_torchscript'" in served_log
    # the thread counts of config.pbtxt reached the runtimes
    assert "intra_op_threads=1, inter_op_threads=1" in served_log
    assert "model.pt on cpu, 1 threads" in served_log
    assert server.models  # the shared server was untouched
    assert infer(server, "http", "tiny_onnx", pixels(1, seed=3)).shape == (1, len(CLASSES))


def test_without_the_wheel_the_error_gives_the_ngc_docker_line(tmp_path):
    """A Python that cannot see nvidia-pytriton (here: no site-packages at all) gets the container command."""
    package_root = Path(serve.__file__).resolve().parents[1]
    code = ("import sys; sys.path = [p for p in sys.path if 'site-packages' not in p]; "
            "from cnnpack.serve import locate; locate()")
    (tmp_path / "model_repository" / "m").mkdir(parents=True)  # a repository it cannot read without protobuf
    (tmp_path / "model_repository" / "m" / "config.pbtxt").write_text('name: "m"')
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(package_root)})
    assert "RuntimeUnavailable" in proc.stderr and "nvidia-pytriton" in proc.stderr
    assert ("docker run --rm -p8000:8000 -p8001:8001 -p8002:8002 -v $PWD/model_repository:/models "
            "nvcr.io/nvidia/tritonserver:24.10-py3 tritonserver --model-repository=/models") in proc.stderr


def test_run_names_its_repository(tmp_path):
    from cnnpack.rundir import Run

    run = Run.create(tmp_path / "run", {"arch": "cnn", "num_classes": 3, "classes": CLASSES, "image_size": 32})
    with pytest.raises(MissingStageError, match="cnnpack triton"):
        serve.repository_of(run.path)
    run.set_stage("triton", {"status": "ok", "repository": str(tmp_path / "repo"), "name": "tiny_onnx",
                             "version": 1, "format": "onnx"})
    assert serve.repository_of(run.path) == str(tmp_path / "repo")


def test_a_folder_triton_cannot_read_as_a_repository_is_refused_before_starting(tmp_path):
    """Triton would log the stray folder and wait as if loading (180 s to a misleading timeout): refuse up front."""
    from cnnpack.rundir import Run

    run = Run.create(tmp_path / "run", {"arch": "cnn", "num_classes": 3, "classes": CLASSES, "image_size": 32})
    (run.path / "export").mkdir()
    run.set_stage("triton", {"status": "ok", "repository": str(run.path / "model_repository"), "name": "tiny_onnx",
                             "version": 1, "format": "onnx"})
    laid_out = re.escape(str(run.path / "model_repository"))
    with pytest.raises(UserInputError, match=f"export holds no config.pbtxt .* serve its repository, {laid_out}"):
        serve.TritonServer(serve.ServeConfig(repository=str(run.path)))._check_repository()
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    (tmp_path / "imgs" / "b").mkdir()
    with pytest.raises(UserInputError, match="a, b hold no config.pbtxt and no version folder; pass the folder"):
        serve.TritonServer(serve.ServeConfig(repository=str(tmp_path / "imgs")))._check_repository()
    (tmp_path / "imgs" / "a" / "config.pbtxt").write_text('backend: "onnxruntime"')
    (tmp_path / "imgs" / "b" / "1").mkdir()  # a version folder: Triton may auto-complete its config
    assert serve.TritonServer(serve.ServeConfig(repository=str(tmp_path / "imgs")))._check_repository()
