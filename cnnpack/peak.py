"""The machine's limit per precision: the yardstick a benchmark row's share is taken against.

A yardstick must be a ceiling: a row that reaches 103 % of it says the yardstick was too low, not
that the model beat the machine. So the rate of each precision is the best of several matrix
multiplies (sizes, layouts and engines: PyTorch's BLAS and ONNX Runtime's MLAS, which runs the
ONNX rows), each timed as the median of repeated calls after a warm-up, with the thread count of
the rows. The ISA's theoretical peak (cores x clock x operations per cycle from the CPU flags) is
printed beside it, to show how far from the silicon the measured ceiling is.

    fp32: torch.matmul (NN and NT) and ORT MatMul (weights as an initializer, prepacked), n = 512..2048
    int8: ORT MatMulInteger, uint8 x int8 -> int32 (the VNNI kernel the QDQ rows run on), n = 512..2048
"""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path

import numpy as np

from cnnpack.host import sync as sync_of
from cnnpack.host import torch_threads, usable_cores  # noqa: F401 - usable_cores: peak's name for it stays

SIZES = (512, 1024, 2048)


def short(section: dict) -> str:
    """A bench section's ceilings in a few words (`fp32 229, int8 875`), for plot titles."""
    c = section.get("ceilings") or {}
    return ", ".join(f"{p} {v['gflops']:.0f}" for p, v in c.items()) or f"fp32 {section.get('machine_peak_gflops', 0):.0f}"
PRECISIONS = ("fp32", "int8", "bf16")


def matmul_rate(device, n: int = 2048, seconds: float = 1.0) -> dict:
    """This machine's fp32 matrix-multiply rate (GFLOP/s) with the current torch thread count.

    The median over at least 10 multiplies (after warm-up) is the figure used; the best one is
    recorded too. TF32 stays off on a GPU, so it is an fp32 rate.
    """
    import torch

    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=g).to(device) for _ in range(2))
    sync = sync_of(device)
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


def _median_rate(fn, flop: float, seconds: float, min_reps: int = 5) -> float:
    """flop / median seconds of `fn()` over at least `min_reps` calls and `seconds` (after 2 warm-up calls)."""
    for _ in range(2):
        fn()
    times: list[float] = []
    end = time.perf_counter() + seconds
    while len(times) < min_reps or time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return flop / float(np.median(times)) / 1e9


def _ort_session(model, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _matmul_model(n: int, op: str, a_type: int, b: np.ndarray, out_type: int):
    """y = a @ b with `b` an initializer (prepacked once, as a model's weights are); zero points default to 0."""
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(b, "b")]
    graph = helper.make_graph([helper.make_node(op, ["a", "b"], ["y"])], "mm",
                              [helper.make_tensor_value_info("a", a_type, [n, n])],
                              [helper.make_tensor_value_info("y", out_type, [n, n])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _fp32_rates(threads: int, seconds: float) -> list[dict]:
    import torch
    from onnx import TensorProto

    rng = np.random.default_rng(0)
    out = []
    for n in SIZES:
        a, b = (torch.from_numpy(rng.standard_normal((n, n), np.float32)) for _ in range(2))
        bt = b.t().contiguous()
        flop = 2.0 * n ** 3
        out.append({"engine": "torch.matmul NN", "n": n, "gflops": _median_rate(lambda: a @ b, flop, seconds)})  # noqa: B023 - called at once
        out.append({"engine": "torch.matmul NT", "n": n, "gflops": _median_rate(lambda: a @ bt.t(), flop, seconds)})  # noqa: B023 - called at once
        sess = _ort_session(_matmul_model(n, "MatMul", TensorProto.FLOAT, b.numpy(), TensorProto.FLOAT), threads)
        feed = {"a": a.numpy()}
        out.append({"engine": "onnxruntime MatMul", "n": n,
                    "gflops": _median_rate(lambda: sess.run(None, feed), flop, seconds)})  # noqa: B023
    return out


def _int8_rates(threads: int, seconds: float) -> list[dict]:
    from onnx import TensorProto

    rng = np.random.default_rng(0)
    out = []
    for n in SIZES:
        a = rng.integers(0, 256, (n, n), dtype=np.uint8)
        b = rng.integers(-128, 128, (n, n), dtype=np.int8)
        sess = _ort_session(_matmul_model(n, "MatMulInteger", TensorProto.UINT8, b, TensorProto.INT32), threads)
        feed = {"a": a}
        out.append({"engine": "onnxruntime MatMulInteger u8s8", "n": n,
                    "gflops": _median_rate(lambda: sess.run(None, feed), 2.0 * n ** 3, seconds)})  # noqa: B023
    return out


def _bf16_rates(threads: int, seconds: float) -> list[dict]:
    """torch.matmul in bf16 (oneDNN's AVX-512 BF16 / AMX kernels) and OpenVINO's MatMul at bf16 inference precision."""
    import torch

    rng = np.random.default_rng(0)
    out = []
    for n in SIZES:
        a, b = (torch.from_numpy(rng.standard_normal((n, n), np.float32)).to(torch.bfloat16) for _ in range(2))
        out.append({"engine": "torch.matmul bf16", "n": n,
                    "gflops": _median_rate(lambda: a @ b, 2.0 * n ** 3, seconds)})  # noqa: B023
        with contextlib.suppress(ImportError, RuntimeError):
            out.append({"engine": "openvino MatMul bf16", "n": n, "gflops": _ov_bf16_rate(n, threads, seconds)})
    return out


def _ov_bf16_rate(n: int, threads: int, seconds: float) -> float:
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    a = ops.parameter([n, n], np.float32, name="a")
    model = ov.Model([ops.matmul(a, ops.constant(rng.standard_normal((n, n)).astype(np.float32)), False, False)], [a])
    compiled = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16", "NUM_STREAMS": "1",
                                                       "INFERENCE_NUM_THREADS": str(threads)})
    req, x = compiled.create_infer_request(), rng.standard_normal((n, n)).astype(np.float32)
    return _median_rate(lambda: req.infer({0: x}), 2.0 * n ** 3, seconds)


