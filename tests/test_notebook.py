"""notebooks/walkthrough.ipynb: executed end to end (tiny settings) in a real Jupyter kernel."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "walkthrough.ipynb"
STAGES = ("train", "export", "quantize", "verify", "bench", "triton")
# the notebook's settings cell reads CNNPACK_NB_<NAME>: 32 px, 40 + 10 images per class, 1 epoch, short bench
TINY = {"IMAGE_SIZE": "32", "TRAIN_PER_CLASS": "40", "VAL_PER_CLASS": "10", "EPOCHS": "1", "BATCH_SIZE": "32",
        "BENCH_SECONDS": "0.2", "BENCH_WARMUP_S": "0.05", "BENCH_MATMUL_N": "256", "CALIBRATION_IMAGES": "64",
        # the one-epoch model's logits are near ties: whether int8 flips one of its 60 validation images depends on
        # the host's kernels, so this test of the walkthrough's plumbing sets a gate no flip can trip
        "INT8_MIN_AGREEMENT": "0.5", "INT8_MAX_DROP": "100"}


def _can_serve() -> bool:
    from cnnpack import serve
    from cnnpack.errors import RuntimeUnavailable

    try:
        serve.locate()
    except RuntimeUnavailable:
        return False
    return True


def _stream_text(nb) -> str:
    return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
                   if o.output_type == "stream" and o.name == "stdout")


def test_committed_notebook_is_clean():
    """Committed without outputs: no stale figures, paths or timings from someone's machine."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)


@pytest.mark.slow
def test_walkthrough_runs_every_stage(tmp_path, monkeypatch):
    """About 40 s on 2 CPU cores; with the local Triton server present it also serves and classifies."""
    from jupyter_client.kernelspec import find_kernel_specs

    assert "python3" in find_kernel_specs(), "ipykernel's python3 kernel spec is not installed in this environment"
    run = tmp_path / "run"
    for name, value in {**TINY, "RUN_DIR": str(run), "SERVE": "auto"}.items():
        monkeypatch.setenv(f"CNNPACK_NB_{name}", value)  # the kernel inherits the environment (and CNNPACK_CACHE)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # the kernel spec's "python" is this interpreter (jupyter_client substitutes sys.executable)
    client = nbclient.NotebookClient(nb, kernel_name="python3", timeout=240, allow_errors=False,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError naming the cell on any error

    manifest = json.loads((run / "cnnpack.json").read_text())
    assert {s: manifest["stages"][s]["status"] for s in STAGES} == dict.fromkeys(STAGES, "ok")
    assert manifest["model"]["image_size"] == 32 and manifest["stages"]["train"]["metrics"]["epochs"] == 1
    for f in ("checkpoint.pt", "curves.png", "export/model.onnx", "export/model.pt", "verify.json", "bench.png",
              "model_repository/cnn_onnx/config.pbtxt", "model_repository/cnn_onnx/1/model.onnx"):
        assert (run / f).is_file(), f
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4, "expected the sample grid, curves, confusion matrix and bench plot inline"
    out = _stream_text(nb)
    assert "every artifact is within its precision's contract" in out and "model.int8.onnx: " in out and "vs fp32" in out
    if _can_serve():  # one line per class: "<class>/<file>: score:index:label  score:index:label"
        classes = manifest["model"]["classes"]
        answers = re.findall(r"^\s*(\w+)/\S+\.png: -?[\d.]+:\d+:(\w+)  -?[\d.]+:\d+:(\w+)$", out, re.M)
        assert sorted(a[0] for a in answers) == sorted(classes), out[-2000:]
        assert all(a[1] in classes and a[2] in classes for a in answers)
        assert "server stopped" in out
    else:
        assert "not serving" in out
