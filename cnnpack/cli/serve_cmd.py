"""`cnnpack serve`."""

from __future__ import annotations

import ipaddress
import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import typer

from cnnpack.cli.common import app, handles_errors, sigterm_as_interrupt, usage_error


@app.command()
@handles_errors
def serve(
    repository: Optional[Path] = typer.Option(None, help="Triton model repository (default: model_repository, "
                                              "or the one --run's triton stage wrote)."),
    run: Optional[Path] = typer.Option(None, help="Serve the repository of this run's `cnnpack triton` stage."),
    host: str = typer.Option("127.0.0.1", help="Address for HTTP, gRPC and metrics (0.0.0.0: every interface)."),
    http_port: int = typer.Option(8000, help="HTTP/REST port (0: any free port)."),
    grpc_port: int = typer.Option(8001, help="gRPC port (0: any free port)."),
    metrics_port: int = typer.Option(8002, help="Prometheus metrics port (0: any free port)."),
    backend_directory: Optional[Path] = typer.Option(
        None, help="Triton backends to use instead of cnnpack's Python-based CPU ones (e.g. native ones)."),
    log: Optional[Path] = typer.Option(None, help="Append the server's log to this file (kept after exit; its folder must exist)."),
    ready_timeout: float = typer.Option(180.0, help="Seconds to wait for the server and every model to be ready."),
    as_json: bool = typer.Option(False, "--json", help="Print URLs and models as JSON once ready."),
):
    """Serve a model repository with a real Triton Inference Server until Ctrl-C.

    Runs the tritonserver (2.51) of the nvidia-pytriton wheel, bound to loopback; ONNX, pt2, TorchScript and OpenVINO models are served by cnnpack's Python-based CPU backends, so the same repository runs unchanged in the NGC container (pt2 models: 26.06 or newer; 2.51 gets their config without the torch_aoti platform line). Prints the URLs and which backend serves each model.

    Example: cnnpack serve --repository model_repository

    Example (any free ports, keep the log): cnnpack serve --http-port 0 --grpc-port 0 --metrics-port 0 --log triton.log
    """
    from cnnpack.errors import StageFailed
    from cnnpack.serve import INTERRUPTED_GRACE_S, ServeConfig, TritonServer, repository_of

    if repository is not None and run is not None:
        raise usage_error("give --repository or --run, not both")
    repo = repository_of(run) if run is not None else str(repository or "model_repository")
    cfg = ServeConfig(repository=repo, host=host, http_port=http_port, grpc_port=grpc_port,
                      metrics_port=metrics_port, backend_directory=str(backend_directory) if backend_directory else None,
                      log_file=str(log) if log else None, log_append=True, ready_timeout_s=ready_timeout)
    server = TritonServer(cfg)
    with sigterm_as_interrupt(), server:
        try:  # a SIGTERM right after the last line printed (before wait) stops it the same way
            _report(server, as_json)
            code = server.wait()
        except KeyboardInterrupt:  # (caught here, so the block's end sees none: the short grace is given here)
            typer.echo(f"stopping Triton (pid {server.pid}) ...", err=True)
            server.stop(grace_s=INTERRUPTED_GRACE_S)  # not Triton's 20 s wait for a client's open connection
            return
    import signal

    if code < 0:  # (-9: a SIGKILL from outside, not an exit of its own; its log cannot say why)
        try:
            name = signal.Signals(-code).name
        except ValueError:  # a real-time signal (34-64) has no name
            name = f"signal {-code}"
        raise StageFailed(f"tritonserver (pid {server.pid}) was killed by {name}")
    raise StageFailed(f"tritonserver (pid {server.pid}) exited on its own with code {code}"
                      + (f"; see its log {log}" if log else "; rerun with --log FILE to see why"))


def _report(server, as_json: bool) -> None:
    from cnnpack.triton_publish import stale_preprocessing

    notes = stale_preprocessing(server.cfg.repository, [(m.name, m.version) for m in server.models])
    if as_json:
        typer.echo(json.dumps({"pid": server.pid, "version": server.version, "repository": server.cfg.repository,
                               "urls": server.urls, "models": [asdict(m) for m in server.models],
                               "notes": notes}, indent=2))
        return
    typer.echo(f"Triton {server.version} serving {server.cfg.repository} (pid {server.pid})")
    for kind, url in server.urls.items():
        typer.echo(f"  {kind:<8} {url}")
    width = max(len(m.name) for m in server.models) if server.models else 5
    for m in server.models:
        typer.echo(f"  model {m.name:<{width}}  v{m.version}  {m.state}  {m.served_by or m.platform or m.backend}")
    for note in notes:
        typer.echo(f"note: {note}", err=True)
    if not ipaddress.ip_address(server.cfg.host).is_loopback:  # (127.0.1.1, a Debian hostname's, is loopback)
        typer.echo(f"note: listening on {server.cfg.host}: reachable from other machines", err=True)
    typer.echo("Ctrl-C stops it.", err=True)
