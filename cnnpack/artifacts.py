"""A run's recorded artifacts as the commands use them: `artifact_ref` finds one and refuses a file that is missing,
changed since it was recorded, or made from other weights than the run holds now (`other_source`), naming the command
that makes it again. The runtimes (cnnpack/runtimes.py) load what it finds; report, servable and verify read the same
rules without loading anything."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cnnpack.errors import UserInputError, shell
from cnnpack.rundir import Run


@dataclass
class ArtifactRef:
    """What a runtime needs to load a model: the run, the format and (for files) the path."""

    run: Run
    format: str  # "checkpoint" | "onnx" | "torchscript" | ...
    path: Path | None = None
    record: dict = field(default_factory=dict)  # stages.export.artifacts.<format>
    max_batch_size: int | None = None


def precision_of(record: dict) -> str:
    """An artifact record's precision (records written before precisions existed: from the dtype)."""
    if record.get("precision"):
        return record["precision"]
    return "fp16" if record.get("input", {}).get("dtype") == "float16" else "fp32"


QUANTIZED = {"onnx_int8": "", "openvino_int8": " --backend openvino"}  # made by `cnnpack quantize`, not export


def remake_command(run: Run, fmt: str) -> str:
    """The command that makes (or re-makes) the artifact of `fmt` in `run`."""
    if fmt in QUANTIZED:
        return f"cnnpack quantize --run {shell(run.path)}{QUANTIZED[fmt]}"
    return f"cnnpack export --run {shell(run.path)} --format {fmt}"


def checkpoint_digest(run: Run) -> str | None:
    """The sha256 of the run's checkpoint.pt now (None without one): hashed once by a caller that holds several
    artifacts to it (`other_source`)."""
    from cnnpack.rundir import sha256

    ckpt = run.file("checkpoint.pt")
    return sha256(ckpt) if ckpt.is_file() else None


def other_source(run: Run, fmt: str, record: dict, checkpoint_sha256: str | None = None) -> str | None:
    """Why the artifact of `fmt` is not of the run's weights now: it was made from another checkpoint (a training
    since: resumed, or trained again), with the commands that make it again; None where it is of them (or its record
    is older than that field, or the run has no checkpoint). `checkpoint_sha256`: the bytes a caller loaded (or
    `checkpoint_digest`), else the checkpoint file's now."""
    made_from = record.get("checkpoint_sha256")
    if not made_from:
        return None
    now = checkpoint_sha256 or checkpoint_digest(run)
    if now is None or made_from == now:
        return None
    ckpt = run.file("checkpoint.pt")
    base = {"onnx_int8": "onnx", "openvino_int8": "openvino"}.get(fmt, fmt)
    again = f"`{remake_command(run, base)}`" + (f" then `{remake_command(run, fmt)}`" if base != fmt else "")
    return (f"{fmt} ({record.get('path')}) was made from another {run.rel(ckpt)} than the run holds now (a "
            f"training since?); make it again: {again}")


def artifact_ref(run: Run, fmt: str, checkpoint_sha256: str | None = None) -> ArtifactRef:
    """The recorded artifact of `fmt` in a run (checked against its sha256, and made from the run's checkpoint
    now, or from the bytes `checkpoint_sha256` a caller loaded), or the checkpoint."""
    if fmt == "checkpoint":
        return ArtifactRef(run, "checkpoint", run.file("checkpoint.pt"))
    from cnnpack.rundir import artifact_changed

    make = remake_command(run, "onnx" if fmt in QUANTIZED else fmt)
    arts = run.stage("export", hint=f"`{make}`").get("artifacts", {})
    if fmt not in arts:
        raise UserInputError(f"{run.path} has no {fmt} artifact (has: {', '.join(arts) or 'none'}); "
                             f"run `{remake_command(run, fmt)}` first")
    rec = arts[fmt]
    if why := artifact_changed(run, rec):
        refuse = "" if why.endswith("is missing") else " refusing to use it:"
        raise UserInputError(f"{why};{refuse} re-run `{remake_command(run, fmt)}`")
    if why := other_source(run, fmt, rec, checkpoint_sha256):  # served, benched or quantized as the run's model, it is not
        raise UserInputError(why)
    return ArtifactRef(run, fmt, run.file(rec["path"]), rec, rec.get("max_batch_size"))
