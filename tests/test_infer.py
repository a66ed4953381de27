"""cnnpack infer, the triton runtime, verify/bench of a served model: a real Triton server, no mocks.

The repository is laid out by `cnnpack triton` from the tiny trained run, exported to ONNX and
TorchScript: `cnn_onnx` (+ its image ensemble `cnn_onnx_image`), `cnn_torchscript` and
`cnn_onnx_nobatch` (the ONNX model without the dynamic batcher). One server is shared by the
module; the fault tests start their own and kill it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from support import assert_gone, forked_cli, need_triton

from cnnpack.client import Client, address
from cnnpack.errors import StageFailed, UserInputError
from cnnpack.ports import free_ports

pytestmark = pytest.mark.triton

serve = pytest.importorskip("cnnpack.serve")


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cnnpack", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "150"})


@pytest.fixture(scope="module")
def served_run(tiny_run, tmp_path_factory) -> tuple[Path, Path]:
    """A copy of tiny_run, exported, with a model repository holding every kind of served model."""
    from cnnpack.export import ExportConfig, export
    from cnnpack.triton_repo import TritonConfig, build

    need_triton()
    root = tmp_path_factory.mktemp("infer")
    run_dir, repo = root / "run", root / "model_repository"
    shutil.copytree(tiny_run, run_dir)
    export(run_dir, ExportConfig(max_batch_size=16))
    build(run_dir, TritonConfig(repository=str(repo), format="torchscript", threads=1))
    build(run_dir, TritonConfig(repository=str(repo), name="cnn_onnx_nobatch", dynamic_batching=False, threads=1))
    static = root / "static"  # a static batch of 4: its config has max_batch_size 0, the batch in its dims
    shutil.copytree(tiny_run, static)
    export(static, ExportConfig(formats=("onnx",), static_batch=4))
    build(static, TritonConfig(repository=str(repo), name="cnn_onnx_static4", threads=1))
    build(run_dir, TritonConfig(repository=str(repo), format="onnx", ensemble=True, threads=1,
                                max_queue_delay_us=2000))  # last: the run's triton stage names cnn_onnx
    return run_dir, repo


@pytest.fixture(scope="module")
def server(served_run):
    srv = serve.TritonServer(serve.ServeConfig(repository=str(served_run[1])))
    with srv:
        yield srv
    assert_gone(srv.pid)


@pytest.fixture(scope="module")
def eager(served_run):
    from cnnpack.artifacts import artifact_ref
    from cnnpack.rundir import Run
    from cnnpack.runtimes import load_runtime

    run = Run.open(served_run[0])
    assert artifact_ref(run, "checkpoint").path.is_file()
    return load_runtime(run, "eager")


@pytest.fixture(scope="module")
def val_files(tiny_data) -> list[Path]:
    """Two real validation PNGs per class."""
    return [p for d in sorted((tiny_data / "val").iterdir()) for p in sorted(d.glob("*.png"))[:2]]


def _url(server, protocol: str) -> str:
    return server.http_address if protocol == "http" else server.grpc_address


def _served(server, protocol: str, model: str):
    from cnnpack.runtimes import RUNTIMES, served_ref

    return RUNTIMES.get("triton").load(served_ref(None, _url(server, protocol), model, protocol))


# -- the triton runtime ----------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("model", ["cnn_onnx", "cnn_torchscript"])
def test_served_logits_equal_eager(server, eager, model, protocol):
    rt = _served(server, protocol, model)
    assert rt.model.input_shape == (3, 32, 32) and rt.model.max_batch_size == 16
    x = np.random.default_rng(0).uniform(0, 255, (20, 3, 32, 32)).astype(np.float32)  # > max batch: 2 requests
    np.testing.assert_allclose(rt.predict(x), eager.predict(x), atol=1e-4, rtol=0)


def test_an_ensemble_is_not_a_pixel_runtime_and_a_missing_model_names_the_served_ones(server):
    with pytest.raises(UserInputError, match="encoded image bytes.*--model cnn_onnx"):
        _served(server, "http", "cnn_onnx_image")
    # the classifiers a --model takes; the image ensemble (cnn_onnx_image) and its step were listed as if they did
    with pytest.raises(UserInputError, match=r"serves no model 'nope' \(ready: cnn_onnx, cnn_onnx_nobatch, "
                                             r"cnn_onnx_static4, cnn_torchscript; with --ensemble: cnn_onnx\); pass"):
        _served(server, "grpc", "nope")
    later = Path(server.cfg.repository) / "cnn_later"  # laid out after the server started: not loaded, not "ready"
    shutil.copytree(Path(server.cfg.repository) / "cnn_onnx", later)
    try:
        for protocol in ("http", "grpc"):
            with pytest.raises(UserInputError, match=r"has 'cnn_later' in its repository but has not loaded it "
                                                     r"\(laid out after it started, or not loaded; ready: cnn_onnx, "
                                                     r".*\); load it \(restart `cnnpack serve`, or --load-model "
                                                     r"under explicit model control\)$") as e:
                _served(server, protocol, "cnn_later")
            assert "cnn_later," not in str(e.value) and not str(e.value).endswith("cnn_later")
    finally:
        shutil.rmtree(later)


# -- cnnpack infer ---------------------------------------------------------------------------------
def _eager_labels(eager, files, classes) -> tuple[list[str], np.ndarray]:
    from cnnpack.images import read_image

    logits = eager.predict(np.stack([read_image(f, 32) for f in files]).astype(np.float32))
    return [classes[i] for i in logits.argmax(1)], logits


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_infer_labels_come_from_the_classification_extension(server, eager, val_files, served_run, protocol):
    from cnnpack.infer import InferConfig, infer
    from cnnpack.rundir import Run

    classes = Run.open(served_run[0]).model_spec["classes"]
    result = infer(val_files, InferConfig(model="cnn_onnx", url=_url(server, protocol), protocol=protocol, top_k=2))
    labels, logits = _eager_labels(eager, val_files, classes)
    assert [r["file"] for r in result["results"]] == [str(f) for f in val_files] and not result["skipped"]
    assert [r["top"][0]["label"] for r in result["results"]] == labels
    for r, ref in zip(result["results"], logits):
        best = np.argsort(-ref)[:2]
        assert [t["index"] for t in r["top"]] == list(best)
        np.testing.assert_allclose([t["score"] for t in r["top"]], ref[best], atol=1e-4)


def test_many_images_are_read_sent_and_answered_a_chunk_at_a_time(server, val_files, tmp_path, monkeypatch):
    """A folder of photos was read whole before the first request (2.2 GB for 300 of them) and said nothing until
    the end: now a chunk at a time, each chunk's answers given as they come, the same as in one go."""
    import cnnpack.infer as infer_mod
    from cnnpack.infer import InferConfig, infer

    files = [*val_files[:3], tmp_path / "bad.png", *val_files[3:5]]
    files[3].write_text("not an image")
    cfg = InferConfig(model="cnn_onnx", url=server.http_address, top_k=2)
    whole = infer(files, cfg)
    chunks: list[tuple[int, int]] = []
    monkeypatch.setattr(infer_mod, "CHUNK_FILES", 2)
    parts = infer(files, cfg, on_results=lambda rows, bad: chunks.append((len(rows), len(bad))))
    assert parts == whole and len(whole["results"]) == 5 and len(whole["skipped"]) == 1
    assert chunks == [(2, 0), (1, 1), (2, 0)]


