"""`cnnpack bench`: latency and throughput of every runtime, against this machine's own limit.

Written once against the runtime registry: each runtime is loaded with its fair best setup
(eager in inference mode, torch.compile with frozen weights, TorchScript frozen and optimised for
inference, ONNX Runtime with full graph optimisation), all with the same thread count. The
measurement follows perf_analyzer: warm-up, then windows of back-to-back requests until three
consecutive windows agree within 10 % (or the time limit is reached: flagged unstable). Achieved GFLOP/s come from
the model's counted FLOPs and are set against an fp32 matrix multiply measured in the same run.

`measure` only needs a callable that issues one request, so a served model (Triton) is measured
by the same loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import functools
import gc
import importlib
import io
import os
import platform
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from cnnpack.errors import MissingStageError, RuntimeUnavailable, UserInputError
from cnnpack.rundir import Run, atomic_path, atomic_write_json, atomic_write_text, library_versions, sha256

DEFAULT_RUNTIMES = ("eager", "compiled", "torchscript", "onnxruntime")
PERCENTILES = (50, 90, 95, 99)
NOTES = {
    "latency": "one predict() call on a numpy batch (host-device copies included), time.perf_counter, GPU synchronised",
    "throughput_ips": "images / wall time of the reported windows (the last three)",
    "speedup_vs_eager": "eager latency_ms_p50 / this latency_ms_p50, same batch size",
    "machine_peak_gflops": "the best of the median fp32 matmul rates measured in this run (torch.matmul of two "
                           "n x n matrices, same thread count), one before the first row and one after each",
    "matmul_share": "gflops / matmul_gflops, the mean of the matmul rates measured right before and right after "
                    "this row: the machine's speed can drift during a run (a shared host)",
    "matmul.spread": "max / min - 1 of the matmul samples: beyond 10 % the machine's speed changed during the run "
                     "and rows measured at different times are not comparable",
    "cpu_others": "share of the machine's CPU time taken by other processes or the hypervisor (steal) while "
                  "this runtime x batch size ran; above a few % the figure was disturbed",
    "peak_rss_mb": "the process's peak resident memory while the runtime ran this batch size (VmHWM, reset "
                   "before its warm-up) minus the resident memory before the runtime was loaded: weights, "
                   "runtime caches and arenas, activations. Host memory only. Memory the process freed earlier "
                   "(an earlier runtime, an earlier bench in the same process) may be reused and not show.",
}


@dataclass(frozen=True)
class BenchConfig:
    runtimes: tuple[str, ...] = DEFAULT_RUNTIMES
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    threads: int | None = None  # None: torch's default (the physical cores)
    max_seconds: float = 10.0  # measurement time limit per runtime x batch size (warm-up not counted)
    device: str = "cpu"
    stability: float = 0.10  # three consecutive windows agree within this fraction
    warmup_s: float = 1.0  # and at least 3 requests
    window_s: float | None = None  # None: max_seconds / 10, within 0.05 .. 2 s
    matmul_n: int = 2048  # the sgemm that measures the machine's limit is n x n x n ...
    matmul_s: float = 1.0  # ... repeated for this long (at least 10 times)
    plot: bool = True

    def validate(self) -> None:
        if not self.runtimes:
            raise UserInputError("--runtimes is empty; name at least one runtime")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise UserInputError(f"--batch-sizes must be integers >= 1, got {list(self.batch_sizes)}")
        if self.threads is not None and self.threads < 1:
            raise UserInputError(f"--threads must be >= 1, got {self.threads}")
        if self.max_seconds <= 0:
            raise UserInputError(f"--max-seconds must be > 0, got {self.max_seconds}")
        if not 0 < self.stability < 1:
            raise UserInputError(f"stability must be a fraction in (0, 1), got {self.stability}")

    def policy(self) -> WindowPolicy:
        window_s = self.window_s or min(2.0, max(0.05, self.max_seconds / 10))
        return WindowPolicy(window_s=window_s, max_s=self.max_seconds, stability=self.stability,
                            warmup_s=self.warmup_s)


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


# -- the machine's limit and the model's cost --------------------------------------------------------
def matmul_rate(device, n: int = 2048, seconds: float = 1.0) -> dict:
    """This machine's fp32 matrix-multiply rate (GFLOP/s) with the current torch thread count.

    The median over at least 10 multiplies (after warm-up) is the figure used; the best one is
    recorded too. TF32 stays off on a GPU, so it is an fp32 rate.
    """
    import torch

    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device) for _ in range(2))
    sync = _sync(device)
    for _ in range(3):
        a @ b
    sync()
    times: list[float] = []
    t_end = time.perf_counter() + seconds
    while len(times) < 10 or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        a @ b
        sync()
        times.append(time.perf_counter() - t0)
    flop = 2 * n ** 3
    return {"gflops": flop / float(np.median(times)) / 1e9, "gflops_best": flop / min(times) / 1e9,
            "n": n, "repeats": len(times), "dtype": "float32", "how": f"torch.matmul ({_blas(device)})",
            "threads": torch.get_num_threads()}


def _blas(device) -> str:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return "cuBLAS, TF32 off" if not torch.backends.cuda.matmul.allow_tf32 else "cuBLAS, TF32 on"
    return "MKL" if torch.backends.mkl.is_available() else "torch CPU BLAS"


def count_flops(run: Run) -> int:
    """FLOPs of one image through the eager model (convolutions and matmuls, 2 per multiply-add)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from cnnpack.runtimes import ArtifactRef, EagerRuntime

    model, _ = EagerRuntime.build(ArtifactRef(run, "checkpoint"), "cpu")
    spec = run.model_spec
    x = torch.zeros(1, spec["channels"], spec["image_size"], spec["image_size"])
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    return int(counter.get_total_flops())


