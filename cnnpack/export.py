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
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from cnnpack import (
    export_onnx,  # noqa: F401 - registers the onnx exporter (before torchscript: the formats' order)
    user_model,
)
from cnnpack.atomic import scratch_beside, staged_beside
from cnnpack.errors import CnnpackError, MissingStageError, StageFailed, UserInputError, reraise_interrupt, shell
from cnnpack.export_config import (
    EXPORTERS,
    ONNX_NAMES,
    TORCHSCRIPT_DEPRECATED,
    TORCHSCRIPT_NAMES,
    Artifact,
    ExportConfig,
    example_input,
    io_spec,
    metadata,
)
from cnnpack.host import exact_fp32, quiet_native_output
from cnnpack.models import (
    RawPixels,
    build_model,
    check_arch,
    check_input_size,
    flops_per_image,
    load_state_dict_file,
    load_weights,
)
from cnnpack.reproduce import write_reproduce_or_warn
from cnnpack.run_replace import Replacing
from cnnpack.rundir import MANIFEST, Run, sha256
from cnnpack.spec import ModelSpec, check_class_names, check_image_size
from cnnpack.train import CHECKPOINT, LATER_OUTPUTS, TRAIN_FILES, load_checkpoint, save_torch


# -- TorchScript -----------------------------------------------------------------------------
@EXPORTERS.register("torchscript")
def export_torchscript(model: nn.Module, spec: ModelSpec, cfg: ExportConfig, dest: Path) -> Artifact:
    t0 = time.perf_counter()
    x = example_input(spec, cfg)
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
    inp, out = io_spec(spec, cfg, TORCHSCRIPT_NAMES)
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
    x = example_input(spec, cfg, cfg.static_batch or 2)
    with quiet_native_output():  # torch.export prints graph fragments when it fails; the error says what failed
        info = pt2.export_pt2(model, x, dest, max_batch=None if cfg.static_batch else cfg.max_batch_size,
                              metadata=meta, num_classes=spec.num_classes)
    inp, out = io_spec(spec, cfg, pt2.NAMES)
    device, torch_version, compile_s = info.pop("device"), info.pop("torch_version"), info.pop("compile_s")
    low, high = info.get("checked_batch") or (1, None)
    if not cfg.static_batch and (low > 1 or (high or cfg.max_batch_size) < cfg.max_batch_size):
        logging.getLogger("cnnpack").warning(
            f"warning: the pt2 package's own input checks (AOTI_RUNTIME_CHECK_INPUTS=1) accept batches {low}.."
            f"{high or 'any'}, not 1..{cfg.max_batch_size}: torch {torch_version} narrowed them while compiling; it "
            "computes the whole range (verify checks it), so leave those checks off with this package")
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
    flops = flops_per_image(model, spec.channels, spec.image_size)  # recorded beside each artifact: bench's, without
    # the network's code
    written: list[str] = []
    kept: list[str] = []  # formats whose artifact was already the one this export makes (a pt2 package)
    try:  # a format that fails leaves the ones before it written and recorded, and reproduce.sh up to date
        for fmt in sorted(cfg.formats, key=_order):
            progress(f"{fmt} ({STEPS[fmt]})" if fmt in STEPS else fmt)
            record = (_export_folder if fmt in FOLDERS else _export_file)(run, model, spec, cfg, fmt, source, flops)
            written.append(f"{record['path']} ({fmt})")
            if record.get("kept"):
                kept.append(fmt)
    except CnnpackError as e:
        if written:  # say what is there after all
            e.args = (f"{e}; written: {', '.join(written)}",)
        raise
    finally:  # also after a Ctrl-C held back until a format was recorded: its line is in reproduce.sh
        with contextlib.suppress(CnnpackError, KeyError):
            write_reproduce_or_warn(run)
    return {**run.read()["stages"]["export"], **({"kept": kept} if kept else {})}


PT2_OPTIONS = ("max_batch_size", "static_batch", "input", "half", "device")  # what shapes the compiled package


def _same_pt2(run: Run, cfg: ExportConfig, source: str, dest: Path) -> dict | None:
    """The recorded pt2 package, where it is the one this export would compile: from the same checkpoint bytes, with
    the same options, torch, cnnpack and inductor settings, and intact. AOTInductor's packages differ in bytes at
    every compile (kernel names, a serialization id): compiled again, an unchanged model was a new file, and
    `cnnpack triton` laid it out as a new version."""
    from cnnpack import __version__, pt2

    rec = (run.read().get("stages", {}).get("export", {}).get("artifacts") or {}).get("pt2") or {}
    config, extra = rec.get("config") or {}, rec.get("extra") or {}
    if not (rec and rec.get("checkpoint_sha256") == source and rec.get("torch_version") == torch.__version__
            and all(config.get(k) == getattr(cfg, k) for k in PT2_OPTIONS)
            and extra.get("inductor_configs") == pt2.INDUCTOR_CONFIGS and "checked_batch" in extra
            and dest.is_file() and sha256(dest) == rec.get("sha256")):
        return None
    try:
        meta = pt2.package_metadata(dest)
    except CnnpackError:
        return None
    if meta.get("cnnpack_version") != __version__ or not _same_device(meta, rec.get("device", "cpu")):
        return None
    return rec


