"""The machine's limit per precision: the yardstick a benchmark row's share is taken against.

A yardstick must be a ceiling: a row that reaches 103 % of it says the yardstick was too low, not
that the model beat the machine. So the rate of each precision is the best of the matrix kernels of
every engine cnnpack runs for it (`cnnpack.kernels`: matmuls and convolutions in PyTorch, ONNX Runtime
and OpenVINO), each timed as the fastest of repeated calls after a warm-up, with the thread count of
the rows. They are measured once per machine and reused (`cached_ceilings`, keyed by CPU model,
flags, threads and library versions). The ISA's theoretical peak (cores x clock x operations per
cycle from the CPU flags) and the matrix engine the flags give each precision (AMX, AVX-512
VNNI/BF16, AVX2) are recorded beside it.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import re
import time
from pathlib import Path

import numpy as np

from cnnpack.host import cpu_flags, cpu_name, cpuinfo_field, torch_threads, usable_cores  # noqa: F401 - usable_cores: peak's name for it stays
from cnnpack.host import sync as sync_of

PRECISIONS = ("fp32", "int8", "bf16")
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni"})  # int8 dot products (u8 x s8 into int32, no int16 pair sums)
# Each kernel is timed for this long (the fastest call counts). 0.1 s gave the same ceilings as 0.25 s within 2 %
# on 2 AVX2 cores (fp32 204 vs 204-205, int8 208-212 vs 204-212 GFLOP/s, interleaved) in 2.3 s instead of 5.1-5.9 s
# for the 17 kernels; a ceiling a row beats is measured again for longer (RECHECK_S).
SAMPLE_S = 0.1
RECHECK_S = 0.25


def short(section: dict) -> str:
    """A bench section's ceilings in a few words (`fp32 229, int8 875`), for plot titles."""
    c = section.get("ceilings") or {}
    return ", ".join(f"{p} {v['gflops']:.0f}" for p, v in c.items()) or f"fp32 {section.get('machine_peak_gflops', 0):.0f}"


def matmul_rate(device, n: int = 1024, seconds: float = 0.1, min_reps: int = 3) -> dict:
    """This machine's fp32 matrix-multiply rate (GFLOP/s) with the current torch thread count.

    The median over at least `min_reps` multiplies and `seconds` (after one warm-up call) is the figure used; the
    best one is recorded too. TF32 stays off on a GPU, so it is an fp32 rate.
    """
    import torch

    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device) for _ in range(2))
    sync = sync_of(device)
    a @ b  # warm-up
    sync()
    times: list[float] = []
    t_end = time.perf_counter() + seconds
    while len(times) < min_reps or time.perf_counter() < t_end:
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


def ceilings(threads: int, *, precisions: set[str] = frozenset(PRECISIONS), seconds: float = SAMPLE_S) -> dict[str, dict]:
    """{precision: {gflops (the best), best (which multiply), samples[], theoretical_gflops}} for `precisions`."""
    import torch

    from cnnpack.kernels import SAMPLES

    result = {}
    with torch_threads(threads):
        for precision, fn in SAMPLES.items():
            if precision not in precisions:
                continue
            samples = fn(threads, seconds)
            best = max(samples, key=lambda s: s["gflops"])
            result[precision] = {"gflops": 0.0, "matrix_engine": matrix_engine(precision, cpu_info()),
                                 "samples": [{**s, "gflops": round(s["gflops"], 1)} for s in samples],
                                 "theoretical_gflops": theoretical_gflops(precision, threads),
                                 "threads": torch.get_num_threads()}
            raise_ceiling(result[precision], best["gflops"], f"{best['engine']} {best['shape']}")
    return result


def raise_ceiling(ceiling: dict, gflops: float, best: str) -> None:
    """A ceiling (an entry of `ceilings`) raised to a faster kernel's rate, which it then names; above the ISA's
    theoretical peak, the peak says why (the clock the machine reports is not the one it runs at)."""
    if gflops <= ceiling["gflops"]:
        return
    ceiling.update(gflops=gflops, best=best)
    theory = ceiling.get("theoretical_gflops")
    if theory and gflops > theory["gflops"] > 0:
        theory["implied_mhz_at_least"] = round(gflops * 1e3 / (theory["cores"] * theory["ops_per_cycle"]))
        theory["note"] = (f"measured above it: the reported clock ({theory['mhz']:.0f} MHz, a VM's base clock?) "
                          f"is below the real one, at least {theory['implied_mhz_at_least']} MHz")


