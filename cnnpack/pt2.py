"""PyTorch's own deployment format: torch.export + AOTInductor `.pt2` packages, and the `aoti` runtime.

TorchScript's successor for running a model without Python. `torch.export` captures the model's
graph (the same raw-pixel model the other formats carry, batch dimension dynamic 1..max), AOTInductor
compiles it ahead of time to C++ (CPU: OpenMP loops and oneDNN convolutions with the weights frozen in;
CUDA: Triton kernels) and `aoti_compile_and_package` writes kernels and weights into one zip:

    torch._inductor.aoti_load_package("model.pt2")              # Python (the `aoti` runtime below)
    torch::inductor::AOTIModelPackageLoader("model.pt2")         // C++, no Python
    platform: "torch_aoti"                                       # Triton's PyTorch backend (NGC >= 26.06)

Compiling needs a C++ compiler at export time (AOTInductor runs g++ on the generated code);
loading it does not. The model spec (class names, mean/std, image size, precision, cnnpack
version) travels inside the package as AOTInductor metadata: the loaded model's `get_metadata()`
(C++: `AOTIModelPackageLoader::get_metadata()`), and a JSON file in the zip that `package_metadata`
reads without torch. A package runs on the device it was compiled for, with the torch version that
compiled it or a newer one.

The exporter that uses these helpers is registered with the others in export.py; the runtime in runtimes.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np

from cnnpack.errors import RuntimeUnavailable, StageFailed, UserInputError, reraise_interrupt
from cnnpack.host import COMPILER_INSTALL, compiler_fails, compiler_missing

NAMES = ("INPUT__0", "OUTPUT__0")  # Triton's PyTorch backend: ordinal names, for torch_aoti as for TorchScript
# freezing: weights become constants (BatchNorm folded, oneDNN weights pre-packed); measured in
# benchmarks/results/pt2-aoti-*.md, as are the settings tried and left at their defaults.
# dynamic_threads: the kernels take the thread count at run time (a Triton instance's INTRA_OP_THREAD_COUNT, the
# node's cores), not the exporting machine's: exported with OMP_NUM_THREADS=1 they had no OpenMP at all, and on a
# host with SMT inductor writes num_threads(<its physical cores>) into each. The same speed on 2 cores
# (benchmarks/results/pt2-aoti-*.md: 1.81x eager against freezing alone's 1.77x, the CNN at batch 1; on the Zen 4
# 0.35 ms at batch 1 and 4.7-5.2 ms at 32 either way).
INDUCTOR_CONFIGS = {"freezing": True, "cpp.dynamic_threads": True}
# the package's own input checks (AOTI_RUNTIME_CHECK_INPUTS=1) on the batch range the export recorded: inductor
# checks a dynamic size >= 2 unless told not to, and a guard it took while lowering the CNN's first convolution
# (the convolution backend for batches of 16 and more, decided on the example batch of 2) narrowed the range it
# checked to 2..15, while the package computes every batch of 1..64 right. Size-oblivious reasoning takes no such
# guard; the range the package checks is recorded (`checked_batch`) and compared with the exported one.
NO_LOWER_BOUND = {"aot_inductor.check_lowerbound": False}


# -- the compiler ------------------------------------------------------------------------------------
def find_compiler() -> str:
    """The C++ compiler AOTInductor will run (`$CXX`, else `g++`), or UserInputError naming what is missing."""
    if why := compiler_missing():
        raise UserInputError(f"--format pt2 needs a C++ compiler (AOTInductor compiles the model to C++ at export "
                             f"time): {why}; {COMPILER_INSTALL}; the other formats do not need one")
    return os.environ.get("CXX") or "g++"


def compiler_available() -> tuple[bool, str]:
    try:
        find_compiler()
    except UserInputError as e:
        return False, str(e)
    return True, ""


# -- export ------------------------------------------------------------------------------------------
def capture(model, example, *, max_batch: int | None):
    """torch.export of `model` on `example` (N >= 2), batch dimension 1..max_batch (None: static).

    Raises UserInputError naming the construct torch.export cannot capture and where it is.
    """
    import torch

    dynamic = None if max_batch is None else ({0: torch.export.Dim("batch", min=1, max=max_batch)},)
    try:
        return torch.export.export(model, (example,), dynamic_shapes=dynamic)
    except Exception as e:  # noqa: BLE001 - torch.export raises many kinds (dynamo, symbolic shapes, user errors)
        reraise_interrupt(e)
        raise UserInputError(f"--format pt2: torch.export cannot capture this model: {capture_error(e)}; "
                             "the other formats do not depend on it") from None


def capture_error(e: BaseException) -> str:
    """torch.export's error in one line: its first line, and the model's source line that raised it."""
    text = str(e).strip()
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
    first = re.sub(r"\s*\((unhinted|Size-like symbols): [^()]*(\([^()]*\)[^()]*)*\)\.?", "", first)
    where = re.search(r'File "([^"]+)", line (\d+), in (\w+)\n\s*(.+)', text)
    if where:
        path, line, fn, code = where.groups()
        return f"{first} at `{code.strip()}` ({Path(path).name}:{line} in {fn})"
    return first


def compile_package(program, dest: Path, *, metadata: dict[str, str], configs: dict | None = None) -> float:
    """AOTInductor-compiles `program` into the package `dest` with inductor `configs` (default INDUCTOR_CONFIGS:
    frozen weights); returns the compile seconds."""
    import io

    import torch
    from torch._inductor import exc

    from cnnpack.host import prepare_inductor

    prepare_inductor()
    buf = io.BytesIO()  # not `dest`: the archive's root folder would be named after the temp file
    settings = {**(INDUCTOR_CONFIGS if configs is None else configs), "aot_inductor.metadata": metadata}
    if hasattr(torch._inductor.config.aot_inductor, "check_lowerbound"):  # (torch >= 2.8)
        settings.update(NO_LOWER_BOUND)
    t0 = time.perf_counter()
    try:
        with torch.no_grad(), _size_oblivious():  # inductor freezes only an inference graph (grad disabled)
            torch._inductor.aoti_compile_and_package(program, package_path=buf, inductor_configs=settings)
    except Exception as e:  # noqa: BLE001 - inductor's lowering and the C++ compiler fail in many ways
        reraise_interrupt(e)
        cause: BaseException | None = e
        while cause is not None and not isinstance(cause, exc.InvalidCxxCompiler):  # raised, or wrapped by inductor
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            cxx = find_compiler()  # names what is missing; if it finds one, inductor disagreed with it
            raise UserInputError(f"--format pt2: AOTInductor found no working C++ compiler (tried {cxx}); "
                                 f"{COMPILER_INSTALL}") from None
        if why := compiler_fails():  # a compiler that runs but writes nothing (CXX=true): inductor's IndexError
            raise UserInputError(f"--format pt2: the C++ compiler does not work: {why}; {COMPILER_INSTALL}") from None
        line = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise StageFailed(f"AOTInductor could not compile the exported model: {line.strip()}") from None
    seconds = time.perf_counter() - t0
    dest.write_bytes(buf.getvalue())
    return seconds


def _size_oblivious():
    """torch's size-oblivious reasoning for the compile (no guard that narrows the batch range), where it has it."""
    import contextlib

    try:
        from torch.fx.experimental import _config as fx_config
    except ImportError:
        return contextlib.nullcontext()
    return fx_config.patch(backed_size_oblivious=True) if hasattr(fx_config, "backed_size_oblivious") \
        else contextlib.nullcontext()


