"""The runtime registry: one small interface over every way to run the model.

    rt = RUNTIMES.get("onnxruntime").load(artifact, device)   # or load_runtime(...)
    logits = rt.predict(batch)                                 # (N, 3, H, W) raw pixels -> (N, K)

`verify`, `bench` and `evaluate` are written once against this interface, so a served model is
checked exactly like a local file. A runtime that cannot run here raises RuntimeUnavailable
with the reason; callers skip it and say so, never silently.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from cnnpack.errors import RuntimeUnavailable, UserInputError
from cnnpack.registry import Registry
from cnnpack.rundir import Run


@dataclass
class ArtifactRef:
    """What a runtime needs to load a model: the run, the format and (for files) the path."""

    run: Run
    format: str  # "checkpoint" | "onnx" | "torchscript" | ...
    path: Path | None = None
    record: dict = field(default_factory=dict)  # stages.export.artifacts.<format>
    max_batch_size: int | None = None


class Loaded(Protocol):
    name: str

    def predict(self, batch: np.ndarray) -> np.ndarray: ...


RUNTIMES: Registry = Registry("runtime")


class EagerRuntime:
    """The PyTorch checkpoint, wrapped to take raw pixels, in inference mode."""

    name = "eager"

    def __init__(self, model, device) -> None:
        self.model, self.device = model, device

    @classmethod
    def load(cls, artifact: ArtifactRef, device: str = "cpu") -> EagerRuntime:
        from cnnpack.models import RawPixels
        from cnnpack.train import load_checkpoint, resolve_device

        dev = resolve_device(device)
        net, spec = load_checkpoint(artifact.run, device=dev)
        return cls(RawPixels(net, spec.mean, spec.std).to(dev).eval(), dev)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
            return self.model(x).float().cpu().numpy()


RUNTIMES.register("eager")(EagerRuntime)

# which runtime reads which format by default
FORMAT_RUNTIME = {"checkpoint": "eager", "onnx": "onnxruntime", "torchscript": "torchscript"}


def artifact_ref(run: Run, fmt: str) -> ArtifactRef:
    """The recorded artifact of `fmt` in a run (checked against its sha256), or the checkpoint."""
    if fmt == "checkpoint":
        return ArtifactRef(run, "checkpoint", run.file("checkpoint.pt"))
    from cnnpack.rundir import sha256

    arts = run.stage("export", required_by="this command", hint=f"`cnnpack export --run {run.path} --format {fmt}`"
                     ).get("artifacts", {})
    if fmt not in arts:
        raise UserInputError(f"{run.path} has no {fmt} export (has: {', '.join(arts) or 'none'}); "
                             f"run `cnnpack export --run {run.path} --format {fmt}` first")
    rec = arts[fmt]
    path = run.file(rec["path"])
    if not path.is_file():
        raise UserInputError(f"{path} is missing; re-run `cnnpack export --run {run.path} --format {fmt}`")
    if sha256(path) != rec["sha256"]:
        raise UserInputError(f"{path} changed since export (sha256 differs from the manifest); re-export it")
    return ArtifactRef(run, fmt, path, rec, rec.get("max_batch_size"))


def runtime_for_format(run: Run, fmt: str, device: str = "auto") -> Loaded:
    if fmt not in FORMAT_RUNTIME:
        raise UserInputError(f"unknown format {fmt!r}; valid: {', '.join(FORMAT_RUNTIME)}")
    name = FORMAT_RUNTIME[fmt]
    if name not in RUNTIMES:
        raise RuntimeUnavailable(f"runtime {name} for {fmt} is not available in this build")
    return RUNTIMES.get(name).load(artifact_ref(run, fmt), device)


def predict_split(rt: Loaded, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Logits for uint8 images (N, 3, H, W), in batches, as float32 (N, K)."""
    out = [rt.predict(images[i:i + batch_size].astype(np.float32)) for i in range(0, len(images), batch_size)]
    return np.concatenate(out)
