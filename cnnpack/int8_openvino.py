"""int8 with OpenVINO + NNCF: an int8 IR from the run's fp32 IR, under the same gate as ONNX Runtime's.

NNCF calibrates and quantizes once (FakeQuantize on activations, int8 weights). The gate's fallback
(cnnpack/int8_gate.py) needs models with some layers kept in float; they are cut from that one
quantized model rather than re-calibrated: a layer kept in float reads its input from before its
FakeQuantize and gets back its fp32 weights from the fp32 IR (other consumers of the same
activation keep their FakeQuantize). So ranking and fallback cost a compile and an evaluation per
model, like ONNX Runtime's, and the kept layers are named the same way (`kept_float`).

When the ranked fallback cannot hold the gate within `max_steps`, NNCF's own accuracy control
(quantize_with_accuracy_control, which reverts groups of quantizers) is tried in the time left and
kept only where it holds the gate with an int8 model.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import numpy as np

from cnnpack.atomic import staged_beside
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
from cnnpack.rundir import Run, sha256, weights_digest

COMPUTE = ("Convolution", "GroupConvolution", "MatMul")
_DECOMPRESSION = ("Convert", "Subtract", "Multiply", "Reshape", "Transpose")


def _logits(compiled, images: np.ndarray, batch: int = 64) -> np.ndarray:
    req = compiled.create_infer_request()
    return np.concatenate([np.asarray(req.infer({0: images[i:i + batch].astype(np.float32)})[0])
                           for i in range(0, len(images), batch)])


def _bias_add(op):
    """The Add that puts the bias on a compute layer's output and the index of its constant, or (None, None)."""
    consumers = [t.get_node() for t in op.output(0).get_target_inputs()]
    if len(consumers) == 1 and consumers[0].get_type_name() == "Add":
        add = consumers[0]
        for i in range(add.get_input_size()):
            if add.input_value(i).get_node().get_type_name() == "Constant":
                return add, i
    return None, None


def _weights(fp32_model) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """The fp32 weights and bias (None where there is none) of every compute layer of the fp32 IR, by its name.

    The bias matters as much as the weights: NNCF's bias correction changes the bias of every layer it quantizes
    (to offset that layer's quantization error), so a layer put back in float needs its fp32 bias back too: with
    only the weights restored, keeping all 5 layers of a 2-epoch cnn in float still lost 2.2 % top-1 agreement."""
    out = {}
    for op in fp32_model.get_ordered_ops():
        if op.get_type_name() in COMPUTE:
            node = op.input_value(1).get_node()
            while node.get_type_name() in _DECOMPRESSION:
                node = node.input_value(0).get_node()
            if node.get_type_name() == "Constant":
                add, i = _bias_add(op)
                bias = add.input_value(i).get_node().get_data().copy() if add is not None else None
                out[op.get_friendly_name()] = (node.get_data().copy(), bias)
    return out


def _fed_layers(fq) -> set[str] | None:
    """The compute layers an activation FakeQuantize feeds, through any ops between (MaxPool, Concat, Reshape, other
    FakeQuantizes...); None when it also reaches a model output."""
    out, seen, todo = set(), set(), [fq]
    while todo:
        node = todo.pop()
        for port in node.outputs():
            for target in port.get_target_inputs():
                m = target.get_node()
                if m.get_type_name() in COMPUTE:
                    out.add(m.get_friendly_name())
                elif m.get_type_name() == "Result":
                    return None
                elif m.get_friendly_name() not in seen:
                    seen.add(m.get_friendly_name())
                    todo.append(m)
    return out


