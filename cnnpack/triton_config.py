"""config.pbtxt as protobuf messages: the classifier's `ModelConfig` (and the image ensemble's two), built
from a `TritonConfig` and the model's checked I/O, and printed with `text_format` (never from strings).

The schema is tritonclient's `model_config_pb2`. Which platform or backend, model file and thread
parameters each format gets is the table below; what an NGC release (or the local Triton 2.51) can
load is decided in triton_release.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from cnnpack.errors import StageFailed, UserInputError
from cnnpack.rundir import sha256
from cnnpack.spec import ModelSpec

# what config.pbtxt names: a platform (ONNX Runtime, LibTorch, AOTInductor) or, for OpenVINO, the backend
PLATFORMS = {"onnx": "onnxruntime_onnx", "onnx_int8": "onnxruntime_onnx", "pt2": "torch_aoti",
             "torchscript": "pytorch_libtorch", "openvino": "openvino", "openvino_int8": "openvino"}
OPENVINO_FORMATS = ("openvino", "openvino_int8")  # `backend: "openvino"`, model.xml + model.bin per version
PT2_FORMATS = ("pt2",)  # `backend: "pytorch"` + `platform: "torch_aoti"` (Triton's PyTorch backend, NGC >= 26.06)
MODEL_FILES = {"onnx": "model.onnx", "onnx_int8": "model.onnx", "pt2": "model.pt2", "torchscript": "model.pt",
               "openvino": "model.xml", "openvino_int8": "model.xml"}
ONNX_FORMATS = ("onnx", "onnx_int8")  # served by Triton's onnxruntime backend (the int8 one is a QDQ model)
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16"}
# thread-count parameter keys as each Triton backend reads them (the PyTorch backend's for TorchScript and pt2 alike)
THREAD_KEYS = {"onnx": ("intra_op_thread_count", "inter_op_thread_count"),
               "onnx_int8": ("intra_op_thread_count", "inter_op_thread_count"),
               "pt2": ("INTRA_OP_THREAD_COUNT", "INTER_OP_THREAD_COUNT"),
               "torchscript": ("INTRA_OP_THREAD_COUNT", "INTER_OP_THREAD_COUNT")}
OPENVINO_THREADS = "INFERENCE_NUM_THREADS"  # Triton's OpenVINO backend (with NUM_STREAMS 1, PERFORMANCE_HINT LATENCY)
LABELS = "labels.txt"


def threads_in(parameters, fmt: str) -> int:
    """The CPU threads per instance a model config's parameters ({key: text}) give its runtime; 0: the runtime's
    default (every core)."""
    value = str(parameters.get(THREAD_KEYS.get(fmt, (OPENVINO_THREADS,))[0], "")).strip()
    return int(value) if value.isdigit() else 0
NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
ENSEMBLE_IO = ("image", "logits")  # the ensemble's input (encoded bytes) and output (logits)
PIXELS = "pixels"  # preprocess output = classifier input
TRT_WORKSPACE_BYTES = 1 << 30
GPU_CONFIG = "gpu"  # <model>/configs/gpu.pbtxt (written by `cnnpack deploy`), chosen by --model-config-name=gpu
CPU_CONFIG = "cpu"  # <model>/configs/cpu.pbtxt: the CPU variant `cnnpack deploy` writes of a model laid out for a GPU
PREPROCESS, ENSEMBLE = "_preprocess", "_image"  # a classifier's image ensemble and its preprocessing step: <name><suffix>


def ensemble_parts(classifier: str) -> tuple[str, str]:
    """(preprocessing model, ensemble) of `classifier`'s image ensemble, by name."""
    return f"{classifier}{PREPROCESS}", f"{classifier}{ENSEMBLE}"


def classifier_of(name: str) -> str:
    """The classifier a served model's name belongs to: itself, or the one its ensemble or preprocessing wraps."""
    return name.removesuffix(ENSEMBLE).removesuffix(PREPROCESS)


