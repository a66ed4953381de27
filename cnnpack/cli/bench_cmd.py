"""`cnnpack bench`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from cnnpack.cli.common import app, emit, handles_errors, int_list, name_list, served_options, usage_error
from cnnpack.errors import ratio


@app.command()
@handles_errors
def bench(
    run: Path = typer.Option(..., help="Run directory with exports (cnnpack export)."),
    runtimes: Optional[str] = typer.Option(None, help="Comma list of runtimes (default: every runtime whose artifact "
                                                      "the run has; the others are listed as skipped)."),
    batch_sizes: Optional[str] = typer.Option(None, help="Comma list of batch sizes (default 1,8,32, each within what the export takes; served: 1)."),
    threads: Optional[int] = typer.Option(None, help="Threads for every runtime (default: physical cores)."),
    max_seconds: float = typer.Option(10.0, help="Measurement time limit per runtime and batch size."),
    device: str = typer.Option("cpu", help="cpu | cuda | auto"),
    plot: bool = typer.Option(True, help="Write bench.png."),
    progress: bool = typer.Option(True, help="Show what is being measured."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest section as JSON."),
    artifacts: Optional[str] = typer.Option(None, help="Formats to measure, comma list (default: every recorded "
                                                       "one a runtime reads: onnxruntime runs onnx and onnx_int8)."),
    triton_url: Optional[str] = typer.Option(None, help="Measure the model served by Triton at HOST:PORT instead."),
    model: Optional[str] = typer.Option(None, help="With --triton-url: the served model (default: the run's triton stage's)."),
    protocol: str = typer.Option("http", help="With --triton-url: http | grpc (cnnpack's own client costs the server less over HTTP)."),
    concurrency: str = typer.Option("1,4,16", help="With --triton-url: requests in flight, comma list."),
    timeout: float = typer.Option(30.0, help="With --triton-url: seconds each request may take."),
    load_generator: str = typer.Option("auto", help="With --triton-url: perf_analyzer | cnnpack | auto (perf_analyzer "
                                                    "when on PATH, else cnnpack's own client)."),
):
    """Latency and throughput per runtime, artifact and batch size, beside the machine's ceiling for each precision.

    With --triton-url: a served model under closed-loop concurrent load (perf_analyzer-like), one row per batch size x concurrency, added to the run's bench results as runtime triton.

    Example: cnnpack bench --run runs/demo --runtimes eager,onnxruntime --batch-sizes 1,32 --threads 2

    Example (served): cnnpack bench --run runs/demo --triton-url 127.0.0.1:8000 --model cnn_onnx --concurrency 1,4,16
    """
    from cnnpack.bench import BenchConfig
    from cnnpack.bench import bench as do_bench
    from cnnpack.bench_served import ServedConfig, bench_served

    served_options(triton_url, model=(model, None), protocol=(protocol, "http"), concurrency=(concurrency, "1,4,16"),
                   timeout=(timeout, 30.0), load_generator=(load_generator, "auto"))
    for flag, value in (("--runtimes", runtimes), ("--artifacts", artifacts)):
        if triton_url and value is not None:  # they name local runtimes and files: the server's model is --model
            raise usage_error(f"{flag} is for a local bench; with --triton-url the served model is --model")
    if triton_url and device != "cpu":  # the server picks its devices (the model's instance groups)
        raise usage_error(f"--device {device} is for a local bench; with --triton-url the server runs the model on the "
                          "devices its config.pbtxt names")
    names = name_list(runtimes) if runtimes is not None else None
    sizes = int_list(batch_sizes, "--batch-sizes") if batch_sizes is not None else ((1,) if triton_url else (1, 8, 32))
    arts = name_list(artifacts) if artifacts is not None else None
    if arts == ():
        raise usage_error("--artifacts is empty; name at least one format (or leave the option out)")
    cfg = BenchConfig(runtimes=names, batch_sizes=sizes, fit_batch_sizes=batch_sizes is None, threads=threads,
                      max_seconds=max_seconds, device=device,
                      plot=plot, artifacts=arts)
    cfg.validate()
    with _status(progress and not as_json) as say:
        if triton_url:
            served = ServedConfig(url=triton_url, model=model, protocol=protocol, timeout_s=timeout,
                                  concurrency=int_list(concurrency, "--concurrency"), load_generator=load_generator)
            section = bench_served(run, served, cfg, progress=say)
        else:
            section = do_bench(run, cfg, progress=say)
    emit(section, as_json)
    if not as_json:
        _print_table(section)
        _print_cold_starts(section)
        _print_warnings(section)
        typer.echo("written: " + ", ".join(str(run / o["path"]) for o in section["outputs"].values()))


def _status(enabled: bool):
    """A live one-line status on stderr (what is being measured now); where stderr is a log file or a pipe, a line
    per phase as it starts (a live status would write nothing there until the end)."""
    import contextlib
    import sys

    from rich.console import Console

    if not enabled:
        return contextlib.nullcontext(lambda _: None)
    if not sys.stderr.isatty():
        return contextlib.nullcontext(lambda text: typer.echo(f"bench: measuring {text}", err=True))

    @contextlib.contextmanager
    def ctx():
        with Console(stderr=True).status("benchmarking") as st:
            yield lambda text: st.update(f"measuring {text}")

    return ctx()


def _print_cold_starts(section: dict) -> None:
    from cnnpack.bench_outputs import cold_starts

    if cold := cold_starts(section["results"]):
        typer.echo(f"cold start (load, then the first call at each batch size): {cold}")


def _print_warnings(section: dict) -> None:
    """What makes these numbers less than trustworthy, on stderr."""
    from cnnpack.bench_outputs import disturbances

    for name, why in section["skipped"].items():
        typer.echo(f"skipped {name}: {why}", err=True)
    if section.get("replaced"):
        typer.echo(f"replaced: the earlier rows {', '.join(section['replaced'])} (a bench's rows are measured together: to keep "
                   "them, measure them again in one bench: runtimes, artifacts and batch sizes, or a served model's "
                   "concurrencies)", err=True)
    for line in disturbances(section):
        typer.echo(line, err=True)


def _fmt(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _x(v) -> str:
    return "-" if v is None else ratio(v)


def _print_table(section: dict) -> None:
    from rich.table import Table

    from cnnpack.bench import series
    from cnnpack.cli.common import table_console

    def theory(c: dict) -> str:  # a GPU's ceilings have no ISA peak
        return f"; theoretical {c['theoretical_gflops']['gflops']:.0f}" if c.get("theoretical_gflops") else ""

    ceilings = "; ".join(f"{p} on {c.get('matrix_engine', '?')}: {c['gflops']:.0f} G(FL)OP/s ({c['best']}{theory(c)})"
                         for p, c in section.get("ceilings", {}).items())
    ceilings = ceilings or f"fp32 {section['machine_peak_gflops']:.0f} GFLOP/s"
    t = Table(title=f"{section['model']} on {section['device']}, {section['threads']} threads",
              caption=f"%mm: G(FL)OP/s as a share of this machine's measured matmul ceiling of the row's precision "
                      f"({ceilings}; model "
                      f"{section['model_gflops_per_image']:.3g} GFLOP/image). ×eager: eager p50 / p50; ×fp32: the same "
                      "runtime's fp32 artifact p50 / p50. MB: peak resident memory added by the runtime.")
    for col in ("runtime", "prec", "batch", "p50 ms", "p99 ms", "img/s", "G(FL)OP/s", "%mm", "×eager", "×fp32", "MB",
                "stable"):
        t.add_column(col, justify="left" if col in ("runtime", "prec") else "right")
    for r in section["results"]:
        t.add_row(series(r), r.get("precision", "fp32"), str(r["batch_size"]), _fmt(r["latency_ms_p50"], ".2f"),
                  _fmt(r["latency_ms_p99"], ".2f"), _fmt(r["throughput_ips"], ".1f"), _fmt(r["gflops"], ".1f"),
                  _fmt(100 * r["matmul_share"], ".0f"), _x(r["speedup_vs_eager"]), _x(r.get("speedup_vs_fp32")),
                  _fmt(r["peak_rss_mb"], ".0f"), "yes" if r["stable"] else "[red]no[/red]")
    table_console(130).print(t)
