"""`cnnpack infer`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from cnnpack.cli.common import app, given_options, handles_errors, usage_error
from cnnpack.errors import count

SERVER_OPTIONS = ("model", "url", "protocol", "ensemble", "timeout")
LOCAL_OPTIONS = ("run", "fmt", "device")


@app.command()
@handles_errors
def infer(
    ctx: typer.Context,
    images: list[Path] = typer.Argument(..., help="Image files (PNG, JPEG, ...) to classify; a folder stands for the image files under it."),
    model: Optional[str] = typer.Option(None, help="The served classifier's name (e.g. cnn_onnx; see `cnnpack serve`)."),
    run: Optional[Path] = typer.Option(None, help="Classify here, without a server: the run's artifact (see --format)."),
    fmt: Optional[str] = typer.Option(None, "--format", help="With --run: onnx, onnx_int8, pt2, torchscript, openvino, openvino_int8 or checkpoint (default: onnx where exported, else checkpoint)."),
    device: str = typer.Option("auto", help="With --run: auto | cpu | cuda."),
    url: Optional[str] = typer.Option(None, help="Triton's HOST:PORT (default 127.0.0.1:8000 for http, :8001 for grpc)."),
    protocol: str = typer.Option("http", help="http | grpc"),
    top_k: int = typer.Option(1, help="Labels per image, best first (Triton's classification extension); at most the model's class count."),
    ensemble: bool = typer.Option(False, help="Send the encoded files to <model>_image; the server decodes them."),
    timeout: float = typer.Option(30.0, help="Seconds each request may take."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON."),
):
    """Classify image files through a Triton server (--model), or here with a run's artifact (--run): one line `FILE  label score` per image.

    The model's input size comes from the server's model config (with --run: the run's); images are resized here like the training data and sent as raw 0-255 FP32 NCHW (with --ensemble: as encoded bytes). Scores are logits. Unreadable images are skipped and named on stderr; the rest are still classified.

    Example: cnnpack infer cat.png dog.jpg --model cnn_onnx --top-k 3

    Example (every image under a folder): cnnpack infer photos/ --model cnn_onnx

    Example (gRPC, server-side decoding): cnnpack infer *.png --model cnn_onnx --protocol grpc --ensemble

    Example (no server: the run's ONNX file in ONNX Runtime): cnnpack infer photos/ --run runs/demo --top-k 3
    """
    given = given_options(ctx)
    if (model is None) == (run is None):
        raise usage_error("give --model NAME (a served classifier) or --run DIR (classify here, without a server)"
                          if model is None else "--model classifies through a server, --run here: give one of them")
    if wrong := [given[n] for n in (SERVER_OPTIONS if run is not None else LOCAL_OPTIONS) if n in given]:
        raise usage_error(f"{', '.join(wrong)} {'goes' if len(wrong) == 1 else 'go'} with "
                          f"{'--model (a served classifier)' if run is not None else '--run (classifying here)'}")

    answered: dict[str, list] = {"results": [], "skipped": []}

    def shown(results: list[dict], skipped: list[dict]) -> None:  # each chunk as it is answered
        answered["results"] += results
        answered["skipped"] += skipped
        for s in skipped:
            typer.echo(f"skipped {s['file']}: {s['reason']}", err=True)
        if as_json or not results:
            return
        from rich.cells import cell_len  # (a wide letter, 日 or an emoji, takes two columns of a terminal)

        width = max(cell_len(r["file"]) for r in results)
        for r in results:
            labels = "  ".join(f"{t['label']} {t['score']:.4f}" for t in r["top"])
            typer.echo(f"{r['file']}{' ' * (width - cell_len(r['file']))}  {labels}")

    from cnnpack.errors import CnnpackError

    try:
        if run is not None:
            from cnnpack.infer_local import infer_local

            result = infer_local(images, run, fmt=fmt, device=device, top_k=top_k, on_results=shown)
        else:
            from cnnpack.infer import InferConfig
            from cnnpack.infer import infer as do_infer

            cfg = InferConfig(model=model, url=url, protocol=protocol, top_k=top_k, ensemble=ensemble,
                              timeout_s=timeout)
            result = do_infer(images, cfg, on_results=shown)
    except (CnnpackError, KeyboardInterrupt) as e:
        if as_json and (answered["results"] or answered["skipped"]):  # what was answered before (text mode printed it chunk by chunk)
            error = "interrupted" if isinstance(e, KeyboardInterrupt) else str(e)
            typer.echo(json.dumps({"complete": False, "error": error, **answered}, indent=2))
        raise
    if left := result["left_out"]:
        typer.echo(f"left out {count(len(left), 'file')} of the folders without an image suffix (e.g. {left[0]}); "
                   "name a file to send it whatever its suffix", err=True)
    if as_json:
        typer.echo(json.dumps({"complete": True, **result}, indent=2))
