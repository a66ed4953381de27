"""`cnnpack evaluate`: accuracy and confusion matrix of a checkpoint (or an exported artifact)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cnnpack.atomic import atomic_write_json
from cnnpack.errors import UserInputError, first_few, shell
from cnnpack.rundir import Run, now


@dataclass
class Scored:
    """The images evaluate scores, labelled by the model's class indices, and where they came from."""

    images: np.ndarray  # (N, 3, S, S) uint8
    labels: np.ndarray  # (N,) int64, indices into the model's classes
    split: str  # "validation" | "all"
    own: bool  # the run's own data: its result is eval-<format>.json, other data's a file of its own
    source: str
    skipped: list[str]  # unreadable files, as "path: reason"


def dataset_of(run: Run, data: str | None, *, data_root: str | None = None, download: bool = False):
    """The data a run was trained on (or `data`), sized for its model (torchvision data sets under `data_root`, else
    the run's root)."""
    from cnnpack.data import check_data, check_torchvision_options, load_data

    spec = run.model_spec
    if data is not None:
        check_data(data, spec["image_size"])
    train = run.read().get("stages", {}).get("train", {})
    cfg = train.get("config", {})
    source = data or cfg.get("data")
    if not source:
        raise UserInputError(f"{run.path} was not trained by cnnpack; pass --data to say what to evaluate on")
    # the user's options: the run's own root is only a default
    check_torchvision_options(source, data_root, download, "--data is" if data else "the run's data is")
    d = load_data(source, spec["image_size"], seed=cfg.get("seed", 0), val_fraction=cfg.get("val_fraction", 0.2),
                  data_root=data_root or cfg.get("data_root"), download=download)
    if _is_own(data, cfg.get("data"), data_root, cfg.get("data_root")):
        _warn_if_changed(train.get("data") or {}, d.summary())
    return d


def _warn_if_changed(then: dict, now: dict) -> None:
    """Images added to the training data or taken out since the run trained: in a folder split by seed, they move
    the split, and the validation images are no longer the ones held out (some may be images the model trained
    on); with val/ of its own, only a change there changes what is scored."""
    import logging

    from cnnpack.data import split_dirs
    from cnnpack.data_change import changed_since

    source = Path(now["source"])  # (a torchvision data set's test split is its own, as a val/ folder)
    own_val = now["source"].startswith("torchvision:") or (source.is_dir() and all(split_dirs(source)))
    change = changed_since(then, now, ("val_per_class",) if own_val else ("train_per_class", "val_per_class"))
    if change is None:
        return
    where = "its validation split" if own_val else "train + validation"
    why = ("the validation images are not the ones the run was scored on" if own_val else
           "its validation split is no longer the one held out, and may hold images the model trained on")
    logging.getLogger("cnnpack").warning(f"warning: {source} has changed since the run was trained ({where}: "
                                         f"{change}): {why}")


def scored_data(run: Run, data: str | None = None, *, data_root: str | None = None,
                download: bool = False) -> Scored:
    """The validation split of the run's own data (or of other data that has one: train/ and val/ folders, shapes,
    a torchvision data set), or every image of a folder of <class>/<images> the model was not trained on (it has
    no split of its own: the model never saw any of it). The data's classes may be any of the model's."""
    from cnnpack.data import SHAPES, check_data, check_torchvision_options, read_class_folders, split_dirs

    spec = run.model_spec
    own = _is_own(data, run.trained_on, data_root,
                  ((run.read()["stages"].get("train") or {}).get("config") or {}).get("data_root"))
    if not own and data is not None and data != SHAPES and not data.startswith("torchvision:"):
        check_data(data, spec["image_size"])
        check_torchvision_options(data, data_root, download)
        root = Path(data).resolve()  # named (and its result file keyed) by where it is, not as typed from here
        train, val = split_dirs(root)
        if train and not val:  # its folder would be read as a class the model does not have
            raise UserInputError(f"--data {root} has {train.name}/ but no validation folder: evaluate scores val/ of "
                                 f"train/ + val/, or every image of a folder of <class> folders: --data "
                                 f"{shell(train)} scores every image of {train.name}/")
        s, skipped = read_class_folders(val or root, spec["classes"], spec["image_size"])  # val/ alone: the images
        return Scored(s.images.numpy(), s.labels.numpy(), "validation" if val else "all", False, str(root), skipped)
    d = dataset_of(run, data, data_root=data_root, download=download)
    labels = _model_indices(d.classes, list(spec["classes"]), d.source)[d.val.labels.numpy()]
    return Scored(d.val.images.numpy(), labels, "validation", own, d.source, _val_skipped(d))


