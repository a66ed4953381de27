"""`cnnpack triton`: a versioned Triton model repository from a run's exported artifact.

    model_repository/
      <name>/config.pbtxt          ModelConfig printed with protobuf text_format
      <name>/labels.txt            class names, one per line (label_filename of the output)
      <name>/cnnpack-model.json    what the model is and where each version came from
      <name>/<version>/model.onnx | model.pt
      <name>_preprocess/…          with --ensemble: Python backend, image bytes -> pixels
      <name>_image/…               with --ensemble: ensemble preprocess -> <name>

Rules:
- A new artifact becomes version max+1; an existing version folder is never modified. If the
  latest version already holds byte-identical files, no version is added (config.pbtxt and
  labels.txt are still brought up to date).
- A new version is built in a hidden folder inside the model folder (Triton ignores folders
  whose names are not numbers) and renamed into place; a new model is built beside the
  repository and renamed into it, so Triton never sees half a model. (A hidden folder at the
  repository root would not do: Triton tries to load it as a model and fails to start.)
- Everything is checked before anything is written: names, class names, the artifact's own
  graph against the manifest, batch limits, and that the name is not taken by another model.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from cnnpack import __version__
from cnnpack.errors import StageFailed, UserInputError
from cnnpack.rundir import Run, atomic_write_bytes, now, sha256
from cnnpack.spec import check_class_names

# what config.pbtxt names: a platform (ONNX Runtime, LibTorch) or, for OpenVINO, the backend
PLATFORMS = {"onnx": "onnxruntime_onnx", "onnx_int8": "onnxruntime_onnx", "torchscript": "pytorch_libtorch",
             "openvino": "openvino", "openvino_int8": "openvino"}
OPENVINO_FORMATS = ("openvino", "openvino_int8")  # `backend: "openvino"`, model.xml + model.bin per version
MODEL_FILES = {"onnx": "model.onnx", "onnx_int8": "model.onnx", "torchscript": "model.pt",
               "openvino": "model.xml", "openvino_int8": "model.xml"}
ONNX_FORMATS = ("onnx", "onnx_int8")  # served by Triton's onnxruntime backend (the int8 one is a QDQ model)
TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16"}
# thread-count parameter keys as each Triton backend reads them
THREAD_KEYS = {"onnx": ("intra_op_thread_count", "inter_op_thread_count"),
               "onnx_int8": ("intra_op_thread_count", "inter_op_thread_count"),
               "torchscript": ("INTRA_OP_THREAD_COUNT", "INTER_OP_THREAD_COUNT")}
OPENVINO_THREADS = "INFERENCE_NUM_THREADS"  # Triton's OpenVINO backend (with NUM_STREAMS 1, PERFORMANCE_HINT LATENCY)
LABELS = "labels.txt"
SIDECAR = "cnnpack-model.json"
STAGING_PREFIX = ".cnnpack-staging-"
NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
ENSEMBLE_IO = ("image", "logits")  # the ensemble's input (encoded bytes) and output (logits)
PIXELS = "pixels"  # preprocess output = classifier input
TRT_WORKSPACE_BYTES = 1 << 30


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
        for flag, value, low in (("--instances", self.instances, 1), ("--threads", self.threads, 0),
                                 ("--max-queue-delay-us", self.max_queue_delay_us, 0)):
            if value < low:
                raise UserInputError(f"{flag} must be >= {low}, got {value}")
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


# -- input checks ---------------------------------------------------------------------------
def check_name(name: str) -> str:
    """A Triton model name that stays a single folder inside the repository."""
    if not NAME_RE.fullmatch(name) or name.startswith("."):
        raise UserInputError(f"model name {name!r} is not allowed: use letters, digits, '_', '.', '-', "
                             "not starting with '.' (it must be one folder inside the repository)")
    return name


def check_classes(classes: list[str]) -> list[str]:
    """Class names become lines of labels.txt and labels of `score:index:label`: spec's one rule."""
    return check_class_names(classes, where=lambda i, c: f"class {i} {c!r} of the run's model.classes",
                             fix="fix `model.classes` in the run's cnnpack.json (and retrain with renamed folders)")


def repository_root(path: str | Path) -> Path:
    root = Path(path)
    if root.exists() and not root.is_dir():
        raise UserInputError(f"repository path {root} is a file, not a directory; choose another --repository")
    return root


