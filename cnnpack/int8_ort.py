"""int8 with ONNX Runtime: a QDQ model from the run's fp32 ONNX artifact, under the gate (cnnpack/int8_gate.py).

ONNX Runtime's static quantizer writes a QDQ model (QuantizeLinear/DequantizeLinear pairs, per-channel
int8 weights, uint8 activations): the INT8 form that runs in ONNX Runtime on the CPU, in Triton's
onnxruntime backend unchanged, and in the TensorRT execution provider (explicit quantization). The
input contract is the fp32 file's: raw RGB 0-255, normalisation in the graph, dynamic batch, the same
metadata_props (+ precision). Calibration runs once; every later model reuses its ranges (ORT's
calibration cache).

The weights are int8 (u8 x s8 products) where the CPU multiplies u8 by s8 exactly: with VNNI or AMX, or
off x86. An x86 CPU without VNNI does it with vpmaddubsw, which adds two u8 x s8 products into an int16
and saturates: ONNX Runtime's documentation names the symptom, and on the 2-epoch run here plain int8
agreed with fp32 on 95.9 % of images in the fused kernels against 98.3 % for the same QDQ model computed
exactly (unfused). `--weight-type auto` takes uint8 weights there (u8 x u8 has no such pair sum), which
run exactly on every CPU: 98.1 % on the same run, about 1.2x slower than u8 x s8 on that AVX2 host.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from cnnpack.atomic import abandoned, owner_tag, staged_beside
from cnnpack.errors import MissingStageError, UserInputError, shell
from cnnpack.int8_gate import (
    CALIBRATION_BATCH,
    QUANTIZERS,
    Clock,
    QuantData,
    QuantizeConfig,
    evaluate,
    model_input,
    run_gate,
    section,
)
from cnnpack.rundir import Run, sha256

INT8_PATH = "export/model.int8.onnx"


class _Reader:
    """ORT's CalibrationDataReader: the calibration images in batches of one size under the model's input name.

    One size: ORT's entropy and percentile collectors stack every batch's outputs, and a short last batch (20 images:
    16 + 4) failed inside it with a traceback ("inhomogeneous shape"). The batch is the largest divisor of the image
    count up to CALIBRATION_BATCH (16 for the default 256; 10 for 20)."""

    def __init__(self, images: np.ndarray, input_name: str) -> None:
        step = max((d for d in range(1, CALIBRATION_BATCH + 1) if len(images) % d == 0), default=1)
        self.batches = [{input_name: images[i:i + step]} for i in range(0, len(images), step)]
        self.it = iter(self.batches)

    def get_next(self):
        return next(self.it, None)

    def rewind(self) -> None:
        self.it = iter(self.batches)


def weight_type(choice: str, info: dict | None = None) -> tuple[str, str]:
    """("int8" | "uint8", why) for `--weight-type` `choice` (auto: from the CPU's flags, `peak.cpu_info()`)."""
    if choice != "auto":
        return choice, f"--weight-type {choice}"
    from cnnpack.peak import VNNI_FLAGS, cpu_info

    info = info or cpu_info()
    flags = set(info["flags"])
    if info["vendor"] in ("GenuineIntel", "AuthenticAMD") and not flags & (VNNI_FLAGS | {"amx_int8"}):
        return "uint8", (f"auto: {info['model'] or 'this x86 CPU'} has no VNNI, where ONNX Runtime's u8 x s8 kernels "
                         "saturate (vpmaddubsw): uint8 weights run exactly")
    return "int8", "auto: u8 x s8 runs exactly on this CPU (VNNI, AMX or not x86)"


def _session(model: Path | bytes):
    import onnxruntime as ort

    from cnnpack.runtimes import OrtRuntime

    source = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(source, OrtRuntime.session_options(None), providers=["CPUExecutionProvider"])


def _runner(model: Path | bytes, batch: int):
    """The model in one ONNX Runtime session: raw-pixel images -> (N, K) float32 logits, `batch` at a time."""
    sess = _session(model)
    name = sess.get_inputs()[0].name
    return lambda images: np.concatenate([sess.run(None, {name: images[i:i + batch].astype(np.float32)})[0]
                                          for i in range(0, len(images), batch)])


def logits(path: Path, images: np.ndarray, batch: int) -> np.ndarray:
    """(N, K) float32 logits of an ONNX file on raw-pixel images, on the CPU."""
    return _runner(path, batch)(images)


@contextlib.contextmanager
def _quiet_root_logger():
    """The root logger at ERROR for the block only (a process-wide change would hide others' warnings)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


# the ops whose int8 makes a model int8; the others ORT quantizes (MaxPool, Concat, Reshape...) stay in int8 only
# beside one of these, and lose their Q/DQ once every one of these is kept in float
COMPUTE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def quantized_nodes(path: Path, ops: tuple[str, ...] = ()) -> list[str]:
    """Names of the nodes of a QDQ model that take a dequantized input (those running in int8). With `ops`: the
    nodes of those types whose input and weights are both dequantized (a Conv kept in float still reads a
    dequantized input where its producer stays in int8, and computes in float)."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    dq_out = {o for n in g.node if n.op_type == "DequantizeLinear" for o in n.output}
    if ops:
        return [n.name for n in g.node if n.op_type in ops and len(n.input) > 1 and n.input[0] in dq_out
                and n.input[1] in dq_out]
    return [n.name for n in g.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
            and any(i in dq_out for i in n.input)]


class OrtQdq:
    """The gate's candidate: QDQ models from one prepared fp32 file, calibrating once (the ranges are cached)."""

    def __init__(self, fp32: Path, work: Path, data: QuantData, cfg: QuantizeConfig, batch: int) -> None:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        self.work, self.cfg, self.data, self.batch = work, cfg, data, batch
        self.prepared = work / "prepared.onnx"
        # ONNX shape inference only, no ORT-specific fusions: the QDQ file must stay portable (TensorRT)
        with _disk_said(work, fp32.stat().st_size):
            quant_pre_process(str(fp32), str(self.prepared), skip_optimization=True, skip_symbolic_shape=True)
        self.cache = work / "calibration.json"
        self.input_name = _session(self.prepared).get_inputs()[0].name
        self.calibrated_s: float | None = None
        self.weights, self.weights_why = weight_type(cfg.weight_type)
        self.attempts = 0
        self.nodes: list[str] = []
        self.compute: list[str] = []
        self._plain: Path | None = None
        self._cut: tuple | None = None  # the plain QDQ model, the fp32 nodes' inputs and weights (for alone())

    def _quantize(self, exclude: list[str] = (), only: list[str] = ()) -> Path:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        methods = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
                   "percentile": CalibrationMethod.Percentile}
        out = self.work / f"attempt{self.attempts}.onnx"
        self.attempts += 1
        t0 = time.perf_counter()
        first = not self.cache.is_file()
        # ORT logs a warning per call on the root logger, and its entropy and percentile calibrators print() their
        # progress: to stderr, stdout is the result's (--json)
        with _quiet_root_logger(), _disk_said(self.work, self.prepared.stat().st_size), \
                contextlib.redirect_stdout(sys.stderr):
            quantize_static(str(self.prepared), str(out), _Reader(self.data.calibration, self.input_name) if first else None,
                            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QUInt8 if self.weights == "uint8" else QuantType.QInt8,
                            calibrate_method=methods[self.cfg.method],
                            nodes_to_exclude=list(exclude), nodes_to_quantize=list(only),
                            calibration_cache_path=str(self.cache))
        if first:
            self.calibrated_s = time.perf_counter() - t0
        _float_outputs(out)
        return out

    def build(self, kept_float: list[str]) -> Path:
        out = self._quantize(exclude=kept_float)
        if not kept_float:
            self.nodes = quantized_nodes(out)
            self.compute = quantized_nodes(out, COMPUTE_OPS)
            self._plain = out
        return out

    def alone(self, node: str) -> bytes:
        """The plain QDQ model with every other node reading its fp32 inputs again (their Q/DQ pairs left
        dangling, and their float weights put back): cut in memory, 3-5x cheaper than a new quantize_static
        per node (benchmarks/quantize_bounded.py), which the fallback's models still come from.

        ORT's QDQ quantizer drops a Relu (or Clip) after a quantized node: its producer's output takes the
        activation's name and the uint8 QuantizeLinear does the clamping. A node put back on that name would
        read the activation's input, so the activation is put back too, under a new name."""
        import onnx

        if self._cut is None:
            self._cut = self._cut_parts(onnx.load(str(self.prepared)), onnx.load(str(self._plain)))
        if self._cut == "cannot":
            return self._quantize(only=[node]).read_bytes()
        plain, fp32_inputs, fp32_weights, restored = self._cut
        m = onnx.ModelProto()
        m.CopyFrom(plain)
        have = {t.name for t in m.graph.initializer} | {o for n in m.graph.node for o in n.output}  # (int32 biases
        # keep their name on their DequantizeLinear's output: those stay, exact to 1 part in 2^31)
        nodes = [x for n in m.graph.node for x in (n, *(restored[o] for o in n.output if o in restored))]
        del m.graph.node[:]
        m.graph.node.extend(nodes)  # each activation put back right after its producer: still in topological order
        for n in m.graph.node:
            if n.name in fp32_inputs and n.name != node and n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                del n.input[:]
                n.input.extend(restored[i].output[0] if i in restored else i for i in fp32_inputs[n.name])
        for name in (i for n in m.graph.node for i in n.input):  # fp32 weights the put-back inputs name (a
            if name in fp32_weights and name not in have:  # Clip's bounds too), where the plain model has none
                m.graph.initializer.append(fp32_weights[name])
                have.add(name)
        return m.SerializeToString()

    @staticmethod
    def _cut_parts(prepared, plain) -> tuple | str:
        """(the plain model, each fp32 node's inputs, the fp32 weights, {activation's name: that activation
        applied to its producer's output, under a new name} for each activation the quantizer dropped), or
        "cannot" where the quantizer dropped some other node (then each model comes from quantize_static)."""
        import onnx

        in_plain = {n.name for n in plain.graph.node}
        restored = {}
        for n in prepared.graph.node:
            if n.name in in_plain:
                continue
            if n.op_type not in ("Relu", "Clip") or len(n.output) != 1:
                return "cannot"
            again = onnx.NodeProto()
            again.CopyFrom(n)
            # the producer's output now carries the activation's name; the activation is idempotent
            again.input[0] = n.output[0]
            again.output[0] = f"{n.output[0]}__float"
            again.name = f"{n.name}__float"
            restored[n.output[0]] = again
        return (plain, {n.name: list(n.input) for n in prepared.graph.node},
                {t.name: t for t in prepared.graph.initializer}, restored)

    def runner(self, model: Path | bytes):
        return _runner(model, self.batch)


