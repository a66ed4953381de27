"""Benchmark: what each runtime setting buys, paired against the setting cnnpack uses.

For the two reference models (see bench_reference.py) and batch sizes 1 and 32, every variant is
loaded once, then measured in interleaved rounds: each round visits every variant in a random
order with one short measurement (3 warm-up requests, then one window of at least 2 s and 3 requests).
A variant's figure is the median over rounds of its latency ratio to the baseline *of the same
round*, so the slow swings of this machine's speed (a shared VM host) cancel out.

ONNX Runtime variants change one session option of cnnpack's OrtRuntime at a time; the TorchScript
variant switches off optimize_for_inference. torch.compile with and without inductor freezing is
compared in alternating fresh processes instead (two compiled copies of one model in one process
disturb each other's timings): the figure is the median over pairs of the latency ratio.

    .venv/bin/python benchmarks/bench_reference_tuning.py --threads 2
        # writes benchmarks/results/bench-tuning-cnn64-resnet18_224-cpu<C>-threads<T>.{json,md}
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np

from cnnpack.bench import WindowPolicy, machine, matmul_rate, measure, torch_threads
from cnnpack.rundir import Run, library_versions
from cnnpack.runtimes import OrtRuntime, artifact_ref, load_runtime

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_reference import prepare  # noqa: E402
from common import save_json, save_md, wait_for_load  # noqa: E402

POLICY = WindowPolicy(window_s=2.0, max_s=0.0, warmup_s=0.0, min_requests=3, stable_windows=1)


def ort_variant(run: Run, threads: int, change):
    """cnnpack's ORT session with one change applied to its SessionOptions."""
    import onnxruntime as ort

    so = OrtRuntime.session_options(threads)
    change(so, ort)
    sess = ort.InferenceSession(str(artifact_ref(run, "onnx").path), so, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"input": x})


def _set(**kv):
    def change(so, ort):
        for k, v in kv.items():
            setattr(so, k, getattr(ort.GraphOptimizationLevel, v) if k == "graph_optimization_level" else v)
    return change


def _entry(key: str, value: str):
    return lambda so, ort: so.add_session_config_entry(key, value)


ORT_VARIANTS = {
    "onnxruntime (cnnpack: ORT_ENABLE_ALL, explicit threads, spinning, arena, memory pattern)": _set(),
    "onnxruntime, 1 thread": None,  # threads changed below
    "onnxruntime, ORT_ENABLE_EXTENDED (no NCHWc blocked layout)": _set(graph_optimization_level="ORT_ENABLE_EXTENDED"),
    "onnxruntime, ORT_ENABLE_BASIC": _set(graph_optimization_level="ORT_ENABLE_BASIC"),
    "onnxruntime, intra-op spinning off": _entry("session.intra_op.allow_spinning", "0"),
    "onnxruntime, CPU memory arena off": _set(enable_cpu_mem_arena=False),
    "onnxruntime, memory pattern off": _set(enable_mem_pattern=False),
    "onnxruntime, denormals as zero": _entry("session.set_denormal_as_zero", "1"),
}


def variants(run: Run, threads: int) -> dict:
    """name -> predict(x); the first of each group is cnnpack's own setting."""
    out = {}
    for name, change in ORT_VARIANTS.items():
        out[name] = ort_variant(run, 1, _set()) if change is None else ort_variant(run, threads, change)
    out["torchscript (cnnpack: frozen + optimize_for_inference)"] = load_runtime(run, "torchscript", optimize=True).predict
    out["torchscript, frozen only"] = load_runtime(run, "torchscript", optimize=False).predict
    out["eager (inference_mode)"] = load_runtime(run, "eager").predict
    return out


BASELINES = {"onnxruntime": "onnxruntime (cnnpack", "torchscript": "torchscript (cnnpack",
             "compiled": "compiled (cnnpack", "eager": "eager"}


def baseline_of(name: str, names: list[str]) -> str:
    prefix = BASELINES[name.split(",")[0].split(" ")[0]]
    return next(n for n in names if n.startswith(prefix))


def rounds(fns: dict, x: np.ndarray, n: int, seed: int) -> dict[str, list[float]]:
    """Median latency (ms) of each variant in each of `n` rounds, variants in random order per round."""
    for fn in fns.values():  # compile / first-call costs stay out of the rounds
        fn(x)
    lat: dict[str, list[float]] = {k: [] for k in fns}
    rng = random.Random(seed)
    for r in range(n):
        order = list(fns)
        rng.shuffle(order)
        for name in order:
            m = measure(lambda f=fns[name]: f(x), POLICY)
            lat[name].append(1e3 * float(np.median(m.windows[-1].latencies_s)))
        print(f"    round {r + 1}/{n} done", flush=True)
    return lat


def summarise(lat: dict[str, list[float]]) -> list[dict]:
    names = list(lat)
    rows = []
    for name in names:
        base = baseline_of(name, names)
        ratio = np.array(lat[name]) / np.array(lat[base])  # paired within each round
        rows.append({"variant": name, "baseline": base, "latency_ms_p50_median": float(np.median(lat[name])),
                     "ratio_to_baseline_median": float(np.median(ratio)),
                     "ratio_to_baseline_min": float(ratio.min()), "ratio_to_baseline_max": float(ratio.max()),
                     "latency_ms_per_round": lat[name]})
    return rows