def device_ceilings(device, *, precisions: set[str], seconds: float = SAMPLE_S) -> dict[str, dict]:
    """On a GPU: {precision: {gflops, best, matrix_engine, samples, device}} for the precisions among fp32 (TF32 off:
    the rows run so), fp16 and bf16; measured each bench (no cache: a GPU is not keyed by CPU flags)."""
    import torch

    from cnnpack.host import exact_fp32
    from cnnpack.kernels import DEVICE_PRECISIONS, device_samples

    cuda = device.type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else str(device)
    result = {}
    with exact_fp32(device.type):
        for precision in sorted(precisions & DEVICE_PRECISIONS.keys()):
            if precision == "bf16" and cuda and not _native_bf16():
                continue  # emulated bf16 (pre-Ampere) is no ceiling of tensor cores
            try:
                samples = device_samples(precision, device, seconds)
            except RuntimeError:  # out of memory at n = 8192 on a small or shared GPU, a kernel cuDNN lacks:
                continue  # that precision's rows are held to fp32's ceiling (or their matmul rate) instead
            finally:
                if cuda:
                    torch.cuda.empty_cache()  # the samples' blocks, not kept from the rows
            best = max(samples, key=lambda s: s["gflops"])
            engine = "CUDA cores, TF32 off" if precision == "fp32" else "tensor cores"
            result[precision] = {"gflops": best["gflops"], "best": f"{best['engine']} {best['shape']}",
                                 "matrix_engine": f"{name} {engine}", "device": name,
                                 "samples": [{**s, "gflops": round(s["gflops"], 1)} for s in samples]}
    return result


def _native_bf16() -> bool:
    import torch

    try:
        return torch.cuda.is_bf16_supported(including_emulation=False)
    except TypeError:  # torch before 2.5 has no such argument (and counted no emulation)
        return torch.cuda.is_bf16_supported()


# -- once per machine -------------------------------------------------------------------------------
CACHE_VERSION = 2  # bump when the multiplies measured change (2: the fastest call, was the median): old caches are not reused


def machine_key(threads: int) -> dict:
    """What a measured ceiling depends on: the CPU (model and every flag), the threads, the libraries' versions."""
    from cnnpack.rundir import library_versions

    text = ""
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
    flags = " ".join(sorted(cpu_flags(text)))
    libs = {k: v for k, v in library_versions().items() if k in ("torch", "onnxruntime", "onnxruntime-gpu", "openvino")}
    return {"version": CACHE_VERSION, "cpu": cpu_info()["model"], "flags_sha256": hashlib.sha256(flags.encode()).hexdigest(),
            "threads": threads, "libraries": libs}


def cached_ceilings(threads: int, *, precisions: set[str], seconds: float = SAMPLE_S) -> tuple[dict[str, dict], dict]:
    """`ceilings` measured once per machine: read from `$CNNPACK_CACHE/ceilings/<key>.json` when that file was
    written for the same `machine_key`, measured (only the precisions it lacks) and stored otherwise.

    Returns (ceilings, {path, reused: [...], measured: [...], measured_at}).
    """
    from cnnpack.atomic import atomic_write_json
    from cnnpack.rundir import now
    from cnnpack.shapes import cache_root

    key = machine_key(threads)
    path = cache_root() / "ceilings" / f"{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}.json"
    stored: dict = {}
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(path.read_text())
        stored = data["ceilings"] if data.get("key") == key else {}
    missing = set(precisions) - set(stored)
    if missing:
        stored = {**stored, **ceilings(threads, precisions=missing, seconds=seconds)}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {"key": key, "ceilings": stored, "measured_at": now()})
    info = {"path": str(path), "reused": sorted(set(precisions) - missing), "measured": sorted(missing)}
    return {p: copy.deepcopy(stored[p]) for p in precisions}, info


def forget_ceilings(path: str | Path, precisions: set[str]) -> None:
    """Drops `precisions` from a cached ceilings file (a row measured above one: it was measured low), so the next
    bench measures them again."""
    from cnnpack.atomic import atomic_write_json

    with contextlib.suppress(OSError, ValueError, KeyError):
        data = json.loads(Path(path).read_text())
        data["ceilings"] = {p: v for p, v in data["ceilings"].items() if p not in precisions}
        atomic_write_json(Path(path), data)


