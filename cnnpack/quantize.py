"""`cnnpack quantize`: an INT8 artifact calibrated on the run's own images, under an accuracy gate.

From the run's fp32 ONNX artifact, ONNX Runtime's static quantizer writes a QDQ model
(QuantizeLinear/DequantizeLinear pairs, per-channel int8 weights, uint8 activations): the INT8
form that runs in ONNX Runtime on the CPU, in Triton's onnxruntime backend unchanged, and in the
TensorRT execution provider (explicit quantization). The input contract is the fp32 file's: raw
RGB 0-255, normalisation in the graph, dynamic batch, the same metadata_props (+ precision).

The gate: top-1 on the validation split, int8 against the fp32 ONNX artifact, may drop by at most
`max_drop` percentage points, and the two must agree on at least `min_agreement` of the images
(verify's int8 contract, so quantize never keeps a model verify would reject). When the first attempt misses it, every quantized node is ranked by
how much keeping it alone in float brings the int8 logits back towards the fp32 ones (on a subset
of the validation images), and the most harmful nodes are kept in float one more per step until
the gate holds or `max_steps` is spent (then ParityError, exit 1, and no artifact is recorded).
Calibration runs once; every later attempt reuses its ranges (ORT's calibration cache).

A failed or interrupted quantize leaves the previous `model.int8.onnx` and its record as they were:
everything is built in a temporary folder and moved in only after the gate held.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from cnnpack.errors import MissingStageError, ParityError, UserInputError
from cnnpack.registry import Registry
from cnnpack.rundir import Run, atomic_path, now, sha256

QUANTIZERS: Registry = Registry("quantizer")
METHODS = ("minmax", "entropy", "percentile")
INT8_PATH = "export/model.int8.onnx"
BACKENDS = {"onnxruntime": "onnx_int8", "openvino": "openvino_int8"}  # --backend -> the artifact's format
STAGE = {"onnx_int8": "quantize", "openvino_int8": "quantize_openvino"}  # its section in the manifest
CALIBRATION_BATCH = 16


@dataclass(frozen=True)
class QuantizeConfig:
    format: str = "onnx_int8"  # the quantizer (and the artifact's format key)
    calibration_images: int = 256  # from the run's training split
    method: str = "minmax"  # minmax | entropy | percentile
    max_drop: float = 0.5  # percentage points of validation top-1, int8 vs the fp32 ONNX artifact
    min_agreement: float = 0.99  # top-1 agreement with the fp32 artifact (verify's int8 contract)
    max_steps: int = 8  # fallback steps (one more node kept in float each)
    rank_images: int = 256  # validation images used to rank the nodes (at most the split)
    seed: int = 0
    data: str | None = None  # default: the data the run was trained on

    def validate(self) -> None:
        QUANTIZERS.get(self.format)
        if self.method not in METHODS:
            raise UserInputError(f"--method {self.method!r}; valid: {', '.join(METHODS)}")
        if not self.max_drop >= 0:  # also refuses NaN
            raise UserInputError(f"--max-drop is in percentage points of top-1 and must be >= 0, got {self.max_drop}")
        if not 0 < self.min_agreement <= 1:
            raise UserInputError(f"--min-agreement is a fraction in (0, 1], got {self.min_agreement}")
        if self.calibration_images < 1:
            raise UserInputError(f"--calibration-images must be >= 1, got {self.calibration_images}")
        if self.max_steps < 0:
            raise UserInputError(f"--max-steps must be >= 0, got {self.max_steps}")
        if self.rank_images < 1:
            raise UserInputError(f"--rank-images must be >= 1, got {self.rank_images}")


# -- data --------------------------------------------------------------------------------------------
@dataclass
class QuantData:
    calibration: np.ndarray  # (N, 3, S, S) float32 raw pixels from the training split
    val_images: np.ndarray  # (M, 3, S, S) uint8
    val_labels: np.ndarray  # (M,)
    source: str
    train_images: int


def load_quant_data(run: Run, cfg: QuantizeConfig) -> QuantData:
    """The run's own training split (calibration) and validation split (the gate), through its own loader."""
    from cnnpack.evaluate import dataset_of

    trained_on = run.read().get("stages", {}).get("train", {}).get("config", {}).get("data")
    if not (cfg.data or trained_on):
        raise UserInputError(f"{run.path} has no training data to calibrate on (made by `cnnpack export --arch`); "
                             "name it with --data PATH|shapes")
    d = dataset_of(run, cfg.data)
    spec = run.model_spec
    if d.classes != list(spec["classes"]):
        raise UserInputError(f"--data {d.source} has classes {d.classes}, the run's model {list(spec['classes'])}; "
                             "calibrate on the data the model classifies")
    n = len(d.train)
    if cfg.calibration_images > n:
        raise UserInputError(f"--calibration-images {cfg.calibration_images} is more than the {n} images of "
                             f"{d.source}'s training split; use at most {n}")
    idx = np.random.default_rng(cfg.seed).permutation(n)[:cfg.calibration_images]
    images = d.train.images.numpy()[np.sort(idx)].astype(np.float32)
    return QuantData(images, d.val.images.numpy(), d.val.labels.numpy(), d.source, n)


