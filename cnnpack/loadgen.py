"""Who puts a served model under load: Triton's own perf_analyzer when it is on PATH, else cnnpack's own client.

Users of Triton quote perf_analyzer (C++, one thread per client). cnnpack's client (`loadclient.Load`) runs in the
Python process beside the server and, on a machine of few cores, takes CPU the server needs, so it sends prebuilt
request bytes (benchmarks/served_loadgen.py measures it against perf_analyzer). Both follow the same rule: a closed
loop of `concurrency` requests in flight, windows until three agree within the stability fraction (or the trials run
out: unstable). Every row says which one measured it (`load_generator`), and `cnnpack bench --triton-url` and `cnnpack tune` take the same choice:

    --load-generator auto            perf_analyzer when on PATH, else cnnpack
    --load-generator perf_analyzer   refused (exit 2) when it is not on PATH
    --load-generator cnnpack
"""

from __future__ import annotations

import base64
import csv
import json
import math
import re
import shutil
import subprocess
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from cnnpack.errors import StageFailed, UserInputError
from cnnpack.loadclient import Load
from cnnpack.measure import WindowPolicy, measure, summarise

GENERATORS = ("auto", "perf_analyzer", "cnnpack")
PA_WINDOWS = 3  # perf_analyzer judges stability on its last 3 windows (a constant of its profiler)
PA_START_S = 1.0  # perf_analyzer's start and its connection's set-up, beside its windows


def resolve(name: str) -> str:
    """The load generator `name` stands for here: perf_analyzer | cnnpack."""
    if name not in GENERATORS:
        raise UserInputError(f"--load-generator {name!r}; valid: {', '.join(GENERATORS)}")
    found = shutil.which("perf_analyzer")
    if name == "perf_analyzer" and not found:
        raise UserInputError("--load-generator perf_analyzer, but perf_analyzer is not on PATH (it ships in the "
                             "tritonclient wheel's data/bin up to 2.41, or in the NGC SDK container); or use "
                             "--load-generator cnnpack")
    if name == "auto":
        return "perf_analyzer" if found else "cnnpack"
    return name


def describe(name: str) -> str:
    """The generator with its version, for a row: `perf_analyzer 2.41.0` or `cnnpack client`."""
    if name != "perf_analyzer":
        return "cnnpack client"
    out = subprocess.run(["perf_analyzer", "--version"], capture_output=True, text=True, timeout=30)
    m = re.search(r"(\d+\.\d+\.\d+)", out.stdout + out.stderr)
    return f"perf_analyzer {m.group(1)}" if m else "perf_analyzer"


class NoStableMeasurement(StageFailed):
    """perf_analyzer found no figures to report, even without its stability check (a window with no request done:
    a machine too busy for its windows); `reason`: its own last line."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def load(generator: str, client, model, batch: np.ndarray, concurrency: int, policy: WindowPolicy) -> dict:
    """One closed-loop point: latency percentiles (ms), throughput (images/s), stable, and `load_generator`: which
    generator measured it (`describe`). Where perf_analyzer reports no figures at all (`NoStableMeasurement`), the
    point is measured by cnnpack's client, flagged unstable, and the row says so (a busy machine failed the
    pipeline's served stage on it), within what is left before `policy.deadline`."""
    if generator == "perf_analyzer":
        try:
            return {**perf_analyzer(client, model, batch, concurrency, policy), "load_generator": describe(generator)}
        except NoStableMeasurement as e:
            if (left := policy.left_s()) < policy.warmup_s + policy.window_s:
                raise StageFailed(f"{e}; no time was left before the time limit to measure it with cnnpack's "
                                  "client") from None
            within = replace(policy, max_s=min(policy.max_s, left - policy.warmup_s))
            return {**own_client(client, model, batch, concurrency, within), "stable": False,
                    "load_generator": f"{describe('cnnpack')} (perf_analyzer reported no figures: {e.reason})"}
    return {**own_client(client, model, batch, concurrency, policy), "load_generator": describe(generator)}


