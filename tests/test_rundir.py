"""The run directory's atomic writes."""

from __future__ import annotations

import os
import stat

import pytest

from cnnpack.rundir import atomic_path, atomic_write_text


def test_atomic_files_get_the_usual_permissions(tmp_path):
    """Not mkstemp's 0600: a Triton container running as another user must read the models."""
    dest = tmp_path / "model.onnx"
    atomic_write_text(dest, "x")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o666 & ~mask


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    dest = tmp_path / "cnnpack.json"
    dest.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(dest) as tmp:
        tmp.write_text("half")
        raise RuntimeError("writer died")
    assert dest.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["cnnpack.json"]
