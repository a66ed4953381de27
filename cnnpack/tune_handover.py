"""The handover of `cnnpack tune`: the winner's config.pbtxt written into the run's repository, the previous one
kept beside it as config.pbtxt.prev, and `cnnpack tune --undo`, which puts back the configs from before any tune.

The run's manifest keeps every config a tune wrote with its digest (`tuned`), so an undo restores only what the
repository still serves as tune left it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from cnnpack.atomic import atomic_write_text
from cnnpack.errors import UserInputError
from cnnpack.rundir import Run, sha256
from cnnpack.triton_config import tune_records
from cnnpack.triton_publish import PREVIOUS


def undoable(stages: dict) -> dict[str, dict]:
    """Every config.pbtxt a tune of this run wrote that the repository still serves (its digest unchanged: not undone,
    not laid out again), config path -> {"previous": its config.pbtxt.prev, "sha256"}. Each tune carries it forward,
    so `--undo` after a second tune still goes back to the configs from before any tune."""
    return {c: e for c, e in tune_records(stages).items() if "sha256" in e and "previous" in e
            and Path(c).is_file() and Path(e["previous"]).is_file() and sha256(Path(c)) == e["sha256"]}


def config_of(run: Run, model: str) -> str:
    """The config.pbtxt a winner of `model` is written to."""
    return str(Path(run.stage("triton")["repository"]) / model / "config.pbtxt")


def write_winner(run: Run, model: str, config_pbtxt: str, *, keep_previous: bool = False) -> dict:
    """`config_pbtxt` as `model`'s config.pbtxt, the previous one kept as config.pbtxt.prev (over a config an
    earlier tune wrote, `keep_previous`: its .prev, the config from before any tune, stays)."""
    folder = Path(run.stage("triton")["repository"]) / model
    if not keep_previous:
        atomic_write_text(folder / PREVIOUS, (folder / "config.pbtxt").read_text())
    atomic_write_text(folder / "config.pbtxt", config_pbtxt)
    return {"model": model, "config": str(folder / "config.pbtxt"), "previous": str(folder / PREVIOUS),
            "sha256": sha256(folder / "config.pbtxt")}  # what deploy checks is still in place (triton_config)


def undo(run_dir: str | Path) -> list[dict]:
    """Restores every config.pbtxt this run's tunes wrote that is still served (`undoable`) to the one from before
    any tune; [{config, previous}] restored; UserInputError when there is nothing to undo."""
    run = Run.open(run_dir)
    with run.only_one("tune"):  # a sweep running compares against the config it found: not one undone under it
        return _undo(run)


def _restored_unrecorded(stages: dict) -> dict[str, dict]:
    """The configs an undo killed before its record (SIGKILL) put back: the config holds its .prev's text already,
    while the record still names the tuned one. An undo finishes them (they are not edits of the user's)."""
    return {c: e for c, e in tune_records(stages).items() if "sha256" in e and e.get("previous")
            and Path(c).is_file() and Path(e["previous"]).is_file() and sha256(Path(c)) != e["sha256"]
            and Path(c).read_bytes() == Path(e["previous"]).read_bytes()}


def _undo(run: Run) -> list[dict]:
    stages = run.read().get("stages", {})
    entries = undoable(stages) | _restored_unrecorded(stages)
    if not entries:
        entries = tune_records(stages)
        if changed := sorted(c for c, e in entries.items() if Path(c).is_file() and "sha256" in e
                             and sha256(Path(c)) != e["sha256"]):
            raise UserInputError(f"{changed[0]} changed since `cnnpack tune` wrote it (edited by hand, or laid out "
                                 "again by `cnnpack triton`): nothing to undo, the repository's config stays")
        if gone := sorted(e["previous"] for e in entries.values() if e.get("previous")
                          and not Path(e["previous"]).is_file()):
            raise UserInputError(f"{gone[0]}, the config from before the tune, is gone: nothing to undo it to")
        raise UserInputError(f"{run.path}: no config written by `cnnpack tune` to undo")
    restored, tuned_text = [], {c: Path(c).read_text() for c in entries}
    with run.committing():  # the configs and their record as one step: a Ctrl-C waits, a failed record undoes them
        try:
            for config, e in entries.items():
                atomic_write_text(Path(config), Path(e["previous"]).read_text())
                restored.append({"config": config, "previous": e["previous"]})
            run.update(lambda m: m["stages"]["tune"].update(written=None, tuned={}, undone=restored))
        except BaseException:
            for r in restored:
                with contextlib.suppress(OSError):
                    atomic_write_text(Path(r["config"]), tuned_text[r["config"]])
            raise
    for r in restored:  # only once the record says undone: until then the .prev is what an undo goes back to
        with contextlib.suppress(OSError):
            Path(r["previous"]).unlink()
    return restored
