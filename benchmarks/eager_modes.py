"""Benchmark: how steady eager PyTorch's batch-1 latency is from one process to the next, the baseline of every
"x eager" figure bench prints (the built-in cnn at 64 px, random weights: latency does not depend on them).

Each round starts fresh processes, alternating 2 threads (bench's default on 2 cores) and 1 thread; each process
warms up, then takes the median call time of 8 windows of 0.3 s. A process whose window medians sit in two groups
(one more than 1.5x the other) switched mode while it ran.

    .venv/bin/python benchmarks/eager_modes.py --rounds 6   # writes results/eager-modes-cpu2-<isa>.{json,md}
"""

from __future__ import annotations

import datetime as dt
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CORES, lscpu, machine, pin_cores, save_json, save_md, simd, wait_for_quiet  # noqa: E402

from cnnpack.peak import isa_tag  # noqa: E402

NAME = f"eager-modes-cpu{CORES}-{isa_tag()}"
CHILD = r"""
import json, statistics, sys, time
import torch
from cnnpack.models import build_model
from cnnpack.spec import ModelSpec
torch.manual_seed(0)
torch.set_num_threads(int(sys.argv[1]))
spec = ModelSpec(arch="cnn", num_classes=10, classes=tuple(str(i) for i in range(10)), image_size=64)
model, x = build_model(spec).eval(), torch.randn(1, 3, 64, 64)
medians = []
with torch.inference_mode():
    for _ in range(50):
        model(x)
    for _ in range(8):
        times, end = [], time.perf_counter() + 0.3
        while time.perf_counter() < end:
            t = time.perf_counter(); model(x); times.append(time.perf_counter() - t)
        medians.append(1e3 * statistics.median(times))
print(json.dumps(medians))
"""


def one(threads: int, cores: list[int]) -> list[float]:
    import os

    out = subprocess.run([sys.executable, "-c", CHILD, str(threads)], capture_output=True, text=True, check=True,
                         preexec_fn=lambda: os.sched_setaffinity(0, cores))
    return json.loads(out.stdout)


def main() -> int:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=6, help="processes per thread count")
    args = ap.parse_args()
    cores = pin_cores()
    waited = wait_for_quiet(cores, time.monotonic() + 300)
    procs = []
    for r in range(args.rounds):
        for threads in (2, 1):
            medians = one(threads, cores)
            procs.append({"round": r + 1, "threads": threads, "window_medians_ms": [round(m, 3) for m in medians],
                          "median_ms": round(statistics.median(medians), 3),
                          "switched": max(medians) > 1.5 * min(medians)})
            print(f"round {r + 1}, {threads} thread(s): {procs[-1]['window_medians_ms']}", file=sys.stderr)
    info = lscpu()
    record = {"benchmark": NAME, "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": machine(cores), "simd": simd(info["flags"]), "waited_for_quiet_s": waited, "processes": procs,
              "reproduce": f".venv/bin/python benchmarks/eager_modes.py --rounds {args.rounds}"}
    save_json(NAME, record)
    lines = ["# Eager PyTorch at batch 1 (cnn@64), process to process: the baseline of bench's \"x eager\"", "",
             "| round | threads | median of the process (ms) | its 8 windows' medians (ms) | switched mode |",
             "|--:|--:|--:|---|---|"]
    lines += [f"| {p['round']} | {p['threads']} | {p['median_ms']:.3f} | "
              f"{', '.join(f'{m:.2f}' for m in p['window_medians_ms'])} | {'yes' if p['switched'] else ''} |"
              for p in procs]
    for threads in (2, 1):
        meds = [p["median_ms"] for p in procs if p["threads"] == threads]
        lines += ["", f"{threads} thread(s): process medians {min(meds):.3f}-{max(meds):.3f} ms "
                      f"(max/min {max(meds) / min(meds):.2f}); "
                      f"{sum(p['switched'] for p in procs if p['threads'] == threads)} of {len(meds)} processes "
                      "switched mode within the run."]
    lines += ["", f"Machine: {record['machine']['cpu']}, SIMD: {record['simd']}; cores {cores}, torch "
                  f"{record['machine']['torch']}, cnnpack {record['machine']['commit']}. {record['date']}.", "",
              f"Reproduce: `{record['reproduce']}`", ""]
    save_md(NAME, "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
