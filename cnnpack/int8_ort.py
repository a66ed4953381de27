"""int8 with ONNX Runtime: a QDQ model from the run's fp32 ONNX artifact, under the gate (cnnpack/int8_gate.py).

ONNX Runtime's static quantizer writes a QDQ model (QuantizeLinear/DequantizeLinear pairs, per-channel
int8 weights, uint8 activations): the INT8 form that runs in ONNX Runtime on the CPU, in Triton's
onnxruntime backend unchanged, and in the TensorRT execution provider (explicit quantization). The
input contract is the fp32 file's: raw RGB 0-255, normalisation in the graph, dynamic batch, the same
metadata_props (+ precision). Calibration runs once; every later model reuses its ranges (ORT's
calibration cache).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from cnnpack.errors import MissingStageError, UserInputError
from cnnpack.int8_gate import (
    CALIBRATION_BATCH,
    QUANTIZERS,
    Clock,
    QuantData,
    QuantizeConfig,
    evaluate,
    load_quant_data,
    run_gate,
    section,
)
from cnnpack.rundir import Run, atomic_path, sha256

INT8_PATH = "export/model.int8.onnx"


class _Reader:
    """ORT's CalibrationDataReader: the calibration images in batches under the model's input name."""

    def __init__(self, images: np.ndarray, input_name: str) -> None:
        self.batches = [{input_name: images[i:i + CALIBRATION_BATCH]} for i in range(0, len(images), CALIBRATION_BATCH)]
        self.it = iter(self.batches)

    def get_next(self):
        return next(self.it, None)

    def rewind(self) -> None:
        self.it = iter(self.batches)


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


def quantized_nodes(path: Path) -> list[str]:
    """Names of the compute nodes of a QDQ model that take a dequantized input (those running in int8)."""
    import onnx

    g = onnx.load(str(path), load_external_data=False).graph
    dq_out = {o for n in g.node if n.op_type == "DequantizeLinear" for o in n.output}
    return [n.name for n in g.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear")
            and any(i in dq_out for i in n.input)]


class OrtQdq:
    """The gate's candidate: QDQ models from one prepared fp32 file, calibrating once (the ranges are cached)."""

    def __init__(self, fp32: Path, work: Path, data: QuantData, cfg: QuantizeConfig, batch: int) -> None:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        self.work, self.cfg, self.data, self.batch = work, cfg, data, batch
        self.prepared = work / "prepared.onnx"
        # ONNX shape inference only, no ORT-specific fusions: the QDQ file must stay portable (TensorRT)
        quant_pre_process(str(fp32), str(self.prepared), skip_optimization=True, skip_symbolic_shape=True)
        self.cache = work / "calibration.json"
        self.input_name = _session(self.prepared).get_inputs()[0].name
        self.calibrated_s: float | None = None
        self.attempts = 0
        self.nodes: list[str] = []
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
        with _quiet_root_logger():  # ORT logs a warning per call (about pre-processing) on the root logger
            quantize_static(str(self.prepared), str(out), _Reader(self.data.calibration, self.input_name) if first else None,
                            quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, calibrate_method=methods[self.cfg.method],
                            nodes_to_exclude=list(exclude), nodes_to_quantize=list(only),
                            calibration_cache_path=str(self.cache))
        if first:
            self.calibrated_s = time.perf_counter() - t0
        return out

    def build(self, kept_float: list[str]) -> Path:
        out = self._quantize(exclude=kept_float)
        if not kept_float:
            self.nodes = quantized_nodes(out)
            self._plain = out
        return out

    def alone(self, node: str) -> bytes:
        """The plain QDQ model with every other node reading its fp32 inputs again (their Q/DQ pairs left
        dangling, and their float weights put back): cut in memory, 3-5x cheaper than a new quantize_static
        per node (benchmarks/quantize_bounded.py), which the fallback's models still come from."""
        import onnx

        if self._cut is None:
            prepared = onnx.load(str(self.prepared))
            self._cut = (onnx.load(str(self._plain)), {n.name: list(n.input) for n in prepared.graph.node},
                         {t.name: t for t in prepared.graph.initializer})
        plain, fp32_inputs, fp32_weights = self._cut
        m = onnx.ModelProto()
        m.CopyFrom(plain)
        have = {t.name for t in m.graph.initializer} | {o for n in m.graph.node for o in n.output}  # (int32 biases
        # keep their name on their DequantizeLinear's output: those stay, exact to 1 part in 2^31)
        for n in m.graph.node:
            if n.name in fp32_inputs and n.name != node and n.op_type not in ("QuantizeLinear", "DequantizeLinear"):
                del n.input[:]
                n.input.extend(fp32_inputs[n.name])
                for name in fp32_inputs[n.name]:
                    if name in fp32_weights and name not in have:
                        m.graph.initializer.append(fp32_weights[name])
                        have.add(name)
        return m.SerializeToString()

    def runner(self, model: Path | bytes):
        return _runner(model, self.batch)