def _same_device(meta: dict, device: str) -> bool:
    """The package was compiled for this machine's kind of device: its CPU's vector ISA, its GPU's compute capability
    (a run moved from an AVX-512 host to an AVX2 one is compiled again, not kept)."""
    from cnnpack.host import prepare_inductor

    prepare_inductor()  # the ISA from the CPU flags, without inductor's probe builds
    try:
        from torch._inductor.codecache import get_device_information

        host = get_device_information(device)
    except Exception:  # noqa: BLE001 - another torch's internals, or no such device: compiled again
        return False
    return all(meta.get(k) == v for k, v in host.items() if k in meta)


def _export_file(run: Run, model: nn.Module, spec: ModelSpec, cfg: ExportConfig, fmt: str, source: str,
                 flops: int) -> dict:
    dest = run.file("export") / f"model{SUFFIX[fmt]}"
    if fmt == "pt2" and (same := _same_pt2(run, cfg, source, dest)):
        logging.getLogger("cnnpack").warning(
            f"note: {run.rel(dest)} kept: compiled from the same checkpoint with the same options and torch "
            "(compiled again it would be new bytes, and a new model version in Triton); delete it to compile again")
        return {**same, "kept": True}  # (not recorded: the manifest keeps its record as it was)
    # put in place only if the exporter and its checks succeed; named `.tmp.pt2`, as torch's loader warns of any other
    with scratch_beside(dest, suffix=".tmp" + (SUFFIX[fmt] if fmt == "pt2" else "")) as tmp:
        art = EXPORTERS.get(fmt)(model, spec, cfg, tmp)
        art.sha256, art.path = sha256(tmp), run.rel(dest)
        record = {**art.record(), "precision": "fp16" if cfg.half else "fp32", "size_mb": tmp.stat().st_size / 2**20,
                  "flops_per_image": flops}
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


def _export_folder(run: Run, model: nn.Module, spec: ModelSpec, cfg: ExportConfig, fmt: str, source: str,
                   flops: int) -> dict:
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
                  "flops_per_image": flops,
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
               seed: int = 0, force: bool = False, mean: tuple[float, ...] | None = None,
               std: tuple[float, ...] | None = None) -> Run:
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
    spec = ModelSpec(**user_model.spec_fields(arch), num_classes=num_classes, classes=tuple(classes), image_size=image_size,
                     **({"mean": tuple(mean)} if mean else {}), **({"std": tuple(std)} if std else {}))
    torch.manual_seed(seed)
    model = build_model(spec, pretrained=pretrained)
    if weights:
        load_weights(model, load_state_dict_file(weights), source=weights)  # validates before any write
    check_input_size(model, spec)  # an arch that cannot take the size: said, and no run left behind to --force
    weights_sha256 = sha256(weights) if weights else None  # before the run it may sit in is replaced
    # the replaced model's training files, exports and report go with it, once this one is recorded (until then
    # they are set aside: a failure puts them back)
    replacing = None
    with contextlib.ExitStack() as held:
        if force and Path(run_dir, MANIFEST).exists():  # under the run's lock: not interleaved with another
            held.enter_context(Run(run_dir).locked())  # --force of the run
            replacing = Replacing(run_dir, (MANIFEST, *TRAIN_FILES, *LATER_OUTPUTS), lock=Run(run_dir).locked)
            held.enter_context(replacing.guard())
        run = Run.create(run_dir, spec.to_dict(), force=force,
                         run_id=replacing.run_id if replacing is not None else None)
        save_torch({"spec": spec.to_dict(), "state_dict": model.state_dict(), "epoch": 0, "val_acc": None},
                   run.file(CHECKPOINT))
        source = {"pretrained": pretrained, "weights": weights, "weights_sha256": weights_sha256,
                  "seed": seed, "init": "pretrained" if pretrained else ("file" if weights else "random")}
        run.set_stage("model", {"status": "ok", "source": source,
                                "checkpoint": run.file_record(run.file(CHECKPOINT))})
        if replacing is not None:  # (under the run's lock, with the model's record)
            replacing.keep_new()
    return run
