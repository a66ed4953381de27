"""`cnnpack bench`: latency and throughput of every runtime, against this machine's own limit.

Written once against the runtime registry: each runtime is loaded with its fair best setup
(eager in inference mode, torch.compile with frozen weights, TorchScript frozen and optimised for
inference, ONNX Runtime with full graph optimisation), all with the same thread count. The
measurement follows perf_analyzer: warm-up, then windows of back-to-back requests until three
consecutive windows agree within 10 % (or the time limit is reached: flagged unstable). Achieved GFLOP/s come from
the model's counted FLOPs and are set against the measured matmul ceiling of the row's precision (`cnnpack.peak`).

Beside it: `bench_served` (a served model under concurrent load, the same loop), `bench_outputs` (bench.json,
bench.csv, bench.png), `bench_ceilings` (the rows held to their precision's ceiling), `host` (cores, memory, CPU
time of other processes), `peak` (the ceilings measured).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from cnnpack import user_model
from cnnpack.bench_ceilings import hold_to_ceilings, measured_ceilings, over_ceiling, remeasure_beaten_ceilings
from cnnpack.bench_outputs import CSV_COLUMNS, commit_outputs, plot_results, series, series_at  # noqa: F401 - re-exported
from cnnpack.bench_targets import (  # noqa: F401 - re-exported
    check_batch_sizes,
    check_runtimes,
    count_flops,
    default_runtimes,
    fitted_batch_sizes,
    targets,
)
from cnnpack.errors import RuntimeUnavailable, UserInputError
from cnnpack.host import (
    check_device,
    cpu_ticks,
    exact_fp32,
    frozen_heap,
    load_avg,
    machine,
    others_cpu_share,
    release_memory,
    reset_peak_rss,
    status_kb,
    sync,
    torch_threads,
    usable_cores,
)
from cnnpack.loadclient import Load  # noqa: F401 - re-exported
from cnnpack.measure import PERCENTILES, Measurement, Window, WindowPolicy, agree, measure, run_window, summarise  # noqa: F401 - re-exported
from cnnpack.peak import matmul_rate
from cnnpack.rundir import Run, artifact_digest, library_versions, sha256

NOTES = {
    "latency": "one predict() call on a numpy batch (host-device copies included), time.perf_counter, GPU synchronised",
    "throughput_ips": "images / wall time of the reported windows (the last three)",
    "speedup_vs_eager": "eager latency_ms_p50 / this latency_ms_p50, same batch size",
    "machine_peak_gflops": "the fp32 ceiling: the best rate (fastest call) of the fp32 matmuls and convolutions of every engine "
                           "(cnnpack.kernels) and of the fp32 matmul samples taken during the run",
    "ceilings": "per precision, the best of the matrix kernels of every engine cnnpack runs for it (PyTorch, ONNX Runtime, "
                "OpenVINO: matmuls n = 512..2048 and a 3x3 convolution; int8 as u8 x s8), measured once per machine "
                "(ceilings_cache: keyed by CPU model, flags, threads, library versions), with the ISA's theoretical "
                "peak (cores x clock x ops/cycle) and the matrix engine the CPU flags give it (AMX, AVX-512 VNNI/BF16, AVX2); "
                "on a GPU its own cuBLAS/cuDNN matmuls (n = 2048..8192) and 3x3 convolution per precision (fp32 with "
                "TF32 off, as the rows run; fp16, bf16), measured each bench",
    "matmul_gflops": "the ceiling of the row's own precision that matmul_share is taken against (a served model: the "
                     "run's ceilings when the server is on this machine, else the client's fp32 matmul rate around it)",
    "matmul_share": "gflops / matmul_gflops: the row's share of the machine's measured limit for its precision "
                    "(GOP/s for int8: the model's counted multiply-adds x 2 per second)",
    "matmul_around_gflops": "the mean of the fp32 matmul rates measured right before and right after this row's runtime: "
                            "the machine's speed can drift during a run (a shared host)",
    "speedup_vs_fp32": "for a reduced-precision artifact: the same runtime's fp32 artifact latency_ms_p50 / this one, "
                       "same batch size",
    "matmul_before_gflops": "the fp32 matmul rate measured right before this row's runtime (matmul_after_gflops: "
                            "right after it); both more than 10 % under matmul_best_gflops: the machine ran slower "
                            "while the row was measured, and its figures may be low (a caution says so)",
    "matmul_best_gflops": "the best fp32 matmul sample of the bench that measured this row (a served row merged in "
                          "from another bench keeps its own): what matmul_before/after_gflops are judged against",
    "matmul.spread": "max / min - 1 of the matmul samples: how much the machine's speed moved during the run (one "
                     "0.1 s sample can dip 15-30 % on a quiet shared host; the caution goes by the samples around "
                     "each row)",
    "cpu_others": "share of the machine's CPU time taken by other processes or the hypervisor (steal) while "
                  "this runtime x batch size ran; above a few % the figure was disturbed",
    "load_s": "seconds to load the runtime (read the artifact, build its session or compiled model), once per runtime: "
              "the same on each of its rows",
    "first_call_s": "seconds of the first call with this batch size, before the warm-up: inductor compiles it for "
                    "`compiled`, other runtimes size their buffers. load_s + first_call_s is the cold start a new "
                    "process (a new server instance) pays before it answers at the measured speed",
    "peak_rss_mb": "the process's peak resident memory while the runtime ran this batch size (VmHWM, reset "
                   "before its warm-up) minus the resident memory before the runtime was loaded: weights, "
                   "runtime caches and arenas, activations. Host memory only. Memory the process freed earlier "
                   "(an earlier runtime, an earlier bench in the same process) may be reused and not show.",
}


MAX_BATCH = 4096  # images per batch: 2.4 GB of float32 at 224 px


@dataclass(frozen=True)
class BenchConfig:
    runtimes: tuple[str, ...] | None = None  # None: every local runtime whose artifact the run has (`default_targets`)
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    fit_batch_sizes: bool = False  # the sizes are defaults, not asked for: each artifact takes those it accepts
    threads: int | None = None  # None: torch's default (the physical cores)
    max_seconds: float = 10.0  # measurement time limit per runtime x batch size (warm-up not counted)
    device: str = "cpu"
    stability: float = 0.10  # three consecutive windows agree within this fraction
    # and at least 3 requests; for the first batch size of a runtime (the later ones: 3 requests). 0.25 s, was 0.5: the
    # p50 of all 16 rows of the default run's bench agreed within their round-to-round noise (interleaved, 2 rounds,
    # 2 AMX cores), none unstable, 3.4 s less per bench; the three agreeing windows still catch a runtime still warming
    warmup_s: float = 0.25
    window_s: float | None = None  # None: max_seconds / 20, within 0.05 .. 1 s
    matmul_n: int = 512  # the sgemm sampled before the first runtime and after each one (the drift detector) ...
    matmul_s: float = 0.1  # ... repeated for this long (at least 3 times)
    artifacts: tuple[str, ...] | None = None  # formats to measure (None: every one the run has that a runtime reads)
    plot: bool = True

    def validate(self) -> None:
        if self.runtimes is not None and not self.runtimes:
            raise UserInputError("--runtimes is empty; name at least one runtime")
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise UserInputError(f"--batch-sizes must be integers >= 1, got {list(self.batch_sizes)}")
        if max(self.batch_sizes) > MAX_BATCH:  # 100000000 was a MemoryError traceback (a 2.24 TiB input)
            raise UserInputError(f"--batch-sizes must be at most {MAX_BATCH:,} (a batch is held in memory: at 224 px, "
                                 f"{MAX_BATCH:,} images are 2.4 GB of float32), got {max(self.batch_sizes):,}")
        if self.threads is not None and self.threads < 1:
            raise UserInputError(f"--threads must be >= 1, got {self.threads}")
        cores = usable_cores()
        if self.threads is not None and self.threads > cores:  # 100000 was a MemoryError; 1000 took minutes a point
            raise UserInputError(f"--threads {self.threads} is more than the {cores} cores here: threads beyond them "
                                 "measure their contention, not the runtime")
        if not 0 < self.max_seconds < float("inf"):  # nan too
            raise UserInputError(f"--max-seconds must be > 0, got {self.max_seconds}")
        if not 0 < self.stability < 1:
            raise UserInputError(f"stability must be a fraction in (0, 1), got {self.stability}")
        check_device(self.device)

    def policy(self) -> WindowPolicy:
        # short windows: a point stops as soon as three agree, and unsteady ones go on to max_seconds
        window_s = self.window_s or min(1.0, max(0.05, self.max_seconds / 20))
        return WindowPolicy(window_s=window_s, max_s=self.max_seconds, stability=self.stability,
                            warmup_s=self.warmup_s)


def input_batch(spec: dict, batch_size: int) -> np.ndarray:
    """A fixed raw-pixel batch (N, C, H, W), float32 in 0..255."""
    rng = np.random.default_rng(0)
    shape = (batch_size, spec["channels"], spec["image_size"], spec["image_size"])
    return rng.integers(0, 256, shape).astype(np.float32)


# -- the stage ---------------------------------------------------------------------------------------
@dataclass
class BenchContext:
    run: Run
    cfg: BenchConfig
    device: object
    flops_per_image: int
    progress: Callable[[str], None]
    results: list[dict] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    matmul: list[dict] = field(default_factory=list)
    ceilings: dict = field(default_factory=dict)  # precision -> peak.ceilings() entry
    ceilings_cache: dict | None = None  # where the ceilings were read from or stored (peak.cached_ceilings)

    def yardstick(self, row: dict, precision: str, around: tuple[float, float] | None = None) -> None:
        """Sets the row's share of the ceiling of its precision (fp32 when none was measured for it); `around`: the
        fp32 matmul rates measured right before and right after the row (None: the last sample and one taken now)."""
        before, after = around or (self.matmul[-1]["gflops"], self.sample_matmul())
        row.update(matmul_before_gflops=before, matmul_after_gflops=after)
        around = (before + after) / 2
        ceiling = self.ceilings.get(precision) or self.ceilings.get("fp32") or {"gflops": around}
        if precision == "fp32" or precision not in self.ceilings:
            self._raise_by_samples(ceiling)
        row.update(precision=precision, matmul_around_gflops=around, matmul_gflops=ceiling["gflops"],
                   matmul_share=row["gflops"] / ceiling["gflops"])

    def settle(self) -> None:
        """Every row against the final ceiling of its precision: a sample that raised a ceiling after earlier rows were
        measured (`yardstick`) or a ceiling measured again (`remeasure_beaten_ceilings`) counts for all of them, so one
        bench never holds one precision's rows to two different ceilings."""
        if "fp32" in self.ceilings and self.matmul:  # the sample after the last runtime too: one fp32 ceiling
            self._raise_by_samples(self.ceilings["fp32"])
        hold_to_ceilings(self.results, self.ceilings)

    def _raise_by_samples(self, ceiling: dict) -> None:
        """A faster fp32 matmul sample of this bench raises the fp32 ceiling, and is named as its best kernel (any
        sample: the one before the first runtime was left out, and the report held the rows to a ceiling under
        bench.json's; a raised ceiling kept the name of the engine it had passed)."""
        from cnnpack.peak import raise_ceiling

        best = max(self.matmul, key=lambda m: m["gflops"])
        raise_ceiling(ceiling, best["gflops"], f"{best.get('how', 'matmul')} n={best.get('n')}, a sample of this bench")

    def sample_matmul(self) -> float:
        """Measures the fp32 matmul rate now (before the first runtime and after each one): the drift detector."""
        self.progress("fp32 matmul")
        self.matmul.append(matmul_rate(self.device, self.cfg.matmul_n, self.cfg.matmul_s))
        return self.matmul[-1]["gflops"]


