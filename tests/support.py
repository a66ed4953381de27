"""Helpers several test files share (pytest puts tests/ on sys.path: `from support import ...`)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest


def assert_gone(pid: int) -> None:
    """Neither the server nor anything in its process group (the Python backend stubs) is left."""
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    deadline = time.monotonic() + 5
    while True:  # a stub may take a moment to notice its server is gone
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline, f"processes of group {pid} outlived the server"
        time.sleep(0.1)


# `python -m cnnpack ARGS`, with a Ctrl-C (a real SIGINT to the process) sent as the first epoch's files are written
_CTRL_C_CHILD = """
import os, signal, sys
import cnnpack.train as train
from cnnpack.cli import main
save = train._save_epoch
def save_then_ctrl_c(run, model, spec, opt, sched, epoch, *rest):
    save(run, model, spec, opt, sched, epoch, *rest)
    if epoch == 1:
        os.kill(os.getpid(), signal.SIGINT)
train._save_epoch = save_then_ctrl_c
signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal (a suite started with & ignores SIGINT)
sys.argv = ["cnnpack", *sys.argv[1:]]
main()
"""


# `python -m cnnpack ARGS`, with a Ctrl-C sent as MODULE.FUNCTION (argv[1]) is called: the moment a stage begins
_CTRL_C_AT_CHILD = """
import importlib, os, signal, sys
from cnnpack.cli import main
module, name = sys.argv[1].split(":")
module = importlib.import_module(module)
def ctrl_c(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGINT)
    raise AssertionError("the Ctrl-C did not interrupt")
setattr(module, name, ctrl_c)
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.argv = ["cnnpack", *sys.argv[2:]]
main()
"""


def killed_at(function: str, args: list[str]) -> tuple[int, str]:
    """Runs `cnnpack ARGS` in a child that is killed (SIGKILL: out of memory, a container stopped) as `function` is
    called; (exit code, stderr)."""
    child = _CTRL_C_AT_CHILD.replace("os.kill(os.getpid(), signal.SIGINT)", "os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", child, function, *args], capture_output=True, text=True, timeout=240)
    return proc.returncode, proc.stderr


# the same, the Ctrl-C sent right after MODULE.FUNCTION returns (a file just put in place, not yet recorded)
_CTRL_C_AFTER_CHILD = """
import importlib, os, signal, sys
from cnnpack.cli import main
sig = getattr(signal, sys.argv[1])
module, name = sys.argv[2].split(":")
module = importlib.import_module(module)
real = getattr(module, name)
def then_ctrl_c(*args, **kwargs):
    out = real(*args, **kwargs)
    os.kill(os.getpid(), sig)
    return out
setattr(module, name, then_ctrl_c)
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.argv = ["cnnpack", *sys.argv[3:]]
main()
"""


def ctrl_c_after(function: str, args: list[str], sig: str = "SIGINT") -> tuple[int, str]:
    """Runs `cnnpack ARGS` in a child that gets Ctrl-C (a real SIGINT; or `sig`, e.g. SIGTERM) as soon as `function`
    ("module:name") has returned; (exit code, stderr)."""
    proc = subprocess.run([sys.executable, "-c", _CTRL_C_AFTER_CHILD, sig, function, *args], capture_output=True,
                          text=True, timeout=240)
    return proc.returncode, proc.stderr


def ctrl_c_at(function: str, args: list[str]) -> tuple[int, str]:
    """Runs `cnnpack ARGS` in a child that gets Ctrl-C (a real SIGINT) as `function` ("module:name", looked up
    when called) is called; (exit code, stderr)."""
    proc = subprocess.run([sys.executable, "-c", _CTRL_C_AT_CHILD, function, *args], capture_output=True, text=True,
                          timeout=240)
    return proc.returncode, proc.stderr


# one process per case, forked from one that imported the CLI and torch once: each `python -m cnnpack` paid 2-4 s of
# CPU for its interpreter and imports, and test_cli's bad inputs are 48 processes (56 s of the suite on 2 cores)
_FORKED_CLI = r"""
import atexit, json, os, signal, sys, threading, traceback, warnings
from cnnpack.cli import main
import torch, torchvision  # what most commands import next, once for all
sys.stderr.write("imported\n")  # what came before it was said by the imports: a real process would say it too
sys.stderr.flush()
warnings.filterwarnings("ignore", "This process .* is multi-threaded")  # 3.12: OpenBLAS' idle pool, fork-safe
cases, folder, width, case_s = json.load(sys.stdin), sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
running, codes = {}, {}

