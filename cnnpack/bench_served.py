"""`cnnpack bench --triton-url`: a served model under closed-loop concurrent load, in the run's bench table.

The same windows and stability rule as a local runtime (`cnnpack.measure`); the rows join the run's
`stages.bench` as runtime `triton`, replacing earlier ones of the same model and protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cnnpack.bench import (
    NOTES,
    BenchConfig,
    BenchContext,
    count_flops,
    input_batch,
    make_section,
    previous_section,
    speedups,
)
from cnnpack.bench_ceilings import hold_to_ceilings, over_ceiling
from cnnpack.bench_outputs import commit_outputs, series_at
from cnnpack.errors import UserInputError
from cnnpack.host import load_avg, machine, torch_threads
from cnnpack.loadclient import check_concurrency
from cnnpack.loadgen import load, resolve
from cnnpack.rundir import Run


@dataclass(frozen=True)
class ServedConfig:
    """Which served model to put under load, and how."""

    url: str | None = None  # default: 127.0.0.1 on Triton's port of the protocol
    model: str | None = None  # default: the model of the run's `cnnpack triton` stage
    protocol: str = "http"
    concurrency: tuple[int, ...] = (1, 4, 16)  # requests in flight
    timeout_s: float = 30.0  # per request
    load_generator: str = "auto"  # perf_analyzer (when on PATH under auto) | cnnpack: `cnnpack.loadgen`

    def validate(self) -> None:
        from cnnpack.client import check_protocol
        from cnnpack.loadgen import resolve

        check_protocol(self.protocol)
        resolve(self.load_generator)
        if self.model == "":
            raise UserInputError("--model is empty; name the served model (see `cnnpack serve`'s list)")
        check_concurrency(self.concurrency)


def bench_served(run_dir: str | Path, served: ServedConfig, cfg: BenchConfig = BenchConfig(batch_sizes=(1,)), *,
                 progress: Callable[[str], None] = lambda _: None, parity: bool = True) -> dict:
    """Throughput and latency of a served model under closed-loop concurrent load (perf_analyzer-like).

    One row per batch size x concurrency (runtime `triton`, format `triton:<model>`), with the server's
    own view of it (mean executed batch, queue and compute time); the rows join those of the run's
    local bench in bench.json and `stages.bench`. Raises StageFailed (exit 1) if a request fails.
    """
    import torch

    from cnnpack.runtimes import RUNTIMES, served_ref
    from cnnpack.train import resolve_device

    cfg.validate()
    served.validate()
    run = Run.open(run_dir)
    rt = RUNTIMES.get("triton").load(served_ref(run, served.url, served.model, served.protocol, served.timeout_s))
    for b in cfg.batch_sizes:
        rt.check_batch(b)
    if parity:  # (the pipeline's served stage has checked its models' parity itself)
        progress("parity of the served model with the run's")
        same_model(run, served)
    host = machine()
    generator = resolve(served.load_generator)
    old = previous_section(run)
    with torch_threads(cfg.threads or torch.get_num_threads()):  # the matmul rate of the client's machine
        ctx = BenchContext(run, cfg, resolve_device("cpu"), count_flops(run), progress)
        if shares_ceilings(old, rt):
            ctx.ceilings = old["ceilings"]
        ctx.sample_matmul()
        for b in cfg.batch_sizes:
            for c in served.concurrency:
                bench_load(ctx, rt, b, c, generator)
    host["load_avg_1_5_15_end"] = load_avg()
    with run.committing():  # merged with the section as recorded now (a bench may have run meanwhile), one step
        section = _merge_served(previous_section(run), make_section(ctx, host, {}), rt, served)
        commit_outputs(run, section, plot=cfg.plot)
    return run.read()["stages"]["bench"]


def same_model(run: Run, served: ServedConfig) -> None:
    """Refuses a served model that does not compute what the run's model computes (its precision's contract, as
    `cnnpack verify --triton-url` holds it): only its name and shapes were matched, and another run's model of the
    same shape (random weights) was recorded as this run's served model."""
    from cnnpack.errors import UserInputError
    from cnnpack.verify import VerifyConfig, check, served_target

    target = served_target(run.path, served.url, served.model, served.protocol, served.timeout_s)
    sizes = (target.static_batch,) if target.static_batch else (1,)  # a static batch is checked at its size
    data = gated_on(run) if target.precision == "int8" else None
    failures = [f for r in check(run, VerifyConfig(batch_sizes=sizes, samples=8, data=data), (target,))
                for f in r["failures"]]
    if failures:
        raise UserInputError(f"{target.source} does not compute what {run.path}'s model computes "
                             f"({failures[0]}): its figures would be recorded as this run's; bench it with the run it "
                             "was laid out from, or serve this run's repository")