def markdown(report: dict) -> str:
    lines = [f"# What each runtime setting buys: {report['name']}", "",
             f"{report['machine']['cpu']}, {report['machine']['cpus_usable']} CPUs, {report['threads']} threads; "
             f"torch {report['libraries'].get('torch')}, onnxruntime "
             f"{report['libraries'].get('onnxruntime-gpu') or report['libraries'].get('onnxruntime')}; "
             f"{report['rounds']} interleaved rounds ({report.get('pairs', 0)} fresh-process pairs for compiled); fp32 matmul {report['matmul_gflops']:.0f} GFLOP/s at the start.",
             f"Command: `{report['command']}`", "",
             "Ratio = this variant's median latency / the cnnpack setting's, in the same round (for compiled: "
             "the same pair of processes); median over rounds (min..max). Above 1 = slower than what cnnpack "
             "uses.", ""]
    for key, rows in report["results"].items():
        lines += [f"## {key}", "", "| variant | p50 ms | ratio to cnnpack's setting | range over rounds |",
                  "|---|--:|--:|--:|"]
        for r in rows:
            same = r["variant"] == r["baseline"]
            ratio = "1 (baseline)" if same else f"{r['ratio_to_baseline_median']:.2f}"
            spread = "" if same else f"{r['ratio_to_baseline_min']:.2f}..{r['ratio_to_baseline_max']:.2f}"
            lines.append(f"| {r['variant']} | {r['latency_ms_p50_median']:.2f} | {ratio} | {spread} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def compiled_child(run_dir: str, freezing: bool, threads: int) -> None:
    """Child process: p50 latency (ms) of the compiled runtime at batch 1 and 32, as JSON on stdout."""
    run = Run.open(run_dir)
    rt = load_runtime(run, "compiled", freezing=freezing)
    size = run.model_spec["image_size"]
    out = {}
    with torch_threads(threads):
        for b in (1, 32):
            x = np.random.default_rng(0).integers(0, 256, (b, 3, size, size)).astype(np.float32)
            m = measure(lambda x=x: rt.predict(x), POLICY)
            out[b] = 1e3 * float(np.median(m.windows[-1].latencies_s))
    print(json.dumps(out))


def compiled_pairs(run: Path, threads: int, pairs: int) -> dict[str, list[dict]]:
    """Freezing on/off in alternating fresh processes; rows as in `summarise`, per batch size."""
    lat: dict[int, dict[str, list[float]]] = {1: {}, 32: {}}
    names = {True: "compiled (cnnpack: inductor freezing)", False: "compiled, no freezing"}
    for i in range(pairs):
        for freezing in (True, False):
            cmd = [sys.executable, __file__, "--child-compiled", str(run), str(int(freezing)), str(threads)]
            res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            for b, ms in res.items():
                lat[int(b)].setdefault(names[freezing], []).append(ms)
        print(f"    compiled pair {i + 1}/{pairs} done", flush=True)
    return {b: summarise(v) for b, v in lat.items()}


def main() -> None:
    import torch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, default=Path("runs/bench-reference"))
    p.add_argument("--cnn-run", type=Path)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--rounds", type=int, default=5, help="Interleaved rounds (in-process variants).")
    p.add_argument("--pairs", type=int, default=3, help="Fresh-process pairs for torch.compile freezing on/off.")
    p.add_argument("--models", default="cnn64,resnet18_224")
    p.add_argument("--only", default="", help="Only variants whose name starts with this (e.g. onnxruntime).")
    p.add_argument("--max-load", type=float, default=0.8)
    p.add_argument("--max-wait", type=float, default=900)
    p.add_argument("--child-compiled", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_compiled:
        return compiled_child(args.child_compiled[0], args.child_compiled[1] == "1", int(args.child_compiled[2]))
    models = args.models.split(",")
    runs = {k: v for k, v in prepare(args.work, args.cnn_run).items() if k in models}
    threads = args.threads or torch.get_num_threads()
    results = {}
    with torch_threads(threads):
        wait_for_load(args.max_load, args.max_wait, poll_s=60)  # as bench_reference.py waits
        mm = matmul_rate(torch.device("cpu"), 2048, 1.0, min_reps=10)
        for model, path in runs.items():
            run = Run.open(path)
            fns = {k: f for k, f in variants(run, threads).items() if k.startswith(args.only)}
            comp = compiled_pairs(path, threads, args.pairs) if "compiled".startswith(args.only) else {}
            size = run.model_spec["image_size"]
            for b in (1, 32):
                print(f"  {model} batch {b}", flush=True)
                x = np.random.default_rng(0).integers(0, 256, (b, 3, size, size)).astype(np.float32)
                results[f"{model}, batch {b}"] = summarise(rounds(fns, x, args.rounds, seed=b)) + comp.get(b, [])
    host = machine()
    suffix = f"-{args.only}" if args.only else ""
    name = f"bench-tuning{suffix}-{'-'.join(runs)}-cpu{host['cpus_usable']}-threads{threads}"
    report = {"name": name, "command": " ".join(["python", "benchmarks/bench_reference_tuning.py"] + sys.argv[1:]),
              "machine": host, "threads": threads, "rounds": args.rounds, "pairs": args.pairs,
              "matmul_gflops": mm["gflops"], "libraries": library_versions(), "load_avg_end": os.getloadavg()[0],
              "results": results}
    save_json(name, report)
    save_md(name, markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