class OvInt8:
    """The gate's candidate: one NNCF-quantized model, layers put back in float by name."""

    def __init__(self, fp32_model, quantized, threads: int | None = None) -> None:
        from cnnpack import openvino as ov

        self.ov, self.quantized, self.threads = ov, quantized, threads
        self.fp32_weights = _weights(fp32_model)
        float_now = set(ov.float_compute_nodes(quantized))
        self.nodes = [op.get_friendly_name() for op in quantized.get_ordered_ops()
                      if op.get_type_name() in COMPUTE and op.get_friendly_name() not in float_now
                      and op.get_friendly_name() in self.fp32_weights]
        self.compute = self.nodes  # every node the fallback keeps in float is a compute node

    def build(self, kept_float: list[str]):
        """A copy of the quantized model with `kept_float` computing in fp32 (input before its FakeQuantize,
        fp32 weights and bias)."""
        from openvino import opset13

        model = self.quantized.clone()
        keep = set(kept_float)
        for op in model.get_ordered_ops():  # a FakeQuantize that feeds only float layers (also through a MaxPool or a
            # Concat: the cnn's pooled head) goes; one shared with an int8 layer stays, bypassed below where it is direct
            if op.get_type_name() == "FakeQuantize" and (fed := _fed_layers(op)) and fed <= keep:
                for target in list(op.output(0).get_target_inputs()):
                    target.replace_source_output(op.input_value(0))
        for op in model.get_ordered_ops():
            name = op.get_friendly_name()
            if name not in keep:
                continue
            src = op.input_value(0)
            if src.get_node().get_type_name() == "FakeQuantize":
                op.input(0).replace_source_output(src.get_node().input_value(0))
            weights, bias = self.fp32_weights[name]
            op.input(1).replace_source_output(opset13.constant(weights).output(0))
            add, i = _bias_add(op)
            if bias is not None and add is not None:
                add.input(i).replace_source_output(opset13.constant(bias).output(0))
        model.validate_nodes_and_infer_types()
        return model

    def alone(self, node: str):
        return self.build([n for n in self.nodes if n != node])

    def runner(self, model):
        compiled = self.ov.compile_cpu(model, threads=self.threads)
        return lambda images: _logits(compiled, images)


def calibration_batches(data: QuantData) -> list[np.ndarray]:
    """The calibration images in batches, as NNCF's Dataset takes them (NNCF counts batches, not images)."""
    return [data.calibration[i:i + CALIBRATION_BATCH] for i in range(0, len(data.calibration), CALIBRATION_BATCH)]


class _OutOfTime(Exception):
    """Raised from the validation callback to stop NNCF's accuracy control at the quantize deadline."""


def _accuracy_control(ov, model, calibration: list, ref_logits: np.ndarray, data: QuantData, cfg: QuantizeConfig,
                      clock: Clock):
    """NNCF's accuracy-aware flow, its metric the top-1 agreement with the fp32 IR (1.0 for fp32 itself), so
    its max_drop is the agreement gate; the accuracy drop is checked on the result like every attempt.

    The callback returns the metric and a value per item, so NNCF runs every evaluation (its ranking too) through
    it rather than collecting logits itself; it raises _OutOfTime once the deadline has passed: NNCF's loop has no
    limit of its own (about 340 s for resnet18@224 on 2 AMX cores)."""
    ref_top = ref_logits.argmax(1)
    validation = [(data.val_images[i:i + 64].astype(np.float32), ref_top[i:i + 64]) for i in range(0, len(ref_top), 64)]

    def validate(compiled, items) -> tuple[float, list[float]]:
        if clock.over("NNCF accuracy control"):
            raise _OutOfTime
        req = compiled.create_infer_request()
        same = [int((np.asarray(req.infer({0: x})[0]).argmax(1) == y).sum()) for x, y in items]
        return sum(same) / sum(len(y) for _, y in items), [k / len(y) for k, (_, y) in zip(same, items)]

    return ov.nncf_accuracy_control(model, calibration, validation, validate, subset_size=len(calibration),
                                    max_drop=1 - cfg.min_agreement, max_steps=cfg.max_steps)