def row_precision(name: str, ref) -> str:
    """The precision a runtime computes an artifact in: the runtime's own (openvino-bf16) or the artifact's."""
    from cnnpack.artifacts import precision_of
    from cnnpack.runtimes import RUNTIMES

    if ref.format == "checkpoint":
        return "fp32"
    return getattr(RUNTIMES.get(name), "precision", None) or precision_of(ref.record)


def bench_runtime(ctx: BenchContext, name: str, ref, sizes: tuple[int, ...]) -> None:
    """Loads one runtime and measures it at every batch size; an unusable one is recorded as skipped."""
    from cnnpack.runtimes import RUNTIMES

    cfg, spec = ctx.cfg, ctx.run.model_spec
    inputs = {b: input_batch(spec, b) for b in sizes}
    release_memory()
    base_kb = status_kb("VmRSS")
    ctx.progress(f"{name} load")  # its own phase: loading (a session, a compile) is not the matmul sample before it
    t0 = time.perf_counter()
    key = name if ref.format == RUNTIMES.get(name).format else f"{name} ({ref.format})"
    try:
        rt = RUNTIMES.get(name).load(ref, cfg.device, threads=cfg.threads, optimize=True)
    except RuntimeUnavailable as e:
        ctx.skipped[key] = str(e).removeprefix(f"{name}: ")  # said as "skipped <key>: <why>"
        return
    load_s = time.perf_counter() - t0
    before, rows = ctx.matmul[-1]["gflops"], []
    for i, b in enumerate(sizes):
        ctx.progress(f"{name} batch {b}")
        can_reset, ticks = reset_peak_rss(), cpu_ticks()
        # the runtime's threads, arenas and caches warm up once; a later batch size needs only its first requests
        # (a new shape: inductor compiles it, an arena grows); windows that still drift do not agree and go on
        policy = cfg.policy() if i == 0 else replace(cfg.policy(), warmup_s=0.0)
        t0 = time.perf_counter()
        try:
            rt.predict(inputs[b])  # the first call with this shape, timed alone: what a new process pays (a compile)
        except RuntimeUnavailable as e:  # torch.compile whose compiler builds nothing: none of its rows
            ctx.skipped[key] = str(e).removeprefix(f"{name}: ")
            return
        first_call_s = time.perf_counter() - t0
        m = measure(functools.partial(rt.predict, inputs[b]), policy, sync=sync(ctx.device))
        peak_kb = status_kb("VmHWM") if can_reset else None
        row_others = others_cpu_share(ticks, cpu_ticks())
        row = {"runtime": name, "format": ref.format, "artifact": ref.format, "batch_size": b, **summarise(m, b)}
        row["gflops"] = row["throughput_ips"] * ctx.flops_per_image / 1e9
        row["peak_rss_mb"] = (peak_kb - base_kb) / 1024 if peak_kb and base_kb else None
        row["cpu_others"] = row_others
        row["load_s"], row["first_call_s"] = load_s, first_call_s
        row["info"] = rt.info
        rows.append(row)
    del rt
    around = (before, ctx.sample_matmul())
    for row in rows:
        ctx.yardstick(row, row_precision(name, ref), around)
    ctx.results += rows


