"""The measurement loop (perf_analyzer-like): windows of back-to-back requests until three agree.

`measure` only needs a callable that issues one request; `Load` keeps `concurrency` requests in
flight against a served model (a closed loop), so a local runtime and a Triton server are measured
by the same windows, percentiles and stability rule.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from cnnpack.errors import UserInputError

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

    `window` produces one Window; a concurrent client (several requests in flight) passes its own.
    """
    t0 = time.perf_counter()
    n = 0
    while n < policy.min_requests or time.perf_counter() - t0 < policy.warmup_s:
        request()
        sync()
        n += 1
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


# -- concurrent load on a served model (perf_analyzer's closed loop) ---------------------------------
class Load:
    """`concurrency` requests in flight, each client sending its next request as soon as the previous one
    answered (perf_analyzer's closed loop), all from one asyncio client (tritonclient.grpc.aio or .http.aio).

        with Load(client, model, batch, concurrency=16) as load:
            window = load.window(requests=1000)      # or seconds=...; a bench.Window

    The first failed request stops the load and cancels the requests still in flight; `window` then
    raises StageFailed naming the server and the first error, so a killed server is reported at once
    and a stuck one within the client timeout.
    """

    def __init__(self, client, model, batch: np.ndarray, concurrency: int) -> None:
        if concurrency < 1:
            raise UserInputError(f"--concurrency must be >= 1, got {concurrency}")
        self.client, self.model, self.batch, self.concurrency = client, model, batch, concurrency
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aio = None
        self._request: dict = {}

    def __enter__(self) -> Load:
        self._loop = asyncio.new_event_loop()
        try:
            self._aio, self._request = self._loop.run_until_complete(self._open())
        except BaseException:
            self._loop.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self._loop.run_until_complete(self._aio.close())
        finally:
            self._loop.close()

    async def _open(self) -> tuple[object, dict]:
        """The asyncio client (made inside the loop it runs on) and one request's arguments, built once."""
        c = self.client
        lib = importlib.import_module(f"tritonclient.{c.protocol}.aio")
        if c.protocol == "grpc":
            aio, timeout = lib.InferenceServerClient(c.address), {"client_timeout": c.timeout_s}
        else:  # aiohttp: a total timeout per request, and a connection for every request in flight
            aio, timeout = lib.InferenceServerClient(c.address, conn_timeout=c.timeout_s,
                                                     conn_limit=max(100, self.concurrency)), {}
        request = {"model_name": self.model.name, "inputs": c.inputs(self.model, self.batch),
                   "outputs": [lib.InferRequestedOutput(self.model.output)], **timeout}
        return aio, request

    def one(self) -> float:
        """One request alone (warm-up); its latency in seconds."""
        return self.window(requests=1, concurrency=1).latencies_s[0]

    def window(self, *, seconds: float = 0.0, requests: int = 0, min_requests: int = 1,
               concurrency: int | None = None) -> Window:
        """Load for at least `seconds` and `min_requests` requests, or for exactly `requests` requests."""
        return self._loop.run_until_complete(
            self._window(seconds, requests, max(min_requests, 1), concurrency or self.concurrency))

    async def _window(self, seconds: float, requests: int, min_requests: int, concurrency: int) -> Window:
        lat: list[float] = []
        issued = 0
        start = time.perf_counter()

        def more() -> bool:
            if requests:
                return issued < requests
            return time.perf_counter() - start < seconds or issued < min_requests

        async def client_loop() -> None:
            nonlocal issued
            while more():
                issued += 1
                t0 = time.perf_counter()
                await self._aio.infer(**self._request)
                lat.append(time.perf_counter() - t0)

        tasks = [asyncio.ensure_future(client_loop()) for _ in range(concurrency)]
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in pending:  # after a failure the requests still in flight are abandoned, not awaited
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        end = time.perf_counter()
        failed = [t.exception() for t in done if not t.cancelled() and t.exception() is not None]
        if failed:
            e = failed[0]
            if not isinstance(e, self.client.errors):
                raise e  # a bug here, not a server's answer: let it show
            raise self.client.failure(f"request under load to {self.model.name} ({concurrency} in flight; "
                                      f"{len(lat)} of {issued} sent were answered)", e) from None
        return Window(lat, end - start)
