"""One model folder of a Triton repository: its identity, its versions, and their atomic publication.

- A new artifact becomes version max+1; an existing version folder is never modified. If the
  latest version already holds byte-identical files, no version is added (config.pbtxt and
  labels.txt are still brought up to date).
- A new version is built in a hidden folder inside the model folder (Triton ignores folders
  whose names are not numbers) and renamed into place; a new model is built beside the
  repository and renamed into it, so Triton never sees half a model. (A hidden folder at the
  repository root would not do: Triton tries to load it as a model and fails to start.)
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from cnnpack import __version__
from cnnpack.atomic import abandoned, atomic_write_bytes, owner_tag
from cnnpack.errors import StageFailed, UserInputError, shell
from cnnpack.rundir import now, sha256
from cnnpack.triton_config import CPU_CONFIG, GPU_CONFIG, PREPROCESS, check_name

PREVIOUS = "config.pbtxt.prev"  # the config.pbtxt that `cnnpack tune` replaced, kept for `tune --undo`

SIDECAR = "cnnpack-model.json"
STAGING_PREFIX = ".cnnpack-staging-"


def model_dir(root: Path, name: str) -> Path:
    """`root/name`, refusing anything that resolves outside the repository (e.g. a symlink)."""
    path = root / check_name(name)
    if path.resolve().parent != root.resolve():
        raise UserInputError(f"{path} resolves to {path.resolve()}, outside the repository {root}")
    if path.exists() and not path.is_dir():
        raise UserInputError(f"{path} is a file, not a model folder; remove it or choose another --name")
    return path


@dataclass
class Draft:
    """Everything one model folder should hold after this run."""

    name: str
    identity: dict  # what makes it "the same model": a different identity needs --force
    top: dict[str, bytes]  # config.pbtxt, labels.txt
    version: dict[str, Path | bytes]  # files of a new version folder (may be empty: ensembles)
    source: dict = field(default_factory=dict)  # provenance recorded per version


@dataclass
class Published:
    name: str
    version: int
    created: bool  # False: the latest version already held these files
    replaced: bool = False  # --force replaced a different model of that name
    set_aside: Path | None = None  # --force: the replaced model's versions and files, until the publish is recorded


def _digest(src: Path | bytes) -> str:
    if isinstance(src, bytes):
        import hashlib

        return hashlib.sha256(src).hexdigest()
    return sha256(src)


def versions(folder: Path) -> list[int]:
    """Numeric version folders, ascending (what Triton counts as versions)."""
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def latest_from(folder: Path) -> str | None:
    """The run (resolved path) whose model the latest version of a model folder is (Triton serves that one), as its
    cnnpack-model.json records; None where it records none."""
    latest = max(versions(folder), default=None)
    found = ((read_sidecar(folder) or {}).get("versions") or {}).get(str(latest))
    return str(found["run"]) if isinstance(found, dict) and found.get("run") else None


def stray_folders(repository: Path) -> list[str]:
    """The visible folders of `repository` Triton cannot load as models (no config.pbtxt, no numeric version folder):
    Triton polls them, reports them only in its log and is never ready, so `cnnpack serve` refuses such a repository
    and `cnnpack triton` and the pipeline refuse to lay models out into one."""
    if not repository.is_dir():
        return []
    return sorted(p.name for p in repository.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and not ((p / "config.pbtxt").is_file() or any(c.is_dir() and c.name.isdigit() for c in p.iterdir())))


def read_sidecar(folder: Path) -> dict | None:
    """The model folder's cnnpack-model.json, or None where it is missing or not a JSON object with an identity."""
    with contextlib.suppress(OSError, ValueError):  # ValueError: not UTF-8, not JSON
        side = json.loads((folder / SIDECAR).read_text(encoding="utf-8"))
        if isinstance(side, dict) and isinstance(side.get("identity", {}), dict):
            return side
    return None


def conflict(folder: Path, draft: Draft) -> str | None:
    """Why `folder` holds a different model than `draft` (None: same model, or nothing there)."""
    if not folder.exists() or not any(p for p in folder.iterdir() if not p.name.startswith(STAGING_PREFIX)):
        return None
    side = read_sidecar(folder)
    if side is None:
        return "it was not made by cnnpack (no readable " + SIDECAR + ")"
    old, new = side.get("identity", {}), json.loads(json.dumps(draft.identity))  # tuples -> lists, as stored
    diff = sorted(_SAID.get(k, k) for k in set(old) | set(new) if old.get(k) != new.get(k))
    return f"it holds a different model ({', '.join(diff)} {'differs' if len(diff) == 1 else 'differ'})" if diff else None


# the identity's keys as a user reads them: "for" and "kind" are the sidecar's own words
_SAID = {"kind": "kind of model (classifier, preprocess, ensemble)", "for": "model it is part of",
         "input_kind": "input kind"}


