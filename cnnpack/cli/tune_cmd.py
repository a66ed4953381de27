"""`cnnpack tune`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from cnnpack.cli.common import app, emit, given_options, handles_errors, int_list, name_list, usage_error


@app.command()
@handles_errors
def tune(
    ctx: typer.Context,
    run: Path = typer.Option(..., help="Run directory with a Triton repository (`cnnpack triton`)."),
    latency_budget_ms: float = typer.Option(50.0, help="p99 latency budget per request, ms."),
    objective: str = typer.Option("throughput", help="throughput: most images/s within the budget | latency: "
                                                     "lowest p99."),
    concurrency: str = typer.Option("16", help="Requests in flight, comma list."),
    instances: str = typer.Option("1,2", help="Instance counts to try."),
    threads: str = typer.Option("1,2", help="Backend threads per instance to try."),
    queue_delays_us: str = typer.Option("0,500,2000", help="Dynamic batching queue delays to try (off is always tried)."),
    models: Optional[str] = typer.Option(None, help="Served models to sweep (default: every verified one)."),
    max_seconds: float = typer.Option(2.0, help="Measurement time per point."),
    time_limit: float = typer.Option(300.0, help="Time limit of the sweep, s (beyond it: coarse-to-fine)."),
    oversubscribe: bool = typer.Option(False, help="Allow instances x threads above the cores."),
    load_generator: str = typer.Option("auto", help="perf_analyzer | cnnpack | auto (perf_analyzer when on PATH)."),
    bf16: str = typer.Option("auto", help="OpenVINO models also with the bf16 inference hint: auto (where the CPU "
                                          "computes bf16 natively) | yes (also elsewhere, where OpenVINO "
                                          "computes them in f32: measured, never the winner) | no."),
    undo: bool = typer.Option(False, help="Restore the config.pbtxt(s) this run's tunes replaced, as they were before any tune, and stop."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest section as JSON."),
):
    """Sweep served configs on a local Triton (no restart between points); keep the best one for a p99 budget.

    Example: cnnpack tune --run runs/demo --latency-budget-ms 20

    Exit 1 when no point meets the budget (it names the lowest p99 seen); nothing is changed then.
    """
    from rich.console import Console

    from cnnpack.tune import tune as do_tune
    from cnnpack.tune_grid import TuneConfig
    from cnnpack.tune_handover import undo as do_undo
    from cnnpack.tune_outputs import describe

    if undo:  # it restores and stops: a sweep option beside it was taken in silence (a bad budget too)
        if extra := given_options(ctx, exclude=("run", "undo", "as_json")):
            raise usage_error(f"--undo restores the configs before any tune and stops; it takes no sweep options "
                              f"(drop {', '.join(extra.values())})")
        restored = do_undo(run)
        emit({"restored": restored}, as_json)
        for r in restored if not as_json else ():
            typer.echo(f"restored {r['config']} (from {r['previous']})")
        return
    cfg = TuneConfig(latency_budget_ms=latency_budget_ms, objective=objective,
                     concurrency=int_list(concurrency, "--concurrency"), instances=int_list(instances, "--instances"),
                     threads=int_list(threads, "--threads"), queue_delays_us=int_list(queue_delays_us, "--queue-delays-us"),
                     models=_models(models),
                     max_seconds=max_seconds, time_limit_s=time_limit, oversubscribe=oversubscribe,
                     load_generator=load_generator, bf16=bf16)
    cfg.validate()
    if not sys.stderr.isatty():  # a log file gets a line per step and per measured point, as they happen
        section = do_tune(run, cfg, progress=lambda text: typer.echo(f"tune: {text}", err=True))
    else:
        with Console(stderr=True).status("tuning") as st:
            section = do_tune(run, cfg, progress=lambda text: st.update(f"tuning: {text}"))
    emit(section, as_json)
    if not as_json:
        _table(section)
        typer.echo(describe(section))


def _table(section: dict) -> None:
    from rich.table import Table

    from cnnpack.cli.common import table_console

    sweep = section["sweep"]
    cut = f", cut at --time-limit: {len(section['points'])} of {sweep.get('planned', '?')} planned points" \
        if sweep.get("truncated") else ""
    t = Table(title=f"{len(section['points'])} served configs ({sweep['search']}{cut}, {sweep['wall_s']:.0f} s, "
                    f"server started {sweep.get('server_starts')}x)")
    for col in ("config", "precision", "c", "images/s", "p50 ms", "p99 ms", "batch", "stable"):
        t.add_column(col, justify="left" if col == "config" else "right")
    from cnnpack.tune_outputs import figure, role

    for p in sorted(section["points"], key=lambda p: -p["throughput_ips"]):
        said = role(section, p)  # a default kept as good: the faster point is not starred as the winner
        mark = {"winner": " ★", "": ""}.get(said, f" ({said.removeprefix('best measured, ')})")  # kept | not adopted
        t.add_row(p["label"] + mark, p.get("precision", "fp32") + (f" ({p['computed']} here)" if "computed" in p else ""),
                  str(p["concurrency"]), figure(p, "throughput_ips", "{:,.0f}"), f"{p['latency_ms_p50']:.2f}",
                  figure(p, "latency_ms_p99", "{:.2f}"), f"{p.get('server_batch_mean') or 0:.2f}",
                  "yes" if p["stable"] else "[red]no[/red]")
    table_console(110).print(t)  # (stdout, as bench and verify print theirs; progress goes to stderr)


def _models(text: str | None) -> tuple[str, ...] | None:
    """--models as names; an empty one is refused (an unset $MODELS in a script swept and rewrote every model)."""
    if text is None:
        return None
    names = name_list(text)
    if not names:
        raise usage_error("--models is empty; name at least one served model, or leave --models out for every one")
    return names