# -- memory and threads -----------------------------------------------------------------------------
def _status_kb(key: str) -> int | None:
    try:
        m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def _release_memory() -> None:
    """Frees what Python and glibc still hold, so the next runtime's baseline is its own."""
    import ctypes

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS counter (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _cpu_ticks() -> tuple[int, int, int] | None:
    """(busy ticks of the machine, all ticks of the machine, ticks of this process), or None off Linux."""
    try:
        cpu = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, ValueError):
        return None
    busy = sum(cpu) - cpu[3] - cpu[4]  # all but idle and iowait; steal counts as taken
    return busy, sum(cpu), int(own[11]) + int(own[12])  # utime + stime


def others_cpu_share(before, after) -> float | None:
    """Share of the machine's CPU time that other processes (or the hypervisor) took in between."""
    if before is None or after is None or after[1] == before[1]:
        return None
    others = (after[0] - before[0]) - (after[2] - before[2])
    return max(0.0, others / (after[1] - before[1]))


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _sync(device) -> Callable[[], None]:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.synchronize
    return lambda: None


# -- runtimes -----------------------------------------------------------------------------------------
def unusable_reason(name: str) -> str | None:
    """Why an installed runtime cannot run here (cheap checks only), or None."""
    from cnnpack.runtimes import RUNTIMES

    cls = RUNTIMES.get(name)
    provider = getattr(cls, "provider", None)
    try:
        if provider:
            import onnxruntime as ort

            if provider not in ort.get_available_providers():
                return f"this onnxruntime build has no {provider}"
        precheck = getattr(cls, "precheck", None)
        if precheck:
            precheck()
    except RuntimeUnavailable as e:
        return str(e).removeprefix(f"{name}: ")
    return None


def check_runtimes(names: tuple[str, ...]) -> None:
    """Refuses an unknown runtime, listing the valid ones and why any installed one is unusable here."""
    from cnnpack.runtimes import RUNTIMES

    unknown = [n for n in names if n not in RUNTIMES]
    if not unknown:
        return
    reasons = {n: unusable_reason(n) for n in RUNTIMES}
    usable = [n for n, r in reasons.items() if r is None]
    msg = f"unknown runtime {unknown[0]!r}; valid: {', '.join(usable)}"
    skipped = [f"{n} ({r})" for n, r in reasons.items() if r]
    if skipped:
        msg += f"; installed but unusable here: {'; '.join(skipped)}"
    raise UserInputError(msg)