def same_as_latest(folder: Path, files: dict[str, Path | bytes]) -> int | None:
    """The latest version if it holds exactly `files` (byte-identical), else None."""
    vs = versions(folder)
    return vs[-1] if vs and _holds(folder / str(vs[-1]), files) else None


def _holds(version: Path, files: dict[str, Path | bytes]) -> bool:
    # not the __pycache__ Python's import writes beside a served model.py (the preprocess model): a version served once
    # would otherwise differ from its own files, and each `cnnpack triton` after a serve added a copy of it
    if {p.name for p in version.iterdir()} - {"__pycache__"} != set(files):
        return False
    return all((version / n).is_file() and sha256(version / n) == _digest(src) for n, src in files.items())


def _fill_version(dest: Path, files: dict[str, Path | bytes]) -> None:
    dest.mkdir(parents=True)
    for n, src in files.items():
        if isinstance(src, bytes):
            (dest / n).write_bytes(src)
        else:
            shutil.copyfile(src, dest / n)
        with open(dest / n, "rb") as f:
            os.fsync(f.fileno())


def _sidecar(draft: Draft, old: dict | None, version: int | None) -> bytes:
    hist = dict((old or {}).get("versions", {}))
    if version is not None:
        hist[str(version)] = {"created": now(), "cnnpack_version": __version__,
                              "files": {n: _digest(s) for n, s in draft.version.items()}, **draft.source}
    return (json.dumps({"name": draft.name, "identity": draft.identity, "versions": hist}, indent=2) + "\n").encode()


def _same_device_parent(root: Path) -> Path | None:
    """The repository's parent when a new model can be built there and renamed in, else None."""
    parent = root.resolve().parent
    with contextlib.suppress(OSError):
        if os.stat(parent).st_dev == os.stat(root).st_dev and os.access(parent, os.W_OK):
            return parent
    return None


def publish(root: Path, draft: Draft, *, force: bool) -> Published:
    """Writes `draft` into `root/<name>`: a new version (or none if unchanged), never touching old ones."""
    folder = model_dir(root, draft.name)
    remove_abandoned(folder)
    replace = conflict(folder, draft) is not None  # checked (and refused without --force) by the caller
    if not replace and folder.is_dir() and (v := same_as_latest(folder, draft.version)):
        _write_top(folder, draft.top)  # same artifact: bring config/labels up to date, no new version
        return Published(draft.name, v, created=False)
    version = max(versions(folder), default=0) + 1
    root.mkdir(parents=True, exist_ok=True)
    stage_root = _same_device_parent(root) if not folder.exists() else None
    if stage_root is not None:
        remove_abandoned(stage_root)
    if stage_root is not None:
        return _publish_new(root, folder, draft, stage_root)
    return _publish_version(folder, draft, version, replace=replace and force)


def remove_abandoned(place: Path) -> None:
    """The staging folders a layout killed part-way (SIGKILL) left in `place` (a model folder, or beside the
    repository): a version it had not put in place, or the versions of a model `--force` replaced, which it had put
    its new version in place of. Triton never sees them, but they stayed for good."""
    with contextlib.suppress(OSError):
        for p in place.iterdir():
            if p.name.startswith(STAGING_PREFIX) and p.is_dir() and not p.is_symlink() \
                    and abandoned(p, STAGING_PREFIX):
                shutil.rmtree(p, ignore_errors=True)


def _write_top(folder: Path, top: dict[str, bytes]) -> None:
    for n, data in top.items():
        path = folder / n
        if not path.is_file() or path.read_bytes() != data:
            atomic_write_bytes(path, data)


