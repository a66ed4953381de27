"""`cnnpack train` and `cnnpack evaluate`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cnnpack.cli.common import app, as_flag, default_run_dir, emit, given_options, handles_errors, usage_error


@app.command()
@handles_errors
def train(
    ctx: typer.Context,
    data: str = typer.Option("shapes", help="shapes | PATH (ImageFolder) | torchvision:NAME"),
    arch: str = typer.Option("cnn", help="cnn, any torchvision classifier (resnet18, mobilenet_v3_small, ...), or your own network: FILE.py:NAME (a class or function there returning an nn.Module; given num_classes when it takes it)"),
    run: Optional[Path] = typer.Option(None, "--run", "--run-dir",
                                       help="Run directory (default: a new runs/train-N); --run-dir under torchrun."),
    image_size: int = typer.Option(64, help="Square input size in pixels."),
    epochs: int = typer.Option(8, min=1),
    batch_size: int = typer.Option(64, min=2),
    optimizer: str = typer.Option("adamw", help="adamw | sgd"),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (default 1e-2 adamw, 0.1 sgd)."),
    weight_decay: float = typer.Option(5e-4),
    label_smoothing: float = typer.Option(0.05),
    patience: int = typer.Option(4, help="Early stopping: epochs without a val-accuracy gain."),
    seed: int = typer.Option(0, min=0),
    device: str = typer.Option("auto", help="auto | cpu | cuda"),
    amp: bool = typer.Option(True, help="Mixed precision: bf16 on a CPU with native bf16 (AMX, AVX-512 BF16); on CUDA "
                             "bf16 where supported, else fp16. --no-amp trains in fp32. The weights and the "
                             "checkpoint are fp32 either way."),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last",
                                                 help="NHWC memory layout (default: on; faster on CPU and GPU)."),
    pretrained: bool = typer.Option(False, help="Start from torchvision weights (needs them reachable)."),
    val_fraction: float = typer.Option(0.2, help="Held-out share when PATH has no train/val folders."),
    data_root: Optional[str] = typer.Option(None, help="Root folder for torchvision:NAME datasets."),
    download: bool = typer.Option(False, help="Let torchvision:NAME download (only when online)."),
    force: bool = typer.Option(False, help="Replace a run that already exists in --run."),
    resume: bool = typer.Option(False, help="Continue the run in --run from its last finished epoch."),
    progress: bool = typer.Option(True, help="Show a live progress bar."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest section as JSON."),
):
    """Train a classifier into a run directory.

    Example: cnnpack train --data shapes --arch cnn --epochs 8 --run runs/demo
    """
    from cnnpack.distributed import context_from_env
    from cnnpack.train import Interrupted, TrainConfig
    from cnnpack.train import train as do_train

    if resume and run is None:
        raise usage_error("--resume needs --run DIR")
    if resume and force:
        raise usage_error("--resume continues the run in --run, --force replaces it: pass one of them")
    cfg = TrainConfig(data=data, arch=arch, image_size=image_size, epochs=epochs, batch_size=batch_size,
                      optimizer=optimizer, lr=lr, weight_decay=weight_decay, label_smoothing=label_smoothing,
                      patience=patience, seed=seed, device=device, amp=amp, channels_last=channels_last,
                      pretrained=pretrained, val_fraction=val_fraction, data_root=data_root, download=download)
    run = run or default_run_dir("train")
    if resume:
        _refuse_changed_options(ctx, run)
    elif "val_fraction" in given_options(ctx):
        from cnnpack.data import check_val_fraction

        check_val_fraction(data)
    dist = context_from_env(device)
    try:
        section = do_train(run, cfg, force=force, resume=resume, progress=progress and not as_json, dist=dist)
    except Interrupted:
        if dist is not None and dist.rank != 0:  # rank 0 says what is kept; N copies of its line said nothing more
            raise typer.Exit(130) from None
        raise
    finally:
        if dist is not None:
            dist.close()
    if dist is not None and dist.rank != 0:
        return
    m = section["metrics"]
    emit(section, as_json)
    if not as_json:
        from cnnpack.report import stopped_early

        early = f"; {said}" if (said := stopped_early(section)) else ""
        typer.echo(f"best val top-1 {100 * m['best_val_acc']:.2f}% (epoch {m['best_epoch']}/{m['epochs']}{early}), "
                   f"{m['wall_s']:.1f} s, {m['train_images_per_s']:.0f} img/s; run: {run}")


# what --resume may be given with; every other option must repeat the recorded value or be left out
RESUME_OPTIONS = {"run", "resume", "progress", "as_json"}


def _refuse_changed_options(ctx: typer.Context, run: Path) -> None:
    """--resume with an option whose value differs from the run's recorded config: exit 2, not ignored."""
    from cnnpack.train_resume import resume_conflicts

    params = {p.name: p for p in ctx.command.params}
    given = {name: ctx.params[name] for name in given_options(ctx, exclude=tuple(RESUME_OPTIONS))}
    conflicts = resume_conflicts(run, given) if given else {}
    if conflicts:
        shown = ", ".join(f"{as_flag(params[name], value)} (recorded: "
                          f"{'the default' if recorded is None else as_flag(params[name], recorded)})"
                          for name, (value, recorded) in conflicts.items())
        raise usage_error(f"--resume continues {run} with the options it was started with, but {shown}: "
                          f"drop the option, or start a new run (--force replaces this one)")


