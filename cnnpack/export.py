"""`cnnpack export`: deployable ONNX, pt2, TorchScript and OpenVINO artifacts, each checked before it replaces anything.

Each format is one registered function `(model, spec, cfg, dest) -> Artifact`; adding a format
touches only this registry. An artifact is written to a temp file, checked (onnx.checker full
check + shape inference, or a reload and run), and only then moved into place and recorded in the
manifest, so a failed export leaves the previous artifact and manifest as they were. The pt2
package (torch.export + AOTInductor, cnnpack/pt2.py) is made last: it is the slowest, and when it
cannot be made (no C++ compiler, a model torch.export cannot capture) the other formats are already
written when the error is raised.

TorchScript is deprecated upstream (torch 2.14 warns on every torch.jit trace/script/save/load and
names torch.export as the replacement); it stays because Triton's libtorch backend still needs it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from cnnpack import __version__
from cnnpack.atomic import scratch_beside, staged_beside
from cnnpack.errors import CnnpackError, MissingStageError, StageFailed, UserInputError, reraise_interrupt, shell
from cnnpack.host import check_device, exact_fp32
from cnnpack.models import RawPixels, build_model, check_arch, check_input_size, load_state_dict_file, load_weights
from cnnpack.registry import Registry
from cnnpack.reproduce import write_reproduce_or_warn
from cnnpack.rundir import MANIFEST, Run, sha256
from cnnpack.spec import ModelSpec, check_class_names, check_image_size
from cnnpack.train import CHECKPOINT, load_checkpoint, remove_replaced_outputs, save_torch

EXPORTERS: Registry = Registry("format")
ONNX_NAMES = ("input", "logits")
TORCHSCRIPT_NAMES = ("INPUT__0", "OUTPUT__0")  # what Triton's libtorch backend expects
TORCHSCRIPT_DEPRECATED = ("TorchScript (torch.jit) is deprecated upstream in favour of torch.export; kept for "
                          "Triton's libtorch backend: pt2 (torch.export + AOTInductor) is its successor")
DEFAULT_OPSET = 18  # the torch.export-based exporter's floor; loads in ORT >= 1.14 (Triton >= 23.02)
OPSET_RANGE = {"dynamo": (18, 23), "legacy": (7, 20)}


MAX_STATIC_BATCH = 4096  # as bench's largest batch: 2.4 GB of float32 at 224 px, traced at once


@dataclass(frozen=True)
class ExportConfig:
    formats: tuple[str, ...] = ("onnx", "torchscript")
    exporter: str = "dynamo"  # dynamo (torch.export-based) | legacy (TorchScript-based) for ONNX
    opset: int = DEFAULT_OPSET
    max_batch_size: int = 64
    static_batch: int | None = None
    simplify: bool = False
    torchscript_mode: str = "trace"  # trace | script
    input: str = "raw"  # raw: 0-255 pixels, normalised in-graph | normalized: the bare network
    half: bool = False  # fp16 weights and I/O (GPU targets)
    device: str = "cpu"

    def validate(self) -> None:
        if not self.formats:
            raise UserInputError(f"--format names no format; valid: {', '.join(EXPORTERS.names())}, all")
        for f in self.formats:
            EXPORTERS.get(f)  # raises listing the valid formats
        check_device(self.device, ("cpu", "cuda"))
        if self.exporter not in OPSET_RANGE:
            raise UserInputError(f"--exporter {self.exporter!r}; valid: {', '.join(OPSET_RANGE)}")
        lo, hi = OPSET_RANGE[self.exporter]
        if "onnx" in self.formats and not lo <= self.opset <= hi:
            raise UserInputError(f"--opset {self.opset}: the {self.exporter} exporter produces opsets {lo}..{hi}")
        if self.max_batch_size < 2 and self.static_batch is None:  # torch.export's batch dimension spans 1..max
            raise UserInputError(f"--max-batch-size must be >= 2, got {self.max_batch_size} (for a batch of one "
                                 "only, export --static-batch 1)")
        if self.static_batch is not None and not 1 <= self.static_batch <= MAX_STATIC_BATCH:
            raise UserInputError(f"--static-batch must be in 1..{MAX_STATIC_BATCH:,} (the export traces a batch of "
                                 f"that many images in memory), got {self.static_batch:,}")
        if self.torchscript_mode not in ("trace", "script"):
            raise UserInputError(f"--torchscript-mode {self.torchscript_mode!r}; valid: trace, script")
        if self.input not in ("raw", "normalized"):
            raise UserInputError(f"--input {self.input!r}; valid: raw, normalized")
        if "openvino" in self.formats:
            from cnnpack.openvino import require

            require("--format openvino")  # exit 2 with the install command, before anything is written
        if self.half and self.device != "cuda":
            raise UserInputError("--half makes fp16 artifacts for GPU targets; add --device cuda "
                                 "(fp16 on the CPU is slow and loses accuracy)")


@dataclass
class Artifact:
    """What an exporter produced: enough for a runtime or Triton to load and feed it."""

    format: str
    path: str  # relative to the run directory
    sha256: str
    input: dict  # {name, dtype, shape}; -1 marks the dynamic batch dim
    output: dict
    max_batch_size: int
    static_batch: int | None
    input_kind: str
    exporter: str
    export_s: float
    opset: int | None = None
    ir_version: int | None = None
    device: str | None = None  # pt2: the device the package was compiled for (it runs there only)
    torch_version: str | None = None  # pt2: the torch that compiled it (it loads in that one or a newer one)
    compile_s: float | None = None  # pt2: AOTInductor's compile time
    extra: dict = field(default_factory=dict)

    def record(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


# -- helpers -------------------------------------------------------------------------------
def metadata(spec: ModelSpec, cfg: ExportConfig) -> dict[str, str]:
    """What the artifact says about itself (ONNX metadata_props / TorchScript extra files)."""
    return {
        "classes": json.dumps(list(spec.classes)),
        "mean": json.dumps(list(spec.mean)),
        "std": json.dumps(list(spec.std)),
        "image_size": str(spec.image_size),
        "arch": spec.arch,
        "input_kind": cfg.input,
        "input_layout": "NCHW RGB, raw pixels 0-255" if cfg.input == "raw" else "NCHW RGB, normalised",
        "cnnpack_version": __version__,
    }


def _io(spec: ModelSpec, cfg: ExportConfig, names: tuple[str, str]) -> tuple[dict, dict]:
    batch = cfg.static_batch or -1
    dtype = "float16" if cfg.half else "float32"
    return ({"name": names[0], "dtype": dtype, "shape": [batch, spec.channels, spec.image_size, spec.image_size]},
            {"name": names[1], "dtype": dtype, "shape": [batch, spec.num_classes]})


def _example(spec: ModelSpec, cfg: ExportConfig, n: int | None = None) -> torch.Tensor:
    n = n or cfg.static_batch or 2
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, spec.channels, spec.image_size, spec.image_size, generator=g) * 255
    if cfg.input == "normalized":
        x = (x / 255 - 0.45) / 0.225
    return x.to(cfg.device, torch.float16 if cfg.half else torch.float32)


# -- ONNX ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet_native_output():
    """Silences what torch's C++ side prints (the legacy exporter dumps whole graphs on failure).

    A crash within (a segfault in a native library) still says where, on the real stderr: faulthandler writes there
    meanwhile. Without it, a pt2 export that crashed in AOTInductor ended with exit 139 and not a word."""
    import faulthandler
    import sys
    import tempfile

    sys.stdout.flush()
    sys.stderr.flush()
    was_enabled = faulthandler.is_enabled()
    saved = os.dup(1), os.dup(2)
    try:
        with tempfile.TemporaryFile() as sink, os.fdopen(os.dup(saved[1]), "w") as real_stderr:
            faulthandler.enable(file=real_stderr)
            try:
                os.dup2(sink.fileno(), 1)
                os.dup2(sink.fileno(), 2)
                yield
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                faulthandler.disable()
                if was_enabled:  # back on, on the real stderr (the file it had before is not known)
                    with contextlib.suppress(Exception):
                        faulthandler.enable(file=sys.__stderr__)
    finally:
        os.close(saved[0])
        os.close(saved[1])


def _onnx_export(model: nn.Module, x: torch.Tensor, dest: Path, cfg: ExportConfig) -> None:
    names = dict(input_names=[ONNX_NAMES[0]], output_names=[ONNX_NAMES[1]], opset_version=cfg.opset)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if cfg.exporter == "legacy":
            axes = None if cfg.static_batch else {ONNX_NAMES[0]: {0: "batch"}, ONNX_NAMES[1]: {0: "batch"}}
            torch.onnx.export(model, (x,), str(dest), dynamo=False, dynamic_axes=axes, **names)
            return
        dyn = None if cfg.static_batch else ({0: torch.export.Dim("batch", min=1, max=cfg.max_batch_size)},)
        prog = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=dyn, verbose=False, **names)
        prog.save(str(dest))


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


def _first_line(e: BaseException) -> str:
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
        with _quiet_native_output():
            _onnx_export(model, _example(spec, cfg), dest, cfg)
    except Exception as e:  # noqa: BLE001 - torch.onnx raises many kinds; report the first line
        reraise_interrupt(e)
        msg = _first_line(e)
        if any("opset" in str(c).lower() for c in _causes(e)):  # an operator this opset lacks: the user can fix that
            raise UserInputError(f"--opset {cfg.opset} cannot express this model: {msg}") from None
        raise StageFailed(f"ONNX export ({cfg.exporter}, opset {cfg.opset}) failed: {msg}") from None
    if cfg.simplify:
        _simplify(dest)
    m = check_onnx(dest)
    for k, v in metadata(spec, cfg).items():
        m.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    m.doc_string = f"cnnpack {__version__}: {spec.arch}, {spec.num_classes} classes, {spec.image_size}px"
    onnx.save(m, str(dest))
    opset = next(o.version for o in m.opset_import if o.domain in ("", "ai.onnx"))
    inp, out = _io(spec, cfg, ONNX_NAMES)
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


# -- TorchScript -----------------------------------------------------------------------------
@EXPORTERS.register("torchscript")
def export_torchscript(model: nn.Module, spec: ModelSpec, cfg: ExportConfig, dest: Path) -> Artifact:
    t0 = time.perf_counter()
    x = _example(spec, cfg)
    with torch.no_grad(), warnings.catch_warnings(), exact_fp32(cfg.device):
        warnings.simplefilter("ignore")
        try:
            ts = torch.jit.script(model) if cfg.torchscript_mode == "script" else torch.jit.trace(model, (x,))
        except Exception as e:  # noqa: BLE001 - scripting errors are many kinds
            reraise_interrupt(e)
            raise StageFailed(f"TorchScript {cfg.torchscript_mode} failed: {str(e).strip().splitlines()[0]}") from None
        ts = torch.jit.freeze(ts.eval())
    extra = {"cnnpack.json": json.dumps(metadata(spec, cfg))}
    buf = io.BytesIO()  # a buffer, not `dest`: the zip would embed the temp file's name and differ every time
    with warnings.catch_warnings():  # torch.jit's deprecation: the record and `cnnpack export` say it in our words
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.save(ts, buf, _extra_files=extra)
        dest.write_bytes(buf.getvalue())
        # reload and run once: a file that cannot run is not an artifact
        loaded = torch.jit.load(str(dest), map_location=cfg.device)
    with torch.no_grad():
        y = loaded(x)
    if tuple(y.shape) != (x.shape[0], spec.num_classes):
        raise StageFailed(f"TorchScript output shape {tuple(y.shape)}, expected {(x.shape[0], spec.num_classes)}")
    inp, out = _io(spec, cfg, TORCHSCRIPT_NAMES)
    return Artifact("torchscript", str(dest), "", inp, out, cfg.static_batch or cfg.max_batch_size,
                    cfg.static_batch, cfg.input, f"torch.jit.{cfg.torchscript_mode}", time.perf_counter() - t0,
                    extra={"deprecated": TORCHSCRIPT_DEPRECATED})


# -- pt2: torch.export + AOTInductor ----------------------------------------------------------------------
@EXPORTERS.register("pt2")
def export_pt2(model: nn.Module, spec: ModelSpec, cfg: ExportConfig, dest: Path) -> Artifact:
    """A `.pt2` package compiled for `cfg.device`, batch 1..max (exported at batch 2, so the dim stays dynamic)."""
    from cnnpack import pt2

    t0 = time.perf_counter()
    meta = {**metadata(spec, cfg), "precision": "fp16" if cfg.half else "fp32",
            "max_batch_size": str(cfg.static_batch or cfg.max_batch_size)}
    x = _example(spec, cfg, cfg.static_batch or 2)
    with _quiet_native_output():  # torch.export prints graph fragments when it fails; the error says what failed
        info = pt2.export_pt2(model, x, dest, max_batch=None if cfg.static_batch else cfg.max_batch_size,
                              metadata=meta, num_classes=spec.num_classes)
    inp, out = _io(spec, cfg, pt2.NAMES)
    device, torch_version, compile_s = info.pop("device"), info.pop("torch_version"), info.pop("compile_s")
    return Artifact("pt2", str(dest), "", inp, out, cfg.static_batch or cfg.max_batch_size, cfg.static_batch,
                    cfg.input, f"torch.export + AOTInductor (torch {torch_version})", time.perf_counter() - t0,
                    device=device, torch_version=torch_version, compile_s=compile_s, extra=info)


# -- OpenVINO IR (from the ONNX artifact) -----------------------------------------------------------
def _same_as_its_onnx(run: Run, onnx: dict, cfg: ExportConfig, fmt: str) -> None:
    """The IR is the ONNX file converted: what it takes (raw or normalised pixels, a static batch, its largest
    batch, fp16) is the ONNX file's, and options that say otherwise are refused (they were recorded as the IR's while
    the IR did not follow them: verify failed it, and Triton was told raw pixels for a network that wants normalised
    ones; reproduce.sh re-created the ONNX source with the IR's --max-batch-size, other bytes, and stopped)."""
    both = f"`cnnpack export --run {shell(run.path)} --format onnx,{fmt}` with the options you want for both"
    kind = onnx.get("input_kind", "raw")
    if cfg.input != kind:
        raise UserInputError(f"--input {cfg.input}: the {fmt} model is converted from {onnx['path']}, which takes "
                             f"{kind} pixels; pass --input {kind}, or export both: {both}")
    if (onnx.get("static_batch") or None) != (cfg.static_batch or None):
        has = f"a static batch of {onnx['static_batch']}" if onnx.get("static_batch") else "a dynamic batch"
        asked = f"--static-batch {cfg.static_batch}" if cfg.static_batch else "no --static-batch"
        fix = f"pass --static-batch {onnx['static_batch']}" if onnx.get("static_batch") else "drop --static-batch"
        raise UserInputError(f"{asked}: the {fmt} model is converted from {onnx['path']}, which has {has}; "
                             f"{fix}, or export both: {both}")
    if not cfg.static_batch and onnx.get("max_batch_size") not in (None, cfg.max_batch_size):
        raise UserInputError(f"--max-batch-size {cfg.max_batch_size}: the {fmt} model is converted from {onnx['path']}, "
                             f"exported with --max-batch-size {onnx['max_batch_size']} (its bytes depend on it); pass "
                             f"--max-batch-size {onnx['max_batch_size']}, or export both: {both}")
    if onnx.get("precision") == "fp16":
        raise UserInputError(f"{onnx['path']} is fp16 (--half): the {fmt} model is converted from an fp32 ONNX "
                             f"file; export both without --half: {both}")