class _Reader:
    """ORT's CalibrationDataReader: the calibration images in batches under the model's input name."""

    def __init__(self, images: np.ndarray, input_name: str) -> None:
        self.batches = [{input_name: images[i:i + CALIBRATION_BATCH]} for i in range(0, len(images), CALIBRATION_BATCH)]
        self.it = iter(self.batches)

    def get_next(self):
        return next(self.it, None)

    def rewind(self) -> None:
        self.it = iter(self.batches)


# -- running a model -----------------------------------------------------------------------------------
def _session(path: Path):
    import onnxruntime as ort

    from cnnpack.runtimes import OrtRuntime

    return ort.InferenceSession(str(path), OrtRuntime.session_options(None), providers=["CPUExecutionProvider"])


def logits(path: Path, images: np.ndarray, batch: int) -> np.ndarray:
    """(N, K) float32 logits of an ONNX file on raw-pixel images, on the CPU."""
    sess = _session(path)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: images[i:i + batch].astype(np.float32)})[0]
                           for i in range(0, len(images), batch)])


def top1(x: np.ndarray, labels: np.ndarray) -> float:
    return float((x.argmax(1) == labels).mean())


# -- the ONNX Runtime QDQ quantizer --------------------------------------------------------------------
class OrtQdq:
    """Builds QDQ models from one prepared fp32 file, calibrating once (the ranges are cached)."""

    def __init__(self, fp32: Path, work: Path, data: QuantData, cfg: QuantizeConfig) -> None:
        from onnxruntime.quantization.shape_inference import quant_pre_process

        self.work, self.cfg, self.data = work, cfg, data
        self.prepared = work / "prepared.onnx"
        # ONNX shape inference only, no ORT-specific fusions: the QDQ file must stay portable (TensorRT)
        quant_pre_process(str(fp32), str(self.prepared), skip_optimization=True, skip_symbolic_shape=True)
        self.cache = work / "calibration.json"
        self.input_name = _session(self.prepared).get_inputs()[0].name
        self.calibrated_s: float | None = None
        self.attempts = 0

    def build(self, exclude: list[str] = (), only: list[str] = ()) -> Path:
        """A QDQ model with the nodes in `exclude` kept in float (or only those in `only` in int8); the first
        call calibrates."""
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


# -- the gate and its fallback ------------------------------------------------------------------------------
@dataclass
class Attempt:  # noqa: D101 - one quantized model and its figures on the validation split
    kept_float: list[str]
    accuracy: float
    drop_pt: float  # fp32 top-1 minus int8 top-1, percentage points
    agreement: float  # top-1 agreement with the fp32 ONNX artifact
    path: Path

    def holds(self, cfg: QuantizeConfig) -> bool:
        return self.drop_pt <= cfg.max_drop and self.agreement >= cfg.min_agreement

    def record(self) -> dict:
        return {"kept_float": self.kept_float, "accuracy": self.accuracy, "drop_pt": round(self.drop_pt, 4),
                "top1_agreement_vs_fp32": self.agreement}


def _attempt(q: OrtQdq, exclude: list[str], ref: np.ndarray, data: QuantData, batch: int) -> Attempt:
    path = q.build(exclude)
    got = logits(path, data.val_images, batch)
    acc32, acc8 = top1(ref, data.val_labels), top1(got, data.val_labels)
    return Attempt(list(exclude), acc8, 100 * (acc32 - acc8), float((got.argmax(1) == ref.argmax(1)).mean()), path)


def rank_nodes(q: OrtQdq, nodes: list[str], ref: np.ndarray, data: QuantData, cfg: QuantizeConfig, batch: int,
               say: Callable[[str], None]) -> list[dict]:
    """Each quantized node's harm: the error (mean squared, against fp32's logits, on the ranking images)
    of a model where that node alone runs in int8, its inputs and outputs quantized; most harmful first.

    Quantizing one node at a time (rather than keeping one in float) also exposes a harmful tensor that
    two nodes share (a producer's output and its consumer's input): both rank high, and keeping both in
    float removes its quantization.
    """
    n = min(cfg.rank_images, len(data.val_images))
    images, want = data.val_images[:n], ref[:n]
    out = []
    for i, node in enumerate(nodes):
        say(f"ranking node {i + 1}/{len(nodes)}: {node}")
        err = float(np.mean((logits(q.build(only=[node]), images, batch) - want) ** 2))
        out.append({"node": node, "mse_alone_in_int8": err})
    return sorted(out, key=lambda r: -r["mse_alone_in_int8"])