def _val_skipped(d) -> list[str]:
    """The unreadable files of the scored split: under val/ where the data has train/ and val/ folders (a file of a
    folder split by seed was dropped before the split: it is counted whichever side it would have fallen on)."""
    from cnnpack.data import split_dirs

    train, val = split_dirs(Path(d.source))
    if not (train and val):
        return d.skipped
    return [w for w in d.skipped if Path(w.split(": ", 1)[0]).is_relative_to(val)]


def evaluate(run_dir: str | Path, *, fmt: str = "checkpoint", data: str | None = None, device: str = "auto",
             data_root: str | None = None, download: bool = False) -> dict:
    """Accuracy and confusion matrix on `scored_data`; writes `eval-<format>.json` (other data: its own file)."""
    from cnnpack.host import check_device
    from cnnpack.runtimes import predict_split, run_batching, runtime_for_format

    check_device(device)
    run = Run.open(run_dir)
    run.check_writable()  # a run it cannot write to fails now, not after the work
    runtime = runtime_for_format(run, fmt, device)  # first: a missing or changed artifact fails fast
    s = scored_data(run, data, data_root=data_root, download=download)
    classes = list(run.model_spec["classes"])
    batch, static = run_batching(run, fmt)  # within the artifact's max batch; padded for a static one
    pred = predict_split(runtime, s.images, batch, static=static).argmax(1)
    k = len(classes)
    cm = np.bincount(s.labels * k + pred, minlength=k * k).reshape(k, k)
    out = run.file(f"eval-{fmt}.json" if s.own else f"eval-{fmt}-{_slug(s.source)}.json")
    seen = cm.sum(1)
    result = {"format": fmt, "runtime": runtime.name, "data": s.source, "split": s.split, "images": int(len(s.labels)),
              "accuracy": float((pred == s.labels).mean()), "classes": classes, "confusion_matrix": cm.tolist(),
              "per_class_acc": [round(float(c) / n, 4) if n else None for c, n in zip(np.diag(cm), seen)],  # None: no image
              "skipped_files": len(s.skipped), "skipped_examples": s.skipped[:5], "output": str(out),
              # what was scored: a file exported again since makes this result another model's (nothing else says so)
              "artifact": runtime.info.get("artifact") or {"path": "checkpoint.pt",
                                                            "sha256": runtime.info.get("checkpoint_sha256")},
              "evaluated": now()}
    atomic_write_json(out, result)
    return result


def _is_own(data: str | None, trained_on: str | None, data_root: str | None = None,
            trained_root: str | None = None) -> bool:
    """Whether `--data` names the data the run was trained on (./data/ and /abs/data alike; a torchvision data set
    under the root it was read from: the same name under another root is other data)."""
    asked = data or trained_on
    if asked is not None and asked.startswith("torchvision:") and data_root is not None:
        from cnnpack.data_torchvision import tv_root

        return asked == trained_on and tv_root(data_root).resolve() == tv_root(trained_root).resolve()
    if data is None or data == trained_on:
        return True
    root = Path(data)
    return trained_on is not None and root.exists() and root.resolve() == Path(trained_on).resolve()


def _model_indices(classes: list[str], model_classes: list[str], source: str) -> np.ndarray:
    """For each of a data set's classes, its index among the model's (every one must be there)."""
    from cnnpack.data import nfc

    by_nfc = {nfc(c): i for i, c in enumerate(model_classes)}  # a class copied from macOS reads the same (NFD)
    if unknown := [c for c in classes if nfc(c) not in by_nfc]:
        raise UserInputError(f"{source} has class {unknown[0]!r}, not one of the model's classes "
                             f"({first_few(model_classes, 8)}); evaluate on data of the classes the model was "
                             "trained on")
    return np.array([by_nfc[nfc(c)] for c in classes], dtype=np.int64)


def _slug(source: str) -> str:
    """A file-name-safe short name of a data source (the result of other data does not replace the run's own)."""
    import hashlib
    import re

    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(source.rstrip("/")).name or "data")[:40]
    return f"{name}-{hashlib.sha256(source.encode()).hexdigest()[:6]}"