@EXPORTERS.register("openvino")
def export_openvino(model: nn.Module, spec: ModelSpec, cfg: ExportConfig, dest: Path, *, onnx: Path) -> Artifact:
    """`dest/model.xml` + `model.bin` converted from the ONNX file `onnx` by OpenVINO's converter."""
    from cnnpack import openvino as ov

    if cfg.half:
        raise UserInputError("--half does not apply to --format openvino: its precision is chosen at inference "
                             "(the openvino-bf16 runtime) or by `cnnpack quantize --backend openvino`")
    t0 = time.perf_counter()
    try:
        ir = ov.convert(onnx, dest, metadata(spec, cfg))
    except RuntimeError as e:
        raise StageFailed(f"OpenVINO conversion of {onnx.name} failed: {str(e).strip().splitlines()[0]}") from None
    inp, out = ov.io_record(ir)
    if cfg.static_batch is None and inp["shape"][0] != -1:
        raise UserInputError(f"the IR converted from {onnx.name} has a static batch {inp['shape'][0]}; re-export "
                             "the ONNX file without --static-batch")
    return Artifact("openvino", str(dest / ov.XML), "", {**inp, "name": ONNX_NAMES[0]}, {**out, "name": ONNX_NAMES[1]},
                    cfg.static_batch or cfg.max_batch_size, cfg.static_batch, cfg.input,
                    f"openvino.convert_model {ov.require().__version__}", time.perf_counter() - t0)


SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "pt2": ".pt2"}
FOLDERS = {"openvino": "openvino"}  # formats written as a folder (export/<folder>/model.xml + .bin)


def _order(fmt: str) -> tuple[bool, bool]:
    """The ONNX file before OpenVINO (which converts it); pt2 last (the slowest, and the one that may need what
    this machine lacks: a C++ compiler)."""
    return fmt == "pt2", fmt in FOLDERS


# -- the stage -------------------------------------------------------------------------------
def _deployable(run: Run, cfg: ExportConfig) -> tuple[nn.Module, ModelSpec, str]:
    """The model to export, its spec, and the sha256 of the checkpoint bytes it was loaded from."""
    net, spec, digest = load_checkpoint(run, device=cfg.device)
    train = run.read().get("stages", {}).get("train") or {}
    if train.get("status") in ("running", "failed", "interrupted"):  # its best epoch so far: exported, and said
        import logging

        resume = (f"; `cnnpack train --run {shell(run.path)} --resume` continues it"
                  if train["status"] == "interrupted" else "")
        logging.getLogger("cnnpack").warning(f"warning: {run.path}'s training has not finished (train "
                                             f"{train['status']}): exporting its best epoch so far{resume}")
    model = net if cfg.input == "normalized" else RawPixels(net, spec.mean, spec.std)
    model = model.to(cfg.device).eval()
    return (model.half() if cfg.half else model), spec, digest