def own_client(client, model, batch: np.ndarray, concurrency: int, policy: WindowPolicy) -> dict:
    """One point measured by cnnpack's client (`loadclient.Load`) in `policy`'s windows."""
    with Load(client, model, batch, concurrency) as ld:
        m = measure(ld.one, policy, window=lambda _request, p, _sync: ld.window(seconds=p.window_s,
                                                                               min_requests=p.min_requests))
    row = summarise(m, batch.shape[0])
    return {**row, "judged_windows": judged(row["window_throughput_ips"], [1e3 * w.latency_s_p50 for w in m.windows],
                                            policy)}


def judged(rates: list[float], latencies_ms: list[float | None], policy: WindowPolicy) -> dict:
    """The last windows the stability rule judged (throughput and latency must each agree within `tolerance`): tune
    says which figure disagreed (it listed the windows' images/s alone, 1,164, 1,244 and 1,199, as ones that "did not
    agree", their latency having varied)."""
    return {"throughput_ips": rates, "latency_ms": latencies_ms, "tolerance": policy.stability}


def input_data(model, batch: np.ndarray, path: Path) -> Path:
    """perf_analyzer's --input-data file for `batch`: JSON naming the model's input (any name, unlike its folder form,
    which takes the name as a file name) with the raw bytes of the batch's first sample in the input's dtype, base64
    (perf_analyzer repeats a batch-1 sample to its -b)."""
    if model.takes_images:
        raise UserInputError(f"model {model.name} takes encoded image bytes; perf_analyzer is given pixels, so measure "
                             "the classifier it wraps")
    sample = model.as_input(batch[0])
    step = {model.input: {"b64": base64.b64encode(sample.tobytes()).decode("ascii"), "shape": list(sample.shape)}}
    path.write_text(json.dumps({"data": [step]}))
    return path


def perf_analyzer(client, model, batch: np.ndarray, concurrency: int, policy: WindowPolicy) -> dict:
    """Runs perf_analyzer against the server of `client` at one concurrency; its figures in bench's row keys.

    It sends the pixels cnnpack's client would (`input_data`), not its default random bytes: as FP32 those are NaN,
    infinities and denormals (1 value in 128), inputs no served classifier sees, and its answers are NaN.

    Its windows are time windows of `policy.window_s`, its stability threshold `policy.stability`, its trials as many
    windows as fit in `policy.max_s`; when they run out perf_analyzer reports no figures, so the point is measured
    once more without the stability check and flagged unstable. perf_analyzer counts a request in a window only when
    it ends there, and a window with none fails the run: a request slower than a window (resnet18 at 16 in flight
    on 2 busy cores: 2 s, in tune's 0.5 s windows) is measured again in windows that hold several (`longer_window`).
    A measurement again that would end past `policy.deadline` (tune's --time-limit) is not started: no figures.
    """
    trials = max(PA_WINDOWS, math.ceil(policy.max_s / policy.window_s))
    window_ms = max(50, round(1000 * policy.window_s))
    with tempfile.TemporaryDirectory(prefix="cnnpack-pa-") as tmp:
        out = Path(tmp) / "pa.csv"
        data = input_data(model, batch, Path(tmp) / "input.json")

        def run(window_ms: int, trials: int, *extra: str) -> subprocess.CompletedProcess:
            out.unlink(missing_ok=True)
            cmd = ["perf_analyzer", "-m", model.name, "-u", client.address, "-i", client.protocol, "-b",
                   str(len(batch)), "--concurrency-range", f"{concurrency}:{concurrency}", "--measurement-interval",
                   str(window_ms), "--stability-percentage", f"{100 * policy.stability:g}", "--max-trials",
                   str(trials), "--input-data", str(data), *extra,
                   "--verbose-csv", "-v", "-f", str(out)]  # -v: a line per window ("Pass [n] throughput: ...")
            return subprocess.run(cmd, capture_output=True, text=True,
                                  timeout=60 + 4 * max(policy.max_s, trials * window_ms / 1e3))

        def again(window_ms: int, *extra: str) -> subprocess.CompletedProcess:  # a run of its fewest windows
            if policy.left_s() < PA_START_S + PA_WINDOWS * window_ms / 1e3:  # would end past tune's --time-limit
                tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
                raise NoStableMeasurement(f"perf_analyzer on {model.name} at {client.address} ({concurrency} in "
                                          f"flight) failed: {tail[0]}", f"{tail[0]} (windows of {window_ms / 1e3:g} s "
                                          "would have ended past the time limit)")
            return run(window_ms, PA_WINDOWS, *extra)

        done = run(window_ms, trials)
        windows = len(window_rates(done.stdout))
        for _ in range(2):
            if not (done.returncode != 0 and too_short(done.stdout + done.stderr)):
                break
            window_ms = longer_window(done.stdout, window_ms)
            done = again(window_ms)
            windows += len(window_rates(done.stdout))
        stable = done.returncode == 0 and out.is_file()
        first = done.stdout  # its judgement: the windows of this run
        if not stable and "stable" in done.stdout + done.stderr:
            done = again(window_ms, "-s", "1000")
            windows += len(window_rates(done.stdout))
        if done.returncode != 0 or not out.is_file():
            said_all = done.stdout + done.stderr
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
            said = f"perf_analyzer on {model.name} at {client.address} ({concurrency} in flight) failed: {tail[0]}"
            if "stable" in said_all or too_short(said_all):
                raise NoStableMeasurement(said, tail[0])
            raise StageFailed(said)
        row = next(csv.DictReader(out.open()))
    us = {p: float(row[f"p{p} latency"]) / 1e3 for p in (50, 90, 95, 99)}
    count = re.search(r"Request count: (\d+)", done.stdout)
    # its windows' rates, the last ones those it judged: tune tells a steadier measurement by them (with none, a
    # point measured again by perf_analyzer never replaced one whose windows had varied 10,000 %)
    passes = window_rates(done.stdout)
    return {**{f"latency_ms_p{p}": v for p, v in us.items()}, "latency_ms_mean": float(row["Avg latency"]) / 1e3,
            "throughput_ips": float(row["Inferences/Second"]), "stable": stable,
            "requests": int(count.group(1)) if count else None, "windows": windows or None,
            "warmup_s": None, "measured_s": None, "window_throughput_ips": passes[-PA_WINDOWS:],
            "judged_windows": judged(window_rates(first)[-PA_WINDOWS:], window_latencies_ms(first)[-PA_WINDOWS:],
                                     policy)}