@app.command()
@handles_errors
def evaluate(
    run: Path = typer.Option(..., help="Run directory."),
    format: str = typer.Option("checkpoint", help="checkpoint | onnx | onnx_int8 | pt2 | torchscript | openvino | "
                                                    "openvino_int8 (each in its default runtime)."),
    data: Optional[str] = typer.Option(None, help="Dataset (default: the one the run was trained on, its validation "
                                                  "split; a folder of <class>/<images> it was not trained on, any of "
                                                  "the model's classes: every image, or every image of its val/ when "
                                                  "it has train/ and val/)."),
    device: str = typer.Option("auto", help="auto | cpu | cuda (ONNX on cuda: ONNX Runtime's CUDA provider)."),
    data_root: Optional[str] = typer.Option(None, help="Root folder for torchvision:NAME datasets (default: the "
                                                       "run's)."),
    download: bool = typer.Option(False, help="Let torchvision:NAME download (only when online)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Accuracy and confusion matrix of a checkpoint or an exported artifact.

    Example: cnnpack evaluate --run runs/demo --format onnx
    """
    from cnnpack.evaluate import evaluate as do_eval

    result = do_eval(run, fmt=format, data=data, device=device, data_root=data_root, download=download)
    emit(result, as_json)
    if not as_json:
        _print_eval(result)


def _print_eval(result: dict) -> None:
    from rich.console import Console
    from rich.measure import Measurement
    from rich.table import Table

    from cnnpack.errors import count

    classes, cm = result["classes"], result["confusion_matrix"]
    which = "validation images" if result.get("split", "validation") == "validation" else f"images (all of {result['data']})"
    skipped = result.get("skipped_files", 0)
    unread = f"; {count(skipped, 'unreadable file')} skipped" if skipped else ""
    typer.echo(f"{result['format']}: top-1 {100 * result['accuracy']:.2f}% on {result['images']} {which}{unread}")
    console = Console(markup=False)  # (a class name such as "cat [domestic]" is text, not rich's markup)
    t = Table()
    t.add_column("true \\ pred")
    for c in classes:
        t.add_column(c, justify="right")
    for c, row in zip(classes, cm):
        t.add_row(c, *[str(v) for v in row])
    # the confusion matrix where it fits the terminal; per class otherwise (a thousand classes, a narrow window): its
    # columns squeezed to a letter or two said nothing, and the matrix is in the written file
    wide = Measurement.get(console, console.options.update_width(1 << 16), t).maximum  # (unclamped to the window)
    if wide > console.width or len(classes) > 30:
        typer.echo("per class (the confusion matrix is in the file written):")
        t = Table()
        for name in ("class", "images", "top-1"):
            t.add_column(name, justify="left" if name == "class" else "right")
        for c, row, acc in zip(classes, cm, result["per_class_acc"]):
            t.add_row(c, str(sum(row)), "-" if acc is None else f"{100 * acc:.1f}%")
    else:
        typer.echo("confusion matrix (rows: the true class, columns: the predicted one):")
    console.print(t)
    if skipped:
        typer.echo(f"skipped {count(skipped, 'unreadable file')}, e.g. {result['skipped_examples'][0]}")
    typer.echo(f"written: {result['output']}")


