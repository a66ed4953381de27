"""`cnnpack quantize`: an INT8 artifact calibrated on the run's own images, under an accuracy gate.

The quantizers are plug-ins: `onnx_int8` (ONNX Runtime QDQ, cnnpack/int8_ort.py) and `openvino_int8`
(NNCF, cnnpack/int8_openvino.py). Both go through the same gate (cnnpack/int8_gate.py): top-1 on the
validation split, int8 against the fp32 artifact, may drop by at most `max_drop` percentage points
and the two must agree on at least `min_agreement` of the images (verify's int8 contract, so
quantize never keeps a model verify would reject); when the plain int8 model misses it, the ranked
fallback keeps the most harmful nodes in float one more per step; all of it within `time_limit_s`.

A failed, timed-out or interrupted quantize leaves the previous int8 artifact and its record as they
were: everything is built in a temporary folder and moved in only after the gate held.
"""

from __future__ import annotations

import logging
import shlex
import shutil
from collections.abc import Callable
from pathlib import Path

from cnnpack import int8_openvino, int8_ort  # noqa: F401 - registers the quantizers
from cnnpack.data import recorded_source
from cnnpack.errors import StageFailed
from cnnpack.int8_gate import QUANTIZERS, Clock, GateMissed, QuantizeConfig, TimeLimitReached, refusal
from cnnpack.int8_ort import INT8_PATH
from cnnpack.rundir import Run, artifact_digest, now

__all__ = ["BACKENDS", "INT8_PATH", "STAGE", "QuantizeConfig", "TimeLimitReached", "command", "describe", "quantize"]

BACKENDS = {"onnxruntime": "onnx_int8", "openvino": "openvino_int8"}  # --backend -> the artifact's format
STAGE = {"onnx_int8": "quantize", "openvino_int8": "quantize_openvino"}  # its section in the manifest
log = logging.getLogger("cnnpack")


def command(run: Run, cfg: QuantizeConfig) -> str:
    args = ["cnnpack", "quantize", "--run", str(run.path)]
    args += ["--calibration-images", str(cfg.calibration_images)] if cfg.calibration_images is not None else []
    args += ["--method", cfg.method, "--max-drop", _exact(cfg.max_drop), "--min-agreement", _exact(cfg.min_agreement),
             "--max-steps", str(cfg.max_steps), "--rank-images", str(cfg.rank_images),
             "--time-limit", _exact(cfg.time_limit_s), "--seed", str(cfg.seed)]
    # as the artifact was made, from any folder: the data by its absolute path, the weights as auto chose them here
    args += ["--data", recorded_source(cfg.data)] if cfg.data else []
    args += ["--backend", "openvino"] if cfg.format == "openvino_int8" else [
        "--weight-type", int8_ort.weight_type(cfg.weight_type)[0]]
    return " ".join(shlex.quote(a) for a in args)


def _exact(x: float) -> str:
    """A number as short as it reads back the same: `:g` alone wrote --max-drop 0.1234567 as 0.123457."""
    return f"{x:g}" if float(f"{x:g}") == x else repr(float(x))


def quantize(run_dir: str | Path, cfg: QuantizeConfig = QuantizeConfig(), *,
             progress: Callable[[str], None] = lambda _: None) -> dict:
    """Quantizes the run's fp32 ONNX artifact (or OpenVINO IR) under the gate; returns `stages.quantize`
    (`stages.quantize_openvino`).

    Raises:
        UserInputError / MissingStageError (exit 2): bad options, no fp32 artifact, unusable data; nothing written.
        TimeLimitReached (exit 1): `cfg.time_limit_s` ran out; the best attempt's figures in the message,
            nothing recorded (the manifest and the previous int8 artifact stay as they were).
        GateMissed (a ParityError, exit 1): no attempt within the gate; `stages.quantize` records the attempts (also
            the error's `section`) and the
            reason, the previous int8 artifact and its record stay as they were.
    """
    cfg.validate()
    run = Run.open(run_dir)
    run.check_writable(run.file("export"))  # a run (or export/) it cannot write to fails now, not after the work
    clock = Clock(cfg.time_limit_s, progress)
    try:
        section = QUANTIZERS.get(cfg.format)(run, cfg, clock, command(run, cfg))
        return _record(run, cfg, clock, section)
    finally:
        for staged, _ in clock.staged:  # not put in place (a refusal, an error, a Ctrl-C): removed
            shutil.rmtree(staged, ignore_errors=True) if staged.is_dir() else staged.unlink(missing_ok=True)


