"""Where `cnnpack pipeline` runs, checked before anything is trained: its run directory (a default name that finds
its own earlier work, a run another command made, a run of other data) and the model folders of its repository that
cnnpack did not make."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict
from pathlib import Path

from cnnpack import user_model
from cnnpack.errors import RunReplaced, UserInputError
from cnnpack.pipeline_config import PipelineConfig
from cnnpack.rundir import MANIFEST, Run, check_makeable


def default_run_dir(cfg: PipelineConfig) -> Path:
    """A stable name, so that running the same pipeline again finds (and skips) its own work: the first of
    runs/pipeline-<data>-<arch>-<size>px, then -2, -3, ... that is free or holds a run of the same data (two folders
    both named `data` would otherwise share one, the second training over the first)."""
    data = cfg.data.split(":", 1)[1].lower() if cfg.data.startswith("torchvision:") else Path(cfg.data).resolve().name
    from cnnpack.data import recorded_source

    base = Path("runs") / f"pipeline-{data}-{user_model.label(cfg.arch)}-{cfg.image_size}px"
    path, n = base, 1
    while trained_on(path) not in (None, (recorded_source(cfg.data), user_model.recorded(cfg.arch))):
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def trained_on(path: Path) -> tuple[str, str] | None:
    """The data the run at `path` was trained on and its model's arch, as recorded; None where there is no such record
    to read (a folder named for the built-in `cnn` may hold your own network named CNN: another run)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
        data, arch = manifest["stages"]["train"]["config"]["data"], manifest["model"]["arch"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return (data, arch) if isinstance(data, str) and isinstance(arch, str) else None


def check_foreign_models(cfg: PipelineConfig) -> None:
    """A model folder the triton stage would write that cnnpack did not make (no model record) is refused before
    training, with the triton stage's own words (it was found there, after training, export and bench), and so is
    another run's model of another arch under this run's name (the built-in `cnn` and your own CNN share `cnn_onnx`).
    Another run's model of this arch is judged there: whether it is the same model (a new version) needs this run's
    exports."""
    from cnnpack.triton_config import ensemble_parts
    from cnnpack.triton_publish import STAGING_PREFIX, read_sidecar
    from cnnpack.triton_repo import default_name, repository_root

    root = repository_root(cfg.repository)
    for tc in cfg.triton_configs():
        name = default_name(cfg.arch, tc.format)
        other, ours = ((read_sidecar(root / name) or {}).get("identity") or {}).get("arch"), user_model.display(
            user_model.recorded(cfg.arch))  # (as the triton stage records it: CNN:CNN of this folder is CNN.py:CNN)
        if isinstance(other, str) and other != ours:  # (its name is ours: cnn, your CNN)
            raise UserInputError(f"--repository {cfg.repository}: {root / name} holds another run's model of another "
                                 f"arch ({other}, this run's: {ours}), under the name this run "
                                 "would lay its model out as; give this run a repository of its own (--repository)")
        for folder in [root / name] + ([root / n for n in ensemble_parts(name)] if tc.ensemble else []):
            if not folder.is_dir() or read_sidecar(folder) is not None:
                continue
            if any(not p.name.startswith(STAGING_PREFIX) for p in folder.iterdir()):
                raise UserInputError(f"--repository {cfg.repository}: {folder}: it was not made by cnnpack (no "
                                     "readable cnnpack-model.json), laid out by another tool or by hand; give this run "
                                     "a repository of its own (--repository), or remove that model folder")


def check_run_dir(run: Run, force: bool, data: str) -> None:
    """A run that some other command made is the pipeline's only with --force (it may retrain it), and so is a
    pipeline's run of other data (a changed folder trains again; another folder is another run)."""
    check_makeable(run.path)
    try:
        stages = run.read().get("stages", {}) if run.manifest_path.is_file() else {}
    except UserInputError:  # a damaged manifest: --force makes the run again
        if not force:
            raise
        stages = {}
    if (at_work := (stages.get("pipeline") or {}).get("process")) and (stages["pipeline"].get("status") == "running"
                                                                       and alive(at_work)):  # --force too: it would
        raise UserInputError(f"another `cnnpack pipeline` (pid {at_work.get('pid')}) is working on --run {run.path}; "
                             "wait for it to finish (or stop it), then run this one")  # replace what that one trains
    if force or not run.path.exists():
        return
    if not run.manifest_path.exists():
        if any(run.path.iterdir()):
            raise UserInputError(f"--run {run.path} is not empty and not a cnnpack run; choose another --run")
        return
    if "pipeline" not in stages:
        if (stages.get("train") or {}).get("status") == "running":  # a `pipeline --force` or `train` at work there
            raise UserInputError(f"--run {run.path} holds a training under way (another cnnpack command at work on "
                                 "it, or one that was killed); wait for it to finish, or choose another --run (if it "
                                 "was killed: --force trains again there)")
        raise UserInputError(f"--run {run.path} holds a run not made by `cnnpack pipeline`; pass --force to let "
                             "the pipeline redo its stages there, or choose another --run")
    from cnnpack.data import recorded_source

    other, mine = (trained_on(run.path) or (None,))[0], recorded_source(data)
    if other is not None and other != mine:
        raise UserInputError(f"--run {run.path} holds a pipeline run trained on {other}, not on {mine}; "
                             "choose another --run, or pass --force to train it again on this data there")


def record(run: Run, cfg: PipelineConfig, outcomes: list, t0: float, status: str) -> None:
    """The pipeline's section; while it runs ("running", from the moment its run exists), with its process: a
    pipeline killed midway left a run the next one refused as another command's, and a second one started beside it
    was told to pass --force."""
    if not run.manifest_path.is_file():
        return
    try:
        run.set_stage("pipeline", {"status": status, "config": asdict(cfg), "stages": [asdict(o) for o in outcomes],
                                   "wall_s": round(time.perf_counter() - t0, 1)}
                      | ({"process": this_process()} if status == "running" else {}))
    except RunReplaced:  # a failed pipeline's error says more; a finished one was replaced before its record
        if status == "ok":
            raise


def this_process() -> dict:
    """What a running pipeline records of itself, for `alive`: its pid and when it started (a pid used again by
    another process after it was killed is not it)."""
    return {"pid": os.getpid(), "started": _started(os.getpid())}


def alive(process: dict) -> bool:
    """The process a running pipeline recorded is still at work: a pipeline killed (SIGKILL, out of memory, a
    container stopped) left its section "running", and the next one took the run for another command's; it is the
    pipeline's to continue."""
    pid = process.get("pid")
    if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():  # (this process: one it ran before, cut short)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process of that pid: not this user's pipeline (it writes this user's run)
        return False
    started = _started(pid)
    return started is None or process.get("started") in (None, started)


def _started(pid: int) -> int | None:
    """When process `pid` started (clock ticks since boot, /proc/PID/stat's field 22), None where there is no /proc."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_bytes().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None
