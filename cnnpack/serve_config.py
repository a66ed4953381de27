"""What a Triton server is started with: `cnnpack serve`'s options, its ports, and tritonserver's command line (the
one source for `cnnpack serve` and the Kubernetes Deployment `cnnpack deploy` writes); and a served model as the
running server reports it."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cnnpack.errors import UserInputError
from cnnpack.ports import Ports, check_port, free_ports


# -- configuration and results ---------------------------------------------------------------------
@dataclass(frozen=True)
class ServeConfig:
    repository: str = "model_repository"
    host: str = "127.0.0.1"
    http_port: int = 0  # 0: any free port (the CLI defaults to Triton's 8000, 8001, 8002)
    grpc_port: int = 0
    metrics_port: int = 0
    backend_directory: str | None = None  # native Triton backends instead of cnnpack's Python-based ones
    log_file: str | None = None  # the server's log (default: a temporary file, removed on stop)
    log_append: bool = False  # a user's --log: appended to (an earlier file of theirs is kept), in a folder that exists
    ready_timeout_s: float = 180.0  # until every model is loaded
    stop_timeout_s: float = 30.0  # SIGTERM, then SIGKILL
    explicit: bool = False  # explicit model control: nothing loaded at start; clients load (with a config) and unload


@dataclass(frozen=True)
class ModelInfo:
    """One model of the repository as the running server reports it."""

    name: str
    version: str
    state: str  # READY | UNAVAILABLE | ...
    platform: str = ""
    backend: str = ""
    served_by: str = ""  # in words: which backend implementation runs it
    reason: str = ""  # why it is not READY


def resolve_ports(cfg: ServeConfig) -> Ports:
    """Explicit ports are checked (in use: UserInputError); 0 picks free ones."""
    for flag, value in (("--ready-timeout", cfg.ready_timeout_s), ("stop timeout", cfg.stop_timeout_s)):
        if not 0 < value < float("inf"):
            raise UserInputError(f"{flag} must be a number of seconds > 0, got {value}")
    wanted = {"http": cfg.http_port, "grpc": cfg.grpc_port, "metrics": cfg.metrics_port}
    for what, port in wanted.items():
        if not 0 <= port <= 65535:
            raise UserInputError(f"--{what}-port {port} is not a port number (0-65535; 0: any free port)")
        if port:
            check_port(cfg.host, port, what)
    taken = [p for p in wanted.values() if p]
    if len(set(taken)) != len(taken):
        raise UserInputError(f"--http-port, --grpc-port and --metrics-port must differ, got {wanted}")
    free = iter(p for p in free_ports(cfg.host, 6) if p not in taken)
    return Ports(**{w: p or next(free) for w, p in wanted.items()})


# -- the server's command line ------------------------------------------------------------------
def server_args(repository: str | Path, *, host: str, ports: Ports, explicit: bool = False,
                stop_timeout_s: float = 30.0, config_name: str | None = None, load: tuple[str, ...] = ()) -> list[str]:
    """tritonserver's flags, without the binary: the one source for `cnnpack serve` and `cnnpack deploy`.

    `cnnpack serve` runs `tritonserver` with these plus its local `--backend-directory`; the
    Kubernetes Deployment that `cnnpack deploy` writes runs exactly these in the NGC container (the
    repository at its in-container path or object-store URL, the ports 8000-8002, every address).

    Args:
        repository: the model repository as the server sees it (a path, or s3://, gs://, as://).
        host: the address HTTP, gRPC and metrics bind to.
        ports: the HTTP, gRPC and metrics ports.
        explicit: explicit model control (nothing loaded at start; clients load and unload) instead of
            loading every model of the repository at start.
        stop_timeout_s: how long the caller waits after SIGTERM before SIGKILL (a pod's grace period);
            the server gets two thirds of it to finish requests in flight.
        config_name: `<model>/configs/<name>.pbtxt` instead of config.pbtxt where a model has one.
        load: with `explicit`, the models loaded at start (`--load-model`): the others stay unloaded.
    """
    exit_timeout = max(1, int(stop_timeout_s * 2 / 3))  # leaves time to SIGKILL after it
    return [f"--model-repository={repository}",
            f"--http-address={host}", f"--http-port={ports.http}",
            f"--grpc-address={host}", f"--grpc-port={ports.grpc}",
            f"--metrics-address={host}", f"--metrics-port={ports.metrics}",
            f"--model-control-mode={'explicit' if explicit else 'none'}",
            "--strict-readiness=true",  # /v2/health/ready only once every model is: what callers and probes wait on
            # keep serving while a caller asks the server which model failed and why (it is then not ready)
            "--exit-on-error=false", f"--exit-timeout-secs={exit_timeout}",
            *([f"--model-config-name={config_name}"] if config_name else []),
            *(f"--load-model={m}" for m in (load if explicit else ()))]
