"""`cnnpack report`."""

from __future__ import annotations

from pathlib import Path

import typer

from cnnpack.cli.common import app, emit, handles_errors


@app.command()
@handles_errors
def report(
    run: Path = typer.Option(..., help="Run directory: whatever stages it has (train at least)."),
    as_json: bool = typer.Option(False, "--json", help="Print the paths written as JSON."),
):
    """Write report.md and report.html from the run's manifest: what each stage recorded, with its plots.

    The pipeline writes the report at its end; run this after the stages run one by one (a verify, tune or
    deploy since) to bring it up to date. Nothing is measured again.

    Example: cnnpack report --run runs/demo
    """
    from cnnpack.report import write_report

    paths = write_report(run)
    emit(paths, as_json)
    if not as_json:
        typer.echo(f"{paths['html']}\n{paths['markdown']}")