def speedups(results: list[dict]) -> None:
    """speedup_vs_eager: eager's median latency over this row's, at the same batch size; speedup_vs_fp32 for a
    reduced-precision artifact: the same runtime's fp32 artifact (its format without the suffix) over this one."""
    eager = {r["batch_size"]: r["latency_ms_p50"] for r in results if r["runtime"] == "eager"}
    local = {(r["runtime"], r["format"], r["batch_size"]): r["latency_ms_p50"] for r in results
             if r["runtime"] != "triton"}
    for r in results:
        e = eager.get(r["batch_size"])
        r["speedup_vs_eager"] = e / r["latency_ms_p50"] if e else None
        precision = r.get("precision", "fp32")
        # the fp32 twin: onnx_int8 -> onnx in the same runtime; openvino-bf16 (the fp32 IR, a bf16 hint) -> openvino
        runtime = r["runtime"].removesuffix(f"-{precision}")
        key = (runtime, r["format"].rsplit("_", 1)[0], r["batch_size"])
        base = local.get(key) if key != (r["runtime"], r["format"], r["batch_size"]) else None  # never itself
        r["speedup_vs_fp32"] = base / r["latency_ms_p50"] if base and precision != "fp32" else None


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
    run.check_writable()  # a run it cannot write to fails now, not after the work
    pairs = targets(run, cfg)
    sizes = [fitted_batch_sizes(ref, cfg.batch_sizes) if cfg.fit_batch_sizes else cfg.batch_sizes for _, ref in pairs]
    if cfg.fit_batch_sizes:  # eager and compiled (the checkpoint) at the sizes the files run, so each row has its x eager
        of_files = tuple(sorted({b for (_, ref), s in zip(pairs, sizes) if ref.format != "checkpoint" for b in s}))
        sizes = [of_files if ref.format == "checkpoint" and of_files else s for (_, ref), s in zip(pairs, sizes)]
    for (name, ref), wanted in zip(pairs, sizes):
        check_batch_sizes(ref, name, wanted)
    # what is measured, taken before it is: a checkpoint that a resumed training replaces meanwhile is not this one
    inputs = {ref.format: artifact_digest(ref.record) if ref.record.get("sha256") else sha256(ref.path)
              for _, ref in pairs}
    device = resolve_device(cfg.device)
    cfg = BenchConfig(**{**asdict(cfg), "threads": cfg.threads or torch.get_num_threads()})
    host = machine()
    with torch_threads(cfg.threads), frozen_heap():
        ctx = BenchContext(run, cfg, device, count_flops(run), progress)
        if cfg.runtimes is None:
            ctx.skipped.update(default_runtimes(run)[1])
        ctx.ceilings = measured_ceilings(ctx, {row_precision(name, ref) for name, ref in pairs})
        ctx.sample_matmul()
        with exact_fp32(device.type):  # on a GPU fp32 rows compute fp32, as verify proved them (TF32 off)
            for (name, ref), wanted in zip(pairs, sizes):
                bench_runtime(ctx, name, ref, wanted)
        ctx.settle()
        remeasure_beaten_ceilings(ctx)
    if not ctx.results:
        raise RuntimeUnavailable("no runtime could run here: " + "; ".join(f"{k}: {v}" for k, v in ctx.skipped.items()))
    host["load_avg_1_5_15_end"] = load_avg()
    section = make_section(ctx, host, inputs)
    with run.committing():  # merged with the recorded section, written and recorded as one step (Ctrl-C waits)
        old = previous_section(run)  # rows of served models (bench --triton-url) stay; local rows are measured together
        # (speedups and shares compare rows of one run), so an earlier run's local rows are replaced, and named
        now = {(series(r), r["batch_size"]) for r in section["results"]}
        section["replaced"] = sorted({series_at(r) for r in old.get("results", [])
                                      if r.get("runtime") != "triton" and (series(r), r["batch_size"]) not in now})
        kept = [r for r in old.get("results", []) if r.get("runtime") == "triton"]
        section["results"] += kept
        speedups(section["results"])  # the served rows kept: against this bench's eager, held to its ceilings ...
        for precision in {r.get("precision", "fp32") for r in kept} - set(section["ceilings"] or {"fp32"}):
            if precision in (old.get("ceilings") or {}):  # ... or, for a precision it did not measure, the earlier
                section["ceilings"][precision] = old["ceilings"][precision]  # (an int8 row held to the fp32 one)
        if section["ceilings"]:
            hold_to_ceilings(section["results"], section["ceilings"])
            section["over_ceiling"] = over_ceiling(section["results"])
        section["served"] = old.get("served", {})
        commit_outputs(run, section, plot=cfg.plot)
    return run.read()["stages"]["bench"]


