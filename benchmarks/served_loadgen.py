"""Benchmark: served throughput measured by cnnpack's client against Triton's perf_analyzer (issue 21 item 8).

One `cnnpack serve` (TritonServer) of a default pipeline run's repository; `cnn_onnx` over gRPC and over HTTP at
concurrency 1 and 16, measured alternately by the two load generators of `cnnpack.loadgen` (cnnpack's client,
perf_analyzer) with the same window policy, `--rounds` times; the CPU time each load generator, Triton and its
backend stubs took per request, and the server's mean batch. Target: cnnpack within 5 % of perf_analyzer at both
concurrencies.
perf_analyzer must be on PATH (the tritonclient 2.41.0 wheel's data/bin/perf_analyzer, with Debian's libb64-0d and
libcudart.so.12 from nvidia-cuda-runtime-cu12 on LD_LIBRARY_PATH).

    PATH=/opt/pa/bin:$PATH .venv/bin/python benchmarks/served_loadgen.py RUN [--rounds 9] [--repository DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import lscpu, save_json, save_md, simd  # noqa: E402

from cnnpack.peak import isa_tag  # noqa: E402

NAME = f"served-loadgen-cnn64-onnx-cpu2-{isa_tag()}"
TARGET = 0.05


def main() -> int:
    from cnnpack.client import Client, server_side
    from cnnpack.loadgen import describe, load, resolve
    from cnnpack.measure import WindowPolicy
    from cnnpack.rundir import Run
    from cnnpack.serve import ServeConfig, TritonServer

    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--repository", type=Path, help="the run's model repository (default: the one its manifest names)")
    ap.add_argument("--rounds", type=int, default=9)  # a round's ratio moves 0.83-1.09 on 2 shared cores
    ap.add_argument("--model", default="cnn_onnx")
    ap.add_argument("--protocols", default="grpc,http")
    ap.add_argument("--window-s", type=float, default=1.0)
    ap.add_argument("--pin", action="store_true",
                    help="the server (and its backend stubs) on CPU 0, the load generators on CPU 1: a client's own CPU "
                         "then takes nothing from the server, so a ratio off 1.00 is what its requests cost the server")
    args = ap.parse_args()
    resolve("perf_analyzer")  # refuses early when it is not on PATH
    if args.rounds < 1 or args.window_s <= 0:
        sys.exit(f"error: --rounds must be >= 1 and --window-s > 0, got {args.rounds} and {args.window_s:g}")
    if args.pin and not {0, 1} <= os.sched_getaffinity(0):
        sys.exit("error: --pin needs CPUs 0 and 1")
    name = NAME + ("-pinned" if args.pin else "")
    run = Run.open(args.run)
    spec = run.model_spec
    x = np.random.default_rng(0).integers(0, 256, (1, spec["channels"], spec["image_size"], spec["image_size"]))
    policy = WindowPolicy(window_s=args.window_s, max_s=10 * args.window_s, warmup_s=1.0)
    protocols = args.protocols.split(",")
    points, measured = [], {}
    repo = args.repository or run.read()["stages"]["triton"]["repository"]
    if args.pin:
        os.sched_setaffinity(0, {0})  # what the server starts inherits it
    with TritonServer(ServeConfig(repository=str(repo), log_file=str(Path(os.environ.get("TMPDIR", "/tmp")) / "lg.log"))) as server:
        if args.pin:
            os.sched_setaffinity(0, {1})  # this process's client, and perf_analyzer's runs
        for r in range(args.rounds):
            for protocol in protocols:
                url = server.grpc_address if protocol == "grpc" else server.http_address
                with Client(url, protocol) as client:
                    model = client.model(args.model)
                    measured = {"model": model.name, "precision": model.parameters.get("precision", "fp32")}  # as bench's
                    for c in (1, 16):
                        for gen in ("cnnpack", "perf_analyzer") if r % 2 == 0 else ("perf_analyzer", "cnnpack"):
                            cpu0, stats0, server0 = client_cpu(gen), client.statistics(args.model), server.cpu_seconds()
                            fig = load(gen, client, model, x.astype(np.float32), c, policy)
                            cpu = client_cpu(gen) - cpu0
                            served = server_side(stats0, client.statistics(args.model))
                            server1, n = server.cpu_seconds(), served["server_requests"]
                            batch = served["server_batch_mean"]
                            points.append({"round": r + 1, "protocol": protocol, "concurrency": c,
                                           "generator": describe(gen), "server_batch_mean": batch, **{k: fig[k] for k in (
                                               "throughput_ips", "latency_ms_p50", "latency_ms_p99", "stable")},
                                           # every request of the point, warm-up and unstable windows too
                                           "client_cpu_us_per_request": 1e6 * cpu / n,
                                           "triton_cpu_us_per_request": 1e6 * (server1[0] - server0[0]) / n,
                                           "backend_cpu_us_per_request": 1e6 * (server1[1] - server0[1]) / n})
                            print(f"round {r + 1} {protocol} c{c} {gen}: {fig['throughput_ips']:,.0f} images/s, "
                                  f"p50 {fig['latency_ms_p50']:.2f} ms", file=sys.stderr)
    # each round measures the two back to back, so their ratio is taken per round (the host's speed drifts by
    # 30 % over an hour and a single hiccup halves one measurement), and the verdict is the median round's
    ratios, per_round = {}, {}
    for protocol in protocols:
        for c in (1, 16):
            sel = [p for p in points if p["concurrency"] == c and p["protocol"] == protocol]
            rounds = sorted({p["round"] for p in sel})
            mine = {p["round"]: p["throughput_ips"] for p in sel if p["generator"].startswith("cnnpack")}
            pa = {p["round"]: p["throughput_ips"] for p in sel if p["generator"].startswith("perf")}
            per_round[f"{protocol} c{c}"] = [mine[r] / pa[r] for r in rounds]
            ratios[f"{protocol} c{c}"] = statistics.median(per_round[f"{protocol} c{c}"])
    passed = all(abs(v - 1) <= TARGET for v in ratios.values())
    write(name, {"benchmark": name, "pinned": args.pin, **measured,
                 "target": f"cnnpack client within {100 * TARGET:.0f} % of perf_analyzer", "passed": passed,
                 "not_below": all(v >= 1 - TARGET for v in ratios.values()),
                 "ratios_cnnpack_over_perf_analyzer": ratios, "ratios_per_round": per_round, "points": points,
                 "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "lscpu": lscpu(),
                 "load_1min_end": os.getloadavg()[0], "policy": {k: str(v) for k, v in vars(args).items()}})
    return 0 if passed else 1


def verdict_detail(rec: dict) -> str:
    """Which points are out of the band and on which side: above it, cnnpack's client took less of the shared CPU."""
    out = {k: v for k, v in rec["ratios_cnnpack_over_perf_analyzer"].items() if abs(v - 1) > TARGET}
    if not out:
        return ""
    below = {k: v for k, v in out.items() if v < 1}
    return (f" ({', '.join(f'{k} {v:.3f}x' for k, v in out.items())}; "
            + ("below perf_analyzer at " + ", ".join(below) if below else
               f"none more than {100 * TARGET:.0f} % below perf_analyzer: the points out of the band are above it") + ")")


