"""The pipeline's summary: the figures a person wants at the end of `cnnpack pipeline`, from the run's manifest."""

from __future__ import annotations

import os
from dataclasses import asdict

from cnnpack.precision import parity_table, precision_table
from cnnpack.rundir import Run


def best_runtime(bench: dict) -> dict | None:
    """The non-eager result with the largest speedup over eager (at any batch size)."""
    rows = [r for r in bench.get("results", []) if r["runtime"] not in ("eager", "triton") and r.get("speedup_vs_eager")]
    return max(rows, key=lambda r: r["speedup_vs_eager"], default=None)


def shaky(bench: dict, row: dict) -> bool:
    """Whether a speedup over eager rests on a row measured unsteadily or beside other work: the row's own, or
    eager's at its batch size (a 152 ms eager at batch 1 beside a test run made one 1,901x)."""
    from cnnpack.bench_outputs import BUSY

    eager = [r for r in bench.get("results", []) if r["runtime"] == "eager" and r["batch_size"] == row["batch_size"]
             and r.get("precision", "fp32") == "fp32"]
    return any(not r.get("stable", True) or (r.get("cpu_others") or 0) > BUSY for r in [row, *eager])


def tuned_line(stages: dict) -> str | None:
    """The tune stage's outcome in one line (None: tune did not run)."""
    from cnnpack.triton_config import tuned_in_place
    from cnnpack.tune_outputs import describe, undone_note

    t = stages.get("tune") or {}
    if t.get("status") != "ok" or not t.get("winner"):
        return None
    if note := undone_note(t):  # as the report says it: the winner printed alone read as in effect
        return f"{describe(t)}; {note}"
    if t.get("written") and tuned_in_place(stages) is None:
        return (f"{describe(t)}; since replaced: {t['written']['config']} no longer holds it "
                "(laid out again, undone or edited)")
    return describe(t)


def summary(run: Run, outcomes: list, report: dict, wall_s: float) -> dict:
    """The figures a person wants at the end: accuracy, parity, best runtime, where things are."""
    from cnnpack.bench_outputs import disturbances

    stages = run.read()["stages"]
    train, verify = stages.get("train", {}), stages.get("verify", {})
    best = best_runtime(stages.get("bench", {}))
    triton, served = stages.get("triton", {}), stages.get("served", {})
    parity = parity_table(stages)
    off = {o.name for o in outcomes if o.status == "off"}  # not this run's: an earlier run's figures are not quoted
    return {
        "run": str(run.path),
        "accuracy": train.get("metrics", {}).get("best_val_acc"),
        "parity_passed": verify.get("passed"),
        "parity_max_abs_err": max((r["max_abs_err"] for r in parity if r["max_abs_err"] is not None
                                   and r["precision"] == "fp32"), default=None),
        "parity": parity,  # every (artifact, runtime) pair verify checked, each with its own precision and contract
        "precision": precision_table(stages),
        "best_runtime": best and {k: best.get(k, d) for k, d in (("runtime", None), ("artifact", None),
                                                                 ("precision", "fp32"), ("batch_size", None),
                                                                 ("speedup_vs_eager", None), ("latency_ms_p50", None),
                                                                 ("throughput_ips", None))}
        | {"shaky": shaky(stages["bench"], best)},
        "repository": triton.get("repository"),
        "models": triton.get("models", []),
        "served": None if "served" in off else served.get("summary"),
        "tuned": None if "tune" in off else tuned_line(stages),
        "bench_disturbed": disturbances(stages["bench"]) if stages.get("bench", {}).get("results") else [],
        "report": report,
        "stages": [asdict(o) for o in outcomes],
        "wall_s": round(wall_s, 1),
        "cwd": os.getcwd(),
    }
