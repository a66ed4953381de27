"""`cnnpack export`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import typer

from cnnpack import user_model
from cnnpack.cli.common import app, default_run_dir, emit, handles_errors, name_list, usage_error


@app.command()
@handles_errors
def export(
    ctx: typer.Context,
    run: Optional[Path] = typer.Option(None, help="Run directory (with --arch: the new run to create)."),
    format: str = typer.Option("all", help="onnx | pt2 | torchscript | openvino | all (or a comma list; all takes "
                                           "openvino when the openvino extra is installed and pt2 when a C++ "
                                           "compiler is found). pt2: torch.export + AOTInductor package, "
                                           "TorchScript's successor (torchscript is deprecated upstream)."),
    exporter: str = typer.Option("dynamo", help="ONNX exporter: dynamo (torch.export-based) | legacy."),
    opset: int = typer.Option(18, help="ONNX opset (18 loads in the ONNX Runtime of Triton >= 23.02)."),
    max_batch_size: int = typer.Option(64, help="Largest batch the dynamic batch dim accepts."),
    static_batch: Optional[int] = typer.Option(None, help="Export a fixed batch size instead."),
    simplify: bool = typer.Option(False, help="Run onnxslim on the ONNX graph."),
    torchscript_mode: str = typer.Option("trace", help="trace | script"),
    input: str = typer.Option("raw", help="raw: 0-255 pixels, normalised in-graph | normalized: bare network."),
    half: bool = typer.Option(False, help="fp16 artifacts for GPU targets (needs --device cuda)."),
    device: str = typer.Option("cpu", help="cpu | cuda: where the model is traced (pt2: compiled for; it runs there)."),
    arch: Optional[str] = typer.Option(None, help="Export without training: any torchvision classifier, cnn, or your own network FILE.py:NAME (with --weights: weights you trained)."),
    num_classes: Optional[int] = typer.Option(None, help="With --arch: number of classes (default: as many as --classes names)."),
    image_size: Optional[int] = typer.Option(None, help="With --arch: input size in pixels (default 224)."),
    classes: Optional[str] = typer.Option(None, help="With --arch: comma-separated class names."),
    pretrained: bool = typer.Option(False, help="With --arch: torchvision weights (must be reachable)."),
    weights: Optional[Path] = typer.Option(None, help="With --arch: a state-dict file for that arch."),
    mean: Optional[str] = typer.Option(None, help="With --arch: the per-channel RGB mean (0-1) the weights were trained with, normalised by inside the graph (default ImageNet's 0.485,0.456,0.406; a tutorial's Normalize((0.5,)*3, ...): 0.5,0.5,0.5)."),
    std: Optional[str] = typer.Option(None, help="With --arch: the per-channel RGB std (0-1) the weights were trained with (default ImageNet's 0.229,0.224,0.225)."),
    force: bool = typer.Option(False, help="With --arch: replace a run that exists in --run."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest section as JSON."),
):
    """Export a run's model to ONNX, pt2 (torch.export + AOTInductor), TorchScript, OpenVINO (raw RGB 0-255 in, logits out).

    Example: cnnpack export --run runs/demo --format onnx,pt2

    Example (no training): cnnpack export --arch resnet18 --num-classes 10 --image-size 224 --run runs/r18
    """
    from rich.console import Console

    from cnnpack.export import EXPORTERS, TORCHSCRIPT_DEPRECATED, ExportConfig, create_run
    from cnnpack.export import export as do_export
    from cnnpack.openvino import available
    from cnnpack.pt2 import compiler_available

    # all: openvino when the extra is installed, pt2 when a C++ compiler is there (said below when it is not)
    usable = {"openvino": available(), "pt2": compiler_available()}
    every = [f for f in EXPORTERS.names() if usable.get(f, (True, ""))[0]]
    formats = tuple(every) if format == "all" else name_list(format)
    unknown = [f for f in formats if f not in EXPORTERS] if formats else [format]
    if unknown:
        raise usage_error(f"--format {unknown[0]!r}; valid: {', '.join(EXPORTERS.names())}, all (or a comma list)")
    given = getattr(ctx.get_parameter_source("max_batch_size"), "name", "DEFAULT")
    if static_batch is not None and given not in ("DEFAULT", "DEFAULT_MAP"):
        raise usage_error("--max-batch-size bounds the dynamic batch dimension, which --static-batch replaces; give one "
                          "of them")
    cfg = ExportConfig(formats=formats, exporter=exporter, opset=opset, max_batch_size=max_batch_size,
                       static_batch=static_batch, simplify=simplify, torchscript_mode=torchscript_mode,
                       input=input, half=half, device=device)
    cfg.validate()
    if arch is not None:
        names = [c.strip() for c in classes.split(",")] if classes else None
        if num_classes is None and names is None:
            raise usage_error("--arch needs --num-classes K (or --classes NAME,NAME,...)")
        num_classes = len(names) if num_classes is None else num_classes
        run = run or default_run_dir(user_model.label(arch))
        create_run(run, arch=arch, num_classes=num_classes, image_size=image_size or 224, classes=names,
                   pretrained=pretrained, weights=str(weights) if weights else None, force=force,
                   mean=_channels("--mean", mean), std=_channels("--std", std))
    else:
        given = [flag for flag, v in (("--num-classes", num_classes), ("--image-size", image_size),
                                      ("--classes", classes), ("--pretrained", pretrained or None),
                                      ("--weights", weights), ("--force", force or None), ("--mean", mean),
                                      ("--std", std)) if v is not None]
        if given:
            raise usage_error(f"{given[0]} goes with --arch (a model made from flags); without --arch the run's own model "
                              "is exported")
        if run is None:
            raise usage_error("--run DIR is required (or --arch ... to export without training)")
    console = Console(stderr=True)
    if console.is_terminal:
        with console.status("exporting") as st:
            section = do_export(run, cfg, progress=lambda text: st.update(f"exporting {text}"))
    else:  # a log file or a pipe: a line per format, so a pt2 compile of a minute is not silent
        section = do_export(run, cfg, progress=lambda text: typer.echo(f"export: {text}", err=True))
    emit(section, as_json)
    if not as_json:
        for fmt in formats:
            a = section["artifacts"][fmt]
            shape = "x".join("N" if d == -1 else str(d) for d in a["input"]["shape"])
            took = "kept: unchanged" if fmt in section.get("kept", ()) else f"{a['export_s']:.1f} s"
            typer.echo(f"{fmt:12s} {run / a['path']}  input {a['input']['name']} {shape} {a['input']['dtype']}"
                       f"  ({took})")
        if "torchscript" in formats:
            typer.echo(f"note: {TORCHSCRIPT_DEPRECATED}")
        if format == "all" and not usable["pt2"][0]:
            typer.echo(f"note: pt2 skipped: {usable['pt2'][1]}", err=True)
        typer.echo(f"reproduce: {run / 'export/reproduce.sh'}")


def _channels(flag: str, text: str | None) -> tuple[float, float, float] | None:
    """--mean / --std: one number per RGB channel on the 0-1 scale, or one for all three (a grayscale data set's
    Normalize((0.1307,), (0.3081,))); a std above 0."""
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    values = values * 3 if len(values) == 1 else values
    low = 0.0 if flag == "--mean" else 1e-6
    if len(values) != 3 or not all(math.isfinite(v) and low <= v <= 1 for v in values):
        raise usage_error(f"{flag} {text!r}: three numbers, one per RGB channel (or one for all), on the 0-1 scale "
                          + ("(each above 0)" if flag == "--std" else "(0 to 1)") + ", e.g. 0.5,0.5,0.5")
    return values
