"""This machine as the operating system sees it: its cores, memory and CPU time, and how busy it is.

The bench and the ceilings read it (`peak` for the threads it measures with, `bench` for each row's
memory and the CPU time other processes took while it ran).
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import re
import shlex
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from cnnpack.errors import UserInputError


def usable_cores() -> int:
    """The cores this process may run on (its affinity), not the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def load_avg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


# AMD's core generations by (cpu family, model range); a VM often reports its CPU only as "AMD EPYC", and a Zen 3
# (AVX2, no VNNI) and a Zen 4 (AVX-512 VNNI and BF16) run int8 and bf16 at very different speeds
_ZEN = ((23, range(0x00, 0x30), "Zen/Zen+"), (23, range(0x30, 0x100), "Zen 2"), (25, range(0x00, 0x10), "Zen 3"),
        (25, range(0x10, 0x20), "Zen 4"), (25, range(0x20, 0x60), "Zen 3"), (25, range(0x60, 0x80), "Zen 4"),
        (25, range(0xA0, 0x100), "Zen 4"), (26, range(0x00, 0x100), "Zen 5"))
# Intel's server generations by model (family 6): a VM often says only "Intel(R) Xeon(R) Processor", and two Xeons with
# AMX (one with a 2.6 GHz clock, an Emerald Rapids with 2.1 GHz) trained the same model 40 % apart
_XEON = {85: "Skylake/Cascade Lake", 106: "Ice Lake", 143: "Sapphire Rapids", 207: "Emerald Rapids",
         173: "Granite Rapids"}


def cpuinfo_field(cpuinfo: str, key: str) -> str:
    """The value of `key` on the first processor of /proc/cpuinfo's text ("" when it is not there)."""
    m = re.search(rf"^{key}\s*:\s*(.+)$", cpuinfo, re.M)
    return m.group(1).strip() if m else ""


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (`flags` of the first processor of /proc/cpuinfo, or of its text `cpuinfo`); empty
    where it cannot be read."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    return set(cpuinfo_field(cpuinfo, "flags").split())


