"""OpenVINO: the IR artifact (from the run's ONNX file, with OpenVINO's own converter), loading it on the
CPU at f32 or bf16 inference precision, and NNCF int8 quantization.

The `openvino` extra (`pip install 'cnnpack[openvino]'`) brings openvino and nncf; every function
here imports them itself, and `require()` turns their absence into one line that says how to
install them. The exporter, the runtimes and the quantizer that use these helpers are registered
with the others (export.py, runtimes.py, quantize.py).

The IR keeps the contract of the ONNX artifact it comes from: input `input` (N, 3, S, S) raw RGB
0-255 with the normalisation inside, output `logits`, dynamic batch, and the class names, mean/std
and image size in the model's rt_info under `cnnpack`. Weights stay fp32 in the .bin
(`compress_to_fp16=False`; OpenVINO's default would halve them and break fp32 parity).
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import sys
from pathlib import Path

from cnnpack.errors import RuntimeUnavailable, UserInputError
from cnnpack.host import quiet_cpp_extension

INSTALL = "pip install 'cnnpack[openvino]'"
XML, BIN = "model.xml", "model.bin"


def require(what: str = "OpenVINO"):
    """The openvino module, or RuntimeUnavailable saying which command installs it."""
    _no_telemetry()  # before the import: `import openvino` starts OpenVINO's telemetry
    try:
        import openvino
    except ImportError:
        raise RuntimeUnavailable(f"{what} needs the openvino extra: {INSTALL}") from None
    return openvino


@functools.cache
def _no_telemetry() -> None:
    """OpenVINO's converter and NNCF send usage data to Google Analytics unless the user opted out, without asking
    (`enable_opt_in_dialog=False`: no consent file counts as yes), each send holding the process up to 3 s and a
    Ctrl-C printing its tracebacks. cnnpack sends nothing its user did not agree to: only an explicit opt-in
    (`opt_in_out --opt_in`, consent file "1") is kept."""
    try:
        from openvino_telemetry.utils import opt_in_checker as oc
    except ImportError:  # another openvino layout: nothing of ours to turn off
        return
    asked = oc.OptInChecker.check

    def check(self, *args, **kwargs):
        said = asked(self, *args, **kwargs)
        return said if said == oc.ConsentCheckResult.ACCEPTED else oc.ConsentCheckResult.DECLINED

    oc.OptInChecker.check = check


def available() -> tuple[bool, str]:
    try:
        require()
    except RuntimeUnavailable as e:
        return False, str(e)
    return True, ""


@functools.cache  # the CPU does not change under a process; tune asks once per measured point
def has_bf16() -> bool:
    """Whether OpenVINO's CPU plugin runs bf16 natively here (AVX-512 BF16 or AMX)."""
    ov = require()
    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


# -- the artifact ------------------------------------------------------------------------------------
def convert(onnx_path: Path, folder: Path, metadata: dict[str, str]) -> object:
    """Converts the ONNX file to `folder/model.xml` + `model.bin` (fp32 weights) and returns the ov.Model."""
    ov = require("--format openvino")
    model = ov.convert_model(str(onnx_path))
    for key, value in metadata.items():
        model.set_rt_info(value, ["cnnpack", key])
    save(model, folder)
    return model


def save(model, folder: Path) -> None:
    """`folder/model.xml` + `model.bin`. A full disk shows as OpenVINO's "basic_ios::clear: iostream error"
    (a RuntimeError): said as the disk it is, naming the folder (an OSError: one line, exit 1)."""
    import errno
    import shutil

    ov = require()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        ov.save_model(model, str(folder / XML), compress_to_fp16=False)
    except RuntimeError as e:
        free = shutil.disk_usage(folder).free
        if free < 64 * 2**20:
            raise OSError(errno.ENOSPC, f"No space left on device ({free / 2**20:.1f} MiB free) writing the IR",
                          str(folder)) from e
        raise


def read(xml: Path):
    """The ov.Model of an IR, or UserInputError naming what is wrong with its files."""
    ov = require()
    bin_path = xml.with_suffix(".bin")
    if not xml.is_file():
        raise UserInputError(f"{xml} is missing; re-export with `cnnpack export --format openvino`")
    if not bin_path.is_file():
        raise UserInputError(f"{bin_path} (the weights of {xml.name}) is missing; re-export with "
                             "`cnnpack export --format openvino`")
    try:
        return ov.Core().read_model(str(xml))
    except RuntimeError as e:
        raise UserInputError(f"OpenVINO cannot read {xml}: {str(e).strip().splitlines()[0]} (a truncated "
                             f"{bin_path.name}?); re-export it") from None


def metadata(model) -> dict[str, str]:
    """The `cnnpack` rt_info of an IR (class names, mean/std, image size, ...)."""
    info = model.get_rt_info()
    out = {}
    if "cnnpack" in info:
        for key, value in info["cnnpack"].items():
            out[key] = value.astype(str) if hasattr(value, "astype") else str(value)
    return out