def too_short(said: str) -> bool:
    """perf_analyzer's windows were shorter than its requests: "No valid requests recorded within time interval.
    Please use a larger time window." (a window in which no request ended)."""
    return "No valid requests recorded" in said


def longer_window(stdout: str, window_ms: int) -> int:
    """A window (ms) that holds several requests: 4x the slowest mean latency its windows saw, at least 4x the window
    that held none, at most a minute."""
    seen = [ms for ms in window_latencies_ms(stdout) if ms]
    return min(60_000, max(4 * window_ms, round(4 * max(seen, default=0.0))))


def window_rates(stdout: str) -> list[float]:
    """The throughput of each window perf_analyzer's `-v` printed, in order: "Pass [n] throughput: R infer/sec" (R in
    C++'s default float format: 1.00211e+06 at a million), a window whose requests failed ("Pass [n] cb::Error: ...")
    as 0, as perf_analyzer itself counts it."""
    found = re.findall(r"^\s*Pass \[\d+\] (?:throughput: ([\d.]+(?:e[+-]?\d+)?) infer/sec|cb::Error)", stdout, re.M)
    return [float(x) if x else 0.0 for x in found]


def window_latencies_ms(stdout: str) -> list[float | None]:
    """The mean latency of each window perf_analyzer's `-v` printed ("... infer/sec. Avg latency: U usec"), in ms, in
    the order of `window_rates`: what its stability rule judges beside the throughput; None for a failed window."""
    found = re.findall(r"^\s*Pass \[\d+\] (?:throughput: [\d.]+(?:e[+-]?\d+)? infer/sec\.(?:\s*Avg latency: (\d+) usec)?"
                       r"|cb::Error)", stdout, re.M)
    return [float(x) / 1e3 if x else None for x in found]
