"""A run's checkpoint.pt: written whole (a temp file, then os.replace), read back as the model it holds, checked
against the model spec and the sha256 the run recorded for it (weights edited, or another run's, are refused)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import torch
from torch import nn

from cnnpack.atomic import atomic_path
from cnnpack.errors import UserInputError, shell
from cnnpack.models import build_model, load_weights
from cnnpack.rundir import Run, sha256
from cnnpack.spec import ModelSpec

CHECKPOINT = "checkpoint.pt"


def torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def save_torch(obj, path: Path) -> None:
    """torch.save through a temp file + os.replace."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(torch_bytes(obj))


def load_checkpoint(run: Run, *, device: str | torch.device = "cpu") -> tuple[nn.Module, ModelSpec, str]:
    """The best weights of a run, as an eval-mode model, its spec, and the sha256 of the very bytes loaded (a
    training in progress may replace the file meanwhile: what was loaded is what gets recorded)."""
    import hashlib

    path = run.file(CHECKPOINT)
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        train = run.read().get("stages", {}).get("train") or {}
        if train.get("status") in ("running", "failed", "interrupted"):  # no epoch finished: there never were weights
            error = f": {train['error']}" if train.get("error") else ""
            raise UserInputError(f"{run.path}'s training did not finish an epoch (train {train['status']}{error}); "
                                 f"train it with `cnnpack train --run {shell(run.path)} --force`") from None
        raise UserInputError(f"{path} is missing: the run's weights are gone; restore the file, or train the run "
                             f"again with `cnnpack train --run {shell(run.path)} --force` and the options it was "
                             "trained with (stages.train.config in its cnnpack.json)") from None
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        spec = ModelSpec.from_dict(ckpt["spec"])
        state = ckpt["state_dict"]
    except Exception as e:  # noqa: BLE001 - truncated zip, foreign pickle, missing keys
        raise UserInputError(f"{path} is not a readable cnnpack checkpoint ({type(e).__name__}: truncated or replaced?); "
                             f"restore the file, or train the run again with `cnnpack train --run {shell(run.path)} "
                             "--force` and the options it was trained with (stages.train.config in its cnnpack.json)"
                             ) from None
    recorded = ModelSpec.from_dict(run.model_spec)
    # another run's file copied in: evaluate scored a 32 px model on 64 px images as this run's (compared as JSON)
    if ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) != recorded:
        said = lambda s: f"{s.arch}, {s.image_size} px, {s.num_classes} classes"  # noqa: E731
        raise UserInputError(f"{path} holds another model ({said(spec)}) than {run.path} records ({said(recorded)}"
                             f"{'' if said(spec) != said(recorded) else ', other class names, normalisation or input'}); "
                             "restore the run's own checkpoint.pt, or train the run again with --force")
    digest = hashlib.sha256(data).hexdigest()
    if (wrote := _recorded_checkpoint(run)) and wrote != digest:
        if path.is_file() and sha256(path) == wrote:  # a training finished between the read and the record: its own
            return load_checkpoint(run, device=device)
        # weights edited, or another run's of this model
        raise UserInputError(f"{path} is not the checkpoint the run recorded (its sha256 differs): restore it, or "
                             f"train the run again with `cnnpack train --run {shell(run.path)} --force`")
    model = build_model(spec)
    load_weights(model, state, source=str(path))
    return model.to(device).eval(), spec, digest


def _recorded_checkpoint(run: Run) -> str | None:
    """The sha256 of the checkpoint.pt a finished training (or `export --arch`) recorded; None while a training is
    under way (each better epoch replaces the file) or where none was recorded."""
    stages = run.read().get("stages") or {}
    train, model = stages.get("train") or {}, stages.get("model") or {}
    if train:
        return ((train.get("outputs") or {}).get("checkpoint") or {}).get("sha256") if train.get("status") == "ok" \
            else None
    return (model.get("checkpoint") or {}).get("sha256") if model.get("status") == "ok" else None