def client_cpu(generator: str) -> float:
    """CPU seconds the load generator has used so far: this process for cnnpack's client, the finished children
    (each perf_analyzer run, once it was waited for) for perf_analyzer."""
    if generator == "cnnpack":
        return time.process_time()
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def write(name: str, rec: dict) -> None:
    save_json(name, rec)
    flags = set(rec["lscpu"]["flags"].split())
    lines = [f"# Served throughput: cnnpack's client vs perf_analyzer ({rec['target']}): "
             f"**{'met' if rec['passed'] else 'NOT met'}**" + verdict_detail(rec), "",
             f"Served model: `{rec['model']}` ({rec['precision']}), batch 1 per request.", "",
             "| round | protocol | concurrency | load generator | images/s | p50 ms | p99 ms | stable | client CPU us/request "
             "| server's mean batch |", "|--:|---|--:|---|--:|--:|--:|---|--:|--:|"]
    lines += [f"| {p['round']} | {p['protocol']} | {p['concurrency']} | {p['generator']} | {p['throughput_ips']:,.0f} | "
              f"{p['latency_ms_p50']:.2f} | {p['latency_ms_p99']:.2f} | {p['stable']} | "
              f"{round(p['client_cpu_us_per_request'])} | "
              f"{p['server_batch_mean']:.2f} |"
              for p in rec["points"]]
    lines += ["", "Medians over the rounds, each cell cnnpack's client then perf_analyzer (CPU per request the server "
              "answered, warm-up included: the load generator's own, the tritonserver process's, and its child "
              "processes', the Python backend stubs that run the model" + (
                  "; the server on CPU 0, the load generators on CPU 1):" if rec["pinned"] else
                  "; above 1.00x the client left more of the 2 shared cores to the server than perf_analyzer did):"),
              "", "| protocol | concurrency | cnnpack / perf_analyzer | images/s cnnpack, perf_analyzer "
              "| client CPU us/request | Triton's CPU us/request | its backend stubs' | server's mean batch |",
              "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for key, ratio in rec["ratios_cnnpack_over_perf_analyzer"].items():
        protocol, c = key.split(" c")
        med = {g: {k: statistics.median(p[k] for p in rec["points"] if p["protocol"] == protocol
                                          and p["concurrency"] == int(c) and p["generator"].startswith(g))
                   for k in ("throughput_ips", "client_cpu_us_per_request", "triton_cpu_us_per_request",
                             "backend_cpu_us_per_request", "server_batch_mean")}
               for g in ("cnnpack", "perf")}
        lines.append(f"| {protocol} | {c} | {ratio:.3f}x | {med['cnnpack']['throughput_ips']:,.0f}, "
                     f"{med['perf']['throughput_ips']:,.0f} | {med['cnnpack']['client_cpu_us_per_request']:.0f}, "
                     f"{med['perf']['client_cpu_us_per_request']:.0f} | {med['cnnpack']['triton_cpu_us_per_request']:.0f}, "
                     f"{med['perf']['triton_cpu_us_per_request']:.0f} | {med['cnnpack']['backend_cpu_us_per_request']:.0f}, "
                     f"{med['perf']['backend_cpu_us_per_request']:.0f} | {med['cnnpack']['server_batch_mean']:.2f}, "
                     f"{med['perf']['server_batch_mean']:.2f} |")
    lines += ["", "cnnpack / perf_analyzer, the median of the rounds' ratios (each round's two measured back to back; "
              "every round's ratio in brackets): " + ", ".join(
        f"{k}: {v:.3f}x ({', '.join(f'{x:.2f}' for x in rec['ratios_per_round'][k])})"
        for k, v in rec["ratios_cnnpack_over_perf_analyzer"].items()), "",
        f"Machine (lscpu): {rec['lscpu']['model']}, {rec['lscpu']['cpus']} CPUs, SIMD: "
        f"{simd(flags)}"
        + ("; the server (with its backend stubs) pinned to CPU 0, the load generator to CPU 1" if rec["pinned"] else
           "; the server and the load generator share the 2 cores")
        + f" (load average at the end {rec['load_1min_end']:.1f}). {rec['date']}.", "",
        "Reproduce: `PATH=<dir of perf_analyzer>:$PATH .venv/bin/python benchmarks/served_loadgen.py RUN --rounds "
        f"{rec['policy']['rounds']}{' --pin' if rec['pinned'] else ''}`", ""]
    save_md(name, "\n".join(lines))


if __name__ == "__main__":
    from cnnpack.errors import CnnpackError

    try:
        sys.exit(main())
    except CnnpackError as e:  # no perf_analyzer, no such run, a server that failed: one line, as cnnpack says it
        sys.exit(f"error: {e}")