def _record(run: Run, cfg: QuantizeConfig, clock: Clock, section: dict) -> dict:
    """Records the attempt; with an artifact, puts it in place and records it as one step (`Run.commit`)."""
    section["read_s"] = clock.read_s
    artifact = section.pop("artifact", None)
    if artifact is None:
        message = refusal(section, cfg, STAGE[cfg.format], run.manifest_path)
        if section.get("stopped"):
            raise TimeLimitReached(message, section)

        def missed(m: dict) -> None:  # a gate of two other models is no figure of this one
            _check_source(run, cfg, m, section["input"])
            m["stages"][STAGE[cfg.format]] = {"updated": now(), **section}

        run.update(missed)
        raise GateMissed(message, run.read()["stages"][STAGE[cfg.format]])
    section["outputs"] = {cfg.format: {"path": artifact["path"], "sha256": artifact["sha256"]}}
    if clock.left() < 0:  # an attempt under way at the limit runs to its end (calibration cannot stop halfway)
        section["past_time_limit_s"] = round(-clock.left(), 1)
        log.warning("note: the attempt kept held the gate %.1f s past --time-limit %g; an attempt under way at the "
                    "limit runs to its end, and one that holds is kept", -clock.left(), cfg.time_limit_s)

    def record(m: dict) -> None:
        _check_source(run, cfg, m, artifact["source"])
        m["stages"]["export"]["artifacts"][cfg.format] = artifact
        m["stages"][STAGE[cfg.format]] = {"updated": now(), **section}

    from cnnpack.reproduce import write_reproduce_or_warn

    try:  # a Ctrl-C, a second quantize or a full disk never leaves the file and its record apart
        run.commit(clock.staged, record)
    finally:  # its line in reproduce.sh also when a Ctrl-C waited for the record
        write_reproduce_or_warn(run)
    return run.read()["stages"][STAGE[cfg.format]]


def _check_source(run: Run, cfg: QuantizeConfig, m: dict, source: dict) -> None:
    """The fp32 source exported again while quantize read it (it reads the file more than once, seconds apart): the
    int8 model may be of the new file and its record of the old one, its gate of two models fed the wrong input."""
    now_rec = m["stages"].get("export", {}).get("artifacts", {}).get(source["format"])
    if not now_rec or artifact_digest(now_rec) != artifact_digest(source):
        where = run.file(now_rec["path"]) if now_rec else f"the {source['format']} artifact"
        raise StageFailed(f"{where} changed while quantize ran (exported again?); nothing was recorded: run "
                          f"`{command(run, cfg)}` again")


def describe(section: dict) -> str:
    """One line for the CLI and the pipeline."""
    g = section["gate"]
    kept = section["kept_float"]
    return (f"top-1 {100 * g['int8_accuracy']:.2f}% vs fp32 {100 * g['fp32_accuracy']:.2f}% (drop {g['drop_pt']:.2f} pt "
            f"<= {g['max_drop_pt']:g}), agreement with fp32 {100 * g['top1_agreement_vs_fp32']:.2f}% "
            f"(>= {100 * g['min_agreement']:g}%), "
            + (f"{len(kept)} node(s) kept in float: {', '.join(kept)}" if kept else "every quantizable node in int8")
            + coarse_gate(g))


def coarse_gate(gate: dict) -> str:
    """A caution where one validation image is more than --max-drop: on so few images the gate let no image be
    lost, whatever --max-drop says (4 images: each one is 25 pt). None with --max-drop 0: no image may be lost there
    on any number of images."""
    n = gate.get("int8_images") or gate.get("val_images")
    if not n or 100 / n <= gate["max_drop_pt"] or gate["max_drop_pt"] <= 0:
        return ""
    return (f"; the gate judged {n} validation image(s): one is {100 / n:.3g} pt of top-1, more than --max-drop "
            f"{gate['max_drop_pt']:g}, so it allowed no net loss of even one image (more validation images make it finer)")
