"""Benchmark: int8 (cnnpack quantize) against fp32 ONNX Runtime, interleaved in one process.

Two models:
  - resnet18 @ 224 px, `cnnpack export --arch resnet18` (random weights: no downloads here), quantized
    with `cnnpack quantize --data shapes` (calibrated on built-in images drawn at 224 px). Random weights
    make its top-1 meaningless, so its gate is opened (--max-drop 100 --min-agreement 0.01) and the
    agreement reached is reported; this model is here for speed.
  - the built-in `cnn` as the default `cnnpack pipeline` trains it (64 px), quantized under the default
    gate (0.5 pt, 99 % agreement): its top-1 drop is the accuracy target.

Speed: both files in ONNX Runtime's CPU provider with the same threads, measured in alternating
rounds (fp32, int8, fp32, int8, ...) of `--seconds` each, so a drift of the shared host hits both;
the ratio of the per-round medians is reported with its spread. The int8 row's share of the
machine's measured int8 ceiling (ORT MatMulInteger) and the fp32 row's share of the fp32 ceiling
are measured in the same process. The CPU model and its VNNI/BF16/AMX flags are recorded.

Targets (issue 14): resnet18 int8 >= 3.0x fp32 at batch 1 and 32; cnn drop <= 0.5 pt and int8 >= 1.5x
fp32 at batch 32.

    .venv/bin/python benchmarks/quantize_int8.py --cnn-run runs/pipeline-shapes-cnn-64px
        # writes benchmarks/results/quantize-int8-cpu<C>-threads<T>.{json,md}
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cnnpack, save_json, save_md  # noqa: E402

from cnnpack.peak import ceilings, cpu_info  # noqa: E402
from cnnpack.rundir import Run, library_versions  # noqa: E402

SHAPES = "circle,crescent,cross,square,star,triangle"  # the order of the class folders


def prepare_resnet18(work: Path) -> Path:
    run = work / "resnet18_224"
    arts = Run.open(run).read()["stages"].get("export", {}).get("artifacts", {}) if (run / "cnnpack.json").is_file() else {}
    if "onnx" not in arts:
        cnnpack("export", "--arch", "resnet18", "--num-classes", "6", "--classes", SHAPES, "--image-size", "224",
                "--format", "onnx", "--max-batch-size", "32", "--run", str(run), "--force")
    if "onnx_int8" not in Run.open(run).read()["stages"]["export"]["artifacts"]:
        cnnpack("quantize", "--run", str(run), "--data", "shapes", "--calibration-images", "256",
                "--max-drop", "100", "--min-agreement", "0.01")
    return run


def prepare_cnn(cnn_run: Path) -> Path:
    arts = Run.open(cnn_run).read()["stages"]["export"]["artifacts"]
    if "onnx_int8" not in arts:
        cnnpack("quantize", "--run", str(cnn_run))  # the default gate
    return cnn_run


def session(path: Path, threads: int):
    import onnxruntime as ort

    from cnnpack.runtimes import OrtRuntime

    return ort.InferenceSession(str(path), OrtRuntime.session_options(threads), providers=["CPUExecutionProvider"])


def round_median(sess, x: np.ndarray, seconds: float) -> float:
    """Median latency (s) of back-to-back runs for `seconds` (at least 5 runs)."""
    name = sess.get_inputs()[0].name
    lat = []
    end = time.perf_counter() + seconds
    while len(lat) < 5 or time.perf_counter() < end:
        t0 = time.perf_counter()
        sess.run(None, {name: x})
        lat.append(time.perf_counter() - t0)
    return float(np.median(lat))


def interleaved(run: Path, batch: int, threads: int, rounds: int, seconds: float, flops: float,
                ceiling: dict) -> dict:
    arts = Run.open(run).read()["stages"]["export"]["artifacts"]
    spec = Run.open(run).model_spec
    x = np.random.default_rng(0).integers(0, 256, (batch, 3, spec["image_size"], spec["image_size"])).astype(np.float32)
    sess = {p: session(run / arts[f]["path"], threads) for p, f in (("fp32", "onnx"), ("int8", "onnx_int8"))}
    for s in sess.values():  # warm-up
        round_median(s, x, 0.5)
    t = {"fp32": [], "int8": []}
    for _ in range(rounds):
        for p in ("fp32", "int8"):
            t[p].append(round_median(sess[p], x, seconds))
    ratios = [a / b for a, b in zip(t["fp32"], t["int8"])]
    out = {"batch": batch, "rounds": rounds, "ratio_median": float(np.median(ratios)),
           "ratio_min": min(ratios), "ratio_max": max(ratios)}
    for p in ("fp32", "int8"):
        med = float(np.median(t[p]))
        gops = batch * flops / med / 1e9
        out[p] = {"latency_ms_p50": 1e3 * med, "images_per_s": batch / med, "gops": gops,
                  "share_of_ceiling": gops / ceiling[p]["gflops"]}
    return out


def model_flops(run: Path) -> float:
    from cnnpack.bench import count_flops

    return float(count_flops(Run.open(run)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cnn-run", type=Path, required=True, help="a run made by the default `cnnpack pipeline`")
    ap.add_argument("--work", type=Path, default=Path("runs/bench-quantize"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--seconds", type=float, default=1.0)
    args = ap.parse_args()

    info = cpu_info()
    print(f"CPU: {info['model']} flags {info['flags']}", flush=True)
    r18, cnn = prepare_resnet18(args.work), prepare_cnn(args.cnn_run)
    ceil = ceilings(args.threads)
    models = {}
    for name, run in (("resnet18_224", r18), ("cnn64", cnn)):
        q = Run.open(run).read()["stages"]["quantize"]
        flops = model_flops(run)
        rows = [interleaved(run, b, args.threads, args.rounds, args.seconds, flops, ceil) for b in (1, 32)]
        models[name] = {"gate": q["gate"], "kept_float": q["kept_float"], "calibration": q["calibration"],
                        "gflops_per_image": flops / 1e9, "rows": rows}
        for r in rows:
            print(f"{name} b{r['batch']}: int8 {r['ratio_median']:.2f}x fp32 (rounds {r['ratio_min']:.2f}.."
                  f"{r['ratio_max']:.2f}); int8 {r['int8']['latency_ms_p50']:.2f} ms, "
                  f"{100 * r['int8']['share_of_ceiling']:.0f} % of the int8 ceiling", flush=True)
    write(args, info, ceil, models)


def write(args, info: dict, ceil: dict, models: dict) -> None:
    stem = f"quantize-int8-cpu{len(os.sched_getaffinity(0))}-threads{args.threads}"
    when = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    record = {"when": when, "cpu": info, "threads": args.threads, "ceilings": ceil, "models": models,
              "libraries": library_versions(), "command": " ".join(sys.argv)}
    save_json(stem, record)
    r18, cnn = models["resnet18_224"], models["cnn64"]
    lines = [f"# cnnpack quantize: int8 vs fp32 ONNX Runtime ({stem})", "",
             f"{when}, {info['model']}, flags: {', '.join(info['flags'])}; {args.threads} threads; "
             f"onnxruntime {record['libraries'].get('onnxruntime-gpu') or record['libraries'].get('onnxruntime')}.",
             f"Command: `python {' '.join(sys.argv)}`", "",
             "Measured ceilings (best of several matrix multiplies, same threads) and the ISA's theoretical peak:", ""]
    for p, c in ceil.items():
        t = c["theoretical_gflops"]
        lines.append(f"- {p}: {c['gflops']:.0f} G(FL)OP/s ({c['best']}); theoretical {t['gflops']:.0f} "
                     f"({t['cores']} cores x {t['mhz']:.0f} MHz x {t['ops_per_cycle']:g} ops/cycle: {t['assumes']})")
    lines += ["", "| model | batch | fp32 p50 ms | int8 p50 ms | int8 / fp32 speed (median, min..max of rounds) | "
                  "fp32 % of fp32 ceiling | int8 % of int8 ceiling |", "|---|--:|--:|--:|--:|--:|--:|"]
    for name, m in models.items():
        for r in m["rows"]:
            lines.append(f"| {name} | {r['batch']} | {r['fp32']['latency_ms_p50']:.2f} | {r['int8']['latency_ms_p50']:.2f} | "
                         f"{r['ratio_median']:.2f}x ({r['ratio_min']:.2f}..{r['ratio_max']:.2f}) | "
                         f"{100 * r['fp32']['share_of_ceiling']:.0f} | {100 * r['int8']['share_of_ceiling']:.0f} |")
    g = cnn["gate"]
    target = lambda ok: "met" if ok else "**not met**"  # noqa: E731
    r18_1, r18_32 = (r["ratio_median"] for r in r18["rows"])
    lines += ["", "## Targets", "",
              f"- resnet18@224 int8 >= 3.0x fp32 at batch 1: {r18_1:.2f}x, {target(r18_1 >= 3.0)}; at batch 32: "
              f"{r18_32:.2f}x, {target(r18_32 >= 3.0)} (top-1 agreement with fp32 on shapes@224: "
              f"{100 * r18['gate']['top1_agreement_vs_fp32']:.1f}%, random weights).",
              f"- cnn (default pipeline) top-1 drop <= 0.5 pt: {g['drop_pt']:+.2f} pt ({100 * g['int8_accuracy']:.2f}% "
              f"vs {100 * g['fp32_accuracy']:.2f}% on {g['val_images']} validation images, agreement "
              f"{100 * g['top1_agreement_vs_fp32']:.2f}%, kept in float: {', '.join(cnn['kept_float']) or 'none'}), "
              f"{target(g['drop_pt'] <= 0.5)}.",
              f"- cnn int8 >= 1.5x fp32 at batch 32: {cnn['rows'][1]['ratio_median']:.2f}x, "
              f"{target(cnn['rows'][1]['ratio_median'] >= 1.5)}."]
    save_md(stem, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