@dataclass(frozen=True)
class TritonConfig:
    repository: str = "model_repository"
    name: str | None = None  # default: <arch>_<format>
    format: str = "onnx"
    device: str = "cpu"  # cpu | gpu: instance group kind
    instances: int = 1
    max_batch_size: int | None = None  # default: the artifact's max (0 for a static-batch artifact)
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_us: int = 100
    dynamic_batching: bool = True  # off: Triton runs each request as it comes (for comparison)
    threads: int = 0  # CPU threads per instance; 0: the runtime's default (all cores)
    tensorrt: bool | None = None  # ONNX on GPU: the ONNX Runtime TensorRT accelerator (default on)
    tensorrt_fp16: bool = False
    warmup: bool = False
    ensemble: bool = False
    force: bool = False

    def validate(self) -> None:
        if self.format not in PLATFORMS:
            raise UserInputError(f"--format {self.format!r}; valid: {', '.join(PLATFORMS)}")
        if self.device not in ("cpu", "gpu"):
            raise UserInputError(f"--device {self.device!r}; valid: cpu, gpu")
        for flag, value, low, high in (("--instances", self.instances, 1, 1024), ("--threads", self.threads, 0, 1024),
                                       ("--max-queue-delay-us", self.max_queue_delay_us, 0, 60_000_000)):
            if not low <= value <= high:  # high: far beyond any use (a minute's delay), and what the config holds
                raise UserInputError(f"{flag} must be >= {low} and <= {high:,}, got {value}")
        if not self.dynamic_batching and self.preferred_batch_sizes:
            raise UserInputError("--preferred-batch-sizes configures the dynamic batcher; drop it or "
                                 "drop --no-dynamic-batching")
        if self.format in OPENVINO_FORMATS and self.device != "cpu":
            raise UserInputError(f"--format {self.format} is served on the CPU (Triton's OpenVINO backend, "
                                 "TARGET_DEVICE CPU); use --device cpu")
        if self.threads and self.device != "cpu":
            raise UserInputError("--threads sets CPU thread pools; it applies to --device cpu only")
        if (self.tensorrt or self.tensorrt_fp16) and (self.format not in ONNX_FORMATS or self.device != "gpu"):
            raise UserInputError("TensorRT is the ONNX Runtime GPU accelerator: it needs --format onnx or onnx_int8 "
                                 "and --device gpu")
        if self.tensorrt is False and self.tensorrt_fp16:
            raise UserInputError("--tensorrt-fp16 contradicts --no-tensorrt")
        if self.name is not None:
            check_name(self.name)

    @property
    def use_tensorrt(self) -> bool:
        return self.format in ONNX_FORMATS and self.device == "gpu" and self.tensorrt is not False


def option(name: str, value) -> str:
    """A TritonConfig setting as the `cnnpack triton` option that sets it, as a person pastes it: `--warmup` or
    `--no-warmup`, `--preferred-batch-sizes 2,4`, `--threads 2` (a list read back from JSON as a tuple)."""
    from cnnpack.errors import shell

    flag = "--" + name.replace("_", "-")
    if isinstance(value, bool):
        return flag if value else flag.replace("--", "--no-", 1)
    if isinstance(value, (list, tuple)):
        return f"{flag} {','.join(map(str, value))}"
    return f"{flag} {shell(value)}"


# -- input checks ---------------------------------------------------------------------------
def check_name(name: str) -> str:
    """A Triton model name that stays a single folder inside the repository."""
    if not NAME_RE.fullmatch(name) or name.startswith("."):
        raise UserInputError(f"model name {name!r} is not allowed: use letters, digits, '_', '.', '-', "
                             "not starting with '.' (it must be one folder inside the repository)")
    return name


@dataclass(frozen=True)
class Tensor:
    name: str
    dtype: str  # numpy name: float32 | float16
    shape: tuple[int, ...]  # with the batch dim; -1: dynamic


@dataclass(frozen=True)
class ModelIO:
    """The classifier's I/O as Triton will see it, after the cross-checks."""

    input: Tensor
    output: Tensor
    max_batch_size: int  # what config.pbtxt says; 0: no batching (static-batch artifact)
    input_kind: str
    precision: str = "fp32"
    max_drop_pt: float | None = None  # int8: the quantize gate it was made under
    min_agreement: float | None = None  # int8: that gate's top-1 agreement

    def dims(self, t: Tensor) -> list[int]:
        """Triton dims: without the batch dim when batching, else the full static shape."""
        return list(t.shape[1:]) if self.max_batch_size > 0 else list(t.shape)


# -- config.pbtxt as a ModelConfig message ------------------------------------------------------
def _pb():
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2


def _param(mc, key: str, value: str) -> None:
    mc.parameters[key].string_value = value


