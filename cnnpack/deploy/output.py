"""Writing the deployment folder: YAML from data, the Dockerfile, and the whole folder replaced at once.

The folder is built beside `--out` and renamed into place; an existing deployment is moved aside
first and removed only once the new one is in place, so a failure leaves the old files as they were.
Files in it that the earlier deployment did not write (an overlay of the user's own, notes), and files it wrote that
were edited since (the marker keeps each one's sha256), are carried over; one where the new deployment writes a file
is refused unless `--force`. `cnnpack-deploy.json` at its root says which run and name it deploys: a different one is refused
unless `--force`. A folder that holds this very deployment is not written at all; version control metadata (`.git`)
is carried into each rewrite as hard links.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from cnnpack.atomic import naming, owner_tag, recover_swap, swap_dir
from cnnpack.errors import UserInputError
from cnnpack.rundir import check_makeable

IDENTITY = "cnnpack-deploy.json"
# version control's own metadata (a GitOps checkout as --out, a `.git` file of a worktree or submodule): not a file of
# the user's to list, nor the deployment's; carried into each rewrite as it is
VCS = (".git", ".hg", ".svn")
# what a marker says about the write that made it, not about the deployment: a rewrite of the same one is none
PER_WRITE = ("replaced", "removed", "kept", "overwritten")


def dump(obj: dict, header: str = "") -> str:
    import yaml

    class Plain(yaml.SafeDumper):  # a dict used twice is written out twice, not as an anchor and an alias (&id001)
        def ignore_aliases(self, data):
            return True

    text = yaml.dump(obj, Dumper=Plain, sort_keys=False, default_flow_style=False,
                     width=1 << 16)  # long queries on one line
    return "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + text


def check_out(out: Path, identity: dict, *, force: bool, named: str = "") -> list[str] | None:
    """Refuses an --out that holds something else than this deployment (nothing is written); returns the files of
    the deployment it will replace (None: nothing to replace). `named`: where this deployment's name comes from."""
    check_makeable(out, "--out")
    recover_swap(out)  # a deployment a deploy killed mid-swap hid (with the user's files in it): back first
    if not out.is_dir() or all(p.name in VCS for p in out.iterdir()):  # (a checkout with nothing in it yet)
        return None
    marker = out / IDENTITY
    if not marker.is_file():  # not even --force: the whole folder is replaced, and it may be a run or a repository
        raise UserInputError(f"--out {out} is not empty and holds no cnnpack deployment; choose a new or empty folder")
    try:
        old = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # ValueError: not UTF-8, not JSON
        old = None
    if not (isinstance(old, dict) and isinstance(old.get("files", []), list)
            and all(isinstance(f, str) for f in old.get("files", []))):
        if force:
            return []
        raise UserInputError(f"--out {out}: {marker} is unreadable; pass --force to replace the folder")
    same = {k: old.get(k) for k in ("run", "name")} == {k: identity[k] for k in ("run", "name")}
    if not same and not force:
        if old.get("run") == identity["run"] and isinstance(old.get("name"), str):
            raise UserInputError(renamed(out, old, identity["name"], named))
        raise UserInputError(f"--out {out} holds a different deployment ({old.get('name')!r} of run {old.get('run')}); "
                             f"choose another --out or pass --force to replace it")
    return list(old.get("files", []))


def renamed(out: Path, old: dict, name: str, named: str) -> str:
    """This run's deployment in --out is named otherwise (another model laid out last names it now): --force would
    write the new name's objects, which `kubectl apply` adds beside the old ones, still running."""
    kinds = {"deployment.yaml": "deployment", "service.yaml": "service", "pdb.yaml": "pdb", "hpa.yaml": "hpa",
             "servicemonitor.yaml": "servicemonitor", "pvc.yaml": "pvc", "fill-job.yaml": "job"}
    written = {f.removeprefix("kubernetes/base/") for f in old.get("files", [])}
    objects = [kind for f, kind in kinds.items() if f in written] or list(kinds.values())[:4]
    was = old["name"]
    return (f"--out {out} holds this run's deployment {was!r}, and this one is named {name!r}"
            + (f" ({named})" if named else "") + f"; pass --name {was} to update {was!r}, or --force to write "
            f"{name!r} in its place: applied, its objects run beside those of {was!r}, which `kubectl delete "
            # every object deploy writes carries the name label (the fill Job's component differs)
            f"{','.join(objects)} -l app.kubernetes.io/name={was}` removes")