def gated_on(run: Run) -> str | None:
    """The data the run's int8 models were quantized and gated on (`quantize --data`) where the run records none of
    its own (made by `export --arch`), else None: a served int8 model's contract is task parity, which needs labelled
    images, and bench has no --data to name them (it said "pass --data PATH|shapes", an option bench does not have)."""
    if run.trained_on:
        return None
    stages = run.read().get("stages", {})
    return next((data for name in ("quantize", "quantize_openvino")
                 if (data := stages.get(name, {}).get("config", {}).get("data"))), None)


def bench_load(ctx: BenchContext, rt, batch_size: int, concurrency: int, generator: str = "cnnpack") -> None:
    """One row: `concurrency` clients sending batches of `batch_size` back to back, measured in windows by the
    load generator `generator` (perf_analyzer | cnnpack)."""
    from cnnpack.client import server_side

    client, model = rt.client, rt.model
    ctx.progress(f"triton {model.name} batch {batch_size} x {concurrency} in flight ({generator})")
    before = client.statistics(model.name)
    figures = load(generator, client, model, input_batch(ctx.run.model_spec, batch_size), concurrency, ctx.cfg.policy())
    after = client.settled_statistics(model.name)
    row = {"runtime": "triton", "format": rt.format, "batch_size": batch_size, "concurrency": concurrency,
           "protocol": client.protocol, **figures, "errors": 0,
           **server_side(before, after)}
    row["requests"] = row["requests"] or row["server_requests"]  # when perf_analyzer's output lacks its count, the server's
    row["gflops"] = row["throughput_ips"] * ctx.flops_per_image / 1e9
    row["peak_rss_mb"] = row["cpu_others"] = None  # the server is another process: not measured from here
    row["artifact"] = rt.format
    ctx.yardstick(row, model.parameters.get("precision", "fp32"))
    row["info"] = rt.info
    ctx.results.append(row)


def on_this_machine(address: str) -> bool:
    """Whether HOST:PORT names this machine (a loopback address or localhost)."""
    import ipaddress

    from cnnpack.client import host_and_port

    host, _ = host_and_port(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def shares_ceilings(section: dict, rt) -> bool:
    """Whether the served rows are held to the local bench's ceilings: a server on this machine shares its CPU's, so
    each row is held to its precision's ceiling, as the local rows are (a GPU bench's ceilings are the GPU's: a
    KIND_CPU server is not held to them)."""
    return bool(section.get("ceilings")) and section.get("device") == "cpu" and on_this_machine(rt.client.address)


def _merge_served(old: dict, new: dict, rt, served: ServedConfig) -> dict:
    """The run's bench section `old` with the rows of this served model over this protocol replaced (the others stay).

    `served.<format>.<protocol>` records how they were measured.
    """
    info = {"url": rt.client.url, "concurrency": list(served.concurrency), "timeout_s": served.timeout_s,
            "model": rt.model.describe(), "machine": new["machine"], "config": new["config"],
            "libraries": new["libraries"]}
    seen = old.get("served", {})
    seen = {**seen, rt.format: {**seen.get(rt.format, {}), served.protocol: info}}
    if not old:
        return {**new, "served": seen}
    ours = lambda r: (r.get("format"), r.get("protocol")) == (rt.format, served.protocol)  # noqa: E731
    now = {(r["batch_size"], r.get("concurrency")) for r in new["results"]}
    dropped = sorted({series_at(r) for r in old["results"]
                      if ours(r) and (r["batch_size"], r.get("concurrency")) not in now})
    rows = [r for r in old["results"] if not ours(r)] + new["results"]
    speedups(rows)
    old = {k: v for k, v in old.items() if k != "error"}  # a section the pipeline marked failed: this bench ran
    if all(r.get("runtime") == "triton" for r in rows):  # no local bench's samples to keep: this bench's
        old["matmul"] = new["matmul"]
    merged = {**old, "status": "ok", "results": rows,
              "machine_peak_gflops": max(old.get("machine_peak_gflops") or 0.0, new["machine_peak_gflops"]),
              "served": seen, "notes": NOTES,
              # the earlier rows of this model and protocol that this one did not measure again: dropped, and named
              # (what the earlier local bench replaced is not this bench's doing: its rows stay)
              "replaced": dropped}  # (named as series names them: a gRPC row says so)
    # the higher of each precision's ceiling as recorded now (a local bench that ran during the load may have measured
    # it again) and as this bench has it (its matmul samples may have raised it): every row is held to the same ones
    ceilings = new["ceilings"]
    if shares_ceilings(old, rt):
        ceilings = {p: max((c for c in (old["ceilings"].get(p), new["ceilings"].get(p)) if c),
                           key=lambda c: c["gflops"]) for p in {*old["ceilings"], *new["ceilings"]}}
    if ceilings:
        hold_to_ceilings(rows, ceilings)
        merged.update(ceilings=ceilings, over_ceiling=over_ceiling(rows))
    return merged
