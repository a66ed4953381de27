"""Listing the files under a folder the way a user who links folders into a dataset expects."""

from __future__ import annotations

import os
from pathlib import Path


def walk_files(folder: Path, *, hidden: bool = False) -> list[Path]:
    """Every file under `folder`, sorted, following linked folders (each real folder once, so a link loop ends, and
    none that holds `folder`: a link up, `ln -s .. a/up`, read the other classes' images as this one's);
    a dangling link is listed too (reading it says what is wrong), and a folder that cannot be listed raises its
    OSError. Without `hidden`, nothing whose name, or a folder's on the way, starts with '.' (`.ipynb_checkpoints`
    copies would be images twice)."""
    out, seen = [], set()
    root = os.path.realpath(folder)
    for top, dirs, files in os.walk(folder, followlinks=True, onerror=_unreadable):
        real = os.path.realpath(top)
        if real in seen or (real != root and root.startswith(real.rstrip(os.sep) + os.sep)):  # a link up: `ln -s ..`
            dirs[:] = []
            continue
        seen.add(real)
        if not hidden:
            dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            path = Path(top) / name
            if (hidden or not name.startswith(".")) and (path.is_file() or path.is_symlink()):
                out.append(path)
    return sorted(out)


def _unreadable(e: OSError) -> None:
    """A folder that cannot be listed (no permission) is an error naming it: skipped, its images would be missing
    without a word, or its class said to have no files."""
    raise e