@pytest.mark.parametrize("images", [3, 4, 5])  # a padded batch, a full one, a full one and a padded one
def test_a_static_batch_model_gives_each_image_its_own_top_k(server, eager, val_files, served_run, images):
    """Triton ranks a model without batching as one (4, classes) array: infer printed a flat index of a padding row
    as the label and its logit as the score (exit 0), or crashed reshaping 2 entries into 4 rows."""
    from cnnpack.infer import InferConfig, infer
    from cnnpack.rundir import Run

    files = val_files[:images]
    classes = Run.open(served_run[0]).model_spec["classes"]
    result = infer(files, InferConfig(model="cnn_onnx_static4", url=server.http_address, top_k=2))
    labels, logits = _eager_labels(eager, files, classes)
    assert [r["top"][0]["label"] for r in result["results"]] == labels
    for r, ref in zip(result["results"], logits):
        best = np.argsort(-ref)[:2]
        assert [t["index"] for t in r["top"]] == list(best)
        np.testing.assert_allclose([t["score"] for t in r["top"]], ref[best], atol=1e-4)


def test_ensemble_classifies_png_bytes_like_the_pixel_path(server, eager, val_files, served_run):
    from cnnpack.infer import InferConfig, infer
    from cnnpack.rundir import Run

    classes = Run.open(served_run[0]).model_spec["classes"]
    result = infer(val_files, InferConfig(model="cnn_onnx", url=server.grpc_address, protocol="grpc",
                                          ensemble=True, top_k=1))
    assert result["model"] == "cnn_onnx_image"
    labels, logits = _eager_labels(eager, val_files, classes)
    assert [r["top"][0]["label"] for r in result["results"]] == labels
    np.testing.assert_allclose([r["top"][0]["score"] for r in result["results"]], logits.max(1), atol=1e-3)


def test_an_image_only_the_server_cannot_decode_is_skipped_and_the_others_classified(server, val_files, tmp_path,
                                                                                    monkeypatch):
    """The client decodes each file before sending it; where the server's decoder differs (the NGC container's
    Pillow or libjpeg) and refuses one, the ensemble's preprocessing fails the whole request: the command ended
    with the images of that request unclassified. Here a broken file is let through the client's check."""
    from cnnpack import infer as infer_mod
    from cnnpack.infer import InferConfig, infer

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    checked = infer_mod.read_encoded

    def lets_it_through(paths):
        ok, batch, skipped = checked([p for p in paths if p != bad])
        ok.insert(1, bad)
        return ok, np.insert(batch, 1, np.array([bad.read_bytes()], dtype=np.object_), axis=0), skipped

    monkeypatch.setattr(infer_mod, "read_encoded", lets_it_through)
    sent, classify = [], infer_mod.classify
    monkeypatch.setattr(infer_mod, "classify", lambda c, m, b, k: sent.append(len(b)) or classify(c, m, b, k))
    files = [val_files[0], bad, val_files[1], val_files[2]]
    result = infer(files, InferConfig(model="cnn_onnx", url=server.http_address, top_k=1, ensemble=True))
    assert [r["file"] for r in result["results"]] == [str(val_files[0]), str(val_files[1]), str(val_files[2])]
    assert sent == [4, 1, 1, 1, 1]  # the request the server refused, then its images one at a time
    # requests of at most ENCODED_REQUEST_BYTES each: 64 large PNGs in one passed the --timeout while decoded
    monkeypatch.setattr(infer_mod, "read_encoded", checked)
    sizes = [Path(f).stat().st_size for f in val_files[:3]]
    for budget, requests in ((sizes[0] + sizes[1], [2, 1]), (1, [1, 1, 1])):  # (one image at least, however large)
        sent.clear()
        monkeypatch.setattr(infer_mod, "ENCODED_REQUEST_BYTES", budget)
        again = infer(val_files[:3], InferConfig(model="cnn_onnx", url=server.http_address, top_k=1, ensemble=True))
        assert len(again["results"]) == 3 and sent == requests, (budget, sent)
    assert result["skipped"] == [{"file": str(bad), "reason": "the server could not decode it (UnidentifiedImageError: "
                                                                "cannot identify image file)"}], result["skipped"]


