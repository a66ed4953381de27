"""The precision table: each artifact's precision, size, accuracy and speed side by side.

Read from the run's manifest only (export, verify and bench sections), so the pipeline's summary,
the report and a script see the same figures:

    artifact   precision  size MB  top-1  drop vs fp32  p50 ms @1  images/s @max  x fp32 ONNX Runtime
"""

from __future__ import annotations

import itertools

from cnnpack.plots import spaced_log_ticks
from cnnpack.rundir import artifact_digest
from cnnpack.runtimes import FORMAT_RUNTIME


def _row(rows: list[dict], runtime: str, fmt: str, batch: int) -> dict | None:
    return next((r for r in rows if r["runtime"] == runtime and r.get("format") == fmt and r["batch_size"] == batch
                 and not r.get("concurrency")), None)


def stale(stages: dict, stage: str) -> list[str]:
    """The artifacts exported again since `stage` (verify or bench) checked them: its figures are an earlier file's."""
    arts = stages.get("export", {}).get("artifacts", {})
    if stage == "verify":
        seen = {f: artifact_digest(r) for f, r in stages.get("verify", {}).get("artifacts", {}).items() if "sha256" in r}
    else:
        seen = stages.get("bench", {}).get("inputs", {})
    out = []
    for fmt, digest in seen.items():
        now = artifact_digest(arts[fmt]) if fmt in arts else None
        # a record made before the weights were part of it holds the file's sha256 alone
        if now and digest != now and not ("+" not in digest and now.split("+")[0] == digest):
            out.append(fmt)
    return sorted(out)


def unverified(stages: dict) -> list[str]:
    """Artifacts exported that the last verify did not check (exported after it, or left out by --formats)."""
    checked = stages.get("verify", {}).get("artifacts")
    if checked is None:
        return []
    return sorted(f for f in stages.get("export", {}).get("artifacts", {}) if f not in checked)


def precision_table(stages: dict) -> list[dict]:
    """One row per exported artifact (fp32 first), from `stages` of a manifest; [] before export."""
    arts = stages.get("export", {}).get("artifacts", {})
    verified = stages.get("verify", {}).get("formats", {})
    rows = [r for r in stages.get("bench", {}).get("results", []) if r.get("runtime") != "triton"]
    batches = sorted({r["batch_size"] for r in rows})
    big = batches[-1] if batches else None
    fp32_acc = (verified.get("onnx") or {}).get("accuracy")
    ort32 = _row(rows, "onnxruntime", "onnx", big) if big else None
    out = []
    pairs = [(fmt, rec, FORMAT_RUNTIME.get(fmt), rec.get("precision", "fp32")) for fmt, rec in arts.items()]
    # a runtime that computes an artifact in its own precision (openvino-bf16 on the fp32 IR) is a row of its own
    pairs += [(fmt, rec, r["runtime"], r["precision"]) for fmt, rec in arts.items()
              for r in rows if r["format"] == fmt and r["batch_size"] == big and r["runtime"] != FORMAT_RUNTIME.get(fmt)
              and r.get("precision", "fp32") != rec.get("precision", "fp32")]
    order = {"fp32": 0, "fp16": 1, "bf16": 2, "int8": 3}
    shaky = doubtful(stages.get("bench", {}))
    for fmt, rec, runtime, precision in sorted(pairs, key=lambda p: (order.get(p[3], 9), p[0])):
        one, many = (_row(rows, runtime, fmt, 1), _row(rows, runtime, fmt, big)) if big else (None, None)
        v = verified.get(fmt) or {}
        acc = (v.get("by_runtime", {}).get(runtime) or v).get("accuracy")
        out.append({
            "artifact": fmt, "precision": precision, "runtime": runtime,
            "size_mb": rec.get("size_mb"),  # runs exported before sizes were recorded: None
            "top1": acc, "drop_pt": 100 * (fp32_acc - acc) if acc is not None and fp32_acc is not None else None,
            "latency_ms_p50_b1": one and one["latency_ms_p50"], "batch_size": big,
            "images_per_s": many and many["throughput_ips"],
            "speedup_vs_fp32": (many["throughput_ips"] / ort32["throughput_ips"]) if many and ort32 else None,
            # which of its figures rest on a bench row measured unstable or on a disturbed machine
            "doubtful": [k for k, used in (("latency_ms_p50_b1", [one]), ("images_per_s", [many]),
                                           ("speedup_vs_fp32", [many, ort32])) if any(id(r) in shaky for r in used if r)],
        })
    return out


def doubtful(bench: dict) -> set[int]:
    """The ids of a bench section's rows whose figures it cautions about: windows that did not agree, other
    processes' CPU time over 5 %, or a slower machine around them (`bench_outputs.disturbances`' rules)."""
    from cnnpack.bench_outputs import BUSY, series_at, slowed

    slow = set(slowed(bench))
    return {id(r) for r in bench.get("results", []) if r.get("runtime") != "triton"
            and (not r.get("stable", True) or (r.get("cpu_others") or 0) > BUSY or series_at(r) in slow)}