def classifier_config(name: str, io: ModelIO, cfg: TritonConfig):
    """The classifier's ModelConfig."""
    pb = _pb()
    mc = pb.ModelConfig(name=name, max_batch_size=io.max_batch_size)
    if cfg.format in OPENVINO_FORMATS:
        mc.backend = PLATFORMS[cfg.format]
    elif cfg.format in PT2_FORMATS:  # as Triton's PyTorch backend README and QA configs write it
        mc.backend, mc.platform, mc.default_model_filename = "pytorch", PLATFORMS[cfg.format], MODEL_FILES[cfg.format]
    else:
        mc.platform = PLATFORMS[cfg.format]
    fmt = pb.ModelInput.FORMAT_NCHW if io.max_batch_size > 0 else pb.ModelInput.FORMAT_NONE  # NCHW needs 3 dims
    mc.input.add(name=io.input.name, data_type=pb.DataType.Value(TRITON_DTYPES[io.input.dtype]), format=fmt,
                 dims=io.dims(io.input))
    mc.output.add(name=io.output.name, data_type=pb.DataType.Value(TRITON_DTYPES[io.output.dtype]),
                  dims=io.dims(io.output), label_filename=LABELS)
    _batching(mc, io.max_batch_size, cfg)
    if io.input_kind != "raw":  # clients (cnnpack infer, verify) must know it takes normalised pixels
        _param(mc, "input_kind", io.input_kind)
    if io.precision != "fp32":  # verify --triton-url holds the served model to its precision's contract
        _param(mc, "precision", io.precision)
    if io.max_drop_pt is not None:
        _param(mc, "max_drop_pt", f"{io.max_drop_pt:g}")
    if io.min_agreement is not None:
        _param(mc, "min_agreement", f"{io.min_agreement:g}")
    kind = pb.ModelInstanceGroup.KIND_GPU if cfg.device == "gpu" else pb.ModelInstanceGroup.KIND_CPU
    mc.instance_group.add(kind=kind, count=cfg.instances)
    if cfg.format in OPENVINO_FORMATS:  # one stream per instance: parallelism comes from instances and threads
        _param(mc, "NUM_STREAMS", "1")
        _param(mc, "PERFORMANCE_HINT", "LATENCY")
        if cfg.threads:
            _param(mc, OPENVINO_THREADS, str(cfg.threads))
    elif cfg.threads:
        intra, inter = THREAD_KEYS[cfg.format]
        _param(mc, intra, str(cfg.threads))
        _param(mc, inter, "1")  # sequential execution; parallelism comes from instances and intra-op threads
    if cfg.use_tensorrt:
        trt = mc.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        # a QDQ model is TensorRT's explicit INT8; otherwise FP16 when asked
        trt.parameters["precision_mode"] = "INT8" if io.precision == "int8" else (
            "FP16" if cfg.tensorrt_fp16 else "FP32")
        trt.parameters["max_workspace_size_bytes"] = str(TRT_WORKSPACE_BYTES)
    if cfg.warmup:
        _warmup(mc, io)
    return mc


def _batching(mc, max_batch_size: int, cfg: TritonConfig) -> None:
    if max_batch_size > 0 and cfg.dynamic_batching:
        mc.dynamic_batching.preferred_batch_size.extend(sorted(set(cfg.preferred_batch_sizes)))
        mc.dynamic_batching.max_queue_delay_microseconds = cfg.max_queue_delay_us


def _warmup(mc, io: ModelIO) -> None:
    """Zeros at batch 1 and random data at the max batch: the first requests then hit warm kernels."""
    pb = _pb()
    dtype = pb.DataType.Value(TRITON_DTYPES[io.input.dtype])
    batches = (("zero_batch_1", 1, "zero_data"), (f"random_batch_{max(io.max_batch_size, 1)}",
                                                  max(io.max_batch_size, 1), "random_data"))
    for name, batch, data in batches:
        w = mc.model_warmup.add(name=name, batch_size=batch)
        inp = w.inputs[io.input.name]
        inp.data_type = dtype
        inp.dims.extend(io.dims(io.input))
        setattr(inp, data, True)