def ceilings(threads: int, *, precisions: set[str] = frozenset(PRECISIONS), seconds: float = 0.25) -> dict[str, dict]:
    """{precision: {gflops (the best), best (which multiply), samples[], theoretical_gflops}} for `precisions`."""
    import torch

    result = {}
    with torch_threads(threads):
        for precision, fn in (("fp32", _fp32_rates), ("int8", _int8_rates), ("bf16", _bf16_rates)):
            if precision not in precisions:
                continue
            samples = fn(threads, seconds)
            best = max(samples, key=lambda s: s["gflops"])
            theory = theoretical_gflops(precision, threads)
            if best["gflops"] > theory["gflops"] > 0:  # the clock the machine reports is not the one it runs at
                theory["implied_mhz_at_least"] = round(best["gflops"] * 1e3 / (theory["cores"] * theory["ops_per_cycle"]))
                theory["note"] = (f"measured above it: the reported clock ({theory['mhz']:.0f} MHz, a VM's base clock?) "
                                  f"is below the real one, at least {theory['implied_mhz_at_least']} MHz")
            result[precision] = {"gflops": best["gflops"], "best": f"{best['engine']} n={best['n']}",
                                 "samples": [{**s, "gflops": round(s["gflops"], 1)} for s in samples],
                                 "theoretical_gflops": theory, "threads": torch.get_num_threads()}
    return result


# -- the silicon's number ---------------------------------------------------------------------------
def cpu_info() -> dict:
    """Model, vendor, flags of interest and the highest clock this machine reports."""
    text = ""
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
    field = lambda k: (re.search(rf"^{k}\s*:\s*(.+)$", text, re.M) or [None, ""])[1].strip()  # noqa: E731
    flags = set(field("flags").split())
    mhz = max((float(v) for v in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", text, re.M)), default=0.0)
    with contextlib.suppress(OSError, ValueError):
        mhz = max(mhz, int(Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()) / 1000)
    keys = ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16")
    return {"model": field("model name"), "vendor": field("vendor_id"), "mhz": mhz,
            "flags": sorted(k for k in keys if k in flags)}


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
        if flags & {"avx512_vnni", "avx_vnni"}:
            return 4 * fp32, f"VNNI: 4 int8 MAC per 32-bit lane, {why}"
        return 2 * fp32, f"no VNNI: int16 pairs (vpmaddubsw + vpmaddwd), {why}"
    return fp32, why


def theoretical_gflops(precision: str, threads: int) -> dict:
    info = cpu_info()
    per_cycle, why = ops_per_cycle(precision, info)
    cores = min(threads, usable_cores())
    return {"gflops": cores * info["mhz"] / 1e3 * per_cycle, "cores": cores, "mhz": info["mhz"],
            "ops_per_cycle": per_cycle, "assumes": why, "cpu": info["model"], "flags": info["flags"]}
