"""The measurement loop (perf_analyzer-like): windows of back-to-back requests until three agree.

`measure` only needs a callable that issues one request; `cnnpack.loadclient.Load` keeps `concurrency`
requests in flight against a served model (a closed loop), so a local runtime and a Triton server are
measured by the same windows, percentiles and stability rule.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

PERCENTILES = (50, 90, 95, 99)


# -- the measurement loop (perf_analyzer-like; reusable for a served model) --------------------------
@dataclass(frozen=True)
class WindowPolicy:
    window_s: float
    max_s: float
    stability: float = 0.10
    warmup_s: float = 1.0
    min_requests: int = 3  # per window, and for the warm-up
    stable_windows: int = 3
    deadline: float | None = None  # time.monotonic() by which a point must be measured (tune's --time-limit)

    def left_s(self) -> float:
        """Seconds until `deadline` (infinite without one)."""
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()


@dataclass
class Window:
    latencies_s: list[float]
    wall_s: float  # first request's start to last request's end

    @property
    def requests_per_s(self) -> float:
        return len(self.latencies_s) / self.wall_s

    @property
    def latency_s_p50(self) -> float:
        return float(np.median(self.latencies_s))


@dataclass
class Measurement:
    windows: list[Window]  # the windows reported on: the last `stable_windows`
    all_windows: int
    stable: bool
    warmup_s: float
    measured_s: float


def run_window(request: Callable[[], object], policy: WindowPolicy, sync: Callable[[], None]) -> Window:
    """Back-to-back requests for at least `window_s` and `min_requests`."""
    lat = []
    t_start = time.perf_counter()
    end = t_start
    while end - t_start < policy.window_s or len(lat) < policy.min_requests:
        t0 = time.perf_counter()
        request()
        sync()
        end = time.perf_counter()
        lat.append(end - t0)
    return Window(lat, end - t_start)


def agree(windows: list[Window], tol: float) -> bool:
    """True when throughput and median latency of `windows` each vary by at most `tol` (max/min - 1)."""
    for values in ([w.requests_per_s for w in windows], [w.latency_s_p50 for w in windows]):
        if max(values) > (1 + tol) * min(values):
            return False
    return True


def measure(request: Callable[[], object], policy: WindowPolicy, *, sync: Callable[[], None] = lambda: None,
            window: Callable[..., Window] = run_window) -> Measurement:
    """Warms up, then measures windows until `stable_windows` consecutive ones agree or `max_s` runs out.

    `window` produces one Window; a concurrent client (several requests in flight) passes its own. The warm-up is
    one window of `warmup_s` made the same way, so a concurrent load warms up under itself: one request at a time
    would warm a server's batcher and arenas for batches of one, and its executions would count in the server's
    statistics of the point.
    """
    t0 = time.perf_counter()
    window(request, replace(policy, window_s=policy.warmup_s), sync)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    windows: list[Window] = []
    k = policy.stable_windows
    while True:
        windows.append(window(request, policy, sync))
        stable = len(windows) >= k and agree(windows[-k:], policy.stability)
        if stable or time.perf_counter() - t0 >= policy.max_s:
            break
    return Measurement(windows[-k:], len(windows), stable, warmup_s, time.perf_counter() - t0)


def summarise(m: Measurement, batch_size: int) -> dict:
    """Latency percentiles (ms) and throughput (images/s) over the reported windows."""
    lat_ms = 1e3 * np.concatenate([w.latencies_s for w in m.windows])
    wall = sum(w.wall_s for w in m.windows)
    out = {f"latency_ms_p{p}": float(np.percentile(lat_ms, p)) for p in PERCENTILES}
    out["latency_ms_mean"] = float(lat_ms.mean())
    out["throughput_ips"] = batch_size * len(lat_ms) / wall
    out.update(stable=m.stable, requests=len(lat_ms), windows=m.all_windows, warmup_s=m.warmup_s,
               measured_s=m.measured_s,
               window_throughput_ips=[batch_size * w.requests_per_s for w in m.windows])
    return out
