"""What a killed `cnnpack serve` leaves behind, removed by the next: its scratch folder in the temp folder, and its
Triton server's shared memory (the Python-based backends' regions, files in /dev/shm, that is memory, 1 MiB or more a
model), listed in that folder when the server started."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
import time
from pathlib import Path

from cnnpack.atomic import owner_gone

SCRATCH_PREFIX = "cnnpack-serve-"
SHM_PREFIX = "/dev/shm/triton_"  # the Python-based backends' shared memory (triton_<backend>_shm_region_<uuid>)
SHM_LIST = "shm-regions"  # in the scratch folder: the server's regions, for the next serve where it was killed


def remove_dead_scratch() -> None:
    """The scratch folders (backends, the log) of `cnnpack serve`s that were killed (SIGKILL): not removed by them,
    they stayed in the temp folder for good, and so did their server's shared memory (listed in the folder). Their
    server may outlive them a little: only those an hour old go."""
    root = Path(tempfile.gettempdir())
    with contextlib.suppress(OSError):
        for folder in root.glob(f"{SCRATCH_PREFIX}*"):
            with contextlib.suppress(OSError):
                st = folder.lstat()
                if (owner_gone(folder.name, SCRATCH_PREFIX) and time.time() - st.st_mtime > 3600
                        and st.st_uid == os.getuid()):  # (another user's folder in /tmp: not ours to act on)
                    remove_regions(listed_regions(folder))  # its server's shared memory, left by a kill
                    shutil.rmtree(folder, ignore_errors=True)


_REGION = re.compile(r"triton_[A-Za-z0-9]+_shm_region_[0-9a-f-]+")


def listed_regions(folder: Path) -> set[Path]:
    """The shared-memory files a scratch folder's list names: only files of Triton's naming right in /dev/shm (a
    tampered list naming `/dev/shm/triton_x/../../home/...` or a linked folder reaches nothing)."""
    try:
        lines = (folder / SHM_LIST).read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return set()
    shm = Path(SHM_PREFIX).parent
    return {shm / p.name for p in map(Path, lines) if p.parent == shm and _REGION.fullmatch(p.name)}


def remove_regions(regions: set[Path]) -> None:
    """Unlinks each of this user's regular files among `regions` (a mapped one stays in memory while mapped)."""
    for region in regions:
        with contextlib.suppress(OSError):
            st = region.lstat()
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid():
                region.unlink()
