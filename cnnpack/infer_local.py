"""`cnnpack infer --run RUN`: what `cnnpack infer` gives through a Triton server, on this machine and without one: a
run's artifact (or its checkpoint) in the runtime verify checked it in, on the images decoded, resized and cropped
as training reads them. The results have the served path's shape, so a script reads either."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np

from cnnpack.errors import UserInputError
from cnnpack.infer import CHUNK_FILES, files_to_classify, none_read, read_pixels, shown_name
from cnnpack.rundir import Run

log = logging.getLogger("cnnpack")


def default_format(run: Run) -> str:
    """The run's fp32 ONNX artifact where it has one (what the served default runs), else its checkpoint."""
    artifacts = ((run.read().get("stages") or {}).get("export") or {}).get("artifacts") or {}
    return "onnx" if "onnx" in artifacts else "checkpoint"


def top_labels(logits: np.ndarray, classes: list[str], k: int) -> list[dict]:
    """The k best of one image's logits, as the served path's `score:index:label` reads (best first)."""
    order = np.argsort(-logits, kind="stable")[:k]
    return [{"label": classes[i], "index": int(i), "score": float(logits[i])} for i in order]


def infer_local(paths: list[str | Path], run_dir: str | Path, *, fmt: str | None = None, device: str = "auto",
                top_k: int = 1, on_results: Callable[[list[dict], list[dict]], None] | None = None) -> dict:
    """Top-k labels of each readable image from the run's `fmt` artifact; unreadable images listed as skipped.

    Raises:
        UserInputError (exit 2): no such run or artifact, a bad --top-k, or no image readable.
    """
    from cnnpack.host import check_device
    from cnnpack.runtimes import predict_split, run_batching, runtime_for_format

    if top_k < 1:
        raise UserInputError(f"--top-k must be >= 1, got {top_k}")
    check_device(device)
    files, left_out = files_to_classify(paths)
    run = Run.open(run_dir)
    fmt = fmt or default_format(run)
    runtime = runtime_for_format(run, fmt, device)  # a missing or changed artifact fails before any image is read
    spec = run.model_spec
    classes, k = list(spec["classes"]), min(top_k, len(spec["classes"]))
    batch, static = run_batching(run, fmt)
    if (((run.read().get("stages") or {}).get("model") or {}).get("source") or {}).get("init") == "random":
        log.warning(f"warning: {run.path}'s model has random weights (`cnnpack export --arch` without --pretrained or "
                    "--weights): its labels mean nothing")
    results: list[dict] = []
    skipped: list[dict] = []
    for i in range(0, len(files), CHUNK_FILES):
        ok, pixels, bad = read_pixels(files[i:i + CHUNK_FILES], spec["image_size"])
        logits = predict_split(runtime, pixels, batch, static=static) if ok else []
        rows = [{"file": shown_name(p), "top": top_labels(row, classes, k)} for p, row in zip(ok, logits)]
        results += rows
        skipped += bad
        if on_results is not None:
            on_results(rows, bad)
    if not results:
        raise none_read(len(files), skipped)
    return {"run": str(run.path), "format": fmt, "runtime": runtime.name, "top_k": k, "score": "logit",
            "results": results, "skipped": skipped, "left_out": [shown_name(f) for f in left_out]}
