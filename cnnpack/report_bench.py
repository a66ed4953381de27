"""The report's bench section: the local runtimes' rows, the measured ceilings they are held to, the cautions of an
unsteady or busy measurement, and the speedup plot (report.py assembles it with the others)."""

from __future__ import annotations

from pathlib import Path

from cnnpack.errors import count, shell
from cnnpack.report_render import Block, num, pct, times
from cnnpack.rundir import Run


def bench_section(m: dict, run: Run) -> list[Block]:
    b = m.get("stages", {}).get("bench")
    if not b:
        return []
    res = [r for r in b.get("results", []) if r["runtime"] != "triton"]  # served rows: in their own section
    failed = [Block("p", f"**The last bench {b['status']}** ({b.get('error') or 'no reason recorded'})"
                         + ("; the rows below are of the bench before it." if res else "."))
              ] if b.get("status", "ok") != "ok" else []
    if not res:  # no local bench (only a served one: in its own section), or none that finished
        return [Block("h2", "Latency and throughput"), *failed] if failed else []
    peak = b.get("machine_peak_gflops")
    from cnnpack.bench import series

    rows = [["runtime", "precision", "batch", "p50 ms", "p99 ms", "images/s", "speedup vs eager", "G(FL)OP/s",
             "% of ceiling", "stable"]]
    for r in res:
        rows.append([series(r), r.get("precision", "fp32"), str(r["batch_size"]), num(r["latency_ms_p50"], "{:.2f}"),
                     num(r["latency_ms_p99"], "{:.2f}"), num(r["throughput_ips"], "{:,.0f}"),
                     times(r.get("speedup_vs_eager")), num(r.get("gflops"), "{:.1f}"),
                     pct(r.get("matmul_share")), "yes" if r.get("stable", True) else "**no**"])
    out = [Block("h2", "Latency and throughput"), *failed,
           Block("p", f"`{b.get('model')}` on {b.get('device')}, {count(b['threads'], 'thread') if b.get('threads') else '? threads'} for every runtime. "
                      f"The share column compares each row with this machine's measured matrix-multiply ceiling of "
                      f"the row's own precision: {_ceilings(b, peak)}. Speedup: eager's median latency over the "
                      "runtime's, at the same batch size."),
           Block("table", rows=rows)]
    from cnnpack.bench_outputs import cold_starts

    if cold := cold_starts(res):
        out.append(Block("p", f"**Cold start** ({COLD_START}): {cold}."))
    out += [Block("p", w) for w in _bench_warnings(b, res)]
    from cnnpack.precision import stale

    if old := stale(m.get("stages", {}), "bench"):
        out.append(Block("p", f"**Stale**: the rows of {', '.join(old)} measured an earlier export of "
                              f"{'it' if len(old) == 1 else 'them'}; rerun `cnnpack bench --run {shell(run.path)}` "
                              "for the files as they are now."))
    if _speedup_plot(b, run.file(SPEEDUP_PNG)):
        out.append(Block("img", text="speedup over eager and share of the machine's matmul rate", path=SPEEDUP_PNG))
    if run.file("bench.png").exists() or "bench.png" in (b.get("outputs") or {}):  # (gone since: said missing)
        out.append(Block("img", text="latency and throughput per runtime", path="bench.png"))
    return out


def _ceilings(b: dict, peak) -> str:
    c = b.get("ceilings") or {}
    if not c:
        return f"fp32 {num(peak, '{:.1f}')} GFLOP/s"
    def one(p: str, v: dict) -> str:
        engine = f" on {v['matrix_engine']}" if v.get("matrix_engine") else ""
        t = v.get("theoretical_gflops")
        if t is None:  # a GPU's: its own kernels, no ISA peak
            return f"{p}{engine} {v['gflops']:.0f} G(FL)OP/s (best of its kernels: {v['best']})"
        note = f"; {t['note']}" if t.get("note") else ""
        return (f"{p}{engine} {v['gflops']:.0f} G(FL)OP/s (best of every engine: {v['best']}; the ISA's theoretical "
                f"peak {t['gflops']:.0f} at "
                f"{t['mhz']:.0f} MHz, assuming {t['assumes']}{note})")

    return "; ".join(one(p, v) for p, v in c.items())


def _bench_warnings(b: dict, res: list[dict]) -> list[str]:
    """What makes these numbers (the local rows `res`) less than trustworthy, said in the report itself; the slower
    machine's caution names the served rows too, as the pipeline's summary does (the served table marks their
    unsteady windows itself)."""
    from cnnpack.bench import series, series_at
    from cnnpack.bench_outputs import BUSY, speed_cautions

    out = []
    unstable = [series_at(r) for r in res if not r.get("stable", True)]
    if unstable:
        out.append(f"**Unstable**: the measurement windows of {', '.join(unstable)} did not agree within "
                   f"{100 * b.get('config', {}).get('stability', 0.1):.0f} % before the time limit.")
    busy = [f"{series(r)}@{r['batch_size']} ({100 * r['cpu_others']:.0f} %)" for r in res
            if (r.get("cpu_others") or 0) > BUSY]
    if busy:
        out.append(f"**Disturbed**: other processes used CPU time while measuring {', '.join(busy)}; "
                   "rerun `cnnpack bench` on a quiet machine for numbers to quote.")
    out += [f"**Slower machine**: {c[0].upper()}{c[1:]}." for c in speed_cautions(b)]
    for name, why in b.get("skipped", {}).items():
        out.append(f"Skipped `{name}`: {why}")
    return out


SPEEDUP_PNG = "speedup.png"
COLD_START = ("each runtime's load, then its first call at each batch size, before the warm-up: what a new process "
              "or server instance pays before it answers at the speeds above")


def _speedup_plot(b: dict, path: Path) -> bool:
    """Left: speedup over eager per runtime and batch size. Right: share of the machine's matmul rate."""
    res = [r for r in b.get("results", []) if r.get("speedup_vs_eager") is not None and r["runtime"] != "triton"]
    if not res:
        return False
    import numpy as np
    from matplotlib.figure import Figure

    from cnnpack.atomic import atomic_path
    from cnnpack.bench import series

    runtimes = list(dict.fromkeys(series(r) for r in res))
    sizes = sorted({r["batch_size"] for r in res})
    cell = {(series(r), r["batch_size"]): r for r in res}
    x, width = np.arange(len(runtimes)), 0.8 / len(sizes)
    fig = Figure(figsize=(11, 4))
    axes = fig.subplots(1, 2)
    for ax, key, label, scale in ((axes[0], "speedup_vs_eager", "speedup over eager (×)", 1),
                                  (axes[1], "matmul_share", "% of the machine's ceiling (own precision)", 100)):
        for i, bs in enumerate(sizes):
            vals = [scale * (cell[(rt, bs)].get(key) or 0) if (rt, bs) in cell else 0 for rt in runtimes]
            bars = ax.bar(x + (i - (len(sizes) - 1) / 2) * width, vals, width, label=f"batch {bs}")
            ax.bar_label(bars, fmt="%.1f" if scale == 1 else "%.0f", fontsize=8)
        ax.set_xticks(x, runtimes, rotation=30 if len(runtimes) > 3 else 0, fontsize=8,  # right-aligned: no overlap
                      ha="right" if len(runtimes) > 3 else "center", rotation_mode="anchor")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0].axhline(1, color="gray", lw=1, ls="--")
    from cnnpack.peak import short

    fig.suptitle(f"{b.get('model')}: {b.get('threads')} threads; measured matmul ceilings {short(b)} G(FL)OP/s")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return True
