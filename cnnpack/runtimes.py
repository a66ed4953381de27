"""The runtime registry: one small interface over every way to run the model.

    rt = RUNTIMES.get("onnxruntime").load(artifact, device)   # or load_runtime(...)
    logits = rt.predict(batch)                                 # (N, 3, H, W) raw pixels -> (N, K)

`verify`, `bench` and `evaluate` are written once against this interface, so a served model is
checked exactly like a local file. A runtime that cannot run here raises RuntimeUnavailable
with the reason; callers skip it and say so, never silently.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from cnnpack.artifacts import ArtifactRef, artifact_ref
from cnnpack.errors import RuntimeUnavailable, StageFailed, UserInputError, shell
from cnnpack.registry import Registry
from cnnpack.rundir import Run, artifact_digest


class Loaded(Protocol):
    name: str
    info: dict

    def predict(self, batch: np.ndarray) -> np.ndarray: ...


RUNTIMES: Registry = Registry("runtime")


def _torch_device(device: str):
    from cnnpack.train import resolve_device

    return resolve_device(device)


class EagerRuntime:
    """The PyTorch checkpoint, wrapped to take raw pixels, in inference mode."""

    name = "eager"
    format = "checkpoint"

    def __init__(self, model, device, dtype=None) -> None:
        self.model, self.device, self.dtype = model, device, dtype
        self.info: dict = {"device": str(device)}

    @classmethod
    def build(cls, artifact: ArtifactRef, device: str = "cpu"):
        from cnnpack.models import RawPixels
        from cnnpack.train import load_checkpoint

        dev = _torch_device(device)
        net, spec, digest = load_checkpoint(artifact.run, device=dev)
        return RawPixels(net, spec.mean, spec.std).to(dev).eval(), dev, digest

    @classmethod
    def load(cls, artifact: ArtifactRef, device: str = "cpu", **_: object) -> EagerRuntime:
        model, dev, digest = cls.build(artifact, device)
        rt = cls(model, dev)
        rt.info["checkpoint_sha256"] = digest  # the bytes loaded: verify holds them to the export's source
        return rt

    def predict(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            if self.dtype is not None:
                x = x.to(self.dtype)
            return self.model(x).float().cpu().numpy()


class CompiledRuntime(EagerRuntime):
    """The eager model under `torch.compile`: what a user would try instead of exporting.

    With `freezing` (the default; PyTorch's advice for inference) inductor treats the weights as
    constants: BatchNorm folded, convolution weights pre-packed. On 2 CPU cores it took resnet18@224
    from about 30 to 19 ms at batch 1 and from 610 to 490 ms at batch 32 (benchmarks/results/bench-tuning-*.md).
    """

    name = "compiled"

    def __init__(self, model, device, dtype=None, freezing: bool = False) -> None:
        super().__init__(model, device, dtype)
        self.freezing = freezing
        self._compiled_shapes: set[tuple[int, ...]] = set()

    @classmethod
    def load(cls, artifact: ArtifactRef, device: str = "cpu", *, freezing: bool = True,
             **_: object) -> CompiledRuntime:
        import torch

        from cnnpack.host import prepare_inductor, start_header_build

        prepare_inductor()  # quiet (no CUDA toolkit here), and without inductor's redundant ISA probes
        model, dev, _ = cls.build(artifact, device)
        cls.precheck()
        if dev.type == "cpu":
            start_header_build()  # its kernels' precompiled header, built while the first call traces (or found built)
        try:
            compiled = torch.compile(model, dynamic=False)
        except RuntimeError as e:  # no C++ compiler, unsupported platform
            raise RuntimeUnavailable(f"torch.compile unavailable: {str(e).splitlines()[0]}") from None
        rt = cls(compiled, dev, freezing=freezing)
        rt.info.update(backend="inductor", freezing=freezing)
        return rt

    @classmethod
    def precheck(cls) -> None:
        """Inductor's CPU kernels are C++ (and on CUDA Triton builds its launcher with the system's compiler): without
        one torch.compile failed at its first call, with inductor's InvalidCxxCompiler traceback, and the default
        bench (so the main command) ended there."""
        from cnnpack.host import COMPILER_INSTALL, compiler_missing

        if why := compiler_missing():
            raise RuntimeUnavailable(f"{cls.name}: torch.compile needs a C++ compiler for its CPU kernels: {why}; "
                                     f"{COMPILER_INSTALL}")

    def predict(self, batch: np.ndarray) -> np.ndarray:
        if batch.shape in self._compiled_shapes:
            return super().predict(batch)
        # inductor compiles on the first call with each shape and reads `freezing` only then,
        # so the process-wide setting is switched on for that call alone
        from torch._inductor import config

        try:
            with config.patch(freezing=self.freezing):
                out = super().predict(batch)
        except Exception:  # a compiler that answers --version but builds nothing (CXX=true: inductor's IndexError)
            from cnnpack.host import COMPILER_INSTALL, compiler_fails

            if self.device.type == "cpu" and (why := compiler_fails()):
                raise RuntimeUnavailable(f"{self.name}: torch.compile could not build its CPU kernels: the C++ "
                                         f"compiler does not work: {why}; {COMPILER_INSTALL}") from None
            raise
        self._compiled_shapes.add(batch.shape)
        return out


class TorchScriptRuntime(EagerRuntime):
    """The exported TorchScript file, loaded as Triton's libtorch backend would (optionally optimised)."""

    name = "torchscript"
    format = "torchscript"

    @classmethod
    def load(cls, artifact: ArtifactRef, device: str = "cpu", *, optimize: bool = False,
             **_: object) -> TorchScriptRuntime:
        import warnings

        import torch

        dev = _torch_device(device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            try:
                model = torch.jit.load(str(artifact.path), map_location=dev).eval()
            except RuntimeError as e:
                raise UserInputError(f"cannot load {artifact.path}: {str(e).splitlines()[0]}") from None
            if optimize:
                model = torch.jit.optimize_for_inference(model)
        half = artifact.record.get("input", {}).get("dtype") == "float16"
        rt = cls(model, dev, torch.float16 if half else None)
        rt.info["optimized_for_inference"] = optimize
        return rt


class OrtRuntime:
    """The exported ONNX file in ONNX Runtime with one execution provider (+ CPU fallback)."""

    name = "onnxruntime"
    format = "onnx"
    formats = ("onnx", "onnx_int8")  # the QDQ int8 file runs in the same runtime (MLAS int8 kernels on the CPU)
    provider = "CPUExecutionProvider"
    provider_options: dict = {}
    exact_options: dict = {}  # with exact=True: full fp32 math (no TF32, no fp16 engines), for parity checks

    def __init__(self, session, input_name: str, dtype) -> None:
        self.session, self.input_name, self.dtype = session, input_name, dtype
        self.info = {"providers": session.get_providers()}

    @classmethod
    def session_options(cls, threads: int | None):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.log_severity_level = 3  # the GPU build warns about missing CUDA on every CPU session
        if threads:
            so.intra_op_num_threads = threads
            so.inter_op_num_threads = 1
        return so

    @classmethod
    def load(cls, artifact: ArtifactRef, device: str = "cpu", *, threads: int | None = None,
             exact: bool = False, **_: object) -> OrtRuntime:
        import onnxruntime as ort

        if cls.provider not in ort.get_available_providers():
            raise RuntimeUnavailable(f"{cls.name}: this onnxruntime build has no {cls.provider}")
        cls.precheck()
        ort.set_default_logger_severity(3)
        providers = [(cls.provider, {**cls.provider_options, **(cls.exact_options if exact else {})})]
        if cls.provider != "CPUExecutionProvider":
            providers.append("CPUExecutionProvider")
        try:
            sess = ort.InferenceSession(str(artifact.path), cls.session_options(threads), providers=providers)
        except (*_ort_errors(), RuntimeError) as e:
            raise UserInputError(f"ONNX Runtime cannot load {artifact.path}: {str(e).splitlines()[0]}") from None
        if sess.get_providers()[0] != cls.provider:
            # the GPU build lists CUDA/TensorRT even without a GPU and silently falls back to the CPU
            raise RuntimeUnavailable(f"{cls.name}: {cls.provider} is installed but the session fell back to "
                                     f"{sess.get_providers()[0]} (no usable GPU/driver/library here)")
        inp = sess.get_inputs()[0]
        dtype = np.float16 if inp.type == "tensor(float16)" else np.float32
        rt = cls(sess, inp.name, dtype)
        rt.info.update(threads=threads, exact=exact)
        return rt

    @classmethod
    def precheck(cls) -> None:
        """Says why a provider cannot work before ONNX Runtime tries (and prints its own noise)."""

    def predict(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=self.dtype)
        try:
            y = self.session.run(None, {self.input_name: x})[0]
        except _ort_errors() as e:
            raise StageFailed(f"{self.name} failed on a batch of shape {list(x.shape)}: "
                              f"{str(e).splitlines()[0]}") from None
        return y.astype(np.float32, copy=False)


def _ort_errors() -> tuple[type[Exception], ...]:
    """ONNX Runtime's own exception classes (they derive from Exception, not RuntimeError)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as st

    names = ("Fail", "InvalidArgument", "InvalidGraph", "InvalidProtobuf", "NoSuchFile", "NoModel",
             "NotImplemented", "RuntimeException", "EPFail", "EngineError")
    return tuple(getattr(st, n) for n in names if hasattr(st, n))


def _require_gpu(name: str) -> None:
    import torch

    if not torch.cuda.is_available():
        raise RuntimeUnavailable(f"{name}: no CUDA GPU is visible on this machine")


class OrtCudaRuntime(OrtRuntime):
    name = "onnxruntime-cuda"
    provider = "CUDAExecutionProvider"
    exact_options = {"use_tf32": "0"}

    @classmethod
    def precheck(cls) -> None:
        _require_gpu(cls.name)


class OrtTensorrtRuntime(OrtRuntime):
    name = "onnxruntime-tensorrt"
    provider = "TensorrtExecutionProvider"
    provider_options = {"trt_fp16_enable": True, "trt_engine_cache_enable": True,
                        "trt_engine_cache_path": "/tmp/cnnpack-trt-cache"}
    exact_options = {"trt_fp16_enable": False}

    @classmethod
    def precheck(cls) -> None:
        import ctypes

        _require_gpu(cls.name)
        try:
            ctypes.CDLL("libnvinfer.so.10")
        except OSError:
            raise RuntimeUnavailable(f"{cls.name}: TensorRT libraries (libnvinfer.so.10) not found; "
                                     "pip install tensorrt-cu12 or use the NGC container") from None


class OpenVinoRuntime:
    """An OpenVINO IR on the CPU plugin: one stream, the bench's thread count, f32 inference precision
    (an int8 IR runs its int8 kernels; `openvino-bf16` runs the fp32 IR in bf16)."""

    name = "openvino"
    format = "openvino"
    formats = ("openvino", "openvino_int8")
    inference_precision = "f32"
    precision: str | None = None  # None: the artifact's own; bf16 for the bf16 runtime

    def __init__(self, compiled) -> None:
        self.compiled = compiled
        self.request = compiled.create_infer_request()
        self.info = {"device": "CPU", "inference_precision": self.inference_precision,
                     "threads": compiled.get_property("INFERENCE_NUM_THREADS")}

    @classmethod
    def precheck(cls) -> None:
        from cnnpack.openvino import require

        require(f"runtime {cls.name}")

    @classmethod
    def load(cls, artifact: ArtifactRef, device: str = "cpu", *, threads: int | None = None,
             **_: object) -> OpenVinoRuntime:
        from cnnpack import openvino as ov

        cls.precheck()
        if device not in ("cpu", "auto"):
            raise RuntimeUnavailable(f"{cls.name}: cnnpack runs OpenVINO on the CPU (got --device {device})")
        model = ov.read(artifact.path)
        return cls(ov.compile_cpu(model, threads=threads, precision=cls.inference_precision))

    def predict(self, batch: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(batch, dtype=np.float32)
        return np.asarray(self.request.infer({0: x})[0], dtype=np.float32)


class OpenVinoBf16Runtime(OpenVinoRuntime):
    """The fp32 IR with bf16 inference precision (INFERENCE_PRECISION_HINT): only where the CPU has bf16."""

    name = "openvino-bf16"
    formats = ("openvino",)
    inference_precision = "bf16"
    precision = "bf16"

    @classmethod
    def precheck(cls) -> None:
        from cnnpack.openvino import has_bf16, require

        require(f"runtime {cls.name}")
        if not has_bf16():
            raise RuntimeUnavailable(f"{cls.name}: this CPU has no native bf16 (AVX-512 BF16 or AMX); "
                                     "use the openvino runtime (f32)")


def served_ref(run: Run | None, url: str | None, model: str | None, protocol: str = "http",
               timeout_s: float | None = None) -> ArtifactRef:
    """What the triton runtime loads: `model` on the server at `url`, recorded under `triton:<model>`.

    Without `model`: the model the run's `cnnpack triton` stage laid out.
    """
    from cnnpack.client import DEFAULT_TIMEOUT_S

    if timeout_s is not None and not timeout_s > 0:  # (also refuses NaN)
        raise UserInputError(f"--timeout must be > 0 seconds, got {timeout_s}")
    if not model:
        if run is None:
            raise UserInputError("name the served model with --model")
        model = run.stage("triton", hint=f"`cnnpack triton --run {shell(run.path)}` (or pass --model NAME)")["name"]

    record = {"url": url, "model": model, "protocol": protocol, "timeout_s": timeout_s or DEFAULT_TIMEOUT_S}
    return ArtifactRef(run, f"triton:{model}", None, record)


from cnnpack.pt2 import AotiRuntime  # noqa: E402 - in their own modules, registered with the others here
from cnnpack.runtime_triton import TritonRuntime  # noqa: E402

for _rt in (EagerRuntime, CompiledRuntime, AotiRuntime, TorchScriptRuntime, OrtRuntime, OrtCudaRuntime,
            OrtTensorrtRuntime, OpenVinoRuntime, OpenVinoBf16Runtime, TritonRuntime):
    RUNTIMES.register(_rt.name)(_rt)

# which runtime reads which format by default
FORMAT_RUNTIME = {"checkpoint": "eager", "onnx": "onnxruntime", "onnx_int8": "onnxruntime", "pt2": "aoti",
                  "torchscript": "torchscript", "openvino": "openvino", "openvino_int8": "openvino"}


def reads(cls, fmt: str) -> bool:
    """Whether runtime class `cls` loads artifacts of format `fmt`."""
    return fmt in getattr(cls, "formats", (cls.format,))


# the runtime of a format on a CUDA GPU where its default one (above) computes on the CPU whatever `device` says
CUDA_RUNTIME = {"onnx": "onnxruntime-cuda", "onnx_int8": "onnxruntime-cuda"}


def runtime_for_format(run: Run, fmt: str, device: str = "auto") -> Loaded:
    """The default runtime of `fmt` on the run's artifact, taking raw pixels whatever the artifact's input kind.

    ONNX on `cuda` runs in the CUDA provider, refused when it would not really run there; with `auto` it does so
    when that works, else on the CPU.
    """
    if fmt not in FORMAT_RUNTIME:
        raise UserInputError(f"unknown format {fmt!r}; valid: {', '.join(FORMAT_RUNTIME)}")
    name = FORMAT_RUNTIME[fmt]
    if name not in RUNTIMES:
        raise RuntimeUnavailable(f"runtime {name} for {fmt} is not available in this build")
    ref = artifact_ref(run, fmt)
    loaded = None
    if fmt in CUDA_RUNTIME and device != "cpu":
        try:
            loaded = raw_pixel_input(RUNTIMES.get(CUDA_RUNTIME[fmt]).load(ref, device), ref)
        except RuntimeUnavailable as e:
            if device == "cuda":
                raise RuntimeUnavailable(f"--device cuda: {e}; use --device cpu") from None
    loaded = loaded or raw_pixel_input(RUNTIMES.get(name).load(ref, device), ref)
    if ref.record:  # what was loaded, as the manifest said it then (one exported again later is another)
        loaded.info["artifact"] = {"path": ref.record["path"], "sha256": artifact_digest(ref.record)}
    return loaded


def load_runtime(run: Run, name: str, device: str = "cpu", **options) -> Loaded:
    """Loads runtime `name` on the artifact of the format it reads (checked against its sha256)."""
    cls = RUNTIMES.get(name)
    return cls.load(artifact_ref(run, cls.format), device, **options)


class _Normalizing:
    """Feeds an artifact exported with `--input normalized` the raw pixels every other runtime takes."""

    def __init__(self, rt: Loaded, mean, std) -> None:
        from cnnpack.spec import normalizer

        self.rt, self.name, self.info = rt, rt.name, {**rt.info, "input": "normalized on the host"}
        self.normalize = normalizer(mean, std)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return self.rt.predict(self.normalize(batch))


def raw_pixel_input(rt: Loaded, ref: ArtifactRef) -> Loaded:
    """`rt` unchanged for a raw-pixel artifact; wrapped to normalise on the host for a normalised one."""
    if ref.record.get("input_kind") != "normalized":
        return rt
    spec = ref.run.model_spec
    return _Normalizing(rt, spec["mean"], spec["std"])


def predict_split(rt: Loaded, images: np.ndarray, batch_size: int = 64, *, static: bool = False) -> np.ndarray:
    """Logits for uint8 images (N, 3, H, W), in batches, as float32 (N, K).

    With `static`, every batch has exactly `batch_size` images (an artifact exported with
    `--static-batch`): the last one is padded with zeros and the padding's logits dropped.
    """
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].astype(np.float32)
        n = len(x)
        if static and n < batch_size:
            x = np.concatenate([x, np.zeros((batch_size - n, *x.shape[1:]), np.float32)])
        out.append(rt.predict(x)[:n])
    return np.concatenate(out)


def fit_batch_sizes(sizes: tuple[int, ...], *, cap: int | None, static: int | None = None) -> list[int]:
    """Default batch sizes within what an artifact takes: its static batch alone, else each size up to its max
    (verify's and bench's defaults alike)."""
    if static:
        return [static]
    return sorted({min(b, cap) if cap else b for b in sizes})


def run_batching(run: Run, fmt: str) -> tuple[int, bool]:
    """`split_batching` of the run's artifact of `fmt` (the checkpoint: any batch)."""
    return split_batching(run.read()["stages"]["export"]["artifacts"][fmt] if fmt != "checkpoint" else {})


def split_batching(record: dict, preferred: int = 64) -> tuple[int, bool]:
    """(batch size, static) for running a whole split through an artifact with export record `record`."""
    if record.get("static_batch"):
        return record["static_batch"], True
    return min(preferred, record.get("max_batch_size") or preferred), False