def _artifact(run: Run, name: str):
    from cnnpack.runtimes import RUNTIMES, artifact_ref

    fmt = RUNTIMES.get(name).format
    try:
        return artifact_ref(run, fmt)
    except MissingStageError:
        raise MissingStageError(f"{run.path} has no exports, which runtime {name} needs; run "
                                f"`cnnpack export --run {run.path}` first (or bench only --runtimes eager,compiled)"
                                ) from None


def check_batch_sizes(ref, name: str, batch_sizes: tuple[int, ...]) -> None:
    """Refuses a batch size the artifact cannot take (beyond its max, or not its static batch)."""
    static = ref.record.get("static_batch")
    for b in batch_sizes:
        if static and b != static:
            raise UserInputError(f"batch size {b}: {ref.path} ({name}) was exported with a static batch of "
                                 f"{static}; bench --batch-sizes {static}, or re-export without --static-batch")
        if ref.max_batch_size and b > ref.max_batch_size:
            raise UserInputError(f"batch size {b} exceeds the max batch size {ref.max_batch_size} of {ref.path} "
                                 f"({name}); re-export with `cnnpack export --max-batch-size {b}` or bench smaller")


def _input(spec: dict, batch_size: int) -> np.ndarray:
    """A fixed raw-pixel batch (N, C, H, W), float32 in 0..255."""
    rng = np.random.default_rng(0)
    shape = (batch_size, spec["channels"], spec["image_size"], spec["image_size"])
    return rng.integers(0, 256, shape).astype(np.float32)


# -- the stage ---------------------------------------------------------------------------------------
@dataclass
class _Ctx:
    run: Run
    cfg: BenchConfig
    device: object
    flops_per_image: int
    progress: Callable[[str], None]
    results: list[dict] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    matmul: list[dict] = field(default_factory=list)

    def sample_matmul(self) -> float:
        """Measures the fp32 matmul rate now (before the first and after every measurement)."""
        self.progress("fp32 matmul")
        self.matmul.append(matmul_rate(self.device, self.cfg.matmul_n, self.cfg.matmul_s))
        return self.matmul[-1]["gflops"]


def bench_runtime(ctx: _Ctx, name: str, ref) -> None:
    """Loads one runtime and measures it at every batch size; an unusable one is recorded as skipped."""
    from cnnpack.runtimes import RUNTIMES

    cfg, spec = ctx.cfg, ctx.run.model_spec
    inputs = {b: _input(spec, b) for b in cfg.batch_sizes}
    _release_memory()
    base_kb = _status_kb("VmRSS")
    try:
        rt = RUNTIMES.get(name).load(ref, cfg.device, threads=cfg.threads, optimize=True)
    except RuntimeUnavailable as e:
        ctx.skipped[name] = str(e)
        return
    for b in cfg.batch_sizes:
        ctx.progress(f"{name} batch {b}")
        can_reset, ticks = _reset_peak_rss(), _cpu_ticks()
        m = measure(functools.partial(rt.predict, inputs[b]), cfg.policy(), sync=_sync(ctx.device))
        peak_kb = _status_kb("VmHWM") if can_reset else None
        row_others = others_cpu_share(ticks, _cpu_ticks())
        row = {"runtime": name, "format": ref.format, "batch_size": b, **summarise(m, b)}
        row["gflops"] = row["throughput_ips"] * ctx.flops_per_image / 1e9
        row["peak_rss_mb"] = (peak_kb - base_kb) / 1024 if peak_kb and base_kb else None
        row["cpu_others"] = row_others
        # the machine's speed can drift (a shared host): set each row against the rate around it
        row["matmul_gflops"] = (ctx.matmul[-1]["gflops"] + ctx.sample_matmul()) / 2
        row["matmul_share"] = row["gflops"] / row["matmul_gflops"]
        row["info"] = rt.info
        ctx.results.append(row)
    del rt


