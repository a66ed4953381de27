"""A run replaced by another in its folder (`train --force`, a pipeline whose training options changed, `export
--arch ... --force`): the old run's manifest and outputs are set aside in a hidden folder of the run, not deleted,
until the new run holds something of its own (a training: its first kept epoch; `export --arch`: its model). A
failure or a Ctrl-C before that puts them back as they were; where the process was killed before that (SIGKILL, out
of memory), the next command that opens or creates the run puts them back (`recover`).

    <run>/.replaced-<owner>/        the old run's files, while the new one has nothing of its own
    <run>/.replaced-done-<owner>/   the same, renamed once the new run took over, then removed

What is put back is judged by the manifest in the run's folder, not by the folder alone: the old run goes back only
over the run that replaced it, while that one holds nothing of its own. A run another `--force` replaced since (two
at once), or one that kept an epoch before its process was killed, is never overwritten; the folder set aside then
goes. Only what a replacement removes is set aside (the names given, and eval-*.json); a user's own files stay.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from cnnpack.atomic import owner_gone, owner_tag, remove_path, sigint_deferred

PREFIX = ".replaced-"
DONE = ".replaced-done-"
MANIFEST, LAST = "cnnpack.json", "last.pt"  # (rundir's names: rundir imports this module)


def _outputs(run_dir: Path, names: tuple[str, ...]) -> list[Path]:
    return [p for p in [*(run_dir / n for n in names), *sorted(run_dir.glob("eval-*.json"))]
            if p.exists() or p.is_symlink()]


def _identity(manifest: Path) -> tuple | None:
    """The run a manifest is (`rundir.identity`), or None where there is none to read."""
    try:
        m = json.loads(manifest.read_text(encoding="utf-8"))
        return (m.get("created"), m.get("run_id")) if isinstance(m, dict) else None
    except (OSError, ValueError):
        return None


def _holds_its_own(run_dir: Path) -> bool:
    """Whether the run in `run_dir` holds something of its own: a kept epoch (last.pt: the old one's was set aside
    before the new run began), a finished training, or a model (`export --arch`)."""
    if (run_dir / LAST).is_file():
        return True
    try:
        stages = json.loads((run_dir / MANIFEST).read_text(encoding="utf-8")).get("stages") or {}
        return any((stages.get(s) or {}).get("status") == "ok" for s in ("train", "model"))
    except (OSError, ValueError, AttributeError):
        return False


def _at_work(run_dir: Path, own: Path | None = None) -> bool:
    """Whether another replacement of the run is at work (its folder's owner alive)."""
    with contextlib.suppress(OSError):
        return any(p.name.startswith(PREFIX) and not p.name.startswith(DONE) and p != own and p.is_dir()
                   and not owner_gone(p.name, PREFIX) and not p.name.startswith(f"{PREFIX}{owner_tag()}")
                   for p in run_dir.iterdir())
    return False


class Replacing:
    """The old run set aside while a new one is created in its folder (`names`: the files and folders the new run
    writes or a replacement removes, the manifest first). `lock`: the run's lock (held while the files move and the
    manifest is judged)."""

    def __init__(self, run_dir: str | Path, names: tuple[str, ...],
                 lock: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext) -> None:
        self.run_dir, self.names, self.lock = Path(run_dir), names, lock
        self.new: tuple | None = None  # the new run's identity, once created (`created`)
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

    def created(self, identity: tuple | None) -> None:
        """The new run's manifest is written (`identity`: the run it is): only over it does the old one go back."""
        self.new = identity

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

    def put_back(self) -> bool:
        """The new run failed or was interrupted before it held anything of its own: its files go, the old run's come
        back; True where they were. Not over a run another command made since (a second `--force` at once): the
        folder then stays, for `recover` to judge once this process is gone."""
        if self.settled:
            return False
        self.settled = True
        with self.lock(), sigint_deferred():
            current = _identity(self.run_dir / MANIFEST)
            if (current is not None and current != self.new) or _at_work(self.run_dir, self.folder):
                return False
            for name in self.names:  # what the new run wrote that the old one did not have (its manifest at least)
                if not (self.folder / name).exists():
                    with contextlib.suppress(FileNotFoundError):
                        remove_path(self.run_dir / name)
            _put_back(self.run_dir, self.folder)
        return True


def _remove(folder: Path) -> None:
    done = folder.with_name(DONE + folder.name[len(PREFIX):])
    os.replace(folder, done)  # one step: a kill in the removal leaves a folder `recover` removes
    shutil.rmtree(done, ignore_errors=True)


def _put_back(run_dir: Path, folder: Path) -> None:
    """Each set-aside file or folder back in its place (one at a time: a kill part-way leaves the rest to `recover`),
    the manifest last, so a run folder with the old manifest holds every old file; then the empty folder goes."""
    for old in sorted(folder.iterdir(), key=lambda p: p.name == MANIFEST):
        place = run_dir / old.name
        if place.exists() or place.is_symlink():
            remove_path(place)
        os.replace(old, place)
    folder.rmdir()


def recover(run_dir: str | Path) -> None:
    """What a replacement killed part-way left in `run_dir`, judged by the run now in the folder: the old run goes
    back where the one that replaced it holds nothing of its own (or no manifest is there), and is removed where a
    run that is not the old one holds something (an epoch kept before the kill; another `--force` since). Nothing
    is touched while another replacement of the run is at work."""
    run_dir = Path(run_dir)
    try:
        found = sorted(p for p in run_dir.iterdir() if p.name.startswith(PREFIX) and p.is_dir())
    except OSError:
        return
    for folder in found:
        with contextlib.suppress(OSError):
            if folder.name.startswith(DONE):
                if owner_gone(folder.name, DONE):
                    shutil.rmtree(folder, ignore_errors=True)
                continue
            if not owner_gone(folder.name, PREFIX) or _at_work(run_dir, folder):
                continue
            claimed = folder.with_name(f"{PREFIX}{owner_tag()}recovered")  # one opener judges it: two at once
            os.rename(folder, claimed)  # would remove what the other put back (the loser's rename fails)
            current = _identity(run_dir / MANIFEST)
            if current is not None and current != _identity(claimed / MANIFEST) and _holds_its_own(run_dir):
                _remove(claimed)
            else:
                _put_back(run_dir, claimed)
