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

import contextlib
import csv
import functools
import gc
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
from cnnpack.measure import PERCENTILES, Load, Measurement, Window, WindowPolicy, agree, measure, run_window, summarise  # noqa: F401 - re-exported
from cnnpack.rundir import Run, atomic_path, atomic_write_json, atomic_write_text, library_versions, sha256

NOTES = {
    "latency": "one predict() call on a numpy batch (host-device copies included), time.perf_counter, GPU synchronised",
    "throughput_ips": "images / wall time of the reported windows (the last three)",
    "speedup_vs_eager": "eager latency_ms_p50 / this latency_ms_p50, same batch size",
    "machine_peak_gflops": "the fp32 ceiling: the best median rate of several fp32 matrix multiplies (sizes 512..2048, "
                           "torch.matmul NN/NT and ONNX Runtime MatMul, same thread count) and of the fp32 samples "
                           "taken around each row",
    "ceilings": "per precision, the best of several matrix multiplies of that precision (int8: ONNX Runtime "
                "MatMulInteger u8 x s8), with the ISA's theoretical peak (cores x clock x ops/cycle) beside it",
    "matmul_gflops": "the ceiling of the row's own precision that matmul_share is taken against",
    "matmul_share": "gflops / matmul_gflops: the row's share of the machine's measured limit for its precision "
                    "(GOP/s for int8: the model's counted multiply-adds x 2 per second)",
    "matmul_around_gflops": "the mean of the fp32 matmul rates measured right before and right after this row: "
                            "the machine's speed can drift during a run (a shared host)",
    "speedup_vs_fp32": "for a reduced-precision artifact: the same runtime's fp32 artifact latency_ms_p50 / this one, "
                       "same batch size",
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
    runtimes: tuple[str, ...] | None = None  # None: every local runtime whose artifact the run has (`default_targets`)
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    threads: int | None = None  # None: torch's default (the physical cores)
    max_seconds: float = 10.0  # measurement time limit per runtime x batch size (warm-up not counted)
    device: str = "cpu"
    stability: float = 0.10  # three consecutive windows agree within this fraction
    warmup_s: float = 1.0  # and at least 3 requests
    window_s: float | None = None  # None: max_seconds / 10, within 0.05 .. 2 s
    matmul_n: int = 2048  # the sgemm that measures the machine's limit is n x n x n ...
    matmul_s: float = 1.0  # ... repeated for this long (at least 10 times)
    artifacts: tuple[str, ...] | None = None  # formats to measure (None: every one the run has that a runtime reads)
    plot: bool = True

    def validate(self) -> None:
        if self.runtimes is not None and not self.runtimes:
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


def _artifact(run: Run, name: str, fmt: str | None = None):
    from cnnpack.runtimes import RUNTIMES, artifact_ref

    fmt = fmt or RUNTIMES.get(name).format
    try:
        return artifact_ref(run, fmt)
    except MissingStageError:
        raise MissingStageError(f"{run.path} has no exports, which runtime {name} needs; run "
                                f"`cnnpack export --run {run.path}` first (or bench only --runtimes eager,compiled)"
                                ) from None


def _recorded(run: Run) -> set[str]:
    return set(run.read().get("stages", {}).get("export", {}).get("artifacts", {}))


def default_runtimes(run: Run) -> tuple[tuple[str, ...], dict[str, str]]:
    """With no --runtimes: every registered runtime of a run's artifacts (its own format or another it reads)
    that the run has and that can run here, and {runtime: why not} for the others. Runtimes of a served model
    (no format a run records) are neither."""
    from cnnpack.runtimes import FORMAT_RUNTIME, RUNTIMES, reads

    recorded, chosen, skipped = _recorded(run) | {"checkpoint"}, [], {}
    for name in RUNTIMES:
        cls = RUNTIMES.get(name)
        if cls.format not in FORMAT_RUNTIME:
            continue
        why = unusable_reason(name)
        if why is None and not any(reads(cls, f) for f in recorded):
            why = (f"the run has no {cls.format} artifact; `cnnpack export --run {run.path} --format {cls.format}` "
                   "makes one")
        if why:
            skipped[name] = why
        else:
            chosen.append(name)
    return tuple(chosen), skipped


def targets(run: Run, cfg: BenchConfig) -> list[tuple[str, object]]:
    """(runtime, artifact) pairs: each runtime on its own format and on every other recorded format it reads
    (onnxruntime on onnx and onnx_int8), or on the formats `cfg.artifacts` names. With no runtimes named
    (`cfg.runtimes` None), the runtimes of `default_runtimes` on the recorded formats they read."""
    from cnnpack.runtimes import RUNTIMES, reads

    recorded = _recorded(run)
    named = cfg.runtimes is not None
    runtimes = cfg.runtimes if named else default_runtimes(run)[0]
    if cfg.artifacts:
        unknown = [f for f in cfg.artifacts if f not in recorded and f != "checkpoint"]
        if unknown:
            raise UserInputError(f"--artifacts {unknown[0]!r} is not recorded in {run.path} "
                                 f"(has: {', '.join(sorted(recorded)) or 'none'})")
    pairs = []
    for name in runtimes:
        cls = RUNTIMES.get(name)
        formats = [cls.format] + sorted(f for f in recorded if f != cls.format and reads(cls, f))
        if not named:  # a default runtime runs what the run has (openvino on an int8 IR alone)
            formats = [f for f in formats if f in recorded | {"checkpoint"}]
        if cfg.artifacts:
            formats = [f for f in formats if f in cfg.artifacts]
        pairs += [(name, _artifact(run, name, f)) for f in formats]
    if not pairs:
        raise UserInputError(f"no runtime of --runtimes {','.join(runtimes)} reads --artifacts "
                             f"{','.join(cfg.artifacts or ())}")
    return pairs


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
    ceilings: dict = field(default_factory=dict)  # precision -> peak.ceilings() entry

    def yardstick(self, row: dict, precision: str) -> None:
        """Sets the row's share of the ceiling of its precision (fp32 when none was measured for it)."""
        around = (self.matmul[-1]["gflops"] + self.sample_matmul()) / 2
        ceiling = self.ceilings.get(precision) or self.ceilings.get("fp32") or {"gflops": around}
        if precision == "fp32" or precision not in self.ceilings:
            ceiling["gflops"] = max(ceiling["gflops"], self.matmul[-1]["gflops"])  # a faster sample raises it
        row.update(precision=precision, matmul_around_gflops=around, matmul_gflops=ceiling["gflops"],
                   matmul_share=row["gflops"] / ceiling["gflops"])
    def sample_matmul(self) -> float:
        """Measures the fp32 matmul rate now (before the first and after every measurement)."""
        self.progress("fp32 matmul")
        self.matmul.append(matmul_rate(self.device, self.cfg.matmul_n, self.cfg.matmul_s))
        return self.matmul[-1]["gflops"]


def row_precision(name: str, ref) -> str:
    """The precision a runtime computes an artifact in: the runtime's own (openvino-bf16) or the artifact's."""
    from cnnpack.runtimes import RUNTIMES, precision_of

    if ref.format == "checkpoint":
        return "fp32"
    return getattr(RUNTIMES.get(name), "precision", None) or precision_of(ref.record)


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
        ctx.skipped[name if ref.format == RUNTIMES.get(name).format else f"{name} ({ref.format})"] = str(e)
        return
    for b in cfg.batch_sizes:
        ctx.progress(f"{name} batch {b}")
        can_reset, ticks = _reset_peak_rss(), _cpu_ticks()
        m = measure(functools.partial(rt.predict, inputs[b]), cfg.policy(), sync=_sync(ctx.device))
        peak_kb = _status_kb("VmHWM") if can_reset else None
        row_others = others_cpu_share(ticks, _cpu_ticks())
        row = {"runtime": name, "format": ref.format, "artifact": ref.format, "batch_size": b, **summarise(m, b)}
        row["gflops"] = row["throughput_ips"] * ctx.flops_per_image / 1e9
        row["peak_rss_mb"] = (peak_kb - base_kb) / 1024 if peak_kb and base_kb else None
        row["cpu_others"] = row_others
        ctx.yardstick(row, row_precision(name, ref))
        row["info"] = rt.info
        ctx.results.append(row)
    del rt


def _speedups(results: list[dict]) -> None:
    """speedup_vs_eager: eager's median latency over this row's, at the same batch size; speedup_vs_fp32 for a
    reduced-precision artifact: the same runtime's fp32 artifact (its format without the suffix) over this one."""
    eager = {r["batch_size"]: r["latency_ms_p50"] for r in results if r["runtime"] == "eager"}
    local = {(r["runtime"], r["format"], r["batch_size"]): r["latency_ms_p50"] for r in results
             if r["runtime"] != "triton"}
    for r in results:
        e = eager.get(r["batch_size"])
        r["speedup_vs_eager"] = e / r["latency_ms_p50"] if e else None
        base = local.get((r["runtime"], r["format"].rsplit("_", 1)[0], r["batch_size"]))
        r["speedup_vs_fp32"] = base / r["latency_ms_p50"] if base and r.get("precision", "fp32") != "fp32" else None


def machine() -> dict:
    """What the numbers were measured on, including how busy it was."""
    model = platform.processor()
    with contextlib.suppress(OSError):
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        model = m.group(1) if m else model
    from cnnpack.peak import usable_cores

    cpus = usable_cores()
    return {"platform": platform.platform(), "cpu": model, "cpus_usable": cpus,
            "load_avg_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def bench(run_dir: str | Path, cfg: BenchConfig = BenchConfig(), *,
          progress: Callable[[str], None] = lambda _: None) -> dict:
    """Benchmarks each runtime of `cfg` at each batch size; writes bench.{json,csv,png}, returns `stages.bench`."""
    import torch

    from cnnpack.train import resolve_device

    cfg.validate()
    check_runtimes(cfg.runtimes or ())
    if "triton" in (cfg.runtimes or ()):
        raise UserInputError("runtime triton measures a served model, not a file: use "
                             "`cnnpack bench --run RUN --triton-url HOST:PORT --model NAME`")
    run = Run.open(run_dir)
    pairs = targets(run, cfg)
    for name, ref in pairs:
        check_batch_sizes(ref, name, cfg.batch_sizes)
    device = resolve_device(cfg.device)
    cfg = BenchConfig(**{**asdict(cfg), "threads": cfg.threads or torch.get_num_threads()})
    host = machine()
    with torch_threads(cfg.threads):
        ctx = _Ctx(run, cfg, device, count_flops(run), progress)
        if cfg.runtimes is None:
            ctx.skipped.update(default_runtimes(run)[1])
        ctx.ceilings = _ceilings(ctx, {row_precision(name, ref) for name, ref in pairs})
        ctx.sample_matmul()
        for name, ref in pairs:
            bench_runtime(ctx, name, ref)
    if not ctx.results:
        raise RuntimeUnavailable("no runtime could run here: " + "; ".join(ctx.skipped.values()))
    host["load_avg_1_5_15_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    section = _section(ctx, host, [ref for _, ref in pairs])
    old = _previous(run)  # rows of served models (bench --triton-url) stay
    section["results"] += [r for r in old.get("results", []) if r.get("runtime") == "triton"]
    section["served"] = old.get("served", {})
    section["outputs"] = write_outputs(run, section, plot=cfg.plot)
    run.set_stage("bench", section)
    return run.read()["stages"]["bench"]


def _ceilings(ctx: _Ctx, precisions: set[str]) -> dict:
    """The measured ceiling of each precision the rows will have (fp32 always: eager and compiled are fp32)."""
    if ctx.device.type != "cpu":  # on a GPU the fp32 (TF32 off) matmul samples are the yardstick
        return {}
    from cnnpack.peak import ceilings

    ctx.progress("the machine's ceilings")
    return ceilings(ctx.cfg.threads, precisions={"fp32", *precisions})


def _section(ctx: _Ctx, host: dict, refs: list) -> dict:
    """stages.bench; machine_peak_gflops is the fp32 ceiling (the best fp32 rate measured during the run)."""
    _speedups(ctx.results)
    rates = [m["gflops"] for m in ctx.matmul]
    matmul = {k: v for k, v in ctx.matmul[0].items() if k not in ("gflops", "gflops_best", "repeats")}
    matmul.update(samples_gflops=rates, spread=max(rates) / min(rates) - 1)
    spec = ctx.run.model_spec
    peak = max([*rates, ctx.ceilings.get("fp32", {}).get("gflops", 0.0)])
    over = [f"{series(r)} b{r['batch_size']}" for r in ctx.results if r["matmul_share"] > 1]
    return {"status": "ok", "machine_peak_gflops": peak, "matmul": matmul, "ceilings": ctx.ceilings,
            "over_ceiling": over,
            "model": f"{spec['arch']}@{spec['image_size']}px", "model_gflops_per_image": ctx.flops_per_image / 1e9,
            "threads": ctx.cfg.threads, "device": str(ctx.device), "results": ctx.results, "skipped": ctx.skipped,
            "inputs": {ref.format: ref.record.get("sha256") or sha256(ref.path) for ref in refs},
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
    row["artifact"] = rt.format
    ctx.yardstick(row, model.parameters.get("precision", "fp32"))
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
CSV_COLUMNS = ("runtime", "format", "precision", "batch_size", "concurrency", "latency_ms_p50", "latency_ms_p90", "latency_ms_p95",
               "latency_ms_p99", "latency_ms_mean", "throughput_ips", "gflops", "matmul_gflops", "matmul_share",
               "speedup_vs_eager", "speedup_vs_fp32", "peak_rss_mb", "cpu_others", "stable", "requests", "server_batch_mean")


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
    """A row's name in tables and plots: the runtime (with a precision other than fp32), or for a served model
    its format and concurrency."""
    if row.get("concurrency"):
        return f"{row['format']} c{row['concurrency']}"
    precision = row.get("precision", "fp32")
    return row["runtime"] if precision == "fp32" or row["runtime"].endswith(precision) else f"{row['runtime']} {precision}"


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
    from cnnpack.peak import short

    fig.suptitle(f"{section['model']} ({section['model_gflops_per_image']:.3g} GFLOP/image); this machine's measured "
                 f"matmul ceilings (G(FL)OP/s): {short(section)}",
                 fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
