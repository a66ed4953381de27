"""Listing the files under a folder the way a user who links folders into a dataset expects."""

from __future__ import annotations

import os
from pathlib import Path

# folders file systems, NAS boxes and archivers make beside a user's own: never classes, never images of one (a Mac's
# zip holds __MACOSX/<the same tree>/._<file>; a Synology share holds @eaDir/<image>/SYNOFILE_THUMB_*.jpg thumbnails,
# which were read as more images of each class, on both sides of the split)
SYSTEM_FOLDERS = frozenset({"__MACOSX", "@eaDir", "#recycle", "#snapshot", "$RECYCLE.BIN", "System Volume Information",
                            "lost+found"})


def walk_files(folder: Path, *, hidden: bool = False) -> list[Path]:
    """Every file under `folder`, sorted, following linked folders (each real folder once, so a link loop ends, and
    none that holds `folder`: a link up, `ln -s .. a/up`, read the other classes' images as this one's);
    a dangling link is listed too (reading it says what is wrong), and a folder that cannot be listed raises its
    OSError. Without `hidden`, nothing whose name, or a folder's on the way, starts with '.' (`.ipynb_checkpoints`
    copies would be images twice); nothing in `SYSTEM_FOLDERS` either way."""
    out, seen = [], set()
    root = os.path.realpath(folder)
    for top, dirs, files in os.walk(folder, followlinks=True, onerror=_unreadable):
        real = os.path.realpath(top)
        if real in seen or (real != root and root.startswith(real.rstrip(os.sep) + os.sep)):  # a link up: `ln -s ..`
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = [d for d in dirs if d not in SYSTEM_FOLDERS and (hidden or not d.startswith("."))]
        for name in files:
            path = Path(top) / name
            if (hidden or not name.startswith(".")) and (path.is_file() or path.is_symlink()):
                out.append(path)
    return sorted(out)


def _unreadable(e: OSError) -> None:
    """A folder that cannot be listed (no permission) is an error naming it: skipped, its images would be missing
    without a word, or its class said to have no files."""
    raise e
