"""Datasets: the built-in `shapes`, a user's ImageFolder, or `torchvision:<name>`.

Every source ends up as a `Split`: uint8 images `(N, 3, S, S)` already resized to the model
size, and int64 labels. Images are decoded once into memory (the datasets this tool targets
fit), so an epoch is a shuffle plus cheap tensor augmentation, not thousands of PNG decodes.
"""

from __future__ import annotations

import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cnnpack.data_change import names_digests
from cnnpack.data_layout import (  # noqa: F401 - split_dirs and the split names: importable from here too
    SPLITS,
    TEST_SPLITS,
    TRAIN_SPLITS,
    VAL_SPLITS,
    class_dirs,
    classes_of,
    flat_hint,
    flat_text,
    holds_classes,
    holds_images,
    nfc,
    split_dirs,
)
from cnnpack.errors import UserInputError, count, first_few
from cnnpack.folders import walk_files
from cnnpack.host import check_images_fit
from cnnpack.images import DECODE_ERRORS, quiet, read_image
from cnnpack.spec import check_class_names, check_image_size

SHAPES = "shapes"


@dataclass
class Split:
    images: torch.Tensor  # (N, 3, S, S) uint8
    labels: torch.Tensor  # (N,) int64
    files: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Data:
    train: Split
    val: Split
    classes: list[str]
    source: str
    skipped: list[str] = field(default_factory=list)  # unreadable files, as "path: reason"
    content: dict | None = None  # {"train", "val"}: digests of what a torchvision data set holds

    def summary(self) -> dict:
        return {
            "source": self.source,
            "classes": self.classes,
            "train_images": len(self.train),
            "val_images": len(self.val),
            "train_per_class": torch.bincount(self.train.labels, minlength=len(self.classes)).tolist(),
            "val_per_class": torch.bincount(self.val.labels, minlength=len(self.classes)).tolist(),
            "skipped_files": len(self.skipped),
            "skipped_examples": self.skipped[:5],
            # which files each split holds: the same counts after a rename, a move from one class folder to another
            # or a swap move the seeded split all the same
            **names_digests(self.train.files, self.val.files),
            # what a torchvision data set holds (it has no files to name): the images and labels themselves
            **{f"{k}_content_sha256": v for k, v in (self.content or {}).items()},
        }


# -- decoding (cnnpack.images) ------------------------------------------------------------
def _try_read(path: Path, size: int) -> tuple[np.ndarray | None, str]:
    if path.exists() and not path.is_file():  # a link to a pipe: opening it waited for a writer forever
        return None, f"{path}: not a regular file (a pipe, a device or a socket)"
    try:
        return read_image(path, size), ""
    except DECODE_ERRORS as e:  # the reason in words ("image file is truncated"), not only its type's name
        text = e.strerror if isinstance(e, OSError) and e.strerror else re.sub(
            r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>|'[^']*' ?", "", str(e).split("\n")[0]).strip()
        return None, f"{path}: {type(e).__name__}" + (f" ({text})" if text else "")


class _Decoded:
    """Images this process decoded, by (path, size), each with the file's size and mtime when it was read.

    One `cnnpack pipeline` reads the same folder five times (train; quantize's gate; verify; served's images and its
    verify): 0.9-1.1 s of PNG decoding each for the built-in data on 2 cores. A file is decoded again when its size
    or mtime changed; the arrays here are never handed out (a split stacks copies of them), so no caller can change
    them. Up to `limit` bytes are kept: a large dataset is decoded every time rather than held twice in memory.
    """

    def __init__(self, limit: int = 512 * 2**20) -> None:
        self.limit, self.held = limit, 0
        self.arrays: dict[tuple[str, int], tuple[tuple[int, int], np.ndarray]] = {}

    def read(self, paths: list[Path], size: int) -> list[tuple[np.ndarray | None, str]]:
        stamps = []
        for p in paths:
            try:
                st = p.stat()
                stamps.append((st.st_size, st.st_mtime_ns))
            except OSError:
                stamps.append(None)
        results: list = [None] * len(paths)
        todo = []
        for i, (p, stamp) in enumerate(zip(paths, stamps)):
            hit = self.arrays.get((str(p), size))
            if hit is not None and stamp is not None and hit[0] == stamp:
                results[i] = (hit[1], "")
            else:
                todo.append(i)
        with quiet(), ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) * 2)) as pool:
            for i, r in zip(todo, pool.map(lambda i: _try_read(paths[i], size), todo)):
                results[i] = r
                if r[0] is not None and stamps[i] is not None and self.held + r[0].nbytes <= self.limit:
                    old = self.arrays.get((str(paths[i]), size))
                    self.held += r[0].nbytes - (old[1].nbytes if old else 0)
                    self.arrays[(str(paths[i]), size)] = (stamps[i], r[0])
        return results


