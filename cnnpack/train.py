"""`cnnpack train`: train a classifier into a run directory.

The loop reads top to bottom: build data and model, then per epoch train, evaluate, write
`last.pt` (resume state) and, when val accuracy improved, `checkpoint.pt` (best weights +
model spec). Each epoch reseeds its own RNGs from (seed, epoch), so a resumed run replays
exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from cnnpack import data as data_mod
from cnnpack import plots, user_model
from cnnpack.atomic import atomic_path, naming, sigint_deferred
from cnnpack.checkpoint import CHECKPOINT, load_checkpoint, save_torch, torch_bytes  # noqa: F401 - importable here too
from cnnpack.distributed import PeerStopped, peer_lost
from cnnpack.errors import CnnpackError, StageFailed, UserInputError, file_error, first_few, one_line, shell
from cnnpack.host import check_device
from cnnpack.models import build_model, channels_last_problem, check_input_size
from cnnpack.run_replace import Replacing
from cnnpack.rundir import LAST, MANIFEST, Run
from cnnpack.spec import ModelSpec
from cnnpack.train_config import DEFAULT_LR, TrainConfig
from cnnpack.train_precision import Diverged, autocast_for, check_finite
from cnnpack.train_resume import (
    as_recorded,
    check_same_code,
    check_same_data,
    check_train_dir,
    recorded_config,
    resume_state,
)
from cnnpack.train_sessions import record_session, session

HISTORY = "history.json"
# what a training writes; `--force` sets the previous run's copies aside first (run_replace), so a new run that
# stops early can never be resumed from (or evaluated with) the old run's state
TRAIN_FILES = (CHECKPOINT, LAST, "history.json", "curves.png", "confusion.png", "samples.png")
# what the later stages write into a run (their records go with the old manifest): set aside by `--force` too, so the
# report and results a user opens in the folder are never the replaced model's (report.md quoted its accuracy)
LATER_OUTPUTS = ("export", "verify.json", "bench.json", "bench.csv", "bench.png", "speedup.png", "precision.png",
                 "served.json", "served", "tune.json", "tune.png", "tune", "report.md", "report.html")
# not deploy/: `cnnpack deploy` keeps a user's own files in it, and writes it again for the new model
log = logging.getLogger("cnnpack")


class Interrupted(CnnpackError):
    """Ctrl-C during training: the last finished epoch is kept and resumable."""

    exit_code = 130


def resolve_device(name: str) -> torch.device:
    """`--device` as a torch device: auto takes the GPU when one is visible; cuda without one is refused."""
    if check_device(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda: no CUDA GPU is visible to PyTorch on this machine; use --device cpu")
    return torch.device(name)


def make_optimizer(cfg: TrainConfig, model: nn.Module, steps: int):
    lr = DEFAULT_LR[cfg.optimizer] if cfg.lr is None else cfg.lr  # (`cfg.lr or 0.1` would turn --lr 0 into 0.1)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=cfg.weight_decay)
    # OneCycleLR divides by (warm-up steps - 1): 4 steps in all (1 epoch of 4 batches) would make exactly
    # one warm-up step and a ZeroDivisionError, so that case warms up over 2
    pct_start = 0.5 if steps == 4 else 0.25
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=pct_start)
    return opt, sched


def _epoch_rng(seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """An epoch's augmentation and dropout streams; each rank of a distributed training its own (the same on every
    rank gave the k-th batch of each the same crops, flips and dropout masks)."""
    seed = seed * 100_003 + epoch + rank * 1_000_000_007
    torch.manual_seed(seed)  # dropout etc.
    return torch.Generator().manual_seed(seed)


def _to_input(x: torch.Tensor, spec: ModelSpec, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = data_mod.normalize(x.to(device, non_blocking=True), spec.mean, spec.std)
    # (the decoded images lie NHWC in memory: NCHW made contiguous, so a network's `.view` takes them)
    return x.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@torch.inference_mode()
def predict(model: nn.Module, split: data_mod.Split, spec: ModelSpec, device: torch.device,
            batch_size: int = 256, channels_last: bool = False) -> torch.Tensor:
    """Logits of `model` over a split, in order: (N, K) float32 on the CPU."""
    model.eval()
    out = [model(_to_input(x, spec, device, channels_last)).float().cpu()
           for x, _ in data_mod.iterate(split, batch_size)]
    return torch.cat(out) if out else torch.empty(0, spec.num_classes)


def confusion_matrix(pred: np.ndarray, true: np.ndarray, k: int) -> np.ndarray:
    return np.bincount(true * k + pred, minlength=k * k).reshape(k, k)


def _train_one_epoch(model, split, spec, cfg, device, opt, sched, loss_fn, g, progress, task, state) -> dict:
    model.train()
    autocast, scaler = state["autocast"], state["scaler"]
    correct, loss_sum, seen, t0 = 0, 0.0, 0, time.perf_counter()
    pin = device.type == "cuda"
    for x, y in data_mod.iterate(split, cfg.batch_size, shuffle=True, g=g, indices=state.get("shard")):
        if len(y) == 1:  # a last batch of one: BatchNorm cannot train on it when the feature map is 1x1
            continue
        if pin:  # page-locked host memory makes the copy below asynchronous
            x, y = x.pin_memory(), y.pin_memory()
        x = data_mod.augment(x.to(device, non_blocking=True), g)  # on the device: no CPU bottleneck on a GPU
        x, y = _to_input(x, spec, device, state["channels_last"]), y.to(device, non_blocking=True)
        with autocast:
            logits = model(x)  # (B, K)
            loss = loss_fn(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()
        sched.step()
        seen += len(y)
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        if progress is not None:
            ips = seen / (time.perf_counter() - t0)
            progress.update(task, advance=1, loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}%",
                            ips=f"{ips:,.0f} img/s")
    wall = time.perf_counter() - t0
    return {"train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
            "train_images_per_s": seen / max(wall, 1e-9), "train_wall_s": wall}


def _validate(model, split, spec, device, loss_fn, channels_last) -> dict:
    logits = predict(model, split, spec, device, channels_last=channels_last)
    y = split.labels
    return {"val_loss": float(loss_fn(logits, y)), "val_acc": (logits.argmax(1) == y).sum().item() / max(len(y), 1)}


def _progress(enabled: bool):
    if not enabled:
        return contextlib.nullcontext(None)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    # to a file or a pipe (a CI log), each epoch's line is written whole: rich would assume 80 columns and cut the
    # step count and the time to "57…" and "0:…"
    wide = None if sys.stdout.isatty() else 160
    return Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]}  acc {task.fields[acc]}  {task.fields[ips]}{task.fields[val]}"),
                    TimeElapsedColumn(), transient=False, console=Console(width=wide))


def _write_plots(run: Run, model, data: data_mod.Data, spec: ModelSpec, device, history) -> dict:
    logits = predict(model, data.val, spec, device)
    pred = logits.argmax(1).numpy()
    true = data.val.labels.numpy()
    cm = confusion_matrix(pred, true, spec.num_classes)
    acc = float((pred == true).mean())
    plots.curves(history, run.file("curves.png"))
    plots.confusion(cm, list(spec.classes), run.file("confusion.png"),
                    title=f"confusion matrix (val, top-1 {100 * acc:.2f}%)")
    idx = sample_indices(pred, true)
    plots.samples(data.val.images[idx].numpy(), true[idx].tolist(), pred[idx].tolist(), list(spec.classes),
                  run.file("samples.png"))
    return {"confusion_matrix": cm.tolist(), "val_acc": acc}


def sample_indices(pred: np.ndarray, true: np.ndarray, n: int = 32, max_wrong: int = 16) -> np.ndarray:
    """Which validation images the samples grid shows: mistakes first, then correct ones, each taken round-robin
    over the classes (the split is sorted by class, so "the first n" is one class: 16 mistakes of one class)."""
    def round_robin(hit: np.ndarray) -> list[int]:
        per_class = [np.nonzero(hit & (true == c))[0] for c in np.unique(true)]
        return [idx[r] for r in range(max((len(i) for i in per_class), default=0)) for idx in per_class if r < len(idx)]

    wrong = round_robin(pred != true)[:max_wrong]
    right = round_robin(pred == true)[: n - len(wrong)]
    return np.asarray([*wrong, *right], dtype=np.int64)


def train(run_dir: str | Path, cfg: TrainConfig = TrainConfig(), *, force: bool = False, resume: bool = False,
          progress: bool = True, on_epoch_end: Callable[[int, dict], None] | None = None,
          on_run: Callable[[Run], None] | None = None, dist: object | None = None) -> dict:
    """Trains into `run_dir` and returns the `stages.train` manifest section.

    Args:
        run_dir: the run directory (created; refused if it holds another run unless `force`).
        cfg: the training configuration (recorded in the manifest).
        resume: continue the run in `run_dir` from its `last.pt`, with its recorded config.
        on_epoch_end: called after each finished epoch (tests use it to interrupt).
        on_run: called with the run it writes to once it is created or opened (the pipeline then holds the new run
            `--force` made, and records nothing into a run another command replaced since).
        dist: a `cnnpack.distributed.Context` when launched under torchrun.
    """
    run_dir = Path(run_dir)
    if resume:
        cfg = recorded_config(run_dir)
    cfg.validate()  # a bad option is said before "already holds a run": not one error, then the next
    check_train_dir(run_dir, force=force, resume=resume)
    data_mod.check_outside(cfg.data, run_dir, "--run")
    cfg = as_recorded(cfg)
    device = resolve_device(cfg.device)
    is_main = dist is None or dist.rank == 0
    t_start = time.perf_counter()
    data = data_mod.load_data(cfg.data, cfg.image_size, seed=cfg.seed, val_fraction=cfg.val_fraction,
                              data_root=cfg.data_root, download=cfg.download)
    if data.skipped and is_main:
        log.warning("warning: skipped %d unreadable or non-image files in %s (e.g. %s)",
                    len(data.skipped), data.source, data.skipped[0])
    unseen = [c for c, n in zip(data.classes, data.summary()["val_per_class"]) if n == 0]
    if unseen and is_main:  # a class of one image keeps it to train (or val/ lacks the class): its accuracy is unknown
        log.warning("warning: no validation image of %s: the validation accuracy leaves %s out; add images",
                    first_few(unseen),
                    "it" if len(unseen) == 1 else "them")
    spec = ModelSpec(**user_model.spec_fields(cfg.arch), num_classes=len(data.classes), classes=tuple(data.classes),
                     image_size=cfg.image_size)
    torch.manual_seed(cfg.seed)
    model = build_model(spec, pretrained=cfg.pretrained).to(device)
    check_input_size(model, spec)  # before the run is created: an arch that cannot take the size writes nothing
    channels_last = cfg.channels_last if cfg.channels_last is not None else True  # ~15 % faster on 2 CPU cores
    if channels_last and user_model.is_user_arch(spec.arch) and (why := channels_last_problem(model, spec)):
        fix = "torch.flatten(x, 1) or x.reshape(x.size(0), -1) in place of x.view(...) lifts it"
        if cfg.channels_last:
            raise UserInputError(f"--channels-last: --arch {cfg.arch} cannot run on channels-last tensors ({why}); "
                                 f"{fix}, or leave --channels-last out")
        channels_last = False
        if is_main:
            log.warning("note: --arch %s cannot run on channels-last tensors (%s): trained without them (about 15 %% "
                        "slower on the CPU); %s", cfg.arch, why, fix)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    shard = dist.shard(len(data.train)) if dist is not None else None
    n_train = len(shard) if shard is not None else len(data.train)
    if dist is not None and n_train < 2:  # each process's batches would be of one image, which BatchNorm cannot train on: no step ran
        raise UserInputError(f"{len(data.train)} training images over {dist.world_size} processes leave each 1 per "
                             "epoch, and a batch of 1 image cannot train; use fewer processes or more images")
    steps_per_epoch = data_mod.num_batches(n_train, cfg.batch_size)
    opt, sched = make_optimizer(cfg, model, cfg.epochs * steps_per_epoch)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    autocast, scaler, mixed = autocast_for(device, cfg, model, spec, say=is_main)
    state = {"autocast": autocast, "scaler": scaler, "channels_last": channels_last, "shard": shard}

    replacing, run, start_epoch = None, None, 0  # replacing: the run this one replaces, set aside (run_replace)
    try:
        if is_main and resume:
            run = Run.open(run_dir)
            check_same_data(run, data.summary())
            check_same_code(run, spec.to_dict())
        elif is_main:
            # the run it replaces is set aside until this one keeps its first epoch: a failure or Ctrl-C before that
            # puts it back (it was deleted at once, and a pipeline whose options changed lost a finished run to a
            # Ctrl-C)
            run, replacing = _create(run_dir, spec, cfg, data, force=force)
        else:
            run = Run(run_dir)
        if is_main and on_run is not None:
            on_run(run)
        start_epoch, history = (resume_state(run, model, opt, sched, steps_per_epoch) if resume else (0, []))
        if dist is not None:
            dist.started()  # a refusal of one rank's (rank 0 judges the run folder) stops every rank in one line
        train_model = dist.wrap(model) if dist is not None else model
    except BaseException as e:
        if dist is not None and not dist.exchanged:
            dist.started(failed=True)
        if replacing is not None:
            replacing.put_back()
        elif is_main and run is not None and not resume:  # a new run stopped before training: failed, not "running"
            ctrl_c = isinstance(e, KeyboardInterrupt)
            why = {} if ctrl_c else {"error": e.record if isinstance(e, PeerStopped) else one_line(e)}
            with contextlib.suppress(OSError):
                record_session(run, "interrupted" if ctrl_c else "failed", 0, None, t_start, steps_per_epoch, dist,
                               autocast=mixed, **why)
        raise
    best = max((h["val_acc"] for h in history), default=-1.0)
    stale = _stale_epochs(history)
    kept = history[-1]["epoch"] if history else None  # the epoch last.pt holds

    with replacing.guard() if replacing is not None else contextlib.nullcontext(), _progress(progress and is_main) as bar:
        for epoch in range(start_epoch + 1, cfg.epochs + 1):
            if stale >= cfg.patience:
                break
            try:  # the whole epoch: a Ctrl-C anywhere in it is an Interrupted naming what is kept
                g = _epoch_rng(cfg.seed, epoch, dist.rank if dist is not None else 0)
                if dist is not None:
                    state["shard"] = dist.shard(len(data.train), epoch=epoch, seed=cfg.seed)
                task = bar.add_task(f"epoch {epoch}/{cfg.epochs}", total=steps_per_epoch, loss="-", acc="-",
                                    ips="-", val="") if bar is not None else None
                stats = _train_one_epoch(train_model, data.train, spec, cfg, device, opt, sched, loss_fn, g,
                                         bar, task, state)
                if dist is not None:
                    stats = dist.reduce_stats(stats)
                    dist.same_model(model)  # every rank validates the model rank 0 saves
                stats.update(_validate(model, data.val, spec, device, loss_fn, channels_last))
                if dist is not None:
                    stats = dist.from_main(stats)  # one early-stopping decision on every rank
                check_finite(model, stats, opt.defaults["lr"], cfg.weight_decay)
                if bar is not None:
                    bar.update(task, val=f"  val loss {stats['val_loss']:.3f} acc {100 * stats['val_acc']:.2f}%")
                stats = {"epoch": epoch, "lr": opt.param_groups[0]["lr"], **stats}
                with sigint_deferred():  # an epoch's files are written whole, or the epoch is not kept
                    history.append(stats)
                    improved = stats["val_acc"] > best
                    best = max(best, stats["val_acc"])
                    stale = 0 if improved else stale + 1
                    if is_main:
                        with run.committing():  # checked and written under the run's lock: a --force since
                            _save_epoch(run, model, spec, opt, sched, epoch, stats, history, improved)  # gets none
                            if replacing is not None:  # this run holds an epoch: the one it replaces goes
                                replacing.keep_new()
                    kept = epoch
                if on_epoch_end is not None:
                    on_epoch_end(epoch, stats)
            except KeyboardInterrupt:
                if is_main:
                    record_session(run, "interrupted", start_epoch, kept, t_start, steps_per_epoch, dist,
                                   autocast=mixed)
                if kept is None:
                    if replacing is not None and replacing.put_back():
                        raise Interrupted(f"interrupted during epoch {epoch}, before any epoch finished; the run it "
                                          f"was replacing in {run.path} is back as it was") from None
                    raise Interrupted(f"interrupted during epoch {epoch}, before any epoch finished; start again with "
                                      f"{_again(run.path, dist, '--force')} and the options you gave") from None
                where = f"after epoch {epoch}" if kept == epoch else f"during epoch {epoch}"
                raise Interrupted(f"interrupted {where}; epoch {kept} is kept in {run.file(LAST)}; "
                                  f"continue with {_again(run.path, dist)}") from None
            except (RuntimeError, ValueError, OSError) as e:  # out of memory, a NaN loss, a full disk...
                why = (file_error(e) if isinstance(e, OSError) else one_line(e) if isinstance(e, Diverged)
                       else (dist is not None and peer_lost(e)) or f"{type(e).__name__}: {one_line(e)}")
                if is_main:
                    with contextlib.suppress(OSError):  # a full disk may not take the record either
                        record_session(run, "failed", start_epoch, kept, t_start, steps_per_epoch, dist,
                                       autocast=mixed, error=why)
                kept_note = (f"; epoch {kept} is kept in {run.file(LAST)}"
                             + ("" if isinstance(e, Diverged) else f": continue with {_again(run.path, dist)}")
                             if kept is not None else
                             f"; the run it was replacing in {run.path} is back as it was"
                             if replacing is not None and replacing.put_back() else "")
                raise StageFailed(f"training failed in epoch {epoch} ({why}){kept_note}") from e
            except Exception as e:  # an error nobody foresaw: shown as it is, but the run says failed, not running
                if isinstance(e, CnnpackError):  # (cnnpack's own: already said and recorded as it should be)
                    raise
                if is_main:
                    with contextlib.suppress(OSError):
                        record_session(run, "failed", start_epoch, kept, t_start, steps_per_epoch, dist,
                                       autocast=mixed, error=f"{type(e).__name__}: {one_line(e)}")
                raise
    if not is_main:
        return {}
    try:  # the plots of the best epoch: a Ctrl-C here keeps every epoch, and --resume draws them
        return _finish(run, data, spec, device, history, t_start, resume, dist,
                       session(start_epoch, kept, t_start, steps_per_epoch, dist, autocast=mixed))
    except OSError as e:  # a full disk while the plots are drawn: failed, not left "running"
        with contextlib.suppress(OSError):
            record_session(run, "failed", start_epoch, kept, t_start, steps_per_epoch, dist, autocast=mixed,
                           error=file_error(e))
        raise StageFailed(f"training failed after its last epoch ({kept}), while its plots were drawn: "
                          f"{file_error(e)}; every epoch is kept in {run.file(LAST)}: free space and continue with "
                          f"`cnnpack train --run {shell(run.path)} --resume`") from None
    except Exception as e:  # an error nobody foresaw while the plots are drawn: the run says failed, not "running"
        if not isinstance(e, CnnpackError):  # (a run left "running" refused every later train without --force)
            with contextlib.suppress(OSError):
                record_session(run, "failed", start_epoch, kept, t_start, steps_per_epoch, dist, autocast=mixed,
                               error=f"{type(e).__name__}: {one_line(e)}")
        raise
    except KeyboardInterrupt:
        record_session(run, "interrupted", start_epoch, kept, t_start, steps_per_epoch, dist, autocast=mixed)
        raise Interrupted(f"interrupted after the last epoch ({kept}), while its plots were drawn; every epoch is "
                          f"kept in {run.file(LAST)}; continue with `cnnpack train --run {shell(run.path)} "
                          "--resume`, which draws them") from None


def _again(run_dir: Path, dist, flag: str = "--resume") -> str:
    """The command that goes on with a stopped training (`flag`: --resume, or --force to start it again); under
    torchrun, the same launcher."""
    if dist is None:
        return f"`cnnpack train --run {shell(run_dir)} {flag}`"
    return (f"`torchrun ... -m cnnpack train --run-dir {shell(run_dir)} {flag}` (as it was started"
            + (f", or `cnnpack train --run {shell(run_dir)} --resume` in one process)" if flag == "--resume" else ")"))


def _create(run_dir: Path, spec: ModelSpec, cfg: TrainConfig, data, *, force: bool) -> tuple[Run, Replacing | None]:
    """The new run, recorded as training; with `force` over a run, that one set aside (run_replace) under the run's
    lock, so two at once do not interleave."""
    replacing, replaces = None, force and run_dir.joinpath(MANIFEST).exists()
    with Run(run_dir).locked() if replaces else contextlib.nullcontext():  # (no lock file in a folder not a run)
        if replaces:
            replacing = Replacing(run_dir, (MANIFEST, *TRAIN_FILES, *LATER_OUTPUTS), lock=Run(run_dir).locked)
        try:
            run = Run.create(run_dir, spec.to_dict(), force=force, resume_hint=" or --resume to continue it",
                             run_id=replacing.run_id if replacing is not None else None)
            for name in TRAIN_FILES:
                run.file(name).unlink(missing_ok=True)
            run.set_stage("train", {"status": "running", "config": asdict(cfg), "data": data.summary()})
        except BaseException:
            if replacing is not None:
                replacing.put_back()
            raise
    return run, replacing


def _save_epoch(run: Run, model, spec: ModelSpec, opt, sched, epoch: int, stats: dict, history: list[dict],
                improved: bool) -> None:
    """checkpoint.pt (when val accuracy improved), last.pt (resume state) and history.json for one epoch. last.pt holds
    no RNG state: each epoch reseeds its RNGs from (seed, epoch) (`_epoch_rng`), so a resumed run replays them."""
    with contextlib.ExitStack() as files:  # all written first, then put in place: a full disk leaves the last epoch's
        names = [CHECKPOINT, LAST, HISTORY] if improved else [LAST, HISTORY]
        tmp = {n: files.enter_context(atomic_path(run.file(n))) for n in names}

        def write(name: str, data: bytes) -> None:  # a full disk names the file it filled (each context named it
            with naming(run.file(name)):            # as its own: the 540-byte history.json for last.pt's megabyte)
                tmp[name].write_bytes(data)

        if improved:  # serialised in memory: torch's zip writer reports a full disk as a RuntimeError of its own
            write(CHECKPOINT, torch_bytes({"spec": spec.to_dict(), "state_dict": model.state_dict(), "epoch": epoch,
                                           "val_acc": stats["val_acc"]}))
        write(LAST, torch_bytes({"model": model.state_dict(), "optimizer": opt.state_dict(),
                                 "scheduler": sched.state_dict(), "epoch": epoch, "history": history}))
        write(HISTORY, (json.dumps(history, indent=2) + "\n").encode("utf-8"))


def _stale_epochs(history: list[dict]) -> int:
    best, stale = -1.0, 0
    for h in history:
        stale = 0 if h["val_acc"] > best else stale + 1
        best = max(best, h["val_acc"])
    return stale


def _finish(run: Run, data, spec, device, history, t_start, resumed: bool, dist, this: dict) -> dict:
    model, _, _ = load_checkpoint(run, device=device)
    figures = _write_plots(run, model, data, spec, device, history)
    best = max(history, key=lambda h: h["val_acc"])
    prior = run.read()["stages"]["train"]
    this["wall_s"] = round(time.perf_counter() - t_start, 2)  # the plots included
    sessions = [*prior.get("sessions", []), this]
    wall = sum(x["wall_s"] for x in sessions)  # every invocation's, an interrupted epoch's time included
    parallel = [x for x in sessions if x["processes"] > 1]
    section = {
        **prior,
        "status": "ok",
        "metrics": {"best_val_acc": best["val_acc"], "best_epoch": best["epoch"], "epochs": len(history),
                    "final_train_acc": history[-1]["train_acc"], "wall_s": round(wall, 2),
                    "train_images_per_s": round(float(np.median([h["train_images_per_s"] for h in history])), 1)},
        "confusion_matrix": figures["confusion_matrix"],
        "outputs": {k: run.file_record(run.file(f)) for k, f in
                    (("checkpoint", CHECKPOINT), ("last", LAST), ("history", "history.json"),
                     ("curves", "curves.png"), ("confusion", "confusion.png"), ("samples", "samples.png"))},
        "device": str(device),
        "autocast": this.get("autocast"),  # the forward pass's mixed precision (bf16, fp16) or None: fp32
        "resumed": resumed or prior.get("resumed", False),
        "steps_per_epoch": this["steps_per_epoch"],
        "sessions": sessions,
    }
    section.pop("distributed", None)
    section.pop("error", None)  # an earlier session's failure, resumed since
    if parallel:  # the last distributed session's (each session names its own)
        section["distributed"] = {"world_size": parallel[-1]["processes"], "backend": parallel[-1]["backend"]}
    section.pop("updated", None)
    run.set_stage("train", section)
    return run.read()["stages"]["train"]
