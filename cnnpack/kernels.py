"""The matrix kernels of every engine cnnpack runs, timed: the samples each precision's ceiling is the best of.

A row of `cnnpack bench` runs its model's convolutions and matmuls in one engine's kernels (PyTorch/oneDNN, ONNX
Runtime's MLAS, OpenVINO's CPU plugin, which picks AMX or VNNI tiles where the CPU has them). A ceiling taken from one
engine's matmul alone is not a ceiling for another engine's convolutions (issue 21: OpenVINO's int8 resnet18 ran at
1.85x ONNX Runtime's MatMulInteger on an AMX host). So each precision is sampled in every engine that runs it, as a
matmul (weights as a constant, prepacked once, as a model's are) and as a 3x3 convolution of a resnet-like layer:

    fp32: torch.matmul NN/NT, ORT MatMul, OpenVINO MatMul (n = 512..2048); torch conv2d, ORT Conv, OpenVINO Convolution
    int8: ORT MatMulInteger u8 x s8 (n = 512..2048), ORT QLinearConv; OpenVINO MatMul and Convolution behind
          FakeQuantize (its low-precision transformations run them as u8 x i8 kernels)
    bf16: torch.matmul and conv2d in bfloat16 (oneDNN); OpenVINO MatMul and Convolution with the bf16 inference hint

OpenVINO samples are taken when the openvino extra is installed; its bf16 samples only where the CPU computes bf16
natively (elsewhere the plugin silently runs f32, which says nothing about bf16). Each sample is the fastest of
repeated calls after a warm-up, with the rows' thread count.

On a CUDA GPU (`device_samples`) the rows run in PyTorch's cuBLAS and cuDNN kernels: fp32 with TF32 off (as bench and
verify run them), fp16 and bf16 on the tensor cores; matmuls of n = 2048..8192 and the 3x3 convolution at batch 64,
sizes that fill a GPU (an H200's fp32 matmul at n = 1024 ran at a fifth of what resnet18's rows reached).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import numpy as np

SIZES = (512, 1024, 2048)
CONV = (8, 256, 14, 14)  # N, C (= K), H, W of the 3x3 convolution sampled (a resnet18 layer-3 conv at batch 8)


def conv_flop(shape: tuple[int, int, int, int] = CONV) -> float:
    """Multiply-adds x 2 of the 3x3, C -> C, padded convolution of an N x C x H x W input."""
    n, c, h, w = shape
    return 2.0 * n * c * c * 9 * h * w


def best_rate(fn: Callable[[], object], flop: float, seconds: float, min_reps: int = 3) -> float:
    """flop / the fastest of at least `min_reps` calls of `fn()` over `seconds` (after 1 warm-up call), in G/s.

    The fastest call, not the median: a ceiling is the kernel's top speed, and on a shared host the median of a
    short sample sinks with whatever else runs (a row then measured in a quieter moment would pass it)."""
    fn()
    times: list[float] = []
    end = time.perf_counter() + seconds
    while len(times) < min_reps or time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return flop / min(times) / 1e9


def _sample(engine: str, shape: str, fn: Callable[[], object], flop: float, seconds: float) -> dict:
    return {"engine": engine, "shape": shape, "gflops": best_rate(fn, flop, seconds)}


def _growing(one: Callable[[int], dict], sizes: tuple[int, ...] = SIZES) -> list[dict]:
    """`one(n)` for n in `sizes` while the rate still grows (by 5 % or more): a matmul that already saturates the
    cores at n = 1024 is not timed at 2048, the costliest size, on a machine of few cores."""
    out: list[dict] = []
    for n in sizes:
        out.append(one(n))
        if len(out) > 1 and out[-1]["gflops"] < 1.05 * max(s["gflops"] for s in out[:-1]):
            break
    return out


# -- ONNX Runtime ------------------------------------------------------------------------------------
def _ort_session(model, threads: int):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _onnx_model(node, inputs: list, output, inits: list):
    from onnx import helper

    graph = helper.make_graph([node], "kernel", inputs, [output], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _ort_matmul(n: int, op: str, a: np.ndarray, b: np.ndarray, threads: int, seconds: float) -> dict:
    """y = a @ b with `b` an initializer; zero points default to 0."""
    from onnx import helper, numpy_helper
    from onnx.helper import np_dtype_to_tensor_dtype as dt

    out_type = dt(np.dtype(np.int32)) if op == "MatMulInteger" else dt(a.dtype)
    model = _onnx_model(helper.make_node(op, ["a", "b"], ["y"]), [helper.make_tensor_value_info("a", dt(a.dtype), [n, n])],
                        helper.make_tensor_value_info("y", out_type, [n, n]), [numpy_helper.from_array(b, "b")])
    sess, feed = _ort_session(model, threads), {"a": a}
    name = "onnxruntime MatMulInteger u8s8" if op == "MatMulInteger" else "onnxruntime MatMul"
    return _sample(name, f"n={n}", lambda: sess.run(None, feed), 2.0 * n ** 3, seconds)


def _ort_conv(int8: bool, threads: int, seconds: float) -> dict:
    """A 3x3 Conv (fp32) or QLinearConv (u8 activations x s8 weights -> u8), weights as initializers."""
    from onnx import TensorProto, helper, numpy_helper

    n, c, h, w = CONV
    rng = np.random.default_rng(0)
    shape, pads = [n, c, h, w], {"pads": [1, 1, 1, 1], "kernel_shape": [3, 3]}
    if int8:
        x = rng.integers(0, 256, shape, dtype=np.uint8)
        weights = rng.integers(-127, 128, (c, c, 3, 3), dtype=np.int8)
        consts = [numpy_helper.from_array(np.array(v, dt), k) for k, v, dt in (
            ("xs", 0.02, np.float32), ("xz", 128, np.uint8), ("ws", 0.01, np.float32), ("wz", 0, np.int8),
            ("ys", 0.05, np.float32), ("yz", 128, np.uint8))]
        node = helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], **pads)
        elem, name = TensorProto.UINT8, "onnxruntime QLinearConv u8s8"
    else:
        x = rng.standard_normal(shape, np.float32)
        weights = rng.standard_normal((c, c, 3, 3), np.float32)
        consts, node, elem, name = [], helper.make_node("Conv", ["x", "w"], ["y"], **pads), TensorProto.FLOAT, "onnxruntime Conv"
    model = _onnx_model(node, [helper.make_tensor_value_info("x", elem, shape)],
                        helper.make_tensor_value_info("y", elem, shape), [numpy_helper.from_array(weights, "w"), *consts])
    sess, feed = _ort_session(model, threads), {"x": x}
    return _sample(name, "conv3x3 " + "x".join(map(str, CONV)), lambda: sess.run(None, feed), conv_flop(), seconds)


# -- PyTorch (oneDNN / MKL) --------------------------------------------------------------------------
def _torch_samples(dtype, label: str, seconds: float, *, layouts: bool) -> list[dict]:
    import torch

    rng = np.random.default_rng(0)

    def matmul(n: int, nt: bool = False) -> dict:
        a, b = (torch.from_numpy(rng.standard_normal((n, n), np.float32)).to(dtype) for _ in range(2))
        if nt:  # b stored transposed, as a Linear layer's weight is
            bt = b.t().contiguous()
            return _sample(f"torch.matmul{label} NT", f"n={n}", lambda: a @ bt.t(), 2.0 * n ** 3, seconds)
        return _sample(f"torch.matmul{label} NN", f"n={n}", lambda: a @ b, 2.0 * n ** 3, seconds)

    out = _growing(matmul) + (_growing(lambda n: matmul(n, nt=True)) if layouts else [])
    n, c, h, w = CONV
    x = torch.from_numpy(rng.standard_normal(CONV, np.float32)).to(dtype)
    wt = torch.from_numpy(rng.standard_normal((c, c, 3, 3), np.float32)).to(dtype)
    with torch.inference_mode():
        out.append(_sample(f"torch conv2d{label}", "conv3x3 " + "x".join(map(str, CONV)),
                           lambda: torch.nn.functional.conv2d(x, wt, padding=1), conv_flop(), seconds))
    return out


# -- OpenVINO ------------------------------------------------------------------------------------------
def _ov_compile(y, x, precision: str, threads: int):
    from cnnpack.openvino import require

    ov = require()  # through cnnpack's import: its telemetry off

    return ov.Core().compile_model(ov.Model([y], [x]), "CPU", {"INFERENCE_PRECISION_HINT": precision,
                                                                 "NUM_STREAMS": "1", "INFERENCE_NUM_THREADS": str(threads)})


def _fq(node, lo: float, hi: float, levels: int = 256):
    """FakeQuantize: OpenVINO's low-precision transformations run the op behind it on int8 kernels."""
    import openvino.opset13 as ops

    c = [ops.constant(np.float32(v)) for v in (lo, hi, lo, hi)]
    return ops.fake_quantize(node, *c, levels)