def test_cli_skips_a_bad_image_and_sends_the_others(server, val_files, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    good = [str(val_files[0]), str(val_files[-1])]
    proc = _cli("infer", good[0], str(bad), good[1], "--model", "cnn_onnx", "--url", server.http_address,
                "--top-k", "2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == good and all(len(ln.split()) == 5 for ln in lines)  # file + 2 x (label score)
    assert proc.stderr.strip().splitlines() == [f"skipped {bad}: cannot identify image file"]  # (named once)
    ens = _cli("infer", str(bad), good[0], "--model", "cnn_onnx", "--url", server.grpc_address, "--protocol", "grpc",
               "--ensemble", "--json", "--top-k", "100")
    assert ens.returncode == 0, ens.stderr
    out = json.loads(ens.stdout)
    assert out["top_k"] == len(out["results"][0]["top"]) < 100  # what was given: every class the model has
    assert [r["file"] for r in out["results"]] == [good[0]] and out["skipped"][0]["file"] == str(bad)
    assert out["results"][0]["top"][0]["label"] == lines[0].split()[1]  # same label as the pixel path


def test_a_folder_stands_for_the_image_files_under_it(val_files, tmp_path):
    from cnnpack.errors import UserInputError
    from cnnpack.infer import expand_folders

    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    (photos / ".hidden").mkdir()
    shutil.copy(val_files[0], photos / "b.png")
    shutil.copy(val_files[1], photos / "sub" / "a.JPG")  # suffixes in any case (the bytes are a PNG: read by content)
    shutil.copy(val_files[2], photos / ".hidden" / "c.png")
    (photos / "README.txt").write_text("not an image: left out, not tried and skipped")
    (photos / "scan.pdf").write_bytes(b"%PDF-1.4")  # Pillow writes PDF but cannot read it
    named = tmp_path / "notes.txt"  # a file named on its own is tried whatever its suffix
    named.write_text("hello")
    left: list[Path] = []
    assert expand_folders([photos, named], left) == [photos / "b.png", photos / "sub" / "a.JPG", named]
    assert left == [photos / "README.txt", photos / "scan.pdf"]  # said by infer (training would try them)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="empty is a folder with no image files"):
        expand_folders([tmp_path / "empty"])


def test_a_folder_is_classified_and_the_ensemble_may_be_named_as_served(server, val_files, tmp_path):
    from cnnpack.infer import InferConfig, infer

    photos = tmp_path / "photos"
    photos.mkdir()
    for f in val_files[:2]:
        shutil.copy(f, photos / f.name)
    pixels = infer([photos], InferConfig(model="cnn_onnx", url=server.http_address))
    assert [r["file"] for r in pixels["results"]] == sorted(str(photos / f.name) for f in val_files[:2])
    for name in ("cnn_onnx", "cnn_onnx_image"):  # not `cnn_onnx_image_image`
        ens = infer([photos], InferConfig(model=name, url=server.http_address, ensemble=True))
        assert ens["model"] == "cnn_onnx_image"
        assert [r["top"][0]["label"] for r in ens["results"]] == [r["top"][0]["label"] for r in pixels["results"]]


def test_cli_errors_are_one_line_with_exit_2(server, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("hello")
    none_readable = _cli("infer", str(bad), "--model", "cnn_onnx", "--url", server.http_address)
    assert none_readable.returncode == 2 and "the image could not be read" in none_readable.stderr
    for args, said in ((["--model", "cnn_onnx_preprocess"], "cnn_onnx_preprocess is the image ensemble's preprocessing "
                                                          "step, not a classifier: pass --ensemble --model cnn_onnx"),
                       (["--model", "cnn_onnx_preprocess", "--ensemble"], "cnn_onnx_preprocess is the image "
                        "ensemble's preprocessing step, not a classifier: pass --ensemble --model cnn_onnx"),
                       (["--model", "cnn_torchscript", "--ensemble"], "cnn_torchscript has no image ensemble on this "
                                                                     "server (cnn_torchscript_image is not served)")):
        out = _cli("infer", str(bad), *args, "--url", server.http_address)
        assert out.returncode == 2 and said in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    for protocol, url in (("http", server.http_address), ("grpc", server.grpc_address)):  # a path is no model name
        out = _cli("infer", str(bad), "--model", "../cnn_onnx", "--url", url, "--protocol", protocol)
        assert out.returncode == 2 and "model name '../cnn_onnx' cannot name a model folder" in out.stderr, out.stderr
    if Path("/dev/zero").exists():  # a pipe or a device named as an image: skipped, not read forever
        os.mkfifo(tmp_path / "fifo.png")
        for extra in ([], ["--ensemble"]):
            out = _cli("infer", str(tmp_path / "fifo.png"), "/dev/zero", "--model", "cnn_onnx", *extra, "--url",
                       server.http_address)
            assert out.returncode == 2 and "none of the 2 images could be read" in out.stderr, out.stderr
    port = free_ports("127.0.0.1", 1)[0]
    for protocol in ("http", "grpc"):
        down = _cli("infer", str(bad), "--model", "cnn_onnx", "--url", f"127.0.0.1:{port}", "--protocol", protocol)
        assert down.returncode == 2, down.stderr
        assert down.stderr.startswith(f"error: cannot reach Triton at {protocol}://127.0.0.1:{port}")
        assert len(down.stderr.strip().splitlines()) == 1 and "Traceback" not in down.stderr


def test_an_output_without_a_label_is_named_by_its_index():
    """Triton sends `score:index` for an output its labels.txt has no line for (a hand-shortened file); infer
    printed a traceback ('not enough values to unpack')."""
    from cnnpack.infer import parse_classification

    assert parse_classification([b"0.9:1:star", b"0.05:4", "0.01:5:a:b"]) == [
        {"label": "star", "index": 1, "score": 0.9}, {"label": "4", "index": 4, "score": 0.05},
        {"label": "a:b", "index": 5, "score": 0.01}]


def test_url_forms():
    assert address(None, "http") == "127.0.0.1:8000" and address(None, "grpc") == "127.0.0.1:8001"
    assert address("grpc://example:9001/", "grpc") == "example:9001" and address("[::1]", "http") == "[::1]:8000"
    with pytest.raises(UserInputError, match="is a http URL but --protocol is grpc"):
        address("http://localhost:8000", "grpc")
    with pytest.raises(UserInputError, match="not a number"):
        address("localhost:http", "http")
    for url in ("127.0.0.1:8000#frag", "127.0.0.1:8000/v2", "127.0.0.1:8000?x=1", "127.0.0.1#"):  # not ignored
        with pytest.raises(UserInputError, match=r"is not HOST\[:PORT\] \(e.g. 127.0.0.1:8000\)"):
            address(url, "http")
    for url in ("127.0.0.1:0", "127.0.0.1:", "grpc://127.0.0.1:/"):  # not quietly Triton's default port
        with pytest.raises(UserInputError, match=r"the port is not a number in 1-65535"):
            address(url, "grpc")
    for url in ("http://[::1", "[::bad:8000"):  # an IPv6 host's bracket left open: a traceback from urllib
        with pytest.raises(UserInputError, match=r"not a HOST:PORT address \(Invalid IPv6 URL\); an IPv6 host goes"):
            address(url, "http")
    with pytest.raises(UserInputError, match=r"--timeout must be > 0 and at most 1,000,000 seconds, got 10000000000.0"):
        Client("127.0.0.1:1", "grpc", timeout_s=1e10)  # gRPC's deadline overflowed: "no answer" at once


# -- load, verify, bench ---------------------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_thousand_requests_at_concurrency_16_all_succeed_and_are_batched(server, protocol, monkeypatch):
    import cnnpack.grpc_wire as wire
    from cnnpack.bench import Load
    from cnnpack.client import server_side

    opened, real = [], wire.open_connection

    async def counted(*args, **kwargs):
        opened.append(args)
        return await real(*args, **kwargs)

    monkeypatch.setattr(wire, "open_connection", counted)  # still the real connection: counted, not replaced
    rt = _served(server, protocol, "cnn_onnx")
    before = rt.client.statistics("cnn_onnx")
    x = np.random.default_rng(1).uniform(0, 255, (1, 3, 32, 32)).astype(np.float32)
    with Load(rt.client, rt.model, x, concurrency=16) as load:
        window = load.window(requests=1000)
    seen = server_side(before, rt.client.settled_statistics("cnn_onnx"))
    assert len(window.latencies_s) == 1000
    assert len(opened) == (1 if protocol == "grpc" else 0)  # over gRPC the 16 in flight share one connection
    assert seen["server_requests"] == 1000 and seen["server_failures"] == 0
    assert seen["server_batch_mean"] > 1.5  # the dynamic batcher merged concurrent requests


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_one_request_at_a_time_runs_on_one_blocking_connection_without_the_event_loop(server, protocol, monkeypatch):
    import cnnpack.grpc_wire as wire
    import cnnpack.loadclient as lc
    from cnnpack.client import server_side

    opened, blocking = [], []

    class Counted(lc.Blocking):
        def __init__(self, *args, **kwargs):
            blocking.append(self)
            super().__init__(*args, **kwargs)

    async def refused(*args, **kwargs):
        opened.append(args)
        raise AssertionError("an event-loop connection at concurrency 1")

    monkeypatch.setattr(lc, "Blocking", Counted)
    monkeypatch.setattr(wire, "open_connection", refused)
    rt = _served(server, protocol, "cnn_onnx")
    before = rt.client.statistics("cnn_onnx")
    x = np.random.default_rng(2).uniform(0, 255, (1, 3, 32, 32)).astype(np.float32)
    with lc.Load(rt.client, rt.model, x, concurrency=1) as load:
        load.one()
        window = load.window(requests=200)
        timed = load.window(seconds=0.2)
    seen = server_side(before, rt.client.settled_statistics("cnn_onnx"))
    assert len(window.latencies_s) == 200 and len(timed.latencies_s) >= 1 and timed.wall_s >= 0.2
    assert len(blocking) == 1 and not opened  # one connection for all of them, kept between windows
    assert blocking[0].sock.fileno() == -1  # closed with the load
    assert seen["server_requests"] == 201 + len(timed.latencies_s) and seen["server_failures"] == 0


def test_the_other_protocols_port_is_named_as_such(server):
    """The load defaults to HTTP and a user may still pass gRPC's port (or the reverse): say which it is."""
    with pytest.raises(UserInputError, match=r"not in HTTP: is it Triton's gRPC port\? Pass --protocol grpc"):
        Client(server.grpc_address, "http").check_ready()
    with pytest.raises(UserInputError, match=r"closed the gRPC connection: is it Triton's HTTP port\? Pass --protocol http"):
        Client(server.http_address, "grpc").check_ready()
    metrics = server.http_address.rsplit(":", 1)[0] + f":{server.ports.metrics}"  # answers 200 to /v2/health/ready
    with pytest.raises(UserInputError, match=r"answered, but not as Triton's HTTP API: is it the metrics port, or"):
        Client(metrics, "http").check_ready()
    import http.server
    import threading

    web = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)  # 404 to /v2/...
    threading.Thread(target=web.serve_forever, daemon=True).start()
    try:  # it said "Triton ... is up but not ready (models still loading?)"
        with pytest.raises(UserInputError, match=r"answered, but not as Triton's HTTP API: is it the metrics port, or "
                                                 r"another server\?"):
            Client(f"127.0.0.1:{web.server_address[1]}", "http").check_ready()
    finally:
        web.shutdown()
        web.server_close()


@pytest.mark.parametrize("concurrency", [1, 4])
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_a_request_the_server_rejects_stops_the_load_with_the_servers_reason(server, protocol, concurrency):
    """The load client sends prebuilt bytes and reads only the answer's status: a refusal must still read as one
    (at concurrency 1 on a blocking socket, beyond it through the event loop)."""
    from cnnpack.bench import Load

    rt = _served(server, protocol, "cnn_onnx")
    wrong = np.zeros((1, 3, 17, 17), np.float32)  # the model takes 32 x 32
    with Load(rt.client, rt.model, wrong, concurrency=concurrency) as load, pytest.raises(StageFailed) as err:
        load.window(requests=20)
    message = str(err.value)
    assert message.startswith(f"Triton at {protocol}://{_url(server, protocol)}: request under load to cnn_onnx")
    assert "\n" not in message and "17" in message and "still running" not in message


def test_verify_checks_the_served_model_like_a_file(server, served_run, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(served_run[0], run_dir)
    proc = _cli("verify", "--run", str(run_dir), "--formats", "onnx", "--batch-sizes", "1,8", "--samples", "8",
                "--triton-url", server.grpc_address, "--protocol", "grpc", "--no-progress")  # model: the run's
    assert proc.returncode == 0, proc.stderr + proc.stdout
    result = json.loads((run_dir / "verify.json").read_text())
    served = next(r for r in result["results"] if r["format"] == "triton:cnn_onnx")
    assert served["runtime"] == "triton" and served["passed"] and served["tensor"]["max_abs_err"] <= 1e-4
    assert served["task"]["top1_agreement"] == 1.0
    stage = json.loads((run_dir / "cnnpack.json").read_text())["stages"]["verify"]
    assert stage["passed"] and stage["formats"]["triton:cnn_onnx"]["runtimes"] == ["triton"]


def test_bench_measures_served_throughput_under_concurrency(server, served_run, tmp_path):
    from cnnpack.bench import BenchConfig
    from cnnpack.bench_served import ServedConfig, bench_served

    run_dir = tmp_path / "run"
    shutil.copytree(served_run[0], run_dir)
    cfg = BenchConfig(batch_sizes=(1,), max_seconds=0.4, warmup_s=0.05, matmul_n=256, matmul_s=0.05, plot=False)
    for model in ("cnn_onnx", "cnn_onnx_nobatch"):
        section = bench_served(run_dir, ServedConfig(url=server.grpc_address, model=model, protocol="grpc",
                                                     concurrency=(1, 8), load_generator="cnnpack"), cfg)
    rows = {(r["format"], r["concurrency"]): r for r in section["results"]}
    assert set(rows) == {(f"triton:{m}", c) for m in ("cnn_onnx", "cnn_onnx_nobatch") for c in (1, 8)}
    for r in rows.values():
        assert r["runtime"] == "triton" and r["errors"] == 0 and r["throughput_ips"] > 0 and r["requests"] >= 3
        assert r["latency_ms_p50"] <= r["latency_ms_p99"]
    assert rows[("triton:cnn_onnx", 8)]["server_batch_mean"] > 1.5  # the dynamic batcher merged requests ...
    assert rows[("triton:cnn_onnx_nobatch", 8)]["server_batch_mean"] == 1  # ... and without it, none
    http = bench_served(run_dir, ServedConfig(url=server.http_address, model="cnn_onnx", protocol="http",
                                              concurrency=(4,), load_generator="cnnpack"), cfg)  # joins, replaces none
    assert [(r["format"], r["protocol"], r["concurrency"]) for r in http["results"]][-1] == ("triton:cnn_onnx", "http", 4)
    assert http["replaced"] == [] and section["replaced"] == []  # rows of other models or protocols stay
    on_disk = json.loads((run_dir / "bench.json").read_text())
    assert len(on_disk["results"]) == 5 and set(on_disk["served"]) == {"triton:cnn_onnx", "triton:cnn_onnx_nobatch"}
    assert set(on_disk["served"]["triton:cnn_onnx"]) == {"grpc", "http"}
    assert "concurrency" in (run_dir / "bench.csv").read_text().splitlines()[0]
    from cnnpack.report import write_report

    write_report(run_dir)  # a served bench run by hand (no pipeline served stage) is in the report, every row of it
    md = (run_dir / "report.md").read_text()
    served = md[md.index("## Served by Triton"):]
    assert served.count("| cnn_onnx | gRPC |") == 2 and served.count("| cnn_onnx_nobatch | gRPC |") == 2
    assert served.count("| cnn_onnx | HTTP | 1 | 4 |") == 1 and f"`http://{server.http_address}`" in served
    # the same model and protocol again at another concurrency: the earlier rows go, named (they went unsaid)
    again = bench_served(run_dir, ServedConfig(url=server.grpc_address, model="cnn_onnx", protocol="grpc",
                                               concurrency=(2,), load_generator="cnnpack"), cfg)
    assert again["replaced"] == ["triton:cnn_onnx grpc c1@1", "triton:cnn_onnx grpc c8@1"]
    assert {(r["format"], r.get("protocol"), r["concurrency"]) for r in again["results"]} == {
        ("triton:cnn_onnx", "grpc", 2), ("triton:cnn_onnx", "http", 4), ("triton:cnn_onnx_nobatch", "grpc", 1),
        ("triton:cnn_onnx_nobatch", "grpc", 8)}


def test_served_rows_are_held_to_the_run_s_ceilings_when_the_server_shares_this_machine(server, served_run, tmp_path):
    """After a local bench, a served model on loopback is held to the same ceiling of its precision as the local
    rows (not to the fp32 matmul rate around each row), and one section never holds two ceilings for a precision."""
    from cnnpack.bench import BenchConfig, bench
    from cnnpack.bench_served import ServedConfig, bench_served, on_this_machine
    from cnnpack.rundir import Run

    run_dir = tmp_path / "run"
    shutil.copytree(served_run[0], run_dir)
    cfg = BenchConfig(runtimes=("onnxruntime",), batch_sizes=(1,), threads=1, max_seconds=0.2, warmup_s=0.05,
                      matmul_n=256, matmul_s=0.05, plot=False)
    local = bench(run_dir, cfg)
    assert local["ceilings"]
    raised = local["ceilings"]["fp32"]["gflops"] * 1.5

    def meanwhile(msg):  # a local bench records higher ceilings while the load runs: the section keeps them
        if msg.startswith("triton "):
            Run.open(run_dir).update(lambda m: m["stages"]["bench"]["ceilings"]["fp32"].update(gflops=raised))

    section = bench_served(run_dir, ServedConfig(url=server.grpc_address, model="cnn_onnx", protocol="grpc",
                                                 concurrency=(2,), load_generator="cnnpack"), cfg, progress=meanwhile)
    served = [r for r in section["results"] if r["runtime"] == "triton"]
    assert served and len(section["results"]) == len(local["results"]) + len(served)
    for r in section["results"]:
        limit = (section["ceilings"].get(r["precision"]) or section["ceilings"]["fp32"])["gflops"]
        assert r["matmul_gflops"] == limit and r["matmul_share"] == pytest.approx(r["gflops"] / limit)
    assert section["ceilings"]["fp32"]["gflops"] == raised  # the newer ones, not those read before the load
    assert on_this_machine("127.0.0.1:8001") and on_this_machine("[::1]:8001") and on_this_machine("localhost:8000")
    assert not on_this_machine("10.0.0.5:8001") and not on_this_machine("triton.example:8001")


def test_a_served_model_that_is_not_the_runs_is_refused_before_its_figures_are_recorded(server, served_run, tmp_path):
    """Another run's model of the same name and shapes (random weights): bench --triton-url recorded its figures as
    this run's served model, and the report showed them under this run's repository. Its parity is checked first."""
    import torch

    from cnnpack.bench import BenchConfig
    from cnnpack.bench_served import ServedConfig, bench_served
    from cnnpack.rundir import Run, sha256

    run_dir = tmp_path / "run"
    shutil.copytree(served_run[0], run_dir)
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    torch.manual_seed(1)
    ckpt["state_dict"] = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in ckpt["state_dict"].items()}
    torch.save(ckpt, run_dir / "checkpoint.pt")  # this run now holds other weights than the served model
    Run(run_dir).update(lambda m: m["stages"]["train"]["outputs"]["checkpoint"].update(
        sha256=sha256(run_dir / "checkpoint.pt")))
    before = (run_dir / "cnnpack.json").read_bytes()
    cfg = BenchConfig(batch_sizes=(1,), max_seconds=0.2, matmul_s=0.05, plot=False)
    with pytest.raises(UserInputError, match=r"http://\S+ model cnn_onnx does not compute what .*'s model computes \(.*\): "
                                             r"its figures would be recorded as this run's"):
        bench_served(run_dir, ServedConfig(url=server.http_address, model="cnn_onnx", concurrency=(1,)), cfg)
    assert (run_dir / "cnnpack.json").read_bytes() == before


def test_a_served_int8_model_of_a_run_without_data_is_checked_on_the_images_it_was_quantized_with(tiny_data,
                                                                                                     tmp_path):
    """A run made by `export --arch` records no data: its served int8 model's parity (task parity, on labelled
    images) had none to be checked on, and `bench --triton-url` refused it with "pass --data PATH|shapes", an option
    bench does not have. It is checked on the images `quantize --data` gated it on, and measured."""
    need_triton()
    from cnnpack.bench import BenchConfig
    from cnnpack.bench_served import ServedConfig, bench_served
    from cnnpack.export import ExportConfig, create_run, export
    from cnnpack.quantize import QuantizeConfig, quantize
    from cnnpack.triton_repo import TritonConfig, build

    classes = sorted(p.name for p in (tiny_data / "train").iterdir())
    run_dir, repo = tmp_path / "arch", tmp_path / "model_repository"
    create_run(run_dir, arch="cnn", num_classes=len(classes), image_size=32, classes=classes)  # random weights
    export(run_dir, ExportConfig(formats=("onnx",), max_batch_size=8))
    # random weights leave near-tied logits: a gate any int8 model holds, as benchmarks/openvino_cpu.py sets it
    quantize(run_dir, QuantizeConfig(data=str(tiny_data), max_drop=100, min_agreement=0.01))
    build(run_dir, TritonConfig(repository=str(repo), format="onnx_int8", threads=1))
    cfg = BenchConfig(batch_sizes=(1,), max_seconds=0.2, matmul_s=0.05, plot=False)
    with serve.TritonServer(serve.ServeConfig(repository=str(repo))) as srv:
        section = bench_served(run_dir, ServedConfig(url=srv.http_address, model="cnn_onnx_int8", concurrency=(1,)),
                               cfg)
    rows = [r for r in section["results"] if r["format"] == "triton:cnn_onnx_int8"]
    assert len(rows) == 1 and rows[0]["precision"] == "int8" and rows[0]["throughput_ips"] > 0


def test_a_server_answering_with_another_version_of_the_runs_model_is_refused(server, served_run, tmp_path):
    """The run's `cnnpack triton` added version 2 of cnn_onnx after the server loaded version 1: bench --triton-url
    recorded version 1's figures as the run's (the report put them under "version 2") and verify failed on a bare
    parity error. The run's record is changed by hand here, as a second export and layout would change it."""
    from cnnpack.bench import BenchConfig
    from cnnpack.bench_served import ServedConfig, bench_served
    from cnnpack.rundir import Run
    from cnnpack.verify import served_target

    run_dir = tmp_path / "run"
    shutil.copytree(served_run[0], run_dir)
    Run(run_dir).update(lambda m: m["stages"]["triton"].update(version=2, versions=[1, 2]))
    said = (r"Triton at \S+ answers for cnn_onnx with version 1, but the run's model is version 2 "
            r"of it \(in .+\): the server has not loaded it; restart the server on that repository")
    cfg = BenchConfig(batch_sizes=(1,), max_seconds=0.2, matmul_s=0.05, plot=False)
    with pytest.raises(UserInputError, match=said):
        bench_served(run_dir, ServedConfig(url=server.http_address, model="cnn_onnx", concurrency=(1,)), cfg)
    with pytest.raises(UserInputError, match=said):  # what `cnnpack verify --triton-url` checks first
        served_target(run_dir, server.http_address, "cnn_onnx")
    assert "bench" not in Run.open(run_dir).read()["stages"]


@pytest.mark.skipif(shutil.which("perf_analyzer") is None, reason="perf_analyzer is not on PATH (the tritonclient "
                    "2.41.0 wheel's data/bin/perf_analyzer, with libb64-0d and libcudart.so.12)")
def test_perf_analyzer_measures_a_served_row_and_says_so(server, served_run, tmp_path):
    from cnnpack.bench import BenchConfig
    from cnnpack.bench_served import ServedConfig, bench_served

    run_dir = tmp_path / "run"
    shutil.copytree(served_run[0], run_dir)
    cfg = BenchConfig(batch_sizes=(1, 2), max_seconds=2.0, window_s=0.3, matmul_n=256, matmul_s=0.05, plot=False)
    section = bench_served(run_dir, ServedConfig(url=server.grpc_address, model="cnn_onnx", protocol="grpc",
                                                 concurrency=(4,), load_generator="perf_analyzer"), cfg)
    rows = {r["batch_size"]: r for r in section["results"] if r["runtime"] == "triton"}
    assert set(rows) == {1, 2}
    if fell_back := [r["load_generator"] for r in rows.values() if "reported no figures" in r["load_generator"]]:
        pytest.skip(f"the machine was too busy for perf_analyzer's windows: {fell_back[0]}")  # (said in the row)
    for r in rows.values():
        assert r["load_generator"].startswith("perf_analyzer ") and r["server_failures"] == 0
        assert 0 < r["requests"] <= r["server_requests"] and 0 < r["latency_ms_p50"] <= r["latency_ms_p99"]
        assert r["throughput_ips"] > 0 and r["server_batch_mean"] >= 1
        # its windows' rates, as cnnpack's client gives them: tune judges a point measured again by them
        ips = r["window_throughput_ips"]
        assert len(ips) == 3 and r["windows"] >= 3 and min(ips) <= r["throughput_ips"] <= max(ips), r
    assert "perf_analyzer" in (run_dir / "bench.csv").read_text()


# -- faults ----------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(("protocol", "fault", "concurrency"), [
    pytest.param("grpc", signal.SIGKILL, 16, id="grpc-killed"), pytest.param("http", signal.SIGKILL, 16, id="http-killed"),
    pytest.param("grpc", signal.SIGSTOP, 16, id="grpc-stuck"), pytest.param("http", signal.SIGSTOP, 1, id="http-stuck-c1"),
    pytest.param("grpc", signal.SIGKILL, 1, id="grpc-killed-c1")])