def compile_cpu(model, *, threads: int | None, precision: str = "f32", hint: str = "LATENCY"):
    """The model compiled for the CPU: one stream, `threads` threads, the given inference precision."""
    ov = require()
    config = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": hint, "NUM_STREAMS": "1"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    return ov.Core().compile_model(model, "CPU", config)


def io_record(model, batch_dim: int = -1) -> tuple[dict, dict]:
    """{name, dtype, shape} of the IR's one input and one output (-1: the dynamic batch)."""
    def one(port) -> dict:
        shape = [batch_dim if d.is_dynamic else d.get_length() for d in port.get_partial_shape()]
        return {"name": port.get_any_name(), "dtype": str(port.get_element_type().to_dtype()), "shape": shape}

    return one(model.inputs[0]), one(model.outputs[0])


def classes_of(model) -> list[str] | None:
    meta = metadata(model)
    return json.loads(meta["classes"]) if "classes" in meta else None


# -- int8 with NNCF ---------------------------------------------------------------------------------
def _nncf():
    require("--backend openvino")
    quiet_cpp_extension()  # NNCF imports torch
    try:
        import nncf
    except ImportError:
        raise RuntimeUnavailable(f"--backend openvino needs NNCF, part of the openvino extra: {INSTALL}") from None
    nncf.set_log_level(logging.WARNING)  # its INFO lines (statistics, reverted layers) are recorded instead
    _log_to_stderr(logging.getLogger("nncf"))
    return nncf


class _Stderr:
    """The stderr of the moment (sys.stderr when written to, not when the handler was set: one replaced since, as a
    test's capture that is closed after it, would be written to closed)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def _log_to_stderr(logger: logging.Logger):
    """NNCF's logger writes to the stdout it found at import: its warnings would land in the middle of
    `--json`'s result. They go to stderr, with cnnpack's progress."""
    for handler in logger.handlers:
        if type(handler) is logging.StreamHandler and not isinstance(handler.stream, _Stderr):
            handler.setStream(_Stderr())


def _bars():
    """Where NNCF's progress bars (rich, written to stdout) go: stderr on a terminal, beside cnnpack's own
    progress; nowhere when stderr is a file or a pipe, where each bar would be one more line of dashes in the
    log between cnnpack's own phase lines (which already say what NNCF does). stdout is the result's (--json)."""
    return contextlib.redirect_stdout(sys.stderr if sys.stderr.isatty() else io.StringIO())


def nncf_quantize(model, calibration: list, *, subset_size: int, ignored: list[str] = ()):
    """NNCF post-training int8 quantization of an ov.Model (calibration: a list of input batches)."""
    nncf = _nncf()
    scope = nncf.IgnoredScope(names=list(ignored), validate=False) if ignored else None
    with _bars():
        return nncf.quantize(model, nncf.Dataset(calibration), subset_size=subset_size,
                             **({"ignored_scope": scope} if scope else {}))


def nncf_accuracy_control(model, calibration: list, validation: list, validate, *, subset_size: int,
                          max_drop: float, max_steps: int):
    """NNCF's accuracy-aware flow: quantize, then revert the most harmful groups to float until the top-1
    drop (absolute, a fraction) of `validate(compiled, items)` holds, within `max_steps` reverted groups."""
    nncf = _nncf()
    from nncf.quantization.advanced_parameters import AdvancedAccuracyRestorerParameters

    with _bars():
        return nncf.quantize_with_accuracy_control(
            model, nncf.Dataset(calibration), nncf.Dataset(validation), validate, max_drop=max_drop,
            drop_type=nncf.DropType.ABSOLUTE, subset_size=subset_size,
            advanced_accuracy_restorer_parameters=AdvancedAccuracyRestorerParameters(max_num_iterations=max_steps))


def float_compute_nodes(model) -> list[str]:
    """Convolutions and matrix multiplies of a quantized IR whose weights stayed float (kept in float).

    NNCF stores the weights of a layer it quantized as an int8 constant (or behind a FakeQuantize);
    a layer it reverted keeps its f32 constant. The weights' path is followed through the
    decompression ops (Convert, Subtract, Multiply, Reshape) to what feeds it.
    """
    out = []
    for op in model.get_ordered_ops():
        if op.get_type_name() not in ("Convolution", "GroupConvolution", "MatMul"):
            continue
        node = op.input_value(1).get_node()
        while node.get_type_name() in ("Convert", "Subtract", "Multiply", "Reshape", "Transpose"):
            node = node.input_value(0).get_node()
        int8 = node.get_type_name() == "FakeQuantize" or (
            node.get_type_name() == "Constant" and str(node.get_element_type()) in ("<Type: 'int8_t'>", "<Type: 'uint8_t'>"))
        if not int8:
            out.append(op.get_friendly_name())
    return out