def _ov_samples(precision: str, threads: int, seconds: float) -> list[dict]:
    """OpenVINO's MatMul (n = 512..2048) and 3x3 Convolution at `precision` (f32 | bf16 | int8)."""
    from cnnpack.openvino import require

    require()  # before openvino's own import: its telemetry off
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    hint = "bf16" if precision == "bf16" else "f32"
    quant = (lambda v, lo, hi, levels=256: _fq(v, lo, hi, levels)) if precision == "int8" else (lambda v, *_a, **_k: v)

    def matmul(n: int) -> dict:
        a = ops.parameter([n, n], np.float32, name="a")
        b = ops.constant(rng.standard_normal((n, n)).astype(np.float32) * 0.05)
        y = ops.matmul(quant(a, 0.0, 4.0), quant(b, -0.2, 0.2, 255), False, False)
        req, x = _ov_compile(y, a, hint, threads).create_infer_request(), rng.uniform(0, 4, (n, n)).astype(np.float32)
        return _sample(f"openvino MatMul {precision}", f"n={n}", lambda: req.infer({0: x}), 2.0 * n ** 3, seconds)

    out = _growing(matmul)
    n, c, h, w = CONV
    xp = ops.parameter(list(CONV), np.float32, name="x")
    wc = ops.constant(rng.standard_normal((c, c, 3, 3)).astype(np.float32) * 0.05)
    y = ops.convolution(quant(xp, 0.0, 255.0), quant(wc, -0.2, 0.2, 255), [1, 1], [1, 1], [1, 1], [1, 1])
    req, x = _ov_compile(y, xp, hint, threads).create_infer_request(), rng.uniform(0, 255, CONV).astype(np.float32)
    out.append(_sample(f"openvino Convolution {precision}", "conv3x3 " + "x".join(map(str, CONV)),
                       lambda: req.infer({0: x}), conv_flop(), seconds))
    return out


