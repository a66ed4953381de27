"""What `cnnpack bench` writes: bench.json, bench.csv and bench.png, and a row's name in tables and plots."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from cnnpack.atomic import atomic_path, atomic_write_json, atomic_write_text
from cnnpack.rundir import Run

CSV_COLUMNS = ("runtime", "format", "precision", "batch_size", "concurrency", "latency_ms_p50", "latency_ms_p90", "latency_ms_p95",
               "latency_ms_p99", "latency_ms_mean", "throughput_ips", "gflops", "matmul_gflops", "matmul_share",
               "speedup_vs_eager", "speedup_vs_fp32", "peak_rss_mb", "load_s", "first_call_s", "cpu_others", "stable", "requests", "server_batch_mean", "load_generator", "protocol")


def commit_outputs(run: Run, section: dict, *, plot: bool = True) -> None:
    """bench.json (everything), bench.csv (one row per runtime x batch size) and bench.png, written beside their
    places, then put in place with `stages.bench` as one step (a bench.png that could not be written left the new
    bench.json and bench.csv beside the old record, and the report disagreeing with them). Call under
    `run.committing()`."""
    names = ["bench.json", "bench.csv", *(["bench.png"] if plot else [])]
    with run.staged_outputs(*names) as staged:
        atomic_write_json(staged["bench.json"], section)
        buf = io.StringIO()
        w = csv.DictWriter(buf, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        w.writerows(section["results"])
        atomic_write_text(staged["bench.csv"], buf.getvalue())
        if plot:
            plot_results(section, staged["bench.png"])
        run.commit_stage("bench", section, staged)
    if not plot:  # an earlier bench's figure would show rows this one replaced
        run.file("bench.png").unlink(missing_ok=True)


def series(row: dict) -> str:
    """A row's name in tables and plots: the runtime (with a precision other than fp32), or for a served model
    its format, protocol where gRPC, and concurrency."""
    if row.get("concurrency"):  # a gRPC load named as such (one model loaded over both read as one in the plot)
        return f"{row['format']}{' grpc' if row.get('protocol') == 'grpc' else ''} c{row['concurrency']}"
    precision = row.get("precision", "fp32")
    return row["runtime"] if precision == "fp32" or row["runtime"].endswith(precision) else f"{row['runtime']} {precision}"


def plot_results(section: dict, path: Path) -> None:
    """Left: median latency vs batch size (p99 as the band's top). Right: throughput per runtime."""
    import matplotlib.ticker
    from matplotlib.figure import Figure  # not pyplot: a notebook's backend is left alone

    results = section["results"]
    runtimes = list(dict.fromkeys(series(r) for r in results))
    batches = sorted({r["batch_size"] for r in results})
    fig = Figure(figsize=(12, 4.6))
    a, b = fig.subplots(1, 2)
    width = 0.8 / len(batches)
    # past 10 series the default colours repeat (a served row took eager's blue): 20 of them; served rows dashed
    colours = matplotlib.colormaps["tab20" if len(runtimes) > 10 else "tab10"].colors
    for k, name in enumerate(runtimes):
        rows = sorted((r for r in results if series(r) == name), key=lambda r: r["batch_size"])
        x = [r["batch_size"] for r in rows]
        served = rows[0].get("runtime") == "triton"
        line, = a.plot(x, [r["latency_ms_p50"] for r in rows], "s--" if served else "o-", label=name,
                       color=colours[k % len(colours)])
        a.fill_between(x, [r["latency_ms_p50"] for r in rows], [r["latency_ms_p99"] for r in rows],
                       color=line.get_color(), alpha=0.15)
    crowded = len(runtimes) * len(batches) > 12  # bar values side by side would print over each other
    for j, bs in enumerate(batches):
        vals = [next((r["throughput_ips"] for r in results if series(r) == n and r["batch_size"] == bs), np.nan)
                for n in runtimes]
        bars = b.bar(np.arange(len(runtimes)) + (j - (len(batches) - 1) / 2) * width, vals, width,
                     label=f"batch {bs}")
        b.bar_label(bars, labels=["" if np.isnan(v) else f"{v:.0f}" for v in vals], fontsize=6 if crowded else 7,
                    padding=1, rotation=90 if crowded else 0)
    a.set(xscale="log", yscale="log", xlabel="batch size", ylabel="latency (ms): median, band to p99",
          title="latency per request")
    a.set_xticks(batches, [str(x) for x in batches])
    a.minorticks_off()
    a.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1, 2, 5)))
    a.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    b.set_xticks(range(len(runtimes)), runtimes, rotation=35 if len(runtimes) > 4 else 0,
                 ha="right" if len(runtimes) > 4 else "center", fontsize=7 if len(runtimes) > 8 else 8)
    if crowded:
        b.margins(y=0.15)  # room above the tallest bar for its upright value
    b.set(ylabel="images / s", title=f"throughput ({section['threads']} threads, {section['device']})")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    # many series: the legend below the plot, not over its lines
    a.legend(fontsize=7, **({"ncol": 3, "loc": "upper center", "bbox_to_anchor": (0.5, -0.14)}
                            if len(runtimes) > 6 else {}))
    b.legend(fontsize=8)
    from cnnpack.peak import short

    fig.suptitle(f"{section['model']} ({section['model_gflops_per_image']:.3g} GFLOP/image); this machine's measured "
                 f"matmul ceilings (G(FL)OP/s): {short(section)}",
                 fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")


def _duration(s: float) -> str:
    return f"{s:.1f} s" if s >= 1 else f"{s:.2f} s" if s >= 0.1 else f"{1e3 * s:.1f} ms"


def cold_starts(results: list[dict]) -> str | None:
    """One line: each runtime's load and its first call at each batch size (what a new process pays before it
    answers at the measured speed; torch.compile's build shows here), or None when no row has them."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        if r.get("load_s") is not None and r.get("first_call_s") is not None:
            groups.setdefault(series(r), []).append(r)
    if not groups:
        return None
    parts = [f"{name}: load {_duration(rows[0]['load_s'])}, first call "
             + ", ".join(f"{_duration(r['first_call_s'])} at batch {r['batch_size']}" for r in rows)
             for name, rows in groups.items()]
    return "; ".join(parts)


BUSY = 0.05  # other processes' share of the machine's CPU above which a row's figures were disturbed


def disturbances(section: dict) -> list[str]:
    """What makes a bench's numbers less than trustworthy, one sentence each (empty: nothing seen)."""
    out = []
    unstable = [series_at(r) for r in section["results"] if not r.get("stable", True)]
    if unstable:
        out.append(f"unstable (windows did not agree within {100 * section['config']['stability']:.0f} % before "
                   f"--max-seconds): {', '.join(unstable)}")
    busy = [f"{series(r)}@{r['batch_size']} {100 * r['cpu_others']:.0f} %" for r in section["results"]
            if (r.get("cpu_others") or 0) > BUSY]
    if busy:
        out.append(f"other processes took CPU time during: {', '.join(busy)}; rerun on a quiet machine")
    return out + speed_cautions(section)


def speed_cautions(section: dict) -> list[str]:
    """The cautions of `disturbances` that the fp32 matmul samples and the ceilings give (the report words the
    unstable and busy rows itself)."""
    out = []
    if section.get("over_ceiling"):
        out.append(f"rows above the measured ceiling of their precision: {', '.join(section['over_ceiling'])}: the "
                   "ceiling was measured low (a busy machine?); rerun on a quiet machine")
    rates = section.get("matmul", {}).get("samples_gflops") or []
    rows = [r for r in section["results"] if "matmul_before_gflops" in r]  # (records from before: none)
    if len(rates) >= 3 and rows:
        if slow := slowed(section):
            bests = ", ".join(f"{b:.0f}" for b in sorted({best_sample(r, rates) for r in rows if series_at(r) in slow}))
            was, its = ("was", "its") if len(slow) == 1 else ("were", "their")
            out.append(f"the machine ran slower while {', '.join(slow)} {was} measured (the fp32 matmul rate before and "
                       f"after each more than 10 % under its bench's best, {bests} GFLOP/s, or one of the two under "
                       f"half of it): {its} figures may be low; rerun on a quiet machine")
    elif rates and section["matmul"].get("spread", 0) > 0.10:  # one runtime's two samples, or an older record
        out.append(f"the fp32 matmul rate varied from {min(rates):.0f} to {max(rates):.0f} GFLOP/s during the run: "
                   "the machine was busy or its speed changed; rerun on a quiet machine")
    return out


def slowed(section: dict) -> list[str]:
    """`slower_rows` of a bench section: its rows that kept their two samples, judged where it has samples enough to
    tell a slowdown from a dip (3 or more; else none: the spread rule of `speed_cautions` speaks for it)."""
    rates = section.get("matmul", {}).get("samples_gflops") or []
    rows = [r for r in section.get("results", []) if "matmul_before_gflops" in r]
    return slower_rows(rows, rates) if len(rates) >= 3 and rows else []


def slower_rows(rows: list[dict], rates: list[float]) -> list[str]:
    """The rows measured while the machine ran slower: the fp32 matmul samples right before and right after their
    runtime both more than 10 % under the run's best sample (`rates`; the fp32 ceiling is the best too, and a long
    slowdown would pull a median down with it). One sample alone says little: a 0.1 s matmul dipped 15-30 % a few
    times in 60 on a quiet 2-core VM (Zen 4), so the spread of all samples, the rule before, cautioned nearly every
    run on such a host. A sample under half the best is no such dip (one fell to 9 % of it while another process
    took the cores, and eager at batch 1 ran 100x slower than its own first call): both rows beside it are named."""
    def slow(r: dict) -> bool:  # (a served row merged in: the halving also against this section's best, as its
        best, pair = best_sample(r, rates), (r["matmul_before_gflops"], r["matmul_after_gflops"])  # own bench may
        return max(pair) < 0.9 * best or min(pair) < 0.5 * max(best, *rates)  # have run starved throughout)

    return [series_at(r) for r in rows if slow(r)]


def best_sample(row: dict, rates: list[float]) -> float:
    """The best fp32 matmul sample of the bench that measured `row` (rows a served bench merged in were measured by
    their own; a record from before rows kept it: the section's samples, `rates`)."""
    return row.get("matmul_best_gflops") or max(rates)


def series_at(row: dict) -> str:
    return f"{series(row)}@{row['batch_size']}"