def child(i, args):
    code = 1
    try:
        for fd, name in ((1, "out"), (2, "err")):
            os.dup2(os.open(os.path.join(folder, f"{i}.{name}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv = ["cnnpack", *args]
        signal.alarm(case_s)  # a case that hangs ends alone (SIGALRM: exit code -14), not the whole batch
        try:
            main()
            code = 0
        except SystemExit as e:  # as the interpreter ends a process: an int is the code, None 0, else printed and 1
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
        threading._shutdown()  # then as the interpreter ends: its other threads joined, its atexit functions run
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # the interpreter ignores a stream it cannot flush at exit
                pass
        os._exit(code)

for i, args in enumerate(cases):
    if len(running) >= width:
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
    pid = os.fork()
    if pid == 0:
        child(i, args)
    running[pid] = i
while running:
    pid, status = os.wait()
    codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)
with open(os.path.join(folder, "codes.json"), "w") as f:
    json.dump(codes, f)
"""


def forked_cli(cases: dict, *, tmp: Path, width: int = 2, env: dict | None = None, case_s: int = 300) -> dict:
    """`cnnpack ARGS` for every case, each in a process of its own (its own exit code, stdout and stderr, nothing
    shared after it starts), forked `width` at a time from one process that imported the CLI and torch once. For
    checks of what a command says and exits with; what a fresh interpreter imports stays `python -m cnnpack`'s.
    Anything the imports print fails it (a real process would print it in each case's stderr); a case still running
    after `case_s` seconds is killed alone. `cases`: key -> the arguments; returns key -> subprocess.CompletedProcess."""
    import json
    import signal

    keys, folder = list(cases), tmp / "forked-cli"
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", _FORKED_CLI, str(folder), str(width), str(case_s)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)  # its own group: nothing forked outlives a failure
    try:
        out, err = proc.communicate(json.dumps([cases[k] for k in keys]), timeout=case_s * len(keys) / width + 120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0 and err == "imported\n", (out + err)[-3000:]
    codes = json.loads((folder / "codes.json").read_text())
    return {k: subprocess.CompletedProcess(["cnnpack", *cases[k]], codes[str(i)], (folder / f"{i}.out").read_text(),
                                           (folder / f"{i}.err").read_text()) for i, k in enumerate(keys)}


def ctrl_c_after_first_epoch(args: list[str]) -> tuple[int, str]:
    """Runs `cnnpack ARGS` in a child that gets Ctrl-C while epoch 1's files are being written, the same moment on
    every host and under any load; (exit code, stderr). The Ctrl-C is to be held back until those files are whole."""
    proc = subprocess.run([sys.executable, "-c", _CTRL_C_CHILD, *args], capture_output=True, text=True, timeout=240)
    return proc.returncode, proc.stderr


def outlier_channel(run: Path, factor: float = 1000.0) -> None:
    """Scales one channel of the first block's output by `factor` and the next conv's weights on it by
    1/`factor`: the same function in fp32 (ReLU is positively homogeneous), but one shared uint8 scale for
    that activation leaves the other channels with almost no levels."""
    import torch

    ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    sd = ckpt["state_dict"]
    c = int(sd["features.0.1.bias"].argmax())  # a channel that is mostly positive, so ReLU keeps its range
    sd["features.0.1.weight"][c] *= factor
    sd["features.0.1.bias"][c] *= factor
    sd["features.1.0.weight"][:, c] /= factor
    torch.save(ckpt, run / "checkpoint.pt")
    record_new_weights(run)


def record_new_weights(run: Path) -> None:
    """What a training since does beside the new checkpoint.pt it saves: the run records its sha256 (weights that
    differ from the record are refused as edited)."""
    from cnnpack.rundir import Run, sha256

    Run(run).update(lambda m: m["stages"]["train"]["outputs"]["checkpoint"].update(sha256=sha256(run / "checkpoint.pt")))


def unwritable(monkeypatch, folder: Path, error: OSError) -> None:
    """Nothing can be created in `folder` (as `chattr +i` or a read-only mount make it): `tempfile.mkstemp` there
    raises `error`, elsewhere it works."""
    import tempfile

    real = tempfile.mkstemp

    def refused(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == folder:
            raise error
        return real(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refused)


def record_fails(monkeypatch, stage: str) -> None:
    """The disk fills when the run records `stage` (after the stage's own files were written)."""
    import errno

    from cnnpack.rundir import Run

    real = Run.set_stage

    def full(self, name, section):
        if name == stage:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.manifest_path))
        return real(self, name, section)

    monkeypatch.setattr(Run, "set_stage", full)


def broken_chunk_png() -> bytes:
    """A PNG whose first IDAT chunk says half its length: `SyntaxError: broken PNG file` from Pillow's load()."""
    import io
    import struct

    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    n = struct.unpack(">I", data[33:37])[0]
    data[33:37] = struct.pack(">I", n // 2)
    return bytes(data)


def matches_golden(got: str, golden: Path) -> None:
    """`got` equals the golden file; with CNNPACK_UPDATE_GOLDEN=1 a changed one is rewritten, and the test still
    fails that once (a variable left set must not turn every change into a pass)."""
    if os.environ.get("CNNPACK_UPDATE_GOLDEN") and (not golden.is_file() or golden.read_text() != got):
        golden.write_text(got)
        pytest.fail(f"{golden.name} rewritten (CNNPACK_UPDATE_GOLDEN): review its diff, then run again without it")
    assert got == golden.read_text()


def need_triton() -> None:
    """Skips, saying why, where no Triton server can be started (nvidia-pytriton, the serve extra, is absent)."""
    from cnnpack.errors import RuntimeUnavailable
    from cnnpack.serve import locate

    try:
        locate()
    except RuntimeUnavailable as e:
        pytest.skip(str(e))
