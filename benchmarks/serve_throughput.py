"""Benchmark: the ONNX cnn served by the local Triton server, batch-1 requests under concurrent load.

One run of the built-in `cnn` at its default size (64 px, `cnnpack train` defaults), exported to ONNX
and laid out three times in a fresh repository by `cnnpack triton`: `cnn_onnx` with its defaults
(Triton's dynamic batcher, ONNX Runtime's own thread pool), `cnn_onnx_nobatch` the same without the
batcher (`--no-dynamic-batching`), and `cnn_onnx_1thread` with one ONNX Runtime thread per instance
(`--threads 1`: client and server share the cores). One server
(`cnnpack serve`'s TritonServer on free loopback ports) serves both; `cnnpack bench --triton-url`'s
library function puts batch-1 requests on them from an asyncio gRPC (and HTTP) client at several
concurrencies, perf_analyzer style (warm-up, windows until three agree). Then the same ONNX file is
measured in-process (`cnnpack bench --runtimes onnxruntime --batch-sizes 1`, ONNX Runtime's thread
count as in the server: the cores).

Targets: throughput at concurrency 16 with dynamic batching >= 3x concurrency 1;
p50 latency at concurrency 1 over gRPC, set against the in-process ONNX Runtime p50.

Client, server and its Python backend stubs share the machine's cores; the script waits for a
quiet machine (1-minute load average <= --max-load) and records the load before and after.

    .venv/bin/python benchmarks/serve_throughput.py
        # writes benchmarks/results/serve-cnn64-onnx-cpu<C>.{json,md}
    .venv/bin/python benchmarks/serve_throughput.py --cnn-run runs/bench-reference/cnn64  # reuse a default run
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cnnpack, save_json, save_md, wait_for_load  # noqa: E402

from cnnpack.bench import BenchConfig, bench, machine  # noqa: E402
from cnnpack.bench_served import ServedConfig, bench_served  # noqa: E402
from cnnpack.rundir import Run, library_versions  # noqa: E402
from cnnpack.serve import ServeConfig, TritonServer  # noqa: E402

MODELS = {"cnn_onnx": [], "cnn_onnx_nobatch": ["--no-dynamic-batching"],
          "cnn_onnx_1thread": ["--threads", "1"]}  # name: extra `cnnpack triton` flags
# (model, protocol, concurrency) rows, in the order measured
PLAN = [("cnn_onnx", "grpc", (1, 4, 16)), ("cnn_onnx_nobatch", "grpc", (1, 16)), ("cnn_onnx", "http", (1, 16)),
        ("cnn_onnx_1thread", "grpc", (1, 16))]


def prepare(work: Path, cnn_run: Path | None) -> tuple[Path, Path]:
    """A default-trained cnn run (a copy of --cnn-run, or trained here) exported to ONNX, and its repository."""
    run, repo = work / "cnn64", work / "model_repository"
    if not (run / "checkpoint.pt").is_file():
        if cnn_run:
            shutil.copytree(cnn_run, run)
        else:
            cnnpack("train", "--run", str(run), "--no-progress")  # every training option at its default
    if "onnx" not in Run.open(run).read()["stages"].get("export", {}).get("artifacts", {}):
        cnnpack("export", "--run", str(run), "--format", "onnx")
    shutil.rmtree(repo, ignore_errors=True)  # exactly the models below, configured as below
    for name, flags in MODELS.items():
        cnnpack("triton", "--run", str(run), "--repository", str(repo), "--name", name, *flags)
    return run, repo


def measure(run: Path, repo: Path, args) -> tuple[dict, dict]:
    """Every served row of PLAN, then in-process onnxruntime at batch 1; (stages.bench, server facts)."""
    Run(run).update(lambda m: m["stages"].pop("bench", None))  # no rows from an earlier measurement
    cfg = BenchConfig(runtimes=("onnxruntime",), batch_sizes=(1,), max_seconds=args.max_seconds, plot=False)
    say = lambda s: print(f"  {s}", flush=True)  # noqa: E731
    with TritonServer(ServeConfig(repository=str(repo))) as server:
        facts = {"version": server.version, "models": {m.name: m.served_by for m in server.models}}
        for model, protocol, conc in PLAN:
            url = server.grpc_address if protocol == "grpc" else server.http_address
            bench_served(run, ServedConfig(url=url, model=model, protocol=protocol, concurrency=conc), cfg,
                         progress=say)
    return bench(run, cfg, progress=say), facts  # the served rows stay in the section


def pick(section: dict, fmt: str, protocol: str | None = None, conc: int | None = None) -> dict:
    return next(r for r in section["results"] if r["format"] == fmt and r.get("protocol") == protocol
                and r.get("concurrency") == conc)


def figures(section: dict) -> dict:
    on = {c: pick(section, "triton:cnn_onnx", "grpc", c) for c in (1, 4, 16)}
    off = {c: pick(section, "triton:cnn_onnx_nobatch", "grpc", c) for c in (1, 16)}
    one = pick(section, "triton:cnn_onnx_1thread", "grpc", 16)
    ort = pick(section, "onnx")
    return {
        "scaling_c16_vs_c1_dynamic": on[16]["throughput_ips"] / on[1]["throughput_ips"],
        "scaling_c16_vs_c1_no_batching": off[16]["throughput_ips"] / off[1]["throughput_ips"],
        "dynamic_vs_no_batching_at_c16": on[16]["throughput_ips"] / off[16]["throughput_ips"],
        "one_thread_vs_default_at_c16": one["throughput_ips"] / on[16]["throughput_ips"],
        "grpc_c1_latency_ms_p50": on[1]["latency_ms_p50"],
        "in_process_latency_ms_p50": ort["latency_ms_p50"],
        "grpc_c1_overhead_ms_p50": on[1]["latency_ms_p50"] - ort["latency_ms_p50"],
        "target_scaling_met": on[16]["throughput_ips"] >= 3 * on[1]["throughput_ips"],
    }


def _f(v, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def markdown(result: dict) -> str:
    runs = result["repeats"]
    scaling = ", ".join(f"{r['figures']['scaling_c16_vs_c1_dynamic']:.2f}x" for r in runs)
    met = sum(r["figures"]["target_scaling_met"] for r in runs)
    lines = [f"# Served throughput: {result['name']}", "", f"Command: `{result['command']}`", "",
             f"Throughput at concurrency 16 / concurrency 1 with dynamic batching (gRPC, batch-1 requests), per "
             f"run: {scaling}; target >= 3x met in {met} of {len(runs)} runs.", ""]
    for i, r in enumerate(runs, 1):
        lines += [f"## Run {i}", "", *run_markdown(r)]
    return "\n".join(lines)


def run_markdown(result: dict) -> list[str]:
    s, f = result["bench"], result["figures"]
    lines = [f"{result['when']}, {s['machine']['cpu']}, {s['machine']['cpus_usable']} CPUs usable (client, Triton "
             f"{result['server']['version']} and its backend stubs share them); onnxruntime "
             f"{result['libraries'].get('onnxruntime-gpu', '')}. 1-min load average {result['load_before']:.2f} "
             f"before, {result['load_after']:.2f} after; fp32 matmul {min(s['matmul']['samples_gflops']):.0f}-"
             f"{max(s['matmul']['samples_gflops']):.0f} GFLOP/s during the run.", "",
             f"**Dynamic batching, concurrency 16 vs 1 (gRPC, batch-1 requests): "
             f"{f['scaling_c16_vs_c1_dynamic']:.2f}x throughput** (target >= 3x: "
             f"{'met' if f['target_scaling_met'] else 'NOT met'}); without dynamic batching "
             f"{f['scaling_c16_vs_c1_no_batching']:.2f}x; at concurrency 16 dynamic batching gives "
             f"{f['dynamic_vs_no_batching_at_c16']:.2f}x the throughput of none; one ONNX Runtime thread per instance "
             f"instead of its default pool: {f['one_thread_vs_default_at_c16']:.2f}x.", "",
             f"**p50 latency at concurrency 1: {f['grpc_c1_latency_ms_p50']:.2f} ms over gRPC vs "
             f"{f['in_process_latency_ms_p50']:.2f} ms in-process** (ONNX Runtime, same file, {s['threads']} threads): serving adds "
             f"{f['grpc_c1_overhead_ms_p50']:.2f} ms per request.", "",
             "| model | protocol | in flight | p50 ms | p99 ms | images/s | server batch (mean) | server queue ms | "
             "server compute ms | stable |",
             "|---|---|--:|--:|--:|--:|--:|--:|--:|:-:|"]
    for r in s["results"]:
        name = r["format"].removeprefix("triton:") if r["runtime"] == "triton" else f"{r['runtime']} in-process"
        lines.append(f"| {name} | {r.get('protocol') or '-'} | {r.get('concurrency') or '-'} | "
                     f"{r['latency_ms_p50']:.2f} | {r['latency_ms_p99']:.2f} | {r['throughput_ips']:.0f} | "
                     f"{_f(r.get('server_batch_mean'), '.2f')} | {_f(r.get('server_queue_ms_mean'), '.2f')} | "
                     f"{_f(r.get('server_compute_ms_mean'), '.2f')} | {'yes' if r['stable'] else 'no'} |")
    lines += ["", "cnn_onnx: `cnnpack triton` defaults (dynamic batching, max_queue_delay 100 us, max batch 64, one "
              "CPU instance, ONNX Runtime's own thread pool); cnn_onnx_nobatch: the same with "
              "`--no-dynamic-batching`; cnn_onnx_1thread: the same with `--threads 1`. Served by cnnpack's "
              "Python-based onnxruntime backend under the nvidia-pytriton tritonserver. Server batch / queue / "
              "compute: from Triton's own statistics over the row (compute: the model's execute time per request).",
              ""]
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("runs/serve-throughput"), help="Where the run and repository live.")
    p.add_argument("--cnn-run", type=Path, help="A run of `cnnpack train` with default settings to copy.")
    p.add_argument("--max-seconds", type=float, default=10.0, help="Measurement limit per row.")
    p.add_argument("--max-load", type=float, default=0.8, help="Start only below this 1-minute load average.")
    p.add_argument("--max-wait", type=float, default=900, help="Give up waiting for a quiet machine after s.")
    p.add_argument("--repeat", type=int, default=2, help="Whole measurements, back to back (to show they repeat).")
    args = p.parse_args()
    run, repo = prepare(args.work, args.cnn_run)
    repeats = []
    for _ in range(args.repeat):
        load_before = wait_for_load(args.max_load, args.max_wait, poll_s=30)
        section, server = measure(run, repo, args)
        repeats.append({"when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                        "load_before": load_before, "load_after": os.getloadavg()[0], "server": server,
                        "figures": figures(section), "libraries": library_versions(), "bench": section})
    name = f"serve-cnn64-onnx-cpu{machine()['cpus_usable']}"
    result = {"name": name, "command": "python benchmarks/serve_throughput.py " + " ".join(sys.argv[1:]),
              "repeats": repeats}
    save_json(name, result)
    save_md(name, markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