def test_a_server_killed_or_stuck_under_load_is_a_clear_error_within_the_timeout(served_run, tmp_path, protocol,
                                                                                 fault, concurrency):
    from cnnpack.bench import Load
    from cnnpack.triton_repo import TritonConfig, build

    run_dir, repo = tmp_path / "run", tmp_path / "repo"
    shutil.copytree(served_run[0], run_dir)
    build(run_dir, TritonConfig(repository=str(repo), threads=1))
    srv = serve.TritonServer(serve.ServeConfig(repository=str(repo), stop_timeout_s=5)).start()
    hit = {}

    def strike():
        hit["at"] = time.monotonic()
        os.kill(srv.pid, fault)

    try:
        client = Client(_url(srv, protocol), protocol, timeout_s=2)
        model = client.check_ready().model("cnn_onnx")
        with Load(client, model, np.zeros((1, 3, 32, 32), np.float32), concurrency=concurrency) as load:
            threading.Timer(0.5, strike).start()
            with pytest.raises(StageFailed) as err:
                load.window(seconds=60)
            took = time.monotonic() - hit["at"]
    finally:
        os.kill(srv.pid, signal.SIGKILL)  # a stopped server would not see SIGTERM
        srv.stop()
    message = str(err.value)
    assert message.startswith(f"Triton at {protocol}://{_url(srv, protocol)}: request under load to cnn_onnx")
    assert "\n" not in message
    if fault == signal.SIGKILL:
        assert took < 5 and "is the server still running?" in message  # at once, not after the 60 s window
    else:
        # the requests in flight when it stopped were sent up to a moment before: their 2 s end a little sooner
        assert 1 < took < 8 and "no answer within 2 s (--timeout)" in message  # not the 60 s window (a busy host)
    assert_gone(srv.pid)


