"""A run replaced by another in its folder (`train --force`, a pipeline whose training options changed, `export
--arch ... --force`): the old run's manifest and outputs are set aside in a hidden folder of the run, not deleted,
until the new run holds something of its own (a training: its first kept epoch). A failure or a Ctrl-C before that
puts them back as they were; where the process was killed before that (SIGKILL, out of memory), the next command
that opens or creates the run puts them back (`recover`).

    <run>/.replaced-<owner>/        the old run's files, while the new one has nothing of its own
    <run>/.replaced-done-<owner>/   the same, renamed once the new run took over, then removed

Only what a replacement removes is set aside (the names given, and eval-*.json); a user's own files stay.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from cnnpack.atomic import owner_gone, owner_tag, remove_path, sigint_deferred

PREFIX = ".replaced-"
DONE = ".replaced-done-"


def _outputs(run_dir: Path, names: tuple[str, ...]) -> list[Path]:
    return [p for p in [*(run_dir / n for n in names), *sorted(run_dir.glob("eval-*.json"))]
            if p.exists() or p.is_symlink()]


class Replacing:
    """The old run set aside while a new one is created in its folder (`names`: the files and folders the new run
    writes or a replacement removes, the manifest first)."""

    def __init__(self, run_dir: str | Path, names: tuple[str, ...]) -> None:
        self.run_dir, self.names = Path(run_dir), names
        recover(self.run_dir)
        self.folder = self.run_dir / f"{PREFIX}{owner_tag()}"
        self.settled = False
        with sigint_deferred():  # whole, or not at all: a Ctrl-C here waits
            self.folder.mkdir()
            try:
                for p in _outputs(self.run_dir, names):
                    os.replace(p, self.folder / p.name)
            except BaseException:
                _put_back(self.run_dir, self.folder)
                raise

    @contextlib.contextmanager
    def guard(self):
        """Whatever fails inside (before `keep_new`) puts the old run back."""
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
        done = self.folder.with_name(DONE + self.folder.name[len(PREFIX):])
        os.replace(self.folder, done)  # one step: a kill in the removal leaves a folder `recover` removes
        shutil.rmtree(done, ignore_errors=True)

    def put_back(self) -> bool:
        """The new run failed or was interrupted before it held anything of its own: its files go, the old run's come
        back. True where they were put back (False: settled before)."""
        if self.settled:
            return False
        self.settled = True
        with sigint_deferred():
            for name in self.names:  # what the new run wrote that the old one did not have (its manifest at least)
                if not (self.folder / name).exists():
                    with contextlib.suppress(FileNotFoundError):
                        remove_path(self.run_dir / name)
            _put_back(self.run_dir, self.folder)
        return True


def _put_back(run_dir: Path, folder: Path) -> None:
    """Each set-aside file or folder back in its place (one at a time: a kill part-way leaves the rest to `recover`),
    the manifest last, so a run folder with the old manifest holds every old file; then the empty folder goes."""
    items = sorted(folder.iterdir(), key=lambda p: p.name == "cnnpack.json")
    for old in items:
        place = run_dir / old.name
        if place.exists() or place.is_symlink():
            remove_path(place)
        os.replace(old, place)
    folder.rmdir()


def recover(run_dir: str | Path) -> None:
    """What a replacement killed part-way left in `run_dir`: the old run set aside by a process that is gone goes back
    (the new run never held anything of its own: it would have removed it), and a removal it did not finish is done."""
    run_dir = Path(run_dir)
    try:
        found = [p for p in run_dir.iterdir() if p.name.startswith(PREFIX) and p.is_dir()]
    except OSError:
        return
    for folder in found:
        with contextlib.suppress(OSError):
            if folder.name.startswith(DONE):
                if owner_gone(folder.name, DONE):
                    shutil.rmtree(folder, ignore_errors=True)
            elif owner_gone(folder.name, PREFIX):
                claimed = folder.with_name(f"{PREFIX}{owner_tag()}recovered")  # one opener puts it back: two at
                os.rename(folder, claimed)  # once would remove what the other had put back (the loser's rename fails)
                _put_back(run_dir, claimed)
