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
    images, true, split, own = _scored(run, d, data)
    logits = predict_split(runtime, images, batch, static=static)
    pred = logits.argmax(1)
    k = len(d.classes)
    cm = np.bincount(true * k + pred, minlength=k * k).reshape(k, k)
    out = run.file(f"eval-{fmt}.json" if own else f"eval-{fmt}-{_slug(d.source)}.json")  # other data: its own file
    seen = cm.sum(1)
    result = {"format": fmt, "runtime": runtime.name, "data": d.source, "split": split, "images": int(len(true)),
              "accuracy": float((pred == true).mean()), "classes": d.classes, "confusion_matrix": cm.tolist(),
              "per_class_acc": [round(float(c) / n, 4) if n else None for c, n in zip(np.diag(cm), seen)],  # None: no image
              "output": str(out)}
    atomic_write_json(out, result)
    return result


def _scored(run: Run, d, data: str | None) -> tuple[np.ndarray, np.ndarray, str, bool]:
    """(images, labels, which, own): the validation split of the run's own data (own) or of other data that has one
    (train/ and val/ folders, a torchvision dataset); every image of other data given as one folder of
    <class>/<images> (it has no split of its own: the model never saw any of it)."""
    trained_on = run.read().get("stages", {}).get("train", {}).get("config", {}).get("data")
    root = Path(data) if data else None
    same = data == trained_on or (trained_on is not None and root is not None and root.exists()
                                  and root.resolve() == Path(trained_on).resolve())  # ./data/ and /abs/data alike
    own = root is None or same
    if own or not root.is_dir() or (root / "val").is_dir():
        return d.val.images.numpy(), d.val.labels.numpy(), "validation", own
    images = np.concatenate([d.train.images.numpy(), d.val.images.numpy()])
    return images, np.concatenate([d.train.labels.numpy(), d.val.labels.numpy()]), "all", False


def _slug(source: str) -> str:
    """A file-name-safe short name of a data source (the result of other data does not replace the run's own)."""
    import hashlib
    import re

    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(source.rstrip("/")).name or "data")[:40]
    return f"{name}-{hashlib.sha256(source.encode()).hexdigest()[:6]}"
