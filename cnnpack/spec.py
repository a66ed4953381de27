"""The model spec: everything downstream needs to rebuild, feed and label the model.

Written once by `train` (or `export --arch`) into the manifest's `model` key; nothing
downstream re-derives it.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from cnnpack.errors import UserInputError

MIN_IMAGE_SIZE = 8  # the smallest --image-size accepted (train, export --arch, a manifest's model.image_size)
MAX_IMAGE_SIZE = 4096  # the largest: a 4096 px batch of 64 images is 3 GiB of uint8 already (100000 was a MemoryError)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    arch: str
    num_classes: int
    classes: tuple[str, ...]
    image_size: int
    channels: int = 3
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    input_layout: str = "NCHW"
    arch_kwargs: dict = field(default_factory=dict)
    arch_source: dict | None = None  # your own model's file (user_model): {"path", "sha256"}; absent otherwise

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["arch_source"] is None:  # (a run of a built-in or torchvision model records what it always did)
            del d["arch_source"]
        d["classes"] = list(self.classes)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        known["classes"] = tuple(known["classes"])
        known["mean"] = tuple(known.get("mean", IMAGENET_MEAN))
        known["std"] = tuple(known.get("std", IMAGENET_STD))
        return cls(**known)


def check_image_size(image_size: int) -> None:
    """--image-size within [MIN_IMAGE_SIZE, MAX_IMAGE_SIZE]."""
    if image_size < MIN_IMAGE_SIZE:
        raise UserInputError(f"--image-size {image_size} is too small (minimum {MIN_IMAGE_SIZE})")
    if image_size > MAX_IMAGE_SIZE:
        raise UserInputError(f"--image-size {image_size} is too large (maximum {MAX_IMAGE_SIZE})")


def normalizer(mean: Sequence[float], std: Sequence[float]) -> Callable:
    """(x / 255 - mean) / std for raw NCHW pixels, as one multiply-add: what an artifact exported with
    `--input normalized` takes."""
    import numpy as np

    scale = (1 / (255 * np.asarray(std, np.float32))).reshape(1, -1, 1, 1)
    shift = (np.asarray(mean, np.float32) / np.asarray(std, np.float32)).reshape(1, -1, 1, 1)
    return lambda x: np.asarray(x, np.float32) * scale - shift


# -- class names ----------------------------------------------------------------------------------
# A class name travels through labels.txt (one line each), Triton's classification extension
# (`score:index:label`, which stock clients split on ':'), ONNX metadata_props, TorchScript extra
# files and JSON. Spaces, quotes and non-ASCII letters are fine for all of them; these are not.
def class_name_problem(name: object) -> str | None:
    """Why `name` cannot travel the whole chain, or None when it can."""
    if not isinstance(name, str) or not name.strip():
        return "is empty (labels.txt needs one name per line)"
    bad = sorted({ch for ch in name if not ch.isprintable()})
    if bad:
        return (f"contains {', '.join(repr(ch) for ch in bad)} (labels.txt holds one printable, single-line "
                "name per class)")
    if ":" in name:
        return ("contains ':' (Triton's classification extension answers score:index:label and clients split "
                "it on ':', so they would print the wrong label)")
    if name != name.strip():
        return "starts or ends with whitespace (clients that strip labels.txt lines would lose it)"
    return None


def suggest_class_name(name: str) -> str:
    """A name that passes `class_name_problem`: bad characters become '_'."""
    fixed = re.sub(r"_+", "_", "".join(ch if ch.isprintable() and ch != ":" else "_" for ch in str(name))).strip()
    return fixed.strip("_") or "class"


def check_class_names(classes: Sequence[str], *, where: Callable[[int, str], str], fix: str) -> list[str]:
    """The one rule for class names, applied before any work; UserInputError (exit 2) for the first bad one.

    Args:
        classes: the names, in label order.
        where: names the place a class came from, e.g. `lambda i, c: f"class folder {c!r} in /data"`.
        fix: what to do, e.g. "rename the folder" (a valid suggestion is appended).
    """
    for i, name in enumerate(classes):
        problem = class_name_problem(name)
        if problem:
            raise UserInputError(f"{where(i, name)}: the name {problem}; {fix}, e.g. "
                                 f"{suggest_class_name(name)!r}")
        if name in classes[:i]:
            raise UserInputError(f"{where(i, name)}: the name is given twice; class names must be unique")
        nfc = unicodedata.normalize("NFC", name)
        if twin := next((c for c in classes[:i] if unicodedata.normalize("NFC", c) == nfc), None):
            # `café` typed on Linux and `café` copied from macOS are two folders with one look: the labels, the
            # report and the served labels would show two classes of one name
            raise UserInputError(f"{where(i, name)}: the name reads the same as {twin!r} (its accents are encoded "
                                 f"another way); {fix} so they differ, or merge the two")
    return list(classes)
