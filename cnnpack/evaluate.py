"""`cnnpack evaluate`: accuracy and confusion matrix of a checkpoint (or an exported artifact)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cnnpack.errors import UserInputError
from cnnpack.rundir import Run, atomic_write_json


def dataset_of(run: Run, data: str | None):
    """The validation data a run was trained on (or `data`), sized for its model."""
    from cnnpack.data import check_data, load_data

    spec = run.model_spec
    if data is not None:
        check_data(data, spec["image_size"])
    cfg = run.read().get("stages", {}).get("train", {}).get("config", {})
    source = data or cfg.get("data")
    if not source:
        raise UserInputError(f"{run.path} was not trained by cnnpack; pass --data to say what to evaluate on")
    return load_data(source, spec["image_size"], seed=cfg.get("seed", 0),
                     val_fraction=cfg.get("val_fraction", 0.2), data_root=cfg.get("data_root"))


def evaluate(run_dir: str | Path, *, fmt: str = "checkpoint", data: str | None = None, device: str = "auto") -> dict:
    """Accuracy and confusion matrix on the validation split; writes `eval-<format>.json`."""
    from cnnpack.runtimes import predict_split, runtime_for_format, split_batching

    run = Run.open(run_dir)
    runtime = runtime_for_format(run, fmt, device)  # first: a missing or changed artifact fails fast
    d = dataset_of(run, data)
    spec = run.model_spec
    if d.classes != list(spec["classes"]):
        raise UserInputError(f"--data classes {d.classes} differ from the model's {spec['classes']}")
    record = run.read()["stages"]["export"]["artifacts"][fmt] if fmt != "checkpoint" else {}
    batch, static = split_batching(record)  # within the artifact's max batch; padded for a static one
    logits = predict_split(runtime, d.val.images.numpy(), batch, static=static)
    pred = logits.argmax(1)
    true = d.val.labels.numpy()
    k = len(d.classes)
    cm = np.bincount(true * k + pred, minlength=k * k).reshape(k, k)
    out = run.file(f"eval-{fmt}.json")
    result = {"format": fmt, "runtime": runtime.name, "data": d.source, "images": int(len(true)),
              "accuracy": float((pred == true).mean()), "classes": d.classes, "confusion_matrix": cm.tolist(),
              "per_class_acc": (np.diag(cm) / np.maximum(cm.sum(1), 1)).round(4).tolist(), "output": str(out)}
    atomic_write_json(out, result)
    return result
