"""Benchmark: every bench row against the ceiling of its own precision (issue 21: 0 rows above 100 %).

`cnnpack bench` with its defaults (every runtime whose artifact the run has) on a copy of RUN, `--repeats` times in
fresh processes, each with an empty ceilings cache (the ceilings measured in that process: the best kernel of every
engine, `cnnpack.kernels`). Records each row's share of its precision's ceiling, which kernel set each ceiling, the
matrix engine the CPU flags give it, and the number of rows above 100 %.

    .venv/bin/python benchmarks/ceilings_rows.py RUN [--repeats 2]
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
from common import lscpu, save_json, save_md, simd  # noqa: E402

from cnnpack.peak import isa_tag  # noqa: E402

NAME = "ceilings-rows-{label}-cpu2-" + isa_tag()  # label: the model (cnn64, resnet18_224)

CHILD = r"""
import json, shutil, sys, tempfile
from pathlib import Path
from cnnpack.bench import BenchConfig, bench
with tempfile.TemporaryDirectory() as tmp:
    run = Path(tmp) / "run"
    shutil.copytree(sys.argv[1], run, ignore=shutil.ignore_patterns("model_repository", "served"))
    s = bench(run, BenchConfig(batch_sizes=(1, 32), max_seconds=4.0, plot=False))
print(json.dumps({"ceilings": {p: {"gflops": c["gflops"], "best": c["best"], "matrix_engine": c.get("matrix_engine"),
                                   "theoretical_gflops": c["theoretical_gflops"]["gflops"],
                                   "theoretical_note": c["theoretical_gflops"].get("note"),
                                   "samples": c["samples"]} for p, c in s["ceilings"].items()},
                  "rows": [{k: r.get(k) for k in ("runtime", "format", "precision", "batch_size", "gflops",
                                                  "matmul_gflops", "matmul_share", "stable", "cpu_others")}
                           for r in s["results"] if r["runtime"] != "triton"],
                  "over": s["over_ceiling"], "skipped": s["skipped"]}))
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("run", type=Path)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--label", default="cnn64", help="the model, in the record's name (default: cnn64)")
    args = ap.parse_args()
    name = NAME.format(label=args.label)
    reps = []
    for i in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache:
            env = {**os.environ, "CNNPACK_CACHE": cache, "CUDA_VISIBLE_DEVICES": ""}
            p = subprocess.run([sys.executable, "-c", CHILD, str(args.run.resolve())], env=env, capture_output=True,
                               text=True)
            if p.returncode:
                raise SystemExit(p.stderr[-3000:])
            reps.append(json.loads(p.stdout.strip().splitlines()[-1]))
            print(f"repeat {i + 1}: {len(reps[-1]['rows'])} rows, above their ceiling: {reps[-1]['over'] or 'none'}",
                  file=sys.stderr)
    over = sum(len(r["over"]) for r in reps)
    rec = {"benchmark": name, "target": "0 rows above 100 % of their precision's ceiling", "passed": over == 0,
           "rows_above": over, "repeats": reps, "lscpu": lscpu(), "load_1min_end": os.getloadavg()[0],
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "reproduce": f".venv/bin/python benchmarks/ceilings_rows.py {args.run} --repeats {args.repeats} --label {args.label}"}
    write(rec)
    return 0 if rec["passed"] else 1


def write(rec: dict) -> None:
    save_json(rec["benchmark"], rec)
    flags = set(rec["lscpu"]["flags"].split())
    lines = [f"# Bench rows against the ceiling of their own precision: {rec['target']}: "
             f"**{'met' if rec['passed'] else 'NOT met'}** ({rec['rows_above']} rows above)", ""]
    for i, r in enumerate(rec["repeats"], 1):
        lines += [f"## Repeat {i}", "", "| precision | ceiling G(FL)OP/s | best kernel | matrix engine (CPU flags) | ISA peak |",
                  "|---|--:|---|---|--:|"]
        lines += [f"| {p} | {c['gflops']:.1f} | {c['best']} | {c['matrix_engine']} | {c['theoretical_gflops']:.0f} |"
                  for p, c in r["ceilings"].items()]
        lines += [f"\n{p}'s ISA peak: {c['theoretical_note']}." for p, c in r["ceilings"].items()
                  if c.get("theoretical_note")]
        lines += ["", "| runtime | artifact | precision | batch | G(FL)OP/s | % of its ceiling | stable | others' CPU |",
                  "|---|---|---|--:|--:|--:|---|--:|"]
        lines += [f"| {x['runtime']} | {x['format']} | {x['precision']} | {x['batch_size']} | {x['gflops']:.1f} | "
                  f"{100 * x['matmul_share']:.0f} % | {x['stable']} | {100 * (x['cpu_others'] or 0):.0f} % |"
                  for x in r["rows"]]
        lines += ["", "Skipped: " + ("; ".join(f"{k}: {v}" for k, v in r["skipped"].items()) or "none"), ""]
    others = max((x["cpu_others"] or 0) for r in rec["repeats"] for x in r["rows"])
    lines += [f"Machine (lscpu): {rec['lscpu']['model']}, {rec['lscpu']['cpus']} CPUs, SIMD: "
              f"{simd(flags)}"
              f"; {'quiet' if others < 0.1 else 'shared with other work'} while measured (others' CPU at most "
              f"{100 * others:.0f} %), load average at the end {rec['load_1min_end']:.1f}. {rec['date']}.", "",
              f"Reproduce: `{rec['reproduce']}`", ""]
    save_md(rec["benchmark"], "\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