def checked_batch(path: Path) -> tuple[int, int | None] | None:
    """The batch sizes the package's own input checks (AOTI_RUNTIME_CHECK_INPUTS=1) accept, from its wrapper's
    source: (lowest, highest or None), lowest 0 where none is checked (cnnpack turns inductor's off: a batch of 0
    passes them, and cnnpack's runtime refuses it); None where the package holds no readable wrapper (a static
    batch checks its one size)."""
    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if n.endswith(".wrapper.cpp")), None)
            text = z.read(name).decode("utf-8", "replace") if name else ""
    except (zipfile.BadZipFile, OSError):
        return None
    first = re.search(r"auto (\w+)_size = \1\.sizes\(\);", text)
    if not first:
        return None
    var = first.group(1)
    low = re.search(rf"if \({var}_size\[0\] < (\d+)\)", text)
    high = re.search(rf"if \({var}_size\[0\] > (\d+)\)", text)
    return int(low.group(1)) if low else 0, int(high.group(1)) if high else None  # 0: no lower bound checked


def check_package(path: Path, example, device: str, num_classes: int) -> None:
    """Loads the package and runs it once: a file that cannot run is not an artifact.

    A CUDA package is loaded in a fresh child process: on an H200 with torch 2.11, `aoti_load_package` of a freshly
    compiled CUDA package crashed the process (SIGSEGV in torch's loader, plain torch as much as cnnpack), which
    ended the export with exit 139 and not a word. A crash there is now this stage's one-line error (the formats
    exported before pt2 stay recorded), and a package that loads in a fresh process is what verify, bench and Triton
    will load."""
    import torch

    if device == "cuda":
        _check_in_child(path, example, num_classes, device)
        return
    compiled = load(path, device)
    with torch.inference_mode():
        y = compiled(example)
    if tuple(y.shape) != (example.shape[0], num_classes) or not torch.isfinite(y).all():
        raise StageFailed(f"the compiled package answers {tuple(y.shape)} (finite: {bool(torch.isfinite(y).all())}), "
                          f"expected finite logits of shape {(example.shape[0], num_classes)}")