def gate(q: OrtQdq, ref: np.ndarray, data: QuantData, cfg: QuantizeConfig, batch: int,
         say: Callable[[str], None]) -> tuple[Attempt | None, list[Attempt], list[dict]]:
    """(the passing attempt or None, every attempt, the node ranking when one was needed)."""
    say("calibrating and quantizing")
    attempts = [_attempt(q, [], ref, data, batch)]
    if attempts[0].holds(cfg):
        return attempts[0], attempts, []
    ranking = rank_nodes(q, quantized_nodes(attempts[0].path), ref, data, cfg, batch, say)
    harmful = [r for r in ranking if r["mse_alone_in_int8"] > 0]
    for k in range(1, min(cfg.max_steps, len(harmful)) + 1):
        exclude = [r["node"] for r in harmful[:k]]
        say(f"fallback step {k}: keeping {k} node(s) in float")
        attempts.append(_attempt(q, exclude, ref, data, batch))
        if attempts[-1].holds(cfg):
            return attempts[-1], attempts, ranking
    return None, attempts, ranking


# -- the artifact ----------------------------------------------------------------------------------------
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
    return ref


def command(run: Run, cfg: QuantizeConfig) -> str:
    args = ["cnnpack", "quantize", "--run", str(run.path), "--calibration-images", str(cfg.calibration_images),
            "--method", cfg.method, "--max-drop", f"{cfg.max_drop:g}", "--min-agreement", f"{cfg.min_agreement:g}",
            "--max-steps", str(cfg.max_steps),
            "--seed", str(cfg.seed)]
    args += ["--data", cfg.data] if cfg.data else []
    args += ["--backend", "openvino"] if cfg.format == "openvino_int8" else []
    return " ".join(shlex.quote(a) for a in args)


@QUANTIZERS.register("onnx_int8")
def quantize_onnx(run: Run, cfg: QuantizeConfig, say: Callable[[str], None]) -> dict:
    """onnx -> onnx_int8 under the gate; returns the stage section (the artifact is recorded by `quantize`)."""
    ref = _fp32_artifact(run)
    data = load_quant_data(run, cfg)
    batch = min(64, ref.record.get("max_batch_size") or 64)
    if ref.record.get("static_batch"):
        raise UserInputError(f"{ref.path} has a static batch of {ref.record['static_batch']}; int8 calibration "
                             "needs the dynamic-batch export (re-export without --static-batch)")
    say("fp32 reference on the validation split")
    ref_logits = logits(ref.path, data.val_images, batch)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=".quantize-", dir=run.file("export")) as tmp:
        q = OrtQdq(ref.path, Path(tmp), data, cfg)
        passed, attempts, ranking = gate(q, ref_logits, data, cfg, batch, say)
        section = _section(run, cfg, ref, data, ref_logits, attempts, ranking, passed, time.perf_counter() - t0,
                           q.calibrated_s)
        if passed is None:
            return section
        dest = run.file(INT8_PATH)
        with atomic_path(dest) as out:
            m = _finish_model(passed.path, ref.path, out)
            digest = sha256(out)
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    section["artifact"] = {
        "format": "onnx_int8", "path": run.rel(dest), "sha256": digest, "precision": "int8",
        "input": ref.record["input"], "output": ref.record["output"], "max_batch_size": ref.record["max_batch_size"],
        "input_kind": ref.record.get("input_kind", "raw"), "opset": opset, "ir_version": m.ir_version,
        "exporter": "onnxruntime.quantization", "static_batch": ref.record.get("static_batch"),
        "quantization": "QDQ, per-channel int8 weights, uint8 activations (onnxruntime.quantization)",
        "calibration": section["calibration"], "kept_float": passed.kept_float, "gate": section["gate"],
        "source": {"format": "onnx", "path": ref.record["path"], "sha256": ref.record["sha256"]},
        "size_mb": dest.stat().st_size / 2**20, "command": command(run, cfg), "config": asdict(cfg)}
    return section