def _publish_new(root: Path, folder: Path, draft: Draft, stage_root: Path) -> Published:
    """A model that does not exist yet: built completely beside the repository, renamed in."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{owner_tag()}", dir=stage_root))
    try:
        built = tmp / draft.name
        _fill_version(built / "1", draft.version)
        for n, data in {**draft.top, SIDECAR: _sidecar(draft, None, 1)}.items():
            (built / n).write_bytes(data)
        os.rename(built, folder)
    except OSError as e:
        raise StageFailed(f"could not create {folder}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Published(draft.name, 1, created=True)


def _publish_version(folder: Path, draft: Draft, version: int, *, replace: bool) -> Published:
    """A new version of an existing model: built in a hidden folder inside it, renamed to `<version>`. With `replace`
    (--force over a different model), the old model's versions and the files other commands left for it are set
    aside in a hidden folder (`Published.set_aside`): the caller removes it once the publish is recorded, or puts it
    back (`put_back`). A publish that fails part way takes its own version back; its caller, config.pbtxt."""
    old_versions = versions(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{owner_tag()}", dir=folder))  # not a number: Triton ignores it
    aside, placed = None, False
    try:
        _fill_version(tmp / str(version), draft.version)
        _write_top(folder, draft.top)  # same identity: config/labels fit the old versions too
        os.rename(tmp / str(version), folder / str(version))
        placed = True
        if replace:  # --force over a different model: its versions do not fit the new config, nor do the configs
            aside = Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{owner_tag()}", dir=folder))  # other commands left for it
            _set_aside(folder, old_versions, aside)
        _write_top(folder, {SIDECAR: _sidecar(draft, None if replace else read_sidecar(folder), version)})
    except BaseException as e:  # an OSError, a Ctrl-C: Triton would serve a version the manifest never records
        if placed:
            shutil.rmtree(folder / str(version), ignore_errors=True)
        if aside is not None:
            put_back(folder, aside)
        if isinstance(e, OSError) and e.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise StageFailed(f"{folder / str(version)} appeared while cnnpack was writing it; re-run") from None
        if isinstance(e, OSError):
            raise StageFailed(f"could not write {folder / str(version)}: {e}") from None
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return Published(draft.name, version, created=True, replaced=replace, set_aside=aside)


_ASIDE_FILES = (f"configs/{GPU_CONFIG}.pbtxt", f"configs/{CPU_CONFIG}.pbtxt", PREVIOUS)  # deploy's, tune's undo


def _set_aside(folder: Path, old_versions: list[int], aside: Path) -> None:
    """Moves the replaced model's versions and the files other commands left for it into `aside` (renames: no copy,
    nothing lost on a full disk). Its `configs/` folder stays (putting back needs no new folder); `cleared` removes it
    once the publish is recorded, if that was all it held."""
    for v in old_versions:
        os.rename(folder / str(v), aside / str(v))
    for rel in _ASIDE_FILES:
        if (folder / rel).is_file():
            (aside / rel).parent.mkdir(parents=True, exist_ok=True)
            os.rename(folder / rel, aside / rel)


def cleared(aside: Path) -> None:
    """The publish that set `aside` apart is recorded: the replaced model goes, and its empty `configs/` folder."""
    shutil.rmtree(aside, ignore_errors=True)
    with contextlib.suppress(OSError):  # only if that was all it held (a config of the user's own stays)
        (aside.parent / "configs").rmdir()


def put_back(folder: Path, aside: Path) -> None:
    """Undoes `_set_aside`: the replaced model's versions and files back in their places. It does what it can and
    never raises (it runs while another error is on its way out): what could not go back stays in `aside`, named
    on stderr."""
    failed = []
    moves = [(p, folder / p.name) for p in sorted(aside.iterdir()) if p.is_dir() and p.name.isdigit()]
    moves += [(aside / rel, folder / rel) for rel in _ASIDE_FILES if (aside / rel).is_file()]
    for src, dest in moves:
        try:
            os.rename(src, dest)
        except OSError as e:
            failed.append(f"{dest.relative_to(folder)} ({e.strerror or e})")
    if failed:
        sys.stderr.write(f"warning: could not put back {', '.join(failed)} of the model --force replaced; "
                         f"they are in {aside}\n")
    else:
        shutil.rmtree(aside, ignore_errors=True)


def preprocess_source() -> bytes:
    """The shipped Python-backend preprocessing model (a package file, not generated code)."""
    return (resources.files("cnnpack") / "backends" / "preprocess" / "model.py").read_bytes()


def stale_preprocessing(repo: str | Path, served: list[tuple[str, str]], run: Path | None = None) -> list[str]:
    """A note for each served preprocessing model (of the (name, version) pairs) whose model.py is not the one this
    cnnpack ships: laid out by another version of cnnpack (or edited since). A layout copies the file, so a repository
    keeps the preprocessing it was laid out with until `cnnpack triton` lays its model out again (a new version). The
    command named lays it out from `run`, or else from the run that laid out its classifier's latest version."""
    shipped, notes, repo = preprocess_source(), [], Path(repo)
    for name, version in served:
        try:
            if not name.endswith(PREPROCESS) or (repo / name / version / "model.py").read_bytes() == shipped:
                continue
        except OSError:
            continue  # not there or unreadable: the server said what it could not load
        classifier = ((read_sidecar(repo / name) or {}).get("identity") or {}).get("for") or name[:-len(PREPROCESS)]
        src = str(run) if run else latest_from(repo / classifier)
        fmt = ((read_sidecar(repo / classifier) or {}).get("identity") or {}).get("format")
        how = (f"`cnnpack triton --run {shell(src)} --repository {shell(repo)} --name {shell(classifier)}"
               + (f" --format {fmt}" if fmt else "") + " --ensemble`") if isinstance(src, str) else \
            f"`cnnpack triton --ensemble` from the run {classifier} came from"
        notes.append(f"{name} v{version} runs the image preprocessing of another cnnpack version (its model.py is not "
                     f"this one's); {how} lays out the current one as a new version")
    return notes