def _openvino(precision: str, threads: int, seconds: float) -> list[dict]:
    """OpenVINO's samples where it is installed (and, for bf16, where the CPU computes bf16 natively), else []."""
    from cnnpack import openvino as ov

    if not ov.available()[0] or (precision == "bf16" and not ov.has_bf16()):
        return []
    with contextlib.suppress(RuntimeError):  # a plugin that refuses a kernel: the other engines' samples stand
        return _ov_samples(precision, threads, seconds)
    return []


# -- per precision ------------------------------------------------------------------------------------
def fp32_samples(threads: int, seconds: float) -> list[dict]:
    import torch

    rng = np.random.default_rng(0)
    out = _torch_samples(torch.float32, "", seconds, layouts=True)
    out += _growing(lambda n: _ort_matmul(n, "MatMul", *(rng.standard_normal((n, n), np.float32) for _ in range(2)),
                                          threads, seconds))
    out.append(_ort_conv(False, threads, seconds))
    return out + _openvino("f32", threads, seconds)


def int8_samples(threads: int, seconds: float) -> list[dict]:
    rng = np.random.default_rng(0)
    out = _growing(lambda n: _ort_matmul(n, "MatMulInteger", rng.integers(0, 256, (n, n), dtype=np.uint8),
                                         rng.integers(-128, 128, (n, n), dtype=np.int8), threads, seconds))
    out.append(_ort_conv(True, threads, seconds))
    return out + _openvino("int8", threads, seconds)


def bf16_samples(threads: int, seconds: float) -> list[dict]:
    import torch

    return _torch_samples(torch.bfloat16, " bf16", seconds, layouts=False) + _openvino("bf16", threads, seconds)


SAMPLES = {"fp32": fp32_samples, "int8": int8_samples, "bf16": bf16_samples}

# -- a GPU (PyTorch: cuBLAS, cuDNN) ----------------------------------------------------------------------
DEVICE_SIZES = (2048, 4096, 8192)
DEVICE_CONV = (64, 256, 14, 14)
DEVICE_PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def device_samples(precision: str, device, seconds: float) -> list[dict]:
    """torch.matmul (n in DEVICE_SIZES, while the rate grows) and a 3x3 conv2d (DEVICE_CONV) in `precision` on
    `device`, each call synchronised; the caller sets TF32 (cnnpack.host.exact_fp32)."""
    import torch

    from cnnpack.host import sync

    sizes, conv = DEVICE_SIZES, DEVICE_CONV
    dtype, wait = getattr(torch, DEVICE_PRECISIONS[precision]), sync(device)
    g = torch.Generator(device=device).manual_seed(0)

    def timed(op: Callable[[], object]) -> Callable[[], None]:
        return lambda: (op(), wait())

    def matmul(n: int) -> dict:
        a, b = (torch.randn(n, n, generator=g, device=device, dtype=dtype) for _ in range(2))
        return _sample(f"torch.matmul {precision}", f"n={n}", timed(lambda: a @ b), 2.0 * n ** 3, seconds)

    out = _growing(matmul, sizes)
    c = conv[1]
    x = torch.randn(conv, generator=g, device=device, dtype=dtype)
    wt = torch.randn((c, c, 3, 3), generator=g, device=device, dtype=dtype)
    with torch.inference_mode():
        out.append(_sample(f"torch conv2d {precision}", "conv3x3 " + "x".join(map(str, conv)),
                           timed(lambda: torch.nn.functional.conv2d(x, wt, padding=1)), conv_flop(conv), seconds))
    return out
