"""The run directory and its manifest (`cnnpack.json`): how stages hand work to each other.

Every write goes to a temp file in the same folder and is then moved into place with
`os.replace` (cnnpack/atomic.py), so a crash never leaves a half-written manifest, checkpoint or artifact.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import platform
import tempfile
import threading
import uuid
import weakref
from collections.abc import Callable, Iterator
from pathlib import Path

from cnnpack import __version__
from cnnpack.atomic import (  # noqa: F401 - the writes are importable from here too, where they were before
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    owner_gone,
    owner_tag,
    place,
    remove_path,
    sigint_deferred,
    staged_beside,
    swap_dir,
)
from cnnpack.errors import MissingStageError, RunReplaced, UserInputError, shell
from cnnpack.manifest_shape import manifest_problem
from cnnpack.run_replace import MADE as _MADE
from cnnpack.run_replace import MARKER as REPLACING_MARKER
from cnnpack.run_replace import PREFIX as REPLACED_PREFIX
from cnnpack.run_replace import recover

SCHEMA_VERSION = 1
MANIFEST = "cnnpack.json"
LAST = "last.pt"  # training's last finished epoch (what --resume continues)


def sha256(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def artifact_digest(record: dict) -> str:
    """What identifies an artifact's content: its file's sha256, and its weights' where they are a file of their own
    (an OpenVINO IR's .xml is byte-identical for other weights of the same graph: its sha256 alone is not the model).
    `record`: an export artifact (`weights: {path, sha256}`) or what verify says it checked (`weights_sha256`)."""
    weights = record.get("weights")
    weights = weights.get("sha256") if isinstance(weights, dict) else record.get("weights_sha256")
    return record["sha256"] + (f"+{weights}" if weights else "")


def weights_digest(record: dict) -> dict:
    """An export artifact's weights file's digest where it has one (an IR's .bin), as `artifact_digest` reads it in a
    record of what was checked or made from it: {"weights_sha256": ...}, or {}."""
    w = (record.get("weights") or {}).get("sha256")
    return {"weights_sha256": w} if w else {}


def artifact_changed(run: Run, record: dict) -> str | None:
    """None where an export artifact's files (`record`: its manifest record) are the ones recorded; else why not
    (`PATH is missing`, `PATH changed since export`, or since quantize for an int8 one)."""
    made = "quantize" if record.get("precision") == "int8" else "export"
    files = [(record["path"], record["sha256"])]
    if weights := record.get("weights"):  # an OpenVINO IR's .bin
        files.append((weights["path"], weights["sha256"]))
    for rel, digest in files:
        f = run.file(rel)
        if not f.is_file():
            return f"{f} is missing"
        if sha256(f) != digest:
            return f"{f} changed since {made} (its sha256 differs from the manifest's, truncated?)"
    return None


def library_versions() -> dict[str, str]:
    """Versions of the libraries that decide numbers (without importing anything heavy)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for name in ("torch", "torchvision", "onnx", "onnxruntime-gpu", "onnxruntime", "openvino", "nncf", "numpy"):
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def check_makeable(path: str | Path, flag: str = "--run") -> None:
    """Refuses a folder to make that cannot be (it is a file, or a folder above it is) before any work, not when the
    first file is written (after loading the data, in training)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserInputError(f"{flag} {path} is a file, not a folder; choose another {flag}")
    if above := next((p for p in path.parents if p.exists() and not p.is_dir()), None):
        raise UserInputError(f"{flag} {path}: {above} is a file, not a folder; choose another {flag}")


def _set_aside(folder: Path) -> list[tuple[Path, Path]]:
    """(set-aside file, its place) pairs a commit killed mid-way (SIGKILL) left in `folder`: `.<name>.old-<owner>`
    of an owner that is gone (a live commit's are its own)."""
    import re

    out = []
    with contextlib.suppress(OSError):
        for old in folder.glob(".*.old-*"):
            if (m := re.fullmatch(r"\.(.+)\.old-(.+)", old.name)) and owner_gone(old.name, f".{m.group(1)}.old-"):
                out.append((old, folder / m.group(1)))
    return out


def _recorded_digests(obj, out: dict | None = None) -> dict[str, str]:
    """Every `{path, sha256}` the manifest records, path -> sha256."""
    out = {} if out is None else out
    if isinstance(obj, dict):
        if isinstance(obj.get("path"), str) and isinstance(obj.get("sha256"), str):
            out[obj["path"]] = obj["sha256"]
        for v in obj.values():
            _recorded_digests(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _recorded_digests(v, out)
    return out


def identity(manifest: dict) -> tuple:
    """Which run a manifest is: `train --force` writes a new one in the same folder (`created`, and `run_id` where
    the manifest has one: older ones do not)."""
    return manifest.get("created"), manifest.get("run_id")


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


LOCK = ".cnnpack.lock"  # held while the manifest is read, changed and written back
_HELD = threading.local()  # the runs whose lock this thread holds (flock is not reentrant)
_OPENED: weakref.WeakSet = weakref.WeakSet()  # the runs this process opened or created (`replaced_meanwhile`)


def _replaced(path: Path) -> str:
    return (f"{path} was replaced by a new run (trained again with --force) while this command ran on the old one; "
            "nothing was recorded: run the command again")


def _replacing_ids(path: Path) -> set:
    """The run_ids of the replacements under way in the run folder `path` (run_replace's markers)."""
    ids = set()
    for marker in path.glob(f"{REPLACED_PREFIX}*/{REPLACING_MARKER}"):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            ids.add(json.loads(marker.read_text(encoding="utf-8")).get("run_id"))
    return ids


def replaced_meanwhile() -> str | None:
    """The one line to say instead of a command's error where a run it opened was replaced by another process
    meanwhile (`train --force`), or None. A command reading the old run while it is set aside fails on the first
    file gone ("the training did not finish an epoch", a missing export): true of the new run, not the cause."""
    for run in list(_OPENED):
        if run.opened_as is None:
            continue
        try:
            now_as = identity(json.loads(run.manifest_path.read_text(encoding="utf-8")))
        except (OSError, ValueError, AttributeError):  # gone: set aside by a replacement (not its own), or removed
            now_as = None if _replacing_ids(run.path) - _MADE else run.opened_as
        if now_as != run.opened_as and (now_as is None or now_as[1] not in _MADE):
            return _replaced(run.path)
    return None


class Run:
    """A run directory: `path/cnnpack.json` plus the files the stages write beside it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.opened_as: tuple | None = None  # `identity` when `open` read it: a run replaced since is not written to

    # -- creation / opening -------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> Run:
        """Opens an existing run, or raises naming what is missing."""
        run = cls(path)
        if not run.path.exists():
            raise UserInputError(f"no such run directory: {run.path}")
        recover(run.path, run._locked)  # a run a killed replacement set aside: back in place first
        if not run.path.is_dir():
            raise UserInputError(f"--run {run.path} is a file, not a run directory")
        if run.manifest_path.is_dir():
            raise UserInputError(f"{run.manifest_path} is a folder, not a cnnpack manifest; restore the run's "
                                 f"{MANIFEST} or re-create the run")
        if not run.manifest_path.is_file():
            raise UserInputError(
                f"{run.path} is not a cnnpack run (no {MANIFEST}); create one with `cnnpack train`"
            )
        run.opened_as = identity(run.read())  # fail early on a corrupt manifest
        _OPENED.add(run)
        run._recover_set_aside()
        return run

    def _recover_set_aside(self) -> None:
        """What a commit killed mid-way (SIGKILL) left set aside (`_set_aside`), judged by the record under the lock:
        the set-aside file goes back where its place is empty (killed between its two renames: the file was hidden)
        or where it, not the file in its place, is the one the manifest records (killed before the record: the new
        file was never recorded); otherwise it is removed."""
        pairs = [p for folder in (self.path, self.path / "export") for p in _set_aside(folder)]
        if not pairs:
            return
        with contextlib.suppress(OSError), self._locked():
            recorded = _recorded_digests(self.read())

            def is_recorded(root: Path, place: Path) -> bool:  # every recorded file at or under `place`, in `root`
                rel = self.rel(place)
                under = {p: d for p, d in recorded.items() if p == rel or p.startswith(rel + "/")}
                return bool(under) and all((f := root / Path(p).relative_to(rel)).is_file() and sha256(f) == d
                                           for p, d in under.items())

            for old, place in pairs:
                with contextlib.suppress(OSError):
                    if not old.exists():  # another opener put it back
                        continue
                    if place.exists() or place.is_symlink():
                        if not (is_recorded(old, place) and not is_recorded(place, place)):
                            remove_path(old)
                            continue
                        remove_path(place)
                    os.replace(old, place)

    @classmethod
    def create(cls, path: str | Path, model_spec: dict, *, force: bool = False, resume_hint: str = "",
               run_id: str | None = None) -> Run:
        """Creates a run with a fresh manifest (`run_id`: the one a replacement set aside the old run for). Refuses a
        folder that holds another run (the error ends with `resume_hint` where the command can continue it
        instead)."""
        run = cls(path)
        if run.path.exists() and not run.path.is_dir():
            raise UserInputError(f"run path {run.path} is a file, not a directory")
        recover(run.path, run._locked)
        if run.manifest_path.exists() and not force:
            raise UserInputError(
                f"{run.path} already holds a run; pass --force to replace it{resume_hint}"
            )
        if run.path.is_dir() and any(run.path.iterdir()) and not run.manifest_path.exists() and not force:
            raise UserInputError(f"{run.path} is not empty and not a cnnpack run; choose another --run")
        run.path.mkdir(parents=True, exist_ok=True)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "created": now(),
            "run_id": run_id or uuid.uuid4().hex,  # tells apart two runs created in one second (`identity`)
            "tool": {"name": "cnnpack", "version": __version__},
            "libraries": library_versions(),
            "machine": {"platform": platform.platform(), "processor": platform.machine(),
                        "cpu_count": os.cpu_count()},
            "model": model_spec,
            "stages": {},
        }
        with run._locked():  # not between another command's read and write of the run it replaces
            run.write(manifest)
        run.opened_as = identity(manifest)  # its own records are refused too, once another --force replaced it
        _MADE.add(manifest["run_id"])
        _OPENED.add(run)
        return run

    # -- manifest -----------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def read(self) -> dict:
        try:
            data = json.loads(self.manifest_path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise UserInputError(f"cannot read manifest {self.manifest_path}: not UTF-8 text (byte {e.start}); "
                                 "restore it or re-create the run") from None
        except (OSError, json.JSONDecodeError) as e:
            raise UserInputError(f"cannot read manifest {self.manifest_path}: {e}") from None
        if not isinstance(data, dict):
            raise UserInputError(f"{self.manifest_path} holds a JSON {type(data).__name__}, not a cnnpack manifest "
                                 "(an object); restore it or re-create the run")
        version = data.get("schema_version")
        if type(version) is not int:
            raise UserInputError(f"{self.manifest_path} is damaged: `schema_version` is "
                                 f"{'missing' if version is None else repr(version) + ', not an integer'} "
                                 f"(this cnnpack reads {SCHEMA_VERSION}); restore it or re-create the run")
        if version != SCHEMA_VERSION:
            raise UserInputError(f"{self.manifest_path} has schema_version {version}, this cnnpack reads "
                                 f"{SCHEMA_VERSION}")
        if problem := manifest_problem(data):  # the shape the commands read (manifest_shape): one line, no traceback
            raise UserInputError(f"{self.manifest_path} is damaged: {problem}; restore it or re-create the run")
        return data

    def write(self, manifest: dict) -> None:
        atomic_write_json(self.manifest_path, manifest)

    def update(self, fn: Callable[[dict], None]) -> dict:
        """Read-modify-write of the manifest; `fn` mutates the dict in place. Under an exclusive lock of the run, so
        that two commands on one run (a bench while a tune runs) never write over each other's stage."""
        with self._locked():
            manifest = self.read()
            self._check_not_replaced(manifest)
            fn(manifest)
            self.write(manifest)
        return manifest

    def check_not_replaced(self) -> None:
        """Raises RunReplaced (a StageFailed) where the run was replaced since this command opened it (before
        writing files)."""
        if self.opened_as is None:  # nothing held (a pipeline before its first training): nothing to check
            return
        with self._locked():
            self._check_not_replaced()

    def _check_not_replaced(self, manifest: dict | None = None) -> None:
        """Under the lock: refuses to write into a run that `train --force` (or `export --arch --force`) replaced
        since this command opened it. A bench that measured the old model recorded its rows in the new model's
        manifest, under the new checkpoint's digest."""
        if self.opened_as is not None and identity(manifest or self.read()) != self.opened_as:
            raise RunReplaced(_replaced(self.path))

    def check_writable(self, *folders: Path) -> None:
        """Raises OSError (the CLI names the path) where the manifest could not be written now: called before a
        command changes anything outside the run (a model repository) that the manifest must then record. Each of
        `folders` that exists is checked too (where the command writes its outputs: quantize's `export/`), so a
        protected one fails now, not after the work and under a temporary file's name."""
        for folder, named in ((self.path, self.manifest_path), *((Path(f), Path(f)) for f in folders)):
            if folder is not self.path and not folder.is_dir():
                continue
            try:
                fd, tmp = tempfile.mkstemp(prefix=f".{MANIFEST}.", suffix=".tmp", dir=folder)
            except OSError as e:
                raise OSError(e.errno, e.strerror, str(named)) from None
            os.close(fd)
            os.unlink(tmp)

    @contextlib.contextmanager
    def committing(self) -> Iterator[None]:
        """Outputs written and recorded as one step: under the run's lock (another command's write-and-record comes
        before or after, never between), then with Ctrl-C held back until both are done (not while waiting for
        the lock: a Ctrl-C there stops the command)."""
        with self._locked(), sigint_deferred():
            self._check_not_replaced()
            yield

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The run's lock alone (a command that puts things outside the run in place and takes them back itself)."""
        with self._locked():
            yield

    @contextlib.contextmanager
    def staged_outputs(self, *names: str) -> Iterator[dict[str, Path]]:
        """A staged file beside each of the run's files `names` (`staged_beside`), name -> path, for `commit_stage`;
        whatever it did not put in place is removed on the way out (each one as soon as it exists)."""
        staged: dict[str, Path] = {}
        try:
            for n in names:
                staged[n] = staged_beside(self.file(n), suffix=Path(n).suffix)
            yield staged
        finally:
            for f in staged.values():
                f.unlink(missing_ok=True)

    def commit_stage(self, name: str, section: dict, staged: dict[str, Path]) -> dict:
        """`section` as `stages.<name>` (stamped as `set_stage` stamps it, its `outputs` the staged files' digests),
        the staged files put in place with it as one step (`commit`): a file never stands beside another's record."""
        section["outputs"] = {n: {"path": n, "sha256": sha256(f)} for n, f in staged.items()}
        stamped = {"updated": now(), **section}
        return self.commit([(f, self.file(n)) for n, f in staged.items()],
                           lambda m: m.setdefault("stages", {}).__setitem__(name, stamped))

    def commit(self, moves: list[tuple[Path, Path]], record: Callable[[dict], None]) -> dict:
        """Puts each staged file or folder (`moves`: (staged, its place) pairs, beside each other) in place and
        records them (`record`, as `update` takes it) as one step (`committing`). Where the record fails (a disk that
        filled since), what stood there before is put back: a file never stands beside the record of another."""
        for staged, dest in moves:  # what stands in the way would be set aside and removed: a folder of the user's
            if dest.exists() and not dest.is_symlink() and dest.is_dir() != staged.is_dir():
                import errno

                raise (IsADirectoryError(errno.EISDIR, "Is a directory", str(dest)) if dest.is_dir() else
                       NotADirectoryError(errno.ENOTDIR, "Not a directory", str(dest)))
        with self.committing():
            done: list[tuple[Path | None, Path]] = []
            try:
                for staged, dest in moves:
                    old = None
                    if dest.exists():
                        old = dest.with_name(f".{dest.name}.old-{owner_tag()}")
                        os.replace(dest, old)
                    done.append((old, dest))
                    if staged.is_file():
                        place(staged, dest)
                    else:
                        os.replace(staged, dest)
                manifest = self.update(record)
            except BaseException:
                for old, dest in reversed(done):
                    remove_path(dest)
                    if old is not None:
                        os.replace(old, dest)
                raise
            for old, _ in done:
                if old is not None:
                    remove_path(old)
        return manifest

    @contextlib.contextmanager
    def _locked(self):
        """The run's exclusive lock; taken again inside (a record within `committing`), it is already held."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock (the write itself stays atomic)
            yield
            return
        held = _HELD.__dict__.setdefault("runs", set())
        key = self.path.resolve()
        if key in held:
            yield
            return
        with open(self.path / LOCK, "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            held.add(key)
            try:
                yield
            finally:
                held.discard(key)
                fcntl.flock(f, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def only_one(self, command: str) -> Iterator[None]:
        """Held for the whole of a command that must not run twice at once on a run (two tunes each wrote the served
        config.pbtxt from their own sweep, and the one recorded last said another config was served); a second
        one is refused at once. One guard per run, whichever command takes it (tune alone, today)."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no guard
            yield
            return
        fd = os.open(self.path, os.O_RDONLY)  # the run folder itself: nothing written into it for the guard
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserInputError(f"another `cnnpack {command}` is running on {self.path}; wait for it to "
                                     "finish (or stop it), then run this one") from None
            yield
        finally:
            os.close(fd)  # (closing it lets the lock go)

    def set_stage(self, name: str, section: dict) -> dict:
        """Replaces `stages.<name>` with `section` (stamped with the time)."""
        section = {"updated": now(), **section}
        return self.update(lambda m: m.setdefault("stages", {}).__setitem__(name, section))

    def stage(self, name: str, *, required_by: str | None = None, hint: str = "") -> dict:
        """Returns `stages.<name>` or raises MissingStageError saying which command to run first."""
        section = self.read().get("stages", {}).get(name)
        if not section or section.get("status") != "ok":
            hint = hint or f"`cnnpack {name} --run {shell(self.path)}`"
            if required_by:
                raise MissingStageError(f"`cnnpack {required_by}` needs a successful `{name}` stage in {self.path}; "
                                        f"run {hint} first")
            raise MissingStageError(f"{self.path} has no successful `{name}` stage; run {hint} first")
        return section

    @property
    def model_spec(self) -> dict:
        return self.read()["model"]

    @property
    def trained_on(self) -> str | None:
        """The data the run was trained on (its train stage's --data, as recorded), or None: made by
        `cnnpack export --arch`, it has no data of its own."""
        return ((self.read().get("stages", {}).get("train") or {}).get("config") or {}).get("data")

    # -- files --------------------------------------------------------------------------
    def file(self, rel: str | Path) -> Path:
        return self.path / rel

    def rel(self, path: str | Path) -> str:
        return os.path.relpath(Path(path), self.path)

    def file_record(self, path: str | Path) -> dict:
        """`{path (relative), sha256}` for a file in the run."""
        return {"path": self.rel(path), "sha256": sha256(path)}