ONNX_OPTIONS = ("exporter", "opset", "simplify")  # what shapes the ONNX file, and so an IR converted from it
STEPS = {"onnx": "torch.onnx", "torchscript": "torch.jit", "openvino": "converting the ONNX model",
         "pt2": "torch.export, then AOTInductor compiles C++: the longest step"}


def export(run_dir: str | Path, cfg: ExportConfig = ExportConfig(), *,
           progress: Callable[[str], None] = lambda _: None) -> dict:
    """Exports the run's checkpoint in each of `cfg.formats` (`progress` is told each format as it starts);
    returns `stages.export`."""
    cfg.validate()
    run = Run.open(run_dir)
    run.check_writable()  # a run it cannot write to fails now, not after the work
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda: no CUDA GPU is visible to PyTorch on this machine")
    _check_folders(run, cfg)
    model, spec, source = _deployable(run, cfg)
    written: list[str] = []
    try:  # a format that fails leaves the ones before it written and recorded, and reproduce.sh up to date
        for fmt in sorted(cfg.formats, key=_order):
            progress(f"{fmt} ({STEPS[fmt]})" if fmt in STEPS else fmt)
            record = (_export_folder if fmt in FOLDERS else _export_file)(run, model, spec, cfg, fmt, source)
            written.append(f"{record['path']} ({fmt})")
    except CnnpackError as e:
        if written:  # say what is there after all
            e.args = (f"{e}; written: {', '.join(written)}",)
        raise
    finally:  # also after a Ctrl-C held back until a format was recorded: its line is in reproduce.sh
        with contextlib.suppress(CnnpackError, KeyError):
            write_reproduce_or_warn(run)
    return run.read()["stages"]["export"]