_DECODED = _Decoded()


# -- ImageFolder (its layout: data_layout) ---------------------------------------------------
def _read_folder(root: Path, classes: list[str], size: int, skipped: list[str],
                 present: dict[str, str] | None = None) -> Split:
    """Reads `root/<folder>/*` for each class folder in `present` (folder -> its class; default: a folder of each
    class's name), labelled by the class's index in `classes`."""
    present = present or {c: c for c in classes}
    paths, labels = [], []
    for name, cls in present.items():
        ci = classes.index(cls)
        folder = root / name
        files = walk_files(folder) if folder.is_dir() else []
        if not files:
            raise UserInputError(f"class folder {folder} has no files; remove it or add images")
        paths += files
        labels += [ci] * len(files)
    check_images_fit(len(paths), size, f"--data {root}")
    results = _DECODED.read(paths, size)
    keep = [i for i, (arr, _) in enumerate(results) if arr is not None]
    skipped += [why for arr, why in results if arr is None]
    kept_labels = [labels[i] for i in keep]
    for name, cls in present.items():
        ci = classes.index(cls)
        if ci not in kept_labels:
            bad = [why for (arr, why), lab in zip(results, labels) if lab == ci and arr is None]
            raise UserInputError(f"class folder {root / name} has no readable images "
                                 f"({count(len(bad), 'unreadable file')}, e.g. {bad[0]})")
    images = torch.from_numpy(np.stack([results[i][0] for i in keep]))
    return Split(images, torch.tensor(kept_labels, dtype=torch.int64), [str(paths[i]) for i in keep])


def _check_classes(root: Path, classes: list[str]) -> None:
    if not classes:
        raise UserInputError(f"{root} has no class folders; expected {root}/<class>/<image files>" + (
            flat_hint(root) if root.name.lower() in TRAIN_SPLITS else ""))
    if len(classes) < 2:
        raise UserInputError(f"{root} has only one class ({classes[0]}); a classifier needs at least two")
    check_class_names(classes, where=lambda i, c: f"class folder {c!r} in {root}", fix="rename the folder")


def recorded_source(data: str) -> str:
    """`--data` as a run records it: a folder by its absolute path (evaluate, verify and resume read it from any
    directory, and a pipeline knows its own run by it); the built-in data and torchvision names as given."""
    if data == SHAPES or data.startswith("torchvision:") or not Path(data).exists():
        return data
    return str(Path(data).resolve())


def check_outside(data: str, path: str | Path, what: str) -> None:
    """Refuses a folder the command writes (`what`: "--run", "--repository") inside the --data folder: its images
    and plots would be read as a class of images the next time (`--data .` from the data folder, with the default
    runs/ there, trained a class named `runs`)."""
    if data == SHAPES or data.startswith("torchvision:") or not Path(data).is_dir():
        return
    root, inside = Path(data).resolve(), Path(path).resolve()
    if inside == root or root in inside.parents:
        raise UserInputError(f"{what} {path} is inside --data {data}: what it writes would be read as images of a "
                             f"class; choose a {what} outside {root}")


def check_data(data: str, image_size: int) -> None:
    """Checks `--data` and `--image-size` before any work (reads no image): the size, that an ImageFolder
    path is a folder, and its class names. The built-in data and torchvision data sets have fixed, valid names.
    """
    check_image_size(image_size)
    if not data.strip():
        raise UserInputError(f"--data is empty; give {SHAPES}, a folder of <class>/<images>, or torchvision:NAME")
    root = Path(data)
    if data.startswith("torchvision:"):
        import torchvision.datasets as tvd

        name = data.split(":", 1)[1]
        if not isinstance(getattr(tvd, name, None), type):
            raise UserInputError(f"torchvision has no dataset {name!r} (e.g. MNIST, FashionMNIST, CIFAR10)")
        return
    if data == SHAPES:
        return
    if not root.exists():
        raise UserInputError(f"data folder not found: {root} (--data takes {SHAPES}, a folder of "
                             "<class>/<images>, or torchvision:NAME)")
    if not root.is_dir():
        raise UserInputError(f"--data {root} is a file; expected an ImageFolder directory")
    train, val = split_dirs(root)
    for folder in (train, val) if train and val else (root,):
        names = [p.name for p in class_dirs(folder)]
        if names:
            check_class_names(names, where=lambda i, c, f=folder: f"class folder {c!r} in {f}",
                              fix="rename the folder")