def _float_outputs(path: Path) -> None:
    """Takes the Q/DQ pair off each graph output (in place): ORT's quantizer rounds the logits to 256 levels of
    their calibrated range, which clamps a logit beyond it (seen: 1.09 off on 2 of 384 logits of the tiny run)
    and can tie two classes; nothing downstream computes in int8, so the pair buys nothing."""
    import onnx

    m = onnx.load(str(path))
    g = m.graph
    producer = {o: n for n in g.node for o in n.output}
    readers: dict[str, int] = {}
    for n in g.node:
        for i in n.input:
            readers[i] = readers.get(i, 0) + 1
    drop = []
    for out in g.output:
        dq = producer.get(out.name)
        q = dq is not None and dq.op_type == "DequantizeLinear" and producer.get(dq.input[0])
        src = q and q.op_type == "QuantizeLinear" and producer.get(q.input[0])
        if not src or src.op_type in ("QuantizeLinear", "DequantizeLinear") or readers.get(q.input[0]) != 1 \
                or readers.get(dq.input[0]) != 1 or not q.name or not dq.name:
            continue
        src.output[list(src.output).index(q.input[0])] = out.name
        drop += [q.name, dq.name]
    if drop:
        kept = [n for n in g.node if n.name not in drop]
        del g.node[:]
        g.node.extend(kept)
        onnx.save(m, str(path))


