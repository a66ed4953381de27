"""`cnnpack quantize`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cnnpack.cli.common import app, emit, handles_errors


@app.command()
@handles_errors
def quantize(
    run: Path = typer.Option(..., help="Run directory with an fp32 ONNX export."),
    calibration_images: Optional[int] = typer.Option(None, help="Training-split images to calibrate on, a seeded "
                                                     "choice (default: 256, or the whole split when smaller)."),
    method: str = typer.Option("minmax", help="Calibration: minmax | entropy | percentile (onnxruntime; the "
                                              "openvino backend calibrates with NNCF's range estimators)."),
    max_drop: float = typer.Option(0.5, help="Accuracy gate: largest top-1 drop vs fp32 ONNX, percentage points."),
    min_agreement: float = typer.Option(0.99, help="Gate: top-1 agreement with fp32 ONNX on the validation split."),
    max_steps: int = typer.Option(8, help="Fallback: at most this many steps, each keeping one more node in float."),
    rank_images: int = typer.Option(64, help="Validation images used to rank nodes for the fallback."),
    time_limit: float = typer.Option(110.0, help="Seconds for the whole quantize; at the limit: the best attempt's "
                                                 "figures, exit 1, nothing recorded. An attempt under way at the "
                                                 "limit runs to its end, and is kept if it holds the gate."),
    data: Optional[str] = typer.Option(None, help="Data to calibrate and gate on (default: what the run was "
                                                  "trained on; needed for a run made by export --arch)."),
    seed: int = typer.Option(0, help="Seed of the calibration images' choice."),
    weight_type: str = typer.Option("auto", help="onnxruntime's int8 weights: int8 | uint8 | auto (uint8 on an x86 "
                                                 "CPU without VNNI, where u8 x s8 kernels saturate; else int8)."),
    backend: str = typer.Option("onnxruntime", help="onnxruntime: QDQ ONNX (model.int8.onnx) | openvino: NNCF int8 "
                                                     "IR (export/openvino_int8/, needs the openvino extra)."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest section as JSON."),
):
    """INT8 model calibrated on the run's own images (a QDQ ONNX model with ONNX Runtime, an NNCF OpenVINO IR with
    --backend openvino), kept only if top-1 drops <= --max-drop and agrees with fp32 on >= --min-agreement.

    Example: cnnpack quantize --run runs/demo --max-drop 0.5

    Exit 1 when no attempt meets the gate (the previous int8 model stays as it was).
    """
    from rich.console import Console

    from cnnpack.cli.common import usage_error
    from cnnpack.int8_gate import GateMissed
    from cnnpack.quantize import BACKENDS, QuantizeConfig, describe
    from cnnpack.quantize import quantize as do_quantize

    if backend not in BACKENDS:
        raise usage_error(f"--backend {backend!r}; valid: {', '.join(BACKENDS)}")
    cfg = QuantizeConfig(format=BACKENDS[backend], calibration_images=calibration_images, method=method, max_drop=max_drop,
                         min_agreement=min_agreement, max_steps=max_steps,
                         rank_images=rank_images, time_limit_s=time_limit, seed=seed, data=data,
                         weight_type=weight_type)
    cfg.validate()
    console = Console(stderr=True)
    try:
        if console.is_terminal:
            with console.status("quantizing") as st:
                section = do_quantize(run, cfg, progress=lambda text: st.update(f"quantizing: {text}"))
        else:  # a log file or a pipe: a line per step, so a long fallback is never silent
            section = do_quantize(run, cfg, progress=lambda text: typer.echo(f"quantize: {text}", err=True))
    except GateMissed as e:  # --json: the attempts (as recorded; at the time limit, not recorded), then the error
        if as_json:
            emit(e.section, True)
        raise
    emit(section, as_json)
    if not as_json:
        art = section["outputs"][cfg.format]
        typer.echo(f"{cfg.format:14s}{run / art['path']}")
        typer.echo(describe(section))