def make_section(ctx: BenchContext, host: dict, inputs: dict) -> dict:
    """stages.bench; machine_peak_gflops is the fp32 ceiling (the best fp32 rate measured during the run)."""
    speedups(ctx.results)
    rates = [m["gflops"] for m in ctx.matmul]
    matmul = {k: v for k, v in ctx.matmul[0].items() if k not in ("gflops", "gflops_best", "repeats")}
    matmul.update(samples_gflops=rates, spread=max(rates) / min(rates) - 1)
    for r in ctx.results:  # what each row's two samples are judged against, also once merged with another bench's
        r["matmul_best_gflops"] = max(rates)
    spec = ctx.run.model_spec
    peak = max([*rates, ctx.ceilings.get("fp32", {}).get("gflops", 0.0)])
    over = over_ceiling(ctx.results)
    if ctx.ceilings_cache and over:  # a cached ceiling that a row beat was measured low: measure it again next time
        from cnnpack.peak import forget_ceilings

        forget_ceilings(ctx.ceilings_cache["path"], {r["precision"] for r in ctx.results if r["matmul_share"] > 1})
    return {"status": "ok", "machine_peak_gflops": peak, "matmul": matmul, "ceilings": ctx.ceilings,
            "over_ceiling": over, "ceilings_cache": ctx.ceilings_cache,
            "model": f"{user_model.display(spec['arch'])}@{spec['image_size']}px", "model_gflops_per_image": ctx.flops_per_image / 1e9,
            "threads": ctx.cfg.threads, "device": str(ctx.device), "results": ctx.results, "skipped": ctx.skipped,
            "inputs": inputs,
            "machine": host, "libraries": library_versions(), "config": asdict(ctx.cfg), "notes": NOTES}


def previous_section(run: Run) -> dict:
    """The recorded bench section that a new bench merges with: one marked failed or interrupted by the pipeline
    still holds the rows of the bench before (kept, not dropped without a word); one with no rows is nothing."""
    section = run.read().get("stages", {}).get("bench") or {}
    return section if section.get("results") is not None else {}