def cpu_name(cpuinfo: str | None = None) -> str:
    """The CPU's model name, with its family and model numbers (and AMD's or Intel's generation) where the name alone
    does not tell one CPU from another (a hypervisor's "AMD EPYC")."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return platform.processor()
    name = cpuinfo_field(cpuinfo, "model name") or platform.processor()
    family, model = cpuinfo_field(cpuinfo, "cpu family"), cpuinfo_field(cpuinfo, "model")
    if not (family.isdigit() and model.isdigit()) or re.search(r"\d{3,}", name):  # "EPYC 9R14", "Xeon 8488C"
        return name
    f, m = int(family), int(model)
    if "AMD" in name:
        gen = next((z for fam, models, z in _ZEN if fam == f and m in models), None)
    else:
        gen = _XEON.get(m) if "Intel" in name and f == 6 else None
    return f"{name} (family {f}, model {m}" + (f": {gen})" if gen and gen not in name else ")")


def machine() -> dict:
    """What the numbers were measured on, including how busy it was."""
    return {"platform": platform.platform(), "cpu": cpu_name(), "cpus_usable": usable_cores(),
            "load_avg_1_5_15": load_avg()}


def quiet_cpp_extension() -> None:
    """torch's C++ build helper warns on every CPU-only machine that it found no CUDA toolkit: torch.compile,
    AOTInductor (compiling or loading a package) and NNCF (which imports torch) all reach it."""
    import logging

    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)


def prepare_inductor() -> None:
    """Before torch.compile or AOTInductor compiles on this machine: quiet, and without inductor's redundant ISA probes.

    Inductor uses the first vector ISA the CPU flags name (AMX, AVX512-VNNI, AVX512, AVX2), but first builds a probe
    library for every one of them and loads it in a child Python, one after another: on a machine's first compile
    (an empty inductor cache) that was 7 of the 13-14 s torch.compile took for the CNN at batch 1 on 2 cores (Xeon with
    AMX). With `cpp.vec_isa_ok` it trusts the CPU flags for those base probes; the AMX and AVX512-BF16 ones still
    build and load theirs. TORCHINDUCTOR_VEC_ISA_OK, where the user set it, stays in force.
    """
    from torch._inductor import config

    quiet_cpp_extension()
    if config.cpp.vec_isa_ok is None and "TORCHINDUCTOR_VEC_ISA_OK" not in os.environ:
        config.cpp.vec_isa_ok = True


COMPILER_INSTALL = "install one (`apt-get install g++`) or set CXX to a C++ compiler"


def compiler_missing() -> str | None:
    """Why there is no C++ compiler for inductor to run (`$CXX`, else `g++`: what torch.compile's CPU kernels and
    AOTInductor take), or None: a PATH lookup and `--version`, not a compile (`compiler_fails` tries one)."""
    cxx = os.environ.get("CXX") or "g++"
    argv = shlex.split(cxx) or ["g++"]
    if "CXX" in os.environ and not os.environ["CXX"].strip():  # inductor takes "" as the compiler, and finds none
        return "CXX is set but empty (unset it)"
    if shutil.which(argv[0]) is None:
        return f"CXX={cxx} is not an executable" if os.environ.get("CXX") else "g++ is not on PATH and CXX is not set"
    try:
        subprocess.run([*argv, "--version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{cxx} --version failed ({type(e).__name__})"
    return None


def compiler_fails() -> str | None:
    """Why the compiler `compiler_missing` looks for cannot build a one-line C++ file into an object file; None when it
    can. Run only after a compile failed (it costs a compiler start)."""
    import tempfile

    if why := compiler_missing():
        return why
    argv = shlex.split(os.environ.get("CXX") or "g++") or ["g++"]
    with tempfile.TemporaryDirectory(prefix="cnnpack-cxx-") as d:
        src, obj = Path(d) / "probe.cpp", Path(d) / "probe.o"
        src.write_text("int probe() { return 0; }\n")
        try:
            proc = subprocess.run([*argv, "-c", str(src), "-o", str(obj)], capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError) as e:
            return f"{shlex.join(argv)} -c probe.cpp failed ({type(e).__name__})"
        if proc.returncode != 0:
            err = next((ln for ln in proc.stderr.decode(errors="replace").splitlines() if ln.strip()), "")
            return f"{shlex.join(argv)} -c probe.cpp exited {proc.returncode}" + (f" ({err.strip()})" if err else "")
        if not obj.is_file() or obj.stat().st_size == 0:
            return f"{shlex.join(argv)} -c probe.cpp exited 0 but wrote no object file"
    return None


def start_header_build() -> threading.Thread:
    """Starts building inductor's precompiled header for CPU kernels in a thread; returns the thread.

    Inductor builds it (one g++ run over its kernel prelude, 5.4 s on 2 cores of a Zen 4) only once it has traced,
    lowered and generated code (2.8 s), then waits for it, and it keys the header by the venv's torch include folder:
    the first torch.compile of every new venv pays it. Started before, it overlaps that work (the CNN's compile at
    batch 1 and 32 went from 14.4-15.0 to 11.1-11.6 s in a new venv), or other stages' (the pipeline starts it at
    the end of training, `Stages.warm_compiler`). The thread picks the vector ISA (inductor's probes) and calls
    inductor's own cached header build with the arguments a CPU kernel's compile passes, so inductor finds the header
    built, under its file lock; where its internals differ (another torch) the thread does nothing. It then computes
    inductor's cache key of the triton package (a hash of its files), 0.5 s of the first compile. Call after
    `prepare_inductor`: the thread runs with the caller's inductor settings (they are per-thread).
    """
    import contextvars

    try:  # imported here, not in the thread: a thread importing torch's modules while the caller's torch.compile or
        # torch.export imports others broke one of those imports ("No module named 'torch._functorch.
        # _activation_checkpointing.ac_logging_utils'", once in a bench); the caller needs most of them next anyway
        from torch._inductor import codecache as cc
        from torch._inductor import config
        from torch._inductor.cpp_builder import CppBuilder, CppTorchDeviceOptions
        from torch.utils import cpp_extension  # noqa: F401  what the ISA probes import (setuptools, distutils)
    except Exception:  # another torch's internals: inductor builds the header when it needs it
        cc = None

    def run() -> None:
        if cc is None or not config.cpp_cache_precompile_headers:
            return
        with contextlib.suppress(Exception):  # another torch's internals: inductor builds the header when it needs it
            # what CppPythonBindingsCodeCache.load_async passes for a CPU kernel: the header and the kernel's command
            command = {**cc.CppPythonBindingsCodeCache.cpp_compile_command_flags, "device_type": "cpu",
                       "extra_flags": (), "use_relative_path": config.is_fbcode(), "vec_isa": cc.pick_vec_isa()}
            option = CppTorchDeviceOptions(compile_only=False, min_optimize=False, **command)
            line = CppBuilder(name="o", sources="i", BuildOption=option).get_command_line()
            cc._precompile_header(cc._get_cpp_prefix_header("cpu"), line, min_optimize=False, **command)
        with contextlib.suppress(Exception):  # inductor's cache key hashes the triton package's files even on a CPU
            cc.triton_key()  # (0.5 s of the first compile, 2.1 GHz Xeon): computed here, cached (under its lock)

    thread = threading.Thread(target=contextvars.copy_context().run, args=(run,), name="inductor-header", daemon=True)
    thread.start()
    return thread


@contextlib.contextmanager
def quiet_native_output():
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


def status_kb(key: str) -> int | None:
    try:
        m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Within: the objects alive on entry are left out of garbage collection (`gc.freeze`), so `release_memory`
    sweeps only what was made since. After torch, dynamo and the earlier stages the default bench's five collections
    took 0.8 s; frozen, 0.5 s (what dynamo makes while compiling is still swept)."""
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def release_memory() -> None:
    """Frees what Python and glibc still hold, so the next runtime's baseline is its own."""
    import ctypes

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def available_memory() -> int | None:
    """Bytes this process can still take: the kernel's MemAvailable, or less where a cgroup (a container's memory
    limit, v2 or v1) allows less, its page cache that can be dropped counted free; None where nothing can be read."""
    found = []
    with contextlib.suppress(OSError, ValueError, StopIteration):
        line = next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemAvailable:"))
        found.append(int(line.split()[1]) * 1024)
    for folder, limit_file, usage_file, inactive in (("/sys/fs/cgroup", "memory.max", "memory.current", "inactive_file"),
                                                      ("/sys/fs/cgroup/memory", "memory.limit_in_bytes",
                                                       "memory.usage_in_bytes", "total_inactive_file")):
        with contextlib.suppress(OSError, ValueError):
            limit = Path(folder, limit_file).read_text().strip()
            if limit == "max" or int(limit) >= 1 << 60:  # no limit ("max"; v1's "unlimited" is a huge number)
                continue
            stat = dict(x.split() for x in Path(folder, "memory.stat").read_text().splitlines() if len(x.split()) == 2)
            used = int(Path(folder, usage_file).read_text()) - int(stat.get(inactive, 0))
            found.append(int(limit) - used)
            break
    return min(found) if found else None


def check_images_fit(images: int, size: int, where: str) -> None:
    """Training holds every image decoded (uint8, 3 x size x size) in memory, and a split is assembled from them
    once more: refused before the decoding where that cannot fit (the kernel's out-of-memory kill, minutes into it,
    said nothing)."""
    need, free = 2 * images * 3 * size * size, available_memory()
    if free is not None and need > 0.9 * free:
        gib = 1 << 30
        raise UserInputError(f"{where}: {images:,} images at {size} px need {need / gib:.1f} GiB of memory as "
                             f"cnnpack holds them (decoded, uint8, and a second copy while a split is assembled), and "
                             f"{free / gib:.1f} GiB is available; "
                             "use a smaller --image-size or fewer images, or a machine with more memory")


def reset_peak_rss() -> bool:
    """Resets the kernel's peak-RSS counter (Linux >= 4.0); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def cpu_ticks() -> tuple[int, int, int] | None:
    """(busy ticks of the machine, all ticks of the machine, ticks of this process and its descendants), or None
    off Linux. The descendants count as this process: inductor compiles in worker processes of its own."""
    try:
        cpu = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        own = _family_ticks(os.getpid())
    except (OSError, ValueError):
        return None
    busy = sum(cpu) - cpu[3] - cpu[4]  # all but idle and iowait; steal counts as taken
    return busy, sum(cpu), own


def _family_ticks(root: int) -> int:
    """utime + stime (and those of reaped children) of `root` and of every live process descended from it."""
    stats: dict[int, tuple[int, int]] = {}  # pid -> (ppid, ticks)
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            f = (p / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        stats[int(p.name)] = (int(f[1]), sum(int(v) for v in f[11:15]))  # ppid; utime stime cutime cstime
    if root not in stats:
        raise OSError("no /proc entry for this process")
    family, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        kids = [pid for pid, (ppid, _) in stats.items() if ppid == parent and pid not in family]
        family.update(kids)
        frontier += kids
    return sum(stats[pid][1] for pid in family)


def others_cpu_share(before, after) -> float | None:
    """Share of the machine's CPU time that other processes (or the hypervisor) took in between."""
    if before is None or after is None or after[1] == before[1]:
        return None
    others = (after[0] - before[0]) - (after[2] - before[2])
    return max(0.0, others / (after[1] - before[1]))


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def sync(device) -> Callable[[], None]:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return torch.cuda.synchronize
    return lambda: None


DEVICES = ("auto", "cpu", "cuda")  # --device: auto takes the GPU when PyTorch sees one


def check_device(name: str, valid: tuple[str, ...] = DEVICES) -> str:
    """`--device NAME` when it is one of `valid`, else the usage error listing them."""
    if name not in valid:
        raise UserInputError(f"--device {name!r}; valid: {', '.join(valid)}")
    return name


@contextlib.contextmanager
def exact_fp32(device: str) -> Iterator[None]:
    """No TF32 in PyTorch's CUDA convolutions and matmuls within (a no-op on the CPU): while verifying, and while
    tracing TorchScript, which bakes the flag into every convolution it records (traced with cuDNN's default, TF32
    on, resnet18's logits were 0.72 off eager fp32 on an H200)."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