def class_names(data: str) -> list[str] | None:
    """The classes `load_data` gives `data`, known without reading an image (None for a torchvision data set, or a
    folder the loader would refuse: it says why)."""
    if data == SHAPES:
        from cnnpack import shapes

        return sorted(shapes.CLASSES)  # the materialised folders, as the loader lists them
    root = Path(data)
    if data.startswith("torchvision:") or not root.is_dir():
        return None
    train, val = split_dirs(root)
    names = [p.name for p in class_dirs(train if train and val else root)]
    if not (train and val) and (train or val or any(n in ("train", "val") and holds_classes(root / n)
                                                     for n in names)):
        return None  # one split alone: the loader says so
    return names


def check_torchvision_options(data: str, data_root: str | None, download: bool, what: str = "--data is") -> None:
    """--data-root and --download name where a torchvision data set lies: with other data they were ignored.
    `what`: how the message names `data` (the run's own, where no --data was given)."""
    if (data_root is not None or download) and not data.startswith("torchvision:"):
        flag = "--data-root" if data_root is not None else "--download"
        raise UserInputError(f"{flag} is for torchvision:NAME data sets, and {what} {data!r}; drop {flag}")


def check_val_fraction(data: str) -> None:
    """--val-fraction given for data that comes with its own train/validation split: it split nothing, and the run
    recorded it as if it had (refused, as --data-root is for a folder)."""
    if data == SHAPES or data.startswith("torchvision:"):
        own = f"--data {data} comes with its own train/validation split"
    else:
        try:
            train, val = split_dirs(Path(data))
        except OSError:  # a folder that cannot be read: loading it says so
            return
        if not (train and val):
            return
        own = f"{data} has its own {train.name}/ and {val.name}/ folders"
    raise UserInputError(f"--val-fraction splits a folder of class folders, and {own}; drop --val-fraction")


def training_images_at_most(data: str, *, val_fraction: float = 0.2) -> int | None:
    """How many images the training split of `--data` can hold, counted without decoding any (unreadable files
    only lower it); None where it is not known before loading (torchvision data sets)."""
    if data == SHAPES:
        from cnnpack import shapes

        return shapes.TRAIN_PER_CLASS * len(shapes.CLASSES)
    root = Path(data)
    if data.startswith("torchvision:") or not root.is_dir():
        return None
    train, val = split_dirs(root)
    if train and val:
        return sum(len(walk_files(c)) for c in class_dirs(train))
    total = 0
    for c in class_dirs(root):  # as split_indices leaves them
        n = len(walk_files(c))
        total += n - (min(max(1, round(n * val_fraction)), n - 1) if n > 1 else 0)
    return total