_CHILD_CHECK = """
import sys, torch
path, example, k, device = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
model = torch._inductor.aoti_load_package(path)
x = torch.load(example, weights_only=True).to(device)
with torch.inference_mode():
    y = model(x)
print(tuple(y.shape), bool(torch.isfinite(y).all()))
sys.exit(0 if tuple(y.shape) == (x.shape[0], k) and bool(torch.isfinite(y).all()) else 3)
"""


def _check_in_child(path: Path, example, num_classes: int, device: str) -> None:
    """`_CHILD_CHECK` in a fresh interpreter, on the export's own example batch (raw or normalised, fp32 or fp16)."""
    import signal
    import sys
    import tempfile

    import torch

    with tempfile.TemporaryDirectory(prefix="cnnpack-pt2-check-") as tmp:
        x = Path(tmp) / "example.pt"
        torch.save(example.detach().cpu(), x)
        argv = [sys.executable, "-c", _CHILD_CHECK, str(path), str(x), str(num_classes), device]
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise StageFailed(f"the compiled {device} package did not load and run within 600 s in a fresh "
                              "process") from None
    if done.returncode == 0:
        return
    if done.returncode < 0:
        try:
            name = signal.Signals(-done.returncode).name
        except ValueError:
            name = f"signal {-done.returncode}"
        why = f"crashed PyTorch's loader ({name}, torch {torch.__version__})"
    elif done.returncode == 3:
        answer = (done.stdout.strip().splitlines() or ["nothing"])[-1]
        why = (f"answers {answer} (shape, finite), expected finite logits of shape "
               f"{(example.shape[0], num_classes)}")
    else:
        lines = [ln for ln in done.stderr.splitlines() if ln.strip()]
        why = f"failed to load: {lines[-1].strip() if lines else f'exit {done.returncode}'}"
    raise StageFailed(f"the compiled {device} package {why} when loaded and run in a fresh process; not recorded")


