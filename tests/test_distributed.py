"""torchrun + DDP on the CPU (gloo): 2 processes train a complete run, close to a single process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


@pytest.fixture(scope="module")
def colour_data(tmp_path_factory) -> Path:
    """Two colour classes with noise: learnable in a few epochs, so accuracies are comparable."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    for split, n in (("train", 96), ("val", 32)):
        for cls, rgb in (("red", (200, 40, 40)), ("blue", (40, 40, 200))):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                img = np.clip(rng.normal(rgb, 50, size=(32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(root / split / cls / f"{i}.png")
    return root


def _train(args: list[str], run: Path, launcher: list[str]) -> dict:
    cmd = launcher + ["train", "--data", args[0], "--image-size", "32", "--epochs", "3", "--batch-size", "16",
                      "--no-progress", "--run-dir", str(run)]
    env = {**os.environ, "CNNPACK_DIST_TIMEOUT_S": "60", "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads((run / "cnnpack.json").read_text())


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(colour_data, tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "-m", "cnnpack"]
    ddp = _train([str(colour_data)], tmp_path / "ddp", torchrun)
    single = _train([str(colour_data)], tmp_path / "single", [sys.executable, "-m", "cnnpack"])
    t = ddp["stages"]["train"]
    assert t["status"] == "ok" and t["metrics"]["epochs"] == 3
    assert t["distributed"] == {"world_size": 2, "backend": "gloo"}
    for f in ("checkpoint.pt", "last.pt", "history.json", "curves.png", "confusion.png", "samples.png"):
        assert (tmp_path / "ddp" / f).is_file(), f
    assert not list((tmp_path / "ddp").glob(".*.tmp")), "a rank left a temp file behind"
    acc_ddp, acc_single = t["metrics"]["best_val_acc"], single["stages"]["train"]["metrics"]["best_val_acc"]
    assert acc_ddp >= 0.9 and abs(acc_ddp - acc_single) <= 0.05, (acc_ddp, acc_single)
    # each rank saw half of every epoch: the training steps per epoch halve
    assert ddp["stages"]["train"]["steps_per_epoch"] * 2 == single["stages"]["train"]["steps_per_epoch"]


def test_resume_of_a_torchrun_run_in_one_process(colour_data, tmp_path):
    """Interrupted after epoch 1, resumed: the run completes (also the path a torchrun run resumes by)."""
    from cnnpack.train import Interrupted, TrainConfig, train

    run = tmp_path / "r"
    cfg = TrainConfig(data=str(colour_data), image_size=32, epochs=2, batch_size=16)

    def stop(epoch, _):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(Interrupted):
        train(run, cfg, progress=False, on_epoch_end=stop)
    section = train(run, cfg, resume=True, progress=False)
    assert section["status"] == "ok" and section["metrics"]["epochs"] == 2
