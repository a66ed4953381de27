"""Helpers several test files share (pytest puts tests/ on sys.path: `from support import ...`)."""

from __future__ import annotations

import os
import signal
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


def ctrl_c_after_first_epoch(args: list[str], run: Path) -> tuple[int, str]:
    """Runs `python -m cnnpack ARGS`, sends SIGINT once `run/last.pt` exists (during epoch 2); (exit code, stderr)."""
    proc = subprocess.Popen([sys.executable, "-m", "cnnpack", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (run / "last.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    return proc.returncode, stderr


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
