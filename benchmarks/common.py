"""The helpers every benchmark shares: where records go, the machine description, waiting for a quiet machine,
running the CLI, writing a record.

The scripts import them as `from common import ...` (each script's own folder is on sys.path when it runs as
`python benchmarks/X.py`). What belongs to one benchmark stays in its script.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"  # each record's .json and .md
CORES = 2  # the cores the targets are stated for
CLI = [sys.executable, "-m", "cnnpack"]  # this interpreter's cnnpack, whatever is on PATH
SIMD_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8",
              "amx_bf16")


# -- the machine -------------------------------------------------------------------------------------------
def lscpu() -> dict:
    """The CPU's model (cnnpack's name for it), its CPU count and its flags (one string), from lscpu."""
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    field = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}
    from cnnpack.host import cpu_name

    return {"model": cpu_name(), "cpus": field.get("CPU(s)"), "flags": field.get("Flags", "")}


def simd(flags) -> str:
    """The matrix-relevant flags a CPU has and those it lacks, from lscpu's flags (a string) or a list of them."""
    have = set(flags.split() if isinstance(flags, str) else flags)
    absent = [f for f in SIMD_FLAGS if f not in have]
    return ", ".join(f for f in SIMD_FLAGS if f in have) + (f" (not: {', '.join(absent)})" if absent else "")


def machine(cores: list[int]) -> dict:
    """The CPU, the cores used, Python, torch and cnnpack's versions and commit (+dirty: cnnpack/ has changes)."""
    from importlib.metadata import version

    from cnnpack.host import cpu_name

    model = cpu_name()  # with family and model numbers where the name is a hypervisor's "AMD EPYC"

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "../cnnpack"], capture_output=True,
                                text=True, cwd=Path(__file__).parent).stdout.strip())
    return {"cpu": model, "cores_visible": os.cpu_count(), "cores_used": cores, "python": platform.python_version(),
            "torch": version("torch"), "cnnpack": version("cnnpack"), "commit": commit + ("+dirty" if dirty else ""),
            "platform": platform.platform()}


# -- a quiet machine ---------------------------------------------------------------------------------------
def pin_cores() -> list[int]:
    """The first CORES cores this process may use (the child inherits the affinity)."""
    cores = sorted(os.sched_getaffinity(0))[:CORES]
    if len(cores) < CORES:
        sys.exit(f"this machine offers {len(cores)} cores; the target is stated for {CORES}")
    return cores


def busy_s(cores: list[int]) -> float:
    """CPU seconds spent so far (by anyone) on `cores`, from /proc/stat."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    with open("/proc/stat") as f:
        for line in f:
            name, *vals = line.split()
            if name in {f"cpu{c}" for c in cores}:
                user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, vals[:8])
                total += user + nice + system + irq + softirq + steal
    return total / tick


def wait_for_quiet(cores: list[int], deadline: float, max_busy: float = 0.1) -> float:
    """Waits until `cores` are idle (others use < max_busy of a core for 5 s) or the deadline; returns the wait."""
    t0 = time.monotonic()
    while True:
        b0 = busy_s(cores)
        time.sleep(5)
        busy = (busy_s(cores) - b0) / 5
        if busy < max_busy or time.monotonic() > deadline:
            return round(time.monotonic() - t0, 1)
        print(f"{busy:.2f} cores busy with other work: waiting for a quiet machine", file=sys.stderr)


def wait_for_load(max_load: float, max_wait_s: float, poll_s: float) -> float:
    """Waits until the 1-minute load average is at most `max_load` (looking every `poll_s` s, for at most
    `max_wait_s` s); returns the load it started at. For benchmarks that use every core, not CORES pinned ones."""
    deadline = time.monotonic() + max_wait_s
    while (load := os.getloadavg()[0]) > max_load and time.monotonic() < deadline:
        print(f"load {load:.2f} > {max_load}: waiting", flush=True)
        time.sleep(poll_s)
    return load


# -- running the CLI ---------------------------------------------------------------------------------------
def child_env(cache: str | None) -> dict:
    """This process's environment for a timed child, kept off any GPU; `cache`: its CNNPACK_CACHE."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # a CPU measurement, even on a GPU machine
    if cache is not None:
        env["CNNPACK_CACHE"] = cache
    return env


def cnnpack_cmd() -> list[str]:
    """The venv's `cnnpack` script, as a user runs it (interpreter start included), else `python -m cnnpack`."""
    script = Path(sys.executable).parent / "cnnpack"
    return [str(script)] if script.exists() else [sys.executable, "-m", "cnnpack"]


def timed(cmd: list[str], *, cwd: Path, env: dict, cores: list[int], keep_stdout: bool = False) -> dict:
    """Runs `cmd` as its own process: wall and CPU seconds, and the CPU others took meanwhile (`keep_stdout`: and
    all it printed, as `stdout`)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load, busy0 = os.getloadavg()[0], busy_s(cores)
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True,
                         preexec_fn=lambda: os.sched_setaffinity(0, cores))
    wall = time.perf_counter() - t0
    busy = busy_s(cores) - busy0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    others = max(busy - cpu, 0.0)
    return {"wall_s": round(wall, 2), "cpu_s": round(cpu, 1), "others_cpu_s": round(others, 1),
            "contended": others > 0.05 * wall * len(cores), "load_1min_before": round(load, 2),
            "stdout_tail": out.stdout.strip().splitlines()[-1:] if out.stdout.strip() else [],
            **({"stdout": out.stdout} if keep_stdout else {})}


def cnnpack(*args: str, env: dict | None = None) -> float:
    """`cnnpack ARGS` in this interpreter, said first, its output shown; raises if it fails; returns its seconds."""
    print("$ cnnpack " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    subprocess.run(CLI + list(args), check=True, env=env)
    return time.perf_counter() - t0


# -- the record --------------------------------------------------------------------------------------------
def save_json(name: str, record: dict, *, default=None) -> None:
    """Writes RESULTS/<name>.json (indent 2; `default`: json's, for values it cannot encode). A script writes it
    before it words the markdown, so a slip in the wording loses no measurement."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2, default=default) + "\n")


def save_md(name: str, text: str) -> None:
    """Writes RESULTS/<name>.md, the record in words, as given."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{name}.md").write_text(text)