def model_dir(root: Path, name: str) -> Path:
    """`root/name`, refusing anything that resolves outside the repository (e.g. a symlink)."""
    path = root / check_name(name)
    if path.resolve().parent != root.resolve():
        raise UserInputError(f"{path} resolves to {path.resolve()}, outside the repository {root}")
    if path.exists() and not path.is_dir():
        raise UserInputError(f"{path} is a file, not a model folder; remove it or choose another --name")
    return path


# -- what the artifact says about itself ------------------------------------------------------
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

    def dims(self, t: Tensor) -> list[int]:
        """Triton dims: without the batch dim when batching, else the full static shape."""
        return list(t.shape[1:]) if self.max_batch_size > 0 else list(t.shape)


def _tensor(rec: dict) -> Tensor:
    return Tensor(rec["name"], rec["dtype"], tuple(rec["shape"]))


def onnx_graph_io(path: Path) -> tuple[Tensor, Tensor, dict]:
    """The single input and output of an ONNX graph (symbolic dims as -1) and its metadata."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    model = onnx.load(str(path), load_external_data=False)
    init = {i.name for i in model.graph.initializer}
    inputs = [v for v in model.graph.input if v.name not in init]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise UserInputError(f"{path} has {len(inputs)} inputs and {len(model.graph.output)} outputs; "
                             "cnnpack serves single-input, single-output classifiers")

    def tensor(v) -> Tensor:
        t = v.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim)
        return Tensor(v.name, tensor_dtype_to_np_dtype(t.elem_type).name, dims)

    return tensor(inputs[0]), tensor(model.graph.output[0]), {p.key: p.value for p in model.metadata_props}


def torchscript_metadata(path: Path) -> dict:
    """The metadata cnnpack stores in a TorchScript file's extra files (read without torch)."""
    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith("/extra/cnnpack.json")), None)
            return json.loads(z.read(name)) if name else {}
    except (zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise UserInputError(f"{path} is not a readable TorchScript archive: {e}") from None


def _mismatch(what: str, got, expected, path: Path) -> UserInputError:
    return UserInputError(f"{path}: {what} is {got} but the manifest says {expected}; "
                          "the artifact and cnnpack.json disagree, re-export it")


def cross_check(rec: dict, path: Path, fmt: str, spec: dict) -> tuple[Tensor, Tensor]:
    """Compares the manifest record with the artifact itself and the model spec."""
    inp, out = _tensor(rec["input"]), _tensor(rec["output"])
    if fmt in ONNX_FORMATS:
        g_in, g_out, meta = onnx_graph_io(path)
        for mine, theirs in ((inp, g_in), (out, g_out)):
            for attr in ("name", "dtype", "shape"):
                if getattr(mine, attr) != getattr(theirs, attr):
                    raise _mismatch(f"{theirs.name} {attr}", getattr(theirs, attr), getattr(mine, attr), path)
    elif fmt in OPENVINO_FORMATS:
        from cnnpack import openvino as ov

        meta = ov.metadata(ov.read(path))
    else:
        meta = torchscript_metadata(path)
    if "classes" in meta and json.loads(meta["classes"]) != list(spec["classes"]):
        raise _mismatch("the class list", json.loads(meta["classes"]), spec["classes"], path)
    expected = (spec.get("channels", 3), spec["image_size"], spec["image_size"])
    if tuple(inp.shape[1:]) != expected or out.shape[1:] != (spec["num_classes"],):
        raise UserInputError(f"{path}: input {inp.shape} / output {out.shape} do not fit the model spec "
                             f"({expected[0]}x{expected[1]}x{expected[2]} in, {spec['num_classes']} classes out)")
    if inp.dtype not in TRITON_DTYPES or out.dtype not in TRITON_DTYPES:
        raise UserInputError(f"{path}: dtype {inp.dtype}/{out.dtype}; Triton configs here cover "
                             f"{', '.join(TRITON_DTYPES)}")
    return inp, out


def batch_limits(rec: dict, cfg: TritonConfig, path: Path) -> int:
    """The config's max_batch_size: within the artifact's dynamic range, 0 for a static batch."""
    static = rec.get("static_batch")
    if static:
        if cfg.max_batch_size:
            raise UserInputError(f"{path} has a static batch of {static}: Triton must serve it with "
                                 f"max_batch_size 0 and full dims; drop --max-batch-size or re-export "
                                 "without --static-batch to batch dynamically")
        if cfg.preferred_batch_sizes:
            raise UserInputError(f"{path} has a static batch of {static}: no dynamic batching, "
                                 "so --preferred-batch-sizes does not apply")
        return 0
    art_max = int(rec["max_batch_size"])
    mbs = art_max if cfg.max_batch_size is None else cfg.max_batch_size
    if not 1 <= mbs <= art_max:
        raise UserInputError(f"--max-batch-size {mbs}: the {rec['format']} artifact accepts batches of "
                             f"1..{art_max} (set at export with --max-batch-size)")
    bad = [b for b in cfg.preferred_batch_sizes if not 1 <= b <= mbs]
    if bad:
        raise UserInputError(f"--preferred-batch-sizes {bad} outside 1..{mbs} (the max batch size)")
    return mbs


def model_io(run: Run, cfg: TritonConfig) -> tuple[ModelIO, Path, dict]:
    """The checked artifact (path, record) and its I/O as the config will declare it."""
    from cnnpack.runtimes import artifact_ref

    ref = artifact_ref(run, cfg.format)  # raises if missing or changed since export
    spec = run.model_spec
    inp, out = cross_check(ref.record, ref.path, cfg.format, spec)
    mbs = batch_limits(ref.record, cfg, ref.path)
    from cnnpack.runtimes import precision_of

    io = ModelIO(inp, out, mbs, ref.record.get("input_kind", "raw"), precision_of(ref.record),
                 ref.record.get("gate", {}).get("max_drop_pt"))
    return io, ref.path, ref.record


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
    _param(mc, "mean", json.dumps(list(spec["mean"])))
    _param(mc, "std", json.dumps(list(spec["std"])))
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


# -- one model folder: identity, versions, atomic publication ------------------------------------
@dataclass
class Draft:
    """Everything one model folder should hold after this run."""

    name: str
    identity: dict  # what makes it "the same model": a different identity needs --force
    top: dict[str, bytes]  # config.pbtxt, labels.txt
    version: dict[str, Path | bytes]  # files of a new version folder (may be empty: ensembles)
    source: dict = field(default_factory=dict)  # provenance recorded per version


@dataclass
class Published:
    name: str
    version: int
    created: bool  # False: the latest version already held these files
    replaced: bool = False  # --force replaced a different model of that name


def _read(src: Path | bytes) -> bytes:
    return src if isinstance(src, bytes) else Path(src).read_bytes()


def _digest(src: Path | bytes) -> str:
    if isinstance(src, bytes):
        import hashlib

        return hashlib.sha256(src).hexdigest()
    return sha256(src)


def versions(folder: Path) -> list[int]:
    """Numeric version folders, ascending (what Triton counts as versions)."""
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def read_sidecar(folder: Path) -> dict | None:
    with contextlib.suppress(OSError, json.JSONDecodeError):
        return json.loads((folder / SIDECAR).read_text())
    return None


def conflict(folder: Path, draft: Draft) -> str | None:
    """Why `folder` holds a different model than `draft` (None: same model, or nothing there)."""
    if not folder.exists() or not any(p for p in folder.iterdir() if not p.name.startswith(STAGING_PREFIX)):
        return None
    side = read_sidecar(folder)
    if side is None:
        return "it was not made by cnnpack (no readable " + SIDECAR + ")"
    old, new = side.get("identity", {}), json.loads(json.dumps(draft.identity))  # tuples -> lists, as stored
    diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return f"it holds a different model ({', '.join(diff)} differ)" if diff else None


def same_as_latest(folder: Path, files: dict[str, Path | bytes]) -> int | None:
    """The latest version if it holds exactly `files` (byte-identical), else None."""
    vs = versions(folder)
    if not vs:
        return None
    latest = folder / str(vs[-1])
    present = {p.name for p in latest.iterdir()}
    if present != set(files):
        return None
    same = all((latest / n).is_file() and sha256(latest / n) == _digest(src) for n, src in files.items())
    return vs[-1] if same else None


def _fill_version(dest: Path, files: dict[str, Path | bytes]) -> None:
    dest.mkdir(parents=True)
    for n, src in files.items():
        if isinstance(src, bytes):
            (dest / n).write_bytes(src)
        else:
            shutil.copyfile(src, dest / n)
        with open(dest / n, "rb") as f:
            os.fsync(f.fileno())


def _sidecar(draft: Draft, old: dict | None, version: int | None) -> bytes:
    hist = dict((old or {}).get("versions", {}))
    if version is not None:
        hist[str(version)] = {"created": now(), "cnnpack_version": __version__,
                              "files": {n: _digest(s) for n, s in draft.version.items()}, **draft.source}
    return (json.dumps({"name": draft.name, "identity": draft.identity, "versions": hist}, indent=2) + "\n").encode()


def _same_device_parent(root: Path) -> Path | None:
    """The repository's parent when a new model can be built there and renamed in, else None."""
    parent = root.resolve().parent
    with contextlib.suppress(OSError):
        if os.stat(parent).st_dev == os.stat(root).st_dev and os.access(parent, os.W_OK):
            return parent
    return None


def publish(root: Path, draft: Draft, *, force: bool) -> Published:
    """Writes `draft` into `root/<name>`: a new version (or none if unchanged), never touching old ones."""
    folder = model_dir(root, draft.name)
    replace = conflict(folder, draft) is not None  # checked (and refused without --force) by the caller
    if not replace and folder.is_dir() and (v := same_as_latest(folder, draft.version)):
        _write_top(folder, draft.top)  # same artifact: bring config/labels up to date, no new version
        return Published(draft.name, v, created=False)
    version = max(versions(folder), default=0) + 1
    root.mkdir(parents=True, exist_ok=True)
    stage_root = _same_device_parent(root) if not folder.exists() else None
    if stage_root is not None:
        return _publish_new(root, folder, draft, stage_root)
    return _publish_version(folder, draft, version, replace=replace and force)


def _write_top(folder: Path, top: dict[str, bytes]) -> None:
    for n, data in top.items():
        path = folder / n
        if not path.is_file() or path.read_bytes() != data:
            atomic_write_bytes(path, data)


def _publish_new(root: Path, folder: Path, draft: Draft, stage_root: Path) -> Published:
    """A model that does not exist yet: built completely beside the repository, renamed in."""
    tmp = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=stage_root))
    try:
        built = tmp / draft.name
        _fill_version(built / "1", draft.version)
        for n, data in {**draft.top, SIDECAR: _sidecar(draft, None, 1)}.items():
            (built / n).write_bytes(data)
        os.rename(built, folder)
    except OSError as e:
        raise StageFailed(f"could not create {folder}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Published(draft.name, 1, created=True)


def _publish_version(folder: Path, draft: Draft, version: int, *, replace: bool) -> Published:
    """A new version of an existing model: built in a hidden folder inside it, renamed to `<version>`."""
    old_versions = versions(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))  # not a number: Triton ignores it
    try:
        _fill_version(tmp / str(version), draft.version)
        _write_top(folder, draft.top)  # same identity: config/labels fit the old versions too
        os.rename(tmp / str(version), folder / str(version))
        if replace:  # --force over a different model: its versions do not fit the new config
            for v in old_versions:
                shutil.rmtree(folder / str(v))
        _write_top(folder, {SIDECAR: _sidecar(draft, None if replace else read_sidecar(folder), version)})
    except OSError as e:
        if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise StageFailed(f"{folder / str(version)} appeared while cnnpack was writing it; re-run") from None
        raise StageFailed(f"could not write {folder / str(version)}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Published(draft.name, version, created=True, replaced=replace)


# -- the stage ---------------------------------------------------------------------------------
def preprocess_source() -> bytes:
    """The shipped Python-backend preprocessing model (a package file, not generated code)."""
    return (resources.files("cnnpack") / "backends" / "preprocess" / "model.py").read_bytes()


def _version_files(fmt: str, path: Path) -> dict[str, Path]:
    """What goes into a version folder: the model file (an OpenVINO IR: model.xml and its model.bin)."""
    files = {MODEL_FILES[fmt]: path}
    if fmt in OPENVINO_FORMATS:
        files["model.bin"] = path.with_suffix(".bin")
    return files


def drafts(run: Run, cfg: TritonConfig, name: str) -> tuple[list[Draft], ModelIO]:
    """The model folders this run should produce: the classifier, and with --ensemble two more."""
    spec = run.model_spec
    classes = check_classes(list(spec["classes"]))
    if len(classes) != spec["num_classes"]:
        raise UserInputError(f"the run's model spec names {len(classes)} classes for num_classes {spec['num_classes']}; "
                             "labels.txt needs exactly one name per output")
    io, path, rec = model_io(run, cfg)
    labels = ("\n".join(classes) + "\n").encode()
    identity = {"kind": "classifier", "arch": spec["arch"], "classes": classes, "format": cfg.format,
                "input": asdict(io.input), "output": asdict(io.output), "input_kind": io.input_kind,
                "static_batch": rec.get("static_batch")}
    source = {"run": str(run.path.resolve()), "artifact": rec["path"], "artifact_sha256": rec["sha256"]}
    out = [Draft(name, identity, {"config.pbtxt": render(classifier_config(name, io, cfg)).encode(),
                                  LABELS: labels}, _version_files(cfg.format, path), source)]
    if cfg.ensemble:
        if io.max_batch_size == 0:
            raise UserInputError("--ensemble needs a dynamic-batch export (this artifact has a static batch); "
                                 "re-export without --static-batch")
        pre, ens = f"{name}_preprocess", f"{name}_image"
        check_name(pre)
        check_name(ens)
        pre_id = {"kind": "preprocess", "for": name, "input": asdict(io.input), "input_kind": io.input_kind}
        out.append(Draft(pre, pre_id, {"config.pbtxt": render(preprocess_config(pre, io, spec, cfg)).encode()},
                         {"model.py": preprocess_source()}))
        ens_id = {"kind": "ensemble", "for": name, "classes": classes}
        out.append(Draft(ens, ens_id, {"config.pbtxt": render(ensemble_config(ens, pre, name, io)).encode(),
                                       LABELS: labels}, {}))
    return out, io


def build(run_dir: str | Path, cfg: TritonConfig = TritonConfig()) -> dict:
    """Lays out (or extends) the Triton model repository for a run; returns `stages.triton`."""
    cfg.validate()
    run = Run.open(run_dir)
    root = repository_root(cfg.repository)
    name = cfg.name or default_name(run.model_spec["arch"], cfg.format)
    todo, io = drafts(run, cfg, name)
    for d in todo:  # refuse before anything is written
        why = conflict(model_dir(root, d.name), d)
        if why and not cfg.force:
            raise UserInputError(f"{root / d.name} exists and {why}; choose another --name or pass --force "
                                 "to replace it (its versions are removed)")
    done = [publish(root, d, force=cfg.force) for d in todo]
    section = _section(root, cfg, name, io, done)
    run.set_stage("triton", section)
    return run.read()["stages"]["triton"]


def default_name(arch: str, fmt: str) -> str:
    return check_name(re.sub(r"[^A-Za-z0-9_.-]", "_", f"{arch}_{fmt}"))


def _section(root: Path, cfg: TritonConfig, name: str, io: ModelIO, done: list[Published]) -> dict:
    main = done[0]
    folder = root / name
    files = {n: {"path": f"{name}/{n}", "sha256": sha256(folder / n)} for n in ("config.pbtxt", LABELS)}
    model = f"{name}/{main.version}/{MODEL_FILES[cfg.format]}"
    files["model"] = {"path": model, "sha256": sha256(root / model)}
    section = {"status": "ok", "repository": str(root.resolve()), "name": name, "version": main.version,
               "format": cfg.format, "platform": PLATFORMS[cfg.format], "new_version": main.created,
               "replaced": main.replaced, "versions": versions(folder), "max_batch_size": io.max_batch_size,
               "input": asdict(io.input), "output": asdict(io.output), "files": files, "config": asdict(cfg)}
    if cfg.ensemble:
        pre, ens = done[1], done[2]
        section["ensemble"] = {"name": ens.name, "version": ens.version, "preprocess": pre.name,
                               "preprocess_version": pre.version, "input": ENSEMBLE_IO[0],
                               "output": ENSEMBLE_IO[1]}
    return section