def _dead_server_errors() -> list[BaseException]:
    """What the transports raise when the server is gone, depending on the moment it died."""
    import errno

    import aiohttp
    import geventhttpclient.response as ghr
    from tritonclient.utils import InferenceServerException

    return [ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
            ConnectionResetError(errno.ECONNRESET, "Connection reset by peer"),
            BrokenPipeError(errno.EPIPE, "Broken pipe"), EOFError(),
            aiohttp.ClientOSError(errno.EPIPE, "Can not write request body for http://127.0.0.1:1/v2/models/m/infer"),
            aiohttp.ClientOSError(errno.ECONNRESET, "Can not write request body for http://127.0.0.1:1/x"),
            aiohttp.ServerDisconnectedError(), aiohttp.ClientPayloadError("Response payload is not completed"),
            ghr.HTTPConnectionClosed("connection closed."),
            InferenceServerException("[StatusCode.UNAVAILABLE] Socket closed", status="StatusCode.UNAVAILABLE"),
            InferenceServerException("failed to connect to all addresses", status="StatusCode.UNAVAILABLE")]


@pytest.mark.parametrize("index", range(11))
def test_every_way_the_transport_fails_when_the_server_is_gone_gives_the_same_message(index):
    e = _dead_server_errors()[index]
    message = str(Client("127.0.0.1:1", "http").failure("request under load to m", e))
    assert message.startswith("Triton at http://127.0.0.1:1: request under load to m failed: ")
    assert message.endswith("; is the server still running? (`cnnpack serve`)") and "\n" not in message