WORK_PREFIX = ".quantize-"


@contextlib.contextmanager
def _work_dir(export: Path):
    """quantize's scratch folder in `export/` (the attempts, several copies of the model), named with its owner
    (`atomic.owner_tag`): the folders of killed quantizes (SIGKILL, out of memory) are removed first; a live one's
    stays. One whose owner cannot be judged here (another host's on a shared folder, one from before a reboot, an
    older cnnpack's without the tag) goes when it is a day old."""
    _remove_orphans(export)
    with tempfile.TemporaryDirectory(prefix=f"{WORK_PREFIX}{owner_tag()}", dir=export) as tmp:
        yield tmp


def _remove_orphans(export: Path) -> None:
    import shutil

    for folder in export.glob(f"{WORK_PREFIX}*"):
        with contextlib.suppress(OSError):
            if abandoned(folder, WORK_PREFIX):
                shutil.rmtree(folder, ignore_errors=True)


@contextlib.contextmanager
def _disk_said(folder: Path, model_bytes: int):
    """A full disk under ONNX Runtime's quantizer shows as a truncated model it cannot parse back (protobuf's
    DecodeError) or an OSError without a file name: said as the disk it is, naming the folder (one line, exit 1)."""
    import errno
    import shutil

    from google.protobuf.message import DecodeError

    try:
        yield
    except (DecodeError, OSError) as e:  # what a model truncated by a full disk raises when it is read back
        if isinstance(e, OSError) and (e.filename is not None or e.errno not in (None, errno.ENOSPC, errno.EDQUOT)):
            raise
        free = shutil.disk_usage(folder).free
        if free < max(64 * 2**20, 4 * model_bytes):  # quantizing writes several copies of the model
            raise OSError(errno.ENOSPC, f"No space left on device ({free / 2**20:.1f} MiB free; quantizing writes "
                                        "several copies of the model there)", str(folder)) from e
        raise