@QUANTIZERS.register("openvino_int8")
def quantize_openvino(run: Run, cfg: QuantizeConfig, clock: Clock, command: str) -> dict:
    """openvino -> openvino_int8 under the gate; returns the stage section (the artifact is recorded by `quantize`)."""
    from cnnpack import openvino as ov
    from cnnpack.artifacts import artifact_ref

    ov._nncf()
    if "openvino" not in run.read().get("stages", {}).get("export", {}).get("artifacts", {}):
        raise MissingStageError(f"{run.path} has no OpenVINO IR to quantize; run `cnnpack export --run {shell(run.path)} "
                                "--format onnx,openvino` first")
    ref = artifact_ref(run, "openvino")
    if ref.record.get("static_batch"):  # the fp32 reference and calibration run batches of up to 64
        raise UserInputError(f"{ref.path} has a static batch of {ref.record['static_batch']}; int8 calibration needs "
                             f"the dynamic-batch export (`cnnpack export --run {shell(run.path)} --format onnx,openvino`"
                             " without --static-batch)")
    data = model_input(clock.read(run, cfg), ref.record, run.model_spec)
    model = ov.read(ref.path)
    clock.note("fp32 reference on the validation split")
    ref_logits = _logits(ov.compile_cpu(model, threads=None), data.val_images)
    calibration = calibration_batches(data)
    clock.require("the fp32 reference")
    t0 = time.perf_counter()
    clock.note("calibrating and quantizing (NNCF)")
    c = OvInt8(model, ov.nncf_quantize(model, calibration, subset_size=len(calibration)))  # NNCF counts batches
    calibrated_s = time.perf_counter() - t0
    clock.over("calibrating and quantizing")  # past the limit: the plain attempt still gives the figures
    first = evaluate(c, c.quantized, [], ref_logits, data, cfg)
    res = run_gate(c, first, ref_logits, data, cfg, clock)
    note = None
    if res.passed is None and res.stopped is None and cfg.max_steps > 0 and not clock.over("NNCF accuracy control"):
        clock.note("NNCF accuracy control: reverting the most harmful quantizer groups to float")
        try:
            q = _accuracy_control(ov, model, calibration, ref_logits, data, cfg, clock)
        except _OutOfTime:
            res.stopped, note = clock.stopped, "NNCF's accuracy control was stopped at the time limit"
        else:
            tried = evaluate(c, q, ov.float_compute_nodes(q), ref_logits, data, cfg)
            tried.all_float = len(tried.kept_float) >= len(c.nodes) + len(set(ov.float_compute_nodes(c.quantized)))
            tried.by = "nncf_accuracy_control"
            res.attempts.append(tried)
            res.passed = tried if tried.holds(cfg) else None
            note = "NNCF's accuracy control " + ("held the gate" if res.passed else "did not hold the gate with an int8 model")
    out = section(cfg, ref.record, ref.format, data, ref_logits, res, c.nodes, time.perf_counter() - t0, calibrated_s)
    if note:
        out["note"] = note
    if res.passed is None:
        return out
    dest = run.file("export") / "openvino_int8"
    tmp = staged_beside(dest, folder=True)
    clock.staged.append((tmp, dest))  # quantize swaps it in as it records it, or removes it
    ov.save(res.passed.model, tmp)
    xml, weights = tmp / ov.XML, tmp / ov.BIN
    out["artifact"] = {
        "format": "openvino_int8", "path": run.rel(dest / ov.XML), "sha256": sha256(xml),
        "weights": {"path": run.rel(dest / ov.BIN), "sha256": sha256(weights)},
        "precision": "int8", "input": ref.record["input"], "output": ref.record["output"],
        "max_batch_size": ref.record["max_batch_size"], "input_kind": ref.record.get("input_kind", "raw"),
        "exporter": f"nncf {__import__('nncf').__version__}", "quantization": "NNCF post-training int8 (FakeQuantize)",
        "calibration": out["calibration"], "kept_float": res.passed.kept_float, "gate": out["gate"],
        "source": {"format": "openvino", "path": ref.record["path"], "sha256": ref.record["sha256"],
                   **weights_digest(ref.record)},
        "size_mb": (xml.stat().st_size + weights.stat().st_size) / 2**20, "command": command, "config": asdict(cfg),
        "checkpoint_sha256": ref.record.get("checkpoint_sha256")}
    return out
