"""Shared fixtures: a small real shapes ImageFolder and a quickly trained run on it.

Tests run on the CPU with small images (32 px) and few epochs; the data are real PNG files
written by the shapes generator into a per-session cache.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from pathlib import Path

import pytest

# every process this test session starts carries this mark in its environment, a server a `cnnpack` subprocess
# starts too (server_env copies the environment): that is how a server left running is told from anyone else's
SESSION_MARK = f"CNNPACK_TEST_SESSION={os.getpid()}"
os.environ["CNNPACK_TEST_SESSION"] = str(os.getpid())


def _servers_started_here() -> list[tuple[int, str]]:
    """(pid, command line) of each tritonserver this test session started (itself, or a `cnnpack` it ran) that still
    runs (not a zombie)."""
    proc, out = Path("/proc"), []
    if not proc.is_dir():
        return out
    for d in proc.iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = [c.decode(errors="replace") for c in (d / "cmdline").read_bytes().split(b"\0") if c]
            if not cmd or Path(cmd[0]).name != "tritonserver":
                continue
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
            marked = SESSION_MARK.encode() in (d / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError, IndexError):
            continue
        if marked and state != "Z":
            out.append((int(d.name), " ".join(cmd)))
    return out


def pytest_collection_modifyitems(config, items):
    """Where no C++ compiler is found (a fresh machine without g++), the tests that compile C++ (marked `cxx`, or
    built on the pt2 package) are skipped, saying what to install; those of what cnnpack says without one still run."""
    from cnnpack.host import COMPILER_INSTALL, compiler_missing

    if (why := compiler_missing()) is None:
        return
    skip = pytest.mark.skip(reason=f"needs a C++ compiler: {why}; {COMPILER_INSTALL}")
    for item in items:
        if item.get_closest_marker("cxx") or "pt2_run" in getattr(item, "fixturenames", ()):
            item.add_marker(skip)


@pytest.fixture(scope="module", autouse=True)
def _no_server_left(request):
    """A module whose tests leave a Triton server running fails, naming it, and the server is killed: one of a CI
    run outlived it by 14 minutes, its test unknown."""
    yield
    left = _servers_started_here()
    for pid, _ in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if os.getpgid(pid) == pid:
                os.killpg(pid, signal.SIGKILL)  # the server and its Python backend stubs (its own process group)
            else:
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, 0)  # reaped where it is this process's child
    assert not left, f"{request.module.__name__} left {len(left)} Triton server(s) running: " + "; ".join(
        f"pid {pid}: {cmd[:300]}" for pid, cmd in left)


def _shm_regions() -> set[Path]:
    return set(Path("/dev/shm").glob("triton_*_shm_region_*"))


@pytest.fixture(scope="session", autouse=True)
def _no_shared_memory_left():
    """The Python-based backends' shared memory of the servers tests kill on purpose (SIGKILL of a `cnnpack serve`,
    a raw tritonserver of the deploy checks): files in /dev/shm, that is memory, 1 MiB each, left for good (455 had
    piled up on the build machine). Removed at the session's end where no process maps them any more."""
    before = _shm_regions()
    yield
    mapped = set()
    for maps in Path("/proc").glob("[0-9]*/maps"):
        with contextlib.suppress(OSError):
            mapped.update(line.split(None, 5)[5].strip() for line in maps.read_text().splitlines()
                          if len(line.split(None, 5)) == 6)
    for region in _shm_regions() - before:
        if str(region) not in mapped:
            region.unlink(missing_ok=True)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Every test session gets its own cnnpack cache (never the user's ~/.cache)."""
    cache = tmp_path_factory.mktemp("cnnpack-cache")
    old = os.environ.get("CNNPACK_CACHE")
    os.environ["CNNPACK_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("CNNPACK_CACHE", None)
    else:
        os.environ["CNNPACK_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_data(_isolated_cache) -> Path:
    """A 32 px shapes ImageFolder (train/ + val/), 60 + 15 images per class."""
    from cnnpack import shapes

    return shapes.materialise(image_size=32, seed=1, train_per_class=60, val_per_class=15)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_data) -> Path:
    """A run trained for 2 epochs on `tiny_data` (read-only for tests: copy it to modify)."""
    from cnnpack.train import TrainConfig, train

    run = tmp_path_factory.mktemp("runs") / "tiny"
    train(run, TrainConfig(data=str(tiny_data), image_size=32, epochs=2, batch_size=32), progress=False)
    return run


@pytest.fixture(scope="session")
def tiny_onnx_run(tmp_path_factory, tiny_run) -> Path:
    """`tiny_run` exported to ONNX alone, max batch 32 (read-only for tests: copy it to modify)."""
    from cnnpack.export import ExportConfig, export

    run = tmp_path_factory.mktemp("runs") / "tiny_onnx"
    shutil.copytree(tiny_run, run)
    export(run, ExportConfig(formats=("onnx",), max_batch_size=32))
    return run