def _finish_model(src: Path, fp32: Path, dest: Path) -> object:
    """The QDQ model with the fp32 artifact's metadata_props (and precision int8), checked by onnx.checker."""
    import onnx

    from cnnpack.export_onnx import check_onnx

    m, meta = onnx.load(str(src)), onnx.load(str(fp32), load_external_data=False).metadata_props
    del m.metadata_props[:]
    for p in meta:
        m.metadata_props.append(onnx.StringStringEntryProto(key=p.key, value=p.value))
    m.metadata_props.append(onnx.StringStringEntryProto(key="precision", value="int8"))
    m.doc_string = onnx.load(str(fp32), load_external_data=False).doc_string + " (int8 QDQ)"
    onnx.save(m, str(dest))
    return check_onnx(dest)


MIN_OPSET = 13  # DequantizeLinear's `axis` (per-channel weights) came with opset 13


def _fp32_artifact(run: Run):
    """The run's fp32 ONNX artifact (sha256-checked), or a clear error."""
    from cnnpack.artifacts import artifact_ref

    arts = run.read().get("stages", {}).get("export", {}).get("artifacts", {})
    if "onnx" not in arts:
        raise MissingStageError(f"{run.path} has no ONNX artifact to quantize; run `cnnpack export --run {shell(run.path)} "
                                "--format onnx` first")
    ref = artifact_ref(run, "onnx")  # refuses a missing file or one changed since export
    size = run.model_spec["image_size"]
    if ref.record["input"]["shape"][2:] != [size, size]:
        raise UserInputError(f"{ref.path} takes {ref.record['input']['shape'][2:]} images but the run's model spec "
                             f"says {size}px; re-export it (`cnnpack export --run {shell(run.path)} --format onnx`)")
    if ref.record.get("input", {}).get("dtype") == "float16" or ref.record.get("precision") == "fp16":
        raise UserInputError(f"{ref.path} is an fp16 artifact (export --half); int8 is calibrated from the fp32 one: "
                             f"re-export without --half (`cnnpack export --run {shell(run.path)} --format onnx`)")
    if ref.record.get("static_batch"):
        raise UserInputError(f"{ref.path} has a static batch of {ref.record['static_batch']}; int8 calibration "
                             "needs the dynamic-batch export (re-export without --static-batch)")
    opset = ref.record.get("opset")
    if isinstance(opset, int) and opset < MIN_OPSET:  # ONNX Runtime's QDQ model failed to load with a traceback
        raise UserInputError(f"{ref.path} is at ONNX opset {opset}; int8 (QDQ with per-channel weights) needs opset "
                             f"{MIN_OPSET} or newer: re-export it (`cnnpack export --run {shell(run.path)} --format onnx`"
                             f" with no --opset, or --opset {MIN_OPSET} or more)")
    return ref