def repository_files(out: Path, run: Path, repository: Path) -> dict[str, str]:
    """The configs the deployment in `out` wrote into the model repository, path -> sha256 as written, where its
    marker is of this run and repository: `cnnpack train --force` keeps deploy/ but drops the run's record of them.
    A marker that records no digests (an older cnnpack's) names none: a file that may have been edited since is the
    user's."""
    try:
        old = json.loads((out / IDENTITY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not (isinstance(old, dict) and old.get("kind") == "cnnpack-deploy" and old.get("run") == str(run)
            and old.get("repository") == str(repository) and isinstance(old.get("repository_sha256"), dict)):
        return {}
    return {rel: digest for rel, digest in old["repository_sha256"].items()
            if isinstance(rel, str) and isinstance(digest, str)}


def own_files(out: Path, earlier: list[str] | None) -> list[str]:
    """Files in --out that the earlier deployment did not write (a user's own overlay, notes), or wrote and the user
    has edited since (`edited`): kept on a rewrite, or refused where it writes them again."""
    if not earlier or not out.is_dir():  # nothing to replace, or an unreadable marker replaced with --force
        return []
    ours = {*earlier, IDENTITY} - set(edited(out))
    return sorted(rel for rel in _walk(out)[0] if rel not in ours)


def vcs_metadata(out: Path) -> list[str]:
    """The version control metadata in `out` (`VCS`), by path: kept as it is, never listed as the user's files."""
    return _walk(out)[1] if out.is_dir() else []


def _walk(out: Path) -> tuple[list[str], list[str]]:
    """(the files and links in `out`, its version control metadata), by path; a VCS folder is not entered (a large
    repository's objects), nor a link to a folder."""
    files, metadata = [], []
    for root, dirs, names in os.walk(out):
        here = Path(root)
        for name in [*dirs, *names]:
            rel = (here / name).relative_to(out).as_posix()
            if name in VCS:
                metadata.append(rel)
            elif name in names or (here / name).is_symlink():
                files.append(rel)
        dirs[:] = [d for d in dirs if d not in VCS and not (here / d).is_symlink()]
    return sorted(files), sorted(metadata)


def unchanged(out: Path, files: dict[str, str | bytes], record: dict) -> bool:
    """Whether `out` holds this very deployment: every file with the bytes it writes, and a marker that says what
    `record` says (apart from `PER_WRITE`, and --force: nothing to force). Rewriting it would change nothing but the
    marker's account of the write (a GitOps checkout's diff on every deploy)."""
    try:
        old = json.loads((out / IDENTITY).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False

    def content(r: dict) -> dict:
        r = {k: v for k, v in r.items() if k not in PER_WRITE}
        return {**r, "config": {**r["config"], "force": False}} if isinstance(r.get("config"), dict) else r

    if not isinstance(old, dict) or content(old) != content(json.loads(json.dumps(record))):
        return False
    for rel, data in files.items():
        path = out / rel
        if rel != IDENTITY and (path.is_symlink() or not path.is_file()
                                or path.read_bytes() != (data.encode() if isinstance(data, str) else data)):
            return False
    return True


def digests(files: dict[str, str | bytes]) -> dict[str, str]:
    """The sha256 of each file written (recorded in the marker, so that a rewrite can tell an edited file)."""
    import hashlib

    return {rel: hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()
            for rel, data in sorted(files.items())}


def edited(out: Path) -> list[str]:
    """The files the deployment in `out` wrote whose bytes are no longer what it wrote (a patch the user made in
    place): a rewrite replaced them without a word. A marker without digests (an older cnnpack's) names none."""
    import hashlib

    try:
        recorded = json.loads((out / IDENTITY).read_text(encoding="utf-8")).get("sha256")
    except (OSError, ValueError, AttributeError):
        return []
    if not isinstance(recorded, dict):
        return []
    changed = []
    for rel, digest in recorded.items():
        path = out / str(rel)
        if path.is_symlink() or (path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() != digest):
            changed.append(str(rel))  # (a link put in its place is the user's too)
    return sorted(changed)


def clashes(own: list[str], files) -> list[str]:
    """The user's own paths that the new deployment's files would overwrite: the same path, a file where a
    folder of them must go, or a file inside what is now one of them."""
    wanted = set(files)
    folders = {"/".join(f.split("/")[:i]) for f in wanted for i in range(1, f.count("/") + 1)}
    return [p for p in own if p in wanted or p in folders or any(p.startswith(f + "/") for f in wanted)]


def stage_tree(out: Path, files: dict[str, str | bytes], keep: list[str] = (), vcs: list[str] = ()) -> Path:
    """Writes every file, and the kept files of the folder it replaces, into a fresh folder beside `out`; `vcs`: its
    version control metadata, as hard links (the same files, not a copy of a repository's history each time)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with naming(out.parent):
        stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.new-{owner_tag()}", dir=out.parent))
    try:
        for rel in vcs:
            (stage / rel).parent.mkdir(parents=True, exist_ok=True)
            with naming(out / rel):
                if (out / rel).is_dir() and not (out / rel).is_symlink():  # (its empty folders too: refs/tags)
                    shutil.copytree(out / rel, stage / rel, symlinks=True, copy_function=_link)
                else:
                    shutil.copy2(out / rel, stage / rel, follow_symlinks=False)
        for rel in keep:
            path = stage / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            with naming(out / rel):
                shutil.copy2(out / rel, path, follow_symlinks=False)
        for rel, data in files.items():
            path = stage / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            with naming(out / rel):
                path.write_bytes(data.encode() if isinstance(data, str) else data)
            os.chmod(path, 0o644)
        os.chmod(stage, 0o755)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    return stage


def _link(src: str, dst: str) -> None:
    """A hard link where the file system makes one (the stage is beside `out`: the same one), else a copy. The old
    folder's link goes with it once the stage is in place; until then either folder holds the whole metadata."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def swap_in(stage: Path, out: Path) -> None:
    """Puts a staged folder in place of `out`; the old folder survives a failure (and the stage is removed)."""
    try:
        swap_dir(stage, out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def write_tree(out: Path, files: dict[str, str | bytes]) -> None:
    """Writes every file into a fresh folder beside `out`, then swaps it in; the old folder survives a failure."""
    swap_in(stage_tree(out, files), out)
