"""`--data torchvision:<name>`: a torchvision classification data set read from a local root (MNIST, FashionMNIST,
KMNIST, QMNIST, CIFAR10, CIFAR100, USPS, ...), its train and test splits as `Split`s of the model's size.

A data set's files are read by torchvision's own class; what cnnpack adds is that a missing, damaged or foreign file
is one line that says which (not torchvision's traceback), that labels are checked against the classes and the
images, and a digest of the content so a run knows when the data changed under the same name.
"""

from __future__ import annotations

import hashlib
import inspect
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from cnnpack.errors import UserInputError, one_line
from cnnpack.host import check_images_fit


def tv_root(data_root: str | Path | None) -> Path:
    """--data-root, or torchvision's own default folder."""
    return Path(data_root or Path.home() / ".cache" / "torchvision")


def dataset_files(name: str, root: Path) -> list[Path]:
    """What of `root` belongs to data set `name` (a root holds several): its folder, as torchvision names it
    (MNIST's `MNIST/`, CIFAR10's `cifar-10-batches-py/`), or its files (USPS's `usps.bz2`)."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, name, None)
    names = {name, str(getattr(cls, "base_folder", "") or name)}
    try:
        return sorted(p for p in root.iterdir() if p.name in names or p.name.lower().startswith(name.lower() + "."))
    except OSError:
        return []


def _resize_tensor(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, C, H, W) uint8 -> (N, 3, size, size) uint8, in chunks to bound memory."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    if images.shape[-1] == size and images.shape[-2] == size:
        return images.contiguous()
    out = []
    for chunk in images.split(2048):
        x = F.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        out.append(x.round().clamp(0, 255).to(torch.uint8))
    return torch.cat(out)


def _arrays(ds, name: str) -> tuple[np.ndarray, np.ndarray]:
    """A split's images (N, C, H, W) uint8 and labels (N,) as torchvision holds them."""
    data = ds.data
    arr = data.numpy() if isinstance(data, torch.Tensor) else np.asarray(data)
    if arr.ndim == 3:  # (N, H, W) grayscale
        arr = arr[:, None]
    elif arr.ndim == 4 and arr.shape[-1] in (1, 3):  # (N, H, W, C)
        arr = arr.transpose(0, 3, 1, 2)
    if arr.ndim != 4 or arr.shape[1] not in (1, 3):
        raise UserInputError(f"torchvision:{name} holds images of shape {list(arr.shape[1:])}, not gray or RGB "
                             "pictures; export it as an ImageFolder")
    targets = getattr(ds, "targets", None)
    targets = np.asarray(getattr(ds, "labels", None) if targets is None else targets)
    if targets.ndim == 2 and name == "QMNIST":  # its table of 8 columns: the class is the first (torchvision's compat)
        targets = targets[:, 0]
    if targets.ndim != 1 or not np.issubdtype(targets.dtype, np.integer):
        raise UserInputError(f"torchvision:{name}'s labels are not one class index per image ({targets.dtype}, shape "
                             f"{list(targets.shape)}); export it as an ImageFolder")
    if arr.dtype != np.uint8:  # (a cast would wrap 16-bit values and zero floats in 0-1)
        raise UserInputError(f"torchvision:{name} holds {arr.dtype} images, not 8-bit ones; export it as an "
                             "ImageFolder")
    return np.ascontiguousarray(arr), targets.astype(np.int64)