@QUANTIZERS.register("onnx_int8")
def quantize_onnx(run: Run, cfg: QuantizeConfig, clock: Clock, command: str) -> dict:
    """onnx -> onnx_int8 under the gate; returns the stage section (the artifact is recorded by `quantize`)."""
    ref = _fp32_artifact(run)
    data = model_input(clock.read(run, cfg), ref.record, run.model_spec)
    batch = min(64, ref.record.get("max_batch_size") or 64)
    clock.note("fp32 reference on the validation split")
    ref_logits = logits(ref.path, data.val_images, batch)
    t0 = time.perf_counter()
    with _work_dir(run.file("export")) as tmp:
        q = OrtQdq(ref.path, Path(tmp), data, cfg, batch)
        clock.require("the fp32 reference")
        clock.note("calibrating and quantizing")
        plain = q.build([])
        clock.over("calibrating and quantizing")  # past the limit: the plain attempt still gives the figures
        first = evaluate(q, plain, [], ref_logits, data, cfg)
        res = run_gate(q, first, ref_logits, data, cfg, clock)
        out = section(cfg, ref.record, ref.format, data, ref_logits, res, q.nodes, time.perf_counter() - t0,
                      q.calibrated_s)
        out["weight_type"] = {"type": q.weights, "why": q.weights_why}
        if res.passed is None:
            return out
        dest = run.file(INT8_PATH)
        staged = staged_beside(dest)
        clock.staged.append((staged, dest))  # quantize puts it in place as it records it, or removes it
        m = _finish_model(res.passed.model, ref.path, staged)
        digest = sha256(staged)
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    out["artifact"] = {
        "format": "onnx_int8", "path": run.rel(dest), "sha256": digest, "precision": "int8",
        "input": ref.record["input"], "output": ref.record["output"], "max_batch_size": ref.record["max_batch_size"],
        "input_kind": ref.record.get("input_kind", "raw"), "opset": opset, "ir_version": m.ir_version,
        "exporter": "onnxruntime.quantization", "static_batch": ref.record.get("static_batch"),
        "quantization": f"QDQ, per-channel {q.weights} weights, uint8 activations (onnxruntime.quantization)",
        "weight_type": q.weights,
        "calibration": out["calibration"], "kept_float": res.passed.kept_float, "gate": out["gate"],
        "source": {"format": "onnx", "path": ref.record["path"], "sha256": ref.record["sha256"]},
        "size_mb": staged.stat().st_size / 2**20, "command": command, "config": asdict(cfg),
        "checkpoint_sha256": ref.record.get("checkpoint_sha256")}
    return out
