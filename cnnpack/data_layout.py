"""The layout of an ImageFolder data set: its class folders, and its split folders (train/ and val/ by their usual
names, in any case), told apart from classes named like them; what is not a class (hidden folders, those of file
systems, NAS boxes and archivers: `folders.SYSTEM_FOLDERS`); class names matched as they read (NFC)."""

from __future__ import annotations

import unicodedata
from pathlib import Path

from cnnpack.errors import UserInputError, first_few
from cnnpack.folders import SYSTEM_FOLDERS


def class_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name not in SYSTEM_FOLDERS)


def nfc(name: str) -> str:
    return unicodedata.normalize("NFC", name)


def classes_of(folders: list[str], classes: list[str], where: Path) -> dict[str, str]:
    """Each class folder's class among `classes`, matched by name as it reads (`café` copied from macOS, NFD, is the
    `café` typed on Linux, NFC); UserInputError naming every folder that is none of them."""
    by_nfc = {nfc(c): c for c in classes}
    if unknown := [f for f in folders if nfc(f) not in by_nfc]:
        split = next((f for f in unknown if f.lower() in SPLITS
                      and holds_classes(where / f)), None)
        hint = f"; {where / split} holds class folders: pass it as --data" if split else "; rename or remove " + (
            "it" if len(unknown) == 1 else "them")
        which = f"class folder {where / unknown[0]} is not one of" if len(unknown) == 1 else \
            f"class folders {first_few(unknown, 5)} in {where} are not among"
        raise UserInputError(f"{which} the model's classes ({first_few(classes, 8)}){hint}")
    return {f: by_nfc[nfc(f)] for f in folders}


TRAIN_SPLITS, VAL_SPLITS, TEST_SPLITS = ("train", "training"), ("val", "valid", "validation"), ("test", "testing")
SPLITS = (*TRAIN_SPLITS, *VAL_SPLITS, *TEST_SPLITS)  # every name a split folder goes by (in any case)


def split_dirs(root: Path) -> tuple[Path | None, Path | None]:
    """The (training, validation) folders of a dataset laid out by split: train/ and val/ as they are named, or,
    where every folder under `root` is named as a split, in any case: train/ or training/, and val/, valid/ or
    validation/ (test/ or testing/ where none of those is there). Otherwise the folders are classes (`valid/` and
    `invalid/` are two classes), and (None, None); one of the two alone is refused by the loader."""
    folders = class_dirs(root) if root.is_dir() else []
    if {"train", "val"} <= {p.name for p in folders}:
        return root / "train", root / "val"
    dirs: dict[str, Path] = {}
    for p in folders:
        dirs.setdefault(p.name.lower(), p)
    if not dirs or not set(dirs) <= set(SPLITS):
        return None, None
    train = next((dirs[n] for n in TRAIN_SPLITS if n in dirs), None)
    val = next((dirs[n] for n in (*VAL_SPLITS, *(TEST_SPLITS if train else ())) if n in dirs), None)
    return train, val


def holds_classes(folder: Path) -> bool:
    """A folder of folders and no image file of its own: a split's (train/<class>/..., maybe with a README or a
    labels.csv beside them), not a class named `train` (a vehicle data set's), whose images lie in it."""
    try:
        folders = folder.is_dir() and any(p.is_dir() for p in folder.iterdir() if not p.name.startswith("."))
    except OSError:
        return False
    return folders and not holds_images(folder)


def holds_images(folder: Path) -> bool:
    """Whether `folder` holds image files of its own (by suffix; none read)."""
    from PIL import Image

    suffixes = set(Image.registered_extensions())
    try:
        return any(p.suffix.lower() in suffixes and p.is_file() and not p.name.startswith(".") for p in folder.iterdir())
    except OSError:
        return False


def flat_text(folder: Path) -> str:
    """Where the images of a split folder that holds no class folders go."""
    return f" ({folder.name}/ holds images, not class folders: put them in {folder / '<class>'}/)"


def flat_hint(folder: Path) -> str:
    """`flat_text` where the split folder holds image files of its own."""
    return flat_text(folder) if holds_images(folder) else ""
