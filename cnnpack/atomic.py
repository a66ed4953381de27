"""Writes that never leave a half-written file: each goes to a scratch file beside its place (named with its owner,
so the next write removes a killed process's) and is renamed over it; Ctrl-C is held back over the steps that
must happen together (`sigint_deferred`)."""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG}


@contextlib.contextmanager
def naming(dest: str | Path) -> Iterator[None]:
    """A failing disk's error (no space, quota, I/O) raised by a write, a flush or an fsync carries no file name:
    within, it is raised again naming `dest`, so the CLI's one line says which output could not be written."""
    try:
        yield
    except OSError as e:
        if e.filename is not None or e.errno not in _DISK_ERRNOS:
            raise
        raise OSError(e.errno, e.strerror, str(dest)) from e


@contextlib.contextmanager
def scratch_beside(dest: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temp path beside `dest` (in its folder, so `place` renames it over `dest`), removed at the end unless
    placed meanwhile. `suffix`: where a library reads the file by its ending (torch's pt2 loader: `.pt2`)."""
    tmp_path = staged_beside(Path(dest), suffix=suffix)
    try:
        with naming(dest):
            yield tmp_path
    finally:
        tmp_path.unlink(missing_ok=True)


def owner_tag() -> str:
    """This process, as the names of its staged files (and serve's scratch folder) carry it: `<where>_<pid>_`, where
    `<where>` hashes the machine's boot (its hostname where there is no /proc) and the pid namespace: a pid means the
    same process only to processes of the same kernel and namespace (a container of another namespace on this host
    sees another process, or none, under it)."""
    return f"{_where()}_{os.getpid()}_"  # the pid at each call: a forked child is another owner


@functools.cache
def _where() -> str:
    import socket
    import zlib

    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        space = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        boot, space = socket.gethostname(), 0
    return f"{zlib.crc32(f'{boot}:{space}'.encode()):08x}"


def _owner_pid(name: str, prefix: str) -> int | None:
    """The pid in `name`'s owner tag where the tag is of this boot and pid namespace (None otherwise: no tag, or one
    whose pid says nothing here)."""
    import re

    m = re.match(rf"{re.escape(prefix)}([0-9a-f]{{8}})_(\d+)_", name)
    return int(m.group(2)) if m is not None and m.group(1) == _where() else None


def tagged_here(name: str, prefix: str) -> bool:
    """Whether `name` carries an owner tag of this boot and pid namespace (whose pid `owner_gone` can judge)."""
    return _owner_pid(name, prefix) is not None


def owner_gone(name: str, prefix: str) -> bool:
    """Whether `name` (`<prefix><owner_tag>...`) is of a process of this host that is gone (SIGKILL, out of memory).
    A live one's is not, nor another host's or pid namespace's (its pid says nothing here), nor a name without a
    tag."""
    pid = _owner_pid(name, prefix)
    if pid is None or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):  # another user's live process; a pid no process can have
        pass
    try:  # a zombie (killed, its parent not yet waiting for it: a container's pid 1 may never) is gone too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def abandoned(path: Path, prefix: str, max_age_s: float = 86400) -> bool:
    """Whether a scratch file or folder named `<prefix><owner_tag>...` is left over: its owner is gone, or, where its
    owner cannot be judged here (another host's on a shared folder, one from before a reboot), it is a day old."""
    if owner_gone(path.name, prefix):
        return True
    import time

    return (not tagged_here(path.name, prefix) and path.name.startswith(prefix)
            and time.time() - path.lstat().st_mtime > max_age_s)


def _remove_dead_owners(dest: Path) -> None:
    """The staged files and folders beside `dest` that are left over (`abandoned`): a SIGKILLed export left a
    partial model.onnx hidden in export/ for good, a rerun's success included."""
    import re
    import shutil

    prefix = f".{dest.name}."  # a staged name's tag follows at once (not `.model.onnx.old-`: commit's)
    siblings: list[Path] = []
    with contextlib.suppress(OSError):
        siblings = list(dest.parent.iterdir())
    for sib in siblings:
        with contextlib.suppress(OSError):  # each on its own: one that went meanwhile stops none of the others
            if not re.match(rf"{re.escape(prefix)}[0-9a-f]{{8}}_\d+_", sib.name) or not abandoned(sib, prefix):
                continue
            if sib.is_dir() and not sib.is_symlink():
                shutil.rmtree(sib, ignore_errors=True)
            else:
                _unlink(sib)


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def staged_beside(dest: Path, *, folder: bool = False, suffix: str = ".staged") -> Path:
    """A new empty file (or folder) beside `dest`, readable by others as the umask allows (mkstemp's 0600 would hide
    a model from a container's other user), for `Run.commit` to put in place; the caller removes it otherwise. Its
    name carries its owner (`owner_tag`): the next one beside `dest` removes those of killed processes."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_owners(dest)
    if folder:
        path = Path(tempfile.mkdtemp(prefix=f".{dest.name}.{owner_tag()}", suffix=suffix, dir=dest.parent))
        os.chmod(path, 0o777 & ~_UMASK)
        return path
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.{owner_tag()}", suffix=suffix, dir=dest.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)
    return Path(tmp)


def place(tmp: Path, dest: str | Path) -> None:
    """Flushes `tmp` to disk and renames it over `dest`."""
    with naming(dest):
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dest)


@contextlib.contextmanager
def atomic_path(dest: str | Path) -> Iterator[Path]:
    """Yields a temp path beside `dest`; on success it replaces `dest`, on error it is removed."""
    with scratch_beside(dest) as tmp:
        yield tmp
        place(tmp, dest)


@contextlib.contextmanager
def sigint_deferred() -> Iterator[None]:
    """Holds back Ctrl-C (SIGINT) while the block runs; a Ctrl-C that came meanwhile is raised right after it.

    A Python-level handler, not the main thread's signal mask: Ctrl-C is sent to the process, and the kernel may
    hand it to any thread that does not block it (a progress bar's refresh thread, started unblocked), which
    Python turns into a KeyboardInterrupt in the main thread mid-block all the same. A Python handler runs in the
    main thread whichever thread received the signal.
    """
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    came: list[int] = []
    # SIGTERM and SIGHUP too where the CLI turned them into an interrupt (a Python handler): the same unwinding
    held = [signal.SIGINT, *(s for s in (signal.SIGTERM, signal.SIGHUP) if callable(signal.getsignal(s)))]
    previous = {s: signal.signal(s, lambda signum, _frame: came.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if came and callable(previous[came[0]]):
        previous[came[0]](came[0], None)  # Python's default SIGINT handler raises KeyboardInterrupt
    elif came and previous[came[0]] == signal.SIG_DFL:
        signal.raise_signal(came[0])  # (an ignored SIGINT stays ignored)


def atomic_write_bytes(dest: str | Path, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(dest: str | Path, text: str) -> None:
    atomic_write_bytes(dest, text.encode("utf-8"))


def remove_path(path: Path) -> None:
    import shutil

    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def swap_dir(new: Path, dest: Path) -> None:
    """Replaces the folder `dest` by `new` (in the same parent): where that fails (or a Ctrl-C comes) the old one is
    put back under its name, and it is removed only after the new one is in place. The old one waits as
    `.<dest>.old-<owner>`: where the process was killed between the two renames, the next swap (`recover_swap`) puts
    it back, or removes it where the new folder got in place."""
    import shutil

    recover_swap(dest)
    if not dest.exists():
        os.replace(new, dest)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-{owner_tag()}", dir=dest.parent))
    old.rmdir()
    with sigint_deferred():
        os.replace(dest, old)
        try:
            os.replace(new, dest)
        except BaseException:
            os.replace(old, dest)  # the previous folder back where its record says it is
            raise
    shutil.rmtree(old, ignore_errors=True)


def recover_swap(dest: Path) -> None:
    """What a `swap_dir` (or its caller's staging, `.<dest>.new-<owner>`) killed part-way left beside `dest`: the old
    folder goes back where no folder stands in its place, and is removed where the new one got in; a stage is
    removed."""
    import glob
    import shutil

    with contextlib.suppress(OSError):
        for sib in sorted(dest.parent.glob(f".{glob.escape(dest.name)}.*")):
            for kind in ("old", "new"):
                prefix = f".{dest.name}.{kind}-"
                if not sib.name.startswith(prefix) or not sib.is_dir() or not owner_gone(sib.name, prefix):
                    continue
                with contextlib.suppress(OSError):
                    if kind == "old" and not (dest.exists() or dest.is_symlink()):
                        os.replace(sib, dest)
                    else:
                        shutil.rmtree(sib, ignore_errors=True)


def atomic_write_json(dest: str | Path, obj: Any) -> None:
    atomic_write_text(dest, json.dumps(obj, indent=2, sort_keys=False) + "\n")