def _section(run: Run, cfg: QuantizeConfig, ref, data: QuantData, ref_logits: np.ndarray, attempts: list[Attempt],
             ranking: list[dict], passed: Attempt | None, wall_s: float, calibrated_s: float | None) -> dict:
    best = min(attempts, key=lambda a: (max(a.drop_pt - cfg.max_drop, 0), -a.agreement))
    chosen = passed or best
    return {
        "status": "ok" if passed else "failed", "passed": passed is not None, "config": asdict(cfg),
        "calibration": {"images": len(data.calibration), "of_train_images": data.train_images, "split": "train",
                        "method": cfg.method, "seed": cfg.seed, "source": data.source,
                        "calibration_s": round(calibrated_s or 0.0, 2)},
        "gate": {"max_drop_pt": cfg.max_drop, "min_agreement": cfg.min_agreement, "fp32_accuracy": top1(ref_logits, data.val_labels),
                 "int8_accuracy": chosen.accuracy, "drop_pt": round(chosen.drop_pt, 4),
                 "top1_agreement_vs_fp32": chosen.agreement, "val_images": int(len(data.val_labels)),
                 "steps": len(attempts) - 1},
        "attempts": [a.record() for a in attempts], "ranking": ranking[:32],
        "kept_float": chosen.kept_float, "wall_s": round(wall_s, 1),
        "input": {"format": ref.format, "sha256": ref.record["sha256"]},
    }


# -- OpenVINO + NNCF --------------------------------------------------------------------------------------
def _ov_logits(compiled, images: np.ndarray, batch: int = 64) -> np.ndarray:
    req = compiled.create_infer_request()
    return np.concatenate([np.asarray(req.infer({0: images[i:i + batch].astype(np.float32)})[0])
                           for i in range(0, len(images), batch)])


def _ov_attempt(ov, model, kept: list[str], ref: np.ndarray, data: QuantData) -> Attempt:
    got = _ov_logits(ov.compile_cpu(model, threads=None), data.val_images)
    acc32, acc8 = top1(ref, data.val_labels), top1(got, data.val_labels)
    return Attempt(kept, acc8, 100 * (acc32 - acc8), float((got.argmax(1) == ref.argmax(1)).mean()), Path())