def parity_table(stages: dict) -> list[dict]:
    """One row per (artifact, runtime) pair verify checked, each with its own precision, contract and figures
    (openvino-bf16 on the fp32 IR is a bf16 row beside the IR's fp32 one, not hidden under it); [] before verify."""
    out = []
    for fmt, f in stages.get("verify", {}).get("formats", {}).items():
        # manifests written before verify kept its pairs apart: the artifact's figures under its one runtime
        pairs = f.get("by_runtime") or {(f.get("runtimes") or [FORMAT_RUNTIME.get(fmt, "?")])[0]: f}
        for runtime, r in pairs.items():
            precision = r.get("precision", "fp32")
            contract = r.get("contract") or (f.get("contract") if precision == f.get("precision", "fp32") else None)
            out.append({"artifact": fmt, "runtime": runtime, "precision": precision, "contract": contract,
                        "passed": r.get("passed", f.get("passed")), "max_abs_err": r.get("max_abs_err"),
                        "top1_agreement": r.get("top1_agreement"), "accuracy": r.get("accuracy"),
                        "tie_disagreements": r.get("top1_tie_disagreements") or 0,
                        "agreement_gated": r.get("top1_agreement_gated")})
    return out


def parity_line(rows: list[dict]) -> str:
    """The parity table in one line: the worst tensor error of each precision, and the pairs that failed."""
    worst: dict[str, float] = {}
    for r in rows:
        if r["max_abs_err"] is not None:
            worst[r["precision"]] = max(worst.get(r["precision"], 0.0), r["max_abs_err"])
    failed = [f"{r['artifact']} in {r['runtime']} ({r['precision']})" for r in rows if not r["passed"]]
    head = f"FAILED: {', '.join(failed)}" if failed else "every artifact x runtime pair within its precision's contract"
    errs = "; ".join(f"{p} max abs err {e:.1e}" for p, e in worst.items())
    return f"{head} ({errs})" if errs else head


def plot_precision(rows: list[dict], path) -> bool:
    """Accuracy vs latency: top-1 against p50 at batch 1 (left) and against images/s at the largest batch
    (right), one labelled point per artifact. False (nothing written) when no row has both figures."""
    from matplotlib.figure import Figure  # not pyplot: a notebook's backend is left alone

    from cnnpack.atomic import atomic_path

    pts = [r for r in rows if r.get("top1") is not None and r.get("latency_ms_p50_b1")]
    if not pts:
        return False
    fig = Figure(figsize=(11, 4.6))
    axes = fig.subplots(1, 2)
    colours = {"fp32": "tab:blue", "fp16": "tab:orange", "bf16": "tab:green", "int8": "tab:red"}
    # a marker per artifact and one legend below: labels beside the points overlapped where artifacts sit close
    # (on AMX, OpenVINO's int8 and bf16 within 5 % of each other) and were cut at the plot's edges
    names = [f"{r['artifact']} ({r['precision']})" if r["runtime"] == FORMAT_RUNTIME.get(r["artifact"])
             else f"{r['runtime']} ({r['precision']})" for r in pts]
    markers = dict(zip(dict.fromkeys(names), itertools.cycle("osD^vPX*hp<>")))
    for ax, key, label in ((axes[0], "latency_ms_p50_b1", "p50 latency at batch 1 (ms, lower is better)"),
                           (axes[1], "images_per_s", f"images/s at batch {pts[0]['batch_size']} (higher is better)")):
        for r, name in zip(pts, names):
            if r.get(key) is not None:
                ax.scatter(r[key], 100 * r["top1"], s=70, marker=markers[name], label=name, alpha=0.85,
                           color=colours.get(r["precision"], "tab:gray"), edgecolors="black", linewidths=0.5, zorder=3)
        ax.set(xlabel=label, ylabel="validation top-1 (%)", xscale="log")
        ax.margins(x=0.15)
        spaced_log_ticks(ax, fontsize=8)
        ax.tick_params(axis="x", which="both", labelsize=8)
        ax.grid(alpha=0.3)
        lo = min(100 * r["top1"] for r in pts)
        ax.set_ylim(max(0, lo - 2), min(100.5, max(100 * r["top1"] for r in pts) + 1))
    handles, labels = axes[0].get_legend_handles_labels()
    more = [(h, lab) for h, lab in zip(*axes[1].get_legend_handles_labels()) if lab not in labels]
    fig.legend(handles + [h for h, _ in more], labels + [lab for _, lab in more], loc="lower center", fontsize=8,
               ncol=min(4, len(markers)), frameon=False, bbox_to_anchor=(0.5, 0.0))  # below the axes' labels
    fig.subplots_adjust(bottom=0.2 + 0.05 * ((len(markers) - 1) // 4), wspace=0.25)
    fig.suptitle("accuracy vs speed per artifact and precision (each in its own runtime, same threads)", fontsize=10)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return True
