"""`cnnpack pipeline`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cnnpack.cli.common import app, emit, given_options, handles_errors, int_list, name_list, usage_error
from cnnpack.errors import ratio, shell


def _names(text: str) -> tuple[str, ...]:
    return name_list(text)


@app.command()
@handles_errors
def pipeline(
    ctx: typer.Context,
    data: str = typer.Option("shapes", help="shapes | PATH (ImageFolder) | torchvision:NAME"),
    arch: str = typer.Option("cnn", help="cnn, any torchvision classifier (resnet18, mobilenet_v3_small, ...), or your own network: FILE.py:NAME (a class or function there returning an nn.Module; given num_classes when it takes it)"),
    run: Optional[Path] = typer.Option(None, help="Run directory (default: runs/pipeline-<data>-<arch>-<size>px)."),
    image_size: int = typer.Option(64, help="Square input size in pixels."),
    epochs: int = typer.Option(8, help="Training epochs."),
    batch_size: int = typer.Option(64, min=2, help="Training batch size."),
    seed: int = typer.Option(0, min=0),
    device: str = typer.Option("auto", help="Training device: auto | cpu | cuda."),
    data_root: Optional[str] = typer.Option(None, help="Root folder for torchvision:NAME datasets."),
    val_fraction: Optional[float] = typer.Option(None, help="Held-out share when --data PATH has no train/val "
                                                            "folders (default 0.2, as train)."),
    download: Optional[bool] = typer.Option(None, "--download", help="Let torchvision:NAME download (only when online)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (default as train: 1e-2)."),
    patience: Optional[int] = typer.Option(None, help="Early stopping: epochs without a val-accuracy gain (default 4)."),
    amp: Optional[bool] = typer.Option(None, "--amp/--no-amp", help="Mixed-precision training (default on, as train: "
                                                                   "bf16 on a CPU with native bf16; --no-amp: fp32)."),
    channels_last: Optional[bool] = typer.Option(None, "--channels-last/--no-channels-last",
                                                 help="NHWC memory layout in training (default: on)."),
    pretrained: Optional[bool] = typer.Option(None, "--pretrained", help="Start from torchvision weights (needs "
                                                                         "them reachable)."),
    formats: str = typer.Option("onnx,torchscript", help="Export formats (onnx is required: it is served); pt2 and "
                                                         "openvino join by --pt2 and --openvino."),
    max_batch_size: int = typer.Option(64, help="Largest batch the exported models accept."),
    int8: bool = typer.Option(True, "--int8/--no-int8", help="Quantize: an int8 ONNX model under the accuracy gate."),
    calibration_images: Optional[int] = typer.Option(None, help="Training images to calibrate int8 on (default: "
                                                     "256, or the whole training split when smaller)."),
    max_drop: float = typer.Option(0.5, help="With --int8: largest top-1 drop vs fp32, percentage points."),
    min_agreement: float = typer.Option(0.99, help="With --int8: least top-1 agreement of int8 with fp32 "
                                                   "(quantize's gate) and with eager (verify's int8 contract)."),
    verify_min_agreement: float = typer.Option(0.999, help="Verify: least top-1 agreement with eager on the "
                                                           "validation split (bf16/fp16: their contract's, where lower)."),
    runtimes: Optional[str] = typer.Option(None, help="Runtimes to benchmark (default: eager, compiled and the "
                                                       "runtime of each exported format)."),
    batch_sizes: Optional[str] = typer.Option(None, help="Benchmark batch sizes (default 1,32, within --max-batch-size)."),
    max_seconds: float = typer.Option(4.0, help="Benchmark time limit per runtime and batch size."),
    threads: Optional[int] = typer.Option(None, help="Threads for every benchmarked runtime (default: physical cores, as bench)."),
    repository: Optional[Path] = typer.Option(None, help="Triton model repository to lay out (default: the one the "
                                              "run's models were laid out in, else ./model_repository)."),
    openvino: str = typer.Option("auto", help="OpenVINO IR (fp32, bf16 inference, NNCF int8) through every stage: "
                                               "auto (when the openvino extra is installed) | yes | no."),
    pt2: Optional[str] = typer.Option(None, help="The pt2 package (torch.export + AOTInductor, in the aoti runtime) "
                                                 "through every stage: auto (when a C++ compiler is found) | yes | no. "
                                                 "Default: no, unless --formats names pt2 (its compile would take "
                                                 "the main job past 150 s on 2 cores)."),
    tune_budget_ms: Optional[float] = typer.Option(None, help="Add the tune stage: sweep served configs and keep the "
                                                              "best one for this p99 budget (ms), after served."),
    serve: str = typer.Option("auto", help="Serve, infer, verify and bench on a local Triton server: "
                                           "auto (when the serve extra runs here) | yes | no."),
    concurrency: str = typer.Option("1,4,16", help="Concurrent requests when benchmarking the served model."),
    infer_images: int = typer.Option(8, help="Validation images classified through the served model."),
    force: bool = typer.Option(False, help="Redo every stage, even those whose inputs are unchanged."),
    progress: bool = typer.Option(True, help="Show live progress."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
):
    """Train, export, quantize (int8), verify, benchmark and package for Triton in one go, then write report.md/report.html.

    Stages whose inputs are unchanged since their last successful run are skipped; --force redoes them.

    With the serve extra installed, also serves the model on loopback, classifies a few images through it, and verifies and benchmarks the served model.

    Example: cnnpack pipeline

    Example: cnnpack pipeline --data ~/flowers --arch resnet18 --image-size 128 --epochs 4
    """
    from cnnpack.pipeline import PipelineConfig
    from cnnpack.pipeline import pipeline as do_pipeline

    if not int8 and (gate := [f for n, f in given_options(ctx).items()
                              if n in ("max_drop", "min_agreement", "calibration_images")]):
        raise usage_error(f"{', '.join(gate)} {'sets' if len(gate) == 1 else 'set'} the int8 gate, which --no-int8 "
                          "leaves out; drop one or the other")

    sizes = (int_list(batch_sizes, "--batch-sizes") if batch_sizes is not None
             else tuple(sorted({min(b, max(max_batch_size, 1)) for b in (1, 32)})))  # the defaults, within the export
    cfg = PipelineConfig(data=data, arch=arch, image_size=image_size, epochs=epochs, batch_size=batch_size, seed=seed,
                         device=device, data_root=data_root, val_fraction=val_fraction, download=download, lr=lr,
                         patience=patience, amp=amp, channels_last=channels_last, pretrained=pretrained, formats=_names(formats), max_batch_size=max_batch_size,
                         int8=int8, calibration_images=calibration_images, max_drop=max_drop,
                         min_agreement=min_agreement, verify_min_agreement=verify_min_agreement,
                         bench_runtimes=_names(runtimes) if runtimes is not None else None, bench_batch_sizes=sizes,
                         bench_max_seconds=max_seconds, threads=threads, repository=str(repository) if repository else None, serve=serve, openvino=openvino, pt2=pt2,
                         tune_budget_ms=tune_budget_ms,
                         concurrency=int_list(concurrency, "--concurrency"), infer_images=infer_images)
    # stage lines go to stderr, so that stdout holds only the summary (the JSON with --json)
    result = do_pipeline(run, cfg, force=force, progress=progress and not as_json,
                         say=lambda text: typer.echo(text, err=True))
    emit(result, as_json)
    if not as_json:
        print_summary(result)


def print_summary(s: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="cnnpack pipeline", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    if s["accuracy"] is not None:
        t.add_row("accuracy", f"{100 * s['accuracy']:.2f}% validation top-1")
    if s["parity_passed"] is not None:
        from cnnpack.precision import parity_line

        t.add_row("parity", parity_line(s.get("parity", [])))
    for row in s.get("precision", []):
        fast = f"{ratio(row['speedup_vs_fp32'])} fp32 ONNX Runtime" if row.get("speedup_vs_fp32") else "-"
        top1 = f"{100 * row['top1']:.2f}%" if row.get("top1") is not None else "-"
        drop = f" (drop {row['drop_pt']:+.2f} pt)" if row.get("drop_pt") is not None else ""
        size = f" {row['size_mb']:.2f} MB" if row.get("size_mb") else ""
        speed = (f", {row['images_per_s']:,.0f} images/s at batch {row['batch_size']}, {fast}"
                 if row.get("images_per_s") else "")
        t.add_row(row["precision"], f"{row['artifact']} in {row['runtime']}{size}: top-1 {top1}{drop}{speed}")
    b = s["best_runtime"]
    if b:
        name = b["runtime"] + ("" if b.get("precision", "fp32") == "fp32" else f" {b['precision']}")
        t.add_row("fastest", f"{name} at batch {b['batch_size']}: {ratio(b['speedup_vs_eager'])} eager"
                             + ("†" if b.get("shaky") else "")
                             + f", {b['latency_ms_p50']:.2f} ms p50, {b['throughput_ips']:,.0f} images/s"
                             + (" († measured unsteadily or beside other work: see caution)" if b.get("shaky") else ""))
    if s["repository"]:
        t.add_row("triton", f"{s['repository']} ({', '.join(s['models'])})")
        t.add_row("serve it", f"cnnpack serve --repository {shell(s['repository'])}")
    if s.get("bench_disturbed"):
        t.add_row("caution", "bench: " + "; ".join(s["bench_disturbed"]))
    if s["served"]:
        t.add_row("served", s["served"])
    if s.get("tuned"):
        t.add_row("tuned", s["tuned"])
    ran = [o["name"] for o in s["stages"] if o["status"] == "ran"]
    skipped = [o["name"] for o in s["stages"] if o["status"] == "skipped"]
    t.add_row("stages", f"ran: {', '.join(ran) or 'none'}; skipped (unchanged): {', '.join(skipped) or 'none'}")
    t.add_row("report", f"{s['report']['markdown']}  ·  {s['report']['html']}")
    t.add_row("time", f"{s['wall_s']:.0f} s")
    Console(markup=False).print(t)  # (a path or class name holding [x] is text, not rich's markup)