@QUANTIZERS.register("openvino_int8")
def quantize_openvino(run: Run, cfg: QuantizeConfig, say: Callable[[str], None]) -> dict:
    """openvino -> openvino_int8 with NNCF: plain post-training quantization, and when that misses the gate,
    NNCF's accuracy-control flow (it reverts the most harmful layers to float, at most `max_steps`)."""
    import shutil

    from cnnpack import openvino as ov
    from cnnpack.runtimes import artifact_ref

    ov._nncf()
    if "openvino" not in run.read().get("stages", {}).get("export", {}).get("artifacts", {}):
        raise MissingStageError(f"{run.path} has no OpenVINO IR to quantize; run `cnnpack export --run {run.path} "
                                "--format onnx,openvino` first")
    ref = artifact_ref(run, "openvino")
    data = load_quant_data(run, cfg)
    model = ov.read(ref.path)
    say("fp32 reference on the validation split")
    ref_logits = _ov_logits(ov.compile_cpu(model, threads=None), data.val_images)
    calibration = [data.calibration[i:i + CALIBRATION_BATCH] for i in range(0, len(data.calibration), CALIBRATION_BATCH)]
    t0 = time.perf_counter()
    say("calibrating and quantizing (NNCF)")
    q = ov.nncf_quantize(model, calibration, subset_size=len(calibration))  # NNCF counts items (batches)
    calibrated_s = time.perf_counter() - t0
    attempts = [_ov_attempt(ov, q, ov.float_compute_nodes(q), ref_logits, data)]
    if not attempts[0].holds(cfg) and cfg.max_steps > 0:
        say("accuracy control (NNCF): reverting the most harmful layers to float")
        # NNCF's metric: top-1 agreement with the fp32 IR (1.0 for fp32 itself), so its max_drop is the agreement
        # gate; the accuracy drop is checked on the result like every attempt
        ref_top = ref_logits.argmax(1)
        validation = [(data.val_images[i:i + 64].astype(np.float32), ref_top[i:i + 64])
                      for i in range(0, len(ref_top), 64)]

        def validate(compiled, items) -> float:
            req = compiled.create_infer_request()
            same = sum(int((np.asarray(req.infer({0: x})[0]).argmax(1) == y).sum()) for x, y in items)
            return same / sum(len(y) for _, y in items)

        q = ov.nncf_accuracy_control(model, calibration, validation, validate, subset_size=len(calibration),
                                     max_drop=1 - cfg.min_agreement, max_steps=cfg.max_steps)
        attempts.append(_ov_attempt(ov, q, ov.float_compute_nodes(q), ref_logits, data))
    compute = [op for op in q.get_ordered_ops() if op.get_type_name() in ("Convolution", "GroupConvolution", "MatMul")]
    all_float = len(attempts[-1].kept_float) >= len(compute)  # every layer reverted: an fp32 model, not int8
    passed = attempts[-1] if attempts[-1].holds(cfg) and not all_float else None
    section = _section(run, cfg, ref, data, ref_logits, attempts, [], passed, time.perf_counter() - t0, calibrated_s)
    if all_float:
        section["note"] = "NNCF's accuracy control reverted every layer to float: no int8 model holds the gate"
    if passed is None:
        return section
    dest = run.file("export") / "openvino_int8"
    tmp = Path(tempfile.mkdtemp(prefix=".openvino_int8-", dir=dest.parent))
    try:
        os.chmod(tmp, 0o755)
        ov.save(q, tmp)
        ov.swap_in(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    xml, weights = dest / ov.XML, dest / ov.BIN
    section["artifact"] = {
        "format": "openvino_int8", "path": run.rel(xml), "sha256": sha256(xml), "weights": run.file_record(weights),
        "precision": "int8", "input": ref.record["input"], "output": ref.record["output"],
        "max_batch_size": ref.record["max_batch_size"], "input_kind": ref.record.get("input_kind", "raw"),
        "exporter": f"nncf {__import__('nncf').__version__}", "quantization": "NNCF post-training int8 (FakeQuantize)",
        "calibration": section["calibration"], "kept_float": passed.kept_float, "gate": section["gate"],
        "source": {"format": "openvino", "path": ref.record["path"], "sha256": ref.record["sha256"]},
        "size_mb": (xml.stat().st_size + weights.stat().st_size) / 2**20, "command": command(run, cfg),
        "config": asdict(cfg)}
    return section


def quantize(run_dir: str | Path, cfg: QuantizeConfig = QuantizeConfig(), *,
             progress: Callable[[str], None] = lambda _: None) -> dict:
    """Quantizes the run's fp32 ONNX artifact (or OpenVINO IR) under the gate; returns `stages.quantize`
    (`stages.quantize_openvino`).

    Raises:
        UserInputError / MissingStageError (exit 2): bad options, no ONNX artifact, unusable data; nothing written.
        ParityError (exit 1): no attempt within the gate; `stages.quantize` records the attempts,
            the previous int8 artifact and its record stay as they were.
    """
    cfg.validate()
    run = Run.open(run_dir)
    section = QUANTIZERS.get(cfg.format)(run, cfg, progress)
    artifact = section.pop("artifact", None)
    if artifact is None:
        run.set_stage(STAGE[cfg.format], section)
        g = section["gate"]
        raise ParityError(f"no int8 model within --max-drop {cfg.max_drop:g} pt and --min-agreement "
                          f"{100 * cfg.min_agreement:g}%: the best reached a drop of {g['drop_pt']:.2f} pt (top-1 "
                          f"{100 * g['int8_accuracy']:.2f}% vs fp32 {100 * g['fp32_accuracy']:.2f}%) and "
                          f"{100 * g['top1_agreement_vs_fp32']:.2f}% agreement after {g['steps']} fallback step(s) (that "
                          f"attempt kept {len(section['kept_float'])} node(s) in float); raise --max-drop or --max-steps, or "
                          f"calibrate on more images (details: stages.{STAGE[cfg.format]} in {run.manifest_path})")
    section["outputs"] = {cfg.format: {"path": artifact["path"], "sha256": artifact["sha256"]}}

    def record(m: dict) -> None:
        m["stages"]["export"]["artifacts"][cfg.format] = artifact
        m["stages"][STAGE[cfg.format]] = {"updated": now(), **section}

    run.update(record)
    from cnnpack.export import write_reproduce

    write_reproduce(run)
    return run.read()["stages"][STAGE[cfg.format]]


def describe(section: dict) -> str:
    """One line for the CLI and the pipeline."""
    g = section["gate"]
    kept = section["kept_float"]
    return (f"top-1 {100 * g['int8_accuracy']:.2f}% vs fp32 {100 * g['fp32_accuracy']:.2f}% (drop {g['drop_pt']:.2f} pt "
            f"<= {g['max_drop_pt']:g}), agreement with fp32 {100 * g['top1_agreement_vs_fp32']:.2f}% "
            f"(>= {100 * g['min_agreement']:g}%), "
            + (f"{len(kept)} node(s) kept in float: {', '.join(kept)}" if kept else "every quantizable node in int8"))

