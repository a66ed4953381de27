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

The old run goes back only over the run that replaced it (its run_id) or where no manifest stands; a run another
`--force` made since stays, and the folder goes (unless a replacement is at work in the run: then nothing is
judged). Every judgement is made under the run's lock. Only what a replacement removes is set aside (the names
given, and eval-*.json); a user's own files stay.
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

from cnnpack.atomic import remove_path, sigint_deferred

PREFIX = ".replaced-"
DONE = ".replaced-done-"
OWNER, MARKER, BEGUN = ".owner.lock", ".replacing.json", ".putting-back"
MANIFEST = "cnnpack.json"  # (rundir's name: rundir imports this module)

Lock = Callable[[], contextlib.AbstractContextManager]


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


def _hold(folder: Path, *, wait: bool = False) -> int | None:
    """An fd holding `folder`'s owner lock, or None where its owner (a live process) holds it."""
    import fcntl

    fd = os.open(folder / OWNER, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
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
        self.settled = False
        recover(self.run_dir, lock)
        with lock(), sigint_deferred():  # whole, or not at all: a Ctrl-C here waits
            self.folder = Path(tempfile.mkdtemp(prefix=PREFIX, dir=self.run_dir))
            self.fd = _hold(self.folder)
            try:
                (self.folder / MARKER).write_text(json.dumps({"run_id": self.run_id, "names": list(names)}))
                for p in _outputs(self.run_dir, names):
                    os.replace(p, self.folder / p.name)
            except BaseException:
                _put_back(self.run_dir, self.folder, names)
                self._release()
                raise

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
        """The new run took over (it holds something of its own): the old one is removed."""
        if self.settled:
            return
        self.settled = True
        _remove(self.folder)
        self._release()

    def put_back(self) -> bool:
        """The new run failed or was interrupted before it held anything of its own: its files go, the old run's come
        back; True where they were. Not over a run another command made since (a second `--force` at once): the
        folder then stays, for `recover` to judge once this process lets go of it (the old run goes back if the
        other fails over this one, and is removed if it takes over)."""
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
    """What a replacement whose process is gone left in `run_dir` (its folder's owner lock free), under the run's
    lock: the old run goes back where the run that replaced it (the marker's run_id) or no manifest stands, or where
    a put-back got as far as the manifest; otherwise (another `--force` made a run since) the folder goes. Nothing is
    judged while a replacement of the run is at work (a live owner's folder): what it set aside may be the run this
    one replaced."""
    run_dir = Path(run_dir)
    try:
        found = [p for p in run_dir.iterdir() if p.name.startswith(PREFIX) and p.is_dir()]
    except OSError:
        return
    if not found:
        return
    with lock(), contextlib.ExitStack() as held:
        dead = []
        for folder in sorted(found):
            with contextlib.suppress(FileNotFoundError):  # (another opener took it meanwhile)
                fd = _hold(folder)
                if fd is None:
                    if not folder.name.startswith(DONE):
                        return  # a replacement at work
                    continue
                held.callback(os.close, fd)
                dead.append(folder)
        for folder in dead:
            if folder.name.startswith(DONE):
                shutil.rmtree(folder, ignore_errors=True)
                continue
            try:
                marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                marker = {}
            names = [n for n in marker.get("names", []) if isinstance(n, str)] if isinstance(marker, dict) else []
            current = _run_id(run_dir / MANIFEST)
            if current is None or current == marker.get("run_id") or not (folder / MANIFEST).exists():
                _put_back(run_dir, folder, names)
            else:
                _remove(folder)
