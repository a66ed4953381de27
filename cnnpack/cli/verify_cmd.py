"""`cnnpack verify`."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import typer

from cnnpack.cli.common import app, emit, handles_errors, int_list, name_list, served_options, usage_error
from cnnpack.errors import shell


@app.command()
@handles_errors
def verify(
    run: Path = typer.Option(..., help="Run directory with exports (cnnpack export)."),
    formats: Optional[str] = typer.Option(None, help="Comma list of onnx, onnx_int8, pt2, torchscript, openvino, "
                                                   "openvino_int8 (default: every export of the run)."),
    batch_sizes: Optional[str] = typer.Option(None, help="Comma list (default 1,8,32 within the export's max batch)."),
    samples: int = typer.Option(32, help="Random raw-pixel images per batch size (rounded up to whole batches)."),
    atol: float = typer.Option(1e-4, help="Absolute tolerance: an element passes within atol OR rtol."),
    rtol: float = typer.Option(1e-3, help="Relative tolerance (relative to eager's value)."),
    min_agreement: float = typer.Option(0.999, help="Least share of validation images classified as eager does."),
    int8_min_agreement: Optional[float] = typer.Option(None, help="The same for int8 artifacts (their contract: task "
                                                                "parity; default: the quantize gate each was made "
                                                                "under, else 0.99)."),
    data: Optional[str] = typer.Option(None, help="Dataset for task parity (default: the run's own)."),
    device: str = typer.Option("cpu", help="Where eager and TorchScript run: cpu | cuda | auto (a pt2 package runs where it was compiled)."),
    seed: int = typer.Option(0, help="Seed of the random input batches."),
    triton_url: Optional[str] = typer.Option(None, help="Also check a model served by Triton at HOST:PORT."),
    model: Optional[str] = typer.Option(None, help="With --triton-url: the served model (default: the run's triton stage's)."),
    protocol: str = typer.Option("http", help="With --triton-url: http | grpc."),
    timeout: float = typer.Option(30.0, help="With --triton-url: seconds each request may take."),
    progress: bool = typer.Option(True, help="Show what is being checked."),
    as_json: bool = typer.Option(False, "--json", help="Print verify.json's content as JSON."),
):
    """Prove every exported artifact computes what the eager PyTorch model computes (exit 1 if not).

    Tensor parity on random raw-pixel batches and real validation images, task parity (top-1 agreement) over the whole validation set, for every runtime that reads each artifact.

    With --triton-url the served model is one more target, checked exactly like a file and recorded as triton:<model>.

    Example: cnnpack verify --run runs/demo --formats onnx,torchscript --batch-sizes 1,8,32

    Example (a served model): cnnpack verify --run runs/demo --triton-url 127.0.0.1:8000 --model cnn_onnx
    """
    from cnnpack.verify import VerifyConfig, VerifyFailed, served_target
    from cnnpack.verify import verify as do_verify

    fmts = name_list(formats) if formats is not None else None
    if fmts == ():
        raise usage_error("--formats is empty; name at least one format (onnx, torchscript)")
    cfg = VerifyConfig(formats=fmts, batch_sizes=int_list(batch_sizes, "--batch-sizes") if batch_sizes is not None else None,
                       samples=samples, atol=atol, rtol=rtol, min_agreement=min_agreement,
                       int8_min_agreement=int8_min_agreement, device=device,
                       data=data, seed=seed)
    cfg.validate()
    served_options(triton_url, model=(model, None), protocol=(protocol, "http"), timeout=(timeout, 30.0))
    targets = (served_target(run, triton_url, model, protocol, timeout),) if triton_url else ()
    try:
        with _status(progress and not as_json) as say:
            result = do_verify(run, cfg, targets=targets, progress=say)
    except VerifyFailed as e:  # show the figures, then exit 1 with the one-line error
        _show(e.result, run, as_json)
        raise
    _show(result, run, as_json)


def _show(result: dict, run: Path, as_json: bool) -> None:
    emit(result, as_json)
    if as_json:
        return
    from cnnpack.cli.common import table_console

    table_console(30 + 18 * (len(result["results"]) + len(result["skipped"]))).print(parity_table(result))
    for skip in result["skipped"]:
        typer.echo(f"skipped: {skip['format']} in {skip['reason']}")
    if result["note"]:
        typer.echo(f"note: {result['note']}")
    if result.get("kept"):
        typer.echo(f"kept: the earlier verdicts of {', '.join(result['kept'])} (artifacts unchanged; not checked again)")
    if result.get("dropped"):
        typer.echo("dropped: the earlier verdicts of " + ", ".join(f"{d['format']} in {d['runtime']} ({d['reason']})"
                                                                  for d in result["dropped"])
                   + f"; check them again with `cnnpack verify --run {shell(run)}`")
    failed = [f"{r['format']} ({r['runtime']})" for r in result["results"] if not r["passed"]]
    verdict = f"FAILED: {', '.join(failed)}" if failed else "PASSED: every artifact checked matches eager"
    typer.echo(f"{verdict}; written: {run / 'verify.json'}")


def _status(enabled: bool):
    """A live one-line status on stderr (what is being checked now)."""
    from rich.console import Console

    if not enabled:
        return contextlib.nullcontext(lambda _: None)

    @contextlib.contextmanager
    def ctx():
        with Console(stderr=True).status("verifying") as st:
            yield lambda text: st.update(f"verifying {text}")

    return ctx()


def _e(v) -> str:
    return "-" if v is None else "0" if v == 0 else f"{v:.1e}"


def _up(v) -> str:
    """A tolerance that passes, rounded up (never printed below what is needed)."""
    from cnnpack.contracts import at_least

    return "-" if v is None else "0" if v == 0 else at_least(v)


def _pct(v, signed: bool = False) -> str:
    return "-" if v is None else f"{100 * v:+.2f}" if signed else f"{100 * v:.2f}"


def _verdict(ok: bool) -> str:
    return "[green]pass[/green]" if ok else "[red]FAIL[/red]"


def _tensor_rows(result: dict) -> list[tuple[str, callable]]:
    cos = lambda t: "-" if t.get("cosine_sim_min") is None else f"{t['cosine_sim_min']:.6f}"  # noqa: E731
    return [
        ("max abs err", lambda t: _e(t.get("max_abs_err"))),
        ("mean abs err", lambda t: _e(t.get("mean_abs_err"))),
        ("p99 abs err", lambda t: _e(t.get("p99_abs_err"))),
        ("max rel err", lambda t: _e(t.get("max_rel_err"))),
        ("cosine sim (min)", cos),
        ("atol to pass", lambda t: _up(t.get("min_atol_to_pass"))),
        ("rtol to pass", lambda t: _up(t.get("min_rtol_to_pass"))),
        ("NaN/Inf", lambda t: str(t.get("nonfinite", "-"))),
    ]


def _tensor_verdict(r: dict) -> str:
    """Against the tolerances of the result's own precision contract; int8's tensor error is not gated."""
    t, tol = r["tensor"], r.get("tolerance") or {}
    if not t:
        return "[red]FAIL[/red] (shape)"
    if not tol.get("tensor_gated", True):
        return "reported"
    return f"{_verdict(t['outside_tolerance'] == 0)} ({tol.get('atol', 0):.0e}|{tol.get('rtol', 0):.0e})"


def _task_verdict(r: dict) -> str:
    from cnnpack.contracts import drop_within, gated_agreement

    k, tol = r["task"], r.get("tolerance") or {}
    if not k:
        return "-"
    ok = gated_agreement(k) >= tol.get("min_agreement", 0)
    if tol.get("max_drop_pt") is not None:
        ok = ok and drop_within(-100 * k["accuracy_delta"], tol["max_drop_pt"])
    counted = f"{_pct(gated_agreement(k))}% " if k.get("top1_tie_disagreements") else ""  # the ties left out
    return f"{_verdict(ok)} ({counted}>= {100 * tol.get('min_agreement', 0):g}%)"


def _task_rows(result: dict) -> list[tuple[str, callable]]:
    return [
        ("top-1 %", lambda k: _pct(k.get("accuracy"))),
        ("Δ vs eager (pp)", lambda k: _pct(k.get("accuracy_delta"), signed=True)),
        ("agreement %", lambda k: _pct(k.get("top1_agreement"))),
        ("images differ", lambda k: str(k.get("top1_disagreements", "-")) + (
            f" ({k['top1_tie_disagreements']} ties)" if k.get("top1_tie_disagreements") else "")),
    ]


def parity_table(result: dict):
    """One column per artifact x runtime (skipped ones too), one row per figure, as Polygraphy lists them."""
    from rich import box
    from rich.table import Table

    runs, skipped, cfg = result["results"], result["skipped"], result["config"]
    kept = set(result.get("kept") or ())  # an earlier verify's verdicts: checked with that verify's settings
    sizes = ", ".join(str(b) for b in sorted({b for r in runs if r["format"] not in kept for b in r["batch_sizes"]}))
    val = f" + {result['data']['images']} validation images" if result["data"] else ""
    task = (f"; task parity: {result['data']['images']} validation images (eager top-1 "
            f"{_pct(result['reference']['accuracy'])}%)") if result["data"] else ""
    earlier = (f"; {', '.join(sorted(kept))}: kept from the earlier verify, with its own images and batch sizes"
               if kept else "")
    t = Table(title="Parity against eager PyTorch", box=box.SIMPLE_HEAD, header_style="bold", caption=(
        f"tensor parity: {cfg['samples']} random raw-pixel images per batch size, at batch {sizes}{val}{task}"
        f"{earlier}. abs/rel err: "
        "|artifact - eager| over all logits (rel: over |eager|); cosine: the lowest per-image value; "
        "atol (rtol) to pass: the smallest that passes with rtol (atol) as given; ties: images whose two classes' eager "
        "logits lie within one step of the target's precision, where rounding decides (not counted by the gate)"))
    t.add_column("", no_wrap=True)
    for col in [*runs, *skipped]:
        t.add_column(f"{col['format']}\n{col['runtime']}", justify="right")
    dashes = ["-"] * len(skipped)
    t.add_row("[bold]tensor parity[/bold]")
    t.add_row("precision", *[r.get("precision", "fp32") for r in runs], *dashes)
    for name, cell in _tensor_rows(result):
        t.add_row(name, *[cell(r["tensor"] or {}) for r in runs], *dashes)
    t.add_row("within atol|rtol", *[_tensor_verdict(r) for r in runs], *dashes)
    if result["data"]:
        t.add_section()
        t.add_row("[bold]task parity[/bold]")
        for name, cell in _task_rows(result):
            t.add_row(name, *[cell(r["task"] or {}) for r in runs], *dashes)
        t.add_row("agreement (+ drop) gate", *[_task_verdict(r) for r in runs], *dashes)
    t.add_section()
    t.add_row("[bold]verdict[/bold]", *[_verdict(r["passed"]) for r in runs], *["skipped"] * len(skipped))
    return t