def _speedups(results: list[dict]) -> None:
    """speedup_vs_eager: eager's median latency over this runtime's, at the same batch size."""
    eager = {r["batch_size"]: r["latency_ms_p50"] for r in results if r["runtime"] == "eager"}
    for r in results:
        e = eager.get(r["batch_size"])
        r["speedup_vs_eager"] = e / r["latency_ms_p50"] if e else None


def machine() -> dict:
    """What the numbers were measured on, including how busy it was."""
    model = platform.processor()
    with contextlib.suppress(OSError):
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        model = m.group(1) if m else model
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"platform": platform.platform(), "cpu": model, "cpus_usable": cpus,
            "load_avg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def bench(run_dir: str | Path, cfg: BenchConfig = BenchConfig(), *,
          progress: Callable[[str], None] = lambda _: None) -> dict:
    """Benchmarks each runtime of `cfg` at each batch size; writes bench.{json,csv,png}, returns `stages.bench`."""
    import torch

    from cnnpack.train import resolve_device

    cfg.validate()
    check_runtimes(cfg.runtimes)
    if "triton" in cfg.runtimes:
        raise UserInputError("runtime triton measures a served model, not a file: use "
                             "`cnnpack bench --run RUN --triton-url HOST:PORT --model NAME`")
    run = Run.open(run_dir)
    refs = {name: _artifact(run, name) for name in cfg.runtimes}
    for name, ref in refs.items():
        check_batch_sizes(ref, name, cfg.batch_sizes)
    device = resolve_device(cfg.device)
    cfg = BenchConfig(**{**asdict(cfg), "threads": cfg.threads or torch.get_num_threads()})
    host = machine()
    with torch_threads(cfg.threads):
        ctx = _Ctx(run, cfg, device, count_flops(run), progress)
        ctx.sample_matmul()
        for name, ref in refs.items():
            bench_runtime(ctx, name, ref)
    if not ctx.results:
        raise RuntimeUnavailable("no runtime could run here: " + "; ".join(ctx.skipped.values()))
    host["load_avg_1_5_15_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    section = _section(ctx, host, refs)
    old = _previous(run)  # rows of served models (bench --triton-url) stay
    section["results"] += [r for r in old.get("results", []) if r.get("runtime") == "triton"]
    section["served"] = old.get("served", {})
    section["outputs"] = write_outputs(run, section, plot=cfg.plot)
    run.set_stage("bench", section)
    return run.read()["stages"]["bench"]


def _section(ctx: _Ctx, host: dict, refs: dict) -> dict:
    """stages.bench; machine_peak_gflops is the best of the matmul rates measured during the run."""
    _speedups(ctx.results)
    rates = [m["gflops"] for m in ctx.matmul]
    matmul = {k: v for k, v in ctx.matmul[0].items() if k not in ("gflops", "gflops_best", "repeats")}
    matmul.update(samples_gflops=rates, spread=max(rates) / min(rates) - 1)
    spec = ctx.run.model_spec
    return {"status": "ok", "machine_peak_gflops": max(rates), "matmul": matmul,
            "model": f"{spec['arch']}@{spec['image_size']}px", "model_gflops_per_image": ctx.flops_per_image / 1e9,
            "threads": ctx.cfg.threads, "device": str(ctx.device), "results": ctx.results, "skipped": ctx.skipped,
            "inputs": {ref.format: ref.record.get("sha256") or sha256(ref.path) for ref in refs.values()},
            "machine": host, "libraries": library_versions(), "config": asdict(ctx.cfg), "notes": NOTES}


def _previous(run: Run) -> dict:
    section = run.read().get("stages", {}).get("bench") or {}
    return section if section.get("status") == "ok" else {}


# -- a served model (`cnnpack bench --triton-url`) -------------------------------------------------------
@dataclass(frozen=True)
class ServedConfig:
    """Which served model to put under load, and how."""

    url: str | None = None  # default: 127.0.0.1 on Triton's port of the protocol
    model: str | None = None  # default: the model of the run's `cnnpack triton` stage
    protocol: str = "grpc"
    concurrency: tuple[int, ...] = (1, 4, 16)  # requests in flight
    timeout_s: float = 30.0  # per request

    def validate(self) -> None:
        from cnnpack.client import check_protocol

        check_protocol(self.protocol)
        if self.model == "":
            raise UserInputError("--model is empty; name the served model (see `cnnpack serve`'s list)")
        if not self.concurrency or min(self.concurrency) < 1:
            raise UserInputError(f"--concurrency must be integers >= 1, got {list(self.concurrency)}")


def bench_served(run_dir: str | Path, served: ServedConfig, cfg: BenchConfig = BenchConfig(batch_sizes=(1,)), *,
                 progress: Callable[[str], None] = lambda _: None) -> dict:
    """Throughput and latency of a served model under closed-loop concurrent load (perf_analyzer-like).

    One row per batch size x concurrency (runtime `triton`, format `triton:<model>`), with the server's
    own view of it (mean executed batch, queue and compute time); the rows join those of the run's
    local bench in bench.json and `stages.bench`. Raises StageFailed (exit 1) if a request fails.
    """
    import torch

    from cnnpack.runtimes import RUNTIMES, served_ref
    from cnnpack.train import resolve_device

    cfg.validate()
    served.validate()
    run = Run.open(run_dir)
    rt = RUNTIMES.get("triton").load(served_ref(run, served.url, served.model, served.protocol, served.timeout_s))
    for b in cfg.batch_sizes:
        rt.check_batch(b)
    host = machine()
    with torch_threads(cfg.threads or torch.get_num_threads()):  # the matmul rate of the client's machine
        ctx = _Ctx(run, cfg, resolve_device("cpu"), count_flops(run), progress)
        ctx.sample_matmul()
        for b in cfg.batch_sizes:
            for c in served.concurrency:
                bench_load(ctx, rt, b, c)
    host["load_avg_1_5_15_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    section = _merge_served(run, _section(ctx, host, {}), rt, served)
    section["outputs"] = write_outputs(run, section, plot=cfg.plot)
    run.set_stage("bench", section)
    return run.read()["stages"]["bench"]


def bench_load(ctx: _Ctx, rt, batch_size: int, concurrency: int) -> None:
    """One row: `concurrency` clients sending batches of `batch_size` back to back, measured in windows."""
    client, model = rt.client, rt.model
    ctx.progress(f"triton {model.name} batch {batch_size} x {concurrency} in flight")
    before = client.statistics(model.name)
    with Load(client, model, _input(ctx.run.model_spec, batch_size), concurrency) as load:
        m = measure(load.one, ctx.cfg.policy(), window=lambda _request, policy, _sync: load.window(
            seconds=policy.window_s, min_requests=policy.min_requests))
    after = client.statistics(model.name)
    from cnnpack.client import server_side

    row = {"runtime": "triton", "format": rt.format, "batch_size": batch_size, "concurrency": concurrency,
           "protocol": client.protocol, **summarise(m, batch_size), "errors": 0, **server_side(before, after)}
    row["gflops"] = row["throughput_ips"] * ctx.flops_per_image / 1e9
    row["peak_rss_mb"] = row["cpu_others"] = None  # the server is another process: not measured from here
    row["matmul_gflops"] = (ctx.matmul[-1]["gflops"] + ctx.sample_matmul()) / 2
    row["matmul_share"] = row["gflops"] / row["matmul_gflops"]
    row["info"] = rt.info
    ctx.results.append(row)


def _merge_served(run: Run, new: dict, rt, served: ServedConfig) -> dict:
    """The run's bench section with the rows of this served model over this protocol replaced (the others stay).

    `served.<format>.<protocol>` records how they were measured.
    """
    old = _previous(run)
    info = {"url": rt.client.url, "concurrency": list(served.concurrency), "timeout_s": served.timeout_s,
            "model": rt.model.describe(), "machine": new["machine"], "config": new["config"],
            "libraries": new["libraries"]}
    seen = old.get("served", {})
    seen = {**seen, rt.format: {**seen.get(rt.format, {}), served.protocol: info}}
    if not old:
        return {**new, "served": seen}
    rows = [r for r in old["results"] if (r.get("format"), r.get("protocol")) != (rt.format, served.protocol)]
    rows += new["results"]
    _speedups(rows)
    return {**old, "results": rows, "machine_peak_gflops": max(old["machine_peak_gflops"], new["machine_peak_gflops"]),
            "served": seen, "notes": NOTES}


# -- outputs ------------------------------------------------------------------------------------------
CSV_COLUMNS = ("runtime", "format", "batch_size", "concurrency", "latency_ms_p50", "latency_ms_p90", "latency_ms_p95",
               "latency_ms_p99", "latency_ms_mean", "throughput_ips", "gflops", "matmul_gflops", "matmul_share",
               "speedup_vs_eager", "peak_rss_mb", "cpu_others", "stable", "requests", "server_batch_mean")


def write_outputs(run: Run, section: dict, *, plot: bool = True) -> dict:
    """bench.json (everything), bench.csv (one row per runtime x batch size) and bench.png."""
    atomic_write_json(run.file("bench.json"), section)
    buf = io.StringIO()
    w = csv.DictWriter(buf, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(section["results"])
    atomic_write_text(run.file("bench.csv"), buf.getvalue())
    names = ["bench.json", "bench.csv"]
    if plot:
        plot_results(section, run.file("bench.png"))
        names.append("bench.png")
    return {n: run.file_record(run.file(n)) for n in names}


def series(row: dict) -> str:
    """A row's name in tables and plots: the runtime, or for a served model its format and concurrency."""
    return f"{row['format']} c{row['concurrency']}" if row.get("concurrency") else row["runtime"]


def plot_results(section: dict, path: Path) -> None:
    """Left: median latency vs batch size (p99 as the band's top). Right: throughput per runtime."""
    import matplotlib.ticker
    from matplotlib.figure import Figure  # not pyplot: a notebook's backend is left alone

    results = section["results"]
    runtimes = list(dict.fromkeys(series(r) for r in results))
    batches = sorted({r["batch_size"] for r in results})
    fig = Figure(figsize=(12, 4.6))
    a, b = fig.subplots(1, 2)
    width = 0.8 / len(batches)
    for name in runtimes:
        rows = sorted((r for r in results if series(r) == name), key=lambda r: r["batch_size"])
        x = [r["batch_size"] for r in rows]
        line, = a.plot(x, [r["latency_ms_p50"] for r in rows], "o-", label=name)
        a.fill_between(x, [r["latency_ms_p50"] for r in rows], [r["latency_ms_p99"] for r in rows],
                       color=line.get_color(), alpha=0.15)
    for j, bs in enumerate(batches):
        vals = [next((r["throughput_ips"] for r in results if series(r) == n and r["batch_size"] == bs), np.nan)
                for n in runtimes]
        bars = b.bar(np.arange(len(runtimes)) + (j - (len(batches) - 1) / 2) * width, vals, width,
                     label=f"batch {bs}")
        b.bar_label(bars, labels=["" if np.isnan(v) else f"{v:.0f}" for v in vals], fontsize=7, padding=1)
    a.set(xscale="log", yscale="log", xlabel="batch size", ylabel="latency (ms): median, band to p99",
          title="latency per request")
    a.set_xticks(batches, [str(x) for x in batches])
    a.minorticks_off()
    a.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
    a.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    b.set_xticks(range(len(runtimes)), runtimes, rotation=20 if len(runtimes) > 4 else 0,
                 ha="right" if len(runtimes) > 4 else "center", fontsize=8)
    b.set(ylabel="images / s", title=f"throughput ({section['threads']} threads, {section['device']})")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{section['model']} ({section['model_gflops_per_image']:.3g} GFLOP/image); this machine's fp32 "
                 f"matmul rate: {section['machine_peak_gflops']:.0f} GFLOP/s",
                 fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
