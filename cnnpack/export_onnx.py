"""The ONNX exporter (torch.onnx, the torch.export-based one or the legacy one), its check (onnx.checker and strict
shape inference) and its errors said in one line."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch
from torch import nn

from cnnpack import __version__, user_model
from cnnpack.errors import StageFailed, UserInputError, reraise_interrupt
from cnnpack.export_config import EXPORTERS, ONNX_NAMES, Artifact, ExportConfig, example_input, io_spec, metadata
from cnnpack.host import quiet_native_output
from cnnpack.spec import ModelSpec


def _onnx_export(model: nn.Module, x: torch.Tensor, dest: Path, cfg: ExportConfig) -> None:
    names = dict(input_names=[ONNX_NAMES[0]], output_names=[ONNX_NAMES[1]], opset_version=cfg.opset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if cfg.exporter == "legacy":
            axes = None if cfg.static_batch else {ONNX_NAMES[0]: {0: "batch"}, ONNX_NAMES[1]: {0: "batch"}}
            torch.onnx.export(model, (x,), str(dest), dynamo=False, dynamic_axes=axes, **names)
            return
        dyn = None if cfg.static_batch else ({0: torch.export.Dim("batch", min=1, max=cfg.max_batch_size)},)
        prog = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=dyn, verbose=False, **names,
                                 **_older_torch_translations())
        prog.save(str(dest))


def _older_torch_translations() -> dict:
    """What torch before 2.13 cannot take to ONNX by itself: it has no decomposition of adaptive_max_pool2d and
    onnxscript no translation, so the built-in cnn's global max pool failed to export (torch 2.11, the GPU machine's).
    A 1x1 output is ReduceMax over height and width; other sizes stay refused as before."""
    from torch._decomp import decompositions

    if hasattr(decompositions, "adaptive_max_pool2d"):
        return {}
    from onnxscript import opset18 as op

    def global_max_pool(self, output_size):
        if list(output_size) != [1, 1]:
            raise NotImplementedError(f"adaptive_max_pool2d to {list(output_size)} (only 1x1 is translated)")
        pooled = op.ReduceMax(self, op.Constant(value_ints=[-2, -1]), keepdims=1)
        return pooled, pooled  # (values, indices): the indices are not used by a model that asks only for values

    return {"custom_translation_table": {torch.ops.aten.adaptive_max_pool2d.default: global_max_pool}}


def check_onnx(path: Path) -> object:
    """Full onnx.checker check plus strict shape inference; raises StageFailed naming the problem."""
    import onnx

    try:
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path))
        onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise StageFailed(f"ONNX check failed for {path.name}: {str(e).strip().splitlines()[0]}") from None
    return model


def _causes(e: BaseException) -> list[BaseException]:
    """`e` and the errors it was raised from, outermost first."""
    chain = [e]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    return chain


def first_line(e: BaseException) -> str:
    """The first line of the error that started it: torch.onnx's own begins with boilerplate ("Failed to export the
    model with torch.export. This is step 1/3 ..."), the reason being in the torch.export error it wraps."""
    for cause in _causes(e)[1:]:
        if not str(cause).strip():
            break
        e = cause
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


@EXPORTERS.register("onnx")
def export_onnx(model: nn.Module, spec: ModelSpec, cfg: ExportConfig, dest: Path) -> Artifact:
    import onnx

    t0 = time.perf_counter()
    try:
        with quiet_native_output():
            _onnx_export(model, example_input(spec, cfg), dest, cfg)
    except Exception as e:  # noqa: BLE001 - torch.onnx raises many kinds; report the first line
        reraise_interrupt(e)
        msg = first_line(e)
        if any("opset" in str(c).lower() for c in _causes(e)):  # an operator this opset lacks: the user can fix that
            raise UserInputError(f"--opset {cfg.opset} cannot express this model: {msg}") from None
        raise StageFailed(f"ONNX export ({cfg.exporter}, opset {cfg.opset}) failed: {msg}") from None
    if cfg.simplify:
        _simplify(dest)
    m = check_onnx(dest)
    if not cfg.static_batch:  # a forward that loops over the batch, or reads x.size(0) as a number, fixes it silently
        dims = [d.dim_value if d.HasField("dim_value") else None for d in m.graph.input[0].type.tensor_type.shape.dim]
        if dims and dims[0] is not None:
            raise StageFailed(f"ONNX export ({cfg.exporter}) fixed the batch at {dims[0]}: the model's forward "
                              "depends on the batch size (a loop over the images, x.size(0) used as a number); make it "
                              "batch-independent, or export with --static-batch N")
    for k, v in metadata(spec, cfg).items():
        m.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    m.doc_string = f"cnnpack {__version__}: {user_model.display(spec.arch)}, {spec.num_classes} classes, {spec.image_size}px"
    onnx.save(m, str(dest))
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    inp, out = io_spec(spec, cfg, ONNX_NAMES)
    return Artifact("onnx", str(dest), "", inp, out, cfg.static_batch or cfg.max_batch_size, cfg.static_batch,
                    cfg.input, cfg.exporter, time.perf_counter() - t0, opset=opset, ir_version=m.ir_version,
                    extra={"simplified": cfg.simplify})


def _simplify(path: Path) -> None:
    try:
        import onnxslim
    except ImportError:
        raise UserInputError("--simplify needs onnxslim: pip install 'cnnpack[simplify]'") from None
    import onnx

    onnx.save(onnxslim.slim(onnx.load(str(path))), str(path))
