"""Benchmark: OpenVINO (fp32, bf16 inference, NNCF int8) against fp32 ONNX Runtime, and served by Triton.

Model: resnet18 @ 224 px from `cnnpack export --arch resnet18` (random weights: no downloads here), its IR
from `cnnpack export --format openvino` and its int8 IR from `cnnpack quantize --backend openvino --data
shapes` (calibrated on built-in images; the gate is opened because random weights make top-1
meaningless: the agreement reached is reported). Also the built-in `cnn` of the default pipeline run, with
each OpenVINO artifact's figures against its contract (from `cnnpack verify`).

Local: ONNX Runtime fp32, OpenVINO f32, OpenVINO bf16 (INFERENCE_PRECISION_HINT) and OpenVINO int8, 2 threads,
in alternating rounds in one process (a drift of the shared host hits all of them); median per round, ratios
of the medians to ONNX Runtime fp32.

Served: the same resnet18 as `cnn_onnx` (fp32 ONNX Runtime) and `cnn_openvino_int8` in one local Triton
(cnnpack's Python-based backends, 2 threads each), batch-1 requests at concurrency 16 over gRPC, one model
after the other; client and server share the 2 cores.

Targets (issue 15): int8 >= 3.5x fp32 ONNX Runtime at batch 1 and 32; bf16 >= 1.8x; OpenVINO fp32 within 10 %
of ONNX Runtime fp32; served OpenVINO int8 at concurrency 16 >= 2.5x the served fp32 ONNX model.

    .venv/bin/python benchmarks/openvino_cpu.py --cnn-run runs/default/runs/pipeline-shapes-cnn-64px
        # writes benchmarks/results/openvino-cpu<C>-threads<T>-<isa>.{json,md}
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path

import numpy as np

from cnnpack.peak import cpu_info, isa_tag
from cnnpack.rundir import Run, library_versions

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cnnpack, save_json, save_md  # noqa: E402
from quantize_int8 import SHAPES  # noqa: E402 - the class order, one place


def artifacts(run: Path) -> dict:
    return Run.open(run).read()["stages"].get("export", {}).get("artifacts", {}) if (run / "cnnpack.json").is_file() else {}


def prepare(run: Path, *, arch: bool, data: str | None) -> None:
    if arch and "onnx" not in artifacts(run):
        cnnpack("export", "--arch", "resnet18", "--num-classes", "6", "--classes", SHAPES, "--image-size", "224",
                "--format", "onnx", "--max-batch-size", "32", "--run", str(run), "--force")
    if "openvino" not in artifacts(run):
        cnnpack("export", "--run", str(run), "--format", "openvino", "--max-batch-size",
                str(artifacts(run)["onnx"]["max_batch_size"]))
    if "openvino_int8" not in artifacts(run):
        gate = ["--max-drop", "100", "--min-agreement", "0.01"] if arch else []
        cnnpack("quantize", "--run", str(run), "--backend", "openvino", "--calibration-images", "256",
                *(["--data", data] if data else []), *gate)


def loaded(run: Path, threads: int) -> dict:
    from cnnpack.errors import RuntimeUnavailable
    from cnnpack.runtimes import load_runtime

    r = Run.open(run)
    rts = {"onnxruntime fp32": load_runtime(r, "onnxruntime", threads=threads),
           "openvino fp32": load_runtime(r, "openvino", threads=threads)}
    try:  # a CPU without native bf16 (AVX-512 BF16 or AMX) has no bf16 variant to measure
        rts["openvino bf16"] = load_runtime(r, "openvino-bf16", threads=threads)
    except RuntimeUnavailable as e:
        print(f"skipped: {e}", flush=True)
    rts["openvino int8"] = _int8(r, threads)
    return rts


def _int8(run: Run, threads: int):
    from cnnpack.runtimes import RUNTIMES, artifact_ref

    return RUNTIMES.get("openvino").load(artifact_ref(run, "openvino_int8"), threads=threads)


def median_s(rt, x: np.ndarray, seconds: float) -> float:
    lat = []
    end = time.perf_counter() + seconds
    while len(lat) < 5 or time.perf_counter() < end:
        t0 = time.perf_counter()
        rt.predict(x)
        lat.append(time.perf_counter() - t0)
    return float(np.median(lat))


def local(run: Path, threads: int, rounds: int, seconds: float) -> list[dict]:
    rts = loaded(run, threads)
    out = []
    for batch in (1, 32):
        x = np.random.default_rng(0).integers(0, 256, (batch, 3, 224, 224)).astype(np.float32)
        for rt in rts.values():
            median_s(rt, x, 0.5)  # warm-up
        t = {k: [] for k in rts}
        for _ in range(rounds):
            for k, rt in rts.items():
                t[k].append(median_s(rt, x, seconds))
        base = float(np.median(t["onnxruntime fp32"]))
        for k in rts:
            med = float(np.median(t[k]))
            ratios = [a / b for a, b in zip(t["onnxruntime fp32"], t[k])]
            out.append({"batch": batch, "variant": k, "latency_ms_p50": 1e3 * med, "images_per_s": batch / med,
                        "vs_ort_fp32": base / med, "vs_min": min(ratios), "vs_max": max(ratios)})
            print(f"b{batch} {k}: {1e3 * med:.2f} ms, {base / med:.2f}x ORT fp32", flush=True)
    return out


def served(run: Path, threads: int, seconds: float) -> list[dict]:
    from cnnpack.bench import BenchConfig
    from cnnpack.bench_served import ServedConfig, bench_served
    from cnnpack.serve import ServeConfig, TritonServer
    from cnnpack.triton_repo import TritonConfig, build

    repo = run / "model_repository"
    names = [build(run, TritonConfig(repository=str(repo), format=fmt, threads=threads))["name"]
             for fmt in ("onnx", "openvino_int8")]
    rows = []
    with TritonServer(ServeConfig(repository=str(repo))) as server:
        for model in names:
            section = bench_served(run, ServedConfig(url=server.grpc_address, model=model, protocol="grpc",
                                                     concurrency=(16,)),
                                   BenchConfig(batch_sizes=(1,), threads=threads, max_seconds=seconds, plot=False))
            r = next(r for r in section["results"] if r.get("format") == f"triton:{model}" and r.get("protocol") == "grpc")
            rows.append({"model": model, "throughput_ips": r["throughput_ips"], "latency_ms_p50": r["latency_ms_p50"],
                         "server_batch_mean": r.get("server_batch_mean"), "server_compute_ms_mean": r.get("server_compute_ms_mean")})
            print(f"served {model} c16: {r['throughput_ips']:.1f} images/s", flush=True)
    return rows


def cnn_contracts(run: Path) -> list[dict]:
    cnnpack("verify", "--run", str(run), "--formats", "openvino,openvino_int8")
    f = Run.open(run).read()["stages"]["verify"]["formats"]
    return [{"format": fmt, "runtime": rt, **v} for fmt in ("openvino", "openvino_int8")
            for rt, v in f[fmt]["by_runtime"].items()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cnn-run", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("runs/bench-openvino"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=float, default=1.0)
    args = ap.parse_args()
    info = cpu_info()
    print(f"CPU: {info['model']} flags {info['flags']}", flush=True)
    r18 = args.work / "resnet18_224"
    prepare(r18, arch=True, data="shapes")
    prepare(args.cnn_run, arch=False, data=None)
    record = {"when": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cpu": info,
              "threads": args.threads, "local": local(r18, args.threads, args.rounds, args.seconds),
              "served": served(r18, args.threads, 6.0), "cnn_contracts": cnn_contracts(args.cnn_run),
              "int8_gate": Run.open(r18).read()["stages"]["quantize_openvino"]["gate"],
              "libraries": library_versions(), "command": " ".join(sys.argv)}
    write(record, args)


def write(record: dict, args) -> None:
    stem = f"openvino-cpu{len(os.sched_getaffinity(0))}-threads{args.threads}-{isa_tag()}"
    save_json(stem, record)
    info = record["cpu"]
    lines = [f"# OpenVINO vs ONNX Runtime on the CPU ({stem})", "",
             f"{record['when']}, {info['model']}, flags: {', '.join(info['flags'])}; {args.threads} threads; openvino "
             f"{record['libraries'].get('openvino')}, onnxruntime {record['libraries'].get('onnxruntime-gpu')}.",
             f"Command: `python {record['command']}`", "", "## resnet18 @ 224, local (alternating rounds, one process)", "",
             "| batch | variant | p50 ms | images/s | x ONNX Runtime fp32 (median; min..max of rounds) |",
             "|--:|---|--:|--:|--:|"]
    for r in record["local"]:
        lines.append(f"| {r['batch']} | {r['variant']} | {r['latency_ms_p50']:.2f} | {r['images_per_s']:.1f} | "
                     f"{r['vs_ort_fp32']:.2f}x ({r['vs_min']:.2f}..{r['vs_max']:.2f}) |")
    fp32, int8 = record["served"]  # the ONNX model, then the OpenVINO int8 one
    gain = int8["throughput_ips"] / fp32["throughput_ips"]
    lines += ["", "## resnet18 @ 224, served by the local Triton (batch-1 requests, concurrency 16, "
              f"{record.get('served_protocol', 'gRPC')})", "",
              "| model | images/s | p50 ms | mean executed batch | server compute ms |", "|---|--:|--:|--:|--:|"]
    for r in record["served"]:
        lines.append(f"| {r['model']} | {r['throughput_ips']:.1f} | {r['latency_ms_p50']:.1f} | "
                     f"{r['server_batch_mean'] or 0:.2f} | {r['server_compute_ms_mean'] or 0:.1f} |")
    lines += ["", "## the built-in cnn (default pipeline run): every OpenVINO artifact within its contract", "",
              "| artifact | runtime | precision | max abs err | top-1 agreement | accuracy | passed |", "|---|---|---|--:|--:|--:|:-:|"]
    for r in record["cnn_contracts"]:
        lines.append(f"| {r['format']} | {r['runtime']} | {r['precision']} | {r['max_abs_err']:.2e} | "
                     f"{100 * r['top1_agreement']:.2f}% | {100 * r['accuracy']:.2f}% | {'yes' if r['passed'] else 'NO'} |")
    by = {(r["batch"], r["variant"]): r["vs_ort_fp32"] for r in record["local"]}
    met = lambda ok: "met" if ok else "**not met**"  # noqa: E731
    lines += ["", "## Targets", ""]
    for b in (1, 32):
        bf16 = (f"bf16 {by[(b, 'openvino bf16')]:.2f}x (>= 1.8x: {met(by[(b, 'openvino bf16')] >= 1.8)})"
                if (b, "openvino bf16") in by else "bf16 not measured (this CPU has no native bf16)")
        lines.append(f"- batch {b}: int8 {by[(b, 'openvino int8')]:.2f}x (>= 3.5x: {met(by[(b, 'openvino int8')] >= 3.5)}), "
                     f"{bf16}, "
                     f"fp32 {by[(b, 'openvino fp32')]:.2f}x (within 10 %: {met(abs(by[(b, 'openvino fp32')] - 1) <= 0.1)})")
    lines.append(f"- served OpenVINO int8 vs served fp32 ONNX at concurrency 16: {gain:.2f}x (>= 2.5x: {met(gain >= 2.5)})")
    lines.append(f"- int8 IR agreement with the fp32 IR on shapes@224 (random weights, gate opened): "
                 f"{100 * record['int8_gate']['top1_agreement_vs_fp32']:.1f}%")
    save_md(stem, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
