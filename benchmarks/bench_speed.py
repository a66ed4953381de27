"""Benchmark: how fast the pipeline's default bench measures its points, before and after (issue 21: >= 0.5 points/s).

The README's main command benches 10 points (eager, compiled, torchscript, onnxruntime on onnx and onnx_int8, at
batch 1 and 32, `PipelineConfig().bench_config()`); issue 21 measured its bench stage at 78 s (0.13 points/s). Each
measurement here is a fresh process running `cnnpack.bench.bench` with that config on a copy of a default pipeline
run, with the source tree given (`--before`: an older checkout, e.g. `git archive <commit> | tar -x -C DIR`),
alternated before/after, each with an empty ceilings cache ("cold", what a first run on a machine pays) and, for
trees that cache the ceilings, once more with the cache the cold run left ("warm"). The time between two progress
messages is charged to the first one, so the record says where the time goes.

    .venv/bin/python benchmarks/bench_speed.py RUN --before /tmp/before [--after /tmp/after] [--rounds 2]
    # RUN: a run made by `cnnpack pipeline` (e.g. benchmarks/pipeline_default.py --keep runs/default keeps one)
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import SIMD_FLAGS, lscpu, save_json, save_md, simd  # noqa: E402

from cnnpack.peak import isa_tag  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TARGET_POINTS_PER_S = 0.5
NAME = f"bench-speed-default-cpu2-{isa_tag()}"  # the host's matrix unit: records of other hosts stay

CHILD = r"""
import json, shutil, sys, tempfile, time
from pathlib import Path
t_import = time.perf_counter()
from cnnpack.bench import bench
import torch  # already imported in the pipeline (train ran before bench): not part of the bench's time
from cnnpack.pipeline import PipelineConfig
cfg = PipelineConfig().bench_config()
phases, last = [], ["setup (flops, loads)", time.perf_counter()]
def progress(text):
    now = time.perf_counter()
    phases.append([last[0], now - last[1]])
    last[:] = [text, now]
with tempfile.TemporaryDirectory() as tmp:
    run = Path(tmp) / "run"
    shutil.copytree(sys.argv[1], run, ignore=shutil.ignore_patterns("model_repository", "served"))
    t0 = time.perf_counter()
    section = bench(run, cfg, progress=progress)
    wall = time.perf_counter() - t0
phases.append([last[0], time.perf_counter() - last[1]])
by = {}
for name, s in phases:
    key = "matmul samples" if name == "fp32 matmul" else name
    by[key] = by.get(key, 0.0) + s
rows = [r for r in section["results"] if r["runtime"] != "triton"]  # the run's served rows are kept, not measured
print(json.dumps({"wall_s": wall, "points": len(rows), "points_per_s": len(rows) / wall,
                  "unstable": [f"{r['runtime']}/{r['format']}@{r['batch_size']}" for r in rows if not r["stable"]],
                  "over_ceiling": section.get("over_ceiling", []),
                  "ceilings_cache": section.get("ceilings_cache"),
                  "cpu_others_max": max((r.get("cpu_others") or 0) for r in rows),
                  "phases_s": {k: round(v, 2) for k, v in by.items()},
                  "config": {k: section["config"][k] for k in ("max_seconds", "warmup_s", "window_s", "matmul_n", "matmul_s")}}))
"""


def one(src: Path, run: Path, cache: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(src), "CNNPACK_CACHE": str(cache), "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, "-c", CHILD, str(run)], env=env, capture_output=True, text=True, cwd=src)
    if p.returncode:
        raise SystemExit(f"bench under {src} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--before", type=Path, required=True, help="source tree of the code before the change")
    ap.add_argument("--after", type=Path, default=REPO, help="source tree of the code after it (default: this one)")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    results: dict[str, list] = {"before (cold)": [], "after (cold)": [], "after (warm cache)": []}
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as c1, tempfile.TemporaryDirectory() as c2:
            for label, src, cache in (("before (cold)", args.before, c1), ("after (cold)", args.after, c2),
                                      ("after (warm cache)", args.after, c2)):
                res = one(src.resolve(), args.run.resolve(), Path(cache))
                results[label].append(res)
                print(f"round {r + 1} {label}: {res['points']} points in {res['wall_s']:.1f} s = "
                      f"{res['points_per_s']:.2f} points/s; {res['phases_s']}", file=sys.stderr)
    write(results, args)
    best = min(x["points_per_s"] for x in results["after (cold)"])
    return 0 if best >= TARGET_POINTS_PER_S else 1


def write(results: dict, args) -> None:
    cpu = lscpu()
    flags = set(cpu["flags"].split())
    rec = {"benchmark": NAME, "target_points_per_s": TARGET_POINTS_PER_S, "run": str(args.run),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "lscpu": cpu, "simd_flags": [f for f in SIMD_FLAGS if f in flags],
           "load_1min_end": os.getloadavg()[0], "results": results,
           "reproduce": f".venv/bin/python benchmarks/bench_speed.py RUN --before DIR --rounds {args.rounds}"}
    save_json(NAME, rec)
    busy = max(x["cpu_others_max"] for runs in results.values() for x in runs) > 0.10
    lines = [f"# The pipeline's default bench: points per second (target >= {TARGET_POINTS_PER_S})", "",
             "| tree | round | points | wall s | points/s | unstable | over ceiling | others' CPU (max) | where the time went (s) |",
             "|---|--:|--:|--:|--:|---|---|--:|---|"]
    for label, runs in results.items():
        for i, x in enumerate(runs, 1):
            top = sorted(x["phases_s"].items(), key=lambda kv: -kv[1])[:6]
            lines.append(f"| {label} | {i} | {x['points']} | {x['wall_s']:.1f} | {x['points_per_s']:.2f} | "
                         f"{', '.join(x['unstable']) or '-'} | {', '.join(x['over_ceiling']) or '-'} | "
                         f"{100 * x['cpu_others_max']:.0f} % | {'; '.join(f'{k} {v:.1f}' for k, v in top)} |")
    lines += ["", f"Machine (lscpu): {cpu['model']}, {cpu['cpus']} CPUs, SIMD flags: {simd(flags)}. " + ("Shared with other work while measured" if busy else "Quiet while measured")
              + ": the \"others' CPU\" column is the largest share of the machine's CPU time other processes took during "
                "a row; before and after alternate in each round so both see the same load.", "",
              f"Config of the after tree: {results['after (cold)'][0]['config']}.", "",
              f"Reproduce: `{rec['reproduce']}`", ""]
    save_md(NAME, "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