def weights_bytes(model) -> int:
    """Bytes of the model's parameters and buffers: what the package's size is set against."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def export_pt2(model, example, dest: Path, *, max_batch: int | None, metadata: dict[str, str], num_classes: int) -> dict:
    """The whole export: compiler check, capture, compile, reload. Returns what the manifest records beside it."""
    import torch

    find_compiler()  # before the capture: a missing compiler is said at once
    device = example.device.type
    t0 = time.perf_counter()
    program = capture(model, example, max_batch=max_batch)
    capture_s = time.perf_counter() - t0
    compile_s = compile_package(program, dest, metadata=metadata)
    check_package(dest, example, device, num_classes)
    meta = package_metadata(dest)
    checked = checked_batch(dest) if max_batch else None
    return {"device": device, "checked_batch": list(checked) if checked else None, "torch_version": torch.__version__, "compile_s": round(compile_s, 2),
            "capture_s": round(capture_s, 2), "cpu_isa": meta.get("AOTI_CPU_ISA") or None,
            "inductor_configs": dict(INDUCTOR_CONFIGS), "weights_mb": weights_bytes(model) / 2**20,
            "package_mb": dest.stat().st_size / 2**20}


# -- reading a package -----------------------------------------------------------------------------------
def package_metadata(path: Path) -> dict[str, str]:
    """The AOTInductor metadata of a package (cnnpack's model spec + AOTI_* keys), read without torch."""
    try:
        with zipfile.ZipFile(path) as z:
            name = next((n for n in z.namelist() if re.search(r"/data/aotinductor/[^/]+/[^/]+wrapper_metadata\.json$",
                                                              n)), None)
            return json.loads(z.read(name)) if name else {}
    except (zipfile.BadZipFile, json.JSONDecodeError, OSError) as e:
        raise UserInputError(f"{path} is not a readable .pt2 package ({e}); re-export it with "
                             "`cnnpack export --format pt2`") from None


def load(path: Path, device: str):
    """`aoti_load_package` on `device` (cpu or cuda), or UserInputError/RuntimeUnavailable saying why not."""
    import torch

    from cnnpack.host import quiet_cpp_extension

    quiet_cpp_extension()
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeUnavailable(f"aoti: {path.name} was compiled for CUDA and no CUDA GPU is visible here")
    try:
        return torch._inductor.aoti_load_package(str(path))  # on its own device (device_index -1: cuda = current)
    except RuntimeError as e:
        raise UserInputError(f"cannot load {path}: {str(e).strip().splitlines()[0]}; re-export it with "
                             "`cnnpack export --format pt2`") from None


# -- the runtime -----------------------------------------------------------------------------------------
class AotiRuntime:
    """A `.pt2` package through `aoti_load_package`, on the device it was compiled for, in inference mode.

    Batches are checked against the package's shape and its exported batch range before they run:
    the compiled code itself does not check them (AOTI_RUNTIME_CHECK_INPUTS is off).
    """

    name = "aoti"
    format = "pt2"

    def __init__(self, compiled, device: str, shape: tuple[int, ...], max_batch: int | None, half: bool,
                 source: str, static: bool = False) -> None:
        self.compiled, self.device, self.shape, self.max_batch, self.half = compiled, device, shape, max_batch, half
        self.source = source
        self.static = static  # compiled for exactly max_batch (a smaller batch read past its end: garbage logits)
        self.info = {"device": device, "runner": "torch._inductor.aoti_load_package"}

    @classmethod
    def load(cls, artifact, device: str = "cpu", **_: object) -> AotiRuntime:
        rec = artifact.record
        where = rec.get("device", "cpu")
        if device not in ("auto", where):
            raise RuntimeUnavailable(f"aoti: {rec.get('path', artifact.path)} is compiled for {where}; run it with "
                                     f"--device {where} (or re-export with --device {device})")
        compiled = load(Path(artifact.path), where)
        shape = tuple(rec["input"]["shape"][1:])
        max_batch = rec.get("static_batch") or rec.get("max_batch_size")
        rt = cls(compiled, where, shape, max_batch, rec["input"].get("dtype") == "float16", str(rec.get("path")),
                 static=bool(rec.get("static_batch")))
        rt.info.update(cpu_isa=rec.get("cpu_isa"), torch_version=rec.get("torch_version"))
        return rt

    def check(self, batch: np.ndarray) -> None:
        if tuple(batch.shape[1:]) != self.shape or batch.ndim != len(self.shape) + 1:
            raise UserInputError(f"aoti: {self.source} takes (N, {', '.join(map(str, self.shape))}), got "
                                 f"{tuple(batch.shape)}")
        if self.static and len(batch) != self.max_batch:
            raise UserInputError(f"aoti: {self.source} was exported for batches of exactly {self.max_batch} "
                                 f"(--static-batch), got {len(batch)}; re-export without --static-batch for others")
        if self.max_batch and not 1 <= len(batch) <= self.max_batch:
            raise UserInputError(f"aoti: a batch of {len(batch)} is outside 1..{self.max_batch}, the batch range "
                                 f"{self.source} was exported with; re-export with --max-batch-size {len(batch)}")

    def predict(self, batch: np.ndarray) -> np.ndarray:
        import torch

        self.check(batch)
        x = torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)).to(self.device)
        with torch.inference_mode():
            y = self.compiled(x.half() if self.half else x)
        return y.float().cpu().numpy()