def remember_ceiling(path: str | Path, precision: str, entry: dict) -> None:
    """Stores a ceiling measured higher than the cached one (bench re-measures one a row beat)."""
    from cnnpack.atomic import atomic_write_json

    with contextlib.suppress(OSError, ValueError, KeyError):
        data = json.loads(Path(path).read_text())
        data["ceilings"][precision] = entry
        atomic_write_json(Path(path), data)


# -- the silicon's number ---------------------------------------------------------------------------
def cpu_info() -> dict:
    """Model, vendor, flags of interest and the highest clock this machine reports."""
    text = ""
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
    flags = cpu_flags(text)
    mhz = max((float(v) for v in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M)), default=0.0)
    with contextlib.suppress(OSError, ValueError):
        mhz = max(mhz, int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1000)
    keys = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
    return {"model": cpu_name(text), "vendor": cpuinfo_field(text, "vendor_id"), "mhz": mhz,
            "flags": sorted(k for k in keys if k in flags)}


def isa_tag(info: dict | None = None) -> str:
    """The widest matrix unit this CPU has in one word (amx, avx512, avx2, sse): what names a host's benchmark records."""
    flags = set((info or cpu_info())["flags"])
    return "amx" if "amx_tile" in flags else "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "sse"


def matrix_engine(precision: str, info: dict) -> str:
    """The CPU's matrix unit behind a precision, from its flags: AMX, AVX-512 VNNI / BF16, AVX-VNNI, AVX2."""
    flags = set(info["flags"])
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "SSE"
    if precision == "int8":
        if "amx_int8" in flags:
            return "AMX (int8 tiles)"
        if "avx512_vnni" in flags:
            return "AVX-512 VNNI"
        if "avx_vnni" in flags:
            return "AVX-VNNI"
        return f"{simd} (no VNNI: int16 pairs)"
    if precision == "bf16":
        if "amx_bf16" in flags:
            return "AMX (bf16 tiles)"
        if "avx512_bf16" in flags:
            return "AVX-512 BF16"
        return f"{simd} (no native bf16: computed in fp32)"
    return f"{simd} FMA" if "fma" in flags else simd


def ops_per_cycle(precision: str, info: dict) -> tuple[float, str]:
    """Operations per cycle per core (a multiply-add counts 2) and the assumption it rests on."""
    flags, amd = set(info["flags"]), info["vendor"] == "AuthenticAMD"
    if "avx512f" in flags:
        # Zen 4 runs 512-bit ops on two 256-bit FMA pipes; Xeons with AVX-512 have two 512-bit FMA ports
        lanes, why = (16, "2 x 256-bit FMA pipes (Zen 4)") if amd else (32, "2 x 512-bit FMA ports (Xeon)")
    elif "fma" in flags:
        lanes, why = 16, "2 x 256-bit FMA ports (AVX2)"
    else:
        lanes, why = 4, "SSE, no FMA"
    fp32 = 2 * lanes  # FMA lanes x 2 ops
    if precision == "fp32":
        return fp32, why
    if "amx_int8" in flags and precision == "int8":
        return 2048.0, "AMX int8 tiles (1024 MAC/cycle)"
    if precision == "bf16":
        if "amx_bf16" in flags:
            return 1024.0, "AMX bf16 tiles (512 MAC/cycle)"
        if "avx512_bf16" in flags:
            return 2 * fp32, f"AVX-512 BF16: 2 bf16 MAC per 32-bit lane, {why}"
        return fp32, f"no native bf16: converted to fp32, {why}"
    if precision == "int8":
        if flags & VNNI_FLAGS:
            return 4 * fp32, f"VNNI: 4 int8 MAC per 32-bit lane, {why}"
        return 2 * fp32, f"no VNNI: int16 pairs (vpmaddubsw + vpmaddwd), {why}"
    return fp32, why


def theoretical_gflops(precision: str, threads: int) -> dict:
    info = cpu_info()
    per_cycle, why = ops_per_cycle(precision, info)
    cores = min(threads, usable_cores())
    return {"gflops": cores * info["mhz"] / 1e3 * per_cycle, "cores": cores, "mhz": info["mhz"],
            "ops_per_cycle": per_cycle, "assumes": why, "cpu": info["model"], "flags": info["flags"]}
