"""Benchmark: the reference `cnnpack bench` table, and the issue's targets checked against it.

Two models: the built-in `cnn` at its default size (64 px, trained with `cnnpack train` defaults)
and resnet18 @ 224 px (`cnnpack export --arch resnet18 --num-classes 10 --image-size 224`);
runtimes eager, compiled, torchscript, onnxruntime; batch sizes 1 and 32; one thread count for
all. Each model is benchmarked twice back to back, to show the medians repeat.

Targets: onnxruntime >= 1.5x eager at batch 1 and >= 1.3x at batch 32 for both models;
resnet18 onnxruntime at batch 32 >= 70 % of the fp32 matmul rate measured in the same run;
the two runs agree within 5 % on every median latency.

The script waits for a quiet machine (1-minute load average <= --max-load, up to --max-wait s)
and records the load before and after each run.

    .venv/bin/python benchmarks/bench_reference.py
        # writes benchmarks/results/bench-cnn64-resnet18_224-cpu<C>-threads<T>.{json,md}
    .venv/bin/python benchmarks/bench_reference.py --cnn-run runs/demo   # reuse a default-trained run
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cnnpack, save_json, save_md, wait_for_load  # noqa: E402

from cnnpack.bench import BenchConfig, bench  # noqa: E402
from cnnpack.rundir import Run, library_versions  # noqa: E402

RUNTIMES = ("eager", "compiled", "torchscript", "onnxruntime")
BATCH_SIZES = (1, 32)


def has_exports(run: Path) -> bool:
    return (run / "cnnpack.json").is_file() and "export" in Run.open(run).read()["stages"]


def prepare(work: Path, cnn_run: Path | None) -> dict[str, Path]:
    """The two runs: trained / created and exported on first use, reused afterwards."""
    cnn = cnn_run or work / "cnn64"
    if not (cnn / "checkpoint.pt").is_file():
        cnnpack("train", "--run", str(cnn), "--no-progress")  # every training option at its default
    if not has_exports(cnn):
        cnnpack("export", "--run", str(cnn))
    r18 = work / "resnet18_224"
    if not has_exports(r18):
        cnnpack("export", "--arch", "resnet18", "--num-classes", "10", "--image-size", "224", "--run", str(r18))
    return {"cnn64": cnn, "resnet18_224": r18}


def one_run(run: Path, cfg: BenchConfig, args) -> dict:
    load = wait_for_load(args.max_load, args.max_wait, poll_s=60)
    section = bench(run, cfg, progress=lambda s: print(f"  {s}", flush=True))
    section["load_avg_1min_before"] = load
    return section


def row(section: dict, runtime: str, batch: int) -> dict:
    return next(r for r in section["results"] if r["runtime"] == runtime and r["batch_size"] == batch)


def targets(models: dict[str, list[dict]]) -> list[dict]:
    """Each target with its measured figure in both runs; met only if both runs meet it."""
    out = []
    for name, runs in models.items():
        for b, goal in ((1, 1.5), (32, 1.3)):
            v = [row(s, "onnxruntime", b)["speedup_vs_eager"] for s in runs]
            out.append({"target": f"{name}: onnxruntime >= {goal}x eager at batch {b}",
                        "value": " / ".join(f"{x:.2f}x" for x in v), "met": min(v) >= goal})
        if name == "resnet18_224":
            rows = [row(s, "onnxruntime", 32) for s in runs]
            out.append({"target": "resnet18_224: onnxruntime batch 32 >= 70 % of the fp32 matmul rate",
                        "value": " / ".join(f"{100 * r['matmul_share']:.0f} % ({r['gflops']:.0f} of "
                                            f"{r['matmul_gflops']:.0f} GFLOP/s)" for r in rows),
                        "met": min(r["matmul_share"] for r in rows) >= 0.70})
        drift = max(abs(r2["latency_ms_p50"] / r1["latency_ms_p50"] - 1)
                    for r1, r2 in zip(runs[0]["results"], runs[1]["results"]))
        out.append({"target": f"{name}: two back-to-back runs agree within 5 % on every median",
                    "value": f"largest difference {100 * drift:.1f} %", "met": drift <= 0.05})
    return out


def markdown(report: dict) -> str:
    lines = [f"# cnnpack bench reference: {report['name']}", "",
             f"{report['date']}, {report['machine']['cpu']}, {report['machine']['cpus_usable']} CPUs usable, "
             f"{report['threads']} threads for every runtime; torch {report['libraries'].get('torch')}, "
             f"onnxruntime {report['libraries'].get('onnxruntime-gpu') or report['libraries'].get('onnxruntime')}.",
             f"Command: `{report['command']}`", ""]
    for runs in report["models"].values():
        for i, s in enumerate(runs, 1):
            mm = s["matmul"]
            lines += [f"## {s['model']}, run {i}", "",
                      f"{s['model_gflops_per_image']:.3g} GFLOP/image; fp32 matmul rate during the run "
                      f"{min(mm['samples_gflops']):.0f}..{max(mm['samples_gflops']):.0f} GFLOP/s; "
                      f"1-min load average {s['load_avg_1min_before']:.2f} before.", "",
                      "| runtime | batch | p50 ms | p99 ms | images/s | GFLOP/s | matmul GFLOP/s | % matmul "
                      "| vs eager | peak MB | others' CPU % | stable |",
                      "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|:-:|"]
            for r in s["results"]:
                lines.append(f"| {r['runtime']} | {r['batch_size']} | {r['latency_ms_p50']:.2f} | "
                             f"{r['latency_ms_p99']:.2f} | {r['throughput_ips']:.1f} | {r['gflops']:.1f} | "
                             f"{r['matmul_gflops']:.0f} | "
                             f"{100 * r['matmul_share']:.0f} | {r['speedup_vs_eager']:.2f}x | "
                             f"{r['peak_rss_mb']:.0f} | {100 * (r['cpu_others'] or 0):.1f} | "
                             f"{'yes' if r['stable'] else 'no'} |")
            lines.append("")
    lines += ["## Targets (run 1 / run 2)", "", "| target | measured | met |", "|---|---|:-:|"]
    lines += [f"| {t['target']} | {t['value']} | {'yes' if t['met'] else '**no**'} |" for t in report["targets"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("runs/bench-reference"), help="Where the two runs live.")
    p.add_argument("--cnn-run", type=Path, help="A run of `cnnpack train` with default settings to reuse.")
    p.add_argument("--threads", type=int, default=None, help="Threads for every runtime (default: physical cores).")
    p.add_argument("--max-seconds", type=float, default=30.0, help="Measurement limit per runtime x batch size.")
    p.add_argument("--max-load", type=float, default=0.8, help="Start only below this 1-minute load average.")
    p.add_argument("--max-wait", type=float, default=900, help="Give up waiting for a quiet machine after s.")
    args = p.parse_args()
    runs = prepare(args.work, args.cnn_run)
    models: dict[str, list[dict]] = {}
    for name, run in runs.items():
        cfg = BenchConfig(runtimes=RUNTIMES, batch_sizes=BATCH_SIZES, threads=args.threads,
                          max_seconds=args.max_seconds)
        models[name] = [one_run(run, cfg, args) for _ in range(2)]
    first = models["cnn64"][0]
    threads, cpus = first["threads"], first["machine"]["cpus_usable"]
    report = {"name": f"bench-cnn64-resnet18_224-cpu{cpus}-threads{threads}",
              "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(["python", "benchmarks/bench_reference.py"] + sys.argv[1:]),
              "machine": first["machine"], "threads": threads, "libraries": library_versions(), "models": models}
    report["targets"] = targets(models)
    save_json(report["name"], report)
    save_md(report["name"], markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