def test_a_rejected_request_is_not_called_a_dead_server():
    from tritonclient.utils import InferenceServerException

    e = InferenceServerException("[request id: <id_unknown>] unexpected shape for input 'input'", status="400")
    message = str(Client("127.0.0.1:1", "http").failure("inference", e))
    assert "unexpected shape" in message and "still running" not in message


def test_a_server_that_drops_the_connection_mid_request_reads_as_gone(tmp_path):
    """A real peer on loopback that closes every connection without reading the request (RST)."""
    import socket
    import struct

    from cnnpack.client import ServedModel

    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(64)
    stop = threading.Event()

    def reset_all():
        srv.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    resetter = threading.Thread(target=reset_all, daemon=True)
    resetter.start()
    try:
        from cnnpack.bench import Load

        client = Client(f"127.0.0.1:{srv.getsockname()[1]}", "http", timeout_s=5)
        model = ServedModel(name="m", platform="onnxruntime_onnx", input="input", input_dtype="FP32",
                            input_shape=(3, 256, 256), output="logits", num_classes=2, max_batch_size=8)
        with Load(client, model, np.zeros((8, 3, 256, 256), np.float32), concurrency=4) as load:
            with pytest.raises(StageFailed) as err:
                load.window(seconds=5)
    finally:
        stop.set()
        resetter.join(timeout=5)  # before the close, so its accept() never sees a closed socket
        srv.close()
    assert "is the server still running?" in str(err.value)