def _export_file(run: Run, model: nn.Module, spec: ModelSpec, cfg: ExportConfig, fmt: str, source: str) -> dict:
    dest = run.file("export") / f"model{SUFFIX[fmt]}"
    # put in place only if the exporter and its checks succeed; named `.tmp.pt2`, as torch's loader warns of any other
    with scratch_beside(dest, suffix=".tmp" + (SUFFIX[fmt] if fmt == "pt2" else "")) as tmp:
        art = EXPORTERS.get(fmt)(model, spec, cfg, tmp)
        art.sha256, art.path = sha256(tmp), run.rel(dest)
        record = {**art.record(), "precision": "fp16" if cfg.half else "fp32", "size_mb": tmp.stat().st_size / 2**20}
        run.commit([(tmp, dest)], _record(run, cfg, fmt, record, source))
    return record


def _check_folders(run: Run, cfg: ExportConfig) -> None:
    """What a format converted from the ONNX file (OpenVINO's IR) refuses, refused before any format is written:
    `--format torchscript,openvino --input normalized` replaced model.pt, then stopped at the IR, exit 2."""
    for fmt in (f for f in cfg.formats if f in FOLDERS):
        if cfg.half:
            raise UserInputError(f"--half does not apply to --format {fmt}: its precision is chosen at inference "
                                 "(the openvino-bf16 runtime) or by `cnnpack quantize --backend openvino`")
        if "onnx" in cfg.formats:  # exported again now, with these options
            continue
        arts = run.read().get("stages", {}).get("export", {}).get("artifacts", {})
        if "onnx" not in arts:
            raise MissingStageError(f"--format {fmt} is converted from the ONNX artifact, which {run.path} lacks: "
                                    f"export --format onnx,{fmt}")
        _same_as_its_onnx(run, arts["onnx"], cfg, fmt)


