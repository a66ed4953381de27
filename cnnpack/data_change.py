"""What tells a run's data from the data now: the digests of each split's file names that `Data.summary` records,
and how the data differs from a summary a run recorded (verify, evaluate and `train --resume` say it)."""

from __future__ import annotations

import hashlib
import os


def digest(names: list[str]) -> str:
    return hashlib.sha256("\n".join(sorted(names)).encode("utf-8", "surrogateescape")).hexdigest()


def names_digests(train: list[str], val: list[str]) -> dict[str, str]:
    """The digests of each split's file names, relative to the folder that holds them all: not to `source`, which
    is "shapes" for the built-in data (read from a cache under $HOME) and relative to the folder a command ran in."""
    splits = {k: [os.path.abspath(f) for f in files] for k, files in (("train", train), ("val", val))}
    every = [*splits["train"], *splits["val"]]
    root = os.path.commonpath(every) if every else ""
    if len(every) == 1:  # (the common path of one file is the file)
        root = os.path.dirname(root)
    return {f"{k}_files_sha256": digest([os.path.relpath(f, root) for f in files]) for k, files in splits.items()}


def changed_since(then: dict, now: dict, keys: tuple[str, ...] = ("classes", "train_per_class", "val_per_class")
                  ) -> str | None:
    """How the data differs in `keys` from the summary (`Data.summary`) a run recorded: "2 classes, 66 + 16 images
    then, 2 classes, 67 + 16 images now", or, at the same counts, which split holds other files; None where it does
    not, or where the record lacks a key (an older run's)."""
    if not all(k in then for k in keys):
        return None

    def said(d: dict) -> str:
        counts = " + ".join(str(sum(d[k])) for k in keys if k != "classes") + " images"
        return f"{len(d['classes'])} classes, {counts}" if "classes" in keys else counts

    if any(then[k] != now.get(k) for k in keys):
        return f"{said(then)} then, {said(now)} now"
    names = [k.removesuffix("_per_class") for k in keys if k.endswith("_per_class")]

    def differ(key: str) -> bool:  # (a record made before the key was: not known to differ)
        return bool(a := then.get(key)) and a != now.get(key)

    if other := [n for n in names if differ(f"{n}_files_sha256")]:
        return f"{said(now)} then and now, but other files in {' and '.join(other)} (renamed, moved or replaced)"
    if other := [n for n in names if differ(f"{n}_content_sha256")]:  # a torchvision data set's
        return f"{said(now)} then and now, but other images or labels in {' and '.join(other)}"
    return None
