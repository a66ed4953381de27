"""`cnnpack train --resume`: the recorded config it continues, the options that would change it, the data that
must not have changed, and the state of the last finished epoch; and what a --run folder must be for a training to
start or continue in it."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import torch

from cnnpack import data as data_mod
from cnnpack import user_model
from cnnpack.data_change import changed_since
from cnnpack.errors import UserInputError, count, shell
from cnnpack.run_replace import recover
from cnnpack.rundir import LAST, MANIFEST, Run, check_makeable
from cnnpack.train_config import DEFAULT_LR, TrainConfig


def resume_state(run: Run, model, opt, sched, steps_per_epoch: int) -> tuple[int, list[dict]]:
    path = run.file(LAST)
    try:
        st = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optimizer"])
        history, epoch = st["history"], int(st["epoch"])
        if st["scheduler"]["total_steps"] == sched.total_steps:
            sched.load_state_dict(st["scheduler"])
        else:  # resumed with another number of processes (torchrun run resumed in one): same schedule, re-divided
            sched.last_epoch = epoch * steps_per_epoch
    except Exception as e:  # noqa: BLE001 - truncated zip, foreign file, wrong keys or shapes
        raise UserInputError(f"--resume: {path} is truncated or not a cnnpack resume state ({type(e).__name__})") from None
    return epoch, history


def check_same_data(run: Run, now: dict) -> None:
    """--resume on data that changed since the interrupted training: the split moved (images it trained on are now
    validation images), the record kept the old counts, and a changed class list read as a damaged last.pt."""
    if change := changed_since(run.read()["stages"]["train"].get("data") or {}, now):
        raise UserInputError(f"--resume: {now.get('source', 'the data')} has changed since the training began "
                             f"({change}): the epochs would not be of one split; train again with --force")


def check_same_code(run: Run, spec_now: dict) -> None:
    """--resume of your own network whose code changed since the interrupted training (its file, or one it imports):
    last.pt's weights are of the network as it was ("truncated" was said where they no longer fit, and where they
    did the run went on recording the old code)."""
    was, now = (run.model_spec.get("arch_source") or {}).get("sha256"), (spec_now.get("arch_source") or {}).get("sha256")
    if was and now and was != now:
        raise UserInputError(f"--resume: the network's code ({run.model_spec['arch_source']['path']} or a file it "
                             "imports) has changed since the training began: its epochs would not be of one network; "
                             "train again with --force")


def recorded_config(run_dir: Path) -> TrainConfig:
    """The config a run was started with (what `--resume` continues)."""
    recorded = Run.open(run_dir).read().get("stages", {}).get("train", {}).get("config")
    if not recorded:
        raise UserInputError(f"--resume: {run_dir} has no recorded training to resume")
    try:
        return TrainConfig(**recorded)
    except TypeError:
        raise UserInputError(f"--resume: {run_dir} was trained by an incompatible cnnpack version") from None


def as_recorded(cfg: TrainConfig) -> TrainConfig:
    """The config as a run records it: --data and --data-root as paths that hold from any folder (evaluate, resume
    and the pipeline run from elsewhere), the built-in and torchvision names as they are."""
    return replace(cfg, data=data_mod.recorded_source(cfg.data), arch=user_model.recorded(cfg.arch),
                   data_root=str(Path(cfg.data_root).resolve()) if cfg.data_root else None)


def resume_conflicts(run_dir: str | Path, given: dict) -> dict[str, tuple]:
    """The `TrainConfig` fields in `given` whose values differ from the run's recorded ones: {name: (given, recorded)}.

    A resumed run always continues with the config it was started with (the schedule, the data split
    and the checkpoints depend on it), so a different value would be silently ignored.
    """
    recorded = asdict(recorded_config(Path(run_dir)))
    fields = {f: given.get(f) for f in ("data", "data_root")} | {"data": given.get("data") or "shapes"}
    normal = asdict(as_recorded(replace(TrainConfig(), **fields)))
    recorded_as = {**given, **{k: normal[k] for k in ("data", "data_root") if given.get(k)},
                   **({"arch": user_model.recorded(given["arch"])} if given.get("arch") else {})}  # (a file: absolute)
    # what a recorded default (None, auto) came to: `--resume --channels-last` on a run with the default is no change
    came_to = {"channels_last": True if recorded["channels_last"] is None else recorded["channels_last"],
               "lr": DEFAULT_LR.get(recorded["optimizer"]) if recorded["lr"] is None else recorded["lr"],
               "device": ("cuda" if torch.cuda.is_available() else "cpu") if recorded["device"] == "auto"
               else recorded["device"]}
    # --val-fraction splits only a folder of <class>/ folders: the built-in data, torchvision's and train/ + val/ have
    # their own split, so the option had no effect there and a different value changes nothing
    ignored = {"val_fraction"} if _split_given(recorded["data"]) else set()
    # `ds` is the recorded /abs/ds, or `ds` as a run recorded it before --data (--data-root) was made absolute
    return {name: (value, recorded[name]) for name, value in given.items()
            if name in recorded and name not in ignored and recorded[name] not in (value, recorded_as[name])
            and (name not in came_to or came_to[name] != value)}


def _split_given(data: str) -> bool:
    """Whether `--data` comes with its own train/validation split (so --val-fraction does not apply)."""
    if data == data_mod.SHAPES or data.startswith("torchvision:"):
        return True
    return all(data_mod.split_dirs(Path(data)))


def check_train_dir(run_dir: Path, *, force: bool, resume: bool) -> None:
    """Refuses a bad --run before any data is loaded (Run.create checks again when it writes)."""
    check_makeable(run_dir)
    recover(run_dir, Run(run_dir).locked)  # a run a killed replacement set aside: back before it is judged
    if resume:
        if not (run_dir / LAST).is_file():
            raise UserInputError(f"--resume: {run_dir} has no {LAST} (no epoch finished); "
                                 f"start it again with `cnnpack train --run {shell(run_dir)} --force`")
        done = Run.open(run_dir).read()["stages"].get("train", {})
        if done.get("status") == "ok":
            m = done.get("metrics", {})
            raise UserInputError(f"--resume: {run_dir} finished training ({count(m.get('epochs', 0), 'epoch')}, best val "
                                 f"top-1 {100 * m.get('best_val_acc', 0):.2f}%); nothing to continue "
                                 f"(`cnnpack train --run {shell(run_dir)} --force` with its options trains it again)")
    elif (run_dir / MANIFEST).exists() and not force:
        resumable = " or --resume to continue it" if (run_dir / LAST).is_file() else ""
        raise UserInputError(f"{run_dir} already holds a run; pass --force to replace it{resumable}")