def _export_folder(run: Run, model: nn.Module, spec: ModelSpec, cfg: ExportConfig, fmt: str, source: str) -> dict:
    """A format of two files (OpenVINO's .xml + .bin), built in a temp folder and swapped in whole."""
    import shutil

    from cnnpack import openvino as ov

    arts = run.read().get("stages", {}).get("export", {}).get("artifacts", {})
    if "onnx" not in arts:
        raise MissingStageError(f"--format {fmt} is converted from the ONNX artifact, which {run.path} lacks: "
                                f"export --format onnx,{fmt}")
    from cnnpack.artifacts import artifact_ref

    # refuses a missing ONNX file, one changed since, one of other weights than this export loaded (a training that
    # saves a new best epoch meanwhile makes the checkpoint file newer than both)
    ref = artifact_ref(run, "onnx", source)
    _same_as_its_onnx(run, ref.record, cfg, fmt)
    onnx = ref.path
    dest = run.file("export") / FOLDERS[fmt]
    tmp = staged_beside(dest, folder=True)  # readable by a Triton container of another user
    try:
        art = EXPORTERS.get(fmt)(model, spec, cfg, tmp, onnx=onnx)
        xml, weights = tmp / ov.XML, tmp / ov.BIN
        art.path, art.sha256 = run.rel(dest / ov.XML), sha256(xml)
        record = {**art.record(), "precision": "fp32",
                  "weights": {"path": run.rel(dest / ov.BIN), "sha256": sha256(weights)},
                  "size_mb": (xml.stat().st_size + weights.stat().st_size) / 2**20,
                  "source": {"format": "onnx", "sha256": arts["onnx"]["sha256"]}}
        run.commit([(tmp, dest)], _record(run, cfg, fmt, record, source, onnx_config=ref.record.get("config")))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return record


