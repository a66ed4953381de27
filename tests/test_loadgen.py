"""Which load generator measures a served model: perf_analyzer when on PATH (auto), cnnpack's client otherwise."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys

import pytest

from cnnpack.errors import UserInputError
from cnnpack.loadgen import resolve


def test_auto_takes_perf_analyzer_only_from_path_and_asking_for_a_missing_one_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert resolve("auto") == "cnnpack" and resolve("cnnpack") == "cnnpack"
    with pytest.raises(UserInputError, match="perf_analyzer is not on PATH"):
        resolve("perf_analyzer")
    with pytest.raises(UserInputError, match="valid: auto, perf_analyzer, cnnpack"):
        resolve("locust")
    fake = tmp_path / "perf_analyzer"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    assert resolve("auto") == "perf_analyzer"


def test_cli_refuses_a_missing_perf_analyzer_in_one_line(tmp_path):
    env = {**os.environ, "PATH": os.path.dirname(shutil.which("sh") or "/bin/sh")}
    bad = subprocess.run([sys.executable, "-m", "cnnpack", "bench", "--run", str(tmp_path), "--triton-url",
                          "127.0.0.1:1", "--load-generator", "perf_analyzer"], capture_output=True, text=True, env=env)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and len(lines) == 1 and "perf_analyzer is not on PATH" in lines[0], bad.stderr