def split_indices(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stratified seeded split: each class keeps ~val_fraction of its images for validation."""
    g = torch.Generator().manual_seed(seed)
    train_idx, val_idx = [], []
    for c in labels.unique():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_val = min(max(1, round(len(idx) * val_fraction)), len(idx) - 1) if len(idx) > 1 else 0  # 1 left to train
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values


def _subset(split: Split, idx: torch.Tensor) -> Split:
    return Split(split.images[idx], split.labels[idx], [split.files[i] for i in idx.tolist()])


def load_image_folder(root: Path, size: int, *, val_fraction: float = 0.2, seed: int = 0) -> Data:
    """`root/train/<class>/*` + `root/val/<class>/*`, or `root/<class>/*` split with `seed`."""
    if not root.exists():
        raise UserInputError(f"data folder not found: {root}")
    if not root.is_dir():
        raise UserInputError(f"--data {root} is a file; expected an ImageFolder directory")
    skipped: list[str] = []
    train_dir, val_dir = split_dirs(root)
    lone = None if train_dir and val_dir else (  # otherwise `train` would silently become a class
        train_dir or val_dir or next((root / n for n in ("train", "val") if holds_classes(root / n)), None))
    if lone is not None:
        lack = "val" if lone.name.lower() in TRAIN_SPLITS else "train"
        flat = "" if class_dirs(lone) else flat_text(lone)
        also = f" (if {lone.name} is a class whose images lie in subfolders, move them up into {lone}/)" if (
            not flat and any(p.name.lower() not in SPLITS and holds_images(p) for p in class_dirs(root))) else ""
        raise UserInputError(f"{root} has {lone.name}/ but no {lack}/{flat}; add {root / lack}/<class>/<images> "
                             f"or put the class folders directly under {root}{also}")
    if train_dir and val_dir:
        classes = [p.name for p in class_dirs(train_dir)]
        _check_classes(train_dir, classes)
        val_classes = [p.name for p in class_dirs(val_dir)]
        if not val_classes:
            raise UserInputError(f"{val_dir} has no class folders; expected {val_dir}/<class>/<image files>"
                                 + flat_hint(val_dir))
        known = {nfc(c) for c in classes}  # (a class copied from macOS reads the same: the same class)
        if extra := sorted(c for c in val_classes if nfc(c) not in known):
            raise UserInputError(f"{val_dir} has classes not in {train_dir.name}: {first_few(extra, 8)}")
        train = _read_folder(train_dir, classes, size, skipped)
        val = _read_folder(val_dir, classes, size, skipped, present=classes_of(val_classes, classes, val_dir))
    else:
        classes = [p.name for p in class_dirs(root)]
        _check_classes(root, classes)
        full = _read_folder(root, classes, size, skipped)
        tr, va = split_indices(full.labels, val_fraction, seed)
        train, val = _subset(full, tr), _subset(full, va)
    if len(val) == 0:
        raise UserInputError(f"{root}: too few images to hold out a validation split")
    if len(train) < 2:  # BatchNorm trains on batches of 2 or more
        raise UserInputError(f"{root}: {len(train)} training image(s) after the validation split; it needs at least 2")
    return Data(train, val, classes, str(root), skipped)


def read_class_folders(root: Path, classes: list[str], size: int) -> tuple[Split, list[str]]:
    """Every image of `root/<class>/*`, labelled by its index in `classes` (a model's), and the unreadable files.

    For scoring a model on data it was not trained on: no split is held out, and the folders may be any of
    `classes` (one will do); a folder not among them is refused by name.
    """
    folders = [p.name for p in class_dirs(root)]
    if not folders:
        raise UserInputError(f"{root} has no class folders; expected {root}/<class>/<image files>")
    skipped: list[str] = []
    return _read_folder(root, classes, size, skipped, present=classes_of(folders, classes, root)), skipped


# -- entry point ---------------------------------------------------------------------------
def load_data(data: str, image_size: int, *, seed: int = 0, val_fraction: float = 0.2,
              data_root: str | None = None, download: bool = False) -> Data:
    """Resolves `--data` (shapes | PATH | torchvision:NAME) to decoded train/val splits."""
    check_image_size(image_size)
    if data == SHAPES:
        from cnnpack import shapes

        root = shapes.materialise(image_size=image_size, seed=0)
        d = load_image_folder(root, image_size)
        d.source = SHAPES
        return d
    if data.startswith("torchvision:"):
        from cnnpack.data_torchvision import load_torchvision, tv_root

        t = load_torchvision(data.split(":", 1)[1], image_size, root=tv_root(data_root), download=download)
        return Data(Split(*t.train[:2]), Split(*t.val[:2]), t.classes, data, content={"train": t.train[2],
                                                                                    "val": t.val[2]})
    return load_image_folder(Path(data), image_size, val_fraction=val_fraction, seed=seed)


# -- batches ---------------------------------------------------------------------------------
def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    """Raw pixels 0-255 (any dtype) -> float, scaled to 0-1 and standardised per channel."""
    m = torch.tensor(mean, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=x.device).view(1, -1, 1, 1)
    return (x.float() / 255.0 - m) / s


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random crop (reflect-padded by S/16) and horizontal flip per image, vectorised.

    x: (N, C, S, S) on any device; the random draws come from the CPU generator `g`, so a run
    is reproducible whatever device augments. Returns a tensor of x's dtype and device.
    """
    n, _, s, _ = x.shape
    pad = max(1, s // 16)
    offs = torch.randint(0, 2 * pad + 1, (n, 2), generator=g).to(x.device)
    flips = (torch.rand(n, generator=g) < 0.5).to(x.device)
    padded = F.pad(x.float(), (pad, pad, pad, pad), mode="reflect")  # (N, C, S+2p, S+2p)
    ar = torch.arange(s, device=x.device)
    rows = offs[:, 0:1] + ar  # (N, S)
    cols = offs[:, 1:2] + torch.where(flips[:, None], s - 1 - ar, ar)  # (N, S), reversed when flipped
    idx = torch.arange(n, device=x.device)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx, rows[:, :, None], cols[:, None, :]]  # (N, S, S, C)
    return out.permute(0, 3, 1, 2).to(x.dtype).contiguous()


def iterate(split: Split, batch_size: int, *, shuffle: bool = False, g: torch.Generator | None = None,
            indices: torch.Tensor | None = None):
    """Yields (images uint8 (B, 3, S, S), labels (B,)) batches; `indices` restricts to a shard."""
    idx = torch.arange(len(split)) if indices is None else indices
    if shuffle:
        idx = idx[torch.randperm(len(idx), generator=g)]
    for start in range(0, len(idx), batch_size):
        b = idx[start:start + batch_size]
        yield split.images[b], split.labels[b]


def num_batches(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)