def _record(run: Run, cfg: ExportConfig, fmt: str, record: dict, source: str,
            onnx_config: dict | None = None) -> Callable[[dict], None]:
    """The manifest update that records one artifact (for `Run.commit`). `source`: the sha256 of the checkpoint
    bytes the model was loaded from (not of the file now), kept by each artifact too: another format exported
    later from a newer checkpoint does not make this one's source look current. `onnx_config`: the config of the ONNX
    file an IR was converted from, whose ONNX options (exporter, opset, simplify) are the IR's: `--format openvino
    --opset 99` recorded opset 99 for an IR of an opset-18 file, and reproduce.sh re-created its source so."""
    ckpt = run.file(CHECKPOINT)
    config = asdict(cfg) | {k: v for k, v in (onnx_config or {}).items() if k in ONNX_OPTIONS}

    def update(m: dict) -> None:
        prior = m.setdefault("stages", {}).get("export", {})
        arts = dict(prior.get("artifacts", {}))
        arts[fmt] = {**record, "checkpoint_sha256": source, "config": config}
        m["stages"]["export"] = {"status": "ok", "updated": record.get("updated"), "artifacts": arts,
                                 "source": {"checkpoint": run.rel(ckpt), "sha256": source},
                                 "reproduce": "export/reproduce.sh"}
        m["stages"]["export"].pop("updated")

    return update


# -- export without a training run ----------------------------------------------------------
def create_run(run_dir: str | Path, *, arch: str, num_classes: int, image_size: int,
               classes: list[str] | None = None, pretrained: bool = False, weights: str | None = None,
               seed: int = 0, force: bool = False) -> Run:
    """A run whose model spec comes from flags: packages any torchvision classifier (or `cnn`)."""
    check_arch(arch)
    if num_classes < 2:
        raise UserInputError(f"--num-classes must be >= 2, got {num_classes}")
    check_image_size(image_size)
    if pretrained and weights:
        raise UserInputError("use either --pretrained or --weights FILE, not both")
    classes = classes or [f"class_{i}" for i in range(num_classes)]
    if len(classes) != num_classes:
        raise UserInputError(f"--classes names {len(classes)} classes but --num-classes is {num_classes}")
    check_class_names(classes, where=lambda i, c: f"--classes: class {i} {c!r}", fix="use another name")
    spec = ModelSpec(arch=arch, num_classes=num_classes, classes=tuple(classes), image_size=image_size)
    torch.manual_seed(seed)
    model = build_model(spec, pretrained=pretrained)
    if weights:
        load_weights(model, load_state_dict_file(weights), source=weights)  # validates before any write
    check_input_size(model, spec)  # an arch that cannot take the size: said, and no run left behind to --force
    weights_sha256 = sha256(weights) if weights else None  # before the run it may sit in is replaced
    replaced = Path(run_dir, MANIFEST).exists()
    run = Run.create(run_dir, spec.to_dict(), force=force)
    if replaced:  # the replaced model's training files, exports and report go with it
        remove_replaced_outputs(run)
    save_torch({"spec": spec.to_dict(), "state_dict": model.state_dict(), "epoch": 0, "val_acc": None},
               run.file(CHECKPOINT))
    source = {"pretrained": pretrained, "weights": weights, "weights_sha256": weights_sha256,
              "seed": seed, "init": "pretrained" if pretrained else ("file" if weights else "random")}
    run.set_stage("model", {"status": "ok", "source": source, "checkpoint": run.file_record(run.file(CHECKPOINT))})
    return run