def _finish_model(src: Path, fp32: Path, dest: Path) -> object:
    """The QDQ model with the fp32 artifact's metadata_props (and precision int8), checked by onnx.checker."""
    import onnx

    from cnnpack.export import check_onnx

    m, meta = onnx.load(str(src)), onnx.load(str(fp32), load_external_data=False).metadata_props
    del m.metadata_props[:]
    for p in meta:
        m.metadata_props.append(onnx.StringStringEntryProto(key=p.key, value=p.value))
    m.metadata_props.append(onnx.StringStringEntryProto(key="precision", value="int8"))
    m.doc_string = onnx.load(str(fp32), load_external_data=False).doc_string + " (int8 QDQ)"
    onnx.save(m, str(dest))
    return check_onnx(dest)


def _fp32_artifact(run: Run):
    """The run's fp32 ONNX artifact (sha256-checked), or a clear error."""
    from cnnpack.runtimes import artifact_ref

    arts = run.read().get("stages", {}).get("export", {}).get("artifacts", {})
    if "onnx" not in arts:
        raise MissingStageError(f"{run.path} has no ONNX artifact to quantize; run `cnnpack export --run {run.path} "
                                "--format onnx` first")
    ref = artifact_ref(run, "onnx")  # refuses a missing file or one changed since export
    size = run.model_spec["image_size"]
    if ref.record["input"]["shape"][2:] != [size, size]:
        raise UserInputError(f"{ref.path} takes {ref.record['input']['shape'][2:]} images but the run's model spec "
                             f"says {size}px; re-export it (`cnnpack export --run {run.path} --format onnx`)")
    if ref.record.get("input", {}).get("dtype") == "float16" or ref.record.get("precision") == "fp16":
        raise UserInputError(f"{ref.path} is an fp16 artifact (export --half); int8 is calibrated from the fp32 one: "
                             f"re-export without --half (`cnnpack export --run {run.path} --format onnx`)")
    if ref.record.get("static_batch"):
        raise UserInputError(f"{ref.path} has a static batch of {ref.record['static_batch']}; int8 calibration "
                             "needs the dynamic-batch export (re-export without --static-batch)")
    return ref


@QUANTIZERS.register("onnx_int8")
def quantize_onnx(run: Run, cfg: QuantizeConfig, clock: Clock, command: str) -> dict:
    """onnx -> onnx_int8 under the gate; returns the stage section (the artifact is recorded by `quantize`)."""
    ref = _fp32_artifact(run)
    data = load_quant_data(run, cfg)
    batch = min(64, ref.record.get("max_batch_size") or 64)
    clock.note("fp32 reference on the validation split")
    ref_logits = logits(ref.path, data.val_images, batch)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=run.file("export")) as tmp:
        q = OrtQdq(ref.path, Path(tmp), data, cfg, batch)
        clock.require("the fp32 reference")
        clock.note("calibrating and quantizing")
        first = evaluate(q, q.build([]), [], ref_logits, data, cfg)
        res = run_gate(q, first, ref_logits, data, cfg, clock)
        out = section(cfg, ref.record, ref.format, data, ref_logits, res, q.nodes, time.perf_counter() - t0,
                      q.calibrated_s)
        if res.passed is None:
            return out
        dest = run.file(INT8_PATH)
        with atomic_path(dest) as path:
            m = _finish_model(res.passed.model, ref.path, path)
            digest = sha256(path)
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    out["artifact"] = {
        "format": "onnx_int8", "path": run.rel(dest), "sha256": digest, "precision": "int8",
        "input": ref.record["input"], "output": ref.record["output"], "max_batch_size": ref.record["max_batch_size"],
        "input_kind": ref.record.get("input_kind", "raw"), "opset": opset, "ir_version": m.ir_version,
        "exporter": "onnxruntime.quantization", "static_batch": ref.record.get("static_batch"),
        "quantization": "QDQ, per-channel int8 weights, uint8 activations (onnxruntime.quantization)",
        "calibration": out["calibration"], "kept_float": res.passed.kept_float, "gate": out["gate"],
        "source": {"format": "onnx", "path": ref.record["path"], "sha256": ref.record["sha256"]},
        "size_mb": dest.stat().st_size / 2**20, "command": command, "config": asdict(cfg)}
    return out
