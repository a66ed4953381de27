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


def mapped_regions(maps_files) -> set[Path]:
    """The shared-memory regions the processes of `maps_files` (/proc/PID/maps) map."""
    found = set()
    for maps in maps_files:
        with contextlib.suppress(OSError):
            for line in Path(maps).read_text().splitlines():
                path = line.split(None, 5)[5:]
                if path and path[0].startswith(SHM_PREFIX):
                    found.add(Path(path[0].removesuffix(" (deleted)")))
    return found


def unmapped_regions(since: float, settle_s: float = 0.5) -> set[Path]:
    """This user's regions made since `since` (a server's start) that no process maps: what a server stopped while it
    loaded a model leaves (its backend made the region after the stop had listed the server's, and the server did
    not remove it: 1 MiB a model instance, for good). A region a killed stub still maps is waited for, `settle_s` at
    most; another server's (mapped) is never taken."""
    shm = Path(SHM_PREFIX).parent
    deadline = time.monotonic() + settle_s
    while True:
        fresh = set()
        with contextlib.suppress(OSError):
            for region in shm.glob(f"{Path(SHM_PREFIX).name}*"):
                with contextlib.suppress(OSError):
                    st = region.lstat()
                    if (_REGION.fullmatch(region.name) and stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid()
                            and max(st.st_mtime, st.st_ctime) >= since):
                        fresh.add(region)
        held = fresh & mapped_regions(Path("/proc").glob("[0-9]*/maps")) if fresh else set()
        if not held or time.monotonic() > deadline:
            return fresh - held
        time.sleep(0.05)


def remove_regions(regions: set[Path]) -> None:
    """Unlinks each of this user's regular files among `regions` (a mapped one stays in memory while mapped)."""
    for region in regions:
        with contextlib.suppress(OSError):
            st = region.lstat()
            if stat.S_ISREG(st.st_mode) and st.st_uid == os.getuid():
                region.unlink()
