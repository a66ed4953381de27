"""What tells a run's data from the data now: the digests of each split's file names that `Data.summary` records,
how the data differs from a summary a run recorded (verify, evaluate and `train --resume` say it), and what identifies
the data for the pipeline's train fingerprint (`data_identity`)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


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


def data_identity(data: str, data_root: str | None = None) -> dict:
    """What identifies the training data: the built-in generator's name, or a folder's file listing (a torchvision
    data set's: the root's, where its files lie)."""
    if data.startswith("torchvision:"):  # (files replaced under the same name trained nothing again)
        from cnnpack.data_torchvision import dataset_files, tv_root
        from cnnpack.pipeline_stage import fingerprint

        root = tv_root(data_root).resolve()
        files = {str(p.relative_to(root)): listing(p) if p.is_dir() else listing(p.parent, only=p.name)
                 for p in dataset_files(data.split(":", 1)[1], root)}  # its own: another set's download is no change
        return {"data": data, "root": str(root), "files_sha256": fingerprint(files)}
    path = Path(data)
    if data == "shapes" or not path.exists():
        return {"data": data}
    return {"data": str(path.resolve()), "files_sha256": listing(path)}


def listing(folder: Path, *, ns: bool = True, only: str | None = None) -> str:
    """The fingerprint of a folder's files (`only`: of that one file in it): name, size, and when it was written
    (mtime and ctime in ns: a file replaced by one of its size within the same second, or given its old mtime back
    as `cp -p` and `rsync -t` do, was unseen in whole-second mtimes); through linked folders, hidden files left out,
    as training reads it."""
    from cnnpack.folders import walk_files
    from cnnpack.pipeline_stage import fingerprint

    def when(st):
        return (st.st_mtime_ns, st.st_ctime_ns) if ns else int(st.st_mtime)

    files = [folder / only] if only else [p for p in walk_files(folder) if p.is_file()]
    return fingerprint({"files": sorted((str(p.relative_to(folder)), (st := p.stat()).st_size, when(st))
                                        for p in files)})