def preprocess_config(name: str, io: ModelIO, spec: dict, cfg: TritonConfig):
    """The Python-backend model that turns encoded image bytes into the classifier's input."""
    pb = _pb()
    mc = pb.ModelConfig(name=name, backend="python", max_batch_size=io.max_batch_size)
    mc.input.add(name=ENSEMBLE_IO[0], data_type=pb.TYPE_STRING, dims=[1])
    mc.output.add(name=PIXELS, data_type=pb.DataType.Value(TRITON_DTYPES[io.input.dtype]), dims=io.dims(io.input))
    _batching(mc, io.max_batch_size, cfg)
    mc.instance_group.add(kind=pb.ModelInstanceGroup.KIND_CPU, count=cfg.instances)  # Pillow runs on the CPU
    _param(mc, "input_kind", io.input_kind)
    norm = ModelSpec.from_dict(spec)  # a spec recorded without mean/std normalizes as ImageNet's
    _param(mc, "mean", json.dumps(list(norm.mean)))
    _param(mc, "std", json.dumps(list(norm.std)))
    return mc


def ensemble_config(name: str, preprocess: str, classifier: str, io: ModelIO):
    """`<name>_image`: encoded bytes -> preprocess -> classifier, labelled like the classifier."""
    pb = _pb()
    mc = pb.ModelConfig(name=name, platform="ensemble", max_batch_size=io.max_batch_size)
    mc.input.add(name=ENSEMBLE_IO[0], data_type=pb.TYPE_STRING, dims=[1])
    mc.output.add(name=ENSEMBLE_IO[1], data_type=pb.DataType.Value(TRITON_DTYPES[io.output.dtype]),
                  dims=io.dims(io.output), label_filename=LABELS)
    steps = mc.ensemble_scheduling.step
    steps.add(model_name=preprocess, model_version=-1, input_map={ENSEMBLE_IO[0]: ENSEMBLE_IO[0]},
              output_map={PIXELS: PIXELS})
    steps.add(model_name=classifier, model_version=-1, input_map={io.input.name: PIXELS},
              output_map={io.output.name: ENSEMBLE_IO[1]})
    return mc


def render(mc) -> str:
    """config.pbtxt text; parsed back into a fresh ModelConfig to prove it round-trips."""
    from google.protobuf import text_format

    text = text_format.MessageToString(mc, use_short_repeated_primitives=True, as_utf8=True)
    if text_format.Parse(text, type(mc)()) != mc:
        raise StageFailed(f"config.pbtxt for {mc.name} does not parse back to the same ModelConfig")
    return text



def tune_records(stages: dict) -> dict[str, dict]:
    """Every config.pbtxt this run's tunes wrote, config path -> {"previous": its config.pbtxt.prev, "sha256"} as
    recorded (`tuned`, carried forward by each tune, and the last tune's `written`, which a record from before
    `tuned` was kept has alone; such a record may have no digest). Nothing is checked against the files here."""
    t = stages.get("tune") or {}
    entries = dict(t.get("tuned") or {})
    w = t.get("written")
    if w and w["config"] not in entries:
        entries[w["config"]] = {k: w[k] for k in ("previous", "sha256") if k in w}
    return entries


def served_winner(stages: dict) -> dict | None:
    """The tune winner whose config.pbtxt the repository serves now: the last tune's, or, where the last tune failed
    or wrote nothing, the one an earlier tune wrote and it kept on record (`kept`); None when none is in place."""
    tune = stages.get("tune") or {}
    if not tuned_in_place(stages):
        return None
    if tune.get("status") == "ok" and tune.get("written"):
        return tune.get("winner")
    return (tune.get("kept") or {}).get("winner")


def served_budget(stages: dict) -> float | None:
    """The p99 budget the served winner (`served_winner`) was chosen under."""
    tune = stages.get("tune") or {}
    if tune.get("status") == "ok" and tune.get("written"):
        return tune.get("config", {}).get("latency_budget_ms")
    return (tune.get("kept") or {}).get("latency_budget_ms")


def tuned_in_place(stages: dict) -> dict | None:
    """The config.pbtxt `cnnpack tune` wrote (its `written` record, or the `kept` one of an earlier tune where the last
    wrote nothing) while it is still the one in the repository: None when no tune wrote one, it was undone, or a later
    `cnnpack triton` put the defaults back."""
    tune = stages.get("tune") or {}
    written = tune.get("written") if tune.get("status") == "ok" else None
    written = written or (tune.get("kept") or {}).get("written")  # a later tune that wrote nothing: the earlier one's
    if not written:
        return None
    path = Path(written["config"])
    if "sha256" not in written:  # recorded before tune kept the digest: trusted while the file is there
        return written if path.is_file() else None
    return written if path.is_file() and sha256(path) == written["sha256"] else None
