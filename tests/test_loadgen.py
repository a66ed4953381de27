"""Which load generator measures a served model: perf_analyzer when on PATH (auto), cnnpack's client otherwise."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time

import numpy as np
import pytest

from cnnpack.errors import StageFailed, UserInputError
from cnnpack.loadgen import resolve


def test_auto_takes_perf_analyzer_only_from_path_and_asking_for_a_missing_one_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert resolve("auto") == "cnnpack" and resolve("cnnpack") == "cnnpack"
    with pytest.raises(UserInputError, match="perf_analyzer is not on PATH"):
        resolve("perf_analyzer")
    with pytest.raises(UserInputError, match="valid: auto, perf_analyzer, cnnpack"):
        resolve("locust")
    fake = tmp_path / "perf_analyzer"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    assert resolve("auto") == "perf_analyzer"


def test_cli_refuses_a_missing_perf_analyzer_in_one_line(tmp_path):
    env = {**os.environ, "PATH": os.path.dirname(shutil.which("sh") or "/bin/sh")}
    bad = subprocess.run([sys.executable, "-m", "cnnpack", "bench", "--run", str(tmp_path), "--triton-url",
                          "127.0.0.1:1", "--load-generator", "perf_analyzer"], capture_output=True, text=True, env=env)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and "perf_analyzer is not on PATH" in lines[0], bad.stderr


def test_perf_analyzer_is_given_the_callers_pixels_in_the_models_dtype_not_random_bytes(tmp_path):
    import base64
    import json

    from cnnpack.client import ServedModel
    from cnnpack.loadgen import input_data

    batch = np.random.default_rng(0).integers(0, 256, (4, 3, 8, 8)).astype(np.float32)
    for dtype, np_dtype in (("FP32", np.float32), ("FP16", np.float16)):
        model = ServedModel(name="m", platform="onnxruntime_onnx", input="serving_default/input:0", input_dtype=dtype,
                            input_shape=(3, 8, 8), output="logits", num_classes=6, max_batch_size=64)
        steps = json.loads(input_data(model, batch, tmp_path / f"{dtype}.json").read_text())["data"]
        assert len(steps) == 1 and list(steps[0]) == ["serving_default/input:0"]  # a name no file could carry
        tensor = steps[0]["serving_default/input:0"]
        sent = np.frombuffer(base64.b64decode(tensor["b64"]), dtype=np_dtype).reshape(tensor["shape"])
        assert np.array_equal(sent, batch[0].astype(np_dtype))  # one batch-1 sample, which it repeats to its -b
    images = ServedModel(name="cnn_onnx_image", platform="ensemble", input="image", input_dtype="BYTES",
                         input_shape=(1,), output="logits", num_classes=6, max_batch_size=64)
    with pytest.raises(UserInputError, match="takes encoded image bytes"):
        input_data(images, batch, tmp_path / "bytes.json")


def test_a_concurrency_past_the_bound_is_refused_before_any_connection_or_server():
    """tune --concurrency 100000000 grew to gigabytes opening connections, deaf to Ctrl-C, and left its Triton
    running when killed: bench --triton-url, the pipeline and tune refuse it in one line now."""
    from cnnpack.bench_served import ServedConfig
    from cnnpack.loadclient import MAX_CONCURRENCY, Load
    from cnnpack.pipeline_config import PipelineConfig
    from cnnpack.tune_grid import TuneConfig

    said = rf"--concurrency must be integers from 1 to {MAX_CONCURRENCY:,} \(requests in flight\), got \[1, 100000000\]"
    for cfg in (ServedConfig(url="127.0.0.1:8000", concurrency=(1, 100_000_000)),
                TuneConfig(latency_budget_ms=10, concurrency=(1, 100_000_000)),
                PipelineConfig(concurrency=(1, 100_000_000))):
        with pytest.raises(UserInputError, match=said):
            cfg.validate()
    with pytest.raises(UserInputError, match=r"got \[0\]"):
        Load(None, None, np.zeros((1, 3, 8, 8), np.float32), concurrency=0)
    ServedConfig(url="127.0.0.1:8000", concurrency=(1, MAX_CONCURRENCY)).validate()


FAKE_PA = r'''#!PYTHON
"""Prints what perf_analyzer -v prints (its windows' lines indented, a failed window as cb::Error, a million in C++'s
default float format) and writes its CSV; unstable on the first call, stable on the retry (-s 1000)."""
import pathlib, sys
args = sys.argv[1:]
retry = "-s" in args
rates = (["1001.5", "1.00211e+06", "2000.25"] if retry else ["900", "950", "cb::Error", "980", "1000"])
for i, r in enumerate(rates, 1):
    print(f"  Pass [{i}] " + (r + ": Failed to retrieve results" if r == "cb::Error" else
                              f"throughput: {r} infer/sec. Avg latency: 700 usec (std 40 usec)"))
if not retry:
    print("Failed to obtain stable measurement within 5 measurement windows for concurrency 16. Please try to "
          "increase the --measurement-interval.")
    sys.exit(1)
print("  Client: \n    Request count: 4321")
out = pathlib.Path(args[args.index("-f") + 1])
out.write_text("Concurrency,Inferences/Second,Avg latency,p50 latency,p90 latency,p95 latency,p99 latency\n"
               "16,2000.5,7000,6000,9000,9500,12000\n")
'''


def _planted_perf_analyzer(script: str, folder, monkeypatch):
    """`script` as the perf_analyzer on PATH; (a served model, a client of no server) to point it at."""
    from types import SimpleNamespace

    from cnnpack.client import ServedModel

    fake = folder / "perf_analyzer"
    fake.write_text(script.replace("PYTHON", sys.executable))
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{folder}{os.pathsep}{os.environ['PATH']}")
    model = ServedModel(name="m", platform="onnxruntime_onnx", input="input", input_dtype="FP32", input_shape=(3, 8, 8),
                        output="logits", num_classes=6, max_batch_size=64)
    return model, SimpleNamespace(address="127.0.0.1:1", protocol="grpc")


def test_perf_analyzers_windows_are_read_as_it_judged_them(tmp_path, monkeypatch):
    """Its last 3 windows (a constant of perf_analyzer, whatever cnnpack's policy counts), a failed one as 0, a rate of
    a million in exponent form, and the windows of both of its runs when the first found no stable point."""
    from cnnpack.loadgen import perf_analyzer
    from cnnpack.measure import WindowPolicy

    model, client = _planted_perf_analyzer(FAKE_PA, tmp_path, monkeypatch)
    batch = np.zeros((1, 3, 8, 8), np.float32)
    row = perf_analyzer(client, model, batch, 16, WindowPolicy(window_s=0.1, max_s=0.5, stable_windows=1))
    assert row["window_throughput_ips"] == [1001.5, 1002110.0, 2000.25] and row["windows"] == 8
    assert row["stable"] is False and row["throughput_ips"] == 2000.5 and row["requests"] == 4321
    # what its stability rule judged: the first run's last 3 windows, images/s and mean latency, not the retry's
    assert row["judged_windows"] == {"throughput_ips": [0.0, 980.0, 1000.0], "latency_ms": [None, 0.7, 0.7],
                                     "tolerance": 0.1}
    from cnnpack.loadgen import window_rates

    assert window_rates("  Pass [1] throughput: 10 infer/sec.\n  Pass [2] cb::Error: x\n") == [10.0, 0.0]


def test_a_point_perf_analyzer_reports_no_figures_for_is_measured_by_cnnpacks_client_and_says_so(tmp_path,
                                                                                                  monkeypatch):
    """Two busy loops and another user's work beside CI: perf_analyzer found no stable measurement even without its
    stability check, and the pipeline's served stage failed on it (11 pipeline tests errored). Any other failure of
    perf_analyzer stays a failure."""
    from types import SimpleNamespace

    import cnnpack.loadgen as lg
    from cnnpack.client import ServedModel
    from cnnpack.measure import WindowPolicy

    fake = tmp_path / "perf_analyzer"
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    model = ServedModel(name="m", platform="onnxruntime_onnx", input="input", input_dtype="FP32", input_shape=(3, 8, 8),
                        output="logits", num_classes=6, max_batch_size=64)
    client = SimpleNamespace(address="127.0.0.1:1", protocol="grpc")
    monkeypatch.setattr(lg, "own_client", lambda *a: {"throughput_ips": 1234.0, "stable": True})
    policy = WindowPolicy(window_s=0.1, max_s=0.5, stable_windows=1)
    for said, falls_back in (("Failed to obtain stable measurement within 3 measurement windows", True),
                             ("error: failed to get model metadata: connection refused", False)):
        fake.write_text(f"#!{sys.executable}\nimport sys\nif '--version' in sys.argv: print('perf_analyzer 2.41.0')\n"
                        f"else: print({said!r}); sys.exit(1)\n")
        fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
        if falls_back:
            row = lg.load("perf_analyzer", client, model, np.zeros((1, 3, 8, 8), np.float32), 16, policy)
            assert row["throughput_ips"] == 1234.0 and row["stable"] is False
            assert row["load_generator"].startswith("cnnpack client (perf_analyzer reported no figures: Failed to")
        else:
            with pytest.raises(StageFailed, match="connection refused"):
                lg.load("perf_analyzer", client, model, np.zeros((1, 3, 8, 8), np.float32), 16, policy)


SLOW_PA = r'''#!PYTHON
"""perf_analyzer on a model whose requests take 1.5 s: a window shorter than 2 s holds none, and the run fails as the
real one does; from 2 s on each window holds some. It logs the windows it was given."""
import pathlib, sys
args = sys.argv[1:]
if "--version" in args:
    print("perf_analyzer 2.41.0"); sys.exit(0)
window = int(args[args.index("--measurement-interval") + 1])
with open(pathlib.Path(sys.argv[0]).with_name("windows.log"), "a") as log:
    log.write(f"{window}\n")
if window < 2000:
    print("  Pass [1] throughput: 3.1 infer/sec. Avg latency: 1500000 usec (std 9 usec)")
    print("  Pass [2] cb::Error: No valid requests recorded within time interval. Please use a larger time window.")
    print("No valid requests recorded within time interval. Please use a larger time window.")
    sys.exit(1)
for i in (1, 2, 3):
    print(f"  Pass [{i}] throughput: 10.5 infer/sec. Avg latency: 1500000 usec (std 9 usec)")
print("  Client: \n    Request count: 63")
out = pathlib.Path(args[args.index("-f") + 1])
out.write_text("Concurrency,Inferences/Second,Avg latency,p50 latency,p90 latency,p95 latency,p99 latency\n"
               "16,10.5,1500000,1500000,1600000,1650000,1700000\n")
'''


def test_requests_slower_than_perf_analyzers_windows_are_measured_in_windows_that_hold_them(tmp_path, monkeypatch):
    """tune lost 2 of 39 resnet18 points on 2 busy Zen 3 cores: perf_analyzer's 0.5 s windows held no request of 1-2 s,
    and it failed ("No valid requests recorded within time interval"). The point is measured again in windows of 4x
    the latency it saw (6 s), and only where no window length holds one does cnnpack's client measure it."""
    import cnnpack.loadgen as lg
    from cnnpack.measure import WindowPolicy

    model, client = _planted_perf_analyzer(SLOW_PA, tmp_path, monkeypatch)
    row = lg.load("perf_analyzer", client, model, np.zeros((1, 3, 8, 8), np.float32), 16,
                  WindowPolicy(window_s=0.5, max_s=2.0, stable_windows=1))
    assert (tmp_path / "windows.log").read_text().split() == ["500", "6000"]
    assert row["throughput_ips"] == 10.5 and row["stable"] is True and row["load_generator"] == "perf_analyzer 2.41.0"
    assert row["latency_ms_p99"] == 1700.0 and row["windows"] == 5
    assert lg.longer_window("", 500) == 2000 and lg.longer_window("", 30_000) == 60_000


def test_a_point_measured_again_in_longer_windows_only_where_they_end_by_the_deadline(tmp_path, monkeypatch):
    """tune's --time-limit: the measurement again in windows of 6 s (3 of them) would end 18 s on; with 10 s left it
    is not started, and cnnpack's client measures the point in what is left; with no time left, the point is not
    measured, and says why. A sweep's last points ran past the limit by the retry's windows."""
    import cnnpack.loadgen as lg
    from cnnpack.measure import WindowPolicy

    model, client = _planted_perf_analyzer(SLOW_PA, tmp_path, monkeypatch)
    given = []
    monkeypatch.setattr(lg, "own_client", lambda *a: given.append(a[-1]) or {"throughput_ips": 9.0, "stable": True})
    x = np.zeros((1, 3, 8, 8), np.float32)
    row = lg.load("perf_analyzer", client, model, x, 16, WindowPolicy(window_s=0.5, max_s=2.0, stable_windows=1,
                                                                      deadline=time.monotonic() + 10))
    assert (tmp_path / "windows.log").read_text().split() == ["500"]  # no run of 6 s windows
    assert row["throughput_ips"] == 9.0 and row["stable"] is False and "would have ended past the time limit" in (
        row["load_generator"]) and 0 < given[0].max_s <= 2.0
    with pytest.raises(StageFailed, match="no time was left before the time limit"):
        lg.load("perf_analyzer", client, model, x, 16, WindowPolicy(window_s=0.5, max_s=2.0, stable_windows=1,
                                                                     deadline=time.monotonic()))


def test_cnnpacks_client_records_the_windows_its_stability_rule_judged(monkeypatch):
    """Throughput and median latency per window, as `measure.agree` judges them: tune says which one disagreed (it
    listed rates within 7 % of each other as windows that "did not agree"). The load is planted: windows of a fixed
    rate whose latency doubles."""
    import cnnpack.loadgen as lg
    from cnnpack.measure import Window, WindowPolicy

    class Planted:
        def __init__(self, *a):
            self.n = 0

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def one(self):
            return None

        def window(self, seconds, min_requests):
            self.n += 1
            time.sleep(seconds)
            return Window([0.001 * 2 ** self.n] * 10, 0.01)  # 1,000 requests/s each, p50 2, 4, 8 ... ms (2: the
            # warm-up): the latencies never agree, however many windows a slow host fits in the time

    monkeypatch.setattr(lg, "Load", Planted)
    row = lg.own_client(None, None, np.zeros((1, 3, 8, 8), np.float32), 4, WindowPolicy(window_s=0.01, max_s=0.5))
    judged, n = row["judged_windows"], row["windows"]
    assert row["stable"] is False and judged["tolerance"] == 0.1 and n >= 3
    assert judged["throughput_ips"] == pytest.approx([1000.0] * 3)
    assert judged["latency_ms"] == pytest.approx([2.0 ** (n - 1), 2.0 ** n, 2.0 ** (n + 1)])  # the last 3