def test_a_load_s_request_on_an_http_connection_closed_since_opens_it_again():
    """loadclient._Http.start writes on its slot's keep-alive connection; closed since, it is opened again."""
    import asyncio
    import contextlib

    from cnnpack.loadclient import _Http, _Then

    async def main():
        accepted = []

        async def answer(reader, writer):
            accepted.append(writer)
            with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):  # until the client closes
                while await reader.readuntil(b"\r\n\r\n"):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")

        srv = await asyncio.start_server(answer, "127.0.0.1", 0)
        wire = _Http("127.0.0.1", srv.sockets[0].getsockname()[1], b"GET / HTTP/1.1\r\n\r\n", 5)
        await wire.ready(2)
        first = wire.conns[0]
        first.close()
        done = asyncio.get_running_loop().create_future()
        wire.start(0, _Then(done.set_result))
        error = await asyncio.wait_for(done, 5)
        await wire.close()
        srv.close()
        return error, first, wire.conns[0], len(accepted)

    error, first, second, accepted = asyncio.run(main())
    assert error is None and second is not first and accepted == 3  # 2 opened by ready, 1 again


# -- class names with spaces, quotes and non-ASCII letters, end to end -------------------------------
@pytest.mark.slow
def test_names_with_spaces_quotes_and_non_ascii_are_served_and_read_back_exactly(tiny_data, tmp_path):
    """Trained from folders so named, served by Triton, read back by a stock-style client that splits
    `score:index:label` on ':' (as Triton's own image_client does)."""
    import tritonclient.grpc as grpcclient

    from cnnpack.export import ExportConfig, export
    from cnnpack.train import TrainConfig, train
    from cnnpack.triton_repo import TritonConfig, build

    odd = ['grand piano', 'say "cheese"', "it's", "café", "日本語 ß", "x,y 100%"]
    originals = sorted(p.name for p in (tiny_data / "train").iterdir())
    assert len(originals) == len(odd)
    rename = dict(zip(originals, odd))
    data = tmp_path / "data"
    for split in ("train", "val"):
        for old, new in rename.items():
            shutil.copytree(tiny_data / split / old, data / split / new)
    run_dir, repo = tmp_path / "run", tmp_path / "repo"
    train(run_dir, TrainConfig(data=str(data), image_size=32, epochs=1, batch_size=32), progress=False)
    export(run_dir, ExportConfig(formats=("onnx",), max_batch_size=8))
    build(run_dir, TritonConfig(repository=str(repo), threads=1))
    classes = json.loads((run_dir / "cnnpack.json").read_text())["model"]["classes"]
    assert sorted(classes) == sorted(rename.values())
    assert (repo / "cnn_onnx" / "labels.txt").read_text(encoding="utf-8").splitlines() == classes
    with serve.TritonServer(serve.ServeConfig(repository=str(repo))) as srv:
        client = grpcclient.InferenceServerClient(srv.grpc_address)
        x = grpcclient.InferInput("input", [1, 3, 32, 32], "FP32")
        x.set_data_from_numpy(np.zeros((1, 3, 32, 32), np.float32))
        out = [grpcclient.InferRequestedOutput("logits", class_count=len(classes))]
        top = client.infer("cnn_onnx", [x], outputs=out).as_numpy("logits")[0]
        client.close()
    read_back = {}
    for entry in top:
        score, index, label = entry.decode("utf-8").split(":")  # more than 3 fields would fail here
        read_back[int(index)] = label
    assert read_back == dict(enumerate(classes))


def test_a_file_name_that_is_not_utf8_is_shown_with_escapes_in_text_and_json(val_files, tmp_path):
    from cnnpack.infer import read_pixels

    good, bad = tmp_path / os.fsdecode(b"caf\xe9.png"), tmp_path / os.fsdecode(b"\xff.png")  # latin-1 names
    shutil.copy(val_files[0], good)
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    ok, batch, skipped = read_pixels([good, bad], 32)
    assert ok == [good] and batch.shape == (1, 3, 32, 32)
    assert skipped[0]["file"] == str(tmp_path / "\\xff.png")
    text = json.dumps(skipped, ensure_ascii=False)
    text.encode("utf-8")  # no lone surrogate: strict readers (and every UTF-8 stream) take it
    assert "\\\\xff.png" in text and not any(0xD800 <= ord(c) <= 0xDFFF for c in text)


