"""A run replaced by another in its folder (`train --force`, a pipeline whose training options changed, `export
--arch ... --force`): the old run's manifest and outputs are set aside in a hidden folder of the run, not deleted,
until the new run holds something of its own (a training: its first kept epoch; `export --arch`: its model). A
failure or a Ctrl-C before that puts them back as they were; where the process was killed before that (SIGKILL, out
of memory, a container stopped), the next command that opens or creates the run puts them back (`recover`).

    <run>/.replaced-XXXX/           the old run's files while the new one has nothing of its own, with
        .owner.lock                 flock-held by the replacing process for its life: the kernel lets go of it when
                                    the process dies, whatever its host pid or container (no pid is judged)
        .replacing.json             the new run's run_id and the names the replacement set aside or writes
    <run>/.replaced-done-XXXX/      the same, renamed once the new run took over, then removed

One replacement of a run at a time: another `--force` while a folder is set aside is refused. A dead owner's folder
is judged under the run's lock by the run that stands in the run's folder: the old run goes back over the run that
replaced it (the marker's run_id) while that one kept nothing (no last.pt of its own, no model), or where no manifest
stands; it goes where that run kept an epoch. A folder beside any other run is left where it is and named (a
refusal, never a guess). Only what a replacement removes is set aside (the names given, and eval-*.json); a user's
own files stay; and only what the new run wrote after the set-aside completed is removed when the old run goes back.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

from cnnpack.atomic import atomic_write_text, remove_path, sigint_deferred
from cnnpack.errors import UserInputError

PREFIX = ".replaced-"
DONE = ".replaced-done-"
OWNER, MARKER, BEGUN = ".owner.lock", ".replacing.json", ".putting-back"
MANIFEST, LAST = "cnnpack.json", "last.pt"  # (rundir's names: rundir imports this module)

Lock = Callable[[], contextlib.AbstractContextManager]
MADE: set = set()  # the run_ids this process creates (rundir.replaced_meanwhile: not another process's replacement)


def _outputs(run_dir: Path, names: tuple[str, ...]) -> list[Path]:
    return [p for p in [*(run_dir / n for n in names), *sorted(run_dir.glob("eval-*.json"))]
            if p.exists() or p.is_symlink()]


def _run_id(manifest: Path) -> str | None:
    """The run_id of the manifest at `manifest`, or None where there is none to read."""
    try:
        m = json.loads(manifest.read_text(encoding="utf-8"))
        return m.get("run_id") if isinstance(m, dict) else None
    except (OSError, ValueError):
        return None


def _hold(folder: Path) -> int | None:
    """An fd holding `folder`'s owner lock, or None where its owner (a live process) holds it."""
    import fcntl

    fd = os.open(folder / OWNER, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return None
        raise
    return fd


class Replacing:
    """The old run set aside while a new one is created in its folder (`names`: the files and folders the new run
    writes or a replacement removes, the manifest first), under the run's lock (`lock`, held by the caller too).
    Create the new run with `run_id` (Run.create(run_id=...)): only over it does the old one go back."""

    def __init__(self, run_dir: str | Path, names: tuple[str, ...], lock: Lock) -> None:
        self.run_dir, self.names, self.lock = Path(run_dir), names, lock
        self.run_id = uuid.uuid4().hex
        MADE.add(self.run_id)
        self.settled = False
        with lock(), sigint_deferred():  # whole, or not at all: a Ctrl-C here waits
            recover(self.run_dir, lock)
            if pending := sorted(p.name for p in self.run_dir.iterdir() if p.name.startswith(PREFIX)
                                 and not p.name.startswith(DONE) and p.is_dir()):
                raise UserInputError(f"{self.run_dir} is being replaced already: {self.run_dir / pending[0]} holds the "
                                     "run an earlier --force set aside " + (
                                         "and that command is still at work; wait for it to finish"
                                         if _at_work(self.run_dir) else
                                         "(its command is gone, and the run folder now holds another run); move it "
                                         "out (it is that run as it was) or delete it, then run this again"))
            self.folder = Path(tempfile.mkdtemp(prefix=PREFIX, dir=self.run_dir))
            self.fd = _hold(self.folder)
            try:
                self._mark(complete=False)
                for p in _outputs(self.run_dir, names):
                    os.replace(p, self.folder / p.name)
                self._mark(complete=True)  # from here, what stands at `names` in the run folder is the new run's
            except BaseException:
                _put_back(self.run_dir, self.folder, ())  # only what moved goes back; nothing is removed
                self._release()
                raise

    def _mark(self, *, complete: bool) -> None:
        atomic_write_text(self.folder / MARKER, json.dumps({"run_id": self.run_id, "names": list(self.names),
                                                            "complete": complete}))

    def _release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    @contextlib.contextmanager
    def guard(self):
        """Whatever fails inside (before `keep_new`) puts the old run back (`put_back`)."""
        try:
            yield
        except BaseException:
            self.put_back()
            raise

    def keep_new(self) -> None:
        """The new run took over (it holds something of its own): the old one is removed (call it under the run's
        lock, with the write that made the new run's own: a kill between the two leaves a kept epoch `recover`
        sees)."""
        if self.settled:
            return
        self.settled = True
        _remove(self.folder)
        self._release()

    def put_back(self) -> bool:
        """The new run failed or was interrupted before it held anything of its own: its files go, the old run's come
        back; True where they were. Not over a run made since without a set-aside (`Run.create(force=True)` from
        code): the folder then stays where it is, and the next replacement names it."""
        if self.settled:
            return False
        self.settled = True
        try:
            with self.lock(), sigint_deferred():
                if _run_id(self.run_dir / MANIFEST) not in (None, self.run_id):
                    return False
                _put_back(self.run_dir, self.folder, self.names)
            return True
        finally:
            self._release()


def _remove(folder: Path) -> None:
    done = folder.with_name(DONE + folder.name[len(PREFIX):])
    os.replace(folder, done)  # one step: a kill in the removal leaves a folder `recover` removes
    shutil.rmtree(done, ignore_errors=True)


def _put_back(run_dir: Path, folder: Path, names: tuple[str, ...] | list[str]) -> None:
    """What the new run wrote under `names` that the old one did not have goes (before anything moves, then marked
    done: a put-back taken up again never removes what it already put back); each set-aside file or folder goes back
    in its place, the manifest last (a kill part-way leaves the rest to `recover`, which the new run's manifest,
    still in place, sends here again); then the folder goes."""
    if not (folder / BEGUN).exists():
        inside = {p.name for p in folder.iterdir()}
        for name in names:
            if name not in inside and name != MANIFEST:
                with contextlib.suppress(FileNotFoundError):
                    remove_path(run_dir / name)
        (folder / BEGUN).touch()
    for old in sorted(folder.iterdir(), key=lambda p: p.name == MANIFEST):
        if old.name in (OWNER, MARKER, BEGUN):
            continue
        place = run_dir / old.name
        if (place.is_dir() and not place.is_symlink()) or (old.is_dir() and (place.exists() or place.is_symlink())):
            remove_path(place)  # (a file over a file is replaced in one step: the manifest is never missing)
        os.replace(old, place)
    shutil.rmtree(folder, ignore_errors=True)  # its marker and lock file


def recover(run_dir: str | Path, lock: Lock) -> None:
    """What a replacement whose process is gone left in `run_dir` (its folder's owner lock free), judged under the
    run's lock by the run that stands there (`_settle`; the module's docstring has the rules). A live owner's folder
    is its own business."""
    run_dir = Path(run_dir)
    try:
        found = [p for p in run_dir.iterdir() if p.name.startswith(PREFIX) and p.is_dir()]
    except OSError:
        return
    if not found:
        return
    with contextlib.suppress(OSError):  # a folder this user cannot write (a read-only copy): left as it is, read as it is
        _judge(run_dir, found, lock)


def _at_work(run_dir: Path) -> bool:
    """Whether a live process holds the owner lock of a folder set aside in `run_dir`."""
    for folder in run_dir.iterdir():
        if folder.name.startswith(PREFIX) and folder.is_dir():
            with contextlib.suppress(FileNotFoundError):
                fd = _hold(folder)
                if fd is None:
                    return True
                os.close(fd)
    return False


def _kept_its_own(run_dir: Path) -> bool:
    """Whether the run in `run_dir` that a completed set-aside made way for kept something: a last.pt (the old one's
    was set aside), or a model (`export --arch`)."""
    if (run_dir / LAST).is_file():
        return True
    try:
        stages = json.loads((run_dir / MANIFEST).read_text(encoding="utf-8")).get("stages") or {}
        return (stages.get("model") or {}).get("status") == "ok"
    except (OSError, ValueError, AttributeError):
        return False


def _judge(run_dir: Path, found: list[Path], lock: Lock) -> None:
    with lock():
        for folder in sorted(found):
            with contextlib.suppress(FileNotFoundError):  # (another opener took it meanwhile)
                fd = _hold(folder)
                if fd is None:
                    continue  # its owner is at work
                try:
                    _settle(run_dir, folder)
                finally:
                    os.close(fd)


def _settle(run_dir: Path, folder: Path) -> None:
    """A dead owner's folder, judged by the run that stands in the run folder (see the module's docstring)."""
    if folder.name.startswith(DONE):
        shutil.rmtree(folder, ignore_errors=True)
        return
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        marker = {}
    marker = marker if isinstance(marker, dict) else {}
    complete = marker.get("complete") is True
    names = [n for n in marker.get("names", []) if isinstance(n, str)] if complete else []
    current = _run_id(run_dir / MANIFEST)
    if (folder / BEGUN).exists() or not complete or current is None or not (folder / MANIFEST).exists():
        _put_back(run_dir, folder, names)  # a put-back to finish; a set-aside cut short; nothing else stands
    elif current == marker.get("run_id"):
        if _kept_its_own(run_dir):
            _remove(folder)  # killed between the first kept epoch and the removal: the new run took over
        else:
            _put_back(run_dir, folder, names)
    # else: beside another run (made without a set-aside): left where it is; a replacement names it