def _split(images: np.ndarray, labels: np.ndarray, size: int, name: str) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(images resized to `size`, labels, the digest of what the split holds)."""
    content = hashlib.sha256(memoryview(images).cast("B"))
    content.update(memoryview(np.ascontiguousarray(labels)).cast("B"))
    check_images_fit(len(images), size, f"--data torchvision:{name}")  # (CIFAR10's 60,000 at 224 px: 9 GiB)
    return _resize_tensor(torch.from_numpy(images), size), torch.from_numpy(labels), content.hexdigest()


def _open(cls, name: str, root: Path, download: bool, train: bool):
    try:
        return cls(str(root), train=train, download=download)
    except (RuntimeError, FileNotFoundError) as e:
        if isinstance(e, RuntimeError) and "not found" not in str(e).lower():
            raise _damaged(name, root, e) from None
        why = one_line(e).rstrip(":")
        hint = "" if download else " (`cnnpack train --download` or `cnnpack evaluate --download` fetches it, when online)"
        raise UserInputError(f"torchvision:{name} not found under {root}: {why}{hint}") from None
    except OSError as e:  # a folder it cannot read, or (with download) no network: an offline machine
        raise UserInputError(f"torchvision:{name} under {root} could not be read: {one_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - torchvision's readers on a damaged file: ValueError, AssertionError, ...
        raise _damaged(name, root, e) from None


DAMAGED = "its files are damaged or not torchvision's; remove them and fetch them again with --download"


def _damaged(name: str, root: Path, e: BaseException) -> UserInputError:
    return UserInputError(f"torchvision:{name} under {root} could not be read ({type(e).__name__}: {one_line(e, 160)}): "
                          f"{DAMAGED}")


class Loaded(NamedTuple):
    train: tuple[torch.Tensor, torch.Tensor, str]  # (images (N, 3, S, S) uint8, labels (N,) int64, content digest)
    val: tuple[torch.Tensor, torch.Tensor, str]  # torchvision's test split
    classes: list[str]


def load_torchvision(name: str, size: int, *, root: Path, download: bool) -> Loaded:
    """The train and test splits of torchvision's `name` under `root`."""
    import torchvision.datasets as tvd

    cls = getattr(tvd, name, None)
    if cls is None or not isinstance(cls, type) or not issubclass(cls, tvd.VisionDataset):
        near = [n for n in dir(tvd) if n.lower() == name.lower() and n != name]
        raise UserInputError(f"torchvision has no dataset {name!r}" + (f"; did you mean {near[0]}? (names are "
                             "case-sensitive)" if near else " (e.g. MNIST, FashionMNIST, CIFAR10)"))
    params = inspect.signature(cls.__init__).parameters
    needs = [n for n, p in params.items() if n not in ("self", "root") and p.default is p.empty
             and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if "train" not in params or needs:  # (SVHN's split=, EMNIST's choice of labels, a detection set's...)
        what = (f"needs {', '.join(f'{n}=' for n in needs)} beside its train/test split (train=True/False)" if needs
                else "takes split=, not train=True/False, which cnnpack reads its train/test split by" if "split" in
                params else "has no train/test split cnnpack can read (train=True/False)")
        raise UserInputError(f"torchvision:{name} {what}; export it as an ImageFolder")
    if root.is_file():
        raise UserInputError(f"--data-root {root} is a file, not the folder torchvision:{name} lies in")
    train_ds, val_ds = (_open(cls, name, root, download, train) for train in (True, False))
    if not hasattr(train_ds, "data"):
        raise UserInputError(f"torchvision:{name} does not expose in-memory `data`; export it as an ImageFolder")
    (train_x, train_y), (val_x, val_y) = _arrays(train_ds, name), _arrays(val_ds, name)
    # USPS names no classes: its labels are the digits
    classes = ([str(c) for c in train_ds.classes] if getattr(train_ds, "classes", None) else
               [str(i) for i in range(int(max(train_y.max(initial=0), val_y.max(initial=0))) + 1)])
    for split, x, y in (("train", train_x, train_y), ("test", val_x, val_y)):
        if len(x) != len(y) or not len(y) or y.min() < 0 or y.max() >= len(classes):
            found = (f"{len(x)} images and {len(y)} labels" if len(x) != len(y) else "no images" if not len(y) else
                     f"labels {int(y.min())}..{int(y.max())} for {len(classes)} classes")
            raise UserInputError(f"torchvision:{name} under {root}: its {split} split has {found}: {DAMAGED}")
    return Loaded(_split(train_x, train_y, size, name), _split(val_x, val_y, size, name), classes)
