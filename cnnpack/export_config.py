"""`cnnpack export`'s options, the record an exporter returns (`Artifact`), what every artifact says about itself
(`metadata`, its input and output), and the registry of formats the exporters register in."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import torch

from cnnpack import __version__, user_model
from cnnpack.errors import UserInputError
from cnnpack.host import check_device
from cnnpack.registry import Registry
from cnnpack.spec import ModelSpec

EXPORTERS: Registry = Registry("format", filled_by="cnnpack.export")  # the exporters register there
ONNX_NAMES = ("input", "logits")
TORCHSCRIPT_NAMES = ("INPUT__0", "OUTPUT__0")  # what Triton's libtorch backend expects
TORCHSCRIPT_DEPRECATED = ("TorchScript (torch.jit) is deprecated upstream in favour of torch.export; kept for "
                          "Triton's libtorch backend: pt2 (torch.export + AOTInductor) is its successor")
DEFAULT_OPSET = 18  # the torch.export-based exporter's floor; loads in ORT >= 1.14 (Triton >= 23.02)
OPSET_RANGE = {"dynamo": (18, 23), "legacy": (7, 20)}


MAX_STATIC_BATCH = 4096  # as bench's largest batch: 2.4 GB of float32 at 224 px, traced at once
MAX_BATCH = 2**31 - 1  # config.pbtxt's max_batch_size: an int32


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
        if self.max_batch_size > MAX_BATCH:  # Triton's max_batch_size is an int32: the layout failed with a traceback
            raise UserInputError(f"--max-batch-size must be at most {MAX_BATCH:,} (Triton's int32), got "
                                 f"{self.max_batch_size:,}")
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
        "arch": user_model.display(spec.arch),  # (your own model's file by its name: no folder of this machine)
        "input_kind": cfg.input,
        "input_layout": "NCHW RGB, raw pixels 0-255" if cfg.input == "raw" else "NCHW RGB, normalised",
        "cnnpack_version": __version__,
    }


def io_spec(spec: ModelSpec, cfg: ExportConfig, names: tuple[str, str]) -> tuple[dict, dict]:
    batch = cfg.static_batch or -1
    dtype = "float16" if cfg.half else "float32"
    return ({"name": names[0], "dtype": dtype, "shape": [batch, spec.channels, spec.image_size, spec.image_size]},
            {"name": names[1], "dtype": dtype, "shape": [batch, spec.num_classes]})


def example_input(spec: ModelSpec, cfg: ExportConfig, n: int | None = None) -> torch.Tensor:
    n = n or cfg.static_batch or 2
    g = torch.Generator().manual_seed(0)
    x = torch.rand(n, spec.channels, spec.image_size, spec.image_size, generator=g) * 255
    if cfg.input == "normalized":
        x = (x / 255 - 0.45) / 0.225
    return x.to(cfg.device, torch.float16 if cfg.half else torch.float32)