# -- infer --run: here, without a server ------------------------------------------------------------------------
def test_infer_here_gives_the_served_shape_with_the_run_s_own_labels(tiny_onnx_run, val_files, tmp_path):
    """Without a server, classifying a few files took `evaluate` and folders of <class>/<images>."""
    from cnnpack.infer import read_pixels
    from cnnpack.infer_local import infer_local
    from cnnpack.rundir import Run
    from cnnpack.runtimes import load_runtime

    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    result = infer_local([*val_files, bad], tiny_onnx_run, top_k=2)
    assert (result["format"], result["runtime"], result["top_k"], result["score"]) == ("onnx", "onnxruntime", 2, "logit")
    assert [r["file"] for r in result["results"]] == [str(f) for f in val_files]
    assert result["skipped"] == [{"file": str(bad), "reason": "cannot identify image file"}]
    run = Run.open(tiny_onnx_run)
    _, pixels, _ = read_pixels(val_files, run.model_spec["image_size"])
    logits = load_runtime(run, "eager").predict(pixels)
    classes = run.model_spec["classes"]
    for r, row in zip(result["results"], logits):
        assert [t["label"] for t in r["top"]] == [classes[i] for i in np.argsort(-row)[:2]]
        assert abs(r["top"][0]["score"] - float(row.max())) < 1e-4
    checkpoint = infer_local(val_files, tiny_onnx_run, fmt="checkpoint", top_k=1)
    assert [r["top"][0]["label"] for r in checkpoint["results"]] == [r["top"][0]["label"] for r in result["results"]]


def test_infer_here_matches_the_served_model(served_run, server, val_files):
    from cnnpack.infer import InferConfig, infer
    from cnnpack.infer_local import infer_local

    here = infer_local(val_files, served_run[0], top_k=3)["results"]
    served = infer(val_files, InferConfig(model="cnn_onnx", url=server.http_address, top_k=3))["results"]
    assert [[t["label"] for t in r["top"]] for r in here] == [[t["label"] for t in r["top"]] for r in served]
    assert max(abs(a["score"] - b["score"]) for x, y in zip(here, served) for a, b in zip(x["top"], y["top"])) < 1e-4


def test_infer_takes_a_server_or_a_run_and_their_own_options(tiny_onnx_run, val_files, tmp_path):
    run, image = str(tiny_onnx_run), str(val_files[0])
    cases = {
        "neither": ([image], "give --model NAME (a served classifier) or --run DIR (classify here, without a server)"),
        "both": ([image, "--model", "cnn_onnx", "--run", run], "--model classifies through a server, --run here: give "
                                                                "one of them"),
        "server-options-here": ([image, "--run", run, "--url", "x:1", "--ensemble"],
                                "--url, --ensemble go with --model (a served classifier)"),
        "format-to-a-server": ([image, "--model", "cnn_onnx", "--format", "onnx"],
                               "--format goes with --run (classifying here)"),
        "no-such-artifact": ([image, "--run", run, "--format", "pt2"], "has no pt2 artifact"),
        "bad-top-k": ([image, "--run", run, "--top-k", "0"], "--top-k must be >= 1, got 0"),
    }
    done = forked_cli({k: ["infer", *args] for k, (args, _) in cases.items()}, tmp=tmp_path)
    for key, (_, said) in cases.items():
        p = done[key]
        assert p.returncode == 2 and p.stdout == "" and said in p.stderr, (key, p.stderr)
        assert p.stderr.startswith("error: ") and len(p.stderr.strip().splitlines()) == 1, (key, p.stderr)
    (tmp_path / "j").mkdir()
    ok = forked_cli({"json": ["infer", image, "--run", run, "--json"]}, tmp=tmp_path / "j")["json"]
    assert ok.returncode == 0 and json.loads(ok.stdout)["results"][0]["file"] == image, ok.stderr


def test_a_name_holding_a_newline_stays_one_line():
    """A file name holding a newline broke infer's one line per image."""
    from cnnpack.infer import shown_name

    assert shown_name("a\nb\r.png") == "a\\nb\\r.png"


def test_json_keeps_what_was_answered_before_a_failure(monkeypatch):
    """`infer --json` of 4,500 images whose server died midway wrote 0 bytes: the hundreds answered were lost (text
    mode had printed them chunk by chunk)."""
    from typer.testing import CliRunner

    import cnnpack.infer_local
    from cnnpack.cli import app
    from cnnpack.errors import StageFailed

    def dies(paths, run, *, on_results, **_):
        on_results([{"file": "a.png", "top": [{"label": "star", "score": 3.0}]}], [{"file": "b", "reason": "empty"}])
        raise StageFailed("Triton at http://127.0.0.1:8000: is the server still running?")

    monkeypatch.setattr(cnnpack.infer_local, "infer_local", dies)
    out = CliRunner().invoke(app, ["infer", "a.png", "--run", "r", "--json"])
    assert out.exit_code == 1
    said = json.loads(out.stdout)
    assert said["complete"] is False and "is the server still running?" in said["error"]
    assert [r["file"] for r in said["results"]] == ["a.png"] and said["skipped"][0]["file"] == "b"


def test_a_reader_that_stops_reading_is_no_failure(tiny_onnx_run, val_files):
    """`cnnpack infer ... | head` exited 1 without a word (typer's answer to the broken pipe): a script with pipefail
    failed. The reader here (`true`) closes the pipe before cnnpack writes its first line."""
    import shlex

    cmd = f"{shlex.quote(sys.executable)} -m cnnpack infer {shlex.quote(str(val_files[0]))} --run {tiny_onnx_run} | true"
    done = subprocess.run(["bash", "-o", "pipefail", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "Error" not in done.stderr and "error:" not in done.stderr, done.stderr


def test_infer_here_says_a_model_of_random_weights_is_one(tmp_path, val_files, caplog):
    from cnnpack.export import create_run
    from cnnpack.infer_local import infer_local

    create_run(tmp_path / "arch", arch="cnn", num_classes=3, image_size=32)
    result = infer_local(val_files[:2], tmp_path / "arch")
    assert result["format"] == "checkpoint" and len(result["results"]) == 2
    assert "model has random weights (`cnnpack export --arch` without --pretrained or --weights)" in caplog.text


def test_a_served_model_that_takes_no_pixels_is_said_with_the_dims_its_config_gives():
    """A model of the user's own, `max_batch_size: 0` and input dims [1]: "takes FP32 []", its one dim read as the
    batch and left out of the message."""
    from cnnpack.client import ServedModel

    def config(mbs, dims):
        return {"name": "mymodel", "max_batch_size": mbs, "input": [{"name": "X", "data_type": "TYPE_FP32",
                                                                     "dims": dims}],
                "output": [{"name": "Y", "data_type": "TYPE_FP32", "dims": [1]}]}

    for mbs, dims, said in ((0, [1], "FP32 [1] (max_batch_size 0: its batch included), not square"),
                            (8, [4], "FP32 [4], not square")):
        with pytest.raises(UserInputError, match=re.escape(f"model mymodel takes {said} (C, H, W) pixels")):
            _ = ServedModel.from_config(config(mbs, dims)).image_size
