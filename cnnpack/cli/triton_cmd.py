"""`cnnpack triton`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cnnpack.cli.common import app, emit, handles_errors, int_list
from cnnpack.errors import shell


def _sizes(text: Optional[str]) -> tuple[int, ...]:
    return int_list(text, "--preferred-batch-sizes") if text is not None else ()


@app.command()
@handles_errors
def triton(
    ctx: typer.Context,
    run: Path = typer.Option(..., help="Run directory with an export stage."),
    repository: Optional[Path] = typer.Option(None, help="Triton model repository to create or extend (default: the "
                                              "one the run's models were laid out in, else ./model_repository)."),
    name: Optional[str] = typer.Option(None, help="Model name, the folder in the repository (default: <arch>_<format>)."),
    format: str = typer.Option("onnx", help="onnx | onnx_int8 | pt2 | torchscript | openvino | openvino_int8: which artifact to serve."),
    device: str = typer.Option("cpu", help="cpu | gpu: instance group kind."),
    instances: int = typer.Option(1, help="Model instances (per GPU with --device gpu)."),
    max_batch_size: Optional[int] = typer.Option(None, help="max_batch_size in config.pbtxt (default: the artifact's max)."),
    preferred_batch_sizes: Optional[str] = typer.Option(None, help="Dynamic batcher's preferred sizes, e.g. 4,8."),
    max_queue_delay_us: int = typer.Option(100, help="How long the dynamic batcher waits to fill a batch."),
    dynamic_batching: bool = typer.Option(True, "--dynamic-batching/--no-dynamic-batching",
                                          help="Triton's dynamic batcher (off: each request runs alone)."),
    threads: int = typer.Option(0, help="CPU threads per instance (0: the runtime's default, all cores)."),
    tensorrt: Optional[bool] = typer.Option(None, "--tensorrt/--no-tensorrt",
                                            help="ONNX on GPU: ONNX Runtime's TensorRT accelerator (default: on)."),
    tensorrt_fp16: bool = typer.Option(False, help="TensorRT in FP16 (implies --tensorrt)."),
    warmup: bool = typer.Option(False, help="Warm the model up at load (zeros at batch 1, random at max)."),
    ensemble: bool = typer.Option(False, help="Also add <name>_image: encoded PNG/JPEG bytes -> labels."),
    force: bool = typer.Option(False, help="Replace a different model that already uses this name."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest section as JSON."),
):
    """Lay out a versioned Triton model repository for a run's exported model.

    Each new export becomes a new version folder (1/, 2/, ...); existing versions are never changed, and an unchanged artifact adds no version.

    Example: cnnpack triton --run runs/demo --ensemble --warmup
    """
    from cnnpack.errors import UserInputError
    from cnnpack.triton_repo import TritonConfig, build, default_repository

    given = ctx.get_parameter_source("max_queue_delay_us")
    if not dynamic_batching and getattr(given, "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP"):
        raise UserInputError("--max-queue-delay-us configures the dynamic batcher; drop it or drop "
                             "--no-dynamic-batching")
    cfg = TritonConfig(repository=str(repository or default_repository(run)), name=name, format=format, device=device, instances=instances,
                       max_batch_size=max_batch_size, preferred_batch_sizes=_sizes(preferred_batch_sizes),
                       max_queue_delay_us=max_queue_delay_us, dynamic_batching=dynamic_batching, threads=threads, tensorrt=tensorrt,
                       tensorrt_fp16=tensorrt_fp16, warmup=warmup, ensemble=ensemble, force=force)
    section = build(run, cfg)
    emit(section, as_json)
    if not as_json:
        _report(section, run)


def _report(s: dict, run: Path) -> None:
    where = Path(s["repository"]) / s["name"]
    if s["new_version"]:
        note = " (replaced the previous model of that name)" if s["replaced"] else ""
        typer.echo(f"{where}/{s['version']}  new version {s['version']} ({s['platform']}){note}")
    else:
        typer.echo(f"{where}/{s['version']}  unchanged: version {s['version']} already holds this artifact "
                   "(same sha256); no new version, config.pbtxt/labels.txt brought up to date")
    if "ensemble" in s:
        e = s["ensemble"]
        typer.echo(f"{Path(s['repository']) / e['name']}  ensemble: {e['input']} (encoded image bytes) -> "
                   f"{e['preprocess']} -> {s['name']} -> {e['output']}")
    if s.get("tune_replaced"):
        typer.echo(f"note: {s['tune_replaced']} now holds triton's settings, not the tuned ones; `cnnpack tune --run "
                   f"{shell(run)}` measures and writes them again", err=True)
    typer.echo(f"serve: cnnpack serve --run {shell(run)}  or  tritonserver --model-repository={shell(s['repository'])}")
    from cnnpack.triton_dist import ngc_image
    from cnnpack.triton_release import release_for

    why = release_for(s["repository"])[1]
    typer.echo(f"NGC container: {ngc_image(s['repository'])}" + (f" ({'; '.join(sorted(set(why.values())))})" if why else ""))
